//! Decoding and per-sample validation of signed JSON ingest batches (DESIGN.md §4.1).
//!
//! Decoding borrows from the request body wherever the JSON has no escapes, and
//! validation never allocates for a valid sample, because this runs for every sample
//! the service accepts. Whole-request problems (not JSON, wrong shape) are a
//! [`DecodeError`]; problems with one sample are a [`Rejection`] that names its index
//! while the rest of the batch is stored.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, Visitor};

use crate::codes::Code;
use crate::model::{EventSource, Kind, NewEvent};
use crate::names;
use crate::time::parse_rfc3339_ms;

/// How far ahead of the server clock a sample may be.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1000;

/// Request-level limits that depend on configuration.
#[derive(Debug, Clone, Copy)]
pub struct SampleLimits {
    pub max_samples: usize,
    /// Samples older than this (the raw retention) are refused.
    pub max_age_ms: i64,
}

impl Default for SampleLimits {
    fn default() -> Self {
        SampleLimits {
            max_samples: 10_000,
            max_age_ms: 30 * 86_400_000,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("{0}")]
    Invalid(String),
    #[error("a request may carry at most {max} samples; this one has {got}")]
    TooManySamples { max: usize, got: usize },
}

impl DecodeError {
    pub fn code(&self) -> Code {
        match self {
            DecodeError::Invalid(_) => Code::InvalidPayload,
            DecodeError::TooManySamples { .. } => Code::TooManySamples,
        }
    }
}

/// A sample value as sent. JSON has no NaN or infinity, but clients send them as
/// strings or null; those are per-sample rejections, not a broken request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WireValue {
    Number(f64),
    NotANumber,
}

impl<'de> Deserialize<'de> for WireValue {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WireValue;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_f64<E>(self, v: f64) -> Result<WireValue, E> {
                Ok(WireValue::Number(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<WireValue, E> {
                Ok(WireValue::Number(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<WireValue, E> {
                Ok(WireValue::Number(v as f64))
            }
            fn visit_str<E>(self, _: &str) -> Result<WireValue, E> {
                Ok(WireValue::NotANumber)
            }
            fn visit_bool<E>(self, _: bool) -> Result<WireValue, E> {
                Ok(WireValue::NotANumber)
            }
            fn visit_unit<E>(self) -> Result<WireValue, E> {
                Ok(WireValue::NotANumber)
            }
            fn visit_none<E>(self) -> Result<WireValue, E> {
                Ok(WireValue::NotANumber)
            }
        }
        d.deserialize_any(V)
    }
}

/// A timestamp as sent: unix milliseconds or RFC 3339 text.
#[derive(Debug, Clone, PartialEq)]
pub enum WireTime<'a> {
    Millis(f64),
    Text(Cow<'a, str>),
    Invalid,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireTime<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WireTime<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("unix milliseconds or an RFC 3339 string")
            }
            fn visit_f64<E>(self, v: f64) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Millis(v))
            }
            fn visit_i64<E>(self, v: i64) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Millis(v as f64))
            }
            fn visit_u64<E>(self, v: u64) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Millis(v as f64))
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Text(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Text(Cow::Owned(v.to_owned())))
            }
            fn visit_bool<E>(self, _: bool) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Invalid)
            }
            fn visit_unit<E>(self) -> Result<WireTime<'de>, E> {
                Ok(WireTime::Invalid)
            }
        }
        d.deserialize_any(V)
    }
}

/// One sample as sent.
#[derive(Debug, Deserialize)]
pub struct WireSample<'a> {
    #[serde(borrow)]
    pub name: Cow<'a, str>,
    pub value: WireValue,
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub timestamp: Option<WireTime<'a>>,
    #[serde(default, borrow)]
    pub tags: WireTags<'a>,
}

impl WireSample<'_> {
    /// Tags sorted by key (JSON objects with a repeated key keep the last value).
    pub fn tags(&self) -> TagIter<'_> {
        self.tags.iter()
    }
}

/// One tag as decoded: borrowed from the body unless it had escapes.
pub type WireTag<'a> = (Cow<'a, str>, Cow<'a, str>);

