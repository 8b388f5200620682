//! The device state blob of a KVM guest: vCPU registers plus the VMM's own
//! state of the guest (RAM size, dirty rate).
//!
//! Format (all integers little-endian), version 1:
//!
//! ```text
//! magic     8 bytes  "DWCPKVMS"
//! version   u16      1
//! reserved  u16      0
//! body_len  u32      bytes of body (BODY_LEN for version 1)
//! body:
//!   ram          u64   guest RAM bytes (must match the destination's)
//!   dirty_mibps  u32   rate of the guest's workload
//!   reserved     u32   0
//!   regs         18 x u64   rax rbx rcx rdx rsi rdi rsp rbp r8..r15 rip rflags
//!   sregs        8 segments (cs ds es fs gs ss tr ldt), each
//!                  base u64, limit u32, selector u16,
//!                  type present dpl db s l g avl unusable (9 x u8)
//!                2 tables (gdt idt), each base u64, limit u16
//!                cr0 cr2 cr3 cr4 cr8 efer apic_base (7 x u64)
//!                interrupt_bitmap (4 x u64)
//! checksum  8 bytes  first 8 bytes of BLAKE3(header and body)
//! ```
//!
//! That is all the guest needs: its program uses no FPU or SSE state, no
//! MSR beyond EFER (in `sregs`), no interrupts and no TSC, and the vCPU is
//! saved only when parked, after any pending I/O exit has completed, so no
//! exception or I/O is in flight.
//!
//! A blob is taken only whole: a wrong magic, an unknown version, a length
//! that disagrees, a bad checksum or a non-zero reserved field is an error.

use kvm_bindings::{kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};

/// First bytes of every blob.
pub const MAGIC: [u8; 8] = *b"DWCPKVMS";
/// The version this code writes and reads.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
const SEGMENT_LEN: usize = 8 + 4 + 2 + 9;
const DTABLE_LEN: usize = 8 + 2;
/// Bytes of a version-1 body.
pub const BODY_LEN: usize = 8 + 4 + 4 + 18 * 8 + 8 * SEGMENT_LEN + 2 * DTABLE_LEN + 7 * 8 + 4 * 8;
const CHECKSUM_LEN: usize = 8;
/// Bytes of a whole version-1 blob.
pub const BLOB_LEN: usize = HEADER_LEN + BODY_LEN + CHECKSUM_LEN;

/// What a blob carries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceState {
    /// Guest RAM bytes.
    pub ram: u64,
    /// Dirty rate of the workload, MiB/s.
    pub dirty_mibps: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
}

struct Writer(Vec<u8>);

