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
//!
//! # Cancelling
//!
//! A migration ends without moving the guest when the caller cancels it
//! ([`MigrateConfig::cancel`], a [`CancelToken`]), when the controller gives
//! up (deadline, round limit, no convergence; the deadline is also checked
//! between batches, so a long round does not outlive it), or when anything
//! fails. The source checks the token between batches, between rounds and
//! every few milliseconds while it waits, and honours it up to the moment
//! it sends `End` (stop-and-copy included: the paused guest is resumed).
//! After `End` the outcome belongs to the destination. Waiting for one
//! batch's confirmation is not interruptible, so a cancel takes effect
//! within about one batch's transfer time (16 MiB of guest pages at most,
//! less once compressed).
//!
//! On any failure the source resumes its guest and tells the destination
//! why in a `Cancel` part (best effort: only a live session carries it).
//! The destination ([`Incoming`]) discards the migration, never starting
//! its guest, when it hears that, when a part fails or is discarded by the
//! transport (the session ended or its grace period ran out with parts
//! unfinished), when the session ends before `End`
//! ([`Incoming::wait_receiving`]), or when its owner gives up
//! ([`Incoming::abandon`]). Starting the guest and discarding are decided
//! under one lock, so exactly one of them happens.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use dwcp_codec::{CodecConfig, DecodedPage, Decoder, Encoder, PageRef, Policy};
use dwcp_transport::{MemorySink, Receiver, RegionInfo, RegionWriter, Sender, Sink};

use crate::controller::{
    CancelReason, ControllerConfig, Decision, MigrationSummary, PrecopyController, RoundMetrics,
    RoundReport, StopCopyReport,
};
use crate::hv::{
    DestHypervisor, GuestRegion, HvError, HvResult, PAGE_SIZE, SourceHypervisor, bitmap_words,
};

/// Pages per batch (one region of the session): 16 MiB of guest memory.
pub const BATCH_PAGES: usize = 4096;
/// Fewest pages per batch (small rounds are cut finer, down to this).
const MIN_BATCH_PAGES: usize = 256;
/// Pages per page frame.
const FRAME_PAGES: usize = 256;
/// Pages per stripe of guest memory when pages are dealt to shards.
const SHARD_STRIPE: u64 = 512;
/// Batches the source keeps unconfirmed at once, not counting light ones
/// ([`LIGHT_BATCH`]).
const IN_FLIGHT: usize = 16;
/// A batch this small on the wire (zero pages, mostly) does not count in
/// [`IN_FLIGHT`]: a run of them filled the window with next to nothing
/// for the link to send, and left it idle for up to 50 ms at a time while
/// the destination confirmed them (measured on a tx sampler). Counting
/// bytes instead let the queue grow to hundreds of MiB in round 0, and
/// deep queues made later rounds worse (more rounds, more wire).
const LIGHT_BATCH: usize = 64 << 10;
/// Most batches, light ones included, the source keeps unconfirmed.
const IN_FLIGHT_ANY: usize = 256;
/// Batch buffers each shard keeps for reuse.
const SPARE_BUFFERS: usize = 4;
/// Time between reads of the dirty log while a round sends ([`MidRound`]).
const MID_ROUND_READ: Duration = Duration::from_millis(50);
/// When round 0 goes stateless, how far into it the source looks once at
/// the pages its reads of the dirty log ([`MidRound`]) found, to see
/// whether the guest rewrites memory fast.
const ROUND0_PROBE: Duration = Duration::from_millis(250);
/// Dirty rate, as a share of the link's measured wire rate, above which
/// the rest of round 0 enters the codec state after all: measured on the
/// standard guest at 1 Gbit/s, stateless round 0 was faster at 30 MiB/s
/// (a quarter of the link) and slower at 100 MiB/s (84%), where most
/// pages go again with a 64-byte change that a delta sends in ~100 bytes.
const ROUND0_STATE_DIRTY_SHARE: f64 = 0.5;
/// Largest device-state blob accepted.
pub const MAX_DEVICE_STATE: usize = 16 << 20;

const PART_LAYOUT: u8 = 1;
const PART_PAGES: u8 = 2;
const PART_DEVICE: u8 = 3;
const PART_END: u8 = 4;
/// The source gave up; the rest of the metadata is why (UTF-8).
const PART_CANCEL: u8 = 5;
/// Longest reason a `Cancel` part carries.
const MAX_CANCEL_REASON: usize = 1024;
/// Longest uninterrupted sleep of the source while it waits.
const CANCEL_POLL: Duration = Duration::from_millis(10);
/// What the source's error says when its token was cancelled.
pub const CANCELLED_BY_CALLER: &str = "cancelled by the caller";

/// Cancels a migration from another thread: every clone shares one flag,
/// which [`migrate_out`] reads between batches, between rounds and while
/// it waits. Cancelling is final.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the migration to stop; it returns
    /// [`MigrationError::Cancelled`] and its source guest runs on, unless
    /// it already sent `End`.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    /// Whether [`CancelToken::cancel`] was called on this token or a clone.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// A migration that did not complete; the source guest runs on, except
/// after [`MigrationError::OutcomeUnknown`].
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The session failed after `End` was sent and before the destination
    /// confirmed it: the destination may have started the guest, so the
    /// source guest stays **paused** (resuming it could leave two copies
    /// running). Ask the destination whether its guest runs before
    /// resuming or discarding the source.
    #[error(
        "the session failed after the final part was sent ({0}): the destination may be running the guest, so the source guest stays paused"
    )]
    OutcomeUnknown(String),
    /// The controller gave up (deadline, round limit, no convergence), or
    /// the caller cancelled ([`CANCELLED_BY_CALLER`]).
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
    /// Independent codec streams (1 to [`MAX_SHARDS`]).
    pub shards: usize,
    /// Bytes of earlier page versions the page codec keeps, over all
    /// shards, at each end, for deltas and references (the source's and
    /// the destination's memory cost); `None` for [`default_codec_state`]
    /// of the guest's size.
    pub codec_state: Option<usize>,
    /// Whether round 0's pages enter the codec state, so that later
    /// rounds can send deltas against them and references to them (the
    /// default): with two or more shards, only where the guest writes,
    /// that is every page until the source's first read of the dirty log
    /// (50 ms in), then the pages of stripes found dirty so far; the
    /// pages of other stripes go through the stateless encoders (see
    /// [`Pump::cold_stateless`]). Off, round 0 goes through a stateless
    /// encoder per shard,
    /// as QEMU fills its XBZRLE cache only after the bulk stage: keeping
    /// every page of round 0 costs a fresh state page per page sent at
    /// both ends (first-touch faults and copies, on the CPU that also
    /// compresses), and only the pages the guest dirties again use it;
    /// those go whole in round 1 instead. Measured: faster for an idle
    /// guest on a link the CPU can barely feed, slower where the link is
    /// the limit and the guest dirties a fair share of it
    /// (docs/migration.md).
    pub round0_codec_state: bool,
    /// Cancels the migration when cancelled (from any thread); a fresh
    /// token by default.
    pub cancel: CancelToken,
}

impl Default for MigrateConfig {
    fn default() -> Self {
        MigrateConfig {
            controller: ControllerConfig::default(),
            policy: Policy::Datacenter,
            shards: 2,
            codec_state: None,
            round0_codec_state: true,
            cancel: CancelToken::default(),
        }
    }
}

/// When the source must stop: the caller's token, and during pre-copy
/// rounds the controller's deadline.
struct Guard<'a> {
    cancel: &'a CancelToken,
    /// `None` in stop-and-copy, whose pause is short and already decided.
    deadline: Option<Instant>,
}

impl Guard<'_> {
    fn check(&self) -> Result<(), MigrationError> {
        if self.cancel.is_cancelled() {
            return Err(MigrationError::Cancelled(CANCELLED_BY_CALLER.into()));
        }
        if self.deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(MigrationError::Cancelled(format!(
                "{} (while sending a round)",
                CancelReason::DeadlineExceeded
            )));
        }
        Ok(())
    }

    /// Sleeps until `until`, checking every [`CANCEL_POLL`].
    fn sleep_until(&self, until: Instant) -> Result<(), MigrationError> {
        loop {
            self.check()?;
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(CANCEL_POLL));
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

fn meta_pages(shard: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut m = vec![PART_PAGES];
    m.extend_from_slice(&shard.to_le_bytes());
    m.extend_from_slice(&seq.to_le_bytes());
    m.push(flags);
    m
}

/// Page batch flag: the frames come from the shard's stateless encoder
/// (round 0 without [`MigrateConfig::round0_codec_state`]) and go to its
/// stateless decoder.
const BATCH_STATELESS: u8 = 1;

/// Most shards a migration may use (the destination refuses more).
pub const MAX_SHARDS: usize = 64;

/// The page codec's state a migration keeps by default, over all shards:
/// half the guest's memory, at most 1 GiB, at least 64 MiB per shard.
///
/// A page dirtied again is sent as a delta against the version sent
/// before, when the codec still holds it; half of the standard workload's
/// writes change 64 bytes of a page. With the codec's former fixed 64 MiB
/// per shard, a 1 GiB guest's round-0 content (336 MiB of non-zero pages)
/// was mostly evicted before it was dirtied again: measured at 100 MiB/s
/// over 1 Gbit/s, 3.87 s and 402 MiB on the wire, against 2.90 s and
/// 297 MiB with every page's last version kept (docs/migration.md). The
/// store holds only what was sent, so a guest of mostly zero pages costs
/// little.
pub fn default_codec_state(guest_bytes: u64, shards: usize) -> usize {
    let per_shard_min = 64usize << 20;
    let half = usize::try_from(guest_bytes / 2)
        .unwrap_or(usize::MAX)
        .min(1 << 30);
    half.max(per_shard_min.saturating_mul(shards.max(1)))
}

/// What the `Layout` part carries besides the regions: the page codec's
/// settings, so that both ends keep the same state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct CodecSettings {
    shards: u16,
    /// Per shard.
    state_limit: usize,
}

impl CodecSettings {
    const LEN: usize = 10;

    fn encode(&self) -> Vec<u8> {
        let mut b = self.shards.to_le_bytes().to_vec();
        b.extend_from_slice(&(self.state_limit as u64).to_le_bytes());
        b
    }

