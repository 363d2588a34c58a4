//! The github tools: issues and pull requests of the repositories `[tools.github] repos` grants,
//! comments, new issues and a notifications summary, over GitHub's REST API with the box's
//! token (a sealed credential). Any other repository is refused before a call is made.
//!
//! The token is the box's, so GitHub shows the box's account as the author; the audit trail
//! records who asked. Comments and new issues are `write` (confirmed in chat) and undoable:
//! a comment is deleted, a new issue closed as not planned (GitHub cannot delete issues).
//! Never logs or audits titles, bodies or comments; the audit target is `owner/repo#number`.

pub mod client;

use std::sync::Arc;

use http::Method;
use rust_i18n::t;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{BoxFuture, Context, Outcome, Risk, Tool, ToolError};
use crate::{dingtalk::settings::Millis, secret::Secret};
use client::{Github, GithubError};

/// `[tools.github]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GithubSettings {
    /// GitHub's REST API (GitHub Enterprise Server: `https://HOST/api/v3`).
    pub api_base: String,
    /// A fine-grained personal access token (or a GitHub App installation token); on the box a
    /// credential reference. Without one the github tools are not offered.
    pub token: Option<Secret>,
    /// The repositories the tools may touch: `owner/name`, or `owner/*` for all of an owner's.
    pub repos: Vec<String>,
    /// Items a listing returns at most.
    pub max_results: usize,
    /// Time limit of one call to GitHub.
    pub timeout_ms: Millis,
}

