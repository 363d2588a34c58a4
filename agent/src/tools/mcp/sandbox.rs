//! The sandbox every plugin process starts in, set up between `fork` and `exec`:
//!
//! - **no new privileges** (`PR_SET_NO_NEW_PRIVS`), killed with the agent (`PR_SET_PDEATHSIG`),
//!   its own process group (so a timeout kills all of it);
//! - **Landlock**: read (and execute) only below the system's library folders and the plugin's
//!   granted read paths, write only below its granted write paths; TCP bind/connect denied
//!   unless the plugin is granted the network; signals and abstract UNIX sockets scoped to
//!   the plugin itself (best effort: each kernel enforces what its Landlock ABI knows, and
//!   the status is reported);
//! - **seccomp**: no new processes (only threads) unless granted, no sockets unless granted
//!   the network (socket pairs stay), none of ptrace, process_vm_*, namespaces, mounts, BPF,
//!   perf, keyrings, io_uring (which would bypass the socket rule) or kernel modules;
//! - **rlimits**: memory (data segment), CPU seconds, open files, file size, no core dumps,
//!   and tasks: what the agent's user runs now plus 128 threads and 16 per granted process
//!   (`RLIMIT_NPROC` counts per user, and not for root);
//!   and the highest OOM score, so memory pressure ends a plugin before the agent;
//! - **a scrubbed environment** (only `PATH`, `HOME`, `LANG` and the configured variables) and
//!   **no inherited descriptors** beyond stdin/stdout/stderr (all others close on exec).
//!
//! Everything that allocates (the Landlock ruleset, the BPF program) is prepared before the
//! fork; the child only makes system calls.
//!
//! The one module of the agent with `unsafe`: the hook that runs between fork and exec, and
//! the Landlock version query.
#![allow(unsafe_code)]

use std::{
    collections::BTreeMap,
    io,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
};

use landlock::{
    ABI, Access, AccessFs, AccessNet, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, Scope, path_beneath_rules,
};
use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

/// What a plugin may do.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Readable (and executable) beyond the system folders.
    pub read: Vec<PathBuf>,
    /// Readable and writable.
    pub write: Vec<PathBuf>,
    pub network: bool,
    /// Processes the plugin may start (0: threads only).
    pub processes: u32,
    pub memory_bytes: u64,
    pub cpu_seconds: u64,
    pub open_files: u64,
    pub file_bytes: u64,
    pub env: BTreeMap<String, String>,
    /// `HOME` and the working folder.
    pub home: PathBuf,
}

/// Read-only for every plugin: what a dynamically linked program and its runtime need.
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/bin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/nsswitch.conf",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
];

/// Also read-only with the network: name resolution.
const NETWORK_READ: &[&str] = &["/etc/resolv.conf", "/etc/hosts", "/etc/gai.conf", "/etc/host.conf"];

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("the Landlock rules could not be prepared: {0}")]
    Landlock(String),
    #[error("the seccomp filter could not be prepared: {0}")]
    Seccomp(String),
}

/// Syscalls no plugin makes.
fn forbidden() -> Vec<i64> {
    let mut v = vec![
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_acct,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_reboot,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_fanotify_init,
        libc::SYS_personality,
    ];
    v.sort_unstable();
    v.dedup();
    v
}

fn seccomp(policy: &Policy) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let arch: seccompiler::TargetArch = std::env::consts::ARCH
        .try_into()
        .map_err(|e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string()))?;
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = forbidden().into_iter().map(|s| (s, vec![])).collect();
    if policy.processes == 0 {
        // Threads (clone with CLONE_THREAD) stay; a new process is refused.
        let no_thread =
            SeccompCondition::new(0, SeccompCmpArgLen::Qword, SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64), 0)
                .map_err(err)?;
        rules.insert(libc::SYS_clone, vec![SeccompRule::new(vec![no_thread]).map_err(err)?]);
        rules.insert(libc::SYS_fork, vec![]);
        rules.insert(libc::SYS_vfork, vec![]);
    }
    if !policy.network {
        rules.insert(libc::SYS_socket, vec![]);
    }
    let deny =
        SeccompFilter::new(rules, SeccompAction::Allow, SeccompAction::Errno(libc::EPERM as u32), arch).map_err(err)?;
    let mut programs = vec![BpfProgram::try_from(deny).map_err(err)?];
    // clone3 passes its flags in memory a filter cannot read: refused as unknown, so runtimes
    // fall back to clone, which the rule above sees.
    if policy.processes == 0 {
        let clone3 = BTreeMap::from([(libc::SYS_clone3, vec![])]);
        let f = SeccompFilter::new(clone3, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)
            .map_err(err)?;
        programs.push(BpfProgram::try_from(f).map_err(err)?);
    }
    Ok(programs)
}

