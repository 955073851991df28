; name: rdtsc-loop
; mode: real
; load: 0x1000
; iterations: 2000
; exits: RDTSC x 2000 only if RDTSC exiting is 1 (none otherwise); HLT x 1 if HLT exiting is 1
; description: RDTSC in a loop. RDTSC exits only when the "RDTSC exiting" control is 1;
;   with it 0 the guest reads the time-stamp counter at native speed (plus the TSC
;   offset if "use TSC offsetting" is 1). This is the workload that shows a
;   conditional exit: the same guest costs 2000 exits or none depending on one bit.
;
; RDTSC writes EDX:EAX, so the loop counter lives in DI.

bits 16
start:
    mov di, 2000
again:
    rdtsc
    dec di
    jnz again
done:
    hlt
    jmp done
