//! Several model endpoints against real HTTP servers on loopback that fail on command: protected
//! work reaches only local endpoints, open work falls back from the cloud to the local ones, a
//! failing endpoint is bypassed by its circuit breaker, and a stream that broke off restarts on
//! the next endpoint.

use std::time::{Duration, Instant};

use zhuli::{
    dingtalk::settings::Millis,
    llm::{
        ChatMessage, Role, Settings,
        route::{Class, Piece, Place, RouteError, Router},
    },
};
use zhuli_sim::llm::{LlmSim, Scripted};

fn endpoint(name: &str, place: Place, sim: &LlmSim, timeout_ms: u64) -> Settings {
    Settings {
        name: name.into(),
        place,
        base_url: sim.base_url(),
        model: format!("{name}-model"),
        api_key: None,
        timeout_ms: Millis::from_ms(timeout_ms),
        max_retries: 4,
        requests_per_minute: 6_000,
        daily_tokens: 0,
        daily_tokens_per_user: 0,
        monthly_tokens: 0,
        vision: false,
    }
}

/// A turn's deadline far enough away not to matter.
fn far() -> tokio::time::Instant {
    tokio::time::Instant::now() + Duration::from_secs(120)
}

fn ask(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage::text(Role::System, "You are zhuli."), ChatMessage::text(Role::User, text)]
}

struct Pair {
    cloud: LlmSim,
    local: LlmSim,
    router: Router,
}

