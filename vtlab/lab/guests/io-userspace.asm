; name: io-userspace
; mode: real
; load: 0x1000
; iterations: 500
; exits: IO_INSTRUCTION x 2500 (1 selector write + 4 data reads per iteration) routed to the user-space device; HLT x 1 if HLT exiting is 1
; description: Reads QEMU's firmware-configuration (fw_cfg) signature again and again:
;   write selector 0000H (FW_CFG_SIGNATURE) to port 510H, then read 4 bytes from the
;   data port 511H, as SeaBIOS does when it probes for fw_cfg. QEMU emulates fw_cfg
;   in user space, so under KVM every one of these accesses leaves the kernel and
;   returns to the QEMU process (KVM_EXIT_IO) before the guest can go on; vtlab's
;   VMM routes ports 510H-511H to a deliberately slow "user-space" device model for
;   the same reason. kvm-unit-tests measures this path as "inl_from_qemu".
;
; The signature bytes end up in BL, BH, CL and CH ("QEMU" on QEMU); nothing checks
; them, so the workload also runs when no fw_cfg device answers. Counter: DI.

bits 16
start:
    mov di, 500
again:
    mov dx, 0x510           ; FW_CFG_PORT_SEL
    xor ax, ax              ; FW_CFG_SIGNATURE
    out dx, ax
    inc dx                  ; 511H: FW_CFG_PORT_DATA
    in al, dx
    mov bl, al
    in al, dx
    mov bh, al
    in al, dx
    mov cl, al
    in al, dx
    mov ch, al
    dec di
    jnz again
done:
    hlt
    jmp done
