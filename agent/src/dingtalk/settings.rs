//! `[dingtalk]` section of the configuration: credentials, the API base, and the knobs of the
//! Stream connection and the outbound limiters. Validated once when the file is loaded; the rest
//! of the channel trusts these values.

use std::time::Duration;

use serde::Deserialize;

use crate::secret::Secret;

/// Where DingTalk's OpenAPI lives unless the operator points the agent elsewhere.
pub const DEFAULT_API_BASE: &str = "https://api.dingtalk.com";
/// Where DingTalk's older OpenAPI (`/topapi/…`, `/media/upload`) lives.
pub const DEFAULT_OAPI_BASE: &str = "https://oapi.dingtalk.com";

/// The `[dingtalk]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The app's AppKey ("Client ID" in the developer console).
    pub client_id: NonEmpty,
    /// The app's AppSecret ("Client Secret").
    pub client_secret: Secret,
    /// The robot code of the app's robot (usually equal to the client id).
    pub robot_code: NonEmpty,
    /// Base of DingTalk's OpenAPI; the open-connection, token, send and download URLs derive from it.
    #[serde(default)]
    pub api_base: ApiBase,
    /// Base of the older OpenAPI (address book, media upload). Unset: DingTalk's own when
    /// `api_base` is DingTalk's, else `api_base` itself (a simulator or gateway serving both).
    #[serde(default)]
    pub oapi_base: Option<ApiBase>,
    #[serde(default)]
    pub stream: StreamSettings,
    #[serde(default)]
    pub limits: LimitSettings,
    /// Answers stream into a DingTalk AI card when this table is present.
    #[serde(default)]
    pub card: Option<CardSettings>,
}

/// `[dingtalk.card]`: the AI card answers stream into.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CardSettings {
    /// The card template id from DingTalk's card platform (an "AI card" template whose Markdown
    /// component has streaming on).
    pub template_id: NonEmpty,
    /// The template variable bound to that Markdown component.
    #[serde(default = "default_content_key")]
    pub content_key: NonEmpty,
    /// Updates to one card are sent at most this often; text arriving in between is coalesced.
    #[serde(default = "default_card_update")]
    pub update_ms: Millis,
}

fn default_content_key() -> NonEmpty {
    NonEmpty("content".into())
}

fn default_card_update() -> Millis {
    Millis::from_ms(500)
}

impl Settings {
    /// The base of the older OpenAPI, as configured or derived from `api_base`.
    pub fn oapi_base(&self) -> ApiBase {
        match &self.oapi_base {
            Some(b) => b.clone(),
            None if self.api_base.as_str() == DEFAULT_API_BASE => ApiBase(DEFAULT_OAPI_BASE.to_owned()),
            None => self.api_base.clone(),
        }
    }
}

/// A string that is not empty and has no surrounding whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonEmpty(String);

impl NonEmpty {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for NonEmpty {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        if s.trim().is_empty() {
            return Err("must not be empty".into());
        }
        if s.trim() != s {
            return Err("must not start or end with whitespace".into());
        }
        Ok(NonEmpty(s))
    }
}

impl<'de> Deserialize<'de> for NonEmpty {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        NonEmpty::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// Whether a URL is reached over TLS or (loopback only) in the clear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Plain,
    Tls,
}

/// Why a URL was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("{0:?} is not a valid URL")]
    Invalid(String),
    #[error(
        "{url:?} uses plain {scheme}:// to a host that is not loopback; use https:// (or wss://), plain transport is accepted only for 127.0.0.0/8, ::1 and localhost"
    )]
    PlainToRemote { url: String, scheme: String },
    #[error("{url:?} has scheme {scheme:?}; expected {expected}")]
    WrongScheme { url: String, scheme: String, expected: &'static str },
}

/// Decide how a URL may be reached: TLS for every host, the clear only on loopback.
/// `secure`/`plain` are the scheme pair allowed at this place (`https`/`http` or `wss`/`ws`).
pub fn check_url(url: &str, secure: &'static str, plain: &'static str) -> Result<(http::Uri, Transport), UrlError> {
    let uri: http::Uri = url.parse().map_err(|_| UrlError::Invalid(url.to_owned()))?;
    let scheme = uri.scheme_str().ok_or_else(|| UrlError::Invalid(url.to_owned()))?.to_ascii_lowercase();
    let host = uri.host().ok_or_else(|| UrlError::Invalid(url.to_owned()))?;
    if scheme == secure {
        Ok((uri, Transport::Tls))
    } else if scheme == plain {
        if is_loopback_host(host) {
            Ok((uri, Transport::Plain))
        } else {
            Err(UrlError::PlainToRemote { url: url.to_owned(), scheme })
        }
    } else {
        Err(UrlError::WrongScheme {
            url: url.to_owned(),
            scheme,
            expected: if secure == "https" {
                "https:// (or http:// to loopback)"
            } else {
                "wss:// (or ws:// to loopback)"
            },
        })
    }
}

/// Loopback by address, never by name resolution, except the literal `localhost`.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The validated OpenAPI base URL, without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiBase(String);

