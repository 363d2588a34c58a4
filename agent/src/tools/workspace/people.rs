//! The address book: a staff id to name, title, departments and the unionId other APIs need;
//! search by name; a department's members. Look-ups are kept in the store's cache for
//! `people_cache_ms`; [`Directory::clear`] empties it (permission changes, DingTalk refusing).

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Outcome, ToolError, Workspace, api_error};
use crate::clock::now_ms;
use crate::{
    dingtalk::openapi::{Api, ApiError, Host, OpenApi, Payload},
    store::Store,
    tools::Context,
};

pub const USER_GET: Api = Api { name: "/topapi/v2/user/get", host: Host::Old, permission: "qyapi_get_member" };
pub const USER_LIST: Api = Api { name: "/topapi/v2/user/list", host: Host::Old, permission: "qyapi_get_member" };
pub const DEPT_SUB: Api =
    Api { name: "/topapi/v2/department/listsub", host: Host::Old, permission: "qyapi_get_department_list" };
pub const USER_SEARCH: Api =
    Api { name: "/v1.0/contact/users/search", host: Host::New, permission: "qyapi_get_member" };

/// The old API's "no such user" codes.
const NO_SUCH_USER: [&str; 2] = ["60121", "33012"];
/// Departments walked at most (an organisation's tree).
const MAX_DEPARTMENTS: usize = 2_000;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Person {
    pub staff_id: String,
    pub union_id: String,
    pub name: String,
    pub title: String,
    pub departments: Vec<String>,
}

impl Person {
    /// `Li Lei (Engineer, R&D; staff id lilei)`.
    pub fn line(&self) -> String {
        let mut about: Vec<String> = Vec::new();
        if !self.title.is_empty() {
            about.push(self.title.clone());
        }
        if !self.departments.is_empty() {
            about.push(self.departments.join(" / "));
        }
        let about = if about.is_empty() { String::new() } else { format!("{}; ", about.join(", ")) };
        format!("{} ({about}staff id {})", self.name, self.staff_id)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Department {
    id: i64,
    name: String,
}

pub struct Directory {
    api: Arc<OpenApi>,
    store: Arc<Store>,
    ttl_ms: i64,
    pub hits: AtomicU64,
    pub misses: AtomicU64,
}

impl Directory {
    pub fn new(api: Arc<OpenApi>, store: Arc<Store>, ttl_ms: i64) -> Self {
        Directory { api, store, ttl_ms, hits: AtomicU64::new(0), misses: AtomicU64::new(0) }
    }

    async fn cache_get(&self, key: &str) -> Option<String> {
        let (store, key) = (self.store.clone(), key.to_owned());
        let got = tokio::task::spawn_blocking(move || store.cache_get(&key, now_ms())).await.ok()?;
        got.unwrap_or_else(|e| {
            log::warn!("cannot read the address-book cache: {e}");
            None
        })
    }

    async fn cache_put(&self, key: &str, value: String) {
        let (store, key, until) = (self.store.clone(), key.to_owned(), now_ms() + self.ttl_ms);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || store.cache_put(&key, &value, until)).await {
            log::warn!("cannot keep an address-book look-up: {e}");
        }
    }

    /// A cached value of `key`, or `fetch`ed and kept.
    async fn cached<T: Serialize + serde::de::DeserializeOwned>(
        &self,
        key: &str,
        fetch: impl Future<Output = Result<T, ToolError>>,
    ) -> Result<T, ToolError> {
        if let Some(v) = self.cache_get(key).await.and_then(|s| serde_json::from_str(&s).ok()) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(v);
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let v = fetch.await?;
        if let Ok(text) = serde_json::to_string(&v) {
            self.cache_put(key, text).await;
        }
        Ok(v)
    }

    /// Forget every look-up (the cache never outlives a permission change).
    pub async fn clear(&self) {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || store.cache_clear()).await {
            Ok(Ok(n)) if n > 0 => log::info!("address-book cache emptied ({n} entries)"),
            Ok(Err(e)) => log::warn!("cannot empty the address-book cache: {e}"),
            _ => {}
        }
    }