    /// Parses and checks what a source asks for against this guest:
    /// at most [`MAX_SHARDS`], and all shards' state together no more
    /// than the guest's memory (or 64 MiB per shard for a small guest).
    fn decode(b: &[u8], guest_bytes: u64) -> Result<CodecSettings, String> {
        if b.len() != Self::LEN {
            return Err(format!(
                "the layout's codec settings are {} bytes, not {}",
                b.len(),
                Self::LEN
            ));
        }
        let shards = u16::from_le_bytes([b[0], b[1]]);
        let state = u64::from_le_bytes(b[2..10].try_into().unwrap_or_default());
        if shards == 0 || usize::from(shards) > MAX_SHARDS {
            return Err(format!("{shards} page codec shards (1 to {MAX_SHARDS})"));
        }
        let cap = guest_bytes.max(u64::from(shards) * (64 << 20));
        if state.saturating_mul(u64::from(shards)) > cap {
            return Err(format!(
                "page codec state of {state} bytes per shard for {shards} shards is more than this guest's {guest_bytes} bytes"
            ));
        }
        Ok(CodecSettings {
            shards,
            state_limit: usize::try_from(state).map_err(|_| "state limit too large")?,
        })
    }
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

/// Encodes and sends pages, one encoder per shard, each shard on its own
/// thread (so encoding uses every core the source has), keeping at most
/// [`IN_FLIGHT`] batches unconfirmed in all.
struct Pump<'a> {
    sender: &'a Sender,
    shards: Vec<ShardTx>,
    /// Parts that are not page batches (device state), unconfirmed.
    other: VecDeque<u32>,
    /// The shard that owns each [`SHARD_STRIPE`]-page stripe of guest
    /// memory ([`UNOWNED`] until a batch of it is sent): the shard that
    /// first sends a stripe sends it in every later round, so that its
    /// encoder holds the versions to delta against.
    owner: Vec<AtomicU8>,
    /// Whether batches go through the shards' stateless encoders; read
    /// before each batch, so it can change mid-round.
    stateless: AtomicBool,
    /// Per stripe: whether a batch holding pages of it was taken this
    /// round, set before any of its pages is read ([`MidRound`]).
    taken: Vec<AtomicBool>,
    /// Per stripe: whether a read of the dirty log found a page of it
    /// dirty this round ([`MidRound`]); the round sends such stripes last.
    hot: Vec<AtomicBool>,
    /// Whether units of stripes not found hot go through the stateless
    /// encoders, once a read of the dirty log has been made this round
    /// (round 0 with [`MigrateConfig::round0_codec_state`]). A page in
    /// the codec state costs a fresh state page at both ends (a
    /// first-touch fault and a copy, on the cores that also compress),
    /// and only pages the guest writes again use it; a page of a cold
    /// stripe that the guest does write later goes whole once, and
    /// enters the state then. Their hashes are not kept (`sent_hash`):
    /// the reads of the dirty log already leave out the pages written
    /// before they were read, and hashing every page cost ~0.2 s of CPU
    /// on a 1 GiB guest.
    cold_stateless: AtomicBool,
}

/// Reads of the dirty log while a round sends, every [`MID_ROUND_READ`].
///
/// A page found dirty that this round sends but has not read yet is
/// dropped: the write came before the read that found it, and the round
/// reads the page after that, so what it sends holds the write (a later
/// write is logged again, since the read cleared the log). Only pages
/// already read, or not in this round, are kept for the next round.
/// Without these reads, every page the guest wrote during a long round
/// goes again in the next, also those it wrote before the round reached
/// them: at 30 MiB/s about half of round 1 of a 1 GiB guest.
///
/// Whether a page was read is known per stripe ([`Pump::taken`]): a
/// shard marks a batch's stripes (sequentially consistent stores) before
/// it reads any of its pages, and the check loads the mark only after the
/// log read returned. A stripe seen unmarked then is read after that
/// read, so dropping its pages is safe; a marked one may have been read
/// before, and its pages are kept, even where they were not read yet.
struct MidRound<'m> {
    /// Reads and clears the dirty log: the dirty pages, ascending.
    read: &'m mut dyn FnMut() -> Result<Vec<u64>, MigrationError>,
    /// Once, at the first read at or after `.0`: given the pages found
    /// dirty so far, says whether to turn the stateless encoders off for
    /// the rest of the round.
    probe: Option<(Instant, &'m mut dyn FnMut(u64) -> bool)>,
    /// Pages kept for the next round, ascending and distinct.
    kept: Vec<u64>,
    /// Pages found dirty, counted at every read.
    found: u64,
    /// Pages found dirty that the round read afterwards (not kept).
    dropped: u64,
}

impl MidRound<'_> {
    /// Reads the log and keeps what the next round must send; `pages` is
    /// the round's set (ascending), `taken` [`Pump::taken`]; marks the
    /// stripes of the pages found [`Pump::hot`]. Returns
    /// whether the probe says to turn the stateless encoders off.
    fn read(
        &mut self,
        pages: &[u64],
        taken: &[AtomicBool],
        hot: &[AtomicBool],
    ) -> Result<bool, MigrationError> {
        let dirty = (self.read)()?;
        self.found += dirty.len() as u64;
        let mut keep = Vec::with_capacity(dirty.len());
        for p in dirty {
            if let Some(h) = stripe_slot(hot, p) {
                h.store(true, Ordering::Relaxed);
            }
            let read_already = stripe_slot(taken, p).is_none_or(|t| t.load(Ordering::SeqCst));
            if read_already || pages.binary_search(&p).is_err() {
                keep.push(p);
            } else {
                self.dropped += 1;
            }
        }
        self.kept = merge(std::mem::take(&mut self.kept), keep);
        let mut stateful = false;
        if let Some((at, _)) = &self.probe
            && Instant::now() >= *at
            && let Some((_, probe)) = self.probe.take()
        {
            stateful = probe(self.found);
        }
        Ok(stateful)
    }
}

/// The next deferred unit. Once fewer than `fine` are left, the units
/// are cut stripe by stripe, as the end of [`work_units`] is, so that the
/// shards finish together.
fn next_deferred(q: &Mutex<VecDeque<Vec<u64>>>, fine: usize) -> Option<Vec<u64>> {
    let mut q = lock(q);
    let unit = q.pop_front()?;
    if q.len() >= fine {
        return Some(unit);
    }
    let mut stripes = stripes_of(&unit);
    let first = stripes.next().map(<[u64]>::to_vec);
    for rest in stripes.rev() {
        q.push_front(rest.to_vec());
    }
    first
}

/// Whether a page of `unit` lies in a [`Pump::hot`] stripe.
fn is_hot(hot: &[AtomicBool], unit: &[u64]) -> bool {
    slots_of(hot, unit).any(|h| h.load(Ordering::Relaxed))
}

/// `pages` (ascending) cut into runs of one stripe each.
fn stripes_of(pages: &[u64]) -> impl DoubleEndedIterator<Item = &[u64]> {
    pages.chunk_by(|a, b| a / SHARD_STRIPE == b / SHARD_STRIPE)
}

/// The per-stripe slot of page `p` (`None` past the guest).
fn stripe_slot<T>(slots: &[T], p: u64) -> Option<&T> {
    usize::try_from(p / SHARD_STRIPE)
        .ok()
        .and_then(|i| slots.get(i))
}

/// The per-stripe slots of the stripes of `pages` (ascending), once each.
fn slots_of<'a, T>(slots: &'a [T], pages: &'a [u64]) -> impl Iterator<Item = &'a T> {
    stripes_of(pages).filter_map(|st| stripe_slot(slots, st[0]))
}

/// Marks the stripes of `batch` taken ([`MidRound`]), before it is read.
fn take(taken: &[AtomicBool], batch: &[u64]) {
    for t in slots_of(taken, batch) {
        t.store(true, Ordering::SeqCst);
    }
}

/// [`Pump::owner`] of a stripe no shard has sent yet.
const UNOWNED: u8 = u8::MAX;

/// One shard's encoder and what it has sent.
struct ShardTx {
    enc: Encoder,
    /// The encoder of batches whose pages stay out of the codec state
    /// (state limit 0), and whether the batches now go through it.
    stateless: Encoder,
    use_stateless: bool,
    /// Whether the non-zero pages sent through `stateless` go into
    /// `sent_hash` (not for cold stripes, see [`Pump::cold_stateless`]).
    remember_stateless: bool,
    /// Hashes ([`page_hash`]) of the non-zero pages this shard sent
    /// through the stateless encoder, for the next round: a page whose
    /// content still hashes the same is at the destination already (it
    /// was dirtied before round 0 read it), and is not sent again.
    sent_hash: std::collections::HashMap<u64, [u8; PAGE_HASH]>,
    /// Shards in all (each encodes for its share of the link).
    shards: usize,
    /// Batches sent.
    seq: u32,
    /// Batches not yet acknowledged, with their bytes (taken back for
    /// reuse once the transport lets go of them).
    in_flight: VecDeque<(u32, Arc<Vec<u8>>)>,
    /// Of those, batches that are not light ([`LIGHT_BATCH`]).
    in_flight_heavy: usize,
    /// Batch buffers to reuse: a fresh one costs a page fault per 4 KiB
    /// as it fills (measured: ~0.1 s of CPU over a 1 GiB round 0).
    spare: Vec<Vec<u8>>,
    /// Whether the policy is `auto` (set per batch from the link share).
    auto: bool,
    /// Where regions are private anonymous memory: which pages are
    /// untouched (`None` where `/proc/self/pagemap` cannot be read).
    pagemap: Option<Pagemap>,
    /// Per page of the frame being built: known to read as zero.
    known_zero: Vec<bool>,
    staging: Vec<u8>,
    frame: Vec<u8>,
}

/// Which pages of a private anonymous mapping are untouched, from
/// `/proc/self/pagemap` (one 64-bit entry per page; bit 63: present, 62:
/// swapped, 61: file page or shared anonymous). A page with none of the
/// three reads as zero ([`GuestRegion::with_private_anonymous_memory`]).
/// The dirty log makes the answer safe to act on late: a page the guest
/// writes after the query is dirty and goes again in the next round.
struct Pagemap {
    file: std::fs::File,
    entries: Vec<u8>,
}

/// Shortest run of contiguous pages worth a pagemap query (a read per run).
const PAGEMAP_MIN_RUN: usize = 16;

impl Pagemap {
    fn open() -> Option<Pagemap> {
        std::fs::File::open("/proc/self/pagemap")
            .ok()
            .map(|file| Pagemap {
                file,
                entries: Vec::new(),
            })
    }

