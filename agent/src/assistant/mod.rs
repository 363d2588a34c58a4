//! The turn: what the agent answers to one accepted message.
//!
//! First admission (who may talk here, pairing), then the slash commands (`/help`, `/ping`,
//! `/status`, `/new`, `/undo`, `/confirm`, `/cancel`, and for admins `/approve` and `/audit`;
//! each also by its Chinese name, see `command`), then the LLM turn loop with tools (`turn`).
//! Every admission decision and tool call is audited. What it says comes in the box's language
//! (`crate::i18n`).
//!
//! Never logs message text.

pub mod command;
mod jobs;
pub mod settings;
pub mod turn;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use futures_util::future::BoxFuture;
use rust_i18n::t;
use tokio::time::Instant;

use crate::clock::now_ms;
use crate::{
    access::{Access, Admission, actor},
    audit::{Audit, Event, Kind},
    dingtalk::{
        Content, ConversationKind, RobotMessage, media::MediaArea, message::RichPart, sender::SenderStatus,
        stream::StreamStatus,
    },
    health::{Health, status},
    llm,
    store::{Store, StoreError},
    tools::{Registry, files::Roots},
};
use command::Command;
pub use settings::AssistantSettings;
pub use turn::conversation_settings;
use turn::{Asker, Budget, Pending};

/// What the agent knows about itself, for `/status`.
pub struct StatusView {
    pub started: Instant,
    pub stream: Arc<StreamStatus>,
    pub sender: Arc<SenderStatus>,
}

/// Everything the assistant works with.
pub struct Parts {
    pub status: StatusView,
    /// The model endpoints; `None` without any.
    pub llm: Option<llm::route::Router>,
    /// What counts as protected, and so goes only to local endpoints.
    pub privacy: crate::privacy::Policy,
    /// The model's name, for `/status`.
    pub model: Option<String>,
    pub settings: AssistantSettings,
    pub tools: Registry,
    /// The files roots, for naming received files (`inbox/…`).
    pub roots: Arc<Roots>,
    /// Where received pictures and files are fetched; `None` in benchmarks.
    pub media: Option<Arc<MediaArea>>,
    /// The model accepts image input.
    pub vision: bool,
    pub access: Access,
    pub audit: Arc<Audit>,
    pub store: Arc<Store>,
    /// Daily tokens per box and per user (0 = unlimited).
    pub budget_limits: (u64, u64),
    pub tokens: AtomicU64,
    /// Time spent waiting for the model, in total (for the turn-overhead figure and `/status`).
    pub llm_wait_ns: AtomicU64,
    pub llm_errors: AtomicU64,
    pub denials: AtomicU64,
    /// Messages refused at admission (unknown or unapproved senders).
    pub refusals: AtomicU64,
    pub health: Arc<Health>,
    /// The MCP plugins, for `/status`.
    pub plugins: Vec<Arc<crate::tools::mcp::Plugin>>,
    /// What `/doctor`, `/logs` and `/backup` do; `None` where there is no box to look after
    /// (benchmarks).
    pub maintenance: Option<Arc<dyn Maintenance>>,
    /// The limits of people's jobs.
    pub schedule: crate::schedule::Settings,
    /// Notified when a job is made or changed.
    pub jobs_changed: Arc<tokio::sync::Notify>,
}

/// The box's upkeep, as admins ask for it in chat (the agent's application layer does it).
pub trait Maintenance: Send + Sync {
    /// The full diagnostics report; `snapshot` is the agent's status now.
    fn doctor(&self, snapshot: status::Snapshot) -> BoxFuture<'static, crate::health::diagnostics::Report>;
    /// The agent's recent warnings and errors, redacted, oldest first.
    fn logs(&self) -> Vec<String>;
    /// Take a snapshot of the store now, verify it, keep the newest few.
    fn backup_now(&self) -> BoxFuture<'static, Result<BackupTaken, String>>;
    /// A snapshot before an update: [`Maintenance::backup_now`], then a note for root, which
    /// installs a release in the maintenance window only after one was taken.
    fn snapshot_for_update(&self) -> BoxFuture<'static, Result<BackupTaken, String>>;
    /// The newest snapshot kept, if any.
    fn last_backup(&self) -> Option<crate::health::diagnostics::Backup>;
    /// `[backup]`: when the nightly backup runs and where its copies go.
    fn backup_settings(&self) -> crate::store::backup::Settings;
    /// The copy on the provisioning stick as the last insertion left it (`None`: no stick yet).
    fn stick_copy(&self) -> Option<crate::store::backup::Target>;
    /// The releases on the box as root last saw them, and the update journal's newest events.
    fn releases(&self) -> (Option<crate::update::state::Survey>, Vec<crate::update::boot::Event>);
    /// Ask root (zhuli-update.service) to `install` a fetched release now or to `rollback`.
    fn request_update(&self, word: &'static str) -> Result<(), String>;
}

/// A snapshot `/backup now` took.
#[derive(Debug, Clone)]
pub struct BackupTaken {
    pub path: String,
    pub bytes: u64,
    pub values: u64,
    /// Snapshots kept, this one included.
    pub kept: usize,
}

pub struct Assistant {
    parts: Parts,
    pending: Mutex<HashMap<String, Pending>>,
    /// Held while the pending confirmations are written to the store, so that the last
    /// written is the newest.
    pending_saved: tokio::sync::Mutex<()>,
    budget: Mutex<Budget>,
}

/// Where a turn shows its progress while it works (an AI card); `None` for a plain reply.
pub trait Progress: Send + Sync {
    /// The turn reached the model: show a "thinking" state.
    fn started(&self);
    /// The whole text to show so far (tool steps, then the answer as it streams).
    fn show(&self, text: &str);
}

/// An answer: title (shown in notifications) and Markdown text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub title: String,
    pub markdown: String,
    /// Worth keeping durably before sending: producing it again would cost (an LLM turn) or
    /// could come out different. Fixed answers are simply produced again after a crash.
    pub costly: bool,
}

