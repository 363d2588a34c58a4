//! `zhuli run`: wires the channel, the pipeline and the assistant together and runs them until
//! asked to stop.
//!
//! The pipeline for one message: dedupe by msgId → group filter (@mention) → ACK → answer →
//! reply. The ACK is sent once the message is accepted into the pipeline (the encrypted store
//! makes that acceptance durable); a message that was not accepted stays unACKed and comes back.

use std::sync::Arc;
use std::time::Duration;

use tokio::{
    sync::{Semaphore, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    assistant::{Assistant, StatusView},
    config::Config,
    dedupe::Dedupe,
    dingtalk::{
        http::{HttpClient, tls_config},
        media::{MediaArea, MediaError},
        openapi::OpenApi,
        sender::{Reply, ReplySender, SenderStatus},
        stream::{Inbound, StreamClient, StreamStatus},
    },
};

/// How long a msgId is remembered for dedupe (gateway retries stop well within this).
const DEDUPE_TTL: Duration = Duration::from_secs(24 * 3600);
const DEDUPE_CAPACITY: usize = 200_000;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot prepare the media area under the state directory: {0}")]
    Media(#[from] MediaError),
}

/// Handles to a running agent's figures (for tests and the demo).
#[derive(Clone)]
pub struct AgentHandles {
    pub stream: Arc<StreamStatus>,
    pub sender: Arc<SenderStatus>,
}

/// Run the agent until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    let handles = AgentHandles { stream: Arc::default(), sender: Arc::default() };
    run_with(config, cancel, handles).await
}

pub async fn run_with(config: Config, cancel: CancellationToken, handles: AgentHandles) -> Result<(), AgentError> {
    let tls = tls_config();
    let http = HttpClient::new(tls.clone(), config.dingtalk.stream.connect_timeout_ms.get());
    let api = Arc::new(OpenApi::new(config.dingtalk.clone(), http.clone()));
    // Opened now so a bad state directory fails at start; the LLM's tools fetch into it.
    let _media = MediaArea::open(config.agent.state_dir.join("media"), api.clone()).await?;
    let sender = Arc::new(ReplySender::new(api.clone(), handles.sender.clone()));
    let assistant = Arc::new(Assistant::new(StatusView {
        started: Instant::now(),
        stream: handles.stream.clone(),
        sender: handles.sender.clone(),
    }));
    let (inbox_tx, inbox_rx) = mpsc::channel::<Inbound>(config.agent.inbox_capacity);
    let stream = StreamClient::new(config.dingtalk.clone(), http, tls, inbox_tx, handles.stream.clone());

    let tasks = TaskTracker::new();
    tasks.spawn(stream.run(cancel.clone()));
    tasks.spawn(pipeline(inbox_rx, assistant, sender, config.agent.workers, cancel.clone()));
    log::info!("zhuli agent started; connecting to {}", config.dingtalk.api_base.as_str());
    cancel.cancelled().await;
    tasks.close();
    tasks.wait().await;
    log::info!("zhuli agent stopped");
    Ok(())
}

async fn pipeline(
    mut inbox: mpsc::Receiver<Inbound>,
    assistant: Arc<Assistant>,
    sender: Arc<ReplySender>,
    workers: usize,
    cancel: CancellationToken,
) {
    let mut dedupe = Dedupe::new(DEDUPE_TTL, DEDUPE_CAPACITY);
    let slots = Arc::new(Semaphore::new(workers));
    let running = TaskTracker::new();
    loop {
        let inbound = tokio::select! {
            _ = cancel.cancelled() => break,
            m = inbox.recv() => match m { Some(m) => m, None => break },
        };
        let Inbound { message, ack } = inbound;
        if !dedupe.first_time(&message.msg_id, Instant::now()) {
            log::info!("message {} is a duplicate; ACKed, not answered again", message.msg_id);
            ack.ack();
            continue;
        }
        if !message.mentions_robot {
            log::debug!("group message {} does not @mention the robot; ignored", message.msg_id);
            ack.ack();
            continue;
        }
        // Take a worker slot before ACKing: a full agent leaves new frames to the gateway.
        let permit = tokio::select! {
            _ = cancel.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        ack.ack();
        log::info!(
            "message {} ({}) accepted from conversation {}",
            message.msg_id,
            message.kind_name(),
            message.conversation_id
        );
        let assistant = assistant.clone();
        let sender = sender.clone();
        running.spawn(async move {
            let answer = assistant.answer(&message);
            let reply = Reply::to(&message, answer.title, answer.markdown);
            match sender.send(&reply).await {
                Ok(route) => log::info!("reply to {} delivered via {route:?}", message.msg_id),
                Err(e) => log::error!("reply to {} lost: {e}", message.msg_id),
            }
            drop(permit);
        });
    }
    running.close();
    // Replies in flight get a moment to finish; the durable outbox will carry the rest.
    let _ = tokio::time::timeout(Duration::from_secs(5), running.wait()).await;
}
