"""One home for turning an error of Keras or a backend into one readable line."""
import re


def reason(error, limit=200, sentence=False):
    """An error on one line: its type and the first line of its own message, without Keras's "Exception
    encountered when calling" preamble, its arguments listing and its terminal colours. sentence=True:
    only the first sentence of Keras's innermost reason ("Could not locate function 'f'."), no type."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    if sentence:
        text = text.rsplit("Exception encountered:", 1)[-1].strip()
        text = " ".join(text.split()).split(" Full object config:")[0]
        line = text.split(". ")[0].rstrip(".") + "." if text else type(error).__name__
    else:
        lines = [line.strip() for line in text.splitlines() if line.strip()
                 and not line.strip().startswith(("Exception encountered", "Arguments received", "\u2022"))]
        line = lines[0] if lines else ""
    line = line if len(line) <= limit else line[:limit - 3] + "..."
    return line if sentence else f"{type(error).__name__}: {line}"
