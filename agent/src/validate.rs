//! One validation of a configuration, the same code wherever a configuration is judged:
//! `zhuli provision check` and `provision write` on the installer's laptop, the box's import
//! before it switches generation, and the agent's start. What the text alone decides is in
//! [`config`]; what only the box can tell (a folder exists, a plugin's program is installed, a
//! time zone is known) is in [`on_box`], which the import runs before the switch.
//!
//! A problem names the setting it is about and says what to do; never a secret's value.

use std::path::Path;

use crate::{access, config::Config, dingtalk::settings::check_url, i18n::Said, tools};

/// One thing wrong with a configuration: the setting, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Problem {
    /// `[section] field`, as written in the file.
    pub field: String,
    /// In English: the command line, the receipt, the logs.
    pub message: String,
    /// The same, to say in the box's language (the admin chat). None for a module's own
    /// English words, which are said as they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub said: Option<Said>,
}

impl Problem {
    /// A problem in English words only.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Problem { field: field.into(), message: message.into(), said: None }
    }

    /// A problem said from the locale files: English here, the box's language in chat.
    pub fn keyed(field: impl Into<String>, said: Said) -> Self {
        Problem { field: field.into(), message: said.english(), said: Some(said) }
    }

    /// The problem in the box's language, its setting named as the file writes it.
    pub fn text(&self) -> String {
        let message = self.said.as_ref().and_then(Said::text).unwrap_or_else(|| self.message.clone());
        match self.field.as_str() {
            "" => message,
            field => rust_i18n::t!("problem.line", field = field, message = message).into_owned(),
        }
    }

    /// A module's error that starts with the table it is about (`[tools.drive] url: …`): that
    /// table becomes the field.
    pub fn said(text: impl Into<String>) -> Self {
        let text = text.into();
        match text.strip_prefix('[').and_then(|rest| rest.split_once("] ")) {
            // `[dingtalk] client_secret: …`: the setting is the table and the key.
            Some((table, message)) => match message.split_once(": ") {
                Some((key, rest))
                    if !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || "_.".contains(c)) =>
                {
                    Problem::new(format!("[{table}] {key}"), rest)
                }
                _ => Problem::new(format!("[{table}]"), message),
            },
            None => Problem::new("", text),
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.field.as_str() {
            "" => f.write_str(&self.message),
            // `[access.roles.member] grants …`: a table reads on without a colon.
            table if table.ends_with(']') => write!(f, "{table} {}", self.message),
            field => write!(f, "{field}: {}", self.message),
        }
    }
}

/// What [`config`] found.
#[derive(Debug, Default)]
pub struct Findings {
    /// The box cannot run this configuration.
    pub errors: Vec<Problem>,
    /// Values still as the template's examples have them: it may run, but not as meant.
    /// `provision write` refuses them unless `--force`.
    pub examples: Vec<Problem>,
}

/// The lines of a list of problems, one `- ` item each.
pub fn lines(problems: &[Problem]) -> String {
    problems.iter().map(|p| format!("- {p}")).collect::<Vec<_>>().join("\n")
}

/// The template's placeholder credentials: a box can never log in with them.
const PLACEHOLDER_SECRETS: [&str; 4] = ["paste-the-secret", "app-password", "sk-...", "github_pat_..."];

