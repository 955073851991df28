"""Binder: what repo2docker installs from ``binder/`` runs the course.

- ``binder/requirements.txt`` pins the same versions as ``requirements.txt`` (fast, always).
- A fresh virtual environment built ONLY from ``binder/requirements.txt`` (``pip install
  -r binder/requirements.txt`` from the repository root, as repo2docker does; its ``.``
  line installs vtlab itself, non-editable) executes every instructor source
  ``course/source/<a>/<a>.ipynb`` (plus the nbgrader fixture) in a kernel running that
  environment's python: the sources run every cell with the solutions in, so they use
  the whole stack a learner's finished notebook uses (the learner versions in
  ``notebooks/``, stubs and all, are run by tests/test_notebooks.py).

The environment is cached outside the repository, in ``~/.cache/vtlab/binder-venv/``
(``$VTLAB_CACHE_DIR`` / ``$XDG_CACHE_HOME`` move it; see tests/conftest.py), keyed by a
hash of ``binder/requirements.txt`` and the interpreter; the vtlab package in it is
re-installed (``pip install --no-deps --force-reinstall .``) whenever vtlab's sources
change.  pip builds vtlab from a temporary copy of the sources, so its ``build/`` and
``*.egg-info`` never land in the repository.  ``make clean-binder`` removes the cache.
Select with ``pytest -m binder``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ARTIFACTS_DIR, CACHE_DIR

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None

REPO = Path(__file__).resolve().parent.parent
BINDER = REPO / "binder"
BINDER_REQS = BINDER / "requirements.txt"
DEV_REQS = REPO / "requirements.txt"
CACHE = CACHE_DIR / "binder-venv"
ENV = CACHE / "env"
ARTIFACTS = ARTIFACTS_DIR / "binder"
#: What pip needs to build vtlab (pyproject.toml names the readme and the license file).
PACKAGE_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "vtlab", "binder")

NOTEBOOKS = sorted(p for p in (REPO / "course" / "source").glob("*/*.ipynb") if p.parent.name == p.stem)
FIXTURE = REPO / "tests" / "fixtures" / "nbgrader_sample.ipynb"
RUN_NOTEBOOKS = NOTEBOOKS + [FIXTURE]

CELL_TIMEOUT = 120  # seconds per cell
PIP_TIMEOUT = 1800  # seconds for building the environment


# --------------------------------------------------------------------------- pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_requirements(path: Path) -> tuple[dict[str, str], list[str]]:
    """(name -> exact version for `name==version` lines, other requirement lines)."""
    pins, other = {}, []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #")[0].strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if m:
            pins[_norm(m.group(1))] = m.group(3)
        else:
            other.append(line)
    return pins, other


def test_binder_pins_match_requirements():
    binder, binder_other = parse_requirements(BINDER_REQS)
    dev, _ = parse_requirements(DEV_REQS)
    shared = sorted(set(binder) & set(dev))
    assert shared, "binder/requirements.txt and requirements.txt share no pinned package"
    differ = {n: (binder[n], dev[n]) for n in shared if binder[n] != dev[n]}
    assert not differ, f"binder/ pins differ from requirements.txt (binder, requirements): {differ}"
    assert binder_other == ["."], (
        f"binder/requirements.txt: every line must be `name==version`, plus one `.` line "
        f"that installs vtlab; found other lines {binder_other}"
    )


def test_binder_pins_every_runtime_dependency():
    """Every dependency in pyproject.toml is pinned in both files, so Binder gets the
    tested versions rather than whatever pip resolves."""
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    names = {_norm(re.match(r"[A-Za-z0-9._-]+", d).group(0)) for d in project.get("dependencies", [])}
    binder, _ = parse_requirements(BINDER_REQS)
    dev, _ = parse_requirements(DEV_REQS)
    assert not names - set(binder), f"not pinned in binder/requirements.txt: {sorted(names - set(binder))}"
    assert not names - set(dev), f"not pinned in requirements.txt: {sorted(names - set(dev))}"


def test_binder_runtime_python():
    runtime = (BINDER / "runtime.txt").read_text(encoding="utf-8").strip()
    m = re.fullmatch(r"python-(3)\.(\d+)", runtime)
    assert m, f"binder/runtime.txt should read like `python-3.11`, not {runtime!r}"
    if tomllib is not None:
        req = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"].get("requires-python", "")
        low = re.search(r">=\s*3\.(\d+)", req)
        if low:
            assert int(m.group(2)) >= int(low.group(1)), f"runtime.txt {runtime} below requires-python {req}"


# --------------------------------------------------------------------------- the environment


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def _package_digest() -> str:
    files = [REPO / "pyproject.toml"] + sorted(
        p
        for p in (REPO / "vtlab").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in {".pyc", ".pyo"}
    )
    return _digest(*(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes() for p in files))


def _clean_env(prefix: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "JUPYTER", "VIRTUAL_ENV", "CONDA"))}
    if prefix is not None:
        env["VIRTUAL_ENV"] = str(prefix)
        env["PATH"] = str(prefix / "bin") + os.pathsep + env.get("PATH", "")
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["MPLBACKEND"] = "Agg"
    # the venv's own kernelspec wins over any in ~/.local/share/jupyter
    env["JUPYTER_PREFER_ENV_PATH"] = "1"
    return env


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise AssertionError(
            f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
        )
    return proc


def _source_copy(dest: Path) -> Path:
    """Copy what a `pip install .` of vtlab reads into ``dest``; returns ``dest``.

    setuptools builds in the source tree (``build/``, ``vtlab.egg-info/``): building
    from a copy keeps those out of the repository.
    """
    for name in PACKAGE_SOURCES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="session")
def binder_python(tmp_path_factory) -> Path:
    """The python of a venv built only from binder/requirements.txt (cached)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    source = _source_copy(tmp_path_factory.mktemp("binder-src"))
    python = ENV / "bin" / "python"
    env_key = _digest(BINDER_REQS.read_bytes(), sys.version.encode(), str(ENV).encode())
    env_stamp, pkg_stamp = CACHE / "env.sha256", CACHE / "vtlab.sha256"
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time
        if not python.exists() or not env_stamp.exists() or env_stamp.read_text() != env_key:
            t0 = time.monotonic()
            pkg_key = _package_digest()
            env_stamp.unlink(missing_ok=True)
            pkg_stamp.unlink(missing_ok=True)
            shutil.rmtree(ENV, ignore_errors=True)
            # `sys.executable -m venv` bases the new venv on this venv's base interpreter
            # (python3), without this venv's packages.
            _run([sys.executable, "-m", "venv", str(ENV)], env=_clean_env())
            _run(
                [str(python), "-m", "pip", "install", "-r", str(BINDER_REQS.relative_to(REPO))],
                cwd=source, env=_clean_env(ENV), timeout=PIP_TIMEOUT,
            )
            env_stamp.write_text(env_key)
            pkg_stamp.write_text(pkg_key)
            print(f"\nbinder env built in {time.monotonic() - t0:.0f}s: {ENV}")
        pkg_key = _package_digest()
        if not pkg_stamp.exists() or pkg_stamp.read_text() != pkg_key:
            # vtlab changed since the env was built: re-run the `.` line of binder/requirements.txt
            _run(
                [str(python), "-m", "pip", "install", "--no-deps", "--force-reinstall", "."],
                cwd=source, env=_clean_env(ENV), timeout=PIP_TIMEOUT,
            )
            pkg_stamp.write_text(pkg_key)
    return python


