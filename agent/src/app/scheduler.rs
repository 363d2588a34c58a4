//! The scheduler: fires people's jobs at their times.
//!
//! It sleeps until the soonest job is due (at most `[schedule] wake_ms`, so a clock that was set
//! is noticed), or until a job is made or changed. A due job's occurrence becomes a message in
//! the inbox (`zhuli-job:ID:AT:KIND`), recorded in the same commit that moves the job to its next
//! occurrence: it is then answered like a person's message, with the same guarantees across a
//! crash, and an occurrence is never fired twice (its message id is recorded
//! as processed). Before firing, the owner's standing in the job's chat is checked again; a job
//! whose owner may no longer speak there is paused and the admins are told once.

use std::sync::Arc;

use rust_i18n::t;
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Work, blocking, chats::Chats, now_ms, tell_admins};
use crate::{
    config::Config,
    dingtalk::message::{Content, ConversationKind, RobotMessage},
    health::Beat,
    schedule::{self, Action, Due, Fired, Job, Paused, rule::shown_zh},
};

/// The message a job puts in the inbox.
fn message(id: u64, job: &Job, at: i64, what: Fired, text: String, now: i64) -> RobotMessage {
    RobotMessage {
        msg_id: schedule::message_id(id, at, what),
        conversation_id: job.conversation_id.clone(),
        conversation_kind: if job.group { ConversationKind::Group } else { ConversationKind::Single },
        conversation_title: None,
        sender_id: job.owner.clone(),
        sender_staff_id: Some(job.owner.clone()),
        sender_nick: job.nick.clone(),
        is_admin: false,
        mentions_robot: true,
        robot_code: None,
        created_at_ms: Some(now),
        session_webhook: None,
        content: Content::Text(text),
    }
}

/// What one due job puts in the inbox: the occurrence that fires, and a notice of those
/// skipped.
fn fired(id: u64, job: &Job, due: &Due, now: i64, offset: i32) -> Vec<RobotMessage> {
    let mut out = Vec::new();
    let short: String = job.action.text().chars().take(40).collect();
    if due.skipped_count > 0 {
        let mut times: Vec<String> = due.skipped.iter().map(|t| shown_zh(*t, offset)).collect();
        if due.skipped_count as usize > times.len() {
            times.push(t!("jobs.skipped_more").into_owned());
        }
        let text = t!("jobs.skipped", id = id, text = short.as_str(), n = due.skipped_count, times = times.join("、"));
        let first = due.skipped.first().copied().unwrap_or(job.next_ms);
        out.push(message(id, job, first, Fired::Notice, text.into_owned(), now));
    }
    if let Some(at) = due.fire {
        let late = (now - at) / 60_000;
        match &job.action {
            Action::Remind(text) => {
                let mut said = t!("jobs.fired", text = text.as_str()).into_owned();
                if late >= 1 {
                    said.push_str(&format!("\n\n{}", t!("jobs.late", minutes = late)));
                }
                out.push(message(id, job, at, Fired::Reminder, said, now));
            }
            Action::Task(request) => out.push(message(id, job, at, Fired::Task, request.clone(), now)),
        }
    }
    out
}

/// Run until `cancel`: fire what is due, then sleep until the next or until `changed`.
pub(super) async fn run(
    work: Arc<Work>,
    chats: Arc<Chats>,
    config: Config,
    changed: Arc<Notify>,
    resumed: Arc<Notify>,
    cancel: CancellationToken,
    beat: Arc<Beat>,
) {
    let settings = config.schedule.clone();
    let offset = config.assistant.utc_offset_minutes;
    let grace = i64::from(settings.grace_minutes) * 60_000;
    let longest = std::time::Duration::from_millis(settings.wake_ms.max(100)).min(work.health.longest_sleep());
    // The pipeline first queues what a previous run left in the inbox: what this loop fires
    // is queued once, after that.
    loop {
        beat.tick();
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = resumed.notified() => break,
            _ = tokio::time::sleep(longest) => {}
        }
    }
    loop {
        beat.tick();
        let now = now_ms();
        let mut soonest: Option<i64> = None;
        match blocking(&work.store, |s| s.jobs()).await {
            Ok(jobs) => {
                for (id, job) in jobs {
                    if let Some(ended) = job.ended_ms {
                        // Kept a while for a replayed message to find; then gone.
                        if now - ended > schedule::ENDED_KEPT_MS || ended > now + schedule::ENDED_KEPT_MS {
                            let _ = blocking(&work.store, move |s| s.remove_job(id)).await;
                        }
                        continue;
                    }
                    if job.paused.is_some() {
                        continue;
                    }
                    // The clock was set back by days: the job goes back to its real next time.
                    if let Some(real) = schedule::set_back(&job.rule, job.next_ms, now, offset) {
                        let moved = job.next_ms;
                        let changed = blocking(&work.store, move |s| {
                            s.update_job(id, |j| {
                                let stale = j.next_ms != moved;
                                if !stale {
                                    j.next_ms = real;
                                }
                                !stale
                            })
                        })
                        .await;
                        if let Err(e) = changed {
                            log::warn!("job #{id}: its next time could not be set back: {e}");
                        } else {
                            log::warn!("job #{id}: the clock was set back; its next time is now {real}");
                        }
                        soonest = Some(soonest.map_or(real, |s| s.min(real)));
                        continue;
                    }
                    match schedule::due(&job.rule, job.next_ms, now, grace, offset) {
                        None => soonest = Some(soonest.map_or(job.next_ms, |s| s.min(job.next_ms))),
                        Some(due) => {
                            if let Some(next) = fire(&work, &chats, &config, id, job, &due, now, offset).await {
                                soonest = Some(soonest.map_or(next, |s| s.min(next)));
                            }
                        }
                    }
                }
            }
            Err(e) => log::warn!("cannot read the scheduled jobs: {e}; trying again shortly"),
        }
        let wait = soonest
            .map(|t| std::time::Duration::from_millis((t - now_ms()).max(0) as u64))
            .unwrap_or(longest)
            .min(longest);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => {}
        }
    }
}

