//! AMST messages on the wire, sans-IO. docs/wire-format.md ("AMST")
//! documents every byte.
//!
//! Every message starts with a 12-byte header: magic `AMST`, kind, flags,
//! two reserved bytes, and the body length. Messages after the handshake end
//! with a 32-byte tag: keyed BLAKE3 under the connection's key over the
//! direction, a per-direction message counter, the header and the body (for
//! data frames the codec frame enters through its own keyed checksum), so a
//! modified, reordered, replayed or cross-connection message is rejected.

use crate::error::WireError;

/// The four bytes that open every message.
pub const MAGIC: [u8; 4] = *b"AMST";
/// Length of the message header.
pub const HEADER_LEN: usize = 12;
/// Length of the authentication tag of post-handshake messages.
pub const TAG_LEN: usize = 32;
/// Protocol versions this build speaks.
pub const VERSION_MIN: u8 = 1;
/// Newest protocol version this build speaks.
pub const VERSION_MAX: u8 = 1;
/// Longest path or metadata blob in an `OPEN` message.
pub const MAX_META_LEN: usize = 8192;
/// Longest text in a `REFUSE`, `DONE` or `ERROR` message.
pub const MAX_TEXT_LEN: usize = 1024;
/// Most chunk ids in one `ACK`.
pub const MAX_ACKS: usize = 256;
/// Flag bit reserved for AEAD-encrypted bodies (a later protocol version);
/// version 1 rejects it.
pub const FLAG_ENCRYPTED: u8 = 1;

/// Capability bits exchanged in the handshake.
pub mod caps {
    /// Region addressing.
    pub const REGION: u64 = 1;
    /// Ordered addressing.
    pub const ORDERED: u64 = 1 << 1;
    /// Resuming a session after a full disconnect.
    pub const RESUME: u64 = 1 << 2;
    /// Everything this build offers.
    pub const ALL: u64 = REGION | ORDERED | RESUME;
}

/// Message kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client opens a session (control stream).
    Hello = 1,
    /// Server's nonce and proof.
    Challenge = 2,
    /// Client's proof.
    Proof = 3,
    /// Server accepts the session.
    Welcome = 4,
    /// Either side refuses (handshake or join), with a reason.
    Refuse = 5,
    /// A data stream joins a session.
    Join = 6,
    /// The server accepts a data stream.
    JoinOk = 7,
    /// A chunk (one codec frame).
    Data = 16,
    /// Chunks placed and verified.
    Ack = 17,
    /// A region (file, memory range, byte stream) begins.
    Open = 32,
    /// Everything of a region has been sent.
    Close = 33,
    /// The receiver finished a region (placed, digest checked).
    Done = 34,
    /// The sender has nothing more; the receiver answers with its own.
    Bye = 35,
    /// A fatal session error, with a reason.
    Error = 36,
}

impl Kind {
    /// Parses a kind byte.
    pub fn from_wire(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Challenge,
            3 => Kind::Proof,
            4 => Kind::Welcome,
            5 => Kind::Refuse,
            6 => Kind::Join,
            7 => Kind::JoinOk,
            16 => Kind::Data,
            17 => Kind::Ack,
            32 => Kind::Open,
            33 => Kind::Close,
            34 => Kind::Done,
            35 => Kind::Bye,
            36 => Kind::Error,
            _ => return None,
        })
    }

    /// Whether messages of this kind end with a tag.
    pub fn tagged(self) -> bool {
        !matches!(
            self,
            Kind::Hello | Kind::Challenge | Kind::Proof | Kind::Refuse | Kind::Join | Kind::JoinOk
        )
    }

    /// The longest body a message of this kind may declare, given the
    /// longest data frame the session allows.
    pub fn max_body(self, max_frame: usize) -> usize {
        let tag = if self.tagged() { TAG_LEN } else { 0 };
        tag + match self {
            Kind::Hello => HELLO_LEN,
            Kind::Challenge => CHALLENGE_LEN,
            Kind::Proof => 32,
            Kind::Welcome => WELCOME_LEN,
            Kind::Refuse | Kind::Error | Kind::Done => 8 + MAX_TEXT_LEN,
            Kind::Join => JOIN_LEN,
            Kind::JoinOk => 64,
            Kind::Data => DATA_FIXED_LEN + max_frame,
            Kind::Ack => 4 + 8 * MAX_ACKS,
            Kind::Open => OPEN_FIXED_LEN + MAX_META_LEN,
            Kind::Close => CLOSE_LEN,
            Kind::Bye => 0,
        }
    }
}