async fn pair(timeout_ms: u64) -> Pair {
    let cloud = LlmSim::start().await.expect("cloud sim");
    let local = LlmSim::start().await.expect("local sim");
    let router = Router::new(vec![
        endpoint("cloud", Place::Cloud, &cloud, timeout_ms),
        endpoint("office", Place::Local, &local, timeout_ms),
    ])
    .expect("router");
    Pair { cloud, local, router }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_work_goes_to_the_cloud_and_protected_work_never_does() {
    let p = pair(5_000).await;
    p.cloud.push(Scripted::Text("云端回答".into()));
    let r = p.router.complete(Class::Open, far(), &[], &ask("今天天气"), &[]).await.expect("open answer");
    assert_eq!((r.endpoint.as_str(), r.place, r.fallback, r.why.as_str()), ("cloud", Place::Cloud, false, "first"));
    assert_eq!(r.completion.message.content.as_deref(), Some("云端回答"));

    p.local.push(Scripted::Text("本地回答".into()));
    let r =
        p.router.complete(Class::Protected, far(), &[], &ask("身份证 11010519491231002X"), &[]).await.expect("local");
    assert_eq!((r.endpoint.as_str(), r.fallback), ("office", false));
    assert_eq!(p.cloud.requests().len(), 1, "the protected request did not reach the cloud");

    // The local model fails: protected work is refused rather than sent to the healthy cloud.
    for _ in 0..5 {
        p.local.push(Scripted::Status { code: 503, retry_after: Some(0) });
    }
    let e = p.router.complete(Class::Protected, far(), &[], &ask("工资表"), &[]).await.expect_err("no local answer");
    match e {
        RouteError::NoneAnswered { class: Class::Protected, tried, .. } => {
            assert_eq!(tried.len(), 1, "{tried:?}");
            assert_eq!(tried[0].0, "office");
            assert!(tried[0].1.contains("503"), "{tried:?}");
        }
        other => panic!("{other}"),
    }
    assert_eq!(p.cloud.requests().len(), 1, "still only the open request reached the cloud");
    assert_eq!(p.local.requests().len(), 6, "the last endpoint in the order keeps its own four retries");

    // No local endpoint at all: protected work says so.
    let cloud_only = Router::new(vec![endpoint("cloud", Place::Cloud, &p.cloud, 5_000)]).expect("router");
    assert!(!cloud_only.serves(Class::Protected));
    let e = cloud_only.complete(Class::Protected, far(), &[], &ask("x"), &[]).await.expect_err("refused");
    assert!(matches!(e, RouteError::NoLocal), "{e}");
    assert!(e.to_string().contains("where = \"local\""), "{e}");
    assert_eq!(p.cloud.requests().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_cloud_falls_back_to_the_local_model_and_is_bypassed_after_three_failures() {
    let p = pair(5_000).await;
    // 500, 429 and a chunk that is not JSON: each fails the cloud (one retry, as a fallback
    // exists), and the local model answers.
    let failures = [
        vec![
            Scripted::Status { code: 500, retry_after: Some(0) },
            Scripted::Status { code: 500, retry_after: Some(0) },
        ],
        vec![
            Scripted::Status { code: 429, retry_after: Some(0) },
            Scripted::Status { code: 429, retry_after: Some(0) },
        ],
        vec![Scripted::BadChunk],
    ];
    for (i, script) in failures.into_iter().enumerate() {
        for s in script {
            p.cloud.push(s);
        }
        p.local.push(Scripted::Text(format!("本地 {i}")));
        let mut shown = String::new();
        let r = p
            .router
            .stream(Class::Open, far(), &[], &ask("你好"), &[], |piece| match piece {
                Piece::Text(t) => shown.push_str(t),
                Piece::Restart => shown.clear(),
            })
            .await
            .expect("answer from the fallback");
        assert_eq!((r.endpoint.as_str(), r.place, r.fallback), ("office", Place::Local, true), "round {i}");
        assert_eq!(r.why, "after cloud: failed");
        assert_eq!(shown, format!("本地 {i}"));
    }
    let cloud_calls = p.cloud.requests().len();
    assert_eq!(cloud_calls, 5, "two tries for 500, two for 429, one for the bad chunk");

    // Three failures in a row: the cloud is bypassed without being asked.
    let status = p.router.status();
    let cloud = status.iter().find(|s| s.name == "cloud").expect("cloud status");
    assert!(cloud.bypassed_for.is_some_and(|d| d > Duration::from_secs(20)), "{cloud:?}");
    assert!((cloud.figures.error_rate - 1.0).abs() < 1e-9, "{cloud:?}");
    let office = status.iter().find(|s| s.name == "office").expect("office status");
    assert_eq!((office.figures.calls, office.bypassed_for), (3, None));
    assert!(office.figures.p50.is_some() && office.figures.p95.is_some());

    let started = Instant::now();
    let r = p.router.complete(Class::Open, far(), &[], &ask("再问"), &[]).await.expect("answer");
    assert_eq!((r.endpoint.as_str(), r.why.as_str()), ("office", "after cloud: bypassed"));
    assert_eq!(p.cloud.requests().len(), cloud_calls, "a bypassed endpoint is not asked");
    eprintln!("routing: bypassed cloud → local answer in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cloud_that_does_not_answer_in_time_hands_over_and_a_broken_stream_restarts() {
    let p = pair(1_000).await;
    // The cloud thinks for longer than its timeout, twice (the try and its one retry).
    p.cloud.set_answer_delay(Duration::from_secs(3));
    p.local.push(Scripted::Text("本地及时回答".into()));
    let started = Instant::now();
    let r = p.router.complete(Class::Open, far(), &[], &ask("快"), &[]).await.expect("answer");
    let took = started.elapsed();
    assert_eq!((r.endpoint.as_str(), r.fallback), ("office", true));
    assert_eq!(r.completion.message.content.as_deref(), Some("本地及时回答"));
    assert_eq!(p.cloud.requests().len(), 2, "the try and one retry");
    eprintln!("routing: a cloud that does not answer (1 s timeout, one retry) → local answer in {took:?}");
    p.cloud.set_answer_delay(Duration::ZERO);

    // A stream that breaks after its first words: what was shown is withdrawn and the local
    // model's answer replaces it.
    p.cloud.push(Scripted::BrokenStream("半句话".into()));
    p.local.push(Scripted::Text("完整的回答".into()));
    let mut pieces = Vec::new();
    let r = p
        .router
        .stream(Class::Open, far(), &[], &ask("讲讲"), &[], |piece| {
            pieces.push(match piece {
                Piece::Text(t) => t.to_owned(),
                Piece::Restart => "<restart>".to_owned(),
            })
        })
        .await
        .expect("answer");
    assert_eq!(r.endpoint, "office");
    let joined = pieces.concat();
    assert!(joined.starts_with("半句话") && joined.contains("<restart>"), "{pieces:?}");
    assert_eq!(joined.rsplit("<restart>").next(), Some("完整的回答"), "{pieces:?}");
    // A stream that broke after text is not retried on the same endpoint.
    assert_eq!(p.cloud.requests().iter().filter(|r| r.body["stream"] == true).count(), 1);

    // A cloud that hangs past its share of the turn: with 4 s left and two endpoints to try,
    // it gets 2 s (its own timeout is far longer), counts as failed, and the local one answers.
    let slow = pair(60_000).await;
    slow.cloud.set_answer_delay(Duration::from_secs(30));
    slow.local.push(Scripted::Text("本地在时限内回答".into()));
    let started = Instant::now();
    let r = slow
        .router
        .complete(Class::Open, tokio::time::Instant::now() + Duration::from_secs(4), &[], &ask("赶时间"), &[])
        .await
        .expect("answer within the turn");
    let took = started.elapsed();
    // (Without the share the cloud would have answered after its 30 s.)
    assert_eq!((r.endpoint.as_str(), r.why.as_str()), ("office", "after cloud: failed"));
    let cloud = slow.router.status().into_iter().find(|s| s.name == "cloud").expect("cloud");
    assert!((cloud.figures.error_rate - 1.0).abs() < 1e-9, "the hang counts as a failure: {cloud:?}");
    eprintln!("routing: a cloud hanging past its share of a 4 s turn → local answer in {took:?}");

    // A tool call without a function name is no answer: not retried, the next endpoint answers.
    let before = p.cloud.requests().len();
    p.cloud.push(Scripted::MalformedToolCall);
    p.local.push(Scripted::Text("本地回答了工具问题".into()));
    let r = p.router.complete(Class::Open, far(), &[], &ask("查一下"), &[]).await.expect("answer");
    assert_eq!((r.endpoint.as_str(), r.why.as_str()), ("office", "after cloud: failed"));
    assert_eq!(p.cloud.requests().len(), before + 1);
    assert_eq!(r.completion.message.content.as_deref(), Some("本地回答了工具问题"));
}
