//! Store behaviour against real files: reopen, wrong key, newer schema, tampering, truncation,
//! bounds, and what the file's bytes must never contain.

use super::*;
use crate::dingtalk::message::{Content, ConversationKind};

struct TempStore {
    dir: PathBuf,
}

impl TempStore {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("zhuli-store-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempStore { dir }
    }
    fn path(&self) -> PathBuf {
        self.dir.join("zhuli.redb")
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn message(id: &str, text: &str) -> RobotMessage {
    RobotMessage {
        msg_id: id.into(),
        conversation_id: "cid-secret-chat".into(),
        conversation_kind: ConversationKind::Single,
        conversation_title: None,
        sender_id: "u".into(),
        sender_staff_id: Some("staff-7".into()),
        sender_nick: "Han Meimei".into(),
        is_admin: false,
        mentions_robot: true,
        robot_code: None,
        created_at_ms: None,
        session_webhook: None,
        content: Content::Text(text.into()),
    }
}

fn outbox(m: &RobotMessage, text: &str) -> OutboxEntry {
    OutboxEntry { msg_id: m.msg_id.clone(), reply: Reply::to(m, "t", text), staged_at_ms: 1, card: None }
}

#[test]
fn exactly_once_bookkeeping_survives_reopen() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let (a, b, c) = (message("m1", "one"), message("m2", "two"), message("m3", "group chatter"));
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        let got = s.accept_batch(&[(&a, true), (&b, true), (&c, false), (&a, true)], 1_000).expect("accept");
        let (Acceptance::Queued(sa), Acceptance::Queued(sb)) = (got[0], got[1]) else { panic!("{got:?}") };
        assert_eq!(&got[2..], &[Acceptance::Recorded, Acceptance::Duplicate]);
        s.stage_reply(sa, &outbox(&a, "reply one")).expect("stage");
        let (inbox, out) = s.pending().expect("pending");
        assert_eq!(inbox.iter().map(|(s, e)| (*s, e.message.msg_id.as_str())).collect::<Vec<_>>(), vec![(sb, "m2")]);
        assert_eq!(out.len(), 1);
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen");
    assert_eq!(s.accept_batch(&[(&a, true), (&c, true)], 2_000).expect("again"), vec![Acceptance::Duplicate; 2]);
    let (inbox, out) = s.pending().expect("pending");
    assert_eq!(inbox.len(), 1);
    assert_eq!(out[0].1.reply.markdown, "reply one");
    s.delivered(&[out[0].0]).expect("delivered");
    assert!(s.pending().expect("pending").1.is_empty());
}

#[test]
fn wrong_key_fails_and_changes_nothing() {
    let t = TempStore::new();
    {
        let s = Store::open(&t.path(), &StoreKey::generate(), Retention::default()).expect("create");
        s.accept_batch(&[(&message("m1", "x"), true)], 1).expect("accept");
    }
    let before = std::fs::read(t.path()).expect("read");
    let e = Store::open(&t.path(), &StoreKey::generate(), Retention::default()).err().expect("wrong key refused");
    assert!(matches!(e, StoreError::WrongKey(_)), "{e}");
    assert!(e.to_string().contains("nothing was changed"));
    assert_eq!(std::fs::read(t.path()).expect("read"), before, "the file is untouched");
}

#[test]
fn a_store_without_its_key_check_is_refused_and_left_alone() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&message("m1", "x"), true)], 1).expect("accept");
    }
    {
        let db = Database::create(t.path()).expect("raw open");
        let txn = db.begin_write().expect("txn");
        txn.open_table(META).expect("meta").remove("key_check").expect("remove");
        txn.commit().expect("commit");
    }
    let before = std::fs::read(t.path()).expect("read");
    for k in [StoreKey::generate(), key] {
        let e = Store::open(&t.path(), &k, Retention::default()).err().expect("a store without key check is refused");
        assert!(matches!(e, StoreError::NoKeyCheck(_)) && e.to_string().contains("zhuli.redb"), "{e}");
        assert_eq!(std::fs::read(t.path()).expect("read"), before, "the file is untouched");
    }
}

/// Mark the store at `path` as a newer release would leave it: schema `version`, readable back to
/// `oldest`, with a table of its own this build does not know.
fn as_a_newer_release_left_it(path: &Path, key: &StoreKey, version: u32, oldest: u32) {
    let db = Database::create(path).expect("raw open");
    let txn = db.begin_write().expect("txn");
    {
        let sealer = Sealer::new(key);
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert("schema_version", sealer.seal("meta", b"schema_version", &version.to_be_bytes()).as_slice())
            .expect("insert");
        meta.insert("oldest_reader", sealer.seal("meta", b"oldest_reader", &oldest.to_be_bytes()).as_slice())
            .expect("insert");
        let future: TableDefinition<u64, &[u8]> = TableDefinition::new("reminders");
        txn.open_table(future)
            .expect("table")
            .insert(1, sealer.seal("reminders", b"1", b"at 9").as_slice())
            .expect("row");
    }
    txn.commit().expect("commit");
}

