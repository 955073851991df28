; name: io-vmm
; mode: real
; load: 0x1000
; iterations: 2000
; exits: IO_INSTRUCTION x 2000 with unconditional I/O exiting or port 80H set in I/O bitmap A; HLT x 1 if HLT exiting is 1
; description: OUT to the POST-code port 80H in a loop: port I/O to a device the VMM
;   emulates itself (the analogue of kvm-unit-tests' "outl_to_kernel", whose port
;   KVM emulates in the kernel). Each OUT is one I/O exit handled without leaving
;   the VMM; compare with io-userspace, which sends every access to a slow
;   "user-space" device model.
;
; Linux uses writes to port 80H as a short I/O delay, so this pattern is real.

bits 16
start:
    mov di, 2000
again:
    mov ax, di
    out 0x80, al            ; POST code = low byte of the counter
    dec di
    jnz again
done:
    hlt
    jmp done