fn landlock(policy: &Policy, program: &Path) -> Result<RulesetCreated, SandboxError> {
    let err = |e: landlock::RulesetError| SandboxError::Landlock(e.to_string());
    let abi = ABI::V6;
    let mut ruleset = Ruleset::default().set_compatibility(CompatLevel::BestEffort);
    ruleset = ruleset.handle_access(AccessFs::from_all(abi)).map_err(err)?;
    if !policy.network {
        ruleset = ruleset.handle_access(AccessNet::BindTcp | AccessNet::ConnectTcp).map_err(err)?;
    }
    ruleset = ruleset.scope(Scope::AbstractUnixSocket | Scope::Signal).map_err(err)?;
    let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(PathBuf::from).collect();
    if policy.network {
        read.extend(NETWORK_READ.iter().map(PathBuf::from));
    }
    read.extend(policy.read.iter().cloned());
    read.push(program.to_owned());
    read.push(policy.home.clone());
    // Paths that do not exist on this system are left out (path_beneath_rules needs them open).
    let exists = |p: &PathBuf| p.exists();
    let read: Vec<PathBuf> = read.into_iter().filter(exists).collect();
    let write: Vec<PathBuf> = policy.write.iter().filter(|p| exists(p)).cloned().collect();
    let created = ruleset
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(read, AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(write, AccessFs::from_all(abi)))
        .map_err(err)?;
    Ok(created)
}

/// The kernel's Landlock ABI version (0: none).
pub fn landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute and touches no memory.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    };
    v.max(0) as i32
}

/// Threads a plugin may add to its user's count (Node.js runs about a dozen; the agent's own
/// pool may grow meanwhile, and counts too).
const THREADS: u64 = 128;

/// Tasks (threads) of this process's user now: what `RLIMIT_NPROC` counts. The agent's user
/// sees only its own processes (`ProtectProc=invisible`), the rest are skipped as unreadable.
fn tasks_of_this_user() -> u64 {
    let uid = nix::unistd::getuid().as_raw().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else { return 0 };
    let mut n = 0;
    for entry in dir.flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else { continue };
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(str::trim);
        let mine = field("Uid:").and_then(|u| u.split_whitespace().next()) == Some(uid.as_str());
        if mine {
            n += field("Threads:").and_then(|t| t.parse::<u64>().ok()).unwrap_or(1);
        }
    }
    n
}

/// A command for `program args…` that starts inside the sandbox; with `cgroup` (a plugin
/// group's `cgroup.procs`, open for writing), the child first moves itself into that group.
pub fn command(
    program: &Path,
    args: &[String],
    policy: &Policy,
    cgroup: Option<std::os::fd::RawFd>,
) -> Result<tokio::process::Command, SandboxError> {
    let programs = seccomp(policy)?;
    let mut ruleset = Some(landlock(policy, program)?);
    let limits = [
        (libc::RLIMIT_NPROC, tasks_of_this_user() + THREADS + 16 * u64::from(policy.processes)),
        (libc::RLIMIT_DATA, policy.memory_bytes),
        (libc::RLIMIT_CPU, policy.cpu_seconds),
        (libc::RLIMIT_NOFILE, policy.open_files),
        (libc::RLIMIT_FSIZE, policy.file_bytes),
        (libc::RLIMIT_CORE, 0),
    ];
    let mut cmd = std::process::Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", &policy.home)
        .env("LANG", "C.UTF-8")
        .envs(&policy.env)
        .current_dir(&policy.home)
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec. It only makes system calls
    // (write to the cgroup's descriptor, which the parent keeps open until the spawn returns;
    // prctl, close_range, open/write/close, setrlimit, landlock_restrict_self, seccomp) on data
    // prepared above;
    // nothing it calls takes a lock another thread of the parent could have held.
    unsafe {
        cmd.pre_exec(move || {
            // First of all: into its own control group ("0" is the writing process), so that
            // everything it ever starts is counted, limited and killed with it.
            if let Some(fd) = cgroup
                && libc::write(fd, b"0".as_ptr().cast(), 1) != 1
            {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Every descriptor past stdio closes on exec (the agent's sockets, its store).
            const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
            if libc::syscall(libc::SYS_close_range, 3 as libc::c_uint, libc::c_uint::MAX, CLOSE_RANGE_CLOEXEC) != 0 {
                return Err(io::Error::last_os_error());
            }
            // Under memory pressure the kernel kills a plugin before the agent.
            let fd = libc::open(c"/proc/self/oom_score_adj".as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"1000".as_ptr().cast(), 4);
                libc::close(fd);
            }
            for (resource, value) in limits {
                // CPU: SIGXCPU at the limit (so the stop says why), SIGKILL a second later.
                let max = if resource == libc::RLIMIT_CPU { value + 1 } else { value };
                let lim = libc::rlimit { rlim_cur: value, rlim_max: max };
                if libc::setrlimit(resource, &lim) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(r) = ruleset.take() {
                r.restrict_self().map_err(|_| io::Error::from_raw_os_error(libc::EPERM))?;
            }
            for p in &programs {
                seccompiler::apply_filter(p).map_err(|_| io::Error::from_raw_os_error(libc::EPERM))?;
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}
