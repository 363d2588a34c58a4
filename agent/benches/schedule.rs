//! Figures for people's jobs and the nightly backup (docs/ARCHITECTURE.md), printed, never
//! asserted:
//!
//! 1. with `ZHULI_BIN` set to a built `zhuli`: what the scheduler costs an idle `zhuli run`
//!    connected to the simulator, with no jobs and with 500 (`max_jobs`), none due for an hour —
//!    context switches of all its threads per hour (by thread name), CPU and RSS over a window at
//!    the default settings; and the same with `[schedule] wake_ms = 100`, where the scheduler
//!    (and the nightly-backup loop, which shares that wake) looks ten times a second, to give the
//!    cost of one look with and without the 500 jobs, extrapolated to the default rate;
//! 2. with `ZHULI_BIN`: how late jobs fire — 200 one-off reminders seeded through the store with
//!    their `next_ms` seconds ahead (not the minute people can write: it avoids waiting for real
//!    minutes), 25 due at the same millisecond at each of 8 moments, from each one's due time to
//!    its reply arriving at the simulator, p50/p99/max;
//! 3. the backup of a store that recorded 10,000 messages (each accepted, answered, delivered and
//!    kept in its conversation's history, by the calls the agent makes): the snapshot's time and
//!    size beside the store file's, its verification, and with rclone installed the off-site copy
//!    to rclone's WebDAV server (upload, fetch back and verify, prune), as the nightly run does.
//!
//! Jobs are put in the store before the agent starts, with the store API and the key file the
//! agent's configuration names; the store is the agent's alone while it runs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Child,
    time::{Duration, Instant},
};
use zhuli::clock::now_ms;

use zhuli::{
    app,
    config::Config,
    dingtalk::{
        Content,
        message::{ConversationKind, RobotMessage},
        sender::Reply,
    },
    schedule::{Action, Job, Rule},
    store::{OutboxEntry, Retention, Role, Store, Turn, WriteOp, backup, key::StoreKey},
};
use zhuli_sim::dingtalk::{SimConfig, Simulator};

const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;
const DAY: i64 = 24 * HOUR;
/// The office's offset the jobs' rules use (`[assistant] utc_offset_minutes`'s default).
const OFFSET: i32 = 480;

/// A fresh scratch directory for one figure.
fn bench_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("zhuli-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("bench dir");
    dir
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0)
}

/// Realistic office chat text of about `chars` characters, the same for the same `seed`.
fn chinese_text(seed: u64, chars: usize) -> String {
    const PARTS: &[&str] = &[
        "请帮我把上周的销售数据整理成表格，",
        "明天上午十点在三楼会议室开季度复盘会，",
        "客户那边反馈合同第七条的付款期限需要再确认一下，",
        "财务部提醒大家本月报销单务必在二十五号之前提交，",
        "新版本的安装包已经上传到共享盘的发布目录，",
        "麻烦看一下这个审批为什么一直卡在部门经理那里，",
        "下午两点的供应商电话会议改到四点半，",
        "我们组下周要出差去杭州，住宿标准按公司规定执行，",
        "这份方案的预算部分还需要市场部补充数据，",
        "打印机又卡纸了，行政那边说明天才能来修，",
        "年会节目报名截止到本周五，请各部门尽快统计，",
        "服务器机房的空调温度偏高，已经通知物业处理，",
        "面试安排在周三下午，候选人简历已经发到你的邮箱，",
        "项目进度比计划慢了大约一周，主要是测试环境不稳定。",
        "好的，收到，我这边马上处理。",
        "根据考勤记录，张三上个月有两天忘记打卡，需要补签。",
    ];
    let mut z = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = String::new();
    while out.chars().count() < chars {
        z ^= z << 13;
        z ^= z >> 7;
        z ^= z << 17;
        out.push_str(PARTS[(z % PARTS.len() as u64) as usize]);
    }
    out.chars().take(chars).collect()
}

