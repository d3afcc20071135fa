//! Decoding and mapping of one OTLP/HTTP protobuf export of delta histograms, the shape
//! the MCP semantic conventions produce (`mcp.server.operation.duration` per tool): the
//! CPU cost of the OTLP front door before validation and storage. Run with
//! `cargo bench -p mcp-metrics-core --bench otlp`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mcp_metrics_core::otlp::proto::metrics::v1::HistogramDataPoint;
use mcp_metrics_core::otlp::{decode_protobuf, delta_histogram, export_of, map_request, string_attribute};
use prost::Message;
use std::hint::black_box;

/// `tools` delta histogram points of `per_point` observations each, in 10 buckets.
fn export(tools: usize, per_point: u64) -> Vec<u8> {
    let bounds: Vec<f64> = (1..10).map(|i| 0.005 * (1 << i) as f64).collect();
    let data_points = (0..tools)
        .map(|t| HistogramDataPoint {
            attributes: vec![
                string_attribute("mcp.method.name", "tools/call"),
                string_attribute("gen_ai.tool.name", &format!("tool_{t}")),
                string_attribute("network.transport", "tcp"),
            ],
            start_time_unix_nano: 1_750_000_000_000_000_000,
            time_unix_nano: 1_750_000_060_000_000_000,
            count: per_point,
            sum: Some(per_point as f64 * 0.05),
            bucket_counts: (0..10)
                .map(|b| per_point / 10 + u64::from(b < per_point % 10))
                .collect(),
            explicit_bounds: bounds.clone(),
            ..Default::default()
        })
        .collect();
    let metric = delta_histogram("mcp.server.operation.duration", "s", data_points);
    export_of(vec![string_attribute("service.name", "bench-server")], vec![metric]).encode_to_vec()
}

fn bench(c: &mut Criterion) {
    let (tools, per_point) = (20, 50);
    let body = export(tools, per_point);
    let mapped = map_request(&decode_protobuf(&body).unwrap());
    assert!(mapped.refused.is_empty());
    let mut group = c.benchmark_group("otlp");
    // Samples out: each observation, and its copy in response_time.
    group.throughput(Throughput::Elements(mapped.points.len() as u64));
    group.bench_function(format!("decode_map_delta_histograms/{tools}x{per_point}"), |b| {
        b.iter(|| map_request(&decode_protobuf(black_box(&body)).unwrap()).points.len())
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
