//! `zhuli doctor`: the channel troubleshooting an operator would otherwise do by hand, in five
//! steps, each with a verdict and the fix to try:
//!
//! 1. network — DNS, TCP and TLS to every configured endpoint (DingTalk's API, the LLM);
//! 2. credentials — fetch an access token with the app's key and secret;
//! 3. basic API — open a Stream connection and wait for the gateway's first frame (callbacks that
//!    arrive on it are not ACKed, so the gateway gives them to the running agent instead);
//! 4. recent errors — warnings and errors of the agent from the journal;
//! 5. version — this binary, the running agent's, and whether a previous one is kept to roll
//!    back to;
//! 6. tools — one read with each configured backend's account (GitHub, the drive, each CalDAV
//!    calendar) and each MCP plugin started in its sandbox and asked for its tools;
//! 7. folders — the files tools' roots (where drive downloads land too) and the received-files
//!    inbox, as the running agent finds them: it checks them when asked over its status socket,
//!    as its own user in its own mount namespace (systemd's sandbox makes folders read-only
//!    that are writable out here). Without a running agent, as this process finds them.
//! 8. models — each model endpoint (`[llm]`, `[[models]]`): it answers, its key is accepted, the
//!    configured model is among those it offers, and the model calls a tool when asked to
//!    ([`crate::llm::check`]); all endpoints at once, each within [`MODEL_CHECK`].

use std::{path::Path, time::Duration};

use futures_util::{SinkExt, StreamExt};
use tokio::{net::TcpStream, time::Instant};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    config::Config,
    dingtalk::{
        frame::{FrameType, StreamFrame, ping_ack},
        gateway,
        http::{HttpClient, tls_config},
        openapi::OpenApi,
    },
    i18n::Said,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Step {
    pub name: &'static str,
    pub verdict: Verdict,
    pub detail: String,
    /// What to try when it is not a pass, at the box's console (English).
    pub fix: Option<String>,
    /// The same for the admin chat, in the box's language: what an admin can do without a
    /// shell (the stick, the chat, the developer console).
    pub chat_fix: Option<Said>,
}

/// What to try: at a console, and in the admin chat.
type Fix = (String, Said);

fn fix(console: impl Into<String>, chat: Said) -> Option<Fix> {
    Some((console.into(), chat))
}

fn said(key: &'static str) -> Said {
    Said::new(key, &[])
}

fn step(name: &'static str, verdict: Verdict, detail: impl Into<String>, fix: Option<Fix>) -> Step {
    let (fix, chat_fix) = fix.map_or((None, None), |(f, c)| (Some(f), Some(c)));
    Step { name, verdict, detail: detail.into(), fix, chat_fix }
}

/// Who runs the doctor: an operator's command, or the running agent itself (`/doctor`, a stick's
/// diagnostics), which reports its own Stream connection instead of opening a second one (the
/// gateway could hand that one a person's message, left unACKed until it gives up on it).
#[derive(Debug, Clone, Copy)]
pub enum Runner {
    Command,
    /// The agent, and whether its connection is up now, with the frames it has read.
    Agent {
        connected: bool,
        frames: u64,
    },
}

/// Run the eight steps. `wait` bounds step 3.
pub async fn run(config: &Config, status_socket: &Path, wait: Duration) -> Vec<Step> {
    run_as(config, status_socket, wait, Runner::Command).await
}

/// [`run`], by `runner`.
pub async fn run_as(config: &Config, status_socket: &Path, wait: Duration, runner: Runner) -> Vec<Step> {
    // The models are checked while the other steps run: a slow local model does not lengthen
    // the report beyond its own bound.
    let (mut steps, models) = tokio::join!(first_seven(config, status_socket, wait, runner), models_step(config));
    steps.push(models);
    steps
}

