//! DingTalk's OpenAPI as the agent uses it: an access token fetched with the app credentials,
//! cached until shortly before it expires and dropped on a 401; every call paced by a governor
//! limiter per API; each answer classified (done, throttled, token invalid, failed) so callers
//! decide to retry or give up without parsing bodies themselves.
//!
//! The token and the app secret never appear in errors or logs.

use std::{num::NonZeroU32, time::Duration};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_codes_are_recognised() {
        assert!(is_throttle(429, &Value::Null));
        assert!(is_throttle(403, &json!({"code": "Forbidden.AccessDenied.QpsLimitForApi"})));
        assert!(is_throttle(200, &json!({"errcode": 90002, "errmsg": "too fast"})));
        assert!(!is_throttle(403, &json!({"code": "Forbidden.AccessDenied"})));
        assert!(!is_throttle(200, &json!({"errcode": 0})));
    }
}
