//! The outbound HTTPS client every DingTalk call goes through: rustls with the webpki roots,
//! plain HTTP only to loopback (checked per request, so a session webhook URL from a frame gets
//! the same rule as the configured API base), a time limit per call and a cap on body size.
//!
//! Errors and logs name a URL without its query string: session webhooks carry a credential there.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use serde::Serialize;

use super::settings::{UrlError, check_url};

/// Responses from DingTalk's JSON APIs are small; anything larger is refused.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// The rustls configuration shared by HTTPS and WSS: ring provider, webpki roots, no client auth.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports rustls' default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error(transparent)]
    Url(#[from] UrlError),
    #[error("request to {0} timed out")]
    Timeout(String),
    #[error("request to {url} failed: {reason}")]
    Transport { url: String, reason: String },
    #[error("response from {0} is larger than allowed")]
    TooLarge(String),
}

#[derive(Debug)]
pub struct HttpResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

impl HttpResponse {
    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// URL with the query removed, safe for logs and errors.
pub fn redact(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

impl HttpClient {
    pub fn new(tls: Arc<rustls::ClientConfig>, timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(https);
        HttpClient { inner, timeout }
    }

    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &impl Serialize,
    ) -> Result<HttpResponse, HttpError> {
        let body = serde_json::to_vec(body).expect("request bodies are plain serialisable structs");
        self.send(Method::POST, url, headers, Bytes::from(body), MAX_JSON_BODY).await
    }

    /// A JSON request with any method (DingTalk's card APIs use PUT).
    pub async fn json_request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: &impl Serialize,
    ) -> Result<HttpResponse, HttpError> {
        let body = serde_json::to_vec(body).expect("request bodies are plain serialisable structs");
        self.send(method, url, headers, Bytes::from(body), MAX_JSON_BODY).await
    }

    /// POST a JSON body and hand back the response head and the body unread, for streamed
    /// answers (server-sent events). Only the time to the response head is limited here; the
    /// caller bounds the reading.
    pub async fn post_json_streaming(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &impl Serialize,
    ) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
        let (uri, _) = check_url(url, "https", "http")?;
        let shown = redact(url);
        let body = serde_json::to_vec(body).expect("request bodies are plain serialisable structs");
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header("accept", "text/event-stream, application/json")
            .header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| HttpError::Transport { url: shown.clone(), reason: e.to_string() })?;
        tokio::time::timeout(self.timeout, self.inner.request(req))
            .await
            .map_err(|_| HttpError::Timeout(shown.clone()))?
            .map_err(|e| HttpError::Transport { url: shown, reason: error_chain(&e) })
    }

    pub async fn get(&self, url: &str, max_bytes: usize) -> Result<HttpResponse, HttpError> {
        self.send(Method::GET, url, &[], Bytes::new(), max_bytes).await
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max_bytes: usize,
    ) -> Result<HttpResponse, HttpError> {
        let (uri, _) = check_url(url, "https", "http")?;
        let shown = redact(url);
        let mut req = Request::builder().method(method).uri(uri).header("accept", "application/json");
        if !body.is_empty() {
            req = req.header("content-type", "application/json");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| HttpError::Transport { url: shown.clone(), reason: e.to_string() })?;
        let call = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| HttpError::Transport { url: shown.clone(), reason: error_chain(&e) })?;
            let status = resp.status();
            let collected = Limited::new(resp.into_body(), max_bytes).collect().await.map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    HttpError::TooLarge(shown.clone())
                } else {
                    HttpError::Transport { url: shown.clone(), reason: e.to_string() }
                }
            })?;
            Ok(HttpResponse { status, body: collected.to_bytes() })
        };
        tokio::time::timeout(self.timeout, call).await.map_err(|_| HttpError::Timeout(shown.clone()))?
    }
}

/// Flatten an error and its sources into one line ("connection refused" hides two levels down).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
