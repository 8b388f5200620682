//! The guest program: x86-64 code assembled at VM creation.
//!
//! The guest runs in 64-bit long mode at CPL 3 on identity-mapped page
//! tables, without interrupts (see the module docs of [`super`] for why not
//! flat 32-bit). It loops forever:
//!
//! 1. `in eax, dx` from [`BUDGET_PORT`]: the VMM answers how many page
//!    writes the guest may do now (it sleeps in the VMM when there are none,
//!    so an idle guest costs no CPU); the guest counts the request (ticks);
//! 2. that many times: picks a random entry of the page table (a random
//!    non-zero working-set page and its class) and either rewrites the whole
//!    page or one 64-byte piece at a random 64-byte offset (half each), with
//!    new content of the page's class, then counts the write.
//!
//! New text content is copied from random byte offsets of the text pool: a
//! whole page is one 4 KiB window (copies of shorter chunks from several
//! offsets compress worse than text: 16 x 256 bytes gave 1.5x where whole
//! text pages give 2.1x, a 4 KiB window about 1.95x), a piece 64 bytes; then
//! the write counter (8 bytes) is stamped at a random 8-byte slot of the
//! page or piece, and a whole page also gets a random word at a random
//! 4-byte slot, so no two text pages are byte copies of each other. New
//! random content comes straight from the generator (xorshift64*, period
//! 2^64 - 1), so it never repeats.
//!
//! Registers: `rsp` is the stack (in the control page), `r15` holds the
//! control page's address; everything else is scratch. Subroutines: `rng`
//! returns the next random word in `rax` and keeps every other register;
//! `below` takes `n` in `rcx` and returns a value uniform in `0..n` in
//! `rax` (clobbers `rdx`).

use iced_x86::IcedError;
use iced_x86::code_asm::*;

use super::layout::{
    BUDGET_PORT, CONTROL_GPA, CTL_BATCH_LEFT, CTL_POOL_GPA, CTL_POOL_SPAN, CTL_RNG, CTL_TABLE_GPA,
    CTL_TABLE_LEN, CTL_TICKS, CTL_WRITES, PROGRAM_GPA, PROGRAM_MAX, STACK_TOP,
};
use crate::hv::{HvError, HvResult, PAGE_SIZE};

/// Multiplier of xorshift64* (Vigna, "An experimental exploration of
/// Marsaglia's xorshift generators, scrambled").
const XORSHIFT64_STAR: u64 = 0x2545_f491_4f6c_dd1d;

/// Assembles the program for address [`PROGRAM_GPA`].
pub fn assemble() -> HvResult<Vec<u8>> {
    let code = build()
        .and_then(|mut a| a.assemble(PROGRAM_GPA))
        .map_err(|e| HvError::new("assembling the guest program", e))?;
    if code.len() > PROGRAM_MAX {
        return Err(HvError::new(
            "assembling the guest program",
            format!("{} bytes is more than {PROGRAM_MAX}", code.len()),
        ));
    }
    Ok(code)
}

/// A control-page field, addressed through `r15`.
fn ctl(field: u32) -> AsmMemoryOperand {
    r15 + field
}

