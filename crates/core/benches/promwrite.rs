//! Decoding one Prometheus remote-write request as the load generator sends it: 1,000
//! series of one sample each, a name and one label per series. The CPU cost of the
//! remote-write front door before validation and storage. Run with
//! `cargo bench -p mcp-metrics-core --bench promwrite`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::promwrite::{TimeSeries, WriteRequest, decode, decompress, encode};
use std::hint::black_box;

fn request(series: usize) -> Vec<u8> {
    let timeseries = (0..series)
        .map(|s| {
            TimeSeries::named(
                "response_time",
                &[("tool", &format!("tool_{s}"))],
                &[(s as f64 * 0.5, 1_750_000_000_000 + s as i64)],
            )
        })
        .collect();
    encode(&WriteRequest { timeseries })
}

fn bench(c: &mut Criterion) {
    let body = request(1000);
    let raw = decompress(&body, 1 << 20).unwrap();
    let mut group = c.benchmark_group("promwrite");
    group.throughput(Throughput::Elements(1000));
    group.bench_function("decompress", |b| {
        b.iter(|| decompress(black_box(&body), 1 << 20).unwrap())
    });
    group.bench_function("decode", |b| {
        b.iter(|| decode(black_box(&raw)).unwrap().series().count())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
