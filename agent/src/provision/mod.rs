//! USB provisioning: a signed `zhuli.toml` on a stick labelled `ZHULI-CFG` configures a box
//! nobody sits at.
//!
//! On the installer's laptop: `zhuli provision keygen | init | check | sign | verify | write`.
//! On the box: `zhuli provision import` (run by a systemd unit when the stick appears) verifies
//! the signature against the organisation's key (baked into the image, or pinned from the first
//! valid import), refuses a serial that is not newer, validates everything, then applies the new
//! configuration as one step: a new generation directory (config with secrets replaced by
//! credential references, secrets as systemd-encrypted credentials, the unit drop-in for the
//! folders it may change) made current by renaming a symlink. What the switch depends on is
//! durable first (a pinned key, the record of the stick's scrub). Then the stick's secrets are
//! removed ([`scrub`]) — a stick pulled out meanwhile is finished at its next insertion — and a
//! receipt is written next to the file. Anything wrong before the switch leaves the current
//! configuration as it was.

pub mod recovery;
pub mod scrub;
pub mod sign;
pub mod stick;
pub mod stick_backup;
pub mod unit;

use std::{
    collections::BTreeMap,
    io::Write,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

use crate::{config::Config, tools::sha256_hex};

/// Credential names the imported configuration refers to.
pub const CRED_DINGTALK: &str = "dingtalk-client-secret";
pub const CRED_LLM: &str = "llm-api-key";
pub const CRED_GITHUB: &str = "github-token";
pub const CRED_DRIVE: &str = "drive-password";
pub const CRED_CALDAV: &str = "caldav-password";
/// `[backup] password`: loaded by the drop-in, only when the configuration has one.
pub const CRED_BACKUP: &str = "backup-password";
/// Every credential of the fixed secret fields (the unit loads each one; a plugin's `env`
/// values become credentials `mcp-<plugin>-<VARIABLE>`, loaded by the generation's drop-in).
pub const CREDENTIALS: [&str; 5] = [CRED_DINGTALK, CRED_LLM, CRED_GITHUB, CRED_DRIVE, CRED_CALDAV];
/// The organisation key baked into an office's own image.
pub const BAKED_KEY: &str = "/usr/share/zhuli/org.pub";
/// Where imported configurations live on the box (persistent, root only).
pub const DEFAULT_ROOT: &str = "/var/lib/zhuli-provisioning";
/// The sha256 of the configuration as left on the last imported stick (secrets removed): that
/// stick, plugged in again or left in at a reboot, is recognised and left alone.
const IMPORTED_STICK: &str = "imported-stick.sha256";
/// What `zhuli provision factory-reset` forgets: the configuration, its generations, the serial,
/// the pinned organisation key, the scrubs waiting for a stick, the last stick imported and the
/// last refusal. After it the box trusts the next signed stick it sees, as a new box does.
pub const FORGOTTEN_AT_RESET: [&str; 7] =
    ["current", "generations", "serial", "org.pub", scrub::PENDING, IMPORTED_STICK, REFUSED];
/// The start of an import's result when the stick held no configuration.
pub const DIAGNOSTICS_ONLY: &str = "diagnostics only";
/// The start of an import's result when the stick was already imported.
pub const UNCHANGED: &str = "unchanged";
/// Where time zone files live (package tzdata).
const ZONEINFO: &str = "/usr/share/zoneinfo";

/// The agent's user and group, which may read the imported configuration.
const AGENT_USER: &str = "zhuli";

/// Shortest value a secret field accepts.
const MIN_SECRET: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Stick(#[from] stick::StickError),
    #[error(transparent)]
    Signature(#[from] sign::SignError),
    #[error("the stick holds no {0}; write it with `zhuli provision write`")]
    Missing(&'static str),
    #[error("the stick holds several configuration files ({0}); leave only zhuli.toml")]
    TwoConfigs(String),
    #[error("zhuli.toml is not UTF-8 text; save it as UTF-8")]
    NotUtf8,
    #[error("zhuli.toml is not signed (no zhuli.toml.sig); sign it with `zhuli provision sign`")]
    Unsigned,
    #[error("{0}")]
    Invalid(String),
    #[error("{0} cannot run on a box:\n{lines}", lines = crate::validate::lines(.1))]
    Problems(String, Vec<crate::validate::Problem>),
    #[error("serial {new} is not newer than the box's current serial {current}; raise `serial` and sign again")]
    OldSerial { new: u64, current: u64 },
    #[error(
        "{field} holds only `*`: this stick was imported before and its secrets were removed from it; write the configuration to it again (`zhuli provision write`) and plug it in"
    )]
    ImportedBefore { field: String },
    #[error("cannot store the imported configuration: {0}")]
    Apply(String),
}

impl ProvisionError {
    /// What went wrong, one problem per line, to say in the box's language (the admin chat).
    pub fn problems(&self) -> Vec<crate::validate::Problem> {
        use crate::{i18n::Said, validate::Problem};
        let said = |s: Said| vec![Problem::keyed("", s)];
        match self {
            ProvisionError::Problems(_, problems) => problems.clone(),
            ProvisionError::OldSerial { new, current } => {
                vec![Problem::keyed("serial", Said::new("refusal.old_serial", &[("new", new), ("current", current)]))]
            }
            ProvisionError::ImportedBefore { field } => {
                vec![Problem::keyed(field, Said::new("problem.stick_imported_before", &[]))]
            }
            ProvisionError::Unsigned => said(Said::new("refusal.unsigned", &[])),
            ProvisionError::Signature(sign::SignError::Mismatch) => said(Said::new("refusal.mismatch", &[])),
            ProvisionError::Signature(sign::SignError::Untrusted { found, trusted }) => {
                said(Said::new("refusal.untrusted", &[("found", found), ("trusted", trusted)]))
            }
            ProvisionError::TwoConfigs(names) => said(Said::new("refusal.two_configs", &[("names", names)])),
            ProvisionError::NotUtf8 => said(Said::new("refusal.not_utf8", &[])),
            ProvisionError::Stick(stick::StickError::ReadOnly(_)) => said(Said::new("refusal.read_only", &[])),
            ProvisionError::Invalid(m) => vec![Problem::said(m.clone())],
            e => said(Said::new("refusal.other", &[("error", e)])),
        }
    }
}

/// Where the secrets are in a configuration's text, to replace them.
#[derive(Deserialize)]
struct SecretSpans {
    dingtalk: Option<DingtalkSpan>,
    llm: Option<LlmSpan>,
    tools: Option<ToolsSpan>,
    backup: Option<PasswordSpan>,
    #[serde(default)]
    models: Vec<ModelSpan>,
}
#[derive(Deserialize)]
struct ModelSpan {
    name: Option<String>,
    api_key: Option<toml::Spanned<toml::Value>>,
}
#[derive(Deserialize)]
struct ToolsSpan {
    github: Option<GithubSpan>,
    drive: Option<PasswordSpan>,
    caldav: Option<PasswordSpan>,
    #[serde(default)]
    mcp: BTreeMap<String, PluginSpan>,
}
#[derive(Deserialize)]
struct PluginSpan {
    #[serde(default)]
    env: BTreeMap<String, toml::Spanned<toml::Value>>,
}
#[derive(Deserialize)]
struct PasswordSpan {
    password: Option<toml::Spanned<toml::Value>>,
}
#[derive(Deserialize)]
struct GithubSpan {
    token: Option<toml::Spanned<toml::Value>>,
}
#[derive(Deserialize)]
struct DingtalkSpan {
    client_secret: Option<toml::Spanned<toml::Value>>,
}
#[derive(Deserialize)]
struct LlmSpan {
    api_key: Option<toml::Spanned<toml::Value>>,
}

/// A secret found in the text: the credential it becomes, the setting that holds it, its
/// value, and its byte span (quotes included).
pub(crate) struct FoundSecret {
    pub credential: String,
    pub field: String,
    pub value: String,
    pub span: std::ops::Range<usize>,
}

impl FoundSecret {
    /// A plugin's environment value (any length: not every variable is a key).
    fn is_plugin_env(&self) -> bool {
        self.credential.starts_with("mcp-")
    }

    /// A credential named after something the configuration names (a plugin's variable, a
    /// model endpoint's key): loaded by the drop-in, not by the unit itself.
    fn in_dropin(&self) -> bool {
        self.is_plugin_env() || self.credential.starts_with("model-") || self.credential == CRED_BACKUP
    }
}

/// An environment variable's name: letters, digits and `_`, not starting with a digit.
fn env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn secrets_in(text: &str, path: &Path) -> Result<Vec<FoundSecret>, ProvisionError> {
    // Like the configuration's own errors: the file, the line, the setting, plain words; never
    // the line's text or a value.
    let spans: SecretSpans = toml::from_str(text)
        .map_err(|e| ProvisionError::Invalid(crate::config::parse_error(text, path, &e).to_string()))?;
    let (github, drive, caldav, mcp) = match spans.tools {
        Some(t) => {
            (t.github.and_then(|g| g.token), t.drive.and_then(|d| d.password), t.caldav.and_then(|c| c.password), t.mcp)
        }
        None => (None, None, None, BTreeMap::new()),
    };
    let mut fields: Vec<(Option<toml::Spanned<toml::Value>>, String, String)> = vec![
        (spans.dingtalk.and_then(|d| d.client_secret), CRED_DINGTALK.into(), "[dingtalk] client_secret".into()),
        (spans.llm.and_then(|l| l.api_key), CRED_LLM.into(), "[llm] api_key".into()),
        (github, CRED_GITHUB.into(), "[tools.github] token".into()),
        (drive, CRED_DRIVE.into(), "[tools.drive] password".into()),
        (caldav, CRED_CALDAV.into(), "[tools.caldav] password".into()),
        (spans.backup.and_then(|b| b.password), CRED_BACKUP.into(), "[backup] password".into()),
    ];
    for model in spans.models {
        let Some(key) = model.api_key else { continue };
        let name = model.name.unwrap_or_default();
        let field = format!("[[models]] {name:?} api_key");
        let name_ok = !name.is_empty()
            && name.len() <= 24
            && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !name_ok {
            return Err(ProvisionError::Invalid(format!(
                "{field}: a model endpoint with a key needs a name of up to 24 lowercase letters, digits and -"
            )));
        }
        fields.push((Some(key), format!("model-{name}-api-key"), field));
    }
    for (plugin, p) in mcp {
        for (var, value) in p.env {
            let field = format!("[tools.mcp.{plugin}] env.{var}");
            let plugin_ok = !plugin.is_empty()
                && plugin.len() <= 24
                && plugin.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
            if !plugin_ok || !env_name(&var) {
                return Err(ProvisionError::Invalid(format!(
                    "{field}: a plugin's name is up to 24 lowercase letters and digits, a variable's name letters, digits and _"
                )));
            }
            fields.push((Some(value), format!("mcp-{plugin}-{var}"), field));
        }
    }
    let mut found = Vec::new();
    for (field_value, credential, name) in fields {
        let Some(v) = field_value else { continue };
        let span = v.span();
        match v.into_inner() {
            toml::Value::String(value) => found.push(FoundSecret { credential, field: name, value, span }),
            toml::Value::Table(t) if t.contains_key("credential") => {
                return Err(ProvisionError::Invalid(format!(
                    "{name}: must be written out on the stick (the box turns it into a credential itself)"
                )));
            }
            _ => return Err(ProvisionError::Invalid(format!("{name}: write the secret as text in quotes"))),
        }
    }
    Ok(found)
}

/// `text` with each secret's value replaced by `with(secret)`.
fn replace_secrets(text: &str, secrets: &[FoundSecret], with: impl Fn(&FoundSecret) -> String) -> String {
    let mut out = text.to_owned();
    let mut sorted: Vec<&FoundSecret> = secrets.iter().collect();
    sorted.sort_by_key(|s| std::cmp::Reverse(s.span.start));
    for s in sorted {
        out.replace_range(s.span.clone(), &with(s));
    }
    out
}

/// Validate a configuration for provisioning: the one validation the agent's start uses
/// ([`crate::validate::config`]), and what only a stick's text shows: a serial, the secrets
/// written out (and not the stars an import leaves), folders the unit can name. Syntax errors
/// stop at the first; every other problem is listed.
pub fn check(text: &str, path: &Path) -> Result<Config, ProvisionError> {
    use crate::{i18n::Said, validate::Problem};
    let invalid = |e: crate::config::ConfigError| ProvisionError::Invalid(e.to_string());
    // A syntax error is said by the parser, with the file's name, the line and the setting.
    if toml::from_str::<toml::Table>(text).is_err() {
        Config::parse(text, path).map_err(invalid)?;
    }
    // Secrets first: on a stick they are written out, never a credential of this machine.
    let secrets = secrets_in(text, path).map_err(|e| match e {
        ProvisionError::Invalid(m) => ProvisionError::Problems(path.display().to_string(), vec![Problem::said(m)]),
        e => e,
    })?;
    if !secrets.iter().any(|s| s.credential == CRED_DINGTALK) {
        let missing = Problem::keyed("[dingtalk] client_secret", Said::new("problem.secret_missing", &[]));
        return Err(ProvisionError::Problems(path.display().to_string(), vec![missing]));
    }
    let config = Config::parse(text, path).map_err(invalid)?;
    let mut problems: Vec<Problem> = Vec::new();
    if config.serial == 0 {
        problems.push(Problem::keyed("serial", Said::new("problem.serial_missing", &[])));
    }
    for s in &secrets {
        if !s.value.is_empty() && s.value.chars().all(|c| c == '*') {
            problems.push(Problem::keyed(&s.field, Said::new("problem.secret_starred", &[])));
        } else if !s.is_plugin_env() && s.value.chars().count() < MIN_SECRET {
            problems.push(Problem::keyed(&s.field, Said::new("problem.secret_short", &[("min", &MIN_SECRET)])));
        }
    }
    if let Err(ProvisionError::Invalid(m)) = unit::check(&config) {
        problems.push(Problem::said(m));
    }
    problems.extend(crate::validate::config(&config).errors);
    if problems.is_empty() { Ok(config) } else { Err(ProvisionError::Problems(path.display().to_string(), problems)) }
}

/// How secrets become credentials on the box.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credentials {
    /// `systemd-creds encrypt --with-key=auto` (TPM2 where present, else the host key).
    Systemd,
    /// Plain files readable by root only: development images and tests. Loudly logged.
    Plain,
}

