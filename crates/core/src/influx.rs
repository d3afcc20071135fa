//! InfluxDB line protocol (DESIGN.md §5): `measurement[,tag=v...] field=v[,field=v...] [ts]`.
//!
//! Each integer, float or boolean field becomes one sample named `measurement_field`
//! (just `measurement` for a field called `value`); string fields are refused with an
//! error that names the line. Escapes follow the InfluxDB reference: `\,` and `\ ` in
//! measurements; `\,`, `\=` and `\ ` in tag keys, tag values and field keys; `\"` and
//! `\\` inside string field values.

/// One numeric field of one line.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// 1-based line number in the body.
    pub line: usize,
    pub name: String,
    /// Sorted by key.
    pub tags: Vec<(String, String)>,
    pub value: f64,
    /// Unix ms; `None` means "now".
    pub timestamp_ms: Option<i64>,
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

/// Splits `s` at the first unescaped occurrence of any of `stops`, outside double
/// quotes when `quotes` is set. Returns (head, rest starting at the stop) .
fn split_unescaped<'a>(s: &'a str, stops: &[u8], quotes: bool) -> (&'a str, &'a str) {
    let b = s.as_bytes();
    let mut i = 0;
    let mut in_quotes = false;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' if quotes => {
                in_quotes = !in_quotes;
                i += 1;
            }
            c if !in_quotes && stops.contains(&c) => return (&s[..i], &s[i..]),
            _ => i += 1,
        }
    }
    (s, "")
}

