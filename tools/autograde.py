#!/usr/bin/env python3
"""Autograde a class of nbgrader submissions so that student code cannot cheat the grader.

nbgrader's own ``nbgrader autograde`` runs every student's notebook in a kernel started
from the course directory: the student's code runs next to ``source/`` (every solution
and hidden test) and ``gradebook.db`` (every grade), and a single cell can change how the
cells after it run. This tool splits nbgrader's autograde steps so that only trusted
code touches the course::

    parent (this process, trusted)          child (one per submission, runs student code)
    ------------------------------          ---------------------------------------------
    sanitize: nbgrader's ClearOutput,
      DeduplicateIds, OverwriteKernelspec,
      OverwriteCells (the instructor's test
      cells, hidden tests included, come
      back from the gradebook; a deleted
      one is added back)
    mark every test cell with a random
      per-run token
    a fresh folder holding only the files   nbgrader's Execute runs the notebook it
      the assignment ships; the notebook  -> reads on standard input (never a file), with
      goes on the child's standard input    cwd, HOME, TMPDIR, IPYTHONDIR and the
                                            Jupyter folders inside that folder; in a
                                            Docker container when the daemon answers,
                                            else in Linux namespaces that hide the course,
                                            the submissions, the repository and the other
                                            gradings (else a plain separate process)
    check the tokens, then nbgrader's       <- the executed notebook, on a channel the
      LimitOutput, SaveAutoGrades,            kernel does not inherit
      AssignLatePenalties: only the parent
      writes the gradebook
    grades.csv + attention.csv

A test cell whose token is missing from its output did not run to its end - the kernel
died (``os._exit``), a cell timed out, or code altered the cell at run time (an IPython
input transformer that blanks later cells): it gets an error output, so nbgrader gives it
zero, and the submission is listed in ``attention.csv``. That file has one row per
submission needing attention with every reason: failed or dead kernels, time-outs, test
cells deleted or altered in the submission (compared with the learner version's
checksums, as nbgrader computes them), answers that need manual grading, and code that
touches the grader, found by reading the answer cells' syntax tree (``get_ipython``,
input transformers, ``os._exit``, ``sys.modules``, files outside the submission's folder,
``exec`` ...).

Usage (``make autograde SUBMISSIONS=dir [JOBS=N]`` wraps it)::

    python tools/autograde.py SUBMISSIONS [--course DIR] [--jobs N]
                              [--container auto|never|always] [--image IMAGE]
                              [--no-namespaces] [--hide DIR ...] [--feedback]
                              [--assignment A ...] [--timeout S] [--submission-timeout S]

``--feedback`` writes ``feedback/<student>/<a>/<a>.html`` that shows no hidden test:
each test cell with its visible tests only and "passed"/"failed" with its points.

SUBMISSIONS is laid out as ``<student>/<assignment>/<assignment>.ipynb`` (nbgrader's
``submitted/`` layout; ``course/submitted`` itself works). The course folder (default
``course/``) holds ``source/<assignment>/<assignment>.ipynb``; the gradebook, the
learner versions (``release/``), ``autograded/``, ``grades.csv`` and ``attention.csv``
are written there. Exit status: 0 when every submission was graded (attention or not),
1 when grading itself failed, 2 on bad usage.

Isolation, honestly stated: in the namespace sandbox the kernel runs as an ordinary user
of a nested user namespace, where the course root, the submissions' folders, every folder
of the repository but ``vtlab/`` and ``.venv/``, vtlab's cache and the other submissions'
grading folders are covered by empty read-only mounts it cannot remove, with its own PID
namespace and /proc, and every file system is read-only but its own folder (so it cannot
change the venv for the submissions after it); everything else of the machine stays
readable as for the instructor's user (``--hide DIR`` covers more). Without namespaces (``--no-namespaces``,
or where ``unshare`` does not work) only the separate folder and process remain, and
code that knows an absolute path can read what the instructor's user can read; the
static scan still reports it. In a container (``--container``), only the folder is
mounted, without network, capabilities or a writable root file system.

The module imports nothing but the standard library at the top, so the ``worker`` part
runs inside any image that has nbgrader (docs/hub/Dockerfile builds one).
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import csv
import dataclasses
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tokenize
import warnings
from pathlib import Path
from typing import Callable, Iterable, Sequence

# nbgrader 0.9's gradebook trips SQLAlchemy "not in session" warnings on every grade it
# saves; they say nothing to the instructor.
warnings.filterwarnings("ignore", message=r".*not in session.*")

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "nbgrader_config.py"
DEFAULT_COURSE = REPO / "course"
#: The image for --container: the class hub image of docs/TEACHING.md (docs/hub/Dockerfile).
DEFAULT_IMAGE = "vtlab-hub:latest"
#: Where the submission's folder and this script appear inside the container.
CONTAINER_WORKDIR = "/grading"
CONTAINER_SCRIPT = "/opt/vtlab-grader/autograde.py"
#: Wall-clock limit for one whole submission (all cells), seconds; per-cell limits come
#: from nbgrader's c.Execute.timeout (nbgrader_config.py).
DEFAULT_SUBMISSION_TIMEOUT = 1800
#: Printed by the marker line added to each test cell; followed by the run's token.
TOKEN_PREFIX = "vtlab-grader-ran:"
#: Names never copied into the grading folder.
IGNORED_NAMES = {".ipynb_checkpoints", "__pycache__", ".DS_Store"}
#: Line magics that cannot reach the grader; any other %magic in an answer is reported.
HARMLESS_MAGICS = {"matplotlib", "time", "timeit", "precision", "pprint", "config", "who", "whos"}


class GradingError(Exception):
    """Grading could not be done at all (bad course, bad folder); the message says why."""


# =========================================================================== static scan
#: Attribute names whose use changes how later cells (the tests) run, or ends the kernel.
_GRADER_ATTRIBUTES = {
    "input_transformers_cleanup": "adds an IPython input transformer (can rewrite the test cells)",
    "input_transformers_post": "adds an IPython input transformer (can rewrite the test cells)",
    "input_transformer_manager": "changes IPython's input transformers (can rewrite the test cells)",
    "ast_transformers": "adds an IPython AST transformer (can rewrite the test cells)",
    "run_cell": "calls or replaces IPython's run_cell",
    "transform_cell": "replaces IPython's cell transformation",
    "register_magic_function": "registers an IPython magic",
    "set_custom_exc": "replaces IPython's exception handler (can hide failing tests)",
    "showtraceback": "replaces IPython's traceback display (can hide failing tests)",
    "_exit": "calls os._exit (ends the kernel)",
    "modules": "uses sys.modules (can swap the modules the tests import)",
    "settrace": "installs a trace function (sys.settrace)",
    "setprofile": "installs a profile function (sys.setprofile)",
    "excepthook": "replaces sys.excepthook (can hide failing tests)",
    "displayhook": "replaces sys.displayhook",
    "kill": "sends a signal to a process",
    "killpg": "sends a signal to a process group",
    "chdir": "changes the working directory",
}
#: Names (or module names) that touch the grader or the machine around the notebook.
_GRADER_NAMES = {
    "get_ipython": "uses get_ipython() (the kernel running the tests)",
    "__builtins__": "uses __builtins__ (can replace print, assert helpers ...)",
    "builtins": "imports builtins (can replace print, assert helpers ...)",
    "IPython": "imports IPython (the kernel running the tests)",
    "ipykernel": "imports ipykernel (the kernel running the tests)",
    "subprocess": "imports subprocess (runs other programs)",
    "ctypes": "imports ctypes (can write any memory of the kernel)",
    "gc": "imports gc (can reach and change any object, the tests' included)",
    "atexit": "imports atexit",
    "signal": "imports signal",
    "sqlite3": "imports sqlite3 (the gradebook is an SQLite file)",
    "nbgrader": "imports nbgrader",
    "nbformat": "imports nbformat (reads notebooks)",
    "importlib": "imports importlib (can swap the modules the tests import)",
    "inspect": "imports inspect (can read the source of the test cells)",
}
#: Calls that run code or programs the scan cannot see.
_RUNNING_CALLS = {
    "exec": "calls exec() (runs code the scan cannot see)",
    "eval": "calls eval() (runs code the scan cannot see)",
    "compile": "calls compile() (builds code the scan cannot see)",
    "__import__": "calls __import__() (imports by computed name)",
    "system": "runs a shell command (os.system)",
    "popen": "runs a shell command (os.popen)",
    "execv": "replaces the kernel process (os.exec*)",
    "execve": "replaces the kernel process (os.exec*)",
    "execl": "replaces the kernel process (os.exec*)",
    "fork": "forks the kernel process",
}
#: Calls that open, list or search files: reported when a path argument leaves the folder.
_FILE_CALLS = {
    "open", "read_text", "read_bytes", "write_text", "write_bytes", "glob", "iglob", "rglob",
    "listdir", "scandir", "walk", "Path", "PurePath", "FileIO", "load", "loadtxt", "read",
    "read_csv", "copy", "copyfile", "copytree", "rmtree", "remove", "unlink", "rename",
}
#: Words in a string constant that point at the course's own files.
_COURSE_WORDS = ("source/", "source\\", "gradebook", "autograded", "release/", ".ipynb", "nbgrader")


def _call_name(node: ast.AST) -> str:
    """The last name of a called expression: ``os.path.join`` -> ``join``."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _leaves_folder(text: str) -> bool:
    """True for a path that reaches outside the submission's folder."""
    t = text.strip().replace("\\", "/")
    return t.startswith(("/", "~")) or t == ".." or t.startswith("../") or "/../" in t or t.endswith("/..") or "**" in t


