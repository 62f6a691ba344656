"""examples/quickstart.ipynb runs top to bottom as a reader would run it, and is committed without outputs.

The notebook is executed with nbclient on the "python3" kernel that ipykernel installs with the test extra,
from a temporary working directory, writing its run into a temporary folder (``DUALROUTE_QUICKSTART_DIR``),
so nothing lands in the repository.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "quickstart.ipynb"
CELL_TIMEOUT_S = 600  # the training cell is the long one: about 1-2 minutes on 2 busy cores


def test_quickstart_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [] and cell.execution_count is None, \
            f"code cell {i} holds outputs; clear them before committing (Kernel > Restart and Clear Output)"
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_runs(tmp_path, monkeypatch):
    work = tmp_path / "work"
    monkeypatch.setenv("DUALROUTE_QUICKSTART_DIR", str(work))  # the kernel inherits this process's environment
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(tmp_path)}})  # the kernel's working directory
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, naming the cell and its traceback, on any error
    print(f"quickstart.ipynb ran in {time.perf_counter() - start:.1f} s")

    errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    # It wrote where it was told: a checkpoint, the figures it shows, and nothing beside its folder.
    assert list((work / "lm-dual-small").glob("ckpt-*"))
    assert {"load.png", "token_expert.png", "report.md"} <= {p.name for p in (work / "inspect").iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]
    images = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
              if "image/png" in out.get("data", {})]
    assert len(images) == 2
