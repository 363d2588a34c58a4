//! The simulator's HTTP side: DingTalk's OpenAPI calls the agent makes, session webhooks,
//! media downloads, and a small `/_sim/` control API for `zhuli-sim sim` users.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::{body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::{net::TcpListener, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    ConnMode, Inject, RecordedReply, ReplyRoute, Shared, ThrottleKind,
    cards::{self, CardFault},
    now_ms,
    respond::{err, reply},
};
use zhuli::dingtalk::openapi::TOKEN_HEADER;

pub(super) async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken, tasks: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((tcp, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let shared = shared.clone();
        let cancel = cancel.clone();
        tasks.spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(shared, req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = conn => {}
            }
        });
    }
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=').map(str::to_owned))
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let session = query_param(&req, "session");
    let token = req.headers().get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if method == Method::GET && !super::org::is_org_path(&path) {
        return match path.strip_prefix("/_files/") {
            Some(code) => download(&shared, code),
            None if path == "/_sim/replies" => reply(StatusCode::OK, json!(shared.lock().replies)),
            None if path == "/_sim/status" => status(&shared),
            None if path == "/_sim/cards" => reply(StatusCode::OK, json!(shared.lock().cards)),
            None => err(StatusCode::NOT_FOUND, "NotFound", "no such path in the simulator"),
        };
    }
    if super::org::is_org_path(&path) {
        let q = req.uri().query().unwrap_or_default().to_owned();
        let body = match Limited::new(req.into_body(), 32 * 1024 * 1024).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return err(StatusCode::PAYLOAD_TOO_LARGE, "BodyTooLarge", "request body over 32 MiB"),
        };
        shared.record(&method, &path, &q, &body);
        return super::org::handle(&shared, &method, &path, &q, token.as_deref(), &body);
    }
    let q = req.uri().query().unwrap_or_default().to_owned();
    let put = matches!(path.as_str(), "/v1.0/card/streaming" | "/v1.0/card/instances");
    if (put && method != Method::PUT) || (!put && method != Method::POST) {
        return err(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", if put { "use PUT" } else { "use POST" });
    }
    let body = match Limited::new(req.into_body(), 1024 * 1024).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return err(StatusCode::PAYLOAD_TOO_LARGE, "BodyTooLarge", "request body over 1 MiB"),
    };
    if path.starts_with("/v1.0/") {
        shared.record(&method, &path, &q, &body);
    }
    let Ok(body): Result<Value, _> = serde_json::from_slice(&body) else {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.Json", "body is not JSON");
    };
    match path.as_str() {
        "/v1.0/gateway/connections/open" => open(&shared, &body),
        "/v1.0/oauth2/accessToken" => access_token(&shared, &body),
        "/robot/sendBySession" => webhook(&shared, session.as_deref(), &body),
        "/v1.0/robot/oToMessages/batchSend"
        | "/v1.0/robot/groupMessages/send"
        | "/v1.0/robot/messageFiles/download" => {
            if !token.is_some_and(|t| shared.lock().tokens.contains(&t)) {
                return err(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthentication",
                    "access token is missing, invalid or expired",
                );
            }
            if path.ends_with("download") { download_url(&shared, &body) } else { robot_send(&shared, &path, &body) }
        }
        "/v1.0/card/instances/createAndDeliver" | "/v1.0/card/streaming" | "/v1.0/card/instances" => {
            if !token.is_some_and(|t| shared.lock().tokens.contains(&t)) {
                return err(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthentication",
                    "access token is missing, invalid or expired",
                );
            }
            match path.as_str() {
                "/v1.0/card/instances/createAndDeliver" => cards::create(&shared, &body),
                "/v1.0/card/streaming" => cards::streaming(&shared, &body),
                _ => cards::update(&shared, &body),
            }
        }
        "/_sim/messages" => control_inject(&shared, &body),
        "/_sim/faults" => control_fault(&shared, &body),
        _ => err(StatusCode::NOT_FOUND, "NotFound", "no such API in the simulator"),
    }
}