impl Answer {
    fn fixed(title: impl Into<String>, markdown: impl Into<String>) -> Self {
        Answer { title: title.into(), markdown: markdown.into(), costly: false }
    }

    /// The answer when no model is configured.
    pub(crate) fn no_llm() -> Self {
        Answer::fixed(t!("llm.none_title"), t!("llm.none"))
    }
}

/// Pictures larger than this are not sent to the model as images.
const MAX_IMAGE_BYTES: u64 = 4 * 1024 * 1024;

/// A picture or file that came with a message.
struct Attachment<'a> {
    kind: &'static str,
    download_code: &'a str,
    file_name: Option<&'a str>,
}

fn attachments(content: &Content) -> Vec<Attachment<'_>> {
    let one = |kind, download_code, file_name| vec![Attachment { kind, download_code, file_name }];
    match content {
        Content::Picture { download_code } => one("picture", download_code, None),
        Content::File { download_code, file_name } => one("file", download_code, Some(file_name.as_str())),
        Content::Video { download_code, .. } => one("video", download_code, None),
        Content::Audio { download_code, recognition } if recognition.trim().is_empty() => {
            one("voice message", download_code, None)
        }
        Content::RichText(parts) => parts
            .iter()
            .filter_map(|p| match p {
                RichPart::Picture { download_code } => {
                    Some(Attachment { kind: "picture", download_code, file_name: None })
                }
                RichPart::Text(_) => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The MIME type of an image the model can take, by its first bytes.
fn image_type(b: &[u8]) -> Option<&'static str> {
    if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if b.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("image/jpeg")
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Some("image/gif")
    } else if b.len() > 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Some("image/webp")
    } else {
        None
    }
}