fn schema_of(path: &Path, key: &StoreKey) -> (u32, u32) {
    let db = Database::create(path).expect("raw open");
    let txn = db.begin_read().expect("txn");
    let meta = txn.open_table(META).expect("meta");
    let sealer = Sealer::new(key);
    let raw = read_meta(path, &sealer, &meta, "schema_version").expect("schema");
    let version = u32::from_be_bytes(raw.try_into().expect("u32"));
    (version, oldest_reader(path, &sealer, &meta, version).expect("oldest"))
}

#[test]
fn a_store_a_newer_release_changed_beyond_this_one_is_refused_untouched() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    drop(Store::open(&t.path(), &key, Retention::default()).expect("create"));
    as_a_newer_release_left_it(&t.path(), &key, SCHEMA_VERSION + 1, SCHEMA_VERSION + 1);
    let before = std::fs::read(t.path()).expect("read");
    let e = Store::open(&t.path(), &key, Retention::default()).err().expect("newer refused");
    assert!(matches!(e, StoreError::Newer { found, .. } if found == SCHEMA_VERSION + 1), "{e}");
    assert!(e.to_string().contains("restore the snapshot taken before the update"), "{e}");
    assert!(std::fs::read(t.path()).expect("read") == before, "the file is untouched");
}

/// The release before an update runs on the store the update left, when the update kept to the
/// rule (its oldest reader no newer than the release before): a fallback loses nothing.
#[test]
fn the_release_before_runs_on_a_store_a_newer_release_wrote_within_the_rule() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&message("m1", "first"), true)], 1).expect("accept");
        s.set_setting("language", "zh-CN").expect("setting");
    }
    as_a_newer_release_left_it(&t.path(), &key, SCHEMA_VERSION + 1, OLDEST_READER);
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("this release reads it");
        assert_eq!(s.setting("language").expect("read").as_deref(), Some("zh-CN"));
        s.set_setting("language", "en").expect("and writes it");
        s.accept_batch(&[(&message("m2", "second"), true)], 2).expect("accept");
    }
    // Left as the newer release wrote it: its schema, its reach and its own table.
    assert_eq!(schema_of(&t.path(), &key), (SCHEMA_VERSION + 1, OLDEST_READER));
    let db = Database::create(t.path()).expect("raw open");
    let txn = db.begin_read().expect("txn");
    let future: TableDefinition<u64, &[u8]> = TableDefinition::new("reminders");
    let row = txn.open_table(future).expect("table").get(1).expect("get").map(|v| v.value().to_vec());
    assert_eq!(
        Sealer::new(&key).open("reminders", b"1", &row.expect("the newer table is kept")).expect("open"),
        b"at 9"
    );
    drop(txn);
    drop(db);
    // Its rekey is the newer release's to do: tables this one does not know would keep the old key.
    let s = Store::open(&t.path(), &key, Retention::default()).expect("open");
    let Err(e) = s.rekey(&StoreKey::generate()) else { panic!("rekey of a newer store went ahead") };
    assert!(matches!(e, StoreError::Newer { .. }), "{e}");
    // A store this build writes says how far back it reads.
    let fresh = TempStore::new();
    drop(Store::open(&fresh.path(), &key, Retention::default()).expect("create"));
    assert_eq!(schema_of(&fresh.path(), &key), (SCHEMA_VERSION, OLDEST_READER));
    assert!(readable(4, 5, 4) && readable(4, 3, 3) && !readable(4, 5, 5));
}

#[test]
fn tampered_values_are_detected() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&message("m1", "first"), true), (&message("m2", "second"), true)], 1).expect("accept");
    }
    {
        // Move the sealed value of one inbox entry onto another's key.
        let db = Database::create(t.path()).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut inbox = txn.open_table(INBOX).expect("inbox");
            let keys: Vec<u64> = inbox.iter().expect("iter").map(|r| r.expect("row").0.value()).collect();
            let v = inbox.get(keys[0]).expect("get").expect("value").value().to_vec();
            inbox.insert(keys[1], v.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("key still right");
    let e = s.pending().expect_err("tampering detected");
    assert!(matches!(e, StoreError::Sealed { source: SealError::Tampered { table: "inbox" }, .. }), "{e}");
}

#[test]
fn truncated_or_garbage_files_give_errors_not_panics() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        for i in 0..50 {
            s.accept_batch(&[(&message(&format!("m{i}"), "x"), true)], 1).expect("accept");
        }
    }
    let full = std::fs::read(t.path()).expect("read");
    for cut in [0usize, 1, 100, 4096, full.len() / 2] {
        std::fs::write(t.path(), &full[..cut.min(full.len())]).expect("truncate");
        let r = Store::open(&t.path(), &key, Retention::default()).and_then(|s| s.pending().map(|_| ()));
        let e = r.err().unwrap_or_else(|| panic!("a store cut at {cut} bytes opened as if nothing happened"));
        assert!(e.to_string().contains("zhuli.redb"), "the error names the file: {e}");
    }
    std::fs::write(t.path(), vec![0x5au8; 8192]).expect("garbage");
    assert!(Store::open(&t.path(), &key, Retention::default()).is_err());
}

