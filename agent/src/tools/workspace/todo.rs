//! DingTalk to-dos: create one for the asker or a colleague (due time, priority), list the
//! asker's open ones, mark one done. Creating and finishing are confirmed first and undoable.

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Outcome, ToolError, Workspace, api_error};
use crate::{
    dingtalk::openapi::{Api, Host, Payload, encode},
    tools::Context,
};

pub const TASKS: Api = Api { name: "/v1.0/todo/users/{unionId}/tasks", host: Host::New, permission: "Todo.Todo.Write" };
pub const TASK: Api =
    Api { name: "/v1.0/todo/users/{unionId}/tasks/{taskId}", host: Host::New, permission: "Todo.Todo.Write" };
pub const QUERY: Api =
    Api { name: "/v1.0/todo/users/{unionId}/org/tasks/query", host: Host::New, permission: "Todo.Todo.Read" };

const MAX_PAGES: usize = 10;

#[derive(Debug, Serialize, Deserialize)]
enum Undo {
    Created { owner: String, task: String, subject: String },
    Done { owner: String, task: String },
}

fn priority(name: &str) -> i64 {
    match name {
        "low" => 10,
        "high" => 30,
        "urgent" => 40,
        _ => 20,
    }
}

fn priority_name(p: i64) -> &'static str {
    match p {
        ..=10 => "low",
        11..=20 => "normal",
        21..=30 => "high",
        _ => "urgent",
    }
}

fn task_path(owner: &str, task: &str) -> String {
    format!("/v1.0/todo/users/{}/tasks/{}", encode(owner), encode(task))
}

/// Check the subject and due time, resolve the assignee, before the confirmation is asked.
pub async fn prepare_create(ws: &Workspace, ctx: &Context, mut args: Value) -> Result<Value, ToolError> {
    if args["subject"].as_str().is_none_or(|s| s.trim().is_empty()) {
        return Err(ToolError::Refused("say what the to-do is (`subject`)".into()));
    }
    if args.get("due").is_some() {
        let due = ws.parse_time(&args, "due")?;
        let now = crate::clock::now_ms();
        if due < now - 60_000 {
            return Err(ToolError::Refused(format!(
                "the due time {} is in the past (it is {} now); ask the user for a later one",
                ws.show(due),
                ws.show(now)
            )));
        }
    }
    let me = ws.people.me(ctx).await?;
    let who = match args["assignee"].as_str() {
        Some(a) if !a.trim().is_empty() => ws.people.resolve(a).await?,
        _ => me,
    };
    args["assignee"] = json!(who.staff_id);
    args["assignee_name"] = json!(who.name);
    Ok(args)
}

pub async fn create(ws: &Workspace, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    let who = match args["assignee"].as_str() {
        Some(a) if a != me.staff_id => ws.people.person(a).await?,
        _ => me.clone(),
    };
    let subject = args["subject"].as_str().unwrap_or_default().trim().to_owned();
    let mut body = json!({
        "subject": subject,
        "creatorId": me.union_id,
        "executorIds": [who.union_id],
        "participantIds": [me.union_id],
        "priority": priority(args["priority"].as_str().unwrap_or("normal")),
        "isOnlyShowExecutor": false,
    });
    if let Some(d) = args["description"].as_str().filter(|d| !d.is_empty()) {
        body["description"] = json!(d);
    }
    let due = if args.get("due").is_some() { Some(ws.parse_time(args, "due")?) } else { None };
    if let Some(due) = due {
        body["dueTime"] = json!(due);
    }
    let path = format!("/v1.0/todo/users/{}/tasks", encode(&me.union_id));
    let v = ws
        .api
        .request(&TASKS, http::Method::POST, &path, &[("operatorId", &me.union_id)], Payload::Json(&body))
        .await
        .map_err(api_error)?;
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let due_text = due.map(|d| format!(", due {}", ws.show(d))).unwrap_or_default();
    let for_whom = if who.staff_id == me.staff_id { "the asker".to_owned() } else { who.name.clone() };
    let undo = Undo::Created { owner: me.union_id, task: id.clone(), subject: subject.clone() };
    Ok(Outcome {
        text: format!("created the to-do “{subject}” for {for_whom}{due_text} (to-do id {id})"),
        // The undo line is audited: the to-do's id, never its subject.
        undo: Some((serde_json::to_vec(&undo).unwrap_or_default(), format!("delete to-do {id}"))),
    })
}

