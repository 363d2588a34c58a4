//! The robot message model: every msgtype DingTalk pushes on the robot topic, parsed once into
//! one typed value. Inner code never looks at the raw JSON.
//!
//! Never logs message content; `Debug` of [`RobotMessage`] is for tests only.

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConversationKind {
    /// A 1:1 chat with the robot ("1").
    Single,
    /// A group chat ("2").
    Group,
}

/// One part of a rich-text message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RichPart {
    Text(String),
    Picture { download_code: String },
}

/// What the message carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Content {
    Text(String),
    RichText(Vec<RichPart>),
    Picture {
        download_code: String,
    },
    /// A voice message; `recognition` is DingTalk's own speech-to-text.
    Audio {
        download_code: String,
        recognition: String,
    },
    Video {
        download_code: String,
        duration_s: Option<u64>,
        video_type: Option<String>,
    },
    File {
        download_code: String,
        file_name: String,
    },
    /// A msgtype this build does not know (kept so the user gets a clear answer).
    Unsupported {
        msgtype: String,
    },
}

/// Where a reply for this message may be posted without an access token.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionWebhook {
    pub url: String,
    /// Wall-clock expiry, milliseconds since the epoch (DingTalk's clock).
    pub expires_at_ms: i64,
}

impl std::fmt::Debug for SessionWebhook {
    // The URL carries a session credential: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionWebhook(<redacted>, expires_at_ms={})", self.expires_at_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RobotMessage {
    pub msg_id: String,
    pub conversation_id: String,
    pub conversation_kind: ConversationKind,
    pub conversation_title: Option<String>,
    pub sender_id: String,
    pub sender_staff_id: Option<String>,
    pub sender_nick: String,
    pub is_admin: bool,
    /// The robot was @mentioned (always true in 1:1 chats).
    pub mentions_robot: bool,
    pub robot_code: Option<String>,
    pub created_at_ms: Option<i64>,
    pub session_webhook: Option<SessionWebhook>,
    pub content: Content,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("robot message is not valid JSON: {0}")]
    Json(String),
    #[error("robot message has no usable {0:?}")]
    Missing(&'static str),
    #[error("robot message has conversationType {0:?}; expected \"1\" or \"2\"")]
    ConversationType(String),
    #[error("robot message has a msgId of the form the box gives its own jobs' messages; refused")]
    ReservedId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    msg_id: Option<String>,
    msgtype: Option<String>,
    conversation_id: Option<String>,
    conversation_type: Option<Value>,
    conversation_title: Option<String>,
    sender_id: Option<String>,
    sender_staff_id: Option<String>,
    sender_nick: Option<String>,
    #[serde(default)]
    is_admin: bool,
    #[serde(default)]
    is_in_at_list: bool,
    robot_code: Option<String>,
    create_at: Option<i64>,
    session_webhook: Option<String>,
    session_webhook_expired_time: Option<i64>,
    text: Option<Value>,
    content: Option<Value>,
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    match v.get(key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl RobotMessage {
    /// Parse the `data` of a robot-topic CALLBACK frame.
    pub fn parse(data: &str) -> Result<Self, MessageError> {
        let raw: Raw = serde_json::from_str(data).map_err(|e| MessageError::Json(e.to_string()))?;
        let msg_id = raw.msg_id.filter(|s| !s.is_empty()).ok_or(MessageError::Missing("msgId"))?;
        // Only the box's scheduler makes these: one from outside could take an occurrence's id.
        if msg_id.starts_with(crate::schedule::MESSAGE_PREFIX) {
            return Err(MessageError::ReservedId);
        }
        let conversation_id =
            raw.conversation_id.filter(|s| !s.is_empty()).ok_or(MessageError::Missing("conversationId"))?;
        let conversation_kind = match raw.conversation_type {
            Some(Value::String(ref s)) if s == "1" => ConversationKind::Single,
            Some(Value::String(ref s)) if s == "2" => ConversationKind::Group,
            Some(Value::Number(ref n)) if n.as_u64() == Some(1) => ConversationKind::Single,
            Some(Value::Number(ref n)) if n.as_u64() == Some(2) => ConversationKind::Group,
            Some(other) => return Err(MessageError::ConversationType(other.to_string())),
            None => return Err(MessageError::Missing("conversationType")),
        };
        let msgtype = raw.msgtype.ok_or(MessageError::Missing("msgtype"))?;
        let empty = Value::Null;
        let c = raw.content.as_ref().unwrap_or(&empty);
        let code = |what: &'static str| str_field(c, "downloadCode").ok_or(MessageError::Missing(what));
        let content = match msgtype.as_str() {
            "text" => {
                let text = raw
                    .text
                    .as_ref()
                    .and_then(|t| str_field(t, "content"))
                    .ok_or(MessageError::Missing("text.content"))?;
                Content::Text(text)
            }
            "picture" => Content::Picture {
                download_code: str_field(c, "downloadCode")
                    .or_else(|| str_field(c, "pictureDownloadCode"))
                    .ok_or(MessageError::Missing("content.downloadCode"))?,
            },
            "richText" => {
                let items =
                    c.get("richText").and_then(Value::as_array).ok_or(MessageError::Missing("content.richText"))?;
                let parts = items
                    .iter()
                    .filter_map(|item| {
                        if let Some(t) = str_field(item, "text") {
                            Some(RichPart::Text(t))
                        } else {
                            str_field(item, "downloadCode")
                                .or_else(|| str_field(item, "pictureDownloadCode"))
                                .map(|download_code| RichPart::Picture { download_code })
                        }
                    })
                    .collect();
                Content::RichText(parts)
            }
            "audio" => Content::Audio {
                download_code: code("content.downloadCode")?,
                recognition: str_field(c, "recognition").unwrap_or_default(),
            },
            "video" => Content::Video {
                download_code: code("content.downloadCode")?,
                duration_s: c
                    .get("duration")
                    .and_then(|d| d.as_u64().or_else(|| d.as_str().and_then(|s| s.parse().ok()))),
                video_type: str_field(c, "videoType"),
            },
            "file" => Content::File {
                download_code: code("content.downloadCode")?,
                file_name: str_field(c, "fileName").unwrap_or_else(|| "file".to_owned()),
            },
            other => Content::Unsupported { msgtype: other.to_owned() },
        };
        let session_webhook = match (raw.session_webhook, raw.session_webhook_expired_time) {
            (Some(url), Some(expires_at_ms)) if !url.is_empty() => Some(SessionWebhook { url, expires_at_ms }),
            _ => None,
        };
        Ok(RobotMessage {
            msg_id,
            conversation_id,
            conversation_kind,
            conversation_title: raw.conversation_title,
            sender_id: raw.sender_id.unwrap_or_default(),
            sender_staff_id: raw.sender_staff_id.filter(|s| !s.is_empty()),
            sender_nick: raw.sender_nick.unwrap_or_default(),
            is_admin: raw.is_admin,
            mentions_robot: conversation_kind == ConversationKind::Single || raw.is_in_at_list,
            robot_code: raw.robot_code,
            created_at_ms: raw.create_at,
            session_webhook,
            content,
        })
    }

    /// The text the assistant works on: typed text, rich-text text parts, or the speech
    /// recognition of a voice message. `None` for media without text.
    pub fn text(&self) -> Option<String> {
        match &self.content {
            Content::Text(t) => Some(t.trim().to_owned()),
            Content::RichText(parts) => {
                let joined: Vec<&str> = parts
                    .iter()
                    .filter_map(|p| if let RichPart::Text(t) = p { Some(t.trim()) } else { None })
                    .filter(|t| !t.is_empty())
                    .collect();
                (!joined.is_empty()).then(|| joined.join("\n"))
            }
            Content::Audio { recognition, .. } if !recognition.trim().is_empty() => Some(recognition.trim().to_owned()),
            _ => None,
        }
    }

    /// Short name of the msgtype, for logs and audit (never the content).
    pub fn kind_name(&self) -> &str {
        match &self.content {
            Content::Text(_) => "text",
            Content::RichText(_) => "richText",
            Content::Picture { .. } => "picture",
            Content::Audio { .. } => "audio",
            Content::Video { .. } => "video",
            Content::File { .. } => "file",
            Content::Unsupported { msgtype } => msgtype,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/../tests/fixtures/messages/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("fixture {path}: {e}"))
    }

    #[test]
    fn every_msgtype_parses_into_the_model() {
        let cases: &[(&str, &str, Option<&str>)] = &[
            ("text_single.json", "text", Some("hello there")),
            ("text_group_mentioned.json", "text", Some("@zhuli /ping")),
            ("rich_text.json", "richText", Some("see this\nand this")),
            ("picture.json", "picture", None),
            ("audio_with_recognition.json", "audio", Some("明天的会议几点")),
            ("video.json", "video", None),
            ("file.json", "file", None),
            ("unknown_msgtype.json", "interactiveCard", None),
        ];
        for (file, kind, text) in cases {
            let m = RobotMessage::parse(&fixture(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(m.kind_name(), *kind, "{file}");
            assert_eq!(m.text().as_deref(), *text, "{file}");
        }
    }

    #[test]
    fn group_mentions_and_media_codes() {
        let g = RobotMessage::parse(&fixture("text_group_not_mentioned.json")).expect("parses");
        assert_eq!((g.conversation_kind, g.mentions_robot), (ConversationKind::Group, false));
        let g = RobotMessage::parse(&fixture("text_group_mentioned.json")).expect("parses");
        assert!(g.mentions_robot);
        let s = RobotMessage::parse(&fixture("text_single.json")).expect("parses");
        assert!(s.mentions_robot, "1:1 chats always address the robot");
        assert_eq!(s.session_webhook.as_ref().map(|w| w.expires_at_ms), Some(1_700_005_400_000));
        let f = RobotMessage::parse(&fixture("file.json")).expect("parses");
        assert_eq!(f.content, Content::File { download_code: "dc-file".into(), file_name: "Q3 report.pdf".into() });
        let v = RobotMessage::parse(&fixture("video.json")).expect("parses");
        assert!(matches!(v.content, Content::Video { duration_s: Some(12), .. }));
        let r = RobotMessage::parse(&fixture("rich_text.json")).expect("parses");
        assert!(
            matches!(&r.content, Content::RichText(p) if p.contains(&RichPart::Picture { download_code: "dc-rich".into() }))
        );
    }

    #[test]
    fn a_msg_id_of_the_boxs_own_jobs_is_refused() {
        let text = fixture("text_single.json");
        let v: Value = serde_json::from_str(&text).expect("json");
        let id = v["msgId"].as_str().expect("msgId").to_owned();
        let forged = text.replace(&id, "zhuli-job:1:1796000000000:r");
        assert_eq!(RobotMessage::parse(&forged).map(|m| m.msg_id), Err(MessageError::ReservedId));
    }

    #[test]
    fn bad_input_names_the_field() {
        assert_eq!(RobotMessage::parse(&fixture("missing_msg_id.json")), Err(MessageError::Missing("msgId")));
        assert!(matches!(RobotMessage::parse("not json"), Err(MessageError::Json(_))));
        let bad_type = fixture("text_single.json").replace(r#""conversationType":"1""#, r#""conversationType":"9""#);
        assert!(matches!(RobotMessage::parse(&bad_type), Err(MessageError::ConversationType(_))));
        let webhook = format!("{:?}", RobotMessage::parse(&fixture("text_single.json")).expect("parses"));
        assert!(!webhook.contains("session=s1"), "webhook URL must not be printed");
    }
}
