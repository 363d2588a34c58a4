//! People's jobs, made the one way both entries share: `/提醒` and `/定时` in chat
//! (`assistant::jobs`) and `jobs_create`, the tool a model calls when someone asks in their own
//! words ("每周五 17:00 列出本群未完成的待办"). A job speaks in the chat it was made in and runs
//! as the person who made it; a recurring job that posts in a group waits for that person's
//! confirmation; `/undo` cancels a job the tool made.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use rust_i18n::t;
use serde_json::{Value, json};

use super::{Context, Outcome, Risk, Tool, ToolError, str_arg};
use crate::clock::now_ms;
use crate::{
    schedule::{
        Action, Job, Paused, Rule,
        rule::shown_zh,
        when::{self, Parsed, WhenError},
    },
    store::{Store, StoreError},
};

/// The tool's name; `jobs` grants it.
pub const NAME: &str = "jobs_create";

pub fn tool_names() -> impl Iterator<Item = &'static str> {
    [NAME].into_iter()
}

/// The longest text a job keeps.
const MAX_TEXT: usize = 500;

/// A job as its list shows it: `#3 ⏰ 每个工作日 09:00 — 站会（下次 12月7日（周一）09:00）`.
pub fn line(id: u64, job: &Job, offset: i32, with_owner: bool) -> String {
    let mark = match job.action {
        Action::Remind(_) => "⏰",
        Action::Task(_) => "🤖",
    };
    let when = match job.rule {
        Rule::Once { at_ms } => shown_zh(at_ms, offset),
        ref r => format!("{}（{}）", r.shown_zh(offset), t!("jobs.next", at = shown_zh(job.next_ms, offset))),
    };
    let text: String = job.action.text().chars().take(60).collect();
    let mut out = format!("#{id} {mark} {when} — {text}");
    if job.group {
        out.push_str(&t!("jobs.in_group"));
    }
    if with_owner {
        out.push_str(&t!("jobs.owner", owner = job.nick.as_str(), id = job.owner.as_str()));
    }
    match &job.paused {
        Some(Paused::ByPerson) => out.push_str(&t!("jobs.paused")),
        Some(Paused::Refused(why)) => out.push_str(&t!("jobs.paused_refused", why = why.as_str())),
        None => {}
    }
    out
}

/// Who asks for a job, where, and what kind.
pub struct Request<'a> {
    /// The owner's staff id.
    pub owner: &'a str,
    pub nick: &'a str,
    pub chat: &'a str,
    pub group: bool,
    /// What asked (a message, a tool call of it): asking again after a crash makes no second job.
    pub origin: String,
    /// A request the model answers at each time, else a reminder said as it is.
    pub task: bool,
}

/// Why a job was not made.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the asker has no staff id")]
    NoStaff,
    #[error("{0}")]
    When(WhenError),
    #[error("a scheduled request cannot be a command")]
    Command,
    #[error("repeats more often than every {0} minutes")]
    TooOften(u32),
    #[error("the time has passed")]
    Past,
    #[error("the person has {0} jobs, the most allowed")]
    TooManyMine(usize),
    #[error("the box has {0} jobs, the most allowed")]
    TooManyBox(usize),
    #[error("the store failed: {0}")]
    Store(#[from] StoreError),
}

impl Refusal {
    /// What the person is told (the box's language).
    pub fn said(&self) -> String {
        match self {
            Refusal::NoStaff => t!("jobs.no_staff"),
            Refusal::When(WhenError::NoTime) => t!("jobs.no_time"),
            Refusal::When(WhenError::BadClock) => t!("jobs.bad_clock"),
            Refusal::When(WhenError::BadDate) => t!("jobs.bad_date"),
            Refusal::When(WhenError::Past) | Refusal::Past => t!("jobs.past"),
            Refusal::When(WhenError::NoText) => t!("jobs.no_text"),
            Refusal::Command => t!("jobs.task_command"),
            Refusal::TooOften(m) => t!("jobs.too_often", minutes = m),
            Refusal::TooManyMine(n) => t!("jobs.too_many_mine", n = n),
            Refusal::TooManyBox(n) => t!("jobs.too_many_box", n = n),
            Refusal::Store(_) => t!("jobs.store_failed"),
        }
        .into_owned()
    }
}

