//! The convergence controller of pre-copy live migration, sans-IO.
//!
//! A [`PrecopyController`] decides, after each round, whether to go on
//! copying, to stop the guest and copy the rest (stop-and-copy), or to give
//! up. It has no clock, threads or I/O (STYLE.md §5): the driver feeds it one
//! [`RoundReport`] per round, with timestamps as [`Duration`]s since the
//! migration started, and gets a [`Decision`] back at once. The same inputs
//! always give the same decisions, which is what the tests below rely on.
//!
//! # Rounds
//!
//! ```text
//!  start dirty log       read+clear bitmap     read+clear bitmap
//!  |-- round 0: every page --|-- round 1: dirty set --|-- ...
//!  started            send_done  ended=read     ...     ended=read
//!                                   |                      |
//!                      handle_round -> Decision   handle_round -> Decision
//! ```
//!
//! Round 0 sends every page (zero pages as tags); each later round sends the
//! pages found in the bitmap read that ended the round before. A round ends
//! with a read-and-clear of the dirty bitmap; its count is the report's
//! [`RoundReport::dirty_pages`], the dirty set *in hand*: what the next round
//! sends, or what the stop-and-copy sends if the controller stops now. (The
//! all-set bitmap that some trackers return on their first read after
//! `start_dirty_log` is the driver's business: round 0 sends everything
//! anyway, and the driver reports only the read that ends round 0.)
//!
//! # Estimates
//!
//! - **Wire bandwidth** (bytes per second on the wire). When a report carries
//!   the transport's estimate ([`RoundReport::transport_wire_bandwidth`], the
//!   figure of `dwcp_transport`'s pacing, which counts wire bytes), that
//!   round's prediction uses it (that estimate keeps the best recent
//!   interval, so it errs on the fast side; `fixed_stop_cost` is where to
//!   leave a margin). Otherwise the controller's own measure is
//!   used: wire bytes over `send_done - started` of each round, smoothed. The
//!   controller works in wire bytes, not in guest bytes, because the
//!   transport measures wire bytes and because the compression ratio of
//!   round 0 (mostly zero pages) says nothing about that of a dirty set.
//! - **Compression ratio** of non-zero pages: guest bytes of the pages that
//!   were not zero over the round's wire bytes (zero-page tags included, which
//!   errs on the slow side), smoothed. Until a round has measured one it is
//!   1.0. Dirty pages are assumed not to be zero pages.
//! - **Effective bandwidth** = wire bandwidth x ratio, in guest bytes per
//!   second.
//! - **Dirty rate**: pages found dirty over the time since the previous
//!   bitmap read, smoothed. It counts distinct pages, so it saturates at the
//!   guest's working set; it is reported, and the convergence rule below
//!   looks at dirty sets directly.
//!
//! Smoothing is an exponential average weighted by time: a sample of a round
//! lasting `dt` moves the estimate by `1 - exp(-dt / smoothing)` of the way,
//! so a long round counts fully and a very short one (noisy) barely counts.
//! The first sample is taken as it is.
//!
//! # Rules, in the order they are applied after each round
//!
//! 1. **Stop**: the predicted downtime of stopping now is
//!    `dirty_pages * page_size / effective_bandwidth + fixed_stop_cost`
//!    (just `fixed_stop_cost` for an empty dirty set). When it is at most
//!    [`ControllerConfig::downtime_limit`] the answer is
//!    [`Decision::StopAndCopy`]. Without any bandwidth figure yet, only an
//!    empty dirty set stops. There is no forced stop: a `StopAndCopy` never
//!    carries a prediction above the limit. The prediction is made on the set
//!    in hand, never on a rate: a short round finds few pages because little
//!    time passed, and those few pages are exactly what stopping now sends.
//!    Pages written between this bitmap read and the pause are left to
//!    `fixed_stop_cost` (the decision is immediate).
//!    **Polish rounds** ([`ControllerConfig::polish`], on by default): when
//!    the prediction is under the limit but one more round would cut it to
//!    at most 3/4 (that round lasts about the transfer time of the set in
//!    hand, at least `min_round`, and the guest dirties pages at the
//!    estimated rate meanwhile), the answer is `Continue` instead, unless
//!    this is the last round the deadline or round limit allow. Each such
//!    round cuts the prediction by a quarter and it never falls below
//!    `fixed_stop_cost`, so they end by themselves. The limit is a ceiling,
//!    not a target: a short extra round costs little total time and can
//!    take most of the downtime away.
//! 2. **Deadline**: when the round ended at or after
//!    [`ControllerConfig::deadline`], [`CancelReason::DeadlineExceeded`].
//! 3. **Round limit**: when this was round `max_rounds - 1` (rounds count
//!    from 0), [`CancelReason::RoundLimit`]. So a migration gets at most
//!    `max_rounds` decisions and the last is never `Continue`.
//! 4. **Stall, throttle, give up**: a round *stalls* when its dirty set is at
//!    least `stall_percent`% of the previous round's (80% by default: the
//!    rounds no longer shrink fast enough to reach the limit soon). After
//!    `stall_rounds` stalled rounds in a row (2 by default), the controller
//!    asks for more throttling when it is allowed and not yet at
//!    `throttle_max`: first `throttle_initial`%, then `throttle_step`% more
//!    each time, capped at `throttle_max`. The stall count then starts again,
//!    so every throttle level gets `stall_rounds` rounds to show its effect.
//!    When throttling is not allowed or already at `throttle_max`, the same
//!    stall gives [`CancelReason::NotConverging`]. Throttling is never
//!    lowered during a migration; the driver ends it (`throttle(0)`) after
//!    the migration, whatever its outcome.
//! 5. Otherwise [`Decision::Continue`].
//!
//! # Short rounds
//!
//! A round that goes on only does so because its dirty set would take longer
//! than `downtime_limit - fixed_stop_cost` to send, so at the estimated
//! bandwidth no round is shorter than that. Estimates can be wrong, so
//! [`Decision::Continue`] also carries `end_not_before`: the driver should not
//! take the bitmap read that ends the next round before that time (the
//! previous read plus [`ControllerConfig::min_round`], 10 ms by default),
//! waiting if it has sent everything sooner. That bounds how fast the loop
//! can spin and keeps each dirty-rate sample over a meaningful interval. A
//! driver that ignores it still gets correct decisions: short rounds just
//! barely move the estimates.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use dwcp_migration::controller::{
//!     ControllerConfig, Decision, PrecopyController, RoundReport,
//! };
//!
//! let ms = Duration::from_millis;
//! let mut ctl = PrecopyController::new(ControllerConfig::default(), 1000)?;
//! // Round 0: 1000 pages in 40 ms over the wire, 3 pages dirtied meanwhile.
//! let decision = ctl.handle_round(RoundReport {
//!     round: 0,
//!     started: ms(0),
//!     send_done: ms(40),
//!     ended: ms(40),
//!     pages_sent: 1000,
//!     zero_pages: 0,
//!     bytes_sent: 4_096_000,
//!     wire_bytes: 4_096_000,
//!     dirty_pages: 3,
//!     pages_dirtied: 0,
//!     transport_wire_bandwidth: None,
//! })?;
//! assert!(matches!(decision, Decision::StopAndCopy { dirty_pages: 3, .. }));
//! assert!(ctl.summary().converged);
//! # Ok::<(), dwcp_migration::controller::ControllerError>(())
//! ```

use std::fmt;
use std::time::Duration;

use crate::hv::PAGE_SIZE;

/// Settings of a [`PrecopyController`]; start from `default()` and change
/// fields. [`PrecopyController::new`] checks them ([`Self::validate`]).
#[derive(Debug, Clone, PartialEq)]
pub struct ControllerConfig {
    /// Longest acceptable predicted downtime; 50 ms by default. Not zero.
    pub downtime_limit: Duration,
    /// What stopping costs besides sending the dirty set: pausing the vCPUs,
    /// saving, sending and loading the device state, one round trip,
    /// resuming. Measured by the caller or configured; 10 ms by default
    /// (a guess: measure it). Must be below `downtime_limit`.
    pub fixed_stop_cost: Duration,
    /// Time since the start after which a round that cannot stop cancels
    /// the migration; `None` (the default) for no deadline. Not zero.
    pub deadline: Option<Duration>,
    /// Most rounds (round 0 included) before giving up; 30 by default. At
    /// least 1.
    pub max_rounds: u32,
    /// Shortest interval between two bitmap reads the controller asks for
    /// (`Decision::Continue::end_not_before`); 10 ms by default. Not zero.
    pub min_round: Duration,
    /// Whether the controller may ask the hypervisor to throttle the vCPUs
    /// (auto-converge); `true` by default.
    pub allow_throttle: bool,
    /// Polish rounds: when the downtime predicted now is under the limit
    /// but one more (short) round is expected to cut it to at most 3/4, go
    /// on instead of stopping (the limit is a ceiling, not a target); `true`
    /// by default. See the module docs, rule 1.
    pub polish: bool,
    /// First throttle asked for, in percent; 20 by default. 1..=`throttle_max`.
    pub throttle_initial: u8,
    /// Percent added at each later step; 10 by default. At least 1.
    pub throttle_step: u8,
    /// Highest throttle, in percent; 99 by default. At most 99.
    pub throttle_max: u8,
    /// A round stalls when its dirty set is at least this percentage of the
    /// previous round's; 80 by default. 1..=100.
    pub stall_percent: u8,
    /// Stalled rounds in a row that raise the throttle (or give up); 2 by
    /// default. At least 1.
    pub stall_rounds: u32,
    /// Time constant of the estimates' exponential averages; 1 s by default.
    /// Not zero.
    pub smoothing: Duration,
    /// Bytes per page of the dirty bitmap; [`PAGE_SIZE`] by default. Not
    /// zero.
    pub page_size: u64,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            downtime_limit: Duration::from_millis(50),
            fixed_stop_cost: Duration::from_millis(10),
            deadline: None,
            max_rounds: 30,
            min_round: Duration::from_millis(10),
            allow_throttle: true,
            polish: true,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            stall_percent: 80,
            stall_rounds: 2,
            smoothing: Duration::from_secs(1),
            page_size: PAGE_SIZE as u64,
        }
    }
}

