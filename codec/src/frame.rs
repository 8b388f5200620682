//! The frame envelope shared by page frames and chunk frames: a fixed
//! 40-byte header, a table, a payload and a 32-byte BLAKE3 checksum (which
//! a page frame carried by a verifying container leaves out:
//! [`FLAG_UNCHECKED`]).
//! docs/wire-format.md documents it byte by byte.

use crate::{Compression, DecodeError};

/// The four magic bytes that open every frame.
pub const MAGIC: [u8; 4] = *b"HDE\x1f";
/// The format version this crate writes.
pub const VERSION: u8 = 2;
/// The oldest format version this crate reads (page frames; chunk frames
/// need [`CHUNK_MIN_VERSION`]).
pub const MIN_VERSION: u8 = 1;
/// The oldest version of a chunk frame this crate reads: version 2 made
/// the chunk checksum cover the decoded bytes through their BLAKE3 digest
/// (see [`chunk_checksum`]).
pub const CHUNK_MIN_VERSION: u8 = 2;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 40;
/// Length of the trailing checksum.
pub const CHECKSUM_LEN: usize = 32;
/// Flag: the checksum is keyed BLAKE3 with the session key.
pub const FLAG_KEYED: u16 = 1;
/// Flag (page frames only, never with [`FLAG_KEYED`]): the frame has no
/// checksum, because its container verifies it end to end before it is
/// decoded (as the AMST transport verifies every region against its
/// keyed digest). A decoder refuses such a frame unless its owner said
/// that its frames come from such a container
/// ([`Decoder::accept_unchecked`](crate::Decoder::accept_unchecked)).
pub const FLAG_UNCHECKED: u16 = 2;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A batch of pages with a page table.
    Pages = 1,
    /// A chunk of bytes (file or stream data).
    Chunk = 2,
}

impl FrameKind {
    fn from_wire(v: u8) -> Option<FrameKind> {
        match v {
            1 => Some(FrameKind::Pages),
            2 => Some(FrameKind::Chunk),
            _ => None,
        }
    }

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            FrameKind::Pages => "pages",
            FrameKind::Chunk => "chunk",
        }
    }
}

/// The decoded fixed header of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Format version.
    pub version: u8,
    /// Pages or chunk.
    pub kind: FrameKind,
    /// Payload compression.
    pub compression: Compression,
    /// log2 of the page size (pages frames), 0 for chunks.
    pub page_shift: u8,
    /// Flags ([`FLAG_KEYED`]).
    pub flags: u16,
    /// Table entries (pages frames), 0 for chunks.
    pub entries: u32,
    /// Bytes of table.
    pub table_len: u32,
    /// Bytes of payload as carried.
    pub payload_len: u32,
    /// Bytes of payload once decompressed.
    pub raw_len: u32,
    /// Pages frames: the encoder's page-frame sequence number. Chunks: the
    /// caller's sequence number, returned by the decoder.
    pub seq: u64,
}

