//! Slash commands as people type them: `/help`, or `/帮助` in Chinese, with a half-width `/` or
//! the full-width `／` a Chinese keyboard gives; full-width letters and digits (`／ｐｉｎｇ`,
//! `/确认 １２３４`) read as their ASCII twins; a Chinese name may run straight into its argument
//! (`/确认1234`, Chinese needs no space).

/// A command the assistant answers itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Help,
    Ping,
    Status,
    New,
    /// `/undo`; `/undo copy` keeps what a change replaced beside later work; `/undo drop` stops
    /// undoing a change.
    Undo(String),
    Confirm(String),
    /// All of what a pending confirmation would do, where the question shows only the start.
    Show(String),
    Cancel,
    Approve(String),
    Audit(String),
    /// The box's diagnostics (admins).
    Doctor,
    /// The agent's recent warnings and errors, redacted (admins).
    Logs,
    /// `/backup now` takes a snapshot of the store; `/backup` alone says when the last was taken
    /// (admins).
    Backup(String),
    /// `/update` says which releases are on the box and what is new; `/update install` installs
    /// a fetched release now (admins).
    Update(String),
    /// `/rollback` goes back to the release before (admins).
    Rollback,
    /// `/remind WHEN TEXT`: a reminder (the whole rest of the message).
    Remind(String),
    /// `/schedule WHEN REQUEST`: a recurring or later request answered by the model.
    Schedule(String),
    /// `/jobs`, `/jobs cancel N`, `/jobs pause N`, `/jobs resume N`.
    Jobs(String),
    /// Starts with a slash but is none of these (the name as typed, cut to 32 characters).
    Unknown(String),
}

/// The Chinese names and the English names they stand for.
const CHINESE: [(&str, &str); 18] = [
    ("帮助", "help"),
    ("在吗", "ping"),
    ("状态", "status"),
    ("新对话", "new"),
    ("撤销", "undo"),
    ("确认", "confirm"),
    ("查看", "show"),
    ("取消", "cancel"),
    ("批准", "approve"),
    ("审计", "audit"),
    ("诊断", "doctor"),
    ("日志", "logs"),
    ("备份", "backup"),
    ("更新", "update"),
    ("回退", "rollback"),
    ("提醒", "remind"),
    // Before 定时: the longer name first.
    ("定时任务", "jobs"),
    ("定时", "schedule"),
];

/// Full-width ASCII (`！`…`～`) as ASCII, and the ideographic space as a space.
fn half_width(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\u{ff01}'..='\u{ff5e}' => char::from_u32(c as u32 - 0xfee0).unwrap_or(c),
            '\u{3000}' => ' ',
            c => c,
        })
        .collect()
}

/// The command in `text` (mentions already stripped), or `None` for a message to answer in words.
pub fn parse(text: &str) -> Option<Command> {
    let text = half_width(text.trim());
    let rest = text.strip_prefix('/')?;
    let mut words = rest.split_whitespace();
    let typed = words.next().unwrap_or_default();
    let mut arg = words.next().unwrap_or_default().to_owned();
    // Everything after the name, for the commands that take a sentence.
    let mut sentence = rest[typed.len()..].trim().to_owned();
    let name = typed.to_ascii_lowercase();
    let english = match CHINESE.iter().find(|(zh, _)| name.starts_with(zh)) {
        Some((zh, en)) => {
            let glued = &name[zh.len()..];
            if !glued.is_empty() {
                if !matches!(*en, "confirm" | "show" | "approve" | "audit" | "undo" | "remind" | "schedule" | "jobs") {
                    return Some(Command::Unknown(format!("/{}", typed.chars().take(31).collect::<String>())));
                }
                arg = glued.to_owned();
                sentence = format!("{glued} {sentence}").trim().to_owned();
            }
            *en
        }
        None => name.as_str(),
    };
    Some(match english {
        "help" | "?" => Command::Help,
        "ping" => Command::Ping,
        "status" => Command::Status,
        "new" => Command::New,
        "undo" => Command::Undo(arg),
        "confirm" => Command::Confirm(arg),
        "show" => Command::Show(arg),
        "cancel" => Command::Cancel,
        "approve" => Command::Approve(arg),
        "audit" => Command::Audit(arg),
        "doctor" => Command::Doctor,
        "logs" => Command::Logs,
        "backup" => Command::Backup(arg),
        "update" => Command::Update(arg),
        "rollback" => Command::Rollback,
        "remind" => Command::Remind(sentence),
        "schedule" => Command::Schedule(sentence),
        "jobs" => Command::Jobs(sentence),
        _ => Command::Unknown(format!("/{}", typed.chars().take(31).collect::<String>())),
    })
}

