"""Crawl pictures of characters by name with icrawler: one folder per name, resumable, no duplicates.

    python -m data.crawl [NAMES_FILE] --out RAW_DIR [--engine bing|google|baidu] [--max-per-name 50]

NAMES_FILE has one name per line (default: data/names_lovelive.txt, the 27 idols of the original
experiment); blank lines and lines starting with # are skipped. Each name gets RAW_DIR/<folder>/,
<folder> being the name made safe as a folder name; RAW_DIR/names.tsv maps folders back to names
(train.py --names reads it). A picture is stored as <sha256 prefix>.<format>, so one served under
several URLs is kept once. Downloads land in RAW_DIR/.crawl/staging/ and are renamed into place
only once they read as images, so a name's folder never holds a partial or broken file.
Rerunning resumes: names that have --max-per-name pictures are skipped without any request, and
URLs already fetched for a name (listed in RAW_DIR/.crawl/sources/) are not downloaded again.
"""
import argparse
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
import unicodedata
from pathlib import Path

import requests
from icrawler import Crawler, ImageDownloader
from icrawler.builtin import BaiduImageCrawler, BingImageCrawler, GoogleImageCrawler
from icrawler.storage import BaseStorage
from tqdm import tqdm

from atomic import write_text
from data.images import ImageError, list_images, open_image, read_image

DEFAULT_NAMES = Path(__file__).resolve().parent / "names_lovelive.txt"
# --engine choices. Any icrawler Crawler whose feeder takes (keyword, offset, max_num) fits; the
# tests add one that reads a loopback "search results" page.
ENGINES = {"bing": BingImageCrawler, "google": GoogleImageCrawler, "baidu": BaiduImageCrawler}
MAX_RESULTS = 1000  # the engines give at most this many results for a query
# Seconds; icrawler's defaults. A downloader thread that has an image quits after `queue` idle seconds.
TIMEOUTS = {"queue": 5.0, "parser_queue": 2.0, "request": 5.0}
# A download is refused past these: `request` bounds each read, not the whole body, so a server trickling a
# byte every few seconds, or sending without end, would otherwise hold a thread or fill the memory.
MAX_DOWNLOAD_BYTES = 50 * 2**20  # far above any picture worth training on
DOWNLOAD_SECONDS = 60.0
READ_CHUNK = 64 * 1024
HASH_CHARS = 16  # 64 bits of the SHA-256: no accidental collision among millions of pictures
MAX_FOLDER_BYTES = 96  # UTF-8 bytes, hash suffix included: far below the usual 255-byte name limit
STATE = ".crawl"  # hidden, so image-folder readers never take it for a class
NAMES_TSV = "names.tsv"
_SUFFIX = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "WEBP": "webp", "BMP": "bmp", "TIFF": "tif"}
_UNSAFE = set('/\\:*?"<>|')  # separators and what Windows forbids in a name
_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10))}
log = logging.getLogger(__name__)


# ---------------------------------------------------------------- names and folders

def clean_name(line):
    """A names-file line as a search keyword: NFC-normalised (one folder however the name was
    typed), control characters such as NUL or tabs turned into spaces, runs of spaces collapsed."""
    text = unicodedata.normalize("NFC", line)
    return " ".join("".join(" " if unicodedata.category(c) == "Cc" else c for c in text).split())


