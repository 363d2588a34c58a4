//! The Stream client: keeps one live connection to the gateway, forever.
//!
//! A supervisor owns the connection lifecycle; each connection is driven by its own task that
//! reads frames, answers SYSTEM pings, ACKs callbacks once the pipeline has taken the message,
//! and watches two clocks (both monotonic): the idle window (no gateway frame of any kind, even
//! if WebSocket pings are answered, means the socket is a zombie) and the pong deadline.
//!
//! On SYSTEM `disconnect` the supervisor opens the next connection *before* letting go of the
//! old one (make-before-break) and keeps reading the old until it closes or `drain_ms` passes.
//! Reconnecting never stops; a burst of attempts is reported as a reconnect storm.
//!
//! Never logs frame data or message text; a frame is named by its type, topic and messageId.

use std::{
    collections::VecDeque,
    num::NonZeroU32,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{SinkExt, StreamExt};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rand::{SeedableRng, rngs::StdRng};
use tokio::{
    sync::mpsc,
    time::{Instant, sleep_until, timeout},
};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::health::Beat;

use super::{
    backoff::Backoff,
    frame::{self, AckCode, FrameType, MAX_FRAME_BYTES, StreamFrame, TOPIC_ROBOT},
    gateway::{self, OpenError, Socket},
    http::HttpClient,
    message::RobotMessage,
    settings::Settings,
};

/// Open calls allowed back to back before the one-per-second pace applies.
const OPEN_BURST: NonZeroU32 = NonZeroU32::new(5).expect("5 is not zero");

/// A robot message handed to the pipeline, with the means to ACK it on the connection it came in on.
#[derive(Debug)]
pub struct Inbound {
    pub message: RobotMessage,
    pub ack: AckHandle,
}

/// ACKs one callback frame. Dropping it without calling [`AckHandle::ack`] leaves the frame
/// unacknowledged, so the gateway delivers it again.
#[derive(Debug)]
pub struct AckHandle {
    out: mpsc::Sender<String>,
    message_id: String,
}

impl AckHandle {
    pub fn ack(self) {
        // A full or closed queue means the connection is gone: the gateway redelivers and dedupe absorbs it.
        let _ = self.out.try_send(frame::callback_ack(&self.message_id, AckCode::Ok));
    }
}

/// Live figures of the channel, read by `/status` and the health service.
#[derive(Debug, Default)]
pub struct StreamStatus {
    pub connected: AtomicBool,
    pub storm: AtomicBool,
    pub connects: AtomicU64,
    pub attempts: AtomicU64,
    pub failures: AtomicU64,
    pub frames: AtomicU64,
    pub bad_frames: AtomicU64,
    pub pings_answered: AtomicU64,
    pub disconnects: AtomicU64,
    pub idle_kills: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl StreamStatus {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|g| g.clone()).unwrap_or(None)
    }
    fn set_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }
}

enum ConnEvent {
    Connected(Conn),
    ConnectFailed(OpenError),
    FirstFrame(u64),
    Disconnect(u64),
    Closed { id: u64, reason: String },
}

struct Conn {
    id: u64,
    stop: CancellationToken,
}

struct Draining {
    conn: Conn,
    until: Instant,
}

/// Everything a connection task needs, shared.
struct Shared {
    /// Paces open-connection calls even when no backoff applies (a gateway that sends
    /// `disconnect` right after every connect must not make us hammer the open API).
    opens: DefaultDirectRateLimiter,
    settings: Settings,
    http: HttpClient,
    tls: Arc<rustls::ClientConfig>,
    status: Arc<StreamStatus>,
    inbox: mpsc::Sender<Inbound>,
}

pub struct StreamClient {
    shared: Arc<Shared>,
    rng: StdRng,
}

impl StreamClient {
    pub fn new(
        settings: Settings,
        http: HttpClient,
        tls: Arc<rustls::ClientConfig>,
        inbox: mpsc::Sender<Inbound>,
        status: Arc<StreamStatus>,
    ) -> Self {
        let opens = RateLimiter::direct(Quota::per_second(NonZeroU32::MIN).allow_burst(OPEN_BURST));
        StreamClient {
            shared: Arc::new(Shared { opens, settings, http, tls, status, inbox }),
            rng: StdRng::from_os_rng(),
        }
    }

    /// Use a seeded RNG for the reconnect jitter (tests).
    pub fn with_rng(mut self, rng: StdRng) -> Self {
        self.rng = rng;
        self
    }

