//! A DingTalk gateway on loopback, for tests, benchmarks, `zhuli-sim sim` and `zhuli-sim demo`.
//!
//! It serves what the agent (and DingTalk's official SDKs) talk to: the open-connection call,
//! the Stream WebSocket with single-use 90 s tickets, SYSTEM pings and disconnects, the token API,
//! session webhooks, the robot send APIs, the file-download API and the AI card APIs. It records
//! every ACK, every OpenAPI request and every reply, and injects messages of any msgtype and the
//! failures the field knows: a `disconnect` that leaves the socket open, zombie sockets that
//! answer WebSocket pings but deliver nothing, frozen sockets with no close, drops in the middle
//! of a frame, refused opens, throttling, malformed frames.
//!
//! Delivery follows the gateway's rules as documented: a callback goes to one healthy connection
//! subscribed to its topic; if it is not ACKed and that connection goes away, it is delivered
//! again on another; unACKed frames are also redelivered after `redeliver_after`.
//!
//! Binds 127.0.0.1 only. Error bodies use DingTalk's OpenAPI shape `{"code","message"}`.

mod api;
pub mod cards;
pub mod cut;
pub mod org;
mod respond;
mod ws;

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::{
    net::TcpListener,
    sync::{Notify, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use zhuli::dingtalk::frame::TOPIC_ROBOT;

/// Fixed settings of one simulator.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub client_id: String,
    pub client_secret: String,
    pub robot_code: String,
    /// Interval of SYSTEM pings to each healthy connection; `None` sends none.
    pub ping_interval: Option<Duration>,
    /// After a SYSTEM disconnect, the socket stays open this long (DingTalk: 10 s).
    pub disconnect_grace: Duration,
    /// An unACKed callback is pushed again after this long.
    pub redeliver_after: Duration,
    /// A callback not ACKed this long after it was first queued is dropped, never delivered
    /// again (counted as `expired`): DingTalk holds an undelivered message for about 60 s.
    /// `None`: held until delivered.
    pub hold_for: Option<Duration>,
    /// `false`: a callback pushed once is never pushed again (a gateway that does not resend);
    /// unACKed callbacks are counted as `expired`.
    pub resend: bool,
    /// A write to a connection that does not complete in this long (the client is not reading)
    /// drops the connection, as the gateway does.
    pub send_timeout: Duration,
    pub ticket_ttl: Duration,
    pub webhook_ttl: Duration,
    /// The API base the simulator names in the URLs it hands out (session webhooks, downloads)
    /// when the agent reaches it through a forwarder, e.g. `https://10.0.2.100`; `None`: its own
    /// loopback address.
    pub public_http_base: Option<String>,
    /// The WebSocket endpoint the gateway hands out, e.g. `wss://10.0.2.101/connect`; `None`: its
    /// own loopback address.
    pub public_ws_endpoint: Option<String>,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            client_id: "dingsimclient".into(),
            client_secret: "sim-secret-0123456789".into(),
            robot_code: "dingsimclient".into(),
            ping_interval: Some(Duration::from_secs(20)),
            disconnect_grace: Duration::from_secs(10),
            redeliver_after: Duration::from_secs(60),
            hold_for: None,
            resend: true,
            send_timeout: Duration::from_secs(5),
            ticket_ttl: Duration::from_secs(90),
            webhook_ttl: Duration::from_secs(90 * 60),
            public_http_base: None,
            public_ws_endpoint: None,
        }
    }
}

/// How a throttled send is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum ThrottleKind {
    /// HTTP 429.
    Http429,
    /// HTTP 403 `Forbidden.AccessDenied.QpsLimitForApi` (the new OpenAPI's QPS error).
    QpsLimit,
    /// HTTP 200 with errcode 90002 (the old API's QPS error).
    Errcode90002,
    /// HTTP 200 with the recipient in `flowControlledStaffIdList` (batchSend only; others get 429).
    FlowControlled,
}

/// State of a connection as the gateway sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ConnMode {
    Healthy,
    /// Sent `disconnect`: nothing more is delivered; closed after the grace period.
    Disconnecting,
    /// Answers WebSocket pings, delivers nothing (frames sent to it vanish, unACKed).
    Zombie,
    /// Reads nothing, writes nothing, never closes: a dead peer behind a live TCP connection.
    Frozen,
}