/// Make the job `parsed` says, for `r`, within `limits`, at `now`: its id and the job kept (the
/// one made before when `r.origin` made one already). `is_command`: whether a text is a chat
/// command (a scheduled request may not be one: it would run as its owner at every time).
pub fn make(
    store: &Store,
    limits: &crate::schedule::Settings,
    r: &Request,
    parsed: Parsed,
    now: i64,
    offset: i32,
    is_command: fn(&str) -> bool,
) -> Result<(u64, Job), Refusal> {
    // A job runs as its owner's staff id: someone DingTalk gives none (outside the
    // organisation) has no standing to check at each run, nor a 1:1 address.
    if r.owner.starts_with("dingtalk:") {
        return Err(Refusal::NoStaff);
    }
    if r.task && is_command(&parsed.text) {
        return Err(Refusal::Command);
    }
    if parsed.rule.interval_minutes() < limits.min_interval_minutes {
        return Err(Refusal::TooOften(limits.min_interval_minutes));
    }
    let first = parsed.rule.next_after(now, offset).ok_or(Refusal::Past)?;
    let all = store.jobs()?;
    let live = |j: &Job| j.ended_ms.is_none() && j.origin != r.origin;
    if all.iter().filter(|(_, j)| j.owner == r.owner && live(j)).count() >= limits.max_per_person {
        return Err(Refusal::TooManyMine(limits.max_per_person));
    }
    if all.iter().filter(|(_, j)| live(j)).count() >= limits.max_jobs {
        return Err(Refusal::TooManyBox(limits.max_jobs));
    }
    let text: String = parsed.text.chars().take(MAX_TEXT).collect();
    let job = Job {
        origin: r.origin.clone(),
        owner: r.owner.to_owned(),
        nick: r.nick.to_owned(),
        conversation_id: r.chat.to_owned(),
        group: r.group,
        action: if r.task { Action::Task(text) } else { Action::Remind(text) },
        rule: parsed.rule,
        next_ms: first,
        created_ms: now,
        paused: None,
        fired: 0,
        missed: 0,
        ended_ms: None,
    };
    let (id, new) = store.add_job(&job)?;
    if !new {
        // Made before (the same request answered again after a crash): what was kept.
        return Ok((id, store.job(id)?.unwrap_or(job)));
    }
    log::info!(
        "job #{id} made by {} in conversation {} ({}), first at {first}",
        r.owner,
        r.chat,
        if r.task { "task" } else { "reminder" }
    );
    Ok((id, job))
}

/// `jobs_create`.
pub struct JobsTool {
    store: Arc<Store>,
    limits: crate::schedule::Settings,
    changed: Arc<tokio::sync::Notify>,
    is_command: fn(&str) -> bool,
    params: Value,
}

impl JobsTool {
    /// `changed` is woken when a job is made or cancelled (the scheduler waits on it).
    pub fn new(
        store: Arc<Store>,
        limits: crate::schedule::Settings,
        changed: Arc<tokio::sync::Notify>,
        is_command: fn(&str) -> bool,
    ) -> Arc<JobsTool> {
        let params = json!({
            "type": "object",
            "properties": {
                "when": {
                    "type": "string",
                    "maxLength": 60,
                    "description": "Only the time, as people write it in Chinese: 明天 9:00, 后天下午3点, 30分钟后, 12月24日 18:30, 周五 17:00, 每天 8:30, 每个工作日 9:00, 每周五 17:00, 每周一三五 10:00, 每月1号 10:00, 每2小时."
                },
                "text": {
                    "type": "string",
                    "maxLength": MAX_TEXT,
                    "description": "For a reminder, the words to send at that time (交合同). For a request, what to do at each time, as the person would ask it (列出本群未完成的待办)."
                },
                "kind": {
                    "type": "string",
                    "enum": ["remind", "request"],
                    "description": "remind: the text is sent as it is. request: at each time the assistant carries the text out as the person's request, with their permissions, and posts the answer."
                }
            },
            "required": ["when", "text", "kind"],
            "additionalProperties": false
        });
        Arc::new(JobsTool { store, limits, changed, is_command, params })
    }

    /// The rule and text of a call, at `now`; a refusal the model can act on.
    fn parse(args: &Value, now: i64, offset: i32) -> Result<Parsed, ToolError> {
        let (when_text, text) = (str_arg(args, "when").trim(), str_arg(args, "text").trim());
        if text.is_empty() {
            return Err(ToolError::Refused(t!("jobs.tool_no_text").into_owned()));
        }
        let parsed = when::parse(&format!("{when_text} {text}"), now, offset)
            .map_err(|e| ToolError::Refused(format!("{}{}", Refusal::When(e).said(), t!("jobs.tool_when_only"))))?;
        // Everything in `when` must be the time: a word left over is part of no field.
        if parsed.text.trim() != text {
            return Err(ToolError::Refused(t!("jobs.tool_when_only").into_owned()));
        }
        Ok(parsed)
    }
}

/// The kind of job, in words.
fn kind_said(args: &Value) -> String {
    if str_arg(args, "kind") == "request" { t!("jobs.kind_task") } else { t!("jobs.kind_remind") }.into_owned()
}

impl Tool for JobsTool {
    fn name(&self) -> &str {
        NAME
    }

    fn description(&self) -> &str {
        "Make a reminder or a scheduled request for the person asking, in this chat, once or repeating \
         (\"提醒我明天9点发合同\", \"每个工作日 9:00 把今天的日程发到本群\"). It runs as that person, with \
         their permissions. A repeating job that posts in a group is confirmed by the person first. \
         People list, pause and cancel their jobs with /定时任务."
    }

    fn parameters(&self) -> &Value {
        &self.params
    }

