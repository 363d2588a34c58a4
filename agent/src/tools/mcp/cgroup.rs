//! Each plugin in a control group of its own, so that no plugin can take what the agent needs:
//! its own task, memory and CPU limits, and everything it started killed at once.
//!
//! `zhuli.service` delegates its cgroup to the agent (`Delegate=pids memory cpu`,
//! `ProtectControlGroups=private`, so the service's cgroup is the root of the agent's cgroup
//! namespace): the agent moves itself into `agent/` at its first plugin, and makes beside it
//!
//! ```text
//! <zhuli.service>/        the service's limits (MemoryMax=, TasksMax=), systemd's
//!   agent/                the agent
//!   plugins/              all plugins together: the service's limits less a reserve for the agent
//!     <name>/             one plugin: pids.max, memory.max (its home folder, a tmpfs, counts),
//!                         no swap, cpu.max; the OOM killer takes the whole group
//! ```
//!
//! A plugin's process joins its group between fork and exec (`sandbox`), before anything else
//! runs. Outside the unit (development, tests) there is no delegated cgroup: plugins are then
//! limited by rlimits only, and the status says so.

use std::{
    fs::File,
    io::Write,
    path::{Path, PathBuf},
};

/// Tasks and memory kept for the agent when the service's limits are shared with plugins.
const AGENT_TASKS: u64 = 128;
const AGENT_MEMORY: u64 = 96 * 1024 * 1024;
const CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];

/// The `plugins/` group of a delegated cgroup tree.
#[derive(Debug)]
pub struct Tree {
    base: PathBuf,
}

/// The limits of one plugin's group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub tasks: u64,
    pub memory_bytes: u64,
    /// Percent of one CPU.
    pub cpu_percent: u32,
}

/// What the kernel counted against a plugin's limits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Events {
    /// Task creations refused at `pids.max`.
    pub tasks_refused: u64,
    /// Processes the OOM killer ended at `memory.max`.
    pub oom_kills: u64,
}

/// The limit a plugin reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Tasks (threads and processes), the limit.
    Tasks(u64),
    /// Memory, its home folder included, in bytes.
    Memory(u64),
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Tasks(n) => write!(f, "it tried to run more than {n} tasks (threads and processes)"),
            Limit::Memory(b) => {
                write!(f, "it reached its memory limit of {} MB (its home folder counts toward it)", b >> 20)
            }
        }
    }
}

impl Limit {
    /// The same for the admins' chat, in the box's language.
    pub fn said(&self) -> String {
        match self {
            Limit::Tasks(n) => rust_i18n::t!("plugin.tasks", n = n),
            Limit::Memory(b) => rust_i18n::t!("plugin.memory", mb = b >> 20),
        }
        .into_owned()
    }
}

impl Events {
    /// The limit that was reached, if any.
    pub fn limit(&self, limits: &Limits) -> Option<Limit> {
        if self.oom_kills > 0 {
            Some(Limit::Memory(limits.memory_bytes))
        } else if self.tasks_refused > 0 {
            Some(Limit::Tasks(limits.tasks))
        } else {
            None
        }
    }
}

fn write(path: &Path, value: &str) -> std::io::Result<()> {
    File::options().write(true).open(path)?.write_all(value.as_bytes())
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// `key value` lines of a cgroup `*.events` or `*.stat` file.
fn field(path: &Path, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
        })
        .unwrap_or(0)
}

impl Tree {
    /// The delegated tree, set up: `None` when the agent does not run in a delegated `agent/`
    /// group (then plugins get rlimits only).
    pub fn detect() -> Option<Tree> {
        // Started by systemd (a service has an invocation id) at the root of its own cgroup
        // namespace (`ProtectControlGroups=private`): the service's cgroup, delegated to us.
        std::env::var_os("INVOCATION_ID")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let path = own.lines().find_map(|l| l.strip_prefix("0::"))?.trim().to_owned();
        let service = match path.as_str() {
            "/" => PathBuf::from("/sys/fs/cgroup"),
            // Already moved into agent/ (an earlier start of this process's tree).
            "/agent" => PathBuf::from("/sys/fs/cgroup"),
            _ => return None,
        };
        if nix::unistd::access(&service.join("cgroup.subtree_control"), nix::unistd::AccessFlags::W_OK).is_err() {
            return None;
        }
        match Tree::set_up(&service) {
            Ok(tree) => Some(tree),
            Err(e) => {
                log::warn!(
                    "plugins: the delegated cgroup {} cannot be used ({e}); plugins are limited by rlimits only",
                    service.display()
                );
                None
            }
        }
    }

