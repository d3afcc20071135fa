//! InfluxDB line protocol (DESIGN.md §5): `measurement[,tag=v...] field=v[,field=v...] [ts]`.
//!
//! Each integer, float or boolean field becomes one sample named `measurement_field`
//! (just `measurement` for a field called `value`); string fields are refused with an
//! error that names the line. Escapes follow the InfluxDB reference: `\,` and `\ ` in
//! measurements; `\,`, `\=` and `\ ` in tag keys, tag values and field keys; `\"` and
//! `\\` inside string field values.

use std::borrow::Cow;
use std::ops::Range;

use crate::ingest::WireTag;

/// One numeric field of one line. Name and tags borrow from the body unless they had
/// escapes: parsing allocates per line only for a `measurement_field` name.
#[derive(Debug, Clone, PartialEq)]
pub struct Point<'a> {
    /// 1-based line number in the body.
    pub line: usize,
    pub name: Cow<'a, str>,
    /// The line's tags in [`Lines::tags`] (shared by the line's fields).
    tags: Range<usize>,
    pub value: f64,
    /// Unix ms; `None` means "now".
    pub timestamp_ms: Option<i64>,
}

/// A parsed body: the points of good lines and an error for each bad one.
#[derive(Debug, Default)]
pub struct Lines<'a> {
    pub points: Vec<Point<'a>>,
    pub errors: Vec<LineError>,
    /// Every line's tags, sorted by key within a line.
    tags: Vec<WireTag<'a>>,
}

impl<'a> Lines<'a> {
    /// A point's tags, sorted by key.
    pub fn tags(&self, point: &Point<'a>) -> &[WireTag<'a>] {
        &self.tags[point.tags.clone()]
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineError {
    pub line: usize,
    pub message: String,
}

/// Timestamp unit of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    Ns,
    Us,
    Ms,
    S,
}

impl Precision {
    pub fn parse(s: &str) -> Option<Precision> {
        match s {
            "ns" | "n" => Some(Precision::Ns),
            "us" | "u" => Some(Precision::Us),
            "ms" => Some(Precision::Ms),
            "s" => Some(Precision::S),
            _ => None,
        }
    }

    fn to_ms(self, v: i64) -> i64 {
        match self {
            Precision::Ns => v.div_euclid(1_000_000),
            Precision::Us => v.div_euclid(1_000),
            Precision::Ms => v,
            Precision::S => v.saturating_mul(1000),
        }
    }
}

/// The bytes a scan stops at, and the backslash it must step over: one table lookup per
/// byte instead of a comparison per stop byte (the parser's hot loop).
struct Stops([bool; 256]);

impl Stops {
    const fn new(stops: &[u8]) -> Stops {
        let mut table = [false; 256];
        table[b'\\' as usize] = true;
        let mut i = 0;
        while i < stops.len() {
            table[stops[i] as usize] = true;
            i += 1;
        }
        Stops(table)
    }
}

/// The end of a measurement or a tag value.
const COMMA_OR_SPACE: Stops = Stops::new(b", ");
/// The end of a tag key.
const TAG_KEY_END: Stops = Stops::new(b", =");
/// The end of a field key.
const EQUALS: Stops = Stops::new(b"=");
/// The end of the field set, or a string value's opening quote.
const SPACE_OR_QUOTE: Stops = Stops::new(b" \"");
/// The end of one field, or a string value's opening quote.
const COMMA_OR_QUOTE: Stops = Stops::new(b",\"");
/// The end of a string value.
const QUOTE: Stops = Stops::new(b"\"");

/// Finds the first byte at or after `from` in `stops` that no backslash escapes; returns
/// its index (the length when there is none) and whether a backslash was passed on the
/// way (so unescaping is needed).
fn scan(b: &[u8], from: usize, stops: &Stops) -> (usize, bool) {
    let mut i = from;
    let mut escaped = false;
    // `position` over the rest compiles to a tight loop; indexing `b` byte by byte kept
    // the index on the stack.
    while let Some(offset) = b
        .get(i..)
        .and_then(|rest| rest.iter().position(|&c| stops.0[c as usize]))
    {
        i += offset;
        if b[i] != b'\\' {
            return (i, escaped);
        }
        escaped = true;
        i += 2;
    }
    (b.len(), escaped)
}

/// Removes the escaping backslash before any of `escapable` (others stay literal), when
/// the scan that found `s` passed a backslash; borrows otherwise.
#[inline]
fn unescape<'a>(s: &'a str, escaped: bool, escapable: &[char]) -> Cow<'a, str> {
    if escaped {
        Cow::Owned(unescaped(s, escapable))
    } else {
        Cow::Borrowed(s)
    }
}

