"""report.py: report.json merged across methods, the page's escaping and atomic writes; then the page itself
in headless Chromium through Playwright (skipped where either is missing): cards, image sources, sorting,
filtering, the skipped file, a Japanese class name, a screenshot that is not blank.

Also a developer command, not a test:
    python tests/test_report.py screenshot md_image/report.png   # the README's picture (12 synthetic pictures)
    python tests/test_report.py bench 2000                       # how long a 2,000-picture page takes to open
"""
import html
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conftest  # noqa: F401  (the repository on sys.path, also when run as a script)

import atomic
import report
from report import update_report

SUISEI = "星街すいせい"
# source, true class (None: its folder names no class), predicted class, probability
PICTURES = [
    ("cat/1.png", "cat", "cat", 0.97),
    ("cat/2.png", "cat", SUISEI, 0.55),  # the wrong one
    ("cat/a b#1.png", "cat", "cat", 0.81),  # a space and a '#' in the name: URL-quoted
    (f"{SUISEI}/1.png", SUISEI, SUISEI, 0.93),
    (f"{SUISEI}/2.png", SUISEI, SUISEI, 0.66),
    ("misc/x.png", None, "cat", 0.42),
]
BROKEN = "cat/broken.png"
METHODS = (("scorecam", "Score-CAM"), ("gradcam", "Grad-CAM"))
# Chromium offline: no network services, no first-run work; a fresh profile (launch_persistent_context).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def synthetic_picture(seed, size=64):
    """A soft background with a bright disc: something for an overlay to point at."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = rng.uniform(40, 120, 3) + 60 * np.stack([x, y, 1 - x], -1)
    cy, cx = rng.uniform(0.3, 0.7, 2)
    disc = ((y - cy) ** 2 + (x - cx) ** 2) < rng.uniform(0.02, 0.05)
    base[disc] = rng.uniform(150, 255, 3)
    return np.clip(base, 0, 255).astype(np.uint8), (cy, cx)


def synthetic_overlay(picture, centre, spread):
    """The picture blended with a jet-coloured Gaussian heat map around `centre`."""
    size = picture.shape[0]
    y, x = np.mgrid[0:size, 0:size] / size
    heat = np.exp(-((y - centre[0]) ** 2 + (x - centre[1]) ** 2) / spread)[..., None]
    jet = np.clip(1.5 - np.abs(4 * heat - np.array([3, 2, 1])), 0, 1) * 255
    alpha = 0.2 + 0.5 * heat
    return ((1 - alpha) * picture + alpha * jet).astype(np.uint8)


def make_report(root, pictures=PICTURES, methods=METHODS, broken=(BROKEN,), drop_last=True):
    """Pictures under root/pictures, overlays under root/out (one run per method: update_report each);
    the last picture is left out of the second method's run where drop_last. Returns the out folder."""
    folder, out = root / "pictures", root / "out"
    for n, (source, *_) in enumerate(pictures):
        (folder / source).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_picture(n)[0]).save(folder / source)
    messages = []
    for name in broken:
        (folder / name).write_bytes(b"not a picture")
        messages.append(f"{name}: cannot identify image file")
    for m, (method, label) in enumerate(methods):
        records = []
        for n, (source, true, predicted, probability) in enumerate(pictures):
            if drop_last and m and n == len(pictures) - 1:
                continue
            picture, centre = synthetic_picture(n)
            figure = out / Path(source).parent / f"{Path(source).stem}_{method}.png"
            figure.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(synthetic_overlay(picture, centre, 0.02 + 0.03 * m)).save(figure)
            records.append({"source": source, "picture": str(folder / source), "figure": str(figure),
                            "predicted": predicted, "probability": probability, "true": true})
        update_report(out, records, messages, method=method, label=label)
    return out


def embedded_cards(page_html):
    (text,) = re.findall(r'<script type="application/json" id="report-data">(.*?)</script>', page_html, re.DOTALL)
    return json.loads(text)


# ---------------------------------------------------------------- report.json and the page's text


