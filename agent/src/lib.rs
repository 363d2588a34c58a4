//! zhuli: an office assistant that answers in DingTalk. See docs/ARCHITECTURE.md.

// The chat texts of both languages (`agent/locales/`), compiled in; see `i18n`.
rust_i18n::i18n!("locales", fallback = "en");

pub mod access;
pub mod app;
pub mod assistant;
pub mod audit;
pub mod clock;
pub mod config;
pub mod dingtalk;
pub mod health;
pub mod heap;
pub mod i18n;
pub mod llm;
pub mod logging;
pub mod offsite;
pub mod privacy;
pub mod provision;
pub mod schedule;
pub mod secret;
pub mod store;
pub mod tools;
pub mod update;
pub mod validate;
