"""The walk-throughs in notebooks/ run top to bottom on the built-in default and are committed clean.

Each notebook is executed in a fresh Jupyter kernel (nbclient, the engine under nbmake) from the
notebooks/ folder, as a user would run it; its temporary output folder is redirected into a folder
of pytest's (``TMPDIR``), and nothing may be written into the repository. While one notebook runs,
the next one's kernel starts and loads the libraries every notebook imports (torch, Lightning,
open_clip): that takes a kernel about ten seconds on two cores, and nothing of vlweak is loaded
ahead.
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


WARM_UP = "import lightning, open_clip, torchmetrics"


class Kernels:
    """One fresh kernel per notebook, each started (with its own ``TMPDIR``) and loading the
    libraries while the notebook before it runs."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.started = tmp, {}

    def _start(self, path: Path) -> None:
        import os

        from jupyter_client import KernelManager

        tmpdir = self.tmp / path.stem
        tmpdir.mkdir()
        km = KernelManager(kernel_name="python3")
        # the kernel inherits TMPDIR: the notebook's WORK folder lands in tmpdir
        km.start_kernel(cwd=str(NOTEBOOK_DIR), env=dict(os.environ, TMPDIR=str(tmpdir)))
        kc = km.client()
        kc.start_channels()
        kc.execute(WARM_UP, silent=True)  # queued ahead of the notebook's first cell
        self.started[path] = (km, kc, tmpdir)

    def take(self, path: Path) -> tuple[object, Path]:
        """``path``'s kernel manager and temporary folder; the next notebook's kernel starts."""
        if path not in self.started:
            self._start(path)
        later = NOTEBOOKS[NOTEBOOKS.index(path) + 1 :]
        if later and later[0] not in self.started:
            self._start(later[0])
        km, kc, tmpdir = self.started.pop(path)
        kc.stop_channels()
        return km, tmpdir

    def close(self) -> None:
        for km, kc, _ in self.started.values():
            kc.stop_channels()
            km.shutdown_kernel(now=True)


@pytest.fixture(scope="module")
def kernels(tmp_path_factory: pytest.TempPathFactory):
    pool = Kernels(tmp_path_factory.mktemp("notebooks"))
    yield pool
    pool.close()


@requires_shipped
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path: Path, kernels: Kernels) -> None:
    from nbclient import NotebookClient

    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    nb = nbformat.read(path, as_version=4)
    km, tmp_path = kernels.take(path)
    try:
        client = NotebookClient(nb, km=km, timeout=300, resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
        client.execute()  # raises CellExecutionError naming the failing cell
    finally:
        km.shutdown_kernel(now=True)

    printed = _stdout(nb)
    assert f"outputs go to {tmp_path}" in printed, "the notebook must write into a temporary folder"
    assert re.search(r"^-+(  -+)+\s*$", printed, re.M), "the notebook should print its result table"
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, "the notebook wrote into the repository"