#[test]
fn message_text_and_identifiers_never_reach_the_file_in_the_clear() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let text = "the merger closes on Friday at 9";
    let secret_setting = "sk-live-0123456789abcdef";
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        let m = message("msgid-visible-123", text);
        let got = s.accept_batch(&[(&m, true)], 1).expect("accept");
        let Acceptance::Queued(seq) = got[0] else { panic!() };
        s.stage_reply(seq, &outbox(&m, text)).expect("stage");
        s.append_turn(&m.conversation_id, &Turn { role: Role::User, text: text.into(), at_ms: 1 }).expect("turn");
        s.set_setting("llm_api_key", secret_setting).expect("setting");
    }
    let bytes = std::fs::read(t.path()).expect("read");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    for needle in [
        text.as_bytes(),
        secret_setting.as_bytes(),
        b"msgid-visible-123",
        b"cid-secret-chat",
        b"Han Meimei",
        &key.bytes()[..],
    ] {
        assert!(!contains(needle), "{:?} found in the store file", String::from_utf8_lossy(needle));
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen");
    assert_eq!(s.setting("llm_api_key").expect("get").as_deref(), Some(secret_setting));
}

#[test]
fn history_is_bounded_by_turns_and_bytes() {
    let t = TempStore::new();
    let retention = Retention { history_turns: 5, history_bytes: 600, ..Retention::default() };
    let s = Store::open(&t.path(), &StoreKey::generate(), retention).expect("create");
    for i in 0..12 {
        s.append_turn("c1", &Turn { role: Role::User, text: format!("turn {i}"), at_ms: i }).expect("turn");
    }
    let h = s.history("c1").expect("history");
    assert_eq!(
        h.iter().map(|t| t.text.as_str()).collect::<Vec<_>>(),
        ["turn 7", "turn 8", "turn 9", "turn 10", "turn 11"]
    );
    s.append_turn("c1", &Turn { role: Role::Assistant, text: "x".repeat(500), at_ms: 99 }).expect("big turn");
    let h = s.history("c1").expect("history");
    assert!(h.len() < 5 && h.last().is_some_and(|t| t.role == Role::Assistant), "{}", h.len());
    assert!(s.history("c2").expect("other chat").is_empty());
}

#[test]
fn pruning_forgets_expired_ids_in_bounded_steps() {
    let t = TempStore::new();
    let retention = Retention { processed_ms: 1_000, ..Retention::default() };
    let s = Store::open(&t.path(), &StoreKey::generate(), retention).expect("create");
    let msgs: Vec<RobotMessage> = (0..25).map(|i| message(&format!("m{i}"), "x")).collect();
    let batch: Vec<(&RobotMessage, bool)> = msgs.iter().map(|m| (m, false)).collect();
    s.accept_batch(&batch, 0).expect("accept");
    assert_eq!(s.prune(500, 10).expect("prune"), 0, "nothing is due yet");
    assert_eq!(s.prune(2_000, 10).expect("prune"), 10);
    assert_eq!(s.prune(2_000, 10).expect("prune"), 10);
    assert_eq!(s.prune(2_000, 10).expect("prune"), 5);
    assert_eq!(
        s.accept_batch(&[(&msgs[0], true)], 3_000).expect("again")[0],
        Acceptance::Queued(1),
        "forgotten ids are new again"
    );
}

#[test]
fn undo_journal_is_bounded_and_pops_newest_first() {
    let t = TempStore::new();
    let s = Store::open(&t.path(), &StoreKey::generate(), Retention { undo_entries: 3, ..Retention::default() })
        .expect("create");
    for i in 0..5 {
        let e = UndoEntry {
            tool: "files".into(),
            user: "u".into(),
            description: format!("op {i}"),
            payload: vec![i],
            at_ms: 0,
        };
        s.push_undo(&e).expect("push");
    }
    let mut popped = Vec::new();
    while let Some((_, e)) = s.pop_undo().expect("pop") {
        popped.push(e.description);
    }
    assert_eq!(popped, ["op 4", "op 3", "op 2"]);
}