/// A parsed message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// What follows.
    pub kind: Kind,
    /// Body length, tag included.
    pub len: u32,
}

impl Header {
    /// Parses and checks a header: magic, kind, no flags (version 1), zero
    /// reserved bytes, and a body no longer than the kind allows.
    pub fn parse(b: &[u8; HEADER_LEN], max_frame: usize) -> Result<Header, WireError> {
        if b[0..4] != MAGIC {
            return Err(WireError::BadMagic([b[0], b[1], b[2], b[3]]));
        }
        let kind = Kind::from_wire(b[4]).ok_or(WireError::UnknownKind(b[4]))?;
        if b[5] != 0 {
            return Err(WireError::UnsupportedFlags(b[5]));
        }
        if b[6] != 0 || b[7] != 0 {
            return Err(WireError::Reserved("message header"));
        }
        let len = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        let max = kind.max_body(max_frame);
        if len as usize > max {
            return Err(WireError::TooLong {
                kind,
                len: u64::from(len),
                max: max as u64,
            });
        }
        if kind.tagged() && (len as usize) < TAG_LEN {
            return Err(WireError::Truncated { what: "tag" });
        }
        Ok(Header { kind, len })
    }

    /// Writes the header.
    pub fn write(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b
    }
}

/// Reads fixed-size fields from a body, failing with a clear error when it
/// runs out.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(b: &'a [u8], what: &'static str) -> Self {
        Reader { b, what }
    }
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError::Truncated { what: self.what });
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.bytes(1)?[0])
    }
    pub(crate) fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array()?))
    }
    pub(crate) fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    pub(crate) fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    pub(crate) fn zeros(&mut self, n: usize) -> Result<(), WireError> {
        if self.bytes(n)?.iter().any(|&x| x != 0) {
            return Err(WireError::Reserved(self.what));
        }
        Ok(())
    }
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    pub(crate) fn end(&self) -> Result<(), WireError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(WireError::TrailingBytes {
                what: self.what,
                extra: self.b.len(),
            })
        }
    }
}

/// How the client wants payload compressed (the codec policy), on the
/// wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WirePolicy {
    /// Stored.
    None,
    /// LZ4.
    Datacenter,
    /// ZStd at a level.
    Internet(i8),
    /// Per frame, from the bandwidth estimate.
    Auto,
}

impl WirePolicy {
    fn encode(self) -> [u8; 2] {
        match self {
            WirePolicy::None => [0, 0],
            WirePolicy::Datacenter => [1, 0],
            WirePolicy::Internet(l) => [2, l as u8],
            WirePolicy::Auto => [3, 0],
        }
    }
    fn decode(b: [u8; 2]) -> Result<WirePolicy, WireError> {
        Ok(match b {
            [0, 0] => WirePolicy::None,
            [1, 0] => WirePolicy::Datacenter,
            [2, l] if (1..=22).contains(&(l as i8)) => WirePolicy::Internet(l as i8),
            [3, 0] => WirePolicy::Auto,
            _ => return Err(WireError::Invalid("codec policy")),
        })
    }
}

/// Client's opening message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Oldest protocol version the client speaks.
    pub version_min: u8,
    /// Newest.
    pub version_max: u8,
    /// Whether the client authenticates with a pre-shared key (else it runs
    /// with `--insecure-no-auth`).
    pub keyed: bool,
    /// Capabilities ([`caps`]).
    pub caps: u64,
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// A session to resume, all zero for a new one.
    pub resume: [u8; 16],
    /// Codec policy.
    pub policy: WirePolicy,
    /// Data streams the client means to open (at most).
    pub streams: u16,
}

