//! `X-Signature` parsing and verification of arbitrary headers never panics, and a
//! header the fuzzer made up never verifies against a fixed secret.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mcp_metrics_core::signature::SignatureHeader;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(header) = SignatureHeader::parse(text) {
        let verified = header.verify(b"fuzz-secret-0123456789", b"{}", header.timestamp, 300);
        assert!(verified.is_err(), "a made-up signature verified: {text:?}");
    }
});