    /// Run until `cancel` fires. Never returns on its own. `beat` is checked in at every turn
    /// of the supervisor loop and at least every `beat_every`.
    pub async fn run(self, cancel: CancellationToken, beat: Option<(Arc<Beat>, Duration)>) {
        let StreamClient { shared, rng } = self;
        let started = Instant::now();
        let beat_every = beat.as_ref().map_or(Duration::from_secs(3600), |(_, d)| *d);
        let st = &shared.settings.stream;
        let mut backoff = Backoff::new(st.backoff_initial_ms.get(), st.backoff_max_ms.get(), rng);
        let (ev_tx, mut ev_rx) = mpsc::channel::<ConnEvent>(64);
        let tasks = TaskTracker::new();
        let mut next_id: u64 = 0;
        let mut primary: Option<Conn> = None;
        let mut draining: Vec<Draining> = Vec::new();
        let mut connecting = false;
        let mut next_attempt: Option<Instant> = Some(Instant::now());
        let mut recent_attempts: VecDeque<Instant> = VecDeque::new();
        let far = || Instant::now() + Duration::from_secs(86_400);

        loop {
            if let Some((b, _)) = &beat {
                b.tick();
            }
            crate::health::test_hang_point("stream", started).await;
            let drain_deadline = draining.iter().map(|d| d.until).min();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(beat_every) => {}
                _ = sleep_until(next_attempt.unwrap_or_else(far)), if next_attempt.is_some() && !connecting => {
                    next_attempt = None;
                    connecting = true;
                    next_id += 1;
                    let now = Instant::now();
                    recent_attempts.push_back(now);
                    while recent_attempts.front().is_some_and(|t| now.duration_since(*t) > st.storm_window_ms.get()) {
                        recent_attempts.pop_front();
                    }
                    shared.status.attempts.fetch_add(1, Ordering::Relaxed);
                    if recent_attempts.len() >= st.storm_attempts as usize && !shared.status.storm.swap(true, Ordering::Relaxed) {
                        log::error!(
                            "reconnect storm: {} connection attempts in {:?}; still retrying (last error: {})",
                            recent_attempts.len(), st.storm_window_ms.get(),
                            shared.status.last_error().unwrap_or_else(|| "none".into())
                        );
                    }
                    tasks.spawn(connect(next_id, shared.clone(), ev_tx.clone(), cancel.child_token(), tasks.clone()));
                }
                _ = sleep_until(drain_deadline.unwrap_or_else(far)), if drain_deadline.is_some() => {
                    let now = Instant::now();
                    for d in draining.iter().filter(|d| d.until <= now) {
                        log::info!("closing connection {} after the drain period", d.conn.id);
                        d.conn.stop.cancel();
                    }
                    // Keep them listed until their task reports Closed.
                    for d in draining.iter_mut().filter(|d| d.until <= now) {
                        d.until = far();
                    }
                }
                Some(ev) = ev_rx.recv() => match ev {
                    ConnEvent::Connected(conn) => {
                        connecting = false;
                        shared.status.connects.fetch_add(1, Ordering::Relaxed);
                        shared.status.connected.store(true, Ordering::Relaxed);
                        log::info!("stream connection {} established", conn.id);
                        if let Some(old) = primary.replace(conn) {
                            draining.push(Draining { conn: old, until: Instant::now() + st.drain_ms.get() });
                        }
                    }
                    ConnEvent::ConnectFailed(err) => {
                        connecting = false;
                        shared.status.failures.fetch_add(1, Ordering::Relaxed);
                        let delay = backoff.next_delay();
                        log::warn!("stream connect failed: {err}; retrying in {delay:?} (attempt {})", backoff.attempts());
                        shared.status.set_error(err.to_string());
                        if primary.is_none() {
                            shared.status.connected.store(false, Ordering::Relaxed);
                        }
                        next_attempt = Some(Instant::now() + delay);
                    }
                    ConnEvent::FirstFrame(id) => {
                        if primary.as_ref().is_some_and(|p| p.id == id) {
                            backoff.reset();
                            if shared.status.storm.swap(false, Ordering::Relaxed) {
                                log::info!("reconnect storm over: connection {id} is receiving frames");
                            }
                        }
                    }
                    ConnEvent::Disconnect(id) => {
                        if primary.as_ref().is_some_and(|p| p.id == id) {
                            shared.status.disconnects.fetch_add(1, Ordering::Relaxed);
                            log::info!("gateway asked connection {id} to disconnect; opening the next one before closing it");
                            if let Some(old) = primary.take() {
                                draining.push(Draining { conn: old, until: Instant::now() + st.drain_ms.get() });
                            }
                            if !connecting {
                                next_attempt = Some(Instant::now());
                            }
                        }
                    }
                    ConnEvent::Closed { id, reason } => {
                        if primary.as_ref().is_some_and(|p| p.id == id) {
                            primary = None;
                            shared.status.connected.store(false, Ordering::Relaxed);
                            shared.status.set_error(reason.clone());
                            let delay = backoff.next_delay();
                            log::warn!("stream connection {id} lost: {reason}; reconnecting in {delay:?}");
                            if !connecting {
                                next_attempt = Some(Instant::now() + delay);
                            }
                        } else {
                            draining.retain(|d| d.conn.id != id);
                            log::info!("stream connection {id} closed: {reason}");
                        }
                    }
                },
            }
            if primary.is_none() && !connecting && next_attempt.is_none() {
                next_attempt = Some(Instant::now() + backoff.next_delay());
            }
        }
        if let Some(p) = primary.take() {
            p.stop.cancel();
        }
        for d in draining {
            d.conn.stop.cancel();
        }
        tasks.close();
        tasks.wait().await;
        shared.status.connected.store(false, Ordering::Relaxed);
    }
}