/// Length of a `HELLO` body.
pub const HELLO_LEN: usize = 2 + 1 + 1 + 8 + 32 + 16 + 2 + 2 + 4;

impl Hello {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(HELLO_LEN);
        b.extend_from_slice(&[self.version_min, self.version_max, u8::from(self.keyed), 0]);
        b.extend_from_slice(&self.caps.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.resume);
        b.extend_from_slice(&self.policy.encode());
        b.extend_from_slice(&self.streams.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Hello, WireError> {
        let mut r = Reader::new(body, "HELLO");
        let version_min = r.u8()?;
        let version_max = r.u8()?;
        let keyed = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(WireError::Invalid("HELLO auth mode")),
        };
        r.zeros(1)?;
        let caps = r.u64()?;
        let nonce = r.array()?;
        let resume = r.array()?;
        let policy = WirePolicy::decode(r.array()?)?;
        let streams = r.u16()?;
        r.zeros(4)?;
        r.end()?;
        if version_min > version_max {
            return Err(WireError::Invalid("HELLO version range"));
        }
        Ok(Hello {
            version_min,
            version_max,
            keyed,
            caps,
            nonce,
            resume,
            policy,
            streams,
        })
    }
}

/// Server's answer to `HELLO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// The version both speak.
    pub version: u8,
    /// Capabilities both have.
    pub caps: u64,
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// The session id (the resumed one, or a fresh one).
    pub session: [u8; 16],
    /// Whether an existing session is resumed.
    pub resumed: bool,
    /// The server's proof that it holds the key.
    pub proof: [u8; 32],
}

/// Length of a `CHALLENGE` body.
pub const CHALLENGE_LEN: usize = 4 + 8 + 32 + 16 + 32;

impl Challenge {
    /// The body without the proof (what the proofs cover).
    pub fn encode_unproven(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CHALLENGE_LEN);
        b.extend_from_slice(&[self.version, u8::from(self.resumed), 0, 0]);
        b.extend_from_slice(&self.caps.to_le_bytes());
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.session);
        b
    }

    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = self.encode_unproven();
        b.extend_from_slice(&self.proof);
        b
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Challenge, WireError> {
        let mut r = Reader::new(body, "CHALLENGE");
        let version = r.u8()?;
        let resumed = match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(WireError::Invalid("CHALLENGE resumed flag")),
        };
        r.zeros(2)?;
        let caps = r.u64()?;
        let nonce = r.array()?;
        let session = r.array()?;
        let proof = r.array()?;
        r.end()?;
        Ok(Challenge {
            version,
            caps,
            nonce,
            session,
            resumed,
            proof,
        })
    }
}

/// Server's acceptance, tagged under the control connection's key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Welcome {
    /// Credit of each data stream, in chunk bytes.
    pub window: u32,
    /// Largest chunk the receiver accepts.
    pub max_chunk: u32,
    /// How long the receiver keeps the session after a full disconnect.
    pub grace_ms: u32,
    /// Most data streams the receiver accepts.
    pub max_streams: u16,
    /// Reorder window of ordered regions, in units of
    /// [`REORDER_UNIT`] bytes: how far, in chunk bytes, the sender may run
    /// ahead of the oldest chunk of its ordered regions that is not yet
    /// acknowledged. 0: this receiver takes no ordered regions.
    pub reorder_units: u16,
}

/// Unit of [`Welcome::reorder_units`]: 64 KiB.
pub const REORDER_UNIT: u64 = 64 * 1024;

/// Length of a `WELCOME` body (without tag).
pub const WELCOME_LEN: usize = 4 + 4 + 4 + 2 + 2;

impl Welcome {
    /// The body (without tag).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(WELCOME_LEN);
        b.extend_from_slice(&self.window.to_le_bytes());
        b.extend_from_slice(&self.max_chunk.to_le_bytes());
        b.extend_from_slice(&self.grace_ms.to_le_bytes());
        b.extend_from_slice(&self.max_streams.to_le_bytes());
        b.extend_from_slice(&self.reorder_units.to_le_bytes());
        b
    }

    /// Parses a body (without tag).
    pub fn decode(body: &[u8]) -> Result<Welcome, WireError> {
        let mut r = Reader::new(body, "WELCOME");
        let w = Welcome {
            window: r.u32()?,
            max_chunk: r.u32()?,
            grace_ms: r.u32()?,
            max_streams: r.u16()?,
            reorder_units: r.u16()?,
        };
        r.end()?;
        if w.window == 0 || w.max_chunk == 0 || w.max_streams == 0 {
            return Err(WireError::Invalid(
                "WELCOME window, chunk or stream limit of 0",
            ));
        }
        Ok(w)
    }
}