impl Default for GithubSettings {
    fn default() -> Self {
        GithubSettings {
            api_base: "https://api.github.com".into(),
            token: None,
            repos: Vec::new(),
            max_results: 30,
            timeout_ms: Millis::from_ms(15_000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("[tools.github] {0}")]
pub struct GithubSettingsError(String);

fn repo_name_ok(part: &str) -> bool {
    !part.is_empty()
        && part.len() <= 100
        && part != "."
        && part != ".."
        && part.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// What the github tools share.
pub struct GithubTools {
    pub api: Github,
    repos: Vec<String>,
    max_results: usize,
    offset_minutes: i32,
}

impl GithubTools {
    /// `None` when no token is configured (the tools are then not offered).
    pub fn new(settings: &GithubSettings, offset_minutes: i32) -> Result<Option<Arc<Self>>, GithubSettingsError> {
        let Some(token) = Self::checked(settings)? else {
            return Ok(None);
        };
        let http =
            crate::dingtalk::http::HttpClient::new(crate::dingtalk::http::tls_config(), settings.timeout_ms.get());
        Ok(Some(Arc::new(GithubTools {
            api: Github::new(http, &settings.api_base, token, offset_minutes),
            repos: settings.repos.iter().map(|r| r.to_ascii_lowercase()).collect(),
            max_results: settings.max_results,
            offset_minutes,
        })))
    }

    /// The names of the tools these settings offer (none without a token).
    pub fn tool_names(settings: &GithubSettings) -> Result<Vec<&'static str>, GithubSettingsError> {
        Ok(match Self::checked(settings)? {
            Some(_) => OPS.into_iter().map(Op::name).collect(),
            None => Vec::new(),
        })
    }

    /// The settings checked; the token, or `None` when there is none.
    fn checked(settings: &GithubSettings) -> Result<Option<Secret>, GithubSettingsError> {
        let Some(token) = settings.token.clone().filter(|t| !t.is_empty()) else {
            return Ok(None);
        };
        crate::dingtalk::settings::check_url(&settings.api_base, "https", "http")
            .map_err(|e| GithubSettingsError(format!("api_base: {e}")))?;
        if settings.repos.is_empty() {
            return Err(GithubSettingsError(
                "repos is empty: list the repositories the assistant may use, like [\"acme/website\"]".into(),
            ));
        }
        for r in &settings.repos {
            let ok = r.split_once('/').is_some_and(|(o, n)| repo_name_ok(o) && (n == "*" || repo_name_ok(n)));
            if !ok {
                return Err(GithubSettingsError(format!(
                    "repos: {r:?} is not a repository; write owner/name or owner/*"
                )));
            }
        }
        if settings.max_results == 0 {
            return Err(GithubSettingsError("max_results must be at least 1".into()));
        }
        Ok(Some(token))
    }

    /// For `zhuli doctor`: is the token accepted, and how much of the hour's limit is left
    /// (`/rate_limit` does not count against it).
    pub async fn check(&self) -> Result<String, String> {
        let v = self.api.json(Method::GET, "/rate_limit", None).await.map_err(|e| e.to_string())?;
        let core = &v["resources"]["core"];
        Ok(format!(
            "GitHub token accepted, {} of {} calls left this hour",
            core["remaining"].as_u64().unwrap_or(0),
            core["limit"].as_u64().unwrap_or(0)
        ))
    }

    /// `owner/name` if the configuration grants it.
    fn repo(&self, args: &Value) -> Result<String, ToolError> {
        let r = args["repo"].as_str().unwrap_or_default().trim().trim_end_matches(".git");
        let valid = r.split_once('/').is_some_and(|(o, n)| repo_name_ok(o) && repo_name_ok(n));
        let granted = valid && self.granted_full_name(r);
        if !granted {
            return Err(ToolError::Refused(format!(
                "repository {r:?} is not one the assistant may use; granted: {}",
                self.repos.join(", ")
            )));
        }
        Ok(r.to_owned())
    }

    fn granted_full_name(&self, full: &str) -> bool {
        let lower = full.to_ascii_lowercase();
        self.repos.iter().any(|g| {
            g == &lower
                || g.strip_suffix("/*").is_some_and(|owner| lower.split_once('/').is_some_and(|(o, _)| o == owner))
        })
    }

    fn when(&self, v: &Value) -> String {
        v.as_str()
            .and_then(|t| crate::tools::when::parse(t, 0).ok())
            .map(|ms| crate::tools::when::local(ms, self.offset_minutes))
            .unwrap_or_else(|| "?".into())
    }
}

fn github_error(e: GithubError) -> ToolError {
    match e {
        e @ (GithubError::BadToken { .. } | GithubError::Forbidden { .. }) => ToolError::NeedsAdmin(e.to_string()),
        e @ (GithubError::NotFound { .. } | GithubError::Invalid { .. }) => ToolError::Refused(e.to_string()),
        e => ToolError::Failed(e.to_string()),
    }
}

fn number(args: &Value) -> Result<u64, ToolError> {
    args["number"]
        .as_u64()
        .filter(|n| *n > 0)
        .ok_or_else(|| ToolError::Refused("`number` must be a positive whole number".into()))
}

use crate::tools::str_arg as s;

fn clip(text: &str, max: usize) -> String {
    let mut out: String = text.chars().take(max).collect();
    if text.chars().count() > max {
        out.push_str(" …");
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Show,
    Comment,
    CreateIssue,
    Notifications,
}

impl Op {
    /// The tool's name, as the model and the grants in `[access.roles]` see it.
    pub fn name(self) -> &'static str {
        match self {
            Op::List => "github_list",
            Op::Show => "github_show",
            Op::Comment => "github_comment",
            Op::CreateIssue => "github_create_issue",
            Op::Notifications => "github_notifications",
        }
    }
}

pub struct GithubTool {
    op: Op,
    gh: Arc<GithubTools>,
    parameters: Value,
}

const OPS: [Op; 5] = [Op::List, Op::Show, Op::Comment, Op::CreateIssue, Op::Notifications];

pub fn tools(gh: &Arc<GithubTools>) -> Vec<Arc<dyn Tool>> {
    OPS.into_iter().map(|op| Arc::new(GithubTool::new(op, gh.clone())) as Arc<dyn Tool>).collect()
}

impl GithubTool {
    pub fn new(op: Op, gh: Arc<GithubTools>) -> Self {
        let string = |d: &str| json!({"type": "string", "description": d});
        let repo = string("owner/name of a granted repository");
        let object = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
        let parameters = match op {
            Op::List => object(
                json!({
                    "repo": repo,
                    "kind": {"type": "string", "enum": ["issues", "pulls"], "description": "issues (default) or pull requests"},
                    "state": {"type": "string", "enum": ["open", "closed", "all"]},
                    "label": string("only items with this label"),
                }),
                &["repo"],
            ),
            Op::Show => object(
                json!({"repo": repo, "number": {"type": "integer", "minimum": 1, "description": "issue or pull request number"}}),
                &["repo", "number"],
            ),
            Op::Comment => object(
                json!({"repo": repo, "number": {"type": "integer", "minimum": 1}, "body": string("the comment, Markdown")}),
                &["repo", "number", "body"],
            ),
            Op::CreateIssue => object(
                json!({
                    "repo": repo,
                    "title": string("the issue's title"),
                    "body": string("the issue's text, Markdown"),
                    "labels": {"type": "array", "items": {"type": "string"}},
                }),
                &["repo", "title"],
            ),
            Op::Notifications => {
                object(json!({"all": {"type": "boolean", "description": "include ones already read"}}), &[])
            }
        };
        GithubTool { op, gh, parameters }
    }
}

impl Tool for GithubTool {
    fn name(&self) -> &str {
        self.op.name()
    }

    fn description(&self) -> &str {
        match self.op {
            Op::List => "List issues or pull requests of a GitHub repository (open by default).",
            Op::Show => {
                "Open one GitHub issue or pull request: state, author, text, labels, latest comments; for a pull request its branches and changes."
            }
            Op::Comment => "Comment on a GitHub issue or pull request (asks the user to confirm; undoable).",
            Op::CreateIssue => "Open a new issue in a GitHub repository (asks the user to confirm; undo closes it).",
            Op::Notifications => "Summarise the box's unread GitHub notifications for the granted repositories.",
        }
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        match self.op {
            // What is posted leaves the box for everyone who sees the repository.
            Op::Comment | Op::CreateIssue => Risk::Share,
            _ => Risk::Read,
        }
    }

    fn target(&self, args: &Value) -> String {
        // Repository and number; titles and bodies never (a model may put words anywhere).
        let repo = super::id_or_size(s(args, "repo"));
        let number = args["number"].as_u64().map_or_else(|| "?".to_owned(), |n| n.to_string());
        match self.op {
            Op::List => format!("{repo} {}", super::id_or_size(args["kind"].as_str().unwrap_or("issues"))),
            Op::Show | Op::Comment => format!("{repo}#{number}"),
            Op::CreateIssue => format!("new issue in {repo}"),
            Op::Notifications => "notifications".into(),
        }
        .chars()
        .take(160)
        .collect()
    }

    fn question(&self, args: &Value) -> String {
        match self.op {
            Op::Comment => {
                let issue = format!("{}#{}", s(args, "repo"), args["number"]);
                t!("question.github_comment", issue = issue, body = clip(s(args, "body"), 200)).into_owned()
            }
            Op::CreateIssue => {
                t!("question.github_issue", repo = s(args, "repo"), title = clip(s(args, "title"), 200)).into_owned()
            }
            _ => self.target(args),
        }
    }

    fn prepare<'a>(&'a self, _ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            if self.op != Op::Notifications {
                self.gh.repo(&args)?;
            }
            if matches!(self.op, Op::Comment) && s(&args, "body").trim().is_empty() {
                return Err(ToolError::Refused("`body` is empty: say what the comment should say".into()));
            }
            if matches!(self.op, Op::CreateIssue) && s(&args, "title").trim().is_empty() {
                return Err(ToolError::Refused("`title` is empty".into()));
            }
            Ok(args)
        })
    }

