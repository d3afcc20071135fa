//! Prometheus remote-write 1.0 (DESIGN.md §5): a snappy *block*-compressed protobuf
//! `WriteRequest`. `__name__` is the metric name and the other labels are tags; series
//! named `*_total`, `*_bucket`, `*_sum` or `*_count` are counters (classic histograms
//! arrive as those three), everything else a gauge. NaN samples are dropped, not stored:
//! stale markers (the NaN bit pattern Prometheus writes when a series disappears) and the
//! NaN that is Prometheus' "no value" (a summary's quantiles before any observation).

use std::borrow::Cow;

use prost::Message;

use crate::ingest::WireTag;
use crate::protowire::{FIXED64, LEN, Reader, VARINT, WireError};

/// `prometheus.WriteRequest` (only the fields remote-write 1.0 senders fill).
#[derive(Clone, PartialEq, Message)]
pub struct WriteRequest {
    #[prost(message, repeated, tag = "1")]
    pub timeseries: Vec<TimeSeries>,
}

#[derive(Clone, PartialEq, Message)]
pub struct TimeSeries {
    #[prost(message, repeated, tag = "1")]
    pub labels: Vec<Label>,
    #[prost(message, repeated, tag = "2")]
    pub samples: Vec<Sample>,
}

#[derive(Clone, PartialEq, Message)]
pub struct Label {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

#[derive(Clone, PartialEq, Message)]
pub struct Sample {
    #[prost(double, tag = "1")]
    pub value: f64,
    /// Unix milliseconds.
    #[prost(int64, tag = "2")]
    pub timestamp: i64,
}

/// The bits of Prometheus' staleness marker (`value.StaleNaN`).
pub const STALE_NAN_BITS: u64 = 0x7ff0_0000_0000_0002;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PromError {
    #[error("the body is not snappy block-compressed data: {0}")]
    Snappy(String),
    #[error("the decompressed body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body is not a protobuf WriteRequest: {0}")]
    Protobuf(String),
}

/// A decoded request: its series, their tags and samples in two flat lists (two
/// allocations for the whole request instead of several per series), every string
/// borrowed from the decompressed body.
#[derive(Debug, Default)]
pub struct Decoded<'a> {
    /// NaN samples dropped: stale markers, and the NaN that is Prometheus' "no value"
    /// (the quantiles of a summary that has seen no observation yet).
    pub nan_dropped: usize,
    spans: Vec<Span<'a>>,
    tags: Vec<WireTag<'a>>,
    samples: Vec<Sample>,
}

#[derive(Debug)]
struct Span<'a> {
    name: &'a str,
    tags: std::ops::Range<usize>,
    samples: std::ops::Range<usize>,
    repeated_label: Option<Cow<'a, str>>,
}

/// One series of a request, ready for validation. Its samples share its name and tags
/// (ingest lends them to every sample instead of copying them per sample).
#[derive(Debug, Clone, PartialEq)]
pub struct PromSeries<'d> {
    /// Empty when the series has no `__name__` (validation refuses it).
    pub name: &'d str,
    /// Sorted by key.
    pub tags: &'d [WireTag<'d>],
    pub counter: bool,
    /// Without NaN samples.
    pub samples: &'d [Sample],
    /// A label name the series repeats (`__name__` included): its samples are refused,
    /// as Prometheus' own receiver skips such a series, since which value was meant
    /// cannot be told. `tags` then keeps one value per name.
    pub repeated_label: Option<&'d str>,
}

