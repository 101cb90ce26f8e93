//! How text is made searchable: one normal form for stored text and queries, and the terms a
//! search index keeps, so that every substring query of one or more characters can be answered
//! from the index and then checked exactly.
//!
//! **Normal form** ([`normalize`]): NFKC, then Unicode default case folding, then NFKC again
//! (case folding can leave a string that is no longer NFKC). NFKC rather than NFC because IM text
//! mixes widths and compatibility forms that users consider the same letters: full-width
//! `ＡＢＣ１２３` is `ABC123`, half-width katakana `ｶﾀｶﾅ` is `カタカナ`, the ligature `ﬁ` is `fi`.
//! Case folding rather than lowercasing because it is the form Unicode defines for caseless
//! matching (`ß` and `SS` both fold to `ss`, final sigma to `σ`). This is the approximation of
//! Unicode's `NFKC_Casefold` that ICU4X offers; it keeps default-ignorable characters. U+0000
//! is left out, as in every derived text copy (`stored_text`).
//!
//! **Terms** ([`index_terms`]) are taken from the normal form in runs of one class of character:
//! - CJK runs (Han, Hiragana, Katakana, Hangul, Bopomofo): every character alone and every
//!   pair of neighbours. A one-character query is one term; a longer one is all of its pairs.
//! - Runs of other letters and digits: every three consecutive characters (trigrams). A query
//!   run of three or more characters is all of its trigrams; shorter runs give no term.
//! - Everything else (spaces, punctuation, symbols, emoji) separates runs and gives no term.
//!
//! **Order terms** ([`order_terms`], PostgreSQL's search entries only): pairs do not say in
//! which order they stand, so `ABCD` is looked up as any text holding `AB`, `BC` and `CD`
//! anywhere — over a million natural-language messages one such query had 4,162 candidates,
//! 129 of them matches, each candidate a random page read. Every three CJK characters in a row
//! therefore also give a term, hashed into one of [`ORDER_BUCKETS`] keys: a bounded number of
//! keys keeps the index's cost near that of the pairs (unhashed triples, tens of millions of
//! distinct keys, made its build six times slower), and the query's two order terms cut that
//! query's candidates to 196 (docs/BENCHMARKS.md, search). Entries written before order terms
//! existed lack them; a tenant with such entries is looked up without them.
//!
//! Classes are decided per character, never by context, so every run of a query's normal form
//! is a piece of some run of any text that contains it, and every term of the query
//! ([`query_terms`]) is a term of that text: an index lookup by the query's terms finds every
//! match. It can also find non-matches (terms present, not in this order), so the exact
//! substring is checked on the normal forms afterwards. A query that yields no term (one or two
//! Latin letters, only punctuation) is answered by that check alone.

use std::collections::BTreeSet;

use icu_casemap::CaseMapper;
use icu_normalizer::ComposingNormalizer;
use icu_properties::CodePointMapData;
use icu_properties::props::Script;

/// Longest normal form (UTF-8 bytes) the search index keeps, in either database: a longer text
/// is not found by search. Its terms take several times its size, a MongoDB document must hold
/// them beside the message under MongoDB's 16 MiB, and the indexer's statements stay bounded;
/// one limit for both databases, so they agree on what search finds.
pub const MAX_SEARCHABLE_BYTES: usize = 256 * 1024;

/// Number of keys CJK triples are hashed into ([`order_terms`]): 2¹⁶. With about 26 triples a
/// message (natural-language text, docs/BENCHMARKS.md), a key is held on average by some 0.04% of
/// messages beyond those holding its triples: few enough that two keys leave almost no false candidate.
pub const ORDER_BUCKETS: u32 = 1 << 16;

/// `terms_version` of a PostgreSQL search entry whose terms include its [`order_terms`];
/// entries of version 1, written before order terms existed, lack them.
pub const ORDER_TERMS_VERSION: i16 = 2;

/// Which terms a search index keeps of a text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Terms {
    /// [`index_terms`]: MongoDB's documents.
    Plain,
    /// [`index_terms`] and [`order_terms`]: PostgreSQL's entries, of `terms_version`
    /// [`ORDER_TERMS_VERSION`].
    Ordered,
}

/// What the search index keeps of a searchable text: its normal form and that form's `terms`.
/// `None` when the normal form is longer than [`MAX_SEARCHABLE_BYTES`].
pub fn index_entry(text: &str, terms: Terms) -> Option<(String, Vec<String>)> {
    let normal = normalize(text);
    if normal.len() > MAX_SEARCHABLE_BYTES {
        return None;
    }
    let mut kept = index_terms(&normal);
    if terms == Terms::Ordered {
        kept.extend(order_terms(&normal));
    }
    Some((normal, kept))
}

