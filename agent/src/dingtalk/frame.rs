//! Stream frames: the JSON envelope the gateway pushes and the ACK frames we send back.
//!
//! Parsing is lenient where DingTalk may grow (unknown types, topics and headers are kept, not
//! refused) and strict where a frame could not be answered (no `type`, no `messageId`).
//! This module never logs frame `data`: it may hold message text.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// Frames larger than this are refused before JSON parsing.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The robot-message callback topic.
pub const TOPIC_ROBOT: &str = "/v1.0/im/bot/messages/get";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameType {
    System,
    Event,
    Callback,
    /// A type this build does not know; kept so the caller can log it.
    Other(String),
}

impl FrameType {
    fn parse(s: &str) -> Self {
        match s {
            "SYSTEM" => FrameType::System,
            "EVENT" => FrameType::Event,
            "CALLBACK" => FrameType::Callback,
            other => FrameType::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            FrameType::System => "SYSTEM",
            FrameType::Event => "EVENT",
            FrameType::Callback => "CALLBACK",
            FrameType::Other(s) => s,
        }
    }
}

/// One downstream frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamFrame {
    pub kind: FrameType,
    pub topic: String,
    pub message_id: String,
    /// All headers as strings (numbers are kept in their JSON spelling).
    pub headers: BTreeMap<String, String>,
    /// The `data` field: itself a JSON document in a string.
    pub data: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("frame of {0} bytes exceeds the 1 MiB limit")]
    TooLarge(usize),
    #[error("frame is not valid JSON: {0}")]
    Json(String),
    #[error("frame is not a JSON object")]
    NotObject,
    #[error("frame has no {0:?} field")]
    Missing(&'static str),
    #[error("frame field {0:?} has the wrong JSON type")]
    WrongType(&'static str),
}

impl StreamFrame {
    /// Parse a text frame.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        if text.len() > MAX_FRAME_BYTES {
            return Err(FrameError::TooLarge(text.len()));
        }
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError::Json(e.to_string()))?;
        let Value::Object(mut obj) = value else {
            return Err(FrameError::NotObject);
        };
        let kind = match obj.get("type") {
            Some(Value::String(s)) => FrameType::parse(s),
            Some(_) => return Err(FrameError::WrongType("type")),
            None => return Err(FrameError::Missing("type")),
        };
        let mut headers = BTreeMap::new();
        match obj.remove("headers") {
            Some(Value::Object(h)) => {
                for (k, v) in h {
                    let v = match v {
                        Value::String(s) => s,
                        Value::Null => continue,
                        other => other.to_string(),
                    };
                    headers.insert(k, v);
                }
            }
            Some(_) => return Err(FrameError::WrongType("headers")),
            None => return Err(FrameError::Missing("headers")),
        }
        let message_id = headers.get("messageId").cloned().ok_or(FrameError::Missing("headers.messageId"))?;
        let topic = headers.get("topic").cloned().unwrap_or_default();
        let data = match obj.remove("data") {
            Some(Value::String(s)) => s,
            Some(Value::Null) | None => String::new(),
            // Lenient: a gateway that inlines the object instead of a string is still understood.
            Some(other @ Value::Object(_)) => other.to_string(),
            Some(_) => return Err(FrameError::WrongType("data")),
        };
        Ok(StreamFrame { kind, topic, message_id, headers, data })
    }
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AckHeaders<'a> {
    content_type: &'static str,
    message_id: &'a str,
}

#[derive(Debug, Serialize)]
struct AckFrame<'a> {
    code: u16,
    headers: AckHeaders<'a>,
    message: &'a str,
    data: String,
}

/// Protocol status of an ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckCode {
    Ok = 200,
    UnknownTopic = 404,
    Failed = 500,
}

fn ack(message_id: &str, code: AckCode, data: String) -> String {
    let frame = AckFrame {
        code: code as u16,
        headers: AckHeaders { content_type: "application/json", message_id },
        message: if code == AckCode::Ok {
            "OK"
        } else if code == AckCode::UnknownTopic {
            "unknown topic"
        } else {
            "failed"
        },
        data,
    };
    serde_json::to_string(&frame).expect("serialising a struct of strings and integers cannot fail")
}

/// The answer to a SYSTEM ping: echo its data.
pub fn ping_ack(frame: &StreamFrame) -> String {
    ack(&frame.message_id, AckCode::Ok, frame.data.clone())
}