impl ControllerConfig {
    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), ControllerError> {
        let bad = |field, reason| Err(ControllerError::InvalidConfig { field, reason });
        if self.downtime_limit.is_zero() {
            return bad("downtime_limit", "is zero");
        }
        if self.fixed_stop_cost >= self.downtime_limit {
            return bad(
                "fixed_stop_cost",
                "is not below downtime_limit, so no stop could ever be predicted under it",
            );
        }
        if self.deadline.is_some_and(|d| d.is_zero()) {
            return bad("deadline", "is zero");
        }
        if self.max_rounds == 0 {
            return bad("max_rounds", "is zero");
        }
        if self.min_round.is_zero() {
            return bad("min_round", "is zero, which lets the round loop spin");
        }
        if self.throttle_max > 99 {
            return bad("throttle_max", "is above 99 percent");
        }
        if self.throttle_initial == 0 || self.throttle_initial > self.throttle_max {
            return bad("throttle_initial", "is not in 1..=throttle_max");
        }
        if self.throttle_step == 0 {
            return bad("throttle_step", "is zero");
        }
        if self.stall_percent == 0 || self.stall_percent > 100 {
            return bad("stall_percent", "is not in 1..=100");
        }
        if self.stall_rounds == 0 {
            return bad("stall_rounds", "is zero");
        }
        if self.smoothing.is_zero() {
            return bad("smoothing", "is zero");
        }
        if self.page_size == 0 {
            return bad("page_size", "is zero");
        }
        Ok(())
    }
}

/// Error of the controller: bad settings, or a report that contradicts the
/// ones before it (a driver bug; the controller's state is left unchanged).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// A setting is out of range.
    #[error("controller setting {field} {reason}")]
    InvalidConfig {
        /// The field of [`ControllerConfig`].
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A report for another round than the next one.
    #[error("report of round {got}, expected round {expected}")]
    RoundOutOfOrder {
        /// The round the controller waits for.
        expected: u32,
        /// The round reported.
        got: u32,
    },
    /// Timestamps out of order (within the report or against the last one).
    #[error("round {round}: {what}")]
    TimeOutOfOrder {
        /// The round reported (`u32::MAX` for the stop-and-copy report).
        round: u32,
        /// Which timestamps disagree.
        what: &'static str,
    },
    /// A page count larger than it can be.
    #[error("round {round}: {what} is {value}, more than {limit}")]
    CountOutOfRange {
        /// The round reported.
        round: u32,
        /// Which count.
        what: &'static str,
        /// Its value.
        value: u64,
        /// Its bound.
        limit: u64,
    },
    /// A round report after the controller stopped or cancelled.
    #[error("the migration was already decided ({0})")]
    Finished(Decision),
    /// A stop-and-copy report without a stop decision, or a second one.
    #[error("stop-and-copy report without a pending stop decision")]
    NotStopping,
}

/// What the driver tells the controller at the end of a round.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RoundReport {
    /// Round number, from 0; must be the next one.
    pub round: u32,
    /// When the round began sending; for round 0, when dirty tracking
    /// started. Not before the previous round's `ended`.
    pub started: Duration,
    /// When the transport had delivered the round's last byte, or (a
    /// driver that pipelines rounds) when it was handed to the transport.
    /// Between `started` and `ended`; the measured bandwidth is
    /// `wire_bytes / (send_done - started)`, so `wire_bytes` should count
    /// what went on the wire in that time.
    pub send_done: Duration,
    /// When the bitmap read that ends the round was taken.
    pub ended: Duration,
    /// Pages sent this round.
    pub pages_sent: u64,
    /// Of those, pages sent as zero-page tags.
    pub zero_pages: u64,
    /// Guest bytes sent (before compression).
    pub bytes_sent: u64,
    /// Bytes that went on the wire for them (after compression, with
    /// framing).
    pub wire_bytes: u64,
    /// Pages set in the bitmap read at `ended`: the dirty set in hand.
    pub dirty_pages: u64,
    /// Pages found dirty since the previous round ended, counted at every
    /// bitmap read, for the dirty rate; 0 means `dirty_pages`. A driver
    /// that reads the bitmap while a round sends, and leaves out of the
    /// set the pages it had not read yet (what it sends of them holds the
    /// write), finds more pages dirty than it keeps.
    pub pages_dirtied: u64,
    /// The transport's bandwidth estimate at `ended`, in wire bytes per
    /// second, if it has one. When present, finite and positive, it is used
    /// instead of the controller's own measure for this round.
    pub transport_wire_bandwidth: Option<f64>,
}

/// What the driver tells the controller once the stop-and-copy is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StopCopyReport {
    /// When the vCPUs were paused.
    pub paused: Duration,
    /// When the destination reported ready to resume (the downtime ends).
    pub resumed: Duration,
    /// Pages sent while paused.
    pub pages_sent: u64,
    /// Guest bytes sent while paused (device state included, if counted).
    pub bytes_sent: u64,
    /// Bytes on the wire while paused.
    pub wire_bytes: u64,
}

/// Why a migration was given up. The source guest keeps running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelReason {
    /// A round ended past [`ControllerConfig::deadline`] without being able
    /// to stop.
    DeadlineExceeded,
    /// [`ControllerConfig::max_rounds`] rounds went by without being able to
    /// stop.
    RoundLimit,
    /// The rounds stopped shrinking and throttling is not allowed or already
    /// at its maximum.
    NotConverging,
}

impl fmt::Display for CancelReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CancelReason::DeadlineExceeded => "deadline exceeded",
            CancelReason::RoundLimit => "round limit reached",
            CancelReason::NotConverging => "not converging",
        })
    }
}

/// The controller's answer to a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Send the dirty set in hand as the next round.
    Continue {
        /// A new throttle, in percent, to apply before the next round;
        /// `None` to keep the current one.
        throttle: Option<u8>,
        /// Do not take the bitmap read that ends the next round before this
        /// time (see the module docs, "Short rounds").
        end_not_before: Duration,
    },
    /// Pause the guest, read the bitmap a last time, send the dirty set and
    /// the device state.
    StopAndCopy {
        /// Predicted downtime; at most the limit.
        predicted_downtime: Duration,
        /// The dirty set in hand.
        dirty_pages: u64,
    },
    /// Give up: end dirty tracking and throttling; the source keeps running.
    Cancel(CancelReason),
}

impl Decision {
    /// Whether this ends the rounds (stop or cancel).
    pub fn is_final(&self) -> bool {
        !matches!(self, Decision::Continue { .. })
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::Continue {
                throttle: Some(p), ..
            } => write!(f, "continue, throttle {p}%"),
            Decision::Continue { throttle: None, .. } => f.write_str("continue"),
            Decision::StopAndCopy {
                predicted_downtime,
                dirty_pages,
            } => write!(
                f,
                "stop and copy {dirty_pages} pages, predicted downtime {:.1} ms",
                predicted_downtime.as_secs_f64() * 1e3
            ),
            Decision::Cancel(reason) => write!(f, "cancel: {reason}"),
        }
    }
}

/// Where the bandwidth of a prediction came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BandwidthSource {
    /// The transport's estimate in the report.
    Transport,
    /// The controller's measure over the rounds.
    Measured,
}

/// What one round did and what the controller made of it: the per-round
/// event of a migration, to log or report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundMetrics {
    /// Round number.
    pub round: u32,
    /// When it started, since the migration started.
    pub started: Duration,
    /// When it ended (its bitmap read).
    pub ended: Duration,
    /// Pages sent.
    pub pages_sent: u64,
    /// Of those, zero pages.
    pub zero_pages: u64,
    /// Guest bytes sent.
    pub bytes_sent: u64,
    /// Bytes on the wire.
    pub wire_bytes: u64,
    /// Guest bytes per wire byte of the round (zero pages included); `None`
    /// when nothing went on the wire.
    pub ratio: Option<f64>,
    /// The dirty set in hand at the end of the round.
    pub dirty_pages: u64,
    /// Dirty-rate estimate, in bytes per second.
    pub dirty_rate: f64,
    /// Wire bandwidth used for the prediction, in bytes per second.
    pub wire_bandwidth: Option<f64>,
    /// Where `wire_bandwidth` came from.
    pub bandwidth_source: BandwidthSource,
    /// Effective bandwidth (wire bandwidth x estimated ratio), in guest
    /// bytes per second.
    pub effective_bandwidth: Option<f64>,
    /// Predicted downtime of stopping after this round; `None` without a
    /// bandwidth figure.
    pub predicted_downtime: Option<Duration>,
    /// Throttle in effect during the round, in percent.
    pub throttle: u8,
    /// What the controller decided.
    pub decision: Decision,
}

