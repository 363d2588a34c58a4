//! The sandbox every plugin process starts in, set up between `fork` and `exec`:
//!
//! - **no new privileges** (`PR_SET_NO_NEW_PRIVS`), killed with the agent (`PR_SET_PDEATHSIG`),
//!   its own process group (so a timeout kills all of it);
//! - **Landlock**: read (and execute) only below the system's library folders and the plugin's
//!   granted read paths, write only below its granted write paths; TCP bind/connect denied
//!   unless the plugin is granted the network; signals and abstract UNIX sockets scoped to
//!   the plugin itself (best effort: each kernel enforces what its Landlock ABI knows, and
//!   the status is reported);
//! - **seccomp** (three stacked filters, see [`seccomp`]): an allow-list per profile — a call
//!   it does not list fails with ENOSYS, as on a kernel that lacks it; refusals that hold
//!   whatever the list says, with EPERM: namespaces (unshare, setns, any `CLONE_NEW*` flag of
//!   clone), mounts old and new (mount…, fsopen…, open_tree), ptrace and process_vm_*, BPF,
//!   perf, keyrings, userfaultfd, io_uring (which would bypass the socket rule), modules,
//!   kexec, another process's limits; new processes (only threads) unless granted; sockets
//!   unless granted the network, and then only Internet stream and datagram sockets (socket
//!   pairs stay); clone3 is not listed (ENOSYS), so runtimes fall back to clone; and a call
//!   through another ABI (i386, x32) kills the plugin;
//! - **rlimits**: memory (data segment), CPU seconds, open files, file size, no core dumps,
//!   and tasks: what the agent's user runs now plus 128 threads and 16 per granted process
//!   (`RLIMIT_NPROC` counts per user, and not for root);
//!   and the highest OOM score, so memory pressure ends a plugin before the agent;
//! - **a scrubbed environment** (only `PATH`, `HOME`, `LANG` and the configured variables) and
//!   **no inherited descriptors** beyond stdin/stdout/stderr (all others close on exec).
//!
//! An allow-list, not a deny-list: a deny-list refuses only what it names, and kernels keep
//! adding ways in (the x32 table and the new mount API got past this module's first one).
//! What runtimes call is a stable set (223 to 233 calls by profile, in groups that each say
//! why), and when a runtime starts using a new call the list fails safe, with the ENOSYS
//! runtimes already handle for older kernels. The list is data below; tests/e2e/plugins.rs and
//! tests/e2e/sandbox.rs run Node.js and a native plugin under it.
//!
//! Everything that allocates (the Landlock ruleset, the BPF programs) is prepared before the
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

// The filter below names x86_64 system calls and the x86_64 ABI; the image is x86_64.
#[cfg(not(target_arch = "x86_64"))]
compile_error!("the plugin sandbox's system-call filter is written for x86_64");

/// System calls newer than the libc crate's table.
mod newer_syscalls {
    pub const MAP_SHADOW_STACK: i64 = 453;
    pub const OPEN_TREE_ATTR: i64 = 467;
}