impl FrameHeader {
    /// Total frame length this header declares.
    pub fn frame_len(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.table_len)
            + u64::from(self.payload_len)
            + self.checksum_len() as u64
    }

    /// Whether the frame carries no checksum ([`FLAG_UNCHECKED`]).
    pub fn unchecked(&self) -> bool {
        self.flags & FLAG_UNCHECKED != 0
    }

    /// Bytes of checksum at the frame's end: [`CHECKSUM_LEN`], or 0 for an
    /// unchecked frame.
    pub fn checksum_len(&self) -> usize {
        if self.unchecked() { 0 } else { CHECKSUM_LEN }
    }

    /// Writes the header into `out[..HEADER_LEN]`.
    pub(crate) fn write(&self, out: &mut [u8]) {
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = self.version;
        out[5] = self.kind as u8;
        out[6] = self.compression as u8;
        out[7] = self.page_shift;
        out[8..10].copy_from_slice(&self.flags.to_le_bytes());
        out[10..12].fill(0);
        out[12..16].copy_from_slice(&self.entries.to_le_bytes());
        out[16..20].copy_from_slice(&self.table_len.to_le_bytes());
        out[20..24].copy_from_slice(&self.payload_len.to_le_bytes());
        out[24..28].copy_from_slice(&self.raw_len.to_le_bytes());
        out[28..36].copy_from_slice(&self.seq.to_le_bytes());
        out[36..40].fill(0);
    }

    /// Parses and checks the header at the start of `frame`: magic,
    /// version, kind, compression, reserved bits, and that `frame` is exactly
    /// as long as the header declares.
    pub fn parse(frame: &[u8]) -> Result<FrameHeader, DecodeError> {
        let h = FrameHeader::peek(frame)?;
        let want = h.frame_len();
        if frame.len() as u64 != want {
            return Err(if (frame.len() as u64) < want {
                DecodeError::Truncated {
                    what: "frame",
                    needed: want,
                    available: frame.len() as u64,
                }
            } else {
                DecodeError::TrailingBytes {
                    what: "frame",
                    extra: frame.len() as u64 - want,
                }
            });
        }
        Ok(h)
    }

    /// Parses and checks the fixed header at the start of `bytes` (at least
    /// [`HEADER_LEN`] long) without looking at what follows it: what a reader
    /// needs to learn how many bytes the frame has ([`FrameHeader::frame_len`]).
    pub fn peek(bytes: &[u8]) -> Result<FrameHeader, DecodeError> {
        if bytes.len() >= 4 && bytes[..4] != MAGIC {
            return Err(DecodeError::BadMagic {
                found: [bytes[0], bytes[1], bytes[2], bytes[3]],
            });
        }
        let Some(frame) = bytes.get(..HEADER_LEN) else {
            return Err(DecodeError::Truncated {
                what: "frame header",
                needed: HEADER_LEN as u64,
                available: bytes.len() as u64,
            });
        };
        let u16_at = |o: usize| u16::from_le_bytes([frame[o], frame[o + 1]]);
        let u32_at =
            |o: usize| u32::from_le_bytes([frame[o], frame[o + 1], frame[o + 2], frame[o + 3]]);
        let version = frame[4];
        if !(MIN_VERSION..=VERSION).contains(&version) {
            return Err(DecodeError::UnsupportedVersion {
                found: version,
                min: MIN_VERSION,
                max: VERSION,
            });
        }
        let kind = FrameKind::from_wire(frame[5]).ok_or(DecodeError::UnknownFrameKind(frame[5]))?;
        let compression =
            Compression::from_wire(frame[6]).ok_or(DecodeError::UnknownCompression(frame[6]))?;
        let flags = u16_at(8);
        // Unchecked frames are page frames with no key to check with.
        let unchecked_ok = kind == FrameKind::Pages && flags & FLAG_KEYED == 0;
        if flags & !(FLAG_KEYED | FLAG_UNCHECKED) != 0
            || (flags & FLAG_UNCHECKED != 0 && !unchecked_ok)
        {
            return Err(DecodeError::Reserved {
                field: "flags",
                value: u64::from(flags),
            });
        }
        if u16_at(10) != 0 || u32_at(36) != 0 {
            return Err(DecodeError::Reserved {
                field: "reserved header bytes",
                value: u64::from(u16_at(10)) | (u64::from(u32_at(36)) << 16),
            });
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&frame[28..36]);
        let h = FrameHeader {
            version,
            kind,
            compression,
            page_shift: frame[7],
            flags,
            entries: u32_at(12),
            table_len: u32_at(16),
            payload_len: u32_at(20),
            raw_len: u32_at(24),
            seq: u64::from_le_bytes(seq),
        };
        if kind == FrameKind::Chunk && (h.page_shift != 0 || h.entries != 0 || h.table_len != 0) {
            return Err(DecodeError::Reserved {
                field: "chunk frame page fields",
                value: u64::from(h.page_shift) | (u64::from(h.entries) << 8),
            });
        }
        if compression == Compression::Stored && h.payload_len != h.raw_len {
            return Err(DecodeError::LengthMismatch {
                what: "stored payload length",
                declared: u64::from(h.raw_len),
                actual: u64::from(h.payload_len),
            });
        }
        Ok(h)
    }
}