impl ApiBase {
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let trimmed = s.trim_end_matches('/');
        let (uri, _) = check_url(trimmed, "https", "http")?;
        if uri.query().is_some() || uri.path().len() > 1 {
            return Err(UrlError::Invalid(format!("{s} (the API base is scheme://host[:port] only)")));
        }
        Ok(ApiBase(trimmed.to_owned()))
    }

    /// `base + path`, where `path` starts with `/`.
    pub fn join(&self, path: &str) -> String {
        format!("{}{}", self.0, path)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for ApiBase {
    fn default() -> Self {
        ApiBase(DEFAULT_API_BASE.to_owned())
    }
}

impl<'de> Deserialize<'de> for ApiBase {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        ApiBase::parse(&String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A duration in milliseconds, bounded to a sane range at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Millis(u64);

impl Millis {
    pub const fn from_ms(ms: u64) -> Self {
        Millis(ms)
    }
    pub fn get(self) -> Duration {
        Duration::from_millis(self.0)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let ms = u64::deserialize(d)?;
        if !(10..=86_400_000).contains(&ms) {
            return Err(serde::de::Error::custom(format!(
                "{ms} ms is out of range; give a value between 10 and 86400000 milliseconds"
            )));
        }
        Ok(Millis(ms))
    }
}

/// `[dingtalk.stream]`: timing of the Stream connection. All times are monotonic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamSettings {
    /// With no gateway frame of any kind for this long, the connection is dead,
    /// even if WebSocket pings are still answered. Once the gateway's own pings show their
    /// interval `p`, the limit is 1.5 × `p` + 1 s when that is shorter. Either way it stays well
    /// inside the ~60 s a gateway holds an undelivered message, so what a zombie swallowed is
    /// delivered again on the next connection.
    pub idle_window_ms: Millis,
    /// Interval between our WebSocket pings.
    pub keepalive_ms: Millis,
    /// A ping without a pong after this long kills the connection.
    pub pong_timeout_ms: Millis,
    /// Time limit for opening a connection (HTTP open call + WebSocket handshake), and for one write.
    pub connect_timeout_ms: Millis,
    /// First reconnect delay; doubles per failed attempt, with jitter.
    pub backoff_initial_ms: Millis,
    /// Cap of the reconnect delay. Reconnecting never stops.
    pub backoff_max_ms: Millis,
    /// After a SYSTEM disconnect, how long the old connection is still read before we close it.
    pub drain_ms: Millis,
    /// This many connection attempts inside `storm_window_ms` is reported as a reconnect storm.
    pub storm_attempts: u32,
    pub storm_window_ms: Millis,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            idle_window_ms: Millis(40_000),
            keepalive_ms: Millis(20_000),
            pong_timeout_ms: Millis(10_000),
            connect_timeout_ms: Millis(10_000),
            backoff_initial_ms: Millis(1_000),
            backoff_max_ms: Millis(60_000),
            drain_ms: Millis(30_000),
            storm_attempts: 10,
            storm_window_ms: Millis(300_000),
        }
    }
}

/// `[dingtalk.limits]`: outbound rates. Defaults follow DingTalk's documented limits:
/// 20 calls per second per app and API, and 20 messages per minute into one chat.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    pub openapi_per_second: u32,
    pub chat_messages_per_minute: u32,
    /// First retry delay of a throttled or failed reply; doubles with jitter up to 30 s.
    pub retry_initial_ms: Millis,
    /// How long a reply keeps being retried while DingTalk throttles or fails.
    pub reply_give_up_ms: Millis,
    /// Largest media file fetched into the temporary area.
    pub media_max_file_bytes: u64,
    /// Total size of the temporary media area; older files are removed first.
    pub media_max_total_bytes: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        LimitSettings {
            openapi_per_second: 20,
            chat_messages_per_minute: 20,
            retry_initial_ms: Millis(1_000),
            reply_give_up_ms: Millis(600_000),
            media_max_file_bytes: 20 * 1024 * 1024,
            media_max_total_bytes: 200 * 1024 * 1024,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_anywhere_plain_only_on_loopback() {
        assert_eq!(check_url("https://api.dingtalk.com", "https", "http").map(|r| r.1), Ok(Transport::Tls));
        for ok in ["http://127.0.0.1:8080", "http://localhost:1", "http://[::1]:9", "http://127.3.2.1"] {
            assert_eq!(check_url(ok, "https", "http").map(|r| r.1), Ok(Transport::Plain), "{ok}");
        }
        for bad in ["http://10.0.0.1", "http://api.dingtalk.com", "http://127.0.0.1.evil.com", "http://[::2]"] {
            assert!(matches!(check_url(bad, "https", "http"), Err(UrlError::PlainToRemote { .. })), "{bad}");
        }
        assert!(matches!(check_url("ftp://x", "https", "http"), Err(UrlError::WrongScheme { .. })));
        assert!(matches!(check_url("ws://8.8.8.8/connect", "wss", "ws"), Err(UrlError::PlainToRemote { .. })));
        assert!(check_url("not a url", "https", "http").is_err());
    }

    #[test]
    fn api_base_is_host_only() {
        assert_eq!(ApiBase::parse("http://127.0.0.1:9/").map(|b| b.join("/x")), Ok("http://127.0.0.1:9/x".into()));
        assert!(ApiBase::parse("https://api.dingtalk.com/v1.0").is_err());
        assert_eq!(ApiBase::default().as_str(), DEFAULT_API_BASE);
    }
}
