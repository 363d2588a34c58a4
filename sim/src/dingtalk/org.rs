//! The simulator's organisation: departments, people, calendars, to-dos, approvals and uploaded
//! media, behind the workspace APIs the agent's tools call, with DingTalk's request and answer
//! shapes (see docs/dingtalk-apis.md), its pagination, and its errors: a missing API permission
//! (403 `Forbidden.AccessDenied.AccessTokenPermissionDenied` with `requiredScopes`, or errcode
//! 60011 on the old API), an unknown user (errcode 60121 / 400), throttling (403 QpsLimitForApi).
//! Tests seed it with [`Org`] and read it back to check what the agent changed.

use std::collections::HashMap;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use http_body_util::Full;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Shared,
    respond::{err, reply},
};
use zhuli::tools::when;

#[derive(Debug, Clone, Serialize)]
pub struct OrgDept {
    pub id: i64,
    pub name: String,
    pub parent: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgPerson {
    pub staff_id: String,
    pub union_id: String,
    pub name: String,
    pub title: String,
    pub depts: Vec<i64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgEvent {
    pub id: String,
    /// The organiser's unionId: the calendar it was created in.
    pub owner: String,
    pub summary: String,
    pub description: String,
    pub location: String,
    pub start_ms: i64,
    pub end_ms: i64,
    /// unionIds.
    pub attendees: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgTodo {
    pub id: String,
    pub creator: String,
    pub executors: Vec<String>,
    pub subject: String,
    pub description: String,
    pub due_ms: Option<i64>,
    pub priority: i64,
    pub done: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgApproval {
    pub id: String,
    pub title: String,
    /// Staff ids.
    pub originator: String,
    pub approvers: Vec<String>,
    pub cc: Vec<String>,
    /// Whose decision it waits for now.
    pub waiting_for: Vec<String>,
    pub status: String,
    pub result: String,
    pub form: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct OrgUpload {
    pub media_id: String,
    pub file_name: String,
    pub bytes: Vec<u8>,
}

/// An organisation as the simulator serves it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Org {
    pub departments: Vec<OrgDept>,
    pub people: Vec<OrgPerson>,
    pub events: Vec<OrgEvent>,
    pub todos: Vec<OrgTodo>,
    pub approvals: Vec<OrgApproval>,
    pub uploads: Vec<OrgUpload>,
}

impl Org {
    pub fn dept(mut self, id: i64, name: &str, parent: i64) -> Self {
        self.departments.push(OrgDept { id, name: name.into(), parent });
        self
    }

    /// A person; the unionId is derived from the staff id (`union-<staff id>`).
    pub fn person(mut self, staff_id: &str, name: &str, title: &str, depts: &[i64]) -> Self {
        self.people.push(OrgPerson {
            staff_id: staff_id.into(),
            union_id: format!("union-{staff_id}"),
            name: name.into(),
            title: title.into(),
            depts: depts.to_vec(),
        });
        self
    }

    pub fn union_of(&self, staff_id: &str) -> String {
        self.people.iter().find(|p| p.staff_id == staff_id).map(|p| p.union_id.clone()).unwrap_or_default()
    }
}

/// Faults of the workspace APIs, by path prefix.
#[derive(Debug, Default)]
pub(super) struct OrgFaults {
    denied: Vec<(String, String)>,
    throttled: Vec<(String, u32)>,
}

#[derive(Default)]
pub(super) struct OrgState {
    pub org: Org,
    pub faults: OrgFaults,
    /// Calls per API (route name).
    pub calls: HashMap<&'static str, u64>,
    next: u64,
}

impl OrgState {
    fn id(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}{:05}{:04x}", self.next, rand::random::<u16>())
    }
}

/// Is `path` one of the workspace APIs?
pub(super) fn is_org_path(path: &str) -> bool {
    ["/topapi/", "/media/upload", "/v1.0/contact/", "/v1.0/calendar/", "/v1.0/todo/", "/v1.0/workflow/"]
        .iter()
        .any(|p| path.starts_with(p))
}

fn query(q: &str, name: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 3 <= b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok()))
            .flatten();
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

type Resp = Response<Full<Bytes>>;

fn bad(code: &str, message: &str) -> Resp {
    err(StatusCode::BAD_REQUEST, code, message)
}

fn old_err(errcode: i64, errmsg: &str) -> Resp {
    reply(StatusCode::OK, json!({"errcode": errcode, "errmsg": errmsg, "request_id": "sim"}))
}

fn time_json(ms: i64) -> Value {
    json!({"dateTime": when::rfc3339(ms, 480), "timeZone": "Asia/Shanghai"})
}

fn ms_of(t: &Value) -> Option<i64> {
    t["dateTime"].as_str().or_else(|| t["date"].as_str()).and_then(|s| when::parse(s, 480).ok())
}

/// Route name of a workspace path: its documented shape with placeholders.
fn route(method: &Method, parts: &[&str]) -> Option<&'static str> {
    Some(match (method.as_str(), parts) {
        ("POST", ["topapi", "v2", "user", "get"]) => "/topapi/v2/user/get",
        ("POST", ["topapi", "v2", "user", "list"]) => "/topapi/v2/user/list",
        ("POST", ["topapi", "v2", "department", "listsub"]) => "/topapi/v2/department/listsub",
        ("POST", ["media", "upload"]) => "/media/upload",
        ("POST", ["v1.0", "contact", "users", "search"]) => "/v1.0/contact/users/search",
        ("GET" | "POST", ["v1.0", "calendar", "users", _, "calendars", _, "events"]) => "calendar events",
        ("GET" | "PUT" | "DELETE", ["v1.0", "calendar", "users", _, "calendars", _, "events", _]) => "calendar event",
        ("POST", ["v1.0", "calendar", "users", _, "querySchedule"]) => "calendar querySchedule",
        ("POST", ["v1.0", "todo", "users", _, "tasks"]) => "todo create",
        ("PUT" | "DELETE", ["v1.0", "todo", "users", _, "tasks", _]) => "todo task",
        ("POST", ["v1.0", "todo", "users", _, "org", "tasks", "query"]) => "todo query",
        ("GET", ["v1.0", "workflow", "workRecords", "todoTasks"]) => "workflow todoTasks",
        ("GET", ["v1.0", "workflow", "processInstances"]) => "workflow processInstances",
        _ => return None,
    })
}

pub(super) fn handle(
    shared: &Shared,
    method: &Method,
    path: &str,
    q: &str,
    header_token: Option<&str>,
    body: &[u8],
) -> Resp {
    let old = path.starts_with("/topapi/") || path.starts_with("/media/");
    let token = if old { query(q, "access_token") } else { header_token.map(str::to_owned) };
    if !token.is_some_and(|t| shared.lock().tokens.contains(&t)) {
        return if old {
            old_err(40014, "不合法的access_token")
        } else {
            err(StatusCode::UNAUTHORIZED, "InvalidAuthentication", "access token is missing, invalid or expired")
        };
    }
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let Some(name) = route(method, &parts) else {
        return err(StatusCode::NOT_FOUND, "NotFound", "no such API in the simulator");
    };
    let mut st = shared.lock();
    let org = &mut st.org;
    *org.calls.entry(name).or_default() += 1;
    if let Some((_, scope)) = org.faults.denied.iter().find(|(p, _)| path.starts_with(p.as_str())) {
        let scope = scope.clone();
        return if old {
            old_err(60011, "没有调用该接口的权限")
        } else {
            reply(
                StatusCode::FORBIDDEN,
                json!({"code": "Forbidden.AccessDenied.AccessTokenPermissionDenied", "requestid": "sim",
                    "message": "没有调用该接口的权限，接口权限申请参考：https://open.dingtalk.com/document/orgapp-server/add-api-permission",
                    "accessdenieddetail": {"requiredScopes": [scope]}}),
            )
        };
    }
    if let Some(t) = org.faults.throttled.iter_mut().find(|(p, n)| *n > 0 && path.starts_with(p.as_str())) {
        t.1 -= 1;
        return err(StatusCode::FORBIDDEN, "Forbidden.AccessDenied.QpsLimitForApi", "QPS limit for this API");
    }
    if name == "/media/upload" {
        return upload(org, q, body);
    }
    let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(body).unwrap_or(Value::Null) };
    let user = |org: &OrgState, union: &str| org.org.people.iter().any(|p| p.union_id == union);
    match name {
        "/topapi/v2/user/get" => user_get(org, &body),
        "/topapi/v2/user/list" => user_list(org, &body),
        "/topapi/v2/department/listsub" => {
            let id = body["dept_id"].as_i64().unwrap_or(1);
            let subs: Vec<Value> = org.org.departments.iter().filter(|d| d.parent == id && d.id != id)
                .map(|d| json!({"dept_id": d.id, "name": d.name, "parent_id": d.parent, "auto_add_user": true, "create_dept_group": false}))
                .collect();
            reply(StatusCode::OK, json!({"errcode": 0, "errmsg": "ok", "result": subs, "request_id": "sim"}))
        }
        "/v1.0/contact/users/search" => {
            let word = body["queryWord"].as_str().unwrap_or_default().to_lowercase();
            if word.is_empty() {
                return bad("invalidParameter.queryWord", "queryWord is required");
            }
            let all: Vec<&OrgPerson> =
                org.org.people.iter().filter(|p| p.name.to_lowercase().contains(&word)).collect();
            let (offset, size) = (
                body["offset"].as_u64().unwrap_or(0) as usize,
                body["size"].as_u64().unwrap_or(10).clamp(1, 100) as usize,
            );
            let page: Vec<&str> = all.iter().skip(offset).take(size).map(|p| p.staff_id.as_str()).collect();
            reply(
                StatusCode::OK,
                json!({"hasMore": offset + page.len() < all.len(), "totalCount": all.len(), "list": page}),
            )
        }
        "calendar events" | "calendar event" | "calendar querySchedule" => {
            let owner = decode(parts[3]);
            if !user(org, &owner) {
                return bad("invalidParameter.userId", "userId does not exist in this organisation");
            }
            match (name, method.as_str()) {
                ("calendar events", "GET") => list_events(org, &owner, q),
                ("calendar events", _) => create_event(org, &owner, &body),
                ("calendar event", m) => one_event(org, &owner, &decode(parts[7]), m, &body),
                _ => schedule(org, &body),
            }
        }
        "todo create" | "todo task" | "todo query" => {
            let owner = decode(parts[3]);
            if !user(org, &owner) {
                return bad("invalidParameter.unionId", "unionId does not exist in this organisation");
            }
            if name == "todo query" {
                return query_todos(org, &owner, &body);
            }
            if query(q, "operatorId").as_deref() != Some(owner.as_str()) {
                return bad("invalidParameter.operatorId", "operatorId must be the user whose to-dos these are");
            }
            if name == "todo create" {
                create_todo(org, &owner, &body)
            } else {
                one_todo(org, &owner, &decode(parts[5]), method, &body)
            }
        }
        "workflow todoTasks" => {
            let who = query(q, "userId").unwrap_or_default();
            // Required by DingTalk's model; 0 = waiting for the user (the only list served here).
            let Some(status) = query(q, "status") else {
                return bad("invalidParameter.status", "status is required");
            };
            let start: usize = query(q, "nextToken").and_then(|t| t.parse().ok()).unwrap_or(0);
            let max: usize = query(q, "maxResults").and_then(|t| t.parse().ok()).unwrap_or(20).clamp(1, 50);
            let mine: Vec<&OrgApproval> =
                org.org.approvals.iter().filter(|a| status == "0" && a.waiting_for.contains(&who)).collect();
            let page: Vec<Value> = mine
                .iter()
                .skip(start)
                .take(max)
                .enumerate()
                .map(|(i, a)| {
                    json!({
                        "instanceId": a.id, "taskId": 100_000 + start + i, "title": a.title,
                        "url": format!("dingtalk://approval/{}", a.id),
                        "forms": a.form.iter().map(|(k, v)| json!({"title": k, "content": v})).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let next = if start + page.len() < mine.len() { json!(start + page.len()) } else { Value::Null };
            reply(StatusCode::OK, json!({"result": {"list": page, "nextToken": next}}))
        }
        _ => {
            let id = query(q, "processInstanceId").unwrap_or_default();
            let Some(a) = org.org.approvals.iter().find(|a| a.id == id) else {
                return bad("invalidParameter.processInstanceId", "processInstanceId does not exist");
            };
            let mut tasks: Vec<Value> = a.approvers.iter().enumerate().map(|(i, u)| {
                let waiting = a.waiting_for.contains(u);
                json!({"userId": u, "status": if waiting { "RUNNING" } else { "COMPLETED" }, "result": if waiting { "" } else { "agree" }, "taskId": 200_000 + i})
            }).collect();
            tasks.truncate(20);
            reply(
                StatusCode::OK,
                json!({"success": "true", "result": {
                "title": a.title, "status": a.status, "result": a.result, "originatorUserId": a.originator,
                "originatorDeptName": "", "createTime": "2026-11-30T09:00Z", "approverUserIds": a.approvers, "ccUserIds": a.cc,
                "formComponentValues": a.form.iter().map(|(k, v)| json!({"name": k, "value": v, "componentType": "TextField"})).collect::<Vec<_>>(),
                "tasks": tasks, "businessId": format!("2026{}", a.id)}}),
            )
        }
    }
}

fn person_json(p: &OrgPerson) -> Value {
    json!({"userid": p.staff_id, "unionid": p.union_id, "name": p.name, "title": p.title, "dept_id_list": p.depts, "active": true})
}

fn user_get(org: &OrgState, body: &Value) -> Resp {
    let id = body["userid"].as_str().unwrap_or_default();
    match org.org.people.iter().find(|p| p.staff_id == id) {
        Some(p) => {
            reply(StatusCode::OK, json!({"errcode": 0, "errmsg": "ok", "result": person_json(p), "request_id": "sim"}))
        }
        None => old_err(60121, "找不到该用户"),
    }
}

fn user_list(org: &OrgState, body: &Value) -> Resp {
    let dept = body["dept_id"].as_i64().unwrap_or(1);
    let cursor = body["cursor"].as_u64().unwrap_or(0) as usize;
    let size = body["size"].as_u64().unwrap_or(10).clamp(1, 100) as usize;
    if !org.org.departments.iter().any(|d| d.id == dept) && dept != 1 {
        return old_err(60003, "部门不存在");
    }
    let members: Vec<&OrgPerson> = org.org.people.iter().filter(|p| p.depts.contains(&dept)).collect();
    let page: Vec<Value> = members.iter().skip(cursor).take(size).map(|p| person_json(p)).collect();
    let more = cursor + page.len() < members.len();
    let mut result = json!({"has_more": more, "list": page});
    if more {
        result["next_cursor"] = json!(cursor + size);
    }
    reply(StatusCode::OK, json!({"errcode": 0, "errmsg": "ok", "result": result, "request_id": "sim"}))
}

fn event_json(org: &Org, e: &OrgEvent, viewer: &str) -> Value {
    let name = |u: &str| org.people.iter().find(|p| p.union_id == u).map(|p| p.name.clone()).unwrap_or_default();
    let mut attendees: Vec<Value> = vec![
        json!({"id": e.owner, "displayName": name(&e.owner), "responseStatus": "accepted", "self": e.owner == viewer}),
    ];
    attendees.extend(
        e.attendees
            .iter()
            .map(|a| json!({"id": a, "displayName": name(a), "responseStatus": "needsAction", "self": a == viewer})),
    );
    json!({
        "id": e.id, "summary": e.summary, "description": e.description, "status": "confirmed",
        "start": time_json(e.start_ms), "end": time_json(e.end_ms), "isAllDay": false,
        "organizer": {"id": e.owner, "displayName": name(&e.owner), "self": e.owner == viewer},
        "attendees": attendees, "location": {"displayName": e.location},
        "createTime": "2026-11-30T09:00:00Z", "updateTime": "2026-11-30T09:00:00Z",
    })
}

/// The create and patch answers have no `status` (DingTalk's CreateEvent/PatchEvent models).
fn drop_status(event: &mut Value) {
    if let Some(o) = event.as_object_mut() {
        o.remove("status");
    }
}

fn list_events(org: &OrgState, owner: &str, q: &str) -> Resp {
    let (Some(min), Some(max)) = (query(q, "timeMin"), query(q, "timeMax")) else {
        return bad("invalidParameter.timeMin", "timeMin and timeMax are required");
    };
    let (Ok(min), Ok(max)) = (when::parse(&min, 480), when::parse(&max, 480)) else {
        return bad("invalidParameter.timeMin", "timeMin/timeMax must be ISO-8601");
    };
    let start: usize = query(q, "nextToken").and_then(|t| t.parse().ok()).unwrap_or(0);
    let size: usize = query(q, "maxResults").and_then(|t| t.parse().ok()).unwrap_or(100).clamp(1, 100);
    let mut mine: Vec<&OrgEvent> = org
        .org
        .events
        .iter()
        .filter(|e| (e.owner == owner || e.attendees.iter().any(|a| a == owner)) && e.start_ms < max && e.end_ms > min)
        .collect();
    mine.sort_by_key(|e| e.start_ms);
    let page: Vec<Value> = mine.iter().skip(start).take(size).map(|e| event_json(&org.org, e, owner)).collect();
    let mut out = json!({"events": page});
    if start + size < mine.len() {
        out["nextToken"] = json!((start + size).to_string());
    }
    reply(StatusCode::OK, out)
}

fn create_event(org: &mut OrgState, owner: &str, body: &Value) -> Resp {
    let (Some(start), Some(end)) = (ms_of(&body["start"]), ms_of(&body["end"])) else {
        return bad("invalidParameter.start", "start and end need a dateTime");
    };
    if end <= start {
        return bad("invalidParameter.end", "end must be after start");
    }
    let mut attendees = Vec::new();
    for a in body["attendees"].as_array().into_iter().flatten() {
        let id = a["id"].as_str().unwrap_or_default();
        if !org.org.people.iter().any(|p| p.union_id == id) {
            return bad("invalidParameter.attendees", "an attendee is not a member of this organisation");
        }
        attendees.push(id.to_owned());
    }
    let id = org.id("evt");
    let e = OrgEvent {
        id,
        owner: owner.to_owned(),
        summary: body["summary"].as_str().unwrap_or_default().to_owned(),
        description: body["description"].as_str().unwrap_or_default().to_owned(),
        location: body["location"]["displayName"].as_str().unwrap_or_default().to_owned(),
        start_ms: start,
        end_ms: end,
        attendees,
    };
    let mut out = event_json(&org.org, &e, owner);
    drop_status(&mut out);
    org.org.events.push(e);
    reply(StatusCode::OK, out)
}

fn one_event(org: &mut OrgState, owner: &str, id: &str, method: &str, body: &Value) -> Resp {
    let Some(i) =
        org.org.events.iter().position(|e| {
            e.id == id && (e.owner == owner || (method == "GET" && e.attendees.iter().any(|a| a == owner)))
        })
    else {
        return err(StatusCode::NOT_FOUND, "eventNotFound", "the event does not exist in this calendar");
    };
    match method {
        "GET" => reply(StatusCode::OK, event_json(&org.org, &org.org.events[i], owner)),
        "DELETE" => {
            org.org.events.remove(i);
            reply(StatusCode::OK, json!({}))
        }
        _ => {
            if let (Some(s), Some(e)) = (ms_of(&body["start"]), ms_of(&body["end"])) {
                if e <= s {
                    return bad("invalidParameter.end", "end must be after start");
                }
                org.org.events[i].start_ms = s;
                org.org.events[i].end_ms = e;
            }
            if let Some(t) = body["summary"].as_str() {
                org.org.events[i].summary = t.to_owned();
            }
            let mut out = event_json(&org.org, &org.org.events[i], owner);
            drop_status(&mut out);
            reply(StatusCode::OK, out)
        }
    }
}

fn schedule(org: &OrgState, body: &Value) -> Resp {
    let (Some(from), Some(to)) = (
        body["startTime"].as_str().and_then(|s| when::parse(s, 480).ok()),
        body["endTime"].as_str().and_then(|s| when::parse(s, 480).ok()),
    ) else {
        return bad("invalidParameter.startTime", "startTime and endTime are required");
    };
    let infos: Vec<Value> = body["userIds"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|u| {
            if !org.org.people.iter().any(|p| p.union_id == u) {
                return json!({"userId": u, "error": "user not found", "scheduleItems": []});
            }
            let items: Vec<Value> = org
                .org
                .events
                .iter()
                .filter(|e| (e.owner == u || e.attendees.iter().any(|a| a == u)) && e.start_ms < to && e.end_ms > from)
                .map(|e| json!({"status": "BUSY", "start": time_json(e.start_ms), "end": time_json(e.end_ms)}))
                .collect();
            json!({"userId": u, "scheduleItems": items})
        })
        .collect();
    reply(StatusCode::OK, json!({"scheduleInformation": infos}))
}

fn create_todo(org: &mut OrgState, owner: &str, body: &Value) -> Resp {
    let subject = body["subject"].as_str().unwrap_or_default();
    if subject.is_empty() {
        return bad("invalidParameter.subject", "subject is required");
    }
    let executors: Vec<String> =
        body["executorIds"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    if executors.iter().any(|x| !org.org.people.iter().any(|p| &p.union_id == x)) {
        return bad("invalidParameter.executorIds", "an executor is not a member of this organisation");
    }
    let id = org.id("todo");
    let t = OrgTodo {
        id: id.clone(),
        creator: owner.to_owned(),
        executors: executors.clone(),
        subject: subject.to_owned(),
        description: body["description"].as_str().unwrap_or_default().to_owned(),
        due_ms: body["dueTime"].as_i64(),
        priority: body["priority"].as_i64().unwrap_or(20),
        done: false,
    };
    org.org.todos.push(t);
    reply(
        StatusCode::OK,
        json!({"id": id, "subject": subject, "creatorId": owner, "executorIds": executors,
        "dueTime": body["dueTime"], "priority": body["priority"], "done": false, "createdTime": super::now_ms(), "requestId": "sim"}),
    )
}

fn one_todo(org: &mut OrgState, owner: &str, id: &str, method: &Method, body: &Value) -> Resp {
    let Some(i) =
        org.org.todos.iter().position(|t| t.id == id && (t.creator == owner || t.executors.iter().any(|x| x == owner)))
    else {
        return err(StatusCode::NOT_FOUND, "todoNotFound", "the to-do does not exist");
    };
    if method == Method::DELETE {
        org.org.todos.remove(i);
        return reply(StatusCode::OK, json!({"result": true, "requestId": "sim"}));
    }
    if let Some(d) = body["done"].as_bool() {
        org.org.todos[i].done = d;
    }
    if let Some(s) = body["subject"].as_str() {
        org.org.todos[i].subject = s.to_owned();
    }
    reply(StatusCode::OK, json!({"result": true}))
}

fn query_todos(org: &OrgState, owner: &str, body: &Value) -> Resp {
    let done = body["isDone"].as_bool().unwrap_or(false);
    let start: usize = body["nextToken"].as_str().and_then(|t| t.parse().ok()).unwrap_or(0);
    let mine: Vec<&OrgTodo> = org
        .org
        .todos
        .iter()
        .filter(|t| t.done == done && (t.executors.iter().any(|x| x == owner) || t.creator == owner))
        .collect();
    const PAGE: usize = 20;
    let cards: Vec<Value> = mine
        .iter()
        .skip(start)
        .take(PAGE)
        .map(|t| {
            json!({
                "taskId": t.id, "subject": t.subject, "dueTime": t.due_ms, "priority": t.priority, "isDone": t.done,
                "creatorId": t.creator, "createdTime": 0, "modifiedTime": 0, "todoType": "TODO",
            })
        })
        .collect();
    let mut out = json!({"todoCards": cards});
    if start + PAGE < mine.len() {
        out["nextToken"] = json!((start + PAGE).to_string());
    }
    reply(StatusCode::OK, out)
}

/// `multipart/form-data` with a `media` file part: the file name and bytes.
fn multipart_file(body: &[u8]) -> Option<(String, Vec<u8>)> {
    let first_line = body.split(|b| *b == b'\n').next()?;
    let boundary = std::str::from_utf8(first_line).ok()?.trim_end_matches('\r').to_owned();
    let head_end = body.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&body[..head_end]).ok()?;
    if !head.contains("name=\"media\"") {
        return None;
    }
    let name = head.split("filename=\"").nth(1)?.split('"').next()?.to_owned();
    let rest = &body[head_end + 4..];
    let close = format!("\r\n{boundary}");
    let end = rest.windows(close.len()).position(|w| w == close.as_bytes())?;
    Some((name, rest[..end].to_vec()))
}

fn upload(org: &mut OrgState, q: &str, body: &[u8]) -> Resp {
    if !matches!(query(q, "type").as_deref(), Some("image" | "voice" | "video" | "file")) {
        return old_err(40004, "不合法的媒体文件类型");
    }
    let Some((file_name, bytes)) = multipart_file(body) else {
        return old_err(40005, "缺少media参数");
    };
    if bytes.is_empty() || bytes.len() > 20 * 1024 * 1024 {
        return old_err(40006, "不合法的文件大小");
    }
    let media_id = format!("@lA{}", org.id("media"));
    org.org.uploads.push(OrgUpload { media_id: media_id.clone(), file_name, bytes });
    reply(
        StatusCode::OK,
        json!({"errcode": 0, "errmsg": "ok", "media_id": media_id, "type": "file", "created_at": super::now_ms()}),
    )
}

impl OrgState {
    pub(super) fn deny(&mut self, prefix: &str, scope: &str) {
        self.faults.denied.push((prefix.to_owned(), scope.to_owned()));
    }

    pub(super) fn throttle(&mut self, prefix: &str, n: u32) {
        self.faults.throttled.push((prefix.to_owned(), n));
    }

    pub(super) fn clear_faults(&mut self) {
        self.faults = OrgFaults::default();
    }
}
