"""Installable on every laptop: wheels on five platforms, and an honest Unicorn check.

- tools/check_wheels.py reads the right pins (offline, always);
- every runtime dependency has a wheel at its pin for Linux x86-64/aarch64, macOS
  arm64/x86-64 and Windows x86-64 (``pip download``: network heavy, so only with
  ``VTLAB_CHECK_WHEELS=1``);
- vtlab refuses, with the version it needs, a Unicorn binding without the private
  ctypes layer it drives (vtlab/cpu/_unicorn.py);
- the Python instruction counter, which every host but x86-64 Linux/macOS uses, stops an
  exit-free run on Ctrl-C (tests/test_counter.py checks its counts).
"""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "check_wheels.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("check_wheels", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_wheels"] = module  # (dataclasses look their module up by name)
    spec.loader.exec_module(module)
    return module


cw = _load_tool()


# ------------------------------------------------------------------ parsing (offline)
def test_parse_pins_reads_exact_pins_only():
    text = """\
# a comment line
unicorn==2.1.4
Keystone_Engine == 0.9.2   # inline comment
jinja2==3.1.6        # pandas' Styler
pkg[extra]==1.0 ; python_version >= "3.10"
loose>=1.0
-r other.txt
.

"""
    assert cw.parse_pins(text) == {"unicorn": "2.1.4", "keystone-engine": "0.9.2",
                                   "jinja2": "3.1.6", "pkg": "1.0"}


def test_runtime_names_come_from_pyproject_dependencies():
    text = """\
[project]
name = "x"
dependencies = [
    # a comment
    "unicorn>=2.1.3,<2.2",
    "Jinja2>=3.1.2",    # why
    "numpy; python_version >= '3.10'",
]
[project.optional-dependencies]
test = ["pytest>=8"]
"""
    assert cw.runtime_names(text) == ["unicorn", "jinja2", "numpy"]


def test_select_pairs_names_with_pins_and_reports_unpinned():
    pins = {"unicorn": "2.1.4", "pytest": "9.0.3"}
    assert cw.select(pins, ["unicorn", "tqdm"]) == (["unicorn==2.1.4"], ["tqdm"])
    assert cw.select(pins, None) == (["unicorn==2.1.4", "pytest==9.0.3"], [])


def test_the_repository_pins_every_runtime_dependency():
    pins = cw.parse_pins((REPO / "requirements.txt").read_text(encoding="utf-8"))
    names = cw.runtime_names((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    specs, unpinned = cw.select(pins, names)
    assert names and not unpinned, f"runtime dependencies without a pin in requirements.txt: {unpinned}"
    assert "pytest" not in {s.split("==")[0] for s in specs}  # test tools are not runtime


def test_table_cells_name_the_wheel():
    r = cw.Result("numpy==2.4.6", "linux-x86_64",
                  "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl")
    assert r.cell == "2.4.6 cp311 manylinux_2_27"
    assert cw.Result("tqdm==4.70.1", "win-amd64", "tqdm-4.70.1-py3-none-any.whl").cell == "4.70.1 any"
    missing = cw.Result("keystone-engine==0.9.2", "macos-arm64", None, "ERROR: No matching distribution")
    assert not missing.ok and missing.cell == "NO WHEEL"
    text = cw.table([r, cw.Result("numpy==2.4.6", "win-amd64", None)], ["linux-x86_64", "win-amd64"])
    assert text.splitlines()[0].split() == ["package", "linux-x86_64", "win-amd64"]
    assert "NO WHEEL" in text.splitlines()[2]


def test_linux_columns_cover_glibc_2_17_to_2_28():
    tags = cw.PLATFORMS["linux-aarch64"]
    assert "manylinux2014_aarch64" in tags and "manylinux_2_28_aarch64" in tags
    assert set(cw.PLATFORMS) == {"linux-x86_64", "linux-aarch64", "macos-arm64", "macos-x86_64", "win-amd64"}


# ------------------------------------------------------------------ the wheels (network)
@pytest.mark.skipif(os.environ.get("VTLAB_CHECK_WHEELS") != "1",
                    reason="downloads ~50 wheels from PyPI: set VTLAB_CHECK_WHEELS=1")
def test_every_runtime_dependency_has_a_wheel_on_every_platform():
    proc = subprocess.run([sys.executable, str(TOOL)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, f"\n{proc.stdout}\n{proc.stderr[-2000:]}"


# ------------------------------------------------------------------ the Unicorn binding
def test_installed_unicorn_binding_is_accepted():
    from vtlab.cpu import _unicorn

    assert _unicorn.binding_problem() is None


def test_binding_without_the_private_layer_is_refused_with_the_version(monkeypatch):
    from vtlab.cpu import _unicorn

    assert "lacks uclib" in _unicorn.binding_problem(module=types.SimpleNamespace())
    assert "predates" in _unicorn.binding_problem(version="2.1.2")
    monkeypatch.setattr(_unicorn, "binding_problem", lambda: "it is a fake")
    with pytest.raises(ImportError, match=r"unicorn>=2\.1\.3,<2\.2.*it is a fake"):
        _unicorn.check_binding()


def test_required_unicorn_matches_pyproject():
    from vtlab.cpu import _unicorn

    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert f'"{_unicorn.REQUIRED}"' in text, "pyproject.toml and vtlab/cpu/_unicorn.py disagree on unicorn"


# ------------------------------------------------------------------ the Python counter path
@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_stops_an_exit_free_run_on_the_python_counter(monkeypatch):
    """Python raises a pending KeyboardInterrupt as the counter's ctypes callback starts,
    where ctypes would swallow it; the counter must hand it on (vtlab/cpu/counter.py)."""
    from vtlab import VirtualMachine
    from vtlab.cpu import counter as C

    monkeypatch.setenv(C.PYTHON_COUNTER_ENV, "1")
    vm = VirtualMachine("mov ecx, 0xffffffff\nl: dec ecx\njnz l\nhlt", mode="protected")
    assert not vm.guest.counter.native
    timer = threading.Timer(0.3, lambda: os.kill(os.getpid(), signal.SIGINT))
    timer.start()
    t = time.perf_counter()
    try:
        with pytest.raises(KeyboardInterrupt):
            vm.run(max_instructions=10 ** 13, max_seconds=30)
    finally:
        timer.cancel()
    assert time.perf_counter() - t < 5, "the interrupt was lost: the run went on to its cap"
    assert vm.run(max_instructions=1000).instructions == 1000   # and the VM runs on
