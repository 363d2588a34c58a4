//! The agent's log, through the `log` facade. One switch, decided at start ([`init`]):
//!
//! - **journald**, when the process's stderr is the journal (`$JOURNAL_STREAM` names it, as
//!   systemd sets for `zhuli.service`): each record is one journal entry through
//!   `systemd-journal-logger`, with `MESSAGE`, `PRIORITY`, `SYSLOG_IDENTIFIER=zhuli`,
//!   `CODE_MODULE`, `TARGET` and the record's own fields (`CONVERSATION` where a record names
//!   its conversation: `log::info!(conversation = id; "…")`). Entries are sent from a thread of
//!   their own through a bounded queue ([`JOURNAL_QUEUE`]), so a journal that stalls (its socket
//!   blocks when journald does not read) never stalls the agent: when the queue is full a record
//!   is dropped and counted ([`journal_dropped`]). An entry the journal refuses is written to
//!   stderr instead.
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
    Journal(std::sync::mpsc::SyncSender<Owned>),
    Queue(mpsc::Sender<String>),
}

/// Records waiting for the journal's thread, at most.
pub const JOURNAL_QUEUE: usize = 1024;

static JOURNAL_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Records queued for the journal and not yet sent (for `flush`).
static JOURNAL_PENDING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Records dropped because the journal's queue was full (journald not reading); in the status
/// snapshot as `log_records_dropped`.
pub fn journal_dropped() -> u64 {
    JOURNAL_DROPPED.load(std::sync::atomic::Ordering::Relaxed)
}

/// A record as the journal's thread needs it: everything owned.
struct Owned {
    level: log::Level,
    target: String,
    module: Option<String>,
    file: Option<String>,
    line: Option<u32>,
    message: String,
    fields: Vec<(String, String)>,
}

impl Owned {
    fn of(record: &log::Record<'_>) -> Owned {
        Owned {
            level: record.level(),
            target: record.target().to_owned(),
            module: record.module_path().map(str::to_owned),
            file: record.file().map(str::to_owned),
            line: record.line(),
            message: record.args().to_string(),
            fields: fields_of(record),
        }
    }

    /// Sent to the journal; on failure, the stderr line.
    fn send(&self, journal: &JournalLog) {
        let fields: Vec<(&str, &str)> = self.fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let args = format_args!("{}", self.message);
        let record = log::Record::builder()
            .level(self.level)
            .target(&self.target)
            .module_path(self.module.as_deref())
            .file(self.file.as_deref())
            .line(self.line)
            .args(args)
            .key_values(&fields)
            .build();
        if journal.journal_send(&record).is_err() {
            let _ = writeln!(std::io::stderr().lock(), "{}", line(&record));
        }
    }
}

/// The journal's thread: sends what the queue brings until every sender is gone.
fn journal_thread(journal: JournalLog) -> Option<std::sync::mpsc::SyncSender<Owned>> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Owned>(JOURNAL_QUEUE);
    std::thread::Builder::new()
        .name("zhuli-journal".into())
        .spawn(move || {
            for owned in rx {
                owned.send(&journal);
                JOURNAL_PENDING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
        .ok()?;
    Some(tx)
}

struct Logger {
    level: log::LevelFilter,
    sink: Sink,
}

/// `LEVEL message key=value…`: how a record reads on stderr and in the demo.
fn line(record: &log::Record<'_>) -> String {
    let mut text = format!("{:<5} {}", record.level(), record.args());
    for (key, value) in fields_of(record) {
        let _ = write!(text, " {key}={value}");
    }
    text
}

/// A record's own fields (`log::info!(conversation = id; …)`), in order.
fn fields_of(record: &log::Record<'_>) -> Vec<(String, String)> {
    struct Fields(Vec<(String, String)>);
    impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
        fn visit_pair(&mut self, key: log::kv::Key<'kvs>, value: log::kv::Value<'kvs>) -> Result<(), log::kv::Error> {
            self.0.push((key.to_string(), value.to_string()));
            Ok(())
        }
    }
    let mut fields = Fields(Vec::new());
    let _ = record.key_values().visit(&mut fields);
    fields.0
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
            Sink::Journal(queue) => {
                JOURNAL_PENDING.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if queue.try_send(Owned::of(record)).is_err() {
                    JOURNAL_PENDING.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    JOURNAL_DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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

    /// Waits (up to a second) until the journal's thread has sent what was queued: the last
    /// lines before the process ends reach the journal.
    fn flush(&self) {
        let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while JOURNAL_PENDING.load(std::sync::atomic::Ordering::SeqCst) > 0 && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
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

/// Where [`init`] sends records: the journal when stderr is the journal and its socket takes
/// entries, else stderr.
fn chosen_sink() -> Sink {
    if !systemd_journal_logger::connected_to_journal() {
        return Sink::Stderr;
    }
    match JournalLog::new() {
        Ok(journal) => match journal_thread(journal.with_syslog_identifier("zhuli".into())) {
            Some(queue) => Sink::Journal(queue),
            None => Sink::Stderr,
        },
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

/// Install a logger whose lines (without a newline) come out of the returned queue, which
/// holds up to `capacity` of them.
pub fn init_queue(default: log::LevelFilter, capacity: usize) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(capacity);
    install(Logger { level: level(default), sink: Sink::Queue(tx) });
    rx
}
