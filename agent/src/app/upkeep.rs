//! The store's upkeep, one task, so the file and the agent's memory follow the retention, not
//! the number of messages ever seen (issue 24):
//!
//! - every 20 s, the msgIds past `processed_keep_hours` are forgotten in batches of
//!   [`PRUNE_BATCH`], each its own short transaction (the recorder's commits go in between),
//!   until a batch comes back short: it keeps up with any sustained rate;
//! - every hour, the history of conversations nobody wrote to for `[store] history_days` is
//!   forgotten, with their privacy markers;
//! - at a quiet moment (no message recorded since the turn before), once after each busy spell:
//!   the file is compacted when most of it is free (redb refuses while a transaction is live);
//! - after every turn, the heap's free pages go back to the system (`heap::trim`).
//!
//! It never touches the inbox or the outbox, and forgets a msgId only once its time is up, so the
//! store's promises (a redelivery is never answered again, no pending reply is lost) hold.
//! Logs counts, sizes and times only.

use std::{
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::{
    health::{self, Beat, Health},
    store::{Store, StoreError, StoreSettings, SweepCursor},
};

/// Expired msgIds forgotten in one transaction: ≈ 5–10 ms of the single writer.
pub(super) const PRUNE_BATCH: usize = 2_000;
/// Conversations looked at in one transaction of the history sweep.
const SWEEP_BATCH: usize = 500;
/// A turn this often: an agent left quiet gives its free heap back 20–40 s after the last message.
const EVERY: Duration = Duration::from_secs(20);
const HISTORY_EVERY: Duration = Duration::from_secs(3600);
/// Smaller files are not worth a compaction.
const COMPACT_FROM_BYTES: u64 = 8 * 1024 * 1024;

/// What one turn did.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct TurnReport {
    pub pruned: usize,
    pub prune_batches: usize,
    pub conversations_expired: usize,
    pub compacted: Option<(u64, u64)>,
}

pub(super) struct Upkeep {
    store: Arc<Store>,
    history_keep_ms: Option<i64>,
    health: Arc<Health>,
    /// Messages recorded as of the turn before, and whether the store was busy since its cache was
    /// last let go.
    accepted: u64,
    busy: bool,
    next_history: Instant,
    /// Whether the file is worth compacting is looked at most hourly (it reads every page).
    next_compact: Instant,
    compact_from_bytes: u64,
}

impl Upkeep {
    pub(super) fn new(store: Arc<Store>, settings: &StoreSettings, health: Arc<Health>) -> Upkeep {
        Upkeep {
            store,
            history_keep_ms: settings.history_keep_ms(),
            accepted: health.metrics.accepted.load(Ordering::Relaxed),
            health,
            // A store opened at start is busy: its cache filled while the inbox was read.
            busy: true,
            next_history: Instant::now(),
            next_compact: Instant::now(),
            compact_from_bytes: COMPACT_FROM_BYTES,
        }
    }

    /// One turn at `now_ms`, checking in with `beat` between transactions.
    pub(super) async fn turn(&mut self, now_ms: i64, beat: Option<&Beat>) -> Result<TurnReport, StoreError> {
        let mut report = TurnReport::default();
        loop {
            let n = blocking(&self.store, move |s| s.prune(now_ms, PRUNE_BATCH)).await?;
            report.pruned += n;
            report.prune_batches += 1;
            tick(beat);
            if n < PRUNE_BATCH {
                break;
            }
        }
        if let Some(keep) = self.history_keep_ms
            && Instant::now() >= self.next_history
        {
            self.next_history = Instant::now() + HISTORY_EVERY;
            let before = now_ms.saturating_sub(keep);
            let mut from: Option<SweepCursor> = None;
            loop {
                let sweep = blocking(&self.store, move |s| {
                    s.expire_history(before, from.as_ref(), SWEEP_BATCH, &crate::assistant::conversation_settings)
                })
                .await?;
                report.conversations_expired += sweep.conversations;
                tick(beat);
                match sweep.next {
                    Some(next) => from = Some(next),
                    None => break,
                }
            }
        }
        let accepted = self.health.metrics.accepted.load(Ordering::Relaxed);
        let quiet = accepted == self.accepted;
        self.accepted = accepted;
        if !quiet || report.pruned > 0 || report.conversations_expired > 0 {
            self.busy = true;
        }
        if quiet && self.busy {
            self.busy = false;
            let look = Instant::now() >= self.next_compact;
            if look {
                self.next_compact = Instant::now() + HISTORY_EVERY;
            }
            let from = self.compact_from_bytes;
            if look && let Some(c) = blocking(&self.store, move |s| s.compact_if_mostly_free(from)).await? {
                log::info!(
                    "store compacted from {} to {} bytes in {} ms",
                    c.before_bytes,
                    c.after_bytes,
                    c.took.as_millis()
                );
                report.compacted = Some((c.before_bytes, c.after_bytes));
            }
            tick(beat);
        }
        Ok(report)
    }
}

