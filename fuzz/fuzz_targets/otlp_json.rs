//! OTLP/JSON: decoding arbitrary bytes and mapping whatever decodes never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::otlp::{decode_json, map_request, resolve_stream};

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = decode_json(body) {
        let mapped = map_request(&request);
        for stream in &mapped.streams {
            let _ = resolve_stream(stream, None);
        }
    }
});
