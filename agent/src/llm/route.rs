//! Several model endpoints, and which one answers a request.
//!
//! Each endpoint is local (on the office's own machines) or cloud. Protected work goes only to
//! local endpoints; open work goes to the cloud ones first and falls back to the local ones.
//! Within that order, an endpoint whose circuit breaker is open is bypassed, and one that fails
//! (after its own retries) hands the request to the next. The answer says which endpoint gave
//! it and whether that was a fallback.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use serde::Deserialize;
use tokio::time::Instant;

use super::{
    ChatMessage, Client, Completion, LlmError, Settings, ToolSpec,
    health::{Breaker, Figures, State, Window},
};

/// Where an endpoint runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Place {
    /// On the office's own machines (the box, a workstation, a server on the LAN).
    Local,
    /// Anywhere else.
    #[default]
    Cloud,
}

impl Place {
    pub fn name(self) -> &'static str {
        match self {
            Place::Local => "local",
            Place::Cloud => "cloud",
        }
    }
}

/// What a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Open,
    Protected,
}

impl Class {
    pub fn name(self) -> &'static str {
        match self {
            Class::Open => "open",
            Class::Protected => "protected",
        }
    }
}

/// Failures in a row that open an endpoint's breaker, and how long it stays open at first and
/// at most.
const BREAKER_THRESHOLD: u32 = 3;
const COOL_DOWN: Duration = Duration::from_secs(30);
const MAX_COOL_DOWN: Duration = Duration::from_secs(600);
/// Kept back from the last endpoint's share of a turn, to tell the person in time (at most a
/// quarter of what is left).
const MARGIN: Duration = Duration::from_secs(2);
/// Calls kept for the latency and error-rate figures.
const WINDOW: usize = 200;

pub struct Endpoint {
    pub name: String,
    pub place: Place,
    pub model: String,
    pub vision: bool,
    /// Tokens per calendar month (0 = no limit).
    pub monthly_tokens: u64,
    client: Client,
    breaker: Mutex<Breaker>,
    window: Mutex<Window>,
}

/// What `/status` shows of an endpoint.
#[derive(Debug, Clone)]
pub struct EndpointStatus {
    pub name: String,
    pub place: Place,
    pub model: String,
    /// `None` while calls go through; the time left while bypassed.
    pub bypassed_for: Option<Duration>,
    pub figures: Figures,
    /// Tokens per calendar month (0 = no limit).
    pub monthly_tokens: u64,
}

/// A request's answer and how it was reached.
#[derive(Debug)]
pub struct Routed {
    pub completion: Completion,
    /// The endpoint that answered.
    pub endpoint: String,
    pub place: Place,
    /// Another endpoint came first in the order and was bypassed or failed.
    pub fallback: bool,
    /// Why this endpoint: `first`, or what happened to the ones before it
    /// (`after deepseek: open`, `after qwen: failed`).
    pub why: String,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("protected work needs a local model, and none is configured ([[models]] with where = \"local\")")]
    NoLocal,
    #[error("no model answered ({})", tried.iter().map(|(n, e)| format!("{n}: {e}")).collect::<Vec<_>>().join("; "))]
    NoneAnswered {
        class: Class,
        /// Each endpoint tried or bypassed, with what happened.
        tried: Vec<(String, String)>,
        /// The last real error, for a person's explanation (bad key, refused).
        last: Option<LlmError>,
    },
}

/// A piece of a streamed answer.
#[derive(Debug, Clone, Copy)]
pub enum Piece<'a> {
    Text(&'a str),
    /// What was shown so far is void: another endpoint answers from the start.
    Restart,
}

pub struct Router {
    endpoints: Vec<Endpoint>,
}

