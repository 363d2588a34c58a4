//! DingTalk's OpenAPI as the agent uses it: an access token fetched with the app credentials,
//! cached until shortly before it expires and dropped on a 401; every call paced by a governor
//! limiter per API; each answer classified (done, throttled, token invalid, failed) so callers
//! decide to retry or give up without parsing bodies themselves.
//!
//! The workspace APIs (address book, calendar, to-do, approvals, media upload) go through
//! [`OpenApi::request`], which also retries throttling and transient failures a few times and
//! turns DingTalk's answers into an [`ApiError`] a person can act on — a missing API permission
//! names the permission to enable.
//!
//! The token and the app secret never appear in errors or logs (the old API's `access_token`
//! query is redacted from URLs like every query).

use std::{num::NonZeroU32, time::Duration};

use bytes::Bytes;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::{sync::Mutex, time::Instant};

use super::{
    http::{HttpClient, HttpError, HttpResponse},
    settings::Settings,
};
use crate::secret::Secret;

pub const TOKEN_PATH: &str = "/v1.0/oauth2/accessToken";
pub const TOKEN_HEADER: &str = "x-acs-dingtalk-access-token";
/// Refresh this long before DingTalk says the token expires.
const TOKEN_EARLY: Duration = Duration::from_secs(300);

/// How one call ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Value),
    /// Rate limit or flow control: wait and try again.
    Throttled(String),
    /// Worth retrying (5xx, network): transient.
    Transient(String),
    /// Will not work by retrying (bad request, refused).
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error(
        "DingTalk refused the app credentials when asked for an access token (HTTP {0}); check [dingtalk] client_id and client_secret"
    )]
    Refused(u16),
    #[error("access token request failed: {0}")]
    Http(#[from] HttpError),
    #[error("access token request answered HTTP {0}")]
    Status(u16),
    #[error("access token answer has no accessToken")]
    BadAnswer,
}

struct CachedToken {
    token: Secret,
    valid_until: Instant,
}

pub struct OpenApi {
    settings: Settings,
    http: HttpClient,
    token: Mutex<Option<CachedToken>>,
    per_api: DefaultKeyedRateLimiter<&'static str>,
}

/// Is this answer DingTalk saying "too many calls"?
pub fn is_throttle(status: u16, body: &Value) -> bool {
    if status == 429 {
        return true;
    }
    let code = body.get("code").and_then(Value::as_str).unwrap_or_default();
    if code.contains("QpsLimit") || code.contains("Throttl") || code.contains("FlowControl") {
        return true;
    }
    matches!(body.get("errcode").and_then(Value::as_i64), Some(90002))
}

/// Classify an HTTP answer of a JSON API.
pub fn classify(resp: &HttpResponse) -> Outcome {
    let status = resp.status.as_u16();
    let body = resp.json();
    if is_throttle(status, &body) {
        return Outcome::Throttled(format!("HTTP {status} {}", short(&body)));
    }
    if resp.status.is_server_error() {
        return Outcome::Transient(format!("HTTP {status} {}", short(&body)));
    }
    if !resp.status.is_success() {
        return Outcome::Failed(format!("HTTP {status} {}", short(&body)));
    }
    match body.get("errcode").and_then(Value::as_i64) {
        Some(0) | None => Outcome::Done(body),
        Some(code) => Outcome::Failed(format!("errcode {code} {}", short(&body))),
    }
}

/// The error code and message of a body, never anything else (bodies may echo content).
fn short(body: &Value) -> String {
    let code = body.get("code").or_else(|| body.get("errcode")).map(|v| v.to_string()).unwrap_or_default();
    let msg = body.get("message").or_else(|| body.get("errmsg")).and_then(Value::as_str).unwrap_or_default();
    format!("{code} {msg}").trim().chars().take(160).collect()
}

