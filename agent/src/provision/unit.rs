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

/// Create the writable folders that do not exist yet (owned by the agent's user, 0750; folders
/// made on the way 0755, so the agent can reach them whatever the import's umask), and return
/// every writable folder as its canonical path. A folder reached through a symbolic link
/// other than the image's `/srv` → `/var/srv` is refused: a plugin allowed to write near a
/// root could otherwise point the agent's unit anywhere.
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
            let missing: Vec<PathBuf> = path.ancestors().take_while(|p| !p.exists()).map(Path::to_path_buf).collect();
            for dir in missing.iter().rev() {
                std::fs::create_dir(dir).map_err(fail)?;
                let leaf = dir == &path;
                super::set_mode(dir, if leaf { 0o750 } else { 0o755 }).map_err(fail)?;
                if leaf {
                    nix::unistd::chown(dir, agent.uid, agent.gid).map_err(|e| fail(e.into()))?;
                }
            }
            log::info!("provisioning: made the folder {} for {setting}", path.display());
        }
        let canonical = std::fs::canonicalize(&path).map_err(fail)?;
        let through_srv = path.strip_prefix("/srv").ok().map(|rest| Path::new("/var/srv").join(rest));
        if canonical != path && Some(&canonical) != through_srv.as_ref() {
            return Err(ProvisionError::Invalid(format!(
                "{setting}: {} leads through a symbolic link to {}; name the folder itself",
                path.display(),
                canonical.display()
            )));
        }
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
/// Refused if a path holds a control character: a line break would start a setting of its own.
pub fn dropin(
    serial: u64,
    writable: &[PathBuf],
    credentials: &[(String, PathBuf)],
    encrypted: bool,
) -> Result<String, ProvisionError> {
    let mut t = format!(
        "# Written by `zhuli provision import` for serial {serial}: what the configuration lets the agent\n\
         # change, and its plugins' credentials. Replaced by the next import; do not edit.\n[Service]\n"
    );
    let plain = |p: &Path| -> Result<String, ProvisionError> {
        let text = p.to_str().unwrap_or("\n");
        if text.chars().any(char::is_control) {
            return Err(ProvisionError::Invalid(format!(
                "the folder {} has a control character in its name; rename it",
                p.display()
            )));
        }
        Ok(text.to_owned())
    };
    for p in writable {
        t.push_str(&format!("ReadWritePaths={}\n", word(&format!("-{}", plain(p)?))));
    }
    let setting = if encrypted { "LoadCredentialEncrypted" } else { "LoadCredential" };
    // systemd splits these at the first `:` and takes the rest of the line as the path; only
    // `%` needs escaping (credential names are letters, digits, `-` and `_`).
    for (name, file) in credentials {
        t.push_str(&format!("{setting}={name}:{}\n", plain(file)?.replace('%', "%%")));
    }
    Ok(t)
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
        )
        .expect("a drop-in");
        assert!(t.contains("ReadWritePaths=\"-/srv/share\"\n"), "{t}");
        assert!(t.contains("ReadWritePaths=\"-/srv/team files/100%%\\\"q\\\"\"\n"), "{t}");
        assert!(
            t.contains("LoadCredentialEncrypted=mcp-search-API_KEY:/var/lib/zhuli-provisioning/current/mcp-search-API_KEY.cred\n"),
            "{t}"
        );
        assert!(t.starts_with("# Written by") && t.contains("serial 7") && t.contains("\n[Service]\n"));
        let injected = PathBuf::from("/srv/x\n[Service]\nExecStartPre=+/srv/x/run");
        assert!(dropin(7, &[injected], &[], true).is_err(), "a line break in a folder's name");
    }
}