#[test]
fn rekey_reseals_everything_under_the_new_key() {
    let t = TempStore::new();
    let (old, new) = (StoreKey::generate(), StoreKey::generate());
    let m = message("m1", "keep me");
    {
        let s = Store::open(&t.path(), &old, Retention::default()).expect("create");
        s.accept_batch(&[(&m, true)], 1).expect("accept");
        s.append_turn("c", &Turn { role: Role::User, text: "hi".into(), at_ms: 1 }).expect("turn");
        s.set_setting("admin", "staff-1").expect("setting");
        let r = s.rekey(&new).expect("rekey");
        assert!(r.resealed >= 8, "meta, processed, inbox, history, conversations and settings values: {r:?}");
    }
    assert!(matches!(Store::open(&t.path(), &old, Retention::default()), Err(StoreError::WrongKey(_))));
    let s = Store::open(&t.path(), &new, Retention::default()).expect("new key opens");
    assert_eq!(s.pending().expect("pending").0[0].1.message, m);
    assert_eq!(s.history("c").expect("history").len(), 1);
    assert_eq!(s.setting("admin").expect("setting").as_deref(), Some("staff-1"));
    assert_eq!(s.accept_batch(&[(&m, true)], 2).expect("again")[0], Acceptance::Duplicate, "keyed hashes still match");
}

#[test]
fn older_schema_is_migrated_in_place() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let m = message("m1", "from the old days");
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&m, true)], 1).expect("accept");
    }
    // Turn the file into what schema 1 wrote: no store_id, version 1.
    {
        let db = Database::create(t.path()).expect("raw open");
        let txn = db.begin_write().expect("txn");
        {
            let mut meta = txn.open_table(META).expect("meta");
            meta.remove("store_id").expect("remove");
            let v1 = Sealer::new(&key).seal("meta", b"schema_version", &1u32.to_be_bytes());
            meta.insert("schema_version", v1.as_slice()).expect("insert");
        }
        txn.commit().expect("commit");
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("migrates");
    assert_eq!(s.store_id().expect("store id").len(), 32);
    assert_eq!(s.pending().expect("pending").0[0].1.message, m, "data survives the migration");
    drop(s);
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen");
    let id = s.store_id().expect("id");
    drop(s);
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen again");
    assert_eq!(s.store_id().expect("id"), id, "migrated once, not at every open");
}

#[test]
fn schema_2_outbox_entries_gain_their_card_field() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let m = message("m2", "staged before the upgrade");
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&m, true)], 1).expect("accept");
        let seq = s.pending().expect("pending").0[0].0;
        s.stage_reply(seq, &outbox(&m, "the answer")).expect("stage");
    }
    // Rewrite the outbox entry as schema 2 encoded it (no `card`), and the version to 2.
    {
        let db = Database::create(t.path()).expect("raw open");
        let sealer = Sealer::new(&key);
        let txn = db.begin_write().expect("txn");
        {
            let mut table = txn.open_table(OUTBOX).expect("outbox");
            let seq = table.first().expect("first").map(|(k, _)| k.value()).expect("one entry");
            let old =
                postcard::to_allocvec(&(m.msg_id.clone(), Reply::to(&m, "t", "the answer"), 1i64)).expect("encode");
            table.insert(seq, sealer.seal("outbox", &u64_key(seq), &old).as_slice()).expect("insert");
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("schema_version", sealer.seal("meta", b"schema_version", &2u32.to_be_bytes()).as_slice())
                .expect("insert");
        }
        txn.commit().expect("commit");
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("migrates");
    let (_, out) = s.pending().expect("pending");
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].1.reply.markdown, "the answer");
    assert_eq!(out[0].1.card, None);
}

#[test]
fn cached_values_expire_are_sealed_and_go_with_a_clear_or_a_rekey() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
    s.cache_put("people:staff-42", "Zhang Xiaoming, finance-secret-title", 1_000).expect("put");
    assert_eq!(
        s.cache_get("people:staff-42", 999).expect("get").as_deref(),
        Some("Zhang Xiaoming, finance-secret-title")
    );
    assert_eq!(s.cache_get("people:staff-42", 1_000).expect("get"), None, "expired at its time");
    assert_eq!(s.cache_get("people:nobody", 0).expect("get"), None);
    drop(s);
    let bytes = std::fs::read(t.path()).expect("file");
    for needle in [&b"finance-secret-title"[..], b"staff-42"] {
        assert!(!bytes.windows(needle.len()).any(|w| w == needle), "cache in the clear");
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen");
    assert!(s.cache_get("people:staff-42", 0).expect("get").is_some(), "survives a restart");
    s.cache_put("people:b", "B", 5_000).expect("put");
    assert_eq!(s.cache_clear().expect("clear"), 2);
    assert_eq!(s.cache_get("people:b", 0).expect("get"), None);
    s.cache_put("people:c", "C", 5_000).expect("put");
    let new = StoreKey::generate();
    s.rekey(&new).expect("rekey");
    let s = Store::open(&t.path(), &new, Retention::default()).expect("new key");
    assert_eq!(s.cache_get("people:c", 0).expect("get"), None, "a rekey empties the cache");
}

