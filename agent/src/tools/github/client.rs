//! GitHub's REST API as the github tools use it: a bearer token from the configuration (a
//! sealed credential on the box), the documented media type and API version, pagination by the
//! `Link` header (followed only back to the configured API), and GitHub's rate limits honoured
//! from the headers of every answer: when `x-ratelimit-remaining` reaches 0 no call is made
//! until `x-ratelimit-reset`; a secondary limit's `retry-after` is waited out when short and
//! reported when long. Server errors are retried twice.
//!
//! Errors name the path (never the token) and what to do.

use std::{sync::Mutex, time::Duration};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use crate::clock::now_ms;
use crate::{
    dingtalk::http::{HttpClient, HttpError, HttpResponse},
    secret::Secret,
};

/// Largest answer read from GitHub (a page of 100 issues with bodies stays well under this).
const MAX_BODY: usize = 4 * 1024 * 1024;
/// A secondary limit asking for a wait up to this long is waited out; longer ones are reported.
const SHORT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("GitHub's rate limit for this token is used up until {reset}; try again after that")]
    RateLimited { reset: String, reset_ms: i64 },
    #[error("GitHub refused the token (401 {message}): the admin should put a valid token into [tools.github] token")]
    BadToken { message: String },
    #[error(
        "GitHub refused {path} (403 {message}): the token lacks a permission for it; the admin can grant it in the token's settings on GitHub"
    )]
    Forbidden { path: String, message: String },
    #[error("{path} does not exist on GitHub, or the token cannot see it (404)")]
    NotFound { path: String },
    #[error("GitHub did not accept the request to {path} ({status} {message})")]
    Invalid { path: String, status: u16, message: String },
    #[error("GitHub answered {path} with {status}; try again later")]
    Server { path: String, status: u16 },
    #[error("GitHub's answer to {path} is not what its API documents")]
    Shape { path: String },
    #[error(transparent)]
    Http(#[from] HttpError),
}

/// What the rate-limit headers last said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Epoch seconds when the window resets.
    pub reset: Option<i64>,
    /// No call before this (epoch ms): the limit is used up or a `retry-after` asked for a wait.
    pub blocked_until_ms: i64,
}

pub struct Github {
    http: HttpClient,
    base: String,
    token: Secret,
    offset_minutes: i32,
    rate: Mutex<RateLimit>,
}

/// One page of a listing and where the next one is.
pub struct Page {
    pub items: Vec<Value>,
    pub next: Option<String>,
}

/// The `rel="next"` target of a `Link` header.
pub fn next_link(link: &str) -> Option<String> {
    link.split(',').find_map(|part| {
        let (url, params) = part.trim().split_once(';')?;
        let is_next = params.split(';').any(|p| {
            let p = p.trim().replace(' ', "");
            p == "rel=\"next\"" || p == "rel=next"
        });
        is_next.then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_owned())
    })
}

fn message(resp: &HttpResponse) -> String {
    let json = resp.json();
    let mut m = json["message"].as_str().unwrap_or("").chars().take(200).collect::<String>();
    // A validation failure says which field in `errors`.
    for e in json["errors"].as_array().into_iter().flatten().take(3) {
        let part = match (e["field"].as_str(), e["code"].as_str(), e["message"].as_str()) {
            (_, _, Some(text)) => text.to_owned(),
            (Some(f), Some(c), None) => format!("{f}: {c}"),
            _ => continue,
        };
        m.push_str("; ");
        m.extend(part.chars().take(120));
    }
    m
}

impl Github {
    pub fn new(http: HttpClient, base: &str, token: Secret, offset_minutes: i32) -> Self {
        Github { http, base: base.trim_end_matches('/').to_owned(), token, offset_minutes, rate: Mutex::default() }
    }