def read_names(path):
    """The names in a UTF-8 text file, in order: cleaned, blanks and # comments skipped, repeats dropped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ValueError(f"names file not found: {path}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    names = list(dict.fromkeys(n for n in map(clean_name, text.splitlines()) if n and not n.startswith("#")))
    if not names:
        raise ValueError(f"{path}: no names in it (one a line)")
    return names


def folder_name(name):
    """A folder name for `name` that is one plain, visible path component on any filesystem.

    Separators, NUL and other control characters and what Windows forbids become "_"; leading and
    trailing dots and spaces go (no "..", no hidden folder); long names are cut to MAX_FOLDER_BYTES.
    Whenever the name had to change, a hash of it is appended, so different names never share a folder.
    """
    safe = "".join("_" if c in _UNSAFE or unicodedata.category(c)[0] == "C" else c for c in name).strip(" .")
    changed = safe != name or safe.split(".")[0].upper() in _DEVICES or safe.casefold() == NAMES_TSV
    tag = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    if len(safe.encode()) > MAX_FOLDER_BYTES:
        safe = safe.encode()[:MAX_FOLDER_BYTES - len(tag) - 1].decode("utf-8", "ignore").rstrip(" .")
        changed = True
    if not changed and safe:  # an empty name is unchanged, yet no folder
        return safe
    return f"{safe}-{tag}" if safe else f"name-{tag}"


def name_folder(raw_dir, name):
    """RAW_DIR/<folder_name(name)>, checked to lie directly inside RAW_DIR (a symlink out is refused)."""
    raw = Path(raw_dir)
    folder = raw / folder_name(name)
    if folder.resolve().parent != raw.resolve():
        raise ValueError(f"{folder}: does not lie directly inside {raw}")
    return folder


def count_images(folder):
    return len(list_images(folder)) if Path(folder).is_dir() else 0


def plan_folders(names, raw_dir):
    """(name, folder) pairs; a name whose folder matches an earlier one but for case is skipped,
    as both would be one folder on a case-insensitive filesystem."""
    plan, taken = [], {}
    for name in names:
        folder = name_folder(raw_dir, name).name
        if folder.casefold() in taken:
            print(f"warning: skipped {name!r}: same folder as {taken[folder.casefold()]!r}", file=sys.stderr)
            continue
        taken[folder.casefold()] = name
        plan.append((name, folder))
    return plan


def write_names_tsv(raw_dir, plan):
    """RAW_DIR/names.tsv, folder<TAB>name, keeping rows of earlier runs: train.py --names shows the names."""
    path = Path(raw_dir) / NAMES_TSV
    rows = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines()[1:]:
            folder, _, name = line.partition("\t")
            rows[folder] = name
    rows.update((folder, name) for name, folder in plan)
    write_text(path, "folder\tname\n" + "".join(f"{f}\t{n}\n" for f, n in rows.items()))


# ---------------------------------------------------------------- icrawler storage and downloader

def read_sources(path):
    """url -> verdict from a sources list; a torn last line (an interrupted run) is just ignored."""
    if not Path(path).is_file():
        return {}
    pairs = (line.split("\t") for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines())
    return {p[0]: p[1] for p in pairs if len(p) == 2}


class FolderStore(BaseStorage):
    """icrawler storage for one name's folder, filled only with checked pictures named by content hash.

    stage() drops a body already stored, one that is not an image, or one beyond `limit`; else it
    writes it into the staging folder and reads it back with read_image, and write() renames it
    into the folder, where it appears whole. Every URL fetched is appended to the sources list
    (URL<TAB>hash, or "-" for not an image) so a later run never downloads it again; appending
    keeps that O(1) per URL, and a torn last line costs at most one repeated download.
    """

    def __init__(self, folder, staging, sources, limit):
        self.folder, self.staging, self.sources_path, self.limit = Path(folder), Path(staging), Path(sources), limit
        self.lock = threading.Lock()
        self.stored = {p.stem for p in list_images(self.folder)} if self.folder.is_dir() else set()
        self.pending = {}  # hash -> url: staged, not yet in the folder
        self.sources = read_sources(self.sources_path)
        self.sources_path.parent.mkdir(parents=True, exist_ok=True)

    def seen(self, url):
        with self.lock:
            return url in self.sources

    def full(self):
        with self.lock:
            return len(self.stored) + len(self.pending) >= self.limit

    def reject(self, url):
        with self.lock:
            self._record(url, "-")

    def stage(self, url, content):
        """Check a downloaded body: the file name it will be stored under, or None to drop it."""
        key = hashlib.sha256(content).hexdigest()[:HASH_CHARS]
        with self.lock:
            if key in self.stored or key in self.pending:
                self._record(url, key)  # the same bytes under another URL
                return None
            if len(self.stored) + len(self.pending) >= self.limit:
                return None
            self.pending[key] = url
        name = verdict = None
        try:
            name = self._check(key, content)
        except ImageError as e:
            log.info("dropped %s: %s", url, e)
            verdict = "-"
        except OSError as e:  # e.g. disk full: not the URL's fault, so it may be tried again
            log.error("could not stage %s: %s", url, e)
        if name is None:
            with self.lock:
                del self.pending[key]
                if verdict:
                    self._record(url, verdict)
        return name

    def _check(self, key, content):
        """Write the body to staging, read it as an image, name it by its real format (not the URL's)."""
        part = self.staging / f"{key}.part"
        try:
            part.write_bytes(content)
            read_image(part)
            with open_image(part) as im:  # Image.open would refuse a JPEG over the pixel limit that read_image reads
                suffix = _SUFFIX.get(im.format, (im.format or "img").lower())
            os.replace(part, self.staging / f"{key}.{suffix}")
        finally:
            part.unlink(missing_ok=True)
        return f"{key}.{suffix}"

    def write(self, id, data):
        """Rename the checked file `id` from staging into the folder: atomic, never a partial file."""
        key = Path(id).stem
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / id, self.folder / id)
        except OSError as e:
            log.error("could not store %s: %s", id, e)
            with self.lock:
                self.pending.pop(key, None)
            return
        with self.lock:
            self.stored.add(key)
            self._record(self.pending.pop(key), key)

    def exists(self, id):
        return (self.folder / id).exists()

    def max_file_idx(self):
        return 0

    def _record(self, url, verdict):
        """Append url<TAB>verdict to the sources list (the caller holds the lock)."""
        self.sources[url] = verdict
        if any(c in url for c in "\t\r\n"):
            return
        try:
            with open(self.sources_path, "a", encoding="utf-8") as f:
                f.write(f"{url}\t{verdict}\n")
        except OSError as e:  # in a downloader thread: log it rather than kill the thread
            log.error("could not record %s: %s", url, e)


