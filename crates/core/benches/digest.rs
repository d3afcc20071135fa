//! The retry digest of a request body (`secrets::body_digest`, BLAKE3) beside SHA-256,
//! which it replaced, on a body the size of the load generator's line-protocol request
//! (1,000 lines, 53.6 KB). Every write hashes its whole body once. Run with
//! `cargo bench -p mcp-metrics-core --bench digest`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::secrets::body_digest;
use sha2::{Digest, Sha256};

fn bench(c: &mut Criterion) {
    let body: Vec<u8> = (0..53_559u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut group = c.benchmark_group("digest");
    group.throughput(Throughput::Bytes(body.len() as u64));
    group.bench_function("blake3_body_digest", |b| b.iter(|| body_digest(black_box(&body))));
    group.bench_function("sha256", |b| b.iter(|| Sha256::digest(black_box(&body))));
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