/// Where a reply arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ReplyRoute {
    SessionWebhook,
    GroupSend,
    OtoSend,
}

#[derive(Debug, Clone, Serialize)]
pub struct RecordedReply {
    pub route: ReplyRoute,
    /// The message whose session webhook carried the reply (webhook route only).
    pub in_reply_to: Option<String>,
    pub conversation_id: Option<String>,
    pub to_user: Option<String>,
    pub title: String,
    pub text: String,
    /// A file message (`sampleFile`): the media id it sent (the text is the file name).
    pub media_id: Option<String>,
    /// Milliseconds since the simulator started.
    pub at_ms: u64,
}

/// One OpenAPI request as the simulator received it (the newest [`MAX_RECORDED_REQUESTS`]
/// are kept): what conformance tests check against DingTalk's own request models.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedRequest {
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The raw (percent-encoded) query, without `?`.
    pub query: String,
    /// The JSON body; `null` for none, for a body that is not JSON (multipart), or unparsable.
    pub body: Value,
}

/// Requests [`Simulator::requests`] keeps.
pub const MAX_RECORDED_REQUESTS: usize = 1000;

#[derive(Debug, Clone, Serialize)]
pub struct RecordedAck {
    pub conn: u64,
    pub message_id: String,
    pub code: i64,
    pub data: String,
}

/// What to inject: one robot message.
#[derive(Debug, Clone)]
pub struct Inject {
    pub msgtype: String,
    /// For text: the text. For others: ignored unless a recognition/file name is relevant.
    pub text: String,
    pub group: bool,
    pub mentioned: bool,
    pub conversation_id: Option<String>,
    pub sender_staff_id: String,
    pub sender_nick: String,
    pub is_admin: bool,
    /// Give the message a session webhook that is already expired.
    pub expired_webhook: bool,
    /// Bytes served for the media's download code.
    pub media: Vec<u8>,
    /// Reuse this msgId (a duplicate of an earlier message).
    pub msg_id: Option<String>,
}

impl Inject {
    pub fn text(text: impl Into<String>) -> Self {
        Inject {
            msgtype: "text".into(),
            text: text.into(),
            group: false,
            mentioned: true,
            conversation_id: None,
            sender_staff_id: "staff-demo".into(),
            sender_nick: "Demo User".into(),
            is_admin: false,
            expired_webhook: false,
            media: Vec::new(),
            msg_id: None,
        }
    }
    /// Any msgtype: `text`, `richText`, `picture`, `audio` (text = recognition), `video`, `file` (text = file name).
    pub fn of(msgtype: &str, text: impl Into<String>) -> Self {
        Inject { msgtype: msgtype.into(), media: b"\x89PNG-sim-media".to_vec(), ..Inject::text(text) }
    }
    pub fn in_group(mut self, mentioned: bool) -> Self {
        self.group = true;
        self.mentioned = mentioned;
        self
    }
    pub fn conversation(mut self, id: impl Into<String>) -> Self {
        self.conversation_id = Some(id.into());
        self
    }
    pub fn from(mut self, staff_id: impl Into<String>) -> Self {
        self.sender_staff_id = staff_id.into();
        self
    }
    pub fn expired_webhook(mut self) -> Self {
        self.expired_webhook = true;
        self
    }
    pub fn with_msg_id(mut self, id: impl Into<String>) -> Self {
        self.msg_id = Some(id.into());
        self
    }
}

#[derive(Debug, Default, Clone)]
struct Faults {
    /// Refuse this many open-connection calls with 503.
    open_fail: u32,
    /// Refuse every open-connection call until then.
    open_fail_until: Option<Instant>,
    /// Throttle this many send calls.
    throttle: u32,
    throttle_kind: Option<ThrottleKind>,
    /// Cut the socket after this many bytes of the next delivered callback.
    cut_next_at: Option<usize>,
    /// New connections start in this mode (e.g. zombie) instead of healthy.
    next_conn_mode: Option<ConnMode>,
    /// Answer this many open calls with a ticket the WebSocket will refuse.
    bad_tickets: u32,
}

#[derive(Debug, Clone)]
struct Pending {
    message_id: String,
    text: String,
    topic: String,
    first_at: Instant,
}

struct SimConn {
    tx: mpsc::UnboundedSender<ws::Cmd>,
    mode: ConnMode,
    topics: Vec<String>,
    opened_at: Instant,
}

