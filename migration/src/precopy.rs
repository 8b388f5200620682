//! Pre-copy migration over an AMST session: the source driver
//! ([`migrate_out`]) and the destination ([`Incoming`]).
//!
//! Guest pages travel as HDE page frames (zero pages as tags, LZ4 for the
//! rest), encoded by the source. Memory is cut into `shards`, each with its
//! own encoder and, at the destination, its own decoder, so that codec state
//! stays in step while batches of different shards travel on different
//! streams. Each batch is one region of the session: the frames of up to
//! [`BATCH_PAGES`] pages of one shard, numbered per shard. The destination
//! receives regions into memory (verified by the transport), and an applier
//! thread decodes each shard's batches in order into guest memory.
//!
//! The last region, `End`, carries the number of batches of every shard.
//! The destination finishes it (and so the source hears `DONE`) only after
//! every batch is applied, the device state is loaded and the guest runs:
//! the source's success means the destination runs. Any failure before that
//! leaves the source guest running.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dwcp_codec::{CodecConfig, DecodedPage, Decoder, Encoder, PageRef, Policy};
use dwcp_transport::{MemorySink, RegionInfo, RegionWriter, Sender, Sink};

use crate::controller::{
    ControllerConfig, Decision, MigrationSummary, PrecopyController, RoundMetrics, RoundReport,
    StopCopyReport,
};
use crate::hv::{DestHypervisor, GuestRegion, HvError, PAGE_SIZE, SourceHypervisor, bitmap_words};

/// Pages per batch (one region of the session): 16 MiB of guest memory.
pub const BATCH_PAGES: usize = 4096;
/// Pages per page frame.
const FRAME_PAGES: usize = 256;
/// Batches the source keeps unconfirmed at once.
const IN_FLIGHT: usize = 16;
/// Largest device-state blob accepted.
pub const MAX_DEVICE_STATE: usize = 16 << 20;

const PART_LAYOUT: u8 = 1;
const PART_PAGES: u8 = 2;
const PART_DEVICE: u8 = 3;
const PART_END: u8 = 4;

/// A migration that did not complete; the source guest runs on.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The controller gave up (deadline, round limit, no convergence).
    #[error("migration cancelled: {0}")]
    Cancelled(String),
    /// The hypervisor failed.
    #[error(transparent)]
    Hypervisor(#[from] HvError),
    /// The session failed, or the destination refused something.
    #[error("transport: {0}")]
    Transport(#[from] dwcp_transport::TransportError),
    /// The codec refused a page batch.
    #[error("codec: {0}")]
    Codec(#[from] dwcp_codec::CodecError),
}

/// Settings of a source.
#[derive(Debug, Clone)]
pub struct MigrateConfig {
    /// Convergence rules.
    pub controller: ControllerConfig,
    /// Codec policy of page frames.
    pub policy: Policy,
    /// Independent codec streams (at least 1).
    pub shards: usize,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            controller: ControllerConfig::default(),
            policy: Policy::Datacenter,
            shards: 2,
        }
    }
}

/// What a completed migration did.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// The controller's summary (rounds, bytes, throttle, downtime).
    pub summary: MigrationSummary,
    /// Every round.
    pub rounds: Vec<RoundMetrics>,
    /// From the pause of the source to the destination's confirmation that
    /// its guest runs.
    pub downtime: Duration,
    /// From the start of round 0 to that confirmation.
    pub total: Duration,
    /// Bytes the session put on its sockets.
    pub wire_bytes: u64,
}

fn meta_pages(shard: u16, seq: u32) -> Vec<u8> {
    let mut m = vec![PART_PAGES];
    m.extend_from_slice(&shard.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m
}

fn layout_bytes(regions: &[GuestRegion]) -> Vec<u8> {
    let mut b = vec![PART_LAYOUT];
    b.extend_from_slice(&(regions.len() as u32).to_le_bytes());
    for r in regions {
        b.extend_from_slice(&r.gpa.to_le_bytes());
        b.extend_from_slice(&(r.len() as u64).to_le_bytes());
    }
    b
}

/// Encodes and sends pages, one encoder per shard, keeping at most
/// [`IN_FLIGHT`] batches unconfirmed.
struct Pump<'a> {
    sender: &'a Sender,
    encoders: Vec<Encoder>,
    /// Batches sent per shard.
    seqs: Vec<u32>,
    in_flight: VecDeque<u32>,
    staging: Vec<u8>,
    frame: Vec<u8>,
}

