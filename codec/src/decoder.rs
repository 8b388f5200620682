//! The page and chunk decoder.

use crate::Compression;
use crate::baseline::Baseline;
use crate::compress::Decompressors;
use crate::frame::{
    CHECKSUM_LEN, CHUNK_MIN_VERSION, ChunkDigest, FLAG_KEYED, FrameHeader, FrameKind, HEADER_LEN,
    VERSION, chunk_checksum, verify,
};
use crate::store::Store;
use crate::table::{self, Entry, EntryKind};
use crate::{CodecConfig, CodecError, DecodeError, FrameStats, delta};

/// Limits a decoder enforces before it allocates or writes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Most bytes a frame may have.
    pub max_frame_len: u64,
    /// Most bytes a payload may declare once decompressed, and most bytes of
    /// content (payload plus rebuilt pages) one page frame may produce.
    pub max_raw_len: u64,
    /// Most entries in a page table.
    pub max_entries: u32,
    /// Most pages one page frame may describe (zero runs included).
    pub max_pages: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            max_frame_len: 256 << 20,
            max_raw_len: 256 << 20,
            max_entries: 1 << 20,
            max_pages: 1 << 24,
        }
    }
}

/// One decoded page, or a run of zero pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodedPage<'a> {
    /// `count` zero pages from page `first` on.
    Zero {
        /// First page index.
        first: u64,
        /// Number of pages.
        count: u64,
    },
    /// Page `index` with these bytes.
    Data {
        /// Page index.
        index: u64,
        /// The page's content.
        bytes: &'a [u8],
    },
}

#[derive(Debug, Clone, Copy)]
enum Out {
    Zero { first: u64, count: u64 },
    Data { index: u64, offset: usize },
}

/// The pages of one decoded frame, valid until the decoder's next call.
#[derive(Debug)]
pub struct DecodedPages<'a> {
    region: &'a [u8],
    out: &'a [Out],
    page_size: usize,
    /// Counts per kind and sizes of the frame.
    pub stats: FrameStats,
}

impl<'a> DecodedPages<'a> {
    /// The pages in frame order (a page index may repeat; the last wins).
    pub fn iter(&self) -> impl Iterator<Item = DecodedPage<'a>> + '_ {
        let region = self.region;
        let ps = self.page_size;
        self.out.iter().map(move |o| match *o {
            Out::Zero { first, count } => DecodedPage::Zero { first, count },
            Out::Data { index, offset } => DecodedPage::Data {
                index,
                bytes: &region[offset..offset + ps],
            },
        })
    }

    /// Writes the pages into `image`, where page `i` lives at byte
    /// `(i - first_index) * page_size`. Fails, before writing anything, if a
    /// page falls outside it.
    pub fn write_into(&self, image: &mut [u8], first_index: u64) -> Result<(), CodecError> {
        let ps = self.page_size as u64;
        let pages = image.len() as u64 / ps;
        for o in self.out {
            let (first, count) = match *o {
                Out::Zero { first, count } => (first, count),
                Out::Data { index, .. } => (index, 1),
            };
            let ok = first
                .checked_sub(first_index)
                .and_then(|rel| rel.checked_add(count))
                .is_some_and(|end| end <= pages);
            if !ok {
                return Err(CodecError::InvalidInput(format!(
                    "page {first} (+{count}) is outside the image of {pages} pages from {first_index}"
                )));
            }
        }
        for p in self.iter() {
            match p {
                DecodedPage::Zero { first, count } => {
                    let at = ((first - first_index) * ps) as usize;
                    image[at..at + (count * ps) as usize].fill(0);
                }
                DecodedPage::Data { index, bytes } => {
                    let at = ((index - first_index) * ps) as usize;
                    image[at..at + bytes.len()].copy_from_slice(bytes);
                }
            }
        }
        Ok(())
    }
}

