//! The `zhuli` binary: argument parsing and wiring only.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use zhuli::{
    app,
    config::Config,
    health, logging,
    store::{Retention, Store, backup, key::StoreKey},
};

#[derive(Parser)]
#[command(name = "zhuli", version, about = "An office assistant box that answers in DingTalk")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent with a configuration file.
    Run {
        /// The configuration file (on the box: /var/lib/zhuli-provisioning/current/zhuli.toml).
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Show the running agent's status (over its Unix socket).
    Status {
        /// The agent's configuration, when it names its own status socket.
        #[arg(long, value_name = "PATH", conflicts_with = "socket")]
        config: Option<PathBuf>,
        /// The status socket itself.
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
        /// Print the JSON snapshot instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check the channel step by step (network, credentials, Stream API, recent errors, version).
    Doctor {
        /// The agent's configuration file.
        #[arg(long, value_name = "PATH", default_value = "/var/lib/zhuli-provisioning/current/zhuli.toml")]
        config: PathBuf,
        /// How long to wait for the gateway's first frame.
        #[arg(long, default_value_t = 30_000)]
        wait_ms: u64,
    },
    /// Prepare a configuration stick (installer's laptop) or import one (on the box).
    Provision {
        #[command(subcommand)]
        command: ProvisionCommand,
    },
    /// Release bundles (updates of the box): make the vendor's key, sign a bundle, check one.
    Update {
        #[command(subcommand)]
        command: UpdateCommand,
    },
    /// Manage the encrypted store.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// Snapshot the store (still encrypted) into a new directory under DIR, or verify a snapshot.
    Backup {
        /// The agent's configuration file (it names the store and its key).
        #[arg(long, value_name = "PATH", required_unless_present_any = ["recovery", "key_file"])]
        config: Option<PathBuf>,
        /// Directory to create the snapshot in.
        #[arg(long, value_name = "DIR", conflicts_with = "verify", required_unless_present = "verify")]
        to: Option<PathBuf>,
        /// Snapshot directory to check (checksums, key, every sealed value).
        #[arg(long, value_name = "SNAPSHOT")]
        verify: Option<PathBuf>,
        /// Check the snapshot with the store key in this recovery copy (a box's provisioning
        /// receipt, or a file holding its `zhuli-store-key-recovery` line) instead of a
        /// configuration's key; needs --org-key.
        #[arg(long, value_name = "FILE", requires_all = ["org_key", "verify"], conflicts_with_all = ["config", "key_file"])]
        recovery: Option<PathBuf>,
        /// The organisation's private key (org.key) that opens the recovery copy.
        #[arg(long, value_name = "PATH", requires = "recovery")]
        org_key: Option<PathBuf>,
        /// Check the snapshot with the store key in this file (from `zhuli store recover-key`)
        /// instead of a configuration's key.
        #[arg(long, value_name = "PATH", requires = "verify", conflicts_with = "config")]
        key_file: Option<PathBuf>,
    },
    /// Replace the store with a verified snapshot (the agent must be stopped).
    Restore {
        /// The agent's configuration file (it names the store and its key).
        #[arg(long, value_name = "PATH", required_unless_present = "store")]
        config: Option<PathBuf>,
        /// The snapshot directory, as `zhuli backup` made it.
        #[arg(long, value_name = "SNAPSHOT")]
        from: PathBuf,
        /// Restore into this store file instead of a configuration's (on a laptop); the key comes
        /// from --recovery or --key-file.
        #[arg(long, value_name = "FILE", conflicts_with = "config")]
        store: Option<PathBuf>,
        /// Open the snapshot with the store key in this recovery copy (a box's provisioning
        /// receipt, or a file holding its `zhuli-store-key-recovery` line); needs --org-key.
        /// With --config, the restored store is then re-sealed under the configuration's key.
        #[arg(long, value_name = "FILE", requires = "org_key", conflicts_with = "key_file")]
        recovery: Option<PathBuf>,
        /// The organisation's private key (org.key) that opens the recovery copy.
        #[arg(long, value_name = "PATH", requires = "recovery")]
        org_key: Option<PathBuf>,
        /// Open the snapshot with the store key in this file (from `zhuli store recover-key`).
        /// With --config, the restored store is then re-sealed under the configuration's key.
        #[arg(long, value_name = "PATH")]
        key_file: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum UpdateCommand {
    /// Make the vendor's signing key pair: vendor.key (keep it off every box) and vendor.pub
    /// (baked into the image, which installs only bundles it signed).
    Keygen {
        /// The folder to write vendor.key and vendor.pub into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write SHA256SUMS over a bundle folder's files and sign it (SHA256SUMS.sig).
    Sign {
        /// The bundle folder: zhuli-release.toml and the files it names.
        dir: PathBuf,
        /// The vendor's private key file.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
    },
    /// Check a bundle as a box would before installing it: signature, sha256 of every file,
    /// product, architecture, a newer version, sizes.
    Check {
        /// The bundle folder.
        dir: PathBuf,
        /// The vendor's public key file (on the box: /usr/share/zhuli/vendor.pub).
        #[arg(long, value_name = "FILE", default_value = "/usr/share/zhuli/vendor.pub")]
        vendor_key: PathBuf,
        /// The release the box runs (its version must be newer).
        #[arg(long, value_name = "VERSION")]
        running: String,
        /// Bytes the root slot holds.
        #[arg(long, value_name = "BYTES", default_value_t = u64::MAX)]
        root_slot: u64,
        /// Bytes the verity slot holds.
        #[arg(long, value_name = "BYTES", default_value_t = u64::MAX)]
        verity_slot: u64,
        /// Free bytes on the ESP.
        #[arg(long, value_name = "BYTES", default_value_t = u64::MAX)]
        esp_free: u64,
    },
    /// On the box (as root): check a release bundle and install it into the inactive slot; the
    /// next boot tries it (`--tries` times) and keeps it only if the agent is healthy.
    Install {
        /// The bundle folder.
        dir: PathBuf,
        /// Tries the new release gets before the boot loader goes back to the running one.
        #[arg(long, default_value_t = 3)]
        tries: u32,
        /// Reboot into the new release once it is installed.
        #[arg(long)]
        reboot: bool,
    },
    /// On the box (as root, from zhuli-update.service): look at the configured release folder,
    /// fetch a newer release, and install it when inside the maintenance window (or --now, or
    /// when the admin chat asked with /update install); then reboot into it.
    Pull {
        /// The agent's configuration (`[update]`).
        #[arg(long, value_name = "FILE", default_value = "/var/lib/zhuli-provisioning/current/zhuli.toml")]
        config: PathBuf,
        /// Install a fetched release now, outside the window too.
        #[arg(long)]
        now: bool,
        /// Where the agent leaves the admin chat's request (`install`, `rollback`, `check`).
        #[arg(long, value_name = "FILE", default_value = "/var/lib/zhuli/update/request")]
        request: PathBuf,
        /// The agent's note of its last snapshot of the store for an update: the window
        /// installs only after one.
        #[arg(long, value_name = "FILE", default_value = "/var/lib/zhuli/update/snapshot")]
        snapshot_note: PathBuf,
        /// Where a release from the provisioning stick waits, with its request.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/zhuli-provisioning/update")]
        stick_staged: PathBuf,
        /// Where releases are fetched to.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/zhuli-update/download")]
        downloads: PathBuf,
    },
    /// On the box (as root): go back to the release before; it boots once on trial and is kept
    /// if the agent is healthy on it.
    Rollback {
        /// Reboot into it now.
        #[arg(long)]
        reboot: bool,
    },
    /// On the box (as root): write which releases are on the box and in what state
    /// (/var/lib/zhuli-update/releases.json, read by the agent) and print it.
    Survey,
    /// On the box, after booting a release on trial (zhuli-boot-check.service): wait until the
    /// agent is READY and healthy without a break for --hold; then the release is kept. If it
    /// is not within --within, mark the release bad and reboot into the previous one.
    BootCheck {
        /// How long the agent must stay healthy in one go (default: the configuration's
        /// `[update] healthy_for_s`, 120).
        #[arg(long, value_name = "SECONDS")]
        hold: Option<u64>,
        /// How long it has to get there, from the start of the check (default: `[update]
        /// healthy_within_s`, 600).
        #[arg(long, value_name = "SECONDS")]
        within: Option<u64>,
        /// The agent's configuration: a box without one has nothing to wait for.
        #[arg(long, value_name = "FILE", default_value = "/var/lib/zhuli-provisioning/current/zhuli.toml")]
        config: PathBuf,
        /// The agent's status socket.
        #[arg(long, value_name = "FILE", default_value = "/run/zhuli/status.sock")]
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProvisionCommand {
    /// Make the organisation's signing key pair: DIR/org.key (keep it safe, off the box) and
    /// DIR/org.pub.
    Keygen {
        /// The folder to write org.key and org.pub into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Write a commented configuration template.
    Init {
        /// The new file (it must not exist yet).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Validate a configuration as the box will.
    Check {
        /// The configuration file to check.
        file: PathBuf,
    },
    /// Sign a configuration: writes FILE.sig.
    Sign {
        /// The organisation's private key (org.key from `provision keygen`).
        #[arg(long, value_name = "PATH")]
        key: PathBuf,
        /// The configuration file to sign.
        file: PathBuf,
    },
    /// Check FILE.sig against the organisation's public key.
    Verify {
        /// The organisation's public key (org.pub).
        #[arg(long, value_name = "PATH")]
        org_key: PathBuf,
        /// The configuration file; its signature is FILE.sig beside it.
        file: PathBuf,
    },
    /// Write a checked, signed configuration onto a stick (a block device) or a new image file.
    Write {
        /// The checked configuration file; its signature FILE.sig is written beside it.
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
        /// Create this image file (no root or mounting needed).
        #[arg(long, value_name = "PATH", conflicts_with = "device", required_unless_present = "device")]
        image: Option<PathBuf>,
        /// Size of a new image.
        #[arg(long, default_value_t = 8)]
        size_mb: u64,
        /// A stick's block device, e.g. /dev/sdb1; it must already be FAT labelled ZHULI-CFG unless --format.
        #[arg(long, value_name = "PATH")]
        device: Option<PathBuf>,
        /// Format the device as ZHULI-CFG first (erases it).
        #[arg(long, requires = "device")]
        format: bool,
        /// Write without a signature (only a development image accepts it).
        #[arg(long)]
        unsigned: bool,
        /// Write it even though some values are still the template's examples (a test stick).
        #[arg(long)]
        force: bool,
        /// The organisation's public key (org.pub): refuse a file signed with another key, which
        /// the box would refuse.
        #[arg(long, value_name = "PATH", conflicts_with = "unsigned")]
        org_key: Option<PathBuf>,
        /// A signed release bundle folder (image/release's bundle/) to put in the stick's update/
        /// folder: the box installs it at the stick's insertion. A new image grows to hold it.
        #[arg(long, value_name = "DIR")]
        update: Option<PathBuf>,
    },
    /// Forget the imported configuration and the pinned organisation key (trust on first use
    /// starts again with the next stick).
    FactoryReset {
        /// Where imported configurations live.
        #[arg(long, value_name = "DIR", default_value = zhuli::provision::DEFAULT_ROOT)]
        root: PathBuf,
        /// Confirm: this cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Import the configuration from a ZHULI-CFG stick or image (on the box, run by a unit).
    Import {
        /// The stick's block device (or an image file).
        #[arg(long, value_name = "PATH")]
        device: PathBuf,
        /// Where imported configurations live.
        #[arg(long, value_name = "DIR", default_value = zhuli::provision::DEFAULT_ROOT)]
        root: PathBuf,
        /// The organisation key baked into the image.
        #[arg(long, value_name = "PATH", default_value = zhuli::provision::BAKED_KEY)]
        org_key: PathBuf,
        /// Accept an unsigned configuration (development images only).
        #[arg(long)]
        allow_unsigned: bool,
        /// Keep secrets as plain root-only files instead of systemd credentials (development only).
        #[arg(long)]
        plain_credentials: bool,
        /// Do not reload systemd's units nor restart the agent afterwards.
        #[arg(long)]
        no_restart: bool,
        /// Set up journal sealing on the first import and put its verification key on the
        /// receipt (the box's import unit passes it).
        #[arg(long)]
        seal_journal: bool,
        /// Do not write the box's diagnostics report onto the stick.
        #[arg(long)]
        no_diagnostics: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Write a new random store key to PATH (for development; the box uses a systemd credential).
    NewKey {
        /// The file to create (it must not exist yet).
        path: PathBuf,
    },
    /// Re-seal every value of the store under the key in NEW_KEY, in one transaction.
    Rekey {
        /// The agent's configuration file (it names the store and its key).
        #[arg(long, value_name = "PATH")]
        config: PathBuf,
        /// The file holding the new key (from `zhuli store new-key`).
        #[arg(long, value_name = "NEW_KEY")]
        new_key: PathBuf,
    },
    /// Open a box's store key recovery copy with the organisation's private key and write the
    /// store key to a new file: it opens that box's backups on a laptop or a new box.
    RecoverKey {
        /// The recovery copy: the box's provisioning receipt, or a file holding its
        /// `zhuli-store-key-recovery` line.
        #[arg(long, value_name = "FILE")]
        recovery: PathBuf,
        /// The organisation's private key (org.key).
        #[arg(long, value_name = "PATH")]
        org_key: PathBuf,
        /// The key file to create (readable by its owner only; it must not exist yet).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
    },
    /// Print the store schema this release writes and the oldest schema that still reads it, as
    /// os-release lines (the image build puts them into each kernel image, so an update can
    /// check that the release before runs on the store the new one leaves).
    Schema,
}

/// The store file and its key, as the agent would find them.
fn store_of(config: &std::path::Path) -> anyhow::Result<(PathBuf, StoreKey)> {
    let config = Config::load(config)?;
    let key = StoreKey::load(config.store.key_file.as_deref())?;
    Ok((zhuli::store::file_in(&config.agent.state_dir), key))
}

/// A store key given instead of a configuration's: opened from a recovery copy with org.key,
/// or read from a key file.
fn given_key(
    recovery: Option<&std::path::Path>,
    org_key: Option<&std::path::Path>,
    key_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<StoreKey>> {
    match (recovery, org_key, key_file) {
        (Some(recovery), Some(org_key), _) => {
            let r = zhuli::provision::recovery::recover(recovery, org_key)?;
            println!("the recovery copy opened: the store key of box {}", r.box_id);
            Ok(Some(r.key))
        }
        (_, _, Some(file)) => Ok(Some(StoreKey::read(file)?)),
        _ => Ok(None),
    }
}

/// `[agent] extra_ca_pem`: trusted for every connection from here on.
fn trust_configured_roots(config: &Config) -> anyhow::Result<()> {
    if let Some(pem) = &config.agent.extra_ca_pem {
        let n =
            zhuli::dingtalk::http::trust_extra_roots(pem).map_err(|e| anyhow::anyhow!("[agent] extra_ca_pem: {e}"))?;
        log::info!(
            "trusting {n} extra certificate authorit{} from [agent] extra_ca_pem",
            if n == 1 { "y" } else { "ies" }
        );
    }
    Ok(())
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // Blocking work (store, files) in at most this many threads: the agent's share of the
        // unit's TasksMax stays its own, whatever plugins use of theirs.
        .max_blocking_threads(64)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// An error a person can cause is said in one paragraph: each cause once, never a backtrace
/// (whatever `RUST_BACKTRACE` says; a panic still prints its own).
fn main() -> std::process::ExitCode {
    let result = run_command(Cli::parse());
    // The journal's thread sends what is queued before the process ends.
    log::logger().flush();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", said_once(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes, each said once: a cause whose text the message already holds
/// is left out.
fn said_once(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run { config } => {
            logging::init(log::LevelFilter::Info);
            let config = Config::load(&config)?;
            let found = zhuli::validate::config(&config);
            if !found.errors.is_empty() {
                anyhow::bail!("{} cannot run:\n{}", config.path.display(), zhuli::validate::lines(&found.errors));
            }
            for p in &found.examples {
                log::warn!("{}: {p}", config.path.display());
            }
            trust_configured_roots(&config)?;
            runtime()?.block_on(async {
                let cancel = CancellationToken::new();
                tokio::spawn(app::until_signal(cancel.clone()));
                app::run(config, cancel).await
            })?;
        }
        Command::Store { command: StoreCommand::Schema } => {
            println!("ZHULI_STORE_SCHEMA={}", zhuli::store::SCHEMA_VERSION);
            println!("ZHULI_STORE_OLDEST_READER={}", zhuli::store::OLDEST_READER);
        }
        Command::Store { command: StoreCommand::NewKey { path } } => {
            StoreKey::generate().write_new(&path)?;
            println!("wrote a new store key to {}", path.display());
        }
        Command::Store { command: StoreCommand::RecoverKey { recovery, org_key, out } } => {
            let r = zhuli::provision::recovery::recover(&recovery, &org_key)?;
            r.key.write_new(&out)?;
            println!(
                "wrote the store key of box {} (opened with the organisation key {}…) to {}; it opens that box's backups: zhuli backup --verify SNAPSHOT --key-file {0}",
                r.box_id,
                r.org_key,
                out.display()
            );
        }
        Command::Store { command: StoreCommand::Rekey { config, new_key } } => {
            let (file, key) = store_of(&config)?;
            let new = StoreKey::read(&new_key)?;
            let store = Store::open(&file, &key, Retention::default())?;
            // The undo copies first: a run cut short is run again with the same keys (copies
            // already under the new key are skipped); the store then follows in one transaction.
            let state_dir = file.parent().unwrap_or(std::path::Path::new("."));
            let (copies, unopened) = zhuli::tools::files::reseal_undo_copies(state_dir, &key, &new)?;
            println!("re-sealed {copies} undo copies of the files tools under the new key");
            if unopened > 0 {
                println!("{unopened} undo copies did not open under the old key and were left as they are");
            }
            let r = store.rekey(&new)?;
            println!(
                "re-sealed {} values of {} under the key in {}, with a new index secret: {} processed msgIds and {} conversations re-hashed.",
                r.resealed,
                file.display(),
                new_key.display(),
                r.processed_rehashed,
                r.conversations_rehashed
            );
            if r.processed_dropped > 0 || r.history_dropped > 0 {
                println!(
                    "dropped what was written before the schema 4 upgrade and carries no id to re-hash: {} processed msgIds (they were due to be forgotten within processed_keep_hours) and {} history turns of conversations nobody wrote to since.",
                    r.processed_dropped, r.history_dropped
                );
            }
            if r.cache_emptied > 0 {
                println!("emptied {} cached look-ups; they refill by themselves.", r.cache_emptied);
            }
            println!(
                "Install that key now (the store-key credential, or [store] key_file); the old key no longer opens the store."
            );
        }
        Command::Backup { config, to, verify, recovery, org_key, key_file } => {
            let (file, key) = match (given_key(recovery.as_deref(), org_key.as_deref(), key_file.as_deref())?, config) {
                (Some(key), _) => (None, key),
                (None, Some(config)) => store_of(&config).map(|(file, key)| (Some(file), key))?,
                (None, None) => anyhow::bail!("give --config, or the key: --recovery with --org-key, or --key-file"),
            };
            if let Some(snapshot) = verify {
                match backup::verify(&snapshot, &key)? {
                    backup::Verified::Bound(m) => println!(
                        "snapshot {} is good: backup {} of store {}, taken at {} (ms since 1970), {} bytes, sha256 {}, {} values authenticated, schema {}",
                        snapshot.display(),
                        m.seq,
                        m.store_id,
                        m.created_at_ms,
                        m.bytes,
                        m.sha256,
                        m.values,
                        m.schema_version
                    ),
                    backup::Verified::Legacy { bytes, sha256, values, schema_version } => println!(
                        "snapshot {} is in the old format: its file matches its checksum ({bytes} bytes, sha256 {sha256}) and {values} values authenticate (schema {schema_version}), but its manifest is not authenticated and binds it to no store or sequence, so `zhuli restore` refuses it; take a new backup",
                        snapshot.display()
                    ),
                }
            } else if let Some(to) = to {
                let file = file.context("--to takes the store a configuration names: give --config")?;
                let (dir, m) = backup::backup(&file, &key, &to)?;
                println!(
                    "snapshot {} of store {} written to {} ({} bytes, {} values, sha256 {})",
                    m.seq,
                    m.store_id,
                    dir.display(),
                    m.bytes,
                    m.values,
                    m.sha256
                );
            }
        }
        Command::Restore { config, from, store, recovery, org_key, key_file } => {
            let given = given_key(recovery.as_deref(), org_key.as_deref(), key_file.as_deref())?;
            // With a given key and a configuration: the configuration's key is the one the agent
            // opens the store with afterwards.
            let (file, key, own) = match (config, store, given) {
                (Some(config), _, None) => store_of(&config).map(|(file, key)| (file, key, None))?,
                (Some(config), _, Some(given)) => store_of(&config).map(|(file, own)| (file, given, Some(own)))?,
                (None, Some(store), Some(given)) => (store, given, None),
                (None, _, None) => anyhow::bail!(
                    "--store restores without a configuration: give the snapshot's key with --recovery and --org-key, or --key-file"
                ),
                (None, None, Some(_)) => anyhow::bail!("give --config or --store: where to restore to"),
            };
            let (m, kept) = backup::restore(&from, &file, &key)?;
            println!(
                "restored {} from {} (backup {} of store {}, taken at {} ms since 1970)",
                file.display(),
                from.display(),
                m.seq,
                m.store_id,
                m.created_at_ms
            );
            if let Some(kept) = kept {
                println!("the replaced store is kept at {}", kept.display());
            }
            if let Some(own) = own.filter(|own| own.bytes() != key.bytes()) {
                let r = Store::open(&file, &key, Retention::default())?.rekey(&own)?;
                println!(
                    "re-sealed its {} values under the configuration's store key, the one the agent opens it with",
                    r.resealed
                );
                if r.processed_dropped > 0 || r.history_dropped > 0 {
                    println!(
                        "dropped what was written before the schema 4 upgrade: {} processed msgIds and {} history turns",
                        r.processed_dropped, r.history_dropped
                    );
                }
            }
        }
        Command::Provision { command } => {
            logging::init(log::LevelFilter::Info);
            provision(command)?;
        }
        Command::Update { command } => update(command)?,
        Command::Status { config, socket, json } => {
            let socket = match (socket, config) {
                (Some(s), _) => s,
                (None, Some(config)) => {
                    let config = Config::load(&config)?;
                    config.health.socket_path(&config.agent.state_dir)
                }
                (None, None) => zhuli::health::HealthSettings::default()
                    .socket_path(&zhuli::config::AgentSettings::default().state_dir),
            };
            let snapshot = health::status::fetch(&socket)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&snapshot)?);
            } else {
                print!("{}", health::status::table(&snapshot));
            }
        }
        Command::Doctor { config, wait_ms } => {
            logging::init(log::LevelFilter::Error);
            let config = Config::load(&config)?;
            trust_configured_roots(&config)?;
            let socket = config.health.socket_path(&config.agent.state_dir);
            let steps =
                runtime()?.block_on(health::doctor::run(&config, &socket, std::time::Duration::from_millis(wait_ms)));
            print!("{}", health::doctor::report(&steps));
            if steps.iter().any(|s| s.verdict == health::doctor::Verdict::Fail) {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// Create `path` with `text`, refusing to overwrite.
fn create_new(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it must not exist yet)", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

fn update(command: UpdateCommand) -> anyhow::Result<()> {
    use zhuli::{
        provision::sign::{self, Role},
        update,
    };
    match command {
        UpdateCommand::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let (private, public) = sign::keygen_for(Role::Vendor);
            create_new(&out.join("vendor.key"), &private, 0o600)?;
            create_new(&out.join("vendor.pub"), &public, 0o644)?;
            println!(
                "wrote {0}/vendor.key (secret: keep it off every box and back it up) and {0}/vendor.pub",
                out.display()
            );
        }
        UpdateCommand::Sign { dir, key } => {
            update::seal_bundle(&dir, &read_text(&key)?)?;
            println!("wrote {0}/{1} and {0}/{2}", dir.display(), update::SUMS, update::SIGNATURE);
        }
        UpdateCommand::Check { dir, vendor_key, running, root_slot, verity_slot, esp_free } => {
            let key = sign::public_key_for(Role::Vendor, &read_text(&vendor_key)?, &vendor_key.display().to_string())?;
            let running: update::Version = running.parse().map_err(anyhow::Error::msg)?;
            let room = update::Room { root_slot, verity_slot, esp_free };
            let checked = update::check(&dir, &key, &running, room)?;
            println!(
                "{}: release {} of {}, signed by {}; it may replace {running}",
                dir.display(),
                checked.manifest.version,
                checked.manifest.product,
                sign::short(&checked.signer)
            );
        }
        UpdateCommand::BootCheck { hold, within, config, socket } => {
            update_cli::boot_check(hold, within, &config, &socket)?
        }
        UpdateCommand::Install { dir, tries, reboot } => update_cli::install(&dir, tries, reboot)?,
        UpdateCommand::Pull { config, now, request, snapshot_note, stick_staged, downloads } => {
            update_cli::pull(&config, now, &request, &snapshot_note, &stick_staged, &downloads)?
        }
        UpdateCommand::Rollback { reboot } => update_cli::rollback(reboot)?,
        UpdateCommand::Survey => update_cli::survey()?,
    }
    Ok(())
}

fn provision(command: ProvisionCommand) -> anyhow::Result<()> {
    use zhuli::provision::{self as p, sign, stick};
    match command {
        ProvisionCommand::Keygen { out } => {
            std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
            let (private, public) = sign::keygen();
            create_new(&out.join("org.key"), &private, 0o600)?;
            create_new(&out.join("org.pub"), &public, 0o644)?;
            println!("wrote {0}/org.key (secret: keep it off the box and back it up) and {0}/org.pub", out.display());
        }
        ProvisionCommand::Init { out } => {
            create_new(&out, p::TEMPLATE, 0o600)?;
            println!("wrote {}; fill it in, then `zhuli provision check` it", out.display());
        }
        ProvisionCommand::Check { file } => {
            let config = p::check(&read_text(&file)?, &file)?;
            let examples = zhuli::validate::config(&config).examples;
            if examples.is_empty() {
                println!("{}: valid, serial {}", file.display(), config.serial);
            } else {
                println!(
                    "{}: valid, serial {}, but these are still the template's examples (`provision write` refuses them without --force):\n{}",
                    file.display(),
                    config.serial,
                    zhuli::validate::lines(&examples)
                );
            }
        }
        ProvisionCommand::Sign { key, file } => {
            let data = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let text =
                String::from_utf8(data.clone()).map_err(|_| anyhow::anyhow!("{} is not UTF-8", file.display()))?;
            p::check(&text, &file)?;
            let sig = sign::sign(&data, &read_text(&key)?, &key.display().to_string())?;
            let out = PathBuf::from(format!("{}.sig", file.display()));
            std::fs::write(&out, sig).with_context(|| format!("cannot write {}", out.display()))?;
            println!("wrote {}", out.display());
        }
        ProvisionCommand::Verify { org_key, file } => {
            let data = std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let sig_path = PathBuf::from(format!("{}.sig", file.display()));
            let trusted = sign::public_key(&read_text(&org_key)?, &org_key.display().to_string())?;
            sign::verify(&data, &read_text(&sig_path)?, Some(&trusted))?;
            println!("{}: signed by the organisation key {}", file.display(), sign::short(&trusted));
        }
        ProvisionCommand::Write { config, image, size_mb, device, format, unsigned, force, org_key, update } => {
            let trusted = match &org_key {
                Some(k) => Some(sign::public_key(&read_text(k)?, &k.display().to_string())?),
                None => None,
            };
            let data = std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?;
            let text =
                String::from_utf8(data.clone()).map_err(|_| anyhow::anyhow!("{} is not UTF-8", config.display()))?;
            let parsed = p::check(&text, &config)?;
            let examples = zhuli::validate::config(&parsed).examples;
            if !examples.is_empty() {
                let lines = zhuli::validate::lines(&examples);
                if !force {
                    anyhow::bail!(
                        "{} still holds the template's examples:\n{lines}\nwrite the real values in (then sign again), or pass --force to write it as it is",
                        config.display()
                    );
                }
                eprintln!("warning: written with the template's examples (--force):\n{lines}");
            }
            let sig_path = PathBuf::from(format!("{}.sig", config.display()));
            let sig = match std::fs::read(&sig_path) {
                Ok(s) => Some(s),
                Err(_) if unsigned => None,
                Err(_) => anyhow::bail!(
                    "{} is missing: sign the file first (or pass --unsigned for a development box)",
                    sig_path.display()
                ),
            };
            // The box refuses a file changed after signing: so does the laptop, before the stick.
            if let Some(sig) = &sig {
                let signer =
                    sign::verify(&data, &String::from_utf8_lossy(sig), trusted.as_deref()).map_err(|e| match e {
                        sign::SignError::Untrusted { found, trusted } => anyhow::anyhow!(
                            "{} is signed by the key {found}, not by {trusted} that --org-key names: sign it with the organisation's org.key, or name its org.pub",
                            sig_path.display()
                        ),
                        e => anyhow::anyhow!(
                            "{}: {e}; sign it again with `zhuli provision sign --key org.key {}`",
                            sig_path.display(),
                            config.display()
                        ),
                    })?;
                println!("signature good (organisation key {})", sign::short(&signer));
            }
            let mut files: Vec<(&str, &[u8])> = vec![(stick::CONFIG, &data)];
            if let Some(s) = &sig {
                files.push((stick::SIGNATURE, s));
            }
            let bundle = update.as_deref().map(bundle_files).transpose()?;
            let bundle_bytes: u64 =
                bundle.iter().flatten().filter_map(|(_, p)| p.metadata().ok()).map(|m| m.len()).sum();
            let target = match (image, device) {
                (Some(img), _) => {
                    // Room for the bundle and the file system's own, in whole MiB.
                    let size =
                        (size_mb << 20).max((bundle_bytes + bundle_bytes / 16 + (64 << 20)).next_multiple_of(1 << 20));
                    stick::create_image(&img, size, &files)?;
                    println!("wrote serial {} to the image {} (label {})", parsed.serial, img.display(), stick::LABEL);
                    img
                }
                (None, Some(dev)) => {
                    stick::write(&dev, &files, format)?;
                    println!("wrote serial {} to {}", parsed.serial, dev.display());
                    dev
                }
                (None, None) => anyhow::bail!("give --image or --device"),
            };
            if let Some(bundle) = bundle {
                stick::write_folder(&target, stick::UPDATE_DIR, &bundle)?;
                println!(
                    "put the release bundle ({} files, {} MiB) into {}/ on the stick: the box installs it when the stick is plugged in",
                    bundle.len(),
                    bundle_bytes >> 20,
                    stick::UPDATE_DIR
                );
            }
        }
        ProvisionCommand::FactoryReset { root, yes } => {
            if !yes {
                anyhow::bail!(
                    "this forgets the imported configuration and the trusted organisation key; pass --yes to do it"
                );
            }
            for name in zhuli::provision::FORGOTTEN_AT_RESET {
                let path = root.join(name);
                let removed = if path.is_dir() && !path.is_symlink() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Ok(()) => println!("removed {}", path.display()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => anyhow::bail!("cannot remove {}: {e}", path.display()),
                }
            }
            println!("the box will trust the key of the next signed stick it imports");
        }
        ProvisionCommand::Import {
            device,
            root,
            org_key,
            allow_unsigned,
            plain_credentials,
            no_restart,
            seal_journal,
            no_diagnostics,
        } => {
            let opts = p::ImportOptions {
                device,
                root,
                baked_key: Some(org_key),
                allow_unsigned,
                credentials: if plain_credentials { p::Credentials::Plain } else { p::Credentials::Systemd },
                restart: !no_restart,
                seal_journal,
                diagnostics: !no_diagnostics,
            };
            let receipt = p::import(&opts);
            print!("{}", receipt.text());
            let refused = receipt.result.starts_with("refused");
            let audit = zhuli::audit::Audit::new(&zhuli::audit::AuditSettings::default());
            audit.record(
                zhuli::audit::Event::new(zhuli::audit::Kind::ConfigChanged, "provisioning", "")
                    .target(format!("serial {}", receipt.serial.map(|s| s.to_string()).unwrap_or_else(|| "-".into())))
                    .outcome(if refused {
                        "refused"
                    } else if receipt.result.starts_with(p::UNCHANGED) {
                        "unchanged"
                    } else if receipt.result.starts_with(p::DIAGNOSTICS_ONLY) {
                        "diagnostics"
                    } else {
                        "imported"
                    })
                    .reason(
                        receipt
                            .scrub
                            .iter()
                            .map(|s| format!("secrets on the stick: {s}"))
                            .chain(receipt.errors.iter().cloned())
                            .collect::<Vec<_>>()
                            .join("; "),
                    ),
            );
            // A release in the stick's update/ folder, whatever came of the configuration.
            update_cli::from_stick(&opts.device, &opts.root);
            if refused {
                std::process::exit(1);
            }
        }
    }
    Ok(())
}

mod update_cli;

/// The files of a signed release bundle folder, for the stick; refused when it is not one.
fn bundle_files(dir: &std::path::Path) -> anyhow::Result<Vec<(String, PathBuf)>> {
    for name in [zhuli::update::SUMS, zhuli::update::SIGNATURE, zhuli::update::MANIFEST] {
        if !dir.join(name).is_file() {
            anyhow::bail!(
                "{} has no {name}: it is not a signed release bundle (image/release writes one into OUT/bundle, `zhuli update sign` signs it)",
                dir.display()
            );
        }
    }
    let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot read {}", dir.display()))?
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()) || e.path().is_file())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every subcommand and every option of `--help` says what it is for.
    #[test]
    fn every_help_line_has_a_description() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} --{id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "zhuli", &mut missing);
        assert!(missing.is_empty(), "no description: {missing:?}");
    }

    #[test]
    fn a_cause_already_said_is_not_said_again() {
        let inner = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(inner).context("cannot read z.toml: no such file");
        assert_eq!(said_once(&e), "cannot read z.toml: no such file");
        let e = anyhow::anyhow!("disk full").context("cannot write the receipt");
        assert_eq!(said_once(&e), "cannot write the receipt: disk full");
    }
}
