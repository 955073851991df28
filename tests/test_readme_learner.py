"""The README's "Learn with vtlab on your own" section says what really happens.

Its shell example is run exactly as written (the guest source is taken from the README
itself), and the import-shadowing pitfall it describes is reproduced.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")


def _learner_section() -> str:
    start = README.index("## Learn with vtlab on your own")
    return README[start:README.index("\n## ", start + 10)]


def test_cli_example_runs_as_written(tmp_path):
    section = _learner_section()
    source = re.search(r"```nasm\n(.*?)```", section, re.S).group(1)
    source = "\n".join(line.strip() for line in source.splitlines())
    (tmp_path / "hello.asm").write_text(source + "\n", encoding="utf-8")
    command = re.search(r"`\.venv/bin/python -m vtlab (run hello\.asm[^`]*)`", section).group(1)
    out = subprocess.run([sys.executable, "-m", "vtlab", *command.split()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "Hi"
    assert "--- 3 VM exits ---" in lines
    # SDM Vol. 3C, Appendix C: I/O instruction is exit reason 30, HLT 12.
    assert sum("IO_INSTRUCTION     (30)" in line for line in lines) == 2
    assert sum("HLT                (12)" in line for line in lines) == 1


def test_import_shadowing_pitfall_is_real(tmp_path):
    """A clone named vtlab/, with Python started in the folder above it."""
    (tmp_path / "vtlab").symlink_to(REPO, target_is_directory=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    code = "import vtlab; print(hasattr(vtlab, 'VirtualMachine'))"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
    assert "AttributeError: module 'vtlab' has no attribute 'VirtualMachine'" in _learner_section()
