//! People's jobs in chat: `/提醒` (`/remind`) makes a reminder, `/定时` (`/schedule`) a request the
//! model answers at its times, `/定时任务` (`/jobs`) lists them and cancels, pauses or resumes
//! one. Each job speaks in the chat it was made in and runs as the person who made it; the app's
//! scheduler fires them (`app::scheduler`). And the answer to what a job fired.

use rust_i18n::t;

use super::{Answer, Assistant, turn::Asker};
use crate::clock::now_ms;
use crate::{
    dingtalk::message::RobotMessage,
    schedule::{Fired, Job, Paused, when},
    tools::jobs::{Refusal, Request, line, make},
};

impl Assistant {
    /// `/提醒` and `/定时`: a new job in this chat, as `asker`.
    /// `origin`: the message asking, so that asking again after a crash makes no second job.
    pub(super) async fn make_job(&self, asker: &Asker, sentence: &str, task: bool, origin: &str) -> Answer {
        let limits = self.parts.schedule.clone();
        let offset = self.parts.settings.utc_offset_minutes;
        let title = t!("jobs.title");
        let usage = if task { t!("jobs.usage_task") } else { t!("jobs.usage_remind") };
        if sentence.trim().is_empty() {
            return Answer::fixed(title, usage);
        }
        if task && self.parts.llm.is_none() {
            return Answer::fixed(title, t!("jobs.no_model"));
        }
        let now = now_ms();
        let parsed = match when::parse(sentence, now, offset) {
            Ok(p) => p,
            Err(e) => return Answer::fixed(title, format!("{}\n\n{usage}", Refusal::When(e).said())),
        };
        let (owner, nick, chat, group) = (asker.actor.clone(), asker.nick.clone(), asker.chat.clone(), asker.group);
        let origin = origin.to_owned();
        let made = self
            .store_call(move |s| {
                let r = Request { owner: &owner, nick: &nick, chat: &chat, group, origin, task };
                Ok(make(s, &limits, &r, parsed, now, offset, crate::assistant::command::is_command))
            })
            .await;
        let (id, job) = match made {
            Ok(Ok(made)) => made,
            Ok(Err(Refusal::Store(e))) | Err(e) => {
                log::warn!("cannot keep a job: {e}");
                return Answer::fixed(t!("command.error_title"), t!("jobs.store_failed"));
            }
            Ok(Err(refusal)) => return Answer::fixed(title, refusal.said()),
        };
        self.parts.jobs_changed.notify_one();
        let shown = line(id, &job, offset, false);
        let made = if task { t!("jobs.made_task", line = shown) } else { t!("jobs.made_remind", line = shown) };
        Answer::fixed(title, format!("{made}\n\n{}", t!("jobs.how_to", id = id)))
    }