/// Fire one due job; its next occurrence, if it keeps one.
#[allow(clippy::too_many_arguments)]
async fn fire(
    work: &Arc<Work>,
    chats: &Arc<Chats>,
    config: &Config,
    id: u64,
    job: Job,
    due: &Due,
    now: i64,
    offset: i32,
) -> Option<i64> {
    // The owner's standing, as it is now.
    let probe = message(id, &job, due.fire.unwrap_or(job.next_ms), Fired::Notice, String::new(), now);
    if let Err(why) = work.assistant.may_run(&probe) {
        let short: String = job.action.text().chars().take(40).collect();
        let before = job.clone();
        let reason = why.clone();
        let paused = blocking(&work.store, move |s| {
            s.update_job(id, |j| {
                let same = *j == before;
                if same {
                    j.paused = Some(Paused::Refused(reason));
                }
                same
            })
        })
        .await;
        match paused {
            Ok(Some(j)) if matches!(j.paused, Some(Paused::Refused(_))) => {
                log::warn!("job #{id} of {} paused: {why}", job.owner);
                let owner = format!("{}（{}）", job.nick, job.owner);
                let text =
                    t!("jobs.paused_admin", id = id, owner = owner.as_str(), text = short.as_str(), why = why.as_str());
                tell_admins(work, config, &t!("jobs.paused_admin_title"), &text);
            }
            Ok(_) => {}
            Err(e) => log::error!("job #{id} should be paused ({why}) but cannot be: {e}"),
        }
        return None;
    }
    let messages = fired(id, &job, due, now, offset);
    let after = Job {
        next_ms: due.next.unwrap_or(job.next_ms),
        fired: job.fired + u32::from(due.fire.is_some()),
        missed: job.missed.saturating_add(due.skipped_count),
        ended_ms: if due.next.is_none() { Some(now) } else { None },
        ..job.clone()
    };
    let (before, kept, written) = (job.clone(), after.clone(), messages.clone());
    match blocking(&work.store, move |s| s.fire_job(id, &before, Some(&kept), &written, now)).await {
        Ok(None) => {
            // Cancelled, paused or changed in the meantime: looked at again next time.
            log::info!("job #{id} changed while it was due; not fired");
            Some(now)
        }
        Ok(Some(seqs)) => {
            for (seq, m) in seqs.into_iter().zip(messages) {
                match seq {
                    Some(seq) => {
                        log::info!(conversation = m.conversation_id.as_str(); "job #{id} fired {} in conversation {}", m.msg_id, m.conversation_id);
                        chats.push(super::chats::Job::Answer { seq, message: m, accepted: Some(Instant::now()) });
                    }
                    None => log::warn!("job #{id}: {} was recorded before; not said again", m.msg_id),
                }
            }
            if due.skipped_count > 0 {
                log::warn!("job #{id}: {} occurrences missed by more than the grace were skipped", due.skipped_count);
            }
            due.next
        }
        Err(e) => {
            // Nothing was written: it is due again at the next look.
            log::error!("job #{id} could not be fired: {e}");
            work.health.set_error(format!("a scheduled job could not be fired: {e}"));
            Some(now + 5_000)
        }
    }
}
