//! The agent's health: each core task checks in ("beats") while it runs; a supervisor tells
//! systemd `READY=1` once the agent is up, keeps `STATUS=` readable, and sends `WATCHDOG=1` only
//! while every task has checked in within its deadline — a hung task stops the pings and systemd
//! restarts the service. Also the business figures (messages, latency, errors) that `/status`,
//! `zhuli status` and the monitor report.

pub mod diagnostics;
pub mod doctor;
pub mod monitor;
pub mod notify;
pub mod redact;
pub mod status;

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::dingtalk::settings::Millis;

/// The service's `RuntimeDirectory=`.
pub const RUNTIME_DIR: &str = "/run/zhuli";

/// `[health]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthSettings {
    /// How often an idle task checks in.
    pub beat_ms: Millis,
    /// A task that has not checked in for this long is hung: the watchdog pings stop.
    pub task_deadline_ms: Millis,
    /// Resource sampling interval.
    pub sample_ms: Millis,
    /// Thresholds: crossing one alerts the admins once, and its clearing is announced.
    pub cpu_percent: f32,
    pub memory_percent: f32,
    pub disk_percent: f32,
    /// Load average (1 min) per CPU core.
    pub load_per_core: f32,
    pub temperature_c: f32,
    /// A resource reading (CPU, memory, disk, load, temperature) alerts only when every sample
    /// for this long is past its threshold, and clears only when every sample for this long is
    /// back below it: a spike, such as the agent's own start-up, is not a condition worth an
    /// admin's attention. The first sample after start is never counted.
    pub sustain_ms: Millis,
    /// Security signals in `signal_window_ms` that raise an alert: refused messages (unknown
    /// senders) and denied tool calls.
    pub refused_messages: u32,
    pub denied_tools: u32,
    pub signal_window_ms: Millis,
    /// At most one alert per kind this often.
    pub alert_every_ms: Millis,
    /// Group conversation id that gets alerts; without it each admin gets them 1:1.
    pub admin_chat: Option<String>,
    /// The status socket; by default `$RUNTIME_DIRECTORY/status.sock` (`/run/zhuli/status.sock`
    /// on the box), else `status.sock` in the state directory.
    pub status_socket: Option<std::path::PathBuf>,
}

impl Default for HealthSettings {
    fn default() -> Self {
        HealthSettings {
            beat_ms: Millis::from_ms(5_000),
            task_deadline_ms: Millis::from_ms(90_000),
            sample_ms: Millis::from_ms(30_000),
            cpu_percent: 90.0,
            memory_percent: 90.0,
            disk_percent: 90.0,
            load_per_core: 2.0,
            temperature_c: 85.0,
            sustain_ms: Millis::from_ms(300_000),
            refused_messages: 20,
            denied_tools: 10,
            signal_window_ms: Millis::from_ms(600_000),
            alert_every_ms: Millis::from_ms(1_800_000),
            admin_chat: None,
            status_socket: None,
        }
    }
}

impl HealthSettings {
    /// Where the status socket is.
    pub fn socket_path(&self, state_dir: &std::path::Path) -> std::path::PathBuf {
        if let Some(p) = &self.status_socket {
            return p.clone();
        }
        match std::env::var_os("RUNTIME_DIRECTORY") {
            // systemd may list several, separated by ':'.
            Some(d) => {
                std::path::PathBuf::from(d.to_string_lossy().split(':').next().unwrap_or_default()).join("status.sock")
            }
            // `zhuli status` on the box, outside the service: the unit's runtime directory.
            None if std::path::Path::new(RUNTIME_DIR).is_dir() => std::path::Path::new(RUNTIME_DIR).join("status.sock"),
            None => state_dir.join("status.sock"),
        }
    }
}

/// One task's check-ins.
pub struct Beat {
    pub name: &'static str,
    /// Milliseconds since the health clock started, at the last check-in.
    last: AtomicU64,
    /// For worker-style beats: work in progress (stale only matters while this is above 0).
    busy: Option<AtomicI64>,
    /// Silent longer than this (while working) is hung.
    deadline: Duration,
    clock: Instant,
}

impl Beat {
    pub fn tick(&self) {
        self.last.store(self.clock.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// A worker-style beat: one piece of work started (the clock starts if it was idle).
    pub fn begin(&self) {
        if let Some(b) = &self.busy
            && b.fetch_add(1, Ordering::Relaxed) == 0
        {
            self.tick();
        }
    }

    /// One piece of work ended.
    pub fn end(&self) {
        if let Some(b) = &self.busy {
            b.fetch_sub(1, Ordering::Relaxed);
        }
        self.tick();
    }

    fn silent_for(&self) -> Duration {
        let now = self.clock.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last.load(Ordering::Relaxed)))
    }

