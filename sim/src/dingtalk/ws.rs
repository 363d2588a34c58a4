//! The simulator's Stream WebSocket: ticket check at the handshake, delivery, SYSTEM pings,
//! disconnect with a grace period, and the connection faults.

use std::{sync::Arc, time::Duration};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    time::{Instant, sleep_until},
};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{ErrorResponse, Request, Response},
    protocol::frame::{
        Frame,
        coding::{Data, OpCode},
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    ConnMode, RecordedAck, Shared, SimConn,
    cut::{CutStream, CutSwitch},
    now_ms,
};

#[derive(Debug)]
pub(super) enum Cmd {
    Send {
        text: String,
        cut_at: Option<usize>,
    },
    /// A text frame whose payload is not UTF-8.
    SendInvalidUtf8(Vec<u8>),
    Disconnect {
        grace: Duration,
    },
    Mode(ConnMode),
    Drop,
}

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken, tasks: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((tcp, _)) => {
                tasks.spawn(connection(tcp, shared.clone(), cancel.clone()));
            }
            Err(e) => {
                log::warn!("sim: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn ticket_of(req: &Request) -> Option<String> {
    let q = req.uri().query()?;
    q.split('&').find_map(|kv| kv.strip_prefix("ticket=")).map(|t| t.replace("%2D", "-"))
}

async fn connection(tcp: TcpStream, shared: Arc<Shared>, cancel: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let switch = CutSwitch::default();
    let stream = CutStream::new(tcp, switch.clone());
    let mut topics = Vec::new();
    // The callback's signature is tungstenite's; its error type is an HTTP response.
    #[allow(clippy::result_large_err)]
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        let mut st = shared.lock();
        let ticket = ticket_of(req);
        let valid = ticket
            .as_ref()
            .and_then(|t| st.tickets.remove(t))
            .filter(|(issued, _)| issued.elapsed() <= shared.cfg.ticket_ttl);
        match valid {
            Some((_, subs)) => {
                topics = subs;
                Ok(resp)
            }
            None => {
                st.counters.ws_rejected += 1;
                let body =
                    json!({"code": "InvalidTicket", "message": "ticket is unknown, used or expired"}).to_string();
                let mut r = ErrorResponse::new(Some(body));
                *r.status_mut() = http::StatusCode::UNAUTHORIZED;
                Err(r)
            }
        }
    };
    let ws = match tokio_tungstenite::accept_hdr_async(stream, check).await {
        Ok(ws) => ws,
        Err(_) => return,
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let id = {
        let mut st = shared.lock();
        st.counters.ws_accepted += 1;
        st.next_conn += 1;
        let id = st.next_conn;
        let mode = st.faults.next_conn_mode.unwrap_or(ConnMode::Healthy);
        st.conns.insert(id, SimConn { tx, mode, topics, opened_at: Instant::now() });
        st.counters.max_concurrent = st.counters.max_concurrent.max(st.conns.len() as u64);
        shared.pump(&mut st);
        id
    };
    shared.touch();

    // Reading and writing are independent, as on the real gateway: a client that is slow to
    // read does not keep its ACKs from being read.
    let (mut ws, mut incoming) = ws.split();
    let frozen = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (closed_tx, mut closed) = tokio::sync::oneshot::channel::<()>();
    let reader = {
        let (shared, frozen) = (shared.clone(), frozen.clone());
        tokio::spawn(async move {
            loop {
                if frozen.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                match tokio::time::timeout(Duration::from_millis(50), incoming.next()).await {
                    Err(_) => continue,
                    Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => break,
                    Ok(Some(Ok(Message::Text(t)))) => client_frame(&shared, id, t.as_str()),
                    Ok(Some(Ok(_))) => {}
                }
            }
            let _ = closed_tx.send(());
        })
    };
    let ping_every = shared.cfg.ping_interval;
    let mut next_ping = ping_every.map(|p| Instant::now() + p);
    let mut close_at: Option<Instant> = None;
    let mut mode = shared.lock().conns.get(&id).map(|c| c.mode).unwrap_or(ConnMode::Healthy);
    frozen.store(mode == ConnMode::Frozen, std::sync::atomic::Ordering::Relaxed);
    let far = || Instant::now() + Duration::from_secs(86_400);

    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = sleep_until(close_at.unwrap_or_else(far)), if close_at.is_some() => {
                let _ = ws.send(Message::Close(None)).await;
                let _ = ws.close().await;
                break;
            }
            _ = sleep_until(next_ping.unwrap_or_else(far)), if next_ping.is_some() && mode == ConnMode::Healthy => {
                next_ping = ping_every.map(|p| Instant::now() + p);
                let (mid, opaque) = {
                    let mut st = shared.lock();
                    st.counters.pings_sent += 1;
                    let mid = Shared::next_id(&mut st, "ping");
                    let opaque = Shared::next_id(&mut st, "opaque");
                    st.pings_outstanding.insert(mid.clone(), opaque.clone());
                    (mid, opaque)
                };
                let frame = json!({
                    "specVersion": "1.0", "type": "SYSTEM",
                    "headers": {"contentType": "application/json", "messageId": mid, "time": now_ms().to_string(), "topic": "ping"},
                    "data": json!({"opaque": opaque}).to_string(),
                });
                if !send_within(&shared, &mut ws, Message::Text(frame.to_string().into())).await {
                    break;
                }
            }
            cmd = rx.recv() => match cmd {
                None | Some(Cmd::Drop) => break,
                Some(Cmd::Mode(m)) => {
                    mode = m;
                    frozen.store(m == ConnMode::Frozen, std::sync::atomic::Ordering::Relaxed);
                }
                Some(Cmd::Send { text, cut_at }) => {
                    if mode == ConnMode::Healthy {
                        if let Some(n) = cut_at {
                            switch.cut_after(n);
                        }
                        if !send_within(&shared, &mut ws, Message::Text(text.into())).await {
                            break;
                        }
                    }
                }
                Some(Cmd::SendInvalidUtf8(bytes)) => {
                    let frame = Frame::message(bytes, OpCode::Data(Data::Text), true);
                    if !send_within(&shared, &mut ws, Message::Frame(frame)).await {
                        break;
                    }
                }
                Some(Cmd::Disconnect { grace }) => {
                    mode = ConnMode::Disconnecting;
                    let frame = json!({
                        "specVersion": "1.0", "type": "SYSTEM",
                        "headers": {"contentType": "application/json", "messageId": format!("disc{id}"), "time": now_ms().to_string(), "topic": "disconnect"},
                        "data": json!({"reason": "gateway maintenance"}).to_string(),
                    });
                    if !send_within(&shared, &mut ws, Message::Text(frame.to_string().into())).await {
                        break;
                    }
                    close_at = Some(Instant::now() + grace);
                }
            },
            _ = &mut closed => break,
        }
    }
    reader.abort();
    let mut st = shared.lock();
    if let Some(c) = st.conns.remove(&id) {
        log::debug!("sim: connection {id} ended after {:?}", c.opened_at.elapsed());
    }
    shared.requeue_conn(&mut st, id);
    shared.pump(&mut st);
    drop(st);
    shared.touch();
}