impl Writer {
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.bytes(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.bytes(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn segment(&mut self, s: &kvm_segment) {
        self.u64(s.base);
        self.u32(s.limit);
        self.u16(s.selector);
        for b in [
            s.type_, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable,
        ] {
            self.u8(b);
        }
    }
    fn dtable(&mut self, t: &kvm_dtable) {
        self.u64(t.base);
        self.u16(t.limit);
    }
}

/// Reads fields off a slice whose length was checked beforehand; a short
/// read still fails cleanly rather than panicking.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or_else(|| "truncated body".to_string())?;
        self.0 = rest;
        Ok(*head)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, String> {
        self.take().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Result<u32, String> {
        self.take().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Result<u64, String> {
        self.take().map(u64::from_le_bytes)
    }
    fn segment(&mut self) -> Result<kvm_segment, String> {
        Ok(kvm_segment {
            base: self.u64()?,
            limit: self.u32()?,
            selector: self.u16()?,
            type_: self.u8()?,
            present: self.u8()?,
            dpl: self.u8()?,
            db: self.u8()?,
            s: self.u8()?,
            l: self.u8()?,
            g: self.u8()?,
            avl: self.u8()?,
            unusable: self.u8()?,
            padding: 0,
        })
    }
    fn dtable(&mut self) -> Result<kvm_dtable, String> {
        Ok(kvm_dtable {
            base: self.u64()?,
            limit: self.u16()?,
            padding: [0; 3],
        })
    }
}

fn checksum(covered: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut out = [0u8; CHECKSUM_LEN];
    out.copy_from_slice(&blake3::hash(covered).as_bytes()[..CHECKSUM_LEN]);
    out
}

/// Serializes `state` into a version-1 blob.
pub fn encode(state: &DeviceState) -> Vec<u8> {
    let mut w = Writer(Vec::with_capacity(BLOB_LEN));
    w.bytes(&MAGIC);
    w.u16(VERSION);
    w.u16(0);
    w.u32(BODY_LEN as u32);
    w.u64(state.ram);
    w.u32(state.dirty_mibps);
    w.u32(0);
    let r = &state.regs;
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rip, r.rflags,
    ] {
        w.u64(v);
    }
    let s = &state.sregs;
    for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss, &s.tr, &s.ldt] {
        w.segment(seg);
    }
    w.dtable(&s.gdt);
    w.dtable(&s.idt);
    for v in [s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base] {
        w.u64(v);
    }
    for v in s.interrupt_bitmap {
        w.u64(v);
    }
    let sum = checksum(&w.0);
    w.bytes(&sum);
    w.0
}

/// Parses and checks a blob; every malformed input is an `Err` with the
/// reason.
pub fn decode(blob: &[u8]) -> Result<DeviceState, String> {
    if blob.len() < HEADER_LEN + CHECKSUM_LEN {
        return Err(format!("{} bytes is shorter than a header", blob.len()));
    }
    if blob[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let mut header = Reader(&blob[8..HEADER_LEN]);
    let version = header.u16()?;
    let reserved = header.u16()?;
    let body_len = header.u32()? as usize;
    if version != VERSION {
        return Err(format!("version {version} (this build reads {VERSION})"));
    }
    if reserved != 0 {
        return Err("reserved header field is not zero".into());
    }
    if body_len != BODY_LEN {
        return Err(format!(
            "body length {body_len} (version {VERSION} has {BODY_LEN})"
        ));
    }
    if blob.len() != BLOB_LEN {
        return Err(format!(
            "{} bytes (version {VERSION} has {BLOB_LEN})",
            blob.len()
        ));
    }
    let (covered, sum) = blob.split_at(HEADER_LEN + BODY_LEN);
    if checksum(covered) != sum {
        return Err("checksum mismatch".into());
    }
    let mut r = Reader(&covered[HEADER_LEN..]);
    let ram = r.u64()?;
    let dirty_mibps = r.u32()?;
    if r.u32()? != 0 {
        return Err("reserved body field is not zero".into());
    }
    let mut g = [0u64; 18];
    for v in &mut g {
        *v = r.u64()?;
    }
    let regs = kvm_regs {
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rsp: g[6],
        rbp: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: g[16],
        rflags: g[17],
    };
    let mut segs = [kvm_segment::default(); 8];
    for s in &mut segs {
        *s = r.segment()?;
    }
    let [cs, ds, es, fs, gs, ss, tr, ldt] = segs;
    let gdt = r.dtable()?;
    let idt = r.dtable()?;
    let mut c = [0u64; 7];
    for v in &mut c {
        *v = r.u64()?;
    }
    let mut interrupt_bitmap = [0u64; 4];
    for v in &mut interrupt_bitmap {
        *v = r.u64()?;
    }
    let sregs = kvm_sregs {
        cs,
        ds,
        es,
        fs,
        gs,
        ss,
        tr,
        ldt,
        gdt,
        idt,
        cr0: c[0],
        cr2: c[1],
        cr3: c[2],
        cr4: c[3],
        cr8: c[4],
        efer: c[5],
        apic_base: c[6],
        interrupt_bitmap,
    };
    Ok(DeviceState {
        ram,
        dirty_mibps,
        regs,
        sregs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> DeviceState {
        let mut s = DeviceState {
            ram: 32 << 20,
            dirty_mibps: 30,
            ..Default::default()
        };
        s.regs.rip = 0x2040;
        s.regs.rsp = 0x1ff8;
        s.regs.rflags = 0x2;
        s.regs.r15 = u64::MAX;
        s.sregs.cs = kvm_segment {
            base: 0,
            limit: 0xffff_ffff,
            selector: 8,
            type_: 11,
            present: 1,
            db: 1,
            s: 1,
            g: 1,
            ..Default::default()
        };
        s.sregs.ss.selector = 0x10;
        s.sregs.gdt.limit = 0x17;
        s.sregs.cr0 = 0x11;
        s.sregs.interrupt_bitmap[3] = 1 << 63;
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        let blob = encode(&s);
        assert_eq!(blob.len(), BLOB_LEN);
        assert_eq!(decode(&blob).unwrap(), s);
    }

    #[test]
    fn rejects_every_truncation_and_every_flipped_byte() {
        let blob = encode(&sample());
        for n in 0..blob.len() {
            assert!(decode(&blob[..n]).is_err(), "truncated to {n}");
        }
        let mut longer = blob.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        for i in 0..blob.len() {
            let mut bad = blob.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flipped byte {i}");
        }
    }

    #[test]
    fn names_the_problem() {
        let mut blob = encode(&sample());
        blob[8] = 2;
        assert!(decode(&blob).unwrap_err().contains("version 2"));
        blob[0] = b'X';
        assert_eq!(decode(&blob).unwrap_err(), "bad magic");
    }
}