    fn hung(&self) -> bool {
        let working = self.busy.as_ref().is_none_or(|b| b.load(Ordering::Relaxed) > 0);
        working && self.silent_for() > self.deadline
    }
}

/// Latency samples kept for percentiles.
const LATENCIES: usize = 1_000;

/// Business figures.
#[derive(Default)]
pub struct Metrics {
    pub accepted: AtomicU64,
    pub answered: AtomicU64,
    pub failed: AtomicU64,
    /// Messages waiting in the conversations' queues now.
    pub waiting: AtomicU64,
    /// Messages answered together with a later one of the same person.
    pub merged: AtomicU64,
    /// Messages not answered because their conversation's queue was full (the sender was told).
    pub left_out: AtomicU64,
    /// "Answering in order, N waiting" notices sent.
    pub backlog_notices: AtomicU64,
    latencies: Mutex<VecDeque<u32>>,
}

impl Metrics {
    /// One reply delivered `latency` after its message was accepted.
    pub fn answered_in(&self, latency: Duration) {
        self.answered.fetch_add(1, Ordering::Relaxed);
        let mut l = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == LATENCIES {
            l.pop_front();
        }
        l.push_back(latency.as_millis().min(u128::from(u32::MAX)) as u32);
    }

    /// p50, p95, p99 of the recent reply latencies, in ms.
    pub fn latency_percentiles(&self) -> Option<(u32, u32, u32)> {
        let mut v: Vec<u32> = self.latencies.lock().unwrap_or_else(|p| p.into_inner()).iter().copied().collect();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
        Some((at(0.50), at(0.95), at(0.99)))
    }
}

/// The health registry: beats, figures, and what the supervisor last reported.
pub struct Health {
    clock: Instant,
    beats: Mutex<Vec<Arc<Beat>>>,
    pub settings: HealthSettings,
    pub metrics: Metrics,
    /// The last problem worth showing in `STATUS=` and `zhuli status`.
    pub last_error: Mutex<Option<String>>,
    /// The monitor's last sample and the alarms it has raised.
    pub resources: Mutex<Option<monitor::Sample>>,
    pub alarms: Mutex<Vec<String>>,
    /// Configuration tables changed since the previous run, to tell the admins once.
    pub config_changes: Mutex<Vec<String>>,
}

impl Health {
    pub fn new(settings: HealthSettings) -> Arc<Self> {
        Arc::new(Health {
            clock: Instant::now(),
            beats: Mutex::default(),
            settings,
            metrics: Metrics::default(),
            last_error: Mutex::default(),
            resources: Mutex::default(),
            alarms: Mutex::default(),
            config_changes: Mutex::default(),
        })
    }

    fn add(&self, name: &'static str, busy: Option<AtomicI64>, deadline: Duration) -> Arc<Beat> {
        let beat = Arc::new(Beat { name, last: AtomicU64::new(0), busy, deadline, clock: self.clock });
        beat.tick();
        self.beats.lock().unwrap_or_else(|p| p.into_inner()).push(beat.clone());
        beat
    }

    /// A task loop that must check in at least every `task_deadline_ms`.
    pub fn task(&self, name: &'static str) -> Arc<Beat> {
        self.add(name, None, self.settings.task_deadline_ms.get())
    }

    /// Work that must make progress while there is any (message answering): hung when work is
    /// in progress and none has finished for `deadline` (longer than one piece may take).
    pub fn workers(&self, name: &'static str, deadline: Duration) -> Arc<Beat> {
        self.add(name, Some(AtomicI64::new(0)), deadline)
    }

    /// How often idle loops should check in.
    pub fn beat_every(&self) -> Duration {
        self.settings.beat_ms.get()
    }

    /// The longest a task loop may sleep between check-ins and still be seen alive: half its
    /// deadline.
    pub fn longest_sleep(&self) -> Duration {
        self.settings.task_deadline_ms.get() / 2
    }

    /// Tasks that have not checked in within the deadline, with how long they have been silent.
    pub fn hung(&self) -> Vec<(&'static str, Duration)> {
        self.beats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|b| b.hung())
            .map(|b| (b.name, b.silent_for()))
            .collect()
    }

    pub fn set_error(&self, e: impl Into<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.into());
    }
}

/// For a task that works every `period`: check in at least every `every` while waiting for the
/// next turn. False once `cancel` fires.
pub struct Periodic {
    pub name: &'static str,
    pub beat: Arc<Beat>,
    pub every: Duration,
    pub period: Duration,
    next: Instant,
    started: Instant,
}