/// The agent's configuration against `sim`, its state and key under `dir`, with `extra` added;
/// written to `dir/zhuli.toml` and parsed as the agent will parse it.
fn write_config(sim: &Simulator, dir: &Path, extra: &str) -> (PathBuf, Config) {
    let state = dir.join("state");
    std::fs::create_dir_all(&state).expect("state dir");
    let key = dir.join("store-key");
    if !key.exists() {
        StoreKey::generate().write_new(&key).expect("store key");
    }
    let text = format!(
        "[agent]\nstate_dir = {state:?}\n[store]\nkey_file = {key:?}\n[dingtalk]\nclient_id = {id:?}\nclient_secret = {secret:?}\n\
         robot_code = {id:?}\napi_base = {base:?}\n[dingtalk.limits]\nchat_messages_per_minute = 1000000\nopenapi_per_second = 100000\n{extra}",
        state = state.display().to_string(),
        key = key.display().to_string(),
        id = sim.config().client_id,
        secret = sim.config().client_secret,
        base = sim.api_base(),
    );
    let path = dir.join("zhuli.toml");
    std::fs::write(&path, &text).expect("config");
    let config = Config::parse(&text, &path).expect("bench config");
    (path, config)
}

/// Keep `jobs` in the store the configuration names (opened and closed again, as before a start).
fn seed_jobs(config: &Config, jobs: &[Job]) {
    let store = app::open_store(config).expect("store");
    for job in jobs {
        store.add_job(job).expect("job kept");
    }
}

fn job(i: usize, owner: &str, action: Action, rule: Rule, next_ms: i64, now: i64) -> Job {
    Job {
        origin: format!("bench-origin-{i}"),
        owner: owner.to_owned(),
        nick: format!("同事{owner}"),
        conversation_id: format!("cid-{owner}=="),
        group: false,
        action,
        rule,
        next_ms,
        created_ms: now,
        paused: None,
        fired: 0,
        missed: 0,
        ended_ms: None,
    }
}

/// 500 jobs of 25 people, rules of every kind, none due in the next hour.
fn idle_jobs(n: usize) -> Vec<Job> {
    let now = now_ms();
    (0..n)
        .map(|i| {
            let minute = ((i * 37) % 1440) as u16;
            let rule = match i % 10 {
                0..=3 => Rule::Daily { minute },
                4 | 5 => Rule::Weekdays { minute },
                6 | 7 => Rule::Weekly { days: 0b001_0101, minute },
                8 => Rule::Monthly { day: (i % 28 + 1) as u8, minute },
                _ => Rule::Once { at_ms: now + 7 * DAY + i as i64 * MINUTE },
            };
            let next = rule.next_after(now + HOUR, OFFSET).expect("every rule here has a next time");
            let action = if i % 4 == 3 {
                Action::Task(chinese_text(i as u64, 40))
            } else {
                Action::Remind(chinese_text(i as u64, 30))
            };
            job(i, &format!("staff{:02}", i % 25), action, rule, next, now)
        })
        .collect()
}

fn spawn_agent(bin: &Path, config: &Path) -> Child {
    std::process::Command::new(bin)
        .args(["run", "--config"])
        .arg(config)
        .env("ZHULI_LOG", "error")
        .spawn()
        .expect("spawn zhuli")
}

fn proc_field(pid: u32, key: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(key)).map(|l| l[key.len()..].trim().to_owned()))
        .unwrap_or_default()
}

/// CPU time of the whole process (exited threads included), in clock ticks (USER_HZ = 100).
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0 };
    let Some(rest) = stat.rfind(')').map(|at| &stat[at + 2..]) else { return 0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// Context switches of each live thread of `pid`, by thread id: its name, voluntary ones (it
/// slept and was woken: a wake-up) and involuntary ones (preempted: the machine's load).
fn thread_switches(pid: u32) -> BTreeMap<String, (String, u64, u64)> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else { continue };
        let field = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0)
        };
        let name = status.lines().find_map(|l| l.strip_prefix("Name:")).unwrap_or("?").trim().to_owned();
        let counts = (name, field("voluntary_ctxt_switches:"), field("nonvoluntary_ctxt_switches:"));
        out.insert(task.file_name().to_string_lossy().into_owned(), counts);
    }
    out
}

