//! The simulator's AI card APIs: create-and-deliver, streaming update, instance update. Each
//! card keeps every state it was shown, so tests can see the "thinking" state, the text
//! growing, and the final answer.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::Full;
use hyper::Response;
use serde::Serialize;
use serde_json::{Value, json};

use super::{
    Shared,
    respond::{err, reply},
};

/// One state a card showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CardState {
    pub content: String,
    pub flow_status: String,
    pub finalized: bool,
    pub error: bool,
}

/// A card the agent created.
#[derive(Debug, Clone, Serialize)]
pub struct SimCard {
    pub out_track_id: String,
    pub template_id: String,
    /// `IM_GROUP` or `IM_ROBOT`.
    pub space_type: String,
    /// The conversation id (group) or staff id (1:1) it was delivered to.
    pub space_id: String,
    pub states: Vec<CardState>,
}

impl SimCard {
    pub fn last(&self) -> Option<&CardState> {
        self.states.last()
    }
}

/// Which card calls fail (a test's fault switch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CardFault {
    #[default]
    None,
    /// createAndDeliver answers 500.
    Create,
    /// Streaming updates answer 500 (the card exists but cannot be finalised).
    Stream,
}

fn bad(code: &str, message: &str) -> Response<Full<Bytes>> {
    err(StatusCode::BAD_REQUEST, code, message)
}

pub(super) fn create(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    if shared.lock().card_fault == CardFault::Create {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "ServiceUnavailable", "scripted card failure");
    }
    let (Some(template), Some(id), Some(space)) =
        (body["cardTemplateId"].as_str(), body["outTrackId"].as_str(), body["openSpaceId"].as_str())
    else {
        return bad("MissingParameter", "cardTemplateId, outTrackId and openSpaceId are required");
    };
    let Some((space_type, space_id)) =
        space.strip_prefix("dtv1.card//").and_then(|s| s.split_once('.')).filter(|(_, id)| !id.is_empty())
    else {
        return bad(
            "InvalidParameter.OpenSpaceId",
            "openSpaceId must be dtv1.card//IM_GROUP.<cid> or IM_ROBOT.<staffId>",
        );
    };
    let deliver = match space_type {
        "IM_GROUP" => &body["imGroupOpenDeliverModel"],
        "IM_ROBOT" => &body["imRobotOpenDeliverModel"],
        _ => return bad("InvalidParameter.OpenSpaceId", "unknown space type"),
    };
    if deliver["robotCode"].as_str() != Some(shared.cfg.robot_code.as_str()) {
        return bad("InvalidParameter.RobotCode", "the deliver model's robotCode does not belong to this app");
    }
    if space_type == "IM_ROBOT" && deliver["spaceType"].as_str() != Some("IM_ROBOT") {
        return bad("InvalidParameter.SpaceType", "imRobotOpenDeliverModel.spaceType must be IM_ROBOT");
    }
    let params = &body["cardData"]["cardParamMap"];
    if !params.as_object().is_some_and(|m| m.values().all(Value::is_string)) {
        return bad("InvalidParameter.CardData", "cardParamMap values must be strings");
    }
    let mut st = shared.lock();
    if st.cards.iter().any(|c| c.out_track_id == id) {
        return bad("InvalidParameter.OutTrackId", "a card with this outTrackId exists");
    }
    let state = CardState {
        content: String::new(),
        flow_status: params["flowStatus"].as_str().unwrap_or_default().to_owned(),
        finalized: false,
        error: false,
    };
    st.cards.push(SimCard {
        out_track_id: id.to_owned(),
        template_id: template.to_owned(),
        space_type: space_type.to_owned(),
        space_id: space_id.to_owned(),
        states: vec![state],
    });
    drop(st);
    shared.touch();
    reply(
        StatusCode::OK,
        json!({"success": true, "result": {"outTrackId": id, "deliverResults": [
            {"spaceType": space_type, "spaceId": space_id, "success": true, "carrierId": "sim-carrier"}
        ]}}),
    )
}

pub(super) fn streaming(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    let mut st = shared.lock();
    if st.card_fault == CardFault::Stream {
        return err(StatusCode::INTERNAL_SERVER_ERROR, "ServiceUnavailable", "scripted card failure");
    }
    let (Some(id), Some(_guid), Some(_key), Some(content)) =
        (body["outTrackId"].as_str(), body["guid"].as_str(), body["key"].as_str(), body["content"].as_str())
    else {
        return bad("MissingParameter", "outTrackId, guid, key and content are required");
    };
    let Some(card) = st.cards.iter_mut().find(|c| c.out_track_id == id) else {
        return bad("InvalidParameter.OutTrackId", "no card with this outTrackId");
    };
    let last = card.states.last().cloned();
    if last.as_ref().is_some_and(|s| s.finalized) {
        return bad("InvalidOperation.Finalized", "the card's stream is finalised");
    }
    let full = body["isFull"].as_bool().unwrap_or(false);
    let before = last.as_ref().map(|s| s.content.clone()).unwrap_or_default();
    card.states.push(CardState {
        content: if full { content.to_owned() } else { format!("{before}{content}") },
        flow_status: "2".into(),
        finalized: body["isFinalize"].as_bool().unwrap_or(false),
        error: body["isError"].as_bool().unwrap_or(false),
    });
    drop(st);
    shared.touch();
    reply(StatusCode::OK, json!({"success": true, "result": true}))
}

pub(super) fn update(shared: &Shared, body: &Value) -> Response<Full<Bytes>> {
    let mut st = shared.lock();
    let Some(id) = body["outTrackId"].as_str() else {
        return bad("MissingParameter", "outTrackId is required");
    };
    let Some(card) = st.cards.iter_mut().find(|c| c.out_track_id == id) else {
        return bad("InvalidParameter.OutTrackId", "no card with this outTrackId");
    };
    let params = &body["cardData"]["cardParamMap"];
    let mut state = card.states.last().cloned().unwrap_or(CardState {
        content: String::new(),
        flow_status: String::new(),
        finalized: false,
        error: false,
    });
    if let Some(f) = params["flowStatus"].as_str() {
        state.flow_status = f.to_owned();
    }
    card.states.push(state);
    drop(st);
    shared.touch();
    reply(StatusCode::OK, json!({"success": true, "result": true}))
}
