//! The conversations' queues: one turn at a time per conversation, in arrival order, and
//! conversations in parallel.
//!
//! A conversation is one person in one chat (the history's key). Its messages wait in its own
//! queue; one task per busy conversation answers them in order. A worker slot (`[agent] workers`
//! of them, shared) is held only while a turn runs: waiting for the chat's send budget or for a
//! throttled reply holds that conversation alone, never a slot others need.
//!
//! Back-pressure per conversation, always said, never silent:
//! - texts that queued up while a turn ran are answered together in the next one
//!   (`[agent] merge_max` at most), and the reply says so;
//! - when `[agent] backlog_notice` messages are waiting, the person is told once that the
//!   answers come in order and how many wait;
//! - beyond `[agent] backlog_max` waiting, a message is not answered: the person is told which
//!   of theirs were left out (one notice for all of them), then they are forgotten.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::Ordering},
};

use tokio::{sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::Work;
use crate::{
    dingtalk::{
        message::{Content, RobotMessage},
        sender::Reply,
    },
    store::OutboxEntry,
};

/// Merged texts are cut off beyond this many characters (a model's context is finite).
const MERGE_MAX_CHARS: usize = 6_000;

/// The backlog policy (`[agent]` settings).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub notice_at: usize,
    pub max_waiting: usize,
    pub merge_max: usize,
}

/// One piece of work for a conversation.
pub enum Job {
    /// Answer inbox item `seq`.
    Answer { seq: u64, message: RobotMessage, accepted: Option<Instant> },
    /// Deliver outbox item `seq` (a reply staged before a restart).
    Deliver { seq: u64, entry: OutboxEntry },
}

impl Job {
    fn key(&self) -> String {
        match self {
            // The staff id, as a staged reply keeps it (a sender without one shares the chat's
            // queue with others like it; texts are merged only with the same sender's).
            Job::Answer { message, .. } => {
                conversation_key(&message.conversation_id, message.sender_staff_id.as_deref().unwrap_or_default())
            }
            Job::Deliver { entry, .. } => {
                conversation_key(&entry.reply.conversation_id, entry.reply.to_staff_id.as_deref().unwrap_or_default())
            }
        }
    }
}

fn conversation_key(chat: &str, who: &str) -> String {
    format!("{chat}\u{1f}{who}")
}

/// A message left out because its conversation's queue was full.
struct LeftOut {
    seq: u64,
    msg_id: String,
    excerpt: String,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    left_out: Vec<LeftOut>,
    /// Where notices go: the newest message's address.
    address: Option<Reply>,
    running: bool,
    /// The backlog notice was sent in this busy spell.
    noticed: bool,
    /// A turn has run in this busy spell: texts waiting now queued up during it.
    turned: bool,
}

impl Queue {
    fn waiting(&self) -> usize {
        self.jobs.iter().filter(|j| matches!(j, Job::Answer { .. })).count()
    }
}

/// What a conversation's task does next.
pub(super) enum Step {
    /// Tell the person which messages were left out, then forget them.
    LeftOut {
        reply: Reply,
        seqs: Vec<u64>,
        ids: Vec<String>,
        first: String,
        last: String,
        max: usize,
    },
    /// Tell the person their answers come in order.
    Backlog {
        reply: Reply,
        waiting: usize,
    },
    Deliver {
        seq: u64,
        entry: OutboxEntry,
    },
    /// Answer these messages in one turn (several when texts queued up).
    Answer(Vec<(u64, RobotMessage, Option<Instant>)>),
}

