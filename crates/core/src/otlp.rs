//! OTLP/HTTP metrics (DESIGN.md §4.1, §5): decoding `ExportMetricsServiceRequest` in
//! protobuf or OTLP/JSON, and mapping its data points onto the data model.
//!
//! The message types are the generated ones of `opentelemetry-proto`, so the wire format
//! follows the specification rather than a hand-written copy of it. What this module adds
//! is the mapping, which is pure so it can be tested against the specification's examples:
//!
//! - tags are the resource attributes (`service.name` becomes `service`; the exporter
//!   library's own `telemetry.*` attributes and the per-process `service.instance.id`
//!   are left out) plus the point's attributes;
//! - Gauge → gauge; cumulative Sum → counter (monotonic) or gauge (up-down);
//!   delta Sum → a running total, which needs the stream's previous total ([`StreamInput::DeltaSum`]);
//! - Histogram and ExponentialHistogram → histogram observations whose count and sum are
//!   exactly the point's, placed inside their buckets ([`expand`]); a cumulative point is
//!   first turned into the increase since the stream's previous point
//!   ([`StreamInput::CumulativeHistogram`]);
//! - `mcp.server.operation.duration` and `gen_ai.execute_tool.duration` also feed
//!   `response_time` in milliseconds, tagged `tool` and `method`.
//!
//! State that outlives a request (previous totals and cumulative points) is not kept
//! here: [`Stream`]s are returned to the caller, which loads and stores their state.

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, DataPointFlags, ExponentialHistogramDataPoint, HistogramDataPoint, NumberDataPoint, metric,
    number_data_point,
};
use prost::Message;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

use crate::model::Kind;
use crate::names;

/// The generated OTLP message types, for senders (the load generator, tests).
pub use opentelemetry_proto::tonic as proto;
pub use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsPartialSuccess, ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};

/// Most observations one histogram point (a delta point, or a cumulative point's
/// increase) may expand to; a point beyond is refused (reported as a partial success)
/// rather than writing millions of rows.
pub const MAX_OBSERVATIONS_PER_POINT: u64 = 100_000;

/// Most samples one request may map to, histogram observations included; the data
/// points beyond are refused. Bounds the memory a request can make the service use.
pub const MAX_SAMPLES_PER_REQUEST: usize = 200_000;

/// Reasons kept per request: the answer names a few, and counts the rest.
const MAX_EXAMPLES: usize = 5;

/// Metrics of the MCP and GenAI semantic conventions that also feed `response_time`.
pub const DURATION_METRICS: [&str; 2] = ["mcp.server.operation.duration", "gen_ai.execute_tool.duration"];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OtlpError {
    #[error("the body is not a protobuf ExportMetricsServiceRequest: {0}")]
    Protobuf(String),
    #[error("the body is not an OTLP/JSON ExportMetricsServiceRequest: {0}")]
    Json(String),
}

/// Decodes a binary protobuf request.
pub fn decode_protobuf(body: &[u8]) -> Result<ExportMetricsServiceRequest, OtlpError> {
    ExportMetricsServiceRequest::decode(body).map_err(|e| OtlpError::Protobuf(e.to_string()))
}

/// An export of these metrics from one resource and scope, as an SDK sends it: for load
/// generators, benchmarks and tests.
pub fn export_of(
    resource: Vec<proto::common::v1::KeyValue>,
    metrics: Vec<proto::metrics::v1::Metric>,
) -> ExportMetricsServiceRequest {
    use proto::metrics::v1::{ResourceMetrics, ScopeMetrics};
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: (!resource.is_empty()).then(|| proto::resource::v1::Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// A string attribute (for load generators and benchmarks).
pub fn string_attribute(key: &str, value: &str) -> proto::common::v1::KeyValue {
    use proto::common::v1::{AnyValue, KeyValue, any_value};
    KeyValue {
        key: key.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..Default::default()
    }
}

/// A delta histogram metric of these points (for load generators and benchmarks).
pub fn delta_histogram(
    name: &str,
    unit: &str,
    data_points: Vec<proto::metrics::v1::HistogramDataPoint>,
) -> proto::metrics::v1::Metric {
    use proto::metrics::v1::{AggregationTemporality, Histogram, Metric, metric};
    Metric {
        name: name.into(),
        unit: unit.into(),
        data: Some(metric::Data::Histogram(Histogram {
            data_points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
        })),
        ..Default::default()
    }
}

/// Decodes an OTLP/JSON request (lowerCamelCase keys, 64-bit integers as strings or
/// numbers, enums as integers).
pub fn decode_json(body: &[u8]) -> Result<ExportMetricsServiceRequest, OtlpError> {
    serde_json::from_slice(body).map_err(|e| OtlpError::Json(e.to_string()))
}

/// One value ready for validation. The observations of one histogram point share its
/// name and tags instead of copying them each: a copy per observation was most of the
/// mapping's cost, and shared tags let the writer resolve the run's series once.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub name: Arc<str>,
    /// Sorted by key.
    pub tags: Arc<[(String, String)]>,
    pub kind: Kind,
    pub timestamp_ms: i64,
    pub value: f64,
    /// Index of the data point it came from, to report refusals per data point.
    pub data_point: usize,
}

/// A data point whose samples depend on the stream's previous state.
#[derive(Debug, Clone, PartialEq)]
pub struct Stream {
    pub name: String,
    pub tags: Vec<(String, String)>,
    /// Kind of the samples it produces.
    pub kind: Kind,
    pub timestamp_ms: i64,
    pub input: StreamInput,
    /// Tags of the `response_time` observations it also feeds, and the factor to ms.
    pub response_time: Option<(Vec<(String, String)>, f64)>,
    pub data_point: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub enum StreamInput {
    /// An increment to add onto the stream's running total.
    DeltaSum(f64),
    /// Counts since `start_ns`; the samples are the increase since the previous point.
    CumulativeHistogram(HistogramCounts),
}

/// A histogram as buckets with finite edges, with its exact count and sum.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistogramCounts {
    pub start_ns: u64,
    /// The point's time (unix ms), to ignore a point older than the stored one.
    #[serde(default)]
    pub time_ms: i64,
    pub count: u64,
    pub sum: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    /// (lower, upper, count) with lower ≤ upper, in ascending order.
    pub buckets: Vec<(f64, f64, u64)>,
}

/// State kept per stream between requests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StreamState {
    Total(f64),
    Cumulative(HistogramCounts),
}

/// Refused data points: every index, and the first few reasons.
#[derive(Debug, Default, Clone)]
pub struct Refusals {
    points: Vec<usize>,
    examples: Vec<String>,
}

