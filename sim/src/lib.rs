//! zhuli's test doubles, kept out of the appliance: the DingTalk gateway simulator, a GitHub
//! stand-in, a scripted OpenAI-compatible model, real servers started on loopback, and the
//! terminal demo that runs the real agent against the simulator.
//!
//! The box's image carries the `zhuli` binary only; this crate is for developers, the
//! end-to-end tests, the benchmarks and the boot test. See docs/ARCHITECTURE.md.

pub mod demo;
pub mod dingtalk;
pub mod github;
pub mod llm;
pub mod local_server;
pub mod serve;