/// The answer to a CALLBACK: `{"response": null}` is what robot messages expect.
pub fn callback_ack(message_id: &str, code: AckCode) -> String {
    ack(message_id, code, r#"{"response":null}"#.to_owned())
}

/// The answer to an EVENT: SUCCESS, or LATER to have it redelivered.
pub fn event_ack(message_id: &str, success: bool) -> String {
    let data = if success {
        r#"{"status":"SUCCESS","message":"success"}"#
    } else {
        r#"{"status":"LATER","message":"retry later"}"#
    };
    ack(message_id, if success { AckCode::Ok } else { AckCode::Failed }, data.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_and_echoes_it() {
        let f = StreamFrame::parse(
            r#"{"specVersion":"1.0","type":"SYSTEM","headers":{"topic":"ping","messageId":"m1","time":"1690000000000","contentType":"application/json"},"data":"{\"opaque\":\"abc\"}"}"#,
        )
        .expect("valid ping frame");
        assert_eq!((f.kind.clone(), f.topic.as_str(), f.message_id.as_str()), (FrameType::System, "ping", "m1"));
        let ack: Value = serde_json::from_str(&ping_ack(&f)).expect("ack is JSON");
        assert_eq!(ack["code"], 200);
        assert_eq!(ack["headers"]["messageId"], "m1");
        assert_eq!(ack["data"], "{\"opaque\":\"abc\"}");
    }

    #[test]
    fn numbers_in_headers_become_strings_unknown_types_are_kept() {
        let f = StreamFrame::parse(r#"{"type":"FUTURE","headers":{"messageId":"x","time":1690000000000},"data":null}"#)
            .expect("lenient parse");
        assert_eq!(f.kind, FrameType::Other("FUTURE".into()));
        assert_eq!(f.headers["time"], "1690000000000");
        assert_eq!(f.data, "");
    }

    #[test]
    fn refuses_what_cannot_be_answered() {
        assert_eq!(StreamFrame::parse("[1]"), Err(FrameError::NotObject));
        assert_eq!(StreamFrame::parse(r#"{"headers":{}}"#), Err(FrameError::Missing("type")));
        assert_eq!(
            StreamFrame::parse(r#"{"type":"SYSTEM","headers":{}}"#),
            Err(FrameError::Missing("headers.messageId"))
        );
        assert!(matches!(StreamFrame::parse("{"), Err(FrameError::Json(_))));
        let big =
            format!(r#"{{"type":"SYSTEM","headers":{{"messageId":"a"}},"data":"{}"}}"#, "x".repeat(MAX_FRAME_BYTES));
        assert!(matches!(StreamFrame::parse(&big), Err(FrameError::TooLarge(_))));
    }

    #[test]
    fn event_ack_says_later_on_failure() {
        let v: Value = serde_json::from_str(&event_ack("e", false)).expect("json");
        assert_eq!(v["code"], 500);
        assert!(v["data"].as_str().is_some_and(|d| d.contains("LATER")));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Whatever the headers and data hold, a well-formed frame parses back to what was sent,
        /// and its ACK names the same messageId.
        #[test]
        fn well_formed_frames_round_trip(
            kind in prop_oneof!["SYSTEM", "EVENT", "CALLBACK", "[A-Z]{1,12}"],
            topic in "\\PC{0,40}",
            message_id in "\\PC{1,40}",
            data in "\\PC{0,200}",
            extra in proptest::collection::btree_map("[a-zA-Z]{1,10}", "\\PC{0,20}", 0..5),
        ) {
            let mut headers: serde_json::Map<String, Value> = extra.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            headers.insert("topic".into(), Value::String(topic.clone()));
            headers.insert("messageId".into(), Value::String(message_id.clone()));
            let text = serde_json::json!({"specVersion": "1.0", "type": kind, "headers": headers, "data": data}).to_string();
            let f = StreamFrame::parse(&text).expect("well-formed frame parses");
            prop_assert_eq!(f.kind.as_str(), kind.as_str());
            prop_assert_eq!(&f.topic, &topic);
            prop_assert_eq!(&f.message_id, &message_id);
            prop_assert_eq!(&f.data, &data);
            let ack: Value = serde_json::from_str(&callback_ack(&f.message_id, AckCode::Ok)).expect("ACK is JSON");
            prop_assert_eq!(ack["headers"]["messageId"].as_str(), Some(message_id.as_str()));
        }

        /// Arbitrary text never panics the parser.
        #[test]
        fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
            let _ = StreamFrame::parse(&text);
        }
    }
}
