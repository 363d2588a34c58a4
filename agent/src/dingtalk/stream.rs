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
    out: mpsc::UnboundedSender<String>,
    message_id: String,
}

impl AckHandle {
    pub fn ack(self) {
        // The queue holds at most one ACK per frame read; it is closed only when the connection
        // is gone, and then the gateway redelivers and dedupe absorbs it.
        let _ = self.out.send(frame::callback_ack(&self.message_id, AckCode::Ok));
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
    /// Robot frames left unACKed because the store had not recorded the ones before them
    /// (the recorder's queue was full): the store is failing or far too slow.
    pub unrecorded: AtomicU64,
    /// Quiet limit in force on the newest connection, in ms (learned from the gateway's pings).
    pub quiet_limit_ms: AtomicU64,
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
    /// Write this frame back at once (ACK of a frame that needs no processing).
    Reply(String),
    /// A gateway ping: echo it at once (and learn the gateway's ping interval).
    Ping(String),
    /// A robot message for the recorder.
    Queue(Box<Inbound>),
}

/// Longest pause in reading while the store takes no message; the gateway drops a connection
/// whose writes block for 5 s. A frame the store has not taken by then is left unACKed.
const STALL_LIMIT: Duration = Duration::from_secs(3);

/// A robot frame the store did not take: left unACKed (the gateway delivers it again), counted,
/// and logged (the first, then at powers of two); the admins hear of it from the monitor.
fn unrecorded(id: u64, status: &StreamStatus, inbound: &Inbound, why: &str) {
    let n = status.unrecorded.fetch_add(1, Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log::error!(
            "connection {id}: frame {} left unACKed: {why} ({n} so far); the store is not recording messages",
            inbound.ack.message_id
        );
    }
}

/// ACKs written with one flush, at most.
const ACKS_PER_FLUSH: usize = 255;

/// How long a connection may stay quiet before it is taken for a zombie. A gateway that holds an
/// undelivered message for about 60 s and pings every `p` must be found dead well inside those
/// 60 s: once two pings have shown `p`, the limit is 1.5 × the longest gap seen + 1 s (31 s for
/// 20 s pings), never more than the configured `idle_window_ms`.
/// A learned limit is never below `floor` (our own keepalive plus its pong timeout), so a first
/// ping read late cannot make a healthy connection look dead.
struct QuietLimit {
    configured: Duration,
    floor: Duration,
    last_ping: Option<Instant>,
    longest_gap: Option<Duration>,
}

impl QuietLimit {
    fn new(configured: Duration, floor: Duration) -> Self {
        QuietLimit { configured, floor, last_ping: None, longest_gap: None }
    }

    /// Reading paused this long (the store was not taking messages): not part of any gap.
    fn paused(&mut self, pause: Duration) {
        if let Some(last) = &mut self.last_ping {
            *last += pause;
        }
    }

    /// A gateway ping arrived; true if the limit changed.
    fn ping(&mut self, at: Instant) -> bool {
        let before = self.limit();
        if let Some(last) = self.last_ping.replace(at) {
            let gap = at.duration_since(last);
            self.longest_gap = Some(self.longest_gap.map_or(gap, |g| g.max(gap)));
        }
        self.limit() != before
    }

    fn limit(&self) -> Duration {
        match self.longest_gap {
            Some(gap) => (gap * 3 / 2 + Duration::from_secs(1)).max(self.floor).min(self.configured),
            None => self.configured,
        }
    }