async fn first_seven(config: &Config, status_socket: &Path, wait: Duration, runner: Runner) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut endpoints = vec![("DingTalk API", config.dingtalk.api_base.as_str().to_owned())];
    for m in config.llm.iter().chain(&config.models) {
        endpoints.push((if config.models.is_empty() { "LLM" } else { m.name.as_str() }, m.base_url.clone()));
    }
    let mut net_ok = true;
    let mut details = Vec::new();
    let mut net_fix = None;
    for (label, url) in &endpoints {
        match reach(url).await {
            Ok(d) => details.push(format!("{label} {d}")),
            Err((d, f, chat)) => {
                net_ok = false;
                details.push(format!("{label} {d}"));
                net_fix.get_or_insert((f.to_owned(), chat));
            }
        }
    }
    steps.push(step("network", if net_ok { Verdict::Pass } else { Verdict::Fail }, details.join("; "), net_fix));

    let http = HttpClient::new(tls_config(), config.dingtalk.stream.connect_timeout_ms.get());
    let api = OpenApi::new(config.dingtalk.clone(), http.clone());
    let creds = match api.check_token().await {
        Ok(()) => step("credentials", Verdict::Pass, "access token issued for the app", None),
        Err(e @ crate::dingtalk::openapi::TokenError::Refused(_)) => step(
            "credentials",
            Verdict::Fail,
            e.to_string(),
            fix(
                "copy Client ID and Client Secret again from the DingTalk developer console into [dingtalk]",
                said("doctor.fix_credentials"),
            ),
        ),
        Err(e) => step(
            "credentials",
            Verdict::Fail,
            e.to_string(),
            fix("the token request did not get through: fix the network step first", said("doctor.fix_network_first")),
        ),
    };
    let creds_ok = creds.verdict == Verdict::Pass;
    steps.push(creds);

    steps.push(if let Runner::Agent { connected, frames } = runner {
        if connected {
            step(
                "basic API",
                Verdict::Pass,
                format!("the agent's Stream connection is up ({frames} frames read)"),
                None,
            )
        } else {
            step(
                "basic API",
                Verdict::Fail,
                "the agent has no Stream connection now",
                fix(
                    "see the credentials and network steps; the agent reconnects by itself",
                    said("doctor.fix_reconnects"),
                ),
            )
        }
    } else if creds_ok || net_ok {
        stream_step(config, &http, wait).await
    } else {
        step(
            "basic API",
            Verdict::Fail,
            "skipped: the network or the credentials failed",
            fix("fix the steps above first", said("doctor.fix_above")),
        )
    });

    // The running agent answers for itself: it does not ask its own status socket, and it
    // says its own warnings (it may not read the journal).
    let by_agent = matches!(runner, Runner::Agent { .. });
    steps.push(recent_errors(&super::redact::secrets_of(config), by_agent));
    steps.push(version(status_socket, by_agent));
    steps.push(tools_step(config).await);
    steps.push(folders_step(config, status_socket, by_agent));
    steps
}

/// How long one model endpoint's check may take: a local model may first have to load.
pub const MODEL_CHECK: Duration = Duration::from_secs(45);