/// Decodes page frames and chunk frames from one [`Encoder`](crate::Encoder),
/// in the order it wrote them, keeping the same state it keeps.
#[derive(Debug)]
pub struct Decoder {
    page_size: usize,
    page_shift: u8,
    key: Option<crate::SessionKey>,
    limits: DecodeLimits,
    store: Store,
    baseline: Option<Baseline>,
    decomp: Decompressors,
    seq: u64,
    poisoned: bool,
    /// Page frames without a checksum are accepted
    /// ([`Decoder::accept_unchecked`]).
    accept_unchecked: bool,
    entries: Vec<Entry>,
    out: Vec<Out>,
    chunk: Vec<u8>,
}

impl Decoder {
    /// A new decoder with default limits.
    pub fn new(config: &CodecConfig) -> Decoder {
        Decoder::with_limits(config, DecodeLimits::default())
    }

    /// A new decoder with the given limits.
    pub fn with_limits(config: &CodecConfig, limits: DecodeLimits) -> Decoder {
        Decoder {
            page_size: config.page_size.bytes(),
            page_shift: config.page_size.shift(),
            key: config.key.clone(),
            limits,
            store: Store::new(config.page_size.bytes(), config.state_limit),
            baseline: None,
            decomp: Decompressors::new(),
            seq: 0,
            poisoned: false,
            accept_unchecked: false,
            entries: Vec::new(),
            out: Vec::new(),
            chunk: Vec::new(),
        }
    }

    /// With `true`, accepts page frames that carry no checksum
    /// ([`FLAG_UNCHECKED`](crate::frame::FLAG_UNCHECKED), written by an
    /// encoder with [`Encoder::set_page_checksums`](crate::Encoder::set_page_checksums)
    /// off) besides checked ones. Only for frames taken from a container
    /// that verified every byte of them against what their sender sent
    /// (an AMST region the receiver finished): nothing else would notice
    /// them corrupted. Off by default ([`DecodeError::Unchecked`]).
    pub fn accept_unchecked(&mut self, on: bool) {
        self.accept_unchecked = on;
    }

    /// Holds `baseline`: pages the encoder may refer to by hash once it has
    /// the baseline's advertisement.
    pub fn set_baseline(&mut self, baseline: Baseline) -> Result<(), CodecError> {
        if baseline.page_size().bytes() != self.page_size {
            return Err(CodecError::InvalidConfig(format!(
                "baseline page size {} differs from the decoder's {}",
                baseline.page_size().bytes(),
                self.page_size
            )));
        }
        self.baseline = Some(baseline);
        Ok(())
    }

    /// Touches the whole state arena now (see [`Encoder::prefault`](crate::Encoder::prefault)).
    pub fn prefault(&mut self) {
        self.store.prefault();
    }

    /// Takes `arena` as the memory of its state, when it holds no state
    /// yet (else returns it): memory the caller made ready before a session
    /// began (allocated and touched while nothing was waiting), so that the
    /// first frames do not pay for its page faults. Its contents do not
    /// matter; the state limit stays what it was.
    pub fn adopt_arena(&mut self, arena: Vec<u8>) -> Result<(), Vec<u8>> {
        self.store.adopt_arena(arena)
    }

    /// Bytes of page content held as state now.
    pub fn state_bytes(&self) -> usize {
        self.store.retained_bytes()
    }