/// What every plugin may call: the system calls of an ordinary program and its runtime,
/// grouped. Derived from strace of the reference Node.js server (`--jitless`), a Python server
/// on the official MCP SDK, glibc-linked and static Rust, and a static Go binary, plus the
/// close relatives those runtimes use on other paths (each group says which). Landlock still
/// decides which files; the refusals below still hold for anything listed here.
const EVERY_PLUGIN: &[&[i64]] = &[
    // Starting: the plugin's own exec comes after the filter; a runtime may re-exec itself.
    &[libc::SYS_execve, libc::SYS_execveat, libc::SYS_exit, libc::SYS_exit_group, libc::SYS_restart_syscall],
    // Descriptors it holds (the MCP pipes, files, sockets): I/O, duplication, flags, ioctls
    // (Landlock restricts device ioctls), copies between them.
    &[
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_lseek,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_ioctl,
        libc::SYS_flock,
        libc::SYS_pipe,
        libc::SYS_pipe2,
        libc::SYS_sendfile,
        libc::SYS_copy_file_range,
        libc::SYS_splice,
    ],
    // Files by path, where Landlock allows: open, stat, list, create, rename, remove, sync.
    &[
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_openat2,
        libc::SYS_creat,
        libc::SYS_stat,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getdents,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_chdir,
        libc::SYS_fchdir,
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_rmdir,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_link,
        libc::SYS_linkat,
        libc::SYS_symlink,
        libc::SYS_symlinkat,
        libc::SYS_mknod,
        libc::SYS_mknodat,
        libc::SYS_truncate,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_sync_file_range,
        libc::SYS_fadvise64,
        libc::SYS_readahead,
        libc::SYS_umask,
    ],
    // File attributes: modes, owners, times, extended attributes (Python's shutil.copy2
    // copies them and fails on ENOSYS), and watching files (Node's fs.watch, Python watchdog).
    &[
        libc::SYS_chmod,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchmodat2,
        libc::SYS_chown,
        libc::SYS_fchown,
        libc::SYS_lchown,
        libc::SYS_fchownat,
        libc::SYS_utime,
        libc::SYS_utimes,
        libc::SYS_utimensat,
        libc::SYS_futimesat,
        libc::SYS_getxattr,
        libc::SYS_lgetxattr,
        libc::SYS_fgetxattr,
        libc::SYS_listxattr,
        libc::SYS_llistxattr,
        libc::SYS_flistxattr,
        libc::SYS_setxattr,
        libc::SYS_lsetxattr,
        libc::SYS_fsetxattr,
        libc::SYS_removexattr,
        libc::SYS_lremovexattr,
        libc::SYS_fremovexattr,
        libc::SYS_inotify_init,
        libc::SYS_inotify_init1,
        libc::SYS_inotify_add_watch,
        libc::SYS_inotify_rm_watch,
    ],
    // Memory: the heap and mappings, V8's protection keys (pkey_alloc), glibc's shadow stacks,
    // locking pages (bounded by RLIMIT_MEMLOCK), anonymous files.
    &[
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mprotect,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_msync,
        libc::SYS_mincore,
        libc::SYS_mlock,
        libc::SYS_mlock2,
        libc::SYS_munlock,
        libc::SYS_mlockall,
        libc::SYS_munlockall,
        libc::SYS_mseal,
        libc::SYS_memfd_create,
        libc::SYS_pkey_alloc,
        libc::SYS_pkey_free,
        libc::SYS_pkey_mprotect,
        newer_syscalls::MAP_SHADOW_STACK,
    ],
    // Threads and waiting on each other: clone (its flags are checked by the refusals; clone3
    // is left out on purpose), futexes, thread-local storage, restartable sequences, the CPUs
    // it may run on.
    &[
        libc::SYS_clone,
        libc::SYS_futex,
        libc::SYS_futex_waitv,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_set_tid_address,
        libc::SYS_rseq,
        libc::SYS_membarrier,
        libc::SYS_arch_prctl,
        libc::SYS_gettid,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_getparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_sched_getattr,
        libc::SYS_sched_get_priority_max,
        libc::SYS_sched_get_priority_min,
        libc::SYS_sched_rr_get_interval,
        libc::SYS_getcpu,
    ],
    // Event loops (libuv, asyncio, Go's netpoller): poll, select, epoll, eventfd, signalfd,
    // timerfd.
    &[
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_eventfd,
        libc::SYS_eventfd2,
        libc::SYS_signalfd,
        libc::SYS_signalfd4,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
    ],
    // Signals: handlers, masks, alternate stacks (Go), sending (Landlock scopes sending to the
    // plugin's own processes), children by pidfd (Go, Python).
    &[
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigpending,
        libc::SYS_rt_sigsuspend,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigqueueinfo,
        libc::SYS_rt_tgsigqueueinfo,
        libc::SYS_sigaltstack,
        libc::SYS_kill,
        libc::SYS_tkill,
        libc::SYS_tgkill,
        libc::SYS_pause,
        libc::SYS_alarm,
        libc::SYS_pidfd_open,
        libc::SYS_pidfd_send_signal,
        libc::SYS_wait4,
        libc::SYS_waitid,
    ],
    // Time: clocks, sleeps, timers.
    &[
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_gettimeofday,
        libc::SYS_time,
        libc::SYS_times,
        libc::SYS_getitimer,
        libc::SYS_setitimer,
        libc::SYS_timer_create,
        libc::SYS_timer_settime,
        libc::SYS_timer_gettime,
        libc::SYS_timer_getoverrun,
        libc::SYS_timer_delete,
    ],
    // Itself: ids, limits (prlimit64 only on itself, see the refusals), the system's name and
    // figures, capabilities (Node asks), randomness, prctl (its own name, no-new-privileges,
    // a death signal), seccomp (it may only narrow its filters; the agent installs the
    // refusals through prctl and seccomp after this list).
    &[
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_getpgrp,
        libc::SYS_getpgid,
        libc::SYS_getsid,
        libc::SYS_getpriority,
        libc::SYS_getrlimit,
        libc::SYS_setrlimit,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_capget,
        libc::SYS_getrandom,
        libc::SYS_prctl,
        libc::SYS_seccomp,
    ],
    // Sockets it already holds — socket pairs (asyncio's self-pipe, IPC with threads) for
    // every plugin, its own connections with the network.
    &[
        libc::SYS_socketpair,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_getsockopt,
        libc::SYS_setsockopt,
    ],
];