#[cold]
fn unescaped(s: &str, escapable: &[char]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\'
            && let Some(&next) = chars.peek()
            && escapable.contains(&next)
        {
            out.push(next);
            chars.next();
            continue;
        }
        out.push(c);
    }
    out
}

/// Escapable in tag keys, tag values and field keys.
const KEY_ESCAPES: &[char] = &[',', '=', ' '];

enum FieldValue {
    Number(f64),
    Text,
}

fn parse_field_value(raw: &str) -> Result<FieldValue, String> {
    if let Some(value) = plain_decimal(raw.as_bytes()) {
        return Ok(FieldValue::Number(value));
    }
    if raw.starts_with('"') {
        return if raw.len() >= 2 && raw.ends_with('"') {
            Ok(FieldValue::Text)
        } else {
            Err("unterminated string field".into())
        };
    }
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(FieldValue::Number(1.0)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(FieldValue::Number(0.0)),
        _ => {}
    }
    if let Some(int) = raw.strip_suffix('i') {
        return int
            .parse::<i64>()
            .map(|v| FieldValue::Number(v as f64))
            .map_err(|_| format!("bad integer {raw:?}"));
    }
    if let Some(uint) = raw.strip_suffix('u') {
        return uint
            .parse::<u64>()
            .map(|v| FieldValue::Number(v as f64))
            .map_err(|_| format!("bad unsigned integer {raw:?}"));
    }
    match raw.parse::<f64>() {
        // "nan", "inf", "infinity" and overflowing literals all parse to non-finite values.
        Ok(v) if v.is_finite() => Ok(FieldValue::Number(v)),
        _ => Err(format!("bad field value {raw:?}")),
    }
}

/// The powers of ten a plain decimal divides by: at most 16 characters with a digit
/// before the point leave at most 14 after it.
const EXACT_POWERS_OF_TEN: [f64; 15] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14,
];

/// The common field value, `-?digits(.digits)?` of at most 16 characters after the sign,
/// read without the general float parser. Both
/// the digits and the power of ten are exact in an `f64`, so one correctly rounded
/// division gives the correctly rounded value, exactly what `str::parse` returns
/// (Clinger's fast path). Anything else is `None` and goes the general way.
fn plain_decimal(raw: &[u8]) -> Option<f64> {
    let (negative, digits) = match raw.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, raw),
    };
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut mantissa: u64 = 0;
    let mut fraction_digits = None;
    for (i, &c) in digits.iter().enumerate() {
        match c {
            b'0'..=b'9' => mantissa = mantissa * 10 + u64::from(c - b'0'),
            // A point needs digits on both sides.
            b'.' if fraction_digits.is_none() && i > 0 && i + 1 < digits.len() => {
                fraction_digits = Some(digits.len() - i - 1);
            }
            _ => return None,
        }
    }
    // At most 16 characters with a point means at most 15 digits; without one, 16 digits
    // may pass 2^53, beyond which not every integer is exact.
    if mantissa > 1 << 53 {
        return None;
    }
    let magnitude = mantissa as f64 / EXACT_POWERS_OF_TEN[fraction_digits.unwrap_or(0)];
    Some(if negative { -magnitude } else { magnitude })
}