impl RoundMetrics {
    /// Dirty rate in MiB per second.
    pub fn dirty_rate_mib_s(&self) -> f64 {
        self.dirty_rate / (1024.0 * 1024.0)
    }

    /// Effective bandwidth in Gbit per second (guest bytes).
    pub fn effective_gbit_s(&self) -> Option<f64> {
        self.effective_bandwidth.map(|b| b * 8.0 / 1e9)
    }

    /// Wire bandwidth in Gbit per second.
    pub fn wire_gbit_s(&self) -> Option<f64> {
        self.wire_bandwidth.map(|b| b * 8.0 / 1e9)
    }
}

impl fmt::Display for RoundMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "round {}: {} pages ({} zero), {} bytes, {} on the wire",
            self.round, self.pages_sent, self.zero_pages, self.bytes_sent, self.wire_bytes
        )?;
        if let Some(r) = self.ratio {
            write!(f, " ({r:.2}x)")?;
        }
        write!(
            f,
            ", {} dirty, dirty rate {:.1} MiB/s",
            self.dirty_pages,
            self.dirty_rate_mib_s()
        )?;
        if let Some(g) = self.wire_gbit_s() {
            let source = match self.bandwidth_source {
                BandwidthSource::Transport => "transport",
                BandwidthSource::Measured => "measured",
            };
            write!(f, ", wire {g:.2} Gbit/s ({source})")?;
        }
        if let Some(d) = self.predicted_downtime {
            write!(f, ", predicted downtime {:.1} ms", d.as_secs_f64() * 1e3)?;
        }
        write!(f, ", throttle {}%: {}", self.throttle, self.decision)
    }
}

/// The whole migration, as far as it went.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationSummary {
    /// Rounds reported.
    pub rounds: u32,
    /// Pages sent, rounds and stop-and-copy.
    pub pages_sent: u64,
    /// Guest bytes sent, rounds and stop-and-copy.
    pub bytes_sent: u64,
    /// Bytes on the wire, rounds and stop-and-copy.
    pub wire_bytes: u64,
    /// Highest throttle asked for, in percent.
    pub max_throttle: u8,
    /// Whether the controller decided to stop-and-copy.
    pub converged: bool,
    /// Why it gave up, if it did.
    pub cancel_reason: Option<CancelReason>,
    /// Predicted downtime of the stop.
    pub predicted_downtime: Option<Duration>,
    /// Measured downtime, once the stop-and-copy was reported.
    pub actual_downtime: Option<Duration>,
    /// Time from the start to the last report.
    pub total_time: Duration,
}

impl MigrationSummary {
    /// Guest bytes per wire byte over the migration.
    pub fn ratio(&self) -> Option<f64> {
        (self.wire_bytes > 0).then(|| self.bytes_sent as f64 / self.wire_bytes as f64)
    }
}

/// An exponential average weighted by time.
#[derive(Debug, Clone, Copy, Default)]
struct Ewma {
    value: Option<f64>,
}

impl Ewma {
    fn update(&mut self, sample: f64, dt: Duration, tau: Duration) {
        if !sample.is_finite() || sample < 0.0 || dt.is_zero() {
            return;
        }
        self.value = Some(match self.value {
            None => sample,
            Some(v) => {
                let alpha = 1.0 - (-(dt.as_secs_f64() / tau.as_secs_f64())).exp();
                v + alpha * (sample - v)
            }
        });
    }
}

/// Seconds to a `Duration`, saturating (a huge or undefined time is "too
/// long", which never stops a migration).
fn secs(x: f64) -> Duration {
    Duration::try_from_secs_f64(x).unwrap_or(Duration::MAX)
}

/// The predicted downtime of sending `dirty_pages` of `page_size` bytes at
/// `effective_bandwidth` guest bytes per second, plus `fixed_stop_cost`;
/// `None` when pages are left and the bandwidth is unknown or not positive.
pub fn predict_downtime(
    dirty_pages: u64,
    page_size: u64,
    effective_bandwidth: Option<f64>,
    fixed_stop_cost: Duration,
) -> Option<Duration> {
    if dirty_pages == 0 {
        return Some(fixed_stop_cost);
    }
    let bw = effective_bandwidth.filter(|b| b.is_finite() && *b > 0.0)?;
    let bytes = dirty_pages as f64 * page_size as f64;
    Some(secs(bytes / bw).saturating_add(fixed_stop_cost))
}

/// The pre-copy convergence controller (see the module docs for the rules).
#[derive(Debug, Clone)]
pub struct PrecopyController {
    config: ControllerConfig,
    total_pages: u64,
    next_round: u32,
    last_ended: Option<Duration>,
    prev_dirty: Option<u64>,
    stalled: u32,
    throttle: u8,
    max_throttle: u8,
    /// Pages per second.
    dirty_rate: Ewma,
    /// Measured wire bytes per second.
    wire_bandwidth: Ewma,
    /// Non-zero guest bytes per wire byte.
    ratio: Ewma,
    rounds: Vec<RoundMetrics>,
    outcome: Option<Decision>,
    stop_copy: Option<StopCopyReport>,
}