/// Every keyed hash in the file at `path`: processed msgIds (and their expiry index), history
/// and its conversation ids, cache names.
fn keyed_hashes(path: &Path) -> std::collections::HashSet<Hashed> {
    let db = Database::create(path).expect("raw open");
    let txn = db.begin_read().expect("txn");
    let mut out = std::collections::HashSet::new();
    for row in txn.open_table(PROCESSED).expect("processed").iter().expect("iter") {
        out.insert(row.expect("row").0.value());
    }
    for row in txn.open_table(PROCESSED_EXPIRY).expect("expiry").iter().expect("iter") {
        out.insert(row.expect("row").0.value().1);
    }
    for row in txn.open_table(HISTORY).expect("history").iter().expect("iter") {
        out.insert(row.expect("row").0.value().0);
    }
    for row in txn.open_table(CACHE).expect("cache").iter().expect("iter") {
        out.insert(row.expect("row").0.value());
    }
    for row in txn.open_table(CONVERSATIONS).expect("conversations").iter().expect("iter") {
        out.insert(row.expect("row").0.value());
    }
    out
}

fn index_secret(path: &Path, key: &StoreKey) -> Vec<u8> {
    let db = Database::create(path).expect("raw open");
    let txn = db.begin_read().expect("txn");
    let meta = txn.open_table(META).expect("meta");
    read_meta(path, &Sealer::new(key), &meta, "index_secret").expect("index secret")
}

#[test]
fn rekey_rotates_the_index_secret_and_rehashes_every_keyed_row() {
    let t = TempStore::new();
    let (old, new) = (StoreKey::generate(), StoreKey::generate());
    let (answered, recorded) = (message("m-answered", "question"), message("m-recorded", "chatter"));
    {
        let s = Store::open(&t.path(), &old, Retention::default()).expect("create");
        s.accept_batch(&[(&answered, true), (&recorded, false)], 1).expect("accept");
        for (conversation, text) in [("cid-one", "first"), ("cid-two", "second")] {
            s.append_turn(conversation, &Turn { role: Role::User, text: text.into(), at_ms: 1 }).expect("turn");
        }
        s.cache_put("people:staff-1", "A", i64::MAX).expect("cache");
    }
    let secret_before = index_secret(&t.path(), &old);
    let hashes_before = keyed_hashes(&t.path());
    assert_eq!(hashes_before.len(), 5, "two msgIds, two conversations, one cache name");
    {
        let s = Store::open(&t.path(), &old, Retention::default()).expect("reopen");
        s.rekey(&new).expect("rekey");
    }
    assert!(index_secret(&t.path(), &new) != secret_before, "the index secret was rotated");
    let hashes_after = keyed_hashes(&t.path());
    assert!(hashes_after.is_disjoint(&hashes_before), "a hash from before the rekey is still a key");
    assert_eq!(hashes_after.len(), 4, "two msgIds and two conversations, re-hashed; the cache emptied");
    let s = Store::open(&t.path(), &new, Retention::default()).expect("new key opens");
    assert_eq!(
        s.accept_batch(&[(&answered, true), (&recorded, true)], 2).expect("again"),
        vec![Acceptance::Duplicate; 2],
        "msgIds recorded before the rekey are still recognised"
    );
    assert_eq!(s.history("cid-one").expect("history")[0].text, "first");
    assert_eq!(s.history("cid-two").expect("history")[0].text, "second");
}