/// Pages and zero pages sent.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    pages: u64,
    zero: u64,
}

impl<'a> Pump<'a> {
    fn new(sender: &'a Sender, cfg: &MigrateConfig) -> Result<Self, MigrationError> {
        let codec = CodecConfig::default();
        let encoders = (0..cfg.shards.max(1))
            .map(|_| Encoder::new(&codec, cfg.policy))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Pump {
            sender,
            seqs: vec![0; encoders.len()],
            encoders,
            in_flight: VecDeque::new(),
            staging: vec![0; FRAME_PAGES * PAGE_SIZE],
            frame: Vec::new(),
        })
    }

    /// Sends `pages` (global page numbers, ascending) read from `regions`.
    fn send(&mut self, regions: &[GuestRegion], pages: &[u64]) -> Result<Sent, MigrationError> {
        let mut sent = Sent::default();
        for (b, batch) in pages.chunks(BATCH_PAGES).enumerate() {
            let shard = b % self.encoders.len();
            let mut bytes = Vec::new();
            for group in batch.chunks(FRAME_PAGES) {
                for (k, &p) in group.iter().enumerate() {
                    let (region, offset) = locate(regions, p)?;
                    region.read(
                        offset,
                        &mut self.staging[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                    )?;
                }
                let refs: Vec<PageRef<'_>> = group
                    .iter()
                    .enumerate()
                    .map(|(k, &p)| PageRef {
                        index: p,
                        data: &self.staging[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                    })
                    .collect();
                let stats = self.encoders[shard].encode_pages(&refs, &mut self.frame)?;
                sent.pages += stats.pages;
                sent.zero += stats.zero;
                bytes.extend_from_slice(&self.frame);
            }
            let seq = self.seqs[shard];
            self.seqs[shard] += 1;
            self.submit(meta_pages(shard as u16, seq), bytes)?;
        }
        Ok(sent)
    }

    fn submit(&mut self, meta: Vec<u8>, bytes: Vec<u8>) -> Result<(), MigrationError> {
        let digest = *blake3::hash(&bytes).as_bytes();
        let id = self.sender.open_region(meta, Arc::new(bytes))?;
        self.sender.close_region(id, digest)?;
        self.in_flight.push_back(id);
        while self.in_flight.len() > IN_FLIGHT {
            self.wait_one()?;
        }
        Ok(())
    }

    fn wait_one(&mut self) -> Result<(), MigrationError> {
        if let Some(id) = self.in_flight.pop_front() {
            self.sender.wait_region(id)?;
        }
        Ok(())
    }

    fn drain(&mut self) -> Result<(), MigrationError> {
        while !self.in_flight.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }
}

/// The region and byte offset of global page `p`.
fn locate(regions: &[GuestRegion], p: u64) -> Result<(&GuestRegion, usize), HvError> {
    let mut first = 0u64;
    for r in regions {
        let n = r.pages() as u64;
        if p < first + n {
            return Ok((r, ((p - first) as usize) * PAGE_SIZE));
        }
        first += n;
    }
    Err(HvError::new("guest memory", format!("no page {p}")))
}

/// Reads and clears every region's dirty bitmap; returns the dirty pages
/// as global page numbers, ascending.
fn dirty_pages(
    hv: &mut dyn SourceHypervisor,
    regions: &[GuestRegion],
) -> Result<Vec<u64>, HvError> {
    let mut out = Vec::new();
    let mut first = 0u64;
    for (i, r) in regions.iter().enumerate() {
        let mut bitmap = vec![0u64; bitmap_words(r.pages())];
        hv.read_and_clear_dirty(i, &mut bitmap)?;
        for (w, &word) in bitmap.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let b = bits.trailing_zeros() as u64;
                let page = w as u64 * 64 + b;
                if page < r.pages() as u64 {
                    out.push(first + page);
                }
                bits &= bits - 1;
            }
        }
        first += r.pages() as u64;
    }
    Ok(out)
}

/// Migrates the guest behind `hv` over `sender`'s session. On success the
/// destination runs the guest and this one stays paused; on any error the
/// source guest runs on (resumed, unthrottled, dirty log stopped).
/// `on_round` hears every round's figures as they come.
pub fn migrate_out(
    hv: &mut dyn SourceHypervisor,
    sender: &Sender,
    cfg: &MigrateConfig,
    mut on_round: impl FnMut(&RoundMetrics),
) -> Result<MigrationReport, MigrationError> {
    let mut paused = false;
    let r = run_source(hv, sender, cfg, &mut on_round, &mut paused);
    if r.is_err() {
        // The source keeps running, whatever failed.
        if paused {
            let _ = hv.resume();
        }
        let _ = hv.throttle(0);
        let _ = hv.stop_dirty_log();
    }
    r
}