fn build() -> Result<CodeAssembler, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut rng = a.create_label();
    let mut below = a.create_label();
    let mut write_one = a.create_label();
    let mut main_loop = a.create_label();
    let mut batch = a.create_label();

    // --- entry ---
    a.mov(rsp, u64::from(STACK_TOP))?;
    a.mov(r15, CONTROL_GPA)?;
    a.cld()?; // string ops go up

    // --- main loop: ask for a budget, do that many writes ---
    a.set_label(&mut main_loop)?;
    a.mov(dx, u32::from(BUDGET_PORT))?;
    a.in_(eax, dx)?; // eax = writes allowed now
    a.inc(qword_ptr(ctl(CTL_TICKS)))?;
    a.test(eax, eax)?;
    a.jz(main_loop)?; // no budget: ask again (the VMM waited)
    a.mov(dword_ptr(ctl(CTL_BATCH_LEFT)), eax)?;
    a.set_label(&mut batch)?;
    a.call(write_one)?;
    a.dec(dword_ptr(ctl(CTL_BATCH_LEFT)))?;
    a.jnz(batch)?;
    a.jmp(main_loop)?;

    // --- write_one: one page write; clobbers everything but rsp, r15 ---
    let mut piece = a.create_label();
    let mut page_random = a.create_label();
    let mut page_random_word = a.create_label();
    let mut piece_random = a.create_label();
    let mut piece_random_word = a.create_label();
    let mut done = a.create_label();

    a.set_label(&mut write_one)?;
    a.mov(ecx, dword_ptr(ctl(CTL_TABLE_LEN)))?;
    a.call(below)?; // rax = random table index
    a.mov(esi, dword_ptr(ctl(CTL_TABLE_GPA)))?;
    a.mov(ebx, dword_ptr(rsi + rax * 4))?; // ebx = page address | random bit
    a.mov(edi, ebx)?;
    a.and(edi, !(PAGE_SIZE as i32 - 1))?; // rdi = page address
    a.call(rng)?;
    a.test(rax, rax)?;
    a.js(piece)?; // half the writes (top bit set): one 64-byte piece

    // Whole page.
    a.test(bl, 1)?;
    a.jnz(page_random)?;
    // Text page: a 4 KiB window at a random pool offset.
    a.mov(ecx, dword_ptr(ctl(CTL_POOL_SPAN)))?;
    a.call(below)?; // rax = pool offset
    a.mov(esi, dword_ptr(ctl(CTL_POOL_GPA)))?;
    a.add(rsi, rax)?;
    a.mov(ecx, (PAGE_SIZE / 8) as u32)?;
    a.rep().movsq()?; // copy; rdi advances
    a.sub(rdi, PAGE_SIZE as i32)?;
    // The write counter at a random 8-byte slot...
    a.mov(ecx, (PAGE_SIZE / 8) as u32)?;
    a.call(below)?;
    a.mov(rdx, qword_ptr(ctl(CTL_WRITES)))?;
    a.mov(qword_ptr(rdi + rax * 8), rdx)?;
    // ...and a random word at a random 4-byte slot.
    a.mov(ecx, (PAGE_SIZE / 4) as u32)?;
    a.call(below)?;
    a.lea(rbx, qword_ptr(rdi + rax * 4))?;
    a.call(rng)?;
    a.mov(dword_ptr(rbx), eax)?;
    a.jmp(done)?;

    // Random page: 512 fresh random words.
    a.set_label(&mut page_random)?;
    a.mov(ebp, (PAGE_SIZE / 8) as u32)?;
    a.set_label(&mut page_random_word)?;
    a.call(rng)?;
    a.stosq()?;
    a.dec(ebp)?;
    a.jnz(page_random_word)?;
    a.jmp(done)?;

    // One 64-byte piece at a random 64-byte offset.
    a.set_label(&mut piece)?;
    a.mov(ecx, (PAGE_SIZE / 64) as u32)?;
    a.call(below)?;
    a.shl(eax, 6)?;
    a.add(rdi, rax)?; // rdi = piece address
    a.test(bl, 1)?;
    a.jnz(piece_random)?;
    // Text piece: 64 bytes from a random pool offset, then the counter.
    a.mov(ecx, dword_ptr(ctl(CTL_POOL_SPAN)))?;
    a.call(below)?;
    a.mov(esi, dword_ptr(ctl(CTL_POOL_GPA)))?;
    a.add(rsi, rax)?;
    a.mov(ecx, 8u32)?;
    a.rep().movsq()?;
    a.sub(rdi, 64)?;
    a.mov(ecx, 8u32)?;
    a.call(below)?;
    a.mov(rdx, qword_ptr(ctl(CTL_WRITES)))?;
    a.mov(qword_ptr(rdi + rax * 8), rdx)?;
    a.jmp(done)?;
    // Random piece: 8 fresh random words.
    a.set_label(&mut piece_random)?;
    a.mov(ebp, 8u32)?;
    a.set_label(&mut piece_random_word)?;
    a.call(rng)?;
    a.stosq()?;
    a.dec(ebp)?;
    a.jnz(piece_random_word)?;

    a.set_label(&mut done)?;
    a.inc(qword_ptr(ctl(CTL_WRITES)))?;
    a.ret()?;

    // --- below: rax = uniform in 0..rcx (Lemire: high half of rng * n) ---
    a.set_label(&mut below)?;
    a.call(rng)?;
    a.mul(rcx)?; // rdx:rax = rax * rcx
    a.mov(rax, rdx)?;
    a.ret()?;

    // --- rng: xorshift64*, state in the control page ---
    a.set_label(&mut rng)?;
    a.push(rdx)?;
    a.mov(rax, qword_ptr(ctl(CTL_RNG)))?;
    a.mov(rdx, rax)?;
    a.shr(rdx, 12)?;
    a.xor(rax, rdx)?; // x ^= x >> 12
    a.mov(rdx, rax)?;
    a.shl(rdx, 25)?;
    a.xor(rax, rdx)?; // x ^= x << 25
    a.mov(rdx, rax)?;
    a.shr(rdx, 27)?;
    a.xor(rax, rdx)?; // x ^= x >> 27
    a.mov(qword_ptr(ctl(CTL_RNG)), rax)?;
    a.mov(rdx, XORSHIFT64_STAR)?;
    a.imul_2(rax, rdx)?; // output: x * M
    a.pop(rdx)?;
    a.ret()?;

    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_assembles_and_fits() {
        let code = assemble().unwrap();
        assert!(!code.is_empty() && code.len() <= PROGRAM_MAX);
        // Starts with `mov rsp, imm` (REX.W + 0xbc, or 0x48 0xc7 0xc4).
        assert_eq!(code[0], 0x48);
    }
}
