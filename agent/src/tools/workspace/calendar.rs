//! The asker's primary DingTalk calendar: list events, find free slots for several people,
//! create, move and cancel events. Changes are confirmed first (the turn loop) and undoable:
//! a created event is deleted, a moved one moved back, a cancelled one created again.

use rust_i18n::t;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{Outcome, ToolError, Workspace, api_error, people::Person, when};
use crate::{
    dingtalk::openapi::{Api, Host, Payload, encode},
    tools::Context,
};

const EVENTS: &str = "/v1.0/calendar/users/{unionId}/calendars/{calendarId}/events";
const EVENT: &str = "/v1.0/calendar/users/{unionId}/calendars/{calendarId}/events/{eventId}";
pub const EVENTS_READ: Api = Api { name: EVENTS, host: Host::New, permission: "Calendar.Event.Read" };
pub const EVENTS_WRITE: Api = Api { name: EVENTS, host: Host::New, permission: "Calendar.Event.Write" };
pub const EVENT_READ: Api = Api { name: EVENT, host: Host::New, permission: "Calendar.Event.Read" };
pub const EVENT_WRITE: Api = Api { name: EVENT, host: Host::New, permission: "Calendar.Event.Write" };
pub const SCHEDULE: Api =
    Api { name: "/v1.0/calendar/users/{unionId}/querySchedule", host: Host::New, permission: "Calendar.Event.Read" };

/// The longest range listed or searched at once.
const MAX_RANGE_MS: i64 = 62 * 86_400_000;
const MAX_EVENT_MS: i64 = 24 * 3_600_000;
/// Pages of events read at most.
const MAX_PAGES: usize = 10;

fn events_path(union: &str) -> String {
    format!("/v1.0/calendar/users/{}/calendars/primary/events", encode(union))
}

fn event_path(union: &str, id: &str) -> String {
    format!("{}/{}", events_path(union), encode(id))
}

fn refused(s: impl Into<String>) -> ToolError {
    ToolError::Refused(s.into())
}

/// An event as DingTalk describes it, reduced to what is shown and what undo needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EventCopy {
    summary: String,
    description: String,
    location: String,
    start: Value,
    end: Value,
    attendees: Vec<String>,
}

impl EventCopy {
    fn from(v: &Value) -> Self {
        let s = |k: &str| v[k].as_str().unwrap_or_default().to_owned();
        EventCopy {
            summary: s("summary"),
            description: s("description"),
            location: v["location"]["displayName"].as_str().unwrap_or_default().to_owned(),
            start: v["start"].clone(),
            end: v["end"].clone(),
            attendees: v["attendees"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|a| a["self"].as_bool() != Some(true))
                .filter_map(|a| a["id"].as_str().map(str::to_owned))
                .collect(),
        }
    }

    fn body(&self) -> Value {
        let mut b = json!({
            "summary": self.summary,
            "start": self.start,
            "end": self.end,
            "attendees": self.attendees.iter().map(|id| json!({"id": id})).collect::<Vec<_>>(),
        });
        if !self.description.is_empty() {
            b["description"] = json!(self.description);
        }
        if !self.location.is_empty() {
            b["location"] = json!({"displayName": self.location});
        }
        b
    }
}

/// What `/undo` reverses.
#[derive(Debug, Serialize, Deserialize)]
enum Undo {
    Created { owner: String, event: String, summary: String },
    Moved { owner: String, event: String, summary: String, start: Value, end: Value },
    Cancelled { owner: String, copy: EventCopy },
}

/// Milliseconds of a DingTalk `{dateTime | date, timeZone}`.
fn event_time(ws: &Workspace, t: &Value) -> Option<i64> {
    t["dateTime"].as_str().or_else(|| t["date"].as_str()).and_then(|s| when::parse(s, ws.offset_minutes).ok())
}

fn range(ws: &Workspace, args: &Value) -> Result<(i64, i64), ToolError> {
    let (from, to) = (ws.parse_time(args, "from")?, ws.parse_time(args, "to")?);
    if to <= from {
        return Err(refused("`to` must come after `from`"));
    }
    if to - from > MAX_RANGE_MS {
        return Err(refused("the range is longer than 62 days; ask for a shorter one"));
    }
    Ok((from, to))
}

/// The start and end of a new or moved event: in order, not in the past, at most a day long.
fn new_times(ws: &Workspace, args: &Value) -> Result<(i64, i64), ToolError> {
    let (start, end) = (ws.parse_time(args, "start")?, ws.parse_time(args, "end")?);
    if end <= start {
        return Err(refused("the event must end after it starts"));
    }
    if end - start > MAX_EVENT_MS {
        return Err(refused("events longer than a day are not created by me; make it shorter"));
    }
    let now = crate::clock::now_ms();
    if start < now - 60_000 {
        return Err(refused(format!(
            "{} is in the past (it is {} now); nothing was scheduled. Ask the user for a later time",
            ws.show(start),
            ws.show(now)
        )));
    }
    Ok((start, end))
}

