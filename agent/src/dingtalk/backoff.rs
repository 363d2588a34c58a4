//! Reconnect delays: exponential from `initial`, capped at `max`, with full jitter on the upper
//! half so a fleet of boxes does not reconnect in lockstep. Never gives up: the caller decides.

use std::time::Duration;

use rand::Rng;

#[derive(Debug)]
pub struct Backoff<R> {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: R,
}

impl<R: Rng> Backoff<R> {
    pub fn new(initial: Duration, max: Duration, rng: R) -> Self {
        Backoff { initial, max: max.max(initial), attempt: 0, rng }
    }

    /// Delay before the next attempt; grows with each call until [`Backoff::reset`].
    pub fn next_delay(&mut self) -> Duration {
        let exp = self.initial.saturating_mul(1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX));
        let ceiling = exp.min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // Between half and all of the ceiling.
        let half = ceiling / 2;
        let spread = ceiling.saturating_sub(half).as_millis() as u64;
        half + Duration::from_millis(self.rng.random_range(0..=spread))
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{SeedableRng, rngs::StdRng};

    #[test]
    fn grows_caps_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), StdRng::seed_from_u64(7));
        let delays: Vec<Duration> = (0..40).map(|_| b.next_delay()).collect();
        assert!(delays[0] >= Duration::from_millis(50) && delays[0] <= Duration::from_millis(100));
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(2)));
        assert!(delays[30] >= Duration::from_secs(1), "capped but never below half the cap");
        assert_eq!(b.attempts(), 40, "it never gives up");
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn jitter_spreads_a_fleet() {
        let firsts: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(60), StdRng::seed_from_u64(seed));
                b.next_delay()
            })
            .collect();
        assert!(firsts.len() > 10, "{firsts:?}");
    }
}
