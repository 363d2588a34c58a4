//! `zhuli run`: wires the store, the channel, the pipeline and the assistant together and runs
//! them until asked to stop.
//!
//! The pipeline for one message: record it durably (processed msgId + inbox, one commit for a
//! batch) → ACK the frame → answer → stage the reply in the outbox (atomically leaving the inbox)
//! → deliver → forget. What a crash interrupts is picked up at the next start: inbox items are
//! answered, outbox items delivered. A redelivered msgId is recognised and only ACKed.

mod chats;
pub mod maintenance;
mod nightly;
mod scheduler;
mod upkeep;

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use rust_i18n::t;
use tokio::{
    sync::{OwnedSemaphorePermit, mpsc, watch},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use self::chats::{Chats, Job, Step};
use crate::clock::now_ms;
use crate::{
    access::{Access, AccessError},
    assistant::{Assistant, Parts, Progress, StatusView},
    audit::{Audit, Event, Kind},
    config::Config,
    dingtalk::{
        card::Cards,
        http::{HttpClient, tls_config},
        media::{MediaArea, MediaError},
        message::{ConversationKind, RobotMessage},
        openapi::OpenApi,
        sender::{Reply, ReplySender, SenderStatus},
        stream::{Inbound, StreamClient, StreamStatus},
    },
    health::{
        self, Beat, Health,
        monitor::Monitor,
        notify::Notifier,
        status::{self, Snapshot},
    },
    llm::{self, LlmError},
    store::{self, Acceptance, OutboxEntry, Store, StoreError, key::StoreKey, writer::StoreWriter},
    tools::{self, Registry, files::RootError, system::SystemTool},
};

/// Messages recorded in one commit, at most. Larger batches made bursts slower on 2 cores
/// (5,000 messages from 500 people: 2,500–3,500 msg/s at 256 against 5,700–6,900 at 64): the
/// conversations wait for the whole commit while the cores have nothing else to do; 64 still
/// records and ACKs over 20,000 messages a second.
const BATCH: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot prepare the media area under the state directory: {0}")]
    Media(#[from] MediaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Access(#[from] AccessError),
    #[error(transparent)]
    Roots(#[from] RootError),
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error(transparent)]
    Privacy(#[from] crate::privacy::PolicyError),
    #[error("[[models]] names {0:?} twice (the [llm] table is named \"llm\"); give every model endpoint its own name")]
    ModelName(String),
    #[error(transparent)]
    Workspace(#[from] tools::workspace::WorkspaceSettingsError),
    #[error(transparent)]
    Github(#[from] tools::github::GithubSettingsError),
    #[error(transparent)]
    Drive(#[from] tools::drive::DriveSettingsError),
    #[error(transparent)]
    Caldav(#[from] tools::caldav::CaldavSettingsError),
    #[error(transparent)]
    Plugin(#[from] tools::mcp::PluginSettingsError),
    #[error("cannot create the state directory {path}: {source}")]
    StateDir { path: std::path::PathBuf, source: std::io::Error },
}

/// Handles to a running agent's figures (for tests and the demo).
#[derive(Clone)]
pub struct AgentHandles {
    pub stream: Arc<StreamStatus>,
    pub sender: Arc<SenderStatus>,
}

/// Run blocking store work off the async workers.
async fn blocking<T: Send + 'static>(store: &Arc<Store>, f: impl FnOnce(&Store) -> T + Send + 'static) -> T {
    let store = store.clone();
    tokio::task::spawn_blocking(move || f(&store)).await.expect("store calls do not panic")
}

/// Open the store named by the configuration (key from the systemd credential or key file).
pub fn open_store(config: &Config) -> Result<Store, AgentError> {
    let dir = &config.agent.state_dir;
    std::fs::create_dir_all(dir).map_err(|source| AgentError::StateDir { path: dir.clone(), source })?;
    let key = StoreKey::load(config.store.key_file.as_deref()).map_err(StoreError::from)?;
    Ok(Store::open(&store::file_in(dir), &key, config.store.retention())?)
}

/// Run the agent until `cancel` fires.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<(), AgentError> {
    let handles = AgentHandles { stream: Arc::default(), sender: Arc::default() };
    run_with(config, cancel, handles).await
}

pub async fn run_with(config: Config, cancel: CancellationToken, handles: AgentHandles) -> Result<(), AgentError> {
    // One language per box, from before anything can be said.
    config.agent.language.apply();
    let store = {
        let config = config.clone();
        Arc::new(
            tokio::task::spawn_blocking(move || open_store(&config))
                .await
                .expect("opening the store does not panic")?,
        )
    };
    let tls = tls_config();
    let http = HttpClient::new(tls.clone(), config.dingtalk.stream.connect_timeout_ms.get());
    let api = Arc::new(OpenApi::new(config.dingtalk.clone(), http.clone()));
    // Opened now so a bad state directory fails at start; the LLM's tools fetch into it.
    let media = Arc::new(MediaArea::open(config.agent.state_dir.join("media"), api.clone()).await?);
    let inbox = media.dir().to_owned();
    let health = Health::new(config.health.clone());
    let every = health.beat_every();
    let (writer, writer_task) = StoreWriter::start_with(store.clone(), Some((health.task("store-writer"), every)));
    let assistant = build_assistant(&config, &handles, store.clone(), api.clone(), Some(media), health.clone()).await?;
    // One answer may take a whole turn and then the reply's retries; workers are hung only when
    // none has finished for longer than that.
    let worker_deadline = config.assistant.turn_timeout_ms.get()
        + config.dingtalk.limits.reply_give_up_ms.get()
        + Duration::from_secs(60);
    let work = Arc::new(Work {
        assistant,
        sender: ReplySender::new(api.clone(), handles.sender.clone()),
        cards: config.dingtalk.card.clone().map(|c| Arc::new(Cards::new(api.clone(), c))),
        store: store.clone(),
        writer,
        workers: health.workers("workers", worker_deadline),
        health: health.clone(),
    });
    let (inbox_tx, inbox_rx) = mpsc::channel::<Inbound>(config.agent.inbox_capacity);
    let stream = StreamClient::new(config.dingtalk.clone(), http, tls, inbox_tx, handles.stream.clone());
    let notifier = Arc::new(Notifier::from_env());
    let snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync> = {
        let work = work.clone();
        Arc::new(move || work.assistant.snapshot())
    };

    let tasks = TaskTracker::new();
    tasks.spawn(stream.run(cancel.clone(), Some((health.task("stream"), every))));
    let chats = Chats::new(
        work.clone(),
        config.agent.workers,
        chats::Policy {
            notice_at: config.agent.backlog_notice,
            max_waiting: config.agent.backlog_max,
            merge_max: config.agent.merge_max,
        },
        cancel.clone(),
    );
    tasks.spawn(nightly::run(work.clone(), config.clone(), cancel.clone(), health.task("nightly backup")));
    let resumed = Arc::new(tokio::sync::Notify::new());
    tasks.spawn(scheduler::run(
        work.clone(),
        chats.clone(),
        config.clone(),
        work.assistant.jobs_changed(),
        resumed.clone(),
        cancel.clone(),
        health.task("scheduler"),
    ));
    tasks.spawn(pipeline(inbox_rx, work.clone(), chats, resumed, cancel.clone(), health.task("dispatcher")));
    tasks.spawn(upkeep::run(
        upkeep::Upkeep::new(store, &config.store, health.clone()),
        cancel.clone(),
        health.task("store upkeep"),
        every,
    ));
    tasks.spawn(monitor(work.clone(), config.clone(), cancel.clone()));
    {
        let (tx, rx) = mpsc::channel(16);
        for plugin in work.assistant.plugins() {
            plugin.report_stops(tx.clone());
        }
        tasks.spawn(plugin_stops(work.clone(), config.clone(), rx, cancel.clone()));
    }
    tasks.spawn(check_folders(work.clone(), config.clone(), inbox.clone()));
    let socket = config.health.socket_path(&config.agent.state_dir);
    {
        let (snapshot, cancel) = (snapshot.clone(), cancel.clone());
        let folders: status::FolderCheck = {
            let settings = config.tools.files.clone();
            Arc::new(move || {
                serde_json::to_string(&tools::files::check_folders(&settings, Some(&inbox))).unwrap_or_default()
            })
        };
        let diagnose = diagnose(&config, &socket, snapshot.clone());
        tasks.spawn(async move {
            if let Err(e) = status::serve(socket, snapshot, folders, diagnose, cancel).await {
                log::error!("{e}; `zhuli status` will not work until this is fixed");
            }
        });
    }
    let line = {
        let snapshot = snapshot.clone();
        let offset = config.assistant.utc_offset_minutes;
        // When the connection state last changed, as the supervisor saw it.
        let since = std::sync::Mutex::new((false, now_ms()));
        move || {
            let s = snapshot();
            let mut since = since.lock().unwrap_or_else(|p| p.into_inner());
            if since.0 != s.connected {
                *since = (s.connected, now_ms());
            }
            status_line(&s, &crate::assistant::settings::local_time(since.1, offset).0)
        }
    };
    tasks.spawn(health::supervise(health.clone(), notifier.clone(), line, cancel.clone()));
    notifier.notify("READY=1");
    log::info!(
        "zhuli agent started; connecting to {}{}",
        config.dingtalk.api_base.as_str(),
        match health::notify::watchdog_interval() {
            Some(w) => format!("; systemd watchdog every {w:?}"),
            None => String::new(),
        }
    );
    cancel.cancelled().await;
    tasks.close();
    tasks.wait().await;
    // The writer ends once the last worker has dropped its handle; a worker still retrying a
    // throttled reply is not waited for (its outbox item is delivered at the next start).
    let _ = tokio::time::timeout(Duration::from_secs(2), writer_task).await;
    log::info!("zhuli agent stopped");
    Ok(())
}

/// The assistant with its tools, permissions, audit trail and model.
pub async fn build_assistant(
    config: &Config,
    handles: &AgentHandles,
    store: Arc<Store>,
    api: Arc<OpenApi>,
    media: Option<Arc<MediaArea>>,
    health: Arc<Health>,
) -> Result<Assistant, AgentError> {
    let started = Instant::now();
    let mut registry = Registry::default();
    let inbox = media.as_ref().map(|m| m.dir().to_owned());
    let roots =
        tools::files::Roots::open(&config.tools.files, &config.agent.state_dir, inbox.as_deref(), store.file_sealer())?;
    for tool in tools::files::tools(&roots) {
        registry.add(tool);
    }
    let workspace = tools::workspace::Workspace::new(
        api,
        store.clone(),
        config.tools.dingtalk.clone(),
        config.assistant.utc_offset_minutes,
        config.agent.time_zone.as_deref(),
        roots.clone(),
    )?;
    for tool in tools::workspace::tools(&workspace) {
        registry.add(tool);
    }
    let caldav = tools::caldav::Caldav::new(
        &config.tools.caldav,
        config.assistant.utc_offset_minutes,
        config.agent.time_zone.as_deref(),
    )?;
    if let Some(caldav) = caldav {
        for tool in tools::caldav::tools(&caldav) {
            registry.add(tool);
        }
    }
    if let Some(drive) = tools::drive::Drive::new(&config.tools.drive, roots.clone())? {
        for tool in tools::drive::tools(&drive) {
            registry.add(tool);
        }
    }
    if let Some(github) = tools::github::GithubTools::new(&config.tools.github, config.assistant.utc_offset_minutes)? {
        for tool in tools::github::tools(&github) {
            registry.add(tool);
        }
    }
    let (plugins, plugin_tools) = tools::mcp::start_all(&config.tools.mcp, &config.agent.state_dir).await?;
    for tool in plugin_tools {
        registry.add(tool);
    }
    // Jobs made in people's own words need a model to hear them.
    let jobs_changed = Arc::new(tokio::sync::Notify::new());
    if config.llm.is_some() || !config.models.is_empty() {
        registry.add(tools::jobs::JobsTool::new(
            store.clone(),
            config.schedule.clone(),
            jobs_changed.clone(),
            crate::assistant::command::is_command,
        ));
    }
    registry.add(Arc::new(SystemTool::new(
        started,
        handles.stream.clone(),
        handles.sender.clone(),
        config.agent.state_dir.clone(),
    )));
    let paired = blocking(&store, |s| s.setting("paired-users")).await?;
    let paired = paired.and_then(|p| serde_json::from_str(&p).ok()).unwrap_or_default();
    // A plugin that could not start offers no tools now; grants naming it stay valid.
    let plugin_names: Vec<String> = plugins.iter().map(|p| p.name.clone()).collect();
    let access =
        Access::new(config.access.clone(), registry.names().chain(plugin_names.iter().map(String::as_str)), paired)?;
    let audit = Arc::new(Audit::new(&config.audit));
    let changes = audit_config_changes(config, &store, &audit).await;
    if changes.iter().any(|c| c.starts_with("[access]")) {
        // Address-book look-ups never outlive a permission change.
        match blocking(&store, |s| s.cache_clear()).await {
            Ok(n) => log::info!("[access] changed: {n} cached look-ups dropped"),
            Err(e) => log::warn!("cannot empty the look-up cache: {e}"),
        }
    }
    *health.config_changes.lock().unwrap_or_else(|p| p.into_inner()) = changes;
    let endpoints: Vec<llm::Settings> = config.llm.iter().chain(&config.models).cloned().collect();
    let mut names = std::collections::BTreeSet::new();
    if let Some(twice) = endpoints.iter().find(|e| !names.insert(e.name.as_str())) {
        return Err(AgentError::ModelName(twice.name.clone()));
    }
    let vision = !endpoints.is_empty() && endpoints.iter().all(|e| e.vision);
    let budget_limits = endpoints.first().map_or((0, 0), |l| (l.daily_tokens, l.daily_tokens_per_user));
    let model = endpoints.first().map(|l| l.model.clone());
    let router = if endpoints.is_empty() {
        log::warn!("no [llm] section and no [[models]]: answering commands only");
        None
    } else {
        let router = llm::route::Router::new(endpoints)?;
        if !router.serves(llm::route::Class::Protected) {
            log::warn!(
                "no local model endpoint: protected work (files, address book, approvals, calendars, personal data) is refused, never sent to the cloud; add [[models]] with where = \"local\", or narrow [privacy]"
            );
        }
        Some(router)
    };
    let privacy = crate::privacy::Policy::new(&config.privacy)?;
    Ok(Assistant::new(Parts {
        status: StatusView { started, stream: handles.stream.clone(), sender: handles.sender.clone() },
        llm: router,
        privacy,
        model,
        settings: config.assistant.clone(),
        tools: registry,
        roots,
        media,
        vision,
        access,
        audit,
        store,
        budget_limits,
        tokens: Default::default(),
        llm_wait_ns: Default::default(),
        refusals: Default::default(),
        health,
        llm_errors: Default::default(),
        denials: Default::default(),
        plugins,
        maintenance: Some(maintenance::Upkeep::new(config)),
        schedule: config.schedule.clone(),
        jobs_changed,
    }))
}

/// Compare the configuration's tables with those of the previous run: each table that changed
/// is a `config-changed` audit event (`[access]` also `permission-changed`), naming the table only.
async fn audit_config_changes(config: &Config, store: &Arc<Store>, audit: &Audit) -> Vec<String> {
    let mut changes = Vec::new();
    const SETTING: &str = "config-digests";
    let previous = blocking(store, |s| s.setting(SETTING)).await.ok().flatten();
    let previous: Option<std::collections::BTreeMap<String, String>> =
        previous.and_then(|p| serde_json::from_str(&p).ok());
    if let Some(previous) = &previous {
        let names: std::collections::BTreeSet<&String> = previous.keys().chain(config.digests.keys()).collect();
        for name in names {
            let (before, now) = (previous.get(name), config.digests.get(name));
            if before == now {
                continue;
            }
            let how = match (before, now) {
                (None, _) => "added",
                (_, None) => "removed",
                _ => "changed",
            };
            audit.record(Event::new(Kind::ConfigChanged, "", "").target(format!("[{name}]")).outcome(how));
            changes.push(format!("[{name}] {how}"));
            if name == "access" {
                audit.record(
                    Event::new(Kind::PermissionChanged, "", "").target("[access]").outcome(how).reason("configuration"),
                );
            }
        }
    }
    if previous.as_ref() != Some(&config.digests) {
        let now = serde_json::to_string(&config.digests).unwrap_or_default();
        if let Err(e) = blocking(store, move |s| s.set_setting(SETTING, &now)).await {
            log::warn!("cannot keep the configuration digests: {e}");
        }
    }
    changes
}

/// The one line systemd shows in `systemctl status`.
fn status_line(s: &Snapshot, since: &str) -> String {
    let mut line = format!(
        "{} since {since} · {} messages accepted, {} answered, {} failed since start",
        if s.connected { "connected" } else { "reconnecting" },
        s.messages_accepted,
        s.messages_answered,
        s.messages_failed
    );
    if !s.alarms.is_empty() {
        line.push_str(&format!(" · alarms: {}", s.alarms.join(", ")));
    }
    if let Some(e) = &s.last_error {
        line.push_str(&format!(" · last error: {}", e.chars().take(120).collect::<String>()));
    }
    line
}

/// How long `/doctor` and a stick's diagnostics wait for the gateway's first frame.
const DOCTOR_WAIT: Duration = Duration::from_secs(15);

/// The full diagnostics report, made by this agent: for a stick (over the status socket) and
/// for `/doctor`.
fn diagnose(
    config: &Config,
    socket: &std::path::Path,
    snapshot: Arc<dyn Fn() -> Snapshot + Send + Sync>,
) -> status::Diagnose {
    let (config, socket) = (Arc::new(config.clone()), socket.to_owned());
    // One run at a time: a second stick plugged in, or `/诊断` asked, meanwhile gets the next
    // report rather than a second run beside the first.
    let one = Arc::new(tokio::sync::Mutex::new(()));
    Arc::new(move || {
        let (config, socket, snapshot, one) = (config.clone(), socket.clone(), snapshot.clone(), one.clone());
        Box::pin(async move {
            let _turn = one.lock().await;
            let report = health::diagnostics::full(&config, &socket, snapshot(), DOCTOR_WAIT).await;
            serde_json::to_string(&report).unwrap_or_default()
        })
    })
}

/// A stick the box refused (the import keeps the previous configuration running): the admins
/// hear why, once per refusal, across restarts.
async fn tell_refused_import(work: &Arc<Work>, config: &Config, root: &std::path::Path) {
    const TOLD: &str = "provision-refusal-told";
    let Some(refusal) = crate::provision::Refusal::last(root) else { return };
    let id = refusal.id();
    if blocking(&work.store, |s| s.setting(TOLD)).await.ok().flatten().as_deref() == Some(id.as_str()) {
        return;
    }
    let serial = refusal.serial.map(|s| s.to_string()).unwrap_or_else(|| "-".into());
    // In the box's language; a refusal recorded by an older import has its English lines only
    // (their heading, "… cannot run on this box:", is the message's own).
    let reasons: String = if refusal.problems.is_empty() {
        refusal.reasons.iter().filter(|r| !r.ends_with(':')).map(|r| format!("\n- {r}")).collect()
    } else {
        refusal.problems.iter().map(|p| format!("\n- {}", p.text())).collect()
    };
    work.assistant.audit().record(
        Event::new(Kind::Alert, "", "")
            .target(format!("stick serial {serial}"))
            .outcome("refused")
            .reason(refusal.reasons.join("; ")),
    );
    let text = t!("alert.refused", serial = serial, time = refusal.time.as_str(), reasons = reasons);
    tell_admins(work, config, &t!("alert.refused_title"), &text);
    let _ = blocking(&work.store, move |s| s.set_setting(TOLD, &id)).await;
}

/// What root's update journal says that the admins have not heard yet: a release fetched,
/// installed, kept, found bad and left, refused, rolled back. Told once each, across restarts
/// and releases (the store keeps how many events were told). A store that never told any starts
/// at the events of the last day.
async fn tell_update_news(work: &Arc<Work>, config: &Config) {
    const TOLD: &str = "update-events-told";
    let events = crate::update::boot::events(&crate::update::boot::events_path());
    let told: Option<usize> =
        blocking(&work.store, |s| s.setting(TOLD)).await.ok().flatten().and_then(|t| t.parse().ok());
    let day_ago = crate::clock::now_ms() - 86_400_000;
    let fresh: Vec<&crate::update::boot::Event> = match told {
        Some(n) if n <= events.len() => events[n..].iter().collect(),
        // Fewer events than told: the journal was started again.
        _ => events.iter().filter(|e| e.at_ms >= day_ago).collect(),
    };
    if fresh.is_empty() && told == Some(events.len()) {
        return;
    }
    if fresh.iter().any(|e| e.what == "available" || e.what == "stick") {
        // Before any update: a snapshot of the store (the new release opens it as it finds it).
        // Root installs in the window only once there is one; a failure is the admins' to fix.
        if let Some(m) = &work.assistant.maintenance() {
            match m.snapshot_for_update().await {
                Ok(b) => log::info!("snapshot before the update: {}", b.path),
                Err(e) => {
                    log::warn!("no snapshot before the update: {e}");
                    tell_admins(work, config, &t!("update.news_title"), &t!("update.no_snapshot", error = e));
                }
            }
        }
    }
    if !fresh.is_empty() {
        let running = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|t| crate::update::boot::running_version(&t))
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned());
        let lines: String = fresh.iter().map(|e| format!("\n- {}", crate::update::news(e))).collect();
        for e in &fresh {
            work.assistant.audit().record(
                Event::new(Kind::Alert, "", "")
                    .target(format!("release {}", e.version))
                    .outcome(e.what.clone())
                    .reason(e.why.clone()),
            );
        }
        tell_admins(work, config, &t!("update.news_title"), &t!("update.news", lines = lines, running = running));
    }
    let n = events.len().to_string();
    let _ = blocking(&work.store, move |s| s.set_setting(TOLD, &n)).await;
}

/// Sample the box's resources and the security counters; tell the admins (and the audit
/// trail) when a threshold is crossed and when it clears.
async fn monitor(work: Arc<Work>, config: Config, cancel: CancellationToken) {
    let settings = config.health.clone();
    let mut m = Monitor::new(config.agent.state_dir.clone());
    // A configuration changed since the last run is a security signal the admins hear about.
    let changes = std::mem::take(&mut *work.health.config_changes.lock().unwrap_or_else(|p| p.into_inner()));
    if !changes.is_empty() {
        let said: Vec<String> = changes.iter().map(|c| said_change(c)).collect();
        let text = t!("alert.config", changes = said.join("、"));
        tell_admins(&work, &config, &t!("alert.config_title"), &text);
    }
    let mut turns = health::Periodic::new(
        "monitor",
        work.health.task("monitor"),
        work.health.beat_every(),
        settings.sample_ms.get(),
        Duration::ZERO,
    );
    // Configuration sticks pulled out before their secrets were removed, already announced.
    let provisioning = crate::provision::root_of(&config.path);
    let mut told_sticks = std::collections::BTreeSet::new();
    // Frames the store did not record (left unACKed), and when the admins last heard of it.
    let (mut unrecorded, mut told_unrecorded): (u64, Option<Instant>) = (0, None);
    // A reconnect storm, as the stream counts it: told when it starts, and its end only once
    // no connection has been opened or failed for a whole storm window (a connection that reads
    // one frame and drops is not the end of it).
    let window = config.dingtalk.stream.storm_window_ms.get();
    let (mut storm_told, mut attempts, mut steady_since) = (false, 0, Instant::now());
    while turns.next(&cancel).await {
        let snapshot = work.assistant.snapshot();
        let now_attempts = snapshot.connections_opened + snapshot.connect_failures;
        if now_attempts != attempts {
            (attempts, steady_since) = (now_attempts, Instant::now());
        }
        if snapshot.reconnect_storm && !storm_told {
            storm_told = true;
            tell_storm(&work, &config, true);
        } else if storm_told && !snapshot.reconnect_storm && steady_since.elapsed() >= window {
            storm_told = false;
            tell_storm(&work, &config, false);
        }
        let now_unrecorded = snapshot.frames_unrecorded;
        if now_unrecorded > unrecorded && told_unrecorded.is_none_or(|t| t.elapsed() >= Duration::from_secs(600)) {
            told_unrecorded = Some(Instant::now());
            let n = now_unrecorded - unrecorded;
            work.assistant.audit().record(Event::new(Kind::Alert, "", "").target("store").outcome("raised").reason(
                format!("{n} incoming messages could not be recorded and were left for the gateway to deliver again"),
            ));
            tell_admins(&work, &config, &t!("alert.store_title"), &t!("alert.store", n = n));
            unrecorded = now_unrecorded;
        }
        tell_update_news(&work, &config).await;
        if let Some(root) = &provisioning {
            tell_refused_import(&work, &config, root).await;
            for stick in crate::provision::scrub::unattended(root) {
                if told_sticks.insert(stick.volume_id) {
                    work.assistant.audit().record(
                        Event::new(Kind::Alert, "", "")
                            .target(format!("stick {:08x}", stick.volume_id))
                            .outcome("raised")
                            .reason("the configuration stick still holds secrets: it was pulled out while they were being removed".to_owned()),
                    );
                    log::warn!(
                        "the configuration stick {:08x} (serial {}) still holds secrets: plug it in again",
                        stick.volume_id,
                        stick.serial
                    );
                    let text = t!("alert.stick", serial = stick.serial);
                    tell_admins(&work, &config, &t!("alert.stick_title"), &text);
                }
            }
        }
        let (sample, m_back) = match tokio::task::spawn_blocking(move || {
            let s = m.sample();
            (s, m)
        })
        .await
        {
            Ok(r) => r,
            Err(_) => return,
        };
        m = m_back;
        let (refused, denied) = work.assistant.security_counts();
        let alarms = m.evaluate(&sample, refused, denied, &settings);
        *work.health.resources.lock().unwrap_or_else(|p| p.into_inner()) = Some(sample);
        *work.health.alarms.lock().unwrap_or_else(|p| p.into_inner()) =
            m.active().into_iter().map(str::to_owned).collect();
        for alarm in alarms {
            let kind = if alarm.raised { "raised" } else { "cleared" };
            work.assistant
                .audit()
                .record(Event::new(Kind::Alert, "", "").target(alarm.name).outcome(kind).reason(alarm.text.clone()));
            let (title, text) = if alarm.raised {
                (t!("alert.raised_title"), t!("alert.raised", alarm = alarm.chat))
            } else {
                (t!("alert.cleared_title"), t!("alert.cleared", alarm = alarm.chat))
            };
            tell_admins(&work, &config, &title, &text);
            if alarm.raised {
                log::warn!("alert: {}", alarm.text);
            } else {
                log::info!("alert cleared: {}", alarm.text);
            }
        }
    }
}

/// A reconnect storm began (`raised`) or ended: in the audit trail, and the admins are told (the
/// replies go over HTTPS, which may work while the Stream connection does not).
fn tell_storm(work: &Arc<Work>, config: &Config, raised: bool) {
    let st = &config.dingtalk.stream;
    let minutes = st.storm_window_ms.get().as_secs().div_ceil(60);
    let (kind, reason, title, text) = if raised {
        (
            "raised",
            format!("reconnect storm: {} connection attempts within {minutes} min", st.storm_attempts),
            t!("alert.raised_title"),
            t!("alert.raised", alarm = t!("alarm.storm", attempts = st.storm_attempts, minutes = minutes)),
        )
    } else {
        (
            "cleared",
            "reconnect storm over: the connection receives frames again".to_owned(),
            t!("alert.cleared_title"),
            t!("alert.cleared", alarm = t!("alarm.storm_over")),
        )
    };
    work.assistant
        .audit()
        .record(Event::new(Kind::Alert, "", "").target("dingtalk stream").outcome(kind).reason(reason));
    tell_admins(work, config, &title, &text);
}

/// A plugin stopped for reaching a limit: in the audit trail, and the admins are told.
async fn plugin_stops(
    work: Arc<Work>,
    config: Config,
    mut stops: mpsc::Receiver<tools::mcp::PluginStop>,
    cancel: CancellationToken,
) {
    // Every stop is audited; the admins hear of a plugin at most once in this long (anyone may
    // call a plugin that misbehaves, over and over).
    const TELL_EVERY: Duration = Duration::from_secs(600);
    let mut told: std::collections::HashMap<String, Instant> = std::collections::HashMap::new();
    loop {
        let stop = tokio::select! {
            _ = cancel.cancelled() => return,
            s = stops.recv() => match s { Some(s) => s, None => return },
        };
        work.assistant.audit().record(
            Event::new(Kind::PluginStopped, "", "")
                .tool(format!("plugin {}", stop.plugin))
                .outcome("stopped")
                .reason(stop.limit.to_string()),
        );
        let text = t!("alert.plugin", name = stop.plugin, reason = stop.limit.said());
        if told.get(&stop.plugin).is_none_or(|at| at.elapsed() >= TELL_EVERY) {
            told.insert(stop.plugin.clone(), Instant::now());
            tell_admins(&work, &config, &t!("alert.plugin_title"), &text);
        }
    }
}

/// The folders the files tools and drive downloads use, checked once at start as this process
/// — the agent's user, in its own mount namespace — finds them, so a read-only or missing root
/// is known before someone confirms a write into it. What is wrong is logged and told to the
/// admins; the agent keeps serving (calls naming such a root fail with the reason).
async fn check_folders(work: Arc<Work>, config: Config, inbox: std::path::PathBuf) {
    let settings = config.tools.files.clone();
    let Ok(report) = tokio::task::spawn_blocking(move || tools::files::check_folders(&settings, Some(&inbox))).await
    else {
        return;
    };
    let problems: Vec<&tools::files::FolderCheck> = report.problems().collect();
    if problems.is_empty() {
        let lines: Vec<String> = report.folders.iter().map(|c| c.line()).collect();
        log::info!("folders checked as {}: {}", report.user, lines.join("; "));
        return;
    }
    let mut lines = Vec::new();
    for c in &problems {
        let fix = c.fix(&report.user).unwrap_or_default();
        log::error!("folder {}; {fix}", c.line());
        lines.push(t!(
            "alert.folder",
            name = c.name,
            path = c.path.display(),
            problem = c.problem.as_ref().map(|p| p.said()).unwrap_or_default(),
            fix = c.fix_said(&report.user).unwrap_or_default()
        ));
    }
    let text = t!("alert.folders", list = lines.join("\n"));
    tell_admins(&work, &config, &t!("alert.folders_title"), &text);
}

/// One line of `record_config`'s changes (`[access] changed`) as the admins are told it.
fn said_change(change: &str) -> String {
    let (table, how) = change.rsplit_once(' ').unwrap_or((change, ""));
    let table = table.trim_start_matches('[').trim_end_matches(']');
    match how {
        "added" => t!("alert.table_added", table = table),
        "removed" => t!("alert.table_removed", table = table),
        _ => t!("alert.table_changed", table = table),
    }
    .into_owned()
}

/// Send a message to the admins in the background (alerts and notices).
fn tell_admins(work: &Arc<Work>, config: &Config, title: &str, text: &str) {
    for reply in admin_replies(config, title, text) {
        let work = work.clone();
        tokio::spawn(async move {
            if let Err(e) = work.sender.send(&reply).await {
                log::error!("a message to the admins was not delivered: {e}");
            }
        });
    }
}

/// [`tell_admins`], waiting for the deliveries (each with the sender's retries): whether the
/// message reached at least one admin chat.
async fn tell_admins_delivered(work: &Arc<Work>, config: &Config, title: &str, text: &str) -> bool {
    let mut delivered = false;
    for reply in admin_replies(config, title, text) {
        match work.sender.send(&reply).await {
            Ok(_) => delivered = true,
            Err(e) => log::error!("a message to the admins was not delivered: {e}"),
        }
    }
    delivered
}

/// Replies that reach the admins: the admin group chat if configured, else each admin 1:1.
fn admin_replies(config: &Config, title: &str, text: &str) -> Vec<Reply> {
    let reply = |conversation_id: String, kind, to_staff_id| Reply {
        conversation_id,
        kind,
        to_staff_id,
        webhook: None,
        title: title.to_owned(),
        markdown: text.to_owned(),
    };
    match &config.health.admin_chat {
        Some(cid) => vec![reply(cid.clone(), ConversationKind::Group, None)],
        None => config
            .access
            .admins
            .iter()
            .map(|a| reply(format!("admin:{a}"), ConversationKind::Single, Some(a.clone())))
            .collect(),
    }
}

/// What a worker needs to answer and deliver.
struct Work {
    assistant: Assistant,
    sender: ReplySender,
    /// AI cards, when `[dingtalk.card]` is configured.
    cards: Option<Arc<Cards>>,
    store: Arc<Store>,
    /// All bookkeeping writes go through the group-commit writer: the shorter the time between
    /// a reply reaching DingTalk and its durable "delivered" mark, the fewer replies a crash can
    /// make the agent send twice.
    writer: StoreWriter,
    /// Checked in as answers finish.
    workers: Arc<Beat>,
    health: Arc<Health>,
}

/// The AI card of one answer: created when the turn reaches the model, then fed the text so far
/// by a task that sends at most one update per interval (the latest text wins).
struct CardRun {
    cards: Arc<Cards>,
    message: RobotMessage,
    text: watch::Sender<String>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<Option<String>>>>,
}

impl CardRun {
    fn new(cards: Arc<Cards>, message: RobotMessage) -> Self {
        CardRun { cards, message, text: watch::Sender::new(String::new()), task: std::sync::Mutex::new(None) }
    }

    /// Stop updating; the card's id if it was created.
    async fn close(self) -> Option<String> {
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(self.text);
        task?.await.ok().flatten()
    }
}

impl Progress for CardRun {
    fn started(&self) {
        let mut task = self.task.lock().unwrap_or_else(|p| p.into_inner());
        if task.is_some() {
            return;
        }
        let cards = self.cards.clone();
        let message = self.message.clone();
        let mut rx = self.text.subscribe();
        *task = Some(tokio::spawn(async move {
            let id = match cards.create(&message).await {
                Ok(id) => id,
                Err(e) => {
                    log::warn!("no AI card for {} ({e}); the answer goes as a Markdown message", message.msg_id);
                    return None;
                }
            };
            let every = cards.update_interval();
            let mut shown = String::new();
            while rx.changed().await.is_ok() {
                tokio::time::sleep(every).await;
                let text = rx.borrow_and_update().clone();
                if text != shown {
                    // A lost update is healed by the next one: each carries the whole text.
                    if let Err(e) = cards.update(&id, &text).await {
                        log::debug!("card {id}: an update was not shown ({e})");
                    }
                    shown = text;
                }
            }
            Some(id)
        }));
    }

    fn show(&self, text: &str) {
        self.text.send_replace(text.to_owned());
    }
}

impl Work {
    /// One step of a conversation's queue. `slot` is the worker slot a turn holds; it is let go
    /// as soon as the answer is known, before the reply waits for the chat's send budget.
    async fn step(self: Arc<Self>, step: Step, slot: Option<OwnedSemaphorePermit>) {
        match step {
            Step::Deliver { seq, entry } => self.deliver(seq, entry, None, &[]).await,
            Step::Answer(items) => {
                self.workers.begin();
                self.clone().answer(items, slot).await;
                self.workers.end();
            }
            Step::Backlog { reply, waiting } => {
                let reply = Reply {
                    title: t!("queue.backlog_title").into_owned(),
                    markdown: t!("queue.backlog", waiting = waiting).into_owned(),
                    ..reply
                };
                log::info!(conversation = reply.conversation_id.as_str(); "conversation {}: told that {waiting} messages are waiting", reply.conversation_id);
                if let Err(e) = self.sender.send(&reply).await {
                    log::warn!("the notice that {waiting} messages are waiting was not delivered: {e}");
                }
            }
            Step::LeftOut { reply, seqs, ids, first, last, max } => {
                let n = seqs.len();
                let reply = Reply {
                    title: t!("queue.left_out_title").into_owned(),
                    markdown: t!("queue.left_out", max = max, n = n, first = first, last = last).into_owned(),
                    ..reply
                };
                let outcome = self.sender.send(&reply).await;
                self.writer.delivered_all(seqs);
                for id in &ids {
                    log::info!("message {id} left out (its conversation had {max} waiting); the sender was told");
                }
                if let Err(e) = outcome {
                    self.health.set_error(format!("a notice of {n} messages left out was lost: {e}"));
                    log::error!("the notice of {n} messages left out was not delivered: {e}");
                }
            }
        }
    }

    /// Answer the inbox items (several texts that queued up are answered in one turn) and
    /// deliver the reply; a costly answer is staged in the outbox first, so a crash does not make
    /// the agent produce it again.
    async fn answer(
        self: Arc<Self>,
        items: Vec<(u64, RobotMessage, Option<Instant>)>,
        slot: Option<OwnedSemaphorePermit>,
    ) {
        let message = chats::merge(&items);
        let n = items.len();
        let accepted = items.iter().filter_map(|i| i.2).min();
        let seq = items.last().map(|i| i.0).unwrap_or_default();
        let also: Vec<u64> = items[..n - 1].iter().map(|i| i.0).collect();
        let card = self.cards.as_ref().map(|c| CardRun::new(c.clone(), message.clone()));
        let answer = self.assistant.answer(&message, card.as_ref().map(|c| c as &dyn Progress)).await;
        drop(slot);
        let card = match card {
            Some(c) => c.close().await,
            None => None,
        };
        let markdown =
            if n > 1 { format!("{}\n\n{}", t!("queue.together", n = n), answer.markdown) } else { answer.markdown };
        let entry = OutboxEntry {
            msg_id: message.msg_id.clone(),
            reply: Reply::to(&message, answer.title, markdown),
            staged_at_ms: now_ms(),
            card,
        };
        if (answer.costly || entry.card.is_some())
            && let Err(e) = self.writer.stage(seq, entry.clone(), also.clone()).await
        {
            // Left in the inbox: answered again at the next start.
            log::error!("cannot stage the reply to {}: {e}", message.msg_id);
            return;
        }
        self.deliver(seq, entry, accepted, &also).await;
        for (_, m, _) in &items[..n - 1] {
            log::info!("message {} answered together with {}", m.msg_id, message.msg_id);
        }
    }

    /// Deliver outbox item `seq` (finalising its card, or as a message if there is none or the
    /// card fails), then forget it.
    /// `also`: messages the same reply answers, forgotten in the same commit.
    async fn deliver(&self, seq: u64, entry: OutboxEntry, accepted: Option<Instant>, also: &[u64]) {
        let forget = || {
            let mut seqs = also.to_vec();
            seqs.push(seq);
            self.writer.delivered_all(seqs);
        };
        let metrics = &self.health.metrics;
        let done = |route: &str| {
            log::info!(conversation = entry.reply.conversation_id.as_str(); "reply to {} delivered {route}", entry.msg_id);
            match accepted {
                Some(t) => metrics.answered_in(t.elapsed()),
                None => {
                    metrics.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        };
        if let (Some(id), Some(cards)) = (&entry.card, &self.cards) {
            match cards.finish(id, &entry.reply.markdown).await {
                Ok(()) => {
                    done(&format!("in AI card {id}"));
                    self.sender.status().delivered.fetch_add(1, Ordering::Relaxed);
                    forget();
                    return;
                }
                Err(e) => log::warn!("AI card {id} could not be finalised ({e}); sending the answer as a message"),
            }
        }
        match self.sender.send(&entry.reply).await {
            Ok(route) => done(&format!("via {route:?}")),
            Err(e) => {
                metrics.failed.fetch_add(1, Ordering::Relaxed);
                self.health.set_error(format!("a reply was lost: {e}"));
                log::error!("reply to {} lost: {e}", entry.msg_id);
            }
        }
        forget();
    }
}

/// The recorder: each batch of incoming messages is recorded in one durable commit, ACKed, and
/// queued behind its conversation's earlier work. It never waits for answers or send budgets,
/// so the socket reader always has room; only a store that cannot commit holds it up.
async fn pipeline(
    mut inbox: mpsc::Receiver<Inbound>,
    work: Arc<Work>,
    chats: Arc<Chats>,
    resumed: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
    beat: Arc<Beat>,
) {
    let every = work.health.beat_every();
    let started = Instant::now();

    // Work a previous run left unfinished, in the order it arrived: each conversation's staged
    // replies first (they answer its oldest messages), then its unanswered messages.
    match blocking(&work.store, |s| s.pending()).await {
        Ok((inbox_items, outbox_items)) => {
            if !inbox_items.is_empty() || !outbox_items.is_empty() {
                log::info!(
                    "resuming {} unanswered messages and {} undelivered replies from the store",
                    inbox_items.len(),
                    outbox_items.len()
                );
            }
            for (seq, entry) in outbox_items {
                chats.push(Job::Deliver { seq, entry });
            }
            for (seq, entry) in inbox_items {
                chats.push(Job::Answer { seq, message: entry.message, accepted: None });
            }
        }
        Err(e) => log::error!("cannot read unfinished work from the store: {e}"),
    }
    // Jobs may fire now: what they fire is not among what was just queued.
    resumed.notify_one();

    let mut batch: Vec<Inbound> = Vec::with_capacity(BATCH);
    loop {
        beat.tick();
        health::test_hang_point("dispatcher", started).await;
        let got = tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => continue,
            n = inbox.recv_many(&mut batch, BATCH) => n,
        };
        if got == 0 {
            break;
        }
        let items: Vec<(RobotMessage, bool)> =
            batch.iter().map(|i| (i.message.clone(), i.message.mentions_robot)).collect();
        let results = match work.writer.accept(items, now_ms()).await {
            Ok(r) => r,
            Err(e) => {
                // Not ACKed: the gateway delivers them again once the store works.
                log::error!("cannot record {} incoming messages: {e}; left unACKed", batch.len());
                work.health.set_error(format!("incoming messages cannot be recorded: {e}"));
                batch.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let received = Instant::now();
        for (Inbound { message, ack }, result) in batch.drain(..).zip(results) {
            ack.ack();
            match result {
                Acceptance::Duplicate => {
                    log::info!(conversation = message.conversation_id.as_str(); "message {} is a duplicate; ACKed, not answered again", message.msg_id)
                }
                Acceptance::Recorded => {
                    log::debug!("group message {} does not @mention the robot; ignored", message.msg_id)
                }
                Acceptance::Queued(seq) => {
                    work.health.metrics.accepted.fetch_add(1, Ordering::Relaxed);
                    log::info!(
                        conversation = message.conversation_id.as_str();
                        "message {} ({}) accepted from conversation {}",
                        message.msg_id,
                        message.kind_name(),
                        message.conversation_id
                    );
                    chats.push(Job::Answer { seq, message, accepted: Some(received) });
                }
            }
        }
    }
    // Replies in flight get a moment to finish; the store keeps the rest for the next start.
    chats.close(Duration::from_secs(5)).await;
}

/// Until SIGTERM or Ctrl-C, then `cancel`: how `zhuli run` (and the simulator's binary) stop.
pub async fn until_signal(cancel: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::warn!("cannot watch SIGTERM ({e}); stop with Ctrl-C");
            let _ = tokio::signal::ctrl_c().await;
            cancel.cancel();
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    cancel.cancel();
}