    /// Sets `zero[i]` for each of the `zero.len()` pages from host address
    /// `addr` (page aligned) that is neither present, swapped nor shared.
    /// On any error nothing is set (the pages are then read).
    fn untouched(&mut self, addr: usize, zero: &mut [bool]) {
        use std::os::unix::fs::FileExt;
        const PRESENT: u64 = 1 << 63;
        const SWAPPED: u64 = 1 << 62;
        const SHARED: u64 = 1 << 61;
        let n = zero.len();
        self.entries.resize(n * 8, 0);
        let at = (addr / PAGE_SIZE) as u64 * 8;
        if self.file.read_exact_at(&mut self.entries, at).is_err() {
            return;
        }
        for (z, e) in zero.iter_mut().zip(self.entries.chunks_exact(8)) {
            let e = u64::from_le_bytes([e[0], e[1], e[2], e[3], e[4], e[5], e[6], e[7]]);
            *z = e & (PRESENT | SWAPPED | SHARED) == 0;
        }
    }
}

/// A page of zeros, the content of pages known to read as zero.
static ZERO_PAGE: [u8; PAGE_SIZE] = [0; PAGE_SIZE];

/// What one shard may keep unconfirmed.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Batches that are not light ([`LIGHT_BATCH`]).
    heavy: usize,
    /// Batches in all.
    any: usize,
}

/// Pages and zero pages sent.
#[derive(Debug, Default, Clone, Copy)]
struct Sent {
    pages: u64,
    zero: u64,
}

impl std::ops::AddAssign for Sent {
    fn add_assign(&mut self, o: Sent) {
        self.pages += o.pages;
        self.zero += o.zero;
    }
}

impl ShardTx {
    /// This shard's share of the link in wire bytes per second, once the
    /// transport has an estimate.
    fn link_share(&self, sender: &Sender) -> Option<f64> {
        let bw = sender.metrics().bandwidth;
        (bw > 0.0 && bw.is_finite()).then(|| bw / self.shards as f64)
    }

    /// Reads, encodes and sends one batch as part `seq` of shard `shard`.
    fn send_batch(
        &mut self,
        sender: &Sender,
        regions: &[GuestRegion],
        shard: usize,
        batch: &[u64],
        window: Window,
        guard: &Guard<'_>,
    ) -> Result<Sent, MigrationError> {
        let mut sent = Sent::default();
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        if self.auto {
            let share = self.link_share(sender);
            let enc = if self.use_stateless {
                &mut self.stateless
            } else {
                &mut self.enc
            };
            // `auto` weighs each frame's options against this shard's
            // share of the link as the transport measures it now; until
            // it has measured, LZ4, which neither starves a fast link nor
            // wastes a slow one by much.
            enc.set_policy(match share {
                Some(share) => Policy::Auto {
                    link_bytes_per_sec: share,
                },
                None => Policy::Datacenter,
            })?;
        }
        for group in batch.chunks(FRAME_PAGES) {
            self.mark_untouched(regions, group)?;
            for (k, &p) in group.iter().enumerate() {
                if self.known_zero[k] {
                    continue;
                }
                let (region, offset) = locate(regions, p)?;
                region.read(
                    offset,
                    &mut self.staging[k * PAGE_SIZE..(k + 1) * PAGE_SIZE],
                )?;
            }
            let mut refs: Vec<PageRef<'_>> = Vec::with_capacity(group.len());
            // `sent_hash` holds a page exactly while the last version of
            // it sent is a non-zero one from the stateless encoder: every
            // other send of the page removes it.
            for (k, &p) in group.iter().enumerate() {
                if self.known_zero[k] {
                    self.sent_hash.remove(&p);
                    refs.push(PageRef {
                        index: p,
                        data: &ZERO_PAGE[..],
                    });
                    continue;
                }
                let data = &self.staging[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
                if self.use_stateless {
                    if !self.remember_stateless || dwcp_codec::is_zero(data) {
                        self.sent_hash.remove(&p);
                    } else {
                        self.sent_hash.insert(p, page_hash(data));
                    }
                } else if !self.sent_hash.is_empty() {
                    if self.sent_hash.get(&p) == Some(&page_hash(data)) {
                        // Unchanged since the stateless send: the
                        // destination holds it.
                        continue;
                    }
                    self.sent_hash.remove(&p);
                }
                refs.push(PageRef { index: p, data });
            }
            if refs.is_empty() {
                continue;
            }
            // Into a buffer sized (and zeroed) once: `encode_pages` would
            // zero a whole frame's worth for every frame.
            let enc = if self.use_stateless {
                &mut self.stateless
            } else {
                &mut self.enc
            };
            let stats = enc.encode_pages_into(&refs, &mut self.frame)?;
            sent.pages += stats.pages;
            sent.zero += stats.zero;
            bytes.extend_from_slice(&self.frame[..stats.frame_bytes as usize]);
        }
        let seq = self.seq;
        self.seq += 1;
        let bytes = Arc::new(bytes);
        let flags = if self.use_stateless {
            BATCH_STATELESS
        } else {
            0
        };
        let id = submit(sender, meta_pages(shard as u16, seq, flags), bytes.clone())?;
        self.in_flight_heavy += usize::from(bytes.len() > LIGHT_BATCH);
        self.in_flight.push_back((id, bytes));
        while self.in_flight_heavy > window.heavy || self.in_flight.len() > window.any {
            guard.check()?;
            self.confirm_oldest(sender)?;
        }
        Ok(sent)
    }

    /// Waits until the oldest batch in flight is confirmed, and keeps its
    /// buffer.
    fn confirm_oldest(&mut self, sender: &Sender) -> Result<(), MigrationError> {
        if let Some((id, bytes)) = self.in_flight.pop_front() {
            self.in_flight_heavy -= usize::from(bytes.len() > LIGHT_BATCH);
            sender.wait_region(id)?;
            self.reuse(bytes);
        }
        Ok(())
    }

    /// Sets `known_zero` for `group`: the pages of runs of at least
    /// [`PAGEMAP_MIN_RUN`] contiguous pages, in private anonymous regions,
    /// that this process has no page for (a sparse dirty set is read page
    /// by page, a query per page would cost more than it saves).
    fn mark_untouched(&mut self, regions: &[GuestRegion], group: &[u64]) -> HvResult<()> {
        self.known_zero.clear();
        self.known_zero.resize(group.len(), false);
        let Some(pm) = self.pagemap.as_mut() else {
            return Ok(());
        };
        let mut i = 0;
        while i < group.len() {
            let (region, offset) = locate(regions, group[i])?;
            // The run of pages after group[i] that are contiguous and in
            // the same region.
            let mut j = i + 1;
            while j < group.len()
                && group[j] == group[j - 1] + 1
                && (offset + (j - i) * PAGE_SIZE) < region.len()
            {
                j += 1;
            }
            // Only where a guest page is one host page (a region at an
            // unaligned host address straddles two).
            if region.is_private_anonymous()
                && (region.host_addr() as usize).is_multiple_of(PAGE_SIZE)
                && j - i >= PAGEMAP_MIN_RUN
            {
                let addr = region.host_addr() as usize + offset;
                pm.untouched(addr, &mut self.known_zero[i..j]);
            }
            i = j;
        }
        Ok(())
    }

    /// Keeps an acknowledged batch's buffer for a later batch, if the
    /// transport holds no reference to it any more and fewer than
    /// [`SPARE_BUFFERS`] are kept already.
    fn reuse(&mut self, bytes: Arc<Vec<u8>>) {
        if self.spare.len() < SPARE_BUFFERS
            && let Ok(v) = Arc::try_unwrap(bytes)
        {
            self.spare.push(v);
        }
    }
}

/// Opens a part and has it closed once sent (its digest assembled from
/// the transport's chunk checksums, not a second hash); returns its id.
fn submit(sender: &Sender, meta: Vec<u8>, bytes: Arc<Vec<u8>>) -> Result<u32, MigrationError> {
    let id = sender.open_region(meta, bytes)?;
    sender.close_region_when_sent(id)?;
    Ok(id)
}

impl<'a> Pump<'a> {
    fn new(
        sender: &'a Sender,
        cfg: &MigrateConfig,
        state_limit: usize,
        total_pages: u64,
    ) -> Result<Self, MigrationError> {
        let codec = CodecConfig {
            state_limit,
            ..CodecConfig::default()
        };
        // Every batch is a region of the session, which the destination
        // verifies end to end (chunk checksums, keyed in an authenticated
        // session, and the region's digest) before its applier sees a
        // byte: the frames' own checksums would hash the same bytes a
        // second time at each end.
        let encoder = |codec: &CodecConfig| -> Result<Encoder, MigrationError> {
            let mut e = Encoder::new(codec, cfg.policy)?;
            e.set_page_checksums(false);
            e.set_thread_cpu_clock(Some(dwcp_transport::thread_cpu_time));
            Ok(e)
        };
        let shards = (0..cfg.shards.max(1))
            .map(|_| {
                Ok(ShardTx {
                    enc: encoder(&codec)?,
                    stateless: encoder(&CodecConfig {
                        state_limit: 0,
                        ..CodecConfig::default()
                    })?,
                    use_stateless: false,
                    remember_stateless: true,
                    sent_hash: std::collections::HashMap::new(),
                    shards: cfg.shards.max(1),
                    seq: 0,
                    in_flight: VecDeque::new(),
                    in_flight_heavy: 0,
                    spare: Vec::new(),
                    auto: matches!(cfg.policy, Policy::Auto { .. }),
                    pagemap: Pagemap::open(),
                    known_zero: Vec::new(),
                    staging: vec![0; FRAME_PAGES * PAGE_SIZE],
                    frame: vec![0; dwcp_codec::max_page_frame_len(FRAME_PAGES, PAGE_SIZE)],
                })
            })
            .collect::<Result<Vec<_>, MigrationError>>()?;
        let stripes = usize::try_from(total_pages.div_ceil(SHARD_STRIPE))
            .map_err(|_| MigrationError::Cancelled("guest too large".into()))?;
        Ok(Pump {
            sender,
            shards,
            other: VecDeque::new(),
            owner: (0..stripes).map(|_| AtomicU8::new(UNOWNED)).collect(),
            stateless: AtomicBool::new(false),
            taken: (0..stripes).map(|_| AtomicBool::new(false)).collect(),
            hot: (0..stripes).map(|_| AtomicBool::new(false)).collect(),
            cold_stateless: AtomicBool::new(false),
        })
    }

    /// Sends the next batches through the shards' stateless encoders (or
    /// back through their stateful ones).
    fn set_stateless(&self, on: bool) {
        self.stateless.store(on, Ordering::Relaxed);
    }

    /// Sends the next rounds' units of stripes the guest was not seen
    /// writing through the stateless encoders.
    fn set_cold_stateless(&self, on: bool) {
        self.cold_stateless.store(on, Ordering::Relaxed);
    }

    /// Batches sent per shard.
    fn seqs(&self) -> Vec<u32> {
        self.shards.iter().map(|s| s.seq).collect()
    }

