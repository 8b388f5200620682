//! One TCP connection carrying AMST messages through the engine: exact
//! reads of header and body into a reusable buffer, tags checked and
//! written, every length bounded before anything is allocated or read.

use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use dwcp_codec::frame::{CHECKSUM_LEN, HEADER_LEN as FRAME_HEADER_LEN};
use dwcp_engine::{IoBuf, LocalTcpStream, Slice, timeout};

use crate::session::Source;

use crate::auth::Tagger;
use crate::error::{TransportError, WireError};
use crate::wire::{DATA_FIXED_LEN, HEADER_LEN, Header, Kind, TAG_LEN};

/// Reads messages from a connection.
pub(crate) struct MsgReader {
    stream: Rc<LocalTcpStream>,
    /// Reusable body buffer; its length is the largest body accepted.
    buf: Vec<u8>,
    max_frame: usize,
    pub(crate) peer: String,
    tagger: Option<Tagger>,
}

/// Writes messages to a connection.
pub(crate) struct MsgWriter {
    stream: Rc<LocalTcpStream>,
    tagger: Option<Tagger>,
    pub(crate) peer: String,
}

/// Bytes of an in-memory [`Source`], handed to the kernel where they lie.
pub(crate) struct SourceBytes {
    /// Keeps the bytes alive (and unmoved) while the kernel reads them.
    _source: Arc<dyn Source>,
    ptr: *const u8,
    len: usize,
}

impl SourceBytes {
    /// `range` of `source`'s bytes, when it has them in memory
    /// ([`Source::as_slice`]) and the range lies within them.
    pub(crate) fn new(source: Arc<dyn Source>, range: std::ops::Range<usize>) -> Option<Self> {
        let bytes = source.as_slice()?.get(range)?;
        let (ptr, len) = (bytes.as_ptr(), bytes.len());
        Some(SourceBytes {
            _source: source,
            ptr,
            len,
        })
    }
}

// SAFETY: `ptr..ptr + len` came from `Source::as_slice` on the source held
// in `_source`: a shared borrow of memory the source owns (or 'static
// memory). The `Arc` keeps the source alive and only ever lends it out
// shared, so that memory is neither freed, moved nor, through safe code,
// written while this value lives; `as_slice` promises bytes that cannot
// change.
unsafe impl IoBuf for SourceBytes {
    fn stable_ptr(&self) -> *const u8 {
        self.ptr
    }
    fn bytes_init(&self) -> usize {
        self.len
    }
}

/// One piece of a `DATA` message sent in pieces.
pub(crate) enum Piece {
    /// A prefix of one of our buffers.
    Buf(Slice<Vec<u8>>),
    /// Payload bytes straight from the source.
    Source(SourceBytes),
}

// SAFETY: each variant is an `IoBuf` whose guarantees it passes on as is.
unsafe impl IoBuf for Piece {
    fn stable_ptr(&self) -> *const u8 {
        match self {
            Piece::Buf(b) => b.stable_ptr(),
            Piece::Source(s) => s.stable_ptr(),
        }
    }
    fn bytes_init(&self) -> usize {
        match self {
            Piece::Buf(b) => b.bytes_init(),
            Piece::Source(s) => s.bytes_init(),
        }
    }
}

/// The largest body a connection that carries data frames of up to
/// `max_frame` bytes must hold.
fn body_capacity(max_frame: usize) -> usize {
    [
        Kind::Hello,
        Kind::Challenge,
        Kind::Welcome,
        Kind::Join,
        Kind::Data,
        Kind::Ack,
        Kind::Open,
        Kind::Error,
    ]
    .iter()
    .map(|k| k.max_body(max_frame))
    .max()
    .unwrap_or(0)
}

/// A connection split into its two halves. `max_frame` bounds data frames
/// (0 on connections that carry none).
pub(crate) fn split(
    stream: LocalTcpStream,
    peer: String,
    max_frame: usize,
) -> (MsgReader, MsgWriter) {
    let stream = Rc::new(stream);
    (
        MsgReader {
            stream: stream.clone(),
            buf: vec![0; body_capacity(max_frame)],
            max_frame,
            peer: peer.clone(),
            tagger: None,
        },
        MsgWriter {
            stream,
            tagger: None,
            peer,
        },
    )
}

/// The connection back from its two halves, once nothing else holds it.
pub(crate) fn unsplit(r: MsgReader, w: MsgWriter) -> Option<LocalTcpStream> {
    drop(r);
    Rc::try_unwrap(w.stream).ok()
}

fn io_err(peer: &str, what: &str, e: io::Error) -> TransportError {
    TransportError::io(format!("{what} ({peer})"), e)
}

impl MsgReader {
    /// From now on every tagged message is checked with `tagger`.
    pub(crate) fn set_tagger(&mut self, tagger: Tagger) {
        self.tagger = Some(tagger);
    }

