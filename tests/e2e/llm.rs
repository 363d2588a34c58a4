//! The LLM client against a real HTTP server on loopback speaking the chat-completions protocol:
//! whole and streamed answers, tool calls assembled from deltas, retries that honour
//! Retry-After, and the failures that must not be retried.

use std::time::{Duration, Instant};

use serde_json::json;
use zhuli::{
    dingtalk::settings::Millis,
    llm::{ChatMessage, Client, LlmError, Role, Settings, ToolSpec, route::Place},
    secret::Secret,
};
use zhuli_sim::llm::{LlmSim, Scripted};

const KEY: &str = "sk-test-Vb7Qw2";

fn settings(sim: &LlmSim, max_retries: u32) -> Settings {
    Settings {
        name: "llm".into(),
        place: Place::Cloud,
        base_url: sim.base_url(),
        model: "qwen-test".into(),
        api_key: Some(Secret::new(KEY)),
        timeout_ms: Millis::from_ms(5_000),
        max_retries,
        requests_per_minute: 6_000,
        daily_tokens: 0,
        daily_tokens_per_user: 0,
        monthly_tokens: 0,
        vision: false,
    }
}

fn ask(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::text(Role::System, "You are zhuli."), ChatMessage::text(Role::User, text)]
}

fn files_tool() -> ToolSpec {
    ToolSpec::function(
        "files_list",
        "List files",
        json!({"type": "object", "properties": {"path": {"type": "string"}}}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_and_streamed_answers() {
    let sim = LlmSim::start().await.expect("llm sim");
    let client = Client::new(settings(&sim, 2)).expect("client");

    sim.push(Scripted::Text("你好, here is the answer.".into()));
    let c = client.complete(&ask("hi"), &[]).await.expect("complete");
    assert_eq!(c.message.content.as_deref(), Some("你好, here is the answer."));
    assert_eq!(c.usage.map(|u| u.total_tokens), Some(19));
    let req = &sim.requests()[0];
    assert_eq!(req.body["model"], "qwen-test");
    assert_eq!(req.body["stream"], false);
    assert_eq!(req.authorization.as_deref(), Some(format!("Bearer {KEY}").as_str()));

    let text = "A longer answer that arrives in many small pieces, 一点一点地.";
    sim.push(Scripted::Text(text.into()));
    let mut pieces = Vec::new();
    let c = client.stream(&ask("tell me"), &[], |t| pieces.push(t.to_owned())).await.expect("stream");
    assert!(pieces.len() > 5, "streamed in pieces: {pieces:?}");
    assert_eq!(pieces.concat(), text);
    assert_eq!(c.message.content.as_deref(), Some(text));
    assert_eq!(c.finish_reason.as_deref(), Some("stop"));
    assert_eq!(sim.requests()[1].body["stream"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_calls_whole_and_streamed() {
    let sim = LlmSim::start().await.expect("llm sim");
    let client = Client::new(settings(&sim, 2)).expect("client");
    let calls = vec![
        ("files_list".to_owned(), r#"{"path":"/share/Q3 报告"}"#.to_owned()),
        ("system".to_owned(), "{}".to_owned()),
    ];
    for stream in [false, true] {
        sim.push(Scripted::ToolCalls(calls.clone()));
        let c = if stream {
            client.stream(&ask("what is in the share?"), &[files_tool()], |_| {}).await
        } else {
            client.complete(&ask("what is in the share?"), &[files_tool()]).await
        }
        .expect("answer");
        let got: Vec<(String, String)> =
            c.message.tool_calls.iter().map(|t| (t.function.name.clone(), t.function.arguments.clone())).collect();
        assert_eq!(got, calls, "stream={stream}");
        assert_eq!(c.finish_reason.as_deref(), Some("tool_calls"));
        assert!(c.message.tool_calls.iter().all(|t| !t.id.is_empty()));
    }
    let req = &sim.requests()[0];
    assert_eq!(req.body["tools"][0]["function"]["name"], "files_list");
    // The tool results go back as `tool` messages with the call's id.
    let back = serde_json::to_value(ChatMessage::tool_result("call_0", "[]")).expect("json");
    assert_eq!(back, json!({"role": "tool", "content": "[]", "tool_call_id": "call_0"}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_server_errors_are_retried() {
    let sim = LlmSim::start().await.expect("llm sim");
    let client = Client::new(settings(&sim, 3)).expect("client");
    sim.push(Scripted::Status { code: 429, retry_after: Some(1) });
    sim.push(Scripted::Text("after the wait".into()));
    let t = Instant::now();
    let c = client.complete(&ask("x"), &[]).await.expect("retried");
    assert_eq!(c.message.content.as_deref(), Some("after the wait"));
    assert!(t.elapsed() >= Duration::from_millis(900), "Retry-After: 1 was honoured ({:?})", t.elapsed());

    sim.push(Scripted::Status { code: 503, retry_after: None });
    sim.push(Scripted::Status { code: 500, retry_after: Some(0) });
    sim.push(Scripted::Text("third time".into()));
    let c = client.stream(&ask("x"), &[], |_| {}).await.expect("retried stream");
    assert_eq!(c.message.content.as_deref(), Some("third time"));

    // A stream that breaks before any text is retried.
    sim.push(Scripted::BrokenStream(String::new()));
    sim.push(Scripted::Text("whole".into()));
    assert_eq!(client.stream(&ask("x"), &[], |_| {}).await.expect("retried").message.content.as_deref(), Some("whole"));

    // Out of retries: a clear error, after max_retries + 1 attempts.
    let before = sim.requests().len();
    for _ in 0..4 {
        sim.push(Scripted::Status { code: 502, retry_after: Some(0) });
    }
    let e = client.complete(&ask("x"), &[]).await.expect_err("gives up");
    assert!(matches!(e, LlmError::GaveUp { attempts: 4, .. }), "{e}");
    assert_eq!(sim.requests().len() - before, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_that_retrying_cannot_fix_are_not_retried() {
    let sim = LlmSim::start().await.expect("llm sim");
    let client = Client::new(settings(&sim, 3)).expect("client");

    sim.push(Scripted::Status { code: 401, retry_after: None });
    let e = client.complete(&ask("x"), &[]).await.expect_err("unauthorised");
    assert!(matches!(e, LlmError::Unauthorised(401)));
    assert!(e.to_string().contains("api_key ([llm] or [[models]])") && !e.to_string().contains(KEY), "{e}");

    sim.push(Scripted::Status { code: 400, retry_after: None });
    assert!(matches!(client.complete(&ask("x"), &[]).await, Err(LlmError::Refused { status: 400, .. })));

    // Text already streamed to the user cannot be taken back: a break after it is final.
    sim.push(Scripted::BrokenStream("half an ans".into()));
    let mut shown = String::new();
    let e = client.stream(&ask("x"), &[], |t| shown.push_str(t)).await.expect_err("broken");
    assert!(matches!(e, LlmError::GaveUp { attempts: 1, .. }), "{e}");
    assert_eq!(shown, "half an ans");

    sim.push(Scripted::BadChunk);
    assert!(matches!(client.stream(&ask("x"), &[], |_| {}).await, Err(LlmError::BadAnswer(_))));
    assert_eq!(sim.requests().len(), 4, "none of these was retried");

    let mut remote = settings(&sim, 0);
    remote.base_url = "http://203.0.113.7/v1".into();
    assert!(matches!(Client::new(remote), Err(LlmError::BaseUrl(_))), "plain http only to loopback");
}