/// Parses one line into `out`: its tags into the shared list, one point per numeric field.
/// On an error [`parse`] takes back what the line added.
fn parse_line<'a>(n: usize, line: &'a str, precision: Precision, out: &mut Lines<'a>) -> Result<(), String> {
    let b = line.as_bytes();
    // The measurement runs to the first unescaped comma (tags follow) or space (fields).
    let (mut at, escaped) = scan(b, 0, &COMMA_OR_SPACE);
    if at == 0 {
        return Err("missing measurement".into());
    }
    let measurement = unescape(&line[..at], escaped, &[',', ' ']);
    let tags_start = out.tags.len();
    while b.get(at) == Some(&b',') {
        let start = at + 1;
        let (key_end, key_escaped) = scan(b, start, &TAG_KEY_END);
        if b.get(key_end) != Some(&b'=') {
            return Err(format!("tag {:?} has no '='", &line[start..key_end]));
        }
        let (end, value_escaped) = scan(b, key_end + 1, &COMMA_OR_SPACE);
        if key_end == start || end == key_end + 1 {
            return Err(format!("tag {:?} has an empty key or value", &line[start..end]));
        }
        out.tags.push((
            unescape(&line[start..key_end], key_escaped, KEY_ESCAPES),
            unescape(&line[key_end + 1..end], value_escaped, KEY_ESCAPES),
        ));
        at = end;
    }
    // Sorted by key. A repeated key is refused: which of its values was meant cannot be
    // told, and keeping either silently would file the point under a series the sender
    // may not have meant.
    if let Some(key) = crate::names::sort_tags_find_repeated(&mut out.tags[tags_start..]) {
        return Err(format!("tag key {key:?} is repeated"));
    }
    let tags = tags_start..out.tags.len();
    while b.get(at) == Some(&b' ') {
        at += 1;
    }
    // Fields run to the next unescaped space outside quotes; an optional timestamp follows.
    let fields_start = at;
    let fields_end = end_outside_quotes(b, fields_start, &SPACE_OR_QUOTE);
    if fields_end == fields_start {
        return Err("missing fields".into());
    }
    let ts_text = line[fields_end..].trim_ascii();
    let timestamp_ms = if ts_text.is_empty() {
        None
    } else {
        let v: i64 = ts_text.parse().map_err(|_| format!("bad timestamp {ts_text:?}"))?;
        Some(precision.to_ms(v))
    };
    let fields = &b[..fields_end];
    let mut start = fields_start;
    loop {
        let end = end_outside_quotes(fields, start, &COMMA_OR_QUOTE);
        let (key_end, key_escaped) = scan(&fields[..end], start, &EQUALS);
        if key_end == end {
            return Err(format!("field {:?} has no '='", &line[start..end]));
        }
        if key_end == start {
            return Err("a field has an empty key".into());
        }
        let key = &line[start..key_end];
        let value = field_value(&line[key_end + 1..end], key, key_escaped)?;
        out.points.push(Point {
            line: n,
            name: point_name(&measurement, key, key_escaped),
            tags: tags.clone(),
            value,
            timestamp_ms,
        });
        if end == fields_end {
            return Ok(());
        }
        start = end + 1;
    }
}

/// The first unescaped stop of `stops` (which holds the quote) at or after `from` that is
/// not inside double quotes (the quotes of string field values), or the length.
fn end_outside_quotes(b: &[u8], from: usize, stops: &Stops) -> usize {
    let mut at = from;
    loop {
        let (i, _) = scan(b, at, stops);
        if b.get(i) != Some(&b'"') {
            return i;
        }
        // Past the closing quote; an unterminated string runs to the end.
        at = scan(b, i + 1, &QUOTE).0 + 1;
    }
}

/// The value of the field `key=raw`: a number, or the error that refuses a string.
fn field_value(raw: &str, key: &str, key_escaped: bool) -> Result<f64, String> {
    match parse_field_value(raw)? {
        FieldValue::Number(value) => Ok(value),
        FieldValue::Text => {
            let key = unescape(key, key_escaped, KEY_ESCAPES);
            Err(format!(
                "string field {key:?} is not stored: only numbers and booleans are"
            ))
        }
    }
}

/// `measurement` for a field called `value`, `measurement_field` for any other.
fn point_name<'a>(measurement: &Cow<'a, str>, key: &'a str, key_escaped: bool) -> Cow<'a, str> {
    if key == "value" {
        measurement.clone()
    } else {
        Cow::Owned(format!("{measurement}_{}", unescape(key, key_escaped, KEY_ESCAPES)))
    }
}

