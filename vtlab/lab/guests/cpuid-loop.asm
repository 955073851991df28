; name: cpuid-loop
; mode: real
; load: 0x1000
; iterations: 2000
; exits: CPUID x 2000 (always); HLT x 1 if HLT exiting is 1
; description: CPUID leaf 0 in a tight loop, the classic "null exit" microbenchmark
;   (kvm-unit-tests x86/vmexit.c, test "cpuid"). CPUID exits unconditionally in VMX
;   non-root operation, so every iteration costs one VM exit, the VMM's CPUID handler
;   and one VM entry, whatever the controls say.
;
; CPUID overwrites EAX, EBX, ECX and EDX, so the loop counter lives in DI.

bits 16
start:
    mov di, 2000
again:
    xor eax, eax            ; leaf 0: highest leaf and vendor string
    xor ecx, ecx
    cpuid
    dec di
    jnz again
done:
    hlt                     ; end of the workload
    jmp done                ; if something wakes the vCPU, halt again
