//! Prometheus remote-write: snappy decompression and the borrowing protobuf decoder
//! never panic and never allocate past the decompression limit. On the decompressed
//! bytes the decoder accepts exactly what prost's decoding of `WriteRequest` accepts,
//! with the same names, samples and stale-marker count; a decoded series' tags are sorted
//! and unique (a series repeating a label name keeps one value per name and is marked,
//! so its samples are refused). The input is tried as decompressed bytes, as a snappy
//! body, and compressed into a valid snappy body.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::promwrite::{STALE_NAN_BITS, WriteRequest, decode, decompress};
use prost::Message;

fn compare(raw: &[u8]) {
    let (ours, theirs) = (decode(raw), WriteRequest::decode(raw));
    assert_eq!(ours.is_ok(), theirs.is_ok(), "ours {ours:?}, prost {theirs:?}");
    let (Ok(ours), Ok(theirs)) = (ours, theirs) else {
        return;
    };
    let series: Vec<_> = ours.series().collect();
    assert_eq!(series.len(), theirs.timeseries.len());
    let mut stale = 0;
    for (s, t) in series.iter().zip(&theirs.timeseries) {
        assert!(s.tags.windows(2).all(|w| w[0].0 < w[1].0), "tags not sorted and unique");
        let name = t.labels.iter().find(|l| l.name == "__name__").map_or("", |l| &l.value);
        assert_eq!(s.name, name);
        let kept: Vec<(u64, i64)> = t
            .samples
            .iter()
            .map(|x| (x.value.to_bits(), x.timestamp))
            .filter(|&(bits, _)| bits != STALE_NAN_BITS)
            .collect();
        stale += t.samples.len() - kept.len();
        let got: Vec<(u64, i64)> = s.samples.iter().map(|x| (x.value.to_bits(), x.timestamp)).collect();
        assert_eq!(got, kept);
        let labels = t.labels.iter().filter(|l| l.name != "__name__").count();
        assert!(s.tags.len() == labels || s.repeated_label.is_some(), "a tag went missing");
    }
    assert_eq!(ours.stale, stale);
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
