//! Opaque QueryMessages cursors. A cursor names the last message of a page by its keyset
//! position (timestamp in microseconds, message_id) and is bound to its (tenant, session) by a
//! fingerprint, so a cursor replayed against another session is refused instead of silently
//! paging the wrong history. Cursors grant nothing: every query is still scoped by tenant.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use flare_storage_common::message::{EARLIEST_STORABLE, check_id};

const VERSION: &str = "1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub timestamp: DateTime<Utc>,
    pub message_id: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CursorError {
    #[error("malformed cursor")]
    Malformed,
    #[error("cursor belongs to another session")]
    OtherSession,
}

impl Cursor {
    pub fn encode(&self, tenant_id: &str, session_id: &str) -> String {
        let raw = format!(
            "{VERSION}:{:016x}:{}:{}",
            fingerprint(tenant_id, session_id),
            self.timestamp.timestamp_micros(),
            self.message_id
        );
        URL_SAFE_NO_PAD.encode(raw)
    }

    pub fn decode(text: &str, tenant_id: &str, session_id: &str) -> Result<Self, CursorError> {
        // Bounded before decoding: a cursor is never longer than this.
        if text.len() > 256 {
            return Err(CursorError::Malformed);
        }
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| CursorError::Malformed)?;
        let raw = String::from_utf8(raw).map_err(|_| CursorError::Malformed)?;
        let mut parts = raw.splitn(4, ':');
        let (Some(VERSION), Some(print), Some(micros), Some(message_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(CursorError::Malformed);
        };
        let print = u64::from_str_radix(print, 16).map_err(|_| CursorError::Malformed)?;
        let micros: i64 = micros.parse().map_err(|_| CursorError::Malformed)?;
        // Crafted cursors reach the databases: only what a real one can carry passes.
        let timestamp = DateTime::from_timestamp_micros(micros)
            .filter(|timestamp| *timestamp >= EARLIEST_STORABLE)
            .ok_or(CursorError::Malformed)?;
        if check_id("message_id", message_id, true).is_err() {
            return Err(CursorError::Malformed);
        }
        if print != fingerprint(tenant_id, session_id) {
            return Err(CursorError::OtherSession);
        }
        Ok(Self { timestamp, message_id: message_id.to_owned() })
    }
}

/// FNV-1a over tenant and session, separated so ("ab","c") and ("a","bc") differ.
fn fingerprint(tenant_id: &str, session_id: &str) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in tenant_id.bytes().chain([0xff]).chain(session_id.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor {
            timestamp: DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid"),
            message_id: "msg:with:colons".into(),
        }
    }

    #[test]
    fn round_trips() {
        let encoded = cursor().encode("t", "s");
        assert_eq!(Cursor::decode(&encoded, "t", "s"), Ok(cursor()));
    }

    #[test]
    fn refuses_other_sessions_and_tenants() {
        let encoded = cursor().encode("t", "s");
        assert_eq!(Cursor::decode(&encoded, "t", "other"), Err(CursorError::OtherSession));
        assert_eq!(Cursor::decode(&encoded, "t2", "s"), Err(CursorError::OtherSession));
        assert_ne!(fingerprint("ab", "c"), fingerprint("a", "bc"));
    }

    #[test]
    fn refuses_garbage() {
        for garbage in ["", "!!!", "bm90IGEgY3Vyc29y", &URL_SAFE_NO_PAD.encode("1:zz:1:m"), &"A".repeat(300)] {
            assert_eq!(Cursor::decode(garbage, "t", "s"), Err(CursorError::Malformed), "{garbage}");
        }
        let print = fingerprint("t", "s");
        let crafted = [
            format!("1:{print:016x}:5:"),
            format!("1:{print:016x}:5:id\0with nul"),
            format!("1:{print:016x}:5:{}", "x".repeat(65)),
            format!("1:{print:016x}:-210866803200000001:m"),
        ];
        for raw in crafted {
            assert_eq!(Cursor::decode(&URL_SAFE_NO_PAD.encode(&raw), "t", "s"), Err(CursorError::Malformed), "{raw:?}");
        }
    }
}