impl PrecopyController {
    /// A controller for a guest of `total_pages` pages, or the reason the
    /// settings are refused.
    pub fn new(config: ControllerConfig, total_pages: u64) -> Result<Self, ControllerError> {
        config.validate()?;
        Ok(Self {
            rounds: Vec::with_capacity(config.max_rounds.min(64) as usize),
            config,
            total_pages,
            next_round: 0,
            last_ended: None,
            prev_dirty: None,
            stalled: 0,
            throttle: 0,
            max_throttle: 0,
            dirty_rate: Ewma::default(),
            wire_bandwidth: Ewma::default(),
            ratio: Ewma::default(),
            outcome: None,
            stop_copy: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &ControllerConfig {
        &self.config
    }

    /// The round the controller expects next.
    pub fn next_round(&self) -> u32 {
        self.next_round
    }

    /// The throttle currently asked for, in percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// The final decision, once there is one.
    pub fn outcome(&self) -> Option<Decision> {
        self.outcome
    }

    /// Metrics of every round so far, oldest first.
    pub fn rounds(&self) -> &[RoundMetrics] {
        &self.rounds
    }

    /// Metrics of the last round.
    pub fn last_round(&self) -> Option<&RoundMetrics> {
        self.rounds.last()
    }

    /// The dirty-rate estimate, in pages per second.
    pub fn dirty_rate(&self) -> Option<f64> {
        self.dirty_rate.value
    }

    /// The controller's own wire-bandwidth measure, in bytes per second.
    pub fn measured_wire_bandwidth(&self) -> Option<f64> {
        self.wire_bandwidth.value
    }

    /// The compression-ratio estimate of non-zero pages (1.0 until
    /// measured).
    pub fn ratio_estimate(&self) -> f64 {
        self.ratio.value.unwrap_or(1.0)
    }

    fn check(&self, r: &RoundReport) -> Result<(), ControllerError> {
        if let Some(d) = self.outcome {
            return Err(ControllerError::Finished(d));
        }
        if r.round != self.next_round {
            return Err(ControllerError::RoundOutOfOrder {
                expected: self.next_round,
                got: r.round,
            });
        }
        let time = |what| {
            Err(ControllerError::TimeOutOfOrder {
                round: r.round,
                what,
            })
        };
        if r.send_done < r.started {
            return time("send_done is before started");
        }
        if r.ended < r.send_done {
            return time("ended is before send_done");
        }
        if self.last_ended.is_some_and(|last| r.started < last) {
            return time("started is before the previous round ended");
        }
        let count = |what, value, limit| {
            Err(ControllerError::CountOutOfRange {
                round: r.round,
                what,
                value,
                limit,
            })
        };
        if r.pages_sent > self.total_pages {
            return count("pages_sent", r.pages_sent, self.total_pages);
        }
        if r.dirty_pages > self.total_pages {
            return count("dirty_pages", r.dirty_pages, self.total_pages);
        }
        if r.zero_pages > r.pages_sent {
            return count("zero_pages", r.zero_pages, r.pages_sent);
        }
        Ok(())
    }

    /// The downtime predicted after one more round that sends `dirty`
    /// pages: that round lasts about their transfer time (at least
    /// `min_round`), and the guest dirties pages at the estimated rate
    /// meanwhile (never more than `dirty`, which is the set a round of that
    /// length would otherwise leave).
    fn polish_prediction(&self, dirty: u64, effective: Option<f64>) -> Option<Duration> {
        let cfg = &self.config;
        let bw = effective.filter(|b| *b > 0.0 && b.is_finite())?;
        let rate = self.dirty_rate.value?;
        let send = dirty as f64 * cfg.page_size as f64 / bw;
        let round = send.max(cfg.min_round.as_secs_f64());
        let next = ((rate * round).ceil() as u64).min(dirty);
        predict_downtime(next, cfg.page_size, effective, cfg.fixed_stop_cost)
    }

    /// Takes the report of a finished round and decides what comes next.
    ///
    /// A report that contradicts the earlier ones is refused with an error
    /// and changes nothing; so is any report after a final decision.
    pub fn handle_round(&mut self, r: RoundReport) -> Result<Decision, ControllerError> {
        self.check(&r)?;
        let cfg = &self.config;
        let tau = cfg.smoothing;
        let ps = cfg.page_size;

        // Estimates.
        let send_dt = r.send_done.saturating_sub(r.started);
        if r.wire_bytes > 0 && !send_dt.is_zero() {
            let sample = r.wire_bytes as f64 / send_dt.as_secs_f64();
            self.wire_bandwidth.update(sample, send_dt, tau);
            let nonzero = r.bytes_sent.saturating_sub(r.zero_pages.saturating_mul(ps));
            if nonzero > 0 {
                self.ratio
                    .update(nonzero as f64 / r.wire_bytes as f64, send_dt, tau);
            }
        }
        let dirty_dt = r.ended.saturating_sub(self.last_ended.unwrap_or(r.started));
        if !dirty_dt.is_zero() {
            let sample = r.dirty_pages.max(r.pages_dirtied) as f64 / dirty_dt.as_secs_f64();
            self.dirty_rate.update(sample, dirty_dt, tau);
        }
        let transport = r
            .transport_wire_bandwidth
            .filter(|b| b.is_finite() && *b > 0.0);
        let (wire_bandwidth, bandwidth_source) = match transport {
            Some(b) => (Some(b), BandwidthSource::Transport),
            None => (self.wire_bandwidth.value, BandwidthSource::Measured),
        };
        let effective_bandwidth = wire_bandwidth.map(|b| b * self.ratio_estimate());
        let predicted =
            predict_downtime(r.dirty_pages, ps, effective_bandwidth, cfg.fixed_stop_cost);

        // Convergence: did the dirty set shrink enough?
        let stalled = match self.prev_dirty {
            Some(prev) => {
                u128::from(r.dirty_pages) * 100 >= u128::from(cfg.stall_percent) * u128::from(prev)
            }
            None => false,
        };
        let stall_count = if stalled {
            self.stalled.saturating_add(1)
        } else {
            0
        };

        let last_round = r.round.saturating_add(1) >= cfg.max_rounds
            || cfg.deadline.is_some_and(|d| r.ended >= d);
        let decision = match predicted {
            Some(p)
                if p <= cfg.downtime_limit
                    && cfg.polish
                    && !last_round
                    && self
                        .polish_prediction(r.dirty_pages, effective_bandwidth)
                        .is_some_and(|next| next.as_secs_f64() <= p.as_secs_f64() * 0.75) =>
            {
                Decision::Continue {
                    throttle: None,
                    end_not_before: r.ended.saturating_add(cfg.min_round),
                }
            }
            Some(p) if p <= cfg.downtime_limit => Decision::StopAndCopy {
                predicted_downtime: p,
                dirty_pages: r.dirty_pages,
            },
            _ if cfg.deadline.is_some_and(|d| r.ended >= d) => {
                Decision::Cancel(CancelReason::DeadlineExceeded)
            }
            _ if r.round.saturating_add(1) >= cfg.max_rounds => {
                Decision::Cancel(CancelReason::RoundLimit)
            }
            _ if stall_count >= cfg.stall_rounds => {
                if cfg.allow_throttle && self.throttle < cfg.throttle_max {
                    let next = if self.throttle == 0 {
                        cfg.throttle_initial
                    } else {
                        self.throttle.saturating_add(cfg.throttle_step)
                    };
                    Decision::Continue {
                        throttle: Some(next.min(cfg.throttle_max)),
                        end_not_before: r.ended.saturating_add(cfg.min_round),
                    }
                } else {
                    Decision::Cancel(CancelReason::NotConverging)
                }
            }
            _ => Decision::Continue {
                throttle: None,
                end_not_before: r.ended.saturating_add(cfg.min_round),
            },
        };

        self.rounds.push(RoundMetrics {
            round: r.round,
            started: r.started,
            ended: r.ended,
            pages_sent: r.pages_sent,
            zero_pages: r.zero_pages,
            bytes_sent: r.bytes_sent,
            wire_bytes: r.wire_bytes,
            ratio: (r.wire_bytes > 0).then(|| r.bytes_sent as f64 / r.wire_bytes as f64),
            dirty_pages: r.dirty_pages,
            dirty_rate: self.dirty_rate.value.unwrap_or(0.0) * ps as f64,
            wire_bandwidth,
            bandwidth_source,
            effective_bandwidth,
            predicted_downtime: predicted,
            throttle: self.throttle,
            decision,
        });
        self.next_round = self.next_round.saturating_add(1);
        self.last_ended = Some(r.ended);
        self.prev_dirty = Some(r.dirty_pages);
        self.stalled = stall_count;
        match decision {
            Decision::Continue {
                throttle: Some(t), ..
            } => {
                self.throttle = t;
                self.max_throttle = self.max_throttle.max(t);
                self.stalled = 0;
            }
            Decision::Continue { throttle: None, .. } => {}
            Decision::StopAndCopy { .. } | Decision::Cancel(_) => self.outcome = Some(decision),
        }
        Ok(decision)
    }

    /// Takes the report of the stop-and-copy, for the summary's actual
    /// downtime and totals. Only after a [`Decision::StopAndCopy`], once.
    pub fn handle_stop_copy(&mut self, s: StopCopyReport) -> Result<(), ControllerError> {
        if !matches!(self.outcome, Some(Decision::StopAndCopy { .. })) || self.stop_copy.is_some() {
            return Err(ControllerError::NotStopping);
        }
        let time = |what| {
            Err(ControllerError::TimeOutOfOrder {
                round: u32::MAX,
                what,
            })
        };
        if self.last_ended.is_some_and(|last| s.paused < last) {
            return time("paused is before the last round ended");
        }
        if s.resumed < s.paused {
            return time("resumed is before paused");
        }
        if s.pages_sent > self.total_pages {
            return Err(ControllerError::CountOutOfRange {
                round: u32::MAX,
                what: "pages_sent",
                value: s.pages_sent,
                limit: self.total_pages,
            });
        }
        self.stop_copy = Some(s);
        Ok(())
    }

    /// The migration so far: rounds, totals, throttling, outcome.
    pub fn summary(&self) -> MigrationSummary {
        let mut pages = 0u64;
        let mut bytes = 0u64;
        let mut wire = 0u64;
        for m in &self.rounds {
            pages = pages.saturating_add(m.pages_sent);
            bytes = bytes.saturating_add(m.bytes_sent);
            wire = wire.saturating_add(m.wire_bytes);
        }
        let mut total_time = self.last_ended.unwrap_or_default();
        if let Some(s) = self.stop_copy {
            pages = pages.saturating_add(s.pages_sent);
            bytes = bytes.saturating_add(s.bytes_sent);
            wire = wire.saturating_add(s.wire_bytes);
            total_time = total_time.max(s.resumed);
        }
        MigrationSummary {
            rounds: self.next_round,
            pages_sent: pages,
            bytes_sent: bytes,
            wire_bytes: wire,
            max_throttle: self.max_throttle,
            converged: matches!(self.outcome, Some(Decision::StopAndCopy { .. })),
            cancel_reason: match self.outcome {
                Some(Decision::Cancel(reason)) => Some(reason),
                _ => None,
            },
            predicted_downtime: match self.outcome {
                Some(Decision::StopAndCopy {
                    predicted_downtime, ..
                }) => Some(predicted_downtime),
                _ => None,
            },
            actual_downtime: self.stop_copy.map(|s| s.resumed.saturating_sub(s.paused)),
            total_time,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const PS: u64 = 4096;
    /// 1 Gbit/s in bytes per second.
    const GBIT: f64 = 125_000_000.0;
    const MIB: f64 = 1024.0 * 1024.0;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A guest writing `rate` random pages per second (scaled down by the
    /// throttle) within its first `working_set` pages.
    struct SimGuest {
        rng: u64,
        working_set: u64,
        bits: Vec<u64>,
        dirty: u64,
        rate: f64,
        carry: f64,
    }

    impl SimGuest {
        fn new(working_set: u64, rate: f64, seed: u64) -> Self {
            Self {
                rng: seed,
                working_set: working_set.max(1),
                bits: vec![0; working_set.max(1).div_ceil(64) as usize],
                dirty: 0,
                rate,
                carry: 0.0,
            }
        }

        fn next(&mut self) -> u64 {
            // splitmix64
            self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        /// Runs for `dt` under `throttle` percent.
        fn run(&mut self, dt: Duration, throttle: u8) {
            let writes =
                self.rate * (1.0 - f64::from(throttle) / 100.0) * dt.as_secs_f64() + self.carry;
            let n = writes.floor();
            self.carry = writes - n;
            for _ in 0..n as u64 {
                let page = self.next() % self.working_set;
                let (w, b) = ((page / 64) as usize, page % 64);
                if self.bits[w] & (1 << b) == 0 {
                    self.bits[w] |= 1 << b;
                    self.dirty += 1;
                }
            }
        }

        fn read_and_clear(&mut self) -> u64 {
            self.bits.iter_mut().for_each(|w| *w = 0);
            std::mem::take(&mut self.dirty)
        }
    }

    /// A migration of a simulated guest over a simulated link.
    struct Sim {
        guest: SimGuest,
        total_pages: u64,
        /// Zero pages of round 0.
        zero_pages: u64,
        /// Wire bytes per second.
        link: f64,
        /// Compression ratio of non-zero pages.
        ratio: f64,
        /// Per-round latency (last ack).
        rtt: Duration,
        /// What stopping costs besides the pages (device state, resume).
        stop_cost: Duration,
        /// Hand the true link rate to the controller as the transport's
        /// estimate.
        transport_figure: bool,
    }

    const ZERO_TAG: u64 = 16;

    struct SimResult {
        decision: Decision,
        summary: MigrationSummary,
        rounds: Vec<RoundMetrics>,
        /// Downtime the simulated stop-and-copy took.
        actual_downtime: Option<Duration>,
    }

    impl Sim {
        fn new(total_pages: u64, working_set: u64, rate: f64, link: f64) -> Self {
            Self {
                guest: SimGuest::new(working_set, rate, 0x5eed),
                total_pages,
                zero_pages: total_pages / 2,
                link,
                ratio: 1.0,
                rtt: ms(1),
                stop_cost: ms(5),
                transport_figure: false,
            }
        }

        fn wire(&self, pages: u64, zero: u64) -> u64 {
            let nonzero = pages - zero;
            (nonzero as f64 * PS as f64 / self.ratio) as u64 + zero * ZERO_TAG
        }

        fn run(mut self, config: ControllerConfig) -> SimResult {
            let mut ctl = PrecopyController::new(config, self.total_pages).unwrap();
            let mut now = Duration::ZERO;
            let mut to_send = self.total_pages;
            let mut zero = self.zero_pages;
            let mut throttle = 0u8;
            let mut end_not_before = Duration::ZERO;
            for round in 0.. {
                let started = now;
                let wire = self.wire(to_send, zero);
                let dt = secs(wire as f64 / self.link) + self.rtt;
                self.guest.run(dt, throttle);
                now += dt;
                let send_done = now;
                if now < end_not_before {
                    self.guest.run(end_not_before - now, throttle);
                    now = end_not_before;
                }
                let dirty = self.guest.read_and_clear();
                let decision = ctl
                    .handle_round(RoundReport {
                        round,
                        started,
                        send_done,
                        ended: now,
                        pages_sent: to_send,
                        zero_pages: zero,
                        bytes_sent: to_send * PS,
                        wire_bytes: wire,
                        dirty_pages: dirty,
                        pages_dirtied: 0,
                        transport_wire_bandwidth: self.transport_figure.then_some(self.link),
                    })
                    .unwrap();
                match decision {
                    Decision::Continue {
                        throttle: t,
                        end_not_before: e,
                    } => {
                        if let Some(t) = t {
                            assert!(t > throttle, "throttle only goes up");
                            throttle = t;
                        }
                        assert!(e > now);
                        end_not_before = e;
                        to_send = dirty;
                        zero = 0;
                    }
                    Decision::StopAndCopy { dirty_pages, .. } => {
                        assert_eq!(dirty_pages, dirty);
                        let wire = self.wire(dirty, 0);
                        let downtime = secs(wire as f64 / self.link) + self.rtt + self.stop_cost;
                        ctl.handle_stop_copy(StopCopyReport {
                            paused: now,
                            resumed: now + downtime,
                            pages_sent: dirty,
                            bytes_sent: dirty * PS,
                            wire_bytes: wire,
                        })
                        .unwrap();
                        return SimResult {
                            decision,
                            summary: ctl.summary(),
                            rounds: ctl.rounds().to_vec(),
                            actual_downtime: Some(downtime),
                        };
                    }
                    Decision::Cancel(_) => {
                        return SimResult {
                            decision,
                            summary: ctl.summary(),
                            rounds: ctl.rounds().to_vec(),
                            actual_downtime: None,
                        };
                    }
                }
            }
            unreachable!("the controller always ends")
        }
    }

    fn show(rounds: &[RoundMetrics]) -> String {
        rounds.iter().map(|m| format!("{m}\n")).collect()
    }

    /// 1 GiB guest.
    const GUEST: u64 = 262_144;

    #[test]
    fn no_dirtying_stops_after_round_0() {
        let r = Sim::new(GUEST, 1, 0.0, GBIT).run(ControllerConfig::default());
        assert_eq!(r.summary.rounds, 1, "{}", show(&r.rounds));
        assert_eq!(
            r.decision,
            Decision::StopAndCopy {
                predicted_downtime: ControllerConfig::default().fixed_stop_cost,
                dirty_pages: 0
            }
        );
        let m = &r.rounds[0];
        assert_eq!(m.pages_sent, GUEST);
        assert_eq!(m.zero_pages, GUEST / 2);
        assert!(m.ratio.unwrap() > 1.9, "zero pages go as tags");
        assert!(r.summary.converged);
        assert_eq!(r.summary.max_throttle, 0);
    }

    #[test]
    fn low_dirty_rate_converges_in_a_few_rounds() {
        // 30 MiB/s within a 64 MiB working set, over 1 Gbit/s.
        let rate = 30.0 * MIB / PS as f64;
        for transport_figure in [false, true] {
            let mut sim = Sim::new(GUEST, 16_384, rate, GBIT);
            sim.transport_figure = transport_figure;
            let r = sim.run(ControllerConfig::default());
            let log = show(&r.rounds);
            let Decision::StopAndCopy {
                predicted_downtime, ..
            } = r.decision
            else {
                panic!("{log}");
            };
            assert!(r.summary.rounds <= 5, "{log}");
            assert!(predicted_downtime <= ms(50), "{log}");
            assert!(r.actual_downtime.unwrap() <= ms(50), "{log}");
            assert_eq!(r.summary.max_throttle, 0, "{log}");
            assert!(r.summary.converged);
            assert_eq!(r.summary.predicted_downtime, Some(predicted_downtime));
            // The dirty-rate estimate is about the simulated rate (unique
            // pages: a bit less), once the working set no longer saturates.
            let last = r.rounds.last().unwrap();
            let mib = last.dirty_rate_mib_s();
            assert!((15.0..=31.0).contains(&mib), "{mib} {log}");
            let source = if transport_figure {
                BandwidthSource::Transport
            } else {
                BandwidthSource::Measured
            };
            assert_eq!(last.bandwidth_source, source);
            let gbit = last.effective_gbit_s().unwrap();
            assert!((0.9..=1.01).contains(&gbit), "{gbit} {log}");
        }
    }

    #[test]
    fn compression_counts_in_the_prediction() {
        // 2x compressible pages: the same guest stops with a smaller
        // predicted downtime than with raw pages.
        let rate = 30.0 * MIB / PS as f64;
        let predicted = |ratio| {
            let mut sim = Sim::new(GUEST, 16_384, rate, GBIT);
            sim.ratio = ratio;
            sim.transport_figure = true;
            let r = sim.run(ControllerConfig::default());
            let m = r.rounds.last().unwrap();
            let expected = predict_downtime(m.dirty_pages, PS, Some(GBIT * ratio), ms(10));
            let got = m.predicted_downtime.unwrap();
            let want = expected.unwrap();
            // The ratio estimate counts zero-page tags of round 0 and
            // rounding of wire bytes: within a percent.
            assert!(got >= want && got.as_secs_f64() <= want.as_secs_f64() * 1.01);
            r.summary
        };
        let raw = predicted(1.0);
        let compressed = predicted(2.0);
        assert!(compressed.converged && raw.converged);
        assert!(compressed.ratio().unwrap() > raw.ratio().unwrap());
    }

    #[test]
    fn high_dirty_rate_throttles_until_it_converges() {
        // ~234 MiB/s (about 2 Gbit/s) within a 512 MiB working set, over
        // 1 Gbit/s.
        let rate = 60_000.0;
        let r = Sim::new(GUEST, 131_072, rate, GBIT).run(ControllerConfig::default());
        let log = show(&r.rounds);
        assert!(r.summary.converged, "{log}");
        assert!(r.actual_downtime.unwrap() <= ms(50), "{log}");
        // Throttle asked for as 20, 30, 40, ... in steps, never lowered.
        let steps: Vec<u8> = r
            .rounds
            .iter()
            .filter_map(|m| match m.decision {
                Decision::Continue { throttle, .. } => throttle,
                _ => None,
            })
            .collect();
        assert!(steps.len() >= 2, "{log}");
        assert_eq!(steps[0], 20);
        assert!(steps.windows(2).all(|w| w[1] == w[0] + 10), "{steps:?}");
        assert_eq!(r.summary.max_throttle, *steps.last().unwrap());
        // The first step comes after round 0 and two stalled rounds.
        assert!(matches!(
            r.rounds[2].decision,
            Decision::Continue {
                throttle: Some(20),
                ..
            }
        ));
        // Each level gets two rounds before the next.
        let at: Vec<usize> = r
            .rounds
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                matches!(
                    m.decision,
                    Decision::Continue {
                        throttle: Some(_),
                        ..
                    }
                )
            })
            .map(|(i, _)| i)
            .collect();
        assert!(at.windows(2).all(|w| w[1] - w[0] >= 2), "{at:?}");
        // The guest writes 2x what the link carries: it takes a throttle
        // of about 60% (0.8x the link) for rounds to shrink fast enough.
        assert!((50..=70).contains(&r.summary.max_throttle), "{log}");
        // Once there, the dirty sets shrink round after round (by about
        // 20%: 24,000 pages/s written against 30,500 pages/s sent).
        let tail = &r.rounds[r.rounds.len() - 4..];
        assert!(
            tail.windows(2)
                .all(|w| w[1].dirty_pages * 100 < w[0].dirty_pages * 85),
            "{log}"
        );
        assert!(tail.iter().all(|m| m.throttle == r.summary.max_throttle));
    }

    #[test]
    fn high_dirty_rate_without_throttle_gives_up() {
        let rate = 60_000.0;
        let r = Sim::new(GUEST, 131_072, rate, GBIT).run(ControllerConfig {
            allow_throttle: false,
            ..Default::default()
        });
        let log = show(&r.rounds);
        assert_eq!(
            r.decision,
            Decision::Cancel(CancelReason::NotConverging),
            "{log}"
        );
        // Round 0, then two rounds that did not shrink.
        assert_eq!(r.summary.rounds, 3, "{log}");
        assert_eq!(r.summary.cancel_reason, Some(CancelReason::NotConverging));
        assert!(!r.summary.converged);
        assert_eq!(r.summary.max_throttle, 0);
    }

    #[test]
    fn throttle_at_max_that_does_not_help_gives_up() {
        // A rate so high that even 40% throttle leaves it above the link.
        let r = Sim::new(GUEST, 131_072, 600_000.0, GBIT).run(ControllerConfig {
            throttle_max: 40,
            max_rounds: 100,
            ..Default::default()
        });
        let log = show(&r.rounds);
        assert_eq!(
            r.decision,
            Decision::Cancel(CancelReason::NotConverging),
            "{log}"
        );
        assert_eq!(r.summary.max_throttle, 40);
        // 20, 30, 40, each with its two rounds, then two more at 40.
        assert_eq!(r.summary.rounds, 9, "{log}");
    }

    #[test]
    fn deadline_cancels() {
        // Not converging, throttle not allowed, and stall detection that
        // never fires: the deadline does.
        let r = Sim::new(GUEST, 131_072, 60_000.0, GBIT).run(ControllerConfig {
            allow_throttle: false,
            stall_rounds: 1000,
            deadline: Some(Duration::from_secs(20)),
            max_rounds: 1000,
            ..Default::default()
        });
        let log = show(&r.rounds);
        assert_eq!(
            r.decision,
            Decision::Cancel(CancelReason::DeadlineExceeded),
            "{log}"
        );
        let rounds = &r.rounds;
        assert!(rounds.last().unwrap().ended >= Duration::from_secs(20));
        assert!(
            rounds[rounds.len() - 2].ended < Duration::from_secs(20),
            "{log}"
        );
        assert_eq!(
            r.summary.cancel_reason,
            Some(CancelReason::DeadlineExceeded)
        );
    }

    #[test]
    fn round_limit_cancels() {
        let r = Sim::new(GUEST, 131_072, 60_000.0, GBIT).run(ControllerConfig {
            allow_throttle: false,
            stall_rounds: 1000,
            max_rounds: 4,
            ..Default::default()
        });
        assert_eq!(r.decision, Decision::Cancel(CancelReason::RoundLimit));
        assert_eq!(r.summary.rounds, 4);
        // The stop rule still wins on the last round.
        let r = Sim::new(GUEST, 16_384, 30.0 * MIB / PS as f64, GBIT).run(ControllerConfig {
            max_rounds: 3,
            ..Default::default()
        });
        assert!(r.summary.converged, "{}", show(&r.rounds));
    }

    fn report(round: u32, start: u64, end: u64, dirty: u64) -> RoundReport {
        RoundReport {
            round,
            started: ms(start),
            send_done: ms(end),
            ended: ms(end),
            pages_sent: 0,
            zero_pages: 0,
            bytes_sent: 0,
            wire_bytes: 0,
            dirty_pages: dirty,
            pages_dirtied: 0,
            transport_wire_bandwidth: None,
        }
    }

    #[test]
    fn the_dirty_rate_counts_pages_found_mid_round() {
        // 1000 pages kept of 4000 found in a 1 s round: the guest dirtied
        // 4000 pages a second, whatever the driver left out of the set.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        ctl.handle_round(RoundReport {
            pages_dirtied: 4000,
            ..report(0, 0, 1000, 1000)
        })
        .unwrap();
        assert_eq!(ctl.dirty_rate(), Some(4000.0));
        assert_eq!(ctl.last_round().unwrap().dirty_pages, 1000);
        // 0 (or fewer than the set) means the set.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        ctl.handle_round(report(0, 0, 1000, 1000)).unwrap();
        assert_eq!(ctl.dirty_rate(), Some(1000.0));
    }

    #[test]
    fn polish_rounds_cut_the_downtime_then_stop() {
        // 1000 dirty pages at 250 MB/s effective: 26.4 ms predicted, under
        // the 50 ms limit. The next round (16.4 ms long) at 10000 pages/s
        // would leave 164 pages: 12.7 ms, at most 3/4 of 26.4: go on.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        let d = ctl
            .handle_round(RoundReport {
                pages_sent: 6103,
                bytes_sent: 25_000_000,
                wire_bytes: 12_500_000,
                ..report(0, 0, 100, 1000)
            })
            .unwrap();
        assert!(
            matches!(d, Decision::Continue { throttle: None, .. }),
            "{d:?}"
        );
        // That round: 1000 pages in 17 ms, 164 dirty. 12.7 ms predicted;
        // another round (10 ms, the minimum) would leave ~100 pages:
        // 11.6 ms, not 3/4 of 12.7: stop.
        let d = ctl
            .handle_round(RoundReport {
                pages_sent: 1000,
                bytes_sent: 4_096_000,
                wire_bytes: 2_048_000,
                ..report(1, 110, 127, 164)
            })
            .unwrap();
        match d {
            Decision::StopAndCopy {
                predicted_downtime,
                dirty_pages,
            } => {
                assert_eq!(dirty_pages, 164);
                assert!(predicted_downtime < ms(20), "{predicted_downtime:?}");
            }
            other => panic!("expected a stop, got {other:?}"),
        }
    }

    #[test]
    fn prediction_formula() {
        // 1000 pages = 4,096,000 bytes at 1 Gbit/s x 2 = 250 MB/s: 16.384 ms,
        // plus 10 ms.
        let p = predict_downtime(1000, PS, Some(250e6), ms(10)).unwrap();
        assert_eq!(p, Duration::from_nanos(26_384_000));
        assert_eq!(predict_downtime(0, PS, None, ms(10)), Some(ms(10)));
        assert_eq!(predict_downtime(1, PS, None, ms(10)), None);
        assert_eq!(predict_downtime(1, PS, Some(0.0), ms(10)), None);
        assert_eq!(predict_downtime(1, PS, Some(f64::NAN), ms(10)), None);
        assert_eq!(
            predict_downtime(u64::MAX, u64::MAX, Some(1e-300), ms(10)),
            Some(Duration::MAX)
        );

        // Through the controller: measured wire 125 MB/s (12.5 MB in
        // 100 ms), ratio 2 (25 MB of guest bytes), 1000 pages dirty. (No
        // polish rounds here: see `polish_rounds_cut_the_downtime_then_stop`.)
        let no_polish = ControllerConfig {
            polish: false,
            ..ControllerConfig::default()
        };
        let mut ctl = PrecopyController::new(no_polish.clone(), 1 << 20).unwrap();
        let d = ctl
            .handle_round(RoundReport {
                pages_sent: 6103,
                bytes_sent: 25_000_000,
                wire_bytes: 12_500_000,
                ..report(0, 0, 100, 1000)
            })
            .unwrap();
        let m = ctl.last_round().unwrap();
        assert_eq!(m.wire_bandwidth, Some(125e6));
        assert_eq!(m.effective_bandwidth, Some(250e6));
        assert_eq!(m.bandwidth_source, BandwidthSource::Measured);
        assert_eq!(m.ratio, Some(2.0));
        assert_eq!(m.predicted_downtime, Some(Duration::from_nanos(26_384_000)));
        assert_eq!(m.dirty_rate, 1000.0 / 0.1 * PS as f64);
        assert_eq!(
            d,
            Decision::StopAndCopy {
                predicted_downtime: Duration::from_nanos(26_384_000),
                dirty_pages: 1000
            }
        );

        // The transport's figure wins when given: 62.5 MB/s wire doubles
        // the transfer time to 32.768 ms: 42.768 ms.
        let mut ctl = PrecopyController::new(no_polish, 1 << 20).unwrap();
        ctl.handle_round(RoundReport {
            pages_sent: 6103,
            bytes_sent: 25_000_000,
            wire_bytes: 12_500_000,
            transport_wire_bandwidth: Some(62.5e6),
            ..report(0, 0, 100, 1000)
        })
        .unwrap();
        let m = ctl.last_round().unwrap();
        assert_eq!(m.bandwidth_source, BandwidthSource::Transport);
        assert_eq!(m.predicted_downtime, Some(Duration::from_nanos(42_768_000)));
        // A nonsense transport figure is ignored.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        ctl.handle_round(RoundReport {
            wire_bytes: 12_500_000,
            bytes_sent: 12_500_000,
            transport_wire_bandwidth: Some(f64::NAN),
            ..report(0, 0, 100, 1000)
        })
        .unwrap();
        assert_eq!(
            ctl.last_round().unwrap().bandwidth_source,
            BandwidthSource::Measured
        );
    }

    #[test]
    fn zero_pages_do_not_inflate_the_ratio() {
        // Round 0: 1000 pages of which 900 zero (16-byte tags) and 100 raw.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1000).unwrap();
        ctl.handle_round(RoundReport {
            pages_sent: 1000,
            zero_pages: 900,
            bytes_sent: 1000 * PS,
            wire_bytes: 100 * PS + 900 * 16,
            ..report(0, 0, 100, 500)
        })
        .unwrap();
        let round_ratio = ctl.last_round().unwrap().ratio.unwrap();
        assert!(round_ratio > 9.0);
        let est = ctl.ratio_estimate();
        assert!((0.95..=1.0).contains(&est), "{est}");
    }

    #[test]
    fn time_weighted_smoothing() {
        let cfg = ControllerConfig::default();
        let mut ctl = PrecopyController::new(cfg, 1 << 20).unwrap();
        // 10 s round at 100 MB/s, then a 1 ms round at 1 MB/s: barely moves.
        let round = |round, start: u64, end: u64, wire| RoundReport {
            wire_bytes: wire,
            bytes_sent: wire,
            pages_sent: 1,
            ..report(round, start, end, 100_000)
        };
        ctl.handle_round(round(0, 0, 10_000, 1_000_000_000))
            .unwrap();
        assert_eq!(ctl.measured_wire_bandwidth(), Some(1e8));
        ctl.handle_round(round(1, 10_000, 10_001, 1000)).unwrap();
        let bw = ctl.measured_wire_bandwidth().unwrap();
        assert!(bw > 0.99e8, "{bw}");
        // A 10 s round at 50 MB/s: nearly all the way.
        ctl.handle_round(round(2, 10_001, 20_001, 500_000_000))
            .unwrap();
        let bw = ctl.measured_wire_bandwidth().unwrap();
        assert!((0.5e8..0.5001e8).contains(&bw), "{bw}");
        // Zero-length rounds change nothing and divide by nothing.
        let before = (ctl.measured_wire_bandwidth(), ctl.dirty_rate());
        ctl.handle_round(round(3, 20_001, 20_001, 1000)).unwrap();
        assert_eq!(before, (ctl.measured_wire_bandwidth(), ctl.dirty_rate()));
    }

    #[test]
    fn continue_asks_for_a_minimum_round() {
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        // Nothing measured yet: 10 pages dirty cannot be predicted.
        let d = ctl.handle_round(report(0, 0, 0, 10)).unwrap();
        assert_eq!(
            d,
            Decision::Continue {
                throttle: None,
                end_not_before: ms(10)
            }
        );
        assert_eq!(ctl.last_round().unwrap().predicted_downtime, None);
        let d = ctl.handle_round(report(1, 3, 25, 10)).unwrap();
        assert_eq!(
            d,
            Decision::Continue {
                throttle: None,
                end_not_before: ms(35)
            }
        );
    }

    #[test]
    fn stall_rule_and_throttle_steps() {
        let cfg = ControllerConfig {
            throttle_initial: 30,
            throttle_step: 25,
            throttle_max: 90,
            ..Default::default()
        };
        let mut ctl = PrecopyController::new(cfg, 1 << 20).unwrap();
        // Constant 100 pages per round and no bandwidth: always stalled
        // (100 >= 80% of 100) from round 1 on.
        let mut throttles = Vec::new();
        let mut end = None;
        for round in 0..30 {
            let t = u64::from(round) * 100;
            match ctl.handle_round(report(round, t, t + 100, 100)).unwrap() {
                Decision::Continue { throttle, .. } => throttles.push(throttle),
                d => {
                    end = Some((round, d));
                    break;
                }
            }
        }
        let s = |p| Some(p);
        assert_eq!(
            throttles,
            [
                None,
                None,
                s(30),
                None,
                s(55),
                None,
                s(80),
                None,
                s(90),
                None
            ]
        );
        assert_eq!(
            end,
            Some((10, Decision::Cancel(CancelReason::NotConverging)))
        );
        assert_eq!(ctl.summary().max_throttle, 90);

        // A round at 79% of the one before is progress, at 80% a stall.
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 1 << 20).unwrap();
        ctl.handle_round(report(0, 0, 100, 10_000)).unwrap();
        ctl.handle_round(report(1, 100, 200, 7900)).unwrap();
        ctl.handle_round(report(2, 200, 300, 6320)).unwrap(); // 80%: stall 1
        let d = ctl.handle_round(report(3, 300, 400, 4000)).unwrap(); // progress
        assert!(!d.is_final());
        ctl.handle_round(report(4, 400, 500, 3200)).unwrap(); // stall 1
        let d = ctl.handle_round(report(5, 500, 600, 3200)).unwrap(); // stall 2
        assert!(matches!(
            d,
            Decision::Continue {
                throttle: Some(20),
                ..
            }
        ));
    }

