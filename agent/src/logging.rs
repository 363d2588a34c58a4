//! A small logger for the `log` facade: one line per record on stderr, which systemd puts in the
//! journal with the unit's name. Level from `ZHULI_LOG` (error, warn, info, debug, trace).
//!
//! `zhuli demo` owns the terminal instead: its records go into a bounded queue that the demo
//! prints between its own lines, so a log line never lands on its prompt. Logging never blocks
//! the agent: when the queue is full, lines are dropped.

use std::io::Write;

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