/// Step 8: every model endpoint, checked at once.
async fn models_step(config: &Config) -> Step {
    use crate::llm::check::{self, Level, Trouble};
    let endpoints: Vec<_> = config.llm.iter().chain(&config.models).collect();
    if endpoints.is_empty() {
        return step("models", Verdict::Pass, "no model configured: the agent answers commands only", None);
    }
    let found = futures_util::future::join_all(endpoints.iter().map(|m| check::check(m, MODEL_CHECK))).await;
    let level = found.iter().map(|f| f.level).max().unwrap_or(Level::Pass);
    let verdict = match level {
        Level::Pass => Verdict::Pass,
        Level::Warn => Verdict::Warn,
        Level::Fail => Verdict::Fail,
    };
    // The fix for the worst finding first; one per kind of trouble.
    let mut troubles: Vec<Trouble> = Vec::new();
    let mut by_level: Vec<_> = found.iter().collect();
    by_level.sort_by_key(|f| std::cmp::Reverse(f.level));
    for t in by_level.iter().flat_map(|f| &f.troubles) {
        if !troubles.contains(t) {
            troubles.push(*t);
        }
    }
    let fixes: Vec<(&str, Said)> = troubles
        .iter()
        .map(|t| match t {
            Trouble::Reach => {
                ("check base_url, that the model server runs, and the network step", said("doctor.fix_model_reach"))
            }
            Trouble::Key => ("copy the endpoint's api_key again from the provider's console", said("doctor.fix_model_key")),
            Trouble::Front => (
                "set the endpoint's api_key if its server or the HTTPS front before it wants one, or let the box's address in",
                said("doctor.fix_model_front"),
            ),
            Trouble::Balance => ("top up the account at the provider", said("doctor.fix_model_balance")),
            Trouble::Model => (
                "set model to one of the names the server lists (llama.cpp's server lists its file name unless started with --alias, and answers to any name)",
                said("doctor.fix_model_name"),
            ),
            Trouble::Tools => (
                "use a model that supports tool calling (Ollama: a model tagged tools; llama.cpp's server: --jinja; vLLM: --enable-auto-tool-choice --tool-call-parser for the model)",
                said("doctor.fix_model_tools"),
            ),
            Trouble::Slow => (
                "check again in a minute; a local model loads on its first request",
                said("doctor.fix_model_slow"),
            ),
            Trouble::Refused => ("the server's message says why", said("doctor.fix_model_refused")),
        })
        .collect();
    let fix = (!fixes.is_empty()).then(|| {
        let console = fixes.iter().map(|(c, _)| *c).collect::<Vec<_>>().join("; ");
        let chat = Said::new(
            "doctor.fix_models",
            &[("lines", &fixes.iter().filter_map(|(_, s)| s.text()).collect::<Vec<_>>().join("\n"))],
        );
        (console, chat)
    });
    let secrets = super::redact::secrets_of(config);
    let detail: Vec<String> = found.into_iter().map(|f| super::redact::redact(&f.line, &secrets)).collect();
    step("models", verdict, detail.join("\n"), fix)
}

/// Step 7: the folders the files tools use. `in_agent`: this is the running agent.
fn folders_step(config: &Config, status_socket: &Path, in_agent: bool) -> Step {
    use crate::tools::files::{self, FolderProblem, FolderReport};
    let inbox = config.agent.state_dir.join("media");
    let from_agent = if in_agent {
        Some(files::check_folders(&config.tools.files, Some(&inbox)))
    } else {
        let asked = super::status::ask(status_socket, "folders");
        asked.ok().and_then(|text| serde_json::from_str::<FolderReport>(&text).ok())
    };
    let by_agent = from_agent.is_some();
    // Without an agent the inbox may not be there yet: the agent makes it when it starts.
    let report = from_agent
        .unwrap_or_else(|| files::check_folders(&config.tools.files, inbox.exists().then_some(inbox.as_path())));
    if report.folders.is_empty() {
        return step("folders", Verdict::Pass, "no [tools.files.roots] configured", None);
    }
    let who = if by_agent {
        format!("as the running agent finds them (user {}, in its own mount namespace):", report.user)
    } else {
        format!("as zhuli doctor finds them (user {}; the agent is not running or not reachable):", report.user)
    };
    let mut detail = vec![who];
    detail.extend(report.folders.iter().map(|c| c.line()));
    let mut fixes = Vec::new();
    for c in report.problems() {
        // What differs between the agent's view and this one is the service's sandbox.
        let here = (by_agent && !in_agent).then(|| files::check_folder(&c.name, &c.path, c.writable));
        let fix = match (&c.problem, here.as_ref().map(|h| &h.problem)) {
            (Some(FolderProblem::ReadOnlyFileSystem), Some(None)) => format!(
                "the service unit does not allow writing there (outside the service the folder is writable; ProtectSystem=strict makes it read-only, and ReadWritePaths={} is not in the drop-in the import wrote): import the configuration again from its stick, which lists every configured folder (on the box, put shared folders under /srv)",
                c.path.display()
            ),
            (Some(FolderProblem::ReadOnlyFileSystem), Some(Some(FolderProblem::ReadOnlyFileSystem))) => {
                "its file system is mounted read-only out here too: remount it read-write, or choose a folder on a writable disk".into()
            }
            (Some(FolderProblem::Missing), Some(None)) => {
                "the service does not see this folder (its unit hides it, e.g. PrivateTmp= or ProtectHome=): choose a folder under /srv or /var".into()
            }
            _ => c.fix(&report.user).unwrap_or_default(),
        };
        let chat = match (&c.problem, here.as_ref().map(|h| &h.problem)) {
            (Some(FolderProblem::Missing), Some(None)) => {
                Said::new("doctor.fix_hidden", &[]).text().unwrap_or_default()
            }
            _ => c.fix_said(&report.user).unwrap_or_default(),
        };
        fixes.push((format!("{}: {fix}", c.name), format!("{}: {chat}", c.name)));
    }
    let as_root_only = !by_agent && report.uid == 0;
    let (verdict, fix) = if !fixes.is_empty() {
        let (console, chat): (Vec<String>, Vec<String>) = fixes.into_iter().unzip();
        (Verdict::Fail, fix(console.join("\n"), Said::new("doctor.fix_folders", &[("lines", &chat.join("\n"))])))
    } else if as_root_only {
        (
            Verdict::Warn,
            fix(
                "checked as root outside the service, which may write where the agent may not: start the agent and run zhuli doctor again",
                said("doctor.fix_as_root"),
            ),
        )
    } else {
        (Verdict::Pass, None)
    };
    step("folders", verdict, detail.join("\n"), fix)
}

