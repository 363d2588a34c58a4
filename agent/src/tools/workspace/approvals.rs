//! Approvals (read-only): the approvals waiting for the asker's decision, and one approval the
//! asker takes part in (originator, approver or copied), summarised. An approval the asker has
//! no part in is refused even though the app's token could read it.

use serde_json::Value;

use super::{Outcome, ToolError, Workspace, api_error};
use crate::{
    dingtalk::openapi::{Api, ApiError, Host, Payload},
    tools::Context,
};

pub const PENDING: Api =
    Api { name: "/v1.0/workflow/workRecords/todoTasks", host: Host::New, permission: "Workflow.Instance.Read" };
pub const INSTANCE: Api =
    Api { name: "/v1.0/workflow/processInstances", host: Host::New, permission: "Workflow.Instance.Read" };

fn status_text(status: &str, result: &str) -> String {
    match (status, result) {
        ("COMPLETED", "agree") => "approved".into(),
        ("COMPLETED", "refuse") => "rejected".into(),
        ("RUNNING", _) => "in progress".into(),
        ("TERMINATED", _) => "withdrawn".into(),
        (s, "") => s.to_lowercase(),
        (s, r) => format!("{} ({r})", s.to_lowercase()),
    }
}

pub async fn pending(ws: &Workspace, ctx: &Context) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    let max = ws.settings.max_results.min(50).to_string();
    let mut items: Vec<Value> = Vec::new();
    let mut next = "0".to_owned();
    for _ in 0..10 {
        // `status` 0: the records waiting for the user (required by DingTalk's request model).
        let query = [
            ("userId", me.staff_id.as_str()),
            ("status", "0"),
            ("maxResults", max.as_str()),
            ("nextToken", next.as_str()),
        ];
        let v = ws
            .api
            .request(&PENDING, http::Method::GET, PENDING.name, &query, Payload::None)
            .await
            .map_err(api_error)?;
        items.extend(v["result"]["list"].as_array().cloned().unwrap_or_default());
        match v["result"]["nextToken"]
            .as_i64()
            .map(|n| n.to_string())
            .or_else(|| v["result"]["nextToken"].as_str().map(str::to_owned))
        {
            Some(n) if !n.is_empty() && n != next && items.len() < ws.settings.max_results => next = n,
            _ => break,
        }
    }
    if items.is_empty() {
        return Ok(Outcome::text("no approvals are waiting for the asker"));
    }
    let mut text = format!("{} approval(s) waiting for the asker's decision:\n", items.len());
    for i in items.iter().take(ws.settings.max_results) {
        let forms: Vec<String> = i["forms"]
            .as_array()
            .into_iter()
            .flatten()
            .take(4)
            .map(|f| {
                format!("{}: {}", f["title"].as_str().unwrap_or_default(), f["content"].as_str().unwrap_or_default())
            })
            .collect();
        text.push_str(&format!(
            "- {} (approval id {}){}\n",
            i["title"].as_str().unwrap_or("(untitled)"),
            i["instanceId"].as_str().unwrap_or_default(),
            if forms.is_empty() { String::new() } else { format!(" — {}", forms.join("; ")) }
        ));
    }
    Ok(Outcome::text(text))
}

pub async fn show(ws: &Workspace, ctx: &Context, id: &str) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    let v = ws
        .api
        .request(&INSTANCE, http::Method::GET, INSTANCE.name, &[("processInstanceId", id)], Payload::None)
        .await
        .map_err(|e| match e {
            ApiError::Refused { .. } => ToolError::Refused(format!(
                "there is no approval `{}`; list the pending approvals to find its id",
                id.chars().take(64).collect::<String>()
            )),
            e => api_error(e),
        })?;
    let r = &v["result"];
    let ids = |k: &str| -> Vec<String> {
        r[k].as_array().into_iter().flatten().filter_map(|x| x.as_str().map(str::to_owned)).collect()
    };
    let task_users: Vec<String> =
        r["tasks"].as_array().into_iter().flatten().filter_map(|t| t["userId"].as_str().map(str::to_owned)).collect();
    let originator = r["originatorUserId"].as_str().unwrap_or_default();
    let involved = originator == me.staff_id
        || task_users.contains(&me.staff_id)
        || ids("approverUserIds").contains(&me.staff_id)
        || ids("ccUserIds").contains(&me.staff_id);
    if !involved {
        return Err(ToolError::Refused(
            "the asker takes no part in that approval (not its originator, an approver or copied), so I do not show it"
                .into(),
        ));
    }
    let name_of = async |staff: &str| match ws.people.person(staff).await {
        Ok(p) => p.name,
        Err(_) => staff.to_owned(),
    };
    let mut text = format!(
        "“{}” — {}\nfrom {}",
        r["title"].as_str().unwrap_or("(untitled)"),
        status_text(r["status"].as_str().unwrap_or_default(), r["result"].as_str().unwrap_or_default()),
        name_of(originator).await
    );
    if let Some(dept) = r["originatorDeptName"].as_str().filter(|d| !d.is_empty()) {
        text.push_str(&format!(" ({dept})"));
    }
    if let Some(created) = r["createTime"].as_str() {
        text.push_str(&format!(", submitted {created}"));
    }
    text.push('\n');
    for f in r["formComponentValues"].as_array().into_iter().flatten().take(30) {
        let value = f["value"].as_str().unwrap_or_default();
        if !value.is_empty() {
            text.push_str(&format!(
                "- {}: {}\n",
                f["name"].as_str().unwrap_or("field"),
                value.chars().take(300).collect::<String>()
            ));
        }
    }
    for t in r["tasks"].as_array().into_iter().flatten().take(20) {
        let who = name_of(t["userId"].as_str().unwrap_or_default()).await;
        text.push_str(&format!(
            "- step: {who} — {}\n",
            status_text(t["status"].as_str().unwrap_or_default(), t["result"].as_str().unwrap_or_default())
        ));
    }
    Ok(Outcome::text(text))
}