    fn execute<'a>(&'a self, _ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            match self.op {
                Op::List => self.list(&args).await,
                Op::Show => self.show(&args).await,
                Op::Comment => self.comment(&args).await,
                Op::CreateIssue => self.create(&args).await,
                Op::Notifications => self.notifications(args["all"].as_bool().unwrap_or(false)).await,
            }
        })
    }

    fn undo<'a>(&'a self, _ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let p: Value =
                serde_json::from_slice(payload).map_err(|_| ToolError::Failed("unreadable undo record".into()))?;
            let repo = self.gh.repo(&p)?;
            match p["kind"].as_str() {
                Some("comment") => {
                    let id = p["id"].as_u64().ok_or_else(|| ToolError::Failed("unreadable undo record".into()))?;
                    self.gh
                        .api
                        .call(Method::DELETE, &format!("/repos/{repo}/issues/comments/{id}"), None)
                        .await
                        .map_err(github_error)?;
                    Ok(t!("undo.github_comment", issue = format!("{repo}#{}", p["number"])).into_owned())
                }
                Some("issue") => {
                    let n = p["number"].as_u64().ok_or_else(|| ToolError::Failed("unreadable undo record".into()))?;
                    let body = json!({"state": "closed", "state_reason": "not_planned"});
                    self.gh
                        .api
                        .json(Method::PATCH, &format!("/repos/{repo}/issues/{n}"), Some(&body))
                        .await
                        .map_err(github_error)?;
                    Ok(t!("undo.github_issue", issue = format!("{repo}#{n}")).into_owned())
                }
                _ => Err(ToolError::Failed("unreadable undo record".into())),
            }
        })
    }
}