fn open(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    let mut st = shared.lock();
    st.counters.opens += 1;
    let outage = st.faults.open_fail_until.is_some_and(|t| Instant::now() < t);
    if outage || st.faults.open_fail > 0 {
        st.faults.open_fail = st.faults.open_fail.saturating_sub(1);
        st.counters.opens_refused += 1;
        return err(StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable", "gateway temporarily unavailable");
    }
    if body["clientId"].as_str() != Some(shared.cfg.client_id.as_str())
        || body["clientSecret"].as_str() != Some(shared.cfg.client_secret.as_str())
    {
        st.counters.opens_refused += 1;
        return err(StatusCode::UNAUTHORIZED, "InvalidAuthentication", "clientId or clientSecret is wrong");
    }
    let topics: Vec<String> = body["subscriptions"]
        .as_array()
        .map(|subs| {
            subs.iter()
                .filter(|s| s["type"].as_str() == Some("CALLBACK"))
                .filter_map(|s| s["topic"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let ticket = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        rand::random::<u32>(),
        rand::random::<u16>(),
        rand::random::<u16>() & 0xfff,
        rand::random::<u16>() & 0xfff,
        rand::random::<u64>() & 0xffff_ffff_ffff
    );
    if st.faults.bad_tickets > 0 {
        st.faults.bad_tickets -= 1;
    } else {
        st.tickets.insert(ticket.clone(), (Instant::now(), topics));
    }
    let endpoint = match &shared.cfg.public_ws_endpoint {
        Some(public) => public.clone(),
        None => {
            let ws = shared.ws_addr.lock().map(|a| *a).unwrap_or(None);
            ws.map(|a| format!("ws://{a}/connect")).unwrap_or_default()
        }
    };
    reply(StatusCode::OK, json!({ "endpoint": endpoint, "ticket": ticket }))
}

fn access_token(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    if body["appKey"].as_str() != Some(shared.cfg.client_id.as_str())
        || body["appSecret"].as_str() != Some(shared.cfg.client_secret.as_str())
    {
        return err(StatusCode::BAD_REQUEST, "invalidClientIdOrSecret", "appKey or appSecret is wrong");
    }
    let mut st = shared.lock();
    let token = Shared::next_id(&mut st, "tok");
    st.tokens.insert(token.clone());
    st.counters.tokens_issued += 1;
    reply(StatusCode::OK, json!({ "accessToken": token, "expireIn": 7200 }))
}

/// Throttle this call if a throttle fault is armed; the answer depends on the kind.
fn throttled(shared: &Shared, oto: bool, webhook: bool, user: Option<&str>) -> Option<Response<Full<Bytes>>> {
    let mut st = shared.lock();
    if st.faults.throttle == 0 {
        return None;
    }
    st.faults.throttle -= 1;
    st.counters.throttled += 1;
    let kind = st.faults.throttle_kind.unwrap_or(ThrottleKind::Http429);
    Some(match kind {
        ThrottleKind::Http429 => err(StatusCode::TOO_MANY_REQUESTS, "Throttling", "too many requests"),
        ThrottleKind::QpsLimit => {
            err(StatusCode::FORBIDDEN, "Forbidden.AccessDenied.QpsLimitForApi", "QPS limit for this API")
        }
        ThrottleKind::Errcode90002 if webhook => {
            reply(StatusCode::OK, json!({"errcode": 90002, "errmsg": "send too fast"}))
        }
        ThrottleKind::FlowControlled if oto => reply(
            StatusCode::OK,
            json!({"processQueryKey": "sim", "flowControlledStaffIdList": [user.unwrap_or_default()]}),
        ),
        _ => err(StatusCode::TOO_MANY_REQUESTS, "Throttling", "too many requests"),
    })
}

/// Title and text of a markdown/text message body.
fn text_of(msgtype: &str, content: &Value) -> (String, String) {
    match msgtype {
        "markdown" | "sampleMarkdown" => (
            content["title"].as_str().unwrap_or_default().to_owned(),
            content["text"].as_str().unwrap_or_default().to_owned(),
        ),
        _ => (String::new(), content["content"].as_str().unwrap_or_default().to_owned()),
    }
}

fn webhook(shared: &Shared, session: Option<&str>, body: &Value) -> Response<Full<Bytes>> {
    let found = {
        let st = shared.lock();
        session.and_then(|s| st.sessions.get(s)).map(|s| (s.msg_id.clone(), s.conversation_id.clone(), s.expires_ms))
    };
    let Some((msg_id, conversation_id, expires)) = found else {
        return reply(StatusCode::OK, json!({"errcode": 400_013, "errmsg": "session webhook unknown"}));
    };
    if expires <= now_ms() {
        return reply(StatusCode::OK, json!({"errcode": 400_013, "errmsg": "session webhook expired"}));
    }
    if let Some(r) = throttled(shared, false, true, None) {
        return r;
    }
    let msgtype = body["msgtype"].as_str().unwrap_or_default();
    if msgtype != "markdown" && msgtype != "text" {
        return reply(StatusCode::OK, json!({"errcode": 40035, "errmsg": "unsupported msgtype"}));
    }
    let (title, text) = text_of(msgtype, &body[msgtype]);
    let mut st = shared.lock();
    st.replies.push(RecordedReply {
        route: ReplyRoute::SessionWebhook,
        in_reply_to: Some(msg_id),
        conversation_id: Some(conversation_id),
        to_user: None,
        title,
        text,
        media_id: None,
        at_ms: shared.elapsed_ms(),
    });
    drop(st);
    shared.touch();
    reply(StatusCode::OK, json!({"errcode": 0, "errmsg": "ok"}))
}

fn robot_send(shared: &Shared, path: &str, body: &Value) -> Response<Full<Bytes>> {
    let oto = path.contains("oToMessages");
    if body["robotCode"].as_str() != Some(shared.cfg.robot_code.as_str()) {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.RobotCode", "robotCode does not belong to this app");
    }
    let user = body["userIds"].as_array().and_then(|u| u.first()).and_then(Value::as_str).map(str::to_owned);
    if oto && user.is_none() {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.UserIds", "userIds is required");
    }
    let conversation = body["openConversationId"].as_str().map(str::to_owned);
    if !oto && conversation.is_none() {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.OpenConversationId", "openConversationId is required");
    }
    let Some(param) = body["msgParam"].as_str() else {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.MsgParam", "msgParam must be a JSON string");
    };
    if param.len() > 15_000 {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.MsgParam", "msgParam is over 15000 bytes");
    }
    if let Some(r) = throttled(shared, oto, false, user.as_deref()) {
        return r;
    }
    let param: Value = serde_json::from_str(param).unwrap_or(Value::Null);
    let key = body["msgKey"].as_str().unwrap_or_default();
    let (title, text) = text_of(key, &param);
    let mut st = shared.lock();
    let media_id = if key == "sampleFile" {
        let id = param["mediaId"].as_str().unwrap_or_default().to_owned();
        if !st.org.org.uploads.iter().any(|u| u.media_id == id) {
            return err(StatusCode::BAD_REQUEST, "InvalidParameter.MediaId", "mediaId is unknown or expired");
        }
        if param["fileName"].as_str().is_none_or(str::is_empty) {
            return err(StatusCode::BAD_REQUEST, "InvalidParameter.FileName", "fileName is required");
        }
        Some(id)
    } else {
        None
    };
    let (title, text) = match &media_id {
        Some(_) => ("file".to_owned(), param["fileName"].as_str().unwrap_or_default().to_owned()),
        None => (title, text),
    };
    st.replies.push(RecordedReply {
        route: if oto { ReplyRoute::OtoSend } else { ReplyRoute::GroupSend },
        in_reply_to: None,
        conversation_id: conversation,
        to_user: user,
        title,
        text,
        media_id,
        at_ms: shared.elapsed_ms(),
    });
    drop(st);
    shared.touch();
    if oto {
        reply(
            StatusCode::OK,
            json!({"processQueryKey": "sim", "invalidStaffIdList": [], "flowControlledStaffIdList": []}),
        )
    } else {
        reply(StatusCode::OK, json!({"processQueryKey": "sim"}))
    }
}

fn download_url(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    let code = body["downloadCode"].as_str().unwrap_or_default();
    if !shared.lock().files.contains_key(code) {
        return err(StatusCode::BAD_REQUEST, "InvalidParameter.DownloadCode", "downloadCode is unknown");
    }
    reply(StatusCode::OK, json!({ "downloadUrl": format!("{}/_files/{code}", shared.http_base()) }))
}

fn download(shared: &Shared, code: &str) -> Response<Full<Bytes>> {
    let mut st = shared.lock();
    match st.files.get(code).cloned() {
        Some(bytes) => {
            st.counters.downloads += 1;
            Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/octet-stream")
                .body(Full::new(Bytes::from(bytes)))
                .expect("static response parts are valid")
        }
        None => err(StatusCode::NOT_FOUND, "NotFound", "no such file"),
    }
}

fn status(shared: &Shared) -> Response<Full<Bytes>> {
    let st = shared.lock();
    let conns: Vec<Value> = st.conns.iter().map(|(id, c)| json!({"id": id, "mode": c.mode})).collect();
    reply(
        StatusCode::OK,
        json!({"counters": st.counters, "connections": conns, "unacked": st.queue.len() + st.inflight.len()}),
    )
}

/// `POST /_sim/messages {"text", "msgtype"?, "group"?, "mentioned"?, "sender"?}`: inject a message.
fn control_inject(shared: &Arc<Shared>, body: &Value) -> Response<Full<Bytes>> {
    let text = body["text"].as_str().unwrap_or_default();
    let mut m = Inject::of(body["msgtype"].as_str().unwrap_or("text"), text);
    if body["group"].as_bool() == Some(true) {
        m = m.in_group(body["mentioned"].as_bool().unwrap_or(true));
    }
    if let Some(s) = body["sender"].as_str() {
        m = m.from(s);
    }
    if let Some(id) = body["msgId"].as_str() {
        m = m.with_msg_id(id);
    }
    if body["expiredWebhook"].as_bool() == Some(true) {
        m = m.expired_webhook();
    }
    let msg_id = shared.enqueue(&m);
    reply(StatusCode::OK, json!({ "msgId": msg_id }))
}

/// `POST /_sim/faults {"fault": …}`: reproduce a failure from the command line.
fn control_fault(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    let count = body["count"].as_u64().unwrap_or(1);
    match body["fault"].as_str().unwrap_or_default() {
        "disconnect" => shared.disconnect_all(),
        "zombie" => shared.degrade_all(ConnMode::Zombie),
        "frozen" => shared.degrade_all(ConnMode::Frozen),
        "drop" => shared.drop_all(),
        "refuse_opens" => shared.fail_opens(u32::try_from(count).unwrap_or(u32::MAX)),
        "outage" => shared.refuse_opens_for(Duration::from_millis(body["ms"].as_u64().unwrap_or(10_000))),
        "throttle" => {
            let kind = serde_json::from_value(body["kind"].clone()).unwrap_or(ThrottleKind::Http429);
            shared.throttle_sends(u32::try_from(count).unwrap_or(u32::MAX), kind)
        }
        "cut" => shared.cut_next_frame_at(usize::try_from(body["bytes"].as_u64().unwrap_or(10)).unwrap_or(10)),
        "revoke_tokens" => shared.revoke_tokens(),
        "bad_tickets" => shared.hand_out_bad_tickets(u32::try_from(count).unwrap_or(u32::MAX)),
        "raw" => shared.inject_raw(body["text"].as_str().unwrap_or_default()),
        "card_create" => shared.lock().card_fault = CardFault::Create,
        "card_stream" => shared.lock().card_fault = CardFault::Stream,
        "card_ok" => shared.lock().card_fault = CardFault::None,
        other => {
            return err(
                StatusCode::BAD_REQUEST,
                "UnknownFault",
                &format!(
                    "unknown fault {other:?}; one of disconnect, zombie, frozen, drop, refuse_opens, outage, throttle, cut, revoke_tokens, bad_tickets, raw"
                ),
            );
        }
    }
    reply(StatusCode::OK, json!({"ok": true}))
}