pub struct ImportOptions {
    pub device: PathBuf,
    pub root: PathBuf,
    /// The organisation key baked into the image, if there is one.
    pub baked_key: Option<PathBuf>,
    pub allow_unsigned: bool,
    pub credentials: Credentials,
    /// Reload systemd's units (the generation's drop-in) and (re)start the agent after the
    /// switch.
    pub restart: bool,
    /// Write the box's diagnostics report onto the stick afterwards.
    pub diagnostics: bool,
    /// Set up journald's Forward Secure Sealing on the first import (`journalctl --setup-keys`)
    /// and put the verification key on the receipt, so it leaves the box with the stick.
    pub seal_journal: bool,
}

/// What an import did, written to the stick as `zhuli-receipt.txt`.
#[derive(Debug, Clone, Default)]
pub struct Receipt {
    pub box_id: String,
    pub serial: Option<u64>,
    pub config_hash: Option<String>,
    pub time: String,
    pub result: String,
    /// Whether the secrets are gone from the stick.
    pub scrub: Option<String>,
    pub errors: Vec<String>,
    /// The agent was restarted on the new configuration (not printed).
    pub restarted: bool,
    /// The journal's verification key, when this import set up sealing.
    pub journal_key: Option<String>,
    /// The store key sealed to the organisation key ([`recovery`]), after a switch.
    pub recovery: Option<String>,
    /// What the copy of the newest snapshot onto this stick did ([`stick_backup`]).
    pub backup: Option<String>,
    /// This insertion wrote the receipt to the stick (not printed).
    pub written: bool,
}

