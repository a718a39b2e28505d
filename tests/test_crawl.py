"""data.crawl: icrawler's real downloader against a loopback web server standing in for a search engine."""
import hashlib
import http.server
import io
import subprocess
import sys
import threading
import time
import unicodedata
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, quote, urlsplit

import numpy as np
import pytest
from icrawler import Crawler, Feeder, ImageDownloader, Parser
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data import crawl  # noqa: E402
from data.images import read_image  # noqa: E402

FAST = {"queue": 0.5, "parser_queue": 0.5, "request": 5.0}  # a loopback server answers at once


def picture(seed, fmt="PNG"):
    """The bytes of a small random picture, different for each seed."""
    a = np.random.default_rng(seed).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt)
    return buf.getvalue()


def key(data):
    return hashlib.sha256(data).hexdigest()[:crawl.HASH_CHARS]


class Site:
    """A loopback web server: /search?q=NAME lists the URLs in results[NAME], one a line; any other
    path serves files[path] = (content type, bytes) or 404. hits counts the requests per path."""

    def __init__(self):
        self.files, self.results, self.hits, self.lock = {}, {}, Counter(), threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.serve(self)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def serve(self, handler):
        parts = urlsplit(handler.path)
        with self.lock:
            self.hits[parts.path] += 1
        if parts.path == "/search":
            urls = self.results.get(parse_qs(parts.query).get("q", [""])[0], [])
            status, ctype, body = 200, "text/plain", "\n".join(self.url + u for u in urls).encode()
        elif parts.path in self.files:
            status, (ctype, body) = 200, self.files[parts.path]
        else:
            status, ctype, body = 404, "text/plain", b"not found"
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    def add(self, name, path, body, ctype="image/png"):
        self.files[path] = (ctype, body)
        self.results.setdefault(name, []).append(path)

    def total(self):
        with self.lock:
            return sum(self.hits.values())


def loopback_engine(site_url):
    """An icrawler Crawler whose 'search engine' is the Site: a feeder asking /search?q=keyword and a
    parser reading one URL a line; downloading is icrawler's ImageDownloader, as for the real engines."""

    class SearchFeeder(Feeder):
        def feed(self, keyword, offset, max_num):
            self.out_queue.put(f"{site_url}/search?q={quote(keyword, safe='')}")

    class ListParser(Parser):
        def parse(self, response):
            return [{"file_url": url} for url in response.text.split()]

    class LoopbackCrawler(Crawler):
        def __init__(self, feeder_cls=SearchFeeder, parser_cls=ListParser, downloader_cls=ImageDownloader,
                     *args, **kwargs):
            super().__init__(feeder_cls, parser_cls, downloader_cls, *args, **kwargs)

    return LoopbackCrawler