/// Parses a whole body: comments and blank lines skipped, each other line parsed, and a
/// bad line reported and its tags and points taken back out, so that it leaves nothing
/// behind; the other lines are kept.
pub fn parse(body: &str, precision: Precision) -> Lines<'_> {
    // A line is rarely shorter than this: room for the points up front instead of
    // growing the vector as it fills. Capped: a body can be 20 MiB, and one with more
    // points than a request may carry is refused whole anyway.
    let expected = (body.len() / 40).min(1 << 16);
    let mut lines = Lines {
        points: Vec::with_capacity(expected),
        errors: Vec::new(),
        tags: Vec::with_capacity(expected),
    };
    for (i, line) in body.lines().enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (tags, points) = (lines.tags.len(), lines.points.len());
        if let Err(message) = parse_line(i + 1, line, precision, &mut lines) {
            lines.tags.truncate(tags);
            lines.points.truncate(points);
            lines.errors.push(LineError { line: i + 1, message });
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A parser written plainly, as the parser was before it scanned each piece once
    /// (its body loop, field values and names too): the reference the fast one must agree
    /// with on every input. It shares unescaping, tag sorting, precision conversion and
    /// the output types with the parser, nothing of its scanning or value reading.
    mod reference {
        use super::super::{KEY_ESCAPES, LineError, Lines, Point, Precision};
        use std::borrow::Cow;

        /// Splits `s` at the first unescaped `stop`, outside double quotes when
        /// `quotes` is set. Returns (head, rest starting at the stop).
        pub(super) fn split_unescaped(s: &str, stop: u8, quotes: bool) -> (&str, &str) {
            let b = s.as_bytes();
            let mut i = 0;
            let mut in_quotes = false;
            while i < b.len() {
                let c = b[i];
                if c == stop && !in_quotes {
                    return (&s[..i], &s[i..]);
                }
                if c == b'\\' {
                    i += 2;
                    continue;
                }
                if quotes && c == b'"' {
                    in_quotes = !in_quotes;
                }
                i += 1;
            }
            (s, "")
        }

        /// Unescaping itself did not change; only when it is asked for did.
        pub(super) fn unescape<'a>(s: &'a str, escapable: &[char]) -> Cow<'a, str> {
            super::super::unescape(s, s.contains('\\'), escapable)
        }

        pub(super) fn parse_line<'a>(
            n: usize,
            line: &'a str,
            precision: Precision,
            out: &mut Lines<'a>,
        ) -> Result<(), String> {
            // measurement and tags up to the first unescaped space.
            let (series, rest) = split_unescaped(line, b' ', false);
            let rest = rest.trim_start_matches(' ');
            let (measurement_raw, tag_part) = split_unescaped(series, b',', false);
            if measurement_raw.is_empty() {
                return Err("missing measurement".into());
            }
            let measurement = unescape(measurement_raw, &[',', ' ']);
            parse_tags_and_fields(n, tag_part, rest, measurement, precision, out)
        }

        /// The rest of [`parse_line`]: `tag_part` is `,k=v,...` after the measurement, `rest`
        /// the fields and timestamp.
        fn parse_tags_and_fields<'a>(
            n: usize,
            mut tag_part: &'a str,
            rest: &'a str,
            measurement: Cow<'a, str>,
            precision: Precision,
            out: &mut Lines<'a>,
        ) -> Result<(), String> {
            let tags_start = out.tags.len();
            while let Some(stripped) = tag_part.strip_prefix(',') {
                let (pair, next) = split_unescaped(stripped, b',', false);
                let (k, v) = split_unescaped(pair, b'=', false);
                let v = v.strip_prefix('=').ok_or_else(|| format!("tag {pair:?} has no '='"))?;
                if k.is_empty() || v.is_empty() {
                    return Err(format!("tag {pair:?} has an empty key or value"));
                }
                out.tags
                    .push((unescape(k, &[',', '=', ' ']), unescape(v, &[',', '=', ' '])));
                tag_part = next;
            }
            // Sorted by key. A repeated key is refused: which of its values was meant cannot be
            // told, and keeping either silently would file the point under a series the sender
            // may not have meant.
            if let Some(key) = crate::names::sort_tags_find_repeated(&mut out.tags[tags_start..]) {
                return Err(format!("tag key {key:?} is repeated"));
            }
            let tags = tags_start..out.tags.len();
            // fields up to the next unescaped space outside quotes, then an optional timestamp.
            let (fields, ts_part) = split_unescaped(rest, b' ', true);
            if fields.is_empty() {
                return Err("missing fields".into());
            }
            let ts_text = ts_part.trim_ascii();
            let timestamp_ms = if ts_text.is_empty() {
                None
            } else {
                let v: i64 = ts_text.parse().map_err(|_| format!("bad timestamp {ts_text:?}"))?;
                Some(precision.to_ms(v))
            };
            let mut remaining = fields;
            loop {
                let (pair, next) = split_unescaped(remaining, b',', true);
                let (k, v) = split_unescaped(pair, b'=', false);
                let Some(v) = v.strip_prefix('=') else {
                    return Err(format!("field {pair:?} has no '='"));
                };
                if k.is_empty() {
                    return Err("a field has an empty key".into());
                }
                let value = field_value(v, k)?;
                out.points.push(Point {
                    line: n,
                    name: if k == "value" {
                        measurement.clone()
                    } else {
                        Cow::Owned(format!("{measurement}_{}", unescape(k, KEY_ESCAPES)))
                    },
                    tags: tags.clone(),
                    value,
                    timestamp_ms,
                });
                match next.strip_prefix(',') {
                    Some(more) => remaining = more,
                    None => return Ok(()),
                }
            }
        }

        fn field_value(raw: &str, key: &str) -> Result<f64, String> {
            if let Some(quoted) = raw.strip_prefix('"') {
                return Err(if quoted.ends_with('"') {
                    let key = unescape(key, KEY_ESCAPES);
                    format!("string field {key:?} is not stored: only numbers and booleans are")
                } else {
                    "unterminated string field".into()
                });
            }
            match raw {
                "t" | "T" | "true" | "True" | "TRUE" => return Ok(1.0),
                "f" | "F" | "false" | "False" | "FALSE" => return Ok(0.0),
                _ => {}
            }
            if let Some(int) = raw.strip_suffix('i') {
                return int
                    .parse::<i64>()
                    .map(|v| v as f64)
                    .map_err(|_| format!("bad integer {raw:?}"));
            }
            if let Some(uint) = raw.strip_suffix('u') {
                return uint
                    .parse::<u64>()
                    .map(|v| v as f64)
                    .map_err(|_| format!("bad unsigned integer {raw:?}"));
            }
            match raw.parse::<f64>() {
                Ok(v) if v.is_finite() => Ok(v),
                _ => Err(format!("bad field value {raw:?}")),
            }
        }

        pub(super) fn parse(body: &str, precision: Precision) -> Lines<'_> {
            let mut lines = Lines::default();
            for (i, line) in body.lines().enumerate() {
                let line = line.trim_ascii();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (tags, points) = (lines.tags.len(), lines.points.len());
                if let Err(message) = parse_line(i + 1, line, precision, &mut lines) {
                    lines.tags.truncate(tags);
                    lines.points.truncate(points);
                    lines.errors.push(LineError { line: i + 1, message });
                }
            }
            lines
        }
    }

    #[test]
    fn reference_examples() {
        // From the InfluxDB line protocol reference.
        let body = "myMeasurement,tag1=value1,tag2=value2 fieldKey=\"fieldValue\" 1556813561098000000\n\
                    weather,location=us-midwest temperature=82 1465839830100400200\n\
                    weather,location=us-midwest temperature=82i,humid=t 1465839830100400200\n\
                    # a comment\n\
                    \n\
                    cpu\\,load,host\\ name=a\\=b value=1.5e2,idle=-3\n";
        let lines = parse(body, Precision::Ns);
        assert_eq!(
            lines.errors,
            vec![LineError {
                line: 1,
                message: "string field \"fieldKey\" is not stored: only numbers and booleans are".into()
            }]
        );
        let got: Vec<(usize, &str, f64, Option<i64>)> = lines
            .points
            .iter()
            .map(|p| (p.line, p.name.as_ref(), p.value, p.timestamp_ms))
            .collect();
        assert_eq!(
            got,
            vec![
                (2, "weather_temperature", 82.0, Some(1_465_839_830_100)),
                (3, "weather_temperature", 82.0, Some(1_465_839_830_100)),
                (3, "weather_humid", 1.0, Some(1_465_839_830_100)),
                (6, "cpu,load", 150.0, None),
                (6, "cpu,load_idle", -3.0, None),
            ]
        );
        let tags = |i: usize| -> Vec<(&str, &str)> {
            lines
                .tags(&lines.points[i])
                .iter()
                .map(|(k, v)| (k.as_ref(), v.as_ref()))
                .collect()
        };
        assert_eq!(tags(0), vec![("location", "us-midwest")]);
        assert_eq!(tags(3), vec![("host name", "a=b")]);
        assert_eq!(tags(4), tags(3), "the fields of a line share its tags");
        // Shared, not copied: both fields point at the same entries of the body's list.
        assert_eq!(lines.points[4].tags, lines.points[3].tags);
    }

    #[test]
    fn precisions() {
        for (p, ts, ms) in [
            (Precision::Ns, "1700000000123456789", 1_700_000_000_123),
            (Precision::Us, "1700000000123456", 1_700_000_000_123),
            (Precision::Ms, "1700000000123", 1_700_000_000_123),
            (Precision::S, "1700000000", 1_700_000_000_000),
        ] {
            let body = format!("m value=1 {ts}");
            let lines = parse(&body, p);
            assert!(lines.errors.is_empty());
            assert_eq!(lines.points[0].timestamp_ms, Some(ms), "{p:?}");
        }
        assert_eq!(Precision::parse("us"), Some(Precision::Us));
        assert_eq!(Precision::parse("h"), None);
    }

    #[test]
    fn bad_lines_are_named() {
        let lines = parse(
            "ok value=1\nnofields\nm v=abc\nm v=1 notatime\n m v=\"open",
            Precision::Ns,
        );
        assert_eq!(lines.points.len(), 1);
        assert_eq!(
            lines.errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![2, 3, 4, 5]
        );
        let lines = parse("m v=NaN\nm v=inf", Precision::Ns);
        assert_eq!(lines.errors.len(), 2);
    }

    #[test]
    fn a_repeated_tag_key_refuses_its_line() {
        let lines = parse("m,k=1,host=a,k=0 value=1\nm,k=1 value=2", Precision::S);
        assert_eq!(lines.errors.len(), 1);
        assert_eq!(lines.errors[0].line, 1);
        assert_eq!(lines.errors[0].message, "tag key \"k\" is repeated");
        assert_eq!(flat(&lines), vec![(2, "m".into(), vec![("k".into(), "1".into())], 2.0)]);
    }

    #[test]
    fn quoted_strings_may_hold_separators() {
        let lines = parse("m,t=a msg=\"a, b = c\",v=2 1", Precision::S);
        assert_eq!(lines.errors.len(), 1, "the string field is refused");
        assert!(lines.points.is_empty(), "a refused line stores nothing");
        assert!(lines.tags.is_empty(), "nor keeps its tags");
        let lines = parse("m v=2,w=3i 1", Precision::S);
        assert!(lines.errors.is_empty());
        assert_eq!(lines.points.len(), 2);
    }

    /// Each point as (line, name, tags, value), for comparing parses.
    type FlatPoint = (usize, String, Vec<(String, String)>, f64);

    fn flat(lines: &Lines<'_>) -> Vec<FlatPoint> {
        lines
            .points
            .iter()
            .map(|p| {
                let tags = lines
                    .tags(p)
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (p.line, p.name.to_string(), tags, p.value)
            })
            .collect()
    }

    #[test]
    fn each_line_keeps_its_own_tags() {
        let lines = parse(
            "a,k=1,j=0 value=1\nb,k=2 x=\"s\"\nc,z=9,a=8 v=1,w=2\nd value=3",
            Precision::S,
        );
        let s = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert_eq!(
            flat(&lines),
            vec![
                (1, "a".into(), s(&[("j", "0"), ("k", "1")]), 1.0),
                (3, "c_v".into(), s(&[("a", "8"), ("z", "9")]), 1.0),
                (3, "c_w".into(), s(&[("a", "8"), ("z", "9")]), 2.0),
                (4, "d".into(), vec![], 3.0),
            ]
        );
    }

    proptest! {
        /// A body parses to what its lines parse to one by one: no line's tags leak
        /// into another's, and a refused line leaves nothing behind.
        #[test]
        fn a_body_is_its_lines(lines in proptest::collection::vec(
            "[a-c](,[k-m]=[0-2]){0,3} ([u-w]=[0-9](,[u-w]=([0-9]|\"s\"))?|oops)",
            1..12,
        )) {
            let body = lines.join("\n");
            let whole = flat(&parse(&body, Precision::S));
            let mut one_by_one = Vec::new();
            for (i, line) in lines.iter().enumerate() {
                for (_, name, tags, value) in flat(&parse(line, Precision::S)) {
                    one_by_one.push((i + 1, name, tags, value));
                }
            }
            prop_assert_eq!(whole, one_by_one);
        }

        /// The fast parser answers every body as the reference does: the same points,
        /// tags, errors and messages.
        #[test]
        fn agrees_with_the_reference(lines in proptest::collection::vec(
            "[a-c,= \\\\\"0-9.eitu_+-]{0,30}|[a-c](,[k-m]=[0-2\\\\ ]{1,2}){0,3} ([u-w]=([0-9tfu.\"-]{1,3}|[+-]?[0-9]{1,20}[iu]?)(,[u-w\\\\=]{1,2}=[0-9i\",]{1,3})*)( [+-]?[0-9]{1,20})?",
            1..8,
        )) {
            let body = lines.join("\n");
            let fast = parse(&body, Precision::Ms);
            let slow = reference::parse(&body, Precision::Ms);
            prop_assert_eq!(flat(&fast), flat(&slow));
            prop_assert_eq!(&fast.errors, &slow.errors);
            let times = |l: &Lines<'_>| l.points.iter().map(|p| p.timestamp_ms).collect::<Vec<_>>();
            prop_assert_eq!(times(&fast), times(&slow));
        }

        /// The fast path for plain decimals reads exactly what the general parser reads,
        /// and takes every short plain decimal.
        #[test]
        fn plain_decimals_read_as_the_float_parser_reads(raw in "-?[0-9]{0,17}(\\.[0-9]{0,17})?|[-+.0-9eE]{0,20}") {
            let fast = plain_decimal(raw.as_bytes());
            if let Some(value) = fast {
                let general: f64 = raw.parse().expect("the fast path took a plain decimal");
                prop_assert_eq!(value.to_bits(), general.to_bits());
            }
            let plain = raw.strip_prefix('-').unwrap_or(&raw);
            let digits = plain.bytes().filter(u8::is_ascii_digit).count();
            let shape = !plain.is_empty()
                && !plain.starts_with('.')
                && !plain.ends_with('.')
                && plain.bytes().all(|c| c.is_ascii_digit() || c == b'.')
                && plain.matches('.').count() <= 1;
            if shape && digits <= 15 {
                prop_assert!(fast.is_some(), "{raw:?} went the general way");
            }
        }

        #[test]
        fn never_panics(body in "\\PC{0,200}") {
            let _ = parse(&body, Precision::Ns);
        }

        #[test]
        fn numbers_round_trip(name in "[a-z][a-z0-9_]{0,10}", tag in "[a-z]{1,5}", v in -1e9f64..1e9, ts in 0i64..4_000_000_000) {
            let body = format!("{name},t={tag} value={v:?} {ts}");
            let lines = parse(&body, Precision::S);
            prop_assert!(lines.errors.is_empty());
            prop_assert_eq!(lines.points.len(), 1);
            let p = &lines.points[0];
            prop_assert_eq!(p.name.as_ref(), name.as_str());
            prop_assert_eq!(p.value, v);
            prop_assert_eq!(p.timestamp_ms, Some(ts * 1000));
            prop_assert_eq!(lines.tags(p), &[(Cow::Borrowed("t"), Cow::Borrowed(tag.as_str()))][..]);
        }
    }
}
