//! The DingTalk workspace tools: people (address book), calendar, to-dos, approvals and files in
//! chat, through DingTalk's Open Platform APIs with the app credentials the box already holds.
//!
//! Each tool acts **as the asking user**: the asker's staff id is resolved to the unionId the
//! calendar and to-do APIs take (`people::Directory`), and every call names that user — never
//! an admin or the app itself. A sender outside the organisation (no staff id) cannot use them.
//! Every call is paced per API by the OpenAPI limiter and retried a few times when throttled;
//! what still fails is said in words, a missing app permission by its exact name
//! ([`ToolError::NeedsAdmin`], which the turn loop also adds to the answer).
//!
//! Never logs or audits what the APIs return (names, titles, event text); the audit trail gets
//! the tool, the target ids and the outcome only.

pub mod approvals;
pub mod calendar;
pub mod chat;
pub mod people;
pub mod todo;
pub use super::when;

use std::sync::Arc;

use rust_i18n::t;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BoxFuture, Context, Outcome, Risk, Tool, ToolError, files::Roots};
use crate::{
    dingtalk::{
        openapi::{ApiError, OpenApi},
        settings::Millis,
    },
    store::Store,
};
use people::Directory;

/// `[tools.dingtalk]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceSettings {
    /// How long an address-book look-up is kept (in the store). Changes of `[access]`, an
    /// approval and DingTalk refusing the address book empty the cache at once.
    pub people_cache_ms: Millis,
    /// The working day free slots are searched in, local time.
    pub day_start: String,
    pub day_end: String,
    /// Entries a listing returns at most.
    pub max_results: usize,
    /// Largest file `chat_send_file` uploads (DingTalk's media limit is 20 MB).
    pub max_send_bytes: u64,
}

impl Default for WorkspaceSettings {
    fn default() -> Self {
        WorkspaceSettings {
            people_cache_ms: Millis::from_ms(3_600_000),
            day_start: "09:00".into(),
            day_end: "18:00".into(),
            max_results: 50,
            max_send_bytes: 20 * 1024 * 1024,
        }
    }
}

/// What every workspace tool works with.
pub struct Workspace {
    pub api: Arc<OpenApi>,
    pub people: Directory,
    pub settings: WorkspaceSettings,
    /// Minutes from UTC of the box's local time (`[assistant] utc_offset_minutes`).
    pub offset_minutes: i32,
    /// The IANA name sent with calendar times (`[agent] time_zone`, Asia/Shanghai by default).
    pub zone: String,
    pub roots: Arc<Roots>,
    /// Working day in local minutes, checked at start.
    day: (i64, i64),
}

#[derive(Debug, thiserror::Error)]
#[error("[tools.dingtalk] {0}")]
pub struct WorkspaceSettingsError(String);

impl Workspace {
    pub fn new(
        api: Arc<OpenApi>,
        store: Arc<Store>,
        settings: WorkspaceSettings,
        offset_minutes: i32,
        zone: Option<&str>,
        roots: Arc<Roots>,
    ) -> Result<Arc<Self>, WorkspaceSettingsError> {
        let start = when::clock(&settings.day_start).map_err(|e| WorkspaceSettingsError(format!("day_start: {e}")))?;
        let end = when::clock(&settings.day_end).map_err(|e| WorkspaceSettingsError(format!("day_end: {e}")))?;
        if start >= end {
            return Err(WorkspaceSettingsError("day_start must come before day_end".into()));
        }
        if settings.max_results == 0 {
            return Err(WorkspaceSettingsError("max_results must be at least 1".into()));
        }
        let people = Directory::new(api.clone(), store, settings.people_cache_ms.get().as_millis() as i64);
        Ok(Arc::new(Workspace {
            api,
            people,
            offset_minutes,
            zone: zone.unwrap_or("Asia/Shanghai").to_owned(),
            settings,
            roots,
            day: (start, end),
        }))
    }

    fn parse_time(&self, args: &Value, name: &str) -> Result<i64, ToolError> {
        let text = args[name].as_str().unwrap_or_default();
        when::parse(text, self.offset_minutes).map_err(|e| ToolError::Refused(format!("`{name}`: {e}")))
    }

    fn show(&self, ms: i64) -> String {
        when::local(ms, self.offset_minutes)
    }