    /// Sends `pages` (global page numbers, ascending) read from `regions`,
    /// each shard on its own thread, checking `guard` before each batch
    /// and each wait, and reading the dirty log meanwhile through `mid`,
    /// if given. Pages of a stripe a shard owns go to that shard;
    /// stripes no shard owns yet (all of them in round 0) are shared out
    /// as the shards ask for work, a unit of whole stripes at a time, so
    /// that a shard that encodes faster (its pages compress faster, or it
    /// got more CPU) takes more, and the shards finish together: with a
    /// fixed deal the last ~0.4 s of round 0 ran at half the link while
    /// one shard finished alone.
    fn send(
        &mut self,
        regions: &[GuestRegion],
        pages: &[u64],
        guard: &Guard<'_>,
        mut mid: Option<&mut MidRound<'_>>,
    ) -> Result<Sent, MigrationError> {
        // Small rounds go in smaller batches, so that the last one lands
        // (and is applied) soon after the others: the round ends sooner,
        // and fewer pages are dirtied meanwhile.
        let n = self.shards.len();
        let size = (pages.len() / (4 * n)).clamp(MIN_BATCH_PAGES, BATCH_PAGES);
        let mut mine: Vec<Vec<u64>> = vec![Vec::new(); n];
        let mut unowned: Vec<u64> = Vec::new();
        for &p in pages {
            match self.stripe_owner(p) {
                UNOWNED => unowned.push(p),
                s => mine[usize::from(s)].push(p),
            }
        }
        let units = work_units(&unowned, size, n);
        let per_shard = self.per_shard_in_flight();
        let sender = self.sender;
        let owner = &self.owner;
        let stateless = &self.stateless;
        let taken = &self.taken;
        let hot = &self.hot;
        for (t, h) in taken.iter().zip(hot) {
            t.store(false, Ordering::SeqCst);
            h.store(false, Ordering::Relaxed);
        }
        let mut next_read = Instant::now() + MID_ROUND_READ;
        // Set when a mid-round read fails: the shards stop at their next
        // batch.
        let stop = AtomicBool::new(false);
        let stop = &stop;
        if n == 1 || pages.len() <= size {
            // One thread: unowned stripes are dealt round-robin.
            for (k, unit) in units.iter().enumerate() {
                let s = k % n;
                claim(owner, unit, s);
                mine[s].extend_from_slice(unit);
            }
            let mut sent = Sent::default();
            for (s, list) in mine.iter_mut().enumerate() {
                list.sort_unstable();
                for batch in list.chunks(size) {
                    guard.check()?;
                    if let Some(m) = mid.as_deref_mut()
                        && Instant::now() >= next_read
                    {
                        if m.read(pages, taken, hot)? {
                            stateless.store(false, Ordering::Relaxed);
                        }
                        next_read = Instant::now() + MID_ROUND_READ;
                    }
                    take(taken, batch);
                    let shard = &mut self.shards[s];
                    shard.use_stateless = stateless.load(Ordering::Relaxed);
                    shard.remember_stateless = true;
                    sent += shard.send_batch(sender, regions, s, batch, per_shard, guard)?;
                }
            }
            return Ok(sent);
        }
        let mine = &mine;
        let units = &units;
        let next = AtomicUsize::new(0);
        let next = &next;
        // Units found hot, sent once the others are.
        let deferred: Mutex<VecDeque<Vec<u64>>> = Mutex::new(VecDeque::new());
        let deferred = &deferred;
        let defer = mid.is_some();
        let cold = self.cold_stateless.load(Ordering::Relaxed) && defer;
        // Whether a read of the dirty log has marked the hot stripes yet.
        let hot_known = AtomicBool::new(false);
        let hot_known = &hot_known;
        std::thread::scope(|sc| {
            let workers: Vec<_> = self
                .shards
                .iter_mut()
                .enumerate()
                .map(|(s, shard)| {
                    sc.spawn(move || -> Result<Sent, MigrationError> {
                        let mut sent = Sent::default();
                        for batch in mine[s].chunks(size) {
                            guard.check()?;
                            if stop.load(Ordering::Relaxed) {
                                return Ok(sent);
                            }
                            take(taken, batch);
                            shard.use_stateless = stateless.load(Ordering::Relaxed);
                            shard.remember_stateless = true;
                            sent +=
                                shard.send_batch(sender, regions, s, batch, per_shard, guard)?;
                        }
                        loop {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let unit = match units.get(k) {
                                // A unit the guest writes to waits for the
                                // end of the round: what the guest writes
                                // before the unit is read costs nothing
                                // (see `MidRound`), what it writes after
                                // goes again next round.
                                Some(u) if defer && is_hot(hot, u) => {
                                    lock(deferred).push_back(u.clone());
                                    continue;
                                }
                                Some(u) => std::borrow::Cow::Borrowed(&u[..]),
                                None => match next_deferred(deferred, 2 * n) {
                                    Some(u) => std::borrow::Cow::Owned(u),
                                    None => break,
                                },
                            };
                            guard.check()?;
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            claim(owner, &unit, s);
                            take(taken, &unit);
                            let all = stateless.load(Ordering::Relaxed);
                            shard.remember_stateless = all;
                            shard.use_stateless = all
                                || (cold
                                    && hot_known.load(Ordering::Relaxed)
                                    && !is_hot(hot, &unit));
                            sent +=
                                shard.send_batch(sender, regions, s, &unit, per_shard, guard)?;
                        }
                        Ok(sent)
                    })
                })
                .collect();
            // The dirty log, on this thread while the shards send.
            let mut read_err = None;
            if let Some(m) = mid {
                while !workers.iter().all(|w| w.is_finished()) {
                    let now = Instant::now();
                    if now >= next_read {
                        let r = m.read(pages, taken, hot);
                        hot_known.store(true, Ordering::Relaxed);
                        match r {
                            Ok(true) => stateless.store(false, Ordering::Relaxed),
                            Ok(false) => {}
                            Err(e) => {
                                stop.store(true, Ordering::Relaxed);
                                read_err = Some(e);
                                break;
                            }
                        }
                        next_read = Instant::now() + MID_ROUND_READ;
                        continue;
                    }
                    std::thread::sleep((next_read - now).min(Duration::from_millis(5)));
                }
            }
            let mut sent = Sent::default();
            let mut first_err = read_err;
            for w in workers {
                match w.join() {
                    Ok(Ok(s)) => sent += s,
                    Ok(Err(e)) => {
                        first_err.get_or_insert(e);
                    }
                    Err(_) => {
                        first_err.get_or_insert(MigrationError::Cancelled(
                            "a page encoder thread panicked".into(),
                        ));
                    }
                }
            }
            match first_err {
                Some(e) => Err(e),
                None => Ok(sent),
            }
        })
    }

    /// What each shard keeps unconfirmed ([`IN_FLIGHT`] and
    /// [`IN_FLIGHT_ANY`] in all).
    fn per_shard_in_flight(&self) -> Window {
        let n = self.shards.len().max(1);
        Window {
            heavy: (IN_FLIGHT / n).max(1),
            any: (IN_FLIGHT_ANY / n).max(1),
        }
    }

    /// The owner of page `p`'s stripe ([`UNOWNED`] if none yet, or if `p`
    /// is past the guest, which [`locate`] then refuses).
    fn stripe_owner(&self, p: u64) -> u8 {
        stripe_slot(&self.owner, p).map_or(UNOWNED, |o| o.load(Ordering::Relaxed))
    }

    /// Sends a part that is not a page batch.
    fn submit(
        &mut self,
        meta: Vec<u8>,
        bytes: Vec<u8>,
        guard: &Guard<'_>,
    ) -> Result<(), MigrationError> {
        guard.check()?;
        let id = submit(self.sender, meta, Arc::new(bytes))?;
        self.other.push_back(id);
        Ok(())
    }

