//! systemd's notification protocol: `KEY=value` lines in one datagram to `$NOTIFY_SOCKET` (a
//! path, or `@name` for the abstract namespace). Without `NOTIFY_SOCKET` every call does
//! nothing, so the agent runs the same outside systemd.

use std::{os::unix::net::UnixDatagram, path::PathBuf, time::Duration};

pub struct Notifier {
    target: Option<Target>,
    socket: Option<UnixDatagram>,
}

enum Target {
    Path(PathBuf),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From the environment systemd sets for `Type=notify` services.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").map(|v| {
            let bytes = std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()).to_vec();
            match bytes.strip_prefix(b"@") {
                Some(name) => Target::Abstract(name.to_vec()),
                None => Target::Path(PathBuf::from(v)),
            }
        });
        let socket = target.as_ref().and_then(|_| UnixDatagram::unbound().ok());
        Notifier { target, socket }
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Send `state` (e.g. `READY=1`, `WATCHDOG=1`, `STATUS=…`); failures are logged at debug
    /// level only (systemd may be restarting; the next notification tries again).
    pub fn notify(&self, state: &str) {
        let (Some(target), Some(socket)) = (&self.target, &self.socket) else { return };
        let sent = match target {
            Target::Path(p) => socket.send_to(state.as_bytes(), p).map(|_| ()),
            Target::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                std::os::unix::net::SocketAddr::from_abstract_name(name)
                    .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
                    .map(|_| ())
            }
        };
        if let Err(e) = sent {
            log::debug!("systemd notification not sent: {e}");
        }
    }
}

/// The watchdog interval systemd expects pings within, if it set one for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok())
        && pid != std::process::id()
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}