/// What one window of an agent's life cost.
struct Window {
    secs: f64,
    /// Voluntary context switches of all live threads.
    wakeups: u64,
    /// Involuntary ones.
    preempted: u64,
    /// Wake-ups of each thread that woke, most first, with its name.
    threads_woken: Vec<(String, u64)>,
    ticks: u64,
    /// Threads that started or ended during the window (their switches are partly missing).
    churn: usize,
    rss: String,
    anon: String,
    threads: String,
}

impl Window {
    fn per_hour(&self, n: u64) -> f64 {
        n as f64 * 3600.0 / self.secs
    }

    fn cpu_percent(&self) -> f64 {
        self.ticks as f64 / 100.0 / self.secs * 100.0
    }
}

/// Watch process `pid` for `secs`.
fn watch(pid: u32, secs: u64) -> Window {
    let before = thread_switches(pid);
    let t0 = cpu_ticks(pid);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(secs));
    let after = thread_switches(pid);
    let ticks = cpu_ticks(pid) - t0;
    let secs = started.elapsed().as_secs_f64();
    let (mut wakeups, mut preempted, mut threads_woken) = (0, 0, Vec::new());
    for (tid, (name, vol, invol)) in &after {
        let (was_vol, was_invol) = before.get(tid).map_or((0, 0), |(_, v, i)| (*v, *i));
        wakeups += vol - was_vol;
        preempted += invol - was_invol;
        if *vol > was_vol {
            threads_woken.push((name.clone(), vol - was_vol));
        }
    }
    threads_woken.sort_by_key(|t| std::cmp::Reverse(t.1));
    let churn = before.keys().filter(|t| !after.contains_key(*t)).count()
        + after.keys().filter(|t| !before.contains_key(*t)).count();
    Window {
        secs,
        wakeups,
        preempted,
        threads_woken,
        ticks,
        churn,
        rss: proc_field(pid, "VmRSS:"),
        anon: proc_field(pid, "RssAnon:"),
        threads: proc_field(pid, "Threads:"),
    }
}

/// Run `zhuli run` with `jobs` seeded and `extra` configuration; watch it for `secs` once it is
/// connected and settled.
fn agent_window(bin: &Path, tag: &str, jobs: &[Job], extra: &str, secs: u64) -> Window {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async {
        let sim = Simulator::start(SimConfig::default()).await.expect("sim");
        let dir = bench_dir(tag);
        let (path, config) = write_config(&sim, &dir, extra);
        seed_jobs(&config, jobs);
        let mut child = spawn_agent(bin, &path);
        let up = sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty()).await;
        if !up {
            println!("{tag}: the agent did not connect within 10 s; the figure below is of an agent retrying");
        }
        // Start-up done (the pipeline's first queue, the first look, the first health sample).
        tokio::time::sleep(Duration::from_secs(6)).await;
        let pid = child.id();
        let w = tokio::task::spawn_blocking(move || watch(pid, secs)).await.expect("watch");
        let _ = child.kill();
        let _ = child.wait();
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
        w
    })
}

/// One look of the scheduler over `jobs` as it does it (read and open every job, see what is due),
/// in this process: its time, median of 50.
fn one_look(jobs: &[Job]) -> Duration {
    let dir = bench_dir("look");
    let key = StoreKey::generate();
    let store = Store::open(&dir.join("zhuli.redb"), &key, Retention::default()).expect("store");
    for job in jobs {
        store.add_job(job).expect("job kept");
    }
    let mut times: Vec<Duration> = (0..50)
        .map(|_| {
            let start = Instant::now();
            let now = now_ms();
            let due = store
                .jobs()
                .expect("jobs")
                .iter()
                .filter(|(_, j)| zhuli::schedule::due(&j.rule, j.next_ms, now, HOUR, OFFSET).is_some())
                .count();
            std::hint::black_box(due);
            start.elapsed()
        })
        .collect();
    times.sort();
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
    times[times.len() / 2]
}