pub struct Chats {
    queues: Mutex<HashMap<String, Queue>>,
    work: Arc<Work>,
    slots: Arc<Semaphore>,
    policy: Policy,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

impl Chats {
    pub(super) fn new(work: Arc<Work>, workers: usize, policy: Policy, cancel: CancellationToken) -> Arc<Self> {
        Arc::new(Chats {
            queues: Mutex::default(),
            work,
            slots: Arc::new(Semaphore::new(workers)),
            policy,
            tasks: TaskTracker::new(),
            cancel,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Queue>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue `job` behind its conversation's earlier work. Never waits.
    pub fn push(self: &Arc<Self>, job: Job) {
        let key = job.key();
        if let Job::Answer { .. } = job {
            self.work.health.metrics.waiting.fetch_add(1, Ordering::Relaxed);
        }
        let mut queues = self.lock();
        let q = queues.entry(key.clone()).or_default();
        match job {
            Job::Answer { seq, message, .. } if q.waiting() >= self.policy.max_waiting => {
                q.address = Some(Reply::to(&message, "", ""));
                let excerpt: String = message.text().unwrap_or_default().chars().take(20).collect();
                q.left_out.push(LeftOut { seq, msg_id: message.msg_id, excerpt });
            }
            job => {
                if let Job::Answer { message, .. } = &job {
                    q.address = Some(Reply::to(message, "", ""));
                }
                q.jobs.push_back(job);
            }
        }
        if !q.running {
            q.running = true;
            drop(queues);
            self.tasks.spawn(self.clone().run(key));
        }
    }

    /// Stop taking new steps and wait up to `limit` for the ones running.
    pub async fn close(&self, limit: std::time::Duration) {
        self.tasks.close();
        let _ = tokio::time::timeout(limit, self.tasks.wait()).await;
    }

    async fn run(self: Arc<Self>, key: String) {
        while !self.cancel.is_cancelled() {
            let Some(step) = self.next_step(&key) else { return };
            let m = &self.work.health.metrics;
            match &step {
                Step::Answer(items) => {
                    m.merged.fetch_add(items.len() as u64 - 1, Ordering::Relaxed);
                    m.waiting.fetch_sub(items.len() as u64, Ordering::Relaxed);
                }
                Step::LeftOut { seqs, .. } => {
                    m.left_out.fetch_add(seqs.len() as u64, Ordering::Relaxed);
                    m.waiting.fetch_sub(seqs.len() as u64, Ordering::Relaxed);
                }
                Step::Backlog { .. } => {
                    m.backlog_notices.fetch_add(1, Ordering::Relaxed);
                }
                Step::Deliver { .. } => {}
            }
            // Waiting for a slot is not working: the workers' beat shows only finished turns, so
            // turns that never end are found hung even while others wait.
            let slot = match &step {
                Step::Answer(_) => tokio::select! {
                    _ = self.cancel.cancelled() => return,
                    slot = self.slots.clone().acquire_owned() => match slot {
                        Ok(slot) => Some(slot),
                        Err(_) => return,
                    },
                },
                _ => None,
            };
            let answered = matches!(step, Step::Answer(_));
            self.work.clone().step(step, slot).await;
            if answered && let Some(q) = self.lock().get_mut(&key) {
                q.turned = true;
            }
        }
        // Stopping: what is left stays in the store for the next start.
        if let Some(q) = self.lock().get_mut(&key) {
            q.running = false;
        }
    }

    /// Take the conversation's next step, or mark it idle (and drop its queue) when none is left.
    fn next_step(&self, key: &str) -> Option<Step> {
        let mut queues = self.lock();
        let q = queues.get_mut(key)?;
        // Every message left out or waiting set the address; a queue of staged replies only has none.
        if !q.left_out.is_empty()
            && let Some(reply) = q.address.clone()
        {
            let left: Vec<LeftOut> = std::mem::take(&mut q.left_out);
            return Some(Step::LeftOut {
                reply,
                seqs: left.iter().map(|l| l.seq).collect(),
                first: left.first().map(|l| l.excerpt.clone()).unwrap_or_default(),
                last: left.last().map(|l| l.excerpt.clone()).unwrap_or_default(),
                ids: left.into_iter().map(|l| l.msg_id).collect(),
                max: self.policy.max_waiting,
            });
        }
        let waiting = q.waiting();
        if !q.noticed
            && waiting >= self.policy.notice_at
            && let Some(reply) = q.address.clone()
        {
            q.noticed = true;
            return Some(Step::Backlog { reply, waiting });
        }
        let Some(job) = q.jobs.pop_front() else {
            queues.remove(key);
            return None;
        };
        let (seq, message, accepted) = match job {
            Job::Deliver { seq, entry } => return Some(Step::Deliver { seq, entry }),
            Job::Answer { seq, message, accepted } => (seq, message, accepted),
        };
        let mut items = vec![(seq, message, accepted)];
        // Only texts that queued up while a turn ran are merged: the first message of a quiet
        // conversation, and the first after a restart, get a turn of their own.
        if q.turned && mergeable(&items[0].1) {
            let sender = items[0].1.sender_id.clone();
            let mut chars = items[0].1.text().map_or(0, |t| t.chars().count());
            while items.len() < self.policy.merge_max {
                let Some(Job::Answer { message, .. }) = q.jobs.front() else { break };
                let more = message.text().map_or(0, |t| t.chars().count());
                if !mergeable(message) || message.sender_id != sender || chars + more > MERGE_MAX_CHARS {
                    break;
                }
                chars += more;
                if let Some(Job::Answer { seq, message, accepted }) = q.jobs.pop_front() {
                    items.push((seq, message, accepted));
                }
            }
        }
        Some(Step::Answer(items))
    }
}

/// A plain text that is not a command: it can be answered together with the texts around it.
fn mergeable(message: &RobotMessage) -> bool {
    // What a job fired is answered by itself.
    if message.msg_id.starts_with(crate::schedule::MESSAGE_PREFIX) {
        return false;
    }
    match &message.content {
        Content::Text(t) => {
            let rest = crate::assistant::strip_mentions(t);
            !rest.is_empty() && !crate::assistant::command::is_command(rest)
        }
        _ => false,
    }
}

/// Several queued texts as one message: the newest one's address and id, the texts in order.
pub(super) fn merge(items: &[(u64, RobotMessage, Option<Instant>)]) -> RobotMessage {
    let (_, last, _) = items.last().expect("a step answers at least one message");
    if items.len() == 1 {
        return last.clone();
    }
    let texts: Vec<String> = items.iter().filter_map(|(_, m, _)| m.text()).collect();
    RobotMessage { content: Content::Text(texts.join("\n\n")), ..last.clone() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dingtalk::message::ConversationKind;

    fn text(id: &str, t: &str) -> RobotMessage {
        RobotMessage {
            msg_id: id.into(),
            conversation_id: "cid".into(),
            conversation_kind: ConversationKind::Single,
            conversation_title: None,
            sender_id: "s".into(),
            sender_staff_id: Some("u".into()),
            sender_nick: "U".into(),
            is_admin: false,
            mentions_robot: true,
            robot_code: None,
            created_at_ms: None,
            session_webhook: None,
            content: Content::Text(t.into()),
        }
    }

    #[test]
    fn texts_merge_commands_do_not() {
        assert!(mergeable(&text("a", "明天的会几点？")));
        assert!(mergeable(&text("a", "@助理 明天的会几点？")));
        assert!(!mergeable(&text("a", "/ping")));
        assert!(!mergeable(&text("a", "@助理 /confirm 1234")));
        assert!(!mergeable(&text("a", "／确认 1234")), "a full-width slash starts a command too");
        assert!(!mergeable(&text("a", "  ")));
        let merged = merge(&[(1, text("a", "第一条"), None), (2, text("b", "第二条"), None)]);
        assert_eq!(merged.msg_id, "b", "the newest message's id and address");
        assert_eq!(merged.text().as_deref(), Some("第一条\n\n第二条"));
    }
}