/// The start of the receipt's line about the snapshot copied onto the stick.
pub const BACKUP_LINE: &str = "backup on this stick: ";

impl Receipt {
    pub fn text(&self) -> String {
        let mut t = format!(
            "zhuli provisioning receipt\nbox: {}\ntime: {}\nserial: {}\nconfig sha256: {}\nresult: {}\n",
            self.box_id,
            self.time,
            self.serial.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            self.config_hash.as_deref().unwrap_or("-"),
            self.result
        );
        if let Some(scrub) = &self.scrub {
            t.push_str(&format!("secrets on this stick: {scrub}\n"));
        }
        if let Some(key) = &self.journal_key {
            t.push_str(&format!(
                "journal verification key: {key}\n  (keep it safe and off the box, then delete it from this stick; check the journal with: journalctl --verify --verify-key=KEY)\n"
            ));
        }
        if let Some(line) = &self.recovery {
            t.push_str(&recovery::receipt_lines(line));
        }
        if let Some(line) = &self.backup {
            t.push_str(&format!("{BACKUP_LINE}{line}\n"));
        }
        for e in &self.errors {
            t.push_str(&format!("error: {e}\n"));
        }
        t
    }

    fn write_to(&mut self, device: &Path) {
        match stick::write(device, &[(stick::RECEIPT, self.text().as_bytes())], false) {
            Ok(()) => self.written = true,
            Err(e) => log::warn!("the receipt could not be written to the stick: {e}"),
        }
    }
}

fn box_id() -> String {
    std::fs::read_to_string("/etc/machine-id")
        .ok()
        .map(|m| sha256_hex(format!("zhuli-box:{}", m.trim()).as_bytes())[..16].to_owned())
        .unwrap_or_else(|| "unknown".into())
}

pub use crate::clock::utc_now;

/// The serial of the current configuration (0 before the first import): the current
/// generation's, or the box's record of it (boxes imported before generations held it).
pub fn current_serial(root: &Path) -> u64 {
    let read = |p: PathBuf| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
    read(root.join("current/serial")).max(read(root.join("serial")))
}

/// The provisioning root a configuration at `config` was imported into (`<root>/current/zhuli.toml`).
pub fn root_of(config: &Path) -> Option<PathBuf> {
    let current = config.parent()?;
    (current.file_name()? == "current").then(|| current.parent().map(Path::to_path_buf)).flatten()
}

/// Import from the stick. The receipt says what happened; on error it is also written to the
/// stick where the stick is writable.
pub fn import(opts: &ImportOptions) -> Receipt {
    let mut receipt = Receipt { box_id: box_id(), time: utc_now(), ..Receipt::default() };
    // One import at a time (two sticks, or one plugged in twice quickly, start two), its
    // diagnostics included.
    let lock = std::fs::create_dir_all(&opts.root).and_then(|()| std::fs::File::open(&opts.root)).and_then(|f| {
        f.lock()?;
        Ok(f)
    });
    let imported = match &lock {
        Ok(_) => import_inner(opts, &mut receipt),
        Err(e) => Err(ProvisionError::Apply(e.to_string())),
    };
    match imported {
        Ok(done) => {
            receipt.result = done;
            log::info!("provisioning: {}", receipt.result);
        }
        Err(e) => {
            receipt.result = "refused: the previous configuration is unchanged".into();
            match &e {
                ProvisionError::Problems(file, problems) => {
                    receipt.errors.push(format!("{file} cannot run on this box:"));
                    receipt.errors.extend(problems.iter().map(ToString::to_string));
                }
                e => receipt.errors.push(e.to_string()),
            }
            log::error!("provisioning refused: {e}; the previous configuration is unchanged");
            // Best effort: the stick may be the problem.
            receipt.write_to(&opts.device);
            Refusal::of(&receipt, &e).record(&opts.root);
        }
    }
    if opts.diagnostics {
        write_diagnostics(opts, receipt.restarted);
    }
    back_up_to_stick(opts, &mut receipt);
    drop(lock);
    receipt
}

/// Write the box's diagnostics report onto the stick (every insertion): the running agent's
/// full report over its status socket, or what the import can tell without it. `restarted`:
/// the agent was just restarted, so it is given a moment to answer.
fn write_diagnostics(opts: &ImportOptions, restarted: bool) {
    use crate::health::diagnostics::{self, Section};
    let config = current_config(&opts.root);
    // The values to take out of log lines: the current generation's credentials, opened as the
    // agent's unit would.
    let secrets = current_secrets(&opts.root.join("current"));
    let socket = match &config {
        Ok(c) => c.health.socket_path(&c.agent.state_dir),
        Err(_) => {
            crate::health::HealthSettings::default().socket_path(&crate::config::AgentSettings::default().state_dir)
        }
    };
    let mut asked = crate::health::status::ask(&socket, "diagnostics");
    let deadline = std::time::Instant::now() + Duration::from_secs(if restarted { 30 } else { 0 });
    while asked.is_err() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(1));
        asked = crate::health::status::ask(&socket, "diagnostics");
    }
    let report = match asked.map_err(|e| e.to_string()).and_then(|json| {
        serde_json::from_str::<diagnostics::Report>(&json).map_err(|e| format!("its answer was not a report ({e})"))
    }) {
        Ok(r) => r,
        Err(why) => diagnostics::without_agent(config.as_ref().map_err(Clone::clone), &why, &secrets),
    };
    // The import reads the whole journal (as root); the agent knows only its own memory.
    let mut report = report;
    if let Section::Found(lines) = diagnostics::journal(&secrets) {
        report.journal = Section::Found(lines);
        report.journal_from = "the journal".into();
    }
    let json = serde_json::to_vec_pretty(&report).unwrap_or_default();
    let text = report.text();
    match stick::write(
        &opts.device,
        &[(stick::DIAGNOSTICS_TEXT, text.as_bytes()), (stick::DIAGNOSTICS_JSON, &json)],
        false,
    ) {
        Ok(()) => log::info!("provisioning: diagnostics written to the stick"),
        Err(e) => log::warn!("provisioning: the diagnostics could not be written to the stick: {e}"),
    }
}

/// The current configuration. It names its secrets as sealed credentials the import cannot (and
/// need not) open: it is read with a stand-in for each.
fn current_config(root: &Path) -> Result<Config, String> {
    let path = root.join("current").join("zhuli.toml");
    match std::fs::read_to_string(&path) {
        Ok(text) => Config::parse(&unsealed(&text), &path).map_err(|e| e.to_string()),
        Err(_) => Err("no configuration has been imported yet".to_owned()),
    }
}