    /// Waits for every part in flight, checking `guard` (if any) between
    /// them.
    fn drain(&mut self, guard: Option<&Guard<'_>>) -> Result<(), MigrationError> {
        for shard in &mut self.shards {
            while !shard.in_flight.is_empty() {
                if let Some(g) = guard {
                    g.check()?;
                }
                shard.confirm_oldest(self.sender)?;
            }
        }
        while let Some(id) = self.other.pop_front() {
            if let Some(g) = guard {
                g.check()?;
            }
            self.sender.wait_region(id)?;
        }
        Ok(())
    }
}

/// Gives the stripes of `unit` to shard `s`.
fn claim(owner: &[AtomicU8], unit: &[u64], s: usize) {
    let s = u8::try_from(s).unwrap_or(UNOWNED);
    for o in slots_of(owner, unit) {
        o.store(s, Ordering::Relaxed);
    }
}

/// Cuts `pages` (ascending) into units of whole stripes of at most
/// `size` pages (or one stripe), the batches shards take as they ask for
/// work. Units grow from one stripe, doubling every `shards` units, so
/// that bytes reach the wire soon after the start (a first 16 MiB unit
/// took ~45 ms to read and encode while the link waited); the last units
/// are one stripe each, so that shards finish within a stripe of each
/// other and the destination's last batch is small.
fn work_units(pages: &[u64], size: usize, shards: usize) -> Vec<Vec<u64>> {
    let mut stripes: Vec<&[u64]> = Vec::new();
    let mut start = 0;
    for i in 1..=pages.len() {
        if i == pages.len() || pages[i] / SHARD_STRIPE != pages[start] / SHARD_STRIPE {
            stripes.push(&pages[start..i]);
            start = i;
        }
    }
    let per_unit = (size / SHARD_STRIPE as usize).max(1);
    // The tail, cut stripe by stripe: two full units per shard's worth.
    let tail_from = stripes.len().saturating_sub(2 * shards * per_unit);
    let mut units: Vec<Vec<u64>> = Vec::new();
    let mut cur: Vec<u64> = Vec::new();
    let mut in_cur = 0usize;
    for (i, st) in stripes.iter().enumerate() {
        let ramp = 1usize << (units.len() / shards.max(1)).min(16);
        let want = if i >= tail_from {
            1
        } else {
            ramp.min(per_unit)
        };
        if in_cur > 0 && (in_cur >= want || cur.len() + st.len() > size) {
            units.push(std::mem::take(&mut cur));
            in_cur = 0;
        }
        cur.extend_from_slice(st);
        in_cur += 1;
    }
    if !cur.is_empty() {
        units.push(cur);
    }
    units
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
/// source guest runs on (resumed, unthrottled, dirty log stopped) and the
/// destination is told why, so that it discards what it received.
/// `on_round` hears every round's figures as they come.
///
/// Cancelling [`MigrateConfig::cancel`] makes it return
/// [`MigrationError::Cancelled`] ([`CANCELLED_BY_CALLER`]) within about one
/// batch's transfer time, unless `End` was sent already. When the session
/// fails (the destination is gone), it returns a transport error once the
/// sender gives the session up: about the sender's `resume_for` after the
/// connections break, or its `stall_timeout` more when the peer vanishes
/// without closing them. After an error, cancel the sender
/// ([`Sender::cancel`]): batches still queued are not worth sending.
pub fn migrate_out(
    hv: &mut dyn SourceHypervisor,
    sender: &Sender,
    cfg: &MigrateConfig,
    mut on_round: impl FnMut(&RoundMetrics),
) -> Result<MigrationReport, MigrationError> {
    let mut paused = false;
    let r = run_source(hv, sender, cfg, &mut on_round, &mut paused);
    match &r {
        Err(MigrationError::OutcomeUnknown(_)) => {
            // The destination may run the guest: never two copies.
            let _ = hv.throttle(0);
            let _ = hv.stop_dirty_log();
        }
        Err(e) => {
            // The source keeps running, whatever failed.
            if paused {
                let _ = hv.resume();
            }
            let _ = hv.throttle(0);
            let _ = hv.stop_dirty_log();
            tell_destination(sender, e);
        }
        Ok(_) => {}
    }
    r
}

/// Sends a `Cancel` part saying why the migration ended, without waiting
/// for it: a dead session just refuses it.
fn tell_destination(sender: &Sender, why: &MigrationError) {
    let text = why.to_string();
    let mut end = text.len().min(MAX_CANCEL_REASON);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let mut meta = vec![PART_CANCEL];
    meta.extend_from_slice(&text.as_bytes()[..end]);
    if let Ok(id) = sender.open_region(meta, Arc::new(Vec::new())) {
        let _ = sender.close_region(id, *blake3::hash(&[]).as_bytes());
    }
}

fn run_source(
    hv: &mut dyn SourceHypervisor,
    sender: &Sender,
    cfg: &MigrateConfig,
    on_round: &mut dyn FnMut(&RoundMetrics),
    paused: &mut bool,
) -> Result<MigrationReport, MigrationError> {
    let mut guard = Guard {
        cancel: &cfg.cancel,
        deadline: None,
    };
    guard.check()?;
    let regions = hv.regions();
    let total_pages: u64 = regions.iter().map(|r| r.pages() as u64).sum();
    let mut ctl = PrecopyController::new(cfg.controller.clone(), total_pages)
        .map_err(|e| MigrationError::Cancelled(e.to_string()))?;
    if cfg.shards == 0 || cfg.shards > MAX_SHARDS {
        return Err(MigrationError::Cancelled(format!(
            "{} shards: 1 to {MAX_SHARDS}",
            cfg.shards
        )));
    }
    let guest_bytes: u64 = regions.iter().map(|r| r.len() as u64).sum();
    let total_state = cfg
        .codec_state
        .unwrap_or_else(|| default_codec_state(guest_bytes, cfg.shards));
    let codec = CodecSettings {
        shards: cfg.shards as u16,
        state_limit: total_state / cfg.shards,
    };
    let mut pump = Pump::new(sender, cfg, codec.state_limit, total_pages)?;
    // The destination checks the layout (and the codec settings) before
    // any page moves.
    let layout = layout_bytes(&regions);
    sender.send_region(layout.clone(), Arc::new(codec.encode()))?;

    let start = Instant::now();
    guard.deadline = cfg.controller.deadline.map(|d| start + d);
    hv.start_dirty_log()?;
    // A tracker may report every page on its first read: round 0 sends
    // every page anyway, so that read is spent here.
    let _ = dirty_pages(hv, &regions)?;
    let logging_since = Instant::now();
    let mut pages: Vec<u64> = (0..total_pages).collect();
    let mut round = 0u32;
    // The controller's earliest time for the bitmap read that ends the
    // round (none for round 0).
    let mut end_not_before: Option<Duration> = None;
    loop {
        let started = start.elapsed();
        let wire0 = sender.metrics().wire_bytes;
        // A stateless round 0 drains before round 1 starts (and a batch is
        // confirmed once applied), so the two encoders' versions of a page
        // land in the order they were read.
        let stateless = round == 0 && !cfg.round0_codec_state;
        pump.set_stateless(stateless);
        pump.set_cold_stateless(round == 0 && cfg.round0_codec_state);
        // While a stateless round 0 sends, a check of how fast the guest
        // writes memory: fast, and the rest of the round enters the codec
        // state after all.
        let mut probe = |found: u64| {
            let secs = logging_since.elapsed().as_secs_f64();
            let dirty_rate = found as f64 * PAGE_SIZE as f64 / secs.max(1e-3);
            let link = sender.metrics().bandwidth;
            link > 0.0 && dirty_rate > ROUND0_STATE_DIRTY_SHARE * link
        };
        let mut read = || dirty_pages(hv, &regions).map_err(MigrationError::from);
        let mut mid = MidRound {
            read: &mut read,
            probe: stateless.then(|| (Instant::now() + ROUND0_PROBE, &mut probe as _)),
            kept: Vec::new(),
            found: 0,
            dropped: 0,
        };
        let sent = pump.send(&regions, &pages, &guard, Some(&mut mid))?;
        let MidRound {
            kept, mut found, ..
        } = mid;
        // A stateless round drains before the next one reads (see above).
        if stateless {
            pump.drain(Some(&guard))?;
        }
        let mut send_done = start.elapsed();
        if let Some(t) = end_not_before {
            guard.sleep_until(start + t)?;
        }
        let last = dirty_pages(hv, &regions)?;
        found += last.len() as u64;
        let mut dirty = merge(last, kept);
        let make_report = |send_done: Duration, dirty: &[u64], found: u64| {
            let m = sender.metrics();
            RoundReport {
                round,
                started,
                send_done,
                ended: start.elapsed(),
                pages_sent: sent.pages,
                zero_pages: sent.zero,
                bytes_sent: sent.pages * PAGE_SIZE as u64,
                wire_bytes: m.wire_bytes - wire0,
                dirty_pages: dirty.len() as u64,
                pages_dirtied: found,
                transport_wire_bandwidth: (m.bandwidth > 0.0).then_some(m.bandwidth),
            }
        };
        let mut report = make_report(send_done, &dirty, found);
        // The round ended when its last batch went to the transport: the
        // next round's pages queue behind this one's tail, and the link
        // does not idle while it is confirmed. Unless the controller would
        // stop (or give up) now: the downtime must hold only the final
        // dirty set, so the tail is confirmed first, the pages dirtied
        // meanwhile join the set, and the controller decides on that.
        if !stateless
            && !matches!(
                ctl.clone().handle_round(report),
                Ok(Decision::Continue { .. })
            )
        {
            pump.drain(Some(&guard))?;
            send_done = start.elapsed();
            let more = dirty_pages(hv, &regions)?;
            found += more.len() as u64;
            dirty = merge(dirty, more);
            report = make_report(send_done, &dirty, found);
        }
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
                end_not_before: t,
            } => {
                if let Some(p) = throttle {
                    hv.throttle(p)?;
                }
                // The wait, if any, comes before the read that ends the
                // next round: a round that sends for longer than
                // `min_round` never waits, and the link never idles for it.
                end_not_before = Some(t);
                round += 1;
            }
            Decision::Cancel(reason) => {
                return Err(MigrationError::Cancelled(reason.to_string()));
            }
            Decision::StopAndCopy { .. } => break,
        }
    }

    // Stop-and-copy: the controller decided, so no deadline now; the
    // caller may still cancel until `End` goes out.
    guard.deadline = None;
    guard.check()?;
    let wire0 = sender.metrics().wire_bytes;
    let pause_at = start.elapsed();
    let t0 = Instant::now();
    hv.pause()?;
    *paused = true;
    let last = dirty_pages(hv, &regions)?;
    let pages = merge(pages, last);
    pump.set_stateless(false);
    let sent = pump.send(&regions, &pages, &guard, None)?;
    let state = hv.save_device_state()?;
    pump.submit(vec![PART_DEVICE], state, &guard)?;
    let mut end = vec![PART_END];
    let seqs = pump.seqs();
    end.extend_from_slice(&(seqs.len() as u16).to_le_bytes());
    for s in &seqs {
        end.extend_from_slice(&s.to_le_bytes());
    }
    // No wait for the last batches: the destination finishes `End` only
    // once every batch it names is applied, so DONE of `End` means all of
    // them arrived, were verified and applied, and the guest runs. The
    // last moment to cancel: from here the destination decides.
    guard.check()?;
    send_end(sender, end)?;
    let downtime = t0.elapsed();
    pump.drain(None)?;
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

/// Sends `End` and waits for the destination's answer. Up to the moment
/// `End` may have left, a failure is an ordinary one (the source resumes);
/// after it, only the destination's refusal is: a session lost before
/// the answer leaves the outcome unknown.
fn send_end(sender: &Sender, end: Vec<u8>) -> Result<(), MigrationError> {
    let id = sender.open_region(end, Arc::new(Vec::new()))?;
    let r = sender
        .close_region_when_sent(id)
        .and_then(|()| sender.wait_region(id));
    match r {
        Ok(()) => Ok(()),
        // The destination finished `End` with an error: it discarded the
        // migration and its guest never starts.
        Err(e @ dwcp_transport::TransportError::Region { .. }) => Err(e.into()),
        Err(e) => Err(MigrationError::OutcomeUnknown(e.to_string())),
    }
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
    /// Memory made ready for the page decoders' state before the session
    /// ([`Incoming::preallocate_state`]); each new decoder takes one.
    arenas: Mutex<Vec<Vec<u8>>>,
    state: Mutex<DestState>,
    cond: Condvar,
}

#[derive(Default)]
struct DestState {
    /// Batches each shard needs, once `End` told.
    end: Option<Vec<u32>>,
    /// The applier is starting the guest: the migration can no longer be
    /// abandoned.
    committed: bool,
    /// The destination guest runs.
    running: bool,
    /// `Some(result)` once the guest runs (and its memory digest is
    /// assembled) or the migration failed. An error here is final: the
    /// guest is never started after it.
    outcome: Option<Result<IncomingReport, String>>,
    /// A part of the session was opened: a session exists.
    seen_session: bool,
    /// Batches applied per shard (the next sequence number due).
    applied: Vec<u32>,
    stop: bool,
}

impl DestShared {
    /// Waits until `ready` answers (under the state lock, after every
    /// change) or `deadline` passes; on timeout, the locked state.
    fn wait_until<R>(
        &self,
        deadline: Instant,
        mut ready: impl FnMut(&DestState) -> Option<R>,
    ) -> Result<R, std::sync::MutexGuard<'_, DestState>> {
        let mut st = lock(&self.state);
        loop {
            if let Some(r) = ready(&st) {
                return Ok(r);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(st);
            }
            st = self
                .cond
                .wait_timeout(st, left)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Fails the migration with `reason` unless the guest is being (or
    /// was) started or it failed already; true when this call failed it.
    fn abandon(&self, reason: String) -> bool {
        let done = {
            let mut st = lock(&self.state);
            if st.committed || st.outcome.is_some() {
                false
            } else {
                st.outcome = Some(Err(reason));
                true
            }
        };
        self.cond.notify_all();
        done
    }
}

/// What the destination did.
#[derive(Debug, Clone, Copy, Default)]
pub struct IncomingReport {
    /// Pages written into guest memory.
    pub pages: u64,
    /// Page batches applied.
    pub batches: u64,
    /// Of those, batches the source sent through its stateless encoders
    /// (round 0, see [`MigrateConfig::round0_codec_state`]).
    pub stateless_batches: u64,
    /// From `End` arriving to the guest running.
    pub finish: Duration,
    /// [`memory_digest`] of the guest memory as the migration left it,
    /// assembled page by page as pages were applied (so nothing is hashed
    /// in the downtime but the last round's pages).
    pub memory_digest: [u8; 32],
}

/// Length of a page's hash ([`page_hash`], [`digest_page_hash`]).
const PAGE_HASH: usize = 16;

/// BLAKE3 of a page, cut to 128 bits: what a source's shard remembers of
/// a page it sent stateless, to skip it later if unchanged. A collision
/// there would leave a changed page unsent, and the guest chooses its
/// pages' contents, so this hash must be one that no one can collide.
fn page_hash(page: &[u8]) -> [u8; PAGE_HASH] {
    let mut h = [0u8; PAGE_HASH];
    h.copy_from_slice(&blake3::hash(page).as_bytes()[..PAGE_HASH]);
    h
}

/// The hash of one page in [`memory_digest`]: XXH3-128, 9 GB/s on 4 KiB
/// pages here against BLAKE3's 2, and the destination hashes every page
/// it applies. The digest is a check of the migration's own work (the
/// transport already authenticated every byte that arrived), so it needs
/// to catch any accidental difference, which a 128-bit hash does, not to
/// resist a forger.
fn digest_page_hash(page: &[u8]) -> [u8; PAGE_HASH] {
    xxhash_rust::xxh3::xxh3_128(page).to_le_bytes()
}

/// BLAKE3 of the concatenated 128-bit XXH3 hashes of every page of the
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
            hashes.push(digest_page_hash(&page));
        }
    }
    Ok(*blake3::hash(hashes.as_flattened()).as_bytes())
}

