//! What the agent's systemd unit must allow that only the configuration knows: the folders it
//! may change and its plugins' credentials. The import writes them as a drop-in beside the
//! generation's credentials (`zhuli.service.conf`); the image links
//! `/etc/systemd/system/zhuli.service.d/50-provisioned.conf` to `current/zhuli.service.conf`,
//! and systemd reads it at the reload the import (and `zhuli-units.service` at boot) asks for.
//!
//! `zhuli.service` keeps `ProtectSystem=strict`: every folder is read-only to the agent except
//! its state directory and the folders listed here — the files roots and the folders plugins
//! may write. Folders only read stay read-only.

use std::path::{Path, PathBuf};

use super::ProvisionError;
use crate::config::Config;

/// The drop-in's file name in a generation.
pub const DROPIN: &str = "zhuli.service.conf";

/// Every folder the configuration lets the agent (or one of its plugins) change, with the
/// setting that names it.
pub fn writable(config: &Config) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = config
        .tools
        .files
        .roots
        .iter()
        .map(|(name, path)| (format!("[tools.files.roots] {name}"), path.clone()))
        .collect();
    for (name, plugin) in &config.tools.mcp {
        out.extend(plugin.write.iter().map(|p| (format!("[tools.mcp.{name}] write"), p.clone())));
    }
    out
}

/// Check the writable folders can be named in a unit file: absolute, no control characters.
pub fn check(config: &Config) -> Result<(), ProvisionError> {
    for (setting, path) in writable(config) {
        let text = path.to_str().unwrap_or("\n");
        if !path.is_absolute() || text.chars().any(char::is_control) {
            return Err(ProvisionError::Invalid(format!(
                "{setting}: {} must be an absolute path without control characters",
                path.display()
            )));
        }
    }
    Ok(())
}

/// Create the writable folders that do not exist yet (owned by the agent's user, 0750), and
/// return every writable folder as its canonical path.
pub(crate) fn prepare(config: &Config, agent: &super::Agent) -> Result<Vec<PathBuf>, ProvisionError> {
    let mut out = Vec::new();
    for (setting, path) in writable(config) {
        let fail = |e: std::io::Error| {
            ProvisionError::Apply(format!(
                "{setting}: the folder {} does not exist and cannot be made ({e}); on the box, put shared folders under /srv",
                path.display()
            ))
        };
        if !path.exists() {
            std::fs::create_dir_all(&path).map_err(fail)?;
            super::set_mode(&path, 0o750).map_err(fail)?;
            nix::unistd::chown(&path, agent.uid, agent.gid).map_err(|e| fail(e.into()))?;
            log::info!("provisioning: made the folder {} for {setting}", path.display());
        }
        let canonical = std::fs::canonicalize(&path).map_err(fail)?;
        if !out.contains(&canonical) {
            out.push(canonical);
        }
    }
    Ok(out)
}

/// A word of a unit file setting: quoted, with systemd's escapes and `%` specifiers escaped.
fn word(text: &str) -> String {
    let escaped = text.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%");
    format!("\"{escaped}\"")
}

/// The drop-in: `ReadWritePaths=` for `writable` (ignored if missing when the agent starts, so
/// the agent can say what is wrong), a credential line for each of `credentials` (name, file).
pub fn dropin(serial: u64, writable: &[PathBuf], credentials: &[(String, PathBuf)], encrypted: bool) -> String {
    let mut t = format!(
        "# Written by `zhuli provision import` for serial {serial}: what the configuration lets the agent\n\
         # change, and its plugins' credentials. Replaced by the next import; do not edit.\n[Service]\n"
    );
    for p in writable {
        t.push_str(&format!("ReadWritePaths={}\n", word(&format!("-{}", p.display()))));
    }
    let setting = if encrypted { "LoadCredentialEncrypted" } else { "LoadCredential" };
    // systemd splits these at the first `:` and takes the rest of the line as the path; only
    // `%` needs escaping (credential names are letters, digits, `-` and `_`).
    for (name, file) in credentials {
        t.push_str(&format!("{setting}={name}:{}\n", file.display().to_string().replace('%', "%%")));
    }
    t
}

/// Where a generation's credential lives as the unit sees it (through `current`).
pub fn credential_path(root: &Path, name: &str, encrypted: bool) -> PathBuf {
    let file = if encrypted { format!("{name}.cred") } else { name.to_owned() };
    root.join("current").join(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dropin_quotes_paths_and_escapes_specifiers() {
        let t = dropin(
            7,
            &[PathBuf::from("/srv/share"), PathBuf::from("/srv/team files/100%\"q\"")],
            &[(
                "mcp-search-API_KEY".into(),
                PathBuf::from("/var/lib/zhuli-provisioning/current/mcp-search-API_KEY.cred"),
            )],
            true,
        );
        assert!(t.contains("ReadWritePaths=\"-/srv/share\"\n"), "{t}");
        assert!(t.contains("ReadWritePaths=\"-/srv/team files/100%%\\\"q\\\"\"\n"), "{t}");
        assert!(
            t.contains("LoadCredentialEncrypted=mcp-search-API_KEY:/var/lib/zhuli-provisioning/current/mcp-search-API_KEY.cred\n"),
            "{t}"
        );
        assert!(t.starts_with("# Written by") && t.contains("serial 7") && t.contains("\n[Service]\n"));
    }
}