impl<'a> Decoded<'a> {
    /// The series in request order.
    pub fn series(&self) -> impl Iterator<Item = PromSeries<'_>> {
        self.spans.iter().map(|span| PromSeries {
            name: span.name,
            tags: &self.tags[span.tags.clone()],
            counter: is_counter_name(span.name),
            samples: &self.samples[span.samples.clone()],
            repeated_label: span.repeated_label.as_deref(),
        })
    }

    /// Reads one `TimeSeries` message.
    fn time_series(&mut self, mut r: Reader<'a>) -> Result<(), WireError> {
        let (tags_start, samples_start) = (self.tags.len(), self.samples.len());
        let mut name = None;
        let mut repeated_label = None;
        while !r.is_empty() {
            match r.key()? {
                (1, wire) => {
                    Reader::expect(1, wire, LEN)?;
                    let (key, value) = label(r.message()?)?;
                    if key != "__name__" {
                        self.tags.push((Cow::Borrowed(key), Cow::Borrowed(value)));
                    } else if name.is_some() {
                        repeated_label.get_or_insert(Cow::Borrowed(key));
                    } else {
                        name = Some(value);
                    }
                }
                (2, wire) => {
                    Reader::expect(2, wire, LEN)?;
                    let sample = sample(r.message()?)?;
                    if sample.value.is_nan() {
                        self.nan_dropped += 1;
                    } else {
                        self.samples.push(sample);
                    }
                }
                (field, wire) => r.skip(field, wire)?,
            }
        }
        if let Some(key) = crate::names::sort_tags_find_repeated(&mut self.tags[tags_start..]) {
            repeated_label.get_or_insert_with(|| key.clone());
            // Keep one pair per key (the series is refused; which value stays is moot).
            let mut kept = tags_start;
            for i in tags_start + 1..self.tags.len() {
                if self.tags[i].0 != self.tags[kept].0 {
                    kept += 1;
                    self.tags.swap(kept, i);
                }
            }
            self.tags.truncate(kept + 1);
        }
        self.spans.push(Span {
            name: name.unwrap_or_default(),
            tags: tags_start..self.tags.len(),
            samples: samples_start..self.samples.len(),
            repeated_label,
        });
        Ok(())
    }
}

/// Reads a `Label` message: (name, value), either empty when absent.
fn label(mut r: Reader<'_>) -> Result<(&str, &str), WireError> {
    let (mut name, mut value) = ("", "");
    while !r.is_empty() {
        match r.key()? {
            (1, wire) => {
                Reader::expect(1, wire, LEN)?;
                name = r.str()?;
            }
            (2, wire) => {
                Reader::expect(2, wire, LEN)?;
                value = r.str()?;
            }
            (field, wire) => r.skip(field, wire)?,
        }
    }
    Ok((name, value))
}

/// Reads a `Sample` message (a value of 0 at the epoch when its fields are absent).
fn sample(mut r: Reader<'_>) -> Result<Sample, WireError> {
    let mut sample = Sample::default();
    while !r.is_empty() {
        match r.key()? {
            (1, wire) => {
                Reader::expect(1, wire, FIXED64)?;
                sample.value = f64::from_bits(r.fixed64()?);
            }
            (2, wire) => {
                Reader::expect(2, wire, VARINT)?;
                // int64: the varint is the value's two's complement.
                sample.timestamp = r.varint()? as i64;
            }
            (field, wire) => r.skip(field, wire)?,
        }
    }
    Ok(sample)
}

/// Whether a series is cumulative by Prometheus naming conventions.
pub fn is_counter_name(name: &str) -> bool {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Decompresses a body, refusing one that would be larger than `max_decompressed`
/// before allocating for it.
pub fn decompress(body: &[u8], max_decompressed: usize) -> Result<Vec<u8>, PromError> {
    let len = snap::raw::decompress_len(body).map_err(|e| PromError::Snappy(e.to_string()))?;
    if len > max_decompressed {
        return Err(PromError::TooLarge(max_decompressed));
    }
    snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| PromError::Snappy(e.to_string()))
}

/// Decodes a decompressed `WriteRequest`, borrowing every name and label from it, and
/// drops NaN samples (stale markers and "no value"). Accepts and refuses what prost's decoding of [`WriteRequest`]
/// does (a property test and the fuzz target compare the two).
pub fn decode(raw: &[u8]) -> Result<Decoded<'_>, PromError> {
    let mut decoded = Decoded::default();
    let mut r = Reader::new(raw);
    let result = (|| {
        while !r.is_empty() {
            match r.key()? {
                (1, wire) => {
                    Reader::expect(1, wire, LEN)?;
                    decoded.time_series(r.message()?)?;
                }
                (field, wire) => r.skip(field, wire)?,
            }
        }
        Ok(())
    })();
    result.map_err(|e: WireError| PromError::Protobuf(e.to_string()))?;
    Ok(decoded)
}