impl Incoming {
    /// Starts receiving into `hv`'s memory; at most `limit` bytes of
    /// batches are held before they are applied. Unless `hv` says its
    /// memory is zero ([`DestHypervisor::memory_is_zero`]), every page is
    /// read here and the ones that are not zero are zeroed.
    pub fn new(hv: Box<dyn DestHypervisor>, limit: u64) -> Self {
        Self::with_fault(hv, limit, None)
    }

    /// [`Incoming::new`] that changes one byte of page `corrupt` as it
    /// writes it (after the transport verified it): a fault drill for the
    /// end-to-end memory check, which must then disagree.
    pub fn with_fault(hv: Box<dyn DestHypervisor>, limit: u64, corrupt: Option<u64>) -> Self {
        let shared = Arc::new(DestShared {
            mem: MemorySink::new(limit),
            arenas: Mutex::new(Vec::new()),
            state: Mutex::new(DestState::default()),
            cond: Condvar::new(),
        });
        // Here, before anything arrives: on the applier thread, this read
        // of every page slowed round 0 by a tenth (measured at 30 MiB/s).
        if !hv.memory_is_zero()
            && let Err(e) = zero_fill(&hv.regions())
        {
            lock(&shared.state).outcome = Some(Err(format!("zeroing guest memory: {e}")));
        }
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

    /// Allocates, before any session arrives, the memory the page
    /// decoders will keep their state in when the source migrates
    /// `guest_bytes` of guest memory with `cfg`'s shards and codec state
    /// ([`default_codec_state`] unless set), and touches every page of it:
    /// its page faults (about 2.5 us per 4 KiB here) then happen while
    /// nothing waits, instead of on the applier while pages arrive. Returns
    /// what it allocated and how long it took. Costs that memory from now
    /// on; a source with other settings still works (a decoder grows what
    /// it got, or allocates its own).
    pub fn preallocate_state(&self, cfg: &MigrateConfig, guest_bytes: u64) -> (usize, Duration) {
        let start = Instant::now();
        let shards = cfg.shards.clamp(1, MAX_SHARDS);
        let total = cfg
            .codec_state
            .unwrap_or_else(|| default_codec_state(guest_bytes, shards))
            // At most what the destination accepts (`CodecSettings::decode`).
            .min(
                usize::try_from(guest_bytes)
                    .unwrap_or(usize::MAX)
                    .max(shards.saturating_mul(64 << 20)),
            );
        let each = total / shards;
        let mut arenas = Vec::with_capacity(shards);
        for _ in 0..shards {
            let mut a: Vec<u8> = Vec::new();
            if each == 0 || a.try_reserve_exact(each).is_err() {
                break;
            }
            // Written, not just reserved: the kernel provides each page
            // at its first write.
            a.resize(each, 0);
            arenas.push(a);
        }
        let bytes = arenas.iter().map(Vec::len).sum();
        lock(&self.shared.arenas).extend(arenas);
        (bytes, start.elapsed())
    }

    /// The sink to give to [`dwcp_transport::Receiver::bind`].
    pub fn sink(&self) -> Arc<dyn Sink> {
        Arc::new(DestSink {
            shared: self.shared.clone(),
        })
    }

    /// Waits up to `wait` for the guest to run (or the migration to fail);
    /// `None` when neither happened yet. An error says why the migration
    /// was discarded; the guest is then never started.
    pub fn wait(&self, wait: Duration) -> Option<Result<IncomingReport, String>> {
        self.shared
            .wait_until(Instant::now() + wait, |st| st.outcome.clone())
            .ok()
    }

    /// [`Incoming::wait`] that also watches `receiver` (the one given
    /// [`Incoming::sink`]): once a session has begun, no session left
    /// before the guest runs (the source said `BYE` without `End`, or its
    /// connections failed and the receiver's grace period ran out) fails
    /// the migration.
    pub fn wait_receiving(
        &self,
        receiver: &Receiver,
        wait: Duration,
    ) -> Option<Result<IncomingReport, String>> {
        let deadline = Instant::now() + wait;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Some(o) = self.wait(left.min(Duration::from_millis(50))) {
                return Some(o);
            }
            if lock(&self.shared.state).seen_session
                && receiver.sessions() == 0
                && self
                    .shared
                    .abandon("the session ended before the migration finished".into())
            {
                return self.wait(Duration::ZERO);
            }
            if left.is_zero() {
                return None;
            }
        }
    }

    /// Gives the migration up (the owner stops waiting, say): unless the
    /// guest is already being started, the migration fails with `reason`,
    /// what arrives from then on is refused, and the guest is never
    /// started. Returns whether it was given up; false when the guest
    /// runs (or is about to) or the migration had failed already.
    pub fn abandon(&self, reason: impl Into<String>) -> bool {
        self.shared.abandon(reason.into())
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
        {
            let mut st = lock(&self.shared.state);
            st.seen_session = true;
            match &st.outcome {
                Some(Err(e)) => return Err(format!("the migration was discarded: {e}")),
                Some(Ok(_)) => return Err("the migration is complete".into()),
                None => {}
            }
        }
        match info.meta.first() {
            Some(&PART_END) => {
                let counts = parse_end(&info.meta)?;
                Ok(Arc::new(EndWriter {
                    shared: self.shared.clone(),
                    counts,
                }))
            }
            Some(&PART_CANCEL) => {
                let why = String::from_utf8_lossy(&info.meta[1..]);
                self.shared
                    .abandon(format!("the source gave the migration up: {why}"));
                Ok(Arc::new(NoticeWriter))
            }
            Some(&(PART_LAYOUT | PART_PAGES | PART_DEVICE)) => Ok(Arc::new(PartWriter {
                inner: self.shared.mem.handle().open(info)?,
                shared: self.shared.clone(),
                batch: parse_batch(&info.meta).map(|(shard, seq, _)| (shard, seq)),
            })),
            _ => Err("not a migration part".into()),
        }
    }
}

/// A part received into memory: a part that fails its check or is
/// discarded by the transport (its session ended or expired) fails the
/// migration, as the source cannot finish it.
struct PartWriter {
    inner: Arc<dyn RegionWriter>,
    shared: Arc<DestShared>,
    /// `(shard, seq)` of a page batch: its `DONE` waits until it is applied,
    /// so that a round the source sees confirmed is in guest memory, and no
    /// backlog of applying is left for the downtime.
    batch: Option<(u16, u32)>,
}

/// `(shard, seq, flags)` of a page batch's metadata ([`meta_pages`]).
fn parse_batch(meta: &[u8]) -> Option<(u16, u32, u8)> {
    (meta.len() == 8 && meta[0] == PART_PAGES).then(|| {
        (
            u16::from_le_bytes([meta[1], meta[2]]),
            u32::from_le_bytes([meta[3], meta[4], meta[5], meta[6]]),
            meta[7],
        )
    })
}

/// How long a batch's `DONE` waits for the applier.
const APPLY_WAIT: Duration = Duration::from_secs(30);

impl RegionWriter for PartWriter {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.inner.write_at(offset, data)
    }

    fn write_digested(
        &self,
        offset: u64,
        data: &[u8],
        digest: &dwcp_codec::ChunkDigest,
    ) -> Result<(), String> {
        self.inner.write_digested(offset, data, digest)
    }

    fn finish(&self, len: u64, digest: &[u8; 32]) -> Result<(), String> {
        if let Some(Err(e)) = &lock(&self.shared.state).outcome {
            // Discarded: the source hears why in this part's `DONE`.
            return Err(format!("the migration was discarded: {e}"));
        }
        self.inner.finish(len, digest).inspect_err(|e| {
            self.shared
                .abandon(format!("a migration part was refused: {e}"));
        })?;
        let Some((shard, seq)) = self.batch else {
            return Ok(());
        };
        let applied = self.shared.wait_until(Instant::now() + APPLY_WAIT, |st| {
            if st.applied.get(usize::from(shard)).is_some_and(|&n| n > seq) {
                return Some(Ok(()));
            }
            match &st.outcome {
                Some(Err(e)) => Some(Err(format!("the migration was discarded: {e}"))),
                Some(Ok(_)) => Some(Ok(())),
                None => st.stop.then_some(Ok(())),
            }
        });
        applied.unwrap_or_else(|_| {
            Err(format!(
                "batch {seq} of shard {shard} was not applied within {APPLY_WAIT:?}"
            ))
        })
    }

    fn abort(&self) {
        self.inner.abort();
        self.shared.abandon(
            "the session ended before the migration finished (unfinished parts were discarded)"
                .into(),
        );
    }
}

