//! Pure types and logic shared by every part of mcp-metrics.
//!
//! Nothing in this crate performs I/O, so everything here can be unit-tested,
//! property-tested and benchmarked in isolation: the wire decoding and validation of
//! ingest batches, the request-signing scheme, secret generation and sealing, RFC 3339
//! time handling, and the domain types the store and the HTTP layer exchange.

pub mod codes;
pub mod influx;
pub mod ingest;
pub mod model;
pub mod names;
pub mod otlp;
pub mod period;
pub mod points;
pub mod promwrite;
pub mod protowire;
pub mod rollup;
pub mod secrets;
pub mod signature;
pub mod sketch;
pub mod time;
pub mod usage;
pub mod varint;
