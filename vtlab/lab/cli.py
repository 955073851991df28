"""``python -m vtlab``: run a guest in VMX non-root operation from the command line.

    python -m vtlab run GUEST [--mode real|protected|paged|long] [--load ADDR] [--raw | --asm]
                              [--reg NAME=VALUE ...] [--control NAME=0|1 ...] [--json]
    python -m vtlab demo

GUEST is assembly source (UTF-8 text, Intel syntax) or raw machine code.  ``.bin``,
``.img`` and ``.com`` files are raw code, ``.asm``, ``.s`` and ``.nasm`` files assembly;
any other file is assembly if it is UTF-8 text and raw code if it is not (a note on
stderr says so).  ``--raw`` / ``--asm`` decide instead.  Controls are named as
in the SDM / Linux (``HLT_EXITING``, ``UNCOND_IO_EXITING``, ``ENABLE_EPT`` ...), optionally
qualified by their class (``ProcBased.HLT_EXITING``).  The exit status is 0 when the guest
halted or shut down, 1 for a VM-entry failure, a crash or an exhausted budget, 2 for bad
command-line input.
"""
from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path

from ..arch.controls import EntryControl, ExitControl, PinBased, ProcBased, ProcBased2
from ..errors import AssemblyError, VtlabError
from ..vmm.machine import VirtualMachine, VmState

_CLASSES = {"PinBased": PinBased, "ProcBased": ProcBased, "ProcBased2": ProcBased2,
            "ExitControl": ExitControl, "EntryControl": EntryControl}

DEMO = """\
; vtlab demo: print a greeting on COM1 (polling the line-status register), then halt.
    mov si, msg
next:
    mov dx, 0x3fd        ; LSR
wait:
    in al, dx
    test al, 0x20        ; THRE: transmit holding register empty?
    jz wait
    mov dx, 0x3f8        ; THR
    mov al, [si]
    test al, al
    jz done
    out dx, al
    inc si
    jmp next
done:
    hlt
msg: db "Hello from VMX non-root operation!", 10, 0
"""


def parse_control(text: str):
    """``HLT_EXITING=0`` or ``ProcBased.HLT_EXITING=1`` -> (flag, bool)."""
    name, sep, value = text.partition("=")
    if not sep or value not in ("0", "1"):
        raise ValueError(f"--control wants NAME=0 or NAME=1, not {text!r}")
    cls_name, dot, flag = name.rpartition(".")
    classes = [_CLASSES[cls_name]] if dot else list(_CLASSES.values())
    if dot and cls_name not in _CLASSES:
        raise ValueError(f"unknown control class {cls_name!r} (one of {', '.join(_CLASSES)})")
    matches = [cls[flag.upper()] for cls in classes if flag.upper() in cls.__members__]
    if not matches:
        raise ValueError(f"unknown control {name!r}")
    if len(matches) > 1:
        raise ValueError(f"control {name!r} is ambiguous: qualify it, e.g. "
                         + " or ".join(f"{type(m).__name__}.{m.name}" for m in matches))
    return matches[0], value == "1"


