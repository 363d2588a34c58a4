//! Resource monitoring: CPU, memory, the state directory's disk, load and temperature (where the
//! box has sensors), sampled at a low rate with sysinfo; plus the security signals (refused
//! senders, denied tool calls) over a sliding window. Each threshold is an alarm that is raised
//! once when crossed and announced again when it clears, so the admins hear about a crossing,
//! not about every sample.
//!
//! A resource alarm is a sustained condition, never one sample: it is raised only once every
//! sample for `[health] sustain_ms` is past the threshold (a dip below starts the wait again),
//! and cleared only once every sample for as long is clearly below it. The first sample after
//! start is never counted: its CPU figure is the agent's own start-up, measured over a few
//! milliseconds. So a busy moment, or a busy test machine, never reaches the admins.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    time::Duration,
};

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::HealthSettings;

/// One sample of the box's resources.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub cpu_percent: f32,
    pub memory_percent: f32,
    pub disk_percent: f32,
    pub load_per_core: f32,
    pub temperature_c: Option<f32>,
}

/// A raised or cleared alarm, to tell the admins and the audit trail.
#[derive(Debug, Clone, PartialEq)]
pub struct Alarm {
    pub name: &'static str,
    pub raised: bool,
    /// For the audit trail and the log (English).
    pub text: String,
    /// The same for the admins' chat, in the box's language.
    pub chat: String,
}

#[derive(Default)]
struct AlarmState {
    active: bool,
    /// The admins were told it was raised (so they are told when it clears).
    announced: bool,
    last_announced: Option<Instant>,
    /// Since when every sample has been on the other side of the threshold (above it while the
    /// alarm is down, clearly below it while it is up).
    crossed_since: Option<Instant>,
}

pub struct Monitor {
    /// `None` where sysinfo does not support the system (then CPU and memory read as 0).
    sys: Option<sysinfo::System>,
    components: Option<sysinfo::Components>,
    state_dir: PathBuf,
    cores: f32,
    alarms: HashMap<&'static str, AlarmState>,
    /// Samples evaluated so far (the first is not counted for the resource alarms).
    evaluated: u64,
    /// (when, refused total, denied total)
    signals: VecDeque<(Instant, u64, u64)>,
}

/// A threshold is cleared only once the value is this far below it, so a value hovering at the
/// threshold does not flap.
const CLEAR_FACTOR: f32 = 0.95;

impl Monitor {
    pub fn new(state_dir: PathBuf) -> Self {
        let mut sys = sysinfo::System::new().ok();
        if let Some(s) = &mut sys {
            s.refresh_cpu_usage();
        }
        let cores = sys.as_ref().map_or(1, |s| s.cpus().len()).max(1) as f32;
        Monitor {
            sys,
            components: sysinfo::Components::new_with_refreshed_list().ok(),
            state_dir,
            cores,
            alarms: HashMap::new(),
            evaluated: 0,
            signals: VecDeque::new(),
        }
    }

    /// Measure now (CPU use is the average since the previous sample).
    pub fn sample(&mut self) -> Sample {
        let (cpu_percent, memory_percent) = match &mut self.sys {
            Some(sys) => {
                sys.refresh_cpu_usage();
                sys.refresh_memory();
                let total = sys.total_memory().max(1) as f32;
                (sys.global_cpu_usage(), (total - sys.available_memory() as f32) / total * 100.0)
            }
            None => (0.0, 0.0),
        };
        let disk_percent = nix::sys::statvfs::statvfs(&self.state_dir)
            .map(|s| {
                let total = (s.blocks() as f32).max(1.0);
                (total - s.blocks_available() as f32) / total * 100.0
            })
            .unwrap_or(0.0);
        let load = sysinfo::System::load_average().map(|l| l.one as f32).unwrap_or(0.0);
        let temperature_c = self.components.as_mut().and_then(|c| {
            c.refresh(false);
            c.iter().filter_map(|c| c.temperature()).filter(|t| t.is_finite()).reduce(f32::max)
        });
        let sample =
            Sample { cpu_percent, memory_percent, disk_percent, load_per_core: load / self.cores, temperature_c };
        test_override(sample)
    }