/// Step 6: the backends and plugins the configuration names.
async fn tools_step(config: &Config) -> Step {
    use crate::tools::{caldav::Caldav, drive::Drive, files::Roots, github::GithubTools, mcp};
    let t = &config.tools;
    let mut results: Vec<Result<String, String>> = Vec::new();
    match GithubTools::new(&t.github, config.assistant.utc_offset_minutes) {
        Ok(Some(gh)) => results.push(gh.check().await),
        Ok(None) => {}
        Err(e) => results.push(Err(e.to_string())),
    }
    if t.drive.url.is_some() {
        let scratch = std::env::temp_dir().join(format!("zhuli-doctor-{}", std::process::id()));
        // The drive check writes nothing: a throw-away key seals nothing here.
        let sealer = std::sync::Arc::new(crate::store::seal::FileSealer::new(&crate::store::key::StoreKey::generate()));
        let roots = Roots::open(&Default::default(), &scratch, None, sealer);
        match roots.map_err(|e| e.to_string()).and_then(|r| Drive::new(&t.drive, r).map_err(|e| e.to_string())) {
            Ok(Some(d)) => results.push(d.check().await),
            Ok(None) => {}
            Err(e) => results.push(Err(e)),
        }
        let _ = std::fs::remove_dir_all(&scratch);
    }
    match Caldav::new(&t.caldav, config.assistant.utc_offset_minutes, config.agent.time_zone.as_deref()) {
        Ok(Some(c)) => results.extend(c.check().await),
        Ok(None) => {}
        Err(e) => results.push(Err(e.to_string())),
    }
    let stale = match &config.backup.offsite {
        Some(url) => {
            let (line, stale) = offsite_age(config, url).await;
            results.push(line);
            stale
        }
        None => false,
    };
    for (name, s) in &t.mcp {
        let scratch = std::env::temp_dir().join(format!("zhuli-doctor-{}", std::process::id()));
        match mcp::Plugin::new(name, s, &scratch, None) {
            Ok(p) => {
                results.push(match p.list_tools().await {
                    Ok(list) => Ok(format!(
                        "plugin {name}: {} tools, started in {} ms",
                        list.len(),
                        p.stats().start_ms.unwrap_or(0)
                    )),
                    Err(e) => Err(e.to_string()),
                });
                p.stop().await;
            }
            Err(e) => results.push(Err(e.to_string())),
        }
        let _ = std::fs::remove_dir_all(&scratch);
    }
    if results.is_empty() {
        return step("tools", Verdict::Pass, "no GitHub, drive, CalDAV or plugin configured", None);
    }
    let failed = results.iter().any(Result::is_err);
    let detail: Vec<String> = results.into_iter().map(|r| r.unwrap_or_else(|e| format!("FAILED: {e}"))).collect();
    let (verdict, fix) = if failed {
        let f = "each failure says what to fix; docs/OPERATIONS.md has the settings of every backend";
        (Verdict::Fail, fix(f, said("doctor.fix_tools")))
    } else if stale {
        let f = "the nightly copy is not reaching the network drive: send /backup in the admin chat for the failure, \
                 check [backup] offsite, username and password and the drive's free space";
        (Verdict::Warn, fix(f, said("doctor.fix_offsite_old")))
    } else {
        (Verdict::Pass, None)
    };
    step("tools", verdict, detail.join("\n"), fix)
}