impl Refusals {
    /// Records a refusal; the reason is only built while examples are still wanted.
    pub fn add(&mut self, data_point: usize, reason: impl FnOnce() -> String) {
        self.points.push(data_point);
        if self.examples.len() < MAX_EXAMPLES {
            self.examples.push(reason());
        }
    }

    /// Distinct refused data points, sorted.
    pub fn points(&self) -> Vec<usize> {
        let mut points = self.points.clone();
        points.sort_unstable();
        points.dedup();
        points
    }

    pub fn examples(&self) -> &[String] {
        &self.examples
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

/// What a request maps to.
#[derive(Debug, Default)]
pub struct Mapped {
    pub points: Vec<Point>,
    pub streams: Vec<Stream>,
    /// Data points refused while mapping.
    pub refused: Refusals,
    /// Data points in the request.
    pub data_points: usize,
    /// Samples the request may still map to ([`MAX_SAMPLES_PER_REQUEST`] minus those
    /// mapped); the streams' samples, known once their state is loaded, spend it.
    pub budget_left: usize,
}

fn any_value_text(value: &AnyValue) -> Option<String> {
    match value.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s.clone()),
        any_value::Value::BoolValue(b) => Some(b.to_string()),
        any_value::Value::IntValue(i) => Some(i.to_string()),
        any_value::Value::DoubleValue(d) => Some(d.to_string()),
        // Arrays, maps and bytes have no natural tag form; they are left out.
        _ => None,
    }
}

fn resource_tags(attributes: &[KeyValue]) -> Vec<(String, String)> {
    let mut tags = Vec::new();
    for kv in attributes {
        // The exporter library's own description, and the per-process instance id the
        // SDKs add by default, would make every restart a new series.
        if kv.key.starts_with("telemetry.") || kv.key == "service.instance.id" {
            continue;
        }
        if let Some(text) = kv.value.as_ref().and_then(any_value_text) {
            let key = if kv.key == "service.name" {
                "service".to_string()
            } else {
                kv.key.clone()
            };
            tags.push((key, text));
            if tags.len() > names::MAX_TAGS {
                // Every point of this resource is refused for it; no need to read on.
                break;
            }
        }
    }
    tags
}

/// The resource's tags with the point's attributes over them, sorted; more than the
/// data model's tag limit is refused here, before anything is copied per sample.
fn point_tags(resource: &[(String, String)], attributes: &[KeyValue]) -> Result<Vec<(String, String)>, String> {
    let too_many = || format!("more than {} tags (resource and point attributes)", names::MAX_TAGS);
    if resource.len() > names::MAX_TAGS || attributes.len() > 4 * names::MAX_TAGS {
        return Err(too_many());
    }
    // Resource tags first, then attributes: the last of a key (an attribute over the
    // resource) is the one kept.
    let mut pairs: Vec<(&str, String)> = Vec::with_capacity(resource.len() + attributes.len());
    pairs.extend(resource.iter().map(|(k, v)| (k.as_str(), v.clone())));
    for kv in attributes {
        if let Some(text) = kv.value.as_ref().and_then(any_value_text) {
            pairs.push((kv.key.as_str(), text));
        }
    }
    names::sort_and_dedup_tags(&mut pairs);
    let tags: Vec<(String, String)> = pairs.into_iter().map(|(key, value)| (key.to_owned(), value)).collect();
    if tags.len() > names::MAX_TAGS {
        return Err(too_many());
    }
    Ok(tags)
}

/// The `tool` and `method` tags of a duration point, and its unit's factor to ms;
/// `None` when the metric does not feed `response_time`.
fn response_time_of(name: &str, unit: &str, attributes: &[KeyValue]) -> Option<(Vec<(String, String)>, f64)> {
    if !DURATION_METRICS.contains(&name) {
        return None;
    }
    let factor = match unit {
        "s" => 1000.0,
        "ms" => 1.0,
        _ => return None,
    };
    let mut tags = Vec::new();
    for kv in attributes {
        let tag = match kv.key.as_str() {
            "gen_ai.tool.name" => "tool",
            "mcp.method.name" => "method",
            _ => continue,
        };
        if let Some(text) = kv.value.as_ref().and_then(any_value_text) {
            tags.push((tag.to_string(), text));
        }
    }
    crate::names::sort_and_dedup_tags(&mut tags);
    Some((tags, factor))
}

/// A point flagged "no recorded value": OTLP's spelling of Prometheus' staleness marker
/// (the Collector's Prometheus receiver sends one when a series disappears). It is a valid
/// point with nothing to store: dropped, as remote-write drops stale markers, not stored
/// as its zero value nor refused.
fn has_no_value(flags: u32) -> bool {
    flags & DataPointFlags::NoRecordedValueMask as u32 != 0
}

fn timestamp_ms(time_unix_nano: u64) -> Result<i64, String> {
    if time_unix_nano == 0 {
        return Err("time_unix_nano is missing".into());
    }
    Ok((time_unix_nano / 1_000_000) as i64)
}

fn number_value(point: &NumberDataPoint) -> Result<f64, String> {
    match point.value {
        Some(number_data_point::Value::AsDouble(d)) => Ok(d),
        Some(number_data_point::Value::AsInt(i)) => Ok(i as f64),
        None => Err("the data point has no value".into()),
    }
}

/// Buckets of an explicit-bounds histogram point. The open-ended first and last buckets
/// are closed with the point's min and max when it has them, else at their finite edge.
pub fn explicit_buckets(point: &HistogramDataPoint) -> Result<Vec<(f64, f64, u64)>, String> {
    let bounds = &point.explicit_bounds;
    let counts = &point.bucket_counts;
    if counts.is_empty() {
        return Ok(Vec::new());
    }
    if counts.len() != bounds.len() + 1 {
        return Err(format!(
            "bucket_counts has {} entries for {} explicit_bounds (must be one more)",
            counts.len(),
            bounds.len()
        ));
    }
    if bounds.iter().any(|b| !b.is_finite()) || bounds.windows(2).any(|w| w[0] >= w[1]) {
        return Err("explicit_bounds must be finite and strictly increasing".into());
    }
    let mut buckets = Vec::with_capacity(counts.len());
    for (i, &count) in counts.iter().enumerate() {
        if count == 0 {
            continue;
        }
        let (lower, upper) = if bounds.is_empty() {
            let guess = point.sum.map(|s| s / count as f64).unwrap_or(0.0);
            (point.min.unwrap_or(guess), point.max.unwrap_or(guess))
        } else if i == 0 {
            (point.min.unwrap_or(bounds[0]).min(bounds[0]), bounds[0])
        } else if i == bounds.len() {
            let last = bounds[i - 1];
            (last, point.max.unwrap_or(last).max(last))
        } else {
            (bounds[i - 1], bounds[i])
        };
        buckets.push((lower, upper, count));
    }
    Ok(clamp_buckets(buckets, point.min, point.max))
}