/// Standard base64 with padding.
fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ABC[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub(crate) use command::strip_mentions;

impl Assistant {
    pub fn new(parts: Parts) -> Self {
        let budget = Self::load_budget(&parts.store);
        let pending = Mutex::new(turn::load_pending(&parts.store));
        Assistant { parts, pending, pending_saved: tokio::sync::Mutex::new(()), budget: Mutex::new(budget) }
    }

    pub fn audit(&self) -> &Arc<Audit> {
        &self.parts.audit
    }

    /// The box's upkeep, where there is a box.
    pub fn maintenance(&self) -> Option<Arc<dyn Maintenance>> {
        self.parts.maintenance.clone()
    }

    /// The MCP plugins this assistant offers.
    pub fn plugins(&self) -> &[Arc<crate::tools::mcp::Plugin>] {
        &self.parts.plugins
    }

    /// Everything `/status` and `zhuli status` show.
    pub fn snapshot(&self) -> status::Snapshot {
        let p = &self.parts;
        status::snapshot(
            p.status.started,
            &p.status.stream,
            &p.status.sender,
            &p.health,
            status::AssistantFigures {
                audit_unjournaled: p.audit.unjournaled.load(Ordering::Relaxed),
                model: p.model.clone(),
                tokens: p.tokens.load(Ordering::Relaxed),
                errors: p.llm_errors.load(Ordering::Relaxed),
                denied: p.denials.load(Ordering::Relaxed),
                refused: p.refusals.load(Ordering::Relaxed),
                plugins: p.plugins.iter().map(|pl| pl.status_line()).collect(),
                models: p
                    .llm
                    .as_ref()
                    .map(|r| {
                        let used = self.month_tokens();
                        r.status()
                            .iter()
                            .map(|e| status::ModelRow::of(e, used.get(&e.name).copied().unwrap_or(0)))
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        )
    }

    /// Refused messages and denied tool calls since start (the security signals).
    pub fn security_counts(&self) -> (u64, u64) {
        (self.parts.refusals.load(Ordering::Relaxed), self.parts.denials.load(Ordering::Relaxed))
    }

    /// Time spent waiting for the model since start.
    pub fn llm_wait(&self) -> std::time::Duration {
        std::time::Duration::from_nanos(self.parts.llm_wait_ns.load(Ordering::Relaxed))
    }

    /// Turns paused on a confirmation.
    pub fn pending_confirmations(&self) -> usize {
        self.pending.lock().map(|p| p.len()).unwrap_or(0)
    }

    /// Run blocking store work off the async workers.
    async fn store_call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let store = self.parts.store.clone();
        tokio::task::spawn_blocking(move || f(&store)).await.unwrap_or_else(|_| {
            Err(StoreError::Db { path: std::path::PathBuf::new(), reason: "the store task ended unexpectedly".into() })
        })
    }

    pub async fn answer(&self, message: &RobotMessage, progress: Option<&dyn Progress>) -> Answer {
        let who = actor(message);
        let chat = message.conversation_id.clone();
        let audit = &self.parts.audit;
        match self.parts.access.admit(message) {
            Admission::Allowed => {}
            Admission::Refused(reason) => {
                self.parts.refusals.fetch_add(1, Ordering::Relaxed);
                audit.record(Event::new(Kind::MessageRefused, &who, &chat).reason(reason.reason()));
                return Answer::fixed(t!("access.refused_title"), reason.said(&who, &chat));
            }
            Admission::Pairing(code) => {
                self.parts.refusals.fetch_add(1, Ordering::Relaxed);
                audit.record(
                    Event::new(Kind::MessageRefused, &who, &chat)
                        .target(code.clone())
                        .reason("awaiting pairing approval"),
                );
                return Answer::fixed(
                    t!("pairing.title"),
                    t!("pairing.text", code = code, your_id = crate::access::your_id(&who)),
                );
            }
        }
        audit.record(Event::new(Kind::MessageAccepted, &who, &chat).outcome(message.kind_name().to_owned()));
        // What a job fired: a reminder or a notice is said as it is; a task is answered below as
        // if its owner had sent it.
        let fired = crate::schedule::parse_message_id(&message.msg_id).map(|(_, _, what)| what);
        if let Some(what @ (crate::schedule::Fired::Reminder | crate::schedule::Fired::Notice)) = fired {
            return self.job_said(message, what);
        }
        let asker = Asker {
            actor: who.clone(),
            nick: message.sender_nick.chars().take(40).collect(),
            chat: chat.clone(),
            conversation: format!("{chat}\u{1f}{who}"),
            group: message.conversation_kind == ConversationKind::Group,
            message: message.msg_id.clone(),
        };
        let attached = attachments(&message.content);
        if self.parts.llm.is_some() && !attached.is_empty() {
            return self.answer_with_attachments(message, asker, attached, progress).await;
        }
        let Some(text) = message.text() else {
            return self.media_answer(message);
        };
        let text = command::strip_mentions(&text);
        let Some(command) = command::parse(text) else {
            if self.parts.llm.is_none() {
                return Answer::no_llm();
            }
            return self.start_turn(asker, text.to_owned(), Vec::new(), progress).await;
        };
        // What a job fires is a request for the model, never a command run as its owner (one is
        // refused when the job is made; this holds for jobs kept before that).
        if fired.is_some() {
            return Answer::fixed(t!("jobs.title"), t!("jobs.task_command"));
        }
        match command {
            Command::Help => Answer::fixed(t!("help.title"), t!("help.text")),
            Command::Ping => Answer::fixed("pong", "pong"),
            Command::Status if self.parts.access.admins().is_empty() || self.parts.access.is_admin(&asker.actor) => {
                let mut text = status::markdown(&self.snapshot());
                // A group's id is what `[health] admin_chat` and `group_allow` take.
                if asker.group {
                    text.push_str(&format!("\n{}\n", t!("status.this_group", chat = asker.chat.as_str())));
                }
                Answer::fixed(t!("status.title"), text)
            }
            Command::Status => Answer::fixed(t!("command.admins_only_title"), t!("status.admins_only")),
            Command::New => {
                let conv = asker.conversation.clone();
                match self.store_call(move |s| s.clear_history(&conv)).await {
                    Ok(_) => Answer::fixed(t!("new.title"), t!("new.done")),
                    Err(e) => {
                        log::warn!("cannot clear a conversation: {e}");
                        Answer::fixed(t!("command.error_title"), t!("new.failed"))
                    }
                }
            }
            Command::Undo(how) => self.undo(&asker, &how).await,
            Command::Confirm(code) => self.confirm(&asker, &code, progress).await,
            Command::Show(code) => self.show(&asker, &code),
            Command::Cancel => self.cancel(&asker).await,
            Command::Approve(code) => self.approve(&asker, &code).await,
            Command::Audit(n) => self.audit_text(&asker, &n),
            Command::Doctor | Command::Logs | Command::Backup(_) | Command::Update(_) | Command::Rollback => {
                self.upkeep(&asker, command, progress).await
            }
            Command::Remind(sentence) => self.make_job(&asker, &sentence, false, &message.msg_id).await,
            Command::Schedule(sentence) => self.make_job(&asker, &sentence, true, &message.msg_id).await,
            Command::Jobs(rest) => self.jobs_command(&asker, &rest).await,
            Command::Unknown(name) => Answer::fixed(t!("command.unknown_title"), t!("command.unknown", command = name)),
        }
    }

    /// A message with pictures or files: fetch them, then start a turn that shows pictures to a
    /// model with image input and names every file so the files tools can read it.
    async fn answer_with_attachments(
        &self,
        message: &RobotMessage,
        asker: Asker,
        attached: Vec<Attachment<'_>>,
        progress: Option<&dyn Progress>,
    ) -> Answer {
        let mut notes = Vec::new();
        let mut images = Vec::new();
        for a in attached {
            let Some(media) = &self.parts.media else { break };
            let owner = crate::tools::files::owner_dir(&asker.actor);
            let file = match media.fetch_as(a.download_code, a.file_name, Some(&owner)).await {
                Ok(f) => f,
                Err(e) => {
                    log::warn!("cannot fetch a {} of message {}: {e}", a.kind, message.msg_id);
                    notes.push(format!("[The user sent a {} that could not be fetched: {e}]", a.kind));
                    continue;
                }
            };
            let name = self.parts.roots.scoped(&asker.actor).inbox_path(&file.path).unwrap_or_default();
            let label =
                a.file_name.map(|n| format!(" “{}”", n.chars().take(120).collect::<String>())).unwrap_or_default();
            let bytes = if self.parts.vision && a.kind == "picture" && file.bytes <= MAX_IMAGE_BYTES {
                tokio::fs::read(&file.path).await.ok()
            } else {
                None
            };
            match bytes.as_deref().and_then(image_type) {
                Some(mime) => {
                    images.push(format!("data:{mime};base64,{}", base64(bytes.as_deref().unwrap_or_default())));
                    notes.push(format!("[The user sent a picture, attached above; it is also saved as `{name}`]"));
                }
                None => notes.push(format!(
                    "[The user sent a {}{label} of {} bytes, saved as `{name}`; read it with files_read if it is text]",
                    a.kind, file.bytes
                )),
            }
        }
        let typed = message.text().map(|t| strip_mentions(&t).to_owned()).unwrap_or_default();
        let text = if typed.is_empty() { notes.join("\n") } else { format!("{typed}\n\n{}", notes.join("\n")) };
        self.start_turn(asker, text, images, progress).await
    }

    /// `/undo` (`how` empty), `/undo copy` or `/undo drop`, on the asker's newest change. Its
    /// entry leaves the journal only once it is undone or dropped: a failed undo can be tried
    /// again.
    async fn undo(&self, asker: &Asker, how: &str) -> Answer {
        enum How {
            Undo,
            Copy,
            Drop,
        }
        let how = match how.to_lowercase().as_str() {
            "" => How::Undo,
            "copy" | "副本" => How::Copy,
            "drop" | "放弃" => How::Drop,
            _ => return Answer::fixed(t!("undo.cannot_title"), t!("undo.unknown_mode")),
        };
        let user = asker.actor.clone();
        let (seq, entry) = match self.store_call(move |s| s.last_undo_of(&user)).await {
            Ok(Some(found)) => found,
            Ok(None) => return Answer::fixed(t!("undo.nothing_title"), t!("undo.nothing")),
            Err(e) => {
                log::warn!("cannot read the undo journal: {e}");
                return Answer::fixed(t!("command.error_title"), t!("undo.journal_failed"));
            }
        };
        // Undo lines name ids and paths; one journalled before they did may quote a title.
        let target = crate::tools::redact(&entry.description, &serde_json::Value::Null, "");
        let event = Event::new(Kind::ToolUndone, &asker.actor, &asker.chat).tool(entry.tool.clone()).target(target);
        let forget = |seq: u64| async move {
            if let Err(e) = self.store_call(move |s| s.remove_undo(seq)).await {
                log::warn!("cannot update the undo journal: {e}");
            }
        };
        if let How::Drop = how {
            forget(seq).await;
            self.parts.audit.record(event.outcome("dropped"));
            return Answer::fixed(t!("undo.dropped_title"), t!("undo.dropped", what = entry.description));
        }
        let Some(tool) = self.parts.tools.get(&entry.tool).cloned() else {
            let text = format!("{}\n\n{}", t!("undo.tool_gone", tool = entry.tool), t!("undo.offer_drop"));
            return Answer::fixed(t!("undo.cannot_title"), text);
        };
        let ctx = asker.context(self.parts.settings.utc_offset_minutes);
        let done = match how {
            How::Copy => tool.undo_as_copy(&ctx, &entry.payload).await,
            _ => tool.undo(&ctx, &entry.payload).await,
        };
        match done {
            Ok(done) => {
                forget(seq).await;
                self.parts.audit.record(event.outcome("ok"));
                Answer::fixed(t!("undo.done_title"), t!("undo.done", what = done))
            }
            Err(e) => {
                self.parts.audit.record(event.outcome("error").reason(e.audit_reason(&serde_json::Value::Null, "")));
                // The entry stays; how to try again or give up is always said.
                let then = match e {
                    crate::tools::ToolError::Refused(_) => t!("undo.offer_drop"),
                    _ => t!("undo.kept"),
                };
                let text = t!("undo.failed", what = entry.description, error = e);
                Answer::fixed(t!("undo.cannot_title"), format!("{text}\n\n{then}"))
            }
        }
    }

    async fn approve(&self, asker: &Asker, code: &str) -> Answer {
        if !self.parts.access.is_admin(&asker.actor) {
            self.parts.audit.record(
                Event::new(Kind::ToolDenied, &asker.actor, &asker.chat).tool("/approve").reason("not an admin"),
            );
            return Answer::fixed(t!("command.admins_only_title"), t!("approve.admins_only"));
        }
        let Some((who, nick)) = self.parts.access.approve(code) else {
            return Answer::fixed(t!("approve.unknown_title"), t!("approve.unknown"));
        };
        let paired = serde_json::to_string(&self.parts.access.paired()).unwrap_or_default();
        if let Err(e) = self.store_call(move |s| s.set_setting("paired-users", &paired)).await {
            log::warn!("cannot keep the approved users: {e}");
        }
        // Cached address-book look-ups never outlive a permission change.
        if let Err(e) = self.store_call(|s| s.cache_clear()).await {
            log::warn!("cannot empty the look-up cache: {e}");
        }
        self.parts.audit.record(
            Event::new(Kind::PermissionChanged, &asker.actor, &asker.chat)
                .target(who.clone())
                .outcome("paired")
                .reason(format!("approved with code {code}")),
        );
        Answer::fixed(t!("approve.done_title"), t!("approve.done", nick = nick, who = who))
    }

    /// `/doctor`, `/logs`, `/backup`: admins only.
    async fn upkeep(&self, asker: &Asker, command: Command, progress: Option<&dyn Progress>) -> Answer {
        let name = match &command {
            Command::Doctor => "/doctor",
            Command::Logs => "/logs",
            Command::Update(_) => "/update",
            Command::Rollback => "/rollback",
            _ => "/backup",
        };
        if !self.parts.access.is_admin(&asker.actor) {
            self.parts
                .audit
                .record(Event::new(Kind::ToolDenied, &asker.actor, &asker.chat).tool(name).reason("not an admin"));
            return Answer::fixed(t!("command.admins_only_title"), t!("upkeep.admins_only"));
        }
        let Some(m) = self.parts.maintenance.clone() else {
            return Answer::fixed(t!("command.error_title"), t!("upkeep.unavailable"));
        };
        self.parts.audit.record(Event::new(Kind::ToolExecuted, &asker.actor, &asker.chat).tool(name));
        match command {
            Command::Doctor => {
                if let Some(p) = progress {
                    p.show(&t!("upkeep.doctor_running"));
                }
                let report = m.doctor(self.snapshot()).await;
                Answer::fixed(
                    t!("upkeep.doctor_title"),
                    doctor_markdown(&report, self.parts.settings.utc_offset_minutes),
                )
            }
            Command::Logs => {
                let lines = m.logs();
                let shown: Vec<&String> = lines.iter().rev().take(30).rev().collect();
                let text = if shown.is_empty() {
                    t!("upkeep.logs_none").to_string()
                } else {
                    let body: String = shown.iter().map(|l| format!("{l}\n")).collect();
                    format!("{}\n\n{}", t!("upkeep.logs_heading", n = shown.len(), all = lines.len()), fenced(&body))
                };
                Answer::fixed(t!("upkeep.logs_title"), text)
            }
            Command::Backup(arg) if matches!(arg.to_lowercase().as_str(), "now" | "立即" | "现在") => {
                if let Some(p) = progress {
                    p.show(&t!("upkeep.backup_running"));
                }
                match m.backup_now().await {
                    Ok(b) => Answer::fixed(
                        t!("upkeep.backup_title"),
                        t!(
                            "upkeep.backup_done",
                            path = b.path,
                            mib = format!("{:.1}", b.bytes as f64 / 1048576.0),
                            values = b.values,
                            kept = b.kept
                        ),
                    ),
                    Err(e) => Answer::fixed(t!("upkeep.backup_title"), t!("upkeep.backup_failed", error = e)),
                }
            }
            Command::Update(arg) => {
                let install = matches!(arg.to_lowercase().as_str(), "install" | "安装" | "now" | "立即");
                let (survey, events) = m.releases();
                let offset = self.parts.settings.utc_offset_minutes;
                if !install {
                    return Answer::fixed(t!("update.title"), update_markdown(survey.as_ref(), &events, offset));
                }
                let available = survey.as_ref().and_then(|s| s.available.clone());
                // A snapshot of the store first: the new release opens it as it finds it.
                if let Some(p) = progress {
                    p.show(&t!("upkeep.backup_running"));
                }
                if let Err(e) = m.snapshot_for_update().await {
                    return Answer::fixed(t!("update.title"), t!("update.no_backup", error = e));
                }
                match m.request_update("install") {
                    Ok(()) => Answer::fixed(
                        t!("update.title"),
                        match available {
                            Some(v) => t!("update.installing", version = v),
                            None => t!("update.checking"),
                        },
                    ),
                    Err(e) => Answer::fixed(t!("command.error_title"), t!("update.request_failed", error = e)),
                }
            }
            Command::Rollback => {
                let (survey, _) = m.releases();
                let Some(before) = survey.as_ref().and_then(|s| s.previous().cloned()) else {
                    return Answer::fixed(t!("update.rollback_title"), t!("update.no_previous"));
                };
                // Updates keep to the rule that the release before reads the store; a release
                // from before the rule may not.
                if before.store_schema.is_some_and(|v| v < crate::store::OLDEST_READER) {
                    return Answer::fixed(
                        t!("update.rollback_title"),
                        t!("update.rollback_cannot_read", previous = before.version.as_str()),
                    );
                }
                let previous = before.version;
                match m.request_update("rollback") {
                    Ok(()) => Answer::fixed(
                        t!("update.rollback_title"),
                        t!(
                            "update.rolling_back",
                            previous = previous,
                            running = survey.map(|s| s.running).unwrap_or_default()
                        ),
                    ),
                    Err(e) => Answer::fixed(t!("command.error_title"), t!("update.request_failed", error = e)),
                }
            }
            _ => {
                let state = match self.store_call(crate::store::backup::state).await {
                    Ok(st) => Some(st),
                    Err(e) => {
                        log::warn!("the nightly backup's state cannot be read: {e}");
                        None
                    }
                };
                let text = backups_markdown(
                    &m.backup_settings(),
                    state.as_ref(),
                    m.stick_copy().as_ref(),
                    m.last_backup().as_ref(),
                    self.parts.settings.utc_offset_minutes,
                    now_ms(),
                );
                Answer::fixed(t!("upkeep.backup_title"), text)
            }
        }
    }

    fn audit_text(&self, asker: &Asker, arg: &str) -> Answer {
        if !self.parts.access.is_admin(&asker.actor) {
            self.parts
                .audit
                .record(Event::new(Kind::ToolDenied, &asker.actor, &asker.chat).tool("/audit").reason("not an admin"));
            return Answer::fixed(t!("command.admins_only_title"), t!("audit.admins_only"));
        }
        let n = arg.parse::<usize>().unwrap_or(20).clamp(1, 100);
        let events = self.parts.audit.recent(n);
        let offset = self.parts.settings.utc_offset_minutes;
        // The events' own words stay English, as in the journal.
        let heading = t!("audit.heading", n = events.len(), zone = settings::zone_label(offset));
        let mut text = format!("{heading}\n\n");
        for e in events {
            let (when, _) = settings::local_time(e.at_ms, offset);
            text.push_str(&format!("- {when} {}\n", e.summary()));
        }
        Answer::fixed(t!("audit.title"), text)
    }

    fn media_answer(&self, message: &RobotMessage) -> Answer {
        let what = match &message.content {
            Content::Picture { .. } => t!("media.picture"),
            Content::Video { .. } => t!("media.video"),
            Content::Audio { .. } => t!("media.voice"),
            Content::File { file_name, .. } => {
                t!("media.file", name = file_name.chars().take(120).collect::<String>())
            }
            Content::RichText(_) | Content::Text(_) => t!("media.message"),
            Content::Unsupported { msgtype } => {
                return Answer::fixed(
                    t!("media.unsupported_title"),
                    t!("media.unsupported", kind = msgtype.chars().take(40).collect::<String>()),
                );
            }
        };
        let then = if self.parts.llm.is_some() { t!("media.with_llm") } else { t!("media.without_llm") };
        Answer::fixed(t!("media.title"), t!("media.received", what = what, then = then))
    }
}

/// `/update`: the releases on the box, what is waiting, and the newest events of the update
/// journal.
fn update_markdown(
    survey: Option<&crate::update::state::Survey>,
    events: &[crate::update::boot::Event],
    offset: i32,
) -> String {
    let Some(s) = survey else {
        return t!("update.no_survey").into_owned();
    };
    let mut text = t!("update.running", version = s.running.as_str()).into_owned();
    for r in &s.releases {
        let state = match r.state.as_str() {
            "kept" => t!("update.state_kept"),
            "trial" => t!("update.state_trial", n = r.tries_left),
            _ => t!("update.state_bad"),
        };
        let slot = if r.slot_present { t!("update.slot_present") } else { t!("update.slot_gone") };
        text.push_str(&format!("\n- {}：{state}，{slot}", r.version));
    }
    match &s.available {
        Some(v) => text.push_str(&format!("\n\n{}", t!("update.available", version = v.as_str()))),
        None => text.push_str(&format!("\n\n{}", t!("update.none_available"))),
    }
    if s.previous().is_some() {
        text.push_str(&format!("\n{}", t!("update.can_roll_back")));
    }
    if !events.is_empty() {
        text.push_str(&format!("\n\n{}", t!("update.journal", zone = settings::zone_label(offset))));
        for e in events.iter().rev().take(5).rev() {
            let (when, _) = settings::local_time(e.at_ms, offset);
            text.push_str(&format!("\n- {when} {}", crate::update::news(e)));
        }
    }
    text
}

/// Text in a Markdown code block whose fence is longer than any run of backticks inside.
fn fenced(text: &str) -> String {
    let longest = text.split(|c| c != '`').map(str::len).max().unwrap_or(0);
    let fence = "`".repeat(longest.max(2) + 1);
    let end = if text.ends_with('\n') { "" } else { "\n" };
    format!("{fence}\n{text}{end}{fence}")
}

/// The diagnostics for the admin chat: each doctor step with its verdict and, when not a pass,
/// what an admin can do about it; the configuration's problems; free space; the last backup. The
/// steps' details stay in the doctor's words (figures and names, as in `zhuli doctor`).
fn doctor_markdown(r: &crate::health::diagnostics::Report, offset: i32) -> String {
    use crate::health::diagnostics::Section;
    let mut t = format!("{}\n\n", t!("upkeep.doctor_heading", time = r.generated.as_str()));
    match &r.doctor {
        Section::Found(steps) => {
            for s in steps {
                let mark = match s.verdict.as_str() {
                    "pass" => "✅",
                    "warn" => "⚠️",
                    _ => "❌",
                };
                // The first line, or under a heading ("…finds them:") the lines it introduces.
                // The models step has one line per endpoint: each its own item below the step.
                let mut lines = s.detail.lines();
                let endpoints = s.detail.lines().filter(|l| l.contains(" (local, ") || l.contains(" (cloud, ")).count();
                let first = if s.name == "models" && endpoints > 0 {
                    let count = s.detail.lines().count();
                    let items: String = lines.map(|l| format!("\n  - {l}")).collect();
                    format!("{}{items}", t!("doctor.models_count", n = count))
                } else {
                    match lines.next().unwrap_or_default() {
                        heading if heading.ends_with(':') => lines.collect::<Vec<_>>().join("; "),
                        line => line.to_owned(),
                    }
                };
                let name = match s.name.as_str() {
                    "network" => t!("doctor.network"),
                    "credentials" => t!("doctor.credentials"),
                    "basic API" => t!("doctor.basic_api"),
                    "recent errors" => t!("doctor.recent_errors"),
                    "version" | "rollback" => t!("doctor.version"),
                    "tools" => t!("doctor.tools"),
                    "folders" => t!("doctor.folders"),
                    "models" => t!("doctor.models"),
                    other => other.to_owned().into(),
                };
                t.push_str(&format!("- {mark} **{name}**：{first}\n"));
                // What an admin can do from here; a report from an older agent has the console's.
                let fix = s.chat_fix.as_ref().and_then(|f| f.text()).or_else(|| s.fix.clone());
                // The models step's advice is one item, apart from the endpoints' lines.
                let fix = if s.name == "models" { fix.map(|f| f.lines().collect::<Vec<_>>().join("；")) } else { fix };
                if let (Some(fix), false) = (fix, s.verdict == "pass") {
                    for (i, line) in fix.lines().enumerate() {
                        let line = if i == 0 { t!("upkeep.fix", fix = line).into_owned() } else { line.to_owned() };
                        t.push_str(&format!("  - {line}\n"));
                    }
                }
            }
        }
        Section::Missing(why) => t.push_str(&format!("- {}\n", t!("upkeep.not_run", why = why.as_str()))),
    }
    if let Section::Found(c) = &r.configuration {
        for e in c.errors.iter().chain(&c.examples) {
            t.push_str(&format!("- ⚠️ {}\n", e.text()));
        }
    }
    for d in &r.disks {
        t.push_str(&format!(
            "- {}\n",
            t!("upkeep.disk", path = d.path.as_str(), free = d.free_bytes / 1048576, total = d.total_bytes / 1048576)
        ));
    }
    match &r.last_backup {
        Section::Found(b) => {
            let (when, _) = settings::local_time(b.created_at_ms as i64, offset);
            t.push_str(&format!(
                "- {}\n",
                t!("upkeep.doctor_backup", time = when, zone = settings::zone_label(offset))
            ));
        }
        Section::Missing(_) => t.push_str(&format!("- {}\n", t!("upkeep.backup_never"))),
    }
    t
}

/// How long ago `ms` was, at `now`, in words.
fn ago(ms: i64, now: i64) -> String {
    let minutes = (now - ms).max(0) / 60_000;
    match minutes {
        0..60 => t!("backups.minutes_ago", n = minutes.max(1)).to_string(),
        60..2880 => t!("backups.hours_ago", n = minutes / 60).to_string(),
        _ => t!("backups.days_ago", n = minutes / 1440).to_string(),
    }
}

/// `/backup`: each target's last good copy and its age, a failure in progress, the last restore
/// drill, and the next night.
fn backups_markdown(
    plan: &crate::store::backup::Settings,
    state: Option<&crate::store::backup::State>,
    stick: Option<&crate::store::backup::Target>,
    newest: Option<&crate::health::diagnostics::Backup>,
    offset: i32,
    now: i64,
) -> String {
    let at = |ms: i64| format!("{}（{}）", settings::local_time(ms, offset).0, ago(ms, now));
    let failing = |t: &crate::store::backup::Target| {
        t.failing.as_deref().map(|why| format!("\n  - ⚠️ {}", t!("backups.failing", why = why))).unwrap_or_default()
    };
    let default = crate::store::backup::State::default();
    let st = state.unwrap_or(&default);
    let mut text = format!("{}\n\n", t!("backups.heading", zone = settings::zone_label(offset)));
    // On the box: the newest snapshot there (`/backup now` too), else the nightly's record.
    let local = match (newest, st.local.ok_ms) {
        (Some(b), _) => t!("backups.local", when = at(b.created_at_ms as i64), path = b.path.as_str()).to_string(),
        (None, Some(ms)) => t!("backups.local_gone", when = at(ms)).to_string(),
        (None, None) => t!("backups.never", at = plan.at.as_str()).to_string(),
    };
    text.push_str(&format!("- {}：{local}{}\n", t!("backup.target_local"), failing(&st.local)));
    let offsite = match (&plan.offsite, st.offsite.ok_ms) {
        (None, _) => t!("backups.offsite_unset").to_string(),
        (Some(_), Some(ms)) => at(ms),
        (Some(_), None) => t!("backups.never", at = plan.at.as_str()).to_string(),
    };
    text.push_str(&format!("- {}：{offsite}{}\n", t!("backup.target_offsite"), failing(&st.offsite)));
    let on_stick = match (plan.stick_keep, stick.and_then(|s| s.ok_ms)) {
        (0, _) => t!("backups.stick_off").to_string(),
        (_, Some(ms)) => at(ms),
        (_, None) => t!("backups.stick_never").to_string(),
    };
    let stick_failing = stick.filter(|_| plan.stick_keep > 0).map(failing).unwrap_or_default();
    text.push_str(&format!("- {}：{on_stick}{stick_failing}\n", t!("backups.stick")));
    if plan.offsite.is_some() {
        let drill = match &st.drill {
            None => t!("backups.drill_never").to_string(),
            Some(d) if d.failed.is_none() => {
                t!("backups.drill_ok", when = at(d.at_ms), name = d.name.as_str()).to_string()
            }
            Some(d) => {
                t!("backups.drill_failed", when = at(d.at_ms), why = d.failed.as_deref().unwrap_or("")).to_string()
            }
        };
        text.push_str(&format!("- {}：{drill}\n", t!("backups.drill")));
    }
    let minute = crate::tools::when::clock(&plan.at).unwrap_or(150).clamp(0, 1439) as u16;
    let nightly = crate::schedule::Rule::Daily { minute };
    if let Some(next) = nightly.next_after(now, offset) {
        text.push_str(&format!("\n{}", t!("backups.next", when = settings::local_time(next, offset).0)));
    }
    text
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    #[test]
    fn base64_and_image_sniffing() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64(&[0xff, 0xfe]), "//4=");
        assert_eq!(image_type(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(image_type(&[0xff, 0xd8, 0xff, 0xe0]), Some("image/jpeg"));
        assert_eq!(image_type(b"%PDF-1.7"), None);
    }

    /// What a person wrote, put into every argument a tool takes as text.
    const WORDS: &str = "机密 zq7741 季度预算";

    /// The arguments of a call of `tool` after its `parameters`: paths as paths (they stay in
    /// the audit trail), numbers, flags and enum values as such; every other string is `WORDS`,
    /// and with `hostile` ids, times and numbers are `WORDS` too (a model may send anything).
    fn arguments(tool: &str, parameters: &Value, hostile: bool) -> Value {
        let path_keys: &[&str] = match tool.split('_').next().unwrap_or_default() {
            "files" | "drive" | "chat" => &["path", "from", "to"],
            "plug" => &["path", "source", "destination"],
            _ => &[],
        };
        let mut args = serde_json::Map::new();
        for (key, schema) in parameters["properties"].as_object().into_iter().flatten() {
            let text = |typical: &str| if hostile { json!(WORDS) } else { json!(typical) };
            let v = if path_keys.contains(&key.as_str()) {
                json!("share/reports/q3.txt")
            } else if let Some(first) = schema["enum"].as_array().and_then(|e| e.first()) {
                if hostile { json!(WORDS) } else { first.clone() }
            } else {
                match (schema["type"].as_str(), key.as_str()) {
                    (Some("integer" | "number"), _) => json!(3),
                    (Some("boolean"), _) => json!(true),
                    (Some("array"), _) => match schema["items"]["enum"].as_array().and_then(|e| e.first()) {
                        Some(first) if !hostile => json!([first]),
                        _ => json!([WORDS]),
                    },
                    (_, "from" | "to" | "start" | "end" | "due") => text("2030-01-02T10:00"),
                    (_, "repo") => text("acme/site"),
                    (_, k) if k.ends_with("_id") => text("id-1"),
                    _ => json!(WORDS),
                }
            };
            let v = if hostile && v.is_number() { json!(WORDS) } else { v };
            args.insert(key.clone(), v);
        }
        Value::Object(args)
    }

    /// Every tool's audit target, for typical and hostile arguments: ids, paths, times and
    /// sizes, never what a person wrote.
    #[tokio::test]
    async fn no_tool_puts_what_people_wrote_into_its_audit_target() {
        let dir =
            std::env::temp_dir().join(format!("zhuli-targets-{}-{:x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(dir.join("share")).expect("share");
        let d = |p: &str| dir.join(p).display().to_string();
        let text = format!(
            "[agent]\nstate_dir = {state:?}\n[store]\nkey_file = {key:?}\n\
             [dingtalk]\nclient_id = \"t\"\nclient_secret = \"t\"\nrobot_code = \"t\"\napi_base = \"http://127.0.0.1:9\"\n\
             [tools.files.roots]\nshare = {share:?}\n\
             [tools.github]\napi_base = \"http://127.0.0.1:9\"\ntoken = \"t\"\nrepos = [\"acme/site\"]\n\
             [tools.drive]\nurl = \"http://127.0.0.1:9/remote.php/dav/files/z/\"\nusername = \"z\"\npassword = \"p\"\nshare_links = \"nextcloud\"\n\
             [tools.caldav]\nusername = \"z\"\npassword = \"p\"\n[tools.caldav.calendars]\nteam = \"http://127.0.0.1:9/cal/team/\"\n",
            state = d("state"),
            key = d("key"),
            share = d("share"),
        );
        let config = crate::config::Config::parse(&text, std::path::Path::new("targets.toml")).expect("config");
        crate::store::key::StoreKey::generate().write_new(&dir.join("key")).expect("key");
        let store = Arc::new(crate::app::open_store(&config).expect("store"));
        let handles = crate::app::AgentHandles { stream: Arc::default(), sender: Arc::default() };
        let http = crate::dingtalk::http::HttpClient::new(
            crate::dingtalk::http::tls_config(),
            std::time::Duration::from_secs(1),
        );
        let api = Arc::new(crate::dingtalk::openapi::OpenApi::new(config.dingtalk.clone(), http));
        let health = Health::new(config.health.clone());
        let assistant =
            crate::app::build_assistant(&config, &handles, store, api, None, health).await.expect("assistant");
        let mut tools: Vec<Arc<dyn crate::tools::Tool>> =
            assistant.parts.tools.names().filter_map(|n| assistant.parts.tools.get(n).cloned()).collect();
        // A plugin's tool, with the arguments plugins commonly take.
        let settings: crate::tools::mcp::PluginSettings = toml::from_str("command = \"/bin/true\"").expect("plugin");
        let plugin = crate::tools::mcp::Plugin::new("plug", &settings, &dir.join("state"), None).expect("plugin");
        let entry = json!({"name": "create", "inputSchema": {"type": "object", "properties": {
            "name": {"type": "string"}, "id": {"type": "string"}, "query": {"type": "string"},
            "url": {"type": "string"}, "path": {"type": "string"}}}});
        tools.extend(
            crate::tools::mcp::McpTool::new(&plugin, &entry).map(|t| Arc::new(t) as Arc<dyn crate::tools::Tool>),
        );
        assert!(tools.len() > 30, "every kind of tool is here: {}", tools.len());
        for tool in &tools {
            for hostile in [false, true] {
                let args = arguments(tool.name(), tool.parameters(), hostile);
                let target = tool.target(&args);
                assert!(
                    !target.contains("zq7741") && !target.contains("季度"),
                    "{} (hostile: {hostile}) audits what a person wrote: {target:?} from {args}",
                    tool.name()
                );
                assert!(!target.is_empty(), "{} names what it touches", tool.name());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mentions_are_stripped() {
        assert_eq!(strip_mentions("@zhuli /ping"), "/ping");
        assert_eq!(strip_mentions("@a @b  hello"), "hello");
        assert_eq!(strip_mentions("no mention"), "no mention");
        assert_eq!(strip_mentions("@only"), "");
    }
}