    /// The alarms that change with `sample` and the security counters.
    pub fn evaluate(&mut self, s: &Sample, refused: u64, denied: u64, settings: &HealthSettings) -> Vec<Alarm> {
        let now = Instant::now();
        self.signals.push_back((now, refused, denied));
        let window = settings.signal_window_ms.get();
        while self.signals.front().is_some_and(|(t, _, _)| now.duration_since(*t) > window) {
            self.signals.pop_front();
        }
        let (r0, d0) = self.signals.front().map(|(_, r, d)| (*r, *d)).unwrap_or((refused, denied));
        let minutes = window.as_secs() / 60;
        // Resource readings must hold for the window; the security signals are already counts
        // over a window, so one evaluation is enough.
        let sustain = settings.sustain_ms.get();
        let checks: [(&'static str, Option<f32>, f32, Duration, String); 7] = [
            ("cpu", Some(s.cpu_percent), settings.cpu_percent, sustain, format!("CPU at {:.0}%", s.cpu_percent)),
            (
                "memory",
                Some(s.memory_percent),
                settings.memory_percent,
                sustain,
                format!("memory {:.0}% used", s.memory_percent),
            ),
            (
                "disk",
                Some(s.disk_percent),
                settings.disk_percent,
                sustain,
                format!("state disk {:.0}% full", s.disk_percent),
            ),
            (
                "load",
                Some(s.load_per_core),
                settings.load_per_core,
                sustain,
                format!("load {:.2} per core", s.load_per_core),
            ),
            (
                "temperature",
                s.temperature_c,
                settings.temperature_c,
                sustain,
                format!("temperature {:.0} °C", s.temperature_c.unwrap_or(0.0)),
            ),
            (
                "unknown-senders",
                Some((refused - r0) as f32),
                settings.refused_messages as f32,
                Duration::ZERO,
                format!("{} messages refused (unknown or unapproved senders) in {minutes} min", refused - r0),
            ),
            (
                "denied-tools",
                Some((denied - d0) as f32),
                settings.denied_tools as f32,
                Duration::ZERO,
                format!("{} tool calls denied in {minutes} min", denied - d0),
            ),
        ];
        let first = self.evaluated == 0;
        self.evaluated += 1;
        let every = settings.alert_every_ms.get();
        let mut out = Vec::new();
        for (name, value, threshold, hold, text) in checks {
            let Some(value) = value else { continue };
            if threshold <= 0.0 || (first && !hold.is_zero()) {
                continue;
            }
            let state = self.alarms.entry(name).or_default();
            let crossed = if state.active { value < threshold * CLEAR_FACTOR } else { value >= threshold };
            if !crossed {
                // A sample on this side of the threshold: the wait starts again.
                state.crossed_since = None;
                continue;
            }
            let since = *state.crossed_since.get_or_insert(now);
            if now.duration_since(since) < hold {
                continue;
            }
            state.crossed_since = None;
            if !state.active {
                state.active = true;
                let quiet = state.last_announced.is_some_and(|t| now.duration_since(t) < every);
                if !quiet {
                    state.announced = true;
                    state.last_announced = Some(now);
                    let chat = said(name, value, threshold, minutes, true);
                    out.push(Alarm { name, raised: true, text: format!("{text} (threshold {threshold})"), chat });
                }
            } else {
                state.active = false;
                if std::mem::take(&mut state.announced) {
                    let chat = said(name, value, threshold, minutes, false);
                    out.push(Alarm { name, raised: false, text: format!("{text}: back below {threshold}"), chat });
                }
            }
        }
        out
    }

    /// Names of the alarms currently raised.
    pub fn active(&self) -> Vec<&'static str> {
        let mut v: Vec<&'static str> = self.alarms.iter().filter(|(_, s)| s.active).map(|(n, _)| *n).collect();
        v.sort_unstable();
        v
    }
}