pub async fn list(ws: &Workspace, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
    let (from, to) = range(ws, args)?;
    let me = ws.people.me(ctx).await?;
    let (min, max) = (when::rfc3339(from, ws.offset_minutes), when::rfc3339(to, ws.offset_minutes));
    let mut events = Vec::new();
    let mut next: Option<String> = None;
    for _ in 0..MAX_PAGES {
        let mut query = vec![("timeMin", min.as_str()), ("timeMax", max.as_str()), ("maxResults", "100")];
        if let Some(t) = &next {
            query.push(("nextToken", t));
        }
        let v = ws
            .api
            .request(&EVENTS_READ, http::Method::GET, &events_path(&me.union_id), &query, Payload::None)
            .await
            .map_err(api_error)?;
        events.extend(v["events"].as_array().cloned().unwrap_or_default());
        match v["nextToken"].as_str().filter(|t| !t.is_empty()) {
            Some(t) => next = Some(t.to_owned()),
            None => break,
        }
    }
    events.retain(|e| e["status"].as_str() != Some("cancelled"));
    events.sort_by_key(|e| event_time(ws, &e["start"]).unwrap_or(0));
    if events.is_empty() {
        return Ok(Outcome::text(format!("no events between {} and {}", ws.show(from), ws.show(to))));
    }
    let mut text = format!("{} event(s) between {} and {}:\n", events.len(), ws.show(from), ws.show(to));
    for e in events.iter().take(ws.settings.max_results) {
        let (s, t) = (event_time(ws, &e["start"]).unwrap_or(0), event_time(ws, &e["end"]).unwrap_or(0));
        let end = ws.show(t);
        let end = if end[..10] == ws.show(s)[..10] { end[11..].to_owned() } else { end };
        let others: Vec<&str> = e["attendees"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["self"].as_bool() != Some(true))
            .filter_map(|a| a["displayName"].as_str())
            .collect();
        text.push_str(&format!("- {} – {end}: {}", ws.show(s), e["summary"].as_str().unwrap_or("(no title)")));
        if !others.is_empty() {
            text.push_str(&format!(", with {}", others.join(", ")));
        }
        if let Some(place) = e["location"]["displayName"].as_str().filter(|p| !p.is_empty()) {
            text.push_str(&format!(", at {place}"));
        }
        text.push_str(&format!(" (event id {})\n", e["id"].as_str().unwrap_or_default()));
    }
    if events.len() > ws.settings.max_results {
        text.push_str(&format!("({} more not shown)\n", events.len() - ws.settings.max_results));
    }
    Ok(Outcome::text(text))
}

pub async fn free(ws: &Workspace, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
    let (from, to) = range(ws, args)?;
    let from = from.max(crate::clock::now_ms());
    let minutes = args["minutes"].as_i64().unwrap_or(30);
    let me = ws.people.me(ctx).await?;
    let mut people = vec![me.clone()];
    for who in args["people"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        let p = ws.people.resolve(who).await?;
        if !people.iter().any(|q| q.staff_id == p.staff_id) {
            people.push(p);
        }
    }
    if people.len() > 20 {
        return Err(refused("free slots are found for at most 20 people at once"));
    }
    let body = json!({
        "userIds": people.iter().map(|p| p.union_id.clone()).collect::<Vec<_>>(),
        "startTime": when::rfc3339(from, ws.offset_minutes),
        "endTime": when::rfc3339(to, ws.offset_minutes),
    });
    let path = format!("/v1.0/calendar/users/{}/querySchedule", encode(&me.union_id));
    let v = ws.api.request(&SCHEDULE, http::Method::POST, &path, &[], Payload::Json(&body)).await.map_err(api_error)?;
    let mut busy = Vec::new();
    for info in v["scheduleInformation"].as_array().into_iter().flatten() {
        let who = people
            .iter()
            .find(|p| Some(p.union_id.as_str()) == info["userId"].as_str())
            .map(|p| p.name.clone())
            .unwrap_or_else(|| "someone".into());
        if let Some(e) = info["error"].as_str().filter(|e| !e.is_empty()) {
            return Err(ToolError::Failed(format!("DingTalk could not read {who}'s calendar: {e}")));
        }
        for item in info["scheduleItems"].as_array().into_iter().flatten() {
            if let (Some(s), Some(e)) = (event_time(ws, &item["start"]), event_time(ws, &item["end"])) {
                busy.push((s, e));
            }
        }
    }
    let windows = when::free_windows(&mut busy, from, to, minutes, ws.day, ws.offset_minutes);
    let names: Vec<&str> = people.iter().map(|p| p.name.as_str()).collect();
    if windows.is_empty() {
        return Ok(Outcome::text(format!(
            "no common free time of {minutes} minutes for {} between {} and {} (working hours {}–{}, weekdays)",
            names.join(", "),
            ws.show(from),
            ws.show(to),
            ws.settings.day_start,
            ws.settings.day_end
        )));
    }
    let mut text = format!("{} are all free (at least {minutes} minutes) at:\n", names.join(", "));
    for (s, e) in windows.iter().take(10) {
        text.push_str(&format!("- {} – {} ({} min)\n", ws.show(*s), &ws.show(*e)[11..], (e - s) / 60_000));
    }
    text.push_str(&format!(
        "Staff ids: {}\n",
        people.iter().map(|p| format!("{} = {}", p.name, p.staff_id)).collect::<Vec<_>>().join(", ")
    ));
    Ok(Outcome::text(text))
}