async fn connect(
    id: u64,
    shared: Arc<Shared>,
    events: mpsc::Sender<ConnEvent>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let opened = tokio::select! {
        _ = stop.cancelled() => return,
        r = async {
            shared.opens.until_ready().await;
            gateway::open(&shared.settings, &shared.http, &shared.tls).await
        } => r,
    };
    match opened {
        Ok(socket) => {
            tasks.spawn(drive(id, socket, shared, events.clone(), stop.clone()));
            let _ = events.send(ConnEvent::Connected(Conn { id, stop })).await;
        }
        Err(e) => {
            let _ = events.send(ConnEvent::ConnectFailed(e)).await;
        }
    }
}

/// What a frame asks of the connection loop.
enum Next {
    Continue,
    Disconnect,
    /// Write this frame back at once (ping echo, ACK of a frame that needs no processing).
    Reply(String),
}

async fn drive(id: u64, socket: Socket, shared: Arc<Shared>, events: mpsc::Sender<ConnEvent>, stop: CancellationToken) {
    let st = &shared.settings.stream;
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(256);
    let mut last_frame = Instant::now();
    let mut seen_frame = false;
    let mut ping_sent: Option<Instant> = None;
    let mut next_ping = Instant::now() + st.keepalive_ms.get();
    let write_limit = st.connect_timeout_ms.get();

    let reason: String = loop {
        let idle_deadline = last_frame + st.idle_window_ms.get();
        let pong_deadline = ping_sent.map(|t| t + st.pong_timeout_ms.get()).unwrap_or(idle_deadline);
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = timeout(write_limit, sink.send(Message::Close(None))).await;
                break "closed by us".into();
            }
            _ = sleep_until(idle_deadline) => {
                shared.status.idle_kills.fetch_add(1, Ordering::Relaxed);
                break format!("no frame from the gateway for {:?} (zombie connection)", st.idle_window_ms.get());
            }
            _ = sleep_until(pong_deadline), if ping_sent.is_some() => {
                break format!("no pong within {:?}", st.pong_timeout_ms.get());
            }
            _ = sleep_until(next_ping) => {
                next_ping = Instant::now() + st.keepalive_ms.get();
                if ping_sent.is_none() {
                    if timeout(write_limit, sink.send(Message::Ping(Default::default()))).await.map_or(true, |r| r.is_err()) {
                        break "keepalive ping could not be written".into();
                    }
                    ping_sent = Some(Instant::now());
                }
            }
            Some(out) = out_rx.recv() => {
                if timeout(write_limit, sink.send(Message::Text(out.into()))).await.map_or(true, |r| r.is_err()) {
                    break "ACK could not be written".into();
                }
            }
            msg = stream.next() => match msg {
                None => break "the gateway closed the socket".into(),
                Some(Err(e)) => break format!("socket error: {e}"),
                Some(Ok(Message::Pong(_))) => ping_sent = None,
                Some(Ok(Message::Ping(_))) | Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Close(c))) => break format!("the gateway sent close {}", c.map(|c| c.code.to_string()).unwrap_or_default()),
                Some(Ok(Message::Binary(b))) => {
                    last_frame = Instant::now();
                    shared.status.bad_frames.fetch_add(1, Ordering::Relaxed);
                    log::warn!("connection {id}: ignoring a binary frame of {} bytes (the protocol uses text frames)", b.len());
                }
                Some(Ok(Message::Text(text))) => {
                    last_frame = Instant::now();
                    if !seen_frame {
                        seen_frame = true;
                        let _ = events.send(ConnEvent::FirstFrame(id)).await;
                    }
                    match handle_text(id, text.as_str(), &shared, &out_tx).await {
                        Next::Continue => {}
                        Next::Disconnect => {
                            let _ = events.send(ConnEvent::Disconnect(id)).await;
                        }
                        Next::Reply(r) => {
                            if timeout(write_limit, sink.send(Message::Text(r.into()))).await.map_or(true, |r| r.is_err()) {
                                break "reply frame could not be written".into();
                            }
                        }
                    }
                }
            }
        }
    };
    let _ = events.send(ConnEvent::Closed { id, reason }).await;
}