def _names_outside_path(text: str) -> bool:
    """True for a string constant that reads as a path outside the folder (``../x``,
    ``~/x``, ``/etc/x``); a lone ``"/"`` or ``"//"`` (joins, operators in text) is not."""
    import re

    t = text.strip().replace("\\", "/")
    if len(t) > 200 or "\n" in t:
        return False
    return bool(re.match(r"(\.\./|~/|/[A-Za-z0-9_.-]+(/|$))", t)) or "/../" in t


def _ipython_to_python(source: str) -> tuple[str, list[str]]:
    """Turn IPython syntax (``%magic``, ``!cmd``) into Python the ``ast`` module can read.

    Returns the Python text and the reasons for the magics and shell escapes it found
    (a harmless ``%matplotlib inline`` gives none). The transformation is IPython's own,
    so the scan reads what the kernel would run.
    """
    try:
        from IPython.core.inputtransformer2 import TransformerManager
    except ImportError:  # pragma: no cover - IPython is part of every kernel here
        return source, []
    python = TransformerManager().transform_cell(source)
    reasons = []
    for line in source.splitlines():
        s = line.strip()
        if s.startswith("!"):
            reasons.append(f"runs a shell command ({s[:40]})")
        elif s.startswith("%"):
            name = s.lstrip("%").split(maxsplit=1)[0] if s.lstrip("%") else ""
            if name not in HARMLESS_MAGICS:
                reasons.append(f"uses the IPython magic %{name}")
    # IPython writes every magic as get_ipython().run_line_magic(...): those calls were
    # reported above by magic name, not as a direct use of get_ipython.
    return python, reasons


def _names_in_source(source: str) -> set[str]:
    """Every NAME token the learner typed (before IPython's transformation adds its own)."""
    names = set()
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.NAME:
                names.add(tok.string)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    return names


def scan_source(source: str) -> list[str]:
    """Reasons why one cell of student code touches the grader (empty: nothing found).

    Static inspection of the cell's syntax tree; nothing is run. It reports use of the
    kernel (``get_ipython``, input/AST transformers), ends of the kernel (``os._exit``),
    module swaps (``sys.modules``), running unseen code (``exec``, shell commands) and
    file access outside the submission's folder (``..``, absolute paths, recursive globs,
    the course's file names). A cell that is not valid Python is reported as such.
    """
    python, reasons = _ipython_to_python(source)
    typed = _names_in_source(source)
    try:
        tree = ast.parse(python)
    except SyntaxError as exc:
        return reasons + [f"is not valid Python (line {exc.lineno}: {exc.msg}); the scan could not read it"]

    def add(reason: str) -> None:
        if reason not in reasons:
            reasons.append(reason)

    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in _GRADER_NAMES:
            if node.id != "get_ipython" or "get_ipython" in typed:
                add(_GRADER_NAMES[node.id])
        elif isinstance(node, ast.Attribute) and node.attr in _GRADER_ATTRIBUTES:
            if node.attr == "run_cell" and "run_cell" not in typed:
                continue
            add(_GRADER_ATTRIBUTES[node.attr])
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                top = module.split(".")[0]
                if top in _GRADER_NAMES:
                    add(_GRADER_NAMES[top])
            if isinstance(node, ast.ImportFrom) and node.module in ("os", "sys"):
                for alias in node.names:
                    if alias.name in _GRADER_ATTRIBUTES:
                        add(_GRADER_ATTRIBUTES[alias.name])
                    if alias.name in _RUNNING_CALLS:
                        add(_RUNNING_CALLS[alias.name])
        elif isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name in _RUNNING_CALLS:
                if name == "system" and "system" not in typed:
                    continue  # IPython's own get_ipython().system() for "!cmd", reported above
                add(_RUNNING_CALLS[name])
            if name in _FILE_CALLS:
                for arg in list(node.args) + [k.value for k in node.keywords]:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _leaves_folder(arg.value):
                        add(f"reads files outside its folder ({name}({arg.value!r}))")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value
            if any(w in text for w in _COURSE_WORDS):
                add(f"names the course's files ({text[:50]!r})")
            elif _names_outside_path(text):
                add(f"names a path outside its folder ({text[:50]!r})")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            # pathlib's Path(...) / ".." / "source"
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and _leaves_folder(side.value):
                    add(f"builds a path outside its folder ({side.value!r})")
    return reasons


