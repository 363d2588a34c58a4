//! The configuration file: one typed model composed of the sections each module owns, read and
//! validated once at start. Errors name the file, the line and the field, never a value (the
//! file holds secrets).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{access, assistant::settings::AssistantSettings, audit, dingtalk, health, llm, store, tools};

/// `zhuli.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The configuration's version: every provisioned configuration has a larger one than the
    /// one before (the box refuses an older or equal serial). 0 for a hand-written file.
    #[serde(default)]
    pub serial: u64,
    #[serde(default)]
    pub agent: AgentSettings,
    pub dingtalk: dingtalk::Settings,
    #[serde(default)]
    pub store: store::StoreSettings,
    /// The language model; without it (and without `[[models]]`) the agent answers commands only.
    pub llm: Option<llm::Settings>,
    /// Further model endpoints, local or cloud, tried in this order after `[llm]`.
    #[serde(default)]
    pub models: Vec<llm::Settings>,
    /// What counts as protected, and so goes only to local models.
    #[serde(default)]
    pub privacy: crate::privacy::Settings,
    #[serde(default)]
    pub assistant: AssistantSettings,
    #[serde(default)]
    pub access: access::AccessSettings,
    #[serde(default)]
    pub tools: tools::ToolSettings,
    #[serde(default)]
    pub audit: audit::AuditSettings,
    #[serde(default)]
    pub health: health::HealthSettings,
    /// Where releases come from and when the box may install them by itself.
    #[serde(default)]
    pub update: crate::update::pull::UpdateSettings,
    /// People's reminders and recurring tasks: their limits.
    #[serde(default)]
    pub schedule: crate::schedule::Settings,
    /// The box's own nightly copies of its store.
    #[serde(default)]
    pub backup: store::backup::Settings,
    /// A digest of each top-level table as written, to notice what changed between runs
    /// (audited as a configuration or permission change). Never the values themselves.
    #[serde(skip)]
    pub digests: std::collections::BTreeMap<String, String>,
    /// The file it was read from (empty when parsed from text).
    #[serde(skip)]
    pub path: PathBuf,
}

/// `[agent]`: where state lives and what the pipeline may hold.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSettings {
    /// Directory of the agent's state (media area now; the encrypted store later).
    pub state_dir: PathBuf,
    /// Messages read from the gateway but not yet recorded in the store, at most. The store
    /// records far faster than a gateway sends; a frame beyond this is left unACKed (the gateway
    /// delivers it again) and the admins are told that the store is not keeping up.
    pub inbox_capacity: usize,
    /// Turns run at once, at most (across conversations; one conversation runs one at a time).
    pub workers: usize,
    /// Messages waiting in one conversation at which its person is told, once, that the answers
    /// come in order and how many wait.
    pub backlog_notice: usize,
    /// Messages waiting in one conversation, at most; a message beyond this is not answered and
    /// its sender is told so (one notice for all such messages).
    pub backlog_max: usize,
    /// Texts that queued up during a turn answered together in the next one, at most.
    pub merge_max: usize,
    /// PEM certificate authorities to trust beside the public roots, for every HTTPS/WSS
    /// connection (an office firewall that inspects TLS; a test gateway). Usually unset.
    pub extra_ca_pem: Option<String>,
    /// The box's time zone, an IANA name such as "Asia/Shanghai" (the provisioning import points
    /// `/etc/localtime` at it; journal and log times follow). Unset: UTC.
    pub time_zone: Option<String>,
    /// The language of everything said in chat: "zh-CN" (Simplified Chinese) or "en".
    pub language: crate::i18n::Language,
}

