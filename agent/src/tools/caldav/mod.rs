//! The caldav tools: calendars on a CalDAV server (Nextcloud, Radicale, iCloud, Fastmail…),
//! for offices whose calendars live outside DingTalk. List events in a range (repeating events
//! expanded), find free slots across calendars, create / move / cancel an event — `write` or
//! `destructive`, confirmed in chat, undoable (a cancelled event is put back as it was, same
//! UID). Changes are conditional on the event's ETag, so an edit made meanwhile elsewhere is
//! never overwritten.
//!
//! Calendars are named in `[tools.caldav.calendars]`; one listed in `[tools.caldav.personal]`
//! belongs to that person: only they list or change it, others see only when it is busy.
//! Never logs or audits titles or descriptions; the audit target is calendar and event id.

pub mod ical;

use std::{collections::BTreeMap, sync::Arc};

use bytes::Bytes;
use http::Method;
use rust_i18n::t;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    BoxFuture, Context, Outcome, Risk, Tool, ToolError,
    dav::{CALDAV, DAV, Dav, DavError},
    when,
};
use crate::{dingtalk::settings::Millis, secret::Secret};

/// `[tools.caldav]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaldavSettings {
    /// Calendar collections by the name people use: `team = "https://HOST/remote.php/dav/calendars/zhuli/team/"`.
    /// Empty: no caldav tools.
    pub calendars: BTreeMap<String, String>,
    /// The calendar used when none is named; the asker's personal one comes first.
    pub default_calendar: Option<String>,
    /// Staff id → the name of their own calendar (only they list or change it).
    pub personal: BTreeMap<String, String>,
    pub username: String,
    /// On the box a credential reference (`caldav-password`).
    pub password: Option<Secret>,
    /// The working day free slots are searched in, local time.
    pub day_start: String,
    pub day_end: String,
    pub max_results: usize,
    pub timeout_ms: Millis,
}

