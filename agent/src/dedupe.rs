//! Dedupe of robot messages by `msgId`: the gateway may deliver a message more than once
//! (redelivery after a lost ACK, a reconnect, duplicates on purpose), and each must be answered once.
//! Bounded in entries and time. In memory for now; the encrypted store makes it durable.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Dedupe {
    ttl: Duration,
    capacity: usize,
    seen: HashSet<String>,
    order: VecDeque<(Instant, String)>,
}

impl Dedupe {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Dedupe { ttl, capacity: capacity.max(1), seen: HashSet::new(), order: VecDeque::new() }
    }

    /// Record `id`; `true` if it was not seen within the TTL.
    pub fn first_time(&mut self, id: &str, now: Instant) -> bool {
        while let Some((t, _)) = self.order.front() {
            if now.duration_since(*t) > self.ttl || self.order.len() >= self.capacity {
                if let Some((_, old)) = self.order.pop_front() {
                    self.seen.remove(&old);
                }
            } else {
                break;
            }
        }
        if self.seen.contains(id) {
            return false;
        }
        self.seen.insert(id.to_owned());
        self.order.push_back((now, id.to_owned()));
        true
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_within_ttl_bounded_in_size() {
        let t0 = Instant::now();
        let mut d = Dedupe::new(Duration::from_secs(60), 3);
        assert!(d.first_time("a", t0));
        assert!(!d.first_time("a", t0 + Duration::from_secs(59)));
        assert!(d.first_time("a", t0 + Duration::from_secs(61)), "forgotten after the TTL");
        for id in ["b", "c", "d", "e"] {
            assert!(d.first_time(id, t0 + Duration::from_secs(62)));
        }
        assert!(d.len() <= 3);
    }
}
