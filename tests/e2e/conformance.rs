//! The simulator speaks DingTalk's protocol, not only our reading of it: DingTalk's official
//! Stream SDK (npm `dingtalk-stream`, pinned in tests/sdk-conformance) connects to it, receives
//! a robot message, ACKs it, answers through the session webhook, and echoes SYSTEM pings.
//!
//! DingTalk's official OpenAPI SDK (npm `@alicloud/dingtalk`) checks the OpenAPI side the same
//! way: the simulator's answers against the SDK's response models, the agent's requests against
//! its request models (tests/sdk-conformance/openapi.mjs).
//!
//! Needs Node.js and npm (`tests/run` installs them); the SDKs are installed from the lock file.

use std::{
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use zhuli::{
    config::Config,
    dingtalk::{
        RobotMessage,
        card::Cards,
        gateway,
        http::{HttpClient, tls_config},
        media::MediaArea,
        openapi::OpenApi,
        sender::{Reply, ReplySender, SenderStatus},
    },
    store::{Retention, Store, key::StoreKey},
    tools::{
        Context, Tool,
        files::Roots,
        when,
        workspace::{self, Workspace},
    },
};
use zhuli_sim::dingtalk::{
    Inject, ReplyRoute, Simulator,
    org::{Org, OrgApproval, OrgEvent},
};

use crate::support::{SECRET, config_for, sim_config, temp_dir};

fn sdk_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/sdk-conformance")
}

fn ensure_sdk_installed() {
    crate::support::npm_install(&sdk_dir(), "dingtalk-stream/package.json");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_sdk_connects_receives_acks_and_answers_pings() {
    ensure_sdk_installed();
    let mut cfg = sim_config();
    cfg.ping_interval = Some(Duration::from_millis(200));
    let sim = Simulator::start(cfg.clone()).await.expect("simulator");
    let mut child = Command::new("node")
        .arg("conformance.mjs")
        .current_dir(sdk_dir())
        .env("SIM_API_BASE", sim.api_base())
        .env("SIM_CLIENT_ID", &cfg.client_id)
        .env("SIM_CLIENT_SECRET", &cfg.client_secret)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn node");
    let out = Arc::new(Mutex::new(Vec::<String>::new()));
    for pipe in [
        child.stdout.take().map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child.stderr.take().map(|p| Box::new(p) as _),
    ]
    .into_iter()
    .flatten()
    {
        let sink = out.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if let Ok(mut o) = sink.lock() {
                    o.push(line);
                }
            }
        });
    }
    let output = || out.lock().map(|o| o.join("\n")).unwrap_or_default();

    let connected = sim.wait_until(Duration::from_secs(20), |s| !s.connections().is_empty()).await;
    assert!(connected, "the official SDK did not connect:\n{}", output());

    let msg_id = sim.inject(Inject::text("hello from the simulator"));
    let acked_and_replied = sim
        .wait_until(Duration::from_secs(10), |s| {
            s.unacked() == 0 && s.replies().iter().any(|r| r.in_reply_to.as_deref() == Some(msg_id.as_str()))
        })
        .await;
    assert!(acked_and_replied, "no ACK or reply from the SDK:\n{}\nacks: {:?}", output(), sim.acks());
    let ack = sim.acks().into_iter().find(|a| a.data.contains("response")).expect("callback ACK recorded");
    assert_eq!(ack.code, 200);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ack.data).expect("ACK data is JSON"),
        serde_json::json!({"response": null})
    );
    let reply = sim.replies().into_iter().find(|r| r.in_reply_to.as_deref() == Some(msg_id.as_str())).expect("reply");
    assert_eq!(reply.route, ReplyRoute::SessionWebhook);
    assert_eq!(reply.text, "sdk echo: hello from the simulator");
    assert!(output().contains(&msg_id), "the SDK saw the msgId:\n{}", output());

    let pinged = sim.wait_until(Duration::from_secs(10), |s| s.counters().pings_echoed >= 2).await;
    assert!(pinged, "the SDK did not echo SYSTEM pings: {:?}\n{}", sim.counters(), output());
    assert_eq!(sim.counters().ping_echo_mismatch, 0);

    let _ = child.kill();
    let _ = child.wait();
}

