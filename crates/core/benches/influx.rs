//! Parsing one line-protocol body as the load generator sends it: 1,000 lines of one
//! field each, a tag per line, 100 series, millisecond timestamps. The CPU cost of the
//! line-protocol front door before validation and storage. Run with
//! `cargo bench -p mcp-metrics-core --bench influx`.

use std::fmt::Write;
use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::influx::{Precision, parse};

fn body(lines: usize) -> String {
    let mut out = String::new();
    for j in 0..lines {
        let value = ((j * 104_729) % 50_000) as f64 / 100.0;
        let _ = writeln!(
            out,
            "response_time,tool=tool_{} value={value} {}",
            j % 100,
            1_750_000_000_000 + (j / 100) as i64
        );
    }
    out
}

fn bench(c: &mut Criterion) {
    let body = body(1000);
    let mut group = c.benchmark_group("influx");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("parse", |b| {
        b.iter(|| parse(black_box(&body), Precision::Ms).points.len())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
