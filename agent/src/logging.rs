//! The agent's log, through the `log` facade. One switch, decided at start ([`init`]):
//!
//! - **journald**, when the process's stderr is the journal (`$JOURNAL_STREAM` names it, as
//!   systemd sets for `zhuli.service`): each record is one journal entry through
//!   `systemd-journal-logger`, with `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER=zhuli`,
//!   `CODE_MODULE`, `TARGET` and the record's own fields (`CONVERSATION` where a record names
//!   its conversation: `log::info!(conversation = id; "…")`). An entry the journal does not
//!   take is written to stderr instead, so nothing is lost.
//! - **stderr** otherwise (development, tests): `LEVEL message key=value…`, one line a record.
//!
//! Level from `ZHULI_LOG` (error, warn, info, debug, trace). Records carry no message bodies
//! and no secrets, in either sink.
//!
//! The last warnings and errors are also kept in memory ([`recent`]): the agent cannot read the
//! system journal (it is not in the journal's group, on purpose), and `/logs` and `/doctor` show
//! them in the admin chat.
//!
//! `zhuli-sim demo` owns the terminal instead: its records go into a bounded queue that the demo
//! prints between its own lines, so a log line never lands on its prompt. Logging never blocks
//! the agent: when the queue is full, lines are dropped.

use std::{collections::VecDeque, fmt::Write as _, io::Write, sync::Mutex};

use systemd_journal_logger::JournalLog;
use tokio::sync::mpsc;

enum Sink {
    Stderr,
    Journal(JournalLog),
    Queue(mpsc::Sender<String>),
}

struct Logger {
    level: log::LevelFilter,
    sink: Sink,
}

/// `LEVEL message key=value…`: how a record reads on stderr and in the demo.
fn line(record: &log::Record<'_>) -> String {
    struct Fields<'a>(&'a mut String);
    impl<'kvs> log::kv::VisitSource<'kvs> for Fields<'_> {
        fn visit_pair(&mut self, key: log::kv::Key<'kvs>, value: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
            let _ = write!(self.0, " {key}={value}");
            Ok(())
        }
    }
    let mut text = format!("{:<5} {}", record.level(), record.args());
    let _ = record.key_values().visit(&mut Fields(&mut text));
    text
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
            let now = crate::clock::now_ms();
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
            Sink::Journal(journal) => {
                if journal.journal_send(record).is_err() {
                    let _ = writeln!(std::io::stderr().lock(), "{}", line(record));
                }
            }
            Sink::Stderr => {
                let _ = writeln!(std::io::stderr().lock(), "{}", line(record));
            }
            Sink::Queue(lines) => {
                let _ = lines.try_send(line(record));
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
    let _ = SINK.set(match logger.sink {
        Sink::Journal(_) => "journal",
        Sink::Stderr => "stderr",
        Sink::Queue(_) => "queue",
    });
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        log::set_max_level(level);
    }
}

/// Where [`init`] sends records: the journal when stderr is the journal and its socket takes
/// entries, else stderr.
fn chosen_sink() -> Sink {
    if !systemd_journal_logger::connected_to_journal() {
        return Sink::Stderr;
    }
    match JournalLog::new() {
        Ok(journal) => Sink::Journal(journal.with_syslog_identifier("zhuli".into())),
        Err(e) => {
            let _ = writeln!(
                std::io::stderr().lock(),
                "WARN  the journal's socket does not take entries ({e}); logging to stderr"
            );
            Sink::Stderr
        }
    }
}

/// Install the logger: the journal under systemd, stderr elsewhere. `default` applies when
/// `ZHULI_LOG` is unset or invalid.
pub fn init(default: log::LevelFilter) {
    install(Logger { level: level(default), sink: chosen_sink() });
}

/// Which sink [`init`] chose, for `zhuli status` and the tests: `journal` or `stderr`.
pub fn sink_name() -> &'static str {
    SINK.get().copied().unwrap_or("stderr")
}

static SINK: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Install a logger whose lines (without a newline) come out of the returned queue, which
/// holds up to `capacity` of them.
pub fn init_queue(default: log::LevelFilter, capacity: usize) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(capacity);
    install(Logger { level: level(default), sink: Sink::Queue(tx) });
    rx
}
