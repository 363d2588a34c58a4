//! Files into the chat: a file from an allow-listed root is uploaded as DingTalk media, then
//! sent into the conversation the request came from as a file message — to the asker alone in a
//! 1:1 chat, to the group in a group chat. Only the asker's own view of the roots is used (their
//! `inbox`, never someone else's).

use bytes::Bytes;
use serde_json::{Value, json};

use super::{Outcome, ToolError, Workspace, api_error};
use crate::{
    dingtalk::{
        openapi::{Api, Host, Payload},
        sender::{GROUP_SEND_PATH, OTO_SEND_PATH},
    },
    tools::Context,
};

pub const UPLOAD: Api = Api { name: "/media/upload", host: Host::Old, permission: "qyapi_robot_sendmsg" };
pub const GROUP_SEND: Api = Api { name: GROUP_SEND_PATH, host: Host::New, permission: "qyapi_robot_sendmsg" };
pub const OTO_SEND: Api = Api { name: OTO_SEND_PATH, host: Host::New, permission: "qyapi_robot_sendmsg" };

/// A file name safe inside a multipart header and a message: no quotes, controls or slashes.
fn clean_name(name: &str) -> String {
    let n: String = name.chars().filter(|c| !c.is_control() && !"\"\\/".contains(*c)).take(120).collect();
    if n.trim().is_empty() { "file".into() } else { n }
}

/// A `multipart/form-data` body with one file field.
pub fn multipart(field: &str, file_name: &str, bytes: &[u8]) -> (String, Bytes) {
    let boundary = format!("zhuli-{:032x}", rand::random::<u128>());
    let mut body = Vec::with_capacity(bytes.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{file_name}\"\r\n\
             Content-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (boundary, Bytes::from(body))
}

pub async fn send_file(ws: &Workspace, ctx: &Context, path: &str) -> Result<Outcome, ToolError> {
    let roots = ws.roots.scoped(&ctx.actor);
    let max = ws.settings.max_send_bytes;
    let path = path.to_owned();
    let (shown, name, bytes) = tokio::task::spawn_blocking(move || roots.read_bytes(&path, max))
        .await
        .unwrap_or_else(|_| Err(ToolError::Failed("reading the file stopped unexpectedly".into())))?;
    if bytes.is_empty() {
        return Err(ToolError::Refused(format!("`{shown}` is empty; DingTalk does not take empty files")));
    }
    let name = clean_name(&name);
    let (boundary, body) = multipart("media", &name, &bytes);
    let uploaded = ws
        .api
        .request(&UPLOAD, http::Method::POST, UPLOAD.name, &[("type", "file")], Payload::Multipart { boundary, body })
        .await
        .map_err(api_error)?;
    let media = uploaded["media_id"]
        .as_str()
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ToolError::Failed("DingTalk's media upload gave no media_id".into()))?;
    let kind = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase()).unwrap_or_else(|| "file".into());
    let param = json!({"mediaId": media, "fileName": name, "fileType": kind}).to_string();
    let robot = ws.api.settings().robot_code.as_str();
    let (api, body) = if ctx.group {
        (
            &GROUP_SEND,
            json!({"robotCode": robot, "openConversationId": ctx.chat, "msgKey": "sampleFile", "msgParam": param}),
        )
    } else {
        (&OTO_SEND, json!({"robotCode": robot, "userIds": [ctx.actor], "msgKey": "sampleFile", "msgParam": param}))
    };
    let sent: Value =
        ws.api.request(api, http::Method::POST, api.name, &[], Payload::Json(&body)).await.map_err(api_error)?;
    let stuck = |k: &str| sent[k].as_array().is_some_and(|l| !l.is_empty());
    if stuck("flowControlledStaffIdList") {
        return Err(ToolError::Failed(
            "DingTalk is holding back messages to this person right now (flow control); try again in a minute".into(),
        ));
    }
    if stuck("invalidStaffIdList") {
        return Err(ToolError::Refused("DingTalk does not know this person as a recipient of the robot".into()));
    }
    Ok(Outcome::text(format!("sent {shown} ({} bytes) into this chat as a file", bytes.len())))
}
