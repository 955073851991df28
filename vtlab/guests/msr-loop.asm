; name: msr-loop
; mode: protected
; load: 0x1000
; iterations: 1000
; exits: MSR_READ x 1000 and MSR_WRITE x 1000 unless the MSR bitmap lets IA32_TSC_ADJUST through; HLT x 1 if HLT exiting is 1
; description: RDMSR then WRMSR of IA32_TSC_ADJUST (MSR 3BH), as kvm-unit-tests
;   x86/vmexit.c does in "rd_tsc_adjust_msr" / "wr_tsc_adjust_msr". Without "use MSR
;   bitmaps" every RDMSR and WRMSR exits; with it, only the MSRs whose bit is 1 in
;   the read or write bitmap do. The value read is written back unchanged.
;
; RDMSR/WRMSR use ECX (MSR number) and EDX:EAX (value); the counter lives in EDI.

bits 32
start:
    mov edi, 1000
again:
    mov ecx, 0x3B           ; IA32_TSC_ADJUST
    rdmsr                   ; EDX:EAX <- MSR
    wrmsr                   ; MSR <- EDX:EAX (unchanged)
    dec edi
    jnz again
done:
    hlt
    jmp done