def _nbg(cell: dict) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def is_test_cell(cell: dict) -> bool:
    """An autograded test cell: a graded code cell that is not an answer (nbgrader's rule)."""
    m = _nbg(cell)
    return cell.get("cell_type") == "code" and bool(m.get("grade")) and not m.get("solution")


def student_cells(nb: dict) -> Iterable[tuple[int, dict]]:
    """The code cells a student writes: answer cells and cells the student added."""
    for i, cell in enumerate(nb.get("cells", [])):
        if cell.get("cell_type") != "code":
            continue
        m = _nbg(cell)
        if m.get("solution") or not m:
            yield i, cell


def _source(cell: dict) -> str:
    s = cell.get("source", "")
    return "".join(s) if isinstance(s, list) else s


def scan_notebook(nb: dict, learner: dict | None = None) -> list[str]:
    """Static-scan reasons for a submission, each naming its cell (``cell 'ex1_answer': ...``).

    With the *learner* version, code cells whose text is exactly one of its cells (the
    course's own demonstration code, an untouched stub) are not the student's and are
    skipped.
    """
    given = {_source(c).strip() for c in (learner or {}).get("cells", []) if c.get("cell_type") == "code"}
    out = []
    for i, cell in student_cells(nb):
        if _source(cell).strip() in given:
            continue
        label = _nbg(cell).get("grade_id") or f"#{i + 1} (added by the student)"
        for reason in scan_source(_source(cell)):
            out.append(f"code touching the grader in cell {label!r}: {reason}")
    return out


# =========================================================================== test cells
def _checksum(cell: dict) -> str:
    """nbgrader's checksum of a cell (nbgrader.utils.compute_checksum)."""
    import nbformat
    from nbgrader.utils import compute_checksum

    return compute_checksum(nbformat.from_dict(cell))


def check_test_cells(submitted: dict, learner: dict) -> list[str]:
    """Test cells of the learner version that the submission deleted or altered.

    The learner version (``release/``, made by nbgrader from the source) is the reference:
    its test cells carry nbgrader's checksum, and nbgrader computes the same checksum of
    the submitted cell. The student's copy of that metadata is never trusted.
    """
    theirs = {}
    for cell in submitted.get("cells", []):
        gid = _nbg(cell).get("grade_id")
        if gid:
            theirs.setdefault(gid, cell)
    out = []
    for cell in learner.get("cells", []):
        if not is_test_cell(cell):
            continue
        gid = _nbg(cell)["grade_id"]
        if gid not in theirs:
            out.append(f"test cell {gid!r} deleted")
            continue
        mine = theirs[gid]
        try:
            same = _checksum(mine) == _checksum(cell)
        except (KeyError, ValueError, TypeError):
            same = False
        if not same:
            out.append(f"test cell {gid!r} altered")
    return out


def _mark_tests(nb, token: str) -> None:
    """Add a line printing *token* to each test cell, just before its last statement if
    that is an expression (its value may be nbgrader's partial credit), else at its end."""
    for cell in nb.cells:
        if not is_test_cell(cell):
            continue
        lines = cell.source.split("\n")
        marker = f"print({TOKEN_PREFIX + token!r})"
        at = len(lines)
        try:
            body = ast.parse(cell.source).body
            if body and isinstance(body[-1], ast.Expr):
                at = body[-1].lineno - 1
        except SyntaxError:
            pass
        cell.source = "\n".join(lines[:at] + [marker] + lines[at:])


def _unmark_tests(nb, marked, token: str) -> list[str]:
    """Remove the marker lines again. A test cell whose output has neither the token nor
    an error did not run as written: it gets an error output (zero marks, nbgrader's
    rule for a test cell with an error). Returns the grade_ids of those cells."""
    originals = {c.metadata.nbgrader["grade_id"]: c.source for c in marked.cells if is_test_cell(c)}
    missing = []
    for cell in nb.cells:
        if not is_test_cell(cell):
            continue
        gid = cell.metadata.nbgrader["grade_id"]
        if gid in originals:
            lines = originals[gid].split("\n")
            cell.source = "\n".join(line for line in lines if TOKEN_PREFIX not in line)
        ran = False
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and TOKEN_PREFIX in out.get("text", ""):
                text_lines = out["text"].split("\n")
                kept = []
                for line in text_lines:
                    if TOKEN_PREFIX in line:
                        ran = ran or line.strip() == TOKEN_PREFIX + token
                    else:
                        kept.append(line)
                out["text"] = "\n".join(kept)
                if not out["text"].strip():
                    continue
            outputs.append(out)
        failed = any(o.get("output_type") == "error" for o in outputs)
        if not ran and not failed:
            # No token and no error: the cell's code never ran as written (a normal
            # failing test has its error output and needs no note).
            import nbformat

            outputs.append(nbformat.v4.new_output(
                "error",
                ename="GraderCheck",
                evalue="this test cell did not run to its end in the grader "
                "(the kernel died or timed out, or code changed the cell at run time)",
                traceback=["GraderCheck: this test cell did not run to its end in the grader"],
            ))
            missing.append(gid)
        cell["outputs"] = outputs
    return missing


