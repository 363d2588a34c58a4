//! The DingTalk channel: Stream-mode receive, replies over session webhooks and the OpenAPI,
//! media download, and a local gateway simulator that speaks the same protocol.
//!
//! Outbound only: nothing here listens on a socket except the simulator, which binds loopback.

pub mod backoff;
pub mod card;
pub mod frame;
pub mod gateway;
pub mod http;
pub mod media;
pub mod message;
pub mod openapi;
pub mod sender;
pub mod settings;
pub mod stream;

pub use message::{Content, ConversationKind, RobotMessage};
pub use settings::Settings;
