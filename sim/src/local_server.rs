//! A server program started on loopback for the tests and benchmarks of the tools that talk to
//! real servers (Radicale, rclone's WebDAV): a free port, the process, and a wait until it
//! accepts connections. Killed when dropped. The programs come from Debian packages that
//! `tests/run` installs.

use std::{
    io::{BufRead, BufReader, Read},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub struct LocalServer {
    child: Child,
    pub addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum LocalServerError {
    #[error("cannot start {program} ({reason}); install it: {package}")]
    Missing { program: String, reason: String, package: String },
    #[error("{program} exited before listening: {output}")]
    Exited { program: String, output: String },
    #[error("{program} did not listen on {addr} within 20 s")]
    Silent { program: String, addr: SocketAddr },
    #[error("no free loopback port: {0}")]
    Port(std::io::Error),
}

impl LocalServer {
    /// Run `program args…` with `{port}` in the arguments replaced by a free loopback port;
    /// `package` says how to install the program when it is missing.
    pub fn start(program: &str, package: &str, args: &[&str]) -> Result<LocalServer, LocalServerError> {
        let port =
            TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(LocalServerError::Port)?.port();
        let args: Vec<String> = args.iter().map(|a| a.replace("{port}", &port.to_string())).collect();
        let mut child = Command::new(program)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| LocalServerError::Missing {
                program: program.into(),
                reason: e.to_string(),
                package: package.into(),
            })?;
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: [Option<Box<dyn Read + Send>>; 2] = [
            child.stdout.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let output = output.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if let Ok(mut o) = output.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            });
        }
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Ok(Some(_)) = child.try_wait() {
                std::thread::sleep(Duration::from_millis(100));
                let output = output.lock().map(|o| o.clone()).unwrap_or_default();
                return Err(LocalServerError::Exited { program: program.into(), output });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(LocalServerError::Silent { program: program.into(), addr });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(LocalServer { child, addr })
    }
}

impl LocalServer {
    /// Radicale (CalDAV) serving the collections under `storage`; with `htpasswd` (plain
    /// `user:password` lines) it asks for a login and lets each user reach their own only.
    pub fn radicale(
        storage: &std::path::Path,
        htpasswd: Option<&std::path::Path>,
    ) -> Result<LocalServer, LocalServerError> {
        let storage = storage.display().to_string();
        let mut args =
            vec!["--config", "", "--server-hosts", "127.0.0.1:{port}", "--storage-filesystem-folder", &storage];
        let users = htpasswd.map(|p| p.display().to_string());
        match &users {
            Some(file) => args.extend([
                "--auth-type",
                "htpasswd",
                "--auth-htpasswd-filename",
                file.as_str(),
                "--auth-htpasswd-encryption",
                "plain",
                "--rights-type",
                "owner_only",
            ]),
            None => args.extend(["--auth-type", "none"]),
        }
        args.extend(["--logging-level", "warning"]);
        LocalServer::start("radicale", "apt-get install radicale", &args)
    }

    /// rclone's WebDAV server for the folder `root`, under `base` (`/remote.php/dav/files/u`),
    /// with a login when given.
    pub fn rclone_webdav(
        root: &std::path::Path,
        base: &str,
        login: Option<(&str, &str)>,
    ) -> Result<LocalServer, LocalServerError> {
        let root = root.display().to_string();
        let mut args =
            vec!["serve", "webdav", &root, "--addr", "127.0.0.1:{port}", "--baseurl", base, "--config", "/dev/null"];
        if let Some((user, pass)) = login {
            args.extend(["--user", user, "--pass", pass]);
        }
        LocalServer::start("rclone", "apt-get install rclone", &args)
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