/// An alarm as the admins are told it, in the box's language.
fn said(name: &str, value: f32, threshold: f32, minutes: u64, raised: bool) -> String {
    let what = match name {
        "cpu" => t!("alarm.cpu", value = format!("{value:.0}")),
        "memory" => t!("alarm.memory", value = format!("{value:.0}")),
        "disk" => t!("alarm.disk", value = format!("{value:.0}")),
        "load" => t!("alarm.load", value = format!("{value:.2}")),
        "temperature" => t!("alarm.temperature", value = format!("{value:.0}")),
        "unknown-senders" => t!("alarm.unknown_senders", value = format!("{value:.0}"), minutes = minutes),
        _ => t!("alarm.denied_tools", value = format!("{value:.0}"), minutes = minutes),
    };
    if raised {
        t!("alarm.raised", what = what, threshold = threshold)
    } else {
        t!("alarm.cleared", what = what, threshold = threshold)
    }
    .into_owned()
}

/// A test build reads `ZHULI_TEST_METRICS` (a file of `name=value` lines) over the sample, so
/// tests can cross thresholds at will. Release builds have no such switch.
#[cfg(debug_assertions)]
fn test_override(mut s: Sample) -> Sample {
    let Some(text) = std::env::var_os("ZHULI_TEST_METRICS").and_then(|p| std::fs::read_to_string(p).ok()) else {
        return s;
    };
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else { continue };
        let Ok(v) = v.trim().parse::<f32>() else { continue };
        match k.trim() {
            "cpu_percent" => s.cpu_percent = v,
            "memory_percent" => s.memory_percent = v,
            "disk_percent" => s.disk_percent = v,
            "load_per_core" => s.load_per_core = v,
            "temperature_c" => s.temperature_c = Some(v),
            _ => {}
        }
    }
    s
}

#[cfg(not(debug_assertions))]
fn test_override(s: Sample) -> Sample {
    s
}

