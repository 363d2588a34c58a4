//! End-to-end tests: the real `zhuli` binary against the gateway simulator on loopback.

mod assistant;
mod attacks;
mod backup;
mod boot;
mod boot_update;
mod caldav;
mod chats;
mod cli;
mod conformance;
mod drive;
mod faults;
mod github;
mod health;
mod hybrid;
mod llm;
mod load;
mod media;
mod plugins;
mod provision;
mod recovery;
mod roundtrip;
mod routing;
mod sandbox;
mod store;
mod support;
mod workspace;
