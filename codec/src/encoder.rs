//! The page and chunk encoder.

use crate::baseline::BaselineAdvert;
use crate::compress::{Compressors, Estimate, Method, bound};
use crate::frame::{
    CHECKSUM_LEN, ChunkDigest, FLAG_KEYED, FLAG_UNCHECKED, FrameHeader, FrameKind, HEADER_LEN,
    VERSION, checksum, chunk_checksum,
};
use crate::store::{FastMap, Store};
use crate::table::{self, Entry, EntryKind};
use crate::{CodecConfig, CodecError, Compression, ContentHash, Policy, delta, page};

/// One page handed to the encoder: its index (guest page number, or any
/// address / page size) and its bytes (exactly one page).
#[derive(Debug, Clone, Copy)]
pub struct PageRef<'a> {
    /// Page index.
    pub index: u64,
    /// Page content.
    pub data: &'a [u8],
}

/// Refuses a chunk longer than one frame may carry.
fn check_chunk_len(data: &[u8]) -> Result<(), CodecError> {
    if data.len() > MAX_FRAME_INPUT {
        return Err(CodecError::InvalidInput(format!(
            "chunk of {} bytes, at most {MAX_FRAME_INPUT}",
            data.len()
        )));
    }
    Ok(())
}

/// What one frame held, per page kind, and its size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Pages in the frame.
    pub pages: u64,
    /// Zero pages.
    pub zero: u64,
    /// Pages sent whole (compressed with the others).
    pub raw: u64,
    /// Pages sent as a delta against their previous version.
    pub delta: u64,
    /// Pages sent as a reference to content the receiver holds.
    pub reference: u64,
    /// Pages sent as a reference into the receiver's baseline.
    pub baseline: u64,
    /// Input bytes (pages x page size, or chunk length).
    pub input_bytes: u64,
    /// Bytes of the whole frame, header and checksum included.
    pub frame_bytes: u64,
    /// Compression used for the payload.
    pub compression: Option<Compression>,
}

impl FrameStats {
    /// Adds another frame's counts to these (compression is the latest).
    pub fn add(&mut self, o: &FrameStats) {
        self.pages += o.pages;
        self.zero += o.zero;
        self.raw += o.raw;
        self.delta += o.delta;
        self.reference += o.reference;
        self.baseline += o.baseline;
        self.input_bytes += o.input_bytes;
        self.frame_bytes += o.frame_bytes;
        if o.compression.is_some() {
            self.compression = o.compression;
        }
    }
}

/// Bytes of output that always hold one page frame of `pages` pages.
pub fn max_page_frame_len(pages: usize, page_size: usize) -> usize {
    HEADER_LEN + pages * table::MAX_ENTRY_LEN + bound(pages * page_size) + CHECKSUM_LEN
}

/// Bytes of output that always hold one chunk frame of `len` bytes.
pub fn max_chunk_frame_len(len: usize) -> usize {
    HEADER_LEN + bound(len) + CHECKSUM_LEN
}

/// Most input bytes one frame may carry (pages x page size, or a chunk's
/// length): 128 MiB. It keeps every header length inside its 32-bit field,
/// and every frame's content (at most 1.5x its input: a delta body of up to
/// half a page plus the rebuilt page) inside a default decoder's 256 MiB
/// limit ([`DecodeLimits`](crate::DecodeLimits)).
pub const MAX_FRAME_INPUT: usize = 128 << 20;

/// A delta this short (bytes) is taken without looking for a duplicate.
const SMALL_DELTA: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Pending {
    entry: Entry,
    /// Input page (for content entries).
    input: usize,
    /// Fingerprint (for content entries).
    fp: u64,
    /// Delta body location in `deltas`.
    delta_off: usize,
    /// Where the page's content lands in the frame's state region.
    at: usize,
}

/// Encodes batches of pages into page frames and byte chunks into chunk
/// frames, keeping the state that lets it send references and deltas.
///
/// One encoder per sending stream (or per core): it reuses its compression
/// contexts and buffers, so encoding allocates nothing once warm. Its frames
/// must be decoded in order by one [`Decoder`](crate::Decoder) built with
/// the same page size, state limit and key.
#[derive(Debug)]
pub struct Encoder {
    page_size: usize,
    page_shift: u8,
    policy: Policy,
    key: Option<crate::SessionKey>,
    store: Store,
    fps: FastMap<u64, u64>,
    local: FastMap<u64, (u64, usize)>,
    order: Vec<(u8, u32, u64, usize)>,
    seen: Vec<u64>,
    baseline: Option<BaselineAdvert>,
    comp: Compressors,
    seq: u64,
    poisoned: bool,
    /// Page frames carry their checksum (see [`Encoder::set_page_checksums`]).
    page_checksums: bool,
    pending: Vec<Pending>,
    deltas: Vec<u8>,
    table: Vec<u8>,
}