/// A sample's tags, sorted by key with each key once. Front doors that carry many
/// samples per series (remote-write, a line protocol line with several fields) lend
/// every sample the series' tags instead of copying them per sample: building a map per
/// sample was a tenth of ingest CPU. OTLP lends each mapped point's tags (a histogram
/// point's observations all share its tags).
#[derive(Debug, Clone, Default, PartialEq)]
pub enum WireTags<'a> {
    #[default]
    None,
    /// Parsed from a JSON object.
    Json(Vec<WireTag<'a>>),
    /// Lent by a decoder that borrows from the body (line protocol, remote-write).
    Lent(&'a [WireTag<'a>]),
    /// Lent by a decoder that owns its strings (OTLP).
    Strings(&'a [(String, String)]),
}

impl<'a> WireTags<'a> {
    pub fn len(&self) -> usize {
        match self {
            WireTags::None => 0,
            WireTags::Json(tags) => tags.len(),
            WireTags::Lent(tags) => tags.len(),
            WireTags::Strings(tags) => tags.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn iter(&self) -> TagIter<'_> {
        match self {
            WireTags::None => TagIter::Decoded([].iter()),
            WireTags::Json(tags) => TagIter::Decoded(tags.iter()),
            WireTags::Lent(tags) => TagIter::Decoded(tags.iter()),
            WireTags::Strings(tags) => TagIter::Owned(tags.iter()),
        }
    }

    /// Whether both lend the very same tags (one series' tags lent to several of its
    /// samples): then they are equal without comparing a string. False for tags each
    /// sample owns, even when equal.
    pub fn lent_from_same(&self, other: &WireTags<'_>) -> bool {
        match (self, other) {
            (WireTags::Lent(a), WireTags::Lent(b)) => {
                std::ptr::eq(a.as_ptr().cast::<u8>(), b.as_ptr().cast()) && a.len() == b.len()
            }
            (WireTags::Strings(a), WireTags::Strings(b)) => std::ptr::eq(a.as_ptr(), b.as_ptr()) && a.len() == b.len(),
            _ => false,
        }
    }

    /// Sorts decoded pairs by key; of a repeated key the last one wins, as in a JSON
    /// object read into a map.
    fn from_pairs(mut pairs: Vec<WireTag<'a>>) -> WireTags<'a> {
        crate::names::sort_and_dedup_tags(&mut pairs);
        WireTags::Json(pairs)
    }
}

/// Iterator over [`WireTags`] as `(key, value)`.
#[derive(Clone)]
pub enum TagIter<'t> {
    Decoded(std::slice::Iter<'t, (Cow<'t, str>, Cow<'t, str>)>),
    Owned(std::slice::Iter<'t, (String, String)>),
}

impl<'t> Iterator for TagIter<'t> {
    type Item = (&'t str, &'t str);

    fn next(&mut self) -> Option<Self::Item> {
        match self {
            TagIter::Decoded(it) => it.next().map(|(k, v)| (k.as_ref(), v.as_ref())),
            TagIter::Owned(it) => it.next().map(|(k, v)| (k.as_str(), v.as_str())),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        match self {
            TagIter::Decoded(it) => it.size_hint(),
            TagIter::Owned(it) => it.size_hint(),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for WireTags<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        /// A string borrowed from the body when it has no escapes.
        #[derive(Deserialize)]
        struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = WireTags<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object of tag names to string values")
            }
            fn visit_unit<E>(self) -> Result<WireTags<'de>, E> {
                Ok(WireTags::None)
            }
            fn visit_none<E>(self) -> Result<WireTags<'de>, E> {
                Ok(WireTags::None)
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(self, mut map: M) -> Result<WireTags<'de>, M::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(4).min(names::MAX_TAGS + 1));
                while let Some((Text(k), Text(v))) = map.next_entry::<Text<'de>, Text<'de>>()? {
                    pairs.push((k, v));
                }
                Ok(WireTags::from_pairs(pairs))
            }
        }
        d.deserialize_any(V)
    }
}

/// The body of `POST /api/v1/metrics`.
#[derive(Debug, Deserialize)]
pub struct WireBatch<'a> {
    #[serde(borrow)]
    pub server_id: Cow<'a, str>,
    #[serde(borrow)]
    pub metrics: Vec<WireSample<'a>>,
}

