//! The health of one model endpoint: a circuit breaker that stops sending to an endpoint that
//! keeps failing and lets one probe through now and then to see whether it is back, and the
//! figures `/status` shows (latency p50/p95 and error rate over the recent calls).
//!
//! Pure state: callers pass the time, so tests drive it without waiting.

use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

/// Where the breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Calls go through.
    Closed,
    /// Calls are bypassed until the time given; then one probe may go.
    Open { until: Instant },
    /// One probe is on its way; everything else is bypassed until it ends.
    Probing,
}

/// Counts failures in a row; after `threshold` of them the endpoint is bypassed for
/// `cool_down`, doubled after every failed probe up to `max_cool_down`.
#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    first_cool_down: Duration,
    cool_down: Duration,
    max_cool_down: Duration,
}

impl Breaker {
    pub fn new(threshold: u32, cool_down: Duration, max_cool_down: Duration) -> Self {
        Breaker {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            first_cool_down: cool_down,
            cool_down,
            max_cool_down: max_cool_down.max(cool_down),
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// Whether a call may go now. An open breaker whose time is up lets exactly one call
    /// through (the probe) and bypasses the rest until that call's result is known.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state {
            State::Closed => true,
            State::Open { until } if now >= until => {
                self.state = State::Probing;
                true
            }
            State::Open { .. } | State::Probing => false,
        }
    }

    /// The call answered.
    pub fn success(&mut self) {
        self.state = State::Closed;
        self.failures = 0;
        self.cool_down = self.first_cool_down;
    }

    /// The call failed (after its own retries). Returns whether the breaker opened now.
    pub fn failure(&mut self, now: Instant) -> bool {
        self.failures = self.failures.saturating_add(1);
        match self.state {
            State::Probing => {
                self.cool_down = (self.cool_down * 2).min(self.max_cool_down);
                self.state = State::Open { until: now + self.cool_down };
                false
            }
            State::Closed if self.failures >= self.threshold => {
                self.state = State::Open { until: now + self.cool_down };
                true
            }
            _ => false,
        }
    }

    /// A probe that neither answered nor failed (the turn was cancelled): the next call probes.
    pub fn abandoned(&mut self, now: Instant) {
        if self.state == State::Probing {
            self.state = State::Open { until: now };
        }
    }
}

/// The last calls' latencies and outcomes.
#[derive(Debug, Clone)]
pub struct Window {
    calls: VecDeque<(Duration, bool)>,
    size: usize,
}

/// What `/status` shows of an endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Figures {
    pub calls: usize,
    pub p50: Option<Duration>,
    pub p95: Option<Duration>,
    /// Failed calls over all calls in the window, 0.0 to 1.0.
    pub error_rate: f64,
}

impl Window {
    pub fn new(size: usize) -> Self {
        Window { calls: VecDeque::with_capacity(size.max(1)), size: size.max(1) }
    }

    pub fn record(&mut self, took: Duration, ok: bool) {
        if self.calls.len() == self.size {
            self.calls.pop_front();
        }
        self.calls.push_back((took, ok));
    }

    /// Latencies are those of answered calls (a timeout says nothing of how fast answers are).
    pub fn figures(&self) -> Figures {
        let mut ok: Vec<Duration> = self.calls.iter().filter(|(_, ok)| *ok).map(|(d, _)| *d).collect();
        ok.sort_unstable();
        let pick =
            |q: f64| (!ok.is_empty()).then(|| ok[((ok.len() as f64 * q).ceil() as usize).clamp(1, ok.len()) - 1]);
        let failed = self.calls.iter().filter(|(_, ok)| !*ok).count();
        Figures {
            calls: self.calls.len(),
            p50: pick(0.50),
            p95: pick(0.95),
            error_rate: if self.calls.is_empty() { 0.0 } else { failed as f64 / self.calls.len() as f64 },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_failures_in_a_row_and_probes_once_when_the_time_is_up() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, 10 * S, 60 * S);
        assert!(b.allow(t0));
        assert!(!b.failure(t0));
        b.success();
        // A success in between starts the count again.
        assert!(!b.failure(t0) && !b.failure(t0));
        assert_eq!(b.state(), State::Closed);
        assert!(b.failure(t0), "the third failure in a row opens it");
        assert!(!b.allow(t0 + 9 * S), "bypassed while open");
        assert!(b.allow(t0 + 10 * S), "one probe when the time is up");
        assert!(!b.allow(t0 + 10 * S), "and only one");
        // The probe fails: open again, twice as long.
        b.failure(t0 + 11 * S);
        assert_eq!(b.state(), State::Open { until: t0 + 31 * S });
        assert!(!b.allow(t0 + 30 * S));
        assert!(b.allow(t0 + 31 * S));
        b.failure(t0 + 31 * S);
        assert!(b.allow(t0 + 71 * S), "40 s, under the 60 s ceiling");
        b.failure(t0 + 71 * S);
        assert_eq!(b.state(), State::Open { until: t0 + 131 * S }, "capped at 60 s");
        // The probe answers: closed, and the cool-down is back to its first length.
        assert!(b.allow(t0 + 131 * S));
        b.success();
        assert!(b.allow(t0 + 131 * S));
        for _ in 0..3 {
            b.failure(t0 + 200 * S);
        }
        assert_eq!(b.state(), State::Open { until: t0 + 210 * S });
    }

    #[test]
    fn an_abandoned_probe_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 10 * S, 60 * S);
        b.failure(t0);
        assert!(b.allow(t0 + 10 * S));
        b.abandoned(t0 + 12 * S);
        assert!(b.allow(t0 + 12 * S));
    }

    #[test]
    fn figures_of_the_recent_calls() {
        let mut w = Window::new(100);
        assert_eq!(w.figures(), Figures { calls: 0, p50: None, p95: None, error_rate: 0.0 });
        for ms in 1..=100 {
            w.record(Duration::from_millis(ms), true);
        }
        let f = w.figures();
        assert_eq!((f.p50, f.p95), (Some(Duration::from_millis(50)), Some(Duration::from_millis(95))));
        // Older calls leave the window; failures count in the rate, not in the latencies.
        for _ in 0..25 {
            w.record(Duration::from_secs(120), false);
        }
        let f = w.figures();
        assert_eq!(f.calls, 100);
        assert!((f.error_rate - 0.25).abs() < 1e-9, "{f:?}");
        assert_eq!(f.p95, Some(Duration::from_millis(97)), "75 answered: 26..=100 ms");
    }
}