/// Everything the text decides: the tools the grants name exist, the roles are defined, every
/// URL is reachable the way the agent will reach it, no template placeholder is left.
pub fn config(config: &Config) -> Findings {
    let mut f = Findings::default();
    let mut names: Vec<String> = Vec::new();
    names.extend(tools::files::tool_names().map(str::to_owned));
    names.extend(tools::workspace::tool_names().map(str::to_owned));
    names.push("system".into());
    names.extend(tools::jobs::tool_names().map(str::to_owned));
    match tools::drive::Drive::tool_names(&config.tools.drive) {
        Ok(n) => names.extend(n.into_iter().map(str::to_owned)),
        Err(e) => f.errors.push(Problem::said(e.to_string())),
    }
    match tools::github::GithubTools::tool_names(&config.tools.github) {
        Ok(n) => names.extend(n.into_iter().map(str::to_owned)),
        Err(e) => f.errors.push(Problem::said(e.to_string())),
    }
    match tools::caldav::Caldav::tool_names(&config.tools.caldav) {
        Ok(n) => names.extend(n.into_iter().map(str::to_owned)),
        Err(e) => f.errors.push(Problem::said(e.to_string())),
    }
    for (name, plugin) in &config.tools.mcp {
        match tools::mcp::check_settings(name, plugin) {
            Ok(()) => names.push(name.clone()),
            Err(e) => f.errors.push(Problem::said(e.to_string())),
        }
    }
    for e in access::check(&config.access, names.iter().map(String::as_str)) {
        // A plugin's tools are known only once it runs: `fs_read_file` is granted if `fs` is a plugin.
        if let access::AccessError::UnknownTool { tool, .. } = &e
            && config.tools.mcp.keys().any(|p| tool.strip_prefix(p.as_str()).is_some_and(|r| r.starts_with('_')))
        {
            continue;
        }
        f.errors.push(match e {
            access::AccessError::UnknownRole { role } => {
                Problem::keyed("[access]", Said::new("problem.unknown_role", &[("role", &role)]))
            }
            access::AccessError::UnknownTool { role, tool, known, hint } => {
                let field = format!("[access.roles.{role}]");
                let family = ["github", "drive", "caldav"].into_iter().find(|f| tool.split('_').next() == Some(*f));
                let said = match (closest(&tool, names.iter().map(String::as_str)), family) {
                    (Some(guess), _) if hint.is_empty() => Said::new(
                        "problem.unknown_tool_guess",
                        &[("tool", &tool), ("guess", &guess), ("known", &known)],
                    ),
                    (_, Some(family)) => Said::new(
                        "problem.unknown_tool_family",
                        &[("tool", &tool), ("table", &family_table(family)), ("known", &known)],
                    ),
                    _ => Said::new("problem.unknown_tool", &[("tool", &tool), ("known", &known)]),
                };
                Problem::keyed(field, said)
            }
        });
    }
    let endpoints = config.llm.iter().map(|l| (l, "[llm]".to_owned()));
    let endpoints = endpoints.chain(config.models.iter().map(|m| (m, format!("[[models]] {:?}", m.name))));
    for (llm, table) in endpoints {
        if let Err(e) = check_url(&llm.base_url, "https", "http") {
            f.errors.push(Problem::keyed(format!("{table} base_url"), Said::new("problem.llm_url", &[("error", &e)])));
        }
        if llm.model.trim().is_empty() {
            f.errors.push(Problem::keyed(format!("{table} model"), Said::new("problem.llm_model", &[])));
        }
    }
    let mut names = std::collections::BTreeSet::new();
    for m in config.llm.iter().chain(&config.models) {
        if !names.insert(m.name.as_str()) {
            f.errors.push(Problem::said(format!(
                "[[models]] names {:?} twice (the [llm] table is named \"llm\"); give every model endpoint its own name",
                m.name
            )));
        }
    }
    if let Err(e) = crate::privacy::Policy::new(&config.privacy) {
        f.errors.push(Problem::said(e.to_string()));
    }
    let d = &config.dingtalk;
    for (field, value) in
        [("[dingtalk] client_id", d.client_id.as_str()), ("[dingtalk] robot_code", d.robot_code.as_str())]
    {
        if value.contains("xxxxxxxx") {
            f.errors.push(Problem::keyed(field, Said::new("problem.placeholder_id", &[])));
        }
    }
    let secrets = [
        ("[dingtalk] client_secret", Some(&d.client_secret)),
        ("[llm] api_key", config.llm.as_ref().and_then(|l| l.api_key.as_ref())),
        ("[tools.github] token", config.tools.github.token.as_ref()),
        ("[tools.drive] password", config.tools.drive.password.as_ref()),
        ("[backup] password", config.backup.password.as_ref()),
        ("[tools.caldav] password", config.tools.caldav.password.as_ref()),
    ];
    let model_keys = config.models.iter().map(|m| (format!("[[models]] {:?} api_key", m.name), m.api_key.as_ref()));
    for (field, secret) in secrets.into_iter().map(|(f, s)| (f.to_owned(), s)).chain(model_keys) {
        if secret.is_some_and(|s| PLACEHOLDER_SECRETS.contains(&s.expose())) {
            f.errors.push(Problem::keyed(field, Said::new("problem.placeholder_secret", &[])));
        }
    }
    for admin in &config.access.admins {
        if admin == "manager001" {
            f.examples.push(Problem::keyed("[access] admins", Said::new("problem.example_admins", &[])));
        }
    }
    if config.health.admin_chat.as_deref().is_some_and(|c| c.contains("XXXX")) {
        f.examples.push(Problem::keyed("[health] admin_chat", Said::new("problem.example_admin_chat", &[])));
    }
    let urls = config
        .tools
        .drive
        .url
        .iter()
        .map(|u| ("[tools.drive] url", u))
        .chain(config.tools.caldav.calendars.values().map(|u| ("[tools.caldav.calendars]", u)));
    for (field, url) in urls {
        if url.contains("example.com") {
            f.examples.push(Problem::keyed(field, Said::new("problem.example_url", &[("url", &url)])));
        }
    }
    let b = &config.backup;
    if crate::tools::when::clock(&b.at).map_or(true, |m| m >= 24 * 60) {
        f.errors.push(Problem::said(format!(
            "[backup] at: {:?} is not a time of day; write it like \"02:30\" (the office's time)",
            b.at
        )));
    }
    if let Some(url) = &b.offsite {
        if let Err(e) = crate::dingtalk::settings::check_url(url, "https", "http") {
            f.errors.push(Problem::said(format!("[backup] offsite: {e}")));
        }
        // A password in the address would be shown wherever the address is.
        if url.split("://").nth(1).and_then(|rest| rest.split('/').next()).is_some_and(|host| host.contains('@')) {
            f.errors.push(Problem::keyed("[backup] offsite", Said::new("problem.offsite_userinfo", &[])));
        }
        if url.contains("example.com") {
            f.examples.push(Problem::keyed("[backup] offsite", Said::new("problem.example_url", &[("url", &url)])));
        }
    }
    if config.tools.github.repos.iter().any(|r| r == "acme/website") {
        f.examples.push(Problem::keyed("[tools.github] repos", Said::new("problem.example_repos", &[])));
    }
    f
}