impl Default for AgentSettings {
    fn default() -> Self {
        AgentSettings {
            state_dir: PathBuf::from("/var/lib/zhuli"),
            inbox_capacity: 16_384,
            workers: 32,
            backlog_notice: 20,
            backlog_max: 200,
            merge_max: 20,
            extra_ca_pem: None,
            time_zone: None,
            language: crate::i18n::Language::ZhCn,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}; pass an existing file with --config")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config file {path}{location}: {message}")]
    Invalid { path: PathBuf, location: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        let mut config = Self::parse(&text, path)?;
        config.path = path.to_owned();
        Ok(config)
    }

    /// Parse config text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let mut config: Config = toml::from_str(text).map_err(|e| parse_error(text, path, &e))?;
        if let Ok(table) = toml::from_str::<toml::Table>(text) {
            for (name, value) in table {
                let d = ring::digest::digest(&ring::digest::SHA256, format!("{value:?}").as_bytes());
                config.digests.insert(name, d.as_ref().iter().map(|b| format!("{b:02x}")).collect());
            }
        }
        if config.agent.inbox_capacity == 0
            || config.agent.workers == 0
            || config.agent.backlog_max == 0
            || config.agent.backlog_notice == 0
            || config.agent.merge_max == 0
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message:
                    "[agent] inbox_capacity, workers, backlog_notice, backlog_max and merge_max must be at least 1"
                        .into(),
            });
        }
        let update = &config.update;
        let update_problem = if let Err(e) = update.window.parse::<crate::update::pull::Window>() {
            Some(format!("[update] window: {e}"))
        } else if !update.source.is_empty()
            && let Err(e) = crate::dingtalk::settings::check_url(&update.source, "https", "http")
        {
            Some(format!("[update] source: {e}"))
        } else if !(1..=10).contains(&update.tries) {
            Some(format!("[update] tries is {}: give 1 to 10 boots for a new release", update.tries))
        } else if update.healthy_for_s == 0 || update.healthy_within_s <= update.healthy_for_s {
            Some("[update] healthy_within_s must be longer than healthy_for_s, and both above 0".to_owned())
        } else if update.healthy_within_s > crate::update::pull::HEALTHY_WITHIN_MAX_S {
            Some(format!(
                "[update] healthy_within_s is {}: at most {} (the release check must end within its 15 minutes)",
                update.healthy_within_s,
                crate::update::pull::HEALTHY_WITHIN_MAX_S
            ))
        } else {
            None
        };
        if let Some(message) = update_problem {
            return Err(ConfigError::Invalid { path: path.to_owned(), location: String::new(), message });
        }
        if let Some(pem) = &config.agent.extra_ca_pem {
            crate::dingtalk::http::parse_pem_roots(pem).map_err(|e| ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message: format!("[agent] extra_ca_pem: {e}; paste the CA certificate(s) in PEM form"),
            })?;
        }
        if let Some(zone) = &config.agent.time_zone
            && !valid_zone_name(zone)
        {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message: format!(
                    "[agent] time_zone {zone:?} is not a time zone name; write it like \"Asia/Shanghai\" or \"UTC\""
                ),
            });
        }
        let a = &config.assistant;
        if a.max_steps == 0 || a.max_tool_output_bytes == 0 || a.max_argument_bytes == 0 || a.max_answer_bytes < 100 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message: "[assistant] max_steps, max_tool_output_bytes and max_argument_bytes must be at least 1, max_answer_bytes at least 100".into(),
            });
        }
        if !(-720..=840).contains(&a.utc_offset_minutes) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message: "[assistant] utc_offset_minutes must be between -720 and 840 (480 is Asia/Shanghai)".into(),
            });
        }
        if config.dingtalk.client_secret.is_empty() {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                location: String::new(),
                message: "[dingtalk] client_secret must not be empty".into(),
            });
        }
        Ok(config)
    }
}

/// A parser's error in the reader's words: the file, the line, the setting, plain words for
/// types. toml's Display quotes the offending source line, which may hold a secret: never used.
pub(crate) fn parse_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let location = e
        .span()
        .map(|s| {
            let at = s.start.min(text.len());
            let line = text[..at].matches('\n').count() + 1;
            match setting_at(text, at) {
                Some(field) => format!(", line {line}, {field}"),
                None => format!(", line {line}"),
            }
        })
        .unwrap_or_default();
    ConfigError::Invalid { path: path.to_owned(), location, message: plain(e.message()) }
}

