"""colab/quickstart.ipynb runs end to end (CPU size) in a fresh kernel, as on Colab."""

import pathlib

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_quickstart_notebook_runs(tmp_path):
  nb = nbformat.read(ROOT / "colab/quickstart.ipynb", as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(ROOT)}}).execute()
  outputs = {i: "".join(o.get("text", "") for o in cell.get("outputs", []))
             for i, cell in enumerate(nb.cells) if cell.cell_type == "code"}
  text = "\n".join(outputs.values())
  assert "| mixer |" in text  # the study's table was printed
  assert any("image/png" in o.get("data", {}) for cell in nb.cells
             if cell.cell_type == "code" for o in cell.get("outputs", []))
  errors = [o for cell in nb.cells if cell.cell_type == "code"
            for o in cell.get("outputs", []) if o.get("output_type") == "error"]
  assert not errors
  for line in text.splitlines():  # the printed relative errors are float32-small
    if "vs reference:" in line:
      assert float(line.rsplit(":", 1)[1]) < 1e-4, line
  (tmp_path / "executed.ipynb").write_text(nbformat.writes(nb))
