"""What every notebook builder script shares: cells with nbgrader metadata, and writing.

A builder script creates one :class:`NotebookBuilder`, adds cells with ``md``/``code``
(optionally locked), ``answer`` (an autograded answer cell with a solution region) and
``tests`` (an autograder test cell with visible and hidden tests), then calls ``write()``.
Conventions: docs/NOTEBOOKS.md.
"""
from __future__ import annotations

import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[2]


def _src(text: str) -> str:
    return textwrap.dedent(text).strip("\n")


def _nbgrader(grade_id: str, *, grade=False, solution=False, locked=False, points=None) -> dict:
    meta = {"grade": grade, "grade_id": grade_id, "locked": locked, "schema_version": 3,
            "solution": solution, "task": False}
    if points is not None:
        meta["points"] = points
    return {"nbgrader": meta}


class NotebookBuilder:
    """Collects the cells of ``notebooks/<name>.ipynb``; cell ids are ``<stem>-NNN``."""

    def __init__(self, stem: str, name: str):
        self.stem = stem
        self.out = ROOT / "notebooks" / f"{name}.ipynb"
        self.cells: list = []

    def _add(self, cell, cell_id: str | None = None):
        cell.id = cell_id or f"{self.stem}-{len(self.cells):03d}"
        self.cells.append(cell)
        return cell

    def md(self, text: str, lock: str | None = None):
        """A markdown cell; ``lock`` (a grade_id) makes it read-only for nbgrader."""
        cell = new_markdown_cell(_src(text))
        if lock:
            cell.metadata.update(_nbgrader(lock, locked=True))
        return self._add(cell, lock)

    def code(self, text: str, lock: str | None = None):
        """A code cell; ``lock`` (a grade_id) makes it read-only for nbgrader."""
        cell = new_code_cell(_src(text))
        if lock:
            cell.metadata.update(_nbgrader(lock, locked=True))
        return self._add(cell, lock)

    def answer(self, grade_id: str, text: str):
        """An autograded answer cell (solution between BEGIN/END SOLUTION)."""
        cell = new_code_cell(_src(text))
        cell.metadata.update(_nbgrader(grade_id, solution=True))
        return self._add(cell, grade_id)

    def tests(self, grade_id: str, points: int, text: str):
        """An autograder test cell: visible asserts, then hidden ones."""
        cell = new_code_cell(_src(text))
        cell.metadata.update(_nbgrader(grade_id, grade=True, locked=True, points=points))
        return self._add(cell, grade_id)

    def build(self) -> nbformat.NotebookNode:
        nb = new_notebook(cells=self.cells)
        nb.metadata = {
            "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        }
        ids = [c.id for c in nb.cells]
        assert len(ids) == len(set(ids)), "duplicate cell ids"
        grade_ids = [c.metadata["nbgrader"]["grade_id"] for c in nb.cells if "nbgrader" in c.metadata]
        assert len(grade_ids) == len(set(grade_ids)), "duplicate grade_ids"
        nbformat.validate(nb)
        return nb

    def write(self) -> None:
        """Write the notebook (outputs cleared: the builder never runs it)."""
        self.out.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(self.build(), self.out)
        print(f"wrote {self.out.relative_to(ROOT)} ({len(self.cells)} cells)")