/// A code and a human-readable reason (`REFUSE`, `ERROR`, `DONE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    /// What it is about: the region for `DONE`, 0 otherwise.
    pub id: u32,
    /// 0 for success (`DONE`), otherwise a [`code`].
    pub code: u16,
    /// Text, at most [`MAX_TEXT_LEN`] bytes of UTF-8.
    pub text: String,
}

/// Codes of `REFUSE`, `ERROR` and `DONE`.
pub mod code {
    /// Success (`DONE` only).
    pub const OK: u16 = 0;
    /// Authentication failed or is missing.
    pub const AUTH: u16 = 1;
    /// No common protocol version.
    pub const VERSION: u16 = 2;
    /// Unknown or expired session.
    pub const SESSION: u16 = 3;
    /// A malformed or unexpected message.
    pub const PROTOCOL: u16 = 4;
    /// The receiver could not place or finish a region.
    pub const REGION: u16 = 5;
    /// Too many streams or sessions.
    pub const LIMIT: u16 = 6;
}

impl Reason {
    /// The body (without tag); the text is cut to [`MAX_TEXT_LEN`].
    pub fn encode(&self) -> Vec<u8> {
        let mut text = self.text.as_str();
        while text.len() > MAX_TEXT_LEN {
            let mut cut = MAX_TEXT_LEN;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text = &text[..cut];
        }
        let mut b = Vec::with_capacity(8 + text.len());
        b.extend_from_slice(&self.id.to_le_bytes());
        b.extend_from_slice(&self.code.to_le_bytes());
        b.extend_from_slice(&(text.len() as u16).to_le_bytes());
        b.extend_from_slice(text.as_bytes());
        b
    }

    /// Parses a body (without tag).
    pub fn decode(body: &[u8]) -> Result<Reason, WireError> {
        let mut r = Reader::new(body, "reason");
        let id = r.u32()?;
        let code = r.u16()?;
        let n = r.u16()? as usize;
        if n > MAX_TEXT_LEN {
            return Err(WireError::Invalid("reason text length"));
        }
        let text = std::str::from_utf8(r.bytes(n)?)
            .map_err(|_| WireError::Invalid("reason text is not UTF-8"))?
            .to_owned();
        r.end()?;
        Ok(Reason { id, code, text })
    }
}

/// A data stream asks to join a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The session.
    pub session: [u8; 16],
    /// The stream's index in the session.
    pub stream: u16,
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// Proof bound to the session key, session, stream and nonce.
    pub proof: [u8; 32],
}

/// Length of a `JOIN` body.
pub const JOIN_LEN: usize = 16 + 2 + 2 + 32 + 32;

impl Join {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(JOIN_LEN);
        b.extend_from_slice(&self.session);
        b.extend_from_slice(&self.stream.to_le_bytes());
        b.extend_from_slice(&[0; 2]);
        b.extend_from_slice(&self.nonce);
        b.extend_from_slice(&self.proof);
        b
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<Join, WireError> {
        let mut r = Reader::new(body, "JOIN");
        let session = r.array()?;
        let stream = r.u16()?;
        r.zeros(2)?;
        let nonce = r.array()?;
        let proof = r.array()?;
        r.end()?;
        Ok(Join {
            session,
            stream,
            nonce,
            proof,
        })
    }
}

/// The server's acceptance of a data stream: its nonce and proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOk {
    /// Fresh random nonce.
    pub nonce: [u8; 32],
    /// Proof bound to both nonces.
    pub proof: [u8; 32],
}

impl JoinOk {
    /// The body.
    pub fn encode(&self) -> Vec<u8> {
        [self.nonce, self.proof].concat()
    }

