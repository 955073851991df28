"""Execute a notebook in a fresh kernel, the way the notebook tests do.

Other tests import this to run a course notebook and inspect its outputs::

    from nbrun import run_notebook
    nb = run_notebook(repo_root / "course" / "source" / "03_vmcs" / "03_vmcs.ipynb")
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]

The kernel is the ``python3`` kernelspec; jupyter_client starts it with
``sys.executable`` (the venv's python when the tests run from ``.venv``), which
:func:`check_kernel` verifies once per process. The working directory of the
kernel is the notebook's own directory, and ``MPLBACKEND=Agg`` is set.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

KERNEL_NAME = "python3"
DEFAULT_TIMEOUT = 120  # seconds per cell

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class NotebookRunError(AssertionError):
    """A cell raised while the notebook was being executed.

    ``cell_index`` is the index in ``nb.cells``; ``source`` the cell source;
    ``ename``/``evalue``/``traceback`` come from the kernel's error reply;
    ``nb`` is the partially executed notebook.
    """

    def __init__(self, path, cell_index, source, ename, evalue, traceback, nb):
        self.path = Path(path)
        self.cell_index = cell_index
        self.source = source
        self.ename = ename
        self.evalue = evalue
        self.traceback = traceback
        self.nb = nb
        super().__init__(
            f"{self.path.name}: cell {cell_index} raised {ename}: {evalue}\n"
            f"--- cell source ---\n{source}\n"
            f"--- traceback ---\n{traceback}"
        )


def strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _kernel_env() -> dict[str, str]:
    env = dict(os.environ)
    env["MPLBACKEND"] = "Agg"
    return env


def _new_client(nb, cwd: Path, timeout: int) -> NotebookClient:
    return NotebookClient(
        nb,
        timeout=timeout,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(cwd)}},
    )


@functools.lru_cache(maxsize=None)
def check_kernel() -> str:
    """Start the ``python3`` kernel once and make sure it runs this environment's python.

    Returns the kernel's ``sys.executable``; raises ``RuntimeError`` if a stray
    kernelspec points at another interpreter (which would lack vtlab and the
    pinned packages) or if the kernel does not see ``MPLBACKEND=Agg``.
    """
    nb = nbformat.v4.new_notebook()
    nb.cells.append(
        nbformat.v4.new_code_cell(
            "import os, sys\nprint(sys.executable)\nprint(sys.prefix)\nprint(os.environ.get('MPLBACKEND'))"
        )
    )
    _new_client(nb, Path.cwd(), 60).execute(env=_kernel_env())
    lines = "".join(o.get("text", "") for o in nb.cells[0].outputs).splitlines()
    exe, prefix, backend = (lines + ["?"] * 3)[:3]
    if os.path.realpath(prefix) != os.path.realpath(sys.prefix):
        raise RuntimeError(
            f"the {KERNEL_NAME!r} kernel runs {exe} (prefix {prefix}), not this environment's "
            f"python ({sys.executable}); fix with: {sys.executable} -m ipykernel install --sys-prefix"
        )
    if backend != "Agg":
        raise RuntimeError(f"the kernel sees MPLBACKEND={backend!r}, expected 'Agg'")
    return exe


def run_notebook(path, timeout: int = DEFAULT_TIMEOUT, save_to=None) -> nbformat.NotebookNode:
    """Execute the notebook at *path* top to bottom in a fresh kernel.

    Returns the executed notebook (outputs filled in). Raises
    :class:`NotebookRunError` with the failing cell's source and the error if
    any cell raises. If *save_to* is given, the executed (or partially
    executed) notebook is written there as well.
    """
    path = Path(path).resolve()
    check_kernel()
    nb = nbformat.read(path, as_version=4)
    client = _new_client(nb, path.parent, timeout)
    current = {"index": -1}

    def _track(cell, cell_index, **_):
        current["index"] = cell_index

    client.on_cell_execute = _track
    try:
        client.execute(env=_kernel_env())
    except CellExecutionError as exc:
        _save(nb, save_to)
        index = current["index"]
        if index < 0:
            raise NotebookRunError(path, -1, "", exc.ename, exc.evalue, strip_ansi(str(exc)), nb) from None
        cell = nb.cells[index]
        err = next((o for o in cell.get("outputs", []) if o.get("output_type") == "error"), {})
        tb = strip_ansi("\n".join(err.get("traceback", []))) or strip_ansi(str(exc))
        raise NotebookRunError(path, index, cell.source, exc.ename, exc.evalue, tb, nb) from None
    except (CellTimeoutError, DeadKernelError) as exc:
        _save(nb, save_to)
        index = current["index"]
        source = nb.cells[index].source if index >= 0 else ""
        raise NotebookRunError(path, index, source, type(exc).__name__, strip_ansi(str(exc)), "", nb) from None
    _save(nb, save_to)
    return nb


def _save(nb, save_to) -> None:
    if save_to is None:
        return
    save_to = Path(save_to)
    save_to.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, save_to)


def code_outputs(nb, kind: str | None = None) -> list:
    """All outputs of all code cells, optionally only those of ``output_type == kind``."""
    out = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return [o for o in out if kind is None or o.get("output_type") == kind]


def run_with_probe(path: Path, probe: str, mark: str, tmp_dir: Path):
    """Run a copy of ``path`` with ``probe`` appended as a last cell; the probe prints
    ``mark`` followed by a JSON object of key results.  Returns (executed notebook,
    results), with the run time in ``results["_seconds"]``."""
    import json
    import time

    nb = nbformat.read(path, as_version=4)
    cell = nbformat.v4.new_code_cell(probe.strip())
    cell.id = "key-results-probe"
    nb.cells.append(cell)
    copy = Path(tmp_dir) / Path(path).name
    nbformat.write(nb, copy)
    start = time.perf_counter()
    done = run_notebook(copy)
    seconds = time.perf_counter() - start
    text = "".join(o.get("text", "") for o in done.cells[-1].outputs if o.output_type == "stream")
    assert mark in text, f"probe printed nothing: {text!r}"
    results = json.loads(text.split(mark, 1)[1])
    results["_seconds"] = seconds
    return done, results


# ------------------------------------------------- conventions every course notebook keeps
# (docs/NOTEBOOKS.md); the course tests tests/test_course_NN.py call these on their source.
def assert_stored_without_outputs(path: Path) -> None:
    """The committed notebook has no outputs and no execution counts."""
    nb = nbformat.read(path, as_version=4)
    assert not [i for i, c in enumerate(nb.cells)
                if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count") is not None)]


def assert_nbgrader_conventions(path: Path, prefix: str, ids_are_grade_ids: bool = True) -> None:
    """nbgrader metadata as docs/NOTEBOOKS.md says: unique grade_ids and cell ids, a cell
    with nbgrader metadata has its grade_id as cell id (``ids_are_grade_ids``; 02 and 04
    keep older ids on a few cells, which must not change), answer cells with a solution
    region, locked test cells with points and non-empty hidden tests, grade_ids starting
    with ``prefix``, 3-6 exercises, learning objectives and a recap."""
    nb = nbformat.read(path, as_version=4)
    meta = [c.metadata["nbgrader"] for c in nb.cells if "nbgrader" in c.metadata]
    ids = [m["grade_id"] for m in meta]
    assert len(ids) == len(set(ids))
    cell_ids = [c.id for c in nb.cells]
    assert len(cell_ids) == len(set(cell_ids))
    keys = {"grade", "grade_id", "locked", "schema_version", "solution", "task"}
    for cell in nb.cells:
        m = cell.metadata.get("nbgrader")
        if m is None:
            continue
        assert keys <= set(m) and m["schema_version"] == 3 and m["task"] is False, m
        if ids_are_grade_ids:
            assert cell.id == m["grade_id"], "a cell with nbgrader metadata has its grade_id as cell id"
        if m["solution"]:
            assert cell.cell_type == "code" and not m["grade"] and not m["locked"]
            assert m["grade_id"].startswith(prefix)
            assert "### BEGIN SOLUTION" in cell.source and "### END SOLUTION" in cell.source
        elif m["grade"]:
            assert cell.cell_type == "code" and m["locked"] and m["points"] > 0
            assert m["grade_id"].startswith(prefix)
            visible, _, hidden = cell.source.partition("### BEGIN HIDDEN TESTS")
            assert visible.strip() and "### END HIDDEN TESTS" in hidden
            assert hidden.split("### END HIDDEN TESTS")[0].strip(), "empty hidden tests"
        else:
            assert m["locked"], m
    answers = [m["grade_id"] for m in meta if m["solution"]]
    graded = [m["grade_id"] for m in meta if m["grade"]]
    assert 3 <= len(graded) <= 6 and len(answers) == len(graded)
    text = "\n".join(c.source for c in nb.cells if c.cell_type == "markdown")
    assert "Learning objectives" in text and "## Recap" in text


def assert_nbgrader_validates(path: Path) -> None:
    """nbgrader's own validator finds nothing wrong with the instructor version (its
    ``nbgrader validate`` exits 0 even when cells fail, so ask the Validator)."""
    import json

    from nbgrader.validator import Validator

    results = Validator().validate(str(path))
    assert results == {}, json.dumps(results, indent=1)[:3000]


def assert_plots_have_captions(nb, plots: int | None = None) -> None:
    """Every plot in the executed notebook (its last cell, the probe, left out) is followed
    by a "*Figure:" caption saying what to look for; ``plots``: how many there must be."""
    cells = nb.cells[:-1]
    seen = 0
    for i, cell in enumerate(cells):
        if cell.cell_type == "code" and any("image/png" in o.get("data", {}) for o in cell.get("outputs", [])):
            seen += 1
            nxt = cells[i + 1]
            assert nxt.cell_type == "markdown" and nxt.source.startswith("*Figure:"), (i, nxt.source[:80])
            assert "look" in nxt.source.lower(), f"caption of cell {i} does not say what to look for"
    if plots is not None:
        assert seen == plots
