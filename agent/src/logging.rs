//! A small logger for the `log` facade: one line per record on stderr, which systemd puts in the
//! journal with the unit's name. Level from `ZHULI_LOG` (error, warn, info, debug, trace).
//!
//! The last warnings and errors are also kept in memory ([`recent`]): the agent cannot read the
//! system journal (it is not in the journal's group, on purpose), and `/logs` and `/doctor` show
//! them in the admin chat.
//!
//! `zhuli-sim demo` owns the terminal instead: its records go into a bounded queue that the demo
//! prints between its own lines, so a log line never lands on its prompt. Logging never blocks
//! the agent: when the queue is full, lines are dropped.

use std::{collections::VecDeque, io::Write, sync::Mutex};

use tokio::sync::mpsc;

enum Sink {
    Stderr,
    Queue(mpsc::Sender<String>),
}

struct Logger {
    level: log::LevelFilter,
    sink: Sink,
}

impl log::Log for Logger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= self.level && (meta.target().starts_with("zhuli") || meta.level() <= log::Level::Warn)
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if record.level() <= log::Level::Warn {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as i64)
                .unwrap_or(0);
            let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
            if recent.len() == KEPT {
                recent.pop_front();
            }
            let mut text = record.args().to_string();
            if text.len() > MAX_TEXT {
                let mut cut = MAX_TEXT;
                while !text.is_char_boundary(cut) {
                    cut -= 1;
                }
                text.truncate(cut);
                text.push('…');
            }
            recent.push_back(Recent { at_ms: now, error: record.level() == log::Level::Error, text });
        }
        match &self.sink {
            Sink::Stderr => {
                let mut err = std::io::stderr().lock();
                let _ = writeln!(err, "{:<5} {}", record.level(), record.args());
            }
            Sink::Queue(lines) => {
                let _ = lines.try_send(format!("{:<5} {}", record.level(), record.args()));
            }
        }
    }

    fn flush(&self) {}
}

/// Warnings and errors kept in memory, at most.
const KEPT: usize = 200;
/// Bytes of one kept line, at most.
const MAX_TEXT: usize = 1000;

static RECENT: Mutex<VecDeque<Recent>> = Mutex::new(VecDeque::new());

/// A warning or error logged since the process started.
#[derive(Debug, Clone)]
pub struct Recent {
    pub at_ms: i64,
    pub error: bool,
    pub text: String,
}

/// The last warnings and errors (up to 200), oldest first.
pub fn recent() -> Vec<Recent> {
    RECENT.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
}

fn level(default: log::LevelFilter) -> log::LevelFilter {
    std::env::var("ZHULI_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn install(logger: Logger) {
    let level = logger.level;
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

/// Install the logger. `default` applies when `ZHULI_LOG` is unset or invalid.
pub fn init(default: log::LevelFilter) {
    install(Logger { level: level(default), sink: Sink::Stderr });
}

/// Install a logger whose lines (without a newline) come out of the returned queue, which
/// holds up to `capacity` of them.
pub fn init_queue(default: log::LevelFilter, capacity: usize) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(capacity);
    install(Logger { level: level(default), sink: Sink::Queue(tx) });
    rx
}