impl Default for CaldavSettings {
    fn default() -> Self {
        CaldavSettings {
            calendars: BTreeMap::new(),
            default_calendar: None,
            personal: BTreeMap::new(),
            username: String::new(),
            password: None,
            day_start: "09:00".into(),
            day_end: "18:00".into(),
            max_results: 50,
            timeout_ms: Millis::from_ms(20_000),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("[tools.caldav] {0}")]
pub struct CaldavSettingsError(String);

pub struct Caldav {
    calendars: BTreeMap<String, Dav>,
    settings: CaldavSettings,
    offset: i32,
    zone: String,
    day: (i64, i64),
}

/// Largest calendar-query answer read.
const MAX_REPORT: usize = 8 * 1024 * 1024;
const MAX_OBJECT: usize = 1024 * 1024;

impl Caldav {
    pub fn new(
        settings: &CaldavSettings,
        offset: i32,
        zone: Option<&str>,
    ) -> Result<Option<Arc<Caldav>>, CaldavSettingsError> {
        let Some((start, end)) = Self::checked(settings)? else {
            return Ok(None);
        };
        let http =
            crate::dingtalk::http::HttpClient::new(crate::dingtalk::http::tls_config(), settings.timeout_ms.get());
        let calendars = settings
            .calendars
            .iter()
            .map(|(name, url)| {
                (
                    name.clone(),
                    Dav::new(http.clone(), url, &settings.username, settings.password.as_ref(), "tools.caldav"),
                )
            })
            .collect();
        Ok(Some(Arc::new(Caldav {
            calendars,
            settings: settings.clone(),
            offset,
            zone: zone.unwrap_or("Asia/Shanghai").to_owned(),
            day: (start, end),
        })))
    }

    /// The names of the tools these settings offer (none without calendars).
    pub fn tool_names(settings: &CaldavSettings) -> Result<Vec<&'static str>, CaldavSettingsError> {
        Ok(match Self::checked(settings)? {
            Some(_) => OPS.into_iter().map(Op::name).collect(),
            None => Vec::new(),
        })
    }

    /// The settings checked: the working day, or `None` when there are no calendars.
    fn checked(settings: &CaldavSettings) -> Result<Option<(i64, i64)>, CaldavSettingsError> {
        if settings.calendars.is_empty() {
            return Ok(None);
        }
        let err = |m: String| CaldavSettingsError(m);
        let start = when::clock(&settings.day_start).map_err(|e| err(format!("day_start: {e}")))?;
        let end = when::clock(&settings.day_end).map_err(|e| err(format!("day_end: {e}")))?;
        if start >= end {
            return Err(err("day_start must come before day_end".into()));
        }
        if settings.max_results == 0 {
            return Err(err("max_results must be at least 1".into()));
        }
        for name in settings.default_calendar.iter().chain(settings.personal.values()) {
            if !settings.calendars.contains_key(name) {
                return Err(err(format!("{name:?} is not one of [tools.caldav.calendars]")));
            }
        }
        for (name, url) in &settings.calendars {
            crate::dingtalk::settings::check_url(url, "https", "http")
                .map_err(|e| err(format!("calendars.{name}: {e}")))?;
        }
        Ok(Some((start, end)))
    }

    /// For `zhuli doctor`: each calendar answers and is a calendar collection.
    pub async fn check(&self) -> Vec<Result<String, String>> {
        let mut out = Vec::new();
        let body = r#"<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop><d:resourcetype/></d:prop></d:propfind>"#;
        for (name, dav) in &self.calendars {
            let answer = dav.multistatus("PROPFIND", dav.base(), "0", body, 256 * 1024).await;
            out.push(match answer {
                Ok(root) if root.find(CALDAV, "calendar").is_some() => Ok(format!("calendar {name} reachable")),
                Ok(_) => Err(format!("calendar {name}: {} is not a calendar collection; check the URL", dav.base())),
                Err(e) => Err(format!("calendar {name}: {e}")),
            });
        }
        out
    }

    fn names(&self) -> String {
        self.calendars.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// The owner of a personal calendar.
    fn owner(&self, calendar: &str) -> Option<&str> {
        self.settings.personal.iter().find(|(_, c)| c.as_str() == calendar).map(|(who, _)| who.as_str())
    }

    /// The calendar a call names (or the asker's own, or the default), if the asker may read
    /// and change it.
    fn calendar<'s>(&'s self, ctx: &Context, args: &Value) -> Result<(&'s str, &'s Dav), ToolError> {
        let name = match args["calendar"].as_str().filter(|c| !c.is_empty()) {
            Some(n) => n,
            None => self
                .settings
                .personal
                .get(&ctx.actor)
                .or(self.settings.default_calendar.as_ref())
                .map(String::as_str)
                .or_else(|| {
                    (self.calendars.len() == 1).then(|| self.calendars.keys().next().map(String::as_str)).flatten()
                })
                .ok_or_else(|| ToolError::Refused(format!("name a calendar: {}", self.names())))?,
        };
        let (name, dav) = self.calendars.get_key_value(name).ok_or_else(|| {
            ToolError::Refused(format!("there is no calendar {name:?}; the calendars are: {}", self.names()))
        })?;
        if let Some(owner) = self.owner(name)
            && owner != ctx.actor
        {
            return Err(ToolError::Refused(format!(
                "{name} is someone's own calendar: only its owner can see or change its events (caldav_free shows when it is busy)"
            )));
        }
        Ok((name.as_str(), dav))
    }

    fn time(&self, args: &Value, name: &str) -> Result<i64, ToolError> {
        when::parse(args[name].as_str().unwrap_or_default(), self.offset)
            .map_err(|e| ToolError::Refused(format!("`{name}`: {e}")))
    }

    fn range(&self, args: &Value, a: &str, b: &str) -> Result<(i64, i64), ToolError> {
        let (from, to) = (self.time(args, a)?, self.time(args, b)?);
        if to <= from {
            return Err(ToolError::Refused(format!("`{b}` must come after `{a}`")));
        }
        if to - from > 366 * 86_400_000 {
            return Err(ToolError::Refused("ask for at most a year at a time".into()));
        }
        Ok((from, to))
    }

    fn show(&self, ms: i64) -> String {
        when::local(ms, self.offset)
    }

    /// Every calendar object overlapping `[from, to)`: href path, ETag, parsed object.
    async fn query(
        &self,
        dav: &Dav,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, Option<String>, ical::Component)>, ToolError> {
        let (s, e) = (ical::utc_value(from), ical::utc_value(to));
        let body = format!(
            r#"<?xml version="1.0" encoding="utf-8"?><c:calendar-query xmlns:d="DAV:" xmlns:c="urn:ietf:params:xml:ns:caldav"><d:prop><d:getetag/><c:calendar-data/></d:prop><c:filter><c:comp-filter name="VCALENDAR"><c:comp-filter name="VEVENT"><c:time-range start="{s}" end="{e}"/></c:comp-filter></c:comp-filter></c:filter></c:calendar-query>"#
        );
        let root = dav.multistatus("REPORT", dav.base(), "1", &body, MAX_REPORT).await.map_err(dav_error)?;
        let mut out = Vec::new();
        for r in dav.responses(&root) {
            let Some(prop) = r.prop else { continue };
            let Some(data) = prop.child(CALDAV, "calendar-data") else { continue };
            let Some(cal) = ical::parse(&data.text) else { continue };
            let etag = prop.child(DAV, "getetag").map(|e| e.text.trim().to_owned());
            out.push((r.path, etag, cal));
        }
        Ok(out)
    }

    /// The object `id` (its file name in the calendar) with its ETag.
    async fn fetch(&self, dav: &Dav, id: &str) -> Result<(String, String, ical::Component), ToolError> {
        let url = object_url(dav, id)?;
        let resp = dav
            .send(Method::GET, &url, &[("accept", "text/calendar")], Bytes::new(), MAX_OBJECT)
            .await
            .map_err(dav_error)?;
        let text =
            String::from_utf8(resp.body.to_vec()).map_err(|_| ToolError::Failed(format!("event {id} is not text")))?;
        let cal =
            ical::parse(&text).ok_or_else(|| ToolError::Failed(format!("event {id} is not an iCalendar object")))?;
        let etag = resp.header("etag").map(str::to_owned).unwrap_or_default();
        Ok((text, etag, cal))
    }

    async fn put(
        &self,
        dav: &Dav,
        id: &str,
        text: String,
        condition: (&str, &str),
    ) -> Result<Option<String>, ToolError> {
        let url = object_url(dav, id)?;
        let mut headers = vec![("content-type", "text/calendar; charset=utf-8")];
        if !condition.1.is_empty() {
            headers.push(condition);
        }
        let resp = dav.send(Method::PUT, &url, &headers, Bytes::from(text), 64 * 1024).await.map_err(dav_error)?;
        Ok(resp.header("etag").map(str::to_owned))
    }
}

/// An event id is its object's file name inside the calendar.
fn object_url(dav: &Dav, id: &str) -> Result<String, ToolError> {
    if id.is_empty() || id.contains(['/', '\\']) || id == ".." || id == "." || id.chars().any(char::is_control) {
        return Err(ToolError::Refused(format!("{id:?} is not an event id; take it from caldav_list")));
    }
    dav.url(id, false).map_err(ToolError::Refused)
}

fn dav_error(e: DavError) -> ToolError {
    match e {
        e @ DavError::Unauthorized(_) => ToolError::NeedsAdmin(e.to_string()),
        DavError::NotFound(p) => ToolError::Refused(format!("{p} does not exist (any more); list the calendar again")),
        DavError::Changed(p) => {
            ToolError::Refused(format!("{p} was changed meanwhile by someone else; list the calendar again"))
        }
        e @ (DavError::Exists(_) | DavError::BadPath(_) | DavError::Forbidden(_)) => ToolError::Refused(e.to_string()),
        e => ToolError::Failed(e.to_string()),
    }
}

/// The master VEVENT of an object (the one without RECURRENCE-ID).
fn master(cal: &mut ical::Component) -> Option<&mut ical::Component> {
    cal.children.iter_mut().find(|c| c.name == "VEVENT" && c.prop("RECURRENCE-ID").is_none())
}

use crate::tools::str_arg as s;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    List,
    Free,
    Create,
    Move,
    Cancel,
}