# =========================================================================== containers
def docker_available(docker: str = "docker") -> bool:
    """True when the ``docker`` client is installed and its daemon answers."""
    if shutil.which(docker) is None:
        return False
    try:
        r = subprocess.run([docker, "info", "--format", "{{.ServerVersion}}"],
                           capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0 and bool(r.stdout.strip())


def docker_command(workdir: Path, *, image: str, timeout: int,
                   uid: int | None = None, gid: int | None = None,
                   script: Path = Path(__file__).resolve(), memory: str = "2g",
                   cpus: str = "1", docker: str = "docker", name: str | None = None) -> list[str]:
    """The ``docker run`` command line that executes one submission in a container.

    Only the submission's folder is mounted (read-write, at /grading) and this script
    (read-only); no network, no capabilities, no new privileges, a read-only root file
    system, bounded processes, memory and CPUs. It runs as the instructor's uid so the
    files it leaves in the folder belong to them (as jovyan, 1000:100, when that is root);
    HOME and the Jupyter folders are inside /grading, so neither the image's nor the
    instructor's settings apply.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    if uid == 0:
        # Never root in the container: the image's own notebook user (Docker Stacks'
        # jovyan, 1000:100), which may write the folder.
        uid, gid = 1000, 100
        os.chmod(workdir, 0o777)
    env = _grading_env(Path(CONTAINER_WORKDIR), path="/opt/conda/bin:/usr/local/bin:/usr/bin:/bin")
    cmd = [
        docker, "run", "--rm", "-i",
        *(["--name", name] if name else []),
        "--network", "none",
        "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges",
        "--read-only", "--tmpfs", "/tmp:rw,exec,size=512m",
        "--pids-limit", "512", "--memory", memory, "--cpus", cpus,
        "--user", f"{uid}:{gid}",
        "--workdir", CONTAINER_WORKDIR,
        "--volume", f"{Path(workdir).resolve()}:{CONTAINER_WORKDIR}:rw",
        "--volume", f"{Path(script).resolve()}:{CONTAINER_SCRIPT}:ro",
    ]
    for key in sorted(env):
        cmd += ["--env", f"{key}={env[key]}"]
    cmd += ["--entrypoint", "python", image, CONTAINER_SCRIPT, "worker", "--timeout", str(timeout)]
    return cmd


def _grading_env(workdir: Path, path: str) -> dict[str, str]:
    """The whole environment of a grading child: nothing inherited but a PATH; HOME and
    every folder Jupyter or IPython reads settings, kernels' connection files or startup
    scripts from point into the submission's own folder."""
    w = str(workdir)
    return {
        "PATH": path,
        "HOME": w,
        "TMPDIR": f"{w}/.tmp",
        "IPYTHONDIR": f"{w}/.ipython",
        "JUPYTER_CONFIG_DIR": f"{w}/.jupyter",
        "JUPYTER_DATA_DIR": f"{w}/.local/share/jupyter",
        "JUPYTER_RUNTIME_DIR": f"{w}/.runtime",
        "MPLCONFIGDIR": f"{w}/.matplotlib",
        "XDG_CACHE_HOME": f"{w}/.cache",
        "MPLBACKEND": "Agg",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "LANG": "C.UTF-8",
        "NBGRADER_EXECUTION": "autograde",
    }


def local_command(timeout: int, script: Path = Path(__file__)) -> list[str]:
    """The command that executes one submission in a child process on this machine."""
    return [sys.executable, "-I", str(Path(script).resolve()), "worker", "--timeout", str(timeout)]


# =========================================================================== worker (child)
def worker_main(timeout: int) -> int:
    """Execute the notebook read from standard input with nbgrader's Execute, in the
    current folder, and write the result to standard output.

    The notebook never touches the disk, so the student's code cannot read the hidden
    tests or the run's token from a file, nor another submission's. The result -
    ``{"status": ..., "detail": ..., "notebook": {...}}`` - goes to the original standard
    output, which the kernel does not inherit: descriptors 0, 1 and 2 are pointed at
    /dev/null and ``grader.log`` before the kernel starts.
    """
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    _not_dumpable()
    result_fd = os.dup(1)  # os.dup makes a non-inheritable descriptor: kernels never get it
    null_fd = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null_fd, 0)
    os.close(null_fd)
    log_fd = os.open("grader.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    for d in (".tmp", ".ipython", ".jupyter", ".runtime", ".matplotlib", ".cache"):
        os.makedirs(d, exist_ok=True)
    status, detail, nb = "ok", "", None
    try:
        import nbformat
        from nbclient.exceptions import DeadKernelError
        from nbgrader.preprocessors import Execute

        nb = nbformat.from_dict(payload.pop("notebook"))
        pp = Execute(timeout=timeout, interrupt_on_timeout=True,
                     extra_arguments=["--HistoryManager.hist_file=:memory:"])
        try:
            nb, _ = pp.preprocess(nb, {"metadata": {"path": os.getcwd()}})
        except DeadKernelError as exc:
            status, detail = "dead kernel", (str(exc).splitlines() or ["the kernel died"])[0]
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reported status
            status, detail = "failed", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    except Exception as exc:  # noqa: BLE001
        status, detail = "failed", f"{type(exc).__name__}: {exc}"
    with os.fdopen(result_fd, "w", encoding="utf-8") as out:
        json.dump({"status": status, "detail": detail, "notebook": nb}, out)
    return 0


# Linux facts used by the namespace sandbox (<sys/mount.h>, <sys/prctl.h>; mount(2), prctl(2)).
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND, _MS_RELATIME = 32, 1024, 2048, 4096, 1 << 21
_PR_SET_DUMPABLE = 4
#: The user the kernel runs as inside the sandbox's inner user namespace ("nobody"); it is
#: the instructor's own user outside, so the files it writes in its folder are theirs.
_SANDBOX_UID = 65534


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _not_dumpable() -> None:
    """Make this process non-dumpable (prctl PR_SET_DUMPABLE 0): a kernel started from it
    can then not open its /proc/<pid>/fd, cwd or mem, i.e. not reach the result channel or
    the folders it came from. Linux only; elsewhere nothing happens."""
    if sys.platform.startswith("linux"):
        try:
            _libc().prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
        except (OSError, AttributeError):
            pass


def namespaces_available() -> bool:
    """True when unprivileged user, mount and PID namespaces work here (util-linux unshare)."""
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(_NS_OUTER + ["true"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


#: Outer namespaces: the sandbox stage is root of its own user namespace (to mount), in its
#: own mount namespace, PID 1 of its own PID namespace with a fresh /proc (no process of the
#: instructor's is visible); if unshare dies, the namespace goes with it.
_NS_OUTER = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc", "--kill-child", "--"]
#: Inner namespaces: the worker and kernel run as an ordinary user of a nested user
#: namespace, where the mounts made by the sandbox stage are locked (cannot be unmounted).
_NS_INNER = ["unshare", "--user", "--mount", f"--map-user={_SANDBOX_UID}", f"--map-group={_SANDBOX_UID}", "--"]


def sandbox_command(timeout: int, script: Path = Path(__file__)) -> list[str]:
    """The command that executes one submission on this machine inside Linux namespaces."""
    return _NS_OUTER + [sys.executable, "-I", str(Path(script).resolve()), "sandbox", "--timeout", str(timeout)]


#: Entries of the repository the grading children need: the package and a venv inside it.
_REPO_KEEP = {"vtlab", "vtlab.egg-info", ".venv"}


def default_hidden() -> set[Path]:
    """Folders the namespace sandbox hides whatever the course: every folder of the
    repository but the package and the venv (course/, its .git history, tests' fixtures,
    tools/ ...), and vtlab's cache of executed notebooks."""
    out = set()
    prefix = Path(sys.prefix).resolve()
    for child in REPO.iterdir():
        if child.is_dir() and not child.is_symlink() and child.name not in _REPO_KEEP:
            c = child.resolve()
            if c != prefix and c not in prefix.parents:
                out.add(c)
    cache = Path(os.environ.get("VTLAB_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vtlab")
    if cache.is_dir():
        out.add(cache.resolve())
    return out


def _mount_points() -> list[str]:
    """The mount points of this mount namespace (/proc/self/mountinfo, field 5)."""
    import re

    points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4]))
    return points


def _read_only_except(here: Path, libc) -> str:
    """Make every file system read-only but the folder *here* (a bind mount of its own)
    and /proc, /sys, /dev: a submission must not change the venv, the package or the
    instructor's files for the submissions graded after it. Returns "" or what failed."""
    import ctypes

    if libc.mount(str(here).encode(), str(here).encode(), None, _MS_BIND, None) != 0:
        return f"cannot bind {here}: {os.strerror(ctypes.get_errno())}"
    os.chdir(here)  # the working directory must be the new mount, not the folder under it
    keep = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC}
    for point in _mount_points():
        if point == str(here) or point.startswith(("/proc", "/sys", "/dev")):
            continue
        try:
            st = os.statvfs(point)
        except OSError:
            continue
        if st.f_flag & os.ST_RDONLY:
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= (keep["nosuid"] if st.f_flag & os.ST_NOSUID else 0) | (keep["nodev"] if st.f_flag & os.ST_NODEV else 0)
        flags |= keep["noexec"] if st.f_flag & os.ST_NOEXEC else 0
        flags |= _MS_NOATIME if st.f_flag & os.ST_NOATIME else 0
        flags |= _MS_NODIRATIME if st.f_flag & os.ST_NODIRATIME else 0
        flags |= _MS_RELATIME if st.f_flag & getattr(os, "ST_RELATIME", 4096) else 0
        if libc.mount(None, point.encode(), None, flags, None) != 0:
            err = os.strerror(ctypes.get_errno())
            prefix = Path(sys.prefix).resolve()
            if point == "/" or Path(point) in prefix.parents or Path(point) == prefix:
                return f"cannot make {point} read-only: {err}"
    return ""