/// The third copy of the store's snapshots: the newest onto this stick, at every insertion once
/// a configuration was imported (whatever became of this stick's), unless `[backup] stick_keep`
/// is 0. The receipt says what came of it; a receipt this insertion did not write (a stick
/// imported already keeps its receipt) gets its backup line replaced only when it has something
/// new to say.
fn back_up_to_stick(opts: &ImportOptions, receipt: &mut Receipt) {
    use crate::store::key::StoreKey;
    let Ok(config) = current_config(&opts.root) else { return };
    if config.backup.stick_keep == 0 {
        stick_backup::forget(&opts.root);
        return;
    }
    let local = config.agent.state_dir.join(crate::health::diagnostics::BACKUPS);
    // As root, without the agent's credentials: the key file of a development box, else the
    // sealed store-key credential opened with systemd-creds.
    let load_key = || StoreKey::load(config.store.key_file.as_deref());
    let outcome = stick_backup::copy(&opts.device, &local, &opts.root, load_key, config.backup.stick_keep);
    stick_backup::record(&opts.root, &outcome, crate::clock::now_ms());
    let line = match &outcome {
        Ok(c) => {
            log::info!("provisioning: backup on the stick: {}", c.line());
            c.line()
        }
        Err(e) => {
            log::warn!("provisioning: no backup on the stick: {e}");
            format!("not copied: {e}")
        }
    };
    receipt.backup = Some(line.clone());
    if receipt.written {
        receipt.write_to(&opts.device);
    } else {
        // A copy that was there already, and that the receipt names: nothing new to say.
        let named = match &outcome {
            Ok(c) if !c.changed() => Some(format!("{BACKUP_LINE}{}/{} ", stick_backup::DIR, c.name)),
            _ => None,
        };
        note_on_receipt(&opts.device, &line, named.as_deref());
    }
}

/// Replace the backup line of the receipt on the stick (the rest stays as it is), unless it says
/// `line` already or starts with `named`; a stick without a receipt is left so.
fn note_on_receipt(device: &Path, line: &str, named: Option<&str>) {
    let Ok(text) = stick::read(device, stick::RECEIPT).map(|b| String::from_utf8_lossy(&b).into_owned()) else {
        return;
    };
    let new = format!("{BACKUP_LINE}{line}");
    if text.lines().any(|l| l == new || named.is_some_and(|n| l.starts_with(n))) {
        return;
    }
    let mut kept: String =
        text.lines().filter(|l| !l.starts_with(BACKUP_LINE)).flat_map(|l| [l, "\n"]).collect::<String>();
    kept.push_str(&new);
    kept.push('\n');
    if let Err(e) = stick::write(device, &[(stick::RECEIPT, kept.as_bytes())], false) {
        log::warn!("the receipt's backup line could not be written to the stick: {e}");
    }
}

/// The secret values of the generation in `dir` (sealed credentials opened, plain ones read), for
/// redaction; longest first.
fn current_secrets(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = match name.strip_suffix(".cred") {
                Some(cred) => decrypt(cred, &e.path())?.to_vec(),
                None if CREDENTIALS.contains(&name.as_str())
                    || name.starts_with("mcp-")
                    || name.starts_with("model-")
                    || name == CRED_BACKUP =>
                {
                    std::fs::read(e.path()).ok()?
                }
                None => return None,
            };
            String::from_utf8(bytes).ok().filter(|v| v.len() >= 6)
        })
        .collect();
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// An imported configuration's text with each `{ credential = "…" }` replaced by a stand-in.
fn unsealed(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("{ credential = \"") {
        let after = &rest[start..];
        match after.find("\" }") {
            Some(end) => {
                out.push_str(&rest[..start]);
                out.push_str("\"(sealed credential)\"");
                rest = &after[end + 3..];
            }
            None => break,
        }
    }
    out.push_str(rest);
    out
}

/// The last refused import, for the agent to tell the admin chat (`refused.json` in the
/// provisioning root, readable by the agent's group). A successful import removes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Refusal {
    pub time: String,
    pub serial: Option<u64>,
    pub config_sha256: Option<String>,
    /// In English, as the receipt says them.
    pub reasons: Vec<String>,
    /// The same, to say in the box's language.
    #[serde(default)]
    pub problems: Vec<crate::validate::Problem>,
}

/// Where [`Refusal`] is kept.
const REFUSED: &str = "refused.json";

impl Refusal {
    fn of(receipt: &Receipt, e: &ProvisionError) -> Refusal {
        Refusal {
            time: receipt.time.clone(),
            serial: receipt.serial,
            config_sha256: receipt.config_hash.clone(),
            reasons: receipt.errors.clone(),
            problems: e.problems(),
        }
    }

    /// What tells this refusal apart from another.
    pub fn id(&self) -> String {
        sha256_hex(format!("{}|{:?}|{:?}", self.time, self.serial, self.config_sha256).as_bytes())[..16].to_owned()
    }

    fn record(&self, root: &Path) {
        let path = root.join(REFUSED);
        let written = serde_json::to_vec_pretty(self)
            .map_err(std::io::Error::other)
            .and_then(|json| write_file(&path, &json, 0o640));
        match written {
            Ok(()) => group_readable(&path),
            Err(e) => log::warn!("provisioning: cannot note the refusal for the admin chat: {e}"),
        }
    }

    /// The last refusal, if the import since has not succeeded.
    pub fn last(root: &Path) -> Option<Refusal> {
        serde_json::from_slice(&std::fs::read(root.join(REFUSED)).ok()?).ok()
    }
}