    /// Decodes the next page frame. On error nothing changes, except for the
    /// errors that [`DecodeError::poisons_state`] names.
    pub fn decode_pages(&mut self, frame: &[u8]) -> Result<DecodedPages<'_>, DecodeError> {
        if self.poisoned {
            return Err(DecodeError::Desynchronized);
        }
        let h = self.check_frame(frame, FrameKind::Pages)?;
        if h.page_shift != self.page_shift {
            return Err(DecodeError::PageSizeMismatch {
                found: 1u64.checked_shl(u32::from(h.page_shift)).unwrap_or(0),
                expected: self.page_size as u64,
            });
        }
        if h.seq != self.seq {
            return Err(DecodeError::OutOfSequence {
                found: h.seq,
                expected: self.seq,
            });
        }
        if h.entries > self.limits.max_entries {
            return Err(DecodeError::OverLimit {
                what: "page table entries",
                value: u64::from(h.entries),
                limit: u64::from(self.limits.max_entries),
            });
        }
        let table_end = HEADER_LEN + h.table_len as usize;
        let table_bytes = &frame[HEADER_LEN..table_end];
        let payload = &frame[table_end..table_end + h.payload_len as usize];
        let ps = self.page_size as u64;

        // Parse and validate the whole table before touching any state.
        self.entries.clear();
        let first_id = self.store.next_id();
        let (mut pos, mut expected, mut id) = (0usize, 0u64, first_id);
        let (mut raw_len, mut rebuilt, mut pages) = (0u64, 0u64, 0u64);
        let mut stats = FrameStats::default();
        for n in 0..u64::from(h.entries) {
            let e = table::get(table_bytes, &mut pos, &mut expected, id, n)?;
            match e.kind {
                EntryKind::Zero { count } => {
                    pages = pages.saturating_add(count);
                    stats.zero = stats.zero.saturating_add(count);
                }
                EntryKind::Raw => {
                    raw_len += ps;
                    stats.raw += 1;
                }
                EntryKind::Delta { len, .. } => {
                    if len > 2 * ps {
                        return Err(DecodeError::OverLimit {
                            what: "delta length",
                            value: len,
                            limit: 2 * ps,
                        });
                    }
                    raw_len += len;
                    rebuilt += 1;
                    stats.delta += 1;
                }
                EntryKind::Ref { .. } => {
                    rebuilt += 1;
                    stats.reference += 1;
                }
                EntryKind::Base { .. } => {
                    rebuilt += 1;
                    stats.baseline += 1;
                }
            }
            if e.kind.is_content() {
                id += 1;
                pages += 1;
            }
            if pages > self.limits.max_pages {
                return Err(DecodeError::OverLimit {
                    what: "pages in a frame",
                    value: pages,
                    limit: self.limits.max_pages,
                });
            }
            if raw_len > self.limits.max_raw_len {
                return Err(DecodeError::OverLimit {
                    what: "payload length",
                    value: raw_len,
                    limit: self.limits.max_raw_len,
                });
            }
            self.entries.push(e);
        }
        if pos != table_bytes.len() {
            return Err(DecodeError::TrailingBytes {
                what: "page table",
                extra: (table_bytes.len() - pos) as u64,
            });
        }
        if raw_len != u64::from(h.raw_len) {
            return Err(DecodeError::LengthMismatch {
                what: "payload length",
                declared: u64::from(h.raw_len),
                actual: raw_len,
            });
        }
        let content_len = raw_len + rebuilt * ps;
        if content_len > self.limits.max_raw_len {
            return Err(DecodeError::OverLimit {
                what: "frame content length",
                value: content_len,
                limit: self.limits.max_raw_len,
            });
        }
        let content_len = content_len as usize;
        let plan = self.store.plan(content_len);
        let oldest = self.store.oldest_after(&plan);
        let mut cid = first_id;
        for (n, e) in self.entries.iter_mut().enumerate() {
            match &mut e.kind {
                EntryKind::Ref { target } if *target < first_id && *target < oldest => {
                    return Err(DecodeError::UnknownReference {
                        entry: n as u64,
                        content: *target,
                    });
                }
                EntryKind::Delta { base, .. } => match self.store.page(e.index) {
                    Some(b) if b >= oldest => *base = b,
                    _ => {
                        return Err(DecodeError::MissingDeltaBase {
                            entry: n as u64,
                            page: e.index,
                        });
                    }
                },
                EntryKind::Base { hash }
                    if self.baseline.as_ref().and_then(|b| b.get(hash)).is_none() =>
                {
                    return Err(DecodeError::UnknownBaseline {
                        entry: n as u64,
                        hash: hash.to_hex(),
                    });
                }
                _ => {}
            }
            if e.kind.is_content() {
                cid += 1;
            }
        }
        debug_assert_eq!(cid, id);