struct Session {
    msg_id: String,
    conversation_id: String,
    expires_ms: i64,
}

/// Counters readable by tests.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SimCounters {
    pub opens: u64,
    pub opens_refused: u64,
    pub ws_accepted: u64,
    pub ws_rejected: u64,
    pub pings_sent: u64,
    pub pings_echoed: u64,
    pub ping_echo_mismatch: u64,
    pub delivered: u64,
    pub redelivered: u64,
    pub throttled: u64,
    pub tokens_issued: u64,
    pub downloads: u64,
    pub client_frames_unparsed: u64,
    /// Callbacks dropped unACKed (held past `hold_for`, or not resent with `resend: false`).
    pub expired: u64,
    /// Callbacks ACKed (first ACK of each).
    pub acked: u64,
    /// Connections dropped because a write did not complete within `send_timeout`.
    pub send_timeouts: u64,
    /// Most connections open at once (2 during a make-before-break handover).
    pub max_concurrent: u64,
}

#[derive(Default)]
struct State {
    tickets: HashMap<String, (Instant, Vec<String>)>,
    tokens: HashSet<String>,
    conns: BTreeMap<u64, SimConn>,
    next_conn: u64,
    next_id: u64,
    queue: VecDeque<Pending>,
    inflight: HashMap<String, (u64, Pending, Instant)>,
    acks: Vec<RecordedAck>,
    replies: Vec<RecordedReply>,
    requests: VecDeque<RecordedRequest>,
    sessions: HashMap<String, Session>,
    files: HashMap<String, Vec<u8>>,
    faults: Faults,
    cards: Vec<cards::SimCard>,
    card_fault: cards::CardFault,
    counters: SimCounters,
    pings_outstanding: HashMap<String, String>,
    org: org::OrgState,
    /// When each callback not yet ACKed was first queued.
    queued_at: HashMap<String, Instant>,
    /// Queue-to-ACK times of the ACKed callbacks, in µs.
    ack_latencies_us: Vec<u32>,
}

pub(crate) struct Shared {
    cfg: SimConfig,
    started: Instant,
    state: Mutex<State>,
    changed: Notify,
    http_addr: Mutex<Option<SocketAddr>>,
    ws_addr: Mutex<Option<SocketAddr>>,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a simulator bug; keep serving with the state as left.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn elapsed_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Record one OpenAPI request (the oldest is dropped beyond the bound).
    fn record(&self, method: &http::Method, path: &str, query: &str, body: &[u8]) {
        let body = serde_json::from_slice(body).unwrap_or(Value::Null);
        let mut st = self.lock();
        if st.requests.len() >= MAX_RECORDED_REQUESTS {
            st.requests.pop_front();
        }
        st.requests.push_back(RecordedRequest {
            method: method.to_string(),
            path: path.to_owned(),
            query: query.to_owned(),
            body,
        });
    }

    fn touch(&self) {
        self.changed.notify_waiters();
    }

    fn next_id(st: &mut State, prefix: &str) -> String {
        st.next_id += 1;
        format!("{prefix}{:06}{:x}", st.next_id, rand::random::<u32>())
    }

    fn http_base(&self) -> String {
        if let Some(base) = &self.cfg.public_http_base {
            return base.clone();
        }
        let addr = self.http_addr.lock().map(|a| *a).unwrap_or(None);
        addr.map(|a| format!("http://{a}")).unwrap_or_default()
    }

    /// Deliver queued frames to the newest healthy connection subscribed to their topic;
    /// with no healthy one, a zombie swallows them (unACKed) as the real gateway would.
    fn pump(&self, st: &mut State) {
        let mut keep = VecDeque::new();
        while let Some(p) = st.queue.pop_front() {
            if self.held_too_long(&p) {
                Self::expire(st, &p);
                continue;
            }
            let healthy =
                st.conns.iter().rev().find(|(_, c)| c.mode == ConnMode::Healthy && c.topics.contains(&p.topic));
            let target = healthy
                .or_else(|| {
                    st.conns.iter().rev().find(|(_, c)| c.mode == ConnMode::Zombie && c.topics.contains(&p.topic))
                })
                .map(|(id, c)| (*id, c.mode, c.tx.clone()));
            let Some((id, mode, tx)) = target else {
                keep.push_back(p);
                continue;
            };
            if mode == ConnMode::Healthy {
                let cut = st.faults.cut_next_at.take();
                let _ = tx.send(ws::Cmd::Send { text: p.text.clone(), cut_at: cut });
            }
            st.counters.delivered += 1;
            st.inflight.insert(p.message_id.clone(), (id, p, Instant::now()));
        }
        st.queue = keep;
    }

