//! Decode + verify + validate of one signed JSON batch: the CPU cost of the ingest
//! path before storage. Run with `cargo bench -p mcp-metrics-core`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::ingest::{SampleLimits, decode_json, validate_sample};
use mcp_metrics_core::signature::{SignatureHeader, sign};
use std::hint::black_box;

fn batch(n: usize, now: i64) -> Vec<u8> {
    let metrics: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"name":"response_time","value":{}.5,"type":"histogram","timestamp":{},"tags":{{"tool":"tool_{}","region":"eu"}}}}"#,
                i % 500,
                now - (n - i) as i64,
                i % 8
            )
        })
        .collect();
    format!(r#"{{"server_id":"bench","metrics":[{}]}}"#, metrics.join(",")).into_bytes()
}

fn bench(c: &mut Criterion) {
    let now = 1_750_000_000_000;
    let secret = b"mcpm_ss_bench";
    let limits = SampleLimits::default();
    for n in [100usize, 1000] {
        let body = batch(n, now);
        let header = sign(secret, now / 1000, &body);
        let mut group = c.benchmark_group("ingest_json");
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("decode_verify_validate/{n}"), |b| {
            b.iter(|| {
                let parsed = SignatureHeader::parse(&header).unwrap();
                parsed.verify(secret, black_box(&body), now / 1000, 300).unwrap();
                let batch = decode_json(black_box(&body), &limits).unwrap();
                let mut ok = 0;
                for (i, s) in batch.metrics.iter().enumerate() {
                    ok += validate_sample(i, s, now, &limits).is_ok() as usize;
                }
                assert_eq!(ok, n);
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
