//! Prometheus remote-write: snappy + protobuf decoding of arbitrary bytes never panics
//! and never allocates past the decompression limit; the raw bytes are also tried as an
//! already-compressed body of a valid snappy frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::promwrite::decode;

fuzz_target!(|body: &[u8]| {
    let _ = decode(body, 1 << 20);
    if let Ok(compressed) = snap::raw::Encoder::new().compress_vec(body) {
        let _ = decode(&compressed, 1 << 20);
    }
});
