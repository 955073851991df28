; name: msr-loop
; mode: protected
; load: 0x1000
; iterations: 1000
; exits: MSR_READ x 1000 and MSR_WRITE x 1000 unless the MSR bitmap lets IA32_SYSENTER_ESP through; HLT x 1 if HLT exiting is 1
; description: RDMSR then WRMSR of one MSR in a loop, the pattern of kvm-unit-tests'
;   "rd_tsc_adjust_msr" / "wr_tsc_adjust_msr" (x86/vmexit.c). The MSR here is
;   IA32_SYSENTER_ESP (175H), which every VMM must virtualize: its guest value lives
;   in the VMCS guest-state area. Without "use MSR bitmaps" every RDMSR and WRMSR
;   exits; with it, only MSRs whose bit is 1 in the read or write bitmap do (KVM
;   lets the SYSENTER MSRs through). The value read is written back unchanged.
;
; RDMSR/WRMSR use ECX (MSR number) and EDX:EAX (value); the counter lives in EDI.

bits 32
start:
    mov edi, 1000
again:
    mov ecx, 0x175          ; IA32_SYSENTER_ESP
    rdmsr                   ; EDX:EAX <- MSR
    wrmsr                   ; MSR <- EDX:EAX (unchanged)
    dec edi
    jnz again
done:
    hlt
    jmp done
