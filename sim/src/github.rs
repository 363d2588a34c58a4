//! A loopback GitHub REST server for tests and benchmarks: the endpoints the github tools call,
//! answering with the response shapes GitHub documents (issues, pulls, comments,
//! notifications), `Link` pagination, the `x-ratelimit-*` headers on every answer, a primary
//! limit that runs out, secondary limits with `retry-after`, and `401 Bad credentials`.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct Comment {
    pub id: u64,
    pub user: String,
    pub body: String,
    pub created_at: String,
}

#[derive(Debug, Clone)]
pub struct Issue {
    pub number: u64,
    pub title: String,
    pub body: String,
    pub user: String,
    pub state: String,
    pub state_reason: Option<String>,
    pub labels: Vec<String>,
    /// `Some((head, base))` for a pull request.
    pub pull: Option<(String, String)>,
    pub comments: Vec<Comment>,
    pub updated_at: String,
}

#[derive(Debug, Default)]
pub struct GithubState {
    pub token: String,
    /// By `owner/name`.
    pub repos: BTreeMap<String, Vec<Issue>>,
    pub notifications: Vec<Value>,
    pub limit: u64,
    pub remaining: u64,
    /// Epoch seconds.
    pub reset: i64,
    /// The next requests answered with a secondary limit, `retry-after` seconds each.
    pub secondary: VecDeque<u64>,
    /// Method and path with query of every request.
    pub requests: Vec<(Method, String)>,
    /// The login comments and issues are made as.
    pub login: String,
    next_id: u64,
}

pub struct GithubSim {
    addr: SocketAddr,
    state: Arc<Mutex<GithubState>>,
    cancel: CancellationToken,
}

impl Drop for GithubSim {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

type Body = Full<Bytes>;

fn stamp(i: u64) -> String {
    format!("2026-11-{:02}T{:02}:00:00Z", 1 + (i % 28), i % 24)
}

impl GithubSim {
    pub async fn start(token: &str) -> std::io::Result<GithubSim> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let reset = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
            as i64
            + 3600;
        let state = Arc::new(Mutex::new(GithubState {
            token: token.to_owned(),
            limit: 5000,
            remaining: 5000,
            reset,
            login: "zhuli-bot".into(),
            next_id: 1000,
            ..Default::default()
        }));
        let cancel = CancellationToken::new();
        let st = state.clone();
        crate::serve::spawn(listener, cancel.clone(), move |req| handle(st.clone(), addr, req));
        Ok(GithubSim { addr, state, cancel })
    }

    /// `[tools.github] api_base`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> std::sync::MutexGuard<'_, GithubState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A repository with `issues` issues and `pulls` pull requests (numbers 1.., pulls after
    /// issues), some labelled `bug`, each issue with `i % 7` comments.
    pub fn seed_repo(&self, repo: &str, issues: u64, pulls: u64) {
        let mut st = self.state();
        let mut list = Vec::new();
        for n in 1..=issues + pulls {
            let pull = (n > issues).then(|| (format!("feature-{n}"), "main".to_owned()));
            let comments = (0..n % 7)
                .map(|c| Comment {
                    id: n * 100 + c,
                    user: format!("user{c}"),
                    body: format!("comment {c} on {n}"),
                    created_at: stamp(n + c),
                })
                .collect();
            list.push(Issue {
                number: n,
                title: if pull.is_some() { format!("Pull request {n}") } else { format!("Issue {n}") },
                body: format!("Text of {n}."),
                user: "octocat".into(),
                state: if n % 5 == 0 { "closed".into() } else { "open".into() },
                state_reason: None,
                labels: if n % 3 == 0 { vec!["bug".into()] } else { vec![] },
                pull,
                comments,
                updated_at: stamp(n),
            });
        }
        st.repos.insert(repo.to_owned(), list);
    }

    pub fn add_notification(&self, repo: &str, kind: &str, title: &str, reason: &str, unread: bool) {
        let mut st = self.state();
        let id = st.notifications.len() + 1;
        st.notifications.push(json!({
            "id": id.to_string(),
            "repository": {"full_name": repo, "name": repo.split('/').nth(1), "owner": {"login": repo.split('/').next()}},
            "subject": {"title": title, "type": kind, "url": format!("https://api.github.com/repos/{repo}/issues/{id}")},
            "reason": reason,
            "unread": unread,
            "updated_at": stamp(id as u64),
            "last_read_at": null,
            "url": format!("https://api.github.com/notifications/threads/{id}"),
        }));
    }