#[test]
fn a_rekey_after_the_schema_4_upgrade_drops_only_rows_without_ids_and_counts_them() {
    let t = TempStore::new();
    let (key, new) = (StoreKey::generate(), StoreKey::generate());
    let (before, after) = (message("m-before-upgrade", "x"), message("m-after-upgrade", "y"));
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.accept_batch(&[(&before, false)], 1).expect("accept");
        s.append_turn("cid-quiet", &Turn { role: Role::User, text: "old".into(), at_ms: 1 }).expect("turn");
        s.append_turn("cid-busy", &Turn { role: Role::User, text: "old too".into(), at_ms: 1 }).expect("turn");
    }
    // Turn the file into what schema 3 wrote: processed values are the bare expiry, and no
    // conversation ids are kept.
    {
        let db = Database::create(t.path()).expect("raw open");
        let sealer = Sealer::new(&key);
        let txn = db.begin_write().expect("txn");
        {
            let mut processed = txn.open_table(PROCESSED).expect("processed");
            let rows: Vec<Hashed> = processed.iter().expect("iter").map(|r| r.expect("row").0.value()).collect();
            for h in rows {
                let old = postcard::to_allocvec(&3_600_001u64).expect("encode");
                processed.insert(h, sealer.seal("processed", &h, &old).as_slice()).expect("insert");
            }
            let mut meta = txn.open_table(META).expect("meta");
            meta.insert("schema_version", sealer.seal("meta", b"schema_version", &3u32.to_be_bytes()).as_slice())
                .expect("insert");
        }
        txn.delete_table(CONVERSATIONS).expect("delete");
        txn.commit().expect("commit");
    }
    let s = Store::open(&t.path(), &key, Retention::default()).expect("migrates");
    assert_eq!(s.accept_batch(&[(&before, true)], 2).expect("again")[0], Acceptance::Duplicate, "still remembered");
    s.accept_batch(&[(&after, false)], 2).expect("accept");
    // Writing to a conversation after the upgrade teaches the store its id.
    s.append_turn("cid-busy", &Turn { role: Role::Assistant, text: "new".into(), at_ms: 2 }).expect("turn");
    let r = s.rekey(&new).expect("rekey");
    assert_eq!((r.processed_rehashed, r.processed_dropped), (1, 1), "{r:?}");
    assert_eq!((r.conversations_rehashed, r.history_dropped), (1, 1), "{r:?}");
    let s = Store::open(&t.path(), &new, Retention::default()).expect("new key");
    let got = s.accept_batch(&[(&after, true), (&before, true)], 3).expect("again");
    assert!(
        matches!(got[..], [Acceptance::Duplicate, Acceptance::Queued(_)]),
        "the id recorded after the upgrade is remembered, the one from before is new again: {got:?}"
    );
    assert_eq!(s.history("cid-busy").expect("history").len(), 2);
    assert!(s.history("cid-quiet").expect("history").is_empty(), "dropped, as counted");
}

/// Rewrite a snapshot's manifest through `edit` (as whoever holds the backup medium could).
fn edit_manifest(snapshot: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = snapshot.join(backup::MANIFEST);
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).expect("manifest")).expect("json");
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).expect("json")).expect("write manifest");
}

/// Make the manifest's size and checksum fit the snapshot's file again.
fn refit_checksum(snapshot: &Path) {
    let bytes = std::fs::read(snapshot.join(backup::SNAPSHOT_FILE)).expect("snapshot file");
    let sha: String =
        ring::digest::digest(&ring::digest::SHA256, &bytes).as_ref().iter().map(|b| format!("{b:02x}")).collect();
    edit_manifest(snapshot, |m| {
        m["sha256"] = sha.into();
        m["bytes"] = bytes.len().into();
    });
}

#[test]
fn an_edited_manifest_is_refused() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    Store::open(&t.path(), &key, Retention::default()).expect("create").set_setting("a", "1").expect("setting");
    let (snap, _) = backup::backup(&t.path(), &key, &t.dir.join("b")).expect("backup");
    backup::verify(&snap, &key).expect("a fresh snapshot verifies");
    let original = std::fs::read(snap.join(backup::MANIFEST)).expect("manifest");
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 2] = [
        ("time", |m| m["created_at_ms"] = (m["created_at_ms"].as_i64().unwrap_or(0) + 86_400_000).into()),
        ("sequence", |m| m["seq"] = (m["seq"].as_u64().unwrap_or(0) + 5).into()),
    ];
    for (what, edit) in edits {
        std::fs::write(snap.join(backup::MANIFEST), &original).expect("put back");
        edit_manifest(&snap, edit);
        let e = backup::verify(&snap, &key).err().unwrap_or_else(|| panic!("a manifest with another {what} verified"));
        assert!(matches!(e, backup::BackupError::Unauthentic(_)), "{what}: {e}");
        let e = backup::restore(&snap, &t.path(), &key).err().unwrap_or_else(|| panic!("restored with another {what}"));
        assert!(matches!(e, backup::BackupError::Unauthentic(_)), "{what}: {e}");
    }
}

#[test]
fn another_stores_snapshot_is_refused_even_under_the_same_key() {
    let (a, b) = (TempStore::new(), TempStore::new());
    let key = StoreKey::generate();
    Store::open(&a.path(), &key, Retention::default()).expect("store a").set_setting("who", "a").expect("setting");
    Store::open(&b.path(), &key, Retention::default()).expect("store b").set_setting("who", "b").expect("setting");
    let (snap_a, _) = backup::backup(&a.path(), &key, &a.dir.join("b")).expect("backup a");
    let (snap_b, _) = backup::backup(&b.path(), &key, &b.dir.join("b")).expect("backup b");

    // A's file in B's snapshot, its checksum made to fit.
    std::fs::copy(snap_a.join(backup::SNAPSHOT_FILE), snap_b.join(backup::SNAPSHOT_FILE)).expect("swap");
    refit_checksum(&snap_b);
    let e = backup::verify(&snap_b, &key).expect_err("a swapped file verified");
    assert!(matches!(e, backup::BackupError::Unauthentic(_)), "{e}");

    // A's whole snapshot restored over store B.
    let live = std::fs::read(b.path()).expect("live store");
    let e = backup::restore(&snap_a, &b.path(), &key).expect_err("another store's snapshot restored");
    assert!(
        matches!(e, backup::BackupError::OtherStore { .. }) && e.to_string().contains("move the live store"),
        "{e}"
    );
    assert_eq!(std::fs::read(b.path()).expect("live store"), live, "the live store is untouched");
    let s = Store::open(&b.path(), &key, Retention::default()).expect("store b");
    assert_eq!(s.setting("who").expect("setting").as_deref(), Some("b"));
}