/// Handle one text frame.
async fn handle_text(id: u64, text: &str, shared: &Shared, out: &mpsc::Sender<String>) -> Next {
    let status = &shared.status;
    status.frames.fetch_add(1, Ordering::Relaxed);
    if text.len() > MAX_FRAME_BYTES {
        status.bad_frames.fetch_add(1, Ordering::Relaxed);
        let mid = message_id_of(text);
        log::warn!(
            "connection {id}: frame {} of {} bytes exceeds the 1 MiB limit; refused with code 500",
            mid.as_deref().unwrap_or("(no messageId)"),
            text.len()
        );
        return mid.map_or(Next::Continue, |m| Next::Reply(frame::callback_ack(&m, AckCode::Failed)));
    }
    let frame = match StreamFrame::parse(text) {
        Ok(f) => f,
        Err(e) => {
            status.bad_frames.fetch_add(1, Ordering::Relaxed);
            log::warn!("connection {id}: unusable frame ({e}); ignored");
            return Next::Continue;
        }
    };
    match (&frame.kind, frame.topic.as_str()) {
        (FrameType::System, "ping") => {
            status.pings_answered.fetch_add(1, Ordering::Relaxed);
            Next::Reply(frame::ping_ack(&frame))
        }
        (FrameType::System, "disconnect") => Next::Disconnect,
        (FrameType::System, topic) => {
            log::debug!("connection {id}: SYSTEM frame {topic:?} needs no answer");
            Next::Continue
        }
        (FrameType::Callback, TOPIC_ROBOT) => {
            let message = match RobotMessage::parse(&frame.data) {
                Ok(m) => m,
                Err(e) => {
                    status.bad_frames.fetch_add(1, Ordering::Relaxed);
                    log::warn!(
                        "connection {id}: robot frame {} is unusable ({e}); ACKed so it is not redelivered",
                        frame.message_id
                    );
                    return Next::Reply(frame::callback_ack(&frame.message_id, AckCode::Ok));
                }
            };
            let inbound =
                Inbound { message, ack: AckHandle { out: out.clone(), message_id: frame.message_id.clone() } };
            // Backpressure: wait a bounded time for the pipeline; unACKed frames come back later.
            if timeout(shared.settings.stream.connect_timeout_ms.get(), shared.inbox.send(inbound))
                .await
                .map_or(true, |r| r.is_err())
            {
                log::warn!("connection {id}: pipeline busy, frame {} left unACKed for redelivery", frame.message_id);
            }
            Next::Continue
        }
        (FrameType::Callback, topic) => {
            log::warn!("connection {id}: CALLBACK on unsubscribed topic {topic:?}; answered 404");
            Next::Reply(frame::callback_ack(&frame.message_id, AckCode::UnknownTopic))
        }
        (FrameType::Event, _) => Next::Reply(frame::event_ack(&frame.message_id, true)),
        (FrameType::Other(kind), topic) => {
            log::warn!("connection {id}: unknown frame type {kind:?} (topic {topic:?}); ignored");
            Next::Continue
        }
    }
}

/// Pull the messageId out of a frame too large to parse as a whole.
fn message_id_of(text: &str) -> Option<String> {
    let at = text.find("\"messageId\"")?;
    let rest = &text[at + "\"messageId\"".len()..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    let id = &rest[..end];
    (id.len() <= 128).then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_of_large_frames() {
        assert_eq!(message_id_of(r#"{"headers":{"messageId" : "abc"},"data":"..."}"#).as_deref(), Some("abc"));
        assert_eq!(message_id_of(r#"{"headers":{}}"#), None);
    }
}