class DownloadRefused(Exception):
    """A response too large or too slow to be a picture worth waiting for."""


def fetch(session, url, timeout, max_bytes=MAX_DOWNLOAD_BYTES, seconds=DOWNLOAD_SECONDS):
    """(status, body) of a GET, body None unless the status is 200. The body is read piece by piece (each read
    waits at most `timeout`), so one over max_bytes (as declared, or as it arrives) or still arriving after
    `seconds` raises DownloadRefused instead of filling the memory or holding the thread indefinitely."""
    deadline = time.monotonic() + seconds
    with session.get(url, timeout=timeout, stream=True) as response:
        if response.status_code != 200:
            return response.status_code, None
        declared = response.headers.get("Content-Length", "").strip()
        if declared.isdigit() and int(declared) > max_bytes:
            raise DownloadRefused(f"{int(declared)} bytes, over the {max_bytes}-byte limit")
        body = bytearray()
        while piece := response.raw.read1(READ_CHUNK, decode_content=True):
            body += piece
            if len(body) > max_bytes:
                raise DownloadRefused(f"over the {max_bytes}-byte limit")
            if time.monotonic() > deadline:
                raise DownloadRefused(f"still arriving after {seconds:g} s")
        return 200, bytes(body)


class StoreDownloader(ImageDownloader):
    """icrawler's ImageDownloader storing through a FolderStore: no request for a URL already
    fetched or once the folder is full, only new, readable pictures count towards max_num, and a
    body is read with fetch's size and time limits (icrawler's own download reads any body whole)."""

    def download(self, task, default_ext, timeout=5, max_retry=3, overwrite=False, max_bytes=MAX_DOWNLOAD_BYTES,
                 seconds=DOWNLOAD_SECONDS, **kwargs):
        url = task["file_url"]
        task["success"], task["filename"] = False, None
        if self.storage.full():
            self.signal.set(reach_max_num=True)
            return
        if self.storage.seen(url):
            return
        for _ in range(max_retry):  # as icrawler: a failed connection or read is tried again
            if self.signal.get("reach_max_num"):
                return
            try:
                status, body = fetch(self.session, url, timeout, max_bytes, seconds)
                break
            except DownloadRefused as e:
                log.info("dropped %s: %s", url, e)
                self.storage.reject(url)
                return
            except (requests.RequestException, OSError) as e:  # urllib3 errors come wrapped or as OSError
                log.info("could not download %s: %s", url, e)
        else:
            return
        if status != 200:
            log.info("status %d for %s", status, url)
            return
        name = self.storage.stage(url, body)
        if name is None:
            return
        with self.lock:
            self.fetched_num += 1
        self.storage.write(name, body)
        task["success"], task["filename"] = True, name
        if self.reach_max_num():
            self.signal.set(reach_max_num=True)


def _tolerant(parse):
    """Wrap a parser's parse(): icrawler's GoogleParser returns None for a page it cannot read, which
    kills its thread with a traceback (hellock/icrawler#135); treat that, or any parse error, as no results."""
    def wrapped(response, **kwargs):
        try:
            return list(parse(response, **kwargs) or [])
        except Exception as e:
            log.error("could not read results page %s: %s", getattr(response, "url", "?"), e)
            return []
    return wrapped


# ---------------------------------------------------------------- crawling