impl Op {
    /// The tool's name, as the model and the grants in `[access.roles]` see it.
    pub fn name(self) -> &'static str {
        match self {
            Op::List => "caldav_list",
            Op::Free => "caldav_free",
            Op::Create => "caldav_create",
            Op::Move => "caldav_move",
            Op::Cancel => "caldav_cancel",
        }
    }
}

pub struct CaldavTool {
    op: Op,
    cal: Arc<Caldav>,
    parameters: Value,
}

const OPS: [Op; 5] = [Op::List, Op::Free, Op::Create, Op::Move, Op::Cancel];

pub fn tools(cal: &Arc<Caldav>) -> Vec<Arc<dyn Tool>> {
    OPS.into_iter().map(|op| Arc::new(CaldavTool::new(op, cal.clone())) as Arc<dyn Tool>).collect()
}

const TIME: &str = "local time YYYY-MM-DDTHH:MM, or RFC 3339 with an offset";

impl CaldavTool {
    pub fn new(op: Op, cal: Arc<Caldav>) -> Self {
        let string = |d: &str| json!({"type": "string", "description": d});
        let names: Vec<&String> = cal.calendars.keys().collect();
        let calendar = json!({"type": "string", "enum": names, "description": "which calendar (default: the asker's own, else the office's)"});
        let object = |props: Value, required: &[&str]| json!({"type": "object", "properties": props, "required": required, "additionalProperties": false});
        let id = string("the event's id from caldav_list");
        let parameters = match op {
            Op::List => {
                object(json!({"calendar": calendar, "from": string(TIME), "to": string(TIME)}), &["from", "to"])
            }
            Op::Free => object(
                json!({
                    "calendars": {"type": "array", "items": {"type": "string", "enum": names}, "description": "calendars that must all be free (default: the asker's)"},
                    "from": string(TIME), "to": string(TIME),
                    "minutes": {"type": "integer", "minimum": 5, "maximum": 600},
                }),
                &["from", "to", "minutes"],
            ),
            Op::Create => object(
                json!({"calendar": calendar, "title": string("what the event is"), "start": string(TIME), "end": string(TIME), "location": string("where"), "description": string("details")}),
                &["title", "start", "end"],
            ),
            Op::Move => object(
                json!({"calendar": calendar, "event_id": id, "start": string(TIME), "end": string(TIME)}),
                &["event_id", "start", "end"],
            ),
            Op::Cancel => object(json!({"calendar": calendar, "event_id": id}), &["event_id"]),
        };
        CaldavTool { op, cal, parameters }
    }
}