/// Calls `name` as the model would once confirmed: its checks (`prepare`), then the call.
async fn run_tool(
    tools: &[Arc<dyn Tool>],
    ctx: &Context,
    name: &str,
    args: serde_json::Value,
) -> zhuli::tools::Outcome {
    let tool = tools.iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("no tool {name}"));
    let args = tool.prepare(ctx, args).await.unwrap_or_else(|e| panic!("{name} refused its arguments: {e}"));
    tool.execute(ctx, args).await.unwrap_or_else(|e| panic!("{name} failed: {e}"))
}

async fn undo_tool(tools: &[Arc<dyn Tool>], ctx: &Context, name: &str, outcome: &zhuli::tools::Outcome) -> String {
    let tool = tools.iter().find(|t| t.name() == name).unwrap_or_else(|| panic!("no tool {name}"));
    let (payload, _) = outcome.undo.as_ref().unwrap_or_else(|| panic!("{name} left no undo"));
    tool.undo(ctx, payload).await.unwrap_or_else(|e| panic!("undo of {name} failed: {e}"))
}

/// The OpenAPI side of the simulator against DingTalk's official OpenAPI SDK (npm
/// `@alicloud/dingtalk`, pinned in tests/sdk-conformance): the agent's own client code calls every
/// OpenAPI it uses against the simulator (replies, AI cards, media, every workspace tool and its
/// undo), the simulator records each request, and `openapi.mjs` checks them against the SDK's
/// request models; then it calls every one of those APIs through the SDK's clients and checks
/// the simulator's answers against the SDK's response models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn official_openapi_sdk_accepts_the_simulator_and_the_agents_requests() {
    ensure_openapi_sdk_installed();
    let sim = Simulator::start(sim_config()).await.expect("simulator");
    let day_ms = 86_400_000;
    let soon = (zhuli::clock::now_ms() / day_ms + 2) * day_ms + 2 * 3_600_000; // 10:00 at UTC+8
    let mut org = Org::default().dept(2, "R&D", 1).person("hanmei", "Han Meimei", "Manager", &[2]).person(
        "lilei",
        "Li Lei",
        "Engineer",
        &[2],
    );
    org.events.push(OrgEvent {
        id: "evt-standup".into(),
        owner: "union-hanmei".into(),
        summary: "Standup".into(),
        description: "daily".into(),
        location: "Room 3".into(),
        start_ms: soon,
        end_ms: soon + 1_800_000,
        attendees: vec!["union-lilei".into()],
    });
    org.approvals.push(OrgApproval {
        id: "proc-1".into(),
        title: "Travel to Hangzhou".into(),
        originator: "lilei".into(),
        approvers: vec!["hanmei".into()],
        cc: vec![],
        waiting_for: vec!["hanmei".into()],
        status: "RUNNING".into(),
        result: String::new(),
        form: vec![("Destination".into(), "Hangzhou".into())],
    });
    sim.seed_org(org);

    let dir = temp_dir("openapi-sdk");
    let share = dir.join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("report.pdf"), b"%PDF-1.7 report").expect("file");
    let extra = format!(
        "[dingtalk.card]\ntemplate_id = \"tpl-ai.schema\"\nupdate_ms = 20\n[tools.files.roots]\nshare = {:?}\n",
        share.display().to_string()
    );
    let text = format!(
        "[agent]\nstate_dir = {:?}\n{}",
        dir.join("state").display().to_string(),
        config_for(&sim, SECRET, &extra)
    );
    let config = Config::parse(&text, Path::new("(test)")).expect("config");
    std::fs::create_dir_all(&config.agent.state_dir).expect("state dir");
    let http = HttpClient::new(tls_config(), Duration::from_secs(5));
    let api = Arc::new(OpenApi::new(config.dingtalk.clone(), http.clone()));
    let socket = gateway::open(&config.dingtalk, &http, &tls_config()).await.expect("a Stream connection opened");
    drop(socket);

    // Replies through the OpenAPI (no session webhook), 1:1 and in a group; AI cards in both.
    let message = |id: &str, group: bool| {
        let data = serde_json::json!({
            "msgId": id, "msgtype": "text", "text": {"content": "hi"},
            "conversationId": if group { "cidGroup1" } else { "cidOne1" },
            "conversationType": if group { "2" } else { "1" },
            "senderId": "$:LWCP_v1:$hanmei", "senderStaffId": "hanmei", "senderNick": "Han Meimei",
            "robotCode": sim.config().robot_code, "createAt": 1_700_000_000_000i64,
        });
        RobotMessage::parse(&data.to_string()).expect("robot message")
    };
    let sender = ReplySender::new(api.clone(), Arc::new(SenderStatus::default()));
    let cards = Cards::new(api.clone(), config.dingtalk.card.clone().expect("card settings"));
    for (id, group) in [("msg-one", false), ("msg-group", true)] {
        let m = message(id, group);
        sender.send(&Reply::to(&m, "answer", "**hello**")).await.expect("reply through the OpenAPI");
        let card = cards.create(&m).await.expect("card created");
        cards.update(&card, "thinking…").await.expect("card streamed");
        cards.finish(&card, "done").await.expect("card finished");
    }
    let media = MediaArea::open(dir.join("media"), api.clone()).await.expect("media area");
    media.fetch(&sim.add_file(b"picture".to_vec())).await.expect("media fetched");

    // Every workspace tool, and the undo of each change.
    let store =
        Arc::new(Store::open(&dir.join("store.redb"), &StoreKey::generate(), Retention::default()).expect("store"));
    let roots = Roots::open(&config.tools.files, &config.agent.state_dir, None, store.file_sealer()).expect("roots");
    let ws = Workspace::new(api.clone(), store, config.tools.dingtalk.clone(), 480, None, roots).expect("workspace");
    let tools = workspace::tools(&ws);
    let ctx = |group: bool| Context {
        actor: "hanmei".into(),
        chat: if group { "cidGroup1".into() } else { "cidOne1".into() },
        group,
        offset_minutes: 480,
        nick: "Han Meimei".into(),
        message: "msg-tools".into(),
        protected: false,
    };
    let one = ctx(false);
    let at = |ms: i64| when::rfc3339(ms, 480);
    run_tool(&tools, &one, "people_search", serde_json::json!({"query": "Li Lei"})).await;
    run_tool(&tools, &one, "people_members", serde_json::json!({"department": "R&D"})).await;
    let listed = run_tool(
        &tools,
        &one,
        "calendar_list",
        serde_json::json!({"from": at(soon - 3_600_000), "to": at(soon + day_ms)}),
    )
    .await;
    assert!(listed.text.contains("evt-standup"), "{}", listed.text);
    run_tool(
        &tools,
        &one,
        "calendar_free",
        serde_json::json!({"people": ["lilei"], "from": at(soon), "to": at(soon + day_ms), "minutes": 30}),
    )
    .await;
    let created = run_tool(
        &tools,
        &one,
        "calendar_create",
        serde_json::json!({"title": "Sync", "start": at(soon + 3_600_000), "end": at(soon + 5_400_000),
            "attendees": ["lilei"], "location": "Room 1", "description": "weekly"}),
    )
    .await;
    let moved = run_tool(
        &tools,
        &one,
        "calendar_move",
        serde_json::json!({"event_id": "evt-standup", "start": at(soon + 7_200_000), "end": at(soon + 9_000_000)}),
    )
    .await;
    undo_tool(&tools, &one, "calendar_move", &moved).await;
    let cancelled = run_tool(&tools, &one, "calendar_cancel", serde_json::json!({"event_id": "evt-standup"})).await;
    undo_tool(&tools, &one, "calendar_cancel", &cancelled).await;
    undo_tool(&tools, &one, "calendar_create", &created).await;
    let todo = run_tool(
        &tools,
        &one,
        "todo_create",
        serde_json::json!({"subject": "Send the slides", "assignee": "lilei", "due": at(soon), "priority": "high",
            "description": "before the review"}),
    )
    .await;
    let id = todo.text.rsplit("to-do id ").next().unwrap_or_default().trim_end_matches(')').to_owned();
    run_tool(&tools, &one, "todo_list", serde_json::json!({})).await;
    let done = run_tool(&tools, &one, "todo_done", serde_json::json!({"task_id": id})).await;
    undo_tool(&tools, &one, "todo_done", &done).await;
    undo_tool(&tools, &one, "todo_create", &todo).await;
    let pending = run_tool(&tools, &one, "approvals_pending", serde_json::json!({})).await;
    assert!(pending.text.contains("proc-1"), "{}", pending.text);
    run_tool(&tools, &one, "approvals_show", serde_json::json!({"instance_id": "proc-1"})).await;
    run_tool(&tools, &one, "chat_send_file", serde_json::json!({"path": "share/report.pdf"})).await;
    run_tool(&tools, &ctx(true), "chat_send_file", serde_json::json!({"path": "share/report.pdf"})).await;

    let requests = sim.requests();
    let file = dir.join("agent-requests.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&requests).expect("json")).expect("write requests");

    let out = Command::new("node")
        .arg("openapi.mjs")
        .current_dir(sdk_dir())
        .env("SIM_API_BASE", sim.api_base())
        .env("SIM_CLIENT_ID", &sim.config().client_id)
        .env("SIM_CLIENT_SECRET", &sim.config().client_secret)
        .env("SIM_ROBOT_CODE", &sim.config().robot_code)
        .env("SIM_STAFF", "hanmei")
        .env("SIM_COLLEAGUE", "lilei")
        .env("SIM_COLLEAGUE_NAME", "Li Lei")
        .env("SIM_APPROVER", "hanmei")
        .env("SIM_APPROVAL", "proc-1")
        .env("SIM_DOWNLOAD_CODE", sim.add_file(b"file".to_vec()))
        .env("AGENT_REQUESTS", &file)
        .output()
        .expect("run node");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report = format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "the OpenAPI SDK found differences:\n{report}");
    let summary: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or_default()).expect("summary line");
    let names = |k: &str| -> Vec<String> {
        summary[k].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect()
    };
    // Every API the agent uses was both called through the SDK and checked as the agent sends it.
    let everything = [
        "BatchSendOTO",
        "CreateAndDeliver",
        "CreateEvent",
        "CreateTodoTask",
        "DeleteEvent",
        "DeleteTodoTask",
        "GetAccessToken",
        "GetEvent",
        "GetProcessInstance",
        "GetSchedule",
        "ListEvents",
        "ListTodoWorkRecords",
        "OpenConnection",
        "OrgGroupSend",
        "PatchEvent",
        "QueryOrgTodoTasks",
        "RobotMessageFileDownload",
        "SearchUser",
        "StreamingUpdate",
        "UpdateCard",
        "UpdateTodoTask",
    ];
    let sdk_calls = names("sdkCalls");
    let checked = names("agentChecked");
    for api in everything {
        assert!(sdk_calls.iter().any(|a| a == api), "{api} was not called through the SDK:\n{report}");
        assert!(checked.iter().any(|a| a == api), "the agent's {api} request was not checked:\n{report}");
    }
    // The old host's APIs have no model in the SDK: they are named, and stay these four.
    let old = names("notInSdk");
    assert_eq!(
        old,
        [
            "POST /media/upload",
            "POST /topapi/v2/department/listsub",
            "POST /topapi/v2/user/get",
            "POST /topapi/v2/user/list"
        ],
        "{report}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

fn ensure_openapi_sdk_installed() {
    crate::support::npm_install(&sdk_dir(), "@alicloud/dingtalk/package.json");
}
