//! Prometheus remote-write 1.0 (DESIGN.md §5): a snappy *block*-compressed protobuf
//! `WriteRequest`. `__name__` is the metric name and the other labels are tags; series
//! named `*_total`, `*_bucket`, `*_sum` or `*_count` are counters (classic histograms
//! arrive as those three), everything else a gauge. Stale markers — the NaN bit pattern
//! Prometheus writes when a series disappears — are dropped, not stored.

use prost::Message;

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

/// One series of a request, ready for validation. Its samples share its name and tags
/// (ingest lends them to every sample instead of copying them per sample).
#[derive(Debug, Clone, PartialEq)]
pub struct PromSeries {
    pub name: String,
    /// Sorted by key.
    pub tags: Vec<(String, String)>,
    pub counter: bool,
    /// Without stale markers.
    pub samples: Vec<Sample>,
    /// A label name the series repeats (`__name__` included): its samples are refused,
    /// as Prometheus' own receiver skips such a series, since which value was meant
    /// cannot be told. `tags` then keeps one value per name.
    pub repeated_label: Option<String>,
}

/// Whether a series is cumulative by Prometheus naming conventions.
pub fn is_counter_name(name: &str) -> bool {
    ["_total", "_bucket", "_sum", "_count"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Decompresses and decodes a body; returns the series and how many stale markers were
/// dropped. A series without `__name__` gets an empty name (refused by validation).
pub fn decode(body: &[u8], max_decompressed: usize) -> Result<(Vec<PromSeries>, usize), PromError> {
    let len = snap::raw::decompress_len(body).map_err(|e| PromError::Snappy(e.to_string()))?;
    if len > max_decompressed {
        return Err(PromError::TooLarge(max_decompressed));
    }
    let raw = snap::raw::Decoder::new()
        .decompress_vec(body)
        .map_err(|e| PromError::Snappy(e.to_string()))?;
    let request = WriteRequest::decode(raw.as_slice()).map_err(|e| PromError::Protobuf(e.to_string()))?;
    let mut stale = 0;
    let mut series = Vec::with_capacity(request.timeseries.len());
    for mut one in request.timeseries {
        let mut name = None;
        let mut repeated_label = None;
        let mut tags: Vec<(String, String)> = Vec::with_capacity(one.labels.len());
        for label in one.labels {
            if label.name == "__name__" {
                if name.is_some() {
                    repeated_label.get_or_insert(label.name);
                    continue;
                }
                name = Some(label.value);
            } else {
                tags.push((label.name, label.value));
            }
        }
        if let Some(key) = crate::names::sort_tags_find_repeated(&mut tags) {
            repeated_label.get_or_insert_with(|| key.clone());
            tags.dedup_by(|a, b| a.0 == b.0);
        }
        let name = name.unwrap_or_default();
        let before = one.samples.len();
        one.samples.retain(|s| s.value.to_bits() != STALE_NAN_BITS);
        stale += before - one.samples.len();
        series.push(PromSeries {
            counter: is_counter_name(&name),
            name,
            tags,
            samples: one.samples,
            repeated_label,
        });
    }
    Ok((series, stale))
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

    #[test]
    fn decodes_names_tags_kinds_and_drops_stale_markers() {
        let request = WriteRequest {
            timeseries: vec![
                TimeSeries::named(
                    "http_requests_total",
                    &[("job", "api"), ("code", "200")],
                    &[(10.0, 1000), (f64::from_bits(STALE_NAN_BITS), 2000)],
                ),
                TimeSeries::named("up", &[("job", "api")], &[(1.0, 1000)]),
                TimeSeries::named("latency_seconds_bucket", &[("le", "0.5")], &[(3.0, 1000)]),
            ],
        };
        let (series, stale) = decode(&encode(&request), 1 << 20).unwrap();
        assert_eq!(stale, 1);
        assert_eq!(series.len(), 3);
        assert_eq!(series[0].name, "http_requests_total");
        assert_eq!(
            series[0].tags,
            vec![
                ("code".to_string(), "200".to_string()),
                ("job".to_string(), "api".to_string())
            ]
        );
        assert_eq!(
            series[0].samples,
            vec![Sample {
                value: 10.0,
                timestamp: 1000
            }]
        );
        assert!(series[0].counter && !series[1].counter && series[2].counter);
        assert_eq!(
            series[1].samples,
            vec![Sample {
                value: 1.0,
                timestamp: 1000
            }]
        );
    }

    #[test]
    fn refuses_bad_bodies() {
        assert!(matches!(
            decode(b"not snappy at all", 1 << 20),
            Err(PromError::Snappy(_)) | Err(PromError::Protobuf(_))
        ));
        // Frame format (what `snappy` tools write by default) is not the block format.
        assert!(decode(&[0xff, 0x06, 0x00, 0x00, b's', b'N', b'a', b'P', b'p', b'Y'], 1 << 20).is_err());
        let big = WriteRequest {
            timeseries: vec![TimeSeries::named("x", &[("pad", &"p".repeat(4096))], &[(1.0, 1)])],
        };
        assert_eq!(decode(&encode(&big), 1024), Err(PromError::TooLarge(1024)));
        let garbage = snap::raw::Encoder::new()
            .compress_vec(&[0x0a, 0xff, 0xff, 0xff])
            .unwrap();
        assert!(matches!(decode(&garbage, 1 << 20), Err(PromError::Protobuf(_))));
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
            let (series, _) = decode(&encode(&repeated(labels)), 1 << 20).unwrap();
            assert_eq!(series[0].repeated_label, None, "the other series is not marked");
            assert!(series[1].tags.windows(2).all(|w| w[0].0 < w[1].0), "tags unique");
            series[1].repeated_label.clone()
        };
        assert_eq!(marked(&[("b", "2"), ("a", "1"), ("b", "3")]), Some("b".into()));
        assert_eq!(marked(&[("__name__", "y")]), Some("__name__".into()));
        assert_eq!(marked(&[("b", "2"), ("a", "1")]), None);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes, 1 << 20);
        }

        #[test]
        fn round_trips(values in proptest::collection::vec((-1e9f64..1e9, 0i64..4_000_000_000_000), 1..50)) {
            let request = WriteRequest { timeseries: vec![TimeSeries::named("g", &[("a", "b")], &values)] };
            let (series, stale) = decode(&encode(&request), 1 << 20).unwrap();
            prop_assert_eq!(stale, 0);
            let got: Vec<(f64, i64)> = series[0].samples.iter().map(|s| (s.value, s.timestamp)).collect();
            prop_assert_eq!(got, values);
        }
    }
}