    #[test]
    fn stop_wins_over_deadline_and_cancel_is_final() {
        let cfg = ControllerConfig {
            deadline: Some(ms(100)),
            ..Default::default()
        };
        let mut ctl = PrecopyController::new(cfg.clone(), 100).unwrap();
        let d = ctl.handle_round(report(0, 0, 200, 0)).unwrap();
        assert!(matches!(d, Decision::StopAndCopy { .. }));
        let mut ctl = PrecopyController::new(cfg, 100).unwrap();
        let d = ctl.handle_round(report(0, 0, 200, 1)).unwrap();
        assert_eq!(d, Decision::Cancel(CancelReason::DeadlineExceeded));
        assert_eq!(
            ctl.handle_round(report(1, 200, 300, 0)),
            Err(ControllerError::Finished(d))
        );
        assert_eq!(
            ctl.handle_stop_copy(StopCopyReport::default()),
            Err(ControllerError::NotStopping)
        );
        assert_eq!(ctl.outcome(), Some(d));
    }

    #[test]
    fn bad_reports_are_refused_and_change_nothing() {
        let mut ctl = PrecopyController::new(ControllerConfig::default(), 100).unwrap();
        ctl.handle_round(report(0, 0, 100, 50)).unwrap();
        let before = format!("{ctl:?}");
        let bad = [
            report(0, 100, 200, 1),
            report(2, 100, 200, 1),
            report(1, 50, 200, 1),
            report(1, 300, 200, 1),
            RoundReport {
                send_done: ms(250),
                ..report(1, 100, 200, 1)
            },
            report(1, 100, 200, 101),
            RoundReport {
                pages_sent: 101,
                ..report(1, 100, 200, 1)
            },
            RoundReport {
                pages_sent: 5,
                zero_pages: 6,
                ..report(1, 100, 200, 1)
            },
        ];
        for r in bad {
            let e = ctl.handle_round(r).unwrap_err();
            assert!(!e.to_string().is_empty());
            assert_eq!(before, format!("{ctl:?}"), "{e}");
        }
        assert_eq!(
            ctl.handle_round(report(0, 100, 200, 1)),
            Err(ControllerError::RoundOutOfOrder {
                expected: 1,
                got: 0
            })
        );
        ctl.handle_round(report(1, 100, 200, 0)).unwrap();
        assert_eq!(
            ctl.handle_stop_copy(StopCopyReport {
                paused: ms(150),
                ..Default::default()
            }),
            Err(ControllerError::TimeOutOfOrder {
                round: u32::MAX,
                what: "paused is before the last round ended"
            })
        );
        ctl.handle_stop_copy(StopCopyReport {
            paused: ms(200),
            resumed: ms(230),
            pages_sent: 0,
            bytes_sent: 5000,
            wire_bytes: 5000,
        })
        .unwrap();
        assert_eq!(
            ctl.handle_stop_copy(StopCopyReport::default()),
            Err(ControllerError::NotStopping)
        );
        let s = ctl.summary();
        assert_eq!(s.actual_downtime, Some(ms(30)));
        assert_eq!(s.total_time, ms(230));
        assert_eq!(s.rounds, 2);
        assert_eq!(s.bytes_sent, 5000);
    }