impl GithubTool {
    fn line(&self, item: &Value) -> String {
        let labels: Vec<&str> =
            item["labels"].as_array().into_iter().flatten().filter_map(|l| l["name"].as_str()).collect();
        let labels = if labels.is_empty() { String::new() } else { format!(" [{}]", labels.join(", ")) };
        let draft = if item["draft"].as_bool() == Some(true) { " draft" } else { "" };
        format!(
            "#{} ({}{draft}) {} — by {}, updated {}, {} comments{labels}",
            item["number"],
            s(item, "state"),
            clip(s(item, "title"), 160),
            s(&item["user"], "login"),
            self.gh.when(&item["updated_at"]),
            item["comments"].as_u64().unwrap_or(0),
        )
    }

    async fn list(&self, args: &Value) -> Result<Outcome, ToolError> {
        let repo = self.gh.repo(args)?;
        let pulls = args["kind"].as_str() == Some("pulls");
        let state = args["state"].as_str().unwrap_or("open");
        if !["open", "closed", "all"].contains(&state) {
            return Err(ToolError::Refused("`state` is open, closed or all".into()));
        }
        let per_page = self.gh.max_results.min(100);
        let mut path =
            format!("/repos/{repo}/{}?state={state}&per_page={per_page}", if pulls { "pulls" } else { "issues" });
        if let Some(label) = args["label"].as_str().filter(|l| !l.is_empty() && !pulls) {
            path.push_str(&format!("&labels={}", crate::dingtalk::openapi::encode(label)));
        }
        // The issues endpoint lists pull requests too; they carry a `pull_request` key.
        let (items, more) = self
            .gh
            .api
            .list(&path, self.gh.max_results, |i| pulls || i.get("pull_request").is_none())
            .await
            .map_err(github_error)?;
        let what = if pulls { "pull requests" } else { "issues" };
        let which = if state == "all" { "open and closed" } else { state };
        if items.is_empty() {
            return Ok(Outcome::text(format!("no {what} ({which}) in {repo}")));
        }
        let mut text = format!("{} {what} ({which}) in {repo}:\n", items.len());
        for item in &items {
            text.push_str(&self.line(item));
            text.push('\n');
        }
        if more {
            text.push_str(&format!("(more than {}; narrow it with a label or state)\n", items.len()));
        }
        Ok(Outcome::text(text))
    }

    async fn show(&self, args: &Value) -> Result<Outcome, ToolError> {
        let repo = self.gh.repo(args)?;
        let n = number(args)?;
        let api = &self.gh.api;
        let issue = api.json(Method::GET, &format!("/repos/{repo}/issues/{n}"), None).await.map_err(github_error)?;
        let mut text = self.line(&issue);
        text.push('\n');
        if !issue["assignees"].as_array().is_none_or(|a| a.is_empty()) {
            let who: Vec<&str> =
                issue["assignees"].as_array().into_iter().flatten().filter_map(|a| a["login"].as_str()).collect();
            text.push_str(&format!("assigned to {}\n", who.join(", ")));
        }
        text.push_str(&format!("{}\n", s(&issue, "html_url")));
        if issue.get("pull_request").is_some() {
            let pr = api.json(Method::GET, &format!("/repos/{repo}/pulls/{n}"), None).await.map_err(github_error)?;
            let merged = if pr["merged"].as_bool() == Some(true) { "merged" } else { "not merged" };
            let mergeable = match pr["mergeable"].as_bool() {
                Some(true) => ", mergeable",
                Some(false) => ", has conflicts",
                None => "",
            };
            text.push_str(&format!(
                "pull request {} → {}: {merged}{mergeable}; {} files changed, +{} −{}, {} commits\n",
                s(&pr["head"], "ref"),
                s(&pr["base"], "ref"),
                pr["changed_files"].as_u64().unwrap_or(0),
                pr["additions"].as_u64().unwrap_or(0),
                pr["deletions"].as_u64().unwrap_or(0),
                pr["commits"].as_u64().unwrap_or(0),
            ));
        }
        let body = s(&issue, "body");
        if !body.is_empty() {
            text.push_str(&format!("\n{}\n", clip(body, 2000)));
        }
        let total = issue["comments"].as_u64().unwrap_or(0);
        if total > 0 {
            // The latest five comments: the last page, and the one before when the last is short
            // (comments come oldest first).
            let per = 5u64;
            let last = total.div_ceil(per);
            let mut latest = Vec::new();
            for p in [last.saturating_sub(1), last] {
                if p == 0 || (p < last && total % per == 0) {
                    continue;
                }
                let page = api
                    .page(&format!("/repos/{repo}/issues/{n}/comments?per_page={per}&page={p}"))
                    .await
                    .map_err(github_error)?;
                latest.extend(page.items);
            }
            text.push_str(&format!("\nlatest of {total} comments:\n"));
            let skip = latest.len().saturating_sub(5);
            for c in latest.iter().skip(skip) {
                text.push_str(&format!(
                    "- {} ({}): {}\n",
                    s(&c["user"], "login"),
                    self.gh.when(&c["created_at"]),
                    clip(s(c, "body"), 400)
                ));
            }
        }
        Ok(Outcome::text(text))
    }