impl Encoder {
    /// A new encoder.
    pub fn new(config: &CodecConfig, policy: Policy) -> Result<Encoder, CodecError> {
        policy.validate()?;
        Ok(Encoder {
            page_size: config.page_size.bytes(),
            page_shift: config.page_size.shift(),
            policy,
            key: config.key.clone(),
            store: Store::new(config.page_size.bytes(), config.state_limit),
            fps: FastMap::default(),
            local: FastMap::default(),
            order: Vec::new(),
            seen: Vec::new(),
            baseline: None,
            comp: Compressors::new(),
            seq: 0,
            poisoned: false,
            page_checksums: true,
            pending: Vec::new(),
            deltas: Vec::new(),
            table: Vec::new(),
        })
    }

    /// With `false`, the page frames this encoder writes from now on carry
    /// no checksum ([`FLAG_UNCHECKED`]): for frames that travel inside a
    /// container that verifies every byte before they are decoded (an AMST
    /// region, whose keyed digest the receiver checks), where the frame's
    /// own BLAKE3 would be a second pass over the same bytes at each end.
    /// Their decoder must be told
    /// ([`Decoder::accept_unchecked`](crate::Decoder::accept_unchecked)).
    /// Chunk frames always carry theirs. On by default.
    pub fn set_page_checksums(&mut self, on: bool) {
        self.page_checksums = on;
    }

    /// Uses the receiver's baseline advertisement: pages whose content it
    /// lists go as references. Only content listed there is referenced.
    pub fn set_baseline(&mut self, advert: BaselineAdvert) -> Result<(), CodecError> {
        if advert.page_size().bytes() != self.page_size {
            return Err(CodecError::InvalidConfig(format!(
                "baseline page size {} differs from the encoder's {}",
                advert.page_size().bytes(),
                self.page_size
            )));
        }
        self.baseline = Some(advert);
        Ok(())
    }