/// `Cancel`: carries nothing; opening it was the message.
struct NoticeWriter;

impl RegionWriter for NoticeWriter {
    fn write_at(&self, _: u64, _: &[u8]) -> Result<(), String> {
        Err("Cancel carries no bytes".into())
    }

    fn finish(&self, _: u64, _: &[u8; 32]) -> Result<(), String> {
        Ok(())
    }

    fn abort(&self) {}
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
        let mut deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let started = self.shared.wait_until(deadline, |st| {
                if st.running {
                    return Some(Ok(()));
                }
                st.outcome.as_ref().map(|o| o.clone().map(|_| ()))
            });
            let mut st = match started {
                Ok(r) => return r,
                Err(st) => st,
            };
            if !st.committed {
                // Given up here, so never started after the source hears
                // it failed (and runs on).
                let why = "the destination did not start the guest within 30 s".to_string();
                st.outcome = Some(Err(why.clone()));
                drop(st);
                self.shared.cond.notify_all();
                return Err(why);
            }
            // Committed: the guest is being started; its outcome is near.
            deadline = Instant::now() + Duration::from_millis(100);
        }
    }

    fn abort(&self) {
        // The session ended before the source heard `DONE` of `End`: it
        // runs on, so this guest must not start (a no-op once committed).
        self.shared
            .abandon("the session ended before the migration finished".into());
    }
}