/// How long one sample takes (for the benchmark).
pub fn time_one_sample(m: &mut Monitor) -> Duration {
    let t = std::time::Instant::now();
    let _ = m.sample();
    t.elapsed()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dingtalk::settings::Millis;

    fn quiet(disk: f32) -> Sample {
        Sample { cpu_percent: 5.0, memory_percent: 20.0, disk_percent: disk, load_per_core: 0.1, temperature_c: None }
    }

    fn cpu(percent: f32) -> Sample {
        Sample { cpu_percent: percent, ..quiet(10.0) }
    }

    /// Samples every 30 s, alerts after 5 minutes (the defaults).
    const EVERY: Duration = Duration::from_secs(30);

    /// Feed `samples` one sampling interval apart; the alarms they raise or clear.
    async fn feed(m: &mut Monitor, samples: &[Sample], settings: &HealthSettings) -> Vec<Alarm> {
        let mut out = Vec::new();
        for s in samples {
            tokio::time::advance(EVERY).await;
            out.extend(m.evaluate(s, 0, 0, settings));
        }
        out
    }

    fn cpu_for(percent: f32, duration: Duration) -> Vec<Sample> {
        vec![cpu(percent); (duration.as_secs() / EVERY.as_secs()) as usize]
    }

    #[tokio::test(start_paused = true)]
    async fn the_start_up_spike_does_not_alert() {
        let mut m = Monitor::new(std::env::temp_dir());
        let settings = HealthSettings::default();
        // The first sample measures the agent's own start-up; the box is idle afterwards.
        assert!(m.evaluate(&cpu(100.0), 0, 0, &settings).is_empty());
        assert!(feed(&mut m, &cpu_for(5.0, Duration::from_secs(600)), &settings).await.is_empty());
        assert!(m.active().is_empty());

        // Nor does the first sample count toward a window, even with a window shorter than
        // the sampling interval: it takes two counted samples.
        let mut m = Monitor::new(std::env::temp_dir());
        let settings = HealthSettings { sustain_ms: Millis::from_ms(10), ..HealthSettings::default() };
        assert!(m.evaluate(&cpu(100.0), 0, 0, &settings).is_empty());
        assert!(feed(&mut m, &[cpu(100.0)], &settings).await.is_empty());
        assert_eq!(feed(&mut m, &[cpu(100.0)], &settings).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_sustained_high_load_alerts_once_and_a_dip_starts_the_wait_again() {
        let mut m = Monitor::new(std::env::temp_dir());
        let settings = HealthSettings::default();
        assert!(m.evaluate(&cpu(5.0), 0, 0, &settings).is_empty());
        // Busy for four and a half minutes, one quiet sample, busy again: no alert yet.
        let mut spiky = cpu_for(95.0, Duration::from_secs(270));
        spiky.push(cpu(50.0));
        spiky.extend(cpu_for(95.0, Duration::from_secs(270)));
        assert!(feed(&mut m, &spiky, &settings).await.is_empty(), "a dip resets the window");
        // Five minutes since the dip, every sample above 90 %: one alert, however long it lasts.
        let raised = feed(&mut m, &cpu_for(95.0, Duration::from_secs(900)), &settings).await;
        assert_eq!(raised.len(), 1, "{raised:?}");
        assert!(raised[0].raised && raised[0].name == "cpu" && raised[0].text.contains("CPU at 95%"), "{raised:?}");
        // Clearing needs the window too: one quiet sample does not clear it.
        assert!(feed(&mut m, &[cpu(10.0), cpu(95.0)], &settings).await.is_empty());
        assert_eq!(m.active(), vec!["cpu"]);
        let cleared = feed(&mut m, &cpu_for(10.0, Duration::from_secs(330)), &settings).await;
        assert_eq!(cleared.len(), 1, "{cleared:?}");
        assert!(!cleared[0].raised && cleared[0].text.contains("back below 90"), "{cleared:?}");
        assert!(m.active().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_alarm_is_raised_once_per_crossing_and_cleared_with_hysteresis() {
        let mut m = Monitor::new(std::env::temp_dir());
        let settings = HealthSettings {
            alert_every_ms: Millis::from_ms(3_600_000),
            sustain_ms: Millis::from_ms(30_000),
            ..HealthSettings::default()
        };
        let disk = |percent: f32| [quiet(percent), quiet(percent)];
        assert!(m.evaluate(&quiet(50.0), 0, 0, &settings).is_empty());
        let raised = feed(&mut m, &disk(93.0), &settings).await;
        assert_eq!(raised.len(), 1);
        assert!(raised[0].raised && raised[0].name == "disk" && raised[0].text.contains("93%"));
        assert!(feed(&mut m, &[quiet(95.0); 5], &settings).await.is_empty(), "not once per sample");
        assert!(feed(&mut m, &disk(88.0), &settings).await.is_empty(), "88 is not clearly below 90");
        let cleared = feed(&mut m, &disk(60.0), &settings).await;
        assert_eq!(cleared.len(), 1);
        assert!(!cleared[0].raised);
        // Crossing again within the alert interval is not announced (nor is its clearing).
        assert!(feed(&mut m, &disk(95.0), &settings).await.is_empty());
        assert_eq!(m.active(), vec!["disk"]);
        assert!(feed(&mut m, &disk(50.0), &settings).await.is_empty());
        tokio::time::advance(Duration::from_secs(3_600)).await;
        assert_eq!(feed(&mut m, &disk(95.0), &settings).await.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn security_signals_count_within_the_window() {
        let mut m = Monitor::new(std::env::temp_dir());
        let settings = HealthSettings { refused_messages: 5, ..HealthSettings::default() };
        assert!(m.evaluate(&quiet(10.0), 100, 0, &settings).is_empty());
        tokio::time::advance(Duration::from_secs(60)).await;
        let a = m.evaluate(&quiet(10.0), 106, 0, &settings);
        assert_eq!(a.len(), 1, "{a:?}");
        assert_eq!(a[0].name, "unknown-senders");
        // Old counts leave the window; the alarm clears.
        tokio::time::advance(Duration::from_secs(700)).await;
        let c = m.evaluate(&quiet(10.0), 106, 0, &settings);
        assert!(c.iter().any(|a| a.name == "unknown-senders" && !a.raised), "{c:?}");
    }
}