/// Parses a JSON batch. Fails on anything that is not a well-shaped request.
pub fn decode_json<'a>(body: &'a [u8], limits: &SampleLimits) -> Result<WireBatch<'a>, DecodeError> {
    let batch: WireBatch = serde_json::from_slice(body).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if batch.metrics.len() > limits.max_samples {
        return Err(DecodeError::TooManySamples {
            max: limits.max_samples,
            got: batch.metrics.len(),
        });
    }
    Ok(batch)
}

/// Why one sample was refused.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Rejection {
    pub index: usize,
    pub code: Code,
    pub detail: String,
}

impl serde::Serialize for Code {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A sample that passed validation; name and tags are read from its [`WireSample`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ValidSample {
    pub index: usize,
    pub kind: Kind,
    pub timestamp: i64,
    pub value: f64,
}

/// Checks one sample against the rules of DESIGN.md §2 and §4.1.
pub fn validate_sample(
    index: usize,
    sample: &WireSample<'_>,
    now_ms: i64,
    limits: &SampleLimits,
) -> Result<ValidSample, Rejection> {
    validate(index, sample, now_ms, limits, Checks::All)
}

/// [`validate_sample`] for a sample whose name and tags are those of a sample that
/// passed it: only what is its own (type, value, time) is checked, with the same result.
pub fn validate_point(
    index: usize,
    sample: &WireSample<'_>,
    now_ms: i64,
    limits: &SampleLimits,
) -> Result<ValidSample, Rejection> {
    validate(index, sample, now_ms, limits, Checks::PointOnly)
}

#[derive(PartialEq)]
enum Checks {
    All,
    /// Name and tags are known to pass.
    PointOnly,
}

fn validate(
    index: usize,
    sample: &WireSample<'_>,
    now_ms: i64,
    limits: &SampleLimits,
    checks: Checks,
) -> Result<ValidSample, Rejection> {
    let refused = move |(code, detail): Refusal| Rejection { index, code, detail };
    // In the order clients have always been told: name, type, value, tags, time.
    if checks == Checks::All {
        check_name(sample).map_err(refused)?;
    }
    let (kind, value) = check_kind_and_value(sample).map_err(refused)?;
    if checks == Checks::All {
        check_tags(sample).map_err(refused)?;
    }
    let timestamp = check_time(sample, now_ms, limits).map_err(refused)?;
    Ok(ValidSample {
        index,
        kind,
        timestamp,
        value,
    })
}

type Refusal = (Code, String);

fn check_name(sample: &WireSample<'_>) -> Result<(), Refusal> {
    if !names::is_valid_metric_name(&sample.name) {
        return Err((
            Code::InvalidName,
            format!(
                "metric names match [a-zA-Z_][a-zA-Z0-9_.:]* and have at most {} bytes",
                names::MAX_NAME_BYTES
            ),
        ));
    }
    Ok(())
}

fn check_kind_and_value(sample: &WireSample<'_>) -> Result<(Kind, f64), Refusal> {
    let kind = match sample.kind.as_deref() {
        None => Kind::Gauge,
        Some(text) => {
            Kind::parse(text).ok_or_else(|| (Code::InvalidType, "type must be gauge, counter or histogram".into()))?
        }
    };
    let value = match sample.value {
        WireValue::Number(v) if v.is_finite() => v,
        _ => return Err((Code::InvalidValue, "value must be a finite number".into())),
    };
    if kind == Kind::Counter && value < 0.0 {
        return Err((
            Code::InvalidValue,
            "counter values are cumulative totals and cannot be negative".into(),
        ));
    }
    Ok((kind, value))
}

fn check_tags(sample: &WireSample<'_>) -> Result<(), Refusal> {
    let tags = &sample.tags;
    if tags.len() > names::MAX_TAGS {
        return Err((
            Code::TooManyTags,
            format!("at most {} tags per sample, got {}", names::MAX_TAGS, tags.len()),
        ));
    }
    for (k, v) in tags.iter() {
        if !names::is_valid_tag_key(k) {
            return Err((
                Code::InvalidTag,
                format!(
                    "tag keys match [a-zA-Z_][a-zA-Z0-9_.:]* and have at most {} bytes",
                    names::MAX_TAG_KEY_BYTES
                ),
            ));
        }
        if !names::is_valid_tag_value(v) {
            return Err((
                Code::InvalidTag,
                format!(
                    "tag values have at most {} bytes and no control characters",
                    names::MAX_TAG_VALUE_BYTES
                ),
            ));
        }
    }
    Ok(())
}

fn check_time(sample: &WireSample<'_>, now_ms: i64, limits: &SampleLimits) -> Result<i64, Refusal> {
    let timestamp = wire_time_ms(sample.timestamp.as_ref(), now_ms).ok_or_else(bad_timestamp)?;
    if timestamp < now_ms - limits.max_age_ms {
        return Err((
            Code::TooOld,
            format!(
                "timestamp is older than the raw retention of {} days",
                limits.max_age_ms / 86_400_000
            ),
        ));
    }
    if timestamp > now_ms + MAX_FUTURE_MS {
        return Err((
            Code::TooFarAhead,
            "timestamp is more than 5 minutes ahead of the server clock".into(),
        ));
    }
    Ok(timestamp)
}

/// A sample's or an event's time in ms: `now_ms` when none is given, `None` when it is
/// neither plausible unix milliseconds nor RFC 3339.
fn wire_time_ms(time: Option<&WireTime>, now_ms: i64) -> Option<i64> {
    match time {
        None => Some(now_ms),
        Some(WireTime::Millis(ms)) if ms.is_finite() && ms.abs() < 1e15 => Some(*ms as i64),
        Some(WireTime::Text(text)) => parse_rfc3339_ms(text),
        Some(_) => None,
    }
}

fn bad_timestamp() -> Refusal {
    (
        Code::InvalidTimestamp,
        "timestamp must be unix milliseconds or RFC 3339".into(),
    )
}

/// The body of `POST /api/v1/events`.
#[derive(Debug, Deserialize)]
pub struct WireEvent<'a> {
    pub server_id: String,
    pub kind: String,
    pub title: String,
    #[serde(default)]
    pub detail: Option<String>,
    #[serde(default, borrow)]
    pub at: Option<WireTime<'a>>,
}

/// Kinds an author may post; the others are written by the system.
pub const AUTHOR_EVENT_KINDS: [&str; 3] = ["deploy", "release", "incident"];

pub fn decode_event(body: &[u8], now_ms: i64) -> Result<NewEvent, DecodeError> {
    let wire: WireEvent = serde_json::from_slice(body).map_err(|e| DecodeError::Invalid(e.to_string()))?;
    if !AUTHOR_EVENT_KINDS.contains(&wire.kind.as_str()) {
        return Err(DecodeError::Invalid("kind must be deploy, release or incident".into()));
    }
    let title = wire.title.trim();
    if title.is_empty() || title.chars().count() > 200 {
        return Err(DecodeError::Invalid("title must be 1 to 200 characters".into()));
    }
    if wire.detail.as_ref().is_some_and(|d| d.chars().count() > 4000) {
        return Err(DecodeError::Invalid("detail must be at most 4000 characters".into()));
    }
    let at = wire_time_ms(wire.at.as_ref(), now_ms)
        .ok_or_else(|| DecodeError::Invalid("at must be RFC 3339 or unix ms".into()))?;
    Ok(NewEvent {
        server_id: wire.server_id,
        kind: wire.kind,
        title: title.to_owned(),
        detail: wire.detail,
        at,
        source: EventSource::Author,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_750_000_000_000;

    #[test]
    fn only_the_same_lent_tags_count_as_the_same() {
        let a = vec![("k".to_string(), "v".to_string())];
        let equal = a.clone();
        assert!(WireTags::Strings(&a).lent_from_same(&WireTags::Strings(&a)));
        assert!(!WireTags::Strings(&a).lent_from_same(&WireTags::Strings(&equal)));
        assert!(!WireTags::Strings(&a).lent_from_same(&WireTags::Strings(&a[..0])));
        let json = WireTags::Json(vec![("k".into(), "v".into())]);
        assert!(!json.lent_from_same(&json.clone()));
        assert!(!WireTags::None.lent_from_same(&WireTags::None));
        // Line protocol lends ranges of one shared vector.
        let lent: Vec<WireTag<'_>> = vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "1".into()),
        ];
        assert!(WireTags::Lent(&lent[0..1]).lent_from_same(&WireTags::Lent(&lent[0..1])));
        assert!(!WireTags::Lent(&lent[0..1]).lent_from_same(&WireTags::Lent(&lent[0..2])));
        assert!(!WireTags::Lent(&lent[0..1]).lent_from_same(&WireTags::Lent(&lent[2..3])));
    }

    fn validate_all(body: &str) -> (Vec<ValidSample>, Vec<Rejection>) {
        let limits = SampleLimits::default();
        let batch = decode_json(body.as_bytes(), &limits).unwrap();
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (i, s) in batch.metrics.iter().enumerate() {
            match validate_sample(i, s, NOW, &limits) {
                Ok(v) => ok.push(v),
                Err(r) => bad.push(r),
            }
        }
        (ok, bad)
    }

    #[test]
    fn decodes_the_design_example() {
        let body = r#"{"server_id":"acme-search","metrics":[
          {"name":"response_time","value":120,"type":"histogram","timestamp":"2025-06-15T15:06:40Z","tags":{"tool":"search"}}]}"#;
        let limits = SampleLimits {
            max_age_ms: i64::MAX / 2,
            ..Default::default()
        };
        let batch = decode_json(body.as_bytes(), &limits).unwrap();
        assert_eq!(batch.server_id, "acme-search");
        let v = validate_sample(0, &batch.metrics[0], NOW, &limits).unwrap();
        assert_eq!(v.kind, Kind::Histogram);
        assert_eq!(v.value, 120.0);
        assert_eq!(v.timestamp, NOW);
        assert_eq!(batch.metrics[0].tags().collect::<Vec<_>>(), vec![("tool", "search")]);
    }

