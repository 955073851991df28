"""``python -m vtlab`` (vtlab/lab/cli.py), run as a subprocess exactly as a learner types it.

Exit reasons and qualifications are written out from the Intel SDM (Vol. 3C Appendix C,
Table 28-5): HLT = 12, I/O instruction = 30, ``out dx, al`` to 3F8H = 0x03F80000.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import vtlab

HLT, IO_INSTRUCTION, CPUID, TRIPLE_FAULT, INVALID_STATE = 12, 30, 10, 2, 33
OUT_DX_AL_3F8 = 0x03F8_0000

HELLO = """\
; print "hi" on COM1 and halt
    mov dx, 0x3f8
    mov al, 'h'
    out dx, al          ; 1005H
    mov al, 'i'
    out dx, al          ; 1008H
    hlt                 ; 1009H
"""


def vtlab_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vtlab", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)


def run_json(*args: str) -> tuple[dict, int]:
    proc = vtlab_cli("run", *args, "--json")
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout), proc.returncode


@pytest.fixture
def hello_asm(tmp_path: Path) -> Path:
    path = tmp_path / "hello.asm"
    path.write_text(HELLO)
    return path


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_run_asm_prints_output_exits_and_summary(hello_asm):
    proc = vtlab_cli("run", str(hello_asm))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "hi"
    assert "3 VM exits" in proc.stdout
    assert "IO_INSTRUCTION" in proc.stdout and "HLT" in proc.stdout
    assert "0x3f80000" in proc.stdout
    assert "halted" in lines[-1]


def test_run_json_schema(hello_asm):
    data, status = run_json(str(hello_asm))
    assert status == 0
    assert {"output", "exits", "state"} <= set(data)
    assert data["output"] == "hi"
    assert data["state"] == "halted"
    assert data["exits"] == [
        {"reason": "IO_INSTRUCTION", "reason_number": IO_INSTRUCTION, "qualification": OUT_DX_AL_3F8,
         "instruction_length": 1, "guest_rip": 0x1005},
        {"reason": "IO_INSTRUCTION", "reason_number": IO_INSTRUCTION, "qualification": OUT_DX_AL_3F8,
         "instruction_length": 1, "guest_rip": 0x1008},
        {"reason": "HLT", "reason_number": HLT, "qualification": 0, "instruction_length": 1,
         "guest_rip": 0x1009},
    ]


def test_run_bin(tmp_path):
    code = vtlab.assemble(HELLO, 0x1000, 16)
    path = tmp_path / "hello.bin"
    path.write_bytes(code)
    data, status = run_json(str(path))
    assert status == 0
    assert data["output"] == "hi"
    assert [e["reason_number"] for e in data["exits"]] == [IO_INSTRUCTION, IO_INSTRUCTION, HLT]
    assert data["exits"][-1]["guest_rip"] == 0x1009


def test_run_bin_at_a_load_address(tmp_path):
    """A boot sector: assembled for 7C00H, loaded there with --load."""
    path = tmp_path / "boot.bin"
    path.write_bytes(vtlab.assemble(HELLO, 0x7C00, 16))
    data, status = run_json(str(path), "--load", "0x7c00")
    assert status == 0 and data["output"] == "hi"
    assert data["exits"][-1]["guest_rip"] == 0x7C09


def test_mode_long(tmp_path):
    path = write(tmp_path, "long.asm",
                 "mov rax, 0x1122334455667748\nmov dx, 0xe9\nout dx, al\ncpuid\nhlt\n")
    data, status = run_json(str(path), "--mode", "long")
    assert status == 0
    assert data["output"] == "H"       # AL = 48H
    # out dx, al: port E9H; CPUID exits unconditionally (reason 10)
    assert [(e["reason_number"], e["qualification"]) for e in data["exits"]] == [
        (IO_INSTRUCTION, 0x00E9_0000), (CPUID, 0), (HLT, 0)]
    assert data["exits"][0]["guest_rip"] == 0x1000 + 10 + 4   # after MOV RAX, imm64 and MOV DX


def test_reg_sets_guest_registers(tmp_path):
    path = write(tmp_path, "reg.asm", "mov dx, 0x3f8\nout dx, al\nmov al, bl\nout dx, al\nhlt\n")
    data, status = run_json(str(path), "--reg", "rax=0x41", "--reg", "RBX=66")
    assert status == 0
    assert data["output"] == "AB"


def test_reg_rip_starts_elsewhere(tmp_path):
    path = write(tmp_path, "rip.asm", "mov al, 'x'\nout 0xe9, al\nhlt\nmov al, 'y'\nout 0xe9, al\nhlt\n")
    data, status = run_json(str(path), "--reg", "rip=0x1005")
    assert status == 0
    assert data["output"] == "y"


def test_control_hlt_exiting_off(hello_asm):
    data, status = run_json(str(hello_asm), "--control", "HLT_EXITING=0")
    assert status == 0
    assert data["output"] == "hi"
    assert [e["reason"] for e in data["exits"]] == ["IO_INSTRUCTION", "IO_INSTRUCTION"]
    assert data["state"] == "halted"


def test_control_io_exiting_off_and_qualified_names(hello_asm):
    data, status = run_json(str(hello_asm), "--control", "ProcBased.UNCOND_IO_EXITING=0")
    assert status == 0
    assert data["output"] == "hi"          # the device still sees the bytes ...
    assert [e["reason"] for e in data["exits"]] == ["HLT"]   # ... without any I/O exit


def test_control_that_the_cpu_forbids_fails_entry(hello_asm):
    proc = vtlab_cli("run", str(hello_asm), "--control", "USE_TSC_OFFSETTING=1")
    assert proc.returncode != 0
    assert "error 7" in proc.stdout or "VM-instruction error 7" in proc.stdout


def test_vm_entry_failure_is_a_nonzero_exit_status(tmp_path):
    path = write(tmp_path, "ok.asm", "hlt\n")
    data, status = run_json(str(path), "--reg", "rflags=0")   # RFLAGS bit 1 must be 1
    assert status != 0
    assert data["state"] == "entry-failed"
    assert data["exits"][0]["reason_number"] == INVALID_STATE


def test_crash_is_a_nonzero_exit_status(tmp_path):
    path = write(tmp_path, "ud.asm", "ud2\n")                 # empty IDT: triple fault
    data, status = run_json(str(path), "--mode", "long")
    assert status != 0
    assert data["state"] == "crashed"
    assert [e["reason_number"] for e in data["exits"]] == [TRIPLE_FAULT]


def test_budget_overrun_is_a_nonzero_exit_status(tmp_path):
    path = write(tmp_path, "loop.asm", "spin: jmp spin\n")
    data, status = run_json(str(path), "--max-instructions", "20000")
    assert status != 0
    assert data["state"] == "budget"
    assert data["exits"] == []


def test_bad_assembly_is_status_2_with_the_line(tmp_path):
    path = write(tmp_path, "bad.asm", "mov ax, 1\nmov bx, 2\nfrobnicate cx\nhlt\n")
    proc = vtlab_cli("run", str(path))
    assert proc.returncode == 2
    assert "line 3" in proc.stderr and "frobnicate" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [
    ["--control", "NO_SUCH_CONTROL=1"],
    ["--control", "HLT_EXITING=2"],
    ["--reg", "rax"],
])
def test_bad_options_are_status_2(hello_asm, args):
    proc = vtlab_cli("run", str(hello_asm), *args)
    assert proc.returncode == 2
    assert "vtlab: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_guest_file_is_status_2(tmp_path):
    proc = vtlab_cli("run", str(tmp_path / "nope.asm"))
    assert proc.returncode == 2
    assert "nope.asm" in proc.stderr


def test_demo_prints_the_greeting():
    proc = vtlab_cli("demo")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "Hello from VMX non-root operation!"
    assert "halted" in proc.stdout


def test_demo_json():
    proc = vtlab_cli("demo", "--json")
    data = json.loads(proc.stdout)
    assert data["output"] == "Hello from VMX non-root operation!\n"
    assert data["state"] == "halted"
    assert data["exits"][-1]["reason_number"] == HLT