/// Also allowed with `processes > 0`: new processes (fork, vfork; clone without CLONE_THREAD
/// is checked by the refusals) and moving them to a group or session of their own.
const WITH_PROCESSES: &[&[i64]] = &[&[libc::SYS_fork, libc::SYS_vfork, libc::SYS_setpgid, libc::SYS_setsid]];

/// Also allowed with `network = true`: making sockets (families checked by the refusals),
/// connecting, and accepting on them.
const WITH_NETWORK: &[&[i64]] =
    &[&[libc::SYS_socket, libc::SYS_connect, libc::SYS_bind, libc::SYS_listen, libc::SYS_accept, libc::SYS_accept4]];

/// Refused to every plugin with EPERM, whatever its profile and whatever the allow-list says.
const NEVER: &[&[i64]] = &[
    // Another process's memory, descriptors or state.
    &[
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_process_madvise,
        libc::SYS_kcmp,
        libc::SYS_pidfd_getfd,
    ],
    // Namespaces, mounts (the old API and the new one: fsopen…move_mount, open_tree), roots.
    &[
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        newer_syscalls::OPEN_TREE_ATTR,
        libc::SYS_mount_setattr,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
    ],
    // Kernel machinery a plugin has no use for and that has been a way in: BPF, perf events,
    // userfaultfd, keyrings, io_uring (whose operations no filter sees: a socket made through
    // it would pass the socket rule by).
    &[
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
    ],
    // The machine: modules, kexec, reboot, swap, accounting, quotas, clocks, host names, the
    // kernel log, I/O ports, terminals.
    &[
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_sethostname,
        libc::SYS_setdomainname,
        libc::SYS_syslog,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_vhangup,
    ],
    // Files by handle (past every path, so past Landlock), watching the whole file system, the
    // execution domain.
    &[libc::SYS_open_by_handle_at, libc::SYS_name_to_handle_at, libc::SYS_fanotify_init, libc::SYS_personality],
];

/// `clone` flags that make a namespace. CLONE_NEWTIME shares its bit with clone's exit signal
/// (signals above 64 do not exist), so checking it refuses nothing real.
const NAMESPACE_FLAGS: &[libc::c_int] = &[
    libc::CLONE_NEWUSER,
    libc::CLONE_NEWNS,
    libc::CLONE_NEWNET,
    libc::CLONE_NEWPID,
    libc::CLONE_NEWIPC,
    libc::CLONE_NEWUTS,
    libc::CLONE_NEWCGROUP,
    libc::CLONE_NEWTIME,
];