def test_runs_of_two_methods_merge_by_source(tmp_path):
    out = make_report(tmp_path)
    saved = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert saved["methods"] == dict(METHODS)
    assert sorted(saved["pictures"]) == sorted(source for source, *_ in PICTURES)
    message = f"{BROKEN}: cannot identify image file"
    assert saved["skipped"] == {"scorecam": [message], "gradcam": [message]}
    entry = saved["pictures"]["cat/2.png"]
    assert entry["picture"] == "../pictures/cat/2.png" and entry["true"] == "cat"
    assert entry["methods"]["gradcam"] == {"figure": "cat/2_gradcam.png", "predicted": SUISEI, "probability": 0.55}
    assert list(saved["pictures"]["misc/x.png"]["methods"]) == ["scorecam"]
    assert SUISEI in (out / "report.json").read_text(encoding="utf-8")  # stored as written, not \u-escaped
    cards = embedded_cards((out / "index.html").read_text(encoding="utf-8"))
    assert [c["source"] for c in cards] == sorted(source for source, *_ in PICTURES)
    assert [len(c["thumbs"]) for c in cards] == [2, 2, 2, 1, 2, 2]  # misc/x.png: Score-CAM only
    assert [c["correct"] for c in cards] == [True, False, True, None, True, True]


def test_a_rerun_replaces_its_own_entries_and_keeps_the_other_methods(tmp_path):
    out = make_report(tmp_path)
    record = {"source": "cat/1.png", "picture": str(tmp_path / "pictures/cat/1.png"),
              "figure": str(out / "cat/1_scorecam.png"), "predicted": "dog", "probability": 0.5, "true": "cat"}
    update_report(out, [record], skipped=(), method="scorecam", label="Score-CAM (again)")
    saved = report.load_report(out)
    assert saved["methods"] == {"scorecam": "Score-CAM (again)", "gradcam": "Grad-CAM"}
    assert saved["pictures"]["cat/1.png"]["methods"]["scorecam"]["predicted"] == "dog"
    assert saved["pictures"]["cat/1.png"]["methods"]["gradcam"]["predicted"] == "cat"
    assert len(saved["pictures"]) == len(PICTURES) and saved["skipped"]["scorecam"] == []


def test_image_sources_are_quoted_paths_relative_to_the_out_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in #1").mkdir()
    Image.fromarray(synthetic_picture(0)[0]).save(tmp_path / "in #1" / "100%.png")
    record = {"source": "100%.png", "picture": "in #1/100%.png", "figure": f"out/{SUISEI}/a?.png",
              "predicted": SUISEI, "probability": 0.9, "true": None}
    update_report("out", [record])
    (card,) = embedded_cards((tmp_path / "out/index.html").read_text(encoding="utf-8"))
    assert card["picture"] == "../in%20%231/100%25.png"
    assert card["thumbs"][0]["figure"] == urllib.parse.quote(SUISEI) + "/a%3F.png"
    assert urllib.parse.unquote(card["picture"]) == os.path.relpath(tmp_path / "in #1/100%.png", tmp_path / "out")


def test_names_and_messages_are_escaped(tmp_path):
    nasty = "</script><script>window.pwned=1</script><!--&\"'"
    record = {"source": "a.png", "picture": "a.png", "figure": str(tmp_path / "a.png"),
              "predicted": nasty, "probability": 0.5, "true": "cat"}
    update_report(tmp_path, [record], skipped=[f"<u>{nasty}</u>: unreadable"], label=f"<q>{nasty}</q>")
    page = (tmp_path / "index.html").read_text(encoding="utf-8")
    assert "<script>window.pwned" not in page and "<u>" not in page and "<q>" not in page
    assert page.count("</script>") == 2  # the data's end and the code's end, nothing more
    assert html.escape(nasty) in page  # the summary's table, escaped once
    (card,) = embedded_cards(page)
    assert card["predicted"] == nasty and card["thumbs"][0]["label"] == f"<q>{nasty}</q>"
    assert '<meta charset="utf-8">' in page


def test_a_failed_write_leaves_the_old_report_whole(tmp_path, monkeypatch):
    out = make_report(tmp_path, methods=METHODS[:1])
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}

    def fail(path):
        raise OSError("disk full")

    monkeypatch.setattr(atomic, "fsync_file", fail)
    with pytest.raises(OSError, match="disk full"):
        update_report(out, [], skipped=["x"], method="gradcam", label="Grad-CAM")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # no temporary file left