fn run_source(
    hv: &mut dyn SourceHypervisor,
    sender: &Sender,
    cfg: &MigrateConfig,
    on_round: &mut dyn FnMut(&RoundMetrics),
    paused: &mut bool,
) -> Result<MigrationReport, MigrationError> {
    let regions = hv.regions();
    let total_pages: u64 = regions.iter().map(|r| r.pages() as u64).sum();
    let mut ctl = PrecopyController::new(cfg.controller.clone(), total_pages)
        .map_err(|e| MigrationError::Cancelled(e.to_string()))?;
    let mut pump = Pump::new(sender, cfg)?;
    // The destination checks the layout before any page moves.
    let layout = layout_bytes(&regions);
    sender.send_region(layout.clone(), Arc::new(Vec::new()))?;

    let start = Instant::now();
    hv.start_dirty_log()?;
    // A tracker may report every page on its first read: round 0 sends
    // every page anyway, so that read is spent here.
    let _ = dirty_pages(hv, &regions)?;
    let mut pages: Vec<u64> = (0..total_pages).collect();
    let mut round = 0u32;
    loop {
        let started = start.elapsed();
        let wire0 = sender.metrics().wire_bytes;
        let sent = pump.send(&regions, &pages)?;
        pump.drain()?;
        let send_done = start.elapsed();
        let dirty = dirty_pages(hv, &regions)?;
        let m = sender.metrics();
        let report = RoundReport {
            round,
            started,
            send_done,
            ended: start.elapsed(),
            pages_sent: sent.pages,
            zero_pages: sent.zero,
            bytes_sent: sent.pages * PAGE_SIZE as u64,
            wire_bytes: m.wire_bytes - wire0,
            dirty_pages: dirty.len() as u64,
            transport_wire_bandwidth: (m.bandwidth > 0.0).then_some(m.bandwidth),
        };
        let decision = ctl
            .handle_round(report)
            .map_err(|e| MigrationError::Cancelled(e.to_string()))?;
        if let Some(last) = ctl.last_round() {
            on_round(last);
        }
        pages = dirty;
        match decision {
            Decision::Continue {
                throttle,
                end_not_before,
            } => {
                if let Some(p) = throttle {
                    hv.throttle(p)?;
                }
                let now = start.elapsed();
                if end_not_before > now {
                    std::thread::sleep(end_not_before - now);
                }
                // Pages dirtied while waiting go in this round too.
                let more = dirty_pages(hv, &regions)?;
                pages = merge(pages, more);
                round += 1;
            }
            Decision::Cancel(reason) => {
                return Err(MigrationError::Cancelled(reason.to_string()));
            }
            Decision::StopAndCopy { .. } => break,
        }
    }

    // Stop-and-copy.
    let wire0 = sender.metrics().wire_bytes;
    let pause_at = start.elapsed();
    let t0 = Instant::now();
    hv.pause()?;
    *paused = true;
    let last = dirty_pages(hv, &regions)?;
    let pages = merge(pages, last);
    let sent = pump.send(&regions, &pages)?;
    let state = hv.save_device_state()?;
    pump.submit(vec![PART_DEVICE], state)?;
    let mut end = vec![PART_END];
    end.extend_from_slice(&(pump.seqs.len() as u16).to_le_bytes());
    for s in &pump.seqs {
        end.extend_from_slice(&s.to_le_bytes());
    }
    // No wait for the last batches: the destination finishes `End` only
    // once every batch it names is applied, so DONE of `End` means all of
    // them arrived, were verified and applied, and the guest runs.
    sender.send_region(end, Arc::new(Vec::new()))?;
    let downtime = t0.elapsed();
    pump.drain()?;
    let _ = hv.stop_dirty_log();
    let m = sender.metrics();
    ctl.handle_stop_copy(StopCopyReport {
        paused: pause_at,
        resumed: pause_at + downtime,
        pages_sent: sent.pages,
        bytes_sent: sent.pages * PAGE_SIZE as u64,
        wire_bytes: m.wire_bytes - wire0,
    })
    .map_err(|e| MigrationError::Cancelled(e.to_string()))?;
    Ok(MigrationReport {
        summary: ctl.summary(),
        rounds: ctl.rounds().to_vec(),
        downtime,
        total: start.elapsed(),
        wire_bytes: m.wire_bytes,
    })
}