impl Tool for CaldavTool {
    fn name(&self) -> &str {
        self.op.name()
    }

    fn description(&self) -> &str {
        match self.op {
            Op::List => "List the events of a CalDAV calendar between two times (repeating events included).",
            Op::Free => "Find times when the given CalDAV calendars are all free (working hours, weekdays).",
            Op::Create => "Create an event in a CalDAV calendar (asks the user to confirm; undoable).",
            Op::Move => "Move an event of a CalDAV calendar to a new time (asks the user to confirm; undoable).",
            Op::Cancel => {
                "Cancel (delete) an event of a CalDAV calendar, a repeating one with all its dates (asks the user to confirm; undo puts it back)."
            }
        }
    }

    fn parameters(&self) -> &Value {
        &self.parameters
    }

    fn risk(&self) -> Risk {
        match self.op {
            Op::List | Op::Free => Risk::Read,
            Op::Create | Op::Move => Risk::Write,
            Op::Cancel => Risk::Destructive,
        }
    }

    fn target(&self, args: &Value) -> String {
        // Calendar names, event ids and times; titles never (a model may put words anywhere).
        use super::{id_or_size, ids_or_sizes, time_or_size};
        let cal = args["calendar"].as_str().map_or_else(|| "(default)".to_owned(), id_or_size);
        let time = |k: &str| time_or_size(s(args, k));
        let calendars = ids_or_sizes(&args["calendars"]);
        match self.op {
            Op::List => format!("{cal}: {} – {}", time("from"), time("to")),
            Op::Free => format!("[{}]: {} – {}", calendars.join(", "), time("from"), time("to")),
            Op::Create => format!("{cal}: new event {} – {}", time("start"), time("end")),
            Op::Move => {
                format!("{cal}: event {} to {} – {}", id_or_size(s(args, "event_id")), time("start"), time("end"))
            }
            Op::Cancel => format!("{cal}: event {}", id_or_size(s(args, "event_id"))),
        }
        .chars()
        .take(200)
        .collect()
    }