def test_bad_input_is_refused_without_losing_the_report(tmp_path):
    with pytest.raises(ValueError, match="lacks figure, probability"):
        update_report(tmp_path, [{"source": "a.png", "picture": "a.png", "predicted": "cat", "true": None}])
    nan = {"source": "a.png", "picture": "a.png", "figure": "a.png", "predicted": "cat", "probability": float("nan"),
           "true": None}
    with pytest.raises(ValueError, match=r"probability nan is not in \[0, 1\]"):
        update_report(tmp_path, [nan])
    assert not (tmp_path / "report.json").exists()
    (tmp_path / "report.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="is not a report"):
        update_report(tmp_path, [])
    assert (tmp_path / "report.json").read_text(encoding="utf-8") == "{not json"


def test_the_command_rewrites_the_page(tmp_path):
    out = make_report(tmp_path, methods=METHODS[:1])
    (out / "index.html").unlink()
    report.main([str(out)])
    assert len(embedded_cards((out / "index.html").read_text(encoding="utf-8"))) == len(PICTURES)


# ---------------------------------------------------------------- the page in Chromium


def chromium_context(playwright, profile, viewport=(1280, 900)):
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    return playwright.chromium.launch_persistent_context(
        profile, executable_path=executable, headless=True, args=FLAGS,
        viewport={"width": viewport[0], "height": viewport[1]})


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.skip("needs chromium (apt-get install chromium; .ci/run installs it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs chromium driven by playwright (pip install -r requirements.txt)")
    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = chromium_context(playwright, profile)
        yield context
        context.close()


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    return make_report(tmp_path_factory.mktemp("report"))


@pytest.fixture
def page(browser, report_dir):
    """index.html opened from the file system; page.errors collects console errors and exceptions."""
    page = browser.new_page()
    page.errors = []
    page.on("console", lambda message: message.type == "error" and page.errors.append(message.text))
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto((report_dir / "index.html").as_uri(), wait_until="load")
    yield page
    page.close()


def visible(page):
    """The data-* of the cards shown, in the page's order."""
    return page.eval_on_selector_all(".card", "cs => cs.filter(c => c.checkVisibility()).map(c => ({...c.dataset}))")


# Every card is near the viewport here: each image gets its src (the page sets it as its card comes near),
# then loads now (eager: the originals, not shown, load too).
LOAD_IMAGES = """async () => Promise.all([...document.querySelectorAll('.card img')].map(async (img) => {
    while (!img.getAttribute('src')) await new Promise((done) => requestAnimationFrame(done));
    img.loading = 'eager';
    try { await img.decode(); } catch (e) {}
    return [img.src, img.naturalWidth];
}))"""


def test_the_page_shows_every_picture_without_errors(page):
    cards = visible(page)
    assert len(cards) == page.locator(".card").count() == len(PICTURES)
    assert page.locator("#shown").inner_text() == f"{len(PICTURES)} of {len(PICTURES)} pictures shown"
    assert page.locator(".card .thumb").count() == 2 * len(PICTURES) - 1
    assert page.locator(".card[data-source='misc/x.png'] figcaption").all_inner_texts() == ["Score-CAM"]
    assert page.locator(".card[data-source='cat/1.png'] figcaption").all_inner_texts() == ["Score-CAM", "Grad-CAM"]
    assert page.locator("#accuracy").inner_text() == "80.0 %"
    assert page.errors == []


def test_every_image_source_is_a_file_that_loads(page):
    images = page.evaluate(LOAD_IMAGES)
    links = page.eval_on_selector_all(".card a", "links => links.map(a => a.href)")
    assert len(images) == 4 * len(PICTURES) - 2 and len(links) == len(images) // 2 + len(PICTURES)
    for url in [src for src, _ in images] + links:
        path = Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
        assert url.startswith("file://") and path.is_file(), url
    assert all(width == 64 for _, width in images), images
    assert page.errors == []


def test_sorting(page):
    page.select_option("#sort", "wrong")
    assert visible(page)[0]["source"] == "cat/2.png"
    assert [c["correct"] for c in visible(page)] == ["false", "unknown", "true", "true", "true", "true"]
    page.select_option("#sort", "confidence")
    assert [float(c["probability"]) for c in visible(page)] == sorted((p for *_, p in PICTURES), reverse=True)
    page.select_option("#sort", "class")
    assert [c["predicted"] for c in visible(page)] == ["cat"] * 3 + [SUISEI] * 3
    page.select_option("#sort", "source")
    assert [c["source"] for c in visible(page)] == sorted(source for source, *_ in PICTURES)


def test_filtering(page):
    page.select_option("#filter-class", "cat")
    assert {c["source"] for c in visible(page)} == {"cat/1.png", "cat/2.png", "cat/a b#1.png", "misc/x.png"}
    page.select_option("#filter-class", SUISEI)  # the wrong cat is predicted as her
    assert {c["source"] for c in visible(page)} == {"cat/2.png", f"{SUISEI}/1.png", f"{SUISEI}/2.png"}
    page.select_option("#filter-correct", "true")
    assert {c["source"] for c in visible(page)} == {f"{SUISEI}/1.png", f"{SUISEI}/2.png"}
    page.select_option("#filter-class", "")
    page.select_option("#filter-correct", "false")
    assert [c["source"] for c in visible(page)] == ["cat/2.png"]
    page.select_option("#filter-correct", "unknown")
    assert [c["source"] for c in visible(page)] == ["misc/x.png"]
    page.select_option("#filter-correct", "all")
    page.fill("#prob-min", "60")
    page.fill("#prob-max", "93")
    assert sorted(float(c["probability"]) for c in visible(page)) == [0.66, 0.81, 0.93]
    assert page.locator("#shown").inner_text() == f"3 of {len(PICTURES)} pictures shown"
    assert page.errors == []


def test_the_original_shows_on_hover_and_a_click_opens_the_figure(page, browser, report_dir):
    thumb = page.locator(".card[data-source='cat/1.png'] .thumb a").first
    original = thumb.locator("img.original")
    assert not original.is_visible()
    thumb.hover()
    assert original.is_visible()
    with browser.expect_page() as opened:
        thumb.click()
    figure = opened.value
    figure.wait_for_load_state()
    assert figure.url == (report_dir / "cat" / "1_scorecam.png").as_uri()
    figure.close()
    page.check("#show-original")
    assert page.locator("img.original").first.is_visible()


def test_the_skipped_file_and_the_japanese_name_are_shown(page):
    skipped = [f"{BROKEN}: cannot identify image file (Score-CAM, Grad-CAM)"]
    assert page.locator("#skipped li").all_inner_texts() == skipped
    card = page.locator(f".card[data-source='{SUISEI}/1.png']")
    assert card.locator(".predicted .name").inner_text() == SUISEI
    assert card.locator(".true").inner_text() == f"✓ right: {SUISEI}"
    assert page.locator(".card[data-source='cat/2.png'] .true").inner_text() == "✗ wrong, true: cat"
    assert SUISEI in page.locator("#filter-class").inner_text() and SUISEI in page.locator("#class-counts").inner_text()


def test_the_screenshot_is_not_blank(page):
    page.evaluate(LOAD_IMAGES)
    shot = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"), dtype=float)
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 500


DECODED = """async (img) => {  // the width of an image once the page gave it its src and it loaded
    while (!img.getAttribute('src')) await new Promise((done) => requestAnimationFrame(done));
    await img.decode();
    return img.naturalWidth;
}"""


def test_far_thumbnails_load_once_scrolled_to(browser, tmp_path):
    out = make_report(tmp_path, demo_pictures(40), methods=METHODS[:1])
    page = browser.new_page()
    try:
        page.set_viewport_size({"width": 400, "height": 300})  # one column of cards, ~10,000 px
        page.goto((out / "index.html").as_uri(), wait_until="load")
        first, last = page.locator(".card img.overlay").first, page.locator(".card img.overlay").last
        assert first.evaluate(DECODED) == 64 and last.get_attribute("src") is None
        last.scroll_into_view_if_needed()
        assert last.evaluate(DECODED) == 64 and last.get_attribute("loading") == "lazy"
    finally:
        page.close()


def test_hostile_names_show_as_text(browser, tmp_path):
    nasty = "</script><script>window.pwned=1</script><img src=x onerror='window.pwned=2'>"
    record = {"source": "a.png", "picture": str(tmp_path / "a.png"), "figure": str(tmp_path / "a.png"),
              "predicted": nasty, "probability": 0.5, "true": nasty}
    Image.fromarray(synthetic_picture(0)[0]).save(tmp_path / "a.png")
    page = browser.new_page()
    try:
        page.goto(update_report(tmp_path, [record], skipped=[nasty]).as_uri(), wait_until="load")
        assert page.evaluate("window.pwned") is None
        assert page.locator(".card .name").inner_text() == nasty
        assert page.locator(".card").get_attribute("data-true") == nasty
    finally:
        page.close()


# ---------------------------------------------------------------- developer commands (not tests)


def demo_pictures(count, seed=0):
    """`count` pictures in four classes, about one in six predicted wrong, a few of unknown class."""
    rng = np.random.default_rng(seed)
    classes = [SUISEI, "さくらみこ", "cat", "dog"]
    pictures = []
    for n in range(count):
        true = classes[n % len(classes)]
        wrong = rng.random() < 0.17
        predicted = classes[(n + 1 + rng.integers(3)) % len(classes)] if wrong else true
        probability = round(float(rng.uniform(0.3, 0.7) if wrong else rng.uniform(0.55, 1.0)), 3)
        folder = "unsorted" if n % 11 == 10 else true
        pictures.append((f"{folder}/{n:05d}.png", None if folder == "unsorted" else true, predicted, probability))
    return pictures


def open_timed(path, shot=None, viewport=(1280, 900)):
    """Open the page in Chromium; the load event, first paint and a re-sort's time (ms); a screenshot to `shot`."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory() as profile:
        context = chromium_context(playwright, profile, viewport)
        page = context.pages[0] if context.pages else context.new_page()
        page.goto(path.as_uri(), wait_until="load")
        timing = page.evaluate("""async () => {
            const nav = performance.getEntriesByType('navigation')[0];
            const paint = await new Promise((done) => {  // the paint entries may come after the load event
                new PerformanceObserver((list, observer) => {
                    const paints = performance.getEntriesByType('paint');
                    const entries = Object.fromEntries(paints.map(e => [e.name, e.startTime]));
                    if ('first-contentful-paint' in entries) { observer.disconnect(); done(entries); }
                }).observe({type: 'paint', buffered: true});
            });
            const t = performance.now();
            const sort = document.getElementById('sort');
            sort.value = 'wrong'; sort.dispatchEvent(new Event('input'));
            document.body.offsetHeight;
            const resort = performance.now() - t;
            sort.value = 'source'; sort.dispatchEvent(new Event('input'));
            return {load: nav.loadEventEnd, dom_content_loaded: nav.domContentLoadedEventEnd,
                    first_paint: paint['first-paint'], first_contentful_paint: paint['first-contentful-paint'],
                    resort: resort};
        }""")
        if shot:
            page.evaluate(LOAD_IMAGES)
            page.screenshot(path=str(shot))
        context.close()
    return timing


def main(argv):
    command, value = argv
    with tempfile.TemporaryDirectory() as root:
        if command == "screenshot":
            out = make_report(Path(root), demo_pictures(12), drop_last=False)
            print(open_timed(out / "index.html", shot=Path(value), viewport=(1100, 1000)))
        elif command == "bench":
            out = make_report(Path(root), demo_pictures(int(value)))
            start = time.perf_counter()
            report.write_index(out)
            print(f"index.html of {value} pictures written in {time.perf_counter() - start:.2f} s "
                  f"({(out / 'index.html').stat().st_size / 1e6:.2f} MB); in Chromium, ms:")
            for _ in range(3):
                print({key: round(ms) for key, ms in open_timed(out / "index.html").items()})


if __name__ == "__main__":
    main(sys.argv[1:])