#[test]
fn a_value_spliced_from_an_older_snapshot_is_refused() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.set_setting("admin", "staff-old").expect("setting");
    }
    let (first, _) = backup::backup(&t.path(), &key, &t.dir.join("b1")).expect("backup 1");
    Store::open(&t.path(), &key, Retention::default()).expect("open").set_setting("admin", "staff-new").expect("set");
    let (second, _) = backup::backup(&t.path(), &key, &t.dir.join("b2")).expect("backup 2");
    // The old value authenticates at its key in any file sealed with this key: splice it.
    let old_value = {
        let db = Database::create(first.join(backup::SNAPSHOT_FILE)).expect("snapshot 1");
        let txn = db.begin_read().expect("txn");
        txn.open_table(SETTINGS).expect("settings").get("admin").expect("get").expect("row").value().to_vec()
    };
    {
        let db = Database::create(second.join(backup::SNAPSHOT_FILE)).expect("snapshot 2");
        let txn = db.begin_write().expect("txn");
        txn.open_table(SETTINGS).expect("settings").insert("admin", old_value.as_slice()).expect("splice");
        txn.commit().expect("commit");
    }
    let e = backup::verify(&second, &key).expect_err("a spliced snapshot with its own checksum verified");
    assert!(matches!(e, backup::BackupError::Checksum(_)), "{e}");
    refit_checksum(&second);
    let e = backup::verify(&second, &key).expect_err("a spliced snapshot with a refitted checksum verified");
    assert!(matches!(e, backup::BackupError::Unauthentic(_)), "{e}");
    let e = backup::restore(&second, &t.path(), &key).expect_err("a spliced snapshot restored");
    assert!(matches!(e, backup::BackupError::Unauthentic(_)), "{e}");
    let s = Store::open(&t.path(), &key, Retention::default()).expect("open");
    assert_eq!(s.setting("admin").expect("setting").as_deref(), Some("staff-new"), "the live store is untouched");
}

#[test]
fn snapshots_are_numbered_per_store_and_a_good_one_verifies_and_restores() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let to = t.dir.join("backups");
    let id = {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        s.set_setting("admin", "staff-1").expect("setting");
        s.store_id().expect("id")
    };
    let (first, m1) = backup::backup(&t.path(), &key, &to).expect("backup 1");
    let (_, m2) = backup::backup(&t.path(), &key, &to).expect("backup 2");
    assert_eq!((m1.seq, m2.seq, m1.store_id.as_str()), (1, 2, id.as_str()));
    assert_eq!(backup::verify(&first, &key).expect("verify"), backup::Verified::Bound(m1.clone()));

    Store::open(&t.path(), &key, Retention::default()).expect("open").set_setting("admin", "staff-2").expect("set");
    let (restored, kept) = backup::restore(&first, &t.path(), &key).expect("restore");
    assert_eq!(restored, m1);
    assert!(kept.is_some_and(|k| k.exists()), "the replaced store is kept");
    let s = Store::open(&t.path(), &key, Retention::default()).expect("restored store opens");
    assert_eq!(s.setting("admin").expect("setting").as_deref(), Some("staff-1"));
    drop(s);
    let (_, m3) = backup::backup(&t.path(), &key, &to).expect("backup after the restore");
    assert_eq!(m3.seq, 3, "a restore does not turn the count back");

    // A replacement box (no counter of its own) restored from the newest snapshot goes on from
    // its number, so its snapshots sort after the dead box's.
    let new_box = TempStore::new();
    let (newest, _) = backup::backup(&t.path(), &key, &to).expect("backup 4");
    backup::restore(&newest, &new_box.path(), &key).expect("restore on the new box");
    let (_, m5) = backup::backup(&new_box.path(), &key, &new_box.dir.join("backups")).expect("backup there");
    assert_eq!((m5.seq, m5.store_id.as_str()), (5, id.as_str()));

    // Another store in its place (the old one moved away) counts on its own.
    std::fs::rename(t.path(), t.dir.join("moved.redb")).expect("move away");
    let other = Store::open(&t.path(), &key, Retention::default()).expect("new store").store_id().expect("id");
    let (_, m) = backup::backup(&t.path(), &key, &to).expect("backup of the new store");
    assert_eq!((m.seq, m.store_id), (1, other));

    // A snapshot in the old, unsealed format: checked, never restored.
    edit_manifest(&first, |m| {
        let o = m.as_object_mut().expect("object");
        o.insert("format".into(), "zhuli-backup/1".into());
        for field in ["seq", "key_check", "seal"] {
            o.remove(field);
        }
    });
    assert!(
        matches!(backup::verify(&first, &key).expect("verify"), backup::Verified::Legacy { values, .. } if values > 3)
    );
    let e = backup::restore(&first, &t.path(), &key).expect_err("an old-format snapshot is not restored");
    assert!(matches!(e, backup::BackupError::Legacy(_)), "{e}");
}