/// The setting written at byte `at`: `[table] key` (or `[table]` on a header line, `key` before
/// any table), from the text as written.
fn setting_at(text: &str, at: usize) -> Option<String> {
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or("").trim();
    let header = |l: &str| {
        let l = l.trim();
        (l.starts_with('[') && !l.starts_with("[[")).then(|| l.split(']').next().unwrap_or(l).to_owned() + "]")
    };
    if let Some(h) = header(line) {
        return Some(h);
    }
    let key =
        line.split('=').next().map(str::trim).filter(|k| !k.is_empty() && !k.starts_with('#') && line.contains('='));
    let table = text[..line_start].lines().rev().find_map(header);
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t} {k}")),
        (None, Some(k)) => Some(k.to_owned()),
        (Some(t), None) => Some(t),
        (None, None) => None,
    }
}

/// A parser's message in the words of the file's reader: "a whole number", "a list", "text in
/// quotes" rather than the program's type names. A quoted string value is left out (it may be a
/// secret written in the wrong place).
fn plain(message: &str) -> String {
    let mut m = message.to_owned();
    if let Some(start) = m.find("invalid type: string \"") {
        let rest = &m[start + "invalid type: string \"".len()..];
        if let Some(end) = rest.find("\", expected") {
            m = format!("{}invalid type: text{}", &m[..start], &rest[end + 1..]);
        }
    }
    for int in ["u64", "u32", "u16", "u8", "usize", "i64", "i32", "i16", "i8", "isize"] {
        m = m.replace(&format!("expected {int}"), "expected a whole number");
        m = m.replace(&format!("expected an {int}"), "expected a whole number");
        m = m.replace(&format!("expected a {int}"), "expected a whole number");
    }
    for (jargon, plain) in [
        ("invalid type: integer", "invalid type: a whole number"),
        ("invalid type: floating point", "invalid type: a number with a fraction"),
        ("invalid type: sequence", "invalid type: a list"),
        ("invalid type: map", "invalid type: a table"),
        ("invalid type: boolean", "invalid type: true/false"),
        ("expected a sequence", "expected a list, like [\"a\", \"b\"]"),
        ("expected a string", "expected text in quotes"),
        ("expected a boolean", "expected true or false"),
        ("expected a map", "expected a table"),
        ("expected f64", "expected a number"),
        ("invalid type: ", "this is "),
        ("missing field", "missing setting"),
        ("unknown field", "unknown setting"),
        ("number too large to fit in target type", "the number is too large"),
    ] {
        m = m.replace(jargon, plain);
    }
    while let Some(start) = m.find("expected struct ") {
        let end = m[start..].find([',', '\n']).map_or(m.len(), |e| start + e);
        m.replace_range(start..end, "expected a table");
    }
    m
}

