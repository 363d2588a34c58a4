//! The simulator's JSON answers: a body with its status, and DingTalk's OpenAPI error shape
//! `{"code","message","requestid"}`. A leaf that the routes (`api`, `cards`, `org`) share.

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};

pub(super) fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("static response parts are valid")
}

pub(super) fn err(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    reply(status, json!({ "code": code, "message": message, "requestid": "sim" }))
}
