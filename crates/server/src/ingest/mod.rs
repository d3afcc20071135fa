//! The ingest pipeline: validated samples → series resolution → bounded queue → one
//! group-commit writer (DESIGN.md §7).
//!
//! [`prepare`] turns a decoded batch into a store request, resolving series through
//! the in-memory cache; [`writer`] commits requests in groups.

pub mod rate_limit;
pub mod series_cache;
pub mod writer;

use mcp_metrics_core::codes::Code;
use mcp_metrics_core::ingest::{Rejection, SampleLimits, WireBatch, validate_point, validate_sample};
use mcp_metrics_core::model::{Kind, SeriesKey};
use mcp_metrics_store::{NewSeries, PendingSample, SeriesRef, WriteRequest};

use series_cache::{KeyMap, SeriesCache, cache_key};

/// A request ready for the writer, plus what to tell the client.
pub struct Prepared {
    pub request: WriteRequest,
    pub rejected: Vec<Rejection>,
}

/// Validates every sample and resolves its series: known series by id from the cache,
/// unseen ones as [`SeriesRef::New`] for the writer to create.
pub fn prepare(
    batch: &WireBatch<'_>,
    server_id: &str,
    cache: &SeriesCache,
    now: i64,
    limits: &SampleLimits,
) -> Prepared {
    let mut request = WriteRequest {
        server_id: server_id.to_owned(),
        samples: Vec::with_capacity(batch.metrics.len()),
        ..Default::default()
    };
    let mut rejected = Vec::new();
    let mut new_index: KeyMap<u32> = KeyMap::default();
    let mut key = String::with_capacity(128);
    let known = cache.read();
    let mut run: Option<(usize, SeriesRef, Kind)> = None;
    for (index, sample) in batch.metrics.iter().enumerate() {
        // Samples of one series usually come in a run sharing lent tags (remote-write,
        // OTLP, line protocol fields): the run's name and tags are checked and resolved
        // once, not once per sample.
        let continues = run.and_then(|(previous, series, kind)| {
            let first = &batch.metrics[previous];
            (sample.tags.lent_from_same(&first.tags) && sample.name == first.name).then_some((series, kind))
        });
        let checked = match continues {
            Some(_) => validate_point(index, sample, now, limits),
            None => validate_sample(index, sample, now, limits),
        };
        let valid = match checked {
            Ok(valid) => valid,
            Err(rejection) => {
                rejected.push(rejection);
                continue;
            }
        };
        if let Some((series, kind)) = continues
            && kind == valid.kind
        {
            request.samples.push(PendingSample {
                series,
                kind,
                timestamp: valid.timestamp,
                value: valid.value,
            });
            continue;
        }
        cache_key(&mut key, server_id, &sample.name, sample.tags());
        let existing_kind = known
            .get(key.as_str())
            .map(|&(id, kind)| (SeriesRef::Known(id), kind))
            .or_else(|| {
                new_index
                    .get(key.as_str())
                    .map(|&i| (SeriesRef::New(i), request.new_series[i as usize].kind))
            });
        let series = match existing_kind {
            Some((series, kind)) if kind == valid.kind => series,
            Some((_, kind)) => {
                rejected.push(Rejection {
                    index,
                    code: Code::KindMismatch,
                    detail: format!("this series is a {}, not a {}", kind.as_str(), valid.kind.as_str()),
                });
                continue;
            }
            None => {
                let i = request.new_series.len() as u32;
                request.new_series.push(NewSeries {
                    key: SeriesKey {
                        server_id: server_id.to_owned(),
                        name: sample.name.to_string(),
                        tags: sample.tags().map(|(k, v)| (k.to_owned(), v.to_owned())).collect(),
                    },
                    kind: valid.kind,
                });
                new_index.insert(key.clone(), i);
                SeriesRef::New(i)
            }
        };
        run = Some((index, series, valid.kind));
        request.samples.push(PendingSample {
            series,
            kind: valid.kind,
            timestamp: valid.timestamp,
            value: valid.value,
        });
    }
    Prepared { request, rejected }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcp_metrics_core::ingest::{WireSample, WireTags, decode_json};
    use mcp_metrics_core::model::{Kind, SeriesInfo};

    #[test]
    fn resolves_known_new_and_repeated_series() {
        let cache = SeriesCache::default();
        cache.insert_all(&[SeriesInfo {
            id: 7,
            key: SeriesKey {
                server_id: "s".into(),
                name: "known".into(),
                tags: vec![("a".into(), "1".into())],
            },
            kind: Kind::Gauge,
        }]);
        let body = br#"{"server_id":"s","metrics":[
            {"name":"known","value":1,"tags":{"a":"1"}},
            {"name":"fresh","value":1,"type":"counter"},
            {"name":"fresh","value":2,"type":"counter"},
            {"name":"known","value":1,"type":"histogram","tags":{"a":"1"}},
            {"name":"fresh","value":3,"type":"gauge"},
            {"name":"known","value":1,"tags":{"a":"2"}}
        ]}"#;
        let limits = SampleLimits::default();
        let batch = decode_json(body, &limits).unwrap();
        let p = prepare(&batch, "s", &cache, mcp_metrics_core::time::now_ms(), &limits);
        let refs: Vec<SeriesRef> = p.request.samples.iter().map(|s| s.series).collect();
        assert_eq!(
            refs,
            vec![
                SeriesRef::Known(7),
                SeriesRef::New(0),
                SeriesRef::New(0),
                SeriesRef::New(1)
            ]
        );
        assert_eq!(p.request.new_series.len(), 2);
        assert_eq!(
            p.request.new_series[1].key.tags,
            vec![("a".to_string(), "2".to_string())]
        );
        let mismatches: Vec<usize> = p.rejected.iter().map(|r| r.index).collect();
        assert_eq!(mismatches, vec![3, 4]);
        assert!(p.rejected.iter().all(|r| r.code == Code::KindMismatch));
    }

    /// The run shortcut must resolve exactly as the cache lookup would (a sample of
    /// another name, kind or tags ends the run). This checks the answers, not that the
    /// shortcut fires: it is a performance path, measured by the remote-write and OTLP
    /// A/B runs in docs/METRICS.md.
    #[test]
    fn runs_of_lent_tags_resolve_like_single_samples() {
        let cache = SeriesCache::default();
        let a = [("host".to_string(), "a".to_string())];
        let b = [("host".to_string(), "b".to_string())];
        // Equal to `a` but not lent from it: resolves through the cache key.
        let a_again = a.clone();
        let now = mcp_metrics_core::time::now_ms();
        fn sample<'a>(
            name: &'a str,
            tags: &'a [(String, String)],
            kind: Option<&'a str>,
            i: i64,
            now: i64,
        ) -> WireSample<'a> {
            WireSample {
                name: name.into(),
                value: mcp_metrics_core::ingest::WireValue::Number(i as f64),
                kind: kind.map(Into::into),
                timestamp: Some(mcp_metrics_core::ingest::WireTime::Millis((now - 1000 + i) as f64)),
                tags: WireTags::Strings(tags),
            }
        }
        let (a, b, a_again) = (&a[..], &b[..], &a_again[..]);
        let sample = |name, tags, kind, i| sample(name, tags, kind, i, now);
        let batch = WireBatch {
            server_id: "s".into(),
            metrics: vec![
                sample("up", a, None, 0),
                sample("up", a, None, 1),
                sample("up", b, None, 2),
                sample("up", b, Some("counter"), 3),
                sample("up", a, None, 4),
                sample("down", a, None, 5),
                sample("down", a, None, 6),
                sample("up", a_again, None, 7),
            ],
        };
        let p = prepare(&batch, "s", &cache, now, &SampleLimits::default());
        let refs: Vec<SeriesRef> = p.request.samples.iter().map(|s| s.series).collect();
        assert_eq!(
            refs,
            vec![
                SeriesRef::New(0),
                SeriesRef::New(0),
                SeriesRef::New(1),
                SeriesRef::New(0),
                SeriesRef::New(2),
                SeriesRef::New(2),
                SeriesRef::New(0),
            ]
        );
        let names: Vec<&str> = p.request.new_series.iter().map(|n| n.key.name.as_str()).collect();
        assert_eq!(names, vec!["up", "up", "down"]);
        let rejected: Vec<(usize, Code)> = p.rejected.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(rejected, vec![(3, Code::KindMismatch)]);
        let values: Vec<f64> = p.request.samples.iter().map(|s| s.value).collect();
        assert_eq!(values, vec![0.0, 1.0, 2.0, 4.0, 5.0, 6.0, 7.0]);
    }

    /// Inside a run only a point's own fields are checked again: a refused point is named
    /// with its code, and the run goes on after it.
    #[test]
    fn a_runs_refused_points_are_named_and_the_run_goes_on() {
        use mcp_metrics_core::ingest::{WireTime, WireValue};
        let cache = SeriesCache::default();
        let now = mcp_metrics_core::time::now_ms();
        let tags = [("host".to_string(), "a".to_string())];
        let point = |value: f64, kind: Option<&'static str>, ts: i64| WireSample {
            name: "up".into(),
            value: WireValue::Number(value),
            kind: kind.map(Into::into),
            timestamp: Some(WireTime::Millis(ts as f64)),
            tags: WireTags::Strings(&tags),
        };
        let batch = WireBatch {
            server_id: "s".into(),
            metrics: vec![
                point(1.0, Some("counter"), now - 3),
                point(f64::NAN, Some("counter"), now - 2),
                point(-1.0, Some("counter"), now - 2),
                point(2.0, Some("counter"), now - 400 * 86_400_000),
                point(3.0, Some("counter"), now + 3_600_000),
                point(4.0, Some("sum"), now - 1),
                point(5.0, Some("counter"), now),
            ],
        };
        let p = prepare(&batch, "s", &cache, now, &SampleLimits::default());
        let rejected: Vec<(usize, Code)> = p.rejected.iter().map(|r| (r.index, r.code)).collect();
        assert_eq!(
            rejected,
            vec![
                (1, Code::InvalidValue),
                (2, Code::InvalidValue),
                (3, Code::TooOld),
                (4, Code::TooFarAhead),
                (5, Code::InvalidType),
            ]
        );
        let stored: Vec<(SeriesRef, f64)> = p.request.samples.iter().map(|s| (s.series, s.value)).collect();
        assert_eq!(stored, vec![(SeriesRef::New(0), 1.0), (SeriesRef::New(0), 5.0)]);
    }

    proptest::proptest! {
        /// Whatever the runs, each sample is refused exactly when, and with the code that,
        /// the full check alone gives it (kind conflicts between samples aside): checking
        /// only the points of a run changes no answer. And the request is the one
        /// prepared when no sample lends another's tags (each its own copy, so no run
        /// forms): a run resolves each sample to the series the full path would.
        #[test]
        fn runs_refuse_exactly_what_the_full_check_refuses(
            picks in proptest::collection::vec((0usize..3, 0usize..3, 0usize..3, 0usize..3, 0usize..3), 0..40)
        ) {
            use mcp_metrics_core::ingest::{WireTime, WireValue, validate_sample};
            let now = 1_800_000_000_000;
            let tag_sets = [
                vec![("host".to_string(), "a".to_string())],
                vec![("host".to_string(), "b".to_string())],
                vec![("1host".to_string(), "a".to_string())],
            ];
            let names = ["up", "down", "9up"];
            let kinds = [None, Some("counter"), Some("summary")];
            let values = [1.0, -1.0, f64::NAN];
            let times = [now - 1_000, now - 400 * 86_400_000, now + 3_600_000];
            let sample = |(name, _, kind, value, time): (usize, usize, usize, usize, usize), tags| WireSample {
                name: names[name].into(),
                value: WireValue::Number(values[value]),
                kind: kinds[kind].map(Into::into),
                timestamp: Some(WireTime::Millis(times[time] as f64)),
                tags: WireTags::Strings(tags),
            };
            let batch = WireBatch {
                server_id: "s".into(),
                metrics: picks.iter().map(|&pick| sample(pick, &tag_sets[pick.1])).collect(),
            };
            let limits = SampleLimits::default();
            let p = prepare(&batch, "s", &SeriesCache::default(), now, &limits);
            let refused: Vec<(usize, Code)> = p
                .rejected
                .iter()
                .filter(|r| r.code != Code::KindMismatch)
                .map(|r| (r.index, r.code))
                .collect();
            let alone: Vec<(usize, Code)> = batch
                .metrics
                .iter()
                .enumerate()
                .filter_map(|(i, s)| validate_sample(i, s, now, &limits).err().map(|r| (r.index, r.code)))
                .collect();
            proptest::prop_assert_eq!(refused, alone);
            proptest::prop_assert_eq!(p.request.samples.len() + p.rejected.len(), batch.metrics.len());

            let own_tags: Vec<Vec<(String, String)>> = picks.iter().map(|&(_, tags, ..)| tag_sets[tags].clone()).collect();
            let unshared = WireBatch {
                server_id: "s".into(),
                metrics: picks.iter().zip(&own_tags).map(|(&pick, tags)| sample(pick, tags)).collect(),
            };
            let full = prepare(&unshared, "s", &SeriesCache::default(), now, &limits);
            proptest::prop_assert_eq!(&p.request.samples, &full.request.samples);
            proptest::prop_assert_eq!(&p.request.new_series, &full.request.new_series);
            proptest::prop_assert_eq!(&p.rejected, &full.rejected);
        }
    }
}