/// The union of two ascending page lists.
fn merge(a: Vec<u64>, b: Vec<u64>) -> Vec<u64> {
    if b.is_empty() {
        return a;
    }
    let mut v = a;
    v.extend(b);
    v.sort_unstable();
    v.dedup();
    v
}

/// The receiving side: a [`Sink`] for the session's receiver that applies
/// what arrives to the destination guest, and starts it at the end.
pub struct Incoming {
    shared: Arc<DestShared>,
    applier: Option<std::thread::JoinHandle<()>>,
}

struct DestShared {
    mem: MemorySink,
    state: Mutex<DestState>,
    cond: Condvar,
}

#[derive(Default)]
struct DestState {
    /// Batches each shard needs, once `End` told.
    end: Option<Vec<u32>>,
    /// The destination guest runs.
    running: bool,
    /// `Some(result)` once the guest runs (and its memory digest is
    /// assembled) or the migration failed.
    outcome: Option<Result<IncomingReport, String>>,
    stop: bool,
}

/// What the destination did.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingReport {
    /// Pages written into guest memory.
    pub pages: u64,
    /// Page batches applied.
    pub batches: u64,
    /// From `End` arriving to the guest running.
    pub finish: Duration,
    /// [`memory_digest`] of the guest memory as the migration left it,
    /// assembled page by page as pages were applied (so nothing is hashed
    /// in the downtime but the last round's pages).
    pub memory_digest: [u8; 32],
}

/// Length of a page's hash in [`memory_digest`].
const PAGE_HASH: usize = 16;

/// The hash of one page in [`memory_digest`].
fn page_hash(page: &[u8]) -> [u8; PAGE_HASH] {
    let mut h = [0u8; PAGE_HASH];
    h.copy_from_slice(&blake3::hash(page).as_bytes()[..PAGE_HASH]);
    h
}

/// BLAKE3 of the concatenated 128-bit BLAKE3 hashes of every page of the
/// regions, in order: what both ends of a migration compute to check that
/// the destination's memory equals the source's at the pause. The source
/// reads its (paused, so frozen) memory after the migration; the
/// destination assembles it as it applies pages.
pub fn memory_digest(regions: &[GuestRegion]) -> Result<[u8; 32], HvError> {
    let mut hashes = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    for r in regions {
        for p in 0..r.pages() {
            let n = PAGE_SIZE.min(r.len() - p * PAGE_SIZE);
            page[n..].fill(0);
            r.read(p * PAGE_SIZE, &mut page[..n])?;
            hashes.push(page_hash(&page));
        }
    }
    Ok(*blake3::hash(hashes.as_flattened()).as_bytes())
}

impl Incoming {
    /// Starts receiving into `hv`'s memory; at most `limit` bytes of
    /// batches are held before they are applied.
    pub fn new(hv: Box<dyn DestHypervisor>, limit: u64) -> Self {
        Self::with_fault(hv, limit, None)
    }

    /// [`Incoming::new`] that changes one byte of page `corrupt` as it
    /// writes it (after the transport verified it): a fault drill for the
    /// end-to-end memory check, which must then disagree.
    pub fn with_fault(hv: Box<dyn DestHypervisor>, limit: u64, corrupt: Option<u64>) -> Self {
        let shared = Arc::new(DestShared {
            mem: MemorySink::new(limit),
            state: Mutex::new(DestState::default()),
            cond: Condvar::new(),
        });
        let s = shared.clone();
        let applier = std::thread::Builder::new()
            .name("dwcp-apply".into())
            .spawn(move || {
                match apply_loop(&s, hv, corrupt) {
                    Ok((report, hashes)) => {
                        // The guest runs: `End` can be answered now, and
                        // the memory digest (a snapshot of the page hashes
                        // as applied) is assembled after, outside the
                        // downtime.
                        {
                            let mut st = lock(&s.state);
                            st.running = true;
                        }
                        s.cond.notify_all();
                        let mut report = report;
                        report.memory_digest = *blake3::hash(hashes.as_flattened()).as_bytes();
                        lock(&s.state).outcome.get_or_insert(Ok(report));
                    }
                    Err(e) => {
                        lock(&s.state).outcome.get_or_insert(Err(e));
                    }
                }
                s.cond.notify_all();
            })
            .ok();
        Incoming { shared, applier }
    }

    /// The sink to give to [`dwcp_transport::Receiver::bind`].
    pub fn sink(&self) -> Arc<dyn Sink> {
        Arc::new(DestSink {
            shared: self.shared.clone(),
        })
    }