/// Write one frame within the gateway's send timeout; false: the connection is to be dropped.
async fn send_within<S>(shared: &Shared, ws: &mut S, message: Message) -> bool
where
    S: futures_util::Sink<Message> + Unpin,
{
    match tokio::time::timeout(shared.cfg.send_timeout, ws.send(message)).await {
        Ok(r) => r.is_ok(),
        Err(_) => {
            shared.lock().counters.send_timeouts += 1;
            log::debug!("sim: a write did not complete within {:?}; dropping the connection", shared.cfg.send_timeout);
            false
        }
    }
}

/// An upstream frame: an ACK of a callback or the echo of a ping.
fn client_frame(shared: &Shared, conn: u64, text: &str) {
    let mut st = shared.lock();
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        st.counters.client_frames_unparsed += 1;
        return;
    };
    let mid = v["headers"]["messageId"].as_str().unwrap_or_default().to_owned();
    let code = v["code"].as_i64().unwrap_or(0);
    let data = v["data"].as_str().unwrap_or_default().to_owned();
    if let Some(opaque) = st.pings_outstanding.remove(&mid) {
        let echoed: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
        if code == 200 && echoed["opaque"].as_str() == Some(opaque.as_str()) {
            st.counters.pings_echoed += 1;
        } else {
            st.counters.ping_echo_mismatch += 1;
        }
    } else if code == 200 {
        st.inflight.remove(&mid);
        if let Some(at) = st.queued_at.remove(&mid) {
            st.counters.acked += 1;
            let us = at.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
            st.ack_latencies_us.push(us);
        }
    }
    st.acks.push(RecordedAck { conn, message_id: mid, code, data });
    drop(st);
    shared.touch();
}