    pub fn rate(&self) -> RateLimit {
        *self.rate.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remember(&self, resp: &HttpResponse) {
        let num = |h: &str| resp.header(h).and_then(|v| v.trim().parse::<i64>().ok());
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(l) = num("x-ratelimit-limit") {
            r.limit = Some(l.max(0) as u64);
        }
        if let Some(rem) = num("x-ratelimit-remaining") {
            r.remaining = Some(rem.max(0) as u64);
        }
        if let Some(reset) = num("x-ratelimit-reset") {
            r.reset = Some(reset);
        }
        if r.remaining == Some(0)
            && let Some(reset) = r.reset
        {
            r.blocked_until_ms = r.blocked_until_ms.max(reset * 1000);
        }
    }

    fn limited(&self, until_ms: i64) -> GithubError {
        GithubError::RateLimited { reset: crate::tools::when::local(until_ms, self.offset_minutes), reset_ms: until_ms }
    }

    /// One call; `path` is below the API base (`/repos/o/r/issues?state=open`) or a `next` link
    /// GitHub gave (which must lead back to the base).
    pub async fn call(&self, method: Method, path: &str, body: Option<&Value>) -> Result<HttpResponse, GithubError> {
        let url = if path.starts_with('/') {
            format!("{}{path}", self.base)
        } else if path.starts_with(&format!("{}/", self.base)) {
            path.to_owned()
        } else {
            // The token goes to the configured API only, whatever a header says.
            return Err(GithubError::Shape { path: crate::dingtalk::http::redact(path) });
        };
        let shown = crate::dingtalk::http::redact(&url[self.base.len()..]);
        let auth = format!("Bearer {}", self.token.expose());
        let headers = [
            ("authorization", auth.as_str()),
            ("accept", "application/vnd.github+json"),
            ("x-github-api-version", "2022-11-28"),
            ("user-agent", concat!("zhuli/", env!("CARGO_PKG_VERSION"))),
        ];
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let mut attempt = 0;
        loop {
            let blocked = self.rate().blocked_until_ms;
            if blocked > now_ms() {
                return Err(self.limited(blocked));
            }
            let resp = self.http.request(method.clone(), &url, &headers, body.clone(), MAX_BODY).await?;
            self.remember(&resp);
            let status = resp.status;
            if status.is_success() {
                return Ok(resp);
            }
            attempt += 1;
            let limited = matches!(status, StatusCode::FORBIDDEN | StatusCode::TOO_MANY_REQUESTS)
                && (resp.header("x-ratelimit-remaining") == Some("0")
                    || resp.header("retry-after").is_some()
                    || message(&resp).to_ascii_lowercase().contains("rate limit"));
            if limited {
                let wait = resp.header("retry-after").and_then(|v| v.trim().parse::<u64>().ok());
                let until = match wait {
                    Some(s) => now_ms() + s as i64 * 1000,
                    None => self.rate().blocked_until_ms.max(now_ms() + 60_000),
                };
                {
                    let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
                    r.blocked_until_ms = r.blocked_until_ms.max(until);
                }
                let delay = Duration::from_millis((until - now_ms()).max(0) as u64);
                if attempt <= 2 && delay <= SHORT_WAIT {
                    tokio::time::sleep(delay).await;
                    continue;
                }
                return Err(self.limited(until));
            }
            if status.is_server_error() && attempt <= 2 {
                tokio::time::sleep(Duration::from_millis(200 * 4u64.pow(attempt - 1))).await;
                continue;
            }
            return Err(match status.as_u16() {
                401 => GithubError::BadToken { message: message(&resp) },
                403 => GithubError::Forbidden { path: shown, message: message(&resp) },
                404 => GithubError::NotFound { path: shown },
                s if status.is_client_error() => {
                    GithubError::Invalid { path: shown, status: s, message: message(&resp) }
                }
                s => GithubError::Server { path: shown, status: s },
            });
        }
    }

    /// A JSON answer.
    pub async fn json(&self, method: Method, path: &str, body: Option<&Value>) -> Result<Value, GithubError> {
        let resp = self.call(method, path, body).await?;
        if resp.body.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_slice(&resp.body).map_err(|_| GithubError::Shape { path: crate::dingtalk::http::redact(path) })
    }

    /// One page of a listing (an array).
    pub async fn page(&self, path: &str) -> Result<Page, GithubError> {
        let resp = self.call(Method::GET, path, None).await?;
        let shape = || GithubError::Shape { path: crate::dingtalk::http::redact(path) };
        let items = match serde_json::from_slice(&resp.body).map_err(|_| shape())? {
            Value::Array(items) => items,
            _ => return Err(shape()),
        };
        Ok(Page { items, next: resp.header("link").and_then(next_link) })
    }

    /// Up to `max` items of a listing, following `next` links; whether more were left.
    pub async fn list(
        &self,
        path: &str,
        max: usize,
        keep: impl Fn(&Value) -> bool,
    ) -> Result<(Vec<Value>, bool), GithubError> {
        let mut out = Vec::new();
        let mut next = Some(path.to_owned());
        while let Some(p) = next.take() {
            let page = self.page(&p).await?;
            for item in page.items {
                if keep(&item) {
                    if out.len() == max {
                        return Ok((out, true));
                    }
                    out.push(item);
                }
            }
            next = page.next;
        }
        Ok((out, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_headers_give_the_next_page() {
        let link = "<https://api.github.com/repositories/1300192/issues?page=2>; rel=\"prev\", \
                    <https://api.github.com/repositories/1300192/issues?page=4>; rel=\"next\", \
                    <https://api.github.com/repositories/1300192/issues?page=515>; rel=\"last\"";
        assert_eq!(next_link(link).as_deref(), Some("https://api.github.com/repositories/1300192/issues?page=4"));
        assert_eq!(next_link("<https://x/y?page=9>; rel=\"last\""), None);
        assert_eq!(next_link(""), None);
    }
}
