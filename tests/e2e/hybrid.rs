//! Hybrid deployment with the real binary: a cloud model and a local one, each a server on
//! loopback. Conversations that mix protected content (personal data, protected files, a
//! local-only group, a configured pattern, a conversation that read something protected) and
//! open content go their ways, and the cloud server's received bytes hold no protected value.
//! A failing cloud hands open work to the local model and the reply says so; a failing local
//! model leaves protected work unanswered, said plainly, and nothing goes to the cloud.

use serde_json::json;
use zhuli::audit::Kind;
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    llm::{LlmSim, Scripted},
};

use crate::support::{self, Journal, calls, field};

const CLOUD_KEY: &str = "sk-cloud-Hq3v9Tz1";

/// Values that must never reach the cloud.
const PROTECTED: &[&str] = &[
    "13912345678",
    "11010519491231002X",
    "6222 0202 0000 0000 006",
    "wang.fang@acme-corp.cn",
    "186 0000 1234",
    "青松计划",
    "月薪 28000",
    "裁员名单",
    "赵六的病假条",
    "二零二五年度调薪",
];

struct Rig {
    sim: Simulator,
    cloud: LlmSim,
    local: LlmSim,
    agent: support::Agent,
    journal: Journal,
    _scratch: std::path::PathBuf,
}

async fn rig(tag: &str) -> Rig {
    rig_with(tag, "", "", "").await
}

/// [`rig`] with more lines for the cloud endpoint's table, the local one's, and `[privacy]`.
async fn rig_with(tag: &str, cloud_lines: &str, local_lines: &str, privacy: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-hybrid"));
    let share = scratch.join("share");
    std::fs::create_dir_all(share.join("hr")).expect("hr");
    std::fs::create_dir_all(share.join("公开")).expect("open folder");
    std::fs::write(share.join("hr/工资.txt"), "王芳 月薪 28000 元，二零二五年度调薪待定。").expect("pay");
    std::fs::write(share.join("hr/请假.txt"), "赵六的病假条已收到。").expect("leave");
    std::fs::write(share.join("公开/菜单.txt"), "周五午餐：饺子。").expect("menu");
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let cloud = LlmSim::start().await.expect("cloud model");
    let local = LlmSim::start().await.expect("local model");
    cloud.set_echo(true);
    local.set_echo(true);
    let config = format!(
        "[llm]\nname = \"deepseek\"\nbase_url = {cloud:?}\nmodel = \"cloud-model\"\napi_key = {CLOUD_KEY:?}\n\
         timeout_ms = 5000\nmax_retries = 1\nrequests_per_minute = 6000\n{cloud_lines}\n\
         [[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = {local:?}\nmodel = \"local-model\"\n\
         timeout_ms = 5000\nmax_retries = 1\nrequests_per_minute = 6000\n{local_lines}\n\
         [privacy]\nopen_folders = [\"share/公开\"]\nlocal_chats = [\"cidHR==\"]\npatterns = [\"项目代号\"]\n{privacy}\n\
         [access]\nadmins = [\"boss\"]\ngroup_chats = \"open\"\ndefault_roles = [\"member\"]\n[access.roles.member]\ntools = [\"files\"]\n\
         [tools.files.roots]\nshare = {share:?}\n\
         [audit]\njournal_socket = {journal:?}\n",
        cloud = cloud.base_url(),
        local = local.base_url(),
        share = share.display().to_string(),
        journal = journal.path.display().to_string(),
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { sim, cloud, local, agent, journal, _scratch: scratch }
}

/// Where a request is expected to go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum To {
    Cloud,
    Local,
}