/// Buckets of an exponential histogram point: index `i` of scale `s` covers
/// (base^i, base^(i+1)] with base = 2^(2^-s); negative buckets mirror them and the zero
/// bucket sits at 0.
pub fn exponential_buckets(point: &ExponentialHistogramDataPoint) -> Result<Vec<(f64, f64, u64)>, String> {
    if !(-10..=20).contains(&point.scale) {
        return Err(format!("scale {} is outside -10..=20", point.scale));
    }
    let base = 2f64.powf(2f64.powi(-point.scale));
    let edge = |index: i64| base.powf(index as f64);
    let mut buckets = Vec::new();
    if let Some(negative) = &point.negative {
        for (i, &count) in negative.bucket_counts.iter().enumerate().rev() {
            if count > 0 {
                let index = negative.offset as i64 + i as i64;
                buckets.push((-edge(index + 1), -edge(index), count));
            }
        }
    }
    if point.zero_count > 0 {
        buckets.push((0.0, 0.0, point.zero_count));
    }
    if let Some(positive) = &point.positive {
        for (i, &count) in positive.bucket_counts.iter().enumerate() {
            if count > 0 {
                let index = positive.offset as i64 + i as i64;
                buckets.push((edge(index), edge(index + 1), count));
            }
        }
    }
    if buckets.iter().any(|(l, u, _)| !l.is_finite() || !u.is_finite()) {
        return Err("bucket edges overflow at this scale and offset".into());
    }
    Ok(clamp_buckets(buckets, point.min, point.max))
}

/// Narrows bucket edges to the point's known min and max.
fn clamp_buckets(buckets: Vec<(f64, f64, u64)>, min: Option<f64>, max: Option<f64>) -> Vec<(f64, f64, u64)> {
    let lo = min.filter(|m| m.is_finite()).unwrap_or(f64::NEG_INFINITY);
    let hi = max.filter(|m| m.is_finite()).unwrap_or(f64::INFINITY);
    if lo > hi {
        return buckets;
    }
    buckets
        .into_iter()
        .map(|(l, u, c)| (l.clamp(lo, hi), u.clamp(lo, hi), c))
        .collect()
}

/// Observations with exactly the histogram's count, each inside its bucket, placed at
/// the same fraction `t` of every bucket's width so that their sum is the point's sum
/// (when the sum is consistent with the buckets; else it is clamped to the nearest
/// possible one). Without a sum they sit at bucket midpoints.
pub fn expand(buckets: &[(f64, f64, u64)], sum: Option<f64>) -> Vec<f64> {
    let low: f64 = buckets.iter().map(|&(l, _, c)| l * c as f64).sum();
    let high: f64 = buckets.iter().map(|&(_, u, c)| u * c as f64).sum();
    let t = match sum {
        Some(sum) if high > low => ((sum - low) / (high - low)).clamp(0.0, 1.0),
        Some(_) => 0.0,
        None => 0.5,
    };
    let total = buckets.iter().fold(0u64, |total, b| total.saturating_add(b.2));
    let mut values = Vec::with_capacity(total.min(MAX_OBSERVATIONS_PER_POINT) as usize);
    for &(l, u, c) in buckets {
        let v = l + t * (u - l);
        values.extend(std::iter::repeat_n(v, c as usize));
    }
    values
}

/// The increase from `previous` to `current` of a cumulative histogram: the whole of
/// `current` when the stream restarted (another start time, or counts went down).
/// Previous buckets are matched to the current bucket holding their midpoint, which is
/// exact for equal layouts and for an exponential histogram that halved its scale.
pub fn cumulative_increase(previous: Option<&HistogramCounts>, current: &HistogramCounts) -> HistogramCounts {
    let Some(previous) = previous else {
        return current.clone();
    };
    if previous.start_ns != current.start_ns || previous.count > current.count {
        return current.clone();
    }
    let mut buckets = current.buckets.clone();
    for &(l, u, c) in &previous.buckets {
        let mid = (l + u) / 2.0;
        let slot = buckets
            .iter()
            .position(|&(bl, bu, _)| (bl <= mid && mid <= bu) || (bl == l && bu == u))
            .or_else(|| {
                // A bucket clamped to min/max may no longer contain the midpoint: take the nearest.
                buckets
                    .iter()
                    .enumerate()
                    .min_by(|a, b| {
                        let da = ((a.1.0 + a.1.1) / 2.0 - mid).abs();
                        let db = ((b.1.0 + b.1.1) / 2.0 - mid).abs();
                        da.total_cmp(&db)
                    })
                    .map(|(i, _)| i)
            });
        if let Some(slot) = slot {
            buckets[slot].2 = buckets[slot].2.saturating_sub(c);
        }
    }
    buckets.retain(|b| b.2 > 0);
    let sum = match (current.sum, previous.sum) {
        (Some(now), Some(before)) => Some(now - before),
        (now, _) => now,
    };
    HistogramCounts {
        start_ns: current.start_ns,
        time_ms: current.time_ms,
        count: current.count - previous.count,
        sum,
        // Min and max are of the whole cumulative range; only the buckets bound this one.
        min: None,
        max: None,
        buckets,
    }
}

/// Samples of a stream given its stored state (or why the point is refused), and the
/// stream's new state.
pub fn resolve_stream(stream: &Stream, state: Option<&StreamState>) -> (Result<Vec<f64>, String>, StreamState) {
    match &stream.input {
        StreamInput::DeltaSum(delta) => {
            let before = match state {
                Some(StreamState::Total(t)) => *t,
                _ => 0.0,
            };
            let total = before + delta;
            (Ok(vec![total]), StreamState::Total(total))
        }
        StreamInput::CumulativeHistogram(current) => {
            let previous = match state {
                Some(StreamState::Cumulative(p)) => Some(p),
                _ => None,
            };
            // A point older than the stored one of the same run arrived late: its counts
            // are already part of the stored point's.
            if let Some(p) = previous
                && p.start_ns == current.start_ns
                && p.time_ms > current.time_ms
            {
                return (Ok(Vec::new()), StreamState::Cumulative(p.clone()));
            }
            let increase = cumulative_increase(previous, current);
            let next = StreamState::Cumulative(current.clone());
            if increase.count > MAX_OBSERVATIONS_PER_POINT {
                let reason = format!(
                    "{} new observations since the previous point; at most {MAX_OBSERVATIONS_PER_POINT} are accepted per point",
                    increase.count
                );
                return (Err(reason), next);
            }
            let observations = if increase.count == 0 {
                Vec::new()
            } else {
                expand(&increase.buckets, increase.sum)
            };
            (Ok(observations), next)
        }
    }
}