/// Encodes a request as senders do (used by tests and the load generator).
impl TimeSeries {
    /// A series named `name` with these other labels and (value, unix ms) samples, as a
    /// sender builds it.
    pub fn named(name: &str, labels: &[(&str, &str)], samples: &[(f64, i64)]) -> TimeSeries {
        let mut all = vec![Label {
            name: "__name__".into(),
            value: name.into(),
        }];
        all.extend(labels.iter().map(|(k, v)| Label {
            name: (*k).into(),
            value: (*v).into(),
        }));
        TimeSeries {
            labels: all,
            samples: samples
                .iter()
                .map(|(v, t)| Sample {
                    value: *v,
                    timestamp: *t,
                })
                .collect(),
        }
    }
}

pub fn encode(request: &WriteRequest) -> Vec<u8> {
    snap::raw::Encoder::new()
        .compress_vec(&request.encode_to_vec())
        .expect("snappy compression of a buffer cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Decompresses and decodes, then lists each series as owned values.
    fn decoded(body: &[u8]) -> Result<(Vec<Owned>, usize), PromError> {
        let raw = decompress(body, 1 << 20)?;
        let decoded = decode(&raw)?;
        Ok((decoded.series().map(|s| Owned::of(&s)).collect(), decoded.nan_dropped))
    }

    #[derive(Debug, Clone, PartialEq)]
    struct Owned {
        name: String,
        tags: Vec<(String, String)>,
        counter: bool,
        samples: Vec<(u64, i64)>,
        repeated_label: Option<String>,
    }

    impl Owned {
        fn of(s: &PromSeries<'_>) -> Owned {
            Owned {
                name: s.name.into(),
                tags: s.tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                counter: s.counter,
                samples: s.samples.iter().map(|x| (x.value.to_bits(), x.timestamp)).collect(),
                repeated_label: s.repeated_label.map(str::to_owned),
            }
        }
    }

    /// What prost's decoding of the same bytes means, mapped by the rules in the module
    /// doc: the reference the borrowing decoder must agree with.
    fn reference(raw: &[u8]) -> Result<(Vec<Owned>, usize), prost::DecodeError> {
        let request = WriteRequest::decode(raw)?;
        let mut stale = 0;
        let series = request
            .timeseries
            .into_iter()
            .map(|one| {
                let mut name = None;
                let mut repeated_label = None;
                let mut tags = Vec::new();
                for label in one.labels {
                    if label.name != "__name__" {
                        tags.push((label.name, label.value));
                    } else if name.is_some() {
                        repeated_label.get_or_insert(label.name);
                    } else {
                        name = Some(label.value);
                    }
                }
                tags.sort_by(|a, b| a.0.cmp(&b.0));
                if let Some(w) = tags.windows(2).find(|w| w[0].0 == w[1].0) {
                    repeated_label.get_or_insert(w[0].0.clone());
                }
                let name = name.unwrap_or_default();
                let samples: Vec<(u64, i64)> = one
                    .samples
                    .iter()
                    .map(|x| (x.value.to_bits(), x.timestamp))
                    .filter(|&(bits, _)| !f64::from_bits(bits).is_nan())
                    .collect();
                stale += one.samples.len() - samples.len();
                Owned {
                    counter: is_counter_name(&name),
                    name,
                    tags,
                    samples,
                    repeated_label,
                }
            })
            .collect();
        Ok((series, stale))
    }

    /// The borrowing decoder against prost on the same decompressed bytes: both refuse,
    /// or both give the same series (tags compared as key sets where a key repeats, since
    /// a refused series keeps any one value per key).
    fn agrees_with_prost(raw: &[u8]) -> Result<(), TestCaseError> {
        let ours = decode(raw).map(|d| (d.series().map(|s| Owned::of(&s)).collect::<Vec<_>>(), d.nan_dropped));
        match (ours, reference(raw)) {
            (Err(_), Err(_)) => {}
            (Ok((mut ours, stale)), Ok((mut theirs, their_stale))) => {
                prop_assert_eq!(stale, their_stale);
                for s in ours.iter_mut().chain(theirs.iter_mut()) {
                    if s.repeated_label.is_some() {
                        s.tags.dedup_by(|a, b| a.0 == b.0);
                        s.tags.iter_mut().for_each(|t| t.1.clear());
                    }
                }
                prop_assert_eq!(ours, theirs);
            }
            (ours, theirs) => prop_assert!(false, "ours {:?}, prost {:?}", ours, theirs),
        }
        Ok(())
    }

    #[test]
    fn decodes_names_tags_kinds_and_drops_nan_samples() {
        let request = WriteRequest {
            timeseries: vec![
                TimeSeries::named(
                    "http_requests_total",
                    &[("job", "api"), ("code", "200")],
                    &[(10.0, 1000), (f64::from_bits(STALE_NAN_BITS), 2000), (f64::NAN, 3000)],
                ),
                TimeSeries::named("up", &[("job", "api")], &[(1.0, 1000)]),
                TimeSeries::named("latency_seconds_bucket", &[("le", "0.5")], &[(3.0, 1000)]),
            ],
        };
        let (series, dropped) = decoded(&encode(&request)).unwrap();
        assert_eq!(dropped, 2, "the stale marker and the other NaN");
        assert_eq!(series.len(), 3);
        assert_eq!(series[0].name, "http_requests_total");
        assert_eq!(
            series[0].tags,
            vec![
                ("code".to_string(), "200".to_string()),
                ("job".to_string(), "api".to_string())
            ]
        );
        assert_eq!(series[0].samples, vec![(10.0f64.to_bits(), 1000)]);
        assert!(series[0].counter && !series[1].counter && series[2].counter);
        assert_eq!(series[1].samples, vec![(1.0f64.to_bits(), 1000)]);
    }

    #[test]
    fn refuses_bad_bodies() {
        assert!(matches!(
            decoded(b"not snappy at all"),
            Err(PromError::Snappy(_)) | Err(PromError::Protobuf(_))
        ));
        // Frame format (what `snappy` tools write by default) is not the block format.
        assert!(decoded(&[0xff, 0x06, 0x00, 0x00, b's', b'N', b'a', b'P', b'p', b'Y']).is_err());
        let big = WriteRequest {
            timeseries: vec![TimeSeries::named("x", &[("pad", &"p".repeat(4096))], &[(1.0, 1)])],
        };
        assert_eq!(decompress(&encode(&big), 1024), Err(PromError::TooLarge(1024)));
        for garbage in [
            &[0x0a, 0xff, 0xff, 0xff][..],         // a series longer than the body
            &[0x08, 0x01],                         // timeseries as a varint
            &[0x0a, 0x02, 0x12, 0x00],             // an empty sample: valid, 0 at the epoch
            &[0x0a, 0x03, 0x12, 0x01, 0x09],       // a sample whose value is cut short
            &[0x0a, 0x04, 0x0a, 0x02, 0x0a, 0x80], // a label name that is not UTF-8
        ] {
            let compressed = snap::raw::Encoder::new().compress_vec(garbage).unwrap();
            let ours = decoded(&compressed);
            assert_eq!(ours.is_ok(), reference(garbage).is_ok(), "{garbage:?}: {ours:?}");
        }
    }

    #[test]
    fn a_repeated_label_name_marks_its_series() {
        let repeated = |labels: &[(&str, &str)]| WriteRequest {
            timeseries: vec![
                TimeSeries::named("ok", &[("a", "1")], &[(1.0, 1)]),
                TimeSeries::named("x", labels, &[(1.0, 1)]),
            ],
        };
        let marked = |labels: &[(&str, &str)]| {
            let (series, _) = decoded(&encode(&repeated(labels))).unwrap();
            assert_eq!(series[0].repeated_label, None, "the other series is not marked");
            assert!(series[1].tags.windows(2).all(|w| w[0].0 < w[1].0), "tags unique");
            series[1].repeated_label.clone()
        };
        assert_eq!(marked(&[("b", "2"), ("a", "1"), ("b", "3")]), Some("b".into()));
        assert_eq!(marked(&[("__name__", "y")]), Some("__name__".into()));
        assert_eq!(marked(&[("b", "2"), ("a", "1")]), None);
        assert_eq!(
            marked(&[("b", "2"), ("b", "3"), ("c", "1"), ("c", "1"), ("d", "0")]),
            Some("b".into())
        );
    }

    /// Unknown fields (the metadata of newer senders, say) are skipped, groups included.
    #[test]
    fn skips_unknown_fields() {
        let mut raw = WriteRequest {
            timeseries: vec![TimeSeries::named("up", &[("job", "a")], &[(1.0, 5)])],
        }
        .encode_to_vec();
        // Field 3 (metadata), a varint field 9, a group 10 holding a fixed32.
        raw.extend_from_slice(&[0x1a, 0x02, 0x08, 0x01, 0x48, 0x05, 0x53, 0x0d, 1, 2, 3, 4, 0x54]);
        let (series, _) = decoded(&snap::raw::Encoder::new().compress_vec(&raw).unwrap()).unwrap();
        assert_eq!(series.len(), 1);
        assert_eq!(series[0].name, "up");
        agrees_with_prost(&raw).unwrap();
    }

    /// A length-delimited field (one-byte key) holding `body`.
    fn field(key: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![key];
        prost::encoding::encode_varint(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    /// prost's recursion limit, where it bites: unknown groups nested 97 to 101 deep
    /// (holding a varint field) in the request, a series, a label and a sample are
    /// accepted or refused as prost accepts or refuses them.
    #[test]
    fn nesting_is_limited_as_prost_limits_it() {
        let mut refused_at = Vec::new();
        for groups in 97..=101 {
            let mut nest = vec![0x1b; groups];
            nest.extend_from_slice(&[0x08, 0x00]);
            nest.extend(std::iter::repeat_n(0x1c, groups));
            let label = field(0x0a, &[field(0x0a, b"up"), nest.clone()].concat());
            let sample = field(0x12, &nest);
            for (level, raw) in [
                ("request", nest.clone()),
                ("series", field(0x0a, &nest)),
                ("label", field(0x0a, &label)),
                ("sample", field(0x0a, &sample)),
            ] {
                agrees_with_prost(&raw).unwrap_or_else(|e| panic!("{level}, {groups} groups: {e}"));
                if decode(&raw).is_err() && reference(&raw).is_err() {
                    refused_at.push((level, groups));
                }
            }
        }
        // Each level is refused one group earlier than the level above it.
        assert!(refused_at.contains(&("request", 100)) && !refused_at.contains(&("request", 99)));
        assert!(refused_at.contains(&("series", 99)) && !refused_at.contains(&("series", 98)));
        assert!(refused_at.contains(&("label", 98)) && !refused_at.contains(&("label", 97)));
        assert!(refused_at.contains(&("sample", 98)) && !refused_at.contains(&("sample", 97)));
    }

    fn arb_series() -> impl Strategy<Value = TimeSeries> {
        let label = (
            prop_oneof![Just("__name__".to_string()), "[a-c]{0,2}", "\\PC{0,3}"],
            "\\PC{0,4}",
        );
        let sample = (
            prop_oneof![
                any::<f64>(),
                Just(f64::from_bits(STALE_NAN_BITS)),
                Just(f64::NAN),
                Just(0.0)
            ],
            any::<i64>(),
        );
        (
            proptest::collection::vec(label, 0..6),
            proptest::collection::vec(sample, 0..4),
        )
            .prop_map(|(labels, samples)| TimeSeries {
                labels: labels.into_iter().map(|(name, value)| Label { name, value }).collect(),
                samples: samples
                    .into_iter()
                    .map(|(value, timestamp)| Sample { value, timestamp })
                    .collect(),
            })
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decoded(&bytes);
            let _ = decode(&bytes);
        }

        #[test]
        fn round_trips(values in proptest::collection::vec((-1e9f64..1e9, 0i64..4_000_000_000_000), 1..50)) {
            let request = WriteRequest { timeseries: vec![TimeSeries::named("g", &[("a", "b")], &values)] };
            let (series, stale) = decoded(&encode(&request)).unwrap();
            prop_assert_eq!(stale, 0);
            let got: Vec<(u64, i64)> = series[0].samples.clone();
            let want: Vec<(u64, i64)> = values.iter().map(|(v, t)| (v.to_bits(), *t)).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn agrees_with_prost_on_requests(timeseries in proptest::collection::vec(arb_series(), 0..6)) {
            agrees_with_prost(&WriteRequest { timeseries }.encode_to_vec())?;
        }

        #[test]
        fn agrees_with_prost_on_damaged_requests(
            timeseries in proptest::collection::vec(arb_series(), 1..4),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let raw = WriteRequest { timeseries }.encode_to_vec();
            agrees_with_prost(&raw[..cut.index(raw.len() + 1)])?;
            let mut flipped = raw.clone();
            let at = flip.0.index(flipped.len());
            flipped[at] ^= flip.1;
            agrees_with_prost(&flipped)?;
        }

        #[test]
        fn agrees_with_prost_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            agrees_with_prost(&bytes)?;
        }
    }
}
