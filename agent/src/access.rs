//! Who may talk to the robot, who is an admin, and which tools each person may use.
//!
//! Admission is decided for the person first, the same in every chat: the organisation, an
//! allow-list, or pairing (a newcomer gets a code in a 1:1 chat that an admin approves with
//! `/approve CODE`). A group chat must then be open or allow-listed by conversation id; it
//! never lets in someone their standing refuses. Tools are granted per role and roles per user
//! (DingTalk staff ids), plus what `[access.groups]` grants in one group; nothing is granted
//! unless the configuration says so.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Mutex,
    time::{Duration, Instant},
};

use rust_i18n::t;
use serde::Deserialize;

use crate::dingtalk::{ConversationKind, RobotMessage};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectPolicy {
    /// Anyone in the organisation (a sender with a staff id).
    #[default]
    Org,
    /// Only the staff ids in `direct_allow`, `[access.users]` and `admins`.
    Allowlist,
    /// The allow-list, plus people an admin approved with `/approve CODE`.
    Pairing,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupPolicy {
    #[default]
    Open,
    /// Only the conversation ids in `group_allow`.
    Allowlist,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSettings {
    /// Tool names; `files` grants every `files_…` tool; `*` grants all.
    pub tools: Vec<String>,
}

/// `[access]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessSettings {
    /// Staff ids of the box's admins: `/approve`, `/audit`, admin alerts.
    pub admins: Vec<String>,
    pub direct_chats: DirectPolicy,
    pub direct_allow: Vec<String>,
    pub group_chats: GroupPolicy,
    pub group_allow: Vec<String>,
    /// Roles everyone admitted has.
    pub default_roles: Vec<String>,
    pub roles: BTreeMap<String, RoleSettings>,
    /// Staff id → extra roles.
    pub users: BTreeMap<String, Vec<String>>,
    /// Group conversation id → extra roles for everyone admitted, in that group only.
    pub groups: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AccessError {
    #[error("[access] names the role `{role}`, which no [access.roles.{role}] table defines; add it or fix the name")]
    UnknownRole { role: String },
    #[error("[access.roles.{role}] grants `{tool}`, which is not a tool of this box{hint}; the tools are: {known}")]
    UnknownTool { role: String, tool: String, known: String, hint: String },
}

/// The outcome of admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// Not admitted; the reason is said in chat.
    Refused(Refusal),
    /// A 1:1 newcomer under the pairing policy: this code awaits an admin's `/approve`.
    Pairing(String),
}

/// Why a sender is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// A group chat not in `group_allow`.
    GroupNotEnabled,
    /// A sender without a staff id under the `org` policy.
    NotInOrganisation,
    /// A sender not on the allow-list.
    NotListed,
    /// Under pairing, a sender not approved yet, writing in a group: the code is given only in
    /// a 1:1 chat.
    NotPaired,
}

impl Refusal {
    /// For the audit trail (English, like every audit field).
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::GroupNotEnabled => "this group chat is not in group_allow",
            Refusal::NotInOrganisation => "the sender is not a member of the organisation",
            Refusal::NotListed => "the sender is not on the allow-list",
            Refusal::NotPaired => "the sender is not approved yet (pairing), writing in a group",
        }
    }

    /// For the chat, in the box's language: with the sender's id (`who`) or the group's
    /// (`chat`), which is what an admin needs to let them in.
    pub fn said(self, who: &str, chat: &str) -> String {
        match self {
            Refusal::GroupNotEnabled => t!("access.group", chat = chat),
            Refusal::NotInOrganisation => t!("access.org_only", id = who),
            Refusal::NotListed => t!("access.not_listed", your_id = your_id(who)),
            Refusal::NotPaired => t!("access.not_paired", your_id = your_id(who)),
        }
        .into_owned()
    }
}

/// “Your staff id is …”, or for a sender outside the organisation (an [`actor`] of
/// `dingtalk:…`), their DingTalk user id named as such: they have no staff id to give.
pub fn your_id(who: &str) -> String {
    match who.strip_prefix("dingtalk:") {
        Some(_) => t!("access.your_user_id", id = who),
        None => t!("access.your_staff_id", id = who),
    }
    .into_owned()
}

const PAIRING_VALID: Duration = Duration::from_secs(24 * 3600);

pub struct Access {
    settings: AccessSettings,
    paired: Mutex<BTreeSet<String>>,
    /// code → (staff id, nickname, issued)
    pairing: Mutex<HashMap<String, (String, String, Instant)>>,
}

/// The identity the agent uses for a sender: the staff id, or the DingTalk user id when the
/// sender has none (not a member of the organisation).
pub fn actor(message: &RobotMessage) -> String {
    match &message.sender_staff_id {
        Some(s) if !s.is_empty() => s.clone(),
        _ => format!("dingtalk:{}", message.sender_id),
    }
}

