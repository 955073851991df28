; name: syscall-heavy
; mode: protected
; load: 0x1000
; iterations: 4096
; exits: IO_INSTRUCTION x 8 (one log byte every 512 calls) if port E9H exits; HLT x 1 if HLT exiting is 1; the 4096 "system calls" cause none
; description: A ring-0 "kernel" serving 4096 system calls: each call enters a handler
;   that saves the flags, disables interrupts (CLI), reads CR0, updates a counter,
;   re-enables interrupts (STI) and returns. Under VT-x none of this exits: the
;   guest kernel runs in ring 0 of VMX non-root operation, CLI/STI/PUSHF/POPF are
;   not exit conditions and MOV from CR0 is served from the CR0 read shadow. This
;   is the workload on which binary translation and paravirtualization paid the
;   most and VT-x pays almost nothing. Every 512 calls the kernel logs one byte to
;   the debug port E9H: the only exits.
;
; A real system call would enter through INT 80H or SYSENTER from ring 3; vtlab's
; VMM does not deliver guest interrupts yet, so the "user" loop CALLs the handler
; directly. With VT-x that changes nothing: neither path causes a VM exit.

bits 32
start:
    mov edi, 4096
again:
    mov eax, 20             ; system-call number (getpid on Linux i386)
    call syscall_entry
    test edi, 511
    jnz next
    mov al, 0x2E            ; '.' to the debug port every 512 calls
    out 0xE9, al
next:
    dec edi
    jnz again
done:
    hlt
    jmp done

syscall_entry:              ; the "kernel": privileged instructions, no exits
    pushfd
    cli
    mov edx, cr0            ; e.g. check CR0.TS; read through the read shadow
    inc dword ptr [syscall_count]
    mov eax, dword ptr [syscall_count]
    sti
    popfd
    ret

syscall_count:
    dd 0