impl OpenApi {
    pub fn new(settings: Settings, http: HttpClient) -> Self {
        let qps = NonZeroU32::new(settings.limits.openapi_per_second).unwrap_or(NonZeroU32::MIN);
        OpenApi { per_api: RateLimiter::keyed(Quota::per_second(qps)), settings, http, token: Mutex::new(None) }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    /// Wait for the limiter of `api` (the path of the call).
    pub async fn pace(&self, api: &'static str) {
        self.per_api.until_key_ready(&api).await;
    }

    async fn token(&self) -> Result<Secret, TokenError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref()
            && t.valid_until > Instant::now()
        {
            return Ok(t.token.clone());
        }
        self.pace(TOKEN_PATH).await;
        let body = json!({
            "appKey": self.settings.client_id.as_str(),
            "appSecret": self.settings.client_secret.expose(),
        });
        let resp = self.http.post_json(&self.settings.api_base.join(TOKEN_PATH), &[], &body).await?;
        let status = resp.status.as_u16();
        if status == 400 || status == 401 || status == 403 {
            return Err(TokenError::Refused(status));
        }
        if !resp.status.is_success() {
            return Err(TokenError::Status(status));
        }
        let v = resp.json();
        let token =
            v.get("accessToken").and_then(Value::as_str).filter(|s| !s.is_empty()).ok_or(TokenError::BadAnswer)?;
        let life = Duration::from_secs(v.get("expireIn").and_then(Value::as_u64).unwrap_or(7200));
        let valid_until = Instant::now() + life.saturating_sub(TOKEN_EARLY).max(Duration::from_secs(30));
        let secret = Secret::new(token);
        *guard = Some(CachedToken { token: secret.clone(), valid_until });
        Ok(secret)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// POST a JSON body to an OpenAPI path with the access token, paced by the path's limiter.
    /// A 401 drops the cached token and retries once with a fresh one.
    /// Fetch an access token now (for `zhuli doctor`).
    pub async fn check_token(&self) -> Result<(), TokenError> {
        self.forget_token().await;
        self.token().await.map(|_| ())
    }

    /// Call a workspace API: `path` (with the ids filled in) on the API's host, the query
    /// percent-encoded. Throttling and transient failures are retried a few times with
    /// jittered backoff; what still fails comes back as an [`ApiError`].
    pub async fn request(
        &self,
        api: &Api,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
        payload: Payload<'_>,
    ) -> Result<Value, ApiError> {
        let mut delay = self.settings.limits.retry_initial_ms.get();
        let mut tries = 0;
        loop {
            tries += 1;
            let failure = match self.request_once(api, method.clone(), path, query, &payload).await {
                Ok(v) => return Ok(v),
                Err(Attempt::Final(e)) => return Err(e),
                Err(Attempt::Again(e)) => e,
            };
            if tries >= API_TRIES {
                return Err(match failure {
                    ApiError::Throttled { api, .. } => ApiError::Throttled { api, tries },
                    e => e,
                });
            }
            // DingTalk's advice for its QPS errors: wait about a second, then try again.
            let jitter = delay.mul_f64(rand::random::<f64>() * 0.5);
            tokio::time::sleep(delay + jitter).await;
            delay = (delay * 2).min(Duration::from_secs(4));
        }
    }

    async fn request_once(
        &self,
        api: &Api,
        method: http::Method,
        path: &str,
        query: &[(&str, &str)],
        payload: &Payload<'_>,
    ) -> Result<Value, Attempt> {
        let unavailable = |detail: String| Attempt::Again(ApiError::Unavailable { api: api.name, detail });
        let mut refreshed = false;
        loop {
            let token = match self.token().await {
                Ok(t) => t,
                Err(e @ TokenError::Refused(_)) => {
                    return Err(Attempt::Final(ApiError::Unavailable { api: api.name, detail: e.to_string() }));
                }
                Err(e) => return Err(unavailable(e.to_string())),
            };
            self.pace(api.name).await;
            let mut url = match api.host {
                Host::New => self.settings.api_base.join(path),
                Host::Old => self.settings.oapi_base().join(path),
            };
            let mut pairs: Vec<(&str, &str)> = query.to_vec();
            if api.host == Host::Old {
                pairs.push(("access_token", token.expose()));
            }
            for (i, (k, v)) in pairs.iter().enumerate() {
                url.push(if i == 0 { '?' } else { '&' });
                url.push_str(&encode(k));
                url.push('=');
                url.push_str(&encode(v));
            }
            let headers: Vec<(&str, &str)> =
                if api.host == Host::New { vec![(TOKEN_HEADER, token.expose())] } else { Vec::new() };
            let sent = match payload {
                Payload::None => {
                    self.http.send_body(method.clone(), &url, &headers, "application/json", Bytes::new()).await
                }
                Payload::Json(v) => self.http.json_request(method.clone(), &url, &headers, v).await,
                Payload::Multipart { boundary, body } => {
                    let ct = format!("multipart/form-data; boundary={boundary}");
                    self.http.send_body(method.clone(), &url, &headers, &ct, body.clone()).await
                }
            };
            let resp = sent.map_err(|e| unavailable(e.to_string()))?;
            if resp.status.as_u16() == 401 && !refreshed {
                log::info!("access token refused by {}; fetching a new one", api.name);
                self.forget_token().await;
                refreshed = true;
                continue;
            }
            return api_answer(api, &resp);
        }
    }

    pub async fn call(&self, path: &'static str, body: &impl Serialize) -> Outcome {
        self.call_with(http::Method::POST, path, body).await
    }

    /// [`OpenApi::call`] with another HTTP method.
    pub async fn call_with(&self, method: http::Method, path: &'static str, body: &impl Serialize) -> Outcome {
        for _ in 0..2 {
            let token = match self.token().await {
                Ok(t) => t,
                Err(e @ TokenError::Refused(_)) => return Outcome::Failed(e.to_string()),
                Err(e) => return Outcome::Transient(e.to_string()),
            };
            self.pace(path).await;
            let url = self.settings.api_base.join(path);
            let resp = match self.http.json_request(method.clone(), &url, &[(TOKEN_HEADER, token.expose())], body).await
            {
                Ok(r) => r,
                Err(e) => return Outcome::Transient(e.to_string()),
            };
            if resp.status.as_u16() == 401 {
                log::info!("access token refused by {path}; fetching a new one");
                self.forget_token().await;
                continue;
            }
            return classify(&resp);
        }
        Outcome::Failed(format!("{path} refused two fresh access tokens"))
    }
}

/// Tries of one workspace call before its failure is reported.
const API_TRIES: u32 = 4;

/// Which of DingTalk's two API hosts an API lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host {
    /// `api.dingtalk.com` (`/v1.0/…`): the token in the `x-acs-dingtalk-access-token` header.
    New,
    /// `oapi.dingtalk.com` (`/topapi/…`, `/media/upload`): the token as the `access_token` query.
    Old,
}