    /// A call of the address book; DingTalk refusing the permission empties the cache, so
    /// nothing read under a permission the app no longer has is served from it.
    async fn call(&self, api: &Api, body: Value) -> Result<Value, ToolError> {
        self.call_api(api, body).await.map_err(api_error)
    }

    async fn call_api(&self, api: &Api, body: Value) -> Result<Value, ApiError> {
        let answer = self.api.request(api, http::Method::POST, api.name, &[], Payload::Json(&body)).await;
        if let Err(ApiError::Permission { .. }) = &answer {
            self.clear().await;
        }
        answer
    }

    async fn departments(&self) -> Result<Vec<Department>, ToolError> {
        self.cached("departments", async {
            let mut out = vec![Department { id: 1, name: "(whole organisation)".into() }];
            let mut queue = vec![1i64];
            while let Some(id) = queue.pop() {
                if out.len() >= MAX_DEPARTMENTS {
                    break;
                }
                let v = self.call(&DEPT_SUB, json!({"dept_id": id, "language": "zh_CN"})).await?;
                for d in v["result"].as_array().into_iter().flatten() {
                    let Some(id) = d["dept_id"].as_i64() else { continue };
                    out.push(Department { id, name: d["name"].as_str().unwrap_or_default().to_owned() });
                    queue.push(id);
                }
            }
            Ok(out)
        })
        .await
    }

