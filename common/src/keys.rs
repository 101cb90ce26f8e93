//! The Redis key layout that writer and reader agree on.
//!
//! Every key of one session shares the Redis Cluster hash tag `{<len>:<tenant>:<session>}`, so
//! the scripts that touch several of them run on one node. The tenant is length-prefixed so
//! no (tenant, session) pair can spell the key of another: `("a:b", "c")` and `("a", "b:c")`
//! give different tags.

/// `floor_us` of a hot window that holds every message of its session.
pub const HOT_FLOOR_ALL: i64 = i64::MIN / 2;

/// Keys of one session of one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionKeys {
    tag: String,
}

impl SessionKeys {
    pub fn new(tenant_id: &str, session_id: &str) -> Self {
        Self { tag: format!("fs:{{{}:{tenant_id}:{session_id}}}", tenant_id.len()) }
    }

    /// ZSET of the newest messages of the session: member message_id, score seq.
    pub fn hot_index(&self) -> String {
        format!("{}:hot", self.tag)
    }

    /// ZSET of the same messages: member message_id, score timestamp in microseconds since the
    /// epoch (exact in a double until the year 2255). Equal scores order by message_id, like
    /// the databases' (timestamp, message_id) order.
    pub fn hot_time_index(&self) -> String {
        format!("{}:hottime", self.tag)
    }

    /// HASH describing how complete the hot window is: field `floor_us` — every message of
    /// the session with a timestamp above it is in the window ([`HOT_FLOOR_ALL`]: the whole
    /// session is). No such key: completeness unknown (the window may hold only the newest
    /// writes), so readers go to the databases and fill the window.
    pub fn hot_meta(&self) -> String {
        format!("{}:hotmeta", self.tag)
    }

    /// HASH message_id → protobuf `Message` of the messages in [`Self::hot_index`].
    pub fn hot_bodies(&self) -> String {
        format!("{}:body", self.tag)
    }

    /// HASH message_id → what happened to a message after it was cached: `deleted`,
    /// `recalled:<µs>` or `burn:<µs>`. Readers lay it over the window at read time, so a
    /// window (re)written with an older body never brings a message back. It outlives the
    /// window: every write of the window refreshes its expiry too.
    pub fn gone(&self) -> String {
        format!("{}:gone", self.tag)
    }

    /// HASH of per-user views of the session: `loaded` once filled from the database,
    /// `clear:<user>` → µs watermark, [`hidden_view_field`] → 1. Only ever grows (hides and
    /// higher watermarks), so loads and commands merge in any order. (Named `…:userviews`
    /// since hide fields carry the user's length; the `…:views` of earlier versions expire.)
    pub fn views(&self) -> String {
        format!("{}:userviews", self.tag)
    }

    /// STRING: the session's ticket counter. A command that changes a cached message takes a
    /// ticket after its database write and before it reads the message back, and a window fill
    /// reads the counter before its database read: a read that follows a higher ticket is at
    /// least as new, so [`Self::hot_stamps`] keeps the newest body. Raised to the clock (µs)
    /// whenever behind it, so tickets follow the clock and never repeat after it expires.
    pub fn tickets(&self) -> String {
        format!("{}:ver", self.tag)
    }

    /// HASH message_id → the ticket (see [`Self::tickets`]) after which the cached body of the
    /// message was read (or, for a message the window does not list, after which a command
    /// changed it); a body read earlier does not replace it. Trimmed with the bodies; fills drop
    /// those of unlisted messages once a minute old.
    pub fn hot_stamps(&self) -> String {
        format!("{}:stamp", self.tag)
    }

    /// HASH of the session's state: `last_seq`, `last_message_id`, `last_sender_id`,
    /// `last_message_type`, `last_content_type`, `last_message_ts` (epoch ms) and
    /// `message_count` (seqs handed out). Written once per session per writer batch, whatever
    /// the session's size; put back by the reader from the newest stored message when missing.
    pub fn state(&self) -> String {
        format!("{}:state", self.tag)
    }

    /// HASH user_id → the user's read seq in the session: every message at or below it is
    /// read. Moved forward only, by the user's own messages (the writer) and read commands
    /// (the reader); unread counts are derived from it, never counted per member.
    pub fn reads(&self) -> String {
        format!("{}:reads", self.tag)
    }