    pub fn issue(&self, repo: &str, number: u64) -> Option<Issue> {
        self.state().repos.get(repo)?.iter().find(|i| i.number == number).cloned()
    }

    pub fn requests(&self) -> Vec<(Method, String)> {
        self.state().requests.clone()
    }
}

fn user(login: &str) -> Value {
    json!({"login": login, "id": login.len(), "type": "User", "html_url": format!("https://github.com/{login}")})
}

fn issue_json(repo: &str, i: &Issue) -> Value {
    let mut v = json!({
        "id": i.number + 10_000,
        "number": i.number,
        "title": i.title,
        "body": i.body,
        "user": user(&i.user),
        "state": i.state,
        "state_reason": i.state_reason,
        "labels": i.labels.iter().map(|l| json!({"name": l, "color": "d73a4a"})).collect::<Vec<_>>(),
        "assignees": [],
        "comments": i.comments.len(),
        "created_at": stamp(i.number),
        "updated_at": i.updated_at,
        "closed_at": null,
        "html_url": format!("https://github.com/{repo}/issues/{}", i.number),
        "url": format!("https://api.github.com/repos/{repo}/issues/{}", i.number),
    });
    if i.pull.is_some() {
        v["pull_request"] =
            json!({"url": format!("https://api.github.com/repos/{repo}/pulls/{}", i.number), "merged_at": null});
        v["draft"] = json!(false);
    }
    v
}

fn pull_json(repo: &str, i: &Issue) -> Value {
    let (head, base) = i.pull.clone().unwrap_or_default();
    let mut v = issue_json(repo, i);
    if let Some(o) = v.as_object_mut() {
        o.remove("pull_request");
        o.remove("comments");
        o.insert("head".into(), json!({"ref": head, "label": format!("octocat:{head}")}));
        o.insert("base".into(), json!({"ref": base, "label": format!("octocat:{base}")}));
        o.insert("merged".into(), json!(false));
        o.insert("mergeable".into(), json!(true));
        o.insert("commits".into(), json!(i.number % 4 + 1));
        o.insert("additions".into(), json!(i.number * 10));
        o.insert("deletions".into(), json!(i.number));
        o.insert("changed_files".into(), json!(i.number % 3 + 1));
        o.insert("html_url".into(), json!(format!("https://github.com/{repo}/pull/{}", i.number)));
    }
    v
}

fn query(q: &str) -> BTreeMap<String, String> {
    q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), v.replace("%20", " "))).collect()
}

fn not_found() -> (StatusCode, Value) {
    (
        StatusCode::NOT_FOUND,
        json!({"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"}),
    )
}

/// A page of `items` and its `Link` header.
fn paginate(base: &str, path: &str, q: &BTreeMap<String, String>, items: Vec<Value>) -> (Value, Option<String>) {
    let per = q.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(30).clamp(1, 100);
    let page = q.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
    let last = items.len().div_ceil(per).max(1);
    let slice: Vec<Value> = items.into_iter().skip((page - 1) * per).take(per).collect();
    let link_to = |p: usize| {
        let mut q = q.clone();
        q.insert("page".into(), p.to_string());
        let qs: Vec<String> = q.iter().map(|(k, v)| format!("{k}={v}")).collect();
        format!("<{base}{path}?{}>", qs.join("&"))
    };
    let mut links = Vec::new();
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", link_to(page - 1)));
        links.push(format!("{}; rel=\"first\"", link_to(1)));
    }
    if page < last {
        links.push(format!("{}; rel=\"next\"", link_to(page + 1)));
        links.push(format!("{}; rel=\"last\"", link_to(last)));
    }
    (Value::Array(slice), (!links.is_empty()).then(|| links.join(", ")))
}