/// `seccomp_data.arch` of x86_64 (`AUDIT_ARCH_X86_64` in linux/audit.h).
const AUDIT_ARCH_X86_64: u32 = 62 | 0x8000_0000 | 0x4000_0000;
/// Set in the number of every call through the x32 table (`__X32_SYSCALL_BIT`).
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// The obsolete packet socket type of AF_INET (`SOCK_PACKET`, packet(7)).
const SOCK_PACKET: u64 = 10;

/// The first filter: a call through another ABI — the i386 one (`int 0x80`) or the x32 table,
/// whose numbers are x86_64's with bit 30 set and would pass every rule keyed on an x86_64
/// number — kills the plugin. No runtime makes one; only an attempt to get past the filter does.
fn abi_gate() -> BpfProgram {
    use libc::{BPF_ABS, BPF_JEQ, BPF_JMP, BPF_JSET, BPF_K, BPF_LD, BPF_RET, BPF_W};
    let stmt = |code: u32, k: u32| seccompiler::sock_filter { code: code as u16, jt: 0, jf: 0, k };
    let jump = |code: u32, k: u32, jt: u8, jf: u8| seccompiler::sock_filter { code: code as u16, jt, jf, k };
    // Offsets in `struct seccomp_data`: nr at 0, arch at 4.
    vec![
        stmt(BPF_LD | BPF_W | BPF_ABS, 4),
        jump(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_LD | BPF_W | BPF_ABS, 0),
        jump(BPF_JMP | BPF_JSET | BPF_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_KILL_PROCESS),
        stmt(BPF_RET | BPF_K, libc::SECCOMP_RET_ALLOW),
    ]
}

/// The allow-list of a plugin's profile.
fn allowed(policy: &Policy) -> Vec<i64> {
    let mut groups: Vec<&[i64]> = EVERY_PLUGIN.to_vec();
    if policy.processes > 0 {
        groups.extend(WITH_PROCESSES);
    }
    if policy.network {
        groups.extend(WITH_NETWORK);
    }
    let mut calls: Vec<i64> = groups.concat();
    calls.sort_unstable();
    calls.dedup();
    calls
}

/// The refusals of a plugin's profile: a call matching any of its rules fails with EPERM.
fn refusals(policy: &Policy) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{MaskedEq, Ne};
    let rule = |conditions: Vec<SeccompCondition>| SeccompRule::new(conditions);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = NEVER.concat().into_iter().map(|s| (s, vec![])).collect();
    // clone: never a new namespace; without processes, threads only.
    let mut clone = Vec::new();
    for &flag in NAMESPACE_FLAGS {
        let flag = flag as u64;
        clone.push(rule(vec![SeccompCondition::new(0, Qword, MaskedEq(flag), flag)?])?);
    }
    if policy.processes == 0 {
        let thread = libc::CLONE_THREAD as u64;
        clone.push(rule(vec![SeccompCondition::new(0, Qword, MaskedEq(thread), 0)?])?);
        rules.insert(libc::SYS_fork, vec![]);
        rules.insert(libc::SYS_vfork, vec![]);
    }
    rules.insert(libc::SYS_clone, clone);
    if policy.network {
        // Internet sockets only, stream or datagram: no UNIX sockets (the agent's status
        // socket, journald, D-Bus are pathname sockets Landlock does not mediate), netlink,
        // packet or raw sockets. The type's low four bits are the type, the rest flags.
        let family = |f: libc::c_int| SeccompCondition::new(0, Dword, Ne, f as u64);
        let kind = |t: u64| SeccompCondition::new(1, Dword, MaskedEq(0xf), t);
        let socket = vec![
            rule(vec![family(libc::AF_INET)?, family(libc::AF_INET6)?])?,
            rule(vec![kind(libc::SOCK_RAW as u64)?])?,
            rule(vec![kind(SOCK_PACKET)?])?,
        ];
        rules.insert(libc::SYS_socket, socket);
    } else {
        rules.insert(libc::SYS_socket, vec![]);
    }
    // Limits of another process (the agent runs as the same user): neither read nor set.
    rules.insert(libc::SYS_prlimit64, vec![rule(vec![SeccompCondition::new(0, Dword, Ne, 0)?])?]);
    Ok(rules)
}

