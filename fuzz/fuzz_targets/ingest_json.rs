//! Signed JSON ingest: decoding and validating arbitrary bytes never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::ingest::{SampleLimits, decode_json, validate_sample};

fuzz_target!(|body: &[u8]| {
    let limits = SampleLimits::default();
    if let Ok(batch) = decode_json(body, &limits) {
        for (index, sample) in batch.metrics.iter().enumerate() {
            let _ = validate_sample(index, sample, 1_700_000_000_000, &limits);
        }
    }
    let _ = mcp_metrics_core::ingest::decode_event(body, 1_700_000_000_000);
});
