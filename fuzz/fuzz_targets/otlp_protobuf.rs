//! OTLP protobuf: decoding arbitrary bytes and mapping whatever decodes (bucket layouts,
//! exponential scales, cumulative increases) never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::otlp::{StreamState, decode_protobuf, map_request, resolve_stream};

fuzz_target!(|body: &[u8]| {
    if let Ok(request) = decode_protobuf(body) {
        let mapped = map_request(&request);
        for stream in &mapped.streams {
            let (_, state) = resolve_stream(stream, None);
            let _ = resolve_stream(stream, Some(&state));
            let _ = resolve_stream(stream, Some(&StreamState::Total(1.0)));
        }
    }
});