    fn question(&self, args: &Value) -> String {
        let cal = args["calendar"].as_str().unwrap_or("(default)");
        match self.op {
            Op::Create | Op::Move => {
                let when = when::span_of(s(args, "start"), s(args, "end"), self.cal.offset);
                let title = s(args, "title");
                if self.op == Op::Create {
                    t!("question.caldav_create", title = title, calendar = cal, when = when)
                } else {
                    t!("question.caldav_move", title = title, calendar = cal, when = when)
                }
                .into_owned()
            }
            Op::Cancel => {
                let all = if args["repeats"].as_bool() == Some(true) { t!("question.every_date") } else { "".into() };
                t!("question.caldav_cancel", title = s(args, "title"), calendar = cal, all = all).into_owned()
            }
            _ => self.target(args),
        }
        .chars()
        .take(300)
        .collect()
    }

    fn prepare<'a>(&'a self, ctx: &'a Context, mut args: Value) -> BoxFuture<'a, Result<Value, ToolError>> {
        Box::pin(async move {
            let c = &self.cal;
            match self.op {
                Op::Create | Op::Move => {
                    let (start, _) = c.range(&args, "start", "end")?;
                    if start < crate::clock::now_ms() - 60_000 {
                        return Err(ToolError::Refused(format!("{} is in the past", c.show(start))));
                    }
                    let (name, dav) = c.calendar(ctx, &args)?;
                    args["calendar"] = json!(name);
                    if self.op == Op::Move {
                        let (_, _, mut cal) = c.fetch(dav, s(&args, "event_id")).await?;
                        let m = master(&mut cal).ok_or_else(|| ToolError::Failed("the object has no event".into()))?;
                        if m.prop("RRULE").is_some() {
                            return Err(ToolError::Refused("this event repeats; move single dates in a calendar app (cancelling it cancels every date)".into()));
                        }
                        args["title"] = json!(ical::unescape(m.value("SUMMARY").unwrap_or("(no title)")));
                    }
                }
                Op::Cancel => {
                    let (name, dav) = c.calendar(ctx, &args)?;
                    args["calendar"] = json!(name);
                    let (_, _, mut cal) = c.fetch(dav, s(&args, "event_id")).await?;
                    let m = master(&mut cal).ok_or_else(|| ToolError::Failed("the object has no event".into()))?;
                    args["title"] = json!(ical::unescape(m.value("SUMMARY").unwrap_or("(no title)")));
                    args["repeats"] = json!(m.prop("RRULE").is_some());
                }
                Op::List => {
                    let (name, _) = c.calendar(ctx, &args)?;
                    args["calendar"] = json!(name);
                }
                Op::Free => {}
            }
            Ok(args)
        })
    }

    fn execute<'a>(&'a self, ctx: &'a Context, args: Value) -> BoxFuture<'a, Result<Outcome, ToolError>> {
        Box::pin(async move {
            match self.op {
                Op::List => self.list(ctx, &args).await,
                Op::Free => self.free(ctx, &args).await,
                Op::Create => self.create(ctx, &args).await,
                Op::Move => self.move_event(ctx, &args).await,
                Op::Cancel => self.cancel(ctx, &args).await,
            }
        })
    }

    fn undo<'a>(&'a self, ctx: &'a Context, payload: &'a [u8]) -> BoxFuture<'a, Result<String, ToolError>> {
        Box::pin(async move {
            let bad = || ToolError::Failed("unreadable undo record".into());
            let p: Value = serde_json::from_slice(payload).map_err(|_| bad())?;
            let c = &self.cal;
            let (name, dav) = c.calendar(ctx, &p)?;
            let id = s(&p, "id");
            match p["kind"].as_str() {
                Some("created") => {
                    let url = object_url(dav, id)?;
                    let etag = s(&p, "etag");
                    let headers: Vec<(&str, &str)> = if etag.is_empty() { vec![] } else { vec![("if-match", etag)] };
                    dav.send(Method::DELETE, &url, &headers, Bytes::new(), 64 * 1024).await.map_err(dav_error)?;
                    Ok(t!("undo.caldav_created", calendar = name).into_owned())
                }
                Some("moved") => {
                    let (_, etag, mut cal) = c.fetch(dav, id).await?;
                    let (from, to) = (p["start"].as_i64().ok_or_else(bad)?, p["end"].as_i64().ok_or_else(bad)?);
                    let m = master(&mut cal).ok_or_else(bad)?;
                    set_times(m, from, to, c);
                    c.put(dav, id, cal.to_text(), ("if-match", &etag)).await?;
                    let when = when::span_shown(from, to, c.offset);
                    Ok(t!("undo.caldav_moved", calendar = name, when = when).into_owned())
                }
                Some("cancelled") => {
                    c.put(dav, id, s(&p, "object").to_owned(), ("if-none-match", "*")).await?;
                    Ok(t!("undo.caldav_cancelled", calendar = name).into_owned())
                }
                _ => Err(bad()),
            }
        })
    }
}