fn scheduler_idle(bin: &Path) {
    const WINDOW_S: u64 = 45;
    const FAST_S: u64 = 15;
    let defaults = Config::parse(
        "[dingtalk]\nclient_id = \"b\"\nclient_secret = \"b\"\nrobot_code = \"b\"\n",
        Path::new("defaults.toml"),
    )
    .expect("defaults");
    let wake = Duration::from_millis(defaults.schedule.wake_ms.max(100));
    let beat = defaults.health.task_deadline_ms.get() / 2;
    let every = wake.min(beat);
    let looks_per_hour = 3600.0 / every.as_secs_f64();
    let max_jobs = defaults.schedule.max_jobs;
    let jobs = idle_jobs(max_jobs);

    let look0 = one_look(&[]);
    let look = one_look(&jobs);
    println!(
        "scheduler: one look (read and open every job, check what is due), in process: {look0:?} with 0 jobs, {look:?} with {max_jobs}"
    );

    let mut idle = Vec::new();
    for (n, seeded) in [(0, &jobs[..0]), (max_jobs, &jobs[..])] {
        let w = agent_window(bin, &format!("sched-idle-{n}"), seeded, "", WINDOW_S);
        let woken: Vec<String> =
            w.threads_woken.iter().map(|(name, s)| format!("{name} {:.0}", w.per_hour(*s))).collect();
        println!(
            "scheduler idle, {n} jobs (default settings: looks every {every:?} = min([schedule] wake_ms {wake:?}, half of [health] task_deadline_ms {beat:?})): \
             {:.0} wake-ups/hour for the whole agent (voluntary context switches of all threads over {:.0} s; by thread: {}; \
             {:.0}/hour more preempted), CPU {:.3}% of one core, VmRSS {} (anonymous {}), {} threads{}",
            w.per_hour(w.wakeups),
            w.secs,
            woken.join(", "),
            w.per_hour(w.preempted),
            w.cpu_percent(),
            w.rss,
            w.anon,
            w.threads,
            if w.churn > 0 {
                format!(" ({} thread(s) came or went in the window: their switches are partly missing)", w.churn)
            } else {
                String::new()
            },
        );
        idle.push(w);
    }
    println!(
        "scheduler idle, {max_jobs} jobs vs none, measured: {:+.0} wake-ups/hour, {:+.3}% CPU \
         (two separate runs, their noise included; one 10 ms CPU tick over {WINDOW_S} s is 0.022%)",
        idle[1].per_hour(idle[1].wakeups) - idle[0].per_hour(idle[0].wakeups),
        idle[1].cpu_percent() - idle[0].cpu_percent(),
    );

    // Ten looks a second: the cost of a look is big enough to count.
    let fast = "[schedule]\nwake_ms = 100\n";
    let f0 = agent_window(bin, "sched-fast-0", &[], fast, FAST_S);
    let f1 = agent_window(bin, "sched-fast-500", &jobs, fast, FAST_S);
    // A look's time is counted in: the scheduler sleeps 100 ms after a look, not between starts.
    let looks = |w: &Window, t: Duration| w.secs / (0.1 + t.as_secs_f64());
    let (l0, l1) = (looks(&f0, look0), looks(&f1, look));
    let idle_rate = idle[0].wakeups as f64 / idle[0].secs;
    let per_wake = (f0.wakeups as f64 - idle_rate * f0.secs) / l0;
    let per_look_jobs = (f1.wakeups as f64 / l1) - (f0.wakeups as f64 / l0);
    let cpu_jobs_ms = (f1.ticks as f64 * 10.0 / l1) - (f0.ticks as f64 * 10.0 / l0);
    println!(
        "scheduler looking every 100 ms (wake_ms = 100; the nightly-backup loop wakes at the same rate and reads its state), \
         {FAST_S} s each: ≈ {l0:.0} looks with 0 jobs, {} wake-ups ({} preempted), {} CPU ticks; ≈ {l1:.0} looks with \
         {max_jobs} jobs, {} wake-ups ({} preempted), {} CPU ticks",
        f0.wakeups, f0.preempted, f0.ticks, f1.wakeups, f1.preempted, f1.ticks
    );
    println!(
        "scheduler per look: ≈ {per_wake:.1} wake-ups for a wake of the two loops beyond the idle agent's; with {max_jobs} jobs \
         {per_look_jobs:+.2} wake-ups and {cpu_jobs_ms:+.2} ms CPU more"
    );
    println!(
        "scheduler extrapolated to the default {looks_per_hour:.0} looks/hour: ≈ {:.0} wake-ups/hour for the two loops' wakes \
         (of the idle agent's {:.0}); {max_jobs} jobs add ≈ {:+.0} wake-ups/hour and ≈ {:+.1} s CPU/hour ({:+.3}% of a core)",
        per_wake * looks_per_hour,
        idle[0].per_hour(idle[0].wakeups),
        per_look_jobs * looks_per_hour,
        cpu_jobs_ms * looks_per_hour / 1000.0,
        cpu_jobs_ms * looks_per_hour / 1000.0 / 3600.0 * 100.0,
    );
}