    #[test]
    fn config_validation() {
        assert_eq!(ControllerConfig::default().validate(), Ok(()));
        type Break = fn(&mut ControllerConfig);
        let cases: [(&str, Break); 15] = [
            ("downtime_limit", |c| c.downtime_limit = Duration::ZERO),
            ("fixed_stop_cost", |c| c.fixed_stop_cost = ms(50)),
            ("deadline", |c| c.deadline = Some(Duration::ZERO)),
            ("max_rounds", |c| c.max_rounds = 0),
            ("min_round", |c| c.min_round = Duration::ZERO),
            ("throttle_max", |c| c.throttle_max = 100),
            ("throttle_initial", |c| c.throttle_initial = 0),
            ("throttle_initial", |c| {
                c.throttle_max = 10;
                c.throttle_initial = 20
            }),
            ("throttle_step", |c| c.throttle_step = 0),
            ("stall_percent", |c| c.stall_percent = 0),
            ("stall_percent", |c| c.stall_percent = 101),
            ("stall_rounds", |c| c.stall_rounds = 0),
            ("smoothing", |c| c.smoothing = Duration::ZERO),
            ("page_size", |c| c.page_size = 0),
            ("fixed_stop_cost", |c| c.downtime_limit = ms(1)),
        ];
        for (field, break_it) in cases {
            let mut c = ControllerConfig::default();
            break_it(&mut c);
            match PrecopyController::new(c, 10) {
                Err(ControllerError::InvalidConfig { field: f, reason }) => {
                    assert_eq!(f, field, "{reason}");
                }
                other => panic!("{field}: {other:?}"),
            }
        }
        // Edges that are fine.
        let c = ControllerConfig {
            fixed_stop_cost: Duration::ZERO,
            deadline: Some(Duration::from_nanos(1)),
            max_rounds: 1,
            throttle_initial: 99,
            stall_percent: 100,
            ..Default::default()
        };
        assert!(PrecopyController::new(c, 0).is_ok());
    }

