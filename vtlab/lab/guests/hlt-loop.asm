; name: hlt-loop
; mode: real
; load: 0x1000
; iterations: 1000
; exits: HLT x 1001 with HLT exiting and a timer to wake the vCPU (plus EXTERNAL_INTERRUPT exits for the timer); HLT x 1 without a timer; none if HLT exiting is 0
; description: An idle loop: with interrupts enabled, HLT ("wait for the next
;   interrupt") 1000 times, the way an idle kernel spends its time; then CLI; HLT,
;   the classic "halt for good". With "HLT exiting" = 1 every HLT is a VM exit and
;   the VMM decides what the idle vCPU does: with a timer to wake it
;   (vm.set_timer(n)) it resumes the guest and sees 1001 HLT exits; with nothing to
;   wake it, it stops at the first HLT. With "HLT exiting" = 0 the guest halts
;   inside VMX non-root operation and the VMM hears nothing.
;
; The timer vector (20H) points at a handler that just returns, so the workload also
; survives a VMM that delivers the timer interrupt to the guest instead of exiting.

bits 16
start:
    mov word ptr [0x20 * 4], timer_isr   ; real-mode IVT entry 20H: offset ...
    mov word ptr [0x20 * 4 + 2], 0       ; ... and segment
    mov di, 1000
    sti
again:
    hlt                     ; idle until the next interrupt
    dec di
    jnz again
    cli                     ; interrupts off: nothing can wake the next HLT
done:
    hlt
    jmp done

timer_isr:
    iret