    fn requeue_conn(&self, st: &mut State, conn: u64) {
        let mut back: Vec<Pending> = Vec::new();
        st.inflight.retain(|_, (c, p, _)| {
            if *c == conn {
                back.push(p.clone());
                false
            } else {
                true
            }
        });
        back.sort_by(|a, b| a.message_id.cmp(&b.message_id));
        for p in back.into_iter().rev() {
            if !self.cfg.resend || self.held_too_long(&p) {
                Self::expire(st, &p);
                continue;
            }
            st.counters.redelivered += 1;
            st.queue.push_front(p);
        }
    }

    fn held_too_long(&self, p: &Pending) -> bool {
        self.cfg.hold_for.is_some_and(|h| p.first_at.elapsed() >= h)
    }

    /// Drop an unACKed callback for good.
    fn expire(st: &mut State, p: &Pending) {
        st.counters.expired += 1;
        st.queued_at.remove(&p.message_id);
        log::debug!("sim: callback {} dropped unACKed", p.message_id);
    }

    /// Push raw text to every healthy connection (malformed frames, unknown types).
    fn inject_raw(&self, text: impl Into<String>) {
        let text = text.into();
        let st = self.lock();
        for c in st.conns.values().filter(|c| c.mode == ConnMode::Healthy) {
            let _ = c.tx.send(ws::Cmd::Send { text: text.clone(), cut_at: None });
        }
    }

    /// Push a text frame whose payload is not UTF-8 to every healthy connection.
    fn inject_invalid_utf8(&self) {
        let st = self.lock();
        for c in st.conns.values().filter(|c| c.mode == ConnMode::Healthy) {
            let _ = c.tx.send(ws::Cmd::SendInvalidUtf8(vec![b'{', 0xff, 0xfe, b'}']));
        }
    }

    /// Send SYSTEM `disconnect` on every healthy connection; each closes after the grace period.
    fn disconnect_all(&self) {
        let mut st = self.lock();
        let grace = self.cfg.disconnect_grace;
        for c in st.conns.values_mut().filter(|c| c.mode == ConnMode::Healthy) {
            c.mode = ConnMode::Disconnecting;
            let _ = c.tx.send(ws::Cmd::Disconnect { grace });
        }
        drop(st);
        self.touch();
    }

    /// Set the mode of every connection that is currently healthy (zombie, frozen).
    fn degrade_all(&self, mode: ConnMode) {
        let mut st = self.lock();
        for c in st.conns.values_mut().filter(|c| c.mode == ConnMode::Healthy) {
            c.mode = mode;
            let _ = c.tx.send(ws::Cmd::Mode(mode));
        }
        drop(st);
        self.touch();
    }

    /// Close every connection without a WebSocket close frame (TCP FIN/RST only).
    fn drop_all(&self) {
        let st = self.lock();
        for c in st.conns.values() {
            let _ = c.tx.send(ws::Cmd::Drop);
        }
    }

    /// New connections start in `mode` (e.g. zombie) until cleared with `None`.
    fn set_next_conn_mode(&self, mode: Option<ConnMode>) {
        self.lock().faults.next_conn_mode = mode;
    }

    /// Refuse the next `n` open-connection calls with HTTP 503.
    fn fail_opens(&self, n: u32) {
        self.lock().faults.open_fail = n;
    }

    /// Refuse every open-connection call for `d` (a router reboot, an outage).
    fn refuse_opens_for(&self, d: Duration) {
        self.lock().faults.open_fail_until = Some(Instant::now() + d);
    }

    /// Throttle the next `n` send calls (webhook and OpenAPI).
    fn throttle_sends(&self, n: u32, kind: ThrottleKind) {
        let mut st = self.lock();
        st.faults.throttle = n;
        st.faults.throttle_kind = Some(kind);
    }

    /// Cut the socket after `bytes` bytes of the next delivered callback frame.
    fn cut_next_frame_at(&self, bytes: usize) {
        self.lock().faults.cut_next_at = Some(bytes);
    }

