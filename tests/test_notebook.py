"""notebooks/your_own_model.ipynb runs end to end (nbclient, a fresh kernel in notebooks/), is committed with
its outputs cleared, and shows what it says: every registered method, the report's rows."""
import json

import pytest

from conftest import ROOT

NOTEBOOK = ROOT / "notebooks" / "your_own_model.ipynb"


def test_the_notebook_is_committed_without_outputs():
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert code and all(not c["outputs"] and c["execution_count"] is None for c in code)
    # a sentence of text before every step
    kinds = [c["cell_type"] for c in cells]
    assert all(kinds[i - 1] == "markdown" for i, kind in enumerate(kinds) if kind == "code" and i > 1)


def test_the_notebook_runs_end_to_end():
    nbformat = pytest.importorskip("nbformat", reason="needs nbformat (requirements.txt)")
    nbclient = pytest.importorskip("nbclient", reason="needs nbclient (requirements.txt)")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text = "\n".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    import kerascam

    for name in kerascam.METHODS:
        assert kerascam.METHODS[name].label in text
    assert "report:" in text and "predicted" in text
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) >= 2  # the overlays and the character model's map were drawn