def sandbox_main(timeout: int) -> int:
    """The sandbox stage: hide the course, then run the worker in the inner namespaces.

    Reads the worker's payload plus ``"hide"`` (folders to make unreachable) from standard
    input; mounts an empty, read-only, mode-000 tmpfs over each of them (the folder it
    runs in stays reachable); makes every other file system read-only (_read_only_except);
    then starts the worker as an ordinary user of a nested user namespace and passes its
    result through.
    """
    payload = json.loads(sys.stdin.buffer.read().decode("utf-8"))
    _not_dumpable()
    here = Path.cwd().resolve()
    libc = _libc()
    for folder in payload.pop("hide", []):
        path = Path(folder)
        if not path.is_dir() or here == path or path in here.parents:
            continue
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        if libc.mount(b"tmpfs", str(path).encode(), b"tmpfs", flags, b"size=4k,mode=000") != 0:
            import ctypes

            err = os.strerror(ctypes.get_errno())
            json.dump({"status": "failed", "detail": f"sandbox: cannot hide {path}: {err}"}, sys.stdout)
            return 0
    problem = _read_only_except(here, libc)
    if problem:
        json.dump({"status": "failed", "detail": f"sandbox: {problem}"}, sys.stdout)
        return 0
    cmd = _NS_INNER + [sys.executable, "-I", str(Path(__file__).resolve()), "worker", "--timeout", str(timeout)]
    proc = subprocess.run(cmd, input=json.dumps(payload).encode("utf-8"), stdout=subprocess.PIPE)
    sys.stdout.buffer.write(proc.stdout)
    return 0


# =========================================================================== parent
@dataclasses.dataclass
class Submission:
    """One student's notebook for one assignment."""

    student: str
    assignment: str
    path: Path


@dataclasses.dataclass
class Result:
    """The outcome of grading one submission."""

    student: str
    assignment: str
    score: float = 0.0
    max_score: float = 0.0
    status: str = "ok"
    needs_manual_grade: bool = False
    reasons: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    @property
    def needs_attention(self) -> bool:
        return bool(self.reasons)


def find_submissions(folder: Path, assignments: Sequence[str] | None = None) -> list[Submission]:
    """Every ``<student>/<assignment>/<assignment>.ipynb`` below *folder*."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GradingError(f"submissions folder {folder} does not exist")
    found = []
    for sdir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for adir in sorted(p for p in sdir.iterdir() if p.is_dir() and not p.name.startswith(".")):
            if assignments and adir.name not in assignments:
                continue
            nb = adir / f"{adir.name}.ipynb"
            if nb.is_file():
                found.append(Submission(sdir.name, adir.name, nb))
    if not found:
        raise GradingError(f"no submissions in {folder}: expected <student>/<assignment>/<assignment>.ipynb")
    return found


def load_config(course: Path, timeout: int | None = None):
    """nbgrader's configuration from nbgrader_config.py, with the course root set to *course*."""
    from traitlets.config import Config
    from traitlets.config.loader import PyFileConfigLoader

    cfg = Config()
    if CONFIG_FILE.exists():
        cfg.merge(PyFileConfigLoader(CONFIG_FILE.name, path=str(CONFIG_FILE.parent)).load_config())
    cfg.CourseDirectory.root = str(Path(course).resolve())
    if timeout is not None:
        cfg.Execute.timeout = int(timeout)
    # What generate_assignment must not copy into release/ (the jupytext twin <a>.py holds
    # every solution): tools/nbgrader_course.py's list, added to nbgrader's own.
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from nbgrader_course import RELEASE_IGNORE
    except ImportError:
        RELEASE_IGNORE = ("*.py", "jupytext.toml", ".jupytext*")
    finally:
        sys.path.pop(0)
    from nbgrader.coursedir import CourseDirectory

    ignore = list(cfg.CourseDirectory.ignore) if "ignore" in cfg.CourseDirectory else list(
        CourseDirectory.class_traits()["ignore"].default())
    cfg.CourseDirectory.ignore = ignore + [p for p in RELEASE_IGNORE if p not in ignore]
    if "add_missing_cells" not in cfg.OverwriteCells:
        # A test cell the student deleted comes back from the gradebook and runs (nbgrader
        # would otherwise leave its points to a manual grade); attention.csv names it.
        cfg.OverwriteCells.add_missing_cells = True
    return cfg


def _fast_alembic() -> None:
    """Learn the gradebook schema revision in-process: nbgrader runs ``alembic heads`` in a
    subprocess for every new gradebook, which takes seconds."""
    import nbgrader.api as api

    if getattr(api.get_alembic_version, "_vtlab_fast", False):
        return
    original = api.get_alembic_version
    cache: list[str] = []

    def get_alembic_version() -> str:
        if not cache:
            try:
                from alembic.config import Config as AlembicConfig
                from alembic.script import ScriptDirectory

                acfg = AlembicConfig()
                acfg.set_main_option("script_location", str(Path(api.__file__).parent / "alembic"))
                cache.append(ScriptDirectory.from_config(acfg).get_current_head() or original())
            except Exception:  # noqa: BLE001 - nbgrader's own way still works
                cache.append(original())
        return cache[0]

    get_alembic_version._vtlab_fast = True  # type: ignore[attr-defined]
    api.get_alembic_version = get_alembic_version