    async fn comment(&self, args: &Value) -> Result<Outcome, ToolError> {
        let repo = self.gh.repo(args)?;
        let n = number(args)?;
        let body = json!({"body": s(args, "body")});
        let made = self
            .gh
            .api
            .json(Method::POST, &format!("/repos/{repo}/issues/{n}/comments"), Some(&body))
            .await
            .map_err(github_error)?;
        let id =
            made["id"].as_u64().ok_or_else(|| ToolError::Failed("GitHub did not say which comment it made".into()))?;
        let undo = json!({"kind": "comment", "repo": repo, "number": n, "id": id});
        Ok(Outcome {
            text: format!("commented on {repo}#{n}: {}", s(&made, "html_url")),
            undo: Some((undo.to_string().into_bytes(), format!("delete the comment on {repo}#{n}"))),
        })
    }

    async fn create(&self, args: &Value) -> Result<Outcome, ToolError> {
        let repo = self.gh.repo(args)?;
        let mut body = json!({"title": s(args, "title")});
        if let Some(b) = args["body"].as_str() {
            body["body"] = json!(b);
        }
        if let Some(labels) = args["labels"].as_array().filter(|l| !l.is_empty()) {
            body["labels"] = json!(labels);
        }
        let made = self
            .gh
            .api
            .json(Method::POST, &format!("/repos/{repo}/issues"), Some(&body))
            .await
            .map_err(github_error)?;
        let n = made["number"]
            .as_u64()
            .ok_or_else(|| ToolError::Failed("GitHub did not say which issue it opened".into()))?;
        let undo = json!({"kind": "issue", "repo": repo, "number": n});
        Ok(Outcome {
            text: format!("opened {repo}#{n}: {}", s(&made, "html_url")),
            undo: Some((undo.to_string().into_bytes(), format!("close {repo}#{n}"))),
        })
    }

    async fn notifications(&self, all: bool) -> Result<Outcome, ToolError> {
        let path = format!("/notifications?all={all}&per_page=50");
        let gh = &self.gh;
        let (items, more) = gh
            .api
            .list(&path, gh.max_results, |n| gh.granted_full_name(s(&n["repository"], "full_name")))
            .await
            .map_err(github_error)?;
        if items.is_empty() {
            return Ok(Outcome::text(if all { "no notifications" } else { "no unread notifications" }));
        }
        let mut by_repo: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
        for n in &items {
            let kind = match s(&n["subject"], "type") {
                "PullRequest" => "pull request",
                "Issue" => "issue",
                "Release" => "release",
                "Discussion" => "discussion",
                other => other,
            };
            let reason = s(n, "reason").replace('_', " ");
            by_repo.entry(s(&n["repository"], "full_name")).or_default().push(format!(
                "- {kind}: {} ({reason}, {})",
                clip(s(&n["subject"], "title"), 160),
                gh.when(&n["updated_at"])
            ));
        }
        let mut text = format!("{} {}notifications:\n", items.len(), if all { "" } else { "unread " });
        for (repo, lines) in by_repo {
            text.push_str(&format!("{repo} ({}):\n{}\n", lines.len(), lines.join("\n")));
        }
        if more {
            text.push_str("(more not shown)\n");
        }
        Ok(Outcome::text(text))
    }
}