fn import_inner(opts: &ImportOptions, receipt: &mut Receipt) -> Result<String, ProvisionError> {
    let apply = |e: std::io::Error| ProvisionError::Apply(e.to_string());
    let contents = stick::list(&opts.device)?;
    let configs: Vec<&String> =
        contents.files.iter().map(|(n, _)| n).filter(|n| n.to_ascii_lowercase().ends_with(".toml")).collect();
    if configs.len() > 1 {
        return Err(ProvisionError::TwoConfigs(configs.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")));
    }
    if configs.is_empty() {
        // An empty stick labelled for the box: it comes for the diagnostics.
        let result = format!(
            "{DIAGNOSTICS_ONLY}: this stick holds no configuration; the box's diagnostics are beside this receipt ({}, {})",
            stick::DIAGNOSTICS_TEXT,
            stick::DIAGNOSTICS_JSON
        );
        receipt.result = result.clone();
        receipt.write_to(&opts.device);
        return Ok(result);
    }
    if !contents.files.iter().any(|(n, _)| n == stick::CONFIG) {
        return Err(ProvisionError::Missing("zhuli.toml"));
    }
    let bytes = stick::read(&opts.device, stick::CONFIG)?;
    receipt.config_hash = Some(sha256_hex(&bytes));
    let volume = stick::volume_id(&opts.device)?;
    // A stick pulled out while its secrets were being removed: finish that first.
    if let Some(held) = scrub::find(&opts.root, volume, &bytes, opts.credentials) {
        if !contents.writable {
            return Err(stick::StickError::ReadOnly(opts.device.clone()).into());
        }
        let serial = held.pending.serial;
        receipt.serial = Some(serial);
        let outcome =
            scrub::run(&opts.root, &opts.device, held, opts.credentials, scrub::pulled_at(device_size(opts)))?;
        receipt.scrub = Some(outcome.receipt_line());
        receipt.config_hash = stick::read(&opts.device, stick::CONFIG).ok().map(|b| sha256_hex(&b));
        let result = if outcome.complete() {
            format!(
                "{UNCHANGED}: serial {serial} was imported already; the removal of its secrets from this stick is now finished"
            )
        } else {
            format!(
                "{UNCHANGED}: serial {serial} was imported already; its secrets are still being removed from this stick"
            )
        };
        // The stick is now as an import leaves it: known again at its next insertion.
        if outcome.complete()
            && serial == current_serial(&opts.root)
            && let Some(hash) = receipt.config_hash.as_ref()
            && let Err(e) = write_file(&opts.root.join(IMPORTED_STICK), format!("{hash}\n").as_bytes(), 0o600)
        {
            log::warn!("provisioning: cannot note the stick as imported: {e}");
        }
        receipt.result = result.clone();
        receipt.write_to(&opts.device);
        return Ok(result);
    }
    // The stick this box imported last (its receipt, with the journal key, stays as it is).
    if std::fs::read_to_string(opts.root.join(IMPORTED_STICK)).is_ok_and(|h| h.trim() == sha256_hex(&bytes)) {
        return Ok(format!(
            "{UNCHANGED}: this stick was imported already (serial {}); nothing to do",
            current_serial(&opts.root)
        ));
    }
    let text = String::from_utf8(bytes.clone()).map_err(|_| ProvisionError::NotUtf8)?;
    // Said on the receipt even when the file is refused.
    receipt.serial = toml::from_str::<toml::Table>(&text)
        .ok()
        .and_then(|t| t.get("serial").and_then(toml::Value::as_integer))
        .and_then(|n| u64::try_from(n).ok());

    // A stick an import has already emptied of its secrets (its signature no longer matches,
    // which would be the less useful reason).
    if let Ok(secrets) = secrets_in(&text, Path::new("zhuli.toml (on the stick)"))
        && let Some(s) = secrets.iter().find(|s| !s.value.is_empty() && s.value.chars().all(|c| c == '*'))
    {
        return Err(ProvisionError::ImportedBefore { field: s.field.clone() });
    }
    // Who signed it, and whether this box trusts them.
    let pinned_path = opts.root.join("org.pub");
    let trusted = match opts.baked_key.as_deref().filter(|p| p.exists()) {
        Some(p) => Some(sign::public_key(&std::fs::read_to_string(p).unwrap_or_default(), &p.display().to_string())?),
        None => match std::fs::read_to_string(&pinned_path) {
            Ok(t) => Some(sign::public_key(&t, &pinned_path.display().to_string())?),
            Err(_) => None,
        },
    };
    let signer = if contents.files.iter().any(|(n, _)| n == stick::SIGNATURE) {
        let sig = String::from_utf8(stick::read(&opts.device, stick::SIGNATURE)?).unwrap_or_default();
        Some(sign::verify(&bytes, &sig, trusted.as_deref())?)
    } else if opts.allow_unsigned {
        log::warn!("PROVISIONING AN UNSIGNED CONFIGURATION: this image allows it for development only");
        None
    } else {
        return Err(ProvisionError::Unsigned);
    };

    let config = check(&text, Path::new("zhuli.toml (on the stick)"))?;
    receipt.serial = Some(config.serial);
    let on_box = crate::validate::on_box(&config, Path::new(ZONEINFO));
    if !on_box.is_empty() {
        return Err(ProvisionError::Problems("zhuli.toml (on the stick)".into(), on_box));
    }
    let current = current_serial(&opts.root);
    if config.serial <= current {
        return Err(ProvisionError::OldSerial { new: config.serial, current });
    }
    let secrets = secrets_in(&text, Path::new("zhuli.toml (on the stick)"))?;
    // Its secrets must be removable from the stick, or nothing is imported.
    if !contents.writable {
        return Err(stick::StickError::ReadOnly(opts.device.clone()).into());
    }

    // Stage the new generation beside the current one.
    let generations = opts.root.join("generations");
    if !generations.exists() {
        std::fs::create_dir_all(&generations).map_err(apply)?;
        // The agent passes through to `current` (its generation is 0750 root:zhuli).
        set_mode(&generations, 0o755).map_err(apply)?;
    }
    let name = format!("{}-{:08x}", config.serial, rand::random::<u32>());
    let staged = generations.join(&name);
    let (starred, spans) = scrub::starred(&text, &secrets);
    let pending = scrub::Pending { volume_id: volume, serial: config.serial, starred, spans, started: utc_now() };
    // Durable before the switch that depends on them: the pinned key, the scrub's record. Any
    // failure up to the switch undoes them, so nothing is trusted or recorded for a stick that
    // was not imported.
    let pin = if trusted.is_none() { signer.as_deref() } else { None };
    let undo = |held: Option<scrub::Held>| {
        let _ = std::fs::remove_dir_all(&staged);
        if pin.is_some() {
            let _ = std::fs::remove_file(&pinned_path);
        }
        if let Some(h) = held {
            scrub::forget(&opts.root, h);
        }
    };
    let prepared = stage(opts, &staged, &text, &config, &secrets).and_then(|()| {
        if let Some(key) = pin {
            write_file(&pinned_path, format!("zhuli-org-key ed25519 {key}\n").as_bytes(), 0o644).map_err(apply)?;
            sync_dir(&opts.root).map_err(apply)?;
        }
        scrub::record(&opts.root, &pending, scrub::patterns(&text, &secrets), &text, opts.credentials)
    });
    let held = match prepared {
        Ok(h) => h,
        Err(e) => {
            undo(None);
            return Err(e);
        }
    };

    stopped_here("before-switch");
    // The switch: one rename of a symlink (the serial is in the generation, so it switches with it).
    let link_tmp = opts.root.join(format!(".current-{:08x}", rand::random::<u32>()));
    let switched = std::os::unix::fs::symlink(Path::new("generations").join(&name), &link_tmp)
        .and_then(|()| std::fs::rename(&link_tmp, opts.root.join("current")))
        .and_then(|()| sync_dir(&opts.root));
    if let Err(e) = switched {
        let _ = std::fs::remove_file(&link_tmp);
        undo(Some(held));
        return Err(apply(e));
    }
    if let Some(key) = pin {
        log::warn!(
            "provisioning: trusting the organisation key {} from now on (first signed import)",
            sign::short(key)
        );
    }
    // Switched: what follows is reported, never a reason to stop before the reload, the
    // restart and the scrub.
    let noted = write_file(&opts.root.join("serial"), format!("{}\n", config.serial).as_bytes(), 0o600)
        .and_then(|()| {
            let hash = sha256_hex(pending.starred.as_bytes());
            write_file(&opts.root.join(IMPORTED_STICK), format!("{hash}\n").as_bytes(), 0o600)
        })
        .and_then(|()| sync_dir(&opts.root));
    if let Err(e) = noted {
        receipt.errors.push(format!("the box could not note the import ({e}); the configuration is switched"));
    }
    prune_generations(&opts.root, &name);
    let _ = std::fs::remove_file(opts.root.join(REFUSED));
    recovery::add_to(receipt, opts, &config, trusted.as_deref().or(pin));

    let mut result = format!("imported serial {} ({} secrets moved into credentials)", config.serial, secrets.len());
    // Said on the stick until the scrub is done: what to do if it is pulled out before that.
    receipt.result = result.clone();
    receipt.scrub = Some(
        "being removed — if this line is still here, the stick was pulled out too early: plug it into the box again"
            .into(),
    );
    receipt.write_to(&opts.device);
    if opts.seal_journal {
        match seal_journal() {
            Ok(Some(key)) => {
                receipt.journal_key = Some(key);
                result.push_str("; journal sealing set up");
            }
            Ok(None) => {}
            Err(e) => receipt.errors.push(format!("journal sealing was not set up: {e}; the journal is kept unsealed")),
        }
    }
    if opts.restart {
        // The drop-in is read at a reload; the agent starts while the stick is being checked.
        match systemctl(&["daemon-reload"]).and_then(|()| systemctl(&["restart", "zhuli.service"])) {
            Ok(()) => {
                result.push_str("; the agent was restarted");
                receipt.restarted = true;
            }
            Err(e) => receipt.errors.push(e),
        }
    }
    let outcome = scrub::run(&opts.root, &opts.device, held, opts.credentials, scrub::pulled_at(device_size(opts)))
        .unwrap_or_else(|e| scrub::Outcome::Interrupted(e.to_string()));
    if outcome.complete() {
        result.push_str("; its secrets were removed from the stick");
    } else {
        log::warn!("provisioning: the secrets could not all be removed from the stick yet: {}", outcome.receipt_line());
        result.push_str("; its secrets are NOT all removed from the stick yet: plug it in again");
    }
    receipt.scrub = Some(outcome.receipt_line());
    receipt.result = result.clone();
    receipt.config_hash = Some(sha256_hex(pending.starred.as_bytes()));
    receipt.write_to(&opts.device);
    Ok(result)
}

/// A test build's switch: `ZHULI_TEST_STOP=<point>` ends the import at once at that point, as a
/// power cut would. Release builds have no such switch.
#[cfg(debug_assertions)]
fn stopped_here(point: &str) {
    if std::env::var("ZHULI_TEST_STOP").is_ok_and(|v| v == point) {
        std::process::abort();
    }
}

#[cfg(not(debug_assertions))]
fn stopped_here(_point: &str) {}

fn device_size(opts: &ImportOptions) -> u64 {
    use std::io::Seek;
    std::fs::File::open(&opts.device).and_then(|mut f| f.seek(std::io::SeekFrom::End(0))).unwrap_or(0)
}

fn systemctl(args: &[&str]) -> Result<(), String> {
    match std::process::Command::new("systemctl").args(args).status() {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("systemctl {} failed ({s}); restart the agent: systemctl restart zhuli", args.join(" "))),
        Err(e) => Err(format!("cannot run systemctl ({e}); restart the agent by hand")),
    }
}

/// Forward Secure Sealing for the persistent journal, once per box: `journalctl --setup-keys`
/// writes the sealing key under /var/log/journal/MACHINE-ID/fss and prints the verification key;
/// a rotation makes journald start sealing. `Ok(None)`: already set up (the key went out with an
/// earlier receipt).
fn seal_journal() -> Result<Option<String>, String> {
    let machine = std::fs::read_to_string("/etc/machine-id").map_err(|e| format!("no machine id ({e})"))?;
    let dir = Path::new("/var/log/journal").join(machine.trim());
    if dir.join("fss").exists() {
        return Ok(None);
    }
    if !dir.is_dir() {
        return Err(format!("{} does not exist (journald not persistent?)", dir.display()));
    }
    let out = std::process::Command::new("journalctl")
        .args(["--setup-keys", "--interval=15min"])
        .output()
        .map_err(|e| format!("cannot run journalctl ({e})"))?;
    if !out.status.success() {
        // Its last line says what failed ("Generating seed..." comes before).
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("journalctl failed")
            .trim()
            .to_owned());
    }
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if key.is_empty() || key.contains(char::is_whitespace) {
        return Err("journalctl printed no verification key".into());
    }
    let _ = std::process::Command::new("journalctl").arg("--rotate").status();
    Ok(Some(key))
}

