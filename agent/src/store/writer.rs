//! Group commit: one task owns every write of the exactly-once bookkeeping and puts all
//! requests that arrived while the previous commit was on disk into the next one. Throughput
//! grows with load instead of queueing on redb's single writer, and the time between a reply
//! reaching DingTalk and its durable "delivered" mark stays about one commit long.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{Acceptance, OutboxEntry, Store, StoreError, WriteOp, WriteOutcome};
use crate::dingtalk::message::RobotMessage;

/// Requests merged into one commit, at most.
const MAX_GROUP: usize = 256;

enum Request {
    Accept {
        batch: Vec<(RobotMessage, bool)>,
        now_ms: i64,
        done: oneshot::Sender<Result<Vec<Acceptance>, String>>,
    },
    Stage {
        seq: u64,
        entry: OutboxEntry,
        also: Vec<u64>,
        done: oneshot::Sender<Result<(), String>>,
    },
    /// Replies delivered; the seqs are forgotten in one commit.
    Delivered(Vec<u64>),
}

/// Handle to the writer task. Cloning is cheap; the task ends when every handle is gone.
#[derive(Clone)]
pub struct StoreWriter {
    tx: mpsc::UnboundedSender<Request>,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Store(String),
    #[error("the store writer has stopped")]
    Stopped,
}

impl StoreWriter {
    /// Start the writer task for `store`; it runs until every handle is dropped.
    pub fn start(store: Arc<Store>) -> (StoreWriter, tokio::task::JoinHandle<()>) {
        Self::start_with(store, None)
    }

    /// [`StoreWriter::start`] with a health beat, checked in around every commit and at least
    /// every given interval while idle (a commit stuck in the disk stops the check-ins).
    pub fn start_with(
        store: Arc<Store>,
        beat: Option<(Arc<crate::health::Beat>, std::time::Duration)>,
    ) -> (StoreWriter, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (StoreWriter { tx }, tokio::spawn(run(store, rx, beat)))
    }

    pub async fn accept(&self, batch: Vec<(RobotMessage, bool)>, now_ms: i64) -> Result<Vec<Acceptance>, WriteError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Request::Accept { batch, now_ms, done }).map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?.map_err(WriteError::Store)
    }

    /// Move inbox item `seq` to the outbox with its reply; `also` are inbox items the same reply
    /// answers (messages answered together), forgotten in the same commit.
    pub async fn stage(&self, seq: u64, entry: OutboxEntry, also: Vec<u64>) -> Result<(), WriteError> {
        let (done, rx) = oneshot::channel();
        self.tx.send(Request::Stage { seq, entry, also, done }).map_err(|_| WriteError::Stopped)?;
        rx.await.map_err(|_| WriteError::Stopped)?.map_err(WriteError::Store)
    }

    /// Mark a delivered reply; durable with the next commit (fire and forget).
    pub fn delivered(&self, seq: u64) {
        self.delivered_all(vec![seq]);
    }

    /// Mark delivered replies (or messages one reply answered), forgotten in the same commit.
    pub fn delivered_all(&self, seqs: Vec<u64>) {
        let _ = self.tx.send(Request::Delivered(seqs));
    }
}

async fn run(
    store: Arc<Store>,
    mut rx: mpsc::UnboundedReceiver<Request>,
    beat: Option<(Arc<crate::health::Beat>, std::time::Duration)>,
) {
    let mut group = Vec::with_capacity(MAX_GROUP);
    // "Delivered" marks whose commit failed (a full disk): retried with the next commit, so a
    // store that recovers does not send those replies again at the next start.
    let mut carried: Vec<u64> = Vec::new();
    let every = beat.as_ref().map_or(std::time::Duration::from_secs(3600), |(_, d)| *d);
    let started = tokio::time::Instant::now();
    loop {
        if let Some((b, _)) = &beat {
            b.tick();
        }
        crate::health::test_hang_point("store-writer", started).await;
        let got = tokio::select! {
            n = rx.recv_many(&mut group, MAX_GROUP) => n,
            _ = tokio::time::sleep(every) => continue,
        };
        if got == 0 {
            break;
        }
        let mut requests: Vec<Request> = Vec::new();
        if !carried.is_empty() {
            requests.push(Request::Delivered(std::mem::take(&mut carried)));
        }
        requests.append(&mut group);
        let store = store.clone();
        let result = tokio::task::spawn_blocking(move || {
            let ops: Vec<WriteOp<'_>> = requests
                .iter()
                .flat_map(|r| match r {
                    Request::Accept { batch, now_ms, .. } => vec![WriteOp::Accept { batch, now_ms: *now_ms }],
                    Request::Stage { seq, entry, also, .. } => vec![WriteOp::Stage { seq: *seq, entry, also }],
                    Request::Delivered(seqs) => seqs.iter().map(|s| WriteOp::Delivered(*s)).collect(),
                })
                .collect();
            let outcome: Result<Vec<WriteOutcome>, StoreError> = store.write(&ops);
            (requests, outcome)
        })
        .await;
        let Ok((requests, outcome)) = result else {
            log::error!("the store writer's commit task failed");
            continue;
        };
        match outcome {
            Ok(outcomes) => {
                // One outcome per operation: a request of several seqs has several.
                let mut outcomes = outcomes.into_iter();
                for r in requests {
                    match r {
                        Request::Accept { done, .. } => {
                            let _ = done.send(match outcomes.next() {
                                Some(WriteOutcome::Accepted(a)) => Ok(a),
                                _ => Err("the store gave no acceptance for a batch".into()),
                            });
                        }
                        Request::Stage { done, .. } => {
                            outcomes.next();
                            let _ = done.send(Ok(()));
                        }
                        Request::Delivered(seqs) => {
                            for _ in &seqs {
                                outcomes.next();
                            }
                        }
                    }
                }
            }
            Err(e) => {
                let msg = e.to_string();
                log::error!("store commit failed: {msg}");
                for r in requests {
                    match r {
                        Request::Accept { done, .. } => {
                            let _ = done.send(Err(msg.clone()));
                        }
                        Request::Stage { done, .. } => {
                            let _ = done.send(Err(msg.clone()));
                        }
                        Request::Delivered(seqs) => carried.extend(seqs),
                    }
                }
            }
        }
    }
}