class Course:
    """The trusted side: the gradebook, the sources and learner versions of one course."""

    def __init__(self, root: Path, timeout: int | None = None, log: Callable[[str], None] = print):
        self.root = Path(root).resolve()
        self.config = load_config(self.root, timeout)
        self.timeout = int(self.config.Execute.timeout) if "timeout" in self.config.Execute else 30
        self.log = log
        #: Write feedback without hidden tests (Course.feedback) for every graded submission.
        self.write_feedback = False
        import logging

        self.nblog = logging.getLogger("vtlab.autograde.nbgrader")
        self.nblog.setLevel(logging.ERROR)
        _fast_alembic()
        if not (self.root / "source").is_dir():
            raise GradingError(f"{self.root} has no source/ folder (expected source/<assignment>/<assignment>.ipynb)")
        os.environ.setdefault("PATH", "")
        bindir = str(Path(sys.executable).parent)
        if bindir not in os.environ["PATH"].split(os.pathsep):
            os.environ["PATH"] = bindir + os.pathsep + os.environ["PATH"]

    # -- paths
    def source(self, a: str) -> Path:
        return self.root / "source" / a / f"{a}.ipynb"

    def release(self, a: str) -> Path:
        return self.root / "release" / a / f"{a}.ipynb"

    @property
    def db_url(self) -> str:
        return self.coursedir().db_url

    def coursedir(self, assignment: str = "*", student: str = "*"):
        from nbgrader.coursedir import CourseDirectory

        cd = CourseDirectory(config=self.config, log=self.nblog)
        cd.assignment_id = assignment
        cd.student_id = student
        return cd

    # -- learner versions and the gradebook
    def ensure_assignment(self, a: str) -> None:
        """Record *a* in the gradebook and write its learner version, unless both are
        current (nbgrader's generate_assignment, run here in the trusted process)."""
        from nbgrader.api import Gradebook, MissingEntry
        from nbgrader.converters import GenerateAssignment
        from nbgrader.converters.base import NbGraderException

        src, rel = self.source(a), self.release(a)
        if not src.is_file():
            raise GradingError(f"assignment {a!r}: no instructor source {src}")
        with Gradebook(self.db_url, self.coursedir().course_id) as gb:
            try:
                gb.find_assignment(a)
                known = True
            except MissingEntry:
                known = False
        if known and rel.is_file() and rel.stat().st_mtime >= src.stat().st_mtime:
            return
        conv = GenerateAssignment(coursedir=self.coursedir(a), config=self.config, log=self.nblog)
        conv.force = True
        conv.create_assignment = True
        try:
            conv.start()
        except NbGraderException as exc:
            raise GradingError(f"generate_assignment {a} failed: {exc}") from None
        if not rel.is_file():
            raise GradingError(f"generate_assignment {a} wrote no {rel}")

    def shipped_files(self, a: str) -> list[Path]:
        """The files the assignment hands out besides its notebooks (from release/<a>/),
        never a notebook's paired script (jupytext pairs hold the solutions)."""
        rel_dir = self.release(a).parent
        stems = {p.stem for p in rel_dir.glob("*.ipynb")} | {p.stem for p in self.source(a).parent.glob("*.ipynb")}
        out = []
        for p in sorted(rel_dir.rglob("*")):
            if not p.is_file() or p.suffix == ".ipynb" or any(part in IGNORED_NAMES for part in p.parts):
                continue
            if p.stem in stems and p.suffix in (".py", ".md", ".Rmd", ".myst", ".txt"):
                continue
            out.append(p)
        return out

    # -- one submission, step 1: sanitize (trusted)
    def prepare(self, sub: Submission, workdir: Path, token: str) -> tuple[object, dict, list[str]]:
        """Register the submission, check its test cells and code, and write the notebook
        to execute (nbgrader's sanitizing steps + the token lines) into *workdir*.

        Returns (marked notebook, nbgrader resources, attention reasons).
        """
        import nbformat
        from nbgrader.api import Gradebook
        from nbgrader.preprocessors import (CheckCellMetadata, ClearOutput, DeduplicateIds,
                                            OverwriteCells, OverwriteKernelspec)

        reasons: list[str] = []
        try:
            nb = nbformat.reads(sub.path.read_text(encoding="utf-8"), as_version=4)
            if not isinstance(nb.get("cells"), list):
                raise ValueError("it has no cells")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            reasons.append(f"the notebook cannot be read ({exc}); graded as blank")
            nb = nbformat.read(self.release(sub.assignment), as_version=4)
        raw = json.loads(json.dumps(nb))  # nbformat joins list sources into strings
        learner = json.loads(json.dumps(nbformat.read(self.release(sub.assignment), as_version=4)))
        reasons += check_test_cells(raw, learner)
        reasons += scan_notebook(raw, learner)

        cd = self.coursedir(sub.assignment, sub.student)
        timestamp = cd.get_existing_timestamp(str(sub.path.parent))
        with Gradebook(self.db_url, cd.course_id) as gb:
            gb.update_or_create_student(sub.student)
            if timestamp:
                gb.update_or_create_submission(sub.assignment, sub.student, timestamp=timestamp)
            else:
                gb.update_or_create_submission(sub.assignment, sub.student)

        resources = {"unique_key": sub.assignment, "nbgrader": {
            "student": sub.student, "assignment": sub.assignment,
            "notebook": sub.assignment, "db_url": self.db_url}}
        for cls in (ClearOutput, DeduplicateIds, OverwriteKernelspec, OverwriteCells, CheckCellMetadata):
            nb, resources = cls(config=self.config, log=self.nblog)(nb, resources)
        # Cells nbgrader added back are plain dicts inside; make the whole tree NotebookNodes.
        nb = nbformat.from_dict(json.loads(json.dumps(nb)))
        for cell in nb.cells:
            if "id" not in cell and nb.nbformat_minor >= 5:
                cell.id = f"re-added-{secrets.token_hex(4)}"
        _mark_tests(nb, token)
        workdir.mkdir(parents=True, exist_ok=True)
        rel_dir = self.release(sub.assignment).parent
        for f in self.shipped_files(sub.assignment):
            dest = workdir / f.relative_to(rel_dir)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        return nb, resources, reasons

    # -- one submission, step 3: record (trusted)
    def finish(self, sub: Submission, marked, resources: dict, token: str, outcome: dict,
               reasons: list[str]) -> Result:
        """Check the tokens, run nbgrader's remaining autograde steps (only this process
        writes the gradebook) and write the graded notebook to autograded/."""
        import nbformat
        from nbconvert.preprocessors import ClearMetadataPreprocessor
        from nbgrader.api import Gradebook
        from nbgrader.preprocessors import (AssignLatePenalties, CheckCellMetadata, IgnorePattern,
                                            LimitOutput, SaveAutoGrades)

        result = Result(sub.student, sub.assignment, status=str(outcome.get("status", "failed")))
        if result.status != "ok":
            detail = str(outcome.get("detail") or "")
            result.reasons.append(result.status + (f": {detail}" if detail else ""))
        executed = outcome.get("notebook")
        try:
            cells = executed["cells"] if executed else None
            if cells is not None and len(cells) != len(marked.cells):
                raise ValueError("it has other cells than the notebook sent")
        except (ValueError, TypeError, KeyError) as exc:
            result.reasons.append(f"the grader's result was unusable ({exc}); graded without outputs")
            cells = None
        # Keep only the outputs of the child's notebook: sources and metadata are the
        # sanitized ones this process made, whatever the child sent back.
        nb = nbformat.from_dict(json.loads(json.dumps(marked)))
        for i, cell in enumerate(nb.cells):
            if cell.cell_type == "code":
                outputs = cells[i].get("outputs", []) if cells is not None and isinstance(cells[i], dict) else []
                cell.outputs = nbformat.from_dict(outputs if isinstance(outputs, list) else [])
        for cell in nb.cells:
            for out in cell.get("outputs", []):
                if out.get("output_type") == "error" and out.get("ename") == "CellTimeoutError":
                    gid = _nbg(cell).get("grade_id", "?")
                    result.reasons.append(f"a cell timed out ({gid!r})")
        missing = _unmark_tests(nb, marked, token)
        if missing:
            result.reasons.append("test cells that did not run to their end (0 marks): " + ", ".join(missing))
        for cls in (IgnorePattern, ClearMetadataPreprocessor, LimitOutput, SaveAutoGrades,
                    AssignLatePenalties, CheckCellMetadata):
            nb, resources = cls(config=self.config, log=self.nblog)(nb, resources)
        out_dir = self.root / "autograded" / sub.student / sub.assignment
        out_dir.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, out_dir / f"{sub.assignment}.ipynb")
        if self.write_feedback:
            self.feedback(sub, nb)
        with Gradebook(self.db_url, self.coursedir().course_id) as gb:
            snb = gb.find_submission_notebook(sub.assignment, sub.assignment, sub.student)
            result.score = float(snb.score)
            result.max_score = float(snb.max_score)
            result.needs_manual_grade = bool(snb.needs_manual_grade)
        if result.needs_manual_grade:
            result.reasons.append("needs_manual_grade (an answer nbgrader cannot score by itself)")
        result.reasons = reasons + result.reasons
        return result

    def feedback(self, sub: Submission, graded) -> Path:
        """Write feedback/<student>/<a>/<a>.html that shows no hidden test.

        nbgrader's generate_feedback shows the graded notebook as it ran: every test cell
        with its hidden tests and the traceback that names the failing hidden assert. Here
        each test cell shows the learner version's text (visible tests only) and, instead
        of its outputs, one line: passed or failed, with its points.
        """
        import nbformat
        from nbconvert import HTMLExporter
        from nbgrader.utils import determine_grade

        learner = nbformat.read(self.release(sub.assignment), as_version=4)
        visible = {c.metadata.nbgrader["grade_id"]: c.source for c in learner.cells if is_test_cell(c)}
        nb = nbformat.from_dict(json.loads(json.dumps(graded)))
        for cell in nb.cells:
            if not is_test_cell(cell):
                continue
            gid = cell.metadata.nbgrader["grade_id"]
            score, points = determine_grade(cell)
            verdict = "passed" if score == points else "failed"
            cell.source = visible.get(gid, "# (tests of this cell are not shown)")
            cell.outputs = [nbformat.v4.new_output(
                "stream", name="stdout", text=f"{verdict}: {score or 0:g} of {points:g} points\n")]
        out = self.root / "feedback" / sub.student / sub.assignment / f"{sub.assignment}.html"
        out.parent.mkdir(parents=True, exist_ok=True)
        body, _ = HTMLExporter().from_notebook_node(nb)
        out.write_text(body, encoding="utf-8")
        return out

    def export(self, dest: Path) -> Path:
        """nbgrader's CSV export of the whole gradebook to *dest*."""
        from nbgrader.api import Gradebook
        from nbgrader.plugins import CsvExportPlugin

        with Gradebook(self.db_url, self.coursedir().course_id) as gb:
            plugin = CsvExportPlugin(config=self.config, log=self.nblog)
            plugin.to = str(dest)
            plugin.export(gb)
        return dest