    fn time_json(&self, ms: i64) -> Value {
        json!({ "dateTime": when::rfc3339(ms, self.offset_minutes), "timeZone": self.zone })
    }
}

/// DingTalk's refusals as the model and the person see them.
pub fn api_error(e: ApiError) -> ToolError {
    match e {
        e @ ApiError::Permission { .. } => ToolError::NeedsAdmin(e.to_string()),
        e @ ApiError::Refused { .. } => ToolError::Refused(e.to_string()),
        e => ToolError::Failed(e.to_string()),
    }
}

/// Which workspace tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    PeopleSearch,
    PeopleMembers,
    CalendarList,
    CalendarFree,
    CalendarCreate,
    CalendarMove,
    CalendarCancel,
    TodoCreate,
    TodoList,
    TodoDone,
    ApprovalsPending,
    ApprovalsShow,
    ChatSendFile,
}

impl Op {
    /// The tool's name, as the model and the grants in `[access.roles]` see it.
    pub fn name(self) -> &'static str {
        match self {
            Op::PeopleSearch => "people_search",
            Op::PeopleMembers => "people_members",
            Op::CalendarList => "calendar_list",
            Op::CalendarFree => "calendar_free",
            Op::CalendarCreate => "calendar_create",
            Op::CalendarMove => "calendar_move",
            Op::CalendarCancel => "calendar_cancel",
            Op::TodoCreate => "todo_create",
            Op::TodoList => "todo_list",
            Op::TodoDone => "todo_done",
            Op::ApprovalsPending => "approvals_pending",
            Op::ApprovalsShow => "approvals_show",
            Op::ChatSendFile => "chat_send_file",
        }
    }
}

const OPS: [Op; 13] = [
    Op::PeopleSearch,
    Op::PeopleMembers,
    Op::CalendarList,
    Op::CalendarFree,
    Op::CalendarCreate,
    Op::CalendarMove,
    Op::CalendarCancel,
    Op::TodoCreate,
    Op::TodoList,
    Op::TodoDone,
    Op::ApprovalsPending,
    Op::ApprovalsShow,
    Op::ChatSendFile,
];

pub struct WorkspaceTool {
    op: Op,
    ws: Arc<Workspace>,
    parameters: Value,
}

/// The names of the workspace tools (always offered).
pub fn tool_names() -> impl Iterator<Item = &'static str> {
    OPS.into_iter().map(Op::name)
}

/// Every workspace tool.
pub fn tools(ws: &Arc<Workspace>) -> Vec<Arc<dyn Tool>> {
    OPS.iter().map(|op| Arc::new(WorkspaceTool::new(*op, ws.clone())) as Arc<dyn Tool>).collect()
}

fn string(description: &str) -> Value {
    json!({"type": "string", "description": description})
}

const TIME: &str = "local time YYYY-MM-DDTHH:MM, or RFC 3339 with an offset";
const PERSON: &str = "a colleague's staff id (from people_search) or their name";

impl WorkspaceTool {
    pub fn new(op: Op, ws: Arc<Workspace>) -> Self {
        let object = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
        let parameters = match op {
            Op::PeopleSearch => object(json!({"query": string("a name (or part of it) or a staff id")}), &["query"]),
            Op::PeopleMembers => object(json!({"department": string("the department's name or id")}), &["department"]),
            Op::CalendarList => object(json!({"from": string(TIME), "to": string(TIME)}), &["from", "to"]),
            Op::CalendarFree => object(
                json!({
                    "people": {"type": "array", "items": string(PERSON), "description": "who must be free besides the asker"},
                    "from": string(TIME), "to": string(TIME),
                    "minutes": {"type": "integer", "minimum": 5, "maximum": 600, "description": "length of the meeting"},
                }),
                &["people", "from", "to", "minutes"],
            ),
            Op::CalendarCreate => object(
                json!({
                    "title": string("what the event is"),
                    "start": string(TIME), "end": string(TIME),
                    "attendees": {"type": "array", "items": string(PERSON)},
                    "location": string("where"),
                    "description": string("details"),
                }),
                &["title", "start", "end"],
            ),
            Op::CalendarMove => object(
                json!({"event_id": string("the event's id from calendar_list"), "start": string(TIME), "end": string(TIME)}),
                &["event_id", "start", "end"],
            ),
            Op::CalendarCancel => {
                object(json!({"event_id": string("the event's id from calendar_list")}), &["event_id"])
            }
            Op::TodoCreate => object(
                json!({
                    "subject": string("what is to be done"),
                    "due": string(TIME),
                    "assignee": string("who does it: a staff id or name; the asker when left out"),
                    "priority": {"type": "string", "enum": ["low", "normal", "high", "urgent"]},
                    "description": string("details"),
                }),
                &["subject"],
            ),
            Op::TodoList => {
                object(json!({"done": {"type": "boolean", "description": "list finished ones instead"}}), &[])
            }
            Op::TodoDone => object(json!({"task_id": string("the to-do's id from todo_list")}), &["task_id"]),
            Op::ApprovalsPending => object(json!({}), &[]),
            Op::ApprovalsShow => {
                object(json!({"instance_id": string("the approval's id from approvals_pending")}), &["instance_id"])
            }
            Op::ChatSendFile => object(json!({"path": string("root/folder/file of the file to send")}), &["path"]),
        };
        WorkspaceTool { op, ws, parameters }
    }
}