async fn handle(
    state: Arc<Mutex<GithubState>>,
    addr: SocketAddr,
    req: Request<hyper::body::Incoming>,
) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let q = query(req.uri().query().unwrap_or(""));
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let base = format!("http://{addr}");
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.requests.push((
        method.clone(),
        format!("{path}?{}", q.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")),
    ));

    let respond =
        |st: &GithubState, status: StatusCode, body: Value, link: Option<String>, extra: &[(&str, String)]| {
            let mut r = Response::builder()
                .status(status)
                .header("content-type", "application/json; charset=utf-8")
                .header("x-ratelimit-limit", st.limit.to_string())
                .header("x-ratelimit-remaining", st.remaining.to_string())
                .header("x-ratelimit-used", (st.limit - st.remaining).to_string())
                .header("x-ratelimit-reset", st.reset.to_string())
                .header("x-ratelimit-resource", "core")
                .header("x-github-api-version-selected", "2022-11-28");
            if let Some(l) = link {
                r = r.header("link", l);
            }
            for (k, v) in extra {
                r = r.header(*k, v.as_str());
            }
            let bytes = if body.is_null() { Bytes::new() } else { Bytes::from(body.to_string()) };
            r.body(Full::new(bytes)).expect("valid response")
        };

    if auth != format!("Bearer {}", st.token) {
        return respond(
            &st,
            StatusCode::UNAUTHORIZED,
            json!({"message": "Bad credentials", "documentation_url": "https://docs.github.com/rest", "status": "401"}),
            None,
            &[],
        );
    }
    if let Some(wait) = st.secondary.pop_front() {
        let msg = json!({"message": "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.", "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"});
        return respond(&st, StatusCode::FORBIDDEN, msg, None, &[("retry-after", wait.to_string())]);
    }
    if method == Method::GET && path == "/rate_limit" {
        // Not counted against the limit (GitHub's documented behaviour).
        let core = json!({"limit": st.limit, "remaining": st.remaining, "used": st.limit - st.remaining, "reset": st.reset, "resource": "core"});
        return respond(&st, StatusCode::OK, json!({"resources": {"core": core}, "rate": core}), None, &[]);
    }
    if st.remaining == 0 {
        let msg = json!({"message": "API rate limit exceeded for user ID 1.", "documentation_url": "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api"});
        return respond(&st, StatusCode::FORBIDDEN, msg, None, &[]);
    }
    st.remaining -= 1;

    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let login = st.login.clone();
    let (status, value, link) = match (&method, parts.as_slice()) {
        (&Method::GET, ["notifications"]) => {
            let all = q.get("all").map(String::as_str) == Some("true");
            let items: Vec<Value> =
                st.notifications.iter().filter(|n| all || n["unread"] == json!(true)).cloned().collect();
            let (v, l) = paginate(&base, &path, &q, items);
            (StatusCode::OK, v, l)
        }
        (_, ["repos", owner, name, rest @ ..]) => {
            let repo = format!("{owner}/{name}");
            let next_id = st.next_id;
            let Some(issues) = st.repos.get_mut(&repo) else {
                let (s, v) = not_found();
                return respond(&st, s, v, None, &[]);
            };
            let find =
                |issues: &Vec<Issue>, n: &str| issues.iter().position(|i| n.parse::<u64>().ok() == Some(i.number));
            let state_ok = |i: &Issue| match q.get("state").map(String::as_str).unwrap_or("open") {
                "all" => true,
                s => i.state == s,
            };
            match (&method, rest) {
                (&Method::GET, ["issues"]) => {
                    let label = q.get("labels");
                    let mut items: Vec<&Issue> =
                        issues.iter().filter(|i| state_ok(i) && label.is_none_or(|l| i.labels.contains(l))).collect();
                    items.reverse(); // newest first, GitHub's default
                    let items = items.into_iter().map(|i| issue_json(&repo, i)).collect();
                    let (v, l) = paginate(&base, &path, &q, items);
                    (StatusCode::OK, v, l)
                }
                (&Method::GET, ["pulls"]) => {
                    let mut items: Vec<&Issue> = issues.iter().filter(|i| i.pull.is_some() && state_ok(i)).collect();
                    items.reverse();
                    let items = items.into_iter().map(|i| pull_json(&repo, i)).collect();
                    let (v, l) = paginate(&base, &path, &q, items);
                    (StatusCode::OK, v, l)
                }
                (&Method::POST, ["issues"]) => match body["title"].as_str().filter(|t| !t.is_empty()) {
                    None => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"message": "Validation Failed", "errors": [{"resource": "Issue", "field": "title", "code": "missing_field"}], "documentation_url": "https://docs.github.com/rest/issues/issues#create-an-issue"}),
                        None,
                    ),
                    Some(title) => {
                        let number = issues.iter().map(|i| i.number).max().unwrap_or(0) + 1;
                        let issue = Issue {
                            number,
                            title: title.to_owned(),
                            body: body["body"].as_str().unwrap_or("").to_owned(),
                            user: login.clone(),
                            state: "open".into(),
                            state_reason: None,
                            labels: body["labels"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|l| l.as_str().map(str::to_owned))
                                .collect(),
                            pull: None,
                            comments: vec![],
                            updated_at: stamp(number),
                        };
                        let v = issue_json(&repo, &issue);
                        issues.push(issue);
                        (StatusCode::CREATED, v, None)
                    }
                },
                (&Method::GET, ["issues", n]) => match find(issues, n) {
                    Some(i) => (StatusCode::OK, issue_json(&repo, &issues[i]), None),
                    None => {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                },
                (&Method::PATCH, ["issues", n]) => match find(issues, n) {
                    Some(i) => {
                        if let Some(s) = body["state"].as_str() {
                            issues[i].state = s.to_owned();
                        }
                        if let Some(r) = body["state_reason"].as_str() {
                            issues[i].state_reason = Some(r.to_owned());
                        }
                        (StatusCode::OK, issue_json(&repo, &issues[i]), None)
                    }
                    None => {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                },
                (&Method::GET, ["pulls", n]) => match find(issues, n).filter(|i| issues[*i].pull.is_some()) {
                    Some(i) => (StatusCode::OK, pull_json(&repo, &issues[i]), None),
                    None => {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                },
                (&Method::GET, ["issues", n, "comments"]) => match find(issues, n) {
                    Some(i) => {
                        let items = issues[i]
                            .comments
                            .iter()
                            .map(|c| json!({"id": c.id, "user": user(&c.user), "body": c.body, "created_at": c.created_at, "updated_at": c.created_at, "html_url": format!("https://github.com/{repo}/issues/{n}#issuecomment-{}", c.id)}))
                            .collect();
                        let (v, l) = paginate(&base, &path, &q, items);
                        (StatusCode::OK, v, l)
                    }
                    None => {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                },
                (&Method::POST, ["issues", n, "comments"]) => match (find(issues, n), body["body"].as_str()) {
                    (Some(i), Some(text)) if !text.is_empty() => {
                        let c = Comment {
                            id: next_id,
                            user: login.clone(),
                            body: text.to_owned(),
                            created_at: stamp(next_id),
                        };
                        let v = json!({"id": c.id, "user": user(&c.user), "body": c.body, "created_at": c.created_at, "html_url": format!("https://github.com/{repo}/issues/{n}#issuecomment-{}", c.id)});
                        issues[i].comments.push(c);
                        st.next_id += 1;
                        (StatusCode::CREATED, v, None)
                    }
                    (Some(_), _) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!({"message": "Validation Failed", "errors": [{"resource": "IssueComment", "field": "body", "code": "missing_field"}]}),
                        None,
                    ),
                    (None, _) => {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                },
                (&Method::DELETE, ["issues", "comments", id]) => {
                    let id: u64 = id.parse().unwrap_or(0);
                    let mut gone = false;
                    for i in issues.iter_mut() {
                        let before = i.comments.len();
                        i.comments.retain(|c| c.id != id);
                        gone |= i.comments.len() != before;
                    }
                    if gone {
                        (StatusCode::NO_CONTENT, Value::Null, None)
                    } else {
                        let (s, v) = not_found();
                        (s, v, None)
                    }
                }
                _ => {
                    let (s, v) = not_found();
                    (s, v, None)
                }
            }
        }
        _ => {
            let (s, v) = not_found();
            (s, v, None)
        }
    };
    respond(&st, status, value, link, &[])
}