    fn person_from(&self, u: &Value, departments: &[Department]) -> Person {
        let names = u["dept_id_list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_i64)
            .filter_map(|id| departments.iter().find(|d| d.id == id && id != 1).map(|d| d.name.clone()))
            .collect();
        let s = |k: &str| u[k].as_str().unwrap_or_default().to_owned();
        Person { staff_id: s("userid"), union_id: s("unionid"), name: s("name"), title: s("title"), departments: names }
    }

    /// The person with this staff id.
    pub async fn person(&self, staff_id: &str) -> Result<Person, ToolError> {
        self.cached(&format!("person:{staff_id}"), async {
            let v = match self.call_api(&USER_GET, json!({"userid": staff_id, "language": "zh_CN"})).await {
                Err(ApiError::Refused { code, .. }) if NO_SUCH_USER.contains(&code.as_str()) => {
                    return Err(ToolError::Refused(format!(
                        "no one with the staff id `{}` is in this organisation's address book",
                        staff_id.chars().take(64).collect::<String>()
                    )));
                }
                r => r.map_err(api_error)?,
            };
            let departments = self.departments().await?;
            let p = self.person_from(&v["result"], &departments);
            if p.union_id.is_empty() {
                return Err(ToolError::Failed("the address book gave no unionId for this person".into()));
            }
            Ok(p)
        })
        .await
    }

    /// The asker, who must be a member of the organisation.
    pub async fn me(&self, ctx: &Context) -> Result<Person, ToolError> {
        if ctx.actor.starts_with("dingtalk:") || ctx.actor.is_empty() {
            return Err(ToolError::Refused(
                "the asker is not a member of this organisation (no staff id), so I cannot act for them in DingTalk's calendar, to-dos or approvals".into(),
            ));
        }
        self.person(&ctx.actor).await
    }

    /// People whose name matches `query` (DingTalk's search), plus the person whose staff id it is.
    pub async fn search(&self, query: &str) -> Result<Vec<Person>, ToolError> {
        let query = query.trim();
        if query.is_empty() {
            return Err(ToolError::Refused("give a name or a staff id to look for".into()));
        }
        let ids: Vec<String> = self
            .cached(&format!("search:{}", query.to_lowercase()), async {
                let v = self.call(&USER_SEARCH, json!({"queryWord": query, "offset": 0, "size": 20})).await?;
                Ok(v["list"].as_array().into_iter().flatten().filter_map(|i| i.as_str().map(str::to_owned)).collect())
            })
            .await?;
        let mut people = Vec::new();
        let looks_like_id = !query.contains(char::is_whitespace) && query.len() <= 64;
        if looks_like_id && !ids.iter().any(|i| i == query) {
            match self.person(query).await {
                Ok(p) => people.push(p),
                Err(ToolError::Refused(_)) => {}
                Err(e) => return Err(e),
            }
        }
        for id in ids {
            people.push(self.person(&id).await?);
        }
        Ok(people)
    }

    /// Exactly one person for `who` (a staff id or a name), or a refusal that says why and,
    /// for an ambiguous name, lists the candidates so the user can be asked which one.
    pub async fn resolve(&self, who: &str) -> Result<Person, ToolError> {
        let found = self.search(who).await?;
        if let Some(p) = found.iter().find(|p| p.staff_id == who.trim()) {
            return Ok(p.clone());
        }
        let exact: Vec<&Person> = found.iter().filter(|p| p.name.eq_ignore_ascii_case(who.trim())).collect();
        let shown = who.chars().take(64).collect::<String>();
        match (found.len(), exact.len()) {
            (0, _) => Err(ToolError::Refused(format!(
                "no one called “{shown}” is in this organisation's address book (people outside the organisation cannot be added); check the spelling or ask the user for their staff id"
            ))),
            (1, _) => Ok(found[0].clone()),
            (_, 1) => Ok(exact[0].clone()),
            _ => Err(ToolError::Refused(format!(
                "“{shown}” could be several people: {}. Ask the user which one they mean, then call again with that staff id",
                found.iter().take(8).map(Person::line).collect::<Vec<_>>().join("; ")
            ))),
        }
    }

    /// The members of the department named `dept` (a name or an id).
    pub async fn members(&self, dept: &str, max: usize) -> Result<(String, Vec<Person>, bool), ToolError> {
        let departments = self.departments().await?;
        let wanted = dept.trim();
        let by_id = wanted.parse::<i64>().ok().and_then(|id| departments.iter().find(|d| d.id == id));
        let exact: Vec<&Department> = departments.iter().filter(|d| d.name.eq_ignore_ascii_case(wanted)).collect();
        let lower = wanted.to_lowercase();
        let partial: Vec<&Department> = departments.iter().filter(|d| d.name.to_lowercase().contains(&lower)).collect();
        let d = match (by_id, exact.as_slice(), partial.as_slice()) {
            (Some(d), _, _) => d,
            (None, [d], _) | (None, [], [d]) => *d,
            (None, [], []) => {
                return Err(ToolError::Refused(format!(
                    "there is no department called “{}”",
                    wanted.chars().take(64).collect::<String>()
                )));
            }
            (None, [], many) | (None, many, _) => {
                let names: Vec<String> = many.iter().take(10).map(|d| format!("{} (id {})", d.name, d.id)).collect();
                return Err(ToolError::Refused(format!(
                    "several departments match: {}; ask which one and call again with its id",
                    names.join(", ")
                )));
            }
        };
        let mut people = Vec::new();
        let mut cursor = 0i64;
        loop {
            let v = self
                .call(&USER_LIST, json!({"dept_id": d.id, "cursor": cursor, "size": 100, "language": "zh_CN"}))
                .await?;
            let result = &v["result"];
            for u in result["list"].as_array().into_iter().flatten() {
                people.push(self.person_from(u, &departments));
            }
            let more = result["has_more"].as_bool().unwrap_or(false);
            match result["next_cursor"].as_i64() {
                Some(next) if more && people.len() < max => cursor = next,
                _ => return Ok((d.name.clone(), people.into_iter().take(max).collect(), more)),
            }
        }
    }
}

pub async fn search_tool(ws: &Workspace, query: &str) -> Result<Outcome, ToolError> {
    let people = ws.people.search(query).await?;
    if people.is_empty() {
        return Ok(Outcome::text(format!(
            "no one in the address book matches “{}”",
            query.chars().take(64).collect::<String>()
        )));
    }
    let lines: Vec<String> = people.iter().take(ws.settings.max_results).map(|p| format!("- {}", p.line())).collect();
    Ok(Outcome::text(lines.join("\n")))
}

pub async fn members_tool(ws: &Workspace, dept: &str) -> Result<Outcome, ToolError> {
    let (name, people, more) = ws.people.members(dept, ws.settings.max_results).await?;
    let mut text = format!("{name}: {} member(s)\n", people.len());
    for p in &people {
        text.push_str(&format!("- {}\n", p.line()));
    }
    if more {
        text.push_str("(more members not shown)\n");
    }
    Ok(Outcome::text(text))
}
