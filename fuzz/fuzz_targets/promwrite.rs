//! Prometheus remote-write: snappy + protobuf decoding of arbitrary bytes never panics
//! and never allocates past the decompression limit; the raw bytes are also tried as an
//! already-compressed body of a valid snappy frame. A decoded series' tags are sorted
//! and unique (a series repeating a label name keeps one value per name and is marked,
//! so its samples are refused).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::promwrite::decode;

fn check(body: &[u8]) {
    if let Ok((series, _)) = decode(body, 1 << 20) {
        for s in &series {
            assert!(s.tags.windows(2).all(|w| w[0].0 < w[1].0), "tags not sorted and unique");
        }
    }
}

fuzz_target!(|body: &[u8]| {
    check(body);
    if let Ok(compressed) = snap::raw::Encoder::new().compress_vec(body) {
        check(&compressed);
    }
});
