//! The page table of a page frame: one entry per page or run of zero pages.
//!
//! Entry = tag byte, then (unless the tag says NEXT) the zig-zag varint
//! difference between the entry's page index and the expected one (the
//! previous entry's last index + 1, or 0 for the first), then the kind's
//! fields. docs/wire-format.md has the table of kinds.

use crate::{ContentHash, DecodeError, varint};

/// Most bytes one entry takes: tag, index difference, 16-byte hash.
pub(crate) const MAX_ENTRY_LEN: usize = 1 + 10 + 16;
/// Most entries one frame may have.
pub(crate) const MAX_ENTRIES: u32 = 1 << 20;

const KIND_ZERO: u8 = 0;
const KIND_RAW: u8 = 1;
const KIND_DELTA: u8 = 2;
const KIND_REF: u8 = 3;
const KIND_BASE: u8 = 4;
const KIND_MASK: u8 = 0x07;
const TAG_NEXT: u8 = 0x08;
const TAG_RUN: u8 = 0x10;
const TAG_RESERVED: u8 = 0xe0;

/// The form of one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EntryKind {
    /// `count` zero pages from the index on.
    Zero { count: u64 },
    /// The page is in the payload, whole.
    Raw,
    /// The payload holds `len` bytes of delta against content `base` (the
    /// page's latest held version; not on the wire).
    Delta { base: u64, len: u64 },
    /// The page equals held content `target` (on the wire: the distance
    /// back from this entry's own content id).
    Ref { target: u64 },
    /// The page equals the baseline page with this hash.
    Base { hash: ContentHash },
}

impl EntryKind {
    /// Whether the entry produces a content page (gets a content id).
    pub(crate) fn is_content(&self) -> bool {
        !matches!(self, EntryKind::Zero { .. })
    }
}

/// One table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) index: u64,
    pub(crate) kind: EntryKind,
}

/// Appends `e` (whose content id, if it has one, is `id`) and advances the
/// expected index.
pub(crate) fn put(out: &mut Vec<u8>, e: &Entry, expected: &mut u64, id: u64) {
    let (code, run) = match e.kind {
        EntryKind::Zero { count } => (KIND_ZERO, count >= 2),
        EntryKind::Raw => (KIND_RAW, false),
        EntryKind::Delta { .. } => (KIND_DELTA, false),
        EntryKind::Ref { .. } => (KIND_REF, false),
        EntryKind::Base { .. } => (KIND_BASE, false),
    };
    let next = e.index == *expected;
    out.push(code | if next { TAG_NEXT } else { 0 } | if run { TAG_RUN } else { 0 });
    if !next {
        varint::put(out, varint::zigzag(e.index.wrapping_sub(*expected) as i64));
    }
    match e.kind {
        EntryKind::Zero { count } => {
            if run {
                varint::put(out, count);
            }
            *expected = e.index.wrapping_add(count);
            return;
        }
        EntryKind::Raw => {}
        EntryKind::Delta { len, .. } => varint::put(out, len),
        EntryKind::Ref { target } => varint::put(out, id - target),
        EntryKind::Base { hash } => out.extend_from_slice(&hash.0),
    }
    *expected = e.index.wrapping_add(1);
}

/// Reads one entry at `*pos`. `id` is the content id the entry gets if it
/// is a content entry; `entry` numbers it in errors. Delta bases are left
/// at 0 for the caller to resolve. Checks run lengths and index overflow.
pub(crate) fn get(
    table: &[u8],
    pos: &mut usize,
    expected: &mut u64,
    id: u64,
    entry: u64,
) -> Result<Entry, DecodeError> {
    let Some(&tag) = table.get(*pos) else {
        return Err(DecodeError::Truncated {
            what: "page table",
            needed: (*pos + 1) as u64,
            available: table.len() as u64,
        });
    };
    *pos += 1;
    if tag & TAG_RESERVED != 0 {
        return Err(DecodeError::Reserved {
            field: "page table tag",
            value: u64::from(tag),
        });
    }
    let code = tag & KIND_MASK;
    if tag & TAG_RUN != 0 && code != KIND_ZERO {
        return Err(DecodeError::Reserved {
            field: "page table tag",
            value: u64::from(tag),
        });
    }
    let index = if tag & TAG_NEXT != 0 {
        *expected
    } else {
        let d = varint::get(table, pos, "page index")?;
        if d == 0 {
            // The encoder sets NEXT instead: one encoding per table.
            return Err(DecodeError::BadVarint { what: "page index" });
        }
        expected.wrapping_add(varint::unzigzag(d) as u64)
    };
    let kind = match code {
        KIND_ZERO => {
            let count = if tag & TAG_RUN != 0 {
                let c = varint::get(table, pos, "zero run")?;
                if c < 2 {
                    return Err(DecodeError::Reserved {
                        field: "zero run length",
                        value: c,
                    });
                }
                c
            } else {
                1
            };
            if index.checked_add(count - 1).is_none() {
                return Err(DecodeError::IndexOverflow { entry });
            }
            EntryKind::Zero { count }
        }
        KIND_RAW => EntryKind::Raw,
        KIND_DELTA => EntryKind::Delta {
            base: 0,
            len: varint::get(table, pos, "delta length")?,
        },
        KIND_REF => {
            let d = varint::get(table, pos, "reference")?;
            if d == 0 || d > id {
                return Err(DecodeError::UnknownReference {
                    entry,
                    content: id.wrapping_sub(d),
                });
            }
            EntryKind::Ref { target: id - d }
        }
        KIND_BASE => {
            let Some(h) = table.get(*pos..*pos + 16) else {
                return Err(DecodeError::Truncated {
                    what: "page table",
                    needed: (*pos + 16) as u64,
                    available: table.len() as u64,
                });
            };
            *pos += 16;
            let mut hash = [0u8; 16];
            hash.copy_from_slice(h);
            EntryKind::Base {
                hash: ContentHash(hash),
            }
        }
        kind => return Err(DecodeError::UnknownPageKind { entry, kind }),
    };
    let span = match kind {
        EntryKind::Zero { count } => count,
        _ => 1,
    };
    *expected = index.wrapping_add(span);
    Ok(Entry { index, kind })
}
