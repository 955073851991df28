# vtlab's native basic-block hook (x86-64, Intel syntax, as LLVM's assembler reads it).
#
# This file is the *source* of the machine code that vtlab/cpu/counter.py ships as
# ``_HOOK_CODE``.  vtlab never assembles it at run time; tests/test_counter.py
# re-assembles it with LLVM (vtlab.cpu.asm_llvm, from the ziglang wheel) and checks that
# the bytes still match, so edit both together:
#
#     from vtlab.cpu import asm_llvm
#     src = ".intel_syntax noprefix\n" + open("vtlab/cpu/counter_hook.asm").read()
#     print(asm_llvm.link(asm_llvm.read_object(asm_llvm.assemble_object(src)), 0, 64).hex())
#
# (Comments start with '#': that is the comment character of LLVM's x86 assembler.)
#
# Unicorn calls the hook at the start of every guest basic block, as a C function
#
#     void hook(uc_engine *uc, uint64_t address, uint32_t size, void *user_data);
#
# In the System V AMD64 calling convention (Linux, macOS, the BSDs on x86-64) the four
# arguments arrive in registers:
#
#     rdi = uc         the engine (left untouched: uc_emu_stop needs it, see "stop")
#     rsi = address    guest address of the block's first instruction
#     edx = size       the block's length in bytes (32-bit; the upper half of rdx is junk)
#     rcx = user_data  the ctx array below
#
# rax, rcx, rdx, rsi, rdi and r8-r11 are caller-saved ("scratch"), so the hook may use
# them freely and needs no stack frame.  (Windows x64 passes arguments in rcx, rdx, r8,
# r9 instead: this code is wrong there, and vtlab does not use it there.)
#
# ctx is an array of unsigned 64-bit words (InstructionCounter._ctx, see _CTX_FIELDS):
#
#     [rcx +  0]  base            first guest address of the swept window
#     [rcx +  8]  limit           size of the window in bytes
#     [rcx + 16]  total           instructions counted so far
#     [rcx + 24]  blocks          blocks that lay inside the window
#     [rcx + 32]  outside_blocks  blocks that did not (each counts as one instruction)
#     [rcx + 40]  prefix          pointer to the prefix table, uint32 P[0..limit]:
#                                 P[x] = instruction starts in [base, base + x)
#     [rcx + 48]  outside_bytes   bytes of the blocks outside the window
#     [rcx + 56]  stop_at         the instruction budget: stop once total >= stop_at
#     [rcx + 64]  emu_stop        address of Unicorn's uc_emu_stop(uc_engine *uc)
#     [rcx + 72]  last_block      address of the block that started last
#     [rcx + 80]  last_size       its size in bytes
#
# In C, roughly:
#
#     ctx->last_block = address; ctx->last_size = size;
#     off = address - ctx->base;               /* unsigned: below base wraps to huge */
#     if (off < ctx->limit && off + size <= ctx->limit) {
#         ctx->total += P[off + size] - P[off];  ctx->blocks++;
#     } else {
#         ctx->outside_blocks++;  ctx->total++;  ctx->outside_bytes += size;
#     }
#     if (ctx->total >= ctx->stop_at) return uc_emu_stop(uc);   /* a tail call */

    # remember where this block starts and how long it is (for unretire_rest_of_block)
    mov qword ptr [rcx + 72], rsi
    mov r8d, edx                          # zero-extend size to 64 bits
    mov qword ptr [rcx + 80], r8

    # off = address - base; inside the window iff off < limit and off + size <= limit
    mov rax, rsi
    sub rax, qword ptr [rcx]
    cmp rax, qword ptr [rcx + 8]
    jae outside                           # unsigned compare: also catches address < base
    mov r8d, edx
    lea r9, [rax + r8]                    # r9 = off + size
    cmp r9, qword ptr [rcx + 8]
    ja outside

    # instructions in the block = P[off + size] - P[off] (uint32 entries)
    mov r10, qword ptr [rcx + 40]
    mov r11d, dword ptr [r10 + r9*4]
    sub r11d, dword ptr [r10 + rax*4]     # 32-bit ops clear the upper half of r11
    add qword ptr [rcx + 16], r11
    inc qword ptr [rcx + 24]

check:
    # the budget: once total reaches stop_at, stop the emulation
    mov rax, qword ptr [rcx + 16]
    cmp rax, qword ptr [rcx + 56]
    jae stop
    ret

outside:
    # not swept code: count the block as one instruction, and keep it apart
    inc qword ptr [rcx + 32]
    inc qword ptr [rcx + 16]
    mov r8d, edx
    add qword ptr [rcx + 48], r8
    jmp check

stop:
    # tail-call uc_emu_stop(uc): rdi still holds uc, and jumping (not calling) leaves
    # our return address on the stack, so uc_emu_stop returns straight to Unicorn with
    # the stack aligned exactly as it was when Unicorn called us
    mov rax, qword ptr [rcx + 64]
    jmp rax
