"""Guest workloads: small x86 programs that make a virtual machine exit (or not).

Each workload is an ``.asm`` file in this directory (Intel syntax, assembled by
:func:`vtlab.asm.assemble`).  Most mirror a classic VM-exit microbenchmark - the tests
in kvm-unit-tests' ``x86/vmexit.c`` (cpuid, vmcall, MSR, port I/O to the kernel and to
QEMU) - and a few are mixed workloads (a syscall-heavy kernel, a polling serial driver,
a page-table-heavy kernel).  Every one loops a fixed number of times and ends with HLT,
so it can be run under any VM-execution controls and the exit counts compared.

Each file starts with a header block of ``; key: value`` lines::

    ; name: cpuid-loop
    ; mode: real                 (real, protected or long: the mode it starts in)
    ; load: 0x1000               (guest-physical load address = entry point)
    ; iterations: 2000
    ; exits: CPUID x 2000 ...    (what exits, under which controls)
    ; description: ...           (continued on indented ``;`` lines)

The header ends at the first empty ``;`` line or the first line of code.

>>> from vtlab import guests
>>> "cpuid-loop" in guests.names()
True
>>> guests.info("cpuid-loop").mode
'real'
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = ["WorkloadInfo", "GUESTS_DIR", "MODE_BITS", "names", "source", "info", "all_info",
           "assemble", "make_vm"]

#: The directory that holds the ``.asm`` files.
GUESTS_DIR: Path = Path(__file__).resolve().parent

#: Default code size of each start mode (the ``bits`` for :func:`vtlab.asm.assemble`).
MODE_BITS: dict[str, int] = {"real": 16, "protected": 32, "paged": 32, "long": 64}

_KEY = re.compile(r"^;\s*([A-Za-z][\w-]*)\s*:\s*(.*)$")


@dataclass(frozen=True)
class WorkloadInfo:
    """What a workload's header says about it.

    Attributes:
        name: the workload's name (also its file name without ``.asm``).
        mode: the CPU mode it starts in: ``"real"``, ``"protected"`` or ``"long"``.
        load: guest-physical address where the code is loaded and starts.
        description: what it does and why it exits (plain English).
        path: the ``.asm`` file.
        iterations: how many times its main loop runs (``None`` if not stated).
        exits: which exits to expect under which controls (plain English).
        extra: any other ``; key: value`` lines of the header.
    """

    name: str
    mode: str
    load: int
    description: str
    path: Path
    iterations: int | None = None
    exits: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def bits(self) -> int:
        """Code size for the assembler: 16, 32 or 64."""
        return MODE_BITS[self.mode]


def _path(name: str) -> Path:
    path = GUESTS_DIR / f"{name}.asm"
    if not path.is_file():
        raise KeyError(f"no workload named {name!r}; known workloads: {', '.join(names())}")
    return path


def names() -> list[str]:
    """The names of all workloads, sorted."""
    return sorted(p.stem for p in GUESTS_DIR.glob("*.asm"))


def source(name: str) -> str:
    """The assembly source of workload ``name`` (header comments included)."""
    return _path(name).read_text(encoding="utf-8")


def parse_header(text: str) -> dict[str, str]:
    """The ``; key: value`` lines at the top of ``text`` (continuation lines joined)."""
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith(";"):
            break
        body = stripped[1:]
        if not body.strip():           # an empty ";" line ends the header
            break
        m = _KEY.match(stripped)
        # "; key: value" starts a field; an indented ";   more" continues the last one
        if m and not body.startswith("  "):
            last = m.group(1).lower()
            fields[last] = m.group(2).strip()
        elif last is not None:
            fields[last] = (fields[last] + " " + body.strip()).strip()
    return fields


@lru_cache(maxsize=None)
def _info(name: str, mtime: float) -> WorkloadInfo:
    path = _path(name)
    fields = parse_header(path.read_text(encoding="utf-8"))
    missing = [k for k in ("name", "mode", "load", "description") if k not in fields]
    if missing:
        raise ValueError(f"{path.name}: header lacks {', '.join(missing)}")
    if fields["name"] != name:
        raise ValueError(f"{path.name}: header says name {fields['name']!r}")
    mode = fields["mode"].lower()
    if mode not in MODE_BITS:
        raise ValueError(f"{path.name}: mode must be one of {sorted(MODE_BITS)}, not {mode!r}")
    iterations = fields.get("iterations")
    known = {"name", "mode", "load", "description", "iterations", "exits"}
    return WorkloadInfo(
        name=name,
        mode=mode,
        load=int(fields["load"], 0),
        description=fields["description"],
        path=path,
        iterations=int(iterations, 0) if iterations else None,
        exits=fields.get("exits", ""),
        extra={k: v for k, v in fields.items() if k not in known},
    )


def info(name: str) -> WorkloadInfo:
    """Parse the header of workload ``name`` into a :class:`WorkloadInfo`."""
    path = _path(name)
    return _info(name, path.stat().st_mtime)


def all_info() -> list[WorkloadInfo]:
    """:class:`WorkloadInfo` for every workload, in :func:`names` order."""
    return [info(n) for n in names()]


def assemble(name: str) -> bytes:
    """Assemble workload ``name`` for its own mode and load address."""
    from ...cpu.asm import assemble as _assemble

    wi = info(name)
    return _assemble(source(name), wi.load, wi.bits)


def make_vm(name: str, **kwargs):
    """A :class:`vtlab.VirtualMachine` with workload ``name`` loaded in its own mode.

    Keyword arguments go to ``VirtualMachine``.  Set controls on the result and call
    ``run()``::

        vm = guests.make_vm("cpuid-loop")
        vm.set_control(ProcBased.HLT_EXITING, True)
        vm.run()
    """
    from ...vmm.machine import VirtualMachine

    wi = info(name)
    return VirtualMachine(source(name), mode=wi.mode, load=wi.load, **kwargs)