    /// Waits up to `wait` for the guest to run (or the migration to fail).
    pub fn wait(&self, wait: Duration) -> Option<Result<IncomingReport, String>> {
        let deadline = Instant::now() + wait;
        let mut st = lock(&self.shared.state);
        loop {
            if let Some(o) = &st.outcome {
                return Some(o.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        lock(&self.shared.state).stop = true;
        self.shared.cond.notify_all();
        if let Some(h) = self.applier.take() {
            let _ = h.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct DestSink {
    shared: Arc<DestShared>,
}

impl Sink for DestSink {
    fn open(&self, info: &RegionInfo) -> Result<Arc<dyn RegionWriter>, String> {
        match info.meta.first() {
            Some(&PART_END) => {
                let counts = parse_end(&info.meta)?;
                Ok(Arc::new(EndWriter {
                    shared: self.shared.clone(),
                    counts,
                }))
            }
            Some(&(PART_LAYOUT | PART_PAGES | PART_DEVICE)) => self.shared.mem.handle().open(info),
            _ => Err("not a migration part".into()),
        }
    }
}

fn parse_end(meta: &[u8]) -> Result<Vec<u32>, String> {
    let n = meta
        .get(1..3)
        .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
        .ok_or("End part is truncated")?;
    let rest = &meta[3..];
    if rest.len() != 4 * n || n == 0 {
        return Err("End part's shard counts do not match its length".into());
    }
    Ok(rest
        .chunks(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// `End`: finishing it waits for the applier to start the guest.
struct EndWriter {
    shared: Arc<DestShared>,
    counts: Vec<u32>,
}

impl RegionWriter for EndWriter {
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), String> {
        Err("End carries no bytes".into())
    }

    fn finish(&self, len: u64, digest: &[u8; 32]) -> Result<(), String> {
        if len != 0 || *digest != *blake3::hash(&[]).as_bytes() {
            return Err("End carries no bytes".into());
        }
        {
            let mut st = lock(&self.shared.state);
            st.end = Some(self.counts.clone());
        }
        self.shared.cond.notify_all();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut st = lock(&self.shared.state);
        loop {
            if st.running {
                return Ok(());
            }
            if let Some(o) = &st.outcome {
                return o.clone().map(|_| ());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err("the destination did not start the guest within 30 s".into());
            }
            st = self
                .shared
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn abort(&self) {}
}

/// Applies batches in per-shard order as they are verified; at `End`,
/// loads the device state and starts the guest.
fn apply_loop(
    shared: &DestShared,
    mut hv: Box<dyn DestHypervisor>,
    corrupt: Option<u64>,
) -> Result<(IncomingReport, Vec<[u8; PAGE_HASH]>), String> {
    let regions = hv.regions();
    let total: usize = regions.iter().map(GuestRegion::pages).sum();
    let mut written = vec![0u64; bitmap_words(total)];
    let zero_hash = page_hash(&[0u8; PAGE_SIZE]);
    let mut hashes = vec![zero_hash; total];
    let mut decoders: Vec<Decoder> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    let mut held: BTreeMap<(u16, u32), Vec<u8>> = BTreeMap::new();
    let mut device: Option<Vec<u8>> = None;
    let mut layout_ok = false;
    let mut report = IncomingReport::default();
    let mut end_at: Option<Instant> = None;
    loop {
        if lock(&shared.state).stop {
            return Err("stopped".into());
        }
        if let Some(r) = shared.mem.take(Duration::from_millis(1)) {
            let bytes = r.bytes.unwrap_or_default();
            match r.meta.first() {
                Some(&PART_LAYOUT) => {
                    if r.meta != layout_bytes(&regions) {
                        return Err("the source's memory layout differs from this guest's".into());
                    }
                    layout_ok = true;
                }
                Some(&PART_PAGES) if r.meta.len() == 7 => {
                    let shard = u16::from_le_bytes([r.meta[1], r.meta[2]]);
                    let seq = u32::from_le_bytes([r.meta[3], r.meta[4], r.meta[5], r.meta[6]]);
                    if usize::from(shard) >= 1024 {
                        return Err(format!("shard {shard} out of range"));
                    }
                    held.insert((shard, seq), bytes);
                }
                Some(&PART_DEVICE) => {
                    if bytes.len() > MAX_DEVICE_STATE {
                        return Err(format!("device state of {} bytes", bytes.len()));
                    }
                    device = Some(bytes);
                }
                _ => return Err("unknown migration part".into()),
            }
        }
        if !layout_ok && !held.is_empty() {
            return Err("pages arrived before the memory layout".into());
        }
        // Apply whatever is next in its shard.
        while let Some((&(shard, seq), _)) = held
            .iter()
            .find(|((s, q), _)| next.get(usize::from(*s)).copied().unwrap_or(0) == *q)
        {
            let bytes = held.remove(&(shard, seq)).unwrap_or_default();
            let s = usize::from(shard);
            while decoders.len() <= s {
                decoders.push(Decoder::new(&CodecConfig::default()));
                next.push(0);
            }
            report.pages += apply(
                &mut decoders[s],
                &regions,
                &mut written,
                &mut hashes,
                &bytes,
                corrupt,
            )?;
            report.batches += 1;
            next[s] += 1;
        }
        let end = lock(&shared.state).end.clone();
        if let Some(counts) = end {
            let t = *end_at.get_or_insert_with(Instant::now);
            let complete = counts
                .iter()
                .enumerate()
                .all(|(s, &c)| next.get(s).copied().unwrap_or(0) >= c);
            if complete && device.is_some() {
                let blob = device.take().unwrap_or_default();
                hv.load_device_state(&blob).map_err(|e| e.to_string())?;
                hv.resume().map_err(|e| e.to_string())?;
                report.finish = t.elapsed();
                return Ok((report, hashes));
            }
        }
    }
}

fn mark(bits: &mut [u64], i: u64) {
    if let Some(w) = bits.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

fn is_marked(bits: &[u64], i: u64) -> bool {
    bits.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

/// Decodes the page frames of one batch into guest memory; returns pages.
/// `written` marks the pages that hold data written by the migration.
fn apply(
    dec: &mut Decoder,
    regions: &[GuestRegion],
    written: &mut [u64],
    hashes: &mut [[u8; PAGE_HASH]],
    bytes: &[u8],
    corrupt: Option<u64>,
) -> Result<u64, String> {
    let zero_hash = page_hash(&[0u8; PAGE_SIZE]);
    let mut readback = vec![0u8; PAGE_SIZE];
    let mut at = 0usize;
    let mut pages = 0u64;
    let zero = [0u8; PAGE_SIZE];
    while at < bytes.len() {
        // The frame's length from its header (the decoder checks the rest).
        let head = bytes
            .get(at..at + dwcp_codec::frame::HEADER_LEN)
            .ok_or("a page frame header runs past its batch")?;
        let u32_at =
            |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
        let n = dwcp_codec::frame::HEADER_LEN
            + dwcp_codec::frame::CHECKSUM_LEN
            + u32_at(16) as usize
            + u32_at(20) as usize;
        let frame = bytes
            .get(at..at.checked_add(n).ok_or("frame too long")?)
            .ok_or("a page frame runs past its batch")?;
        let decoded = dec.decode_pages(frame).map_err(|e| e.to_string())?;
        for p in decoded.iter() {
            match p {
                DecodedPage::Zero { first, count } => {
                    for i in first..first.saturating_add(count) {
                        // Fresh guest memory is zero: only a page written
                        // earlier needs zeroing (and a first touch of
                        // untouched memory is slow).
                        if is_marked(written, i) {
                            let (r, off) = locate(regions, i).map_err(|e| e.to_string())?;
                            r.write(off, &zero).map_err(|e| e.to_string())?;
                        }
                        if let Some(h) = hashes.get_mut(i as usize) {
                            *h = zero_hash;
                        }
                        pages += 1;
                    }
                }
                DecodedPage::Data { index, bytes } => {
                    let (r, off) = locate(regions, index).map_err(|e| e.to_string())?;
                    if corrupt == Some(index) {
                        // Fault drill: one byte changed after the
                        // transport verified it.
                        let mut bad = bytes.to_vec();
                        bad[0] ^= 1;
                        r.write(off, &bad).map_err(|e| e.to_string())?;
                    } else {
                        r.write(off, bytes).map_err(|e| e.to_string())?;
                    }
                    mark(written, index);
                    // The hash is of what guest memory now holds (read back
                    // while in cache), not of what was meant to be written.
                    r.read(off, &mut readback).map_err(|e| e.to_string())?;
                    if let Some(h) = hashes.get_mut(index as usize) {
                        *h = page_hash(&readback);
                    }
                    pages += 1;
                }
            }
        }
        at += n;
    }
    Ok(pages)
}
