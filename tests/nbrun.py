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
