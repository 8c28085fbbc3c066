"""The Colab quick-start notebook runs end to end, as CI runs it: FRCNN_JAX_NOTEBOOK_TINY=1 makes
its training cell a few steps on a handful of small pictures."""

import nbformat
import pytest
from nbclient import NotebookClient

from tests.tiny import ROOT

NOTEBOOK = ROOT / "experiments" / "colab_quickstart.ipynb"


pytestmark = pytest.mark.slow  # whole trainings and subprocess runs


def test_the_colab_notebook_trains_evaluates_and_draws(tmp_path, monkeypatch):
    monkeypatch.setenv("FRCNN_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("FRCNN_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter"))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and traceback, if a cell fails
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    assert f"frcnn_jax at {ROOT}" in text
    assert "test mAP@0.5:" in text and "detections; best:" in text
    assert any("text/markdown" in out.get("data", {}) for out in outputs)  # the AP table
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(pictures) == 3  # the three drawn test pictures
    assert (tmp_path / "run" / "run.json").is_file()