def run_child(cmd: list[str], workdir: Path, env: dict[str, str] | None, payload: str, limit: float) -> dict:
    """Run one grading child with *payload* (JSON text: the notebook, for the sandbox the
    folders to hide) on its standard input; its whole process group is ended afterwards,
    kernels included. Returns the child's result plus ``seconds``, its run time."""
    t0 = time.monotonic()
    result = _run_child(cmd, workdir, env, payload, limit)
    if not isinstance(result, dict):
        result = {"status": "failed", "detail": "the grader's result is not a JSON object"}
    result["seconds"] = time.monotonic() - t0
    return result


def _run_child(cmd: list[str], workdir: Path, env: dict[str, str] | None, payload: str, limit: float):
    try:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        return {"status": "failed", "detail": f"cannot start the grader: {exc}"}
    try:
        out, err = proc.communicate(payload.encode("utf-8"), timeout=limit)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        if "--name" in cmd:  # the container outlives its docker client: stop it by name
            subprocess.run([cmd[0], "kill", cmd[cmd.index("--name") + 1]], capture_output=True, timeout=60)
        proc.communicate()
        return {"status": "timeout", "detail": f"the submission ran longer than {limit:.0f} s and was stopped"}
    finally:
        _kill_group(proc)
    try:
        return json.loads(out.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        tail = err.decode("utf-8", "replace").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        return {"status": "failed", "detail": f"the grader gave no result ({tail[0][:200]})"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def isolation_mode(container: str = "auto", namespaces: bool = True) -> str:
    """How submissions will run: ``"docker"``, ``"namespaces"`` or ``"process"``.

    *container* ``always`` needs a working Docker daemon (GradingError otherwise),
    ``auto`` uses it when it answers; without Docker, Linux namespaces are used when
    *namespaces* is true and they work here, else a plain separate process.
    """
    if container not in ("auto", "never", "always"):
        raise GradingError(f"--container must be auto, never or always, not {container!r}")
    if container != "never" and docker_available():
        return "docker"
    if container == "always":
        raise GradingError("--container always: the Docker daemon does not answer (`docker info` fails); "
                           "start it, or grade with --container never")
    if namespaces and namespaces_available():
        return "namespaces"
    return "process"


ISOLATION_TEXT = {
    "docker": "a Docker container per submission (only its folder mounted, no network)",
    "namespaces": "Linux namespaces per submission (course, submissions and other gradings hidden)",
    "process": "a separate process and folder per submission (no container, no namespaces: "
               "code that knows an absolute path can still read the course)",
}


def grade_class(course_root: Path, submissions: Sequence[Submission], *, jobs: int = 1,
                container: str = "never", namespaces: bool = True, image: str = DEFAULT_IMAGE,
                timeout: int | None = None, submission_timeout: float = DEFAULT_SUBMISSION_TIMEOUT,
                hide: Sequence[Path] = (), progress: Callable[[str], None] = print,
                keep: bool = False, feedback: bool = False) -> list[Result]:
    """Grade *submissions* against the course at *course_root*; see the module docstring.

    *container* and *namespaces* choose the isolation (isolation_mode); *hide* adds
    folders the namespace sandbox makes unreachable (the course root, the submissions'
    folders and the repository's course/ always are). Returns one Result per
    submission, in the order given.
    """
    course = Course(course_root, timeout, log=progress)
    course.write_feedback = feedback
    mode = isolation_mode(container, namespaces)
    progress(f"isolation: {ISOLATION_TEXT[mode]}")
    for a in sorted({s.assignment for s in submissions}):
        course.ensure_assignment(a)
    base = Path(tempfile.mkdtemp(prefix="vtlab-grading-"))
    works = [base / f"{i:04d}" for i in range(len(submissions))]
    for w in works:
        w.mkdir()
    hidden = default_hidden() | {course.root, *(Path(h).resolve() for h in hide)}
    hidden |= {s.path.resolve().parent.parent.parent for s in submissions}
    # The children run a copy of this script from the grading folder: the repository's
    # tools/ is among the hidden folders.
    script = base / Path(__file__).name
    shutil.copy2(Path(__file__).resolve(), script)
    results: dict[int, Result] = {}
    t0 = time.monotonic()
    try:
        pending = {}
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for i, sub in enumerate(submissions):
                work, token = works[i], secrets.token_hex(16)
                try:
                    marked, resources, reasons = course.prepare(sub, work, token)
                except Exception as exc:  # noqa: BLE001 - one bad submission must not stop the class
                    results[i] = Result(sub.student, sub.assignment, status="failed",
                                        reasons=[f"could not be prepared: {type(exc).__name__}: {exc}"])
                    continue
                payload: dict = {"notebook": marked}
                env: dict[str, str] | None = None
                if mode == "docker":
                    cmd = docker_command(work, image=image, timeout=course.timeout, script=script,
                                         name=f"vtlab-grade-{token[:12]}")
                else:
                    env = _grading_env(work, path=os.pathsep.join(
                        [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]))
                    if mode == "namespaces":
                        cmd = sandbox_command(course.timeout, script)
                        payload["hide"] = sorted(str(h) for h in hidden | set(works) - {work})
                    else:
                        cmd = local_command(course.timeout, script)
                fut = pool.submit(run_child, cmd, work, env, json.dumps(payload), submission_timeout)
                pending[fut] = (i, sub, marked, resources, token, reasons)
            done = 0
            for fut in concurrent.futures.as_completed(pending):
                i, sub, marked, resources, token, reasons = pending[fut]
                outcome = fut.result()
                try:
                    res = course.finish(sub, marked, resources, token, outcome, reasons)
                except Exception as exc:  # noqa: BLE001
                    res = Result(sub.student, sub.assignment, status="failed",
                                 reasons=reasons + [f"could not be recorded: {type(exc).__name__}: {exc}"])
                res.seconds = float(outcome.get("seconds", 0.0))
                results[i] = res
                done += 1
                rate = done / max(time.monotonic() - t0, 1e-9) * 60
                flag = "  ATTENTION" if res.needs_attention else ""
                progress(f"graded {done}/{len(pending)} {sub.student}/{sub.assignment}: "
                         f"{res.score:g}/{res.max_score:g} ({res.seconds:.1f} s, {rate:.1f}/min){flag}")
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    return [results[i] for i in range(len(submissions))]


def write_attention(results: Iterable[Result], dest: Path) -> int:
    """Write *dest* (CSV): one row per submission needing attention, all its reasons.
    Returns the number of rows."""
    rows = [r for r in results if r.needs_attention]
    with open(dest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["student", "assignment", "score", "max_score", "status", "reasons"])
        for r in rows:
            w.writerow([r.student, r.assignment, f"{r.score:g}", f"{r.max_score:g}", r.status, " | ".join(r.reasons)])
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["worker"], ["sandbox"]):
        wp = argparse.ArgumentParser(prog=f"autograde.py {argv[0]}")
        wp.add_argument("--timeout", type=int, default=120)
        wa = wp.parse_args(argv[1:])
        return worker_main(wa.timeout) if argv[0] == "worker" else sandbox_main(wa.timeout)
    p = argparse.ArgumentParser(prog="autograde.py", description=__doc__.split("\n\n")[0])
    p.add_argument("submissions", type=Path, help="folder of <student>/<assignment>/<assignment>.ipynb")
    p.add_argument("--course", type=Path, default=DEFAULT_COURSE, help="course root with source/ (default: course/)")
    jobs_env = os.environ.get("JOBS") or "1"
    p.add_argument("--jobs", "-j", type=int, default=int(jobs_env) if jobs_env.isdigit() else 0,
                   help="submissions graded at once (default: $JOBS or 1)")
    p.add_argument("--container", choices=["auto", "never", "always"], default="auto",
                   help="run each submission in a Docker container (auto: when the daemon answers)")
    p.add_argument("--no-namespaces", dest="namespaces", action="store_false",
                   help="without Docker, do not use Linux namespaces (a plain separate process)")
    p.add_argument("--hide", type=Path, action="append", default=[],
                   help="another folder the namespace sandbox makes unreachable (repeatable)")
    p.add_argument("--image", default=DEFAULT_IMAGE, help=f"image for --container (default {DEFAULT_IMAGE})")
    p.add_argument("--assignment", "-a", action="append", default=None, help="only this assignment (repeatable)")
    p.add_argument("--timeout", type=int, default=None, help="seconds per cell (default: nbgrader_config.py)")
    p.add_argument("--submission-timeout", type=float, default=DEFAULT_SUBMISSION_TIMEOUT,
                   help=f"seconds per submission, all cells (default {DEFAULT_SUBMISSION_TIMEOUT})")
    p.add_argument("--csv", type=Path, default=None, help="grades CSV (default: <course>/grades.csv)")
    p.add_argument("--feedback", action="store_true",
                   help="write <course>/feedback/<student>/<a>/<a>.html: pass/fail and points per test, no hidden test")
    p.add_argument("--keep", action="store_true", help="keep the temporary grading folders (for debugging)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs (or JOBS) must be a whole number, 1 or more (JOBS={jobs_env!r})")
    try:
        subs = find_submissions(args.submissions, args.assignment)
        print(f"autograde: {len(subs)} submission(s), {args.jobs} at a time", flush=True)
        t0 = time.monotonic()
        results = grade_class(args.course, subs, jobs=args.jobs, container=args.container,
                              namespaces=args.namespaces, hide=args.hide, image=args.image,
                              timeout=args.timeout, submission_timeout=args.submission_timeout,
                              progress=lambda s: print(s, flush=True), keep=args.keep,
                              feedback=args.feedback)
        course = Course(args.course, args.timeout)
        csv_path = (args.csv or course.root / "grades.csv").resolve()
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        course.export(csv_path)
        attention = csv_path.with_name("attention.csv")
        n = write_attention(results, attention)
        minutes = (time.monotonic() - t0) / 60
        print(f"autograde: {len(results)} graded in {minutes * 60:.0f} s "
              f"({len(results) / max(minutes, 1e-9):.1f} per minute); grades: {csv_path}")
        print(f"autograde: {n} need attention: {attention}")
        for r in results:
            if r.needs_attention:
                print(f"  {r.student}/{r.assignment}: " + " | ".join(r.reasons))
    except GradingError as exc:
        print(f"autograde: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