/// New DTSTART/DTEND at the box's zone; a DURATION gives way to DTEND; the change is
/// announced to other clients by SEQUENCE and DTSTAMP.
fn set_times(m: &mut ical::Component, start: i64, end: i64, c: &Caldav) {
    m.props.retain(|l| l.name != "DURATION");
    m.set(ical::time_line("DTSTART", start, c.offset, &c.zone));
    m.set(ical::time_line("DTEND", end, c.offset, &c.zone));
    let seq = m.value("SEQUENCE").and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0) + 1;
    m.set(ical::Line { name: "SEQUENCE".into(), params: vec![], value: seq.to_string() });
    m.set(ical::Line { name: "DTSTAMP".into(), params: vec![], value: ical::utc_value(crate::clock::now_ms()) });
}

impl CaldavTool {
    async fn list(&self, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
        let c = &self.cal;
        let (name, dav) = c.calendar(ctx, args)?;
        if c.owner(name).is_some() {
            super::private_in_group(ctx, "the events of the asker's own calendar")?;
        }
        let (from, to) = c.range(args, "from", "to")?;
        let mut rows = Vec::new();
        for (path, _, cal) in c.query(dav, from, to).await? {
            let id = path.rsplit('/').next().unwrap_or(&path).to_owned();
            for i in ical::instances(&cal, c.offset, &c.zone, from, to) {
                rows.push((i, id.clone()));
            }
        }
        rows.sort_by_key(|(i, _)| i.start_ms);
        if rows.is_empty() {
            return Ok(Outcome::text(format!("no events in {name} between {} and {}", c.show(from), c.show(to))));
        }
        let mut text = format!("{} events in {name} between {} and {}:\n", rows.len(), c.show(from), c.show(to));
        for (i, id) in rows.iter().take(c.settings.max_results) {
            let when = if i.all_day {
                format!("{} (all day)", &c.show(i.start_ms)[..10])
            } else {
                format!("{} – {}", c.show(i.start_ms), &c.show(i.end_ms)[11..])
            };
            let place = if i.location.is_empty() { String::new() } else { format!(" @ {}", i.location) };
            let repeats = match (i.repeats, i.expanded) {
                (true, true) => " (repeats)",
                (true, false) => " (repeats by a rule not shown here; check a calendar app for other dates)",
                _ => "",
            };
            text.push_str(&format!("- {when} {}{place}{repeats} [id {id}]\n", i.summary));
        }
        if rows.len() > c.settings.max_results {
            text.push_str(&format!("({} more not shown)\n", rows.len() - c.settings.max_results));
        }
        Ok(Outcome::text(text))
    }