def parse_reg(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--reg wants NAME=VALUE, not {text!r}")
    try:
        number = int(value.strip().replace("_", ""), 0)
    except ValueError:
        raise ValueError(f"--reg {name.strip()}: {value.strip() or '(empty)'!r} is not a number "
                         "(write it as 0x3F8 or 1016)") from None
    return name.strip().lower(), number


#: File name endings that say what a guest file holds (compared in lower case).
RAW_SUFFIXES = frozenset({".bin", ".img", ".com"})
ASM_SUFFIXES = frozenset({".asm", ".s", ".nasm", ".inc"})
# Text never holds these: a "text" file with any of them is machine code that happens to
# decode as UTF-8 (``6A 00 58``, push 0 / pop ax, is all ASCII, NUL included).
_BINARY_CONTROLS = frozenset(range(0x20)) - {0x09, 0x0A, 0x0C, 0x0D}


def read_guest(path: Path, kind: str = "auto") -> tuple[str | bytes, str | None]:
    """The guest in ``path`` as assembly text (str) or raw code (bytes), and a note.

    ``kind`` is "asm", "raw" or "auto" (by file name ending, then by content).  The note
    is None unless auto-detection had to look at the content; it then says what the
    file was taken for and how to say otherwise.  Raises ValueError when a file that
    must be assembly is not UTF-8 text.
    """
    data = path.read_bytes()
    suffix = path.suffix.lower()
    if kind == "raw" or (kind == "auto" and suffix in RAW_SUFFIXES):
        return data, None
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # (Windows editors)
    try:
        text = data[skip:].decode("utf-8")
        looks_binary = any(ord(ch) in _BINARY_CONTROLS for ch in text)
    except UnicodeDecodeError as exc:
        text, looks_binary = None, True
        at = skip + exc.start
        bad = f"byte {data[at]:#04x} at offset {at} is not UTF-8"
    else:
        bad = "it holds control characters that text never does"
    if not looks_binary:
        return text, None
    if kind == "asm" or suffix in ASM_SUFFIXES:
        raise ValueError(f"{path} is not assembly source: {bad}.  If it is raw machine "
                         "code, pass --raw (or name it .bin, .img or .com)")
    return data, (f"{path.name} is not UTF-8 assembly text ({bad}): running it as raw "
                  "machine code (pass --raw to say so, or --asm if it is assembly)")


def _exit_status(state: VmState) -> int:
    return 0 if state in (VmState.HALTED, VmState.SHUTDOWN, VmState.STOPPED) else 1


def run_guest(program, mode: str, load: int | None, regs: list[tuple[str, int]], controls,
              as_json: bool, max_exits: int, max_instructions: int, show_exits: int = 40) -> int:
    vm = VirtualMachine(program, mode=mode, load=load)
    for flag, on in controls:
        vm.set_control(flag, on)
    for name, value in regs:
        vm.regs[name] = value
        if name in ("rip", "eip", "ip", "rsp", "esp", "sp", "rflags", "eflags"):
            from ..arch.vmcs_fields import VmcsField as F
            field = {"rip": F.GUEST_RIP, "eip": F.GUEST_RIP, "ip": F.GUEST_RIP, "rsp": F.GUEST_RSP,
                     "esp": F.GUEST_RSP, "sp": F.GUEST_RSP, "rflags": F.GUEST_RFLAGS,
                     "eflags": F.GUEST_RFLAGS}[name]
            vm.vmwrite(field, value)
    try:
        summary = vm.run(max_exits=max_exits, max_instructions=max_instructions)
    except VtlabError as exc:
        summary = vm.summary()
        summary.message = str(exc)
    exits = [{"reason": e.reason, "reason_number": e.reason_number, "qualification": e.qualification,
              "instruction_length": e.instruction_length, "guest_rip": e.guest_rip}
             for e in vm.trace.exits]
    # A long run's trace keeps only its last events (vtlab.vmm.trace): number the kept
    # exits by their place among all exits, so the list always ends at N of "N VM exits".
    total = vm.trace.exits_total
    first = total - len(exits) + 1
    if as_json:
        print(json.dumps({"output": vm.output, "exits": exits, "exits_total": total,
                          "state": vm.state.value, "message": vm.message}))
    else:
        if vm.output:
            print(vm.output, end="" if vm.output.endswith("\n") else "\n")
        kept = "" if first == 1 else f" (the trace kept the last {len(exits)}: {first} to {total})"
        print(f"--- {total} VM exits{kept} ---")
        numbered = list(enumerate(vm.trace.exits, start=first))
        if len(numbered) > show_exits:  # the first ones and the last few tell the story
            numbered = numbered[:show_exits - 5] + [None] + numbered[-5:]
        for item in numbered:
            if item is None:
                print(f"  ... {len(exits) - show_exits} more (--show-exits N to see more)")
                continue
            number, e = item
            text = f" '{e.instruction}'" if e.instruction else ""
            print(f"{number:5d}  {e.reason:<18} ({e.reason_number:2d})  rip={e.guest_rip:#x}{text}"
                  f"  qual={e.qualification:#x}  len={e.instruction_length}")
        if exits:
            counts = ", ".join(f"{reason} {n}" for reason, n in vm.trace.counts().items())
            print(f"--- exits by reason: {counts}")
        print(f"--- {summary}")
    return _exit_status(vm.state)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vtlab", description="Run x86 guests under vtlab's VT-x model.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run an assembly or raw-code guest in VMX non-root operation")
    run.add_argument("guest", type=Path, help="assembly source (.asm, UTF-8 text) or raw machine code "
                     "(.bin, .img, .com, or any file that is not UTF-8 text)")
    kind = run.add_mutually_exclusive_group()
    kind.add_argument("--raw", dest="kind", action="store_const", const="raw", default="auto",
                      help="GUEST is raw machine code, whatever its name")
    kind.add_argument("--asm", dest="kind", action="store_const", const="asm",
                      help="GUEST is assembly source, whatever its name")
    run.add_argument("--mode", default="real", choices=["real", "protected", "paged", "long"])
    run.add_argument("--load", type=lambda s: int(s, 0), default=None, help="load address (default 0x1000)")
    run.add_argument("--reg", action="append", default=[], help="NAME=VALUE, e.g. --reg rax=5")
    run.add_argument("--control", action="append", default=[], help="NAME=0|1, e.g. --control HLT_EXITING=0")
    run.add_argument("--json", action="store_true", help="print one JSON object")
    run.add_argument("--max-exits", type=int, default=100_000)
    run.add_argument("--max-instructions", type=int, default=50_000_000)
    run.add_argument("--show-exits", type=int, default=40, help="list at most this many exits")
    demo = sub.add_parser("demo", help="run the built-in greeting guest")
    demo.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return run_guest(DEMO, "real", None, [], [], args.json, 10_000, 1_000_000)
        if not args.guest.is_file():
            raise ValueError(f"no such guest file: {args.guest}")
        program, note = read_guest(args.guest, args.kind)
        if note:
            print(f"vtlab: note: {note}", file=sys.stderr)
        controls = [parse_control(c) for c in args.control]
        regs = [parse_reg(r) for r in args.reg]
        try:
            return run_guest(program, args.mode, args.load, regs, controls, args.json,
                             args.max_exits, args.max_instructions, max(args.show_exits, 6))
        except AssemblyError as exc:
            if args.kind == "auto" and args.guest.suffix.lower() not in ASM_SUFFIXES:
                # text in a file whose name does not say "assembly": maybe it is raw code
                raise ValueError(f"{exc}\n(vtlab read {args.guest.name} as assembly because it is "
                                 "UTF-8 text; if it is raw machine code, pass --raw)") from None
            raise
    except (ValueError, VtlabError) as exc:
        print(f"vtlab: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `python -m vtlab run x.asm | head`: the reader has gone
        sys.stderr.close()    # (and Python's own report of the closed pipe with it)
        return 0
