"""The walk-throughs in notebooks/ run top to bottom on the built-in default and are committed clean.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the engine under nbmake) from the
notebooks/ folder, as a user would run it; its temporary output folder is redirected into pytest's
``tmp_path`` (``TMPDIR``), and nothing may be written into the repository.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from tests.conftest import REPO, requires_shipped

NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01_quickstart", "02_hierarchies", "03_propagation", "04_multilabel", "05_prompt_tuning", "06_chaining"]


def _stdout(nb: nbformat.NotebookNode) -> str:
    return "".join(
        out.get("text", "")
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "stream" and out.name == "stdout"
    )


def test_notebooks_are_committed_without_outputs() -> None:
    assert [p.stem for p in NOTEBOOKS] == EXPECTED
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} cell {i} has outputs"
        sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "from vlweak" in sources, f"{path.name} does not use vlweak's API"


@requires_shipped
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbclient import NotebookClient

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel inherits it: the notebook's WORK folder lands here
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError naming the failing cell

    printed = _stdout(nb)
    assert f"outputs go to {tmp_path}" in printed, "the notebook must write into a temporary folder"
    assert re.search(r"^-+(  -+)+\s*$", printed, re.M), "the notebook should print its result table"
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "the notebook wrote into the repository"