/// The plugin's filters, installed in this order. The kernel runs each on every call and the
/// strictest answer wins; of two errnos, the later filter's. So:
/// 1. [`abi_gate`]: another ABI kills the plugin (SIGSYS);
/// 2. the allow-list of its profile: a call not listed fails with ENOSYS, as on a kernel that
///    lacks it, so runtimes take the path they have for older kernels (clone3 → clone);
/// 3. the [`refusals`], with EPERM, which wins over the allow-list's ENOSYS.
fn seccomp(policy: &Policy) -> Result<Vec<BpfProgram>, SandboxError> {
    let err = |e: seccompiler::BackendError| SandboxError::Seccomp(e.to_string());
    let arch = seccompiler::TargetArch::x86_64;
    let listed = allowed(policy).into_iter().map(|s| (s, vec![])).collect();
    let allow = SeccompFilter::new(listed, SeccompAction::Errno(libc::ENOSYS as u32), SeccompAction::Allow, arch)
        .map_err(err)?;
    let refuse = SeccompFilter::new(
        refusals(policy).map_err(err)?,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(err)?;
    Ok(vec![abi_gate(), BpfProgram::try_from(allow).map_err(err)?, BpfProgram::try_from(refuse).map_err(err)?])
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The profiles docs/PLUGINS.md names.
    fn profiles() -> Vec<(&'static str, Policy)> {
        let policy = |network: bool, processes: u32| Policy {
            read: vec![],
            write: vec![],
            network,
            processes,
            memory_bytes: 256 << 20,
            cpu_seconds: 600,
            open_files: 256,
            file_bytes: 256 << 20,
            env: BTreeMap::new(),
            home: PathBuf::from("/nonexistent"),
        };
        vec![
            ("stdio only", policy(false, 0)),
            ("processes", policy(false, 1)),
            ("network", policy(true, 0)),
            ("network and processes", policy(true, 1)),
        ]
    }

    #[test]
    fn no_allow_list_lets_a_refused_call_or_clone3_through() {
        let all: Vec<i64> = [EVERY_PLUGIN, WITH_PROCESSES, WITH_NETWORK].concat().concat();
        let mut once = all.clone();
        once.sort_unstable();
        once.dedup();
        assert_eq!(once.len(), all.len(), "a call is listed in two groups");
        for (name, policy) in profiles() {
            let allowed = allowed(&policy);
            for call in NEVER.concat().into_iter().chain([libc::SYS_clone3]) {
                assert!(!allowed.contains(&call), "{name}: system call {call} is refused but listed");
            }
            assert_eq!(allowed.contains(&libc::SYS_socket), policy.network, "{name}");
            assert_eq!(allowed.contains(&libc::SYS_fork), policy.processes > 0, "{name}");
        }
    }

    /// The figures of docs/PLUGINS.md: `cargo test -p zhuli filter_sizes -- --nocapture`.
    #[test]
    fn filter_sizes() {
        for (name, policy) in profiles() {
            let sizes: Vec<usize> = seccomp(&policy).expect("the filters build").iter().map(Vec::len).collect();
            let total: usize = sizes.iter().sum();
            println!("{name}: {} calls allowed; BPF instructions {sizes:?}, {total} in all", allowed(&policy).len());
            // BPF_MAXINSNS: the kernel refuses a longer filter.
            assert!(sizes.iter().all(|&n| n <= 4096), "{name}: {sizes:?}");
        }
    }
}