/// Off-site copies older than this are a warning.
const OFFSITE_OLD_MS: i64 = 2 * 86_400_000;

/// The newest snapshot on the off-site folder and its age; whether it is missing or older than
/// two days.
async fn offsite_age(config: &Config, url: &str) -> (Result<String, String>, bool) {
    let b = &config.backup;
    let offsite =
        crate::offsite::Offsite::new(url, &b.username, b.password.as_ref(), b.offsite_keep, Duration::from_secs(20));
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
    match offsite.newest().await {
        Ok(Some((name, ms))) => {
            let hours = (now - ms).max(0) / 3_600_000;
            if now - ms > OFFSITE_OLD_MS {
                (Ok(format!("off-site backups: the newest, {name}, is {hours} h old (more than two days)")), true)
            } else {
                (Ok(format!("off-site backups: the newest, {name}, is {hours} h old")), false)
            }
        }
        Ok(None) => (Ok(format!("off-site backups: none on the drive yet (the first goes up at {})", b.at)), true),
        Err(e) => (Err(format!("off-site backups: {e}")), false),
    }
}

/// DNS, TCP and TLS to `url`'s host; when it fails, what failed and what to try at a console
/// and in the chat (a locale key).
async fn reach(url: &str) -> Result<String, (String, &'static str, Said)> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| (format!("{url}: not a URL"), "fix the URL in the configuration", said("doctor.fix_url")))?;
    let host = uri.host().unwrap_or_default().trim_matches(['[', ']']).to_owned();
    let tls = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let t = Instant::now();
    let addrs: Vec<std::net::SocketAddr> =
        match tokio::time::timeout(Duration::from_secs(5), tokio::net::lookup_host((host.as_str(), port))).await {
            Ok(Ok(a)) => a.collect(),
            Ok(Err(e)) => {
                return Err((
                    format!("{host}: DNS failed ({e})"),
                    "check the box's DNS (the router's DHCP, or the resolver given at provisioning)",
                    said("doctor.fix_dns"),
                ));
            }
            Err(_) => {
                return Err((
                    format!("{host}: DNS timed out"),
                    "check the box's DNS and its network cable",
                    said("doctor.fix_dns"),
                ));
            }
        };
    let Some(addr) = addrs.first().copied() else {
        return Err((format!("{host}: DNS gave no address"), "check the box's DNS", said("doctor.fix_dns")));
    };
    let dns = t.elapsed();
    let t = Instant::now();
    let tcp = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return Err((
                format!("{host}:{port} ({addr}): TCP failed ({e})"),
                "the office firewall must allow outbound TCP 443 (HTTPS) from the box",
                said("doctor.fix_firewall"),
            ));
        }
        Err(_) => {
            return Err((
                format!("{host}:{port} ({addr}): TCP timed out"),
                "the office firewall must allow outbound TCP 443 (HTTPS) from the box",
                said("doctor.fix_firewall"),
            ));
        }
    };
    let connect = t.elapsed();
    if !tls {
        return Ok(format!("{host}:{port}: DNS {dns:?}, TCP {connect:?} (plain HTTP, loopback only)"));
    }
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
        (format!("{host}: not a valid TLS name"), "fix the URL in the configuration", said("doctor.fix_url"))
    })?;
    let t = Instant::now();
    match tokio::time::timeout(
        Duration::from_secs(10),
        tokio_rustls::TlsConnector::from(tls_config()).connect(name, tcp),
    )
    .await
    {
        Ok(Ok(s)) => {
            let version = s.get_ref().1.protocol_version().map(|v| format!("{v:?}")).unwrap_or_default();
            Ok(format!("{host}:{port}: DNS {dns:?}, TCP {connect:?}, TLS {:?} ({version})", t.elapsed()))
        }
        Ok(Err(e)) => Err((
            format!("{host}:{port}: TLS failed ({e})"),
            "is the box's clock right (timedatectl)? is a proxy intercepting HTTPS? the box must reach the server directly",
            said("doctor.fix_tls"),
        )),
        Err(_) => Err((
            format!("{host}:{port}: TLS timed out"),
            "something on the path holds HTTPS connections; check the firewall",
            said("doctor.fix_firewall"),
        )),
    }
}