def crawl_name(name, raw_dir, engine="bing", max_per_name=50, threads=4, timeouts=None, log_level=logging.WARNING):
    """Fill RAW_DIR/<folder> with up to max_per_name pictures of `name`: (count before, count after).

    A complete name returns at once, without any request. Twice max_per_name results are asked
    for, as some are duplicates, broken, or were fetched before.
    """
    folder = name_folder(raw_dir, name)
    had = count_images(folder)
    if had >= max_per_name:
        return had, had
    state = Path(raw_dir) / STATE
    staging = state / "staging" / folder.name
    shutil.rmtree(staging, ignore_errors=True)  # what an interrupted run left unchecked
    staging.mkdir(parents=True, exist_ok=True)
    store = FolderStore(folder, staging, state / "sources" / f"{folder.name}.tsv", max_per_name)
    crawler = ENGINES[engine](downloader_cls=StoreDownloader, storage=store, downloader_threads=threads,
                              log_level=log_level)
    crawler.parser.parse = _tolerant(crawler.parser.parse)
    t = {**TIMEOUTS, **(timeouts or {})}
    # Crawler.crawl rather than the engine's crawl(keyword=...): one call for every engine, and it
    # passes on the queue timeouts that the engines' own crawl() leaves at their defaults.
    Crawler.crawl(crawler, feeder_kwargs=dict(keyword=name, offset=0, max_num=min(MAX_RESULTS, 2 * max_per_name)),
                  parser_kwargs=dict(queue_timeout=t["parser_queue"], req_timeout=t["request"]),
                  downloader_kwargs=dict(max_num=max_per_name - had, queue_timeout=t["queue"],
                                         req_timeout=t["request"], max_bytes=MAX_DOWNLOAD_BYTES,
                                         seconds=DOWNLOAD_SECONDS))
    crawler.signal.set(reach_max_num=True)  # parser threads still paging through results stop too
    shutil.rmtree(staging, ignore_errors=True)
    return had, count_images(folder)


def crawl_names(names, raw_dir, engine="bing", max_per_name=50, threads=4, timeouts=None, log_level=logging.WARNING):
    """Crawl each name in turn (see crawl_name): rows (name, folder, count before, count after)."""
    raw = Path(raw_dir)
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(sorted(ENGINES))}")
    if raw.exists() and not raw.is_dir():
        raise ValueError(f"{raw}: not a folder")
    raw.mkdir(parents=True, exist_ok=True)
    plan = plan_folders(names, raw)
    write_names_tsv(raw, plan)
    rows = []
    bar = tqdm(plan, desc="crawling", unit="name")
    for name, folder in bar:
        bar.set_postfix_str(name[:24])
        before, after = crawl_name(name, raw, engine, max_per_name, threads, timeouts, log_level)
        rows.append((name, folder, before, after))
    for empty in (raw / STATE / "staging", raw / STATE / "sources", raw / STATE):
        if empty.is_dir() and not any(empty.iterdir()):
            empty.rmdir()
    return rows


# ---------------------------------------------------------------- report and command line

def format_table(rows, max_per_name):
    """The per-name report: new pictures this run and the total; the name comes last so wide (CJK)
    names keep the columns aligned; names short of max_per_name, and renamed folders, are marked."""
    lines = ["  new  total  name"]
    for name, folder, before, after in rows:
        note = ("" if after >= max_per_name else "  (short)") + ("" if folder == name else f"  (folder {folder})")
        lines.append(f"{after - before:>5}  {after:>5}  {name}{note}")
    complete = sum(after >= max_per_name for *_, after in rows)
    new = sum(after - before for *_, before, after in rows)
    lines.append(f"{len(rows)} names, {complete} complete ({max_per_name} pictures each), {new} new pictures")
    return "\n".join(lines)


def _int_in(low, high):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m data.crawl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names_file", nargs="?", default=str(DEFAULT_NAMES), metavar="NAMES_FILE",
                   help="UTF-8 text, one name per line (default: data/names_lovelive.txt)")
    p.add_argument("--out", required=True, metavar="RAW_DIR", help="one subfolder per name is filled here")
    p.add_argument("--engine", choices=sorted(ENGINES), default="bing",
                   help="image search engine (default: %(default)s; icrawler's Google parser often finds "
                        "nothing on today's result pages)")
    p.add_argument("--max-per-name", type=_int_in(1, MAX_RESULTS), default=50,
                   help="pictures wanted per name; names that have them are skipped (default: %(default)s)")
    p.add_argument("--threads", type=_int_in(1, 32), default=4, help="download threads (default: %(default)s)")
    p.add_argument("--verbose", action="store_true", help="show icrawler's log of every page and download")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    level = logging.INFO if args.verbose else logging.CRITICAL  # per-URL failures are routine when crawling
    for logger in ("icrawler", "feeder", "parser", "downloader", __name__):
        logging.getLogger(logger).setLevel(level)
    try:
        names = read_names(args.names_file)
        rows = crawl_names(names, args.out, args.engine, args.max_per_name, args.threads, log_level=level)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit("interrupted: rerun the same command to resume")
    print(format_table(rows, args.max_per_name))
    empty = [name for name, *_, after in rows if after == 0]
    if empty:
        sys.exit(f"error: no pictures found for {len(empty)} name(s): {', '.join(empty[:5])}"
                 + (" ..." if len(empty) > 5 else ""))


if __name__ == "__main__":
    main()