fn matches(grant: &str, tool: &str) -> bool {
    grant == "*" || grant == tool || tool.strip_prefix(grant).is_some_and(|rest| rest.starts_with('_'))
}

/// Every role the settings name is defined, every grant names a tool of this box (`tools`).
pub fn check<'a>(settings: &AccessSettings, tools: impl Iterator<Item = &'a str> + Clone) -> Vec<AccessError> {
    let mut out = Vec::new();
    let referenced: BTreeSet<&String> = settings
        .default_roles
        .iter()
        .chain(settings.users.values().flatten())
        .chain(settings.groups.values().flatten())
        .collect();
    for role in referenced {
        if !settings.roles.contains_key(role) {
            out.push(AccessError::UnknownRole { role: role.clone() });
        }
    }
    for (role, r) in &settings.roles {
        for grant in &r.tools {
            if !tools.clone().any(|t| matches(grant, t)) {
                let family = grant.split('_').next().unwrap_or_default();
                let hint = match family {
                    "github" => " (configure [tools.github] with a token and repos to have them)",
                    "drive" => " (configure [tools.drive] with a url to have them)",
                    "caldav" => " (configure [tools.caldav.calendars] to have them)",
                    _ => "",
                };
                out.push(AccessError::UnknownTool {
                    role: role.clone(),
                    tool: grant.clone(),
                    known: tools.clone().collect::<Vec<_>>().join(", "),
                    hint: hint.to_owned(),
                });
            }
        }
    }
    out
}

