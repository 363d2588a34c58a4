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
use rustls::pki_types::{CertificateDer, pem::PemObject};
use serde::Serialize;

use super::settings::{UrlError, check_url};

/// Responses from DingTalk's JSON APIs are small; anything larger is refused.
pub const MAX_JSON_BODY: usize = 1024 * 1024;

/// Certificate authorities trusted beside the public roots (`[agent] extra_ca_pem`), set once
/// at start-up before any connection is made.
static EXTRA_ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();

/// Parse PEM text into CA certificates usable as trust anchors; says what is wrong otherwise.
pub fn parse_pem_roots(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut certs = Vec::new();
    for (i, item) in CertificateDer::pem_slice_iter(pem.as_bytes()).enumerate() {
        let cert = item.map_err(|e| format!("certificate {} is not valid PEM ({e})", i + 1))?;
        rustls::RootCertStore::empty()
            .add(cert.clone())
            .map_err(|e| format!("certificate {} cannot be a trust anchor ({e})", i + 1))?;
        certs.push(cert);
    }
    if certs.is_empty() {
        return Err("no -----BEGIN CERTIFICATE----- block found".into());
    }
    Ok(certs)
}

/// Trust these CAs too (for an office whose firewall inspects TLS, or a test gateway). Only the
/// first call counts; returns how many certificates were added.
pub fn trust_extra_roots(pem: &str) -> Result<usize, String> {
    let certs = parse_pem_roots(pem)?;
    let n = certs.len();
    let _ = EXTRA_ROOTS.set(certs);
    Ok(n)
}

/// The rustls configuration shared by HTTPS and WSS: ring provider, webpki roots (and any extra
/// CAs from the configuration), no client auth.
pub fn tls_config() -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    for cert in EXTRA_ROOTS.get().into_iter().flatten() {
        // Checked by parse_pem_roots already.
        let _ = roots.add(cert.clone());
    }
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
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl HttpResponse {
    /// A response header as text (`None` when absent or not text).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as JSON, or `Value::Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// URL with the query removed, safe for logs and errors.
pub fn redact(url: &str) -> String {
    url.split(['?', '#']).next().unwrap_or_default().to_owned()
}

/// A request body sent as it is read (a file of any size).
type Streamed = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    /// The same, for bodies streamed from a file.
    streamed: Client<HttpsConnector<HttpConnector>, Streamed>,
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
            .build(https.clone());
        let streamed = Client::builder(TokioExecutor::new()).pool_idle_timeout(Duration::from_secs(30)).build(https);
        HttpClient { inner, streamed, timeout }
    }

    /// Send the file at `path` as the body of a `method` request, read as it goes (never whole
    /// in memory). `idle`: the longest the server may take none of it, or then keep its answer
    /// waiting; the answer is read up to `max_bytes`.
    pub async fn send_file(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        path: &std::path::Path,
        idle: Duration,
        max_bytes: usize,
    ) -> Result<HttpResponse, HttpError> {
        use futures_util::StreamExt;
        use std::sync::atomic::{AtomicU64, Ordering};
        let (uri, _) = check_url(url, "https", "http")?;
        let shown = redact(url);
        let failed = |reason: String| HttpError::Transport { url: shown.clone(), reason };
        let unread = |e: std::io::Error| failed(format!("cannot read {} ({e})", path.display()));
        let file = tokio::fs::File::open(path).await.map_err(unread)?;
        let len = file.metadata().await.map_err(unread)?.len();
        // Each piece taken stamps the time: a server that stops taking them is noticed.
        let started = tokio::time::Instant::now();
        let moved = Arc::new(AtomicU64::new(0));
        let stamp = moved.clone();
        let pieces = tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).map(move |piece| {
            stamp.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            piece.map(hyper::body::Frame::data)
        });
        let mut req = Request::builder().method(method).uri(uri).header("content-length", len);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req =
            req.body(BodyExt::boxed(http_body_util::StreamBody::new(pieces))).map_err(|e| failed(e.to_string()))?;
        let call = async {
            let resp = self.streamed.request(req).await.map_err(|e| failed(error_chain(&e)))?;
            read_answer(resp, max_bytes, &shown).await
        };
        tokio::pin!(call);
        loop {
            tokio::select! {
                done = &mut call => return done,
                _ = tokio::time::sleep(idle / 4) => {
                    let last = Duration::from_millis(moved.load(Ordering::Relaxed));
                    if started.elapsed().saturating_sub(last) > idle {
                        return Err(HttpError::Timeout(shown.clone()));
                    }
                }
            }
        }
    }

    /// GET `url` into the file at `to` as it arrives (never whole in memory), up to `max_bytes`;
    /// `idle`: the longest the server may send nothing. The response's status and headers, and
    /// its body only when it is not a success.
    pub async fn get_to_file(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        to: &std::path::Path,
        idle: Duration,
        max_bytes: u64,
    ) -> Result<HttpResponse, HttpError> {
        use tokio::io::AsyncWriteExt;
        let shown = redact(url);
        let failed = |reason: String| HttpError::Transport { url: shown.clone(), reason };
        let unwritten = |e: std::io::Error| failed(format!("cannot write {} ({e})", to.display()));
        let resp = self.get_streaming(url, headers).await?;
        let (status, headers) = (resp.status(), resp.headers().clone());
        let mut body = resp.into_body();
        if !status.is_success() {
            let said = tokio::time::timeout(idle, Limited::new(body, 64 * 1024).collect())
                .await
                .map_err(|_| HttpError::Timeout(shown.clone()))?
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            return Ok(HttpResponse { status, headers, body: said });
        }
        let mut file = tokio::fs::File::create(to).await.map_err(unwritten)?;
        let mut written = 0u64;
        while let Some(frame) =
            tokio::time::timeout(idle, body.frame()).await.map_err(|_| HttpError::Timeout(shown.clone()))?
        {
            if let Ok(data) = frame.map_err(|e| failed(error_chain(&e)))?.into_data() {
                written += data.len() as u64;
                if written > max_bytes {
                    return Err(HttpError::TooLarge(shown.clone()));
                }
                file.write_all(&data).await.map_err(unwritten)?;
            }
        }
        file.sync_all().await.map_err(unwritten)?;
        Ok(HttpResponse { status, headers, body: Bytes::new() })
    }

    pub async fn post_json(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: &impl Serialize,
    ) -> Result<HttpResponse, HttpError> {
        let body = serde_json::to_vec(body).expect("request bodies are plain serialisable structs");
        self.request(Method::POST, url, headers, Bytes::from(body), MAX_JSON_BODY).await
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
        self.request(method, url, headers, Bytes::from(body), MAX_JSON_BODY).await
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

    /// GET with the caller's headers (a `range`), handing back the response head and the body
    /// unread: for downloads of any size. Only the time to the response head is limited here;
    /// the caller bounds the reading.
    pub async fn get_streaming(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<http::Response<hyper::body::Incoming>, HttpError> {
        let (uri, _) = check_url(url, "https", "http")?;
        let shown = redact(url);
        let mut req = Request::builder().method(Method::GET).uri(uri);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| HttpError::Transport { url: shown.clone(), reason: e.to_string() })?;
        tokio::time::timeout(self.timeout, self.inner.request(req))
            .await
            .map_err(|_| HttpError::Timeout(shown.clone()))?
            .map_err(|e| HttpError::Transport { url: shown, reason: error_chain(&e) })
    }

    pub async fn get(&self, url: &str, max_bytes: usize) -> Result<HttpResponse, HttpError> {
        self.request(Method::GET, url, &[], Bytes::new(), max_bytes).await
    }

    /// A request with a body of any type (a multipart upload); the answer is JSON-sized.
    pub async fn send_body(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        content_type: &str,
        body: Bytes,
    ) -> Result<HttpResponse, HttpError> {
        let mut all: Vec<(&str, &str)> = vec![("content-type", content_type)];
        all.extend_from_slice(headers);
        self.request(method, url, &all, body, MAX_JSON_BODY).await
    }

    /// Any request: the caller's headers win over the defaults (`accept: application/json`, and
    /// `content-type: application/json` for a body); the answer is read up to `max_bytes`.
    pub async fn request(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        max_bytes: usize,
    ) -> Result<HttpResponse, HttpError> {
        let (uri, _) = check_url(url, "https", "http")?;
        let shown = redact(url);
        let mut req = Request::builder().method(method).uri(uri);
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("accept")) {
            req = req.header("accept", "application/json");
        }
        if !body.is_empty() && !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-type")) {
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
            read_answer(resp, max_bytes, &shown).await
        };
        tokio::time::timeout(self.timeout, call).await.map_err(|_| HttpError::Timeout(shown.clone()))?
    }
}