    /// The next message, within `limit` when given. Tagged messages come
    /// back without their tag, checked; a tagged kind before the tagger is
    /// set, or an untagged kind after, is a protocol error. `Ok(None)` on a
    /// clean end of stream between messages.
    pub(crate) async fn recv(
        &mut self,
        limit: Option<Duration>,
    ) -> Result<Option<(Kind, &[u8])>, TransportError> {
        let peer = self.peer.clone();
        let fut = self.recv_inner();
        match limit {
            None => fut.await,
            Some(d) => match timeout(d, fut).await {
                Ok(r) => r,
                Err(_) => Err(TransportError::Timeout(format!(
                    "waiting for a message from {peer}"
                ))),
            },
        }
    }

    async fn recv_inner(&mut self) -> Result<Option<(Kind, &[u8])>, TransportError> {
        let (r, hb) = self
            .stream
            .recv_exact(Slice::new_mut(vec![0u8; HEADER_LEN], 0..HEADER_LEN))
            .await;
        let hb = hb.into_inner();
        if let Err(e) = r {
            return if e.kind() == io::ErrorKind::UnexpectedEof {
                Ok(None)
            } else {
                Err(io_err(&self.peer, "receiving", e))
            };
        }
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&hb);
        let header = Header::parse(&h, self.max_frame).map_err(|e| self.wire(e))?;
        let len = header.len as usize;
        let buf = std::mem::take(&mut self.buf);
        // `Header::parse` bounded `len` by the kind's limit, which the buffer
        // holds for every kind this connection accepts; a longer one is
        // refused here before reading.
        if len > buf.len() {
            self.buf = buf;
            return Err(self.wire(WireError::TooLong {
                kind: header.kind,
                len: len as u64,
                max: self.buf.len() as u64,
            }));
        }
        let (r, buf) = self.stream.recv_exact(Slice::new_mut(buf, 0..len)).await;
        self.buf = buf.into_inner();
        r.map_err(|e| io_err(&self.peer, "receiving a message body", e))?;
        let body = &self.buf[..len];
        match (&mut self.tagger, header.kind.tagged()) {
            (Some(t), true) => {
                let (content, tag) = body.split_at(len - TAG_LEN);
                if header.kind == Kind::Data {
                    if content.len() < DATA_FIXED_LEN + CHECKSUM_LEN {
                        return Err(self.wire(WireError::Truncated { what: "DATA" }));
                    }
                    let fixed = &content[..DATA_FIXED_LEN];
                    let sum = &content[content.len() - CHECKSUM_LEN..];
                    t.open(&header, &[fixed, sum], tag)
                } else {
                    t.open(&header, &[content], tag)
                }
                .map_err(|e| self.wire(e))?;
                Ok(Some((header.kind, &self.buf[..len - TAG_LEN])))
            }
            (None, false) => Ok(Some((header.kind, body))),
            (Some(_), false) => Err(self.wire(WireError::Unexpected {
                expected: "a tagged message after the handshake",
                found: header.kind,
            })),
            (None, true) => Err(self.wire(WireError::Unexpected {
                expected: "a handshake message",
                found: header.kind,
            })),
        }
    }

    /// The body of the next message, which must be `want` (named
    /// `want_name` in the error), within `limit`. A `REFUSE` becomes the
    /// peer's reason; an end of stream becomes `TransportError::Auth` with
    /// `closed`.
    pub(crate) async fn expect(
        &mut self,
        limit: Option<Duration>,
        want: Kind,
        want_name: &'static str,
        closed: &str,
    ) -> Result<&[u8], TransportError> {
        let peer = self.peer.clone();
        match self.recv(limit).await? {
            Some((k, body)) if k == want => Ok(body),
            Some((Kind::Refuse, body)) => Err(crate::error::refused(body, &peer)),
            Some((found, _)) => Err(crate::error::wire_err(
                &peer,
                WireError::Unexpected {
                    expected: want_name,
                    found,
                },
            )),
            None => Err(TransportError::Auth(closed.to_string())),
        }
    }

    /// A protocol error of this peer.
    pub(crate) fn wire(&self, e: WireError) -> TransportError {
        crate::error::wire_err(&self.peer, e)
    }
}

impl MsgWriter {
    /// From now on messages are tagged with `tagger`.
    pub(crate) fn set_tagger(&mut self, tagger: Tagger) {
        self.tagger = Some(tagger);
    }

    /// Sends a message of `kind` with `body` (the tag is added for tagged
    /// kinds).
    pub(crate) async fn send(&mut self, kind: Kind, body: &[u8]) -> Result<(), TransportError> {
        let tagged = kind.tagged();
        let header = Header {
            kind,
            len: (body.len() + if tagged { TAG_LEN } else { 0 }) as u32,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + header.len as usize);
        out.extend_from_slice(&header.write());
        out.extend_from_slice(body);
        if tagged {
            let Some(t) = self.tagger.as_mut() else {
                return Err(TransportError::Config(format!(
                    "{kind:?} message before the handshake finished"
                )));
            };
            out.extend_from_slice(&t.seal(&header, &[body]));
        }
        let (r, _) = self.stream.send_all(out).await;
        r.map_err(|e| io_err(&self.peer, "sending", e))
    }