@pytest.fixture
def site(monkeypatch):
    """The Site, serving while the test runs, registered as engine "loopback" with short queue timeouts."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    s = Site()
    s.thread.start()
    monkeypatch.setitem(crawl.ENGINES, "loopback", loopback_engine(s.url))
    monkeypatch.setattr(crawl, "TIMEOUTS", FAST)
    yield s
    s.server.shutdown()
    s.server.server_close()


def stored(folder):
    return sorted(p.name for p in Path(folder).iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------- names and folders

HOSTILE = ["..", ".", "../../etc", "/abs/path", "a/b", "a\\b", "C:\\x", "\0", "a\0b", "..\\..\\x", " .hidden",
           ".hidden", "CON", "nul.txt", "names.tsv", "a\tb", "\u202e", "x" * 300, "高坂穂乃果" * 40, "*?<>|\""]


@pytest.mark.parametrize("name", HOSTILE)
def test_folder_name_is_one_safe_visible_component(tmp_path, name):
    folder = crawl.folder_name(name)
    assert folder and "/" not in folder and "\\" not in folder and "\0" not in folder
    assert not folder.startswith(".") and not folder.endswith((".", " ")) and folder.casefold() != "names.tsv"
    assert len(folder.encode()) <= crawl.MAX_FOLDER_BYTES
    assert crawl.name_folder(tmp_path, name).parent == tmp_path


def test_folder_name_keeps_plain_names_and_tells_changed_ones_apart():
    assert crawl.folder_name("高坂穂乃果") == "高坂穂乃果"
    assert crawl.folder_name("エマ・ヴェルデ") == "エマ・ヴェルデ"
    assert crawl.folder_name("a/b") != crawl.folder_name("a\\b") != crawl.folder_name("a_b") == "a_b"
    assert crawl.folder_name("x" * 300) != crawl.folder_name("x" * 301)


def test_name_folder_refuses_a_symlink_out(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "evil").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="inside"):
        crawl.name_folder(tmp_path / "raw", "evil")


def test_read_names_skips_blanks_comments_and_repeats(tmp_path):
    nfd = unicodedata.normalize("NFD", "ガ")
    path = tmp_path / "names.txt"
    path.write_text("\ufeff# idols\n高坂穂乃果\n\n   \n 高坂穂乃果 \nガ\n" + nfd + "\na\0b\n", encoding="utf-8")
    assert crawl.read_names(path) == ["高坂穂乃果", "ガ", "a b"]
    (tmp_path / "empty.txt").write_text("\n \n# none\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no names"):
        crawl.read_names(tmp_path / "empty.txt")


def test_default_names_list_has_the_27_idols():
    names = crawl.read_names(crawl.DEFAULT_NAMES)
    assert len(names) == 27 and names[0] == "高坂穂乃果" and names[-1] == "天王寺璃奈"
    assert all(crawl.folder_name(n) == n for n in names)


# ---------------------------------------------------------------- crawling through the loopback server

def test_crawl_keeps_each_picture_once_and_resumes_without_downloading_again(site, tmp_path):
    name, raw = "高坂穂乃果", tmp_path / "raw"
    pictures = [picture(i) for i in range(4)] + [picture(4, "JPEG")]
    for i, data in enumerate(pictures):
        site.add(name, f"/p/{i}.{'jpg' if i == 4 else 'png'}", data, "image/jpeg" if i == 4 else "image/png")
    site.add(name, "/p/same-bytes.jpg", pictures[0])  # a duplicate under another URL (and a wrong suffix)
    site.add(name, "/p/page.html", b"<html>not a picture</html>", "text/html")
    site.add(name, "/p/cut.png", pictures[1][:len(pictures[1]) // 2])  # opens, but truncated
    site.results[name].append("/p/missing.png")  # 404

    rows = crawl.crawl_names([name], raw, "loopback", max_per_name=10, timeouts=FAST)
    assert rows == [(name, name, 0, 5)]
    assert stored(raw / name) == sorted([f"{key(d)}.png" for d in pictures[:4]] + [f"{key(pictures[4])}.jpg"])
    assert all(read_image(p).shape == (24, 32, 3) for p in (raw / name).iterdir())
    assert not (raw / crawl.STATE / "staging").exists()
    assert (raw / "names.tsv").read_text(encoding="utf-8") == f"folder\tname\n{name}\t{name}\n"
    assert all(n == 1 for n in site.hits.values()), site.hits

    # An interrupted run's half-checked download is thrown away; URLs fetched before are not asked again.
    leftover = raw / crawl.STATE / "staging" / name / "0123.part"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial")
    site.add(name, "/p/new1.png", picture(10))
    site.add(name, "/p/new2.png", picture(11))
    site.hits.clear()
    rows = crawl.crawl_names([name], raw, "loopback", max_per_name=6, timeouts=FAST)
    assert rows == [(name, name, 5, 6)] and len(stored(raw / name)) == 6
    assert not leftover.exists()
    assert site.hits["/search"] == 1 and not set(site.hits) & {f"/p/{i}.png" for i in range(4)}, site.hits
    assert site.hits["/p/page.html"] == site.hits["/p/same-bytes.jpg"] == 0

    # Complete names are skipped without a single request.
    site.hits.clear()
    assert crawl.crawl_names([name], raw, "loopback", max_per_name=6, timeouts=FAST) == [(name, name, 6, 6)]
    assert site.total() == 0


def test_cli_keeps_hostile_names_inside_raw_dir(site, tmp_path, capsys):
    hostile = ["../../escape", "..\\..\\win", "a/b\0c", "..", "長" * 200]
    lines = hostile + ["", "   ", "../../escape"]
    (tmp_path / "names.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    for i, line in enumerate(hostile):
        name = crawl.clean_name(line)
        site.add(name, f"/h/{i}a.png", picture(100 + i))
        site.add(name, f"/h/{i}b.png", picture(200 + i))
    raw = tmp_path / "out" / "raw"

    crawl.main([str(tmp_path / "names.txt"), "--out", str(raw), "--engine", "loopback", "--max-per-name", "1"])

    out = capsys.readouterr().out
    assert "5 names, 5 complete (1 pictures each), 5 new pictures" in out, out
    outside = [p for p in tmp_path.rglob("*") if p.is_file() and raw not in p.parents and p.name != "names.txt"]
    assert outside == []
    folders = sorted(p for p in raw.iterdir() if p.is_dir() and p.name != crawl.STATE)
    assert len(folders) == 5 and all(len(stored(f)) == 1 for f in folders)
    assert all(not f.name.startswith(".") and len(f.name.encode()) <= crawl.MAX_FOLDER_BYTES for f in folders)
    table = (raw / "names.tsv").read_text(encoding="utf-8").splitlines()[1:]
    assert sorted(line.split("\t")[0] for line in table) == [f.name for f in folders]
    assert {line.split("\t")[1] for line in table} == {crawl.clean_name(n) for n in hostile}


def test_a_parser_returning_none_or_failing_means_no_results():
    def failing(response):
        raise KeyError("layout changed")

    assert crawl._tolerant(lambda response: None)(object()) == []  # icrawler's GoogleParser on a page it cannot read
    assert crawl._tolerant(failing)(object()) == []
    assert crawl._tolerant(lambda response: iter([{"file_url": "u"}]))(object()) == [{"file_url": "u"}]


# ---------------------------------------------------------------- command line

def test_help_and_bad_arguments(capsys):
    with pytest.raises(SystemExit) as e:
        crawl.main(["--help"])
    assert e.value.code == 0 and "--max-per-name" in capsys.readouterr().out
    for argv in (["--max-per-name", "0", "--out", "x"], ["--engine", "altavista", "--out", "x"], []):
        with pytest.raises(SystemExit) as e:
            crawl.main(argv)
        assert e.value.code == 2 and "usage:" in capsys.readouterr().err


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "file").write_text("x")
    for args, message in (([str(tmp_path / "missing.txt")], "error: names file not found"),
                          ([str(crawl.DEFAULT_NAMES)], "not a folder")):
        r = subprocess.run([sys.executable, "-m", "data.crawl", *args, "--out", str(tmp_path / "file")], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


def test_an_endless_or_trickling_response_is_refused_in_bounded_memory_and_time(site, tmp_path, monkeypatch):
    """requests' timeout bounds each read, not the download: a server sending without end (no
    Content-Length) was read whole into memory, and one trickling a byte at a time held its thread
    for as long as it liked (40 bytes at 4 a second: 10 s a try, 3 tries). Both are now cut off at
    MAX_DOWNLOAD_BYTES and DOWNLOAD_SECONDS, recorded as refused and not asked for again; the good
    picture beside them is stored."""
    monkeypatch.setattr(crawl, "MAX_DOWNLOAD_BYTES", 2**20, raising=False)
    monkeypatch.setattr(crawl, "DOWNLOAD_SECONDS", 1.0, raising=False)
    sent, serve = Counter(), site.serve

    def hostile(handler):
        path = urlsplit(handler.path).path
        if path not in ("/endless.png", "/trickle.png"):
            return serve(handler)
        with site.lock:
            site.hits[path] += 1
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        if path == "/trickle.png":
            handler.send_header("Content-Length", "80")
        handler.end_headers()
        try:
            for _ in range(80 if path == "/trickle.png" else 200):  # 200 MiB, or 80 bytes over 20 s
                chunk = b"\x89" if path == "/trickle.png" else picture(0)[:16] + bytes(2**20 - 16)
                handler.wfile.write(chunk)
                handler.wfile.flush()
                sent[path] += len(chunk)
                if path == "/trickle.png":
                    time.sleep(0.25)
        except OSError:  # the crawler hung up: what it should do
            pass

    monkeypatch.setattr(site, "serve", hostile)
    name, raw = "n", tmp_path / "raw"
    site.results[name] = ["/endless.png", "/trickle.png"]
    site.add(name, "/ok.png", picture(7))
    start = time.monotonic()
    rows = crawl.crawl_names([name], raw, "loopback", max_per_name=3, timeouts=FAST)
    assert time.monotonic() - start < 10
    assert rows == [(name, name, 0, 1)] and stored(raw / name) == [f"{key(picture(7))}.png"]
    assert sent["/endless.png"] < 40 * 2**20, sent  # socket buffers aside, it stopped near the 1 MiB limit
    sources = crawl.read_sources(raw / crawl.STATE / "sources" / f"{name}.tsv")
    assert sources[site.url + "/endless.png"] == sources[site.url + "/trickle.png"] == "-"
    site.hits.clear()
    crawl.crawl_names([name], raw, "loopback", max_per_name=3, timeouts=FAST)
    assert site.hits["/endless.png"] == site.hits["/trickle.png"] == 0, site.hits


def test_a_jpeg_over_twice_the_pixel_limit_is_stored_as_read_image_reads_it(tmp_path, monkeypatch):
    """read_image reads such a JPEG in draft mode; naming it by its format must not open it with
    Image.open, which raises DecompressionBombError (in a downloader thread: a traceback, no picture)."""
    from PIL import Image as PILImage

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 64 * 64)
    data = picture(3, "JPEG")
    big = io.BytesIO()
    PILImage.open(io.BytesIO(data)).resize((256, 192)).save(big, format="JPEG")
    store = crawl.FolderStore(tmp_path / "n", tmp_path / "staging", tmp_path / "sources.tsv", limit=5)
    (tmp_path / "staging").mkdir()
    name = store.stage("http://127.0.0.1/big.jpg", big.getvalue())
    assert name == f"{key(big.getvalue())}.jpg"
    store.write(name, big.getvalue())
    assert stored(tmp_path / "n") == [name]
