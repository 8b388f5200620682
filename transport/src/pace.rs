//! Pacing, sans-IO: a token bucket for the optional rate limit, and a
//! windowed-max bandwidth estimate that feeds the codec's `auto` policy.

use std::time::{Duration, Instant};

/// A token bucket: `rate` bytes per second, bursts of up to `burst` bytes.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket. `rate` must be positive.
    pub fn new(rate_bytes_per_sec: u64, burst: u64, now: Instant) -> Self {
        let burst = burst.max(1) as f64;
        TokenBucket {
            rate: rate_bytes_per_sec.max(1) as f64,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes `n` bytes of tokens (going into debt if need be) and returns
    /// how long the caller must wait before sending them.
    pub fn take(&mut self, n: u64, now: Instant) -> Duration {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst);
        self.tokens -= n as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Delivered-bytes rate over short intervals, keeping the best interval of
/// a recent window: a slow interval (a stall, a CPU-bound codec) does not
/// drag the estimate of what the link can carry down at once.
#[derive(Debug, Clone)]
pub struct BandwidthEstimate {
    interval: Duration,
    keep: usize,
    start: Instant,
    bytes: u64,
    samples: std::collections::VecDeque<f64>,
}

impl BandwidthEstimate {
    /// Intervals of `interval`, the best of the last `keep`.
    pub fn new(interval: Duration, keep: usize, now: Instant) -> Self {
        BandwidthEstimate {
            interval,
            keep: keep.max(1),
            start: now,
            bytes: 0,
            samples: Default::default(),
        }
    }

    /// `n` bytes were delivered at `now`.
    pub fn record(&mut self, n: u64, now: Instant) {
        self.bytes += n;
        let dt = now.saturating_duration_since(self.start);
        if dt >= self.interval {
            self.samples.push_back(self.bytes as f64 / dt.as_secs_f64());
            if self.samples.len() > self.keep {
                self.samples.pop_front();
            }
            self.bytes = 0;
            self.start = now;
        }
    }

    /// Bytes per second, once an interval has been measured.
    pub fn get(&self) -> Option<f64> {
        self.samples.iter().copied().reduce(f64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_paces_to_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 100, t0);
        assert_eq!(b.take(100, t0), Duration::ZERO);
        // 500 more bytes need half a second.
        let w = b.take(500, t0);
        assert!((w.as_secs_f64() - 0.5).abs() < 1e-6, "{w:?}");
        // After waiting, the debt is paid.
        assert_eq!(b.take(0, t0 + w), Duration::ZERO);
        // Idle time refills at most the burst.
        let later = t0 + Duration::from_secs(100);
        assert_eq!(b.take(100, later), Duration::ZERO);
        assert!(b.take(100, later) > Duration::ZERO);
    }

    #[test]
    fn estimate_keeps_the_best_recent_interval() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut e = BandwidthEstimate::new(ms(100), 3, t0);
        assert_eq!(e.get(), None);
        e.record(1000, t0 + ms(100));
        assert!((e.get().unwrap() - 10_000.0).abs() < 1.0);
        e.record(100, t0 + ms(200));
        assert!(
            (e.get().unwrap() - 10_000.0).abs() < 1.0,
            "a slow interval does not lower it"
        );
        e.record(100, t0 + ms(300));
        e.record(100, t0 + ms(400));
        assert!((e.get().unwrap() - 1_000.0).abs() < 1.0, "it ages out");
    }
}