/// What only the box can check, before an import switches to the configuration: the time zone
/// is known, every plugin's program and folders exist. (The import makes the folders the agent
/// may change and checks that each credential unseals.)
pub fn on_box(config: &Config, zoneinfo: &Path) -> Vec<Problem> {
    let mut out = Vec::new();
    if let Some(zone) = config.agent.time_zone.as_deref()
        && !zoneinfo.join(zone).is_file()
    {
        let missing = zoneinfo.join(zone);
        out.push(Problem::keyed(
            "[agent] time_zone",
            Said::new("problem.unknown_zone", &[("zone", &zone), ("path", &missing.display())]),
        ));
    }
    // The zone and the offset times in chat are shown in must agree (summer time counts).
    if let Some(zone) = config.agent.time_zone.as_deref()
        && let Ok(tzif) = std::fs::read(zoneinfo.join(zone))
        && let Some((standard, summer)) = tzif_footer(&tzif).and_then(posix_offsets)
    {
        let offset = config.assistant.utc_offset_minutes;
        if offset != standard && Some(offset) != summer {
            out.push(Problem::keyed(
                "[assistant] utc_offset_minutes",
                Said::new("problem.offset_zone", &[("offset", &offset), ("zone", &zone), ("minutes", &standard)]),
            ));
        }
    }
    for (name, plugin) in &config.tools.mcp {
        out.push(match tools::mcp::missing_path(plugin) {
            None => continue,
            Some(tools::mcp::MissingPath::Command(p)) => Problem::keyed(
                format!("[tools.mcp.{name}] command"),
                Said::new("problem.plugin_program", &[("path", &p.display())]),
            ),
            Some(tools::mcp::MissingPath::Read(p)) => Problem::keyed(
                format!("[tools.mcp.{name}] read"),
                Said::new("problem.plugin_folder", &[("path", &p.display())]),
            ),
        });
    }
    out
}