pub async fn list(ws: &Workspace, ctx: &Context, done: bool) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    let path = format!("/v1.0/todo/users/{}/org/tasks/query", encode(&me.union_id));
    let mut cards = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut body = json!({"isDone": done});
        if let Some(t) = &next {
            body["nextToken"] = json!(t);
        }
        let v =
            ws.api.request(&QUERY, http::Method::POST, &path, &[], Payload::Json(&body)).await.map_err(api_error)?;
        cards.extend(v["todoCards"].as_array().cloned().unwrap_or_default());
        match v["nextToken"].as_str().filter(|t| !t.is_empty()) {
            Some(t) if cards.len() < ws.settings.max_results => next = Some(t.to_owned()),
            _ => break,
        }
    }
    let what = if done { "finished" } else { "open" };
    if cards.is_empty() {
        return Ok(Outcome::text(format!("no {what} to-dos")));
    }
    let mut text = format!("{} {what} to-do(s):\n", cards.len());
    for c in cards.iter().take(ws.settings.max_results) {
        let due = c["dueTime"].as_i64().map(|d| format!(", due {}", ws.show(d))).unwrap_or_default();
        text.push_str(&format!(
            "- {}{due}, {} priority (to-do id {})\n",
            c["subject"].as_str().unwrap_or("(no subject)"),
            priority_name(c["priority"].as_i64().unwrap_or(20)),
            c["taskId"].as_str().unwrap_or_default()
        ));
    }
    Ok(Outcome::text(text))
}

async fn set_done(ws: &Workspace, owner: &str, task: &str, done: bool) -> Result<(), ToolError> {
    let v = ws
        .api
        .request(
            &TASK,
            http::Method::PUT,
            &task_path(owner, task),
            &[("operatorId", owner)],
            Payload::Json(&json!({"done": done})),
        )
        .await
        .map_err(|e| match e {
            crate::dingtalk::openapi::ApiError::Refused { status: 404, .. } => ToolError::Refused(format!(
                "there is no to-do `{}` of the asker; list the to-dos to find its id",
                task.chars().take(64).collect::<String>()
            )),
            e => api_error(e),
        })?;
    if v["result"].as_bool() == Some(false) {
        return Err(ToolError::Failed("DingTalk did not change the to-do".into()));
    }
    Ok(())
}

pub async fn done(ws: &Workspace, ctx: &Context, task: &str) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    set_done(ws, &me.union_id, task, true).await?;
    let undo = Undo::Done { owner: me.union_id, task: task.to_owned() };
    Ok(Outcome {
        text: format!("marked to-do {task} done"),
        undo: Some((serde_json::to_vec(&undo).unwrap_or_default(), format!("reopen to-do {task}"))),
    })
}

pub async fn undo(ws: &Workspace, ctx: &Context, payload: &[u8]) -> Result<String, ToolError> {
    let undo: Undo =
        serde_json::from_slice(payload).map_err(|_| ToolError::Failed("the undo record is not readable".into()))?;
    let me = ws.people.me(ctx).await?;
    match undo {
        Undo::Created { owner, task, subject } if owner == me.union_id => {
            ws.api
                .request(
                    &TASK,
                    http::Method::DELETE,
                    &task_path(&owner, &task),
                    &[("operatorId", &owner)],
                    Payload::None,
                )
                .await
                .map_err(api_error)?;
            Ok(t!("undo.todo_deleted", subject = subject).into_owned())
        }
        Undo::Done { owner, task } if owner == me.union_id => {
            set_done(ws, &owner, &task, false).await?;
            Ok(t!("undo.todo_reopened", id = task).into_owned())
        }
        _ => Err(ToolError::Refused("that change was made for someone else".into())),
    }
}
