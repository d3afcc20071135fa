//! InfluxDB line protocol: parsing arbitrary text with every precision never panics,
//! and every point it returns has a valid-looking name and finite value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::influx::{Precision, parse};

fuzz_target!(|body: &[u8]| {
    let Ok(text) = std::str::from_utf8(body) else { return };
    for precision in ["ns", "us", "ms", "s"] {
        let lines = parse(text, Precision::parse(precision).unwrap());
        for p in &lines.points {
            assert!(p.value.is_finite(), "a non-finite value was accepted");
            assert!(lines.tags(p).windows(2).all(|w| w[0].0 < w[1].0), "tags not sorted and unique");
        }
    }
});
