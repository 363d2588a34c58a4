//! The box's own nightly backup, by the 3-2-1 rule: a sealed snapshot of the store on the box
//! (`<state_dir>/backups`, the newest `[backup] keep` kept) and, when `[backup] offsite` is set,
//! a copy on a WebDAV folder, fetched back and verified with the key, the oldest beyond
//! `offsite_keep` removed. A target that starts failing is told to the admins once, with what to
//! do; its recovery too. What each target last did is kept in the store (`backup.state`).

use std::sync::Arc;

use rust_i18n::t;
use tokio_util::sync::CancellationToken;

use super::{Work, blocking, maintenance, now_ms, tell_admins_delivered};
use crate::health::diagnostics::BACKUPS;
use crate::{config::Config, health::Beat, schedule::Rule, store::key::StoreKey};

use crate::store::backup::{Drill, STATE, State, Target, state};

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
    let wake = std::time::Duration::from_millis(config.schedule.wake_ms.max(100)).min(work.health.longest_sleep());
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
        // Copies a restart, an update or a power cut stopped: taken again at once, one time; a
        // second night cut short is a failure the admins hear of.
        let mut again = false;
        if let Some(started) = st.running_ms.take() {
            st.cut_short += 1;
            log::warn!("the nightly backup started at {started} was cut short ({} in a row)", st.cut_short);
            if st.cut_short == 1 {
                again = true;
            } else {
                st.cut_short = 0;
                let why = t!("backup.cut_short").into_owned();
                settle(&work, &config, "local", &mut st.local, Err(why)).await;
            }
        }
        if last > now + 86_400_000 {
            // A clock set back by more than a day: the next night counts from now.
            st.last_run_ms = Some(now);
        } else if due <= now || again {
            // Kept before the work: an agent restarted meanwhile knows it started.
            st.last_run_ms = Some(now);
            st.running_ms = Some(now);
            keep(&work, &st).await;
            // The copies may take long (a slow network drive): the health beat goes on meanwhile,
            // and a stop does not wait for them.
            let mut copies = tokio::spawn(once(work.clone(), config.clone(), st.clone()));
            loop {
                tokio::select! {
                    done = &mut copies => {
                        match done {
                            Ok(after) => st = State { running_ms: None, cut_short: 0, ..after },
                            Err(e) => {
                                log::error!("the nightly backup stopped: {e}");
                                st.running_ms = None;
                            }
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

/// The longest the copies off the box may take in one night (a drive that trickles).
const OFF_SITE_BOUND: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

async fn copies(work: &Arc<Work>, config: &Config, st: &mut State) {
    let dir = config.agent.state_dir.join(BACKUPS);
    // What a run cut short left in the scratch folders.
    for scratch in [CHECK, DRILL] {
        let _ = tokio::fs::remove_dir_all(config.agent.state_dir.join(scratch)).await;
    }
    let taken = {
        let (config, dir) = (config.clone(), dir.clone());
        tokio::task::spawn_blocking(move || maintenance::take(&config, &dir, config.backup.keep))
            .await
            .unwrap_or_else(|e| Err(format!("the backup stopped ({e})")))
    };
    let snapshot = match taken {
        Ok(b) => {
            log::info!("nightly backup on the box: {} ({} bytes, {} kept)", b.path, b.bytes, b.kept);
            settle(work, config, "local", &mut st.local, Ok(())).await;
            std::path::PathBuf::from(b.path)
        }
        Err(e) => {
            settle(work, config, "local", &mut st.local, Err(e)).await;
            return;
        }
    };
    let Some(url) = config.backup.offsite.as_deref() else { return };
    let offsite = crate::offsite::Offsite::new(
        url,
        &config.backup.username,
        config.backup.password.as_ref(),
        config.backup.offsite_keep,
        config.backup.timeout_ms.get(),
    );
    let store_id = manifest_store_id(&snapshot);
    let outcome = async {
        let key = StoreKey::load(config.store.key_file.as_deref()).map_err(|e| e.to_string())?;
        let name = offsite.upload(&snapshot).await?;
        let scratch = config.agent.state_dir.join(CHECK);
        offsite.verify(&name, &key, &scratch).await?;
        let removed = offsite.prune(&name, store_id.as_deref()).await?;
        log::info!("nightly backup off the box: {name}, fetched back and verified; {removed} old ones removed");
        Ok::<(), String>(())
    };
    let outcome = tokio::time::timeout(OFF_SITE_BOUND, outcome)
        .await
        .unwrap_or_else(|_| Err(t!("backup.too_slow", hours = OFF_SITE_BOUND.as_secs() / 3600).into_owned()));
    let uploaded = outcome.is_ok();
    settle(work, config, "offsite", &mut st.offsite, outcome).await;
    // The drill only after a night the drive answered: when it is down, the failure above says
    // so already.
    if uploaded && drill_due(config.backup.drill_days, st, now_ms()) {
        let told_before = st.drill.as_ref().is_some_and(|d| d.failed.is_some() && d.told);
        let report = drill(work, config, &offsite, store_id.as_deref(), told_before);
        let report = tokio::time::timeout(OFF_SITE_BOUND, report).await.unwrap_or_else(|_| Drill {
            at_ms: now_ms(),
            failed: Some(t!("backup.too_slow", hours = OFF_SITE_BOUND.as_secs() / 3600).into_owned()),
            told: told_before,
            ..Drill::default()
        });
        st.drill = Some(report);
    }
}

/// Scratch folders under the state directory: the check after each upload, and the drill.
const CHECK: &str = "backup-check";
const DRILL: &str = "backup-drill";

/// The store a snapshot is of, by its manifest.
fn manifest_store_id(snapshot: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(snapshot.join(crate::store::backup::MANIFEST)).ok()?;
    serde_json::from_str::<serde_json::Value>(&text).ok()?.get("store_id")?.as_str().map(str::to_owned)
}

/// Whether the restore drill is due at `now`: `drill_days` (`[backup]`) since the last one, or the
/// next night after one that failed.
fn drill_due(drill_days: u32, st: &State, now: i64) -> bool {
    let every = i64::from(drill_days) * 86_400_000;
    every > 0 && st.drill.as_ref().is_none_or(|d| d.failed.is_some() || now - d.at_ms >= every || now < d.at_ms)
}

/// The restore drill: the newest off-site snapshot restored into a scratch folder and opened,
/// its counts set beside the live store's. The admins get the report, except a failure again
/// after a failure they were told of (it is tried each night until it passes).
async fn drill(
    work: &Arc<Work>,
    config: &Config,
    offsite: &crate::offsite::Offsite,
    store_id: Option<&str>,
    told_before: bool,
) -> Drill {
    let at_ms = now_ms();
    let scratch = config.agent.state_dir.join(DRILL);
    let (name, restored) = match StoreKey::load(config.store.key_file.as_deref()) {
        Ok(key) => offsite.drill(key, &scratch, store_id).await,
        Err(e) => (String::new(), Err(e.to_string())),
    };
    let live = blocking(&work.store, |s| s.counts()).await.unwrap_or_default();
    let mut report = Drill { at_ms, name, failed: None, restored: Default::default(), live, told: false };
    match restored {
        Ok(counts) => {
            report.restored = counts;
            log::info!("restore drill: {} restored and opened: {counts:?}; the live store: {live:?}", report.name);
            let text = t!(
                "backup.drill_ok",
                name = report.name.as_str(),
                conversations = counts.conversations,
                messages = counts.messages,
                jobs = counts.jobs,
                live_conversations = live.conversations,
                live_messages = live.messages,
                live_jobs = live.jobs
            );
            tell_admins_delivered(work, config, &t!("backup.drill_title"), &text).await;
        }
        Err(why) => {
            log::error!("restore drill failed: {why}");
            report.told = told_before;
            if !told_before {
                let text = t!("backup.drill_failed", why = why.as_str());
                report.told = tell_admins_delivered(work, config, &t!("backup.drill_title"), &text).await;
            }
            report.failed = Some(why.chars().take(300).collect());
        }
    }
    report
}

/// Record a target's outcome; tell the admins when it starts failing, and when it recovers. A
/// failure counts as told only once a message reached an admin: else the next night tells it.
async fn settle(work: &Arc<Work>, config: &Config, which: &str, target: &mut Target, outcome: Result<(), String>) {
    let name = if which == "local" { t!("backup.target_local") } else { t!("backup.target_offsite") };
    match outcome {
        Ok(()) => {
            if target.told {
                let text = t!("backup.recovered", target = name);
                tell_admins_delivered(work, config, &t!("backup.recovered_title"), &text).await;
            }
            *target = Target { ok_ms: Some(now_ms()), failing: None, told: false };
        }
        Err(why) => {
            log::error!("nightly backup ({which}) failed: {why}");
            if !target.told {
                let fix = if which == "local" { t!("backup.fix_local") } else { t!("backup.fix_offsite") };
                let text = t!("backup.failed", target = name, why = why.as_str(), fix = fix);
                target.told = tell_admins_delivered(work, config, &t!("backup.failed_title"), &text).await;
            }
            target.failing = Some(why.chars().take(300).collect());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drill_is_monthly_retried_after_a_failure_and_can_be_turned_off() {
        let day = 86_400_000;
        let now = 1_800_000_000_000;
        let with = |at_ms: i64, failed: bool| State {
            drill: Some(Drill { at_ms, failed: failed.then(|| "down".into()), ..Drill::default() }),
            ..State::default()
        };
        assert!(drill_due(30, &State::default(), now), "the first night");
        assert!(!drill_due(30, &with(now - 10 * day, false), now));
        assert!(drill_due(30, &with(now - 30 * day, false), now));
        assert!(drill_due(30, &with(now - day, true), now), "the night after a failure");
        assert!(drill_due(30, &with(now + 5 * day, false), now), "a clock set back");
        assert!(!drill_due(0, &State::default(), now));
    }
}