impl Router {
    /// Endpoints in the order given (the preference within local and within cloud).
    pub fn new(settings: Vec<Settings>) -> Result<Self, LlmError> {
        let endpoints = settings
            .into_iter()
            .map(|s| {
                Ok(Endpoint {
                    name: s.name.clone(),
                    place: s.place,
                    model: s.model.clone(),
                    vision: s.vision,
                    monthly_tokens: s.monthly_tokens,
                    client: Client::new(s)?,
                    breaker: Mutex::new(Breaker::new(BREAKER_THRESHOLD, COOL_DOWN, MAX_COOL_DOWN)),
                    window: Mutex::new(Window::new(WINDOW)),
                })
            })
            .collect::<Result<Vec<_>, LlmError>>()?;
        Ok(Router { endpoints })
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Whether any endpoint may see work of `class`.
    pub fn serves(&self, class: Class) -> bool {
        !self.order(class).is_empty()
    }

    /// Endpoints that may see work of `class`, in the order they are tried.
    pub fn order(&self, class: Class) -> Vec<&Endpoint> {
        let of = |place: Place| self.endpoints.iter().filter(move |e| e.place == place);
        match class {
            Class::Protected => of(Place::Local).collect(),
            Class::Open => of(Place::Cloud).chain(of(Place::Local)).collect(),
        }
    }

    pub fn status(&self) -> Vec<EndpointStatus> {
        let now = Instant::now();
        self.endpoints
            .iter()
            .map(|e| EndpointStatus {
                name: e.name.clone(),
                place: e.place,
                model: e.model.clone(),
                bypassed_for: match lock(&e.breaker).state() {
                    State::Open { until } => Some(until.saturating_duration_since(now)),
                    State::Probing | State::Closed => None,
                },
                figures: lock(&e.window).figures(),
                monthly_tokens: e.monthly_tokens,
            })
            .collect()
    }

    /// One whole answer from the first endpoint of `class`'s order that gives one.
    pub async fn complete(
        &self,
        class: Class,
        deadline: Instant,
        spent: &[String],
        messages: &[ChatMessage],
        tools: &[ToolSpec],
    ) -> Result<Routed, RouteError> {
        self.route(class, deadline, spent, |e, retries| e.client.complete_with(messages, tools, retries)).await
    }

    /// A streamed answer; `on_piece` gets the text as it arrives, and [`Piece::Restart`] when an
    /// endpoint broke off after it had begun and the next one answers from the start.
    pub async fn stream(
        &self,
        class: Class,
        deadline: Instant,
        spent: &[String],
        messages: &[ChatMessage],
        tools: &[ToolSpec],
        on_piece: impl FnMut(Piece<'_>) + Send,
    ) -> Result<Routed, RouteError> {
        let shown = AtomicBool::new(false);
        let on_piece = Mutex::new(on_piece);
        let (shown, on_piece) = (&shown, &on_piece);
        self.route(class, deadline, spent, move |e, retries| {
            if shown.swap(false, Ordering::Relaxed) {
                let mut f = lock(on_piece);
                (*f)(Piece::Restart);
            }
            e.client.stream_with(messages, tools, retries, move |text: &str| {
                shown.store(true, Ordering::Relaxed);
                let mut f = lock(on_piece);
                (*f)(Piece::Text(text));
            })
        })
        .await
    }

    /// Each endpoint gets an equal share of the time left before `deadline` among those still to
    /// try, the last one all of it but a moment to say so: an endpoint that hangs counts as a
    /// failure (and trips its breaker) instead of eating the whole turn.
    /// Endpoints named in `spent` have used their monthly tokens and are passed over.
    async fn route<'s, F, Fut>(
        &'s self,
        class: Class,
        deadline: Instant,
        spent: &[String],
        mut call: F,
    ) -> Result<Routed, RouteError>
    where
        F: FnMut(&'s Endpoint, u32) -> Fut,
        Fut: Future<Output = Result<Completion, LlmError>>,
    {
        let order = self.order(class);
        if order.is_empty() {
            return match class {
                Class::Protected => Err(RouteError::NoLocal),
                Class::Open => Err(RouteError::NoneAnswered { class, tried: Vec::new(), last: None }),
            };
        }
        let mut tried: Vec<(String, String)> = Vec::new();
        let mut last = None;
        for (i, e) in order.iter().enumerate() {
            if spent.contains(&e.name) {
                tried.push((e.name.clone(), BUDGET.into()));
                continue;
            }
            if !lock(&e.breaker).allow(Instant::now()) {
                tried.push((e.name.clone(), "open".into()));
                continue;
            }
            // With another endpoint to fall back on, one retry here is enough: the next one is
            // a better bet than a long wait on this one.
            let retries = if i + 1 < order.len() { e.client.max_retries().min(1) } else { e.client.max_retries() };
            let started = std::time::Instant::now();
            let left = deadline.saturating_duration_since(Instant::now());
            let still = (order.len() - i) as u32;
            let share = if still > 1 { left / still } else { left.saturating_sub(MARGIN.min(left / 4)) };
            let mut guard = ProbeGuard { endpoint: e, done: false };
            let outcome = match tokio::time::timeout(share, call(e, retries)).await {
                Ok(outcome) => outcome,
                Err(_) => Err(LlmError::GaveUp {
                    attempts: retries + 1,
                    last: format!("no answer within its share of the turn ({:.1} s)", share.as_secs_f64()),
                }),
            };
            guard.done = true;
            lock(&e.window).record(started.elapsed(), outcome.is_ok());
            match outcome {
                Ok(completion) => {
                    lock(&e.breaker).success();
                    let why = if tried.is_empty() {
                        "first".to_owned()
                    } else {
                        tried.iter().map(|(n, w)| format!("after {n}: {}", short(w))).collect::<Vec<_>>().join(", ")
                    };
                    return Ok(Routed {
                        completion,
                        endpoint: e.name.clone(),
                        place: e.place,
                        fallback: !tried.is_empty(),
                        why,
                    });
                }
                Err(err) => {
                    // A request this endpoint refused as such (too long, not allowed) says
                    // nothing of its health; everything else does.
                    let breaker = &mut *lock(&e.breaker);
                    if matches!(err, LlmError::Refused { .. }) {
                        breaker.success();
                    } else if breaker.failure(Instant::now()) {
                        log::warn!("model endpoint {} bypassed for a while: {err}", e.name);
                    }
                    tried.push((e.name.clone(), err.to_string()));
                    last = Some(err);
                }
            }
        }
        Err(RouteError::NoneAnswered { class, tried, last })
    }
}

/// A probe cut short (the turn was cancelled or timed out) leaves the breaker ready to probe.
struct ProbeGuard<'a> {
    endpoint: &'a Endpoint,
    done: bool,
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            lock(&self.endpoint.breaker).abandoned(Instant::now());
        }
    }
}

/// What `tried` says of an endpoint passed over for its monthly budget.
pub const BUDGET: &str = "over its monthly budget";

/// The first words of an error, for the audit trail's reason.
fn short(why: &str) -> &str {
    match why {
        "open" => "bypassed",
        BUDGET => "over budget",
        _ => "failed",
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
