//! Errors of the codec: [`DecodeError`] for malformed or unusable frames,
//! [`CodecError`] for everything a caller of the encoder can get wrong.

use thiserror::Error;

/// Why a frame (or another encoded structure) was rejected by a decoder.
///
/// Every malformed input maps to one of these; a decoder never panics and
/// never allocates more than a declared size that was first checked against
/// its limits. A rejected frame leaves the decoder's state as it was, except
/// where [`DecodeError::poisons_state`] says otherwise.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ended before a field that its header or table promised.
    #[error("truncated {what}: needed {needed} bytes, {available} available")]
    Truncated {
        /// The structure being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes present.
        available: u64,
    },
    /// The first four bytes are not the frame magic.
    #[error("bad magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// The frame's format version is not one this decoder reads.
    #[error("unsupported format version {found} (this decoder reads {min}..={max})")]
    UnsupportedVersion {
        /// Version in the frame.
        found: u8,
        /// Oldest version read.
        min: u8,
        /// Newest version read.
        max: u8,
    },
    /// The frame kind byte is unknown.
    #[error("unknown frame kind {0}")]
    UnknownFrameKind(u8),
    /// The frame is of a valid kind, but not the one the caller asked for.
    #[error("expected a {expected} frame, found a {found} frame")]
    WrongFrameKind {
        /// Kind the caller decodes.
        expected: &'static str,
        /// Kind in the frame.
        found: &'static str,
    },
    /// The compression byte is unknown.
    #[error("unknown compression {0}")]
    UnknownCompression(u8),
    /// A page-table entry has an unknown kind.
    #[error("table entry {entry}: unknown page kind {kind}")]
    UnknownPageKind {
        /// Entry number in the table.
        entry: u64,
        /// The kind found.
        kind: u8,
    },
    /// Flag or reserved bits that this version does not define are set.
    #[error("reserved bits set in {field}: {value:#x}")]
    Reserved {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The checksum does not match the frame's contents.
    #[error("checksum mismatch")]
    BadChecksum,
    /// The frame carries no checksum ([`FLAG_UNCHECKED`](crate::frame::FLAG_UNCHECKED))
    /// and this decoder was not told that its container verifies frames.
    #[error(
        "frame carries no checksum, which this decoder accepts only from a container that verifies its frames"
    )]
    Unchecked,
    /// The frame is keyed and this decoder has no key, or the other way round.
    #[error("frame is {}keyed but the decoder {}", if *.frame_keyed { "" } else { "not " }, if *.frame_keyed { "has no key" } else { "requires a key" })]
    KeyMismatch {
        /// Whether the frame says it is keyed.
        frame_keyed: bool,
    },
    /// Two lengths that must agree do not.
    #[error("{what}: declared {declared}, actual {actual}")]
    LengthMismatch {
        /// What disagrees.
        what: &'static str,
        /// The declared value.
        declared: u64,
        /// The value found.
        actual: u64,
    },
    /// A declared size or count is over the decoder's limit (or overflows).
    #[error("{what} {value} is over the limit of {limit}")]
    OverLimit {
        /// What is too large.
        what: &'static str,
        /// The value declared.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The frame's page size differs from the decoder's.
    #[error("page size {found} differs from the decoder's {expected}")]
    PageSizeMismatch {
        /// Page size in the frame (0 when the shift is out of range).
        found: u64,
        /// The decoder's page size.
        expected: u64,
    },
    /// The frame is not the next one in this session's page-frame sequence.
    #[error("frame sequence {found}, expected {expected}")]
    OutOfSequence {
        /// Sequence number in the frame.
        found: u64,
        /// The decoder's next sequence number.
        expected: u64,
    },
    /// An earlier frame failed after the decoder had started to change its
    /// state (or, while applying a frame, the state turned out not to be what
    /// validating it saw); the state no longer matches the encoder's until
    /// both are reset.
    #[error("decoder state is out of step after an earlier failure; reset both ends")]
    Desynchronized,
    /// The compressed payload is malformed.
    #[error("{codec} payload does not decompress: {reason}")]
    Decompress {
        /// The compressor.
        codec: &'static str,
        /// What the decompressor said.
        reason: String,
    },
    /// A reference names content that this decoder does not hold.
    #[error("table entry {entry}: reference to content {content} that is not held")]
    UnknownReference {
        /// Entry number in the table.
        entry: u64,
        /// The content id referred to.
        content: u64,
    },
    /// A baseline reference names a hash that is not in the baseline.
    #[error("table entry {entry}: baseline page {hash} is not held")]
    UnknownBaseline {
        /// Entry number in the table.
        entry: u64,
        /// The hash, in hex.
        hash: String,
    },
    /// A delta arrives for a page whose previous version is not held.
    #[error("table entry {entry}: delta for page {page} without a held base")]
    MissingDeltaBase {
        /// Entry number in the table.
        entry: u64,
        /// The page index.
        page: u64,
    },
    /// A delta body is malformed.
    #[error("table entry {entry}: malformed delta: {reason}")]
    BadDelta {
        /// Entry number in the table.
        entry: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A page index (or a run of them) overflows 64 bits.
    #[error("table entry {entry}: page index overflows")]
    IndexOverflow {
        /// Entry number in the table.
        entry: u64,
    },
    /// A variable-length integer is overlong, not minimal, or overflows.
    #[error("malformed varint in {what}")]
    BadVarint {
        /// Where it was read.
        what: &'static str,
    },
    /// A structure has bytes left over after its declared end.
    #[error("{what}: {extra} trailing bytes")]
    TrailingBytes {
        /// The structure.
        what: &'static str,
        /// How many bytes are left over.
        extra: u64,
    },
}

impl DecodeError {
    /// True for the one error after which the decoder refuses further page
    /// frames until it is reset ([`DecodeError::Desynchronized`] and the error
    /// that caused it). All other errors leave the state untouched.
    pub fn poisons_state(&self) -> bool {
        matches!(
            self,
            DecodeError::Desynchronized
                | DecodeError::Decompress { .. }
                | DecodeError::BadDelta { .. }
        )
    }
}

/// Everything the codec can report to the code that drives it.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CodecError {
    /// A frame or other encoded input was rejected.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The caller passed something the encoder cannot take.
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A configuration value is out of range.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The compressor failed (it should not on valid input).
    #[error("{codec} compression failed: {reason}")]
    Compress {
        /// The compressor.
        codec: &'static str,
        /// What it said.
        reason: String,
    },
}