/// Keep the current generation and the one before it; remove older ones.
fn prune_generations(root: &Path, current: &str) {
    let Ok(entries) = std::fs::read_dir(root.join("generations")) else { return };
    let mut names: Vec<(u64, String)> = entries
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.split('-').next().and_then(|s| s.parse().ok()).map(|s| (s, n))
        })
        .collect();
    names.sort();
    let keep: Vec<String> = names.iter().rev().take(2).map(|(_, n)| n.clone()).collect();
    for (_, n) in names {
        if n != current && !keep.contains(&n) {
            let _ = std::fs::remove_dir_all(root.join("generations").join(n));
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
}

/// The agent's user and group, where this system has them (a development machine may not).
pub(crate) struct Agent {
    pub uid: Option<nix::unistd::Uid>,
    pub gid: Option<nix::unistd::Gid>,
}

impl Agent {
    fn on_this_box() -> Result<Agent, ProvisionError> {
        let lookup = |e: nix::Error| ProvisionError::Apply(format!("cannot look up the agent's user and group ({e})"));
        Ok(Agent {
            uid: nix::unistd::User::from_name(AGENT_USER).map_err(lookup)?.map(|u| u.uid),
            gid: nix::unistd::Group::from_name(AGENT_USER).map_err(lookup)?.map(|g| g.gid),
        })
    }
}

/// Make `path` readable through the agent's group (where the box has it).
fn group_readable(path: &Path) {
    if let Ok(Some(group)) = nix::unistd::Group::from_name(AGENT_USER) {
        let _ = nix::unistd::chown(path, None, Some(group.gid));
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Write `path` whole or not at all: a synced temporary file renamed into place.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
    // The mode as asked, whatever the umask (the import unit runs with UMask=0077).
    f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Write the generation: the configuration with credential references, the credentials, the
/// unit's drop-in; make the writable folders that do not exist yet.
fn stage(
    opts: &ImportOptions,
    dir: &Path,
    text: &str,
    config: &Config,
    secrets: &[FoundSecret],
) -> Result<(), ProvisionError> {
    let apply = |e: std::io::Error| ProvisionError::Apply(e.to_string());
    std::fs::create_dir(dir).map_err(apply)?;
    set_mode(dir, 0o750).map_err(apply)?;
    let boxed = replace_secrets(text, secrets, |s| format!("{{ credential = \"{}\" }}", s.credential));
    write_file(&dir.join("zhuli.toml"), boxed.as_bytes(), 0o640).map_err(apply)?;
    write_file(&dir.join("serial"), format!("{}\n", config.serial).as_bytes(), 0o644).map_err(apply)?;
    // The box's time zone: /etc/localtime points at `current/localtime` (UTC while it is absent).
    if let Some(zone) = config.agent.time_zone.as_deref() {
        let target = Path::new(ZONEINFO).join(zone);
        // Checked by `validate::on_box` before staging; a zone removed since is still refused.
        if !target.is_file() {
            return Err(ProvisionError::Invalid(format!(
                "[agent] time_zone {zone:?} is not a time zone this box knows ({} is missing); use a name such as \"Asia/Shanghai\"",
                target.display()
            )));
        }
        std::os::unix::fs::symlink(&target, dir.join("localtime")).map_err(apply)?;
    }
    // The agent runs as the `zhuli` user and group (`User=`, `Group=`): it reads the
    // configuration through the group — the group named zhuli, not the user's primary group.
    let agent = Agent::on_this_box()?;
    if let Some(gid) = agent.gid {
        for p in [dir.to_path_buf(), dir.join("zhuli.toml")] {
            nix::unistd::chown(&p, None, Some(gid)).map_err(|e| ProvisionError::Apply(e.to_string()))?;
        }
    }
    // Every fixed credential the unit loads exists, empty when the configuration has no such
    // secret; a plugin's come with the drop-in that loads them.
    let mut values: Vec<(String, &str)> = CREDENTIALS
        .iter()
        .map(|name| {
            let value = secrets.iter().find(|s| s.credential == *name).map(|s| s.value.as_str()).unwrap_or("");
            (name.to_string(), value)
        })
        .collect();
    values.extend(secrets.iter().filter(|s| s.in_dropin()).map(|s| (s.credential.clone(), s.value.as_str())));
    for (name, value) in &values {
        match opts.credentials {
            Credentials::Plain => {
                log::warn!("provisioning: credential {name} stored UNENCRYPTED (development mode)");
                write_file(&dir.join(name), value.as_bytes(), 0o600).map_err(apply)?;
            }
            Credentials::Systemd => {
                let file = dir.join(format!("{name}.cred"));
                encrypt(name, value, &file)?;
                // What the agent will open at its start, opened now: a credential this box
                // cannot unseal is found before the switch, not at every start after it.
                if decrypt(name, &file).is_none_or(|d| d.as_slice() != value.as_bytes()) {
                    return Err(ProvisionError::Apply(format!(
                        "the sealed credential {name} does not unseal on this box (systemd-creds); the previous configuration keeps running — check the TPM and the host key, then insert the stick again"
                    )));
                }
            }
        }
    }
    let encrypted = opts.credentials == Credentials::Systemd;
    let writable = unit::prepare(config, &agent)?;
    let plugin_credentials: Vec<(String, PathBuf)> = values
        .iter()
        .skip(CREDENTIALS.len())
        .map(|(name, _)| (name.clone(), unit::credential_path(&opts.root, name, encrypted)))
        .collect();
    let dropin = unit::dropin(config.serial, &writable, &plugin_credentials, encrypted)?;
    write_file(&dir.join(unit::DROPIN), dropin.as_bytes(), 0o644).map_err(apply)?;
    sync_dir(dir).and_then(|()| sync_dir(dir.parent().unwrap_or(dir))).map_err(apply)
}

/// `systemd-creds encrypt` with the secret on standard input (never on a command line).
fn encrypt(name: &str, value: &str, out: &Path) -> Result<(), ProvisionError> {
    let mut child = std::process::Command::new("systemd-creds")
        .args(["encrypt", "--with-key=auto", &format!("--name={name}"), "-"])
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| ProvisionError::Apply(format!("cannot run systemd-creds ({e}); is systemd ≥ 250 installed?")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(value.as_bytes()).map_err(|e| ProvisionError::Apply(e.to_string()))?;
    }
    let output = child.wait_with_output().map_err(|e| ProvisionError::Apply(e.to_string()))?;
    if !output.status.success() {
        return Err(ProvisionError::Apply(format!(
            "systemd-creds could not seal {name}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    Ok(())
}

/// `systemd-creds decrypt` of a sealed file (root on the box).
fn decrypt(name: &str, file: &Path) -> Option<zeroize::Zeroizing<Vec<u8>>> {
    let out = std::process::Command::new("systemd-creds")
        .arg("decrypt")
        .arg(format!("--name={name}"))
        .arg(file)
        .arg("-")
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| zeroize::Zeroizing::new(out.stdout))
}

pub const TEMPLATE: &str = r#"# zhuli configuration, written to a USB stick by `zhuli provision write`.
# Every field is documented in docs/CONFIGURATION.md. Unknown fields are errors.

# Raise this for every new version of this file: the box refuses a serial that is not newer.
serial = 1

[dingtalk]
client_id = "dingxxxxxxxxxxxx"       # the app's Client ID (AppKey), developer console
client_secret = "paste-the-secret"    # the app's Client Secret; removed from the stick on import
robot_code = "dingxxxxxxxxxxxx"      # usually the Client ID

# [dingtalk.card]                    # answers stream into an AI card
# template_id = "xxxx.schema"

# [llm]                              # an OpenAI-compatible model; without it: commands only
# base_url = "https://api.deepseek.com/v1"
# model = "deepseek-chat"
# api_key = "sk-..."                 # removed from the stick on import
# daily_tokens = 2000000

# [[models]]                         # a model on the office's own machines: protected work
# name = "office"                    # (files, address book, approvals, calendars, personal
# where = "local"                    # data) goes only to such models, never to the cloud
# base_url = "https://gpu.office.lan/v1"
# model = "qwen2.5:14b"

# [privacy]                          # what counts as protected; see docs/CONFIGURATION.md
# local_chats = ["cidXXXX=="]        # every turn in these chats stays local
# open_folders = ["share/公开"]       # files here may go to the cloud

[agent]
time_zone = "Asia/Shanghai"          # the office's time zone (IANA name): times in chat and logs
# language = "en"                    # what the box says in chat: "zh-CN" (the default) or "en"

[assistant]
utc_offset_minutes = 480             # Asia/Shanghai, as minutes east of UTC

[access]
admins = ["manager001"]              # staff ids of the box's admins
direct_chats = "pairing"             # "org", "allowlist" or "pairing"
group_chats = "open"                 # "open" or "allowlist"
default_roles = ["member"]

[access.roles.member]
tools = ["files_list", "files_read", "files_search", "system"]

# [tools.files.roots]
# share = "/srv/share"

# [tools.github]                     # GitHub issues and pull requests of these repositories
# token = "github_pat_..."           # a fine-grained token; removed from the stick on import
# repos = ["acme/website"]

# [tools.drive]                      # the office's network drive over WebDAV
# url = "https://cloud.example.com/remote.php/dav/files/zhuli/"
# username = "zhuli"
# password = "app-password"         # removed from the stick on import
# share_links = "nextcloud"          # or "none"

# [tools.caldav]                     # calendars on a CalDAV server
# username = "zhuli"
# password = "app-password"         # removed from the stick on import
# default_calendar = "team"
# [tools.caldav.calendars]
# team = "https://cloud.example.com/remote.php/dav/calendars/zhuli/team/"

[health]
# admin_chat = "cidXXXX=="           # alerts to this group; without it to each admin

[update]
# source = "https://updates.example.com/zhuli/"   # the vendor's release folder; unset: from sticks only
# window = "Sun 03:00-05:00"         # when the box may install and restart by itself ("never": only /update install)
"#;

#[cfg(test)]
mod tests {
    use super::*;

    /// The template with its placeholders filled in, as an installer leaves it.
    fn filled() -> String {
        TEMPLATE
            .replace("dingxxxxxxxxxxxx", "dingq7rkzdd3ldvnvwdu")
            .replace("\"paste-the-secret\"", "\"Qx7-secret-from-console\"")
            .replace("\"manager001\"", "\"0151234\"")
    }

    #[test]
    fn the_untouched_template_is_refused_for_its_placeholders_and_filled_in_it_checks() {
        let e = check(TEMPLATE, Path::new("zhuli.toml")).expect_err("placeholders").to_string();
        assert!(e.starts_with("zhuli.toml cannot run on a box:"), "{e}");
        assert!(e.contains("[dingtalk] client_id") && e.contains("[dingtalk] client_secret"), "{e}");
        assert!(!e.contains("paste-the-secret"), "{e}");
        check(&filled(), Path::new("zhuli.toml")).expect("filled in, the template checks");
    }

    #[test]
    fn the_template_checks_and_secrets_become_credential_references() {
        let config = check(&filled(), Path::new("template")).expect("the template is valid");
        assert_eq!(config.serial, 1);
        let secrets = secrets_in(&filled(), Path::new("t")).expect("secrets");
        assert_eq!(secrets.len(), 1);
        let boxed = replace_secrets(&filled(), &secrets, |s| format!("{{ credential = \"{}\" }}", s.credential));
        assert!(!boxed.contains("Qx7-secret-from-console"));
        assert!(boxed.contains("client_secret = { credential = \"dingtalk-client-secret\" }"));
        assert!(boxed.contains("# removed from the stick on import"), "comments are kept");
        let (starred, _) = scrub::starred(&filled(), &secrets);
        assert!(
            !starred.contains("Qx7-secret-from-console")
                && starred.contains("client_secret = \"***********************\"")
        );
        assert_eq!(starred.len(), filled().len(), "the stick's file keeps its length");
    }

    #[test]
    fn the_unit_loads_exactly_the_credentials_an_import_writes() {
        let unit = include_str!("../../../systemd/zhuli.service");
        let mut loaded: Vec<&str> = unit
            .lines()
            .filter_map(|l| l.strip_prefix("LoadCredentialEncrypted="))
            .filter_map(|l| l.split_once(':'))
            .map(|(name, path)| {
                assert!(name == "store-key" || path.ends_with(&format!("/current/{name}.cred")), "{name}: {path}");
                name
            })
            .filter(|n| *n != "store-key")
            .collect();
        loaded.sort_unstable();
        let mut written = CREDENTIALS.to_vec();
        written.sort_unstable();
        assert_eq!(loaded, written);
    }

    #[test]
    fn the_import_unit_filters_system_calls_and_caps_its_capabilities() {
        let unit = include_str!("../../../systemd/zhuli-provision@.service");
        for line in [
            "SystemCallFilter=@system-service",
            "SystemCallArchitectures=native",
            "CapabilityBoundingSet=CAP_CHOWN CAP_FOWNER CAP_DAC_OVERRIDE CAP_DAC_READ_SEARCH",
            "NoNewPrivileges=yes",
        ] {
            assert!(unit.lines().any(|l| l == line), "{line} missing from zhuli-provision@.service");
        }
    }

    #[test]
    fn tool_secrets_become_credentials_too() {
        let text = filled()
            .replace("# [tools.github]", "[tools.github]")
            .replace("# token = \"github_pat_...\"", "token = \"github_pat_abc\"")
            .replace("# repos = [\"acme/website\"]", "repos = [\"acme/website\"]");
        check(&text, Path::new("x")).expect("valid with a github token");
        let secrets = secrets_in(&text, Path::new("t")).expect("secrets");
        let names: Vec<&str> = secrets.iter().map(|s| s.credential.as_str()).collect();
        assert_eq!(names, [CRED_DINGTALK, CRED_GITHUB]);
        let boxed = replace_secrets(&text, &secrets, |s| format!("{{ credential = \"{}\" }}", s.credential));
        assert!(boxed.contains("token = { credential = \"github-token\" }") && !boxed.contains("github_pat_abc"));
        let reference = text.replace("\"github_pat_abc\"", "{ credential = \"x\" }");
        let e = check(&reference, Path::new("x")).expect_err("reference").to_string();
        assert!(e.contains("[tools.github] token"), "{e}");
    }

    #[test]
    fn plugin_environment_values_become_credentials_and_leave_the_stick() {
        let text = format!(
            "{}\n[tools.mcp.search]\ncommand = \"/usr/bin/node\"\nenv = {{ API_KEY = \"sk-search-4Lq9zP\", LOG = \"info\" }}\n",
            filled()
        );
        check(&text, Path::new("x")).expect("valid with plugin env");
        let secrets = secrets_in(&text, Path::new("t")).expect("secrets");
        let names: Vec<&str> = secrets.iter().map(|s| s.credential.as_str()).collect();
        assert_eq!(names, [CRED_DINGTALK, "mcp-search-API_KEY", "mcp-search-LOG"]);
        let boxed = replace_secrets(&text, &secrets, |s| format!("{{ credential = \"{}\" }}", s.credential));
        assert!(boxed.contains("API_KEY = { credential = \"mcp-search-API_KEY\" }") && !boxed.contains("sk-search"));
        let (starred, _) = scrub::starred(&text, &secrets);
        assert!(!starred.contains("sk-search-4Lq9zP") && starred.contains("LOG = \"****\""), "{starred}");
        assert_eq!(
            scrub::patterns(&text, &secrets),
            ["Qx7-secret-from-console", "sk-search-4Lq9zP"],
            "short values are not secrets"
        );
        let bad = text.replace("LOG =", "2LOG =");
        assert!(check(&bad, Path::new("x")).expect_err("bad name").to_string().contains("env.2LOG"));
    }

    #[test]
    fn a_stick_whose_secrets_were_removed_or_are_too_short_is_refused_with_the_reason() {
        let starred = filled().replace("\"Qx7-secret-from-console\"", "\"****************\"");
        let e = check(&starred, Path::new("x")).expect_err("starred").to_string();
        assert!(e.contains("[dingtalk] client_secret") && e.contains("imported"), "{e}");
        let short = filled().replace("\"Qx7-secret-from-console\"", "\"abc\"");
        let e = check(&short, Path::new("x")).expect_err("short").to_string();
        assert!(e.contains("shorter than 8"), "{e}");
    }

    #[test]
    fn a_refusal_noted_by_an_earlier_version_still_reads() {
        let dir = std::env::temp_dir().join(format!("zhuli-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let old = r#"{"time": "2026-12-01 10:00 UTC", "serial": 4, "config_sha256": null, "reasons": ["x"]}"#;
        std::fs::write(dir.join(REFUSED), old).expect("refused.json");
        let r = Refusal::last(&dir).expect("read");
        assert_eq!((r.serial, r.reasons.len(), r.problems.len()), (Some(4), 1, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refusal_is_said_in_the_boxs_language() {
        use crate::i18n::{Language, tests::in_language};
        let refusals = [
            ProvisionError::OldSerial { new: 3, current: 5 },
            ProvisionError::Unsigned,
            ProvisionError::Signature(sign::SignError::Mismatch),
            ProvisionError::Signature(sign::SignError::Untrusted {
                found: "ab12…".into(), trusted: "cd34…".into()
            }),
            ProvisionError::TwoConfigs("a.toml, b.toml".into()),
            ProvisionError::NotUtf8,
            ProvisionError::Stick(stick::StickError::ReadOnly("/dev/sdb1".into())),
            ProvisionError::Apply("disk full".into()),
        ];
        for e in &refusals {
            let problems = e.problems();
            assert_eq!(problems.len(), 1, "{e}");
            let zh = in_language(Language::ZhCn, || problems[0].text());
            assert!(zh.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)) && !zh.contains("%{"), "{e}: {zh}");
        }
        let zh = in_language(Language::ZhCn, || refusals[0].problems()[0].text());
        assert!(zh.contains('3') && zh.contains('5') && zh.starts_with("`serial`："), "{zh}");
        let zh = in_language(Language::ZhCn, || refusals[3].problems()[0].text());
        assert!(zh.contains("ab12…") && zh.contains("cd34…"), "{zh}");
        // A configuration's problems are its own, each said from the locale.
        let e = check(TEMPLATE, Path::new("zhuli.toml")).expect_err("the template's placeholders");
        assert!(e.problems().iter().all(|p| p.said.is_some()), "{:?}", e.problems());
    }

    #[test]
    fn provisioning_needs_a_serial_and_written_out_secrets() {
        let no_serial = filled().replace("serial = 1", "");
        assert!(check(&no_serial, Path::new("x")).expect_err("no serial").to_string().contains("serial"));
        let reference = filled().replace("\"Qx7-secret-from-console\"", "{ credential = \"x\" }");
        assert!(check(&reference, Path::new("x")).expect_err("reference").to_string().contains("written out"));
        let unknown = filled().replace("[assistant]", "[assistant]\ncolour = 1");
        let e = check(&unknown, Path::new("x")).expect_err("unknown field").to_string();
        assert!(e.contains("line") && e.contains("colour"), "{e}");
    }

    #[test]
    fn a_misplaced_secret_is_never_quoted_in_the_error() {
        let text = filled().replace("[assistant]", "[tools]\ngithub = \"ghp_SECRETVALUE1234567890\"\n\n[assistant]");
        let e = check(&text, Path::new("office.toml")).expect_err("a table, not text").to_string();
        assert!(!e.contains("ghp_SECRET"), "{e}");
        assert!(e.contains("office.toml, line") && e.contains("[tools] github"), "{e}");
        assert!(!e.contains("struct") && !e.contains("invalid type"), "{e}");
        let number = filled().replace("\"Qx7-secret-from-console\"", "12345678");
        let e = check(&number, Path::new("office.toml")).expect_err("a number").to_string();
        assert!(e.contains("[dingtalk] client_secret: write the secret as text in quotes"), "{e}");
    }

    #[test]
    fn the_current_generations_secrets_are_known_for_redaction() {
        let dir = std::env::temp_dir().join(format!("zhuli-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join(CRED_DINGTALK), "Qx7-secret-from-console").expect("plain");
        std::fs::write(dir.join("mcp-search-API_KEY"), "sk-search-4Lq9zP").expect("plain");
        std::fs::write(dir.join(CRED_LLM), "").expect("empty");
        std::fs::write(dir.join("zhuli.toml"), "serial = 1").expect("config");
        let found = current_secrets(&dir);
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(found, ["Qx7-secret-from-console", "sk-search-4Lq9zP"]);
    }
}