    /// Forget every access token issued (the next OpenAPI call gets a 401).
    fn hand_out_bad_tickets(&self, n: u32) {
        self.lock().faults.bad_tickets = n;
    }

    fn add_file(&self, bytes: Vec<u8>) -> String {
        let mut st = self.lock();
        let code = Self::next_id(&mut st, "dl");
        st.files.insert(code.clone(), bytes);
        code
    }

    fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// Queue a robot message as a CALLBACK frame and deliver what can be delivered.
    fn enqueue(&self, m: &Inject) -> String {
        let mut st = self.lock();
        let (msg_id, data) = self.build_robot_data(&mut st, m);
        let message_id = Self::next_id(&mut st, "frame");
        let frame = json!({
            "specVersion": "1.0",
            "type": "CALLBACK",
            "headers": {
                "appId": "simapp", "connectionId": "simconn", "contentType": "application/json",
                "messageId": message_id, "time": now_ms().to_string(), "topic": TOPIC_ROBOT,
            },
            "data": data.to_string(),
        });
        st.queued_at.insert(message_id.clone(), Instant::now());
        st.queue.push_back(Pending {
            message_id,
            text: frame.to_string(),
            topic: TOPIC_ROBOT.into(),
            first_at: Instant::now(),
        });
        self.pump(&mut st);
        drop(st);
        self.touch();
        msg_id
    }

    fn build_robot_data(&self, st: &mut State, m: &Inject) -> (String, Value) {
        let msg_id = m.msg_id.clone().unwrap_or_else(|| Self::next_id(st, "msg"));
        let conversation_id = m.conversation_id.clone().unwrap_or_else(|| {
            if m.group { "cidGroupSim".to_owned() } else { format!("cid1to1-{}", m.sender_staff_id) }
        });
        let session = Self::next_id(st, "sess");
        let expires_ms =
            if m.expired_webhook { now_ms() - 1_000 } else { now_ms() + self.cfg.webhook_ttl.as_millis() as i64 };
        st.sessions.insert(
            session.clone(),
            Session { msg_id: msg_id.clone(), conversation_id: conversation_id.clone(), expires_ms },
        );
        let code = Self::next_id(st, "dl");
        if !m.media.is_empty() {
            st.files.insert(code.clone(), m.media.clone());
        }
        let mut data = json!({
            "msgId": msg_id,
            "msgtype": m.msgtype,
            "conversationId": conversation_id,
            "conversationType": if m.group { "2" } else { "1" },
            "chatbotCorpId": "dingsimcorp",
            "chatbotUserId": "$:LWCP_v1:$simbot",
            "robotCode": self.cfg.robot_code,
            "createAt": now_ms(),
            "senderId": format!("$:LWCP_v1:${}", m.sender_staff_id),
            "senderNick": m.sender_nick,
            "senderStaffId": m.sender_staff_id,
            "senderCorpId": "dingsimcorp",
            "isAdmin": m.is_admin,
            "isInAtList": m.mentioned,
            "sessionWebhook": format!("{}/robot/sendBySession?session={session}", self.http_base()),
            "sessionWebhookExpiredTime": expires_ms,
        });
        if m.group {
            data["conversationTitle"] = json!("Sim group");
            if m.mentioned {
                data["atUsers"] = json!([{ "dingtalkId": "$:LWCP_v1:$simbot" }]);
            }
        }
        match m.msgtype.as_str() {
            "text" => data["text"] = json!({ "content": m.text }),
            "richText" => {
                data["content"] = json!({ "richText": [ { "text": m.text }, { "type": "picture", "downloadCode": code, "pictureDownloadCode": code } ] })
            }
            "picture" => data["content"] = json!({ "downloadCode": code, "pictureDownloadCode": code }),
            "audio" => data["content"] = json!({ "downloadCode": code, "duration": 3000, "recognition": m.text }),
            "video" => data["content"] = json!({ "downloadCode": code, "duration": "5", "videoType": "mp4" }),
            "file" => {
                data["content"] = json!({ "downloadCode": code, "fileName": m.text, "spaceId": "1", "fileId": "1" })
            }
            _ => {}
        }
        (msg_id, data)
    }
}