    /// Parses a body.
    pub fn decode(body: &[u8]) -> Result<JoinOk, WireError> {
        let mut r = Reader::new(body, "JOIN_OK");
        let j = JoinOk {
            nonce: r.array()?,
            proof: r.array()?,
        };
        r.end()?;
        Ok(j)
    }
}

/// How a chunk is addressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Addressing {
    /// Region id + byte offset: placed in any order.
    Region = 1,
    /// Region id + sequence number: delivered in order.
    Ordered = 2,
}

impl Addressing {
    fn from_wire(v: u8) -> Result<Addressing, WireError> {
        match v {
            1 => Ok(Addressing::Region),
            2 => Ok(Addressing::Ordered),
            _ => Err(WireError::Invalid("addressing mode")),
        }
    }
}

/// The fixed fields of a `DATA` message, before the codec frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataHeader {
    /// The stream it travels on (checked against the connection's).
    pub stream: u16,
    /// Region or ordered.
    pub addressing: Addressing,
    /// Session-wide chunk id: what `ACK` names, and what makes a repeated
    /// chunk recognisable.
    pub chunk: u64,
    /// The region.
    pub region: u32,
    /// Bytes of the chunk once decoded.
    pub raw_len: u32,
    /// Byte offset (region) or sequence number (ordered).
    pub offset: u64,
}

/// Length of the fixed part of a `DATA` body.
pub const DATA_FIXED_LEN: usize = 2 + 1 + 1 + 8 + 4 + 4 + 8;

impl DataHeader {
    /// The fixed fields.
    pub fn encode(&self) -> [u8; DATA_FIXED_LEN] {
        let mut b = [0u8; DATA_FIXED_LEN];
        b[0..2].copy_from_slice(&self.stream.to_le_bytes());
        b[2] = self.addressing as u8;
        b[4..12].copy_from_slice(&self.chunk.to_le_bytes());
        b[12..16].copy_from_slice(&self.region.to_le_bytes());
        b[16..20].copy_from_slice(&self.raw_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Parses the fixed fields at the start of a `DATA` body; returns them
    /// and the rest (codec frame and tag).
    pub fn decode(body: &[u8]) -> Result<(DataHeader, &[u8]), WireError> {
        let mut r = Reader::new(body, "DATA");
        let stream = r.u16()?;
        let addressing = Addressing::from_wire(r.u8()?)?;
        r.zeros(1)?;
        let h = DataHeader {
            stream,
            addressing,
            chunk: r.u64()?,
            region: r.u32()?,
            raw_len: r.u32()?,
            offset: r.u64()?,
        };
        Ok((h, r.rest()))
    }
}

/// Chunk ids acknowledged (`ACK` body without tag).
pub fn encode_ack(chunks: &[u64]) -> Vec<u8> {
    debug_assert!(chunks.len() <= MAX_ACKS);
    let mut b = Vec::with_capacity(4 + 8 * chunks.len());
    b.extend_from_slice(&(chunks.len() as u16).to_le_bytes());
    b.extend_from_slice(&[0; 2]);
    for c in chunks {
        b.extend_from_slice(&c.to_le_bytes());
    }
    b
}

/// Parses an `ACK` body (without tag).
pub fn decode_ack(body: &[u8]) -> Result<Vec<u64>, WireError> {
    let mut r = Reader::new(body, "ACK");
    let n = r.u16()? as usize;
    r.zeros(2)?;
    if n == 0 || n > MAX_ACKS {
        return Err(WireError::Invalid("ACK count"));
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(r.u64()?);
    }
    r.end()?;
    Ok(v)
}

/// A region begins (`OPEN`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    /// The region's id in this session.
    pub region: u32,
    /// How its chunks are addressed.
    pub addressing: Addressing,
    /// Its length in bytes; `u64::MAX` when unknown (ordered streams).
    pub len: u64,
    /// What the receiver's sink needs to place it (for files: path, mode,
    /// modification time; see `files`). At most [`MAX_META_LEN`].
    pub meta: Vec<u8>,
}

/// Length of the fixed part of an `OPEN` body.
pub const OPEN_FIXED_LEN: usize = 4 + 1 + 1 + 2 + 8;

impl Open {
    /// The body (without tag).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(OPEN_FIXED_LEN + self.meta.len());
        b.extend_from_slice(&self.region.to_le_bytes());
        b.push(self.addressing as u8);
        b.push(0);
        b.extend_from_slice(&(self.meta.len() as u16).to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.meta);
        b
    }

