; name: serial-poll
; mode: real
; load: 0x1000
; iterations: 32
; exits: IO_INSTRUCTION x 2 or more per character (LSR read at 3FDH, THR write at 3F8H): 2496 for 32 lines of 39 characters when the THR is always empty; HLT x 1 if HLT exiting is 1
; description: A polling serial driver, as a BIOS or early kernel console writes to
;   COM1: for every character, read the line status register (3FDH) until bit 5
;   (THR empty) is set, then write the character to the transmit holding register
;   (3F8H). Every IN and OUT is an I/O exit under "unconditional I/O exiting"; with
;   I/O bitmaps the VMM can let some ports through (clearing the bit for 3F8H halves
;   the exits) and the rest still exit.

bits 16
start:
    mov bp, 32              ; lines to print
line:
    mov si, message
next_char:
    mov bl, byte ptr [si]
    test bl, bl
    jz line_done
    mov dx, 0x3FD           ; LSR
wait_thre:
    in al, dx
    test al, 0x20           ; bit 5: transmit holding register empty
    jz wait_thre
    mov dx, 0x3F8           ; THR
    mov al, bl
    out dx, al
    inc si
    jmp next_char
line_done:
    dec bp
    jnz line
done:
    hlt
    jmp done

message:
    db "vtlab: polling COM1, 1 byte at a time", 13, 10, 0