/// The checksum key: a session key, or none.
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKey(pub [u8; 32]);

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

/// Computes the checksum of `body` (header, table and payload).
pub(crate) fn checksum(key: Option<&SessionKey>, body: &[u8]) -> blake3::Hash {
    match key {
        Some(k) => blake3::keyed_hash(&k.0, body),
        None => blake3::hash(body),
    }
}

/// The BLAKE3 digest of a chunk's decoded bytes, as its checksum covers
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkDigest {
    /// The chaining value of the bytes as the BLAKE3 subtree that starts at
    /// byte `offset` of their region (`blake3::hazmat`): a region's digest
    /// is assembled from these without hashing its bytes again.
    Subtree {
        /// Where the chunk starts in its region.
        offset: u64,
        /// The chaining value.
        cv: [u8; 32],
    },
    /// `blake3::hash` of the bytes: a chunk with no place in a region's
    /// tree (no offset given, or one that cannot start a subtree that long).
    Whole([u8; 32]),
}

impl ChunkDigest {
    /// The digest of `data`, placed at `offset` of its region when given.
    pub fn of(data: &[u8], offset: Option<u64>) -> ChunkDigest {
        use blake3::hazmat::{HasherExt, max_subtree_len};
        match offset {
            Some(offset)
                if !data.is_empty()
                    && offset.is_multiple_of(blake3::CHUNK_LEN as u64)
                    && max_subtree_len(offset).is_none_or(|max| data.len() as u64 <= max) =>
            {
                let cv = blake3::Hasher::new()
                    .set_input_offset(offset)
                    .update(data)
                    .finalize_non_root();
                ChunkDigest::Subtree { offset, cv }
            }
            _ => ChunkDigest::Whole(*blake3::hash(data).as_bytes()),
        }
    }
}

/// The checksum of a chunk frame (version 2): keyed (or plain) BLAKE3 of
/// its 40-byte header, a form byte (1 subtree, 0 whole), the offset (0 for
/// whole) and the digest of its *decoded* bytes. The payload is covered
/// through what it decodes to, so each side hashes the bytes once and the
/// same digest serves the region's end-to-end check.
pub(crate) fn chunk_checksum(
    key: Option<&SessionKey>,
    header: &[u8],
    digest: &ChunkDigest,
) -> blake3::Hash {
    let mut h = match key {
        Some(k) => blake3::Hasher::new_keyed(&k.0),
        None => blake3::Hasher::new(),
    };
    h.update(header);
    match digest {
        ChunkDigest::Subtree { offset, cv } => {
            h.update(&[1]);
            h.update(&offset.to_le_bytes());
            h.update(cv);
        }
        ChunkDigest::Whole(d) => {
            h.update(&[0]);
            h.update(&0u64.to_le_bytes());
            h.update(d);
        }
    }
    h.finalize()
}

/// Checks the trailing checksum of a whole frame whose header is `h`, and
/// that its keying agrees with the decoder's; an unchecked frame
/// ([`FLAG_UNCHECKED`]) passes only where `accept_unchecked`.
pub(crate) fn verify(
    key: Option<&SessionKey>,
    accept_unchecked: bool,
    h: &FrameHeader,
    frame: &[u8],
) -> Result<(), DecodeError> {
    if h.unchecked() {
        return if accept_unchecked {
            Ok(())
        } else {
            Err(DecodeError::Unchecked)
        };
    }
    let keyed = h.flags & FLAG_KEYED != 0;
    if keyed != key.is_some() {
        return Err(DecodeError::KeyMismatch { frame_keyed: keyed });
    }
    let split = frame.len() - CHECKSUM_LEN;
    let mut expected = [0u8; CHECKSUM_LEN];
    expected.copy_from_slice(&frame[split..]);
    // blake3::Hash compares in constant time.
    if checksum(key, &frame[..split]) != blake3::Hash::from_bytes(expected) {
        return Err(DecodeError::BadChecksum);
    }
    Ok(())
}