    /// The most a call may be: a job that posts in a group again and again shares what it says
    /// there.
    fn risk(&self) -> Risk {
        Risk::Share
    }

    /// A reminder for oneself, or said once, is made at once. A request (it will run as the
    /// person, with their tools, at every time) is always confirmed, and a reminder that repeats
    /// in a group is confirmed as what it is: words posted there again and again.
    fn risk_of(&self, ctx: &Context, args: &Value) -> Risk {
        let recurring = match Self::parse(args, now_ms(), ctx.offset_minutes) {
            Ok(p) => !matches!(p.rule, Rule::Once { .. }),
            // Checked again before anything is made; counted as the larger risk meanwhile.
            Err(_) => true,
        };
        match (str_arg(args, "kind") == "request", ctx.group && recurring) {
            (_, true) => Risk::Share,
            (true, false) => Risk::Write,
            (false, false) => Risk::Read,
        }
    }

    fn target(&self, args: &Value) -> String {
        let kind = if str_arg(args, "kind") == "request" { "request" } else { "reminder" };
        format!("{kind} {}", str_arg(args, "when").chars().take(60).collect::<String>())
    }

    fn question(&self, args: &Value) -> String {
        t!(
            "jobs.question",
            kind = kind_said(args),
            when = str_arg(args, "when").chars().take(60).collect::<String>(),
            text = str_arg(args, "text").chars().take(120).collect::<String>()
        )
        .into_owned()
    }

    fn prepare<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            if crate::schedule::parse_message_id(&ctx.message).is_some() {
                return Err(ToolError::Refused(t!("jobs.tool_from_job").into_owned()));
            }
            Self::parse(&args, now_ms(), ctx.offset_minutes)?;
            Ok(args)
        })
    }

    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            let (now, offset) = (now_ms(), ctx.offset_minutes);
            let parsed = Self::parse(&args, now, offset)?;
            let task = str_arg(&args, "kind") == "request";
            // A turn a job started makes no jobs: each run would make another.
            if crate::schedule::parse_message_id(&ctx.message).is_some() {
                return Err(ToolError::Refused(t!("jobs.tool_from_job").into_owned()));
            }
            // A request runs later in a session of its own, which may go to a cloud model: what a
            // protected turn read must not travel in its text.
            if task && ctx.protected {
                return Err(ToolError::Refused(t!("jobs.tool_protected").into_owned()));
            }
            // One job per message and request: the same call in a turn answered again after a
            // crash finds the job it made.
            // By the words asked (a relative time resolves anew when the turn is answered again).
            let when_text = str_arg(&args, "when").trim();
            let digest = super::sha256_hex(format!("{when_text}\u{1f}{}\u{1f}{task}", parsed.text).as_bytes());
            let origin = if ctx.message.is_empty() {
                format!("tool:{now}:{}", &digest[..16])
            } else {
                format!("{}#tool:{}", ctx.message, &digest[..16])
            };
            let (store, limits, is_command) = (self.store.clone(), self.limits.clone(), self.is_command);
            let (owner, nick, chat, group) = (ctx.actor.clone(), ctx.nick.clone(), ctx.chat.clone(), ctx.group);
            let made = tokio::task::spawn_blocking(move || {
                let r = Request { owner: &owner, nick: &nick, chat: &chat, group, origin, task };
                make(&store, &limits, &r, parsed, now, offset, is_command)
            })
            .await
            .map_err(|e| ToolError::Failed(format!("the job was not made ({e})")))?;
            let (id, job) = match made {
                Ok(m) => m,
                Err(Refusal::Store(e)) => {
                    log::warn!("cannot keep a job: {e}");
                    return Err(ToolError::Failed(Refusal::Store(e).said()));
                }
                Err(refusal) => return Err(ToolError::Refused(refusal.said())),
            };
            self.changed.notify_one();
            let shown = line(id, &job, offset, false);
            Ok(Outcome {
                text: t!("jobs.tool_made", line = shown, id = id).into_owned(),
                undo: Some((id.to_be_bytes().to_vec(), t!("jobs.undo_line", line = shown).into_owned())),
            })
        })
    }

    /// Cancel the job a call made, if it is still its maker's.
    fn undo<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let id = u64::from_be_bytes(
                payload.try_into().map_err(|_| ToolError::Failed("the undo record is not a job's".into()))?,
            );
            let (store, actor) = (self.store.clone(), ctx.actor.clone());
            let gone = tokio::task::spawn_blocking(move || match store.job(id)? {
                Some(j) if j.owner == actor && j.ended_ms.is_none() => store.remove_job(id).map(|()| true),
                _ => Ok(false),
            })
            .await
            .map_err(|e| ToolError::Failed(format!("the job was not cancelled ({e})")))?
            .map_err(|e: StoreError| ToolError::Failed(e.to_string()))?;
            if !gone {
                return Err(ToolError::Refused(t!("jobs.undo_gone", id = id).into_owned()));
            }
            self.changed.notify_one();
            Ok(t!("jobs.undone", id = id).into_owned())
        })
    }
}
