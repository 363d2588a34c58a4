//! DingTalk AI cards: the "typewriter" answer. One card per answered message, created and
//! delivered into the chat when the turn reaches the model (a "thinking" state), updated with
//! the whole text so far as it grows (`isFull`, so a lost update is healed by the next), and
//! finalised with the answer.
//!
//! APIs (card_1_0 of DingTalk's OpenAPI, request models as in the official SDKs):
//! `POST /v1.0/card/instances/createAndDeliver`, `PUT /v1.0/card/streaming`,
//! `PUT /v1.0/card/instances`. Permissions the app needs: `Card.Instance.Write` and
//! `Card.Streaming.Write`.
//!
//! The card's `outTrackId` is derived from the message's msgId, so answering the same message
//! again after a crash addresses the same card instead of posting a second answer.

use std::{sync::Arc, time::Duration};

use rand::{SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use super::{
    ConversationKind, RobotMessage,
    backoff::Backoff,
    openapi::{OpenApi, Outcome},
    settings::CardSettings,
};

pub const CREATE_PATH: &str = "/v1.0/card/instances/createAndDeliver";
pub const STREAM_PATH: &str = "/v1.0/card/streaming";
pub const UPDATE_PATH: &str = "/v1.0/card/instances";

/// The AI card template's `flowStatus` values.
pub mod flow {
    pub const PROCESSING: &str = "1";
    pub const FINISHED: &str = "3";
    pub const FAILED: &str = "5";
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CardError {
    #[error("a 1:1 card needs the sender's staff id, which this message lacks")]
    NoStaffId,
    #[error("DingTalk refused the card call: {0}")]
    Refused(String),
    #[error("the card call did not succeed after {attempts} attempts: {last}")]
    GaveUp { attempts: u32, last: String },
}

pub struct Cards {
    api: Arc<OpenApi>,
    settings: CardSettings,
}

/// The card id for the answer to `msg_id`.
pub fn out_track_id(msg_id: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, msg_id.as_bytes());
    let hex: String = digest.as_ref()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("zhuli-{hex}")
}

impl Cards {
    pub fn new(api: Arc<OpenApi>, settings: CardSettings) -> Self {
        Cards { api, settings }
    }

    pub fn update_interval(&self) -> Duration {
        self.settings.update_ms.get()
    }

    /// One call, retried through throttling and transient failures `attempts` times.
    async fn call(
        &self,
        method: http::Method,
        path: &'static str,
        body: &Value,
        attempts: u32,
    ) -> Result<Value, CardError> {
        let mut backoff = Backoff::new(
            self.api.settings().limits.retry_initial_ms.get(),
            Duration::from_secs(5),
            StdRng::from_os_rng(),
        );
        let mut last = String::new();
        for attempt in 1..=attempts {
            match self.api.call_with(method.clone(), path, body).await {
                Outcome::Done(v) if v.get("success") == Some(&Value::Bool(false)) => {
                    return Err(CardError::Refused(short(&v)));
                }
                Outcome::Done(v) => return Ok(v),
                Outcome::Failed(why) => return Err(CardError::Refused(why)),
                Outcome::Throttled(why) | Outcome::Transient(why) => last = why,
            }
            if attempt < attempts {
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
        Err(CardError::GaveUp { attempts, last })
    }

    /// Create the card for the answer to `message` and deliver it into its chat, in the
    /// "thinking" state. Returns the card's outTrackId.
    pub async fn create(&self, message: &RobotMessage) -> Result<String, CardError> {
        let id = out_track_id(&message.msg_id);
        let robot = self.api.settings().robot_code.as_str();
        let mut body = json!({
            "cardTemplateId": self.settings.template_id.as_str(),
            "outTrackId": id,
            "callbackType": "STREAM",
            "userIdType": 1,
            "cardData": { "cardParamMap": { self.settings.content_key.as_str(): "", "flowStatus": flow::PROCESSING } },
        });
        match message.conversation_kind {
            ConversationKind::Group => {
                body["openSpaceId"] = json!(format!("dtv1.card//IM_GROUP.{}", message.conversation_id));
                body["imGroupOpenSpaceModel"] = json!({ "supportForward": true });
                body["imGroupOpenDeliverModel"] = json!({ "robotCode": robot });
            }
            ConversationKind::Single => {
                let staff = message.sender_staff_id.as_deref().filter(|s| !s.is_empty()).ok_or(CardError::NoStaffId)?;
                body["openSpaceId"] = json!(format!("dtv1.card//IM_ROBOT.{staff}"));
                body["imRobotOpenSpaceModel"] = json!({ "supportForward": true });
                body["imRobotOpenDeliverModel"] = json!({ "spaceType": "IM_ROBOT", "robotCode": robot });
            }
        }
        let v = self.call(http::Method::POST, CREATE_PATH, &body, 3).await?;
        let failed = v
            .pointer("/result/deliverResults")
            .and_then(Value::as_array)
            .is_some_and(|r| r.iter().any(|d| d.get("success") == Some(&Value::Bool(false))));
        if failed {
            return Err(CardError::Refused(format!("the card was not delivered: {}", short(&v))));
        }
        Ok(id)
    }

    /// Show `content` (the whole text so far) in card `id`.
    pub async fn update(&self, id: &str, content: &str) -> Result<(), CardError> {
        self.stream(id, content, false, 1).await
    }

    /// Finalise card `id` with the answer.
    pub async fn finish(&self, id: &str, content: &str) -> Result<(), CardError> {
        self.stream(id, content, true, 4).await?;
        // The template's status badge; the text is already final, so a failure here only logs.
        let body = json!({
            "outTrackId": id,
            "cardData": { "cardParamMap": { "flowStatus": flow::FINISHED, self.settings.content_key.as_str(): content } },
            "cardUpdateOptions": { "updateCardDataByKey": true },
        });
        if let Err(e) = self.call(http::Method::PUT, UPDATE_PATH, &body, 2).await {
            log::warn!("card {id}: answer shown, but its status was not set to finished: {e}");
        }
        Ok(())
    }

    async fn stream(&self, id: &str, content: &str, finalize: bool, attempts: u32) -> Result<(), CardError> {
        let body = json!({
            "outTrackId": id,
            "guid": format!("{:032x}", rand::random::<u128>()),
            "key": self.settings.content_key.as_str(),
            "content": content,
            "isFull": true,
            "isFinalize": finalize,
            "isError": false,
        });
        self.call(http::Method::PUT, STREAM_PATH, &body, attempts).await.map(|_| ())
    }
}

/// A short, content-free summary of an error answer.
fn short(v: &Value) -> String {
    let code = v.get("code").and_then(Value::as_str).unwrap_or_default();
    let msg = v.get("message").and_then(Value::as_str).unwrap_or_default();
    format!("{code} {msg}").trim().chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_ids_are_stable_per_message_and_url_safe() {
        let a = out_track_id("msgA+/=");
        assert_eq!(a, out_track_id("msgA+/="));
        assert_ne!(a, out_track_id("msgB"));
        assert!(a.starts_with("zhuli-") && a.len() == 38);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    }
}
