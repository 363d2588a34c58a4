//! The github tools end to end: the real agent, the DingTalk simulator, the scripted model and a
//! loopback server answering with GitHub's documented shapes (pagination by `Link`, the
//! `x-ratelimit-*` headers, secondary limits, bad credentials). Checked in the server's state,
//! the requests it saw and the audit trail.

use serde_json::json;
use zhuli::audit::Kind;
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    github::GithubSim,
    llm::{LlmSim, Scripted},
};

use crate::support::{self, Agent, Journal, calls, code_in};

const TOKEN: &str = "github_pat_e2e_Yh72LmQ0";

struct Rig {
    sim: Simulator,
    llm: LlmSim,
    gh: GithubSim,
    agent: Agent,
    journal: Journal,
    scratch: std::path::PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

async fn rig(tag: &str, token: &str) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-gh"));
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let gh = GithubSim::start(TOKEN).await.expect("github sim");
    gh.seed_repo("acme/site", 60, 5);
    gh.seed_repo("acme/secret-plans", 3, 0);
    let config = format!(
        "{}[tools.github]\napi_base = {:?}\ntoken = {token:?}\nrepos = [\"acme/site\", \"tools/*\"]\nmax_results = 40\n",
        support::assistant_config(&llm, &["github"], &journal),
        gh.base_url(),
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { sim, llm, gh, agent, journal, scratch }
}

impl Rig {
    async fn ask(&self, text: &str) -> String {
        support::ask(&self.sim, &self.agent, Inject::text(text).from("hanmei")).await
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> String {
        support::call_tool(&self.sim, &self.llm, &self.agent, tool, args).await
    }

    fn assert_token_kept(&self) {
        assert!(!self.agent.log().contains(TOKEN), "the GitHub token appeared in the agent log");
        for e in self.journal.all() {
            assert!(e.iter().all(|(_, v)| !v.contains(TOKEN)), "the GitHub token reached the audit trail: {e:?}");
        }
        support::assert_no_secret(&self.agent);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_follow_pages_show_opens_a_pull_request_and_notifications_stay_in_granted_repos() {
    let rig = rig("gh-read", TOKEN).await;
    // 60 issues and 5 pull requests, newest first; every fifth is closed. Open: 48 issues and
    // 4 pull requests, more than the 40 a listing returns.
    let issues = rig.call("github_list", json!({"repo": "acme/site"})).await;
    assert!(issues.starts_with("40 issues (open) in acme/site"), "{issues}");
    assert!(issues.contains("#59 (open) Issue 59") && !issues.contains("#60 "), "{issues}");
    assert!(issues.contains("more than 40"), "{issues}");
    assert!(!issues.contains("Pull request"), "pull requests are not issues: {issues}");
    let pages: Vec<String> = rig.gh.requests().into_iter().map(|(_, p)| p).filter(|p| p.contains("/issues?")).collect();
    assert_eq!(pages.len(), 2, "the second page came from the Link header: {pages:?}");
    assert!(pages[1].contains("page=2"), "{pages:?}");

    let pulls = rig.call("github_list", json!({"repo": "acme/site", "kind": "pulls"})).await;
    assert!(pulls.starts_with("4 pull requests (open)"), "{pulls}");
    let bugs = rig.call("github_list", json!({"repo": "acme/site", "label": "bug", "state": "all"})).await;
    assert!(bugs.starts_with("20 issues (open and closed)") && bugs.contains("[bug]"), "{bugs}");

    let pr = rig.call("github_show", json!({"repo": "acme/site", "number": 62})).await;
    assert!(pr.contains("feature-62 → main") && pr.contains("+620 −62"), "{pr}");
    assert!(pr.contains("latest of 6 comments") && pr.contains("comment 5 on 62"), "{pr}");
    assert!(pr.contains("comment 1 on 62") && !pr.contains("comment 0 on 62"), "the latest five comments: {pr}");

    rig.gh.add_notification("acme/site", "PullRequest", "Fix the footer", "review_requested", true);
    rig.gh.add_notification("acme/site", "Issue", "Old one", "mention", false);
    rig.gh.add_notification("someone/else", "Issue", "Not ours", "subscribed", true);
    rig.gh.add_notification("tools/cli", "Release", "v2.0", "subscribed", true);
    let n = rig.call("github_notifications", json!({})).await;
    assert!(n.starts_with("2 unread notifications"), "{n}");
    assert!(n.contains("pull request: Fix the footer (review requested") && n.contains("release: v2.0"), "{n}");
    assert!(!n.contains("Not ours") && !n.contains("Old one"), "{n}");
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "github_show"), ("TARGET", "acme/site#62")]);
    rig.assert_token_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comments_and_new_issues_are_confirmed_audited_and_undone() {
    let rig = rig("gh-write", TOKEN).await;
    let body = "Deployed to staging, please check the footer.";
    rig.llm.push(calls(&[("github_comment", json!({"repo": "acme/site", "number": 3, "body": body}))]));
    let question = rig.ask("tell them on issue 3 it's on staging").await;
    assert!(question.contains("acme/site#3") && question.contains("Deployed to staging"), "{question}");
    assert_eq!(rig.gh.issue("acme/site", 3).expect("issue 3").comments.len(), 3, "nothing posted before /confirm");
    rig.llm.push(Scripted::Text("Commented.".into()));
    assert_eq!(rig.ask(&format!("/confirm {}", code_in(&question))).await, "Commented.");
    let after = rig.gh.issue("acme/site", 3).expect("issue 3").comments;
    assert_eq!(after.len(), 4);
    assert_eq!((after[3].body.as_str(), after[3].user.as_str()), (body, "zhuli-bot"));
    let executed = rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "github_comment"), ("ACTOR", "hanmei")]);
    assert_eq!(support::field(&executed[0], "TARGET"), Some("acme/site#3"));
    for e in rig.journal.all() {
        assert!(e.iter().all(|(_, v)| !v.contains("staging")), "the comment's text reached the audit trail: {e:?}");
    }
    let undone = rig.ask("/undo").await;
    assert!(undone.contains("删除了 acme/site#3 上的评论"), "{undone}");
    assert_eq!(rig.gh.issue("acme/site", 3).expect("issue 3").comments.len(), 3);

    rig.llm.push(calls(&[(
        "github_create_issue",
        json!({"repo": "acme/site", "title": "Footer overlaps on mobile", "body": "Seen on iPhone.", "labels": ["bug"]}),
    )]));
    let question = rig.ask("open an issue about the footer").await;
    assert!(question.contains("Footer overlaps on mobile"), "{question}");
    rig.llm.push(Scripted::Text("Opened #66.".into()));
    rig.ask(&format!("/confirm {}", code_in(&question))).await;
    let made = rig.gh.issue("acme/site", 66).expect("issue 66 opened");
    assert_eq!(
        (made.title.as_str(), made.labels.clone(), made.state.as_str()),
        ("Footer overlaps on mobile", vec!["bug".to_owned()], "open")
    );
    assert!(rig.ask("/undo").await.contains("已将 acme/site#66 关闭"));
    let closed = rig.gh.issue("acme/site", 66).expect("issue 66");
    assert_eq!((closed.state.as_str(), closed.state_reason.as_deref()), ("closed", Some("not_planned")));
    rig.journal.expect(2, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    rig.assert_token_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_repos_rate_limits_and_a_bad_token_get_clear_answers() {
    let rig = rig("gh-limits", TOKEN).await;
    let seen = rig.gh.requests().len();
    let refused = rig.call("github_show", json!({"repo": "acme/secret-plans", "number": 1})).await;
    assert!(refused.contains("not one the assistant may use") && refused.contains("acme/site"), "{refused}");
    let sneaky = rig.call("github_list", json!({"repo": "acme/site/../secret-plans"})).await;
    assert!(sneaky.contains("not one the assistant may use"), "{sneaky}");
    assert_eq!(rig.gh.requests().len(), seen, "nothing was asked of GitHub for an ungranted repository");

    // A secondary limit asking for one second is waited out.
    rig.gh.state().secondary.push_back(1);
    let shown = rig.call("github_show", json!({"repo": "acme/site", "number": 2})).await;
    assert!(shown.contains("#2 (open) Issue 2"), "{shown}");

    // The primary limit runs out: GitHub's 403, then no more calls until the reset.
    rig.gh.state().remaining = 0;
    let limited = rig.call("github_show", json!({"repo": "acme/site", "number": 6})).await;
    assert!(limited.contains("rate limit for this token is used up until"), "{limited}");
    let before = rig.gh.requests().len();
    let again = rig.call("github_list", json!({"repo": "acme/site"})).await;
    assert!(again.contains("used up until"), "{again}");
    assert_eq!(rig.gh.requests().len(), before, "no call while the limit is used up");
    rig.journal.expect(2, Kind::ToolFailed, &[("ACTOR", "hanmei")]);

    // A token GitHub refuses: the admin is told what to fix, in the chat.
    let rig2 = self::rig("gh-badtoken", "github_pat_wrong").await;
    rig2.llm.push(calls(&[("github_notifications", json!({}))]));
    rig2.llm.push(Scripted::Text("I could not read the notifications.".into()));
    let answer = rig2.ask("any GitHub notifications?").await;
    assert!(answer.contains("[tools.github] token"), "the admin's fix is named in the chat: {answer}");
    assert!(!rig2.agent.log().contains("github_pat_wrong"), "the token appeared in the log");
    rig.assert_token_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doctor_checks_the_token_and_each_backend() {
    let rig = rig("gh-doctor", TOKEN).await;
    let doctor = |config: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_zhuli"))
            .args(["doctor", "--wait-ms", "3000", "--config"])
            .arg(config)
            .output()
            .expect("doctor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let seen = rig.gh.requests().len();
    let out = doctor(rig.agent.config_path());
    assert!(out.contains("6. tools          PASS  GitHub token accepted, 5000 of 5000 calls left this hour"), "{out}");
    assert_eq!(rig.gh.state().remaining, 5000, "the check does not spend the limit");
    assert!(rig.gh.requests().len() > seen);

    // A drive nobody answers and a wrong token: both named, with the fix.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = closed.local_addr().expect("addr").port();
    drop(closed);
    let text = std::fs::read_to_string(rig.agent.config_path()).expect("config").replace(TOKEN, "github_pat_wrong");
    let bad = rig.scratch.join("bad.toml");
    std::fs::write(&bad, format!("{text}[tools.drive]\nurl = \"http://127.0.0.1:{port}/dav/\"\n")).expect("write");
    let out = doctor(&bad);
    assert!(out.contains("6. tools          FAIL  FAILED: GitHub refused the token (401 Bad credentials)"), "{out}");
    assert!(out.contains("FAILED: drive: request to http://127.0.0.1:"), "{out}");
    assert!(!out.contains("github_pat_wrong") && !out.contains(TOKEN), "no token in the report: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn titles_bodies_and_odd_arguments_stay_out_of_the_audit_trail() {
    use support::PRIVATE_TEXT;
    let rig = rig("gh-audit", TOKEN).await;
    // An issue number given as words: refused before anything is asked, and the words are not
    // what the audit trail names.
    let odd = rig.call("github_show", json!({"repo": "acme/site", "number": PRIVATE_TEXT})).await;
    assert!(odd.starts_with("refused:") && odd.contains("`number`"), "{odd}");
    let confirmed = |tool: &'static str, args: serde_json::Value| {
        support::confirmed_call(&rig.sim, &rig.llm, &rig.agent, tool, args)
    };
    let (question, _) =
        confirmed("github_comment", json!({"repo": "acme/site", "number": 3, "body": PRIVATE_TEXT})).await;
    assert!(question.contains(PRIVATE_TEXT), "the person is shown what will be posted: {question}");
    let (question, _) = confirmed(
        "github_create_issue",
        json!({"repo": "acme/site", "title": PRIVATE_TEXT, "body": PRIVATE_TEXT, "labels": [PRIVATE_TEXT]}),
    )
    .await;
    assert!(question.contains(PRIVATE_TEXT), "{question}");
    assert!(rig.ask("/undo").await.contains("已将 acme/site#66 关闭"));
    assert!(rig.ask("/undo").await.contains("删除了 acme/site#3 上的评论"));

    rig.journal.expect(2, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    rig.journal.assert_no_private_text();
    rig.journal.expect(1, Kind::ToolDenied, &[("TOOL", "github_show"), ("TARGET", "acme/site#?")]);
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "github_comment"), ("TARGET", "acme/site#3")]);
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "github_create_issue"), ("TARGET", "new issue in acme/site")]);
    rig.assert_token_kept();
}
