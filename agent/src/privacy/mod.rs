//! What may leave the box. Content is **protected** when it comes from a source the
//! configuration marks protected (by default the files tools, the address book, approvals,
//! calendars, CalDAV and the drive), when it is said in a chat marked local-only, or when it
//! holds personal data people in a Chinese office write (`detect`) or a configured pattern.
//! Everything else is **open**. A turn that carries protected content, and the rest of its
//! conversation once it has, goes only to models that run on the office's own machines.
//!
//! A [`Why`] names the reason for the audit trail and never the content.

pub mod detect;

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

pub use detect::Kind;

/// `[privacy]`: what counts as protected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// Tool families (`files`, `people`, …) or single tools (`calendar_free`) whose results are
    /// protected.
    pub protected_tools: Vec<String>,
    /// Folders (as the files tools name them, `share/公开`) whose files are open even though
    /// `files` is protected.
    pub open_folders: Vec<String>,
    /// Repositories (`owner/name`) whose content is protected even though `github` is open.
    pub protected_repositories: Vec<String>,
    /// Conversation ids of chats whose every turn stays on local models.
    pub local_chats: Vec<String>,
    /// The personal-data detectors that make text protected.
    pub detect: Vec<String>,
    /// Further patterns (regular expressions, e.g. `合同编号\s*\d+`) that make text protected.
    pub patterns: Vec<String>,
    /// Pictures people send may go to a cloud model (a photo of an identity card cannot be
    /// told from a photo of a whiteboard, so by default they are protected).
    pub open_pictures: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            protected_tools: ["files", "people", "approvals", "calendar", "caldav", "drive"].map(String::from).into(),
            open_folders: Vec::new(),
            protected_repositories: Vec::new(),
            local_chats: Vec::new(),
            detect: Kind::ALL.iter().map(|k| k.name().to_owned()).collect(),
            patterns: Vec::new(),
            open_pictures: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("[privacy] detect names {0:?}, which is not a detector; use resident_id, mobile, bank_card or email")]
    UnknownDetector(String),
    #[error("[privacy] patterns[{index}] is not a usable regular expression: {why}")]
    Pattern { index: usize, why: String },
    #[error("[privacy] {setting} has an empty entry; remove it")]
    Empty { setting: &'static str },
}

/// Why content is protected: what the audit trail records (never the content itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// The chat is marked local-only.
    LocalChat,
    /// Earlier in this conversation something protected was said or read.
    Conversation,
    /// A result of this tool, from a protected source.
    Tool(String),
    /// Personal data of this kind.
    Found(Kind),
    /// The configured pattern with this index matched.
    Pattern(usize),
    /// A picture someone sent.
    Picture,
}

impl Why {
    /// A short, content-free reason: `tool:files_read`, `found:mobile`, `pattern:2`, ….
    pub fn reason(&self) -> String {
        match self {
            Why::LocalChat => "local_chat".into(),
            Why::Conversation => "conversation".into(),
            Why::Tool(name) => format!("tool:{name}"),
            Why::Found(kind) => format!("found:{}", kind.name()),
            Why::Pattern(i) => format!("pattern:{i}"),
            Why::Picture => "picture".into(),
        }
    }
}

/// The rules of `[privacy]`, ready to apply.
#[derive(Debug, Clone)]
pub struct Policy {
    protected_tools: Vec<String>,
    open_folders: Vec<String>,
    protected_repositories: BTreeSet<String>,
    local_chats: BTreeSet<String>,
    kinds: Vec<Kind>,
    patterns: Vec<Pattern>,
    open_pictures: bool,
}

/// A configured pattern, and the text any match must contain (its leading literal), looked for
/// first: most texts are ruled out by a substring search instead of a run of the regex engine.
#[derive(Debug, Clone)]
struct Pattern {
    regex: regex_lite::Regex,
    literal: Option<String>,
}

impl Pattern {
    fn new(pattern: &str) -> Result<Self, regex_lite::Error> {
        let regex = regex_lite::RegexBuilder::new(pattern).size_limit(1 << 20).build()?;
        Ok(Pattern { regex, literal: leading_literal(pattern) })
    }

    fn is_match(&self, text: &str) -> bool {
        self.literal.as_deref().is_none_or(|l| text.contains(l)) && self.regex.is_match(text)
    }
}

/// The plain characters a pattern starts with, when every match must begin with them: none
/// when the pattern has an alternation, starts with a group, a class or a flag, or when its
/// first special character is a quantifier (which would make the last of them optional).
fn leading_literal(pattern: &str) -> Option<String> {
    const SPECIAL: &[char] = &['\\', '.', '^', '$', '|', '?', '*', '+', '(', ')', '[', ']', '{', '}'];
    if pattern.contains('|') {
        return None;
    }
    let end = pattern.find(SPECIAL).unwrap_or(pattern.len());
    let mut literal = pattern[..end].to_owned();
    if pattern[end..].starts_with(['?', '*', '{']) {
        literal.pop();
    }
    (!literal.is_empty()).then_some(literal)
}

