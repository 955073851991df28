; name: mov-cr3
; mode: long
; load: 0x1000
; iterations: 2000
; exits: CR_ACCESS x 2001 with CR3-load and CR3-store exiting (1 read, 2000 writes); HLT x 1 if HLT exiting is 1
; description: Reload CR3 with its own value in a loop: what an operating system does on
;   every address-space switch, and what flushes the non-global TLB entries.
;   "CR3-load exiting" makes MOV to CR3 exit unless the value is one of the
;   CR3-target values in the VMCS (SDM 26.1.3); "CR3-store exiting" makes MOV from
;   CR3 exit. Both were needed by shadow-paging VMMs; with EPT a VMM clears them
;   (if the TRUE capability MSRs allow) and this loop runs without exits.

bits 64
start:
    mov rax, cr3            ; one read (exits if CR3-store exiting)
    mov edi, 2000
again:
    mov cr3, rax            ; same page tables, TLB flushed
    dec edi
    jnz again
done:
    hlt
    jmp done