    /// Sends a `DATA` message laid out in `buf`: `HEADER_LEN` bytes of room
    /// for the header, the fixed fields, the codec frame of `frame_len`
    /// bytes, and `TAG_LEN` bytes of room for the tag. Returns the buffer.
    pub(crate) async fn send_data(
        &mut self,
        mut buf: Vec<u8>,
        frame_len: usize,
    ) -> (Result<(), TransportError>, Vec<u8>) {
        let body_len = DATA_FIXED_LEN + frame_len + TAG_LEN;
        let end = HEADER_LEN + body_len;
        let Some(t) = self.tagger.as_mut() else {
            return (
                Err(TransportError::Config("DATA before the handshake".into())),
                buf,
            );
        };
        if frame_len < CHECKSUM_LEN || buf.len() < end {
            return (
                Err(TransportError::Config(format!(
                    "DATA buffer of {} bytes for a frame of {frame_len}",
                    buf.len()
                ))),
                buf,
            );
        }
        let header = Header {
            kind: Kind::Data,
            len: body_len as u32,
        };
        buf[..HEADER_LEN].copy_from_slice(&header.write());
        let fixed_end = HEADER_LEN + DATA_FIXED_LEN;
        let frame_end = fixed_end + frame_len;
        let tag = t.seal(
            &header,
            &[
                &buf[HEADER_LEN..fixed_end],
                &buf[frame_end - CHECKSUM_LEN..frame_end],
            ],
        );
        buf[frame_end..end].copy_from_slice(&tag);
        let (r, buf) = self.stream.send_all(Slice::new(buf, 0..end)).await;
        (
            r.map_err(|e| io_err(&self.peer, "sending data", e)),
            buf.into_inner(),
        )
    }

    /// Sends a `DATA` message whose codec frame is a stored chunk, in three
    /// pieces and without copying its payload: `head` holds `HEADER_LEN`
    /// bytes of room for the header, the fixed fields and the codec frame's
    /// header; `payload` is the chunk as it lies in its source; `tail` holds
    /// the frame's checksum and `TAG_LEN` bytes of room for the tag. The
    /// bytes on the wire are those [`MsgWriter::send_data`] sends for the
    /// same frame. Returns `head` and `tail`.
    pub(crate) async fn send_data_stored(
        &mut self,
        head: Vec<u8>,
        payload: SourceBytes,
        tail: Vec<u8>,
    ) -> (Result<(), TransportError>, Vec<u8>, Vec<u8>) {
        let fixed_end = HEADER_LEN + DATA_FIXED_LEN;
        let head_len = fixed_end + FRAME_HEADER_LEN;
        let tail_len = CHECKSUM_LEN + TAG_LEN;
        let Some(t) = self.tagger.as_mut() else {
            return (
                Err(TransportError::Config("DATA before the handshake".into())),
                head,
                tail,
            );
        };
        if head.len() < head_len || tail.len() < tail_len {
            return (
                Err(TransportError::Config(format!(
                    "DATA pieces of {} and {} bytes around a stored chunk",
                    head.len(),
                    tail.len()
                ))),
                head,
                tail,
            );
        }
        let body_len = DATA_FIXED_LEN + FRAME_HEADER_LEN + payload.len + tail_len;
        let Ok(len) = u32::try_from(body_len) else {
            return (
                Err(TransportError::Config(format!(
                    "DATA body of {body_len} bytes"
                ))),
                head,
                tail,
            );
        };
        let header = Header {
            kind: Kind::Data,
            len,
        };
        let (mut head, mut tail) = (head, tail);
        head[..HEADER_LEN].copy_from_slice(&header.write());
        let tag = t.seal(
            &header,
            &[&head[HEADER_LEN..fixed_end], &tail[..CHECKSUM_LEN]],
        );
        tail[CHECKSUM_LEN..tail_len].copy_from_slice(&tag);
        let pieces = vec![
            Piece::Buf(Slice::new(head, 0..head_len)),
            Piece::Source(payload),
            Piece::Buf(Slice::new(tail, 0..tail_len)),
        ];
        let (r, mut pieces) = self.stream.send_all_vectored(pieces).await;
        let r = r.map_err(|e| io_err(&self.peer, "sending data", e));
        let back = |p: Option<Piece>| match p {
            Some(Piece::Buf(b)) => b.into_inner(),
            _ => Vec::new(),
        };
        let tail = back(pieces.pop());
        pieces.pop();
        let head = back(pieces.pop());
        (r, head, tail)
    }

    /// The socket.
    pub(crate) fn stream(&self) -> &Rc<LocalTcpStream> {
        &self.stream
    }
}