fn histogram_counts(
    buckets: Result<Vec<(f64, f64, u64)>, String>,
    start_ns: u64,
    count: u64,
    sum: Option<f64>,
    min: Option<f64>,
    max: Option<f64>,
) -> Result<HistogramCounts, String> {
    let buckets = buckets?;
    // Checked: a crafted point can make the bucket counts overflow (found by fuzzing).
    let in_buckets = buckets
        .iter()
        .try_fold(0u64, |total, b| total.checked_add(b.2))
        .ok_or("bucket counts overflow a 64-bit integer")?;
    if in_buckets != count {
        return Err(format!("bucket counts add up to {in_buckets}, not to count {count}"));
    }
    if sum.is_some_and(|s| !s.is_finite()) {
        return Err("sum is not a finite number".into());
    }
    Ok(HistogramCounts {
        start_ns,
        time_ms: 0,
        count,
        sum,
        min,
        max,
        buckets,
    })
}

struct Mapper {
    mapped: Mapped,
}

type Tags = Result<Vec<(String, String)>, String>;
type SharedTags = Result<Arc<[(String, String)]>, String>;

/// The tags of a metric's data points, made once per run of points with equal attributes
/// (a sender that puts several points of one series in an export repeats them) and
/// shared: each point then costs no copies of its tags, and the ingest path sees one
/// series run instead of a new series key per point.
struct PointTags<'r, 'a> {
    resource: &'r [(String, String)],
    last: Option<(&'a [KeyValue], SharedTags)>,
}

impl<'r, 'a> PointTags<'r, 'a> {
    fn new(resource: &'r [(String, String)]) -> Self {
        PointTags { resource, last: None }
    }

    fn of(&mut self, attributes: &'a [KeyValue]) -> SharedTags {
        match &self.last {
            Some((previous, tags)) if *previous == attributes => tags.clone(),
            _ => {
                let tags = point_tags(self.resource, attributes).map(Arc::from);
                self.last = Some((attributes, tags.clone()));
                tags
            }
        }
    }
}

impl Mapper {
    fn refuse(&mut self, index: usize, name: &str, reason: impl std::fmt::Display) {
        self.mapped.refused.add(index, || format!("{name}: {reason}"));
    }

    /// Takes `n` samples from the request's budget; false (and nothing taken) past it.
    fn spend(&mut self, n: usize) -> bool {
        if n > self.mapped.budget_left {
            return false;
        }
        self.mapped.budget_left -= n;
        true
    }

    fn over_budget(&mut self, index: usize, name: &str) {
        self.refuse(
            index,
            name,
            format!("the request maps to more than {MAX_SAMPLES_PER_REQUEST} samples; send fewer points per export"),
        );
    }

    /// A metric's number points (a gauge's, a cumulative sum's), sharing one copy of the
    /// name and of each run's tags.
    fn numbers(&mut self, name: &str, kind: Kind, resource: &[(String, String)], points: &[NumberDataPoint]) {
        let shared_name: Arc<str> = Arc::from(name);
        let mut tags = PointTags::new(resource);
        for point in points {
            if self.skips(point.flags) {
                continue;
            }
            self.number(&shared_name, kind, tags.of(&point.attributes), point);
        }
    }

    fn number(&mut self, name: &Arc<str>, kind: Kind, tags: SharedTags, point: &NumberDataPoint) {
        let index = self.next_index();
        let parsed = tags.and_then(|tags| {
            let ts = timestamp_ms(point.time_unix_nano)?;
            Ok((tags, ts, number_value(point)?))
        });
        match parsed {
            Ok(_) if !self.spend(1) => self.over_budget(index, name),
            Ok((tags, timestamp_ms, value)) => self.mapped.points.push(Point {
                name: name.clone(),
                tags,
                kind,
                timestamp_ms,
                value,
                data_point: index,
            }),
            Err(reason) => self.refuse(index, name, reason),
        }
    }

    fn delta_sum(&mut self, name: &str, kind: Kind, tags: Tags, point: &NumberDataPoint) {
        let index = self.next_index();
        let parsed = tags.and_then(|tags| {
            let ts = timestamp_ms(point.time_unix_nano)?;
            Ok((tags, ts, number_value(point)?))
        });
        match parsed {
            Ok((_, _, value)) if !value.is_finite() => self.refuse(index, name, "the value is not a finite number"),
            Ok(_) if !self.spend(1) => self.over_budget(index, name),
            Ok((tags, timestamp_ms, value)) => self.mapped.streams.push(Stream {
                name: name.to_string(),
                tags,
                kind,
                timestamp_ms,
                input: StreamInput::DeltaSum(value),
                response_time: None,
                data_point: index,
            }),
            Err(reason) => self.refuse(index, name, reason),
        }
    }

    /// One explicit or exponential histogram point, its counts already read.
    #[allow(clippy::too_many_arguments)]
    fn histogram(
        &mut self,
        name: &str,
        unit: &str,
        resource: &[(String, String)],
        attributes: &[KeyValue],
        time_unix_nano: u64,
        cumulative: bool,
        counts: Result<HistogramCounts, String>,
    ) {
        let tags = point_tags(resource, attributes);
        let response_time = response_time_of(name, unit, attributes);
        let index = self.next_index();
        let parsed = tags.and_then(|tags| {
            let ts = timestamp_ms(time_unix_nano)?;
            let mut counts = counts?;
            counts.time_ms = ts;
            Ok((tags, ts, counts))
        });
        let (tags, timestamp_ms, counts) = match parsed {
            Ok(ok) => ok,
            Err(reason) => return self.refuse(index, name, reason),
        };
        if cumulative {
            // Its samples are the increase since the stored point, spent when resolved.
            self.mapped.streams.push(Stream {
                name: name.to_string(),
                tags,
                kind: Kind::Histogram,
                timestamp_ms,
                input: StreamInput::CumulativeHistogram(counts),
                response_time,
                data_point: index,
            });
            return;
        }
        if counts.count > MAX_OBSERVATIONS_PER_POINT {
            return self.refuse(
                index,
                name,
                format!(
                    "{} observations in one point; at most {MAX_OBSERVATIONS_PER_POINT} are accepted per point",
                    counts.count
                ),
            );
        }
        let copies = if response_time.is_some() { 2 } else { 1 };
        if !self.spend(counts.count as usize * copies) {
            return self.over_budget(index, name);
        }
        let observations = expand(&counts.buckets, counts.sum);
        push_observations(
            &mut self.mapped.points,
            name,
            &tags,
            response_time.as_ref(),
            timestamp_ms,
            &observations,
            index,
        );
    }