/// Zeroes every page of `regions` that is not zero already.
///
/// Zero pages travel as tags and are written only over a page this
/// migration wrote before, so the destination's memory must start zero.
/// Reading a fresh anonymous mapping only maps the zero page (huge zero
/// pages with THP), so this costs little there and allocates nothing.
fn zero_fill(regions: &[GuestRegion]) -> Result<(), HvError> {
    const STEP: usize = 64 * PAGE_SIZE;
    let mut buf = vec![0u8; STEP];
    let zero = [0u8; PAGE_SIZE];
    for r in regions {
        let mut at = 0;
        while at < r.len() {
            let n = STEP.min(r.len() - at);
            r.read(at, &mut buf[..n])?;
            for (i, page) in buf[..n].chunks(PAGE_SIZE).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    r.write(at + i * PAGE_SIZE, &zero[..page.len()])?;
                }
            }
            at += n;
        }
    }
    Ok(())
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
    let zero_hash = digest_page_hash(&[0u8; PAGE_SIZE]);
    let mut hashes = vec![zero_hash; total];
    let mut decoders: Vec<Decoder> = Vec::new();
    // Per shard: the decoder of its stateless batches, made at the first.
    let mut stateless: Vec<Option<Decoder>> = Vec::new();
    let mut next: Vec<u32> = Vec::new();
    let mut held: BTreeMap<(u16, u32), (u8, Vec<u8>)> = BTreeMap::new();
    let mut device: Option<Vec<u8>> = None;
    let mut layout_ok = false;
    let guest_bytes: u64 = regions.iter().map(|r| r.len() as u64).sum();
    // Until the layout says otherwise (pages before it are refused).
    let mut codec = CodecSettings {
        shards: 0,
        state_limit: 0,
    };
    let mut report = IncomingReport::default();
    let mut end_at: Option<Instant> = None;
    loop {
        {
            let st = lock(&shared.state);
            if st.stop {
                return Err("stopped".into());
            }
            if let Some(Err(e)) = &st.outcome {
                // Abandoned: the guest never starts.
                return Err(e.clone());
            }
        }
        if let Some(r) = shared.mem.take(Duration::from_millis(1)) {
            let bytes = r.bytes.unwrap_or_default();
            match r.meta.first() {
                Some(&PART_LAYOUT) => {
                    if r.meta != layout_bytes(&regions) {
                        return Err("the source's memory layout differs from this guest's".into());
                    }
                    codec = CodecSettings::decode(&bytes, guest_bytes)?;
                    layout_ok = true;
                }
                Some(&PART_PAGES) => {
                    let Some((shard, seq, flags)) = parse_batch(&r.meta) else {
                        return Err(format!(
                            "page batch metadata of {} bytes, not 8",
                            r.meta.len()
                        ));
                    };
                    if layout_ok && shard >= codec.shards {
                        return Err(format!(
                            "shard {shard} out of range (the layout said {})",
                            codec.shards
                        ));
                    }
                    if flags & !BATCH_STATELESS != 0 {
                        return Err(format!("page batch with unknown flags {flags:#04x}"));
                    }
                    held.insert((shard, seq), (flags, bytes));
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
            let (flags, bytes) = held.remove(&(shard, seq)).unwrap_or_default();
            let s = usize::from(shard);
            // Batches come from regions the transport finished, so verified
            // end to end: their frames need no checksum of their own.
            let decoder = |state_limit| {
                let mut d = Decoder::new(&CodecConfig {
                    state_limit,
                    ..CodecConfig::default()
                });
                d.accept_unchecked(true);
                d
            };
            while decoders.len() <= s {
                let mut dec = decoder(codec.state_limit);
                if codec.state_limit > 0
                    && let Some(a) = lock(&shared.arenas).pop()
                {
                    // A fresh decoder takes it; the error case cannot occur.
                    let _ = dec.adopt_arena(a);
                }
                decoders.push(dec);
                stateless.push(None);
                next.push(0);
            }
            let dec = if flags & BATCH_STATELESS != 0 {
                stateless[s].get_or_insert_with(|| decoder(0))
            } else {
                &mut decoders[s]
            };
            report.pages += apply(dec, &regions, &mut written, &mut hashes, &bytes, corrupt)?;
            report.stateless_batches += u64::from(flags & BATCH_STATELESS != 0);
            // The buffer goes back to the sink for a later batch.
            shared.mem.recycle(bytes);
            report.batches += 1;
            next[s] += 1;
            {
                let mut st = lock(&shared.state);
                st.applied.clone_from(&next);
            }
            shared.cond.notify_all();
        }
        let end = lock(&shared.state).end.clone();
        if let Some(counts) = end {
            let t = *end_at.get_or_insert_with(Instant::now);
            let complete = counts
                .iter()
                .enumerate()
                .all(|(s, &c)| next.get(s).copied().unwrap_or(0) >= c);
            if complete && device.is_some() {
                {
                    // Starting and abandoning are decided here, under one
                    // lock: from now on `abandon` is refused.
                    let mut st = lock(&shared.state);
                    if let Some(Err(e)) = &st.outcome {
                        return Err(e.clone());
                    }
                    st.committed = true;
                }
                let blob = device.take().unwrap_or_default();
                hv.load_device_state(&blob).map_err(|e| e.to_string())?;
                hv.resume().map_err(|e| e.to_string())?;
                // Tell `End` at once: what this function still owns (the
                // decoders' state, the held batches) takes milliseconds to
                // free, and that must not sit in the downtime.
                lock(&shared.state).running = true;
                shared.cond.notify_all();
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
    let zero_hash = digest_page_hash(&[0u8; PAGE_SIZE]);
    let mut readback = vec![0u8; PAGE_SIZE];
    let mut at = 0usize;
    let mut pages = 0u64;
    let zero = [0u8; PAGE_SIZE];
    while at < bytes.len() {
        // The frame's length from its header (the decoder checks the rest).
        let head = dwcp_codec::frame::FrameHeader::peek(&bytes[at..])
            .map_err(|e| format!("a page frame of a batch: {e}"))?;
        let n = usize::try_from(head.frame_len()).map_err(|_| "frame too long")?;
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
                        *h = digest_page_hash(&readback);
                    }
                    pages += 1;
                }
            }
        }
        at += n;
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::SyntheticGuest;
    use dwcp_engine::Engine;
    use dwcp_transport::{ReceiverConfig, SenderConfig, StreamCount};

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn pagemap_finds_exactly_the_pages_never_written() {
        use crate::kvm::memory::GuestMemory;
        let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
        let region = mem.region();
        assert!(region.is_private_anonymous());
        let pages = region.pages();
        let written: Vec<usize> = (0..pages).filter(|p| p % 3 == 0 || *p == 77).collect();
        for &p in &written {
            region.write(p * PAGE_SIZE + 5, &[1]).unwrap();
        }
        // A page only read is mapped to the shared zero page: present,
        // and read like any other (still zero).
        let mut b = [0u8; 1];
        region.read(PAGE_SIZE, &mut b).unwrap();
        let Some(mut pm) = Pagemap::open() else {
            println!("skipping: /proc/self/pagemap cannot be read here");
            return;
        };
        let mut zero = vec![false; pages];
        pm.untouched(region.host_addr() as usize, &mut zero);
        for (p, z) in zero.iter().enumerate() {
            let untouched = !written.contains(&p) && p != 1;
            assert_eq!(*z, untouched, "page {p}");
        }
        // A page read as untouched is zero indeed.
        for p in (0..pages).filter(|&p| zero[p]) {
            let mut page = vec![1u8; PAGE_SIZE];
            region.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page.iter().all(|&x| x == 0));
        }
    }

    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn pagemap_is_not_asked_for_a_region_at_an_unaligned_host_address() {
        use crate::kvm::memory::GuestMemory;
        let mem = Arc::new(GuestMemory::new(4 << 20).unwrap());
        let pages = 64;
        // A region starting 8 bytes into the mapping: its page 0 covers
        // host pages 0 and 1; only host page 1 is written.
        // SAFETY: inside the mapping, which `mem` keeps alive; the region
        // is dropped before `mem`.
        let region = unsafe {
            GuestRegion::new(
                0,
                std::ptr::NonNull::new(mem.host_addr().wrapping_add(8)).unwrap(),
                pages * PAGE_SIZE,
            )
        }
        .with_private_anonymous_memory();
        mem.region().write(PAGE_SIZE + 100, &[1]).unwrap();
        let mut tx = ShardTx {
            enc: Encoder::new(&CodecConfig::default(), Policy::Datacenter).unwrap(),
            stateless: Encoder::new(&CodecConfig::default(), Policy::Datacenter).unwrap(),
            use_stateless: false,
            remember_stateless: true,
            sent_hash: std::collections::HashMap::new(),
            shards: 1,
            seq: 0,
            in_flight: VecDeque::new(),
            in_flight_heavy: 0,
            spare: Vec::new(),
            auto: false,
            pagemap: Pagemap::open(),
            known_zero: Vec::new(),
            staging: Vec::new(),
            frame: Vec::new(),
        };
        let group: Vec<u64> = (0..pages as u64).collect();
        tx.mark_untouched(std::slice::from_ref(&region), &group)
            .unwrap();
        assert!(
            tx.known_zero.iter().all(|z| !z),
            "unaligned: every page is read"
        );
        // The same memory as an aligned region: page 1 written, the rest
        // untouched.
        let aligned = mem.region();
        tx.mark_untouched(std::slice::from_ref(&aligned), &group)
            .unwrap();
        if tx.pagemap.is_some() {
            assert!(!tx.known_zero[1] && tx.known_zero[0] && tx.known_zero[2]);
        }
    }

    #[test]
    fn a_mid_round_read_drops_only_pages_the_round_reads_later() {
        let stripes = 4;
        let flags = || {
            (0..stripes)
                .map(|_| AtomicBool::new(false))
                .collect::<Vec<_>>()
        };
        let (taken, hot) = (flags(), flags());
        let s = SHARD_STRIPE;
        // The round sends stripes 0, 1 and 2 (and not page 3s + 7).
        let pages: Vec<u64> = (0..3 * s).collect();
        take(&taken, &[5, s - 1]);
        let reads = std::cell::RefCell::new(vec![
            // Stripe 0 is taken: kept. Stripe 1 is not: dropped. Page
            // 3s + 7 is not in the round: kept. A page past the guest:
            // kept (the next round's `locate` refuses it).
            vec![3, s + 10, s + 11, 3 * s + 7, 9 * s],
            // Stripe 1 taken since: kept now.
            vec![s + 10, 2 * s],
        ]);
        let mut read = || Ok(reads.borrow_mut().remove(0));
        let mut probed = None;
        let mut probe = |found: u64| {
            probed = Some(found);
            true
        };
        let mut mid = MidRound {
            read: &mut read,
            probe: Some((Instant::now(), &mut probe as _)),
            kept: Vec::new(),
            found: 0,
            dropped: 0,
        };
        assert!(mid.read(&pages, &taken, &hot).unwrap(), "the probe answers");
        assert_eq!(mid.kept, vec![3, 3 * s + 7, 9 * s]);
        assert_eq!((mid.found, mid.dropped), (5, 2));
        let hot_now: Vec<bool> = hot.iter().map(|h| h.load(Ordering::Relaxed)).collect();
        assert_eq!(hot_now, vec![true, true, false, true]);
        take(&taken, &[s]);
        assert!(
            !mid.read(&pages, &taken, &hot).unwrap(),
            "the probe runs once"
        );
        assert_eq!(mid.kept, vec![3, s + 10, 3 * s + 7, 9 * s]);
        assert_eq!((mid.found, mid.dropped), (7, 3));
        drop(mid);
        assert_eq!(probed, Some(5));
        // A failed read is the round's error.
        let mut failing = || -> Result<Vec<u64>, MigrationError> {
            Err(HvError::new("dirty log", "gone").into())
        };
        let mut mid = MidRound {
            read: &mut failing,
            probe: None,
            kept: Vec::new(),
            found: 0,
            dropped: 0,
        };
        assert!(mid.read(&pages, &taken, &hot).is_err());
    }

    #[test]
    fn hot_units_wait_and_their_tail_is_cut_into_stripes() {
        let s = SHARD_STRIPE;
        let hot: Vec<AtomicBool> = (0..8).map(|i| AtomicBool::new(i == 2)).collect();
        assert!(is_hot(&hot, &[s, 2 * s + 3]));
        assert!(!is_hot(&hot, &[0, s, 3 * s]));
        let unit = |first: u64, n: u64| (first * s..(first + n) * s).collect::<Vec<u64>>();
        let q = Mutex::new(VecDeque::from(vec![unit(0, 3), unit(3, 2), unit(5, 2)]));
        // Enough left: whole units.
        assert_eq!(next_deferred(&q, 2), Some(unit(0, 3)));
        // From here, stripe by stripe, in order.
        let mut rest = Vec::new();
        while let Some(u) = next_deferred(&q, 2) {
            rest.push(u);
        }
        assert_eq!(rest, (3..7).map(|i| unit(i, 1)).collect::<Vec<_>>());
    }

    #[test]
    fn work_units_cover_every_page_once_in_whole_stripes() {
        let stripe = SHARD_STRIPE;
        // All of a 1 GiB guest, a sparse dirty set, and a tiny one.
        let all: Vec<u64> = (0..262_144).collect();
        let sparse: Vec<u64> = (0..262_144)
            .filter(|p| p % 7 == 0 || p % 1000 < 3)
            .collect();
        let tiny: Vec<u64> = vec![5, 6, 700, 100_000];
        for (pages, size, shards) in [
            (&all, BATCH_PAGES, 2),
            (&all, BATCH_PAGES, 5),
            (&sparse, 1024, 3),
            (&tiny, MIN_BATCH_PAGES, 2),
        ] {
            let units = work_units(pages, size, shards);
            let flat: Vec<u64> = units.iter().flatten().copied().collect();
            assert_eq!(&flat, pages, "every page once, in order");
            let mut seen = std::collections::HashSet::new();
            for u in &units {
                assert!(!u.is_empty());
                assert!(u.len() <= size.max(stripe as usize), "{} pages", u.len());
                let first = u[0] / stripe;
                let last = u[u.len() - 1] / stripe;
                for s in first..=last {
                    // A stripe never spans two units.
                    if u.iter().any(|p| p / stripe == s) {
                        assert!(seen.insert(s), "stripe {s} in two units");
                    }
                }
            }
            // The first unit per shard and the last ones are one stripe.
            let one = |u: &Vec<u64>| u[0] / stripe == u[u.len() - 1] / stripe;
            assert!(units.iter().take(shards).all(one));
            assert!(one(units.last().unwrap()));
        }
        assert!(work_units(&[], BATCH_PAGES, 2).is_empty());
        // Round 0 of a 1 GiB guest: mostly full units.
        let units = work_units(&all, BATCH_PAGES, 2);
        assert!(
            units.len() < 262_144 / BATCH_PAGES + 4 * 8 + 4,
            "{}",
            units.len()
        );
    }

    #[test]
    fn the_destination_bounds_the_codec_state_a_source_asks_for() {
        let gib = 1u64 << 30;
        let ok = CodecSettings {
            shards: 2,
            state_limit: 256 << 20,
        };
        assert_eq!(CodecSettings::decode(&ok.encode(), gib), Ok(ok));
        let bad = |shards: u16, state: u64| {
            let mut b = shards.to_le_bytes().to_vec();
            b.extend_from_slice(&state.to_le_bytes());
            CodecSettings::decode(&b, gib).unwrap_err()
        };
        assert!(bad(0, 1 << 20).contains("shards"));
        assert!(bad(65, 1 << 20).contains("shards"));
        assert!(bad(2, gib).contains("more than this guest"));
        assert!(bad(64, u64::MAX).contains("more than this guest"));
        // A small guest still gets 64 MiB per shard.
        let small = CodecSettings {
            shards: 4,
            state_limit: 64 << 20,
        };
        assert_eq!(CodecSettings::decode(&small.encode(), 16 << 20), Ok(small));
        assert!(CodecSettings::decode(&[1, 0, 0], gib).is_err());
        assert!(CodecSettings::decode(&[], gib).is_err());
        // What a source asks for by default always passes.
        for (bytes, shards) in [(16u64 << 20, 1usize), (gib, 2), (64 * gib, 8), (gib, 64)] {
            let s = CodecSettings {
                shards: shards as u16,
                state_limit: default_codec_state(bytes, shards) / shards,
            };
            assert_eq!(
                CodecSettings::decode(&s.encode(), bytes),
                Ok(s),
                "{bytes} {shards}"
            );
        }
    }

    #[test]
    fn a_token_cancels_all_its_clones() {
        let t = CancelToken::new();
        let c = t.clone();
        assert!(!c.is_cancelled());
        t.cancel();
        assert!(c.is_cancelled() && t.is_cancelled());
        assert!(!MigrateConfig::default().cancel.is_cancelled());
    }

    #[test]
    fn an_abandoned_migration_fails_once_and_for_good() {
        let dst = SyntheticGuest::destination(1 << 20, 0).unwrap();
        let incoming = Incoming::new(Box::new(dst), 16 << 20);
        assert!(incoming.wait(Duration::from_millis(10)).is_none());
        assert!(incoming.abandon("the owner gave up"));
        assert!(!incoming.abandon("again"), "the first reason stays");
        match incoming.wait(Duration::from_secs(1)) {
            Some(Err(e)) => assert_eq!(e, "the owner gave up"),
            other => panic!("{other:?}"),
        }
        // What arrives later is refused.
        let refused = incoming.sink().open(&RegionInfo {
            region: 9,
            len: Some(0),
            meta: vec![PART_LAYOUT],
        });
        assert!(refused.is_err());
    }

    #[test]
    fn a_session_that_ends_without_end_is_discarded() {
        let dst = SyntheticGuest::destination(1 << 20, 0).unwrap();
        let regions = DestHypervisor::regions(&dst);
        let incoming = Incoming::new(Box::new(dst), 16 << 20);
        let (rx, tx) = (
            Engine::builder().workers(1).build().unwrap(),
            Engine::builder().workers(1).build().unwrap(),
        );
        let recv = Receiver::bind(
            &rx,
            "127.0.0.1:0".parse().unwrap(),
            ReceiverConfig::default(),
            incoming.sink(),
        )
        .unwrap();
        let sender = Sender::connect(
            &tx,
            recv.local_addr(),
            SenderConfig {
                streams: StreamCount::Fixed(1),
                ..SenderConfig::default()
            },
        )
        .unwrap();
        // A migration begins: every part it sent is finished...
        sender
            .send_region(
                layout_bytes(&regions),
                Arc::new(
                    CodecSettings {
                        shards: 1,
                        state_limit: 1 << 20,
                    }
                    .encode(),
                ),
            )
            .unwrap();
        assert!(
            incoming
                .wait_receiving(&recv, Duration::from_millis(200))
                .is_none()
        );
        // ... and its session ends cleanly without `End`.
        sender.close().unwrap();
        match incoming.wait_receiving(&recv, Duration::from_secs(5)) {
            Some(Err(e)) => assert!(e.contains("session ended before"), "{e}"),
            other => panic!("{other:?}"),
        }
        recv.close().unwrap();
    }
}