    /// `/定时任务`: the jobs in view, or cancel, pause or resume one of them. In a group, the
    /// jobs of that group only (a person's 1:1 reminders are nobody else's business); in a 1:1
    /// chat, the asker's own, or for an admin every job on the box.
    pub(super) async fn jobs_command(&self, asker: &Asker, rest: &str) -> Answer {
        let offset = self.parts.settings.utc_offset_minutes;
        let admin = self.parts.access.is_admin(&asker.actor);
        let in_view = |j: &Job| {
            j.ended_ms.is_none()
                && if asker.group {
                    j.conversation_id == asker.chat && (admin || j.owner == asker.actor)
                } else {
                    admin || j.owner == asker.actor
                }
        };
        let with_owner = admin && !asker.group;
        let title = t!("jobs.title");
        let mut words = rest.split_whitespace();
        let verb = words.next().unwrap_or_default().to_ascii_lowercase();
        let id = words.next().map(|w| w.trim_start_matches('#')).and_then(|w| w.parse::<u64>().ok());
        let verb = match verb.as_str() {
            "" | "list" | "列表" | "全部" => None,
            "cancel" | "delete" | "取消" | "删除" => Some("cancel"),
            "pause" | "暂停" => Some("pause"),
            "resume" | "恢复" | "继续" => Some("resume"),
            _ => return Answer::fixed(title, t!("jobs.usage_jobs")),
        };
        let Some(verb) = verb else {
            let all = match self.store_call(|s| s.jobs()).await {
                Ok(all) => all,
                Err(e) => {
                    log::warn!("cannot read the jobs: {e}");
                    return Answer::fixed(t!("command.error_title"), t!("jobs.store_failed"));
                }
            };
            let shown: Vec<String> = all
                .iter()
                .filter(|(_, j)| in_view(j))
                .map(|(id, j)| format!("- {}", line(*id, j, offset, with_owner)))
                .collect();
            if shown.is_empty() {
                return Answer::fixed(title, if asker.group { t!("jobs.none_here") } else { t!("jobs.none") });
            }
            let heading = if asker.group {
                t!("jobs.list_here", n = shown.len())
            } else if admin {
                t!("jobs.list_all", n = shown.len())
            } else {
                t!("jobs.list", n = shown.len())
            };
            return Answer::fixed(title, format!("{heading}\n\n{}\n\n{}", shown.join("\n"), t!("jobs.usage_jobs")));
        };
        let Some(id) = id else { return Answer::fixed(title, t!("jobs.usage_jobs")) };
        let job = match self.store_call(move |s| s.job(id)).await {
            Ok(Some(j)) if in_view(&j) => j,
            Ok(_) => return Answer::fixed(title, t!("jobs.not_yours", id = id)),
            Err(e) => {
                log::warn!("cannot read job #{id}: {e}");
                return Answer::fixed(t!("command.error_title"), t!("jobs.store_failed"));
            }
        };
        // A job paused because its owner may no longer speak there waits for an admin.
        if verb == "resume" && matches!(job.paused, Some(Paused::Refused(_))) && !admin {
            return Answer::fixed(title, t!("jobs.resume_admin", id = id));
        }
        let now = now_ms();
        let changed = match verb {
            "cancel" => self.store_call(move |s| s.remove_job(id).map(|()| None)).await,
            "pause" => {
                self.store_call(move |s| {
                    s.update_job(id, |j| {
                        j.paused = Some(Paused::ByPerson);
                        true
                    })
                })
                .await
            }
            _ => {
                // Resumed: what passed while it was paused is not fired.
                let Some(next) = job.rule.next_after(now.max(job.next_ms - 1), offset) else {
                    return Answer::fixed(title, t!("jobs.resume_past", id = id));
                };
                self.store_call(move |s| {
                    s.update_job(id, |j| {
                        j.paused = None;
                        j.next_ms = next;
                        true
                    })
                })
                .await
            }
        };
        let changed = match changed {
            Ok(c) => c,
            Err(e) => {
                log::warn!("cannot change job #{id}: {e}");
                return Answer::fixed(t!("command.error_title"), t!("jobs.store_failed"));
            }
        };
        self.parts.jobs_changed.notify_one();
        log::info!("job #{id}: {verb} by {}", asker.actor);
        let text = match changed {
            None => t!("jobs.cancelled", line = line(id, &job, offset, with_owner)),
            Some(j) if j.paused.is_some() => t!("jobs.paused_done", line = line(id, &j, offset, with_owner)),
            Some(j) => t!("jobs.resumed", line = line(id, &j, offset, with_owner)),
        };
        Answer::fixed(title, text)
    }

    /// What a job fired says by itself (a reminder, a notice): its text as it was fired.
    pub(super) fn job_said(&self, message: &RobotMessage, what: Fired) -> Answer {
        let text = message.text().unwrap_or_default();
        let title = match what {
            Fired::Reminder => t!("jobs.reminder_title"),
            _ => t!("jobs.title"),
        };
        Answer::fixed(title, text)
    }

    /// May `message`'s sender still speak in its chat? What a job is about to fire is checked
    /// with its owner's standing now; the reason when not.
    pub fn may_run(&self, message: &RobotMessage) -> Result<(), String> {
        match self.parts.access.admit(message) {
            crate::access::Admission::Allowed => Ok(()),
            crate::access::Admission::Refused(r) => Err(r.reason().to_owned()),
            crate::access::Admission::Pairing(_) => Err("awaiting pairing approval".to_owned()),
        }
    }

    /// Woken when a job is made or changed (the scheduler waits on it).
    pub fn jobs_changed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.parts.jobs_changed.clone()
    }

    /// The limits of jobs.
    pub fn schedule_settings(&self) -> &crate::schedule::Settings {
        &self.parts.schedule
    }
}
