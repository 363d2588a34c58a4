//! The box's language: every text people read in chat (replies, help, refusals, confirmations,
//! notices, alerts to the admins) comes from `agent/locales/<locale>.toml` through `t!`,
//! compiled into the binary. One language per box: `[agent] language`, Simplified Chinese
//! unless it says English, set once when the agent starts.
//!
//! Never for logs or audit fields: those stay English for the operators and the journal.

use serde::Deserialize;

// The locale files are compiled in by `i18n!` (lib.rs); including them here as well makes cargo
// rebuild the crate when one changes, which the macro does not tell it.
const _: [&str; 2] = [include_str!("../locales/zh-CN.toml"), include_str!("../locales/en.toml")];

/// `[agent] language`: the language of everything said in chat.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub enum Language {
    /// Simplified Chinese, `zh-CN` (the default).
    #[default]
    ZhCn,
    /// English, `en`.
    En,
}

impl Language {
    /// The locale name, as in the configuration and the locale file's name.
    pub fn code(self) -> &'static str {
        match self {
            Language::ZhCn => "zh-CN",
            Language::En => "en",
        }
    }

    /// Make this the language of everything the agent says from now on.
    pub fn apply(self) {
        rust_i18n::set_locale(self.code());
    }
}

impl TryFrom<String> for Language {
    type Error = String;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        match value.as_str() {
            "zh-CN" => Ok(Language::ZhCn),
            "en" => Ok(Language::En),
            // The value is not repeated: configuration errors never quote what the file says.
            _ => Err("[agent] language must be \"zh-CN\" (Simplified Chinese, the default) or \"en\" (English)".into()),
        }
    }
}

/// A text to be said later, perhaps by another process, in the language of whoever says it: a
/// locale key and its values. The import (as root, on the laptop's words) records why it refused
/// a stick; the agent tells the admins in the box's language; the command line prints English.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Said {
    pub key: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<(String, String)>,
}

impl Said {
    /// `key` is a literal the locale files hold (the tests check every `Said::new(` key).
    pub fn new(key: &'static str, args: &[(&str, &dyn std::fmt::Display)]) -> Self {
        Said { key: key.to_owned(), args: args.iter().map(|(n, v)| ((*n).to_owned(), v.to_string())).collect() }
    }

    /// In the box's language; `None` for a key this binary does not know (said by another
    /// version of it), for the caller to say its own words instead.
    pub fn text(&self) -> Option<String> {
        self.in_locale(&rust_i18n::locale())
    }

    /// In English: for the command line, the receipt and the logs.
    pub fn english(&self) -> String {
        self.in_locale(Language::En.code()).unwrap_or_else(|| self.key.clone())
    }