impl Periodic {
    /// The first turn comes after `first`.
    pub fn new(name: &'static str, beat: Arc<Beat>, every: Duration, period: Duration, first: Duration) -> Self {
        let now = Instant::now();
        Periodic { name, beat, every, period, next: now + first, started: now }
    }

    /// Wait for the next turn, checking in meanwhile.
    pub async fn next(&mut self, cancel: &CancellationToken) -> bool {
        loop {
            self.beat.tick();
            test_hang_point(self.name, self.started).await;
            tokio::select! {
                _ = cancel.cancelled() => return false,
                _ = tokio::time::sleep_until(self.next.min(Instant::now() + self.every)) => {}
            }
            if Instant::now() >= self.next {
                self.next = Instant::now() + self.period;
                return true;
            }
        }
    }
}

/// A test build's way to make a task hang: `ZHULI_TEST_HANG=<task>:<ms>` makes the task named
/// stop (await forever) that many milliseconds after start. Release builds have no such switch.
#[cfg(debug_assertions)]
pub async fn test_hang_point(name: &str, started: Instant) {
    let Ok(spec) = std::env::var("ZHULI_TEST_HANG") else { return };
    let Some((task, ms)) = spec.split_once(':') else { return };
    if task == name && started.elapsed() >= Duration::from_millis(ms.parse().unwrap_or(0)) {
        log::warn!("test fault: task {name} now hangs");
        std::future::pending::<()>().await;
    }
}

#[cfg(not(debug_assertions))]
pub async fn test_hang_point(_name: &str, _started: Instant) {}

/// The supervisor: `WATCHDOG=1` while no task is hung, `STATUS=` whenever the line changes.
pub async fn supervise(
    health: Arc<Health>,
    notifier: Arc<notify::Notifier>,
    status_line: impl Fn() -> String + Send + 'static,
    cancel: CancellationToken,
) {
    let watchdog = notify::watchdog_interval();
    // Ping at half the interval systemd allows; check at least every beat.
    let every = watchdog.map(|w| w / 2).unwrap_or(health.beat_every()).min(health.beat_every());
    let mut last_status = String::new();
    let mut was_hung = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(every) => {}
        }
        let hung = health.hung();
        if hung.is_empty() {
            if was_hung {
                log::info!("every task is checking in again");
                was_hung = false;
            }
            if watchdog.is_some() {
                notifier.notify("WATCHDOG=1");
            }
        } else if !was_hung {
            was_hung = true;
            let names: Vec<String> = hung.iter().map(|(n, d)| format!("{n} (silent {}s)", d.as_secs())).collect();
            let msg = format!("task hung: {}; watchdog pings stopped", names.join(", "));
            log::error!("{msg}");
            health.set_error(msg);
        }
        let line = if was_hung {
            format!("STATUS=hung: {}", hung.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))
        } else {
            format!("STATUS={}", status_line())
        };
        if line != last_status {
            notifier.notify(&line);
            last_status = line;
        }
    }
    notifier.notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_task_is_hung_and_idle_workers_are_not() {
        let health =
            Health::new(HealthSettings { task_deadline_ms: Millis::from_ms(1_000), ..HealthSettings::default() });
        let stream = health.task("stream");
        let workers = health.workers("workers", Duration::from_millis(1_000));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(health.hung().iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec!["stream"]);
        stream.tick();
        assert!(health.hung().is_empty(), "idle workers are not hung");
        workers.begin();
        tokio::time::advance(Duration::from_millis(1_500)).await;
        stream.tick();
        assert_eq!(health.hung().iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec!["workers"]);
        workers.end();
        assert!(health.hung().is_empty());
    }

    #[test]
    fn the_alert_window_is_at_least_a_few_milliseconds() {
        let parse = |text: &str| toml::from_str::<HealthSettings>(text).map_err(|e| e.to_string());
        assert_eq!(parse("").map(|h| h.sustain_ms.get()), Ok(Duration::from_secs(300)));
        assert_eq!(parse("sustain_ms = 60000").map(|h| h.sustain_ms.get()), Ok(Duration::from_secs(60)));
        let zero = parse("sustain_ms = 0").map(|_| ()).expect_err("a zero window is refused");
        assert!(zero.contains("sustain_ms") && zero.contains("between 10 and 86400000"), "{zero}");
    }

    #[test]
    fn latency_percentiles_of_the_recent_replies() {
        let m = Metrics::default();
        assert_eq!(m.latency_percentiles(), None);
        for ms in 1..=100 {
            m.answered_in(Duration::from_millis(ms));
        }
        assert_eq!(m.latency_percentiles(), Some((51, 95, 99)));
        assert_eq!(m.answered.load(Ordering::Relaxed), 100);
    }
}