fn job_lateness(bin: &Path) {
    const MOMENTS: usize = 8;
    const PER_MOMENT: usize = 25;
    const APART: i64 = 2_000;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    rt.block_on(async {
        let sim = Simulator::start(SimConfig::default()).await.expect("sim");
        let dir = bench_dir("sched-late");
        let (path, config) = write_config(&sim, &dir, "");
        let now = now_ms();
        let first = now + 10_000;
        let mut due = Vec::new();
        let jobs: Vec<Job> = (0..MOMENTS * PER_MOMENT)
            .map(|i| {
                let at = first + (i / PER_MOMENT) as i64 * APART;
                due.push(at);
                // 40 people: at each moment some have two reminders in the same chat.
                let text = format!("{} 编号{i:03}", chinese_text(i as u64, 20));
                job(i, &format!("staff{:02}", i % 40), Action::Remind(text), Rule::Once { at_ms: at }, at, now)
            })
            .collect();
        seed_jobs(&config, &jobs);
        let mut child = spawn_agent(bin, &path);
        let up = sim.wait_until(Duration::from_secs(10), |s| !s.connections().is_empty()).await;
        // The simulator's clock (`at_ms` of a reply) against the wall clock.
        let sim_epoch = now_ms() - sim.elapsed_ms() as i64;
        if !up || now_ms() > first {
            println!("job lateness: the agent was not connected before the first job was due; figures include its start");
        }
        let n = jobs.len();
        let deadline = Instant::now() + Duration::from_millis((first - now_ms()).max(0) as u64 + 30_000 + 8 * 2_000);
        let numbered = |s: &Simulator| {
            s.replies()
                .into_iter()
                .filter_map(|r| {
                    let at = r.text.find("编号")?;
                    let i: usize = r.text[at + "编号".len()..].get(..3)?.parse().ok()?;
                    Some((i, sim_epoch + r.at_ms as i64))
                })
                .collect::<BTreeMap<usize, i64>>()
        };
        while Instant::now() < deadline && numbered(&sim).len() < n {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let got = numbered(&sim);
        let mut late: Vec<i64> = got.iter().map(|(i, at)| at - due[*i]).collect();
        late.sort();
        let mut last_of_moment: Vec<i64> = (0..MOMENTS)
            .filter_map(|m| (m * PER_MOMENT..(m + 1) * PER_MOMENT).filter_map(|i| got.get(&i).map(|at| at - due[i])).max())
            .collect();
        last_of_moment.sort();
        println!(
            "job lateness (due time → reply at the simulator; {n} one-off reminders seeded with next_ms seconds ahead, {PER_MOMENT} due \
             at the same ms at each of {MOMENTS} moments {APART} ms apart, 40 people, default settings): {} of {n} arrived; \
             p50 {} ms, p99 {} ms, max {} ms; the last of each moment's {PER_MOMENT}: median {} ms",
            got.len(),
            percentile(&late, 0.5),
            percentile(&late, 0.99),
            late.last().copied().unwrap_or(0),
            percentile(&last_of_moment, 0.5),
        );
        let _ = child.kill();
        let _ = child.wait();
        sim.shutdown().await;
        let _ = std::fs::remove_dir_all(&dir);
    });
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The history key of a person in a chat, as the assistant makes it.
fn history_key(chat: &str, who: &str) -> String {
    format!("{chat}\u{1f}{who}")
}

/// A store that recorded `n` messages in `conversations` 1:1 chats with the agent's calls: each
/// accepted (processed id and inbox) and its reply staged and delivered, 100 to a commit as the
/// agent's group commit does under load; the question and its answer appended to the
/// conversation's history in one commit each, as the assistant does. The time it took.
fn fill_store(store: &Store, n: usize, conversations: usize) -> Duration {
    let start = Instant::now();
    let batch = conversations.min(100);
    for from in (0..n).step_by(batch) {
        let now = now_ms();
        let messages: Vec<RobotMessage> = (from..(from + batch).min(n))
            .map(|i| {
                let who = format!("staff{:04}", i % conversations);
                RobotMessage {
                    msg_id: format!("msg{:016x}", (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                    conversation_id: format!("cid-{who}=="),
                    conversation_kind: ConversationKind::Single,
                    conversation_title: None,
                    sender_id: format!("$:LWCP_v1:${who}"),
                    sender_staff_id: Some(who.clone()),
                    sender_nick: format!("同事{who}"),
                    is_admin: false,
                    mentions_robot: true,
                    robot_code: None,
                    created_at_ms: Some(now),
                    session_webhook: None,
                    content: Content::Text(chinese_text(i as u64, 100 + (i * 7919) % 201)),
                }
            })
            .collect();
        let offered: Vec<(&RobotMessage, bool)> = messages.iter().map(|m| (m, true)).collect();
        let seqs: Vec<u64> = store
            .accept_batch(&offered, now)
            .expect("accepted")
            .into_iter()
            .filter_map(|a| match a {
                zhuli::store::Acceptance::Queued(seq) => Some(seq),
                _ => None,
            })
            .collect();
        let answers: Vec<String> =
            messages.iter().enumerate().map(|(k, _)| chinese_text((from + k) as u64 ^ 0xa5a5, 120 + k % 150)).collect();
        let entries: Vec<OutboxEntry> = messages
            .iter()
            .zip(&answers)
            .map(|(m, a)| OutboxEntry {
                msg_id: m.msg_id.clone(),
                reply: Reply::to(m, "助理", a.clone()),
                staged_at_ms: now,
                card: None,
            })
            .collect();
        let stage: Vec<WriteOp<'_>> =
            seqs.iter().zip(&entries).map(|(seq, entry)| WriteOp::Stage { seq: *seq, entry, also: &[] }).collect();
        store.write(&stage).expect("staged");
        store.delivered(&seqs).expect("delivered");
        for (m, a) in messages.iter().zip(&answers) {
            let question = Turn { role: Role::User, text: m.text().unwrap_or_default(), at_ms: now };
            let answer = Turn { role: Role::Assistant, text: a.clone(), at_ms: now };
            let who = m.sender_staff_id.as_deref().unwrap_or_default();
            store.finish_turn(&history_key(&m.conversation_id, who), &[question, answer], &[]).expect("turn kept");
        }
    }
    start.elapsed()
}

fn backup_figures() {
    const MESSAGES: usize = 10_000;
    const CONVERSATIONS: usize = 500;
    let dir = bench_dir("backup");
    let key = StoreKey::generate();
    let file = dir.join("state/zhuli.redb");
    std::fs::create_dir_all(dir.join("state")).expect("state");
    let store = Store::open(&file, &key, Retention::default()).expect("store");
    let filled = fill_store(&store, MESSAGES, CONVERSATIONS);
    let kept: usize = (0..CONVERSATIONS)
        .map(|c| {
            let who = format!("staff{c:04}");
            store.history(&history_key(&format!("cid-{who}=="), &who)).map(|h| h.len()).unwrap_or(0)
        })
        .sum();
    println!(
        "backup: a store that recorded {MESSAGES} messages (100–300 Chinese characters each, answered, in {CONVERSATIONS} chats; \
         {kept} history turns kept, {MESSAGES} processed ids) filled in {:.1} s; store file {} ({} bytes)",
        filled.as_secs_f64(),
        mib(file_size(&file)),
        file_size(&file),
    );
    // Taken while the store is open, as the nightly run does beside the running agent.
    let backups = dir.join("backups");
    let mut taken = Vec::new();
    let mut checked = Vec::new();
    let mut last = None;
    for _ in 0..3 {
        let start = Instant::now();
        let (snapshot, manifest) = backup::backup(&file, &key, &backups).expect("backup");
        taken.push(start.elapsed());
        let start = Instant::now();
        backup::verify(&snapshot, &key).expect("verified");
        checked.push(start.elapsed());
        last = Some((snapshot, manifest));
    }
    let (snapshot, manifest) = last.expect("three backups taken");
    let ms =
        |d: &[Duration]| d.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect::<Vec<_>>().join(", ");
    println!(
        "backup: snapshot (consistent copy of every table + sealed manifest, fsynced) {} ms over 3 runs; verify (checksum, \
         manifest seal, every value opened) {} ms; snapshot file {} ({} bytes, {} values) = {:.0}% of the store file",
        ms(&taken),
        ms(&checked),
        mib(manifest.bytes),
        manifest.bytes,
        manifest.values,
        manifest.bytes as f64 / file_size(&file).max(1) as f64 * 100.0,
    );
    drop(store);
    offsite_figures(&dir, &snapshot, &key);
    let _ = std::fs::remove_dir_all(&dir);
}

fn offsite_figures(dir: &Path, snapshot: &Path, key: &StoreKey) {
    use zhuli::{offsite::Offsite, secret::Secret};
    use zhuli_sim::local_server::LocalServer;
    let served = dir.join("nas");
    std::fs::create_dir_all(&served).expect("nas");
    let dav = match LocalServer::rclone_webdav(&served, "/dav", Some(("box", "bench-nas-pw"))) {
        Ok(d) => d,
        Err(e) => {
            println!("backup off the box: skipped ({e})");
            return;
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let offsite = Offsite::new(
        &format!("http://{}/dav/zhuli-backups", dav.addr),
        "box",
        Some(&Secret::new("bench-nas-pw")),
        2,
        Duration::from_secs(60),
    );
    rt.block_on(async {
        let start = Instant::now();
        let name = match offsite.upload(snapshot).await {
            Ok(n) => n,
            Err(e) => {
                println!("backup off the box: upload failed ({e}); figures skipped");
                return;
            }
        };
        let up = start.elapsed();
        let start = Instant::now();
        let verified = offsite.verify(&name, key, &dir.join("scratch")).await;
        let back = start.elapsed();
        let start = Instant::now();
        let pruned = offsite.prune(&name, None).await;
        let prune = start.elapsed();
        println!(
            "backup off the box (rclone WebDAV on loopback, as the nightly run: upload as NAME.part and move, fetch back and \
             verify, prune): upload {:.0} ms, fetch + verify {:.0} ms ({}), prune {:.0} ms ({}); {} sent",
            up.as_secs_f64() * 1000.0,
            back.as_secs_f64() * 1000.0,
            verified.map(|_| "verified".to_owned()).unwrap_or_else(|e| format!("failed: {e}")),
            prune.as_secs_f64() * 1000.0,
            pruned.map(|n| format!("{n} removed")).unwrap_or_else(|e| format!("failed: {e}")),
            mib(file_size(&snapshot.join(backup::SNAPSHOT_FILE))),
        );
    });
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted. `ZHULI_BENCH_ONLY=idle` (a
    // section's name: idle, late, backup) runs one section.
    let only = std::env::var("ZHULI_BENCH_ONLY").ok();
    let run = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let bin = std::env::var_os("ZHULI_BIN").map(PathBuf::from);
    if run("backup") {
        backup_figures();
    }
    for (name, section) in [("idle", scheduler_idle as fn(&Path)), ("late", job_lateness)] {
        if run(name) {
            match &bin {
                Some(bin) => section(bin),
                None => println!("scheduler {name}: skipped (set ZHULI_BIN to a built zhuli binary)"),
            }
        }
    }
}