    fn in_locale(&self, locale: &str) -> Option<String> {
        let template = crate::_rust_i18n_try_translate(locale, &self.key)?;
        let names: Vec<&str> = self.args.iter().map(|(n, _)| n.as_str()).collect();
        let values: Vec<String> = self.args.iter().map(|(_, v)| v.clone()).collect();
        Some(rust_i18n::replace_patterns(&template, &names, &values))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;

    use super::*;

    /// Serialises the tests that switch the process's locale (the locale is global; nextest runs
    /// each test in its own process, `cargo test` in threads of one).
    static LOCALE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Run `f` with `language` as the box's language.
    pub(crate) fn in_language<T>(language: Language, f: impl FnOnce() -> T) -> T {
        let _held = LOCALE.lock().unwrap_or_else(|p| p.into_inner());
        language.apply();
        let out = f();
        Language::default().apply();
        out
    }

    /// Every key of a locale file (dotted, as `t!` names it) with its text.
    fn keys(text: &str) -> BTreeMap<String, String> {
        fn walk(prefix: &str, table: &toml::Table, out: &mut BTreeMap<String, String>) {
            for (k, v) in table {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                match v {
                    toml::Value::Table(t) => walk(&key, t, out),
                    toml::Value::String(s) => {
                        out.insert(key, s.clone());
                    }
                    other => panic!("{key} is not text: {other:?}"),
                }
            }
        }
        let table: toml::Table = toml::from_str(text).expect("a locale file is TOML");
        let mut out = BTreeMap::new();
        walk("", &table, &mut out);
        out
    }

    /// The `%{name}` placeholders of a text.
    fn placeholders(text: &str) -> Vec<&str> {
        let mut names: Vec<&str> =
            text.split("%{").skip(1).filter_map(|rest| rest.split_once('}').map(|(name, _)| name)).collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The keys `t!` is called with in the agent's source.
    fn keys_used() -> Vec<(String, String)> {
        fn scan(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
            for entry in std::fs::read_dir(dir).expect("source folder") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    scan(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).expect("source file");
                    // The key of each `t!` call (never a `format!` string).
                    // `said(…)` is the doctor's shorthand for a text without values.
                    let calls = ["t!(", "Said::new(", "said("].into_iter().flat_map(|m| text.match_indices(m));
                    for (at, marker) in calls {
                        let before = text[..at].chars().next_back().unwrap_or(' ');
                        let after = &text[at + marker.len()..];
                        let Some(call) = after.trim_start().strip_prefix('"') else { continue };
                        if before.is_alphanumeric() || before == '_' || before == '"' {
                            continue;
                        }
                        if let Some((key, _)) = call.split_once('"') {
                            out.push((key.to_owned(), path.display().to_string()));
                        }
                    }
                }
            }
        }
        let mut out = Vec::new();
        scan(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
        out
    }

    #[test]
    fn both_languages_have_every_text() {
        let (zh, en) = (keys(include_str!("../locales/zh-CN.toml")), keys(include_str!("../locales/en.toml")));
        let only = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>| {
            a.keys().filter(|k| !b.contains_key(*k)).cloned().collect::<Vec<_>>()
        };
        assert_eq!(only(&zh, &en), Vec::<String>::new(), "in zh-CN, missing in en");
        assert_eq!(only(&en, &zh), Vec::<String>::new(), "in en, missing in zh-CN");
        for (key, text) in zh.iter().chain(&en) {
            assert!(!text.trim().is_empty(), "{key} is empty");
        }
        for (key, text) in &zh {
            assert_eq!(placeholders(text), placeholders(&en[key]), "{key} takes the same values in both");
        }
        let used = keys_used();
        assert!(used.len() > 50, "the scan finds the texts: {}", used.len());
        for (key, file) in &used {
            assert!(zh.contains_key(key) && en.contains_key(key), "{file} says {key}, which a locale lacks");
        }
        let unused: Vec<&String> = zh.keys().filter(|k| !used.iter().any(|(u, _)| u == *k)).collect();
        assert!(unused.is_empty(), "texts no code says: {unused:?}");
    }

    #[test]
    fn the_language_is_chosen_by_name() {
        assert_eq!(Language::default(), Language::ZhCn);
        assert_eq!(Language::try_from("en".to_owned()), Ok(Language::En));
        assert_eq!(Language::try_from("zh-CN".to_owned()), Ok(Language::ZhCn));
        for bad in ["fr", "zh", "EN", "zh_CN", ""] {
            let e = Language::try_from(bad.to_owned()).expect_err(bad);
            assert!(e.contains("[agent] language") && e.contains("\"zh-CN\"") && e.contains("\"en\""), "{e}");
        }
    }

    #[test]
    fn texts_follow_the_language() {
        let help = |l| in_language(l, || rust_i18n::t!("help.text").into_owned());
        assert!(help(Language::ZhCn).contains("/帮助"), "{}", help(Language::ZhCn));
        assert!(help(Language::En).contains("/help"), "{}", help(Language::En));
        let code =
            |l| in_language(l, || rust_i18n::t!("pairing.text", code = "123456", your_id = "0151234").into_owned());
        assert!(code(Language::ZhCn).contains("管理员") && code(Language::ZhCn).contains("123456"));
        assert!(code(Language::En).contains("admin") && code(Language::En).contains("123456"));
    }
}