    /// Whether a point is one to drop ([`has_no_value`]); it still takes its index, so
    /// the points after it keep theirs.
    fn skips(&mut self, flags: u32) -> bool {
        let skip = has_no_value(flags);
        if skip {
            self.next_index();
        }
        skip
    }

    fn next_index(&mut self) -> usize {
        self.mapped.data_points += 1;
        self.mapped.data_points - 1
    }
}

/// Histogram observations of a series, and their copies in `response_time`.
pub fn push_observations(
    points: &mut Vec<Point>,
    name: &str,
    tags: &[(String, String)],
    response_time: Option<&(Vec<(String, String)>, f64)>,
    timestamp_ms: i64,
    observations: &[f64],
    data_point: usize,
) {
    let at = (timestamp_ms, data_point);
    push_values(points, name, tags, Kind::Histogram, at, observations.iter().copied());
    if let Some((rt_tags, factor)) = response_time {
        let values = observations.iter().map(|v| v * factor);
        push_values(points, "response_time", rt_tags, Kind::Histogram, at, values);
    }
}

/// Points of one series at one instant (`at`: timestamp, data point index), sharing one
/// copy of its name and tags.
pub fn push_values(
    points: &mut Vec<Point>,
    name: &str,
    tags: &[(String, String)],
    kind: Kind,
    (timestamp_ms, data_point): (i64, usize),
    values: impl IntoIterator<Item = f64>,
) {
    let (name, tags): (Arc<str>, Arc<[(String, String)]>) = (name.into(), tags.into());
    points.extend(values.into_iter().map(|value| Point {
        name: name.clone(),
        tags: tags.clone(),
        kind,
        timestamp_ms,
        value,
        data_point,
    }));
}

/// Maps every data point of a request (DESIGN.md §5).
pub fn map_request(request: &ExportMetricsServiceRequest) -> Mapped {
    let mut m = Mapper {
        mapped: Mapped {
            budget_left: MAX_SAMPLES_PER_REQUEST,
            ..Mapped::default()
        },
    };
    for resource_metrics in &request.resource_metrics {
        let resource = resource_metrics
            .resource
            .as_ref()
            .map(|r| resource_tags(&r.attributes))
            .unwrap_or_default();
        for scope in &resource_metrics.scope_metrics {
            for metric in &scope.metrics {
                let name = metric.name.as_str();
                let Some(data) = &metric.data else {
                    let index = m.next_index();
                    m.refuse(index, name, "the metric has no data");
                    continue;
                };
                match data {
                    metric::Data::Gauge(gauge) => m.numbers(name, Kind::Gauge, &resource, &gauge.data_points),
                    metric::Data::Sum(sum) => {
                        let kind = if sum.is_monotonic { Kind::Counter } else { Kind::Gauge };
                        if sum.aggregation_temporality == AggregationTemporality::Delta as i32 {
                            // Each point becomes a stream of its own, with its own tags.
                            for p in &sum.data_points {
                                if m.skips(p.flags) {
                                    continue;
                                }
                                m.delta_sum(name, kind, point_tags(&resource, &p.attributes), p);
                            }
                        } else {
                            m.numbers(name, kind, &resource, &sum.data_points);
                        }
                    }
                    metric::Data::Histogram(h) => {
                        let cumulative = h.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                        for p in &h.data_points {
                            if m.skips(p.flags) {
                                continue;
                            }
                            let counts = histogram_counts(
                                explicit_buckets(p),
                                p.start_time_unix_nano,
                                p.count,
                                p.sum,
                                p.min,
                                p.max,
                            );
                            m.histogram(
                                name,
                                &metric.unit,
                                &resource,
                                &p.attributes,
                                p.time_unix_nano,
                                cumulative,
                                counts,
                            );
                        }
                    }
                    metric::Data::ExponentialHistogram(h) => {
                        let cumulative = h.aggregation_temporality == AggregationTemporality::Cumulative as i32;
                        for p in &h.data_points {
                            if m.skips(p.flags) {
                                continue;
                            }
                            let counts = histogram_counts(
                                exponential_buckets(p),
                                p.start_time_unix_nano,
                                p.count,
                                p.sum,
                                p.min,
                                p.max,
                            );
                            m.histogram(
                                name,
                                &metric.unit,
                                &resource,
                                &p.attributes,
                                p.time_unix_nano,
                                cumulative,
                                counts,
                            );
                        }
                    }
                    metric::Data::Summary(s) => {
                        for p in &s.data_points {
                            if m.skips(p.flags) {
                                continue;
                            }
                            let index = m.next_index();
                            m.refuse(
                                index,
                                name,
                                "Summary points are not accepted; export a Histogram instead",
                            );
                        }
                    }
                }
            }
        }
    }
    m.mapped
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::metrics::v1::exponential_histogram_data_point::Buckets;

    /// The metrics example of the OTLP specification's repository
    /// (opentelemetry-proto/examples/metrics.json), abridged to one point per type; the
    /// counter is cumulative (temporality 2), the histograms delta (temporality 1).
    const SPEC_EXAMPLE: &str = r#"{
      "resourceMetrics": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "my.service"}},
                                    {"key": "telemetry.sdk.name", "value": {"stringValue": "opentelemetry"}}]},
        "scopeMetrics": [{
          "scope": {"name": "my.library", "version": "1.0.0"},
          "metrics": [
            {"name": "my.counter", "unit": "1", "description": "I am a Counter",
             "sum": {"aggregationTemporality": 2, "isMonotonic": true,
                     "dataPoints": [{"asDouble": 5, "startTimeUnixNano": "1544712660300000000",
                                     "timeUnixNano": "1544712660300000000",
                                     "attributes": [{"key": "my.counter.attr", "value": {"stringValue": "some value"}}]}]}},
            {"name": "my.gauge", "unit": "1",
             "gauge": {"dataPoints": [{"asDouble": 10, "timeUnixNano": "1544712660300000000"}]}},
            {"name": "my.histogram", "unit": "1",
             "histogram": {"aggregationTemporality": 1,
                           "dataPoints": [{"startTimeUnixNano": "1544712660300000000",
                                           "timeUnixNano": "1544712660300000000",
                                           "count": 2, "sum": 2, "bucketCounts": [1, 1],
                                           "explicitBounds": [1], "min": 0, "max": 2}]}},
            {"name": "my.exponential.histogram", "unit": "1",
             "exponentialHistogram": {"aggregationTemporality": 1,
                                      "dataPoints": [{"startTimeUnixNano": "1544712660300000000",
                                                      "timeUnixNano": "1544712660300000000",
                                                      "count": 3, "sum": 10, "scale": 0, "zeroCount": 1,
                                                      "positive": {"offset": 1, "bucketCounts": [0, 2]},
                                                      "min": 0, "max": 5, "zeroThreshold": 0}]}}
          ]}]}]}"#;

    #[test]
    fn the_specification_example_maps_to_the_data_model() {
        let request = decode_json(SPEC_EXAMPLE.as_bytes()).unwrap();
        let mapped = map_request(&request);
        assert_eq!(mapped.data_points, 4);
        assert!(mapped.refused.is_empty(), "{:?}", mapped.refused);
        let service = ("service".to_string(), "my.service".to_string());
        let counter = &mapped.points[0];
        assert_eq!(
            (&*counter.name, counter.kind, counter.value, counter.timestamp_ms),
            ("my.counter", Kind::Counter, 5.0, 1_544_712_660_300)
        );
        assert_eq!(
            counter.tags.to_vec(),
            vec![("my.counter.attr".into(), "some value".into()), service.clone()]
        );
        assert_eq!((&*mapped.points[1].name, mapped.points[1].value), ("my.gauge", 10.0));
        // Delta histograms become observations at once, count and sum exact.
        let histogram: Vec<f64> = mapped
            .points
            .iter()
            .filter(|p| p.name.as_ref() == "my.histogram")
            .map(|p| p.value)
            .collect();
        assert_eq!(histogram.len(), 2);
        assert!((histogram.iter().sum::<f64>() - 2.0).abs() < 1e-9);
        assert!(histogram[0] <= 1.0 && histogram[1] > 1.0 && histogram[1] <= 2.0);
        let exponential: Vec<f64> = mapped
            .points
            .iter()
            .filter(|p| p.name.as_ref() == "my.exponential.histogram")
            .map(|p| p.value)
            .collect();
        assert_eq!(exponential.len(), 3);
        assert_eq!(exponential[0], 0.0);
        // scale 0: index 2 covers (4, 8], clamped to max 5.
        assert!((exponential.iter().sum::<f64>() - 10.0).abs() < 1e-9);
        assert!(exponential[1] > 4.0 && exponential[1] <= 5.0);
    }

    /// Points of a metric share one copy of its name, and a run of points with equal
    /// attributes one copy of their tags (an attribute over a resource tag of the same key).
    #[test]
    fn points_share_their_name_and_equal_tags() {
        use proto::metrics::v1::{Gauge, Metric, NumberDataPoint, metric, number_data_point};
        let point = |tool: &str, value: f64| NumberDataPoint {
            time_unix_nano: 1_700_000_000_000_000_000,
            value: Some(number_data_point::Value::AsDouble(value)),
            attributes: vec![string_attribute("tool", tool), string_attribute("host", "b")],
            ..Default::default()
        };
        let request = export_of(
            vec![
                string_attribute("host", "a"),
                string_attribute("service.name", "weather"),
            ],
            vec![Metric {
                name: "latency".into(),
                data: Some(metric::Data::Gauge(Gauge {
                    data_points: vec![point("x", 1.0), point("x", 2.0), point("y", 3.0), point("x", 4.0)],
                })),
                ..Default::default()
            }],
        );
        let points = map_request(&request).points;
        assert_eq!(points.len(), 4);
        assert!(points.windows(2).all(|w| Arc::ptr_eq(&w[0].name, &w[1].name)));
        assert!(Arc::ptr_eq(&points[0].tags, &points[1].tags));
        assert!(!Arc::ptr_eq(&points[1].tags, &points[2].tags));
        let tags = |tool: &str| {
            vec![
                ("host".to_string(), "b".to_string()),
                ("service".to_string(), "weather".to_string()),
                ("tool".to_string(), tool.to_string()),
            ]
        };
        let got: Vec<_> = points.iter().map(|p| (p.tags.to_vec(), p.value)).collect();
        assert_eq!(
            got,
            vec![(tags("x"), 1.0), (tags("x"), 2.0), (tags("y"), 3.0), (tags("x"), 4.0)]
        );
    }

    /// Points flagged "no recorded value" (staleness, as the Collector's Prometheus
    /// receiver marks it) are dropped: not stored as their zero value, not refused.
    #[test]
    fn points_without_a_recorded_value_are_dropped() {
        use proto::metrics::v1::{
            Gauge, Histogram, Metric, NumberDataPoint, Sum, Summary, SummaryDataPoint, metric, number_data_point,
        };
        let stale = DataPointFlags::NoRecordedValueMask as u32;
        let point = |value: f64, flags: u32| NumberDataPoint {
            time_unix_nano: 1_700_000_000_000_000_000,
            value: Some(number_data_point::Value::AsDouble(value)),
            flags,
            ..Default::default()
        };
        let metric = |name: &str, data: metric::Data| Metric {
            name: name.into(),
            data: Some(data),
            ..Default::default()
        };
        let request = export_of(
            vec![],
            vec![
                metric(
                    "up",
                    metric::Data::Gauge(Gauge {
                        data_points: vec![point(1.0, 0), point(0.0, stale)],
                    }),
                ),
                metric(
                    "requests",
                    metric::Data::Sum(Sum {
                        data_points: vec![point(0.0, stale)],
                        aggregation_temporality: AggregationTemporality::Delta as i32,
                        is_monotonic: true,
                    }),
                ),
                metric(
                    "latency",
                    metric::Data::Histogram(Histogram {
                        data_points: vec![HistogramDataPoint {
                            time_unix_nano: 1_700_000_000_000_000_000,
                            flags: stale,
                            ..Default::default()
                        }],
                        aggregation_temporality: AggregationTemporality::Cumulative as i32,
                    }),
                ),
                metric(
                    "quantiles",
                    metric::Data::Summary(Summary {
                        data_points: vec![SummaryDataPoint {
                            flags: stale,
                            ..Default::default()
                        }],
                    }),
                ),
            ],
        );
        // OTLP/JSON spells the flag `flags` too.
        let json = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{"name":"up","gauge":{"dataPoints":[
            {"timeUnixNano":"1700000000000000000","asDouble":0,"flags":1}]}}]}]}]}"#;
        let from_json = map_request(&decode_json(json.as_bytes()).unwrap());
        assert!(from_json.points.is_empty() && from_json.refused.is_empty());
        let mapped = map_request(&request);
        assert_eq!(mapped.data_points, 5, "every point is counted");
        assert!(mapped.refused.is_empty(), "{:?}", mapped.refused.examples());
        assert_eq!(mapped.points.iter().map(|p| p.value).collect::<Vec<_>>(), vec![1.0]);
        assert!(mapped.streams.is_empty());
    }

    #[test]
    fn protobuf_round_trips_and_garbage_is_an_error() {
        let request = decode_json(SPEC_EXAMPLE.as_bytes()).unwrap();
        let bytes = request.encode_to_vec();
        assert_eq!(decode_protobuf(&bytes).unwrap(), request);
        assert!(decode_protobuf(b"\xff\xff\xff").is_err());
        assert!(decode_json(b"{\"resourceMetrics\": 3}").is_err());
    }

    fn counts(start_ns: u64, buckets: Vec<(f64, f64, u64)>, sum: f64) -> HistogramCounts {
        HistogramCounts {
            start_ns,
            time_ms: 0,
            count: buckets.iter().map(|b| b.2).sum(),
            sum: Some(sum),
            min: None,
            max: None,
            buckets,
        }
    }

    #[test]
    fn cumulative_histograms_become_increases() {
        let first = counts(1, vec![(0.0, 10.0, 2), (10.0, 100.0, 1)], 40.0);
        let second = counts(1, vec![(0.0, 10.0, 5), (10.0, 100.0, 1)], 55.0);
        let increase = cumulative_increase(Some(&first), &second);
        assert_eq!(increase.count, 3);
        assert_eq!(increase.sum, Some(15.0));
        assert_eq!(increase.buckets, vec![(0.0, 10.0, 3)]);
        let values = expand(&increase.buckets, increase.sum);
        assert_eq!(values, vec![5.0, 5.0, 5.0]);
        // Another start time is a restart: the whole point counts.
        let restarted = counts(2, vec![(0.0, 10.0, 1)], 1.0);
        assert_eq!(cumulative_increase(Some(&second), &restarted), restarted);
        // Counts that went down are a restart too.
        let lower = counts(1, vec![(0.0, 10.0, 1)], 1.0);
        assert_eq!(cumulative_increase(Some(&second), &lower).count, 1);
    }

    #[test]
    fn a_halved_exponential_scale_still_diffs_exactly() {
        // Scale 1 buckets (1, √2], (√2, 2] merge into scale 0 bucket (1, 2].
        let r2 = 2f64.sqrt();
        let before = counts(7, vec![(1.0, r2, 1), (r2, 2.0, 1)], 3.0);
        let after = counts(7, vec![(1.0, 2.0, 5)], 8.0);
        let increase = cumulative_increase(Some(&before), &after);
        assert_eq!(increase.buckets, vec![(1.0, 2.0, 3)]);
        assert_eq!(increase.count, 3);
    }

    #[test]
    fn delta_sums_add_onto_the_running_total() {
        let stream = Stream {
            name: "calls".into(),
            tags: vec![],
            kind: Kind::Counter,
            timestamp_ms: 1,
            input: StreamInput::DeltaSum(3.0),
            response_time: None,
            data_point: 0,
        };
        let (values, state) = resolve_stream(&stream, None);
        assert_eq!((values, &state), (Ok(vec![3.0]), &StreamState::Total(3.0)));
        let (values, _) = resolve_stream(&stream, Some(&state));
        assert_eq!(values, Ok(vec![6.0]));
    }

    #[test]
    fn durations_feed_response_time_in_ms_with_tool_and_method() {
        let body = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[{
            "name":"mcp.server.operation.duration","unit":"s",
            "histogram":{"aggregationTemporality":1,"dataPoints":[{
               "timeUnixNano":"1700000000000000000","count":"2","sum":0.3,
               "bucketCounts":["0","2","0"],"explicitBounds":[0.1,0.5],
               "attributes":[{"key":"mcp.method.name","value":{"stringValue":"tools/call"}},
                             {"key":"gen_ai.tool.name","value":{"stringValue":"search"}},
                             {"key":"network.transport","value":{"stringValue":"tcp"}}]}]}}]}]}]}"#;
        let mapped = map_request(&decode_json(body.as_bytes()).unwrap());
        let rt: Vec<&Point> = mapped
            .points
            .iter()
            .filter(|p| p.name.as_ref() == "response_time")
            .collect();
        assert_eq!(rt.len(), 2);
        assert_eq!(
            rt[0].tags.to_vec(),
            vec![("method".into(), "tools/call".into()), ("tool".into(), "search".into())]
        );
        assert!((rt.iter().map(|p| p.value).sum::<f64>() - 300.0).abs() < 1e-9);
        assert!(rt.iter().all(|p| p.value > 100.0 && p.value <= 500.0));
        let own = mapped
            .points
            .iter()
            .filter(|p| p.name.as_ref() == "mcp.server.operation.duration")
            .count();
        assert_eq!(own, 2);
    }

    #[test]
    fn inconsistent_points_are_refused_one_by_one() {
        let body = r#"{"resourceMetrics":[{"scopeMetrics":[{"metrics":[
            {"name":"h","histogram":{"aggregationTemporality":1,"dataPoints":[
               {"timeUnixNano":"1700000000000000000","count":"3","bucketCounts":["1","1"],"explicitBounds":[1]},
               {"timeUnixNano":"1700000000000000000","count":"1","bucketCounts":["1"],"explicitBounds":[1]},
               {"count":"1","bucketCounts":["1","0"],"explicitBounds":[1]}]}},
            {"name":"s","summary":{"dataPoints":[{"timeUnixNano":"1700000000000000000"}]}},
            {"name":"g","gauge":{"dataPoints":[{"timeUnixNano":"1700000000000000000","asInt":"-4"}]}}]}]}]}"#;
        let mapped = map_request(&decode_json(body.as_bytes()).unwrap());
        assert_eq!(mapped.data_points, 5);
        assert_eq!(mapped.refused.points(), vec![0, 1, 2, 3]);
        assert!(mapped.refused.examples()[0].contains("add up to 2"));
        assert!(mapped.refused.examples()[2].contains("time_unix_nano"));
        assert_eq!(mapped.points.len(), 1);
        assert_eq!(mapped.points[0].value, -4.0);
    }

    #[test]
    fn the_per_point_limit_applies_to_the_increase_of_a_cumulative_histogram() {
        // A long-running process: far more than the limit since it started, a few new.
        let big = MAX_OBSERVATIONS_PER_POINT * 10;
        let mut before = counts(1, vec![(0.0, 10.0, big)], big as f64);
        before.time_ms = 1_000;
        let mut after = counts(1, vec![(0.0, 10.0, big + 3)], big as f64 + 15.0);
        after.time_ms = 2_000;
        let stream = |c: HistogramCounts| Stream {
            name: "h".into(),
            tags: vec![],
            kind: Kind::Histogram,
            timestamp_ms: c.time_ms,
            input: StreamInput::CumulativeHistogram(c),
            response_time: None,
            data_point: 0,
        };
        let (values, state) = resolve_stream(&stream(after.clone()), Some(&StreamState::Cumulative(before.clone())));
        assert_eq!(values, Ok(vec![5.0, 5.0, 5.0]));
        // A first sighting of that process is refused, and becomes the baseline.
        let (first, baseline) = resolve_stream(&stream(before.clone()), None);
        assert!(first.is_err(), "{first:?}");
        assert_eq!(baseline, StreamState::Cumulative(before.clone()));
        // A point older than the stored one is ignored, and the state kept.
        let (late, kept) = resolve_stream(&stream(before), Some(&state));
        assert_eq!((late, kept), (Ok(vec![]), state));
    }

    #[test]
    fn many_tags_and_oversized_requests_are_refused_before_copying() {
        let attrs: String = (0..17)
            .map(|i| format!(r#"{{"key":"k{i}","value":{{"stringValue":"v"}}}}"#))
            .collect::<Vec<_>>()
            .join(",");
        let body = format!(
            r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"g","gauge":{{"dataPoints":[
               {{"timeUnixNano":"1700000000000000000","asDouble":1,"attributes":[{attrs}]}}]}}}}]}}]}}]}}"#
        );
        let mapped = map_request(&decode_json(body.as_bytes()).unwrap());
        assert_eq!(mapped.refused.points(), vec![0]);
        assert!(mapped.refused.examples()[0].contains("more than 16 tags"));
        // Delta histogram points whose observations exceed the request budget.
        let per_point = MAX_OBSERVATIONS_PER_POINT;
        let points = MAX_SAMPLES_PER_REQUEST as u64 / per_point + 1;
        let point = format!(
            r#"{{"timeUnixNano":"1700000000000000000","count":"{per_point}","sum":1,"bucketCounts":["{per_point}"]}}"#
        );
        let body = format!(
            r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"h","histogram":{{"aggregationTemporality":1,"dataPoints":[{}]}}}}]}}]}}]}}"#,
            vec![point; points as usize].join(",")
        );
        let mapped = map_request(&decode_json(body.as_bytes()).unwrap());
        assert_eq!(mapped.points.len(), MAX_SAMPLES_PER_REQUEST);
        assert_eq!(mapped.refused.points(), vec![points as usize - 1]);
        assert!(
            mapped.refused.examples()[0].contains("more than"),
            "{:?}",
            mapped.refused
        );
    }

    #[test]
    fn bucket_counts_that_overflow_are_refused() {
        // Regression: the fuzzer's otlp_protobuf target found this add overflow.
        let body = format!(
            r#"{{"resourceMetrics":[{{"scopeMetrics":[{{"metrics":[{{"name":"h","histogram":{{"aggregationTemporality":1,
               "dataPoints":[{{"timeUnixNano":"1700000000000000000","count":"3",
               "bucketCounts":["{max}","{max}"],"explicitBounds":[1]}}]}}}}]}}]}}]}}"#,
            max = u64::MAX
        );
        let mapped = map_request(&decode_json(body.as_bytes()).unwrap());
        assert_eq!(mapped.refused.points(), vec![0]);
        assert!(
            mapped.refused.examples()[0].contains("overflow"),
            "{:?}",
            mapped.refused
        );
    }

    #[test]
    fn exponential_negative_and_zero_buckets() {
        let point = ExponentialHistogramDataPoint {
            scale: 0,
            zero_count: 1,
            count: 3,
            negative: Some(Buckets {
                offset: 0,
                bucket_counts: vec![1],
            }),
            positive: Some(Buckets {
                offset: 0,
                bucket_counts: vec![1],
            }),
            ..Default::default()
        };
        let buckets = exponential_buckets(&point).unwrap();
        assert_eq!(buckets, vec![(-2.0, -1.0, 1), (0.0, 0.0, 1), (1.0, 2.0, 1)]);
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn decoding_arbitrary_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                if let Ok(request) = decode_protobuf(&bytes) {
                    let _ = map_request(&request);
                }
                if let Ok(request) = decode_json(&bytes) {
                    let _ = map_request(&request);
                }
            }

            #[test]
            fn expansion_keeps_count_and_sum(
                counts in proptest::collection::vec(0u64..50, 1..8),
                t in 0.0f64..=1.0,
            ) {
                let buckets: Vec<(f64, f64, u64)> = counts
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| (i as f64 * 10.0, i as f64 * 10.0 + 10.0, c))
                    .collect();
                let low: f64 = buckets.iter().map(|b| b.0 * b.2 as f64).sum();
                let high: f64 = buckets.iter().map(|b| b.1 * b.2 as f64).sum();
                let sum = low + t * (high - low);
                let values = expand(&buckets, Some(sum));
                prop_assert_eq!(values.len() as u64, counts.iter().sum::<u64>());
                prop_assert!((values.iter().sum::<f64>() - sum).abs() <= 1e-6 * sum.abs().max(1.0));
                // Every observation lies in its own bucket.
                let mut i = 0;
                for &(l, u, c) in &buckets {
                    for v in &values[i..i + c as usize] {
                        prop_assert!(*v >= l && *v <= u);
                    }
                    i += c as usize;
                }
            }

            #[test]
            fn protobuf_round_trip_of_gauges(values in proptest::collection::vec(-1e9f64..1e9, 1..20)) {
                use opentelemetry_proto::tonic::metrics::v1::{Gauge, Metric, ResourceMetrics, ScopeMetrics};
                let request = ExportMetricsServiceRequest {
                    resource_metrics: vec![ResourceMetrics {
                        scope_metrics: vec![ScopeMetrics {
                            metrics: vec![Metric {
                                name: "g".into(),
                                data: Some(metric::Data::Gauge(Gauge {
                                    data_points: values
                                        .iter()
                                        .enumerate()
                                        .map(|(i, v)| NumberDataPoint {
                                            time_unix_nano: 1_700_000_000_000_000_000 + i as u64 * 1_000_000,
                                            value: Some(number_data_point::Value::AsDouble(*v)),
                                            ..Default::default()
                                        })
                                        .collect(),
                                })),
                                ..Default::default()
                            }],
                            ..Default::default()
                        }],
                        ..Default::default()
                    }],
                };
                let decoded = decode_protobuf(&request.encode_to_vec()).unwrap();
                let mapped = map_request(&decoded);
                let got: Vec<f64> = mapped.points.iter().map(|p| p.value).collect();
                prop_assert_eq!(got, values);
                let json = serde_json::to_vec(&request).unwrap();
                prop_assert_eq!(decode_json(&json).unwrap(), request);
            }
        }
    }
}