    /// Parses a body (without tag).
    pub fn decode(body: &[u8]) -> Result<Open, WireError> {
        let mut r = Reader::new(body, "OPEN");
        let region = r.u32()?;
        let addressing = Addressing::from_wire(r.u8()?)?;
        r.zeros(1)?;
        let n = r.u16()? as usize;
        if n > MAX_META_LEN {
            return Err(WireError::Invalid("OPEN metadata length"));
        }
        let len = r.u64()?;
        let meta = r.bytes(n)?.to_vec();
        r.end()?;
        Ok(Open {
            region,
            addressing,
            len,
            meta,
        })
    }
}

/// Everything of a region has been sent (`CLOSE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    /// The region.
    pub region: u32,
    /// Chunks it was cut into.
    pub chunks: u64,
    /// Its length in bytes.
    pub len: u64,
    /// BLAKE3 of its bytes, in order.
    pub digest: [u8; 32],
}

/// Length of a `CLOSE` body (without tag).
pub const CLOSE_LEN: usize = 4 + 4 + 8 + 8 + 32;

impl Close {
    /// The body (without tag).
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(CLOSE_LEN);
        b.extend_from_slice(&self.region.to_le_bytes());
        b.extend_from_slice(&[0; 4]);
        b.extend_from_slice(&self.chunks.to_le_bytes());
        b.extend_from_slice(&self.len.to_le_bytes());
        b.extend_from_slice(&self.digest);
        b
    }

    /// Parses a body (without tag).
    pub fn decode(body: &[u8]) -> Result<Close, WireError> {
        let mut r = Reader::new(body, "CLOSE");
        let region = r.u32()?;
        r.zeros(4)?;
        let c = Close {
            region,
            chunks: r.u64()?,
            len: r.u64()?,
            digest: r.array()?,
        };
        r.end()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MAX_FRAME: usize = 2 << 20;

    #[test]
    fn header_round_trip_and_rejections() {
        let h = Header {
            kind: Kind::Data,
            len: 1000,
        };
        let b = h.write();
        assert_eq!(Header::parse(&b, MAX_FRAME).unwrap(), h);
        let mut bad = b;
        bad[0] = b'X';
        assert!(matches!(
            Header::parse(&bad, MAX_FRAME),
            Err(WireError::BadMagic(_))
        ));
        let mut bad = b;
        bad[4] = 99;
        assert!(matches!(
            Header::parse(&bad, MAX_FRAME),
            Err(WireError::UnknownKind(99))
        ));
        let mut bad = b;
        bad[5] = FLAG_ENCRYPTED;
        assert!(matches!(
            Header::parse(&bad, MAX_FRAME),
            Err(WireError::UnsupportedFlags(1))
        ));
        let mut bad = b;
        bad[7] = 1;
        assert!(matches!(
            Header::parse(&bad, MAX_FRAME),
            Err(WireError::Reserved(_))
        ));
        let big = Header {
            kind: Kind::Data,
            len: u32::MAX,
        }
        .write();
        assert!(matches!(
            Header::parse(&big, MAX_FRAME),
            Err(WireError::TooLong { .. })
        ));
        let small = Header {
            kind: Kind::Ack,
            len: 3,
        }
        .write();
        assert!(matches!(
            Header::parse(&small, MAX_FRAME),
            Err(WireError::Truncated { .. })
        ));
    }

    #[test]
    fn every_message_round_trips() {
        let hello = Hello {
            version_min: 1,
            version_max: 3,
            keyed: true,
            caps: caps::ALL,
            nonce: [7; 32],
            resume: [1; 16],
            policy: WirePolicy::Internet(3),
            streams: 16,
        };
        assert_eq!(hello.encode().len(), HELLO_LEN);
        assert_eq!(Hello::decode(&hello.encode()).unwrap(), hello);
        let ch = Challenge {
            version: 1,
            caps: 5,
            nonce: [2; 32],
            session: [3; 16],
            resumed: true,
            proof: [4; 32],
        };
        assert_eq!(ch.encode().len(), CHALLENGE_LEN);
        assert_eq!(Challenge::decode(&ch.encode()).unwrap(), ch);
        let w = Welcome {
            window: 1 << 22,
            max_chunk: 1 << 20,
            grace_ms: 30_000,
            max_streams: 64,
            reorder_units: 1024,
        };
        assert_eq!(Welcome::decode(&w.encode()).unwrap(), w);
        let r = Reason {
            id: 9,
            code: code::AUTH,
            text: "bad key".into(),
        };
        assert_eq!(Reason::decode(&r.encode()).unwrap(), r);
        let j = Join {
            session: [5; 16],
            stream: 3,
            nonce: [6; 32],
            proof: [8; 32],
        };
        assert_eq!(Join::decode(&j.encode()).unwrap(), j);
        let jo = JoinOk {
            nonce: [1; 32],
            proof: [2; 32],
        };
        assert_eq!(JoinOk::decode(&jo.encode()).unwrap(), jo);
        let d = DataHeader {
            stream: 2,
            addressing: Addressing::Ordered,
            chunk: 77,
            region: 4,
            raw_len: 1 << 20,
            offset: 1 << 40,
        };
        let mut body = d.encode().to_vec();
        body.extend_from_slice(b"frame");
        assert_eq!(DataHeader::decode(&body).unwrap(), (d, &b"frame"[..]));
        assert_eq!(
            decode_ack(&encode_ack(&[1, 2, u64::MAX])).unwrap(),
            vec![1, 2, u64::MAX]
        );
        let o = Open {
            region: 1,
            addressing: Addressing::Region,
            len: 12345,
            meta: b"some/path".to_vec(),
        };
        assert_eq!(Open::decode(&o.encode()).unwrap(), o);
        let c = Close {
            region: 1,
            chunks: 3,
            len: 12345,
            digest: [9; 32],
        };
        assert_eq!(Close::decode(&c.encode()).unwrap(), c);
    }

    #[test]
    fn long_reason_text_is_cut_on_a_char_boundary() {
        let r = Reason {
            id: 0,
            code: code::PROTOCOL,
            text: "é".repeat(MAX_TEXT_LEN),
        };
        let back = Reason::decode(&r.encode()).unwrap();
        assert!(back.text.len() <= MAX_TEXT_LEN);
        assert!(back.text.chars().all(|c| c == 'é'));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Hello::decode(&body);
            let _ = Challenge::decode(&body);
            let _ = Welcome::decode(&body);
            let _ = Reason::decode(&body);
            let _ = Join::decode(&body);
            let _ = JoinOk::decode(&body);
            let _ = DataHeader::decode(&body);
            let _ = decode_ack(&body);
            let _ = Open::decode(&body);
            let _ = Close::decode(&body);
            let mut h = [0u8; HEADER_LEN];
            for (d, s) in h.iter_mut().zip(body.iter()) {
                *d = *s;
            }
            h[..4].copy_from_slice(&MAGIC);
            h[4] = kind;
            if let Ok(p) = Header::parse(&h, MAX_FRAME) {
                prop_assert!(p.len as usize <= p.kind.max_body(MAX_FRAME));
            }
        }

        #[test]
        fn open_round_trips(region in any::<u32>(), len in any::<u64>(), meta in proptest::collection::vec(any::<u8>(), 0..MAX_META_LEN)) {
            let o = Open { region, addressing: Addressing::Region, len, meta };
            prop_assert_eq!(Open::decode(&o.encode()).unwrap(), o);
        }

        #[test]
        fn ack_round_trips(ids in proptest::collection::vec(any::<u64>(), 1..MAX_ACKS)) {
            prop_assert_eq!(decode_ack(&encode_ack(&ids)).unwrap(), ids);
        }
    }
}