    fn why(&self) -> String {
        match self.longest_gap {
            Some(gap) if self.limit() < self.configured => format!("the gateway pings every {gap:?}"),
            _ => "idle_window_ms".into(),
        }
    }
}

async fn drive(id: u64, socket: Socket, shared: Arc<Shared>, events: mpsc::Sender<ConnEvent>, stop: CancellationToken) {
    let st = &shared.settings.stream;
    let (mut sink, mut stream) = socket.split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<String>();
    let mut last_frame = Instant::now();
    let mut seen_frame = false;
    let mut ping_sent: Option<Instant> = None;
    // Anything read from the socket (frames, pongs), for the keepalive.
    let mut last_inbound = Instant::now();
    let mut next_ping = Instant::now() + st.keepalive_ms.get();
    let write_limit = st.connect_timeout_ms.get();
    let mut quiet = QuietLimit::new(st.idle_window_ms.get(), st.keepalive_ms.get() + st.pong_timeout_ms.get());
    shared.status.quiet_limit_ms.store(quiet.limit().as_millis() as u64, Ordering::Relaxed);

    // A robot message read while the recorder's queue was full: reading pauses (the socket's
    // buffers and the gateway hold the rest) until the store takes it, for `STALL_LIMIT` at most.
    let mut held: Option<(Inbound, Instant)> = None;

    let reason: String = loop {
        let idle_deadline = last_frame + quiet.limit();
        let pong_deadline = ping_sent.map(|t| t + st.pong_timeout_ms.get()).unwrap_or(idle_deadline);
        let paused = held.is_some();
        let held_until = held.as_ref().map(|(_, since)| *since + STALL_LIMIT);
        tokio::select! {
            permit = shared.inbox.reserve(), if paused => {
                let (inbound, since) = held.take().expect("paused means a frame is held");
                match permit {
                    Ok(permit) => permit.send(inbound),
                    Err(_) => unrecorded(id, &shared.status, &inbound, "the recorder has stopped"),
                }
                // Frames and pongs waiting in the socket were not late: we were not reading.
                let pause = since.elapsed();
                last_frame += pause;
                last_inbound += pause;
                quiet.paused(pause);
                ping_sent = ping_sent.map(|t| t + pause);
            }
            _ = sleep_until(held_until.unwrap_or_else(Instant::now)), if paused => {
                let (inbound, since) = held.take().expect("paused means a frame is held");
                unrecorded(id, &shared.status, &inbound, "the store has not taken a message for 3 s");
                let pause = since.elapsed();
                last_frame += pause;
                last_inbound += pause;
                quiet.paused(pause);
                ping_sent = ping_sent.map(|t| t + pause);
            }
            _ = stop.cancelled() => {
                let _ = timeout(write_limit, sink.send(Message::Close(None))).await;
                break "closed by us".into();
            }
            _ = sleep_until(idle_deadline), if !paused => {
                shared.status.idle_kills.fetch_add(1, Ordering::Relaxed);
                break format!("no frame from the gateway for {:?} (zombie connection; {})", quiet.limit(), quiet.why());
            }
            _ = sleep_until(pong_deadline), if ping_sent.is_some() && !paused => {
                break format!("no pong within {:?}", st.pong_timeout_ms.get());
            }
            _ = sleep_until(next_ping) => {
                next_ping = last_inbound.max(Instant::now()) + st.keepalive_ms.get();
                // Data arriving proves the connection alive; a ping is only needed when it is quiet
                // (under load our pong would queue behind the frames the gateway already sent).
                if ping_sent.is_none() && last_inbound.elapsed() >= st.keepalive_ms.get() {
                    if timeout(write_limit, sink.send(Message::Ping(Default::default()))).await.map_or(true, |r| r.is_err()) {
                        break "keepalive ping could not be written".into();
                    }
                    ping_sent = Some(Instant::now());
                }
            }
            Some(out) = out_rx.recv() => {
                // Every ACK queued so far goes out in one flush.
                let written = timeout(write_limit, async {
                    sink.feed(Message::Text(out.into())).await?;
                    for _ in 0..ACKS_PER_FLUSH {
                        match out_rx.try_recv() {
                            Ok(more) => sink.feed(Message::Text(more.into())).await?,
                            Err(_) => break,
                        }
                    }
                    sink.flush().await
                })
                .await;
                if written.map_or(true, |r| r.is_err()) {
                    break "ACK could not be written".into();
                }
            }
            msg = stream.next(), if !paused => match msg.inspect(|m| if m.is_ok() {
                last_inbound = Instant::now();
                ping_sent = None;
            }) {
                None => break "the gateway closed the socket".into(),
                Some(Err(e)) => break format!("socket error: {e}"),
                Some(Ok(Message::Pong(_))) => {}
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
                    let next = handle_text(id, text.as_str(), &shared, &out_tx);
                    if let Next::Ping(_) = &next
                        && quiet.ping(Instant::now())
                    {
                        shared.status.quiet_limit_ms.store(quiet.limit().as_millis() as u64, Ordering::Relaxed);
                    }
                    match next {
                        Next::Continue => {}
                        Next::Queue(inbound) => {
                            if let Err(e) = shared.inbox.try_send(*inbound) {
                                match e {
                                    mpsc::error::TrySendError::Full(inbound) => held = Some((inbound, Instant::now())),
                                    mpsc::error::TrySendError::Closed(inbound) => {
                                        unrecorded(id, &shared.status, &inbound, "the recorder has stopped")
                                    }
                                }
                            }
                        }
                        Next::Disconnect => {
                            let _ = events.send(ConnEvent::Disconnect(id)).await;
                        }
                        Next::Reply(r) | Next::Ping(r) => {
                            if timeout(write_limit, sink.send(Message::Text(r.into()))).await.map_or(true, |r| r.is_err()) {
                                break "reply frame could not be written".into();
                            }
                        }
                    }
                }
            }
        }
    };
    if let Some((inbound, _)) = held.take() {
        unrecorded(id, &shared.status, &inbound, "the connection ended while the store was not taking messages");
    }
    let _ = events.send(ConnEvent::Closed { id, reason }).await;
}

/// Handle one text frame. Never waits: a robot message is handed back for the recorder.
fn handle_text(id: u64, text: &str, shared: &Shared, out: &mpsc::UnboundedSender<String>) -> Next {
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
            Next::Ping(frame::ping_ack(&frame))
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
            Next::Queue(Box::new(inbound))
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

    #[test]
    fn the_quiet_limit_follows_the_gateways_pings_inside_the_configured_window() {
        let t0 = Instant::now();
        let mut q = QuietLimit::new(Duration::from_secs(40), Duration::from_secs(30));
        assert_eq!(q.limit(), Duration::from_secs(40), "no ping yet: the configured window");
        assert!(!q.ping(t0), "one ping shows no interval");
        assert!(q.ping(t0 + Duration::from_secs(20)));
        assert_eq!(q.limit(), Duration::from_secs(31), "20 s pings: 1.5 × 20 s + 1 s");
        assert!(q.why().contains("20s"), "{}", q.why());
        // A late ping widens the limit; an early one never narrows it again.
        q.ping(t0 + Duration::from_secs(44));
        assert_eq!(q.limit(), Duration::from_secs(37));
        q.ping(t0 + Duration::from_secs(45));
        assert_eq!(q.limit(), Duration::from_secs(37));
        // A pause in reading is not part of a gap.
        q.paused(Duration::from_secs(100));
        q.ping(t0 + Duration::from_secs(146));
        assert_eq!(q.limit(), Duration::from_secs(37));
        // A first gap that looks short never sets the limit below the floor.
        let mut early = QuietLimit::new(Duration::from_secs(40), Duration::from_secs(30));
        early.ping(t0);
        early.ping(t0 + Duration::from_secs(5));
        assert_eq!(early.limit(), Duration::from_secs(30));
        // Slow pings: never beyond the configured window.
        q.ping(t0 + Duration::from_secs(246));
        assert_eq!(q.limit(), Duration::from_secs(40));
        assert_eq!(q.why(), "idle_window_ms");
    }
}
