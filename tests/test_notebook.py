"""The Colab notebook runs end to end (tiny size) and shows the grids, samples and metrics table."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "danceopd_colab.ipynb"


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_tiny(monkeypatch):
    monkeypatch.setenv("DANCEOPD_NOTEBOOK_TINY", "1")  # inherited by the kernel started below
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "size: quick (tiny)" in text
    assert "skipping pip install" in text
    pngs = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    # 3 capability grids + the T2I and edit samples
    assert len(pngs) >= 5, f"{len(pngs)} inline PNGs"
    markdown = "".join(o.data["text/markdown"] for o in outputs if o.output_type == "display_data" and "text/markdown" in o.data)
    assert "| model |" in markdown and "| student |" in markdown and "| anchor |" in markdown
    assert "t2i/" in markdown