/// Does `text` (mentions stripped) start like a command? Such messages are never merged with others.
pub fn is_command(text: &str) -> bool {
    strip_mentions(text).starts_with(['/', '\u{ff0f}'])
}

/// `text` without the @mentions before it (a group message starts with the robot's name).
pub fn strip_mentions(text: &str) -> &str {
    let mut rest = text.trim_start();
    while let Some(after) = rest.strip_prefix('@') {
        rest = after.split_once(char::is_whitespace).map(|(_, r)| r.trim_start()).unwrap_or("");
    }
    rest.trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_names_with_either_slash() {
        assert_eq!(parse("/help"), Some(Command::Help));
        assert_eq!(parse("/HELP"), Some(Command::Help));
        assert_eq!(parse("/?"), Some(Command::Help));
        assert_eq!(parse("／help"), Some(Command::Help));
        assert_eq!(parse("／ｐｉｎｇ"), Some(Command::Ping));
        assert_eq!(parse("/ping burst 7"), Some(Command::Ping));
        assert_eq!(parse("/confirm 1234"), Some(Command::Confirm("1234".into())));
        assert_eq!(parse("／confirm　１２３４"), Some(Command::Confirm("1234".into())));
        assert_eq!(parse("/approve"), Some(Command::Approve(String::new())));
        assert_eq!(parse("/audit 5"), Some(Command::Audit("5".into())));
    }

    #[test]
    fn chinese_names() {
        let cases = [
            ("/帮助", Command::Help),
            ("／帮助", Command::Help),
            ("/？", Command::Help),
            ("／？", Command::Help),
            ("/在吗", Command::Ping),
            ("/状态", Command::Status),
            ("/新对话", Command::New),
            ("/撤销", Command::Undo(String::new())),
            ("/撤销 副本", Command::Undo("副本".into())),
            ("/撤销放弃", Command::Undo("放弃".into())),
            ("/取消", Command::Cancel),
            ("/确认 1234", Command::Confirm("1234".into())),
            ("／确认　１２３４", Command::Confirm("1234".into())),
            ("/确认1234", Command::Confirm("1234".into())),
            ("/查看 1234", Command::Show("1234".into())),
            ("/show 1234", Command::Show("1234".into())),
            ("/批准 012345", Command::Approve("012345".into())),
            ("/审计 10", Command::Audit("10".into())),
            ("/诊断", Command::Doctor),
            ("/doctor", Command::Doctor),
            ("／日志", Command::Logs),
            ("/logs", Command::Logs),
            ("/备份 now", Command::Backup("now".into())),
            ("/backup now", Command::Backup("now".into())),
            ("/备份", Command::Backup(String::new())),
            ("/更新", Command::Update(String::new())),
            ("/更新 安装", Command::Update("安装".into())),
            ("/update install", Command::Update("install".into())),
            ("/回退", Command::Rollback),
            ("/rollback", Command::Rollback),
            ("/提醒 明天 9:00 发合同", Command::Remind("明天 9:00 发合同".into())),
            ("/提醒明天9点发合同", Command::Remind("明天9点发合同".into())),
            ("／提醒　每天　９：００　打卡", Command::Remind("每天 9:00 打卡".into())),
            ("/remind tomorrow 9:00 send it", Command::Remind("tomorrow 9:00 send it".into())),
            ("/定时 每周五 17:00 列出待办", Command::Schedule("每周五 17:00 列出待办".into())),
            ("/定时任务", Command::Jobs(String::new())),
            ("/定时任务 取消 3", Command::Jobs("取消 3".into())),
            ("/jobs pause 3", Command::Jobs("pause 3".into())),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text), Some(expected), "{text}");
        }
    }

    #[test]
    fn words_and_unknown_commands() {
        assert_eq!(parse("明天的会几点？"), None);
        assert_eq!(parse("what is 2/3"), None);
        assert_eq!(parse("/帮助我"), Some(Command::Unknown("/帮助我".into())));
        assert_eq!(parse("/deploy now"), Some(Command::Unknown("/deploy".into())));
        assert_eq!(parse("／部署"), Some(Command::Unknown("/部署".into())));
        assert_eq!(parse("/"), Some(Command::Unknown("/".into())));
        let long = format!("/{}", "x".repeat(100));
        assert_eq!(parse(&long), Some(Command::Unknown(format!("/{}", "x".repeat(31)))));
        assert!(is_command("／帮助") && is_command(" /ping") && !is_command("你好 /ping"));
    }
}