impl Policy {
    pub fn new(settings: &Settings) -> Result<Self, PolicyError> {
        let check = |setting: &'static str, list: &[String]| {
            if list.iter().any(|s| s.trim().is_empty()) { Err(PolicyError::Empty { setting }) } else { Ok(()) }
        };
        check("protected_tools", &settings.protected_tools)?;
        check("open_folders", &settings.open_folders)?;
        check("protected_repositories", &settings.protected_repositories)?;
        check("local_chats", &settings.local_chats)?;
        check("patterns", &settings.patterns)?;
        let kinds = settings
            .detect
            .iter()
            .map(|name| {
                Kind::ALL
                    .into_iter()
                    .find(|k| k.name() == name)
                    .ok_or_else(|| PolicyError::UnknownDetector(name.clone()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let patterns = settings
            .patterns
            .iter()
            .enumerate()
            .map(|(index, p)| Pattern::new(p).map_err(|e| PolicyError::Pattern { index, why: e.to_string() }))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Policy {
            protected_tools: settings.protected_tools.clone(),
            open_folders: settings.open_folders.iter().map(|f| f.trim_matches('/').to_owned()).collect(),
            protected_repositories: settings.protected_repositories.iter().map(|r| r.to_lowercase()).collect(),
            local_chats: settings.local_chats.iter().cloned().collect(),
            kinds,
            patterns,
            open_pictures: settings.open_pictures,
        })
    }

    /// Whether pictures people send may go to a cloud model.
    pub fn open_pictures(&self) -> bool {
        self.open_pictures
    }

    /// Whether everything said in `chat` stays local.
    pub fn local_chat(&self, chat: &str) -> Option<Why> {
        self.local_chats.contains(chat).then_some(Why::LocalChat)
    }

    /// Whether `text` holds personal data or matches a configured pattern.
    pub fn text(&self, text: &str) -> Option<Why> {
        if let Some(kind) = detect::contains_any(text, &self.kinds) {
            return Some(Why::Found(kind));
        }
        if self.patterns.is_empty() {
            return None;
        }
        // Patterns see full-width digits and spaces as their half-width forms (`\d`, `\s`).
        let wide = |c: char| matches!(c, '０'..='９' | '\u{3000}');
        let narrowed: std::borrow::Cow<'_, str> = if text.contains(wide) {
            text.chars()
                .map(|c| match c {
                    '０'..='９' => char::from_u32(c as u32 - '０' as u32 + '0' as u32).unwrap_or(c),
                    '\u{3000}' => ' ',
                    c => c,
                })
                .collect::<String>()
                .into()
        } else {
            text.into()
        };
        self.patterns.iter().position(|p| p.is_match(&narrowed)).map(Why::Pattern)
    }

    /// Whether the result of calling `tool` with `args` is protected, or else its `text` is.
    pub fn tool_result(&self, tool: &str, args: &Value, text: &str) -> Option<Why> {
        self.source(tool, args).or_else(|| self.text(text))
    }

    /// Whether what `tool` returns for `args` comes from a protected source.
    pub fn source(&self, tool: &str, args: &Value) -> Option<Why> {
        let family = tool.split('_').next().unwrap_or(tool);
        let listed = self.protected_tools.iter().any(|p| p == tool || p == family);
        let protected = if family == "files" && listed {
            !self.open_file(args)
        } else if family == "github" && !listed && !self.protected_repositories.is_empty() {
            // A call without a repository (notifications) may speak of any, the protected ones too.
            args.get("repo")
                .and_then(Value::as_str)
                .is_none_or(|r| self.protected_repositories.contains(&r.trim().trim_end_matches(".git").to_lowercase()))
        } else {
            listed
        };
        protected.then(|| Why::Tool(tool.to_owned()))
    }

    /// Every path the call names lies in an open folder (and it names at least one).
    fn open_file(&self, args: &Value) -> bool {
        let paths: Vec<&str> =
            ["path", "from", "to"].iter().filter_map(|k| args.get(*k).and_then(Value::as_str)).collect();
        !paths.is_empty()
            && paths.iter().all(|p| {
                let p = p.trim_start_matches('/');
                !p.split('/').any(|part| part == "..")
                    && self
                        .open_folders
                        .iter()
                        .any(|f| p == f || p.strip_prefix(f.as_str()).is_some_and(|r| r.starts_with('/')))
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn policy(toml_text: &str) -> Result<Policy, PolicyError> {
        let settings: Settings = toml::from_str(toml_text).expect("settings parse");
        Policy::new(&settings)
    }

    #[test]
    fn by_default_the_office_sources_are_protected_and_the_rest_is_open() {
        let p = policy("").expect("default policy");
        for tool in ["files_read", "people_search", "approvals_show", "calendar_list", "caldav_events", "drive_list"] {
            assert_eq!(p.source(tool, &json!({"path": "share/a.txt"})), Some(Why::Tool(tool.into())), "{tool}");
        }
        for tool in ["github_issues", "todo_list", "system_status", "weather_now", "chat_send_file"] {
            assert_eq!(p.source(tool, &json!({})), None, "{tool}");
        }
        // An open result is still protected by what it holds.
        assert_eq!(p.tool_result("github_issues", &json!({}), "联系 13800138000"), Some(Why::Found(Kind::Mobile)));
        assert_eq!(p.text("明天开会"), None);
        assert_eq!(p.local_chat("cid1"), None);
    }

    #[test]
    fn folders_repositories_chats_and_patterns_override() {
        let p = policy(
            r#"
            open_folders = ["share/公开"]
            protected_repositories = ["Acme/Payroll"]
            local_chats = ["cidHR=="]
            patterns = ['合同编号\s*\d+', "项目代号"]
            detect = ["resident_id"]
            "#,
        )
        .expect("policy");
        assert_eq!(p.source("files_read", &json!({"path": "share/公开/菜单.txt"})), None);
        assert_eq!(p.source("files_list", &json!({"path": "/share/公开"})), None);
        for path in ["share/公开二/a.txt", "share/公开/../工资/a.txt", "home/a.txt"] {
            assert!(p.source("files_read", &json!({"path": path})).is_some(), "{path}");
        }
        // A move out of an open folder into a protected one is protected.
        assert!(p.source("files_move", &json!({"from": "share/公开/a", "to": "hr/a"})).is_some());
        assert!(p.source("files_search", &json!({"query": "x"})).is_some(), "no path: the whole tree");
        assert!(p.source("github_file", &json!({"repo": "acme/payroll"})).is_some());
        assert!(p.source("github_show", &json!({"repo": " Acme/Payroll.git"})).is_some());
        assert_eq!(p.source("github_file", &json!({"repo": "acme/site"})), None);
        assert!(p.source("github_notifications", &json!({})).is_some(), "may name a protected repository");
        assert_eq!(policy("").expect("default").source("github_notifications", &json!({})), None);
        assert_eq!(p.local_chat("cidHR=="), Some(Why::LocalChat));
        assert_eq!(p.text("合同编号见附件"), None, "the pattern wants digits");
        assert_eq!(p.text("合同编号 2024001"), Some(Why::Pattern(0)));
        assert_eq!(p.text("合同编号\u{3000}２０２４００１"), Some(Why::Pattern(0)), "full-width space and digits");
        assert_eq!(p.text("关于项目代号的说明"), Some(Why::Pattern(1)));
        // Only the detectors named are on.
        assert_eq!(p.text("13800138000"), None);
        assert_eq!(p.text("11010519491231002X"), Some(Why::Found(Kind::ResidentId)));
        assert_eq!(Why::Pattern(1).reason(), "pattern:1");
        assert_eq!(Why::Tool("files_read".into()).reason(), "tool:files_read");
    }

    #[test]
    fn a_patterns_leading_literal_is_only_what_every_match_starts_with() {
        assert_eq!(leading_literal(r"合同编号\s*\d+").as_deref(), Some("合同编号"));
        assert_eq!(leading_literal("项目代号").as_deref(), Some("项目代号"));
        assert_eq!(leading_literal("abc?d").as_deref(), Some("ab"), "c is optional");
        assert_eq!(leading_literal("ab+c").as_deref(), Some("ab"));
        assert_eq!(leading_literal("a{2}").as_deref(), None);
        for none in ["(?i)secret", "[A-Z]{2}\\d+", "机密|绝密", r"\d{6}", ".*x"] {
            assert_eq!(leading_literal(none), None, "{none}");
        }
        let p = policy(r#"patterns = ["(?i)top secret", "机密|绝密", '工号\s*\d{5}']"#).expect("policy");
        assert_eq!(p.text("This is TOP SECRET."), Some(Why::Pattern(0)));
        assert_eq!(p.text("绝密文件"), Some(Why::Pattern(1)));
        assert_eq!(p.text("工号 12345"), Some(Why::Pattern(2)));
        assert_eq!(p.text("工号未定"), None);
    }

    #[test]
    fn mistakes_are_named() {
        assert_eq!(policy(r#"detect = ["phone"]"#).err(), Some(PolicyError::UnknownDetector("phone".into())));
        let e = policy(r#"patterns = ["ok", "(unclosed"]"#).expect_err("refused");
        assert!(matches!(e, PolicyError::Pattern { index: 1, .. }), "{e}");
        assert!(e.to_string().contains("patterns[1]"), "{e}");
        assert_eq!(policy(r#"local_chats = [" "]"#).err(), Some(PolicyError::Empty { setting: "local_chats" }));
        assert!(toml::from_str::<Settings>("protected = []").is_err(), "unknown settings are refused");
    }
}