    #[test]
    fn tags_are_sorted_and_a_repeated_key_keeps_its_last_value() {
        let body = r#"{"server_id":"a","metrics":[
            {"name":"x","value":1,"tags":{"z":"1","a":"first","m":"e\u0301","a":"last"}},
            {"name":"x","value":1,"tags":null},
            {"name":"x","value":1}]}"#;
        let batch = decode_json(body.as_bytes(), &SampleLimits::default()).unwrap();
        assert_eq!(
            batch.metrics[0].tags().collect::<Vec<_>>(),
            vec![("a", "last"), ("m", "e\u{301}"), ("z", "1")]
        );
        assert_eq!(batch.metrics[1].tags().count(), 0);
        assert_eq!(batch.metrics[2].tags, WireTags::None);
        assert!(
            decode_json(
                br#"{"server_id":"a","metrics":[{"name":"x","value":1,"tags":{"a":1}}]}"#,
                &SampleLimits::default()
            )
            .is_err()
        );
    }

    #[test]
    fn defaults_gauge_and_now() {
        let (ok, bad) = validate_all(r#"{"server_id":"a","metrics":[{"name":"x","value":1.5}]}"#);
        assert!(bad.is_empty());
        assert_eq!(ok[0].kind, Kind::Gauge);
        assert_eq!(ok[0].timestamp, NOW);
    }

    #[test]
    fn per_sample_rejections_name_their_index() {
        let tags: String = (0..17).map(|i| format!(r#""k{i}":"v""#)).collect::<Vec<_>>().join(",");
        let body = format!(
            r#"{{"server_id":"a","metrics":[
            {{"name":"ok","value":1}},
            {{"name":"1bad","value":1}},
            {{"name":"x","value":"NaN"}},
            {{"name":"x","value":null}},
            {{"name":"x","value":1,"type":"summary"}},
            {{"name":"x","value":1,"tags":{{{tags}}}}},
            {{"name":"x","value":1,"tags":{{"bad key":"v"}}}},
            {{"name":"x","value":1,"timestamp":{old}}},
            {{"name":"x","value":1,"timestamp":{ahead}}},
            {{"name":"x","value":1,"timestamp":"yesterday"}},
            {{"name":"x","value":-1,"type":"counter"}},
            {{"name":"x","value":2,"timestamp":{edge}}}
            ]}}"#,
            old = NOW - 31 * 86_400_000,
            ahead = NOW + MAX_FUTURE_MS + 1,
            edge = NOW + MAX_FUTURE_MS,
        );
        let (ok, bad) = validate_all(&body);
        assert_eq!(ok.iter().map(|v| v.index).collect::<Vec<_>>(), vec![0, 11]);
        let codes: Vec<(usize, Code)> = bad.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(
            codes,
            vec![
                (1, Code::InvalidName),
                (2, Code::InvalidValue),
                (3, Code::InvalidValue),
                (4, Code::InvalidType),
                (5, Code::TooManyTags),
                (6, Code::InvalidTag),
                (7, Code::TooOld),
                (8, Code::TooFarAhead),
                (9, Code::InvalidTimestamp),
                (10, Code::InvalidValue),
            ]
        );
    }

    #[test]
    fn whole_request_errors() {
        let limits = SampleLimits {
            max_samples: 2,
            ..Default::default()
        };
        assert!(matches!(
            decode_json(b"not json", &limits),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_json(br#"{"server_id":"a"}"#, &limits),
            Err(DecodeError::Invalid(_))
        ));
        assert!(matches!(
            decode_json(br#"{"server_id":"a","metrics":[{"value":1}]}"#, &limits),
            Err(DecodeError::Invalid(_))
        ));
        let three =
            br#"{"server_id":"a","metrics":[{"name":"a","value":1},{"name":"a","value":1},{"name":"a","value":1}]}"#;
        assert_eq!(
            decode_json(three, &limits).unwrap_err(),
            DecodeError::TooManySamples { max: 2, got: 3 }
        );
    }

    #[test]
    fn escaped_strings_decode() {
        let (ok, bad) =
            validate_all(r#"{"server_id":"a","metrics":[{"name":"x","value":1,"tags":{"t":"a\"b\u00e9"}}]}"#);
        assert!(bad.is_empty(), "{bad:?}");
        assert_eq!(ok.len(), 1);
    }

    #[test]
    fn events() {
        let e = decode_event(
            br#"{"server_id":"a","kind":"deploy","title":" v1.2 ","at":"2025-06-02T12:00:00Z"}"#,
            NOW,
        )
        .unwrap();
        assert_eq!(
            (e.kind.as_str(), e.title.as_str(), e.at),
            ("deploy", "v1.2", 1_748_865_600_000)
        );
        assert!(decode_event(br#"{"server_id":"a","kind":"outage_started","title":"x"}"#, NOW).is_err());
        assert!(decode_event(br#"{"server_id":"a","kind":"deploy","title":""}"#, NOW).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let limits = SampleLimits::default();
            if let Ok(batch) = decode_json(&bytes, &limits) {
                for (i, s) in batch.metrics.iter().enumerate() {
                    let _ = validate_sample(i, s, NOW, &limits);
                }
            }
        }

        #[test]
        fn valid_samples_round_trip(name in "[a-zA-Z_][a-zA-Z0-9_.:]{0,40}", value in -1e12f64..1e12, offset in -86_400_000i64..MAX_FUTURE_MS) {
            let body = serde_json::json!({"server_id":"a","metrics":[{"name":name,"value":value,"timestamp":NOW + offset}]}).to_string();
            let limits = SampleLimits::default();
            let batch = decode_json(body.as_bytes(), &limits).unwrap();
            let v = validate_sample(0, &batch.metrics[0], NOW, &limits).unwrap();
            prop_assert_eq!(v.value, value);
            prop_assert_eq!(v.timestamp, NOW + offset);
            prop_assert_eq!(batch.metrics[0].name.as_ref(), name.as_str());
        }

        /// Once a sample's name and tags passed, checking only its type, value and time
        /// gives exactly the full check's answer, refusals included.
        #[test]
        fn the_point_check_answers_as_the_full_check_does(
            kind in proptest::option::of(prop_oneof![Just("gauge"), Just("counter"), Just("histogram"), Just("summary")]),
            value in prop_oneof![any::<f64>(), -10.0f64..10.0, Just(f64::NAN)],
            timestamp in proptest::option::of(prop_oneof![
                (-100_000_000_000i64..20_000_000).prop_map(|d| WireTime::Millis((NOW + d) as f64)),
                Just(WireTime::Millis(f64::INFINITY)),
                Just(WireTime::Text("2026-01-01T00:00:00Z".into())),
                Just(WireTime::Text("yesterday".into())),
            ]),
        ) {
            let tags = [("tool".to_string(), "search".to_string())];
            let sample = WireSample {
                name: "latency".into(),
                value: WireValue::Number(value),
                kind: kind.map(Into::into),
                timestamp,
                tags: WireTags::Strings(&tags),
            };
            let limits = SampleLimits::default();
            prop_assert_eq!(validate_point(3, &sample, NOW, &limits), validate_sample(3, &sample, NOW, &limits));
        }
    }
}