/// The table that enables a family of tools.
fn family_table(family: &str) -> String {
    match family {
        "caldav" => "[tools.caldav.calendars]".into(),
        f => format!("[tools.{f}]"),
    }
}

/// The POSIX TZ rule at the end of a TZif file (version 2 and later): `CST-8`, `CET-1CEST,M3.5.0,M10.5.0/3`.
fn tzif_footer(tzif: &[u8]) -> Option<&str> {
    // Version 1 files (a NUL for the version) have no rule.
    if *tzif.get(4)? < b'2' {
        return None;
    }
    let body = tzif.strip_prefix(b"TZif")?.strip_suffix(b"\n")?;
    let start = body.iter().rposition(|b| *b == b'\n')? + 1;
    std::str::from_utf8(&body[start..]).ok().filter(|rule| !rule.is_empty())
}

/// The offsets east of UTC, in minutes, of a POSIX TZ rule: standard time, and summer time if
/// the zone has one.
fn posix_offsets(rule: &str) -> Option<(i32, Option<i32>)> {
    fn name(rest: &mut &str) -> Option<()> {
        if let Some(quoted) = rest.strip_prefix('<') {
            *rest = &quoted[quoted.find('>')? + 1..];
        } else {
            let letters = rest.chars().take_while(char::is_ascii_alphabetic).count();
            if letters < 3 {
                return None;
            }
            *rest = &rest[letters..];
        }
        Some(())
    }
    // `[+-]hh[:mm[:ss]]`, counted west of Greenwich as POSIX does.
    fn offset(rest: &mut &str) -> Option<i32> {
        let (west, digits) = match rest.as_bytes().first()? {
            b'-' => (false, &rest[1..]),
            b'+' => (true, &rest[1..]),
            _ => (true, *rest),
        };
        let len = digits.find(|c: char| !c.is_ascii_digit() && c != ':').unwrap_or(digits.len());
        let mut parts = digits[..len].split(':');
        let hours: i32 = parts.next()?.parse().ok()?;
        let minutes: i32 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
        *rest = &digits[len..];
        let east = hours * 60 + minutes;
        Some(if west { -east } else { east })
    }
    let mut rest = rule;
    name(&mut rest)?;
    let standard = offset(&mut rest)?;
    if rest.is_empty() {
        return Some((standard, None));
    }
    name(&mut rest)?;
    let summer = if rest.is_empty() || rest.starts_with(',') { standard + 60 } else { offset(&mut rest)? };
    Some((standard, Some(summer)))
}

/// The known name closest to `word`, if it is a near miss (a typo of at most two letters).
fn closest<'a>(word: &str, known: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    known.map(|k| (distance(word, k), k)).filter(|(d, _)| *d <= 2).min_by_key(|(d, _)| *d).map(|(_, k)| k)
}