    fn set_up(service: &Path) -> std::io::Result<Tree> {
        let available = std::fs::read_to_string(service.join("cgroup.controllers"))?;
        for c in CONTROLLERS {
            if !available.split_whitespace().any(|a| a == c) {
                return Err(std::io::Error::other(format!("the {c} controller is not delegated")));
            }
        }
        // The agent leaves the service's own group for agent/ (a group with processes cannot
        // hand controllers to its children); all its threads go with it.
        let agent = service.join("agent");
        if !agent.exists() {
            std::fs::create_dir(&agent)?;
        }
        write(&agent.join("cgroup.procs"), "0")?;
        let enable = CONTROLLERS.map(|c| format!("+{c}")).join(" ");
        write(&service.join("cgroup.subtree_control"), &enable)?;
        let base = service.join("plugins");
        if base.exists() {
            // Left by an agent that died: nothing of it may keep running.
            for entry in std::fs::read_dir(&base)?.flatten().filter(|e| e.path().is_dir()) {
                let _ = Group::at(entry.path()).remove();
            }
        } else {
            std::fs::create_dir(&base)?;
        }
        write(&base.join("cgroup.subtree_control"), &enable)?;
        // Together, plugins leave the agent its share of the service's limits.
        let share = |file: &str, reserve: u64| -> std::io::Result<()> {
            match read_u64(&service.join(file)) {
                Some(limit) => write(&base.join(file), &limit.saturating_sub(reserve).max(1).to_string()),
                None => Ok(()),
            }
        };
        share("pids.max", AGENT_TASKS)?;
        share("memory.max", AGENT_MEMORY)?;
        // Under contention the agent gets twice the CPU of all plugins together.
        write(&base.join("cpu.weight"), "50")?;
        Ok(Tree { base })
    }

    /// A fresh group for one start of plugin `name`.
    pub fn group(&self, name: &str, limits: Limits) -> std::io::Result<Group> {
        let dir = self.base.join(name);
        if dir.exists() {
            Group::at(dir.clone()).remove()?;
        }
        std::fs::create_dir(&dir)?;
        let group = Group::at(dir);
        let quota = u64::from(limits.cpu_percent.max(1)) * 1000;
        let set = || -> std::io::Result<()> {
            write(&group.dir.join("pids.max"), &limits.tasks.to_string())?;
            write(&group.dir.join("memory.max"), &limits.memory_bytes.to_string())?;
            write(&group.dir.join("memory.swap.max"), "0")?;
            write(&group.dir.join("memory.oom.group"), "1")?;
            write(&group.dir.join("cpu.max"), &format!("{quota} 100000"))
        };
        if let Err(e) = set() {
            let _ = group.remove();
            return Err(e);
        }
        Ok(group)
    }
}

/// One plugin's group.
#[derive(Debug)]
pub struct Group {
    dir: PathBuf,
}

impl Group {
    fn at(dir: PathBuf) -> Group {
        Group { dir }
    }

    /// `cgroup.procs`, opened for the child to write itself into (close-on-exec).
    pub fn procs(&self) -> std::io::Result<File> {
        File::options().write(true).open(self.dir.join("cgroup.procs"))
    }

    pub fn events(&self) -> Events {
        Events {
            tasks_refused: field(&self.dir.join("pids.events"), "max"),
            oom_kills: field(&self.dir.join("memory.events"), "oom_kill"),
        }
    }

    /// Tasks and memory in use now.
    pub fn usage(&self) -> (u64, u64) {
        (read_u64(&self.dir.join("pids.current")).unwrap_or(0), read_u64(&self.dir.join("memory.current")).unwrap_or(0))
    }

    /// Kill every process in the group at once (`cgroup.kill`).
    pub fn kill(&self) {
        if let Err(e) = write(&self.dir.join("cgroup.kill"), "1") {
            log::warn!("cannot kill the plugin group {}: {e}", self.dir.display());
        }
    }

    /// Kill what is left and remove the group (waits up to 5 s for the processes to go: a
    /// fork bomb's hundred processes take a while on a slow box).
    pub fn remove(&self) -> std::io::Result<()> {
        self.kill();
        for _ in 0..500 {
            let populated = field(&self.dir.join("cgroup.events"), "populated");
            if populated == 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::fs::remove_dir(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_say_which_limit_was_reached() {
        let limits = Limits { tasks: 112, memory_bytes: 64 << 20, cpu_percent: 50 };
        assert_eq!(Events::default().limit(&limits), None);
        let tasks = Events { tasks_refused: 3, oom_kills: 0 }.limit(&limits).expect("tasks");
        let said = crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || tasks.said());
        assert!(tasks.to_string().contains("112 tasks") && said.contains("112 个任务"), "{tasks}");
        let memory = Events { tasks_refused: 3, oom_kills: 1 }.limit(&limits).expect("memory");
        assert!(memory.to_string().contains("64 MB") && memory.to_string().contains("home folder"), "{memory}");
    }

    #[test]
    fn fields_of_an_events_file() {
        let dir = std::env::temp_dir().join(format!("zhuli-cg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("memory.events"), "low 0\nhigh 0\nmax 12\noom 2\noom_kill 1\noom_group_kill 1\n")
            .expect("file");
        assert_eq!(field(&dir.join("memory.events"), "oom_kill"), 1);
        assert_eq!(field(&dir.join("memory.events"), "max"), 12);
        assert_eq!(field(&dir.join("memory.events"), "none"), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