    /// STRING: the last seq handed out in the session. The one session key that does not
    /// expire: a seq must never be handed out twice, and once retention has deleted a
    /// session's newest messages (they may be dated back) the databases no longer know the
    /// highest seq handed out, so a counter seeded again from them could repeat seqs that
    /// clients and `read_positions` still hold. About 110 bytes per session ever written.
    pub fn seq_counter(&self) -> String {
        format!("{}:seq", self.tag)
    }

    /// HASH message_id → seq, so a redelivered message gets its first seq back.
    pub fn seq_assigned(&self) -> String {
        format!("{}:seqof", self.tag)
    }
}

/// Field of [`SessionKeys::views`] saying `message_id` is hidden for `user_id`:
/// `hide:<len>:<user>:<message_id>` — length-prefixed, so user `a:b` hiding `c` is not user `a`
/// hiding `b:c`.
pub fn hidden_view_field(user_id: &str, message_id: &str) -> String {
    format!("hide:{}:{user_id}:{message_id}", user_id.len())
}

/// Field of [`SessionKeys::views`] holding `user_id`'s clear watermark (µs).
pub fn clear_view_field(user_id: &str) -> String {
    format!("clear:{user_id}")
}

/// The [`SessionKeys::views`] field formats above as Lua, prepended to the scripts that read
/// or merge views, so each format has this one home: `clear_field(user)`,
/// `is_clear_field(field)`, `hide_prefix(user)` (append a message id) and `LOADED` (the field
/// present once the views were loaded from the databases). Lua's `string.len` counts bytes, as
/// Rust's `str::len` does.
pub const VIEW_FIELDS_LUA: &str = r#"
local LOADED = 'loaded'
local function clear_field(user) return 'clear:' .. user end
local function is_clear_field(field) return string.sub(field, 1, 6) == 'clear:' end
local function hide_prefix(user) return 'hide:' .. string.len(user) .. ':' .. user .. ':' end
"#;

/// How long a session's state and read seqs live after they were last written (by the
/// writer, a read command, or the reader putting back what it rebuilt), in seconds: a week. Whatever expires is rebuilt from the databases when the session is next
/// read (the state from the newest message, a read seq from `read_positions` and the user's
/// newest own message), so this bounds the memory of sessions that went quiet without costing
/// a busy one anything. (The seq counter does not expire: see [`SessionKeys::seq_counter`].)
pub const SESSION_STATE_TTL_SECONDS: u64 = 7 * 24 * 3600;

/// STRING: the session a tenant's message belongs to — a fact that never changes — so a reader
/// asked for a message by id alone finds it in that session's hot window. Set by readers when a
/// database answered for the message (one key per message read by id, about 100 bytes, for
/// the hot window's TTL).
pub fn message_session(tenant_id: &str, message_id: &str) -> String {
    format!("fs:session-of:{}", document_id(tenant_id, message_id))
}

/// `_id` of a message's MongoDB document; the tenant is length-prefixed so ids cannot collide
/// across tenants.
pub fn document_id(tenant_id: &str, message_id: &str) -> String {
    format!("{}:{tenant_id}:{message_id}", tenant_id.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').expect("tag opens");
        let close = key[open..].find('}').expect("tag closes") + open;
        &key[open + 1..close]
    }

    #[test]
    fn keys_of_a_session_share_one_hash_tag() {
        let keys = SessionKeys::new("acme", "s1");
        let tag = hash_tag(&keys.hot_index()).to_owned();
        for key in [keys.hot_bodies(), keys.state(), keys.reads(), keys.seq_counter(), keys.seq_assigned()] {
            assert_eq!(hash_tag(&key), tag, "{key}");
        }
    }

    #[test]
    fn tenants_cannot_collide() {
        assert_ne!(SessionKeys::new("a:b", "c"), SessionKeys::new("a", "b:c"));
        assert_ne!(SessionKeys::new("", "4:x:y").state(), SessionKeys::new("x", "y").state());
        assert_ne!(hidden_view_field("a:b", "c"), hidden_view_field("a", "b:c"));
    }
}
