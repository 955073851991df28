"""One VMM, two vendors: the same guests under VT-x and AMD-V give the same output, and
their exits correspond one to one (CPUID <-> 72h, IO_INSTRUCTION <-> IOIO 7Bh, MSR_READ /
MSR_WRITE <-> MSR 7Ch with EXITINFO1 0 / 1, HLT <-> 78h, VMCALL <-> #UD 46h, which the
SVM VMM serves as a hypercall as KVM does on AMD).

The guests: the workloads of notebook 04 (vtlab/lab/guests/*.asm), the first guests of
notebooks 02-03 (CPUID + HLT in real mode; a boot sector at 7C00h printing over COM1), and
a freestanding guest compiled from C with ``zig cc`` that polls the UART, prints and halts.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from vtlab.lab import guests
from vtlab.arch.svm import VmcbSave
from vtlab.vmm.exit_record import ExitKind, from_svm, from_vmx
from vtlab.vmm.vendors import SvmVendorVm, VmxVendorVm

#: VT-x basic exit reason (SDM Vol. 3C, Appendix C) -> AMD-V EXITCODE (APM Vol. 2, Appendix C),
#: typed from the manuals.
CORRESPONDING = {10: 0x72, 30: 0x7B, 31: 0x7C, 32: 0x7C, 12: 0x78, 18: 0x46}


def _both(source, mode, load=None, **run):
    out = []
    for cls in (VmxVendorVm, SvmVendorVm):
        vm = cls(source, mode=mode, load=load)
        summary = vm.run(**run)
        out.append((vm, summary))
    return out


def _assert_correspond(vmx, svm):
    assert vmx.output == svm.output
    assert vmx.state == svm.state
    assert len(vmx.exits) == len(svm.exits)
    for a, b in zip(vmx.exits, svm.exits):
        assert (a.kind, a.payload, a.guest_rip) == (b.kind, b.payload, b.guest_rip), (a, b)
        assert CORRESPONDING[a.native_code] == b.native_code, (a.native_name, b.native_name)


@pytest.mark.parametrize("name", ["cpuid-loop", "io-vmm", "io-userspace", "msr-loop", "serial-poll",
                                  "vmcall-loop", "hlt-loop", "syscall-heavy", "mov-cr3"])
def test_notebook_04_workloads_under_both_vendors(name):
    info = guests.info(name)
    (vmx, s1), (svm, s2) = _both(guests.source(name), info.mode, info.load, max_exits=20_000)
    assert s1.state.value == "halted", s1.message
    _assert_correspond(vmx, svm)
    assert len(vmx.exits) >= 1


def test_notebook_02_cpuid_guest_and_hidden_virtualization_bits():
    src = ("mov eax, 1\ncpuid\nmov esi, ecx\nmov eax, 0x80000001\ncpuid\nmov edi, ecx\n"
           "mov eax, 0x40000000\ncpuid\nhlt")
    (vmx, _), (svm, _) = _both(src, "real")
    _assert_correspond(vmx, svm)
    for vm in (vmx, svm):
        assert not vm.regs.esi & (1 << 5)        # CPUID.1:ECX.VMX hidden (SDM Vol. 3C 24.6)
        assert vm.regs.esi & (1 << 31)           # hypervisor present
        assert not vm.regs.edi & (1 << 2)        # CPUID.8000_0001h:ECX.SVM hidden (APM Vol. 2, 15.4)
        assert vm.regs.ebx.to_bytes(4, "little") == b"vtla"   # the vendor leaf 4000_0000h


def test_svm_host_is_amd_and_vmx_host_is_intel():
    (vmx, _), (svm, _) = _both("xor eax, eax\ncpuid\nhlt", "real")
    sig = lambda vm: b"".join(vm.regs[r].to_bytes(4, "little") for r in ("ebx", "edx", "ecx"))
    assert sig(vmx) == b"GenuineIntel" and sig(svm) == b"AuthenticAMD"


BOOT_SECTOR = """
    mov si, msg
next:
    mov al, [si]
    test al, al
    jz done
    mov dx, 0x3f8
    out dx, al
    inc si
    jmp next
done:
    mov eax, 4
    mov ebx, 20
    mov ecx, 22
    vmcall
    hlt
