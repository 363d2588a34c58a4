//! The drive tools end to end against a real WebDAV server: rclone's (`rclone serve webdav`,
//! Debian package rclone) on loopback under a base path like Nextcloud's, serving a folder the
//! test seeds and inspects on disk. The real agent, the DingTalk simulator and the scripted
//! model drive it; every change is confirmed, audited and undone.

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::json;
use zhuli::audit::Kind;
use zhuli_sim::{
    dingtalk::{Inject, Simulator},
    llm::{LlmSim, Scripted},
};

use zhuli_sim::local_server::LocalServer;

use crate::support::{self, Agent, Journal, Server, calls, code_in};

const PASSWORD: &str = "drive-pw-Kq93xZ";

/// Shares a Nextcloud-shaped front made: (id, path).
type Shares = Arc<Mutex<Vec<(String, String)>>>;

/// A loopback front shaped like Nextcloud: the sharing API (OCS, `?format=json`) answered here
/// with the documented shapes, everything else (WebDAV) passed on to rclone, `Host` kept so
/// rclone accepts the `Destination` of a MOVE.
async fn nextcloud_front(dav: SocketAddr, root: PathBuf, auth: String) -> (SocketAddr, Shares) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shares: Shares = Arc::default();
    let kept = shares.clone();
    let client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new()).build_http::<Full<Bytes>>();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else { continue };
            let (shares, root, client, auth) = (kept.clone(), root.clone(), client.clone(), auth.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let (shares, root, client, auth) = (shares.clone(), root.clone(), client.clone(), auth.clone());
                    async move {
                        let ocs = |status: u16, code: u16, message: &str, data: serde_json::Value| {
                            let body = json!({"ocs": {"meta": {"status": if code == 200 { "ok" } else { "failure" }, "statuscode": code, "message": message}, "data": data}});
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(body.to_string())))
                                .expect("response")
                        };
                        let path = req.uri().path().to_owned();
                        if let Some(rest) = path.strip_prefix("/ocs/v2.php/apps/files_sharing/api/v1/shares") {
                            let authorized =
                                req.headers().get("authorization").and_then(|v| v.to_str().ok()) == Some(auth.as_str());
                            let api = req.headers().get("ocs-apirequest").and_then(|v| v.to_str().ok()) == Some("true");
                            if !authorized || !api {
                                return Ok::<_, Infallible>(ocs(401, 997, "Current user is not logged in", json!([])));
                            }
                            if req.method() == http::Method::DELETE {
                                let id = rest.trim_start_matches('/').to_owned();
                                let mut s = shares.lock().expect("shares");
                                let before = s.len();
                                s.retain(|(i, _)| *i != id);
                                return Ok(if s.len() < before {
                                    ocs(200, 200, "OK", json!([]))
                                } else {
                                    ocs(404, 404, "Wrong share ID, share does not exist", json!([]))
                                });
                            }
                            let form = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let form = String::from_utf8_lossy(&form).into_owned();
                            let field = |k: &str| {
                                form.split('&')
                                    .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                                    .map(zhuli::tools::dav::decode)
                            };
                            let target = field("path").unwrap_or_default();
                            if field("shareType").as_deref() != Some("3")
                                || !root.join(target.trim_start_matches('/')).exists()
                            {
                                return Ok(ocs(404, 404, "Wrong path, file/folder does not exist", json!([])));
                            }
                            let id = format!("{}", 40 + shares.lock().expect("shares").len());
                            shares.lock().expect("shares").push((id.clone(), target.clone()));
                            let data = json!({"id": id, "share_type": 3, "permissions": 1, "path": target, "token": format!("tok{id}"), "url": format!("https://cloud.example.com/s/tok{id}")});
                            return Ok(ocs(200, 200, "OK", data));
                        }
                        let (mut parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let pq = parts.uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
                        parts.uri = format!("http://{dav}{pq}").parse().expect("uri");
                        let answer = client
                            .request(http::Request::from_parts(parts, Full::new(body)))
                            .await
                            .expect("rclone answers");
                        let (parts, body) = answer.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        Ok(http::Response::from_parts(parts, Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (addr, shares)
}

struct Rig {
    shares: Shares,
    sim: Simulator,
    llm: LlmSim,
    agent: Agent,
    journal: Journal,
    _dav: Server,
    drive: PathBuf,
    share: PathBuf,
    scratch: PathBuf,
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

fn put(root: &std::path::Path, path: &str, bytes: &[u8]) {
    let p = root.join(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("folder");
    std::fs::write(p, bytes).expect("seed file");
}

async fn rig(tag: &str, password: &str) -> Rig {
    rig_with(tag, password, false).await
}

async fn rig_with(tag: &str, password: &str, nextcloud: bool) -> Rig {
    let scratch = support::temp_dir(&format!("{tag}-drive"));
    let (drive, share) = (scratch.join("drive"), scratch.join("share"));
    put(&drive, "reports/q3.pdf", b"%PDF-1.7 Q3 report");
    put(&drive, "reports/2025/q3-old.pdf", b"%PDF-1.7 old");
    put(&drive, "photos/team.jpg", b"\xff\xd8\xff jpeg");
    std::fs::create_dir_all(drive.join("archive")).expect("archive");
    std::fs::create_dir_all(&share).expect("share");
    let dav = Server::new(LocalServer::rclone_webdav(&drive, "/remote.php/dav/files/zhuli", Some(("zhuli", PASSWORD))));
    let journal = Journal::start(&scratch);
    let sim = Simulator::start(support::sim_config()).await.expect("simulator");
    let llm = LlmSim::start().await.expect("llm sim");
    let basic = format!("Basic {}", zhuli::tools::dav::base64(b"zhuli:drive-pw-Kq93xZ"));
    let (front, shares) = nextcloud_front(dav.addr(), drive.clone(), basic).await;
    let share_links = if nextcloud { "nextcloud" } else { "none" };
    let config = format!(
        "{}[tools.files.roots]\nshare = {:?}\n[tools.drive]\nurl = \"http://{front}/remote.php/dav/files/zhuli/\"\nusername = \"zhuli\"\npassword = {password:?}\nshare_links = \"{share_links}\"\n",
        support::assistant_config(&llm, &["drive", "files_list"], &journal),
        share.display().to_string(),
    );
    let agent = support::connected_agent(tag, &sim, &config).await;
    Rig { shares, sim, llm, agent, journal, _dav: dav, drive, share, scratch }
}

impl Rig {
    async fn ask(&self, text: &str) -> String {
        support::ask(&self.sim, &self.agent, Inject::text(text).from("hanmei")).await
    }

    async fn call(&self, tool: &str, args: serde_json::Value) -> String {
        support::call_tool(&self.sim, &self.llm, &self.agent, tool, args).await
    }

    /// A write call: asked, confirmed; the tool's result.
    async fn confirmed(&self, tool: &str, args: serde_json::Value) -> String {
        support::confirmed_call(&self.sim, &self.llm, &self.agent, tool, args).await.1
    }

    fn assert_password_kept(&self) {
        assert!(!self.agent.log().contains(PASSWORD), "the drive password appeared in the agent log");
        for e in self.journal.all() {
            assert!(e.iter().all(|(_, v)| !v.contains(PASSWORD)), "the drive password reached the audit trail");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_searches_and_downloads_into_a_local_root() {
    let rig = rig("drive-read", PASSWORD).await;
    let top = rig.call("drive_list", json!({})).await;
    assert!(top.starts_with("3 entries in the top folder"), "{top}");
    assert!(top.contains("- archive/") && top.contains("- photos/") && top.contains("- reports/"), "{top}");
    let reports = rig.call("drive_list", json!({"path": "reports"})).await;
    assert!(reports.contains("- reports/2025/") && reports.contains("- reports/q3.pdf (18 B"), "{reports}");
    let found = rig.call("drive_search", json!({"query": "Q3"})).await;
    assert!(found.starts_with("2 matches for “Q3”"), "{found}");
    assert!(found.contains("reports/q3.pdf") && found.contains("reports/2025/q3-old.pdf"), "{found}");
    let none = rig.call("drive_list", json!({"path": "reports/../../etc"})).await;
    assert!(none.contains("`..` is not allowed"), "{none}");

    let got = rig.confirmed("drive_download", json!({"path": "reports/q3.pdf", "to": "share/q3.pdf"})).await;
    assert!(got.contains("downloaded drive:reports/q3.pdf to share/q3.pdf"), "{got}");
    assert_eq!(std::fs::read(rig.share.join("q3.pdf")).expect("downloaded"), b"%PDF-1.7 Q3 report");
    let again = rig.confirmed("drive_download", json!({"path": "photos/team.jpg", "to": "share/q3.pdf"})).await;
    assert!(again.contains("already exists"), "never over a local file: {again}");
    assert_eq!(std::fs::read(rig.share.join("q3.pdf")).expect("kept"), b"%PDF-1.7 Q3 report");
    assert!(rig.ask("/undo").await.contains("删除了 share/q3.pdf"));
    assert!(!rig.share.join("q3.pdf").exists());
    let missing = rig.call("drive_list", json!({"path": "nope"})).await;
    assert!(missing.contains("nope does not exist"), "{missing}");
    // Without share links configured there is no share tool to offer.
    let offered = rig.llm.requests().last().expect("request").body["tools"].to_string();
    assert!(offered.contains("drive_list") && !offered.contains("drive_share"), "{offered}");
    rig.assert_password_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_sent_in_chat_is_uploaded_moved_and_both_undone() {
    let rig = rig("drive-write", PASSWORD).await;
    let m = Inject { media: b"budget,2027\nrent,100\n".to_vec(), ..Inject::of("file", "budget.csv") }.from("hanmei");
    rig.llm.push(Scripted::Text("Got it.".into()));
    support::ask(&rig.sim, &rig.agent, m).await;
    let note = rig.llm.requests().last().expect("request").body.to_string();
    let saved: String =
        note.split("saved as `").nth(1).expect("inbox name").chars().take_while(|c| *c != '`').collect();

    // Asked first; nothing on the drive before the confirmation.
    rig.llm.push(calls(&[("drive_upload", json!({"from": saved, "to": "reports/budget.csv"}))]));
    let question = rig.ask("put it on the drive under reports").await;
    assert!(question.contains("drive:reports/budget.csv"), "{question}");
    assert!(!rig.drive.join("reports/budget.csv").exists());
    rig.llm.push(Scripted::Text("Uploaded.".into()));
    rig.ask(&format!("/confirm {}", code_in(&question))).await;
    assert_eq!(std::fs::read(rig.drive.join("reports/budget.csv")).expect("uploaded"), b"budget,2027\nrent,100\n");
    let done = rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "drive_upload"), ("ACTOR", "hanmei")]);
    assert!(support::field(&done[0], "TARGET").is_some_and(|t| t.ends_with("to drive:reports/budget.csv")), "{done:?}");

    // Never over an existing file: refused before anything is asked.
    let over = rig.call("drive_upload", json!({"from": saved, "to": "reports/q3.pdf"})).await;
    assert!(over.contains("drive:reports/q3.pdf already exists"), "{over}");
    assert_eq!(std::fs::read(rig.drive.join("reports/q3.pdf")).expect("kept"), b"%PDF-1.7 Q3 report");
    let no_folder = rig.call("drive_upload", json!({"from": saved, "to": "nowhere/budget.csv"})).await;
    assert!(no_folder.contains("the folder drive:nowhere does not exist"), "{no_folder}");

    let moved = rig.confirmed("drive_move", json!({"from": "reports/q3.pdf", "to": "archive/q3-2026.pdf"})).await;
    assert!(moved.contains("moved drive:reports/q3.pdf to drive:archive/q3-2026.pdf"), "{moved}");
    assert!(rig.drive.join("archive/q3-2026.pdf").exists() && !rig.drive.join("reports/q3.pdf").exists());
    let onto = rig.call("drive_move", json!({"from": "reports/budget.csv", "to": "archive/q3-2026.pdf"})).await;
    assert!(onto.contains("already exists"), "{onto}");
    let folder = rig.confirmed("drive_move", json!({"from": "reports/2025", "to": "archive/2025"})).await;
    assert!(folder.contains("moved"), "{folder}");
    assert!(rig.drive.join("archive/2025/q3-old.pdf").exists());

    // Undo, newest first: the folder, the file, the upload.
    assert!(rig.ask("/undo").await.contains("移回了 drive:reports/2025"));
    assert!(rig.drive.join("reports/2025/q3-old.pdf").exists());
    assert!(rig.ask("/undo").await.contains("移回了 drive:reports/q3.pdf"));
    assert!(rig.drive.join("reports/q3.pdf").exists() && !rig.drive.join("archive/q3-2026.pdf").exists());
    assert!(rig.ask("/undo").await.contains("删除了 drive:reports/budget.csv"));
    assert!(!rig.drive.join("reports/budget.csv").exists());
    rig.journal.expect(3, Kind::ToolUndone, &[("ACTOR", "hanmei"), ("OUTCOME", "ok")]);
    rig.assert_password_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_named_for_the_admin() {
    let rig = rig("drive-badpw", "not-the-password").await;
    rig.llm.push(calls(&[("drive_list", json!({}))]));
    rig.llm.push(Scripted::Text("I cannot reach the drive.".into()));
    let answer = rig.ask("what's on the drive?").await;
    assert!(answer.contains("[tools.drive] username and password"), "{answer}");
    assert!(!rig.agent.log().contains("not-the-password"));
    rig.journal.expect(1, Kind::ToolFailed, &[("TOOL", "drive_list")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nextcloud_share_links_are_made_and_undone() {
    let rig = rig_with("drive-share", PASSWORD, true).await;
    let missing = rig.call("drive_share", json!({"path": "reports/nope.pdf"})).await;
    assert!(missing.contains("does not exist"), "checked before anything is asked: {missing}");
    let link = rig.confirmed("drive_share", json!({"path": "reports/q3.pdf"})).await;
    assert!(link.contains("read-only link to drive:reports/q3.pdf: https://cloud.example.com/s/tok40"), "{link}");
    assert_eq!(rig.shares.lock().expect("shares").clone(), [("40".to_owned(), "/reports/q3.pdf".to_owned())]);
    assert!(rig.ask("/undo").await.contains("删除了 drive:reports/q3.pdf 的分享链接"));
    assert!(rig.shares.lock().expect("shares").is_empty());
    // Moves go through the same front: rclone sees the front's host in Destination and Host.
    let moved = rig.confirmed("drive_move", json!({"from": "photos/team.jpg", "to": "archive/team.jpg"})).await;
    assert!(moved.contains("moved") && rig.drive.join("archive/team.jpg").exists(), "{moved}");
    rig.assert_password_kept();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_is_audited_by_its_size_never_its_words() {
    use support::PRIVATE_TEXT;
    let rig = rig("drive-audit", PASSWORD).await;
    let found = rig.call("drive_search", json!({"path": "reports", "query": PRIVATE_TEXT})).await;
    assert!(found.starts_with("0 matches"), "{found}");
    let missing = rig.call("drive_search", json!({"path": "nope", "query": PRIVATE_TEXT})).await;
    assert!(missing.contains("nope does not exist"), "{missing}");
    rig.journal.expect(2, Kind::ToolRequested, &[("TOOL", "drive_search")]);
    rig.journal.assert_no_private_text();
    let target = format!("drive:reports search ({} chars)", PRIVATE_TEXT.chars().count());
    rig.journal.expect(1, Kind::ToolAllowed, &[("TOOL", "drive_search"), ("TARGET", &target)]);
    rig.journal.expect(1, Kind::ToolExecuted, &[("TOOL", "drive_search"), ("ACTOR", "hanmei"), ("TARGET", &target)]);
    let denied = rig.journal.expect(1, Kind::ToolDenied, &[("TOOL", "drive_search")]);
    assert!(support::field(&denied[0], "REASON").is_some_and(|r| r.contains("nope does not exist")), "{denied:?}");
    rig.assert_password_kept();
}
