"""CPUID facts the course uses (SDM Vol. 2A, CPUID; Linux's hypervisor-leaf convention).

``HOST_CPUID`` is the processor vtlab pretends to be: a recent Intel core with VMX.
"""
from __future__ import annotations

#: CPUID.1:ECX bit 5 - VMX (SDM Vol. 3C 24.6 "Discovering Support for VMX").
CPUID_1_ECX_VMX = 1 << 5
#: CPUID.1:ECX bit 31 - reserved by Intel for hypervisors to say "a hypervisor is present".
CPUID_1_ECX_HYPERVISOR = 1 << 31
#: CPUID.1:ECX bit 27 - OSXSAVE: "the OS has set CR4.OSXSAVE[bit 18] to enable XSETBV/
#: XGETBV" (SDM Vol. 2A, CPUID, Table 3-10).  It follows CR4, so it is not a constant of
#: the processor: whoever answers CPUID fills it in from the CR4 the software sees.
CPUID_1_ECX_OSXSAVE = 1 << 27
#: CPUID.(EAX=07H,ECX=0):ECX bit 2 - UMIP, user-mode instruction prevention (SDM Vol. 2A,
#: CPUID, Table 3-8): CR4.UMIP (bit 11) may be set.
CPUID_7_ECX_UMIP = 1 << 2
#: First hypervisor leaf: EAX = highest hypervisor leaf, EBX:ECX:EDX = vendor signature.
HYPERVISOR_BASE_LEAF = 0x4000_0000


def _sig(text: str) -> tuple[int, int, int]:
    raw = text.encode().ljust(12, b"\0")
    return tuple(int.from_bytes(raw[i:i + 4], "little") for i in (0, 4, 8))  # type: ignore[return-value]


_GENUINE = _sig("GenuineIntel")

#: (EAX, EBX, ECX, EDX) per leaf of the host CPU.  Leaf 0's vendor string is split
#: EBX:EDX:ECX ("Genu" "ineI" "ntel"), as on every Intel processor.
HOST_CPUID: dict[int, tuple[int, int, int, int]] = {
    0x0: (0x16, _GENUINE[0], _GENUINE[2], _GENUINE[1]),
    # Leaf 1 ECX: OSXSAVE is left 0 here and set from CR4.OSXSAVE by the answering code.
    0x1: (0x000906EA, 0x00100800, 0x7FFAFBFF & ~(CPUID_1_ECX_HYPERVISOR | CPUID_1_ECX_OSXSAVE), 0xBFEBFBFF),
    # Leaf 7 ECX: UMIP (as Intel cores since Ice Lake report it) and bit 30.
    0x7: (0, 0x029C6FBF, 0x40000000 | CPUID_7_ECX_UMIP, 0xBC000400),
    0x8000_0000: (0x8000_0008, 0, 0, 0),
    0x8000_0001: (0, 0, 0x121, 0x2C100800),
    0x8000_0008: (0x3027, 0, 0, 0),
}


def vendor_signature(text: str) -> tuple[int, int, int]:
    """A 12-character vendor string as (EBX, ECX, EDX), the order hypervisor leaves use."""
    return _sig(text)