    #[test]
    fn display_is_one_line() {
        let r = Sim::new(4096, 512, 1000.0, GBIT).run(ControllerConfig::default());
        for m in &r.rounds {
            let line = m.to_string();
            assert!(line.starts_with(&format!("round {}:", m.round)) && !line.contains('\n'));
        }
        assert_eq!(
            Decision::Cancel(CancelReason::RoundLimit).to_string(),
            "cancel: round limit reached"
        );
    }

    /// Valid settings, spread over their ranges.
    fn valid_config() -> impl Strategy<Value = ControllerConfig> {
        (
            (1u64..500, 0.0f64..1.0, proptest::option::of(1u64..20_000)),
            (1u32..12, 1u64..50, any::<bool>()),
            (1u8..=99, 0.0f64..=1.0, 1u8..=50),
            (1u8..=100, 1u32..4, 1u64..3000),
        )
            .prop_map(
                |((limit, fixed, deadline), (rounds, min_round, throttle), t, s)| {
                    let limit = ms(limit);
                    ControllerConfig {
                        downtime_limit: limit,
                        fixed_stop_cost: limit.mul_f64(fixed * 0.999),
                        deadline: deadline.map(ms),
                        max_rounds: rounds,
                        min_round: ms(min_round),
                        allow_throttle: throttle,
                        polish: s.2 % 2 == 0,
                        throttle_initial: ((f64::from(t.0) * t.1) as u8).max(1),
                        throttle_step: t.2,
                        throttle_max: t.0,
                        stall_percent: s.0,
                        stall_rounds: s.1,
                        smoothing: ms(s.2),
                        page_size: PS,
                    }
                },
            )
    }

