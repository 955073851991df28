"""Bad input a learner can type gets a message in vtlab's terms, never Python's own
("'smm' is not a valid Mode", "invalid literal for int() with base 0")."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vtlab.cpu import Guest
from vtlab.vmm.machine import VirtualMachine


@pytest.mark.parametrize("make", [Guest, lambda m: VirtualMachine("hlt", mode=m)])
def test_an_unknown_mode_lists_the_modes(make):
    with pytest.raises(ValueError) as err:
        make("smm")
    text = str(err.value)
    assert "is not a valid Mode" not in text
    assert "'real', 'protected', 'paged', 'long'" in text
    assert "system-management mode is not modelled" in text


def test_a_mode_in_capitals_is_accepted():
    assert Guest("LONG").mode.value == "long"


def test_cli_reg_with_a_bad_number(tmp_path):
    (tmp_path / "g.asm").write_text("hlt\n")
    out = subprocess.run([sys.executable, "-m", "vtlab", "run", "g.asm", "--reg", "rax=zz"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "--reg rax: 'zz' is not a number" in out.stderr
    assert "invalid literal" not in out.stderr
