//! A small logger for the `log` facade: one line per record on stderr, which systemd puts in the
//! journal with the unit's name. Level from `ZHULI_LOG` (error, warn, info, debug, trace).

use std::io::Write;

struct StderrLogger {
    level: log::LevelFilter,
}

impl log::Log for StderrLogger {
    fn enabled(&self, meta: &log::Metadata<'_>) -> bool {
        meta.level() <= self.level && (meta.target().starts_with("zhuli") || meta.level() <= log::Level::Warn)
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{:<5} {}", record.level(), record.args());
        }
    }

    fn flush(&self) {}
}

/// Install the logger. `default` applies when `ZHULI_LOG` is unset or invalid.
pub fn init(default: log::LevelFilter) {
    let level = std::env::var("ZHULI_LOG").ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    if log::set_boxed_logger(Box::new(StderrLogger { level })).is_ok() {
        log::set_max_level(level);
    }
}
