//! How free text goes into PostgreSQL, whose `text` and `jsonb` types cannot hold U+0000
//! (`invalid byte sequence for encoding "UTF8": 0x00`, `unsupported Unicode escape sequence`)
//! although a protobuf string may carry it.
//!
//! - The payload (`bytea`) keeps every message intact; readers decode it.
//! - Derived copies that are only searched or filtered on (`message_search.normal_text`, the label columns)
//!   leave U+0000 out: [`derived_copy`].
//! - JSON columns that readers return (`attributes`, `extra`, operation metadata) hold
//!   [`escape_json_value`]'s reversible form, and readers return [`unescape_json_value`]'s.
//!
//! MongoDB's strings hold U+0000, so the writer's documents keep text as sent; maps the reader
//! keeps through [`JsonStrings`] (operation metadata) are stored escaped there too, and read
//! back alike.

use std::borrow::Cow;
use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;

/// Marks an escaped JSON string: U+FFFE, a Unicode noncharacter that well-formed text does not
/// carry, then a tag. A value that itself starts with the marker is escaped too, so the
/// encoding is reversible for every string.
const ESCAPED: &str = "\u{FFFE}b64:";

/// `text` without U+0000, for copies that are searched or filtered but never returned.
pub fn derived_copy(text: &str) -> Cow<'_, str> {
    if text.contains('\0') { Cow::Owned(text.replace('\0', "")) } else { Cow::Borrowed(text) }
}

/// A JSON string value as a PostgreSQL JSON column can hold it: unchanged unless it carries
/// U+0000 (or starts with the escape marker); then the marker and the base64 of its UTF-8.
pub fn escape_json_value(value: &str) -> Cow<'_, str> {
    if value.contains('\0') || value.starts_with(ESCAPED) {
        Cow::Owned(format!("{ESCAPED}{}", STANDARD.encode(value)))
    } else {
        Cow::Borrowed(value)
    }
}

/// The value [`escape_json_value`] was given. A string that merely looks escaped but does not
/// decode stays as it is.
pub fn unescape_json_value(value: String) -> String {
    let Some(encoded) = value.strip_prefix(ESCAPED) else { return value };
    match STANDARD.decode(encoded).ok().and_then(|bytes| String::from_utf8(bytes).ok()) {
        Some(original) => original,
        None => value,
    }
}

/// A string map with every value escaped, ready to serialise into a JSON column. Keys are
/// names, which never carry control characters (`message::check_name`).
pub fn escape_json_map(map: &HashMap<String, String>) -> HashMap<&str, Cow<'_, str>> {
    map.iter().map(|(key, value)| (key.as_str(), escape_json_value(value))).collect()
}

/// A string map read from a JSON column, values unescaped.
pub fn unescape_json_map(map: HashMap<String, String>) -> HashMap<String, String> {
    map.into_iter().map(|(key, value)| (key, unescape_json_value(value))).collect()
}

/// A string map that serialises its values escaped and deserialises them unescaped: the type
/// of a map field kept in a JSON column (`sqlx::types::Json<JsonStrings>`). It holds the
/// original values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JsonStrings(pub HashMap<String, String>);

impl serde::Serialize for JsonStrings {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, value)| (key, escape_json_value(value))))
    }
}

impl<'de> serde::Deserialize<'de> for JsonStrings {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = HashMap::<String, String>::deserialize(deserializer)?;
        Ok(Self(unescape_json_map(map)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn plain_text_is_left_alone() {
        assert!(matches!(escape_json_value("你好 world"), Cow::Borrowed(_)));
        assert!(matches!(derived_copy("你好 world"), Cow::Borrowed(_)));
        assert_eq!(unescape_json_value("你好".into()), "你好");
    }

    #[test]
    fn nul_is_escaped_for_json_and_dropped_from_copies() {
        let escaped = escape_json_value("before\0after");
        assert!(!escaped.contains('\0'));
        assert_eq!(unescape_json_value(escaped.into_owned()), "before\0after");
        assert_eq!(derived_copy("before\0after\0"), "beforeafter");
    }

    #[test]
    fn values_that_look_escaped_survive_the_round_trip() {
        let lookalike = format!("{ESCAPED}aGk=");
        let escaped = escape_json_value(&lookalike).into_owned();
        assert_ne!(escaped, lookalike);
        assert_eq!(unescape_json_value(escaped), lookalike);
        // Written by something else, not decodable: returned as stored.
        let stray = format!("{ESCAPED}not base64!");
        assert_eq!(unescape_json_value(stray.clone()), stray);
    }

    proptest! {
        #[test]
        fn every_string_round_trips_and_fits_postgresql(value in any::<String>()) {
            let escaped = escape_json_value(&value);
            prop_assert!(!escaped.contains('\0'));
            prop_assert_eq!(unescape_json_value(escaped.into_owned()), value.clone());
            prop_assert!(!derived_copy(&value).contains('\0'));
        }

        #[test]
        fn json_strings_round_trip_through_json(map in proptest::collection::hash_map("[a-z]{1,8}", any::<String>(), 0..8)) {
            let json = serde_json::to_string(&JsonStrings(map.clone())).expect("serialises");
            prop_assert!(!json.contains("\\u0000"));
            let back: JsonStrings = serde_json::from_str(&json).expect("deserialises");
            prop_assert_eq!(back.0, map);
        }

        #[test]
        fn maps_round_trip(map in proptest::collection::hash_map("[a-z]{1,8}", any::<String>(), 0..8)) {
            let escaped: HashMap<String, String> =
                escape_json_map(&map).into_iter().map(|(key, value)| (key.to_owned(), value.into_owned())).collect();
            prop_assert_eq!(unescape_json_map(escaped), map);
        }
    }
}
