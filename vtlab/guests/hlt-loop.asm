; name: hlt-loop
; mode: real
; load: 0x1000
; iterations: 1000
; exits: HLT x 1 per HLT reached if HLT exiting is 1; without it the vCPU enters the HLT activity state at the first HLT
; description: An idle loop: HLT ("wait for the next interrupt") over and over, the
;   way an idle kernel spends its time. With "HLT exiting" = 1 each HLT is a VM exit
;   and the VMM decides what the idle vCPU does: a VMM that resumes it (as if a
;   timer interrupt were due) sees 1000 HLT exits; one that stops on the first HLT
;   (as KVM does when it returns KVM_EXIT_HLT to user space) sees one. With
;   "HLT exiting" = 0 the guest halts inside VMX non-root operation and nothing
;   reaches the VMM until an interrupt arrives.

bits 16
start:
    mov di, 1000
again:
    hlt                     ; idle until the next interrupt
    dec di
    jnz again
done:
    hlt
    jmp done
