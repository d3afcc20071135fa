//! Rollup folding throughput: raw samples folded into minute buckets per second (the
//! CPU part of the rollup job), and merging minute buckets into hours.
//! Run with `cargo bench -p mcp-metrics-core --bench rollup`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::model::Kind;
use mcp_metrics_core::rollup::BucketStats;
use std::hint::black_box;

fn samples(n: usize) -> Vec<(i64, f64)> {
    let mut x = 88172645463325252u64;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Latency-like values from 5 to 2,005 ms.
            let v = 5.0 + (x % 200_000) as f64 / 100.0;
            (i as i64, v)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let data = samples(100_000);
    let mut group = c.benchmark_group("rollup");
    group.throughput(Throughput::Elements(data.len() as u64));
    for kind in [Kind::Histogram, Kind::Counter, Kind::Gauge] {
        group.bench_function(format!("fold_100k/{}", kind.as_str()), |b| {
            b.iter(|| BucketStats::fold(kind, black_box(&data).iter().copied()).unwrap())
        });
    }
    let minutes: Vec<BucketStats> = data
        .chunks(1_000)
        .map(|c| BucketStats::fold(Kind::Histogram, c.iter().copied()).unwrap())
        .collect();
    group.throughput(Throughput::Elements(minutes.len() as u64));
    group.bench_function("merge_100_histogram_minutes", |b| {
        b.iter(|| BucketStats::merge_all(black_box(&minutes)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
