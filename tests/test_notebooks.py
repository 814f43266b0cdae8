"""The notebooks run top to bottom on CPU in a small mode: a cell injected after the one tagged `parameters`
(papermill's convention) shrinks the model and the steps; the quickstart notebook trains into a temporary workdir,
the routing-analysis notebook then analyses that workdir. Each must run without error, print its metric and draw
its figures. The stored notebooks carry no outputs."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"


def execute(name: str, parameters: dict, monkeypatch, subprocess_env: dict) -> nbformat.NotebookNode:
  """Runs notebooks/<name> in a fresh kernel with `parameters` injected after its parameters cell."""
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  index = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
  source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
  notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))
  for key, value in subprocess_env.items():  # the kernel inherits this environment
    monkeypatch.setenv(key, value)
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
  return notebook


def outputs(notebook):
  return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]


def printed(notebook) -> str:
  return "".join(output.get("text", "") for output in outputs(notebook) if output.output_type == "stream")


def images(notebook) -> int:
  return sum("image/png" in output.get("data", {}) for output in outputs(notebook))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "routing_analysis.ipynb"])
def test_notebooks_are_stored_without_outputs(name):
  notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
  nbformat.validate(notebook)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert all(not cell.outputs and cell.execution_count is None for cell in code)
  assert sum("parameters" in cell.metadata.get("tags", []) for cell in code) == 1


def test_quickstart_then_routing_analysis_notebooks(tmp_path, monkeypatch, subprocess_env):
  workdir = str(tmp_path / "quickstart")
  quickstart = execute("quickstart.ipynb", {"SMALL": True, "TOTAL_STEPS": 3, "WORKDIR": workdir}, monkeypatch,
                       subprocess_env)
  text = printed(quickstart)
  assert "backend: cpu" in text and "mesh: none (one device)" in text
  assert "held-out: {'eval/top1':" in text
  assert images(quickstart) >= 2  # the expert-load bars and the routing heatmaps
  assert (tmp_path / "quickstart" / "checkpoints" / "3").is_dir()

  analysis = execute("routing_analysis.ipynb", {"WORKDIR": workdir, "MAX_BATCHES": 2}, monkeypatch,
                     subprocess_env)
  text = printed(analysis)
  # The SMALL model: 2 blocks, both MoE (last:2), 8 experts top-1 -> D = 8^2 = 64; 2 batches of 128 digits.
  assert "step 3: 256 images, 10 classes, 8 experts (top-1), MoE layers 'last:2'" in text and "D = 64" in text
  assert "block0" in text and "block1" in text
  assert "Suggested model.moe.layers=" in text or "No layer's routing specialises" in text
  assert images(analysis) >= 4  # combined heatmap, one per layer (2), expert load
