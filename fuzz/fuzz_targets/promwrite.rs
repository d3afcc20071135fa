//! Prometheus remote-write: snappy decompression and the borrowing protobuf decoder
//! never panic and never allocate past the decompression limit. On the decompressed
//! bytes the decoder accepts exactly what prost's decoding of `WriteRequest` accepts,
//! with the same names, kinds, tags, samples and count of dropped NaN samples; a decoded series'
//! tags are sorted and unique (a series repeating a label name keeps one of its pairs per
//! name and is marked with the right name, so its samples are refused). The input is
//! tried as decompressed bytes, as a snappy body, and compressed into a valid snappy body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::promwrite::{WriteRequest, decode, decompress, is_counter_name};
use prost::Message;

fn compare(raw: &[u8]) {
    let (ours, theirs) = (decode(raw), WriteRequest::decode(raw));
    assert_eq!(ours.is_ok(), theirs.is_ok(), "ours {ours:?}, prost {theirs:?}");
    let (Ok(ours), Ok(theirs)) = (ours, theirs) else {
        return;
    };
    let series: Vec<_> = ours.series().collect();
    assert_eq!(series.len(), theirs.timeseries.len());
    let mut dropped = 0;
    for (s, t) in series.iter().zip(&theirs.timeseries) {
        assert!(s.tags.windows(2).all(|w| w[0].0 < w[1].0), "tags not sorted and unique");
        let name = t.labels.iter().find(|l| l.name == "__name__").map_or("", |l| &l.value);
        assert_eq!(s.name, name);
        assert_eq!(s.counter, is_counter_name(name));
        // Tags: the other labels sorted by key; a repeated name (`__name__` first, else
        // the first repeated key) marks the series, which keeps one pair per key.
        let mut want: Vec<(&str, &str)> = t
            .labels
            .iter()
            .filter(|l| l.name != "__name__")
            .map(|l| (l.name.as_str(), l.value.as_str()))
            .collect();
        want.sort_by(|a, b| a.0.cmp(b.0));
        let names = t.labels.iter().filter(|l| l.name == "__name__").count();
        let repeated = if names > 1 {
            Some("__name__")
        } else {
            want.windows(2).find(|w| w[0].0 == w[1].0).map(|w| w[0].0)
        };
        assert_eq!(s.repeated_label, repeated);
        let got: Vec<(&str, &str)> = s.tags.iter().map(|(k, v)| (k.as_ref(), v.as_ref())).collect();
        if repeated.is_none() {
            assert_eq!(got, want);
        } else {
            fn keys<'a>(tags: &[(&'a str, &str)]) -> Vec<&'a str> {
                let mut keys: Vec<&str> = tags.iter().map(|t| t.0).collect();
                keys.dedup();
                keys
            }
            assert_eq!(keys(&got), keys(&want));
            assert!(got.iter().all(|pair| want.contains(pair)), "a tag pair made up");
        }
        let kept: Vec<(u64, i64)> = t
            .samples
            .iter()
            .map(|x| (x.value.to_bits(), x.timestamp))
            .filter(|&(bits, _)| !f64::from_bits(bits).is_nan())
            .collect();
        dropped += t.samples.len() - kept.len();
        let got: Vec<(u64, i64)> = s.samples.iter().map(|x| (x.value.to_bits(), x.timestamp)).collect();
        assert_eq!(got, kept);
    }
    assert_eq!(ours.nan_dropped, dropped);
}

fn check(body: &[u8]) {
    if let Ok(raw) = decompress(body, 1 << 20) {
        compare(&raw);
    }
}

fuzz_target!(|body: &[u8]| {
    compare(body);
    check(body);
    if let Ok(compressed) = snap::raw::Encoder::new().compress_vec(body) {
        check(&compressed);
    }
});