/// `text` in the searchable normal form: NFKC, case folded, NFKC again, without U+0000.
pub fn normalize(text: &str) -> String {
    let nfkc = ComposingNormalizer::new_nfkc();
    let composed = nfkc.normalize(text);
    let folded = CaseMapper::new().fold_string(&composed);
    let mut normal = nfkc.normalize(&folded).into_owned();
    normal.retain(|character| character != '\0');
    normal
}

/// The index terms of a text already in normal form, sorted and without repeats.
pub fn index_terms(normal: &str) -> Vec<String> {
    let mut terms = BTreeSet::new();
    for (class, run) in runs(normal) {
        match class {
            Class::Cjk => {
                terms.extend(run.iter().map(|character| character.to_string()));
                terms.extend(ngrams(&run, 2));
            }
            Class::Word => terms.extend(ngrams(&run, 3)),
        }
    }
    terms.into_iter().collect()
}

/// The order terms of a text or query in normal form: every three consecutive characters of a
/// CJK run, hashed (CRC-32 of their UTF-8, modulo [`ORDER_BUCKETS`]) to a key that begins
/// with U+001F, a character no other term holds; sorted and without repeats. A query's order
/// terms are order terms of every text containing it, as with the pairs.
pub fn order_terms(normal: &str) -> Vec<String> {
    const CRC_32: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISO_HDLC);
    let mut terms = BTreeSet::new();
    for (class, run) in runs(normal) {
        if class == Class::Cjk {
            terms.extend(
                ngrams(&run, 3)
                    .map(|triple| format!("\u{1f}{:04x}", CRC_32.checksum(triple.as_bytes()) % ORDER_BUCKETS)),
            );
        }
    }
    terms.into_iter().collect()
}

/// The terms every text containing `normal_query` (in normal form) has, sorted and without
/// repeats; empty when the query has none to look up.
pub fn query_terms(normal_query: &str) -> Vec<String> {
    let mut terms = BTreeSet::new();
    for (class, run) in runs(normal_query) {
        match class {
            Class::Cjk if run.len() == 1 => {
                terms.insert(run[0].to_string());
            }
            Class::Cjk => terms.extend(ngrams(&run, 2)),
            Class::Word => terms.extend(ngrams(&run, 3)),
        }
    }
    terms.into_iter().collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Cjk,
    Word,
}

fn class(character: char) -> Option<Class> {
    let script = CodePointMapData::<Script>::new().get(character);
    if [Script::Han, Script::Hiragana, Script::Katakana, Script::Hangul, Script::Bopomofo].contains(&script) {
        Some(Class::Cjk)
    } else if character.is_alphanumeric() {
        Some(Class::Word)
    } else {
        None
    }
}

/// Maximal runs of characters of one class.
fn runs(text: &str) -> Vec<(Class, Vec<char>)> {
    let mut runs: Vec<(Class, Vec<char>)> = Vec::new();
    let mut previous = None;
    for character in text.chars() {
        let current = class(character);
        match (current, runs.last_mut()) {
            (Some(current), Some((class, run))) if previous == Some(current) && *class == current => {
                run.push(character);
            }
            (Some(current), _) => runs.push((current, vec![character])),
            (None, _) => {}
        }
        previous = current;
    }
    runs
}