/// Resolve the attendees and check the times before the confirmation is asked.
pub async fn prepare_create(ws: &Workspace, ctx: &Context, mut args: Value) -> Result<Value, ToolError> {
    if args["title"].as_str().is_none_or(|t| t.trim().is_empty()) {
        return Err(refused("give the event a title"));
    }
    new_times(ws, &args)?;
    let me = ws.people.me(ctx).await?;
    let mut attendees: Vec<Person> = Vec::new();
    for who in args["attendees"].as_array().cloned().unwrap_or_default() {
        let p = ws.people.resolve(who.as_str().unwrap_or_default()).await?;
        if p.staff_id != me.staff_id && !attendees.iter().any(|a| a.staff_id == p.staff_id) {
            attendees.push(p);
        }
    }
    args["attendees"] = json!(attendees.iter().map(|p| p.staff_id.clone()).collect::<Vec<_>>());
    args["attendee_names"] = json!(attendees.iter().map(|p| p.name.clone()).collect::<Vec<_>>());
    Ok(args)
}

pub fn prepare_move(ws: &Workspace, args: Value) -> Result<Value, ToolError> {
    new_times(ws, &args)?;
    Ok(args)
}

pub async fn create(ws: &Workspace, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
    let (start, end) = new_times(ws, args)?;
    let me = ws.people.me(ctx).await?;
    let mut attendees = Vec::new();
    for staff in args["attendees"].as_array().into_iter().flatten().filter_map(Value::as_str) {
        attendees.push(ws.people.person(staff).await?);
    }
    let title = args["title"].as_str().unwrap_or_default().trim().to_owned();
    let copy = EventCopy {
        summary: title.clone(),
        description: args["description"].as_str().unwrap_or_default().to_owned(),
        location: args["location"].as_str().unwrap_or_default().to_owned(),
        start: ws.time_json(start),
        end: ws.time_json(end),
        attendees: attendees.iter().map(|p| p.union_id.clone()).collect(),
    };
    let v = ws
        .api
        .request(&EVENTS_WRITE, http::Method::POST, &events_path(&me.union_id), &[], Payload::Json(&copy.body()))
        .await
        .map_err(api_error)?;
    let id = v["id"].as_str().unwrap_or_default().to_owned();
    let with = if attendees.is_empty() {
        String::new()
    } else {
        format!(" with {}", attendees.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", "))
    };
    let text = format!("created “{title}” on {} – {}{with} (event id {id})", ws.show(start), &ws.show(end)[11..]);
    let undo = Undo::Created { owner: me.union_id, event: id.clone(), summary: title.clone() };
    Ok(Outcome {
        text,
        // The undo line is audited: the event's id, never its title.
        undo: Some((serde_json::to_vec(&undo).unwrap_or_default(), format!("delete event {id}"))),
    })
}

async fn get_event(ws: &Workspace, owner: &str, id: &str) -> Result<Value, ToolError> {
    match ws.api.request(&EVENT_READ, http::Method::GET, &event_path(owner, id), &[], Payload::None).await {
        Ok(v) => Ok(v),
        Err(crate::dingtalk::openapi::ApiError::Refused { status: 404, .. }) => Err(refused(format!(
            "there is no event `{}` in the asker's calendar; list the calendar to find its id",
            id.chars().take(64).collect::<String>()
        ))),
        Err(e) => Err(api_error(e)),
    }
}