#[test]
fn a_reply_that_answers_several_messages_forgets_them_all_in_its_commit() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let (a, b, c) = (message("m1", "one"), message("m2", "two"), message("m3", "three"));
    {
        let s = Store::open(&t.path(), &key, Retention::default()).expect("create");
        let got = s.accept_batch(&[(&a, true), (&b, true), (&c, true)], 1_000).expect("accept");
        let seqs: Vec<u64> =
            got.iter().map(|g| if let Acceptance::Queued(s) = g { *s } else { panic!("{got:?}") }).collect();
        // The reply to m2 answers m1 too; m3 still waits.
        let entry = outbox(&b, "both");
        s.write(&[WriteOp::Stage { seq: seqs[1], entry: &entry, also: &seqs[..1] }]).expect("stage");
    }
    // As a restart finds it: one staged reply, only m3 to answer.
    let s = Store::open(&t.path(), &key, Retention::default()).expect("reopen");
    let (inbox, out) = s.pending().expect("pending");
    assert_eq!(inbox.iter().map(|(_, e)| e.message.msg_id.as_str()).collect::<Vec<_>>(), vec!["m3"]);
    assert_eq!(out.iter().map(|(_, e)| e.msg_id.as_str()).collect::<Vec<_>>(), vec!["m2"]);
}

fn a_job(origin: &str) -> crate::schedule::Job {
    crate::schedule::Job {
        origin: origin.into(),
        owner: "staff-7".into(),
        nick: "Han Meimei".into(),
        conversation_id: "cid-secret-chat".into(),
        group: false,
        action: crate::schedule::Action::Remind("医院复查".into()),
        rule: crate::schedule::Rule::Daily { minute: 540 },
        next_ms: 1_000,
        created_ms: 0,
        paused: None,
        fired: 0,
        missed: 0,
        ended_ms: None,
    }
}

#[test]
fn jobs_are_sealed_made_once_per_message_and_fired_only_as_read() {
    let t = TempStore::new();
    let key = StoreKey::generate();
    let store = Store::open(&t.path(), &key, Retention::default()).expect("open");
    let job = a_job("msg-1");
    let (id, new) = store.add_job(&job).expect("add");
    assert!(new);
    // The same message answered again after a crash finds the job it made, even once ended.
    assert_eq!(store.add_job(&job).expect("again"), (id, false));
    let ended = crate::schedule::Job { ended_ms: Some(5), ..job.clone() };
    store
        .update_job(id, |j| {
            *j = ended.clone();
            true
        })
        .expect("end");
    assert_eq!(store.add_job(&job).expect("after the end"), (id, false));
    // Ids are not reused after a removal.
    let (second, _) = store.add_job(&a_job("msg-2")).expect("second");
    store.remove_job(second).expect("remove");
    let (third, _) = store.add_job(&a_job("msg-3")).expect("third");
    assert!(third > second, "{third} after {second}");

    // Firing applies only to the job as the scheduler read it.
    let read = store.job(third).expect("read").expect("there");
    let paused = crate::schedule::Job { paused: Some(crate::schedule::Paused::ByPerson), ..read.clone() };
    store
        .update_job(third, |j| {
            *j = paused.clone();
            true
        })
        .expect("pause");
    let after = crate::schedule::Job { next_ms: 2_000, ..read.clone() };
    let fired = message("zhuli-job:3:1000:r", "⏰ 医院复查");
    assert_eq!(store.fire_job(third, &read, Some(&after), std::slice::from_ref(&fired), 1_500).expect("fire"), None);
    assert_eq!(store.job(third).expect("read").expect("there"), paused, "the pause stands");
    assert!(store.pending().expect("pending").0.is_empty(), "nothing entered the inbox");
    let out = store.fire_job(third, &paused, Some(&after), std::slice::from_ref(&fired), 1_500).expect("fire");
    assert!(matches!(out.as_deref(), Some([Some(_)])), "{out:?}");
    let again = store.fire_job(third, &after, Some(&after), std::slice::from_ref(&fired), 1_600).expect("again");
    assert_eq!(again, Some(vec![None]), "an occurrence's message is recorded once");
    drop(store);

    // The text is sealed in the file.
    let bytes = std::fs::read(t.path()).expect("file");
    assert!(memchr::memmem::find(&bytes, "医院复查".as_bytes()).is_none());
}