use crate::tools::{id_or_size, size, str_arg as arg, time_or_size};

impl Tool for WorkspaceTool {
    fn name(&self) -> &str {
        self.op.name()
    }

    fn description(&self) -> &str {
        match self.op {
            Op::PeopleSearch => {
                "Find colleagues in the DingTalk address book by name or staff id: name, title, departments, staff id."
            }
            Op::PeopleMembers => "List the members of a department of the organisation.",
            Op::CalendarList => "List the events of the asker's DingTalk calendar between two times.",
            Op::CalendarFree => {
                "Find times when the asker and the given colleagues are all free (working hours, weekdays)."
            }
            Op::CalendarCreate => {
                "Create an event in the asker's DingTalk calendar and invite colleagues (asks the user to confirm; undoable)."
            }
            Op::CalendarMove => {
                "Move an event of the asker's calendar to a new time (asks the user to confirm; undoable)."
            }
            Op::CalendarCancel => "Cancel an event of the asker's calendar (asks the user to confirm; undoable).",
            Op::TodoCreate => {
                "Create a DingTalk to-do for the asker or a colleague, with a due time and priority (asks the user to confirm; undoable)."
            }
            Op::TodoList => "List the asker's open DingTalk to-dos (or finished ones).",
            Op::TodoDone => "Mark one of the asker's to-dos done (asks the user to confirm; undoable).",
            Op::ApprovalsPending => "List the approvals waiting for the asker's decision.",
            Op::ApprovalsShow => {
                "Show one approval the asker takes part in: form, originator, status, who decided what."
            }
            Op::ChatSendFile => "Send a file from one of the box's folders into this chat as a file message.",
        }
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        match self.op {
            Op::CalendarCreate | Op::CalendarMove | Op::TodoCreate | Op::TodoDone => Risk::Write,
            Op::CalendarCancel => Risk::Destructive,
            // A file into a chat: its members may read it, whatever the file was.
            Op::ChatSendFile => Risk::Share,
            _ => Risk::Read,
        }
    }

    fn target(&self, args: &Value) -> String {
        // Ids, paths and times; names and words people typed only by their size.
        let (id, time) = (|k: &str| id_or_size(arg(args, k)), |k: &str| time_or_size(arg(args, k)));
        let t = match self.op {
            Op::PeopleSearch => format!("people search {}", size(arg(args, "query"))),
            Op::PeopleMembers => match arg(args, "department").trim().parse::<i64>() {
                Ok(dept) => format!("department {dept}"),
                Err(_) => format!("department {}", size(arg(args, "department"))),
            },
            Op::CalendarList => format!("{} – {}", time("from"), time("to")),
            Op::CalendarFree => {
                format!(
                    "{} – {} for {} people",
                    time("from"),
                    time("to"),
                    args["people"].as_array().map_or(0, Vec::len)
                )
            }
            Op::CalendarCreate => {
                // Staff ids once `prepare` resolved the names; a name as typed is only counted.
                let ids = super::ids_or_sizes(&args["attendees"]);
                format!("{} – {} with [{}]", time("start"), time("end"), ids.join(", "))
            }
            Op::CalendarMove => format!("event {} to {} – {}", id("event_id"), time("start"), time("end")),
            Op::CalendarCancel => format!("event {}", id("event_id")),
            Op::TodoCreate => {
                let due = args.get("due").map(|_| format!(", due {}", time("due"))).unwrap_or_default();
                let who = args["assignee"].as_str().map_or_else(|| "the asker".to_owned(), id_or_size);
                format!("to-do for {who}{due}")
            }
            Op::TodoList => "open to-dos".to_owned(),
            Op::TodoDone => format!("to-do {}", id("task_id")),
            Op::ApprovalsPending => "pending approvals".to_owned(),
            Op::ApprovalsShow => format!("approval {}", id("instance_id")),
            Op::ChatSendFile => arg(args, "path").to_owned(),
        };
        t.chars().take(160).collect()
    }