    async fn free(&self, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
        let c = &self.cal;
        let (from, to) = c.range(args, "from", "to")?;
        let from = from.max(crate::clock::now_ms());
        let minutes = args["minutes"].as_i64().unwrap_or(30).clamp(5, 600);
        let mut names: Vec<String> =
            args["calendars"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
        if names.is_empty() {
            names.push(c.calendar(ctx, &json!({}))?.0.to_owned());
        }
        names.dedup();
        let mut busy = Vec::new();
        for name in &names {
            // Free/busy only: anyone granted the tool may ask about any calendar.
            let dav = c.calendars.get(name).ok_or_else(|| {
                ToolError::Refused(format!("there is no calendar {name:?}; the calendars are: {}", c.names()))
            })?;
            for (_, _, cal) in c.query(dav, from, to).await? {
                busy.extend(
                    ical::instances(&cal, c.offset, &c.zone, from, to)
                        .into_iter()
                        .filter(|i| i.busy)
                        .map(|i| (i.start_ms, i.end_ms)),
                );
            }
        }
        let windows = when::free_windows(&mut busy, from, to, minutes, c.day, c.offset);
        let who = names.join(", ");
        if windows.is_empty() {
            return Ok(Outcome::text(format!(
                "no common free time of {minutes} minutes in {who} between {} and {} (working hours {}–{}, weekdays)",
                c.show(from),
                c.show(to),
                c.settings.day_start,
                c.settings.day_end
            )));
        }
        let mut text = format!("{who}: free for at least {minutes} minutes at:\n");
        for (s, e) in windows.iter().take(10) {
            text.push_str(&format!("- {} – {} ({} min)\n", c.show(*s), &c.show(*e)[11..], (e - s) / 60_000));
        }
        Ok(Outcome::text(text))
    }

    async fn create(&self, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
        let c = &self.cal;
        let (name, dav) = c.calendar(ctx, args)?;
        let (start, end) = c.range(args, "start", "end")?;
        let uid = format!("{:016x}{:016x}@zhuli", rand::random::<u64>(), rand::random::<u64>());
        let id = format!("{}.ics", &uid[..32]);
        let text = ical::event(
            &ical::NewEvent {
                uid: &uid,
                title: s(args, "title"),
                start_ms: start,
                end_ms: end,
                location: args["location"].as_str(),
                description: args["description"].as_str(),
                now_ms: crate::clock::now_ms(),
            },
            c.offset,
            &c.zone,
        );
        let etag = c.put(dav, &id, text, ("if-none-match", "*")).await?;
        let undo = json!({"kind": "created", "calendar": name, "id": id, "etag": etag});
        Ok(Outcome {
            text: format!(
                "created “{}” in {name}, {} – {} [id {id}]",
                s(args, "title"),
                c.show(start),
                &c.show(end)[11..]
            ),
            undo: Some((undo.to_string().into_bytes(), format!("remove the event from {name}"))),
        })
    }

    async fn move_event(&self, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
        let c = &self.cal;
        let (name, dav) = c.calendar(ctx, args)?;
        let (start, end) = c.range(args, "start", "end")?;
        let id = s(args, "event_id");
        let (_, etag, mut cal) = c.fetch(dav, id).await?;
        let instances = ical::instances(&cal, c.offset, &c.zone, i64::MIN / 4, i64::MAX / 4);
        let old = instances.first().ok_or_else(|| ToolError::Failed("the object has no event".into()))?.clone();
        let m = master(&mut cal).ok_or_else(|| ToolError::Failed("the object has no event".into()))?;
        if m.prop("RRULE").is_some() {
            return Err(ToolError::Refused("this event repeats; move single dates in a calendar app".into()));
        }
        set_times(m, start, end, c);
        c.put(dav, id, cal.to_text(), ("if-match", &etag)).await?;
        let undo = json!({"kind": "moved", "calendar": name, "id": id, "start": old.start_ms, "end": old.end_ms});
        Ok(Outcome {
            text: format!("moved “{}” in {name} to {} – {}", old.summary, c.show(start), &c.show(end)[11..]),
            undo: Some((
                undo.to_string().into_bytes(),
                format!("move it back to {} – {}", c.show(old.start_ms), &c.show(old.end_ms)[11..]),
            )),
        })
    }

    async fn cancel(&self, ctx: &Context, args: &Value) -> Result<Outcome, ToolError> {
        let c = &self.cal;
        let (name, dav) = c.calendar(ctx, args)?;
        let id = s(args, "event_id");
        let (text, etag, cal) = c.fetch(dav, id).await?;
        let title = cal
            .children
            .iter()
            .find(|e| e.name == "VEVENT")
            .and_then(|e| e.value("SUMMARY"))
            .map(ical::unescape)
            .unwrap_or_default();
        let url = object_url(dav, id)?;
        let headers: Vec<(&str, &str)> = if etag.is_empty() { vec![] } else { vec![("if-match", etag.as_str())] };
        dav.send(Method::DELETE, &url, &headers, Bytes::new(), 64 * 1024).await.map_err(dav_error)?;
        let undo = json!({"kind": "cancelled", "calendar": name, "id": id, "object": text});
        Ok(Outcome {
            text: format!("cancelled “{title}” in {name}"),
            // The undo line is audited: ids, never the title.
            undo: Some((undo.to_string().into_bytes(), format!("put event {id} back into {name}"))),
        })
    }
}