        // From here on the state changes; a failure leaves it out of step.
        self.poisoned = true;
        let region = self.store.begin(plan, content_len);
        self.decomp
            .decompress(h.compression, payload, &mut region[..raw_len as usize])?;
        self.out.clear();
        let ps = self.page_size;
        let raw_len = raw_len as usize;
        let (mut at, mut rebuilt_at) = (0usize, raw_len);
        let mut offsets_of_content: usize = 0;
        for (n, e) in self.entries.iter().enumerate() {
            let offset = match e.kind {
                EntryKind::Zero { count } => {
                    self.store.forget_pages(e.index, count);
                    self.out.push(Out::Zero {
                        first: e.index,
                        count,
                    });
                    continue;
                }
                EntryKind::Raw => {
                    at += ps;
                    at - ps
                }
                EntryKind::Delta { base, len } => {
                    let len = len as usize;
                    if !self.store.copy_into_region(Some(base), 0, rebuilt_at) {
                        // Validated above; reaching here means the state is not what
                        // validation saw.
                        return Err(DecodeError::Desynchronized);
                    }
                    let region = self.store.region_mut();
                    let (body, rest) = region.split_at_mut(raw_len);
                    delta::apply(
                        &mut rest[rebuilt_at - raw_len..rebuilt_at - raw_len + ps],
                        &body[at..at + len],
                        n as u64,
                    )?;
                    at += len;
                    rebuilt_at += ps;
                    rebuilt_at - ps
                }
                EntryKind::Ref { target } => {
                    let ok = if target >= first_id {
                        let src = self.store.content_offset_in_frame(target - first_id);
                        src.is_some_and(|s| self.store.copy_into_region(None, s, rebuilt_at))
                    } else {
                        self.store.copy_into_region(Some(target), 0, rebuilt_at)
                    };
                    if !ok {
                        return Err(DecodeError::Desynchronized);
                    }
                    rebuilt_at += ps;
                    rebuilt_at - ps
                }
                EntryKind::Base { hash } => {
                    let Some(src) = self.baseline.as_ref().and_then(|b| b.get(&hash)) else {
                        return Err(DecodeError::Desynchronized);
                    };
                    self.store.region_mut()[rebuilt_at..rebuilt_at + ps].copy_from_slice(src);
                    rebuilt_at += ps;
                    rebuilt_at - ps
                }
            };
            self.store.add_content(e.index, offset);
            offsets_of_content += 1;
            self.out.push(Out::Data {
                index: e.index,
                offset,
            });
        }
        debug_assert_eq!(offsets_of_content as u64, id - first_id);
        self.store.finish();
        self.seq += 1;
        self.poisoned = false;
        stats.pages = pages;
        stats.input_bytes = pages.saturating_mul(ps as u64);
        stats.frame_bytes = frame.len() as u64;
        stats.compression = Some(h.compression);
        Ok(DecodedPages {
            region: self.store.region(),
            out: &self.out,
            page_size: ps,
            stats,
        })
    }

    /// Decodes a chunk frame; returns the encoder's `seq` and the bytes,
    /// valid until the next call. Chunks use no state and can arrive in any
    /// order.
    pub fn decode_chunk<'a>(&'a mut self, frame: &'a [u8]) -> Result<(u64, &'a [u8]), DecodeError> {
        self.decode_chunk_at(frame, None)
            .map(|(seq, bytes, _)| (seq, bytes))
    }

    /// [`Decoder::decode_chunk`] of a chunk encoded with
    /// [`crate::Encoder::encode_chunk_at`] at `offset`: also returns the
    /// digest its checksum was checked against (the BLAKE3 subtree of its
    /// bytes at that offset, when it can be one).
    ///
    /// The payload is decompressed (within the limits) before the checksum
    /// is checked, since the checksum covers the decoded bytes; nothing is
    /// returned unless it matches.
    pub fn decode_chunk_at<'a>(
        &'a mut self,
        frame: &'a [u8],
        offset: Option<u64>,
    ) -> Result<(u64, &'a [u8], ChunkDigest), DecodeError> {
        if frame.len() as u64 > self.limits.max_frame_len {
            return Err(DecodeError::OverLimit {
                what: "frame length",
                value: frame.len() as u64,
                limit: self.limits.max_frame_len,
            });
        }
        let h = FrameHeader::parse(frame)?;
        if h.kind != FrameKind::Chunk {
            return Err(DecodeError::WrongFrameKind {
                expected: FrameKind::Chunk.name(),
                found: h.kind.name(),
            });
        }
        if h.version < CHUNK_MIN_VERSION {
            return Err(DecodeError::UnsupportedVersion {
                found: h.version,
                min: CHUNK_MIN_VERSION,
                max: VERSION,
            });
        }
        let keyed = h.flags & FLAG_KEYED != 0;
        if keyed != self.key.is_some() {
            return Err(DecodeError::KeyMismatch { frame_keyed: keyed });
        }
        if u64::from(h.raw_len) > self.limits.max_raw_len {
            return Err(DecodeError::OverLimit {
                what: "payload length",
                value: u64::from(h.raw_len),
                limit: self.limits.max_raw_len,
            });
        }
        let n = h.raw_len as usize;
        let payload = &frame[HEADER_LEN..HEADER_LEN + h.payload_len as usize];
        let bytes: &[u8] = if h.compression == Compression::Stored {
            if payload.len() != n {
                return Err(DecodeError::LengthMismatch {
                    what: "stored payload length",
                    declared: n as u64,
                    actual: payload.len() as u64,
                });
            }
            // The bytes are the payload itself: no copy.
            payload
        } else {
            // Every decompressor fills all `n` bytes or fails, so what a
            // previous chunk left in the buffer is never returned: no
            // clearing.
            self.chunk.resize(n, 0);
            self.decomp
                .decompress(h.compression, payload, &mut self.chunk)?;
            &self.chunk
        };
        let digest = ChunkDigest::of(bytes, offset);
        let split = frame.len() - CHECKSUM_LEN;
        let mut expected = [0u8; CHECKSUM_LEN];
        expected.copy_from_slice(&frame[split..]);
        // blake3::Hash compares in constant time.
        if chunk_checksum(self.key.as_ref(), &frame[..HEADER_LEN], &digest)
            != blake3::Hash::from_bytes(expected)
        {
            return Err(DecodeError::BadChecksum);
        }
        Ok((h.seq, bytes, digest))
    }

    /// Header, limits, kind and checksum.
    fn check_frame(&self, frame: &[u8], kind: FrameKind) -> Result<FrameHeader, DecodeError> {
        if frame.len() as u64 > self.limits.max_frame_len {
            return Err(DecodeError::OverLimit {
                what: "frame length",
                value: frame.len() as u64,
                limit: self.limits.max_frame_len,
            });
        }
        let h = FrameHeader::parse(frame)?;
        // The kind first: a chunk frame's checksum is not over its body.
        if h.kind != kind {
            return Err(DecodeError::WrongFrameKind {
                expected: kind.name(),
                found: h.kind.name(),
            });
        }
        verify(self.key.as_ref(), self.accept_unchecked, &h, frame)?;
        if u64::from(h.raw_len) > self.limits.max_raw_len {
            return Err(DecodeError::OverLimit {
                what: "payload length",
                value: u64::from(h.raw_len),
                limit: self.limits.max_raw_len,
            });
        }
        Ok(h)
    }
}