fn tick(beat: Option<&Beat>) {
    if let Some(b) = beat {
        b.tick();
    }
}

async fn blocking<T: Send + 'static>(
    store: &Arc<Store>,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store)).await.expect("store calls do not panic")
}

/// The upkeep task: a turn every 20 s until `cancel`.
pub(super) async fn run(mut upkeep: Upkeep, cancel: CancellationToken, beat: Arc<Beat>, every: Duration) {
    let mut turns = health::Periodic::new("store upkeep", beat.clone(), every, EVERY, EVERY);
    while turns.next(&cancel).await {
        match upkeep.turn(crate::clock::now_ms(), Some(&beat)).await {
            Ok(r) => {
                if r.pruned > 0 || r.conversations_expired > 0 {
                    log::debug!(
                        "forgot {} expired message ids ({} batches) and the history of {} idle conversations",
                        r.pruned,
                        r.prune_batches,
                        r.conversations_expired
                    );
                }
            }
            Err(e) => log::warn!("the store's upkeep failed: {e}"),
        }
        // What the turn (and the messages since the last one) freed goes back to the system.
        let _ = tokio::task::spawn_blocking(crate::heap::trim).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dingtalk::message::RobotMessage,
        store::{Retention, Role, Turn, key::StoreKey},
    };

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    fn store(dir: &std::path::Path) -> Arc<Store> {
        Arc::new(Store::open(&dir.join("zhuli.redb"), &StoreKey::generate(), Retention::default()).expect("store"))
    }

    fn message(i: usize) -> RobotMessage {
        let data = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/messages/text_single.json"
        ))
        .expect("fixture");
        let mut m = RobotMessage::parse(&data).expect("fixture parses");
        m.msg_id = format!("msg-{i}");
        m
    }

    fn health() -> Arc<Health> {
        Health::new(Default::default())
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("zhuli-upkeep-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    fn accept(store: &Store, from: usize, n: usize, at_ms: i64) {
        let batch: Vec<RobotMessage> = (from..from + n).map(message).collect();
        for chunk in batch.chunks(500) {
            let refs: Vec<(&RobotMessage, bool)> = chunk.iter().map(|m| (m, false)).collect();
            store.accept_batch(&refs, at_ms).expect("accept");
        }
    }

    #[tokio::test]
    async fn one_turn_forgets_every_expired_id_however_many_and_keeps_the_live_ones() {
        let dir = scratch("prune");
        let store = store(&dir);
        let now = 100 * DAY;
        // Three times the batch, and far over the old cap of 500 a minute, all expired...
        let expired = 3 * PRUNE_BATCH + 17;
        accept(&store, 0, expired, now - 25 * HOUR);
        // ...and some still within the redelivery window.
        accept(&store, expired, 300, now - HOUR);
        let mut upkeep = Upkeep::new(store.clone(), &StoreSettings::default(), health());
        let r = upkeep.turn(now, None).await.expect("turn");
        assert_eq!(r.pruned, expired);
        assert_eq!(r.prune_batches, 4);
        assert_eq!(store.counts().expect("counts").processed, 300);
        // The live ones are still recognised as duplicates.
        let m = message(expired + 5);
        assert_eq!(store.accept_batch(&[(&m, true)], now).expect("accept"), vec![crate::store::Acceptance::Duplicate]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn an_idle_conversation_loses_its_history_and_marker_a_live_one_keeps_them() {
        let dir = scratch("history");
        let store = store(&dir);
        let now = 100 * DAY;
        let turn = |at_ms| Turn { role: Role::User, text: "你好".into(), at_ms };
        for (conv, at) in [("idle", now - 31 * DAY), ("live", now - 29 * DAY), ("fresh", now - HOUR)] {
            for k in 0..3 {
                store.append_turn(conv, &turn(at - 10 + k)).expect("turn");
            }
            for name in crate::assistant::conversation_settings(conv) {
                store.set_setting(&name, &at.to_string()).expect("marker");
            }
        }
        let settings = StoreSettings { history_days: 30, ..StoreSettings::default() };
        let mut upkeep = Upkeep::new(store.clone(), &settings, health());
        let r = upkeep.turn(now, None).await.expect("turn");
        assert_eq!(r.conversations_expired, 1);
        assert!(store.history("idle").expect("history").is_empty());
        assert_eq!(store.history("live").expect("history").len(), 3);
        assert_eq!(store.history("fresh").expect("history").len(), 3);
        let marker = |conv: &str| store.setting(&crate::assistant::conversation_settings(conv)[0]).expect("setting");
        assert_eq!(marker("idle"), None);
        assert!(marker("live").is_some());
        assert_eq!(store.counts().expect("counts").conversations, 2);

        // 0 keeps every history.
        let settings = StoreSettings { history_days: 0, ..StoreSettings::default() };
        let mut upkeep = Upkeep::new(store.clone(), &settings, health());
        let r = upkeep.turn(now + 365 * DAY, None).await.expect("turn");
        assert_eq!(r.conversations_expired, 0);
        assert_eq!(store.history("live").expect("history").len(), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_quiet_turn_compacts_a_mostly_free_file_which_still_opens_and_reads() {
        let dir = scratch("compact");
        let key = StoreKey::generate();
        let path = dir.join("zhuli.redb");
        let store = Arc::new(Store::open(&path, &key, Retention::default()).expect("store"));
        let now = 100 * DAY;
        accept(&store, 0, 20_000, now - 25 * HOUR);
        accept(&store, 20_000, 50, now - HOUR);
        store.append_turn("kept", &Turn { role: Role::User, text: "留着".into(), at_ms: now }).expect("turn");
        let health = health();
        let mut upkeep = Upkeep::new(store.clone(), &StoreSettings::default(), health.clone());
        upkeep.compact_from_bytes = 0;
        // Busy: a message was recorded since the turn before, so nothing is compacted yet.
        health.metrics.accepted.fetch_add(1, Ordering::Relaxed);
        let r = upkeep.turn(now, None).await.expect("turn");
        assert_eq!(r.pruned, 20_000);
        assert_eq!(r.compacted, None);
        // Quiet: compacted once, and not again on the next quiet turn.
        let r = upkeep.turn(now, None).await.expect("turn");
        let (before, after) = r.compacted.expect("compacted");
        assert!(after * 2 < before, "{before} → {after}");
        // (Opening again writes the allocator's state: a page or a few.)
        assert!(std::fs::metadata(&path).expect("file").len() * 2 < before);
        assert_eq!(
            upkeep.turn(now, None).await.expect("turn"),
            TurnReport { prune_batches: 1, ..TurnReport::default() }
        );
        drop(upkeep);
        let store = Arc::into_inner(store).expect("the only handle");
        drop(store);
        let store = Store::open(&path, &key, Retention::default()).expect("opens after compaction");
        assert_eq!(store.counts().expect("counts").processed, 50);
        assert_eq!(store.history("kept").expect("history")[0].text, "留着");
        let m = message(20_010);
        assert_eq!(store.accept_batch(&[(&m, true)], now).expect("accept"), vec![crate::store::Acceptance::Duplicate]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
