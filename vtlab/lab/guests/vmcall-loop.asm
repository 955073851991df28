; name: vmcall-loop
; mode: protected
; load: 0x1000
; iterations: 2000
; exits: VMCALL x 2000 (always); HLT x 1 if HLT exiting is 1
; description: A null hypercall in a loop (kvm-unit-tests x86/vmexit.c, test "vmcall").
;   VMCALL exits unconditionally in VMX non-root operation; it is how a
;   paravirtualized guest calls its hypervisor. Following KVM's convention the
;   hypercall number goes in EAX (0 here: no operation) and the result comes back
;   in EAX.
;
; The hypercall ABI lets the VMM write EAX (and KVM's passes arguments in EBX, ECX,
; EDX and ESI), so the loop counter lives in EDI.

bits 32
start:
    mov edi, 2000
again:
    xor eax, eax            ; hypercall number 0
    vmcall
    dec edi
    jnz again
done:
    hlt
    jmp done
