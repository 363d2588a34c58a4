//! The box's own nightly backup, by the 3-2-1 rule: a sealed snapshot of the store on the box
//! (`<state_dir>/backups`, the newest `[backup] keep` kept) and, when `[backup] offsite` is set,
//! a copy on a WebDAV folder, fetched back and verified with the key, the oldest beyond
//! `offsite_keep` removed. A target that starts failing is told to the admins once, with what to
//! do; its recovery too. What each target last did is kept in the store (`backup.state`).

use std::sync::Arc;

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Work, blocking, maintenance, now_ms, tell_admins};
use crate::health::diagnostics::BACKUPS;
use crate::{config::Config, health::Beat, schedule::Rule, store::key::StoreKey};

const STATE: &str = "backup.state";

/// What one target last did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// When its last good copy was made.
    pub ok_ms: Option<i64>,
    /// Why the last attempt failed, while it fails.
    pub failing: Option<String>,
    /// The admins were told of this failure.
    pub told: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// When the nightly backup last ran (or, before the first, when the agent first started).
    pub last_run_ms: Option<i64>,
    pub local: Target,
    pub offsite: Target,
}

/// The state kept in the store; an error when the store cannot be read (then nothing is written
/// over what it holds).
pub fn state(store: &crate::store::Store) -> Result<State, crate::store::StoreError> {
    Ok(store.setting(STATE)?.and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default())
}

async fn keep(work: &Arc<Work>, st: &State) {
    let kept = serde_json::to_string(st).unwrap_or_default();
    if let Err(e) = blocking(&work.store, move |s| s.set_setting(STATE, &kept)).await {
        log::warn!("the backup's state could not be kept: {e}");
    }
}

/// The nightly time as a rule; 02:30 when `[backup] at` is not a time of day.
fn nightly(config: &Config) -> Rule {
    let minute = crate::tools::when::clock(&config.backup.at).unwrap_or(150).clamp(0, 1439) as u16;
    Rule::Daily { minute }
}

/// Run until `cancel`.
pub(super) async fn run(work: Arc<Work>, config: Config, cancel: CancellationToken, beat: Arc<Beat>) {
    let offset = config.assistant.utc_offset_minutes;
    let rule = nightly(&config);
    let wake = std::time::Duration::from_millis(config.schedule.wake_ms.max(100)).min(work.health.beat_every());
    loop {
        beat.tick();
        let now = now_ms();
        let before = match blocking(&work.store, state).await {
            Ok(st) => st,
            Err(e) => {
                log::warn!("the backup's state cannot be read: {e}; trying again shortly");
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wake) => continue,
                }
            }
        };
        let mut st = before.clone();
        let last = *st.last_run_ms.get_or_insert(now);
        let due = rule.next_after(last, offset).unwrap_or(i64::MAX);
        if last > now + 86_400_000 {
            // A clock set back by more than a day: the next night counts from now.
            st.last_run_ms = Some(now);
        } else if due <= now {
            // Kept before the work: an agent restarted meanwhile does not start it again.
            st.last_run_ms = Some(now);
            keep(&work, &st).await;
            // The copies may take long (a slow network drive): the health beat goes on meanwhile,
            // and a stop does not wait for them.
            let mut copies = tokio::spawn(once(work.clone(), config.clone(), st.clone()));
            loop {
                tokio::select! {
                    done = &mut copies => {
                        match done {
                            Ok(after) => st = after,
                            Err(e) => log::error!("the nightly backup stopped: {e}"),
                        }
                        break;
                    }
                    _ = tokio::time::sleep(work.health.beat_every()) => beat.tick(),
                    _ = cancel.cancelled() => {
                        copies.abort();
                        return;
                    }
                }
            }
        }
        // Written only when it changed: an idle box does not commit every minute.
        if st != before {
            keep(&work, &st).await;
        }
        let wait = std::time::Duration::from_millis((due - now_ms()).clamp(0, i64::MAX) as u64).min(wake);
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Take tonight's copies; the state after.
async fn once(work: Arc<Work>, config: Config, mut st: State) -> State {
    copies(&work, &config, &mut st).await;
    st
}

async fn copies(work: &Arc<Work>, config: &Config, st: &mut State) {
    let dir = config.agent.state_dir.join(BACKUPS);
    let taken = {
        let (config, dir) = (config.clone(), dir.clone());
        tokio::task::spawn_blocking(move || maintenance::take(&config, &dir, config.backup.keep))
            .await
            .unwrap_or_else(|e| Err(format!("the backup stopped ({e})")))
    };
    let snapshot = match taken {
        Ok(b) => {
            log::info!("nightly backup on the box: {} ({} bytes, {} kept)", b.path, b.bytes, b.kept);
            settle(work, config, "local", &mut st.local, Ok(()));
            std::path::PathBuf::from(b.path)
        }
        Err(e) => {
            settle(work, config, "local", &mut st.local, Err(e));
            return;
        }
    };
    let Some(url) = config.backup.offsite.as_deref() else { return };
    let offsite = super::offsite::Offsite::new(
        url,
        &config.backup.username,
        config.backup.password.as_ref(),
        config.backup.offsite_keep,
        config.backup.timeout_ms.get(),
    );
    let outcome = async {
        let key = StoreKey::load(config.store.key_file.as_deref()).map_err(|e| e.to_string())?;
        let name = offsite.upload(&snapshot).await?;
        let scratch = config.agent.state_dir.join("backup-check");
        offsite.verify(&name, &key, &scratch).await?;
        let removed = offsite.prune(&name).await?;
        log::info!("nightly backup off the box: {name}, fetched back and verified; {removed} old ones removed");
        Ok::<(), String>(())
    }
    .await;
    settle(work, config, "offsite", &mut st.offsite, outcome);
}

/// Record a target's outcome; tell the admins when it starts failing, and when it recovers.
fn settle(work: &Arc<Work>, config: &Config, which: &str, target: &mut Target, outcome: Result<(), String>) {
    let name = if which == "local" { t!("backup.target_local") } else { t!("backup.target_offsite") };
    match outcome {
        Ok(()) => {
            if target.told {
                tell_admins(work, config, &t!("backup.recovered_title"), &t!("backup.recovered", target = name));
            }
            *target = Target { ok_ms: Some(now_ms()), failing: None, told: false };
        }
        Err(why) => {
            log::error!("nightly backup ({which}) failed: {why}");
            if !target.told {
                let fix = if which == "local" { t!("backup.fix_local") } else { t!("backup.fix_offsite") };
                let text = t!("backup.failed", target = name, why = why.as_str(), fix = fix);
                tell_admins(work, config, &t!("backup.failed_title"), &text);
                target.told = true;
            }
            target.failing = Some(why.chars().take(300).collect());
        }
    }
}