# Runs inside the binder venv: start a kernel from that venv, check it is that venv's
# python and that vtlab comes from its site-packages, then execute the notebook.
RUNNER = r'''
import json, os, sys, traceback
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError

path, timeout, save_to = sys.argv[1], int(sys.argv[2]), sys.argv[3]
result = {"ok": False}
probe = nbformat.v4.new_notebook()
probe.cells.append(nbformat.v4.new_code_cell(
    "import sys, json, vtlab\nprint(json.dumps([sys.prefix, vtlab.__file__]))"))
NotebookClient(probe, timeout=120, kernel_name="python3").execute()
text = "".join(o.get("text", "") for o in probe.cells[0].outputs)
result["kernel_prefix"], result["vtlab_file"] = json.loads(text.strip().splitlines()[-1])
result["runner_prefix"] = sys.prefix

nb = nbformat.read(path, as_version=4)
client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                        resources={"metadata": {"path": os.path.dirname(path)}})
current = {"index": -1}
client.on_cell_execute = lambda cell, cell_index, **_: current.update(index=cell_index)
try:
    client.execute()
    result["ok"] = True
except (CellExecutionError, CellTimeoutError, DeadKernelError) as exc:
    i = current["index"]
    result.update(cell=i, source=nb.cells[i].source if i >= 0 else "", error=f"{type(exc).__name__}: {exc}")
except Exception:
    result["error"] = traceback.format_exc()
os.makedirs(os.path.dirname(save_to), exist_ok=True)
nbformat.write(nb, save_to)
print("RESULT " + json.dumps(result))
'''


@pytest.mark.binder
def test_binder_env_has_only_the_binder_packages(binder_python):
    """The env imports the course stack and vtlab from its own site-packages."""
    code = (
        "import json, sys, vtlab, unicorn, capstone, ziglang, ipywidgets, matplotlib, pandas, nbgrader, jupytext\n"
        "from importlib.metadata import version\n"
        "print(json.dumps({'prefix': sys.prefix, 'vtlab': vtlab.__file__,"
        " 'versions': {n: version(n) for n in ['unicorn', 'jupyterlab', 'ipywidgets', 'nbgrader', 'jupytext']}}))"
    )
    out = _run([str(binder_python), "-c", code], cwd=str(ENV), env=_clean_env(ENV)).stdout
    info = json.loads(out.strip().splitlines()[-1])
    assert Path(info["prefix"]).resolve() == ENV.resolve()
    assert Path(info["vtlab"]).resolve().is_relative_to(ENV.resolve()), (
        f"vtlab imported from {info['vtlab']}, not from the binder env"
    )
    pins, _ = parse_requirements(BINDER_REQS)
    for name, got in info["versions"].items():
        assert pins.get(_norm(name)) in (None, got), f"{name} {got} installed, binder/ pins {pins.get(_norm(name))}"


@pytest.mark.binder
@pytest.mark.parametrize("path", RUN_NOTEBOOKS, ids=[p.stem for p in RUN_NOTEBOOKS])
def test_notebook_runs_in_binder_env(binder_python, path, tmp_path):
    save_to = ARTIFACTS / path.name
    proc = subprocess.run(
        [str(binder_python), "-c", RUNNER, str(path), str(CELL_TIMEOUT), str(save_to)],
        cwd=tmp_path, env=_clean_env(ENV), capture_output=True, text=True, timeout=1800,
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, f"runner crashed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    env = ENV.resolve()
    assert Path(result["kernel_prefix"]).resolve() == env, f"kernel ran {result['kernel_prefix']}, not {env}"
    assert Path(result["vtlab_file"]).resolve().is_relative_to(env), f"kernel imported vtlab from {result['vtlab_file']}"
    if not result["ok"]:
        pytest.fail(
            f"{path.name} failed in the binder env at cell {result.get('cell')}:\n"
            f"--- cell source ---\n{result.get('source', '')}\n--- error ---\n{result.get('error')}\n"
            f"(executed notebook: {save_to})",
            pytrace=False,
        )
