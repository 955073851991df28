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
    proc = vtlab_cli("run", str(hello_asm), "--control", "TPR_SHADOW=1")
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


# ------------------------------------------------------------------ the exit list: 1..N
def _numbers(stdout: str) -> list[int]:
    """The numbers in front of the listed exits."""
    return [int(line.split()[0]) for line in stdout.splitlines() if line[:5].strip().isdigit()]


def test_exit_list_is_numbered_1_to_n(hello_asm):
    proc = vtlab_cli("run", str(hello_asm))
    assert "--- 3 VM exits ---" in proc.stdout
    assert _numbers(proc.stdout) == [1, 2, 3]


def test_a_capped_trace_numbers_exits_among_all_of_them(tmp_path, capsys, monkeypatch):
    """A long run keeps only the last events: the list still ends at N, and says so."""
    from vtlab.lab import cli

    class SmallTraceVM(cli.VirtualMachine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.trace.max_events = 10   # trimmed once the log reaches 1,034 events

    monkeypatch.setattr(cli, "VirtualMachine", SmallTraceVM)
    src = "mov esi, 2000\nl: mov eax, 1\ncpuid\ndec esi\njnz l\nhlt\n"
    assert cli.run_guest(src, "protected", None, [], [], False, 10_000, 1_000_000, show_exits=8) == 0
    out = capsys.readouterr().out
    headline = next(line for line in out.splitlines() if "VM exits" in line and line.startswith("---"))
    assert headline.startswith("--- 2001 VM exits (the trace kept the last ")
    numbers = _numbers(out)
    assert numbers[-1] == 2001 and numbers == sorted(numbers) and numbers[0] > 1


# ------------------------------------------------------------------ raw code vs assembly
HELLO_E9 = bytes.fromhex("b041" "e6e9" "f4")   # mov al, 'A' / out 0xe9, al / hlt


def cli_main(capsys, *args: str) -> tuple[int, str, str]:
    """``python -m vtlab ARGS`` in this process (cheaper than a subprocess): status, out, err."""
    from vtlab.lab.cli import main

    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_file_that_is_not_utf8_runs_as_raw_code_with_a_note(tmp_path):
    """Not UTF-8 text, under a name that says nothing: raw code (no codec error), and a note."""
    path = tmp_path / "guest.dat"
    path.write_bytes(HELLO_E9)
    proc = vtlab_cli("run", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "A"
    assert "raw machine code" in proc.stderr and "--raw" in proc.stderr
    assert "Traceback" not in proc.stderr and "codec" not in proc.stderr


@pytest.mark.parametrize("name", ["guest.img", "guest.com", "GUEST.BIN"])
def test_raw_guest_by_file_name(tmp_path, capsys, name):
    path = tmp_path / name
    path.write_bytes(HELLO_E9)
    status, out, err = cli_main(capsys, "run", str(path), "--json")
    data = json.loads(out)
    assert status == 0 and data["output"] == "A" and err == ""   # no note: the name said it
    assert [e["reason_number"] for e in data["exits"]] == [IO_INSTRUCTION, HLT]


def test_asm_file_that_is_not_text_says_what_it_needs(tmp_path, capsys):
    path = tmp_path / "guest.asm"
    path.write_bytes(HELLO_E9)
    status, _, err = cli_main(capsys, "run", str(path))
    assert status == 2
    assert "not assembly source" in err and "--raw" in err
    status, out, _ = cli_main(capsys, "run", str(path), "--raw", "--json")   # ... and --raw runs it
    assert status == 0 and json.loads(out)["output"] == "A"


def test_asm_flag_reads_a_bin_named_file_as_source(tmp_path, capsys):
    path = tmp_path / "hello.bin"
    path.write_text(HELLO)
    status, out, _ = cli_main(capsys, "run", str(path), "--asm", "--json")
    assert status == 0 and json.loads(out)["output"] == "hi"


def test_text_that_does_not_assemble_hints_at_raw(tmp_path, capsys):
    path = tmp_path / "guest.dat"
    path.write_text("this is not x86\n")
    status, _, err = cli_main(capsys, "run", str(path))
    assert status == 2
    assert "line 1" in err and "--raw" in err


def test_read_guest_decides_by_name_then_content(tmp_path):
    from vtlab.lab.cli import read_guest

    def guest(name: str, data: bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(data)
        return path

    assert read_guest(guest("a.asm", b"\xef\xbb\xbfhlt\r\n")) == ("hlt\r\n", None)  # BOM, CRLF
    assert read_guest(guest("a.txt", "mov al, 'é'\n".encode())) == ("mov al, 'é'\n", None)
    code, note = read_guest(guest("a.raw", b"jA\x00X"))   # ASCII, but a NUL: not text
    assert code == b"jA\x00X" and "control characters" in note
    assert read_guest(guest("b.asm", HELLO_E9), "raw") == (HELLO_E9, None)
    with pytest.raises(ValueError, match="offset 0"):
        read_guest(guest("c.bin", HELLO_E9), "asm")