/// One DingTalk API as the workspace tools call it.
#[derive(Debug, Clone, Copy)]
pub struct Api {
    /// The documented path with its placeholders: the limiter key and the name in errors.
    pub name: &'static str,
    pub host: Host,
    /// The API permission the app needs (the name shown in the developer console).
    pub permission: &'static str,
}

/// What a workspace call sends.
#[derive(Debug)]
pub enum Payload<'a> {
    None,
    Json(&'a Value),
    /// A `multipart/form-data` body, already encoded.
    Multipart {
        boundary: String,
        body: Bytes,
    },
}

/// Why a workspace call did not work, in words a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    #[error(
        "this DingTalk app lacks the API permission `{permission}` (needed for {api}). An admin of the organisation enables `{permission}` for the app in the DingTalk developer console (open-dev.dingtalk.com → the app → 权限管理 / API permissions); it works right after"
    )]
    Permission { api: &'static str, permission: String },
    #[error("DingTalk kept throttling {api} ({tries} tries); this call changed nothing. Try again in a minute")]
    Throttled { api: &'static str, tries: u32 },
    #[error("DingTalk refused {api}: {detail}")]
    Refused { api: &'static str, status: u16, code: String, detail: String },
    #[error("DingTalk did not answer {api}: {detail}")]
    Unavailable { api: &'static str, detail: String },
}

enum Attempt {
    /// Worth another try (throttled, 5xx, network).
    Again(ApiError),
    Final(ApiError),
}

/// Classify a workspace API's answer.
fn api_answer(api: &Api, resp: &HttpResponse) -> Result<Value, Attempt> {
    let status = resp.status.as_u16();
    let body = resp.json();
    if is_throttle(status, &body) {
        return Err(Attempt::Again(ApiError::Throttled { api: api.name, tries: 1 }));
    }
    let code = body.get("code").and_then(Value::as_str).unwrap_or_default();
    let errcode = body.get("errcode").and_then(Value::as_i64);
    // v1.0: 403 AccessTokenPermissionDenied naming the scopes; old API: errcode 60011.
    if code.contains("PermissionDenied") || errcode == Some(60011) {
        let named = body["accessdenieddetail"]["requiredScopes"].as_array().and_then(|s| s.first()?.as_str());
        let permission = named.unwrap_or(api.permission).chars().take(80).collect();
        return Err(Attempt::Final(ApiError::Permission { api: api.name, permission }));
    }
    if resp.status.is_server_error() {
        return Err(Attempt::Again(ApiError::Unavailable { api: api.name, detail: format!("HTTP {status}") }));
    }
    let refused =
        |code: String| Err(Attempt::Final(ApiError::Refused { api: api.name, status, code, detail: short(&body) }));
    if !resp.status.is_success() {
        return refused(code.to_owned());
    }
    match errcode {
        Some(0) | None => Ok(body),
        Some(n) => refused(n.to_string()),
    }
}

/// Percent-encode everything but RFC 3986's unreserved characters.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16, body: Value) -> Result<Value, ApiError> {
        let api = Api { name: "/v1.0/x", host: Host::New, permission: "Calendar.Event.Write" };
        let resp = HttpResponse {
            status: http::StatusCode::from_u16(status).expect("status"),
            headers: Default::default(),
            body: Bytes::from(body.to_string()),
        };
        api_answer(&api, &resp).map_err(|a| match a {
            Attempt::Again(e) | Attempt::Final(e) => e,
        })
    }

    #[test]
    fn workspace_answers_become_errors_a_person_can_act_on() {
        let denied = json!({"code": "Forbidden.AccessDenied.AccessTokenPermissionDenied", "message": "没有调用该接口的权限",
            "accessdenieddetail": {"requiredScopes": ["Contact.User.Read"]}});
        let e = answer(403, denied).expect_err("denied");
        assert_eq!(e, ApiError::Permission { api: "/v1.0/x", permission: "Contact.User.Read".into() });
        assert!(e.to_string().contains("`Contact.User.Read`") && e.to_string().contains("developer console"));
        let old = answer(200, json!({"errcode": 60011, "errmsg": "no permission"})).expect_err("old api denied");
        assert_eq!(old, ApiError::Permission { api: "/v1.0/x", permission: "Calendar.Event.Write".into() });
        assert!(matches!(
            answer(403, json!({"code": "Forbidden.AccessDenied.QpsLimitForApi"})),
            Err(ApiError::Throttled { .. })
        ));
        assert!(matches!(answer(503, json!({})), Err(ApiError::Unavailable { .. })));
        let bad = answer(400, json!({"code": "invalidParameter", "message": "userId invalid"})).expect_err("400");
        assert!(matches!(&bad, ApiError::Refused { code, .. } if code == "invalidParameter"), "{bad:?}");
        assert_eq!(answer(200, json!({"errcode": 0, "result": 1})).ok().map(|v| v["result"].clone()), Some(json!(1)));
        assert_eq!(encode("a b/ü?&="), "a%20b%2F%C3%BC%3F%26%3D");
    }

    #[test]
    fn throttle_codes_are_recognised() {
        assert!(is_throttle(429, &Value::Null));
        assert!(is_throttle(403, &json!({"code": "Forbidden.AccessDenied.QpsLimitForApi"})));
        assert!(is_throttle(200, &json!({"errcode": 90002, "errmsg": "too fast"})));
        assert!(!is_throttle(403, &json!({"code": "Forbidden.AccessDenied"})));
        assert!(!is_throttle(200, &json!({"errcode": 0})));
    }
}