    /// Changes the policy from the next frame on.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), CodecError> {
        policy.validate()?;
        self.policy = policy;
        Ok(())
    }

    /// The current policy.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Gives `auto` the calling thread's CPU clock to time its probes on
    /// (see [`crate::ThreadCpuClock`]); `None` (the default):
    /// the wall clock.
    pub fn set_thread_cpu_clock(&mut self, clock: Option<crate::ThreadCpuClock>) {
        self.comp.set_cpu_clock(clock);
    }

    /// The measured estimates behind `auto` (speed and ratio per method).
    pub fn estimates(&self) -> Vec<(Method, Estimate)> {
        self.comp
            .estimates()
            .iter()
            .filter_map(|e| e.1.map(|x| (e.0, x)))
            .collect()
    }

    /// Touches the whole state arena now, so that the first frames do not pay
    /// for page faults.
    pub fn prefault(&mut self) {
        self.store.prefault();
    }

    /// Bytes of page content held as state now.
    pub fn state_bytes(&self) -> usize {
        self.store.retained_bytes()
    }

    /// The page size.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// Encodes `pages` into one page frame written at the start of `out`,
    /// which must be at least [`max_page_frame_len`] long for them (else the
    /// call fails and nothing changes). Returns the frame's statistics;
    /// the frame is `out[..stats.frame_bytes]`.
    pub fn encode_pages_into(
        &mut self,
        pages: &[PageRef<'_>],
        out: &mut [u8],
    ) -> Result<FrameStats, CodecError> {
        if self.poisoned {
            return Err(CodecError::InvalidInput(
                "encoder state is out of step after an earlier failure; reset both ends".into(),
            ));
        }
        let ps = self.page_size;
        if let Some(p) = pages.iter().find(|p| p.data.len() != ps) {
            return Err(CodecError::InvalidInput(format!(
                "page {} is {} bytes, the page size is {ps}",
                p.index,
                p.data.len()
            )));
        }
        if pages.len() > table::MAX_ENTRIES as usize {
            return Err(CodecError::InvalidInput(format!(
                "{} pages in one frame, at most {}",
                pages.len(),
                table::MAX_ENTRIES
            )));
        }
        if pages.len().saturating_mul(ps) > MAX_FRAME_INPUT {
            return Err(CodecError::InvalidInput(format!(
                "{} pages of {ps} bytes in one frame, at most {MAX_FRAME_INPUT} bytes",
                pages.len()
            )));
        }
        let need = max_page_frame_len(pages.len(), ps);
        if out.len() < need {
            return Err(CodecError::InvalidInput(format!(
                "output buffer of {} bytes, a frame of {} pages needs {need}",
                out.len(),
                pages.len()
            )));
        }
        let mut stats = self.classify(pages);
        // Decide placement; references to content that the placement evicts
        // are sent raw instead. Sizes only shrink, so one more pass settles.
        let (plan, raw_len, content_len) = loop {
            let (raw_len, content_len) = self.sizes();
            let plan = self.store.plan(content_len);
            let oldest = self.store.oldest_after(&plan);
            let first = self.store.next_id();
            let mut changed = false;
            for p in &mut self.pending {
                if let EntryKind::Delta { base, .. } | EntryKind::Ref { target: base } =
                    p.entry.kind
                    && base < first
                    && base < oldest
                {
                    p.entry.kind = EntryKind::Raw;
                    changed = true;
                }
            }
            if !changed {
                break (plan, raw_len, content_len);
            }
        };
        self.write_contents(pages, plan, raw_len, content_len);
        // Table, then payload, then checksum.
        self.table.clear();
        let mut expected = 0u64;
        let first = self.store.next_id() - self.content_count() as u64;
        let mut id = first;
        for p in &self.pending {
            table::put(&mut self.table, &p.entry, &mut expected, id);
            if p.entry.kind.is_content() {
                id += 1;
            }
        }
        stats.raw = 0;
        stats.delta = 0;
        stats.reference = 0;
        stats.baseline = 0;
        for p in &self.pending {
            match p.entry.kind {
                EntryKind::Raw => stats.raw += 1,
                EntryKind::Delta { .. } => stats.delta += 1,
                EntryKind::Ref { .. } => stats.reference += 1,
                EntryKind::Base { .. } => stats.baseline += 1,
                EntryKind::Zero { .. } => {}
            }
        }
        let t = self.table.len();
        out[HEADER_LEN..HEADER_LEN + t].copy_from_slice(&self.table);
        let payload_at = HEADER_LEN + t;
        let block = &self.store.region()[..raw_len];
        let (compression, payload_len) =
            match self
                .comp
                .compress(&self.policy, block, &mut out[payload_at..])
            {
                Ok(r) => r,
                Err(e) => {
                    // The state already moved on; the decoder will never see it.
                    self.poisoned = true;
                    return Err(e);
                }
            };
        let flags = match (self.page_checksums, self.key.is_some()) {
            (false, _) => FLAG_UNCHECKED,
            (true, true) => FLAG_KEYED,
            (true, false) => 0,
        };
        let header = FrameHeader {
            version: VERSION,
            kind: FrameKind::Pages,
            compression,
            page_shift: self.page_shift,
            flags,
            entries: self.pending.len() as u32,
            table_len: t as u32,
            payload_len: payload_len as u32,
            raw_len: raw_len as u32,
            seq: self.seq,
        };
        header.write(&mut out[..HEADER_LEN]);
        let body = payload_at + payload_len;
        let mut end = body;
        if self.page_checksums {
            let sum = checksum(self.key.as_ref(), &out[..body]);
            end += CHECKSUM_LEN;
            out[body..end].copy_from_slice(sum.as_bytes());
        }
        self.seq += 1;
        stats.frame_bytes = end as u64;
        stats.compression = Some(compression);
        Ok(stats)
    }

    /// [`Encoder::encode_pages_into`] into a `Vec`, which is cleared first.
    pub fn encode_pages(
        &mut self,
        pages: &[PageRef<'_>],
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, CodecError> {
        out.clear();
        out.resize(max_page_frame_len(pages.len(), self.page_size), 0);
        let r = self.encode_pages_into(pages, out);
        out.truncate(r.as_ref().map_or(0, |s| s.frame_bytes as usize));
        r
    }

    /// Encodes the contiguous pages of `data` (a whole number of pages),
    /// the first being page `first_index`, into one frame.
    pub fn encode_region(
        &mut self,
        first_index: u64,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, CodecError> {
        if !data.len().is_multiple_of(self.page_size) {
            return Err(CodecError::InvalidInput(format!(
                "region of {} bytes is not a whole number of {}-byte pages",
                data.len(),
                self.page_size
            )));
        }
        let pages: Vec<PageRef<'_>> = data
            .chunks_exact(self.page_size)
            .zip(first_index..)
            .map(|(d, index)| PageRef { index, data: d })
            .collect();
        self.encode_pages(&pages, out)
    }

    /// Encodes a chunk of bytes into one chunk frame at the start of `out`
    /// (at least [`max_chunk_frame_len`] long). `seq` is returned by the
    /// decoder as is. Chunks use no state.
    pub fn encode_chunk_into(
        &mut self,
        data: &[u8],
        seq: u64,
        out: &mut [u8],
    ) -> Result<FrameStats, CodecError> {
        self.encode_chunk_at(data, seq, None, out).map(|(s, _)| s)
    }

    /// [`Encoder::encode_chunk_into`] for a chunk that lies at `offset` of
    /// its region: its checksum covers the BLAKE3 subtree of its bytes at
    /// that offset, which is returned too, so the caller can assemble the
    /// region's digest without hashing again. The decoder must be given the
    /// same offset.
    pub fn encode_chunk_at(
        &mut self,
        data: &[u8],
        seq: u64,
        offset: Option<u64>,
        out: &mut [u8],
    ) -> Result<(FrameStats, ChunkDigest), CodecError> {
        check_chunk_len(data)?;
        let need = max_chunk_frame_len(data.len());
        if out.len() < need {
            return Err(CodecError::InvalidInput(format!(
                "output buffer of {} bytes, a chunk of {} bytes needs {need}",
                out.len(),
                data.len()
            )));
        }
        let (compression, n) = self
            .comp
            .compress(&self.policy, data, &mut out[HEADER_LEN..])?;
        let (head, rest) = out.split_at_mut(HEADER_LEN);
        let digest =
            self.chunk_frame_ends(data, seq, offset, compression, n, head, &mut rest[n..])?;
        Ok((
            FrameStats {
                input_bytes: data.len() as u64,
                frame_bytes: (HEADER_LEN + n + CHECKSUM_LEN) as u64,
                compression: Some(compression),
                ..FrameStats::default()
            },
            digest,
        ))
    }

    /// [`Encoder::encode_chunk_at`] for a chunk sent stored, without copying
    /// it: writes the frame's header into `head` ([`HEADER_LEN`] bytes) and
    /// its checksum into `sum` ([`CHECKSUM_LEN`] bytes). The frame is `head`,
    /// then `data` as it is, then `sum`: byte for byte what
    /// `encode_chunk_at` writes under [`Policy::Stored`], whatever this
    /// encoder's policy. For senders that hand the kernel the three pieces
    /// (one `sendmsg`) instead of assembling the frame.
    pub fn encode_stored_chunk_at(
        &mut self,
        data: &[u8],
        seq: u64,
        offset: Option<u64>,
        head: &mut [u8],
        sum: &mut [u8],
    ) -> Result<(FrameStats, ChunkDigest), CodecError> {
        check_chunk_len(data)?;
        let (Some(head), Some(sum)) = (head.get_mut(..HEADER_LEN), sum.get_mut(..CHECKSUM_LEN))
        else {
            return Err(CodecError::InvalidInput(format!(
                "header room of {} bytes and checksum room of {}, need {HEADER_LEN} and {CHECKSUM_LEN}",
                head.len(),
                sum.len()
            )));
        };
        let n = data.len();
        let digest = self.chunk_frame_ends(data, seq, offset, Compression::Stored, n, head, sum)?;
        Ok((
            FrameStats {
                input_bytes: n as u64,
                frame_bytes: (HEADER_LEN + n + CHECKSUM_LEN) as u64,
                compression: Some(Compression::Stored),
                ..FrameStats::default()
            },
            digest,
        ))
    }

    /// Writes a chunk frame's header (its payload: `payload_len` bytes of
    /// `data` under `compression`) into `head` and its checksum into the
    /// start of `sum`; returns the chunk's digest.
    #[allow(clippy::too_many_arguments)]
    fn chunk_frame_ends(
        &self,
        data: &[u8],
        seq: u64,
        offset: Option<u64>,
        compression: Compression,
        payload_len: usize,
        head: &mut [u8],
        sum: &mut [u8],
    ) -> Result<ChunkDigest, CodecError> {
        let header = FrameHeader {
            version: VERSION,
            kind: FrameKind::Chunk,
            compression,
            page_shift: 0,
            flags: if self.key.is_some() { FLAG_KEYED } else { 0 },
            entries: 0,
            table_len: 0,
            payload_len: payload_len as u32,
            raw_len: data.len() as u32,
            seq,
        };
        header.write(&mut head[..HEADER_LEN]);
        let digest = ChunkDigest::of(data, offset);
        let s = chunk_checksum(self.key.as_ref(), &head[..HEADER_LEN], &digest);
        let Some(out) = sum.get_mut(..CHECKSUM_LEN) else {
            return Err(CodecError::InvalidInput(format!(
                "checksum room of {} bytes, need {CHECKSUM_LEN}",
                sum.len()
            )));
        };
        out.copy_from_slice(s.as_bytes());
        Ok(digest)
    }

    /// [`Encoder::encode_chunk_into`] into a `Vec`, which is cleared first.
    pub fn encode_chunk(
        &mut self,
        data: &[u8],
        seq: u64,
        out: &mut Vec<u8>,
    ) -> Result<FrameStats, CodecError> {
        out.clear();
        out.resize(max_chunk_frame_len(data.len()), 0);
        let r = self.encode_chunk_into(data, seq, out);
        out.truncate(r.as_ref().map_or(0, |s| s.frame_bytes as usize));
        r
    }

    /// Pass 1: picks each page's form against the state as it is now.
    fn classify(&mut self, pages: &[PageRef<'_>]) -> FrameStats {
        let ps = self.page_size;
        self.pending.clear();
        self.deltas.clear();
        self.local.clear();
        let mut stats = FrameStats {
            pages: pages.len() as u64,
            input_bytes: (pages.len() * ps) as u64,
            ..FrameStats::default()
        };
        let mut next_id = self.store.next_id();
        let ratio = self.comp.expected_ratio(&self.policy).max(1.0);
        let delta_cap = ((ps as f64 / ratio) as usize).min(ps / 2);
        self.plan_order(pages);
        for k in 0..self.order.len() {
            let (class, _, _, i) = self.order[k];
            let p = &pages[i];
            if class == 0 {
                stats.zero += 1;
                if let Some(last) = self.pending.last_mut()
                    && let EntryKind::Zero { count } = &mut last.entry.kind
                    && last.entry.index.checked_add(*count) == Some(p.index)
                {
                    *count += 1;
                    continue;
                }
                self.pending.push(Pending {
                    entry: Entry {
                        index: p.index,
                        kind: EntryKind::Zero { count: 1 },
                    },
                    input: i,
                    fp: 0,
                    delta_off: 0,
                    at: 0,
                });
                continue;
            }
            let id = next_id;
            next_id += 1;
            let fp = page::fingerprint(p.data);
            let delta_off = self.deltas.len();
            let mut kind = EntryKind::Raw;
            // Class 2 means plan_order found no held version already.
            if class == 1
                && let Some(base) = self.store.page(p.index)
                && let Some(old) = self.store.content(base)
            {
                // One pass: an empty delta means the page did not change.
                kind = match delta::encode(old, p.data, &mut self.deltas, delta_cap) {
                    Some(0) => EntryKind::Ref { target: base },
                    Some(len) => EntryKind::Delta {
                        base,
                        len: len as u64,
                    },
                    None => EntryKind::Raw,
                };
            }
            let want_dup = match kind {
                EntryKind::Raw => true,
                EntryKind::Delta { len, .. } => len as usize > SMALL_DELTA,
                _ => false,
            };
            if want_dup {
                let local = self.local.get(&fp).copied();
                let dup = if let Some((lid, input)) = local
                    && pages[input].data == p.data
                {
                    Some(lid)
                } else if let Some(&sid) = self.fps.get(&fp)
                    && self.store.content(sid) == Some(p.data)
                {
                    Some(sid)
                } else {
                    None
                };
                if let Some(target) = dup {
                    self.deltas.truncate(delta_off);
                    kind = EntryKind::Ref { target };
                }
            }
            if matches!(kind, EntryKind::Raw)
                && let Some(bl) = &self.baseline
            {
                let candidates = bl.candidates(fp);
                if !candidates.is_empty() {
                    let h = ContentHash::of(p.data);
                    if candidates.contains(&h) {
                        kind = EntryKind::Base { hash: h };
                    }
                }
            }
            self.local.insert(fp, (id, i));
            self.pending.push(Pending {
                entry: Entry {
                    index: p.index,
                    kind,
                },
                input: i,
                fp,
                delta_off,
                at: 0,
            });
        }
        stats
    }

    /// Chooses the order pages go into the frame: zero pages first (so
    /// that runs merge), then pages whose previous version is held (delta
    /// candidates) by index, then the rest grouped by [`page::signature`] so
    /// that similar pages sit within the compressor's window. A batch that
    /// names a page index twice keeps its own order (the last version must
    /// stay last).
    fn plan_order(&mut self, pages: &[PageRef<'_>]) {
        self.order.clear();
        self.seen.clear();
        self.seen.extend(pages.iter().map(|p| p.index));
        self.seen.sort_unstable();
        let unique = self.seen.windows(2).all(|w| w[0] != w[1]);
        for (i, p) in pages.iter().enumerate() {
            let (class, sig) = if page::is_zero(p.data) {
                (0, 0)
            } else if !unique || self.store.page(p.index).is_some() {
                (1, 0)
            } else {
                (2, u32::MAX - page::signature(p.data))
            };
            self.order.push((class, sig, p.index, i));
        }
        if unique {
            self.order.sort_unstable();
        } else {
            // Zero pages are still tagged as such; the order is the caller's.
            self.order.sort_by_key(|o| o.3);
        }
    }

    fn content_count(&self) -> usize {
        self.pending
            .iter()
            .filter(|p| p.entry.kind.is_content())
            .count()
    }

    /// (payload bytes before compression, content bytes kept as state).
    fn sizes(&self) -> (usize, usize) {
        let ps = self.page_size;
        let (mut raw, mut rebuilt) = (0usize, 0usize);
        for p in &self.pending {
            match p.entry.kind {
                EntryKind::Raw => raw += ps,
                EntryKind::Delta { len, .. } => {
                    raw += len as usize;
                    rebuilt += ps;
                }
                EntryKind::Ref { .. } | EntryKind::Base { .. } => rebuilt += ps,
                EntryKind::Zero { .. } => {}
            }
        }
        (raw, raw + rebuilt)
    }

    /// Writes the payload block and the rebuilt pages into the state region
    /// exactly as the decoder will, and records the new contents.
    fn write_contents(
        &mut self,
        pages: &[PageRef<'_>],
        plan: crate::store::Placement,
        raw_len: usize,
        len: usize,
    ) {
        let ps = self.page_size;
        let region = self.store.begin(plan, len);
        let mut at = 0usize;
        let mut rebuilt = raw_len;
        for p in &mut self.pending {
            let data = pages[p.input].data;
            match p.entry.kind {
                EntryKind::Raw => {
                    region[at..at + ps].copy_from_slice(data);
                    p.at = at;
                    at += ps;
                }
                EntryKind::Delta { len, .. } => {
                    let len = len as usize;
                    region[at..at + len]
                        .copy_from_slice(&self.deltas[p.delta_off..p.delta_off + len]);
                    at += len;
                    region[rebuilt..rebuilt + ps].copy_from_slice(data);
                    p.at = rebuilt;
                    rebuilt += ps;
                }
                EntryKind::Ref { .. } | EntryKind::Base { .. } => {
                    region[rebuilt..rebuilt + ps].copy_from_slice(data);
                    p.at = rebuilt;
                    rebuilt += ps;
                }
                EntryKind::Zero { .. } => {}
            }
        }
        for p in &self.pending {
            match p.entry.kind {
                EntryKind::Zero { count } => {
                    self.store.forget_pages(p.entry.index, count);
                }
                _ => {
                    let id = self.store.add_content(p.entry.index, p.at);
                    self.fps.insert(p.fp, id);
                }
            }
        }
        self.store.finish();
        let oldest = self.store.oldest_held();
        if self.fps.len() > 2 * (self.store.next_id() - oldest) as usize + 65536 {
            self.fps.retain(|_, id| *id >= oldest);
        }
    }
}
