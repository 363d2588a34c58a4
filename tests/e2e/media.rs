//! Media on demand: the download API, then the file, into a bounded private area.

use std::{path::Path, sync::Arc, time::Duration};

use zhuli::{
    config::Config,
    dingtalk::{
        http::{HttpClient, tls_config},
        media::{MediaArea, MediaError},
        openapi::OpenApi,
    },
};
use zhuli_sim::dingtalk::Simulator;

use crate::support::{SECRET, config_for, sim_config, temp_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn media_is_fetched_on_demand_into_a_bounded_area() {
    let sim = Simulator::start(sim_config()).await.expect("sim");
    let dir = temp_dir("media");
    let extra = "media_max_file_bytes = 1000\nmedia_max_total_bytes = 2500\n";
    let text = format!("[agent]\nstate_dir = {:?}\n{}", dir.display().to_string(), config_for(&sim, SECRET, extra));
    let config = Config::parse(&text, Path::new("(test)")).expect("config");
    let http = HttpClient::new(tls_config(), Duration::from_secs(5));
    let api = Arc::new(OpenApi::new(config.dingtalk.clone(), http));
    let area = MediaArea::open(dir.join("media"), api).await.expect("media area");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("media")).expect("area exists").permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "the area is private");
    }

    let picture: Vec<u8> = (0..900u32).map(|i| (i % 251) as u8).collect();
    let code = sim.add_file(picture.clone());
    let got = area.fetch(&code).await.expect("fetch");
    assert_eq!(std::fs::read(&got.path).expect("read"), picture);
    assert_eq!(got.bytes, 900);

    let big = sim.add_file(vec![7u8; 1001]);
    assert!(matches!(area.fetch(&big).await, Err(MediaError::TooLarge(1000))));
    assert!(matches!(area.fetch("no-such-code").await, Err(MediaError::Api(_))));

    // Three files of 900 bytes fit under 2500 only if the oldest goes.
    let second = area.fetch(&sim.add_file(vec![1u8; 900])).await.expect("second");
    let third = area.fetch(&sim.add_file(vec![2u8; 900])).await.expect("third");
    assert!(!got.path.exists(), "the oldest file made room");
    assert!(second.path.exists() && third.path.exists());
    assert_eq!(sim.counters().tokens_issued, 1, "one access token for all downloads");
    let _ = std::fs::remove_dir_all(dir);
}
