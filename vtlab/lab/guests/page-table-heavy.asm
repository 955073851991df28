; name: page-table-heavy
; mode: long
; load: 0x1000
; iterations: 1024
; exits: INVLPG x 1025 if INVLPG exiting is 1; CR_ACCESS x 1 (CR3 read) + 64 (CR3 loads) with CR3-store/-load exiting; HLT x 1 if HLT exiting is 1
; description: A kernel remapping a window over and over, as kmap or a page-cache
;   scan does. The guest walks its own page tables from CR3 down to the page
;   directory, then 1024 times: points the 2-MiB page directory entry for linear
;   20000000H at physical 0 (alternately writable and read-only), invalidates the
;   stale translation with INVLPG, reads through the window and checks that it
;   sees physical memory, and every 16th time reloads CR3 (a full TLB flush).
;   A shadow-paging VMM must trap INVLPG and CR3 loads (and write-protect the
;   guest's page tables) to keep its shadow tables right; with EPT none of this
;   needs to exit.
;
; Registers: RBX = address of the PDE, RSI = the window, R12 = CR3, R13 = 1000H,
; EDI = counter. A wrong translation ends in UD2 (#UD) instead of HLT.

bits 64
start:
    mov rax, cr3            ; exits once if CR3-store exiting
    mov r12, rax
    mov rcx, 0x000FFFFFFFFFF000  ; physical-address bits of a paging entry
    and rax, rcx
    mov rbx, qword ptr [rax]     ; PML4[0] -> page-directory-pointer table
    and rbx, rcx
    mov rbx, qword ptr [rbx]     ; PDPT[0] -> page directory
    and rbx, rcx
    add rbx, 256 * 8             ; PDE for linear 20000000H (512 MiB)
    mov rsi, 0x20000000          ; the window
    mov r13, 0x1000              ; the same physical bytes, through the identity map
    mov edi, 1024
again:
    mov eax, 0x87                ; 2-MiB page at physical 0: P | RW | U/S | PS
    test edi, 1
    jz map
    mov eax, 0x85                ; the same, read-only: P | U/S | PS
map:
    mov qword ptr [rbx], rax
    invlpg [rsi]                 ; drop the stale translation (exits if INVLPG exiting)
    mov ecx, dword ptr [rsi + 0x1000]
    cmp ecx, dword ptr [r13]     ; the window must show physical 1000H now
    jne broken
    test edi, 15
    jnz next
    mov cr3, r12                 ; full flush every 16th time (exits if CR3-load exiting)
next:
    dec edi
    jnz again
    mov rax, 0x20000087          ; put the identity mapping back
    mov qword ptr [rbx], rax
    invlpg [rsi]
done:
    hlt
    jmp done
broken:
    ud2
