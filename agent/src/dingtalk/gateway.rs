//! Opening one Stream connection: the `connections/open` call that trades credentials for an
//! endpoint and a single-use ticket, then the WebSocket handshake with that ticket, over rustls
//! unless the endpoint is loopback.
//!
//! Never puts the client secret or the ticket in an error or a log line.

use std::{sync::Arc, time::Duration};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_tungstenite::{WebSocketStream, tungstenite::protocol::WebSocketConfig};

use super::{
    frame::{MAX_FRAME_BYTES, TOPIC_ROBOT},
    http::{HttpClient, HttpError, error_chain, redact},
    settings::{Settings, Transport, UrlError, check_url},
};

/// Any byte stream a WebSocket can run over (TCP, or TLS over TCP).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Socket = WebSocketStream<Box<dyn Io>>;

/// Path of the open-connection call under the API base.
pub const OPEN_PATH: &str = "/v1.0/gateway/connections/open";

/// The WebSocket layer accepts a little more than the frame limit, so an oversized frame
/// reaches the parser and gets a clear log line instead of killing the socket.
const WS_MESSAGE_LIMIT: usize = 4 * MAX_FRAME_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("open-connection call failed: {0}")]
    Http(#[from] HttpError),
    #[error(
        "the gateway refused the credentials (HTTP {status}{detail}); check [dingtalk] client_id and client_secret and that the app has Stream mode enabled"
    )]
    Refused { status: u16, detail: String },
    #[error("the gateway answered the open-connection call with HTTP {status}{detail}")]
    Status { status: u16, detail: String },
    #[error("the open-connection answer has no {0}")]
    BadAnswer(&'static str),
    #[error("the gateway's endpoint is not acceptable: {0}")]
    Endpoint(#[from] UrlError),
    #[error("TCP connect to {addr} failed: {reason}")]
    Connect { addr: String, reason: String },
    #[error("TLS handshake with {host} failed: {reason}")]
    Tls { host: String, reason: String },
    #[error("WebSocket handshake with {endpoint} failed: {reason}")]
    Handshake { endpoint: String, reason: String },
    #[error("opening the connection took longer than {0:?}")]
    Timeout(Duration),
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OpenRequest<'a> {
    client_id: &'a str,
    client_secret: &'a str,
    subscriptions: [Subscription; 1],
    ua: &'static str,
}

#[derive(Serialize)]
struct Subscription {
    #[serde(rename = "type")]
    kind: &'static str,
    topic: &'static str,
}

#[derive(Deserialize)]
struct OpenAnswer {
    endpoint: Option<String>,
    ticket: Option<String>,
}

/// Short, secret-free description of an error body (`code`/`message` fields only).
fn detail(body: &serde_json::Value) -> String {
    let code = body.get("code").and_then(|v| v.as_str()).unwrap_or_default();
    let msg = body.get("message").and_then(|v| v.as_str()).unwrap_or_default();
    match (code.is_empty(), msg.is_empty()) {
        (true, true) => String::new(),
        _ => format!(": {code} {msg}").trim_end().chars().take(200).collect(),
    }
}

/// Open one connection: HTTP open call, then the WebSocket handshake with the ticket.
pub async fn open(
    settings: &Settings,
    http: &HttpClient,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<Socket, OpenError> {
    let limit = settings.stream.connect_timeout_ms.get();
    let work = async {
        let req = OpenRequest {
            client_id: settings.client_id.as_str(),
            client_secret: settings.client_secret.expose(),
            subscriptions: [Subscription { kind: "CALLBACK", topic: TOPIC_ROBOT }],
            ua: concat!("zhuli/", env!("CARGO_PKG_VERSION")),
        };
        let resp = http.post_json(&settings.api_base.join(OPEN_PATH), &[], &req).await?;
        let status = resp.status.as_u16();
        if status == 401 || status == 403 {
            return Err(OpenError::Refused { status, detail: detail(&resp.json()) });
        }
        if !resp.status.is_success() {
            return Err(OpenError::Status { status, detail: detail(&resp.json()) });
        }
        let answer: OpenAnswer = serde_json::from_slice(&resp.body).map_err(|_| OpenError::BadAnswer("JSON body"))?;
        let endpoint = answer.endpoint.filter(|s| !s.is_empty()).ok_or(OpenError::BadAnswer("endpoint"))?;
        let ticket = answer.ticket.filter(|s| !s.is_empty()).ok_or(OpenError::BadAnswer("ticket"))?;
        connect_ws(&endpoint, &ticket, tls).await
    };
    tokio::time::timeout(limit, work).await.map_err(|_| OpenError::Timeout(limit))?
}

fn encode_query_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn connect_ws(endpoint: &str, ticket: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Socket, OpenError> {
    let (uri, transport) = check_url(endpoint, "wss", "ws")?;
    let host = uri.host().ok_or(OpenError::BadAnswer("endpoint host"))?.trim_matches(['[', ']']).to_owned();
    let port = uri.port_u16().unwrap_or(if transport == Transport::Tls { 443 } else { 80 });
    let sep = if endpoint.contains('?') { '&' } else { '?' };
    let url = format!("{endpoint}{sep}ticket={}", encode_query_value(ticket));
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| OpenError::Connect { addr: format!("{host}:{port}"), reason: e.to_string() })?;
    let _ = tcp.set_nodelay(true);
    let io: Box<dyn Io> = match transport {
        Transport::Plain => Box::new(tcp),
        Transport::Tls => {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| OpenError::Tls { host: host.clone(), reason: e.to_string() })?;
            let stream = tokio_rustls::TlsConnector::from(tls.clone())
                .connect(name, tcp)
                .await
                .map_err(|e| OpenError::Tls { host: host.clone(), reason: error_chain(&e) })?;
            Box::new(stream)
        }
    };
    let config =
        WebSocketConfig::default().max_message_size(Some(WS_MESSAGE_LIMIT)).max_frame_size(Some(WS_MESSAGE_LIMIT));
    let (socket, _response) = tokio_tungstenite::client_async_with_config(url, io, Some(config))
        .await
        .map_err(|e| OpenError::Handshake { endpoint: redact(endpoint), reason: error_chain(&e) })?;
    Ok(socket)
}