pub async fn move_event(ws: &Workspace, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
    let (start, end) = new_times(ws, args)?;
    let id = args["event_id"].as_str().unwrap_or_default();
    let me = ws.people.me(ctx).await?;
    let before = get_event(ws, &me.union_id, id).await?;
    let body = json!({"id": id, "start": ws.time_json(start), "end": ws.time_json(end)});
    ws.api
        .request(&EVENT_WRITE, http::Method::PUT, &event_path(&me.union_id, id), &[], Payload::Json(&body))
        .await
        .map_err(api_error)?;
    let summary = before["summary"].as_str().unwrap_or("(no title)").to_owned();
    let was = event_time(ws, &before["start"]).map(|t| ws.show(t)).unwrap_or_default();
    let undo = Undo::Moved {
        owner: me.union_id,
        event: id.to_owned(),
        summary: summary.clone(),
        start: before["start"].clone(),
        end: before["end"].clone(),
    };
    Ok(Outcome {
        text: format!("moved “{summary}” from {was} to {} – {}", ws.show(start), &ws.show(end)[11..]),
        undo: Some((serde_json::to_vec(&undo).unwrap_or_default(), format!("move event {id} back to {was}"))),
    })
}

pub async fn cancel(ws: &Workspace, ctx: &Context, id: &str) -> Result<Outcome, ToolError> {
    let me = ws.people.me(ctx).await?;
    let before = get_event(ws, &me.union_id, id).await?;
    ws.api
        .request(
            &EVENT_WRITE,
            http::Method::DELETE,
            &event_path(&me.union_id, id),
            &[("pushNotification", "true")],
            Payload::None,
        )
        .await
        .map_err(api_error)?;
    let copy = EventCopy::from(&before);
    let when = event_time(ws, &before["start"]).map(|t| ws.show(t)).unwrap_or_default();
    let summary = copy.summary.clone();
    let undo = Undo::Cancelled { owner: me.union_id, copy };
    Ok(Outcome {
        text: format!("cancelled “{summary}” of {when}"),
        undo: Some((serde_json::to_vec(&undo).unwrap_or_default(), format!("create event {id} of {when} again"))),
    })
}

pub async fn undo(ws: &Workspace, ctx: &Context, payload: &[u8]) -> Result<String, ToolError> {
    let undo: Undo =
        serde_json::from_slice(payload).map_err(|_| ToolError::Failed("the undo record is not readable".into()))?;
    let me = ws.people.me(ctx).await?;
    let owner = match &undo {
        Undo::Created { owner, .. } | Undo::Moved { owner, .. } | Undo::Cancelled { owner, .. } => owner,
    };
    if *owner != me.union_id {
        return Err(ToolError::Refused("that change was made in someone else's calendar".into()));
    }
    match undo {
        Undo::Created { owner, event, summary } => {
            ws.api
                .request(
                    &EVENT_WRITE,
                    http::Method::DELETE,
                    &event_path(&owner, &event),
                    &[("pushNotification", "true")],
                    Payload::None,
                )
                .await
                .map_err(api_error)?;
            Ok(t!("undo.event_deleted", title = summary).into_owned())
        }
        Undo::Moved { owner, event, summary, start, end } => {
            let body = json!({"id": event, "start": start, "end": end});
            ws.api
                .request(&EVENT_WRITE, http::Method::PUT, &event_path(&owner, &event), &[], Payload::Json(&body))
                .await
                .map_err(api_error)?;
            let at = event_time(ws, &start).map(|t| when::shown(t, ws.offset_minutes)).unwrap_or_default();
            Ok(t!("undo.event_moved", title = summary, when = at).into_owned())
        }
        Undo::Cancelled { owner, copy } => {
            let v = ws
                .api
                .request(&EVENTS_WRITE, http::Method::POST, &events_path(&owner), &[], Payload::Json(&copy.body()))
                .await
                .map_err(api_error)?;
            let id = v["id"].as_str().unwrap_or_default();
            Ok(t!("undo.event_restored", title = copy.summary, id = id).into_owned())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_windows_skip_busy_times_nights_and_weekends() {
        let off = 480;
        let t = |s: &str| when::parse(s, off).expect("time");
        let day = (9 * 60, 18 * 60);
        // Friday 2026-12-04 to Monday 2026-12-07 noon.
        let mut busy =
            vec![(t("2026-12-04T10:00"), t("2026-12-04T12:00")), (t("2026-12-04T11:00"), t("2026-12-04T13:30"))];
        let w = when::free_windows(&mut busy, t("2026-12-04T08:00"), t("2026-12-07T12:00"), 60, day, off);
        assert_eq!(
            w,
            vec![
                (t("2026-12-04T09:00"), t("2026-12-04T10:00")),
                (t("2026-12-04T13:30"), t("2026-12-04T18:00")),
                (t("2026-12-07T09:00"), t("2026-12-07T12:00")),
            ]
        );
        let short = when::free_windows(&mut busy, t("2026-12-04T09:30"), t("2026-12-04T10:00"), 60, day, off);
        assert!(short.is_empty(), "a 30-minute gap does not hold 60 minutes");
    }
}