/// Levenshtein distance between two short names.
fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1).min(row[j] + 1).min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Config {
        let text = format!(
            "[dingtalk]\nclient_id = \"dingabc\"\nclient_secret = \"s3cr3t-value-xyz\"\nrobot_code = \"dingabc\"\n{extra}"
        );
        Config::parse(&text, Path::new("z.toml")).expect("parses")
    }

    fn errors(extra: &str) -> Vec<String> {
        config(&parse(extra)).errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn a_configuration_the_agent_runs_has_no_problems() {
        let f = config(&parse(
            "[access]\ndefault_roles = [\"member\"]\n[access.roles.member]\ntools = [\"files_read\", \"calendar\", \"system\"]\n[llm]\nbase_url = \"https://api.deepseek.com/v1\"\nmodel = \"deepseek-chat\"\n",
        ));
        assert!(f.errors.is_empty() && f.examples.is_empty(), "{f:?}");
    }

    #[test]
    fn a_grant_of_a_tool_that_does_not_exist_is_named_with_a_guess() {
        let e = errors("[access.roles.member]\ntools = [\"files_reed\"]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].contains("[access.roles.member]") && e[0].contains("`files_reed`"), "{e:?}");
        assert!(e[0].contains("did you mean `files_read`?"), "{e:?}");
        // A family the configuration does not enable says how to enable it.
        let e = errors("[access.roles.member]\ntools = [\"github\"]\n");
        assert!(e[0].contains("configure [tools.github]"), "{e:?}");
    }

    #[test]
    fn every_undefined_role_is_named() {
        let e = errors("[access]\ndefault_roles = [\"ghost\"]\n[access.users]\nmanager9 = [\"boss\"]\n");
        assert_eq!(e.len(), 2, "{e:?}");
        assert!(e.iter().any(|l| l.contains("`ghost`")) && e.iter().any(|l| l.contains("`boss`")), "{e:?}");
    }

    #[test]
    fn a_model_on_the_lan_over_plain_http_is_refused_and_loopback_is_not() {
        let e = errors("[llm]\nbase_url = \"http://192.168.1.5:11434/v1\"\nmodel = \"qwen2.5\"\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("[llm] base_url:") && e[0].contains("https://"), "{e:?}");
        assert!(errors("[llm]\nbase_url = \"http://127.0.0.1:11434/v1\"\nmodel = \"qwen2.5\"\n").is_empty());
    }

    #[test]
    fn model_endpoints_and_privacy_rules_are_checked_by_name() {
        let e = errors(
            "[llm]\nbase_url = \"https://api.deepseek.com/v1\"\nmodel = \"deepseek-chat\"\n\
             [[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = \"http://10.0.0.9:11434/v1\"\nmodel = \"\"\n\
             [[models]]\nname = \"llm\"\nwhere = \"local\"\nbase_url = \"https://gpu.office.lan/v1\"\nmodel = \"qwen\"\n\
             [privacy]\npatterns = [\"(\"]\n",
        );
        assert_eq!(e.len(), 4, "{e:?}");
        assert!(e.iter().any(|l| l.starts_with("[[models]] \"office\" base_url:") && l.contains("https://")), "{e:?}");
        assert!(e.iter().any(|l| l.starts_with("[[models]] \"office\" model:")), "{e:?}");
        assert!(e.iter().any(|l| l.contains("names \"llm\" twice")), "{e:?}");
        assert!(e.iter().any(|l| l.contains("[privacy] patterns[0]")), "{e:?}");
        assert!(errors("[[models]]\nname = \"office\"\nwhere = \"local\"\nbase_url = \"https://gpu.office.lan/v1\"\nmodel = \"qwen\"\n").is_empty());
        assert!(
            toml::from_str::<crate::config::Config>("[[models]]\nwhere = \"lan\"\n").is_err(),
            "`where` is local or cloud"
        );
    }

    #[test]
    fn the_untouched_template_is_refused_for_its_placeholders() {
        let config = Config::parse(crate::provision::TEMPLATE, Path::new("zhuli.toml")).expect("the template parses");
        let f = super::config(&config);
        let errors: Vec<String> = f.errors.iter().map(ToString::to_string).collect();
        for field in ["[dingtalk] client_id", "[dingtalk] robot_code", "[dingtalk] client_secret"] {
            assert!(errors.iter().any(|e| e.starts_with(field)), "{field} missing from {errors:?}");
        }
        assert!(f.examples.iter().any(|p| p.field == "[access] admins"), "{f:?}");
        for e in &errors {
            assert!(!e.contains("paste-the-secret"), "a secret's value in: {e}");
        }
    }

    #[test]
    fn a_plugin_grant_is_valid_before_its_tools_are_known() {
        let e = errors(
            "[access.roles.member]\ntools = [\"fs_read_file\", \"fs\"]\n[tools.mcp.fs]\ncommand = \"/usr/bin/node\"\n",
        );
        assert!(e.is_empty(), "{e:?}");
    }

    #[test]
    fn on_the_box_a_missing_program_and_an_unknown_zone_are_problems() {
        let c = parse("[agent]\ntime_zone = \"Mars/Olympus\"\n[tools.mcp.fs]\ncommand = \"/nonexistent/node\"\n");
        let dir = std::env::temp_dir();
        let p: Vec<String> = on_box(&c, &dir).iter().map(ToString::to_string).collect();
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("[agent] time_zone") && p[1].contains("/nonexistent/node"), "{p:?}");
    }

    #[test]
    fn problems_are_said_in_the_boxs_language_with_the_setting_as_written() {
        use crate::i18n::{Language, tests::in_language};
        let template = Config::parse(crate::provision::TEMPLATE, Path::new("zhuli.toml")).expect("the template parses");
        let mut all: Vec<Problem> = Vec::new();
        for found in [
            config(&template),
            config(&parse(
                "[access]\ndefault_roles = [\"ghost\"]\n[access.roles.m]\ntools = [\"files_reed\", \"github\", \"zap\"]\n",
            )),
            config(&parse("[llm]\nbase_url = \"http://10.0.0.9/v1\"\nmodel = \" \"\n")),
        ] {
            all.extend(found.errors);
            all.extend(found.examples);
        }
        let c = parse("[agent]\ntime_zone = \"Mars/Olympus\"\n[tools.mcp.fs]\ncommand = \"/nonexistent/node\"\n");
        all.extend(on_box(&c, &std::env::temp_dir()));
        assert!(all.len() >= 12, "{all:?}");
        for p in &all {
            let said = p.said.as_ref().unwrap_or_else(|| panic!("not said from the locale: {p:?}"));
            let zh = in_language(Language::ZhCn, || p.text());
            let en = in_language(Language::En, || p.text());
            assert!(zh.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "not Chinese: {zh}");
            assert!(!zh.contains(&said.key) && !zh.contains("%{"), "a key or a hole in: {zh}");
            assert!(zh.starts_with(&format!("`{}`：", p.field)), "{zh}");
            // In English the chat says what the command line says.
            assert!(!en.chars().any(|c| ('\u{4e00}'..='\u{9fff}').contains(&c)), "Chinese in English: {en}");
        }
        let guess = all.iter().find(|p| p.message.contains("files_reed")).expect("the typo");
        let zh = in_language(Language::ZhCn, || guess.text());
        assert!(zh.contains("是不是想写 `files_read`？"), "{zh}");
    }

    #[test]
    fn posix_rules_give_the_offsets_east_of_utc() {
        assert_eq!(posix_offsets("CST-8"), Some((480, None)));
        assert_eq!(posix_offsets("<+0545>-5:45"), Some((345, None)));
        assert_eq!(posix_offsets("CET-1CEST,M3.5.0,M10.5.0/3"), Some((60, Some(120))));
        assert_eq!(posix_offsets("EST5EDT,M3.2.0,M11.1.0"), Some((-300, Some(-240))));
        assert_eq!(posix_offsets("<-03>3"), Some((-180, None)));
        assert_eq!(posix_offsets("UTC0"), Some((0, None)));
        // Summer time behind standard time (Ireland), and a half-hour zone with a summer hour.
        assert_eq!(posix_offsets("IST-1GMT0,M10.5.0,M3.5.0/1"), Some((60, Some(0))));
        assert_eq!(posix_offsets("<+1030>-10:30<+11>-11,M10.1.0,M4.1.0"), Some((630, Some(660))));
        for bad in ["", "8", "X-8", "CST"] {
            assert_eq!(posix_offsets(bad), None, "{bad:?}");
        }
        assert_eq!(tzif_footer(b"TZif2...binary...\nCST-8\n"), Some("CST-8"));
        assert_eq!(tzif_footer(b"TZif1 without a footer"), None);
        assert_eq!(tzif_footer(b"TZif\0\0binary\n"), None, "a version 1 file ends in data, not a rule");
        // This machine's own tzdata, where it has it (the box's image always does).
        if let Ok(berlin) = std::fs::read("/usr/share/zoneinfo/Europe/Berlin") {
            assert_eq!(tzif_footer(&berlin).and_then(posix_offsets), Some((60, Some(120))));
        }
    }

    #[test]
    fn the_offset_times_are_shown_in_must_agree_with_the_zone() {
        let zoneinfo = std::env::temp_dir().join(format!("zhuli-zoneinfo-{}", std::process::id()));
        std::fs::create_dir_all(zoneinfo.join("Asia")).expect("zoneinfo");
        std::fs::create_dir_all(zoneinfo.join("Europe")).expect("zoneinfo");
        std::fs::write(zoneinfo.join("Asia/Shanghai"), b"TZif2\0\0binary\nCST-8\n").expect("zone");
        std::fs::write(zoneinfo.join("Europe/Berlin"), b"TZif2\0\0binary\nCET-1CEST,M3.5.0,M10.5.0/3\n").expect("zone");
        let problems = |text: &str| on_box(&parse(text), &zoneinfo);
        assert!(problems("[agent]\ntime_zone = \"Asia/Shanghai\"\n").is_empty(), "480 is the default");
        assert!(problems("[agent]\ntime_zone = \"Europe/Berlin\"\n[assistant]\nutc_offset_minutes = 120\n").is_empty());
        let p = problems("[agent]\ntime_zone = \"Europe/Berlin\"\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].field, "[assistant] utc_offset_minutes");
        assert!(p[0].message.contains("480") && p[0].message.contains("Europe/Berlin") && p[0].message.contains("60"));
        let _ = std::fs::remove_dir_all(&zoneinfo);
    }

    #[test]
    fn near_misses_are_guessed_and_far_ones_are_not() {
        let known = ["files_read", "files_write", "system"];
        assert_eq!(closest("files_reed", known.into_iter()), Some("files_read"));
        assert_eq!(closest("sytem", known.into_iter()), Some("system"));
        assert_eq!(closest("calendar_zap", known.into_iter()), None);
    }

    #[test]
    fn every_problem_names_its_setting() {
        let bad = [
            "[access.roles.member]\ntools = [\"files_reed\"]\n",
            "[access]\ndefault_roles = [\"ghost\"]\n",
            "[tools.drive]\nurl = \"ftp://x\"\n",
            "[tools.github]\ntoken = \"github_pat_0123456789\"\nrepos = []\n",
            "[tools.caldav.calendars]\nteam = \"http://10.0.0.2/cal/\"\n",
            "[tools.mcp.Bad]\ncommand = \"node\"\n",
            "[llm]\nbase_url = \"http://10.0.0.9/v1\"\nmodel = \" \"\n",
        ];
        for extra in bad {
            let found = config(&parse(extra));
            assert!(!found.errors.is_empty(), "{extra}");
            for p in &found.errors {
                assert!(p.field.starts_with('['), "{extra}: no setting named in {p:?}");
            }
        }
    }
}
