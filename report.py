"""An HTML report of a folder's explanations (scorecam.py --folder DIR --out OUT): OUT/index.html.

Each run of one method merges its pictures into OUT/report.json, keyed by the picture's path under
DIR, so runs of several methods into one OUT show side by side; index.html is then written anew
from it: one self-contained page (plain HTML, CSS and JavaScript from report_template.html) that
works opened from the file system, offline. Image sources are paths relative to OUT, URL-quoted.
Both files are written atomically. Runs into one OUT are meant one after another, not at once.

    python report.py OUT   # rewrite OUT/index.html from OUT/report.json
"""
import argparse
import collections
import html
import json
import os
import re
import sys
import urllib.parse
from pathlib import Path

from atomic import write_text

REPORT_JSON = "report.json"
INDEX_HTML = "index.html"
TEMPLATE = Path(__file__).with_name("report_template.html")
VERSION = 1
FIELDS = ("source", "picture", "figure", "predicted", "probability", "true")


def update_report(out_dir, records, skipped=(), method="scorecam", label="Score-CAM"):
    """Merge one method's run into OUT/report.json and rewrite OUT/index.html; returns its path.

    records: dicts with FIELDS ("true" None where unknown); skipped: one-line messages of the
    files that could not be read. Pictures of earlier runs stay; this method's entries for the
    same sources, its label and its skipped list are replaced."""
    out_dir = Path(out_dir)
    report = load_report(out_dir)
    report["methods"][str(method)] = str(label)
    for number, record in enumerate(records):
        missing = [key for key in FIELDS if key not in record]
        if missing:
            raise ValueError(f"record {number} ({record.get('source', '?')}) lacks {', '.join(missing)}")
        probability = float(record["probability"])
        if not 0 <= probability <= 1:
            raise ValueError(f"record {number} ({record['source']}): probability {probability} is not in [0, 1]")
        source = Path(record["source"]).as_posix()
        entry = report["pictures"].setdefault(source, {"methods": {}})
        entry["picture"] = _relative(record["picture"], out_dir)
        entry["true"] = None if record["true"] is None else str(record["true"])
        entry["methods"][method] = {"figure": _relative(record["figure"], out_dir),
                                    "predicted": str(record["predicted"]),
                                    "probability": probability}
    report["skipped"][method] = [str(message) for message in skipped]
    write_text(out_dir / REPORT_JSON, json.dumps(report, ensure_ascii=False, indent=1) + "\n")
    return write_index(out_dir, report)


def load_report(out_dir):
    """OUT/report.json as a dict (an empty report where there is none yet)."""
    path = Path(out_dir) / REPORT_JSON
    if not path.exists():
        return {"version": VERSION, "methods": {}, "pictures": {}, "skipped": {}}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a report ({e}); move it away to start a new one") from None
    if not isinstance(report, dict) or report.get("version") != VERSION:
        raise ValueError(f"{path} is not a version-{VERSION} report; move it away to start a new one")
    return report


def write_index(out_dir, report=None):
    """Write OUT/index.html from the report (default: OUT/report.json); returns its path."""
    out_dir = Path(out_dir)
    report = load_report(out_dir) if report is None else report
    cards = report_cards(report)
    labels = list(report["methods"].values())
    values = {
        "title": html.escape(f"{' / '.join(labels) or 'CAM'} report: {out_dir.resolve().name}"),
        "method_count": str(max((len(card["thumbs"]) for card in cards), default=1)),
        "summary": summary_html(cards, labels) + skipped_html(report),
        "class_options": "".join(f'<option value="{html.escape(name)}">{html.escape(name)}</option>'
                                 for name in sorted(_classes(cards))),
        "data": script_json(cards),
    }
    page = re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text(encoding="utf-8"))
    path = out_dir / INDEX_HTML
    write_text(path, page)
    return path


def report_cards(report):
    """One card a picture, in order of source: the first method's prediction, every method's figure."""
    cards = []
    for source in sorted(report["pictures"]):
        entry = report["pictures"][source]
        runs = [(method, entry["methods"][method]) for method in report["methods"] if method in entry["methods"]]
        if not runs:
            continue
        first, true = runs[0][1], entry["true"]
        cards.append({
            "source": source, "picture": _url(entry["picture"]), "true": true,
            "predicted": first["predicted"], "probability": first["probability"],
            "correct": None if true is None else first["predicted"] == true,
            "thumbs": [{"label": report["methods"][method], "figure": _url(run["figure"]),
                        "predicted": run["predicted"], "probability": run["probability"]} for method, run in runs],
        })
    return cards


def summary_html(cards, labels):
    """The header's line (pictures, methods, accuracy) and the counts per class."""
    known = [card for card in cards if card["true"] is not None]
    right = sum(card["correct"] for card in known)
    line = f"<b>{len(cards)}</b> pictures · methods: {html.escape(', '.join(labels))}"
    if known:
        line += (f' · accuracy <b id="accuracy">{100 * right / len(known):.1f} %</b>'
                 f" ({right} of {len(known)} pictures whose true class is known)")
    predicted = collections.Counter(card["predicted"] for card in cards)
    true = collections.Counter(card["true"] for card in known)
    hits = collections.Counter(card["true"] for card in known if card["correct"])
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{predicted[name]}</td><td>{true[name]}</td>"
        f"<td>{f'{hits[name]} ({100 * hits[name] / true[name]:.0f} %)' if true[name] else '–'}</td></tr>"
        for name in sorted(_classes(cards)))
    table = ('<table id="class-counts"><tr><th>class</th><th>predicted</th><th>true</th><th>right</th></tr>'
             f"{rows}</table>")
    opened = " open" if len(_classes(cards)) <= 20 else ""
    return f'<p class="lead">{line}</p>\n<details{opened}><summary>Counts per class</summary>{table}</details>\n'


def skipped_html(report):
    """The unreadable files, each once, with the methods whose runs skipped it."""
    by_message = {}
    for method, messages in report["skipped"].items():
        for message in messages:
            by_message.setdefault(message, []).append(report["methods"].get(method, method))
    if not by_message:
        return ""
    items = "".join(f"<li>{html.escape(message)} <small>({html.escape(', '.join(labels))})</small></li>"
                    for message, labels in by_message.items())
    summary = f"<summary>{len(by_message)} skipped (unreadable)</summary>"
    return f'<details id="skipped" open>{summary}<ul>{items}</ul></details>\n'


def script_json(value):
    """JSON to embed in a <script> element: '<', '>' and '&' escaped, so no '</script>' or '<!--' ends it."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _classes(cards):
    return {card["predicted"] for card in cards} | {card["true"] for card in cards if card["true"] is not None}


def _relative(path, out_dir):
    """A path (absolute or relative to the working folder) relative to out_dir, with '/'; an absolute
    file: URI where there is no relative path (another drive on Windows)."""
    path = os.path.abspath(path)
    try:
        return Path(os.path.relpath(path, os.path.abspath(out_dir))).as_posix()
    except ValueError:
        return Path(path).as_uri()


def _url(path):
    """A stored path as an image source: URL-quoted ('#', '%', spaces, non-ASCII); URIs as they are."""
    return path if path.startswith("file:///") else urllib.parse.quote(path, safe="/")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="the folder holding report.json")
    args = parser.parse_args(argv)
    try:
        print(write_index(args.out))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