/// Open a Stream connection and wait for the gateway's first frame.
async fn stream_step(config: &Config, http: &HttpClient, wait: Duration) -> Step {
    let t = Instant::now();
    let mut socket = match gateway::open(&config.dingtalk, http, &tls_config()).await {
        Ok(s) => s,
        Err(e) => {
            return step(
                "basic API",
                Verdict::Fail,
                e.to_string(),
                fix(
                    "enable Stream mode for the app's robot in the developer console, and check the steps above",
                    said("doctor.fix_stream"),
                ),
            );
        }
    };
    let opened = t.elapsed();
    let deadline = Instant::now() + wait;
    let verdict = loop {
        let next = tokio::time::timeout_at(deadline, socket.next()).await;
        match next {
            Err(_) => {
                break step(
                    "basic API",
                    Verdict::Warn,
                    format!("connection opened in {opened:?}, but no frame from the gateway within {wait:?}"),
                    fix(
                        "wait longer (--wait-ms); if the agent's log shows zombie connections, see OPERATIONS.md",
                        said("doctor.fix_wait"),
                    ),
                );
            }
            Ok(None) | Ok(Some(Err(_))) => {
                break step(
                    "basic API",
                    Verdict::Fail,
                    format!("the gateway closed the connection after {:?}", t.elapsed()),
                    fix("check that the app is published and Stream mode is on", said("doctor.fix_published")),
                );
            }
            Ok(Some(Ok(Message::Text(text)))) => {
                let Ok(frame) = StreamFrame::parse(&text) else { continue };
                if frame.kind == FrameType::System && frame.topic == "ping" {
                    let _ = socket.send(Message::Text(ping_ack(&frame).into())).await;
                }
                // Callbacks are left unACKed: the gateway gives them to the running agent.
                break step(
                    "basic API",
                    Verdict::Pass,
                    format!(
                        "connection opened in {opened:?}; first gateway frame ({}) after {:?}",
                        frame.kind.as_str(),
                        t.elapsed()
                    ),
                    None,
                );
            }
            Ok(Some(Ok(_))) => continue,
        }
    };
    let _ = socket.close(None).await;
    verdict
}

fn recent_errors(secrets: &[String], in_agent: bool) -> Step {
    use super::redact::{Section, journal, remembered};
    if in_agent {
        let lines = remembered(secrets);
        return match lines.len() {
            0 => step("recent errors", Verdict::Pass, "no warnings or errors since the agent started", None),
            n => {
                let last: Vec<&str> = lines.iter().rev().take(10).rev().map(String::as_str).collect();
                step(
                    "recent errors",
                    Verdict::Warn,
                    format!(
                        "{n} warnings and errors since the agent started (redacted), the last:\n{}",
                        last.join("\n")
                    ),
                    fix("see OPERATIONS.md for what each means", said("doctor.fix_operations")),
                )
            }
        };
    }
    match journal(secrets) {
        Section::Missing(why) => step(
            "recent errors",
            Verdict::Warn,
            why,
            fix(
                "run zhuli doctor on the box as root (or in the systemd-journal group); in the admin chat, /日志 (/logs) shows the agent's own",
                said("doctor.fix_journal"),
            ),
        ),
        Section::Found(lines) if lines.is_empty() => {
            step("recent errors", Verdict::Pass, "no warnings or errors in the last 24 hours", None)
        }
        Section::Found(lines) => {
            let last: Vec<&str> = lines.iter().rev().take(10).rev().map(String::as_str).collect();
            step(
                "recent errors",
                Verdict::Warn,
                format!("last warnings and errors (24 h, redacted):\n{}", last.join("\n")),
                fix("see OPERATIONS.md for what each means", said("doctor.fix_operations")),
            )
        }
    }
}