    fn question(&self, args: &Value) -> String {
        let offset = self.ws.offset_minutes;
        let names = |k: &str| -> Vec<String> {
            args[k].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
        };
        match self.op {
            Op::CalendarCreate => {
                let who = names("attendee_names");
                let (title, when) = (arg(args, "title"), when::span_of(arg(args, "start"), arg(args, "end"), offset));
                if who.is_empty() {
                    t!("question.event", title = title, when = when)
                } else {
                    t!("question.event_with", title = title, when = when, people = who.join(", "))
                }
                .into_owned()
            }
            Op::TodoCreate => {
                let due = args["due"]
                    .as_str()
                    .map(|d| t!("question.due", when = when::shown_of(d, offset)).into_owned())
                    .unwrap_or_default();
                let subject = arg(args, "subject");
                match args["assignee_name"].as_str().or(args["assignee"].as_str()) {
                    Some(who) => t!("question.todo", subject = subject, who = who, due = due),
                    None => t!("question.todo_mine", subject = subject, due = due),
                }
                .into_owned()
            }
            _ => self.target(args),
        }
        .chars()
        .take(300)
        .collect()
    }

    fn prepare<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            match self.op {
                Op::CalendarCreate => calendar::prepare_create(&self.ws, ctx, args).await,
                Op::CalendarMove => calendar::prepare_move(&self.ws, args),
                Op::TodoCreate => todo::prepare_create(&self.ws, ctx, args).await,
                _ => Ok(args),
            }
        })
    }

    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            let ws = &self.ws;
            let private = match self.op {
                Op::CalendarList => Some("the asker's calendar events"),
                Op::TodoList => Some("the asker's to-dos"),
                Op::ApprovalsPending | Op::ApprovalsShow => Some("the asker's approvals"),
                _ => None,
            };
            if let Some(what) = private {
                super::private_in_group(ctx, what)?;
            }
            match self.op {
                Op::PeopleSearch => people::search_tool(ws, arg(&args, "query")).await,
                Op::PeopleMembers => people::members_tool(ws, arg(&args, "department")).await,
                Op::CalendarList => calendar::list(ws, ctx, &args).await,
                Op::CalendarFree => calendar::free(ws, ctx, &args).await,
                Op::CalendarCreate => calendar::create(ws, ctx, &args).await,
                Op::CalendarMove => calendar::move_event(ws, ctx, &args).await,
                Op::CalendarCancel => calendar::cancel(ws, ctx, arg(&args, "event_id")).await,
                Op::TodoCreate => todo::create(ws, ctx, &args).await,
                Op::TodoList => todo::list(ws, ctx, args["done"].as_bool().unwrap_or(false)).await,
                Op::TodoDone => todo::done(ws, ctx, arg(&args, "task_id")).await,
                Op::ApprovalsPending => approvals::pending(ws, ctx).await,
                Op::ApprovalsShow => approvals::show(ws, ctx, arg(&args, "instance_id")).await,
                Op::ChatSendFile => chat::send_file(ws, ctx, arg(&args, "path")).await,
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            match self.op {
                Op::CalendarCreate | Op::CalendarMove | Op::CalendarCancel => {
                    calendar::undo(&self.ws, ctx, payload).await
                }
                Op::TodoCreate | Op::TodoDone => todo::undo(&self.ws, ctx, payload).await,
                _ => Err(ToolError::Failed("this tool cannot undo".into())),
            }
        })
    }
}