/// Removes the escaping backslash before any of `escapable` (others stay literal).
fn unescape(s: &str, escapable: &[char]) -> String {
    if !s.contains('\\') {
        return s.to_owned();
    }
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

enum FieldValue {
    Number(f64),
    Text,
}

fn parse_field_value(raw: &str) -> Result<FieldValue, String> {
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

fn parse_line(n: usize, line: &str, precision: Precision, out: &mut Vec<Point>) -> Result<(), String> {
    // measurement and tags up to the first unescaped space.
    let (series, rest) = split_unescaped(line, b" ", false);
    let rest = rest.trim_start_matches(' ');
    let (measurement_raw, mut tag_part) = split_unescaped(series, b",", false);
    if measurement_raw.is_empty() {
        return Err("missing measurement".into());
    }
    let measurement = unescape(measurement_raw, &[',', ' ']);
    let mut tags = Vec::new();
    while let Some(stripped) = tag_part.strip_prefix(',') {
        let (pair, next) = split_unescaped(stripped, b",", false);
        let (k, v) = split_unescaped(pair, b"=", false);
        let v = v.strip_prefix('=').ok_or_else(|| format!("tag {pair:?} has no '='"))?;
        if k.is_empty() || v.is_empty() {
            return Err(format!("tag {pair:?} has an empty key or value"));
        }
        tags.push((unescape(k, &[',', '=', ' ']), unescape(v, &[',', '=', ' '])));
        tag_part = next;
    }
    tags.sort();
    tags.dedup_by(|a, b| a.0 == b.0);
    // fields up to the next unescaped space outside quotes, then an optional timestamp.
    let (fields, ts_part) = split_unescaped(rest, b" ", true);
    if fields.is_empty() {
        return Err("missing fields".into());
    }
    let ts_text = ts_part.trim();
    let timestamp_ms = if ts_text.is_empty() {
        None
    } else {
        let v: i64 = ts_text.parse().map_err(|_| format!("bad timestamp {ts_text:?}"))?;
        Some(precision.to_ms(v))
    };
    // Points go straight into `out` (a line with a bad field takes its points back out);
    // each field's point is pushed when the next one is seen, so the last takes the tags
    // instead of a copy of them.
    let start = out.len();
    let mut pending: Option<(String, f64)> = None;
    let mut remaining = fields;
    let result = loop {
        let (pair, next) = split_unescaped(remaining, b",", true);
        let (k, v) = split_unescaped(pair, b"=", false);
        let Some(v) = v.strip_prefix('=') else {
            break Err(format!("field {pair:?} has no '='"));
        };
        if k.is_empty() {
            break Err("a field has an empty key".into());
        }
        let value = match parse_field_value(v) {
            Ok(FieldValue::Number(value)) => value,
            Ok(FieldValue::Text) => {
                let key = unescape(k, &[',', '=', ' ']);
                break Err(format!(
                    "string field {key:?} is not stored: only numbers and booleans are"
                ));
            }
            Err(e) => break Err(e),
        };
        let name = if k == "value" {
            measurement.clone()
        } else {
            format!("{measurement}_{}", unescape(k, &[',', '=', ' ']))
        };
        if let Some((name, value)) = pending.replace((name, value)) {
            out.push(Point {
                line: n,
                name,
                tags: tags.clone(),
                value,
                timestamp_ms,
            });
        }
        match next.strip_prefix(',') {
            Some(more) => remaining = more,
            None => break Ok(()),
        }
    };
    match (result, pending) {
        (Ok(()), Some((name, value))) => {
            out.push(Point {
                line: n,
                name,
                tags,
                value,
                timestamp_ms,
            });
            Ok(())
        }
        (Ok(()), None) => Ok(()),
        (Err(e), _) => {
            out.truncate(start);
            Err(e)
        }
    }
}

/// Parses a whole body. A bad line is reported and skipped; the others are kept.
pub fn parse(body: &str, precision: Precision) -> (Vec<Point>, Vec<LineError>) {
    let mut points = Vec::new();
    let mut errors = Vec::new();
    for (i, line) in body.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Err(message) = parse_line(i + 1, line, precision, &mut points) {
            errors.push(LineError { line: i + 1, message });
        }
    }
    (points, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn reference_examples() {
        // From the InfluxDB line protocol reference.
        let body = "myMeasurement,tag1=value1,tag2=value2 fieldKey=\"fieldValue\" 1556813561098000000\n\
                    weather,location=us-midwest temperature=82 1465839830100400200\n\
                    weather,location=us-midwest temperature=82i,humid=t 1465839830100400200\n\
                    # a comment\n\
                    \n\
                    cpu\\,load,host\\ name=a\\=b value=1.5e2,idle=-3\n";
        let (points, errors) = parse(body, Precision::Ns);
        assert_eq!(
            errors,
            vec![LineError {
                line: 1,
                message: "string field \"fieldKey\" is not stored: only numbers and booleans are".into()
            }]
        );
        let got: Vec<(usize, &str, f64, Option<i64>)> = points
            .iter()
            .map(|p| (p.line, p.name.as_str(), p.value, p.timestamp_ms))
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
        assert_eq!(points[0].tags, vec![("location".to_string(), "us-midwest".to_string())]);
        assert_eq!(points[3].tags, vec![("host name".to_string(), "a=b".to_string())]);
    }

    #[test]
    fn precisions() {
        for (p, ts, ms) in [
            (Precision::Ns, "1700000000123456789", 1_700_000_000_123),
            (Precision::Us, "1700000000123456", 1_700_000_000_123),
            (Precision::Ms, "1700000000123", 1_700_000_000_123),
            (Precision::S, "1700000000", 1_700_000_000_000),
        ] {
            let (points, errors) = parse(&format!("m value=1 {ts}"), p);
            assert!(errors.is_empty());
            assert_eq!(points[0].timestamp_ms, Some(ms), "{p:?}");
        }
        assert_eq!(Precision::parse("us"), Some(Precision::Us));
        assert_eq!(Precision::parse("h"), None);
    }

    #[test]
    fn bad_lines_are_named() {
        let (points, errors) = parse(
            "ok value=1\nnofields\nm v=abc\nm v=1 notatime\n m v=\"open",
            Precision::Ns,
        );
        assert_eq!(points.len(), 1);
        assert_eq!(errors.iter().map(|e| e.line).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
        let (_, errors) = parse("m v=NaN\nm v=inf", Precision::Ns);
        assert_eq!(errors.len(), 2);
    }

    #[test]
    fn quoted_strings_may_hold_separators() {
        let (points, errors) = parse("m,t=a msg=\"a, b = c\",v=2 1", Precision::S);
        assert_eq!(errors.len(), 1, "the string field is refused");
        assert!(points.is_empty(), "a refused line stores nothing");
        let (points, errors) = parse("m v=2,w=3i 1", Precision::S);
        assert!(errors.is_empty());
        assert_eq!(points.len(), 2);
    }

    proptest! {
        #[test]
        fn never_panics(body in "\\PC{0,200}") {
            let _ = parse(&body, Precision::Ns);
        }

        #[test]
        fn numbers_round_trip(name in "[a-z][a-z0-9_]{0,10}", tag in "[a-z]{1,5}", v in -1e9f64..1e9, ts in 0i64..4_000_000_000) {
            let (points, errors) = parse(&format!("{name},t={tag} value={v:?} {ts}"), Precision::S);
            prop_assert!(errors.is_empty());
            prop_assert_eq!(points.len(), 1);
            prop_assert_eq!(&points[0].name, &name);
            prop_assert_eq!(points[0].value, v);
            prop_assert_eq!(points[0].timestamp_ms, Some(ts * 1000));
        }
    }
}