/// The rollback version test: which releases are on the box (as root last surveyed them:
/// `zhuli update survey`, run by zhuli-update.service), whether the one before can boot, and how
/// to fall back to it.
fn version(status_socket: &Path, in_agent: bool) -> Step {
    use crate::update::state;
    let mine = env!("CARGO_PKG_VERSION");
    let running = if in_agent { Ok(mine.to_owned()) } else { super::status::fetch(status_socket).map(|s| s.version) };
    let survey = state::read(&state::survey_path());
    let mut detail = vec![
        format!("this binary {mine}; running agent {}", running.as_deref().unwrap_or("not reachable")),
        format!("secure boot: {}", state::SecureBoot::read(Path::new(state::EFIVARS)).says()),
    ];
    match &survey {
        Some(s) => {
            let on_box: Vec<String> = s
                .releases
                .iter()
                .map(|r| {
                    let state = match r.state.as_str() {
                        "trial" => format!("on trial, {} boots left", r.tries_left),
                        other => other.to_owned(),
                    };
                    let slot = if r.slot_present { "its slot intact" } else { "its slot overwritten" };
                    format!("{} ({state}, {slot})", r.version)
                })
                .collect();
            detail.push(format!("release {} runs; on the box: {}", s.running, on_box.join(", ")));
            detail.push(format!(
                "the store is schema {}, readable by releases of schema {} and newer",
                crate::store::SCHEMA_VERSION,
                crate::store::OLDEST_READER
            ));
            detail.push(match s.previous() {
                Some(p) if p.store_schema.is_some_and(|v| v < crate::store::OLDEST_READER) => format!(
                    "previous release {} can boot but cannot read the store (its schema {}): going back needs the snapshot taken before the update",
                    p.version,
                    p.store_schema.unwrap_or_default()
                ),
                Some(p) => format!(
                    "previous release {} can boot and read the store: /rollback in the admin chat (as root: zhuli update rollback --reboot) starts it on trial",
                    p.version
                ),
                None => "no earlier release on the box can boot (the next update keeps this one to fall back to)".into(),
            });
        }
        None => detail
            .push(format!("the releases on the box are not known yet ({} is missing)", state::survey_path().display())),
    }
    let (verdict, fix) = match (&running, &survey) {
        (Ok(v), _) if v != mine => (
            Verdict::Warn,
            fix(
                "the running agent is another version: restart it (systemctl restart zhuli)",
                said("doctor.fix_version"),
            ),
        ),
        (Err(_), _) => (
            Verdict::Warn,
            fix(
                "the agent is not running or its status socket is not reachable: systemctl status zhuli",
                said("doctor.fix_not_running"),
            ),
        ),
        (Ok(_), None) => (
            Verdict::Warn,
            fix(
                "as root: zhuli update survey (zhuli-update.service writes it every hour)",
                said("doctor.fix_no_survey"),
            ),
        ),
        (Ok(_), Some(_)) => (Verdict::Pass, None),
    };
    step("rollback", verdict, detail.join("\n"), fix)
}

/// The report, one block per step.
pub fn report(steps: &[Step]) -> String {
    let mut out = String::new();
    for (i, s) in steps.iter().enumerate() {
        let v = match s.verdict {
            Verdict::Pass => "PASS",
            Verdict::Warn => "WARN",
            Verdict::Fail => "FAIL",
        };
        out.push_str(&format!(
            "{}. {:<14} {v}  {}\n",
            i + 1,
            s.name,
            s.detail.replace('\n', "\n                       ")
        ));
        if let Some(f) = &s.fix {
            out.push_str(&format!("                     fix: {}\n", f.replace('\n', "\n                          ")));
        }
    }
    out
}