/// One message of a conversation: who says what where, and where each model request of its
/// turn must go (a tool call makes two).
struct Say {
    who: &'static str,
    group: Option<&'static str>,
    text: &'static str,
    /// A tool the first model asks for (scripted on the model that gets the first request).
    tool: Option<(&'static str, serde_json::Value)>,
    requests: &'static [To],
}

fn say(who: &'static str, text: &'static str, requests: &'static [To]) -> Say {
    Say { who, group: None, text, tool: None, requests }
}

impl Rig {
    async fn run(&self, s: &Say) -> String {
        let first = match s.requests.first() {
            Some(To::Cloud) => &self.cloud,
            _ => &self.local,
        };
        if let Some((tool, args)) = &s.tool {
            first.push(calls(&[(tool, args.clone())]));
        }
        let (c0, l0) = (self.cloud.requests().len(), self.local.requests().len());
        let mut m = Inject::text(s.text).from(s.who);
        if let Some(chat) = s.group {
            m = m.in_group(true).conversation(chat);
        }
        let reply = support::ask(&self.sim, &self.agent, m).await;
        let cloud = self.cloud.requests().len() - c0;
        let local = self.local.requests().len() - l0;
        let want_cloud = s.requests.iter().filter(|t| **t == To::Cloud).count();
        assert_eq!(
            (cloud, local),
            (want_cloud, s.requests.len() - want_cloud),
            "{} said {:?}: requests to (cloud, local); reply: {reply}",
            s.who,
            s.text
        );
        reply
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protected_content_never_reaches_the_cloud() {
    use To::{Cloud, Local};
    let rig = rig("hybrid-leak").await;
    let read = |path: &str| Some(("files_read", json!({ "path": path })));
    let conversations: Vec<Vec<Say>> = vec![
        // Open questions: the cloud.
        vec![say("p01", "明天上海天气怎么样？", &[Cloud])],
        vec![say("p02", "帮我写一首关于春天的短诗", &[Cloud])],
        vec![say("p03", "Rust 的所有权是什么意思？", &[Cloud])],
        vec![say("p04", "把这句话翻译成英文：会议推迟到三点", &[Cloud])],
        vec![say("p05", "订单号 2024120300001 的物流到哪了？", &[Cloud])],
        vec![say("p06", "会议室 302 明天下午有空吗", &[Cloud])],
        vec![say("p07", "版本 1.2.3-rc1 和 1.2.4 有什么区别", &[Cloud])],
        vec![say("p08", "2024-12-03 14:00 到 15:30 一共多久？", &[Cloud])],
        // Personal data in the message: the local model.
        vec![say("p09", "给 13912345678 回个电话，说明天再聊", &[Local])],
        vec![say("p10", "身份证号 11010519491231002X 的人是哪年出生的？", &[Local])],
        vec![say("p11", "报销打到卡号 6222 0202 0000 0000 006 上", &[Local])],
        vec![say("p12", "发邮件给 wang.fang@acme-corp.cn 约个时间", &[Local])],
        vec![say("p13", "客户电话 +86 186 0000 1234，帮我记一下", &[Local])],
        // A configured pattern.
        vec![say("p14", "项目代号青松计划的进度怎么样", &[Local])],
        // A protected file: the question is open, the file's content is not.
        vec![Say {
            tool: read("share/hr/工资.txt"), ..say("p15", "看一下 hr 文件夹里的工资表", &[Cloud, Local])
        }],
        vec![Say { tool: read("share/hr/请假.txt"), ..say("p16", "请假记录里写了什么", &[Cloud, Local]) }],
        // A file in an open folder goes to the cloud.
        vec![Say { tool: read("share/公开/菜单.txt"), ..say("p17", "周五吃什么？", &[Cloud, Cloud]) }],
        // Listing the protected tree is protected too.
        vec![Say {
            tool: Some(("files_list", json!({"path": "share/hr"}))),
            ..say("p18", "hr 里有哪些文件", &[Cloud, Local])
        }],
        // A local-only group: everything stays local, even small talk.
        vec![Say { group: Some("cidHR=="), ..say("p19", "下周裁员名单讨论放在几点？", &[Local]) }],
        vec![Say { group: Some("cidHR=="), ..say("p20", "大家好", &[Local]) }],
        // Any other group: open.
        vec![Say { group: Some("cidSales=="), ..say("p21", "今天的销售例会几点开始", &[Cloud]) }],
        // A conversation that read something protected stays local for the rest of its session…
        vec![
            Say { tool: read("share/hr/工资.txt"), ..say("p22", "工资表第一行是谁", &[Cloud, Local]) },
            say("p22", "好的，再用一句话总结一下", &[Local]),
            say("p22", "谢谢", &[Local]),
            // … until it starts afresh.
            say("p22", "/new", &[]),
            say("p22", "今天是星期几？", &[Cloud]),
        ],
        // Personal data said first, then open questions in the same session: local.
        vec![say("p23", "我的手机号是 13912345678", &[Local]), say("p23", "帮我想个周末去处", &[Local])],
        // Open first, protected later: the earlier open turn went to the cloud, the rest local.
        vec![
            say("p24", "写一封请假邮件的开头", &[Cloud]),
            say("p24", "收件人是 wang.fang@acme-corp.cn", &[Local]),
            say("p24", "再改短一点", &[Local]),
        ],
        vec![
            say("p25", "帮我列个会议议程", &[Cloud]),
            Say { tool: read("share/hr/请假.txt"), ..say("p25", "顺便看看请假记录", &[Cloud, Local]) },
            say("p25", "议程里加上这件事", &[Local]),
        ],
        // Numbers that look like personal data but are not: the cloud.
        vec![say("p26", "12800138000 是什么号码？", &[Cloud])],
        vec![say("p27", "6222020200000000002 这个数字有什么规律", &[Cloud])],
        vec![say("p28", "邮箱格式是 user@localhost 吗", &[Cloud])],
        vec![say("p29", "圆周率前 20 位是多少", &[Cloud])],
        vec![say("p30", "2025 年有多少个工作日", &[Cloud])],
        vec![say("p31", "推荐一本讲项目管理的书", &[Cloud])],
        vec![Say { group: Some("cidHR=="), ..say("p32", "二零二五年度调薪方案什么时候出", &[Local]) }],
    ];
    let mut totals = (0usize, 0usize);
    for conversation in &conversations {
        for s in conversation {
            rig.run(s).await;
            totals.0 += s.requests.iter().filter(|t| **t == To::Cloud).count();
            totals.1 += s.requests.iter().filter(|t| **t == To::Local).count();
        }
    }
    // A model that gives two calls of one step the same id: each result is still judged by its
    // own call, so the salary file's does not pass for the menu's.
    let read = |path: &str| json!({ "path": path }).to_string();
    rig.cloud.push(Scripted::ToolCallsWithIds(vec![
        ("x".into(), "files_read".into(), read("share/hr/工资.txt")),
        ("x".into(), "files_read".into(), read("share/公开/菜单.txt")),
    ]));
    rig.run(&say("p33", "工资表和菜单都看一下", &[Cloud, Local])).await;
    totals = (totals.0 + 1, totals.1 + 1);
    let cloud_bytes: Vec<u8> = rig.cloud.requests().iter().flat_map(|r| r.raw.to_vec()).collect();
    let cloud_text = String::from_utf8_lossy(&cloud_bytes).into_owned();
    let local_bytes: Vec<u8> = rig.local.requests().iter().flat_map(|r| r.raw.to_vec()).collect();
    let local_text = String::from_utf8_lossy(&local_bytes).into_owned();
    for value in PROTECTED {
        assert!(!cloud_text.contains(value), "{value:?} reached the cloud");
        assert!(local_text.contains(value), "{value:?} never reached the local model: the suite did not exercise it");
    }
    // JSON may escape characters: the parsed bodies say the same.
    for r in rig.cloud.requests() {
        let body = r.body.to_string();
        for value in PROTECTED {
            assert!(!body.contains(value), "{value:?} reached the cloud");
        }
    }
    assert_eq!((rig.cloud.requests().len(), rig.local.requests().len()), totals);

    // Every model call is audited: endpoint, class, tokens, why; never the content.
    let protected_calls = rig.journal.expect(totals.1, Kind::ModelCall, &[("DATA_CLASS", "protected")]);
    assert!(protected_calls.iter().all(|e| field(e, "TARGET") == Some("office")));
    assert!(protected_calls.iter().all(|e| field(e, "PROTECTED_BY").is_some_and(|w| !w.is_empty())));
    let open_calls = rig.journal.expect(totals.0, Kind::ModelCall, &[("DATA_CLASS", "open")]);
    assert!(open_calls.iter().all(|e| field(e, "TARGET") == Some("deepseek") && field(e, "TOKENS_IN") == Some("12")));
    let reasons: Vec<&str> = protected_calls.iter().filter_map(|e| field(e, "PROTECTED_BY")).collect();
    for why in [
        "found:mobile",
        "found:resident_id",
        "found:bank_card",
        "found:email",
        "pattern:0",
        "tool:files_read",
        "tool:files_list",
        "local_chat",
        "conversation",
    ] {
        assert!(reasons.contains(&why), "no call protected by {why}: {reasons:?}");
    }
    for e in rig.journal.all() {
        for (k, v) in &e {
            for value in PROTECTED {
                assert!(!v.contains(value), "{k} of an audit entry holds {value:?}: {e:?}");
            }
            assert!(!v.contains(CLOUD_KEY), "the cloud key in the audit trail");
        }
    }
    assert!(!rig.agent.log().contains(CLOUD_KEY));
    let conversations_run = conversations.len() + 1;
    eprintln!(
        "hybrid: {conversations_run} conversations, {} messages; {} requests to the cloud, {} to the local model; \
         {} protected values, none in the cloud's {} bytes",
        conversations.iter().map(Vec::len).sum::<usize>() + 1,
        totals.0,
        totals.1,
        PROTECTED.len(),
        cloud_bytes.len()
    );
    assert!(conversations_run >= 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cloud_hands_over_and_a_failing_local_model_keeps_protected_work_home() {
    let rig = rig("hybrid-failover").await;
    // The cloud answers 500 twice (the try and its retry): the local model answers, and the
    // reply says a fallback model did.
    rig.cloud.set_echo(false);
    rig.cloud.push(Scripted::Status { code: 500, retry_after: Some(0) });
    rig.cloud.push(Scripted::Status { code: 500, retry_after: Some(0) });
    let started = std::time::Instant::now();
    let reply = support::ask(&rig.sim, &rig.agent, Inject::text("帮我起个标题").from("q1")).await;
    let took = started.elapsed();
    assert!(reply.starts_with("回答：帮我起个标题"), "{reply}");
    assert!(reply.contains("备用模型 office"), "{reply}");
    let e = rig.journal.expect(1, Kind::ModelCall, &[("OUTCOME", "ok, fallback")]);
    assert_eq!(field(&e[0], "TARGET"), Some("office"));
    assert!(field(&e[0], "REASON").is_some_and(|r| r.contains("after deepseek: failed")), "{e:?}");
    eprintln!("hybrid: cloud answering 500 → reply from the local model in {took:?}");

    // The local model is down (503 on every try): protected work is not answered, the person
    // is told why, and the healthy cloud gets nothing.
    rig.cloud.set_echo(true);
    let cloud_before = rig.cloud.requests().len();
    rig.local.set_echo(false);
    for _ in 0..2 {
        rig.local.push(Scripted::Status { code: 503, retry_after: Some(0) });
    }
    let reply =
        support::ask(&rig.sim, &rig.agent, Inject::text("我的身份证号 11010519491231002X 对吗").from("q2")).await;
    assert!(reply.contains("本地模型暂时没有响应") && reply.contains("内容没有发往云端"), "{reply}");
    assert_eq!(rig.cloud.requests().len(), cloud_before, "nothing went to the cloud");
    rig.journal.expect(1, Kind::ModelCall, &[("OUTCOME", "failed"), ("DATA_CLASS", "protected")]);
    // Open work still goes to the cloud meanwhile.
    let reply = support::ask(&rig.sim, &rig.agent, Inject::text("讲个笑话").from("q3")).await;
    assert!(reply.starts_with("回答：讲个笑话") && !reply.contains("备用模型"), "{reply}");
    assert_eq!(rig.cloud.requests().len(), cloud_before + 1);

    // `/状态` shows each endpoint: where it runs, its calls, latency and errors.
    let status = support::ask(&rig.sim, &rig.agent, Inject::text("/状态").from("boss")).await;
    for line in ["deepseek（云端，cloud-model）：最近 2 次调用", "office（本地，local-model）：最近 2 次调用"]
    {
        assert!(status.contains(line), "{line}: {status}");
    }
    assert_eq!(status.matches("出错 50%").count(), 2, "one failure in two calls each: {status}");
    assert!(!status.contains("暂停使用"), "nothing is bypassed after one failure: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_stay_local_unless_the_configuration_opens_them() {
    let png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR-sim".to_vec();
    for (open, to) in [(false, To::Local), (true, To::Cloud)] {
        let rig = rig_with(
            &format!("hybrid-picture-{open}"),
            "vision = true",
            "vision = true",
            if open { "open_pictures = true" } else { "" },
        )
        .await;
        let picture = Inject { media: png.clone(), ..Inject::of("picture", "").from("p40") };
        let (c0, l0) = (rig.cloud.requests().len(), rig.local.requests().len());
        support::ask(&rig.sim, &rig.agent, picture).await;
        let (cloud, local) = (rig.cloud.requests().len() - c0, rig.local.requests().len() - l0);
        assert_eq!((cloud, local), if to == To::Cloud { (1, 0) } else { (0, 1) }, "open_pictures = {open}");
        let sent = if to == To::Cloud { rig.cloud.requests() } else { rig.local.requests() };
        assert!(sent[0].body.to_string().contains("data:image/png;base64,"), "the picture went as an image");
        if !open {
            rig.journal.expect(1, Kind::ModelCall, &[("PROTECTED_BY", "picture")]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_over_its_monthly_tokens_is_passed_over_until_the_month_ends() {
    // Each answer of the model servers counts 19 tokens: the cloud may use 30 a month.
    let rig = rig_with("hybrid-budget", "monthly_tokens = 30", "monthly_tokens = 38", "").await;
    for (who, to_cloud) in [("b1", true), ("b2", true), ("b3", false)] {
        let (c0, l0) = (rig.cloud.requests().len(), rig.local.requests().len());
        let reply = support::ask(&rig.sim, &rig.agent, Inject::text("写一句口号").from(who)).await;
        let went = (rig.cloud.requests().len() - c0, rig.local.requests().len() - l0);
        assert_eq!(went, if to_cloud { (1, 0) } else { (0, 1) }, "{who}: {reply}");
        assert_eq!(reply.contains("备用模型 office"), !to_cloud, "{reply}");
    }
    let e = rig.journal.expect(1, Kind::ModelCall, &[("OUTCOME", "ok, fallback")]);
    assert!(field(&e[0], "REASON").is_some_and(|r| r.contains("after deepseek: over budget")), "{e:?}");
    // The local endpoint's 38 are used up too after its second answer: then nobody answers, and
    // the person is told why.
    support::ask(&rig.sim, &rig.agent, Inject::text("再写一句").from("b4")).await;
    let reply = support::ask(&rig.sim, &rig.agent, Inject::text("最后一句").from("b5")).await;
    assert!(reply.contains("这个月的模型用量已经用完"), "{reply}");
    let status = support::ask(&rig.sim, &rig.agent, Inject::text("/状态").from("boss")).await;
    assert!(status.contains("本月已用 38 / 30 个 token") && status.contains("本月已用 38 / 38 个 token"), "{status}");
}

/// `zhuli doctor` and `/诊断` check every endpoint: it answers, it lists the model, the key is
/// accepted, and the model calls a tool. The checks take no scripted answer and no person's
/// request, and carry no key and no server's markup into the report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_every_model_endpoint() {
    let rig = rig("hybrid-doctor").await;
    rig.cloud.require_key(CLOUD_KEY);
    rig.cloud.set_models(&["cloud-model", "cloud-model-large"]);
    rig.local.set_models(&["local-model"]);
    let doctor = support::doctor;
    let models_step = |out: &str| -> String {
        out.split("8. models").nth(1).map(str::to_owned).unwrap_or_else(|| panic!("no models step in\n{out}"))
    };
    let text = std::fs::read_to_string(rig.agent.config_path()).expect("config");

    // Both healthy.
    let out = doctor(rig.agent.config_path());
    let step = models_step(&out);
    assert!(step.trim_start().starts_with("PASS"), "{out}");
    for line in [
        "deepseek (cloud, cloud-model): reachable, model offered (2 in all); key accepted, tool calling works",
        "office (local, local-model): reachable, model offered (1 in all); key accepted, tool calling works",
    ] {
        assert!(step.contains(line), "{line} in\n{out}");
    }
    assert_eq!(rig.cloud.probes().len(), 1);
    assert_eq!(rig.local.probes().len(), 1);
    assert!(rig.cloud.requests().is_empty() && rig.local.requests().is_empty(), "a check is not a chat request");
    let probe = &rig.cloud.probes()[0];
    assert_eq!(probe.authorization.as_deref(), Some(format!("Bearer {CLOUD_KEY}").as_str()));
    assert_eq!(probe.body["tools"][0]["function"]["name"], "zhuli_probe");
    assert_eq!(probe.body["max_tokens"], 256, "the check's answer is capped");

    // A wrong key; a model without tool calling; a model the server does not have, which it
    // lists among names a Markdown link hides in; an endpoint nobody serves.
    rig.local.set_no_tools(true);
    let third = LlmSim::start().await.expect("third model");
    third.set_models(&["qwen2.5:7b", "[evil](http://x.example)"]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let bad = rig.agent.dir.join("bad-models.toml");
    let broken = text.replace(CLOUD_KEY, "sk-typo-0000").replace(
        "[privacy]",
        &format!(
            "[[models]]\nname = \"gpu\"\nwhere = \"local\"\nbase_url = {:?}\nmodel = \"qwen2.5\"\ntimeout_ms = 2000\n\n\
             [[models]]\nname = \"spare\"\nwhere = \"local\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\nmodel = \"m\"\ntimeout_ms = 2000\n\n[privacy]",
            third.base_url()
        ),
    );
    std::fs::write(&bad, broken).expect("write");
    let out = doctor(&bad);
    let step = models_step(&out);
    assert!(step.trim_start().starts_with("FAIL"), "{out}");
    for line in [
        "deepseek (cloud, cloud-model): FAILED: the key was refused (HTTP 401)",
        "office (local, local-model): reachable, model offered (1 in all); key accepted; asked to call a tool, it answered in text",
        "gpu (local, qwen2.5): reachable, but the model is not among the 2 it lists (qwen2.5:7b,  evil  http://x.example ); FAILED: the model or the address is not found (HTTP 404: model 'qwen2.5' not found)",
        "spare (local, m): FAILED: not reachable",
    ] {
        assert!(step.contains(line), "{line} in\n{out}");
    }
    for fix in [
        "copy the endpoint's api_key again",
        "set model to one of the names",
        "supports tool calling",
        "that the model server runs",
    ] {
        assert!(step.contains(fix), "{fix} in\n{out}");
    }
    assert!(!out.contains("sk-typo-0000") && !out.contains(CLOUD_KEY), "no key in the report:\n{out}");
    assert!(!out.contains("[evil]"), "no link from a server's words:\n{out}");
    assert_eq!(third.probes().len() + third.requests().len(), 0, "a refused model's request is not answered");

    // The admin chat's `/诊断`, run by the agent itself, in Chinese: each endpoint its own item.
    let reply = support::ask(&rig.sim, &rig.agent, Inject::text("/诊断").from("boss")).await;
    assert!(reply.contains("**模型**：2 个模型端点\n  - deepseek (cloud, cloud-model): reachable"), "{reply}");
    assert!(reply.contains("\n  - office (local, local-model): reachable"), "{reply}");
    assert!(reply.contains("换用支持工具调用的模型"), "{reply}");
    assert!(!reply.contains(CLOUD_KEY), "{reply}");
    assert!(rig.cloud.requests().is_empty() && rig.local.requests().is_empty(), "a check is not a chat request");
}

/// The supported local endpoint: a model server on the office's LAN behind HTTPS, its
/// certificate from the office's own CA (`[agent] extra_ca_pem`). Protected work reaches it over
/// TLS, and the doctor checks it there; without the CA the doctor says the server is not
/// reachable and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_model_on_the_lan_is_reached_over_https_with_the_offices_ca() {
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let lan = LlmSim::start().await.expect("lan model");
    lan.set_echo(true);
    lan.require_key("sk-lan-7Qx");
    lan.set_models(&["qwen2.5:14b"]);
    let tls = crate::boot::tls_for(&["127.0.0.1"]);
    let plain: std::net::SocketAddr = lan.base_url()["http://".len()..].trim_end_matches("/v1").parse().expect("addr");
    let front = crate::boot::tls_front(tls.acceptor.clone(), plain).await;
    let ca_line = format!("extra_ca_pem = \"\"\"\n{}\"\"\"\n", tls.ca_pem);
    let config = format!(
        "[[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = \"https://{front}/v1\"\nmodel = \"qwen2.5:14b\"\n\
         api_key = \"sk-lan-7Qx\"\ntimeout_ms = 5000\nmax_retries = 1\n\
         [access]\ngroup_chats = \"open\"\n"
    );
    let agent = support::connected_agent_in("hybrid-lan", &sim, &ca_line, &config, &[]).await;

    let reply = support::ask(&sim, &agent, Inject::text("我的手机号 13912345678，记一下").from("u1")).await;
    assert!(reply.starts_with("回答：我的手机号 13912345678"), "{reply}\n{}", agent.log());
    let got = lan.requests();
    assert_eq!(got.len(), 1, "the protected question went to the LAN model");
    assert_eq!(got[0].authorization.as_deref(), Some("Bearer sk-lan-7Qx"));

    let doctor = support::doctor;
    let out = doctor(agent.config_path());
    assert!(
        out.contains(
            "8. models         PASS  office (local, qwen2.5:14b): reachable, model offered (1 in all); key accepted, tool calling works"
        ),
        "{out}"
    );
    let text = std::fs::read_to_string(agent.config_path()).expect("config");
    assert!(text.contains(&ca_line), "the CA is in the [agent] table");
    let without = agent.dir.join("no-ca.toml");
    std::fs::write(&without, text.replace(&ca_line, "")).expect("write");
    let out = doctor(&without);
    let step = out.split("8. models").nth(1).unwrap_or_default();
    assert!(step.contains("FAIL  office (local, qwen2.5:14b): FAILED: not reachable"), "{out}");
    assert!(step.contains("UnknownIssuer"), "the models step gives the certificate as the reason: {out}");
    assert!(!out.contains("sk-lan-7Qx"), "{out}");
}