/// A running simulator. Dropping it stops the servers.
pub struct Simulator {
    shared: Arc<Shared>,
    http_addr: SocketAddr,
    ws_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[derive(Debug, thiserror::Error)]
#[error("simulator could not bind 127.0.0.1: {0}")]
pub struct SimError(#[from] std::io::Error);

impl Simulator {
    /// Start on 127.0.0.1 with OS-chosen ports.
    pub async fn start(cfg: SimConfig) -> Result<Self, SimError> {
        Self::start_on(cfg, "127.0.0.1:0".parse().expect("literal socket address")).await
    }

    /// Start with the HTTP API on `http` (the WebSocket gets the next free port).
    pub async fn start_on(cfg: SimConfig, http: SocketAddr) -> Result<Self, SimError> {
        let http_l = TcpListener::bind(http).await?;
        let ws_l = TcpListener::bind((http.ip(), 0)).await?;
        let http_addr = http_l.local_addr()?;
        let ws_addr = ws_l.local_addr()?;
        let shared = Arc::new(Shared {
            cfg,
            started: Instant::now(),
            state: Mutex::new(State::default()),
            changed: Notify::new(),
            http_addr: Mutex::new(Some(http_addr)),
            ws_addr: Mutex::new(Some(ws_addr)),
        });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();
        tasks.spawn(api::serve(http_l, shared.clone(), cancel.clone(), tasks.clone()));
        tasks.spawn(ws::serve(ws_l, shared.clone(), cancel.clone(), tasks.clone()));
        tasks.spawn(redeliver_loop(shared.clone(), cancel.clone()));
        Ok(Simulator { shared, http_addr, ws_addr, cancel, tasks })
    }

    /// The `api_base` to configure the agent with.
    pub fn api_base(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn ws_addr(&self) -> SocketAddr {
        self.ws_addr
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.cfg
    }

    /// Inject a robot message; returns its msgId.
    pub fn inject(&self, m: Inject) -> String {
        self.shared.enqueue(&m)
    }

    /// Push raw text to every healthy connection (malformed frames, unknown types).
    pub fn inject_raw(&self, text: impl Into<String>) {
        self.shared.inject_raw(text)
    }

    /// Push a text frame whose payload is not UTF-8 to every healthy connection.
    pub fn inject_invalid_utf8(&self) {
        self.shared.inject_invalid_utf8()
    }

    /// Send SYSTEM `disconnect` on every healthy connection; each closes after the grace period.
    pub fn disconnect_all(&self) {
        self.shared.disconnect_all()
    }

    /// Set the mode of every connection that is currently healthy (zombie, frozen).
    pub fn degrade_all(&self, mode: ConnMode) {
        self.shared.degrade_all(mode)
    }

    /// Close every connection without a WebSocket close frame (TCP FIN/RST only).
    pub fn drop_all(&self) {
        self.shared.drop_all()
    }

    /// New connections start in `mode` (e.g. zombie) until cleared with `None`.
    pub fn set_next_conn_mode(&self, mode: Option<ConnMode>) {
        self.shared.set_next_conn_mode(mode)
    }

    /// Refuse the next `n` open-connection calls with HTTP 503.
    pub fn fail_opens(&self, n: u32) {
        self.shared.fail_opens(n)
    }

    /// Refuse every open-connection call for `d` (a router reboot, an outage).
    pub fn refuse_opens_for(&self, d: Duration) {
        self.shared.refuse_opens_for(d)
    }

    /// Throttle the next `n` send calls (webhook and OpenAPI).
    pub fn throttle_sends(&self, n: u32, kind: ThrottleKind) {
        self.shared.throttle_sends(n, kind)
    }

    /// Cut the socket after `bytes` bytes of the next delivered callback frame.
    pub fn cut_next_frame_at(&self, bytes: usize) {
        self.shared.cut_next_frame_at(bytes)
    }

    /// Forget every access token issued (the next OpenAPI call gets a 401).
    pub fn revoke_tokens(&self) {
        self.shared.revoke_tokens()
    }

    /// Answer the next `n` open calls with tickets the WebSocket handshake refuses.
    pub fn hand_out_bad_tickets(&self, n: u32) {
        self.shared.hand_out_bad_tickets(n)
    }

    /// Serve `bytes` behind a new download code; returns the code.
    pub fn add_file(&self, bytes: Vec<u8>) -> String {
        self.shared.add_file(bytes)
    }

    /// Milliseconds since the simulator started (the clock of `RecordedReply::at_ms`).
    pub fn elapsed_ms(&self) -> u64 {
        self.shared.elapsed_ms()
    }

    /// Serve this organisation (people, departments, calendars, to-dos, approvals).
    pub fn seed_org(&self, org: org::Org) {
        self.shared.lock().org.org = org;
    }

    /// The organisation as the agent's calls left it.
    pub fn org(&self) -> org::Org {
        self.shared.lock().org.org.clone()
    }

    /// Answer workspace calls whose path starts with `prefix` as DingTalk does when the app lacks
    /// the API permission `scope`.
    pub fn deny_api(&self, prefix: &str, scope: &str) {
        self.shared.lock().org.deny(prefix, scope)
    }

    /// Throttle the next `n` workspace calls whose path starts with `prefix` (QpsLimitForApi).
    pub fn throttle_api(&self, prefix: &str, n: u32) {
        self.shared.lock().org.throttle(prefix, n)
    }

    /// Lift the workspace faults.
    pub fn clear_api_faults(&self) {
        self.shared.lock().org.clear_faults()
    }

    /// Calls the agent made of each workspace API, by route (e.g. `/topapi/v2/user/get`).
    pub fn api_calls(&self) -> HashMap<&'static str, u64> {
        self.shared.lock().org.calls.clone()
    }

    /// The AI cards the agent created, with every state each showed.
    pub fn cards(&self) -> Vec<cards::SimCard> {
        self.shared.lock().cards.clone()
    }

    /// Make card calls fail (or work again).
    pub fn set_card_fault(&self, fault: cards::CardFault) {
        self.shared.lock().card_fault = fault;
    }

    /// The newest OpenAPI requests received (token, robot, card, workspace APIs), oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.lock().requests.iter().cloned().collect()
    }

    pub fn replies(&self) -> Vec<RecordedReply> {
        self.shared.lock().replies.clone()
    }

    pub fn acks(&self) -> Vec<RecordedAck> {
        self.shared.lock().acks.clone()
    }

    pub fn counters(&self) -> SimCounters {
        self.shared.lock().counters.clone()
    }

    /// Milliseconds since the simulator started (the clock of `RecordedReply::at_ms`).
    pub fn now_ms(&self) -> u64 {
        self.shared.elapsed_ms()
    }

    /// Queue-to-ACK times of every ACKed callback so far, sorted.
    pub fn ack_latencies(&self) -> Vec<Duration> {
        let mut v: Vec<Duration> =
            self.shared.lock().ack_latencies_us.iter().map(|us| Duration::from_micros(u64::from(*us))).collect();
        v.sort_unstable();
        v
    }

    /// Connections and their modes, oldest first.
    pub fn connections(&self) -> Vec<(u64, ConnMode)> {
        self.shared.lock().conns.iter().map(|(id, c)| (*id, c.mode)).collect()
    }

    /// Callbacks not ACKed yet (queued or in flight).
    pub fn unacked(&self) -> usize {
        let st = self.shared.lock();
        st.queue.len() + st.inflight.len()
    }

    /// Wait until `cond` holds for the simulator, or `limit` passes. Returns whether it held.
    pub async fn wait_until(&self, limit: Duration, mut cond: impl FnMut(&Simulator) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.shared.changed.notified();
            if cond(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let _ = tokio::time::timeout(Duration::from_millis(50).min(deadline - Instant::now()), notified).await;
        }
    }

    /// Stop the servers and wait for their tasks.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

async fn redeliver_loop(shared: Arc<Shared>, cancel: CancellationToken) {
    let step = (shared.cfg.redeliver_after / 4).max(Duration::from_millis(20));
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(step) => {}
        }
        let mut st = shared.lock();
        let now = Instant::now();
        let after = shared.cfg.redeliver_after;
        let stale: Vec<String> = st
            .inflight
            .iter()
            .filter(|(_, (_, _, sent))| now.duration_since(*sent) >= after)
            .map(|(k, _)| k.clone())
            .collect();
        if stale.is_empty() {
            continue;
        }
        for k in stale {
            if let Some((_, p, _)) = st.inflight.remove(&k) {
                if !shared.cfg.resend || shared.held_too_long(&p) {
                    Shared::expire(&mut st, &p);
                    continue;
                }
                st.counters.redelivered += 1;
                st.queue.push_back(p);
            }
        }
        shared.pump(&mut st);
        drop(st);
        shared.touch();
    }
}
