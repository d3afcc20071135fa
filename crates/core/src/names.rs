//! Validation of the identifiers of the data model (DESIGN.md §2): server slugs,
//! metric names, tag keys and values, and the canonical key of a series.
//!
//! These run for every sample on the ingest path, so they are byte loops rather than
//! regular expressions.

/// Longest metric name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;
/// Longest tag key, in bytes.
pub const MAX_TAG_KEY_BYTES: usize = 64;
/// Longest tag value, in bytes.
pub const MAX_TAG_VALUE_BYTES: usize = 256;
/// Most tags on one series.
pub const MAX_TAGS: usize = 16;

/// `[a-z0-9][a-z0-9._-]{0,63}`
pub fn is_valid_server_id(id: &str) -> bool {
    let bytes = id.as_bytes();
    match bytes.first() {
        Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit() => {}
        _ => return false,
    }
    bytes.len() <= 64
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'))
}

fn is_identifier(s: &str, max: usize) -> bool {
    let bytes = s.as_bytes();
    match bytes.first() {
        Some(b) if b.is_ascii_alphabetic() || *b == b'_' => {}
        _ => return false,
    }
    bytes.len() <= max
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':'))
}

/// `[a-zA-Z_][a-zA-Z0-9_.:]*`, at most 128 bytes.
pub fn is_valid_metric_name(name: &str) -> bool {
    is_identifier(name, MAX_NAME_BYTES)
}

/// Like a metric name, at most 64 bytes.
pub fn is_valid_tag_key(key: &str) -> bool {
    is_identifier(key, MAX_TAG_KEY_BYTES)
}

/// Any UTF-8 (guaranteed by `&str`) of at most 256 bytes without control characters,
/// which would make the canonical key ambiguous and logs unreadable.
pub fn is_valid_tag_value(value: &str) -> bool {
    value.len() <= MAX_TAG_VALUE_BYTES && !value.chars().any(char::is_control)
}

/// Appends the canonical identity of a series to `out`: the name and the sorted tags,
/// separated by a byte that valid names, keys and values cannot contain. Used as the key
/// of the in-memory series cache, so it is written into a reused buffer.
pub fn write_series_key<'a>(out: &mut String, name: &str, sorted_tags: impl IntoIterator<Item = (&'a str, &'a str)>) {
    out.push_str(name);
    for (k, v) in sorted_tags {
        out.push('\u{1}');
        out.push_str(k);
        out.push('\u{2}');
        out.push_str(v);
    }
}

/// Sorts tags by key and returns a key given more than once, if any: the front doors
/// whose senders cannot mean two values for one key (line protocol, remote-write) refuse
/// such a point.
pub fn sort_tags_find_repeated<K: Ord, V>(tags: &mut [(K, V)]) -> Option<&K> {
    tags.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    tags.windows(2).find(|w| w[0].0 == w[1].0).map(|w| &w[0].0)
}

/// Sorts tags by key and keeps one per key: the one given last, as inserting them into a
/// map in order would (OTLP attributes, like the keys of a JSON object).
pub fn sort_and_dedup_tags<K: Ord, V>(tags: &mut Vec<(K, V)>) {
    // Reversed, a stable sort puts the last of equal keys first, and dedup keeps it.
    tags.reverse();
    tags.sort_by(|a, b| a.0.cmp(&b.0));
    tags.dedup_by(|a, b| a.0 == b.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_ids() {
        for ok in ["a", "acme-search", "0x.y_z", &"a".repeat(64)] {
            assert!(is_valid_server_id(ok), "{ok}");
        }
        for bad in ["", "-a", "A", "acme search", "é", &"a".repeat(65), ".a"] {
            assert!(!is_valid_server_id(bad), "{bad}");
        }
    }

    #[test]
    fn metric_names() {
        for ok in [
            "response_time",
            "_x",
            "a.b:c",
            "mcp.server.operation.duration",
            &"a".repeat(128),
        ] {
            assert!(is_valid_metric_name(ok), "{ok}");
        }
        for bad in ["", "1a", "a-b", "a b", "é", &"a".repeat(129), ".a"] {
            assert!(!is_valid_metric_name(bad), "{bad}");
        }
    }

    #[test]
    fn tags() {
        assert!(is_valid_tag_key("tool"));
        assert!(!is_valid_tag_key(&"k".repeat(65)));
        assert!(is_valid_tag_value("søk/ñ 🚀"));
        assert!(is_valid_tag_value(""));
        assert!(!is_valid_tag_value(&"v".repeat(257)));
        assert!(!is_valid_tag_value("a\nb"));
    }

    #[test]
    fn series_key_separates_parts() {
        let mut a = String::new();
        write_series_key(&mut a, "m", [("a", "bc")]);
        let mut b = String::new();
        write_series_key(&mut b, "m", [("ab", "c")]);
        assert_ne!(a, b);
    }

    #[test]
    fn repeated_tag_keys_keep_one_value() {
        let original: Vec<(String, String)> = [("b", "1"), ("a", "z"), ("b", "3"), ("a", "y"), ("b", "2")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut tags = original.clone();
        sort_and_dedup_tags(&mut tags);
        assert_eq!(tags, vec![("a".into(), "y".into()), ("b".into(), "2".into())]);
        // What inserting them into a map in order gives.
        let map: std::collections::BTreeMap<String, String> = original.into_iter().collect();
        assert_eq!(tags, map.into_iter().collect::<Vec<_>>());
    }
}