/// A response read whole, up to `max_bytes`; `shown` names its URL in errors.
async fn read_answer<B>(resp: http::Response<B>, max_bytes: usize, shown: &str) -> Result<HttpResponse, HttpError>
where
    B: hyper::body::Body,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let (status, headers) = (resp.status(), resp.headers().clone());
    let collected = Limited::new(resp.into_body(), max_bytes).collect().await.map_err(|e| {
        if e.is::<http_body_util::LengthLimitError>() {
            HttpError::TooLarge(shown.to_owned())
        } else {
            HttpError::Transport { url: shown.to_owned(), reason: e.to_string() }
        }
    })?;
    Ok(HttpResponse { status, headers, body: collected.to_bytes() })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_roots_take_pem_certificates_and_refuse_anything_else() {
        let ca = rcgen::generate_simple_self_signed(vec!["gateway.test".to_owned()]).expect("test certificate");
        let pem = ca.cert.pem();
        assert_eq!(parse_pem_roots(&pem).map(|c| c.len()), Ok(1));
        assert_eq!(parse_pem_roots(&format!("{pem}\n{pem}")).map(|c| c.len()), Ok(2));
        let none = parse_pem_roots("not a certificate").expect_err("no PEM block");
        assert!(none.contains("BEGIN CERTIFICATE"), "{none}");
        let broken = pem.replace("\n", "\n!");
        assert!(parse_pem_roots(&broken).is_err());
        // A private key is not a certificate and must not be taken as one.
        assert!(parse_pem_roots(&ca.signing_key.serialize_pem()).is_err());
    }
}