impl Access {
    /// Check the settings against the tools of this box; `paired` is the approved set kept in
    /// the store.
    pub fn new<'a>(
        settings: AccessSettings,
        tools: impl Iterator<Item = &'a str> + Clone,
        paired: BTreeSet<String>,
    ) -> Result<Self, AccessError> {
        if let Some(e) = check(&settings, tools).into_iter().next() {
            return Err(e);
        }
        Ok(Access { settings, paired: Mutex::new(paired), pairing: Mutex::default() })
    }

    pub fn is_admin(&self, actor: &str) -> bool {
        self.settings.admins.iter().any(|a| a == actor)
    }

    pub fn admins(&self) -> &[String] {
        &self.settings.admins
    }

    fn listed(&self, actor: &str) -> bool {
        self.is_admin(actor)
            || self.settings.direct_allow.iter().any(|a| a == actor)
            || self.settings.users.contains_key(actor)
    }

    /// May this message's sender speak here? The person's standing is decided first and is the
    /// same in every chat (`direct_chats` is the policy for people); a group must also be
    /// enabled, and lets in no one their standing refuses.
    pub fn admit(&self, message: &RobotMessage) -> Admission {
        let actor = actor(message);
        let group = message.conversation_kind == ConversationKind::Group;
        if group
            && self.settings.group_chats == GroupPolicy::Allowlist
            && !self.settings.group_allow.contains(&message.conversation_id)
        {
            return Admission::Refused(Refusal::GroupNotEnabled);
        }
        let staff = message.sender_staff_id.as_deref().is_some_and(|s| !s.is_empty());
        match self.settings.direct_chats {
            _ if self.listed(&actor) => Admission::Allowed,
            DirectPolicy::Org if staff => Admission::Allowed,
            DirectPolicy::Org => Admission::Refused(Refusal::NotInOrganisation),
            DirectPolicy::Allowlist => Admission::Refused(Refusal::NotListed),
            DirectPolicy::Pairing if self.paired.lock().unwrap_or_else(|p| p.into_inner()).contains(&actor) => {
                Admission::Allowed
            }
            // A code is a private matter: in a group, the person is sent to a 1:1 chat for it.
            DirectPolicy::Pairing if group => Admission::Refused(Refusal::NotPaired),
            DirectPolicy::Pairing => Admission::Pairing(self.pairing_code(&actor, &message.sender_nick)),
        }
    }

    /// The pending code of `actor`, or a new one.
    fn pairing_code(&self, actor: &str, nick: &str) -> String {
        let mut pending = self.pairing.lock().unwrap_or_else(|p| p.into_inner());
        pending.retain(|_, (_, _, at)| at.elapsed() < PAIRING_VALID);
        if let Some((code, _)) = pending.iter().find(|(_, (a, _, _))| a == actor) {
            return code.clone();
        }
        let code = loop {
            let c = format!("{:06}", rand::random::<u32>() % 1_000_000);
            if !pending.contains_key(&c) {
                break c;
            }
        };
        pending.insert(code.clone(), (actor.to_owned(), nick.chars().take(40).collect(), Instant::now()));
        code
    }

    /// Approve a pairing code: the staff id and nickname approved, or `None` for an unknown or
    /// expired code. The caller persists [`Access::paired`].
    pub fn approve(&self, code: &str) -> Option<(String, String)> {
        let mut pending = self.pairing.lock().unwrap_or_else(|p| p.into_inner());
        let (actor, nick, at) = pending.remove(code)?;
        if at.elapsed() >= PAIRING_VALID {
            return None;
        }
        self.paired.lock().unwrap_or_else(|p| p.into_inner()).insert(actor.clone());
        Some((actor, nick))
    }

    pub fn paired(&self) -> BTreeSet<String> {
        self.paired.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// May `actor` use `tool` in the chat `chat`? Their own roles, and in a group what
    /// `[access.groups]` grants that group.
    pub fn granted(&self, actor: &str, chat: &str, tool: &str) -> bool {
        let extra = self.settings.users.get(actor).into_iter().flatten();
        let group = self.settings.groups.get(chat).into_iter().flatten();
        self.settings
            .default_roles
            .iter()
            .chain(extra)
            .chain(group)
            .filter_map(|r| self.settings.roles.get(r))
            .any(|r| r.tools.iter().any(|g| matches(g, tool)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOOLS: [&str; 4] = ["files_list", "files_read", "files_write", "system"];

    fn access(toml_text: &str) -> Result<Access, AccessError> {
        let s: AccessSettings = toml::from_str(toml_text).expect("toml");
        Access::new(s, TOOLS.iter().copied(), BTreeSet::new())
    }

    fn message(kind: ConversationKind, staff: Option<&str>, cid: &str) -> RobotMessage {
        RobotMessage {
            msg_id: "m".into(),
            conversation_id: cid.into(),
            conversation_kind: kind,
            conversation_title: None,
            sender_id: "uid".into(),
            sender_staff_id: staff.map(str::to_owned),
            sender_nick: "Li Lei".into(),
            is_admin: false,
            mentions_robot: true,
            robot_code: None,
            created_at_ms: None,
            session_webhook: None,
            content: crate::dingtalk::Content::Text("hi".into()),
        }
    }

    #[test]
    fn grants_are_denied_by_default_and_follow_roles() {
        let a = access(
            r#"default_roles = ["member"]
            [roles.member]
            tools = ["files_read", "system"]
            [roles.editor]
            tools = ["files"]
            [users]
            lilei = ["editor"]"#,
        )
        .expect("valid");
        assert!(a.granted("anyone", "c", "files_read"));
        assert!(!a.granted("anyone", "c", "files_write"));
        assert!(a.granted("lilei", "c", "files_write"));
        assert!(!a.granted("lilei", "c", "filesystem_x"), "a family grant covers `files_…` only");
        let none = access("").expect("empty");
        assert!(!none.granted("anyone", "c", "system"));
    }

    #[test]
    fn configuration_mistakes_are_named() {
        assert_eq!(
            access(r#"default_roles = ["ghost"]"#).err(),
            Some(AccessError::UnknownRole { role: "ghost".into() })
        );
        let e = access("[roles.x]\ntools = [\"shell\"]").err().expect("unknown tool");
        assert!(e.to_string().contains("`shell`") && e.to_string().contains("files_read"), "{e}");
        let e = access("[roles.x]\ntools = [\"github\"]").err().expect("not configured");
        assert!(e.to_string().contains("configure [tools.github]"), "{e}");
    }

    #[test]
    fn admission_per_kind_of_chat() {
        let open = access("").expect("defaults");
        assert_eq!(open.admit(&message(ConversationKind::Single, Some("s1"), "c")), Admission::Allowed);
        assert!(matches!(open.admit(&message(ConversationKind::Single, None, "c")), Admission::Refused(_)));
        assert_eq!(open.admit(&message(ConversationKind::Group, Some("s1"), "g")), Admission::Allowed);

        let strict = access(
            r#"direct_chats = "pairing"
            direct_allow = ["boss"]
            group_chats = "allowlist"
            group_allow = ["g-ok"]"#,
        )
        .expect("valid");
        assert_eq!(strict.admit(&message(ConversationKind::Group, Some("boss"), "g-ok")), Admission::Allowed);
        assert_eq!(
            strict.admit(&message(ConversationKind::Group, Some("x"), "g-ok")),
            Admission::Refused(Refusal::NotPaired),
            "an allowed group admits no one still waiting for approval"
        );
        assert!(matches!(strict.admit(&message(ConversationKind::Group, Some("x"), "g-no")), Admission::Refused(_)));
        assert_eq!(strict.admit(&message(ConversationKind::Single, Some("boss"), "c")), Admission::Allowed);
        let Admission::Pairing(code) = strict.admit(&message(ConversationKind::Single, Some("new"), "c")) else {
            panic!("newcomer gets a code")
        };
        assert_eq!(
            strict.admit(&message(ConversationKind::Single, Some("new"), "c")),
            Admission::Pairing(code.clone())
        );
        assert_eq!(strict.approve("000000x"), None);
        assert_eq!(strict.approve(&code), Some(("new".into(), "Li Lei".into())));
        assert_eq!(strict.admit(&message(ConversationKind::Single, Some("new"), "c")), Admission::Allowed);
        assert_eq!(strict.approve(&code), None, "a code is used once");
    }

    /// The table of docs/CONFIGURATION.md ("Who may speak where"), row by row: a person's
    /// standing is the same in a 1:1 chat, an open group and an allowed group; a group that is
    /// not allowed refuses everyone.
    #[test]
    fn a_persons_standing_is_the_same_in_every_chat() {
        use Admission::{Allowed, Refused};
        use ConversationKind::{Group, Single};
        const PAIRING_CODE: &str = "code";
        let outcome = |a: &Access, kind, staff: Option<&str>, cid: &str| match a.admit(&message(kind, staff, cid)) {
            Admission::Pairing(_) => Admission::Pairing(PAIRING_CODE.into()),
            other => other,
        };
        let pairing = Admission::Pairing(PAIRING_CODE.into());
        // policy, approved by pairing, sender; then the outcome in 1:1, an open group, an allowed group
        type Row<'a> = (&'a str, &'a str, Option<&'a str>, Admission, Admission, Admission);
        let rows: [Row; 9] = [
            ("org", "", Some("staff1"), Allowed, Allowed, Allowed),
            (
                "org",
                "",
                None,
                Refused(Refusal::NotInOrganisation),
                Refused(Refusal::NotInOrganisation),
                Refused(Refusal::NotInOrganisation),
            ),
            ("org", "", Some("listed"), Allowed, Allowed, Allowed),
            ("allowlist", "", Some("listed"), Allowed, Allowed, Allowed),
            (
                "allowlist",
                "",
                Some("staff1"),
                Refused(Refusal::NotListed),
                Refused(Refusal::NotListed),
                Refused(Refusal::NotListed),
            ),
            (
                "allowlist",
                "",
                None,
                Refused(Refusal::NotListed),
                Refused(Refusal::NotListed),
                Refused(Refusal::NotListed),
            ),
            ("pairing", "", Some("staff1"), pairing.clone(), Refused(Refusal::NotPaired), Refused(Refusal::NotPaired)),
            ("pairing", "staff1", Some("staff1"), Allowed, Allowed, Allowed),
            ("pairing", "", Some("listed"), Allowed, Allowed, Allowed),
        ];
        for (policy, paired, staff, direct, open_group, allowed_group) in rows {
            for groups in ["open", "allowlist"] {
                let settings: AccessSettings = toml::from_str(&format!(
                    "direct_chats = \"{policy}\"\ndirect_allow = [\"listed\"]\ngroup_chats = \"{groups}\"\ngroup_allow = [\"g-ok\"]"
                ))
                .expect("toml");
                let paired: BTreeSet<String> =
                    [paired].into_iter().filter(|p| !p.is_empty()).map(str::to_owned).collect();
                let a = Access::new(settings, TOOLS.iter().copied(), paired).expect("valid");
                let row = format!("{policy} {staff:?} groups {groups}");
                assert_eq!(outcome(&a, Single, staff, "c"), direct, "{row}: 1:1");
                let group = if groups == "open" { &open_group } else { &allowed_group };
                assert_eq!(&outcome(&a, Group, staff, "g-ok"), group, "{row}: group");
                if groups == "allowlist" {
                    let other = outcome(&a, Group, staff, "g-other");
                    assert_eq!(other, Refused(Refusal::GroupNotEnabled), "{row}: a group not allowed");
                }
            }
        }
    }

    #[test]
    fn a_group_adds_only_what_the_configuration_grants_it() {
        let a = access(
            r#"default_roles = ["member"]
            [roles.member]
            tools = ["files_read"]
            [roles.writer]
            tools = ["files_write"]
            [groups]
            "g-team" = ["writer"]"#,
        )
        .expect("valid");
        assert!(a.granted("anyone", "g-team", "files_write"), "the team's group grants writing there");
        assert!(!a.granted("anyone", "g-other", "files_write"), "only there");
        assert!(!a.granted("anyone", "c-direct", "files_write"), "not in 1:1");
        assert!(a.granted("anyone", "g-other", "files_read"), "the person's own roles everywhere");
        let e = access("[groups]\n\"g\" = [\"ghost\"]").err().expect("an undefined role");
        assert_eq!(e, AccessError::UnknownRole { role: "ghost".into() });
    }
}
