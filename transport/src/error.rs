//! Errors of the transport.

use std::io;

use crate::wire::Kind;

/// A message that breaks the wire format. Nothing of it is acted on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The first four bytes are not `AMST`.
    #[error("bad magic {0:02x?}: not an AMST peer")]
    BadMagic([u8; 4]),
    /// An unknown message kind.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// Header flags this version does not know (encryption is a later
    /// version).
    #[error("unsupported message flags {0:#04x}")]
    UnsupportedFlags(u8),
    /// A reserved field is not zero.
    #[error("reserved bytes of {0} are not zero")]
    Reserved(&'static str),
    /// A body longer than its kind allows.
    #[error("{kind:?} message of {len} bytes, at most {max}")]
    TooLong {
        /// The kind.
        kind: Kind,
        /// Declared length.
        len: u64,
        /// Its limit.
        max: u64,
    },
    /// The body ends early.
    #[error("{what} is truncated")]
    Truncated {
        /// What was being read.
        what: &'static str,
    },
    /// Bytes after the last field.
    #[error("{extra} trailing bytes after {what}")]
    TrailingBytes {
        /// What was read.
        what: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
    /// A field with a value out of range.
    #[error("invalid {0}")]
    Invalid(&'static str),
    /// The tag does not match: modified, replayed, reordered, or from
    /// another connection.
    #[error("{0:?} message fails authentication (modified, replayed or forged)")]
    BadTag(Kind),
    /// A message that is valid but not expected here.
    #[error("unexpected {found:?} message, expected {expected}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        found: Kind,
    },
}

/// Why a session, stream or transfer failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The peer broke the protocol.
    #[error("protocol error from {peer}: {source}")]
    Wire {
        /// Who.
        peer: String,
        /// What.
        #[source]
        source: WireError,
    },
    /// The peer sent something valid on the wire but wrong in context.
    #[error("protocol error from {peer}: {text}")]
    Protocol {
        /// Who.
        peer: String,
        /// What.
        text: String,
    },
    /// A chunk frame failed to decode or verify.
    #[error("bad chunk frame from {peer}: {source}")]
    Frame {
        /// Who.
        peer: String,
        /// What.
        #[source]
        source: dwcp_codec::DecodeError,
    },
    /// Authentication failed.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The peer refused, with its reason.
    #[error("refused by the peer (code {code}): {text}")]
    Refused {
        /// Its code.
        code: u16,
        /// Its reason.
        text: String,
    },
    /// A socket, file or engine call failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A bad setting or argument.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The receiver could not place or finish a region.
    #[error("region {region}: {text}")]
    Region {
        /// The region.
        region: u32,
        /// Why.
        text: String,
    },
    /// Every stream failed and the session could not be resumed in time.
    #[error("session lost: {0}")]
    SessionLost(String),
    /// The transfer was cancelled.
    #[error("cancelled")]
    Cancelled,
    /// A deadline passed.
    #[error("timed out {0}")]
    Timeout(String),
    /// The engine refused work or stopped.
    #[error("engine: {0}")]
    Engine(#[from] dwcp_engine::TaskError),
    /// The codec refused a setting or input.
    #[error("codec: {0}")]
    Codec(#[from] dwcp_codec::CodecError),
}

impl TransportError {
    /// An IO error with what was being done.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        TransportError::Io {
            what: what.into(),
            source,
        }
    }
}

/// A protocol error of `peer`.
pub(crate) fn wire_err(peer: &str, source: WireError) -> TransportError {
    TransportError::Wire {
        peer: peer.to_string(),
        source,
    }
}

/// The error a `REFUSE` or `ERROR` body from `peer` stands for.
pub(crate) fn refused(body: &[u8], peer: &str) -> TransportError {
    match crate::wire::Reason::decode(body) {
        Ok(r) => TransportError::Refused {
            code: r.code,
            text: r.text,
        },
        Err(e) => wire_err(peer, e),
    }
}