msg: db "boot", 10, 0
"""


def test_boot_sector_at_7c00_under_both_vendors():
    (vmx, _), (svm, _) = _both(BOOT_SECTOR, "real", 0x7C00)
    _assert_correspond(vmx, svm)
    assert vmx.output == "boot\n"
    assert vmx.regs.rax == svm.regs.rax == 42    # the ADD hypercall's result came back in RAX


def test_msr_interception_and_injected_gp_under_both():
    src = "mov ecx, 0x12345678\nrdmsr\nhlt"        # unknown MSR: the VMM injects #GP(0)
    for cls in (VmxVendorVm, SvmVendorVm):
        vm = cls(src, mode="protected")
        vm.run(max_exits=5)
        assert vm.exits[0].kind is ExitKind.MSR_READ and vm.exits[0].payload.msr == 0x12345678


def test_svm_iopm_lets_all_but_the_serial_port_through():
    src = "mov dx, 0x80\nout dx, al\nmov dx, 0x3f8\nmov al, 'x'\nout dx, al\nhlt"
    vm = SvmVendorVm(src, mode="real")
    vm.set_io_intercept(range(0, 0x10000), False)
    vm.set_io_intercept([0x3F8])
    vm.run()
    assert [x.kind for x in vm.exits] == [ExitKind.IO, ExitKind.HLT]
    assert vm.exits[0].native.exitinfo1 >> 16 == 0x3F8 and vm.output == "x"


def test_exit_records_decode_the_vendors_formats():
    (vmx, _), (svm, _) = _both("mov dx, 0x3f8\nmov al, 'A'\nout dx, al\nhlt", "real")
    a, b = vmx.exits[0], svm.exits[0]
    assert a.native.qualification == 0x03F8_0000        # SDM Table 28-5: port 31:16, OUT (bit 3 = 0), DX (bit 6 = 0), size-1 = 0
    assert b.native.exitinfo1 == 0x03F8_0090            # APM 15.10.2: port 31:16, A16 bit 7, SZ8 bit 4
    assert from_vmx(a.native).payload == from_svm(b.native).payload


# ---------------------------------------------------------------- a guest from C
HELLO_C = r"""
static inline void outb(unsigned short port, unsigned char v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port)); }
static inline unsigned char inb(unsigned short port) { unsigned char v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port)); return v; }
void _start(void) {
    const char *s = "hello from C\n";
    for (; *s; s++) { while (!(inb(0x3fd) & 0x20)) {} outb(0x3f8, *s); }
    for (;;) __asm__ volatile("hlt");
}
"""
LINKER_SCRIPT = ("ENTRY(_start)\nSECTIONS { . = 0x1000; .text : { *(.text._start) *(.text*) } "
                 ".rodata : { *(.rodata*) } .data : { *(.data*) } .bss : { *(.bss*) } "
                 "/DISCARD/ : { *(.eh_frame*) *(.comment) } }\n")


def _compile_c(tmp: Path) -> bytes:
    try:
        import ziglang
    except ImportError:
        pytest.skip("ziglang is not installed: no C compiler for the freestanding guest")
    zig = Path(ziglang.__file__).parent / ("zig.exe" if os.name == "nt" else "zig")
    (tmp / "hello.c").write_text(HELLO_C)
    (tmp / "link.ld").write_text(LINKER_SCRIPT)
    env = dict(os.environ, ZIG_GLOBAL_CACHE_DIR=str(tmp / "zig-cache"), ZIG_LOCAL_CACHE_DIR=str(tmp / "zig-cache"))
    cc = [str(zig), "cc", "-target", "x86-freestanding-none", "-O2", "-ffreestanding", "-fno-pic",
          "-fno-asynchronous-unwind-tables", "-fno-unwind-tables", "-nostdlib", "-T", str(tmp / "link.ld"),
          "-o", str(tmp / "hello.elf"), str(tmp / "hello.c")]
    done = subprocess.run(cc, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode:
        pytest.skip(f"zig cc could not build the freestanding guest: {done.stderr[-300:]}")
    subprocess.run([str(zig), "objcopy", "-O", "binary", str(tmp / "hello.elf"), str(tmp / "hello.bin")],
                   check=True, env=env, timeout=120)
    return (tmp / "hello.bin").read_bytes()


def test_freestanding_c_guest_under_both_vendors(tmp_path):
    code = _compile_c(tmp_path)
    (vmx, s1), (svm, s2) = _both(code, "protected")
    assert vmx.output == "hello from C\n"
    _assert_correspond(vmx, svm)
    kinds = [x.kind for x in svm.exits]
    assert kinds.count(ExitKind.IO) == 26 and kinds[-1] is ExitKind.HLT   # LSR read + THR write per char


def test_a_crash_corresponds_too():
    """An unknown MSR: both VMMs inject #GP(0); with no IDT the guest shuts down - a
    triple fault (reason 2) under VT-x, a SHUTDOWN intercept (7Fh) under AMD-V."""
    (vmx, s1), (svm, s2) = _both("mov ecx, 0x12345678\nrdmsr\nhlt", "protected", max_exits=5)
    assert s1.state.value == s2.state.value == "crashed"
    assert [x.native_code for x in vmx.exits] == [31, 2]
    assert [x.native_code for x in svm.exits] == [0x7C, 0x7F]
    assert [x.kind for x in vmx.exits] == [x.kind for x in svm.exits] == [ExitKind.MSR_READ, ExitKind.SHUTDOWN]


def test_a_learners_svm_handler_reads_exitinfo1():
    """Porting a VT-x I/O handler to SVM: the port is EXITINFO1[31:16] (APM Vol. 2,
    15.10.2), not the qualification's; the next RIP is EXITINFO2."""
    vm = SvmVendorVm("mov dx, 0xe9\nmov al, 'Z'\nout dx, al\nhlt", mode="real")
    seen = []

    def my_ioio(vm, e):
        seen.append(e.exitinfo1 >> 16)
        vm.vmcb.put(VmcbSave.RIP, e.exitinfo2)
        return True

    vm.svm_handlers[0x7B] = my_ioio
    vm.run()
    assert seen == [0xE9] and vm.output == ""               # the handler swallowed the byte


def test_a_handler_that_raises_stops_the_vm_with_a_clear_error():
    from vtlab.errors import HandlerError

    vm = SvmVendorVm("cpuid\nhlt", mode="real")
    vm.handlers[ExitKind.CPUID] = lambda vm, x: 1 / 0
    with pytest.raises(HandlerError, match=r"CPUID, EXITCODE 0x72.*ZeroDivisionError"):
        vm.run()
    assert vm.state.value == "error"


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_every_start_mode_under_both_vendors(mode):
    src = "mov dx, 0x3f8\nmov al, 0x4c\nout dx, al\nmov ecx, 0x175\nrdmsr\nwrmsr\nmov eax, 1\ncpuid\nhlt"
    (vmx, s1), (svm, _) = _both(src, mode, max_exits=20)
    assert s1.state.value == "halted" and vmx.output == "L"
    _assert_correspond(vmx, svm)
