"""The notebooks are stored without outputs and run top to bottom with small settings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
ORDER = ["01_quickstart.ipynb", "02_feature_maps.ipynb"]   # 02 inspects the run 01 trains
SMALL = ["train.epochs=1", "data.num_train=64", "data.num_val=32", "train.batch_size=32",
         "train.eval_batch_size=32", "data.size=[16, 16]"]


@pytest.mark.parametrize("name", ORDER)
def test_notebook_is_stored_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"


def test_notebooks_run_top_to_bottom(tmp_path, monkeypatch):
    # a kernel spec for this very interpreter: the one ipykernel installs runs whatever `python` is on PATH
    spec = tmp_path / "jupyter" / "kernels" / "cnnpipe-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "cnnpipe test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("CNNPIPE_NB_OVERRIDES", json.dumps(SMALL))
    monkeypatch.setenv("CNNPIPE_NB_RUN_DIR", "runs/quickstart")
    monkeypatch.setenv("CNNPIPE_NB_PLANE_EPOCHS", "2")
    work = tmp_path / "work"
    work.mkdir()
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        NotebookClient(nb, timeout=120, kernel_name="cnnpipe-test",
                       resources={"metadata": {"path": str(work)}}).execute()   # raises on any cell error
        errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "error"]
        assert not errors, name
    assert (work / "runs" / "quickstart" / "summary.json").is_file()
    page = work / "inspect_example" / "index.html"
    assert page.is_file() and 'src="01-example-gradcam.png"' in page.read_text()