fn ngrams(run: &[char], n: usize) -> impl Iterator<Item = String> + '_ {
    run.windows(n).map(|window| window.iter().collect())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn equal_text_in_other_forms_normalizes_alike() {
        // "café" with a precomposed é and with e + combining acute accent.
        assert_eq!(normalize("caf\u{e9}"), normalize("cafe\u{301}"));
        assert_eq!(normalize("Café"), "café");
        // Full-width Latin and digits are the ASCII letters; half-width katakana the full-width.
        assert_eq!(normalize("ＦＬＡＲＥ１２３"), "flare123");
        assert_eq!(normalize("ｶﾀｶﾅ"), "カタカナ");
        // Case folding, not lowercasing: ß and SS meet at ss; final and medial sigma meet.
        assert_eq!(normalize("STRASSE"), normalize("straße"));
        assert_eq!(normalize("ΟΔΟΣ"), normalize("οδος"));
        assert_eq!(normalize("ﬁle"), "file");
        assert_eq!(normalize("a\0b"), "ab");
        assert_eq!(normalize("会议"), "会议");
    }

    #[test]
    fn a_text_longer_than_the_limit_in_normal_form_has_no_entry() {
        let at_limit = "a".repeat(MAX_SEARCHABLE_BYTES);
        assert_eq!(index_entry(&at_limit, Terms::Ordered).map(|(normal, _)| normal.len()), Some(MAX_SEARCHABLE_BYTES));
        assert!(index_entry(&format!("{at_limit}b"), Terms::Ordered).is_none());
        // The limit is on the normal form: full-width letters (3 bytes) become ASCII (1 byte),
        // and U+FDFA expands to 18 characters.
        assert!(index_entry(&"Ａ".repeat(MAX_SEARCHABLE_BYTES / 2), Terms::Ordered).is_some());
        assert!(index_entry(&"\u{fdfa}".repeat(MAX_SEARCHABLE_BYTES / 20), Terms::Ordered).is_none());
    }

    #[test]
    fn cjk_gives_characters_and_pairs_other_words_trigrams() {
        assert_eq!(set(index_terms("会议室")), set(["会", "议", "室", "会议", "议室"]));
        assert_eq!(index_terms("hello, hi"), ["ell", "hel", "llo"]);
        // Classes split runs: no pair or trigram spans Latin and Han, or a space.
        assert_eq!(index_terms("ab钱"), ["钱"]);
        assert_eq!(query_terms("钱"), ["钱"]);
        assert_eq!(set(query_terms("会议室")), set(["会议", "议室"]));
        assert_eq!(query_terms("hi"), Vec::<String>::new());
        assert_eq!(query_terms("!!"), Vec::<String>::new());
        // Japanese kana and Korean syllables are CJK; Thai is one run of letters.
        assert_eq!(query_terms("ひら"), ["ひら"]);
        assert_eq!(set(query_terms("한국어")), set(["한국", "국어"]));
        assert_eq!(query_terms("สวัสดี").len(), 4);
    }

    #[test]
    fn cjk_triples_give_order_terms_hashed_into_buckets() {
        // Keys are stored: they must never change (CRC-32 of 会议室 is 0x…1c20).
        assert_eq!(order_terms("会议室"), ["\u{1f}1c20"]);
        assert_eq!(order_terms("会议室开会").len(), 3);
        // Only CJK runs of three or more, never across a class boundary.
        assert_eq!(order_terms("会议 室"), Vec::<String>::new());
        assert_eq!(order_terms("hello world"), Vec::<String>::new());
        // The order of the characters changes the key; no order term is another term.
        assert_ne!(order_terms("会议室"), order_terms("议会室"));
        let terms = index_terms("会议室");
        assert!(order_terms("会议室").iter().all(|term| !terms.contains(term)));
    }

    fn set<T: Into<String>>(terms: impl IntoIterator<Item = T>) -> BTreeSet<String> {
        terms.into_iter().map(Into::into).collect()
    }

    fn mixed_text() -> impl Strategy<Value = String> {
        let pieces = prop::sample::select(vec![
            "会议",
            "钱",
            "的",
            "开会了",
            "ひらがな",
            "カタカナ",
            "ｶﾀｶﾅ",
            "한국어",
            "hello",
            "World",
            "ＡＢＣ",
            "café",
            "cafe\u{301}",
            "STRASSE",
            "straße",
            " ",
            ", ",
            "!",
            "🎉",
            "123",
            "x",
            "ﬁ",
            "Ω",
        ]);
        prop::collection::vec(pieces, 0..12).prop_map(|pieces| pieces.concat())
    }

    proptest! {
        /// Every substring of a text's normal form has only terms the text has: an index lookup
        /// by the query's terms misses no match.
        #[test]
        fn a_substring_has_no_term_its_text_lacks(text in mixed_text(), start in 0usize..64, len in 1usize..12) {
            let normal = normalize(&text);
            let characters: Vec<char> = normal.chars().collect();
            prop_assume!(start < characters.len());
            let end = (start + len).min(characters.len());
            let query: String = characters[start..end].iter().collect();
            let terms: BTreeSet<String> = index_terms(&normal).into_iter().collect();
            for term in query_terms(&query) {
                prop_assert!(terms.contains(&term), "{term:?} of {query:?} not among the terms of {normal:?}");
            }
        }

        /// The same for order terms: a text's order terms hold every order term of its
        /// substrings.
        #[test]
        fn a_substring_has_no_order_term_its_text_lacks(text in mixed_text(), start in 0usize..64, len in 1usize..12) {
            let normal = normalize(&text);
            let characters: Vec<char> = normal.chars().collect();
            prop_assume!(start < characters.len());
            let end = (start + len).min(characters.len());
            let query: String = characters[start..end].iter().collect();
            let terms: BTreeSet<String> = order_terms(&normal).into_iter().collect();
            for term in order_terms(&query) {
                prop_assert!(terms.contains(&term), "{term:?} of {query:?} not among the order terms of {normal:?}");
            }
        }

        #[test]
        fn normal_form_is_stable(text in mixed_text()) {
            let normal = normalize(&text);
            prop_assert_eq!(normalize(&normal), normal.clone());
        }
    }
}
