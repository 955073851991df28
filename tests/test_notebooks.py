"""Every course notebook is stored clean and runs top to bottom in a fresh kernel."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from conftest import ARTIFACTS_DIR
from nbrun import NotebookRunError, run_notebook

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
ARTIFACTS = ARTIFACTS_DIR / "notebooks"   # outside the repository (tests/conftest.py)


if not NOTEBOOKS:

    def test_notebooks():
        pytest.skip(f"no notebooks in {NOTEBOOKS_DIR} yet")

else:
    _ids = [p.stem for p in NOTEBOOKS]

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
    def test_notebook_stored_without_outputs(path):
        nb = nbformat.read(path, as_version=4)
        dirty = [
            i
            for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
        ]
        assert not dirty, (
            f"{path.name}: code cells {dirty} have outputs or an execution count; "
            f"store notebooks cleared (e.g. `jupyter nbconvert --clear-output --inplace {path.name}`)"
        )

    @pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids)
    def test_notebook_executes(path):
        failure = None
        try:
            run_notebook(path, save_to=ARTIFACTS / path.name)
        except NotebookRunError as exc:
            failure = str(exc)
        if failure is not None:  # fail outside the except block: one clean report
            pytest.fail(failure, pytrace=False)
