"""The README stays a five-minute read and the docs/ pages stay reachable and true to the code:
the README's size, every relative link (and #anchor) in README.md and docs/*.md, the method table
against the registry, and the measurements that live in docs/ only (the suite's counts and times)."""
import re
import unicodedata
from pathlib import Path

import pytest

import kerascam
from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
README_LIMIT = 20_000  # bytes (issue 26)
TWO_COMMANDS = (
    "pip install -r requirements.txt && python scorecam.py",
    "python -m pytest -q && KERAS_BACKEND=jax python -m pytest -q",
)
# The method table's header; its rows are | `name` | label | kind | what the map is |.
TABLE_HEADER = "| name | label | kind | what the map is |"


def prose(text):
    """The page without fenced code, inline code spans and HTML comments: what a reader sees as links."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def links(text):
    """The targets of [text](target) and ![alt](target) links, titles left off."""
    return re.findall(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose(text))


def slug(heading):
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(path):
    """Every heading's anchor in a page, with GitHub's -1, -2 ... for repeats."""
    text = re.sub(r"^```.*?^```", "", path.read_text(encoding="utf-8"), flags=re.S | re.M)
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.M):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        found.add(base if count == 0 else f"{base}-{count}")
    return found


def test_the_link_helpers_by_hand():
    assert slug("Is the heatmap right? Faithfulness against Grad-CAM, Grad-CAM++ and two floors") == \
        "is-the-heatmap-right-faithfulness-against-grad-cam-grad-cam-and-two-floors"
    assert slug("Layout: the `kerascam` package") == "layout-the-kerascam-package"
    page = "see [a](docs/a.md#x), ![b](md_image/b.png \"t\") `[c](not/a/link.md)`\n```\n[d](nor/this)\n```\n" \
           "<!-- [e](nor/that) --> [f](https://example.com)"
    assert links(page) == ["docs/a.md#x", "md_image/b.png", "https://example.com"]


def test_the_readme_is_a_five_minute_read():
    size = README.stat().st_size
    assert size <= README_LIMIT, f"README.md is {size:,} bytes, over {README_LIMIT:,}: move detail into docs/"


def test_the_readme_keeps_the_two_commands_exactly():
    text = README.read_text(encoding="utf-8")
    for command in TWO_COMMANDS:
        assert command in text, f"the README lost its command {command!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # https:, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target} (no file {resolved})")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target} (no heading #{anchor} in {resolved.name})")
        elif ROOT not in resolved.parents and resolved != ROOT:
            broken.append(f"{target} (outside the repository)")
    assert not broken, f"{page.name}: broken links: " + "; ".join(broken)


def test_every_docs_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(README.read_text(encoding="utf-8"))}
    assert DOCS, "docs/ has no pages"
    orphans = [page.name for page in DOCS if page.resolve() not in linked]
    assert not orphans, f"docs pages no README link reaches: {orphans}"


def method_table():
    """The README's method table as {name: (label, kind)}, read from the rows under TABLE_HEADER."""
    lines = README.read_text(encoding="utf-8").splitlines()
    assert TABLE_HEADER in lines, f"the README's method table (header {TABLE_HEADER!r}) is missing"
    rows = {}
    for line in lines[lines.index(TABLE_HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        name = re.fullmatch(r"`([^`]+)`", cells[0])
        assert name and len(cells) >= 4, f"a method-table row is not | `name` | label | kind | ... |: {line}"
        assert name.group(1) not in rows, f"method {name.group(1)} has two rows"
        rows[name.group(1)] = (cells[1], cells[2])
    return rows


def test_the_method_table_lists_every_registered_method():
    rows = method_table()
    registered = {name: (method.label, method.kind) for name, method in kerascam.METHODS.items()}
    missing = sorted(set(registered) - set(rows))
    extra = sorted(set(rows) - set(registered))
    assert not missing, f"registered without a README method-table row: {missing}"
    assert not extra, f"README method-table rows for no registered method: {extra}"
    wrong = {name: (rows[name], registered[name]) for name in rows if rows[name] != registered[name]}
    assert not wrong, f"README (label, kind) differs from the registry's: {wrong}"
    assert list(rows) == list(registered), "the table's rows are not in the registry's order"


def test_the_method_table_check_fails_for_an_unlisted_method():
    @kerascam.register("readme_probe", "README probe", "blind", floor=True)
    def probe(model, images, layer=None, class_index=None):
        return images[..., 0] * 0

    try:
        with pytest.raises(AssertionError, match="readme_probe"):
            test_the_method_table_lists_every_registered_method()
    finally:
        del kerascam.METHODS["readme_probe"]


def test_the_suite_counts_and_times_live_in_docs_only():
    text = README.read_text(encoding="utf-8")
    counts = re.compile(r"\d[\d,]*\s+(passed|skipped|failed|errors?|xfailed|deselected|mutants|killed|survived)\b")
    times = re.compile(r"\d+\s*min\s+\d+\s*s\b")
    assert not counts.findall(text), f"test or mutant counts in the README: {counts.findall(text)}"
    assert not times.findall(text), f"suite times in the README: {times.findall(text)}"
    testing = (ROOT / "docs" / "testing.md").read_text(encoding="utf-8")
    assert counts.search(testing) and times.search(testing), "docs/testing.md lost the suite's counts and times"