    /// Any settings at all, most of them nonsense.
    fn any_config() -> impl Strategy<Value = ControllerConfig> {
        (
            (any::<u64>(), any::<u64>(), any::<Option<u64>>()),
            (any::<u32>(), any::<u64>(), any::<bool>()),
            (any::<u8>(), any::<u8>(), any::<u8>()),
            (any::<u8>(), any::<u32>(), any::<u64>(), any::<u64>()),
        )
            .prop_map(|(a, b, t, s)| ControllerConfig {
                downtime_limit: Duration::from_nanos(a.0),
                fixed_stop_cost: Duration::from_nanos(a.1),
                deadline: a.2.map(Duration::from_nanos),
                max_rounds: b.0,
                min_round: Duration::from_nanos(b.1),
                allow_throttle: b.2,
                polish: a.0 % 2 == 0,
                throttle_initial: t.0,
                throttle_step: t.1,
                throttle_max: t.2,
                stall_percent: s.0,
                stall_rounds: s.1,
                smoothing: Duration::from_nanos(s.2),
                page_size: s.3,
            })
    }

    #[derive(Debug, Clone)]
    struct Step {
        gap: u64,
        send: u64,
        wait: u64,
        pages: u64,
        zero: u64,
        bytes: u64,
        wire: u64,
        dirty: u64,
        transport: Option<f64>,
    }

    fn any_step() -> impl Strategy<Value = Step> {
        (
            (0u64..100_000, 0u64..5_000_000, 0u64..100_000),
            (any::<u64>(), any::<u64>(), any::<u64>()),
            prop_oneof![0u64..(1 << 30), any::<u64>()],
            prop_oneof![0u64..100, 0u64..100_000, any::<u64>()],
            prop_oneof![
                6 => Just(None),
                1 => Just(Some(f64::NAN)),
                1 => Just(Some(f64::INFINITY)),
                1 => Just(Some(0.0)),
                1 => (-1e12f64..1e12).prop_map(Some),
                1 => any::<f64>().prop_map(Some),
            ],
        )
            .prop_map(
                |((gap, send, wait), (pages, zero, bytes), wire, dirty, transport)| Step {
                    gap,
                    send,
                    wait,
                    pages,
                    zero,
                    bytes,
                    wire,
                    dirty,
                    transport,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any monotone timestamps and in-range counts: no panic, no
        /// stop predicted above the limit, a final decision within
        /// `max_rounds`, and nothing accepted after it.
        #[test]
        fn always_ends_within_limits(
            config in valid_config(),
            total in prop_oneof![Just(0u64), 1u64..100, 1u64..(1 << 30), Just(u64::MAX)],
            steps in proptest::collection::vec(any_step(), 12..14),
            start in prop_oneof![Just(0u64), any::<u32>().prop_map(u64::from), Just(u64::MAX / 2)],
        ) {
            let mut ctl = PrecopyController::new(config.clone(), total).unwrap();
            let mut now = Duration::from_secs(start);
            let mut done = None;
            for (round, s) in steps.into_iter().enumerate() {
                let started = now + Duration::from_micros(s.gap);
                let send_done = started + Duration::from_micros(s.send);
                let ended = send_done + Duration::from_micros(s.wait);
                now = ended;
                let pages = s.pages % total.saturating_add(1);
                let r = RoundReport {
                    round: round as u32,
                    started,
                    send_done,
                    ended,
                    pages_sent: pages,
                    zero_pages: s.zero % pages.saturating_add(1),
                    bytes_sent: s.bytes,
                    wire_bytes: s.wire,
                    dirty_pages: s.dirty.min(total),
                    pages_dirtied: 0,
                    transport_wire_bandwidth: s.transport,
                };
                let result = ctl.handle_round(r);
                if let Some(d) = done {
                    prop_assert_eq!(result, Err(ControllerError::Finished(d)));
                    continue;
                }
                let d = result.unwrap();
                let m = ctl.last_round().unwrap();
                prop_assert_eq!(m.decision, d);
                prop_assert!(m.dirty_rate.is_finite() && m.dirty_rate >= 0.0);
                match d {
                    Decision::StopAndCopy { predicted_downtime, dirty_pages } => {
                        prop_assert!(predicted_downtime <= config.downtime_limit);
                        prop_assert!(predicted_downtime >= config.fixed_stop_cost);
                        prop_assert_eq!(dirty_pages, r.dirty_pages);
                    }
                    Decision::Continue { throttle, end_not_before } => {
                        prop_assert!((round as u32) + 1 < config.max_rounds);
                        prop_assert!(end_not_before > ended);
                        if let Some(t) = throttle {
                            prop_assert!(config.allow_throttle);
                            prop_assert!(t <= config.throttle_max);
                        }
                    }
                    Decision::Cancel(CancelReason::NotConverging) => {
                        prop_assert!(
                            !config.allow_throttle || ctl.throttle() == config.throttle_max
                        );
                    }
                    Decision::Cancel(_) => {}
                }
                if d.is_final() {
                    done = Some(d);
                }
                let _ = m.to_string();
            }
            // 12+ reports, at most 11 rounds allowed.
            prop_assert!(done.is_some());
            prop_assert_eq!(ctl.summary().rounds as usize, ctl.rounds().len());
        }

    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// Simulated guests and links: the controller ends within
        /// `max_rounds`, and a stop it predicts under the limit is under
        /// the limit in the simulation too (the link figure is exact and the
        /// simulated stop cost is within `fixed_stop_cost`).
        #[test]
        fn simulated_stops_keep_their_promise(
            // The working set takes this long to send, and the guest is
            // 1 to 4 times as large.
            working_set_secs in 0.001f64..2.0,
            guest_factor in 1.0f64..4.0,
            // Writes per second, as a multiple of the pages per second the
            // link carries.
            pressure in 0.0f64..3.0,
            link in 1e6f64..3e7,
            ratio in 1.0f64..4.0,
            transport_figure in any::<bool>(),
            allow_throttle in any::<bool>(),
            seed in any::<u64>(),
        ) {
            let link_pages = link * ratio / PS as f64;
            let working_set = ((working_set_secs * link_pages) as u64).max(1);
            let pages = (working_set as f64 * guest_factor) as u64;
            let mut sim = Sim::new(pages, working_set, pressure * link_pages, link);
            sim.guest.rng = seed;
            sim.ratio = ratio;
            sim.transport_figure = transport_figure;
            let config = ControllerConfig {
                allow_throttle,
                max_rounds: 20,
                ..Default::default()
            };
            let r = sim.run(config);
            prop_assert!(r.summary.rounds <= 20);
            if let Some(actual) = r.actual_downtime {
                prop_assert!(actual <= ms(50), "{:?} {}", actual, show(&r.rounds));
            }
            if !allow_throttle {
                prop_assert_eq!(r.summary.max_throttle, 0);
            }
        }

        /// Any settings: `new` refuses exactly what `validate` refuses, and
        /// neither panics.
        #[test]
        fn config_checks_never_panic(config in any_config(), total in any::<u64>()) {
            let valid = config.validate().is_ok();
            prop_assert_eq!(PrecopyController::new(config, total).is_ok(), valid);
        }
    }
}