/// An IANA zone name: letters, digits, `_+-` in `/`-separated parts, never `.` or `..`.
pub fn valid_zone_name(zone: &str) -> bool {
    !zone.is_empty()
        && zone.len() <= 64
        && zone.split('/').all(|part| {
            !part.is_empty()
                && part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && part.chars().all(|c| c.is_ascii_alphanumeric() || "_+-".contains(c))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[dingtalk]
client_id = "dingabc"
client_secret = "s3cr3t-value-xyz"
robot_code = "dingabc"
api_base = "http://127.0.0.1:8080"
[dingtalk.stream]
idle_window_ms = 1000
"#;

    #[test]
    fn time_zones_are_names_never_paths() {
        for good in ["Asia/Shanghai", "UTC", "America/Argentina/Buenos_Aires", "Etc/GMT+8"] {
            assert!(valid_zone_name(good), "{good}");
            let c =
                Config::parse(&format!("[agent]\ntime_zone = {good:?}\n{GOOD}"), Path::new("z.toml")).expect("valid");
            assert_eq!(c.agent.time_zone.as_deref(), Some(good));
        }
        for bad in ["", "../../etc/shadow", "/etc/passwd", "Asia/./Shanghai", "Asia//Shanghai", "Asia/Shang hai"] {
            assert!(!valid_zone_name(bad), "{bad:?}");
        }
        let e = Config::parse(&format!("[agent]\ntime_zone = \"../x\"\n{GOOD}"), Path::new("z.toml"))
            .expect_err("bad zone");
        assert!(e.to_string().contains("Asia/Shanghai"), "{e}");
    }

    #[test]
    fn the_language_is_checked() {
        assert_eq!(Config::parse(GOOD, Path::new("z.toml")).expect("valid").agent.language.code(), "zh-CN");
        let en = Config::parse(&format!("[agent]\nlanguage = \"en\"\n{GOOD}"), Path::new("z.toml")).expect("valid");
        assert_eq!(en.agent.language.code(), "en");
        let e = Config::parse(&format!("[agent]\nlanguage = \"fr\"\n{GOOD}"), Path::new("z.toml")).expect_err("fr");
        let e = e.to_string();
        assert!(e.contains("line 2") && e.contains("[agent] language") && e.contains("\"zh-CN\""), "{e}");
    }

    #[test]
    fn good_config_loads_with_defaults() {
        let c = Config::parse(GOOD, Path::new("z.toml")).expect("valid");
        assert_eq!(c.dingtalk.stream.idle_window_ms.get().as_millis(), 1000);
        assert_eq!(c.dingtalk.stream.backoff_max_ms.get().as_secs(), 60);
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/zhuli"));
    }

    #[test]
    fn errors_name_the_line_and_never_the_secret() {
        let cases = [
            (GOOD.replace("api_base = \"http://127.0.0.1:8080\"", "api_base = \"http://example.com\""), "loopback"),
            (GOOD.replace("client_id = \"dingabc\"", "client_id = \"\""), "must not be empty"),
            (GOOD.replace("idle_window_ms = 1000", "idle_window_ms = 1"), "out of range"),
            (GOOD.replace("robot_code", "robot_kode"), "unknown setting `robot_kode`"),
            (
                GOOD.replace("client_secret = \"s3cr3t-value-xyz\"", "client_secret = 42 # s3cr3t-value-xyz"),
                "text in quotes",
            ),
        ];
        for (text, expect) in cases {
            let e = Config::parse(&text, Path::new("z.toml")).expect_err("invalid config").to_string();
            assert!(e.contains(expect), "{e}");
            assert!(e.contains("line "), "{e}");
            assert!(!e.contains("s3cr3t"), "secret leaked into: {e}");
        }
    }

    #[test]
    fn errors_name_the_setting_in_plain_words() {
        let cases = [
            (format!("[agent]\nworkers = \"many\"\n{GOOD}"), "line 2, [agent] workers", "expected a whole number"),
            (format!("[access]\nadmins = \"boss\"\n{GOOD}"), "line 2, [access] admins", "expected a list"),
            (format!("{GOOD}[health]\nsample_ms = true\n"), "[health] sample_ms", "true/false"),
            (
                GOOD.replace("[dingtalk.stream]", "[dingtalk.stream]\nkeepalive_ms = -5"),
                "[dingtalk.stream] keepalive_ms",
                "line",
            ),
        ];
        for (text, setting, words) in cases {
            let e = Config::parse(&text, Path::new("/etc/zhuli/office.toml")).expect_err("invalid").to_string();
            assert!(e.starts_with("config file /etc/zhuli/office.toml, line"), "{e}");
            assert!(e.contains(setting) && e.contains(words), "{setting} / {words}: {e}");
            for jargon in ["u64", "u32", "usize", "i64", "sequence", "struct", "invalid type"] {
                assert!(!e.contains(jargon), "{jargon} in: {e}");
            }
        }
    }
}
