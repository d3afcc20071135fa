//! The byte format of a sample run: the samples one write stored for one server in one
//! minute, packed into a single blob, and the rules that turn the runs of a minute back
//! into the samples the API shows.
//!
//! A row per sample cost the SQLite writer about 0.3 µs of B-tree work per sample and
//! most of its pages per commit (docs/METRICS.md, "Beside VictoriaMetrics"); a run is one
//! row for a whole request's worth. The price is that what a row used to settle on insert
//! is settled on read instead, by [`resolve`]: a gauge or counter written twice at the
//! same (series, ts) shows its latest value, and histogram observations that share a
//! millisecond are numbered 0, 1, 2, … in arrival order. Pure, so it is unit- and
//! property-tested apart from SQLite.
//!
//! Layout: a version byte, then per sample, in the order written (the writer puts each
//! series' samples together, in arrival order, and does not sort them by time):
//! - a varint header: the zigzag ts delta from the previous sample (from the run's minute
//!   for the first), shifted left 3; bit 2 set when the series differs from the previous
//!   sample's, bit 1 for a histogram observation, bit 0 for a value stored as 8 bytes;
//! - when bit 2 is set, the series id as a zigzag varint delta from the previous one's;
//! - the value: a zigzag varint of `2k` for the integer `k` or `2m + 1` for `m / 1000`
//!   (the same exact coding as `value_codec`), or the f64's 8 bytes, little-endian.

use mcp_metrics_core::model::RawSample;

use mcp_metrics_core::varint::{self, unzigzag, zigzag};

use super::value_codec;

const VERSION: u8 = 1;
const NEW_SERIES: u64 = 0b100;
const OBSERVATION: u64 = 0b010;
const REAL: u64 = 0b001;

/// One sample as a run holds it, before [`resolve`] settles overwrites and seqs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunSample {
    pub ts: i64,
    pub series_id: i64,
    /// A histogram observation (kept beside others at its ts) rather than a value
    /// (replaced by a later one at its ts).
    pub observation: bool,
    pub value: f64,
}

/// A blob that is not a run this version wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("sample run is corrupt at byte {0}")]
pub struct Corrupt(pub usize);

/// Appends the run of `samples` (in arrival order, every ts inside the minute starting
/// at `minute`) to `out`.
pub fn encode(minute: i64, samples: impl IntoIterator<Item = RunSample>, out: &mut Vec<u8>) {
    out.push(VERSION);
    let (mut ts, mut series) = (minute, None);
    for s in samples {
        let (value_tag, int) = match value_codec::tagged(s.value) {
            Some(n) => (0, n),
            None => (REAL, 0),
        };
        let new_series = series != Some(s.series_id);
        let header = zigzag(s.ts - ts) << 3
            | if new_series { NEW_SERIES } else { 0 }
            | if s.observation { OBSERVATION } else { 0 }
            | value_tag;
        varint::put(out, header);
        if new_series {
            varint::put(out, zigzag(s.series_id.wrapping_sub(series.unwrap_or(0))));
        }
        if value_tag == REAL {
            out.extend_from_slice(&s.value.to_le_bytes());
        } else {
            varint::put(out, zigzag(int));
        }
        (ts, series) = (s.ts, Some(s.series_id));
    }
}

/// Calls `each` for every sample of a run, in stored order. A sample outside the run's
/// minute makes the run corrupt, like bytes that do not decode.
pub fn decode(minute: i64, run: &[u8], mut each: impl FnMut(RunSample)) -> Result<(), Corrupt> {
    let Some((&VERSION, mut rest)) = run.split_first() else {
        return Err(Corrupt(0));
    };
    let at = |rest: &[u8]| run.len() - rest.len();
    let (mut ts, mut series) = (minute, None::<i64>);
    while !rest.is_empty() {
        let header = varint::get(&mut rest).ok_or(Corrupt(at(rest)))?;
        ts = ts
            .checked_add(unzigzag(header >> 3))
            .filter(|ts| (minute..minute.saturating_add(super::MINUTE)).contains(ts))
            .ok_or(Corrupt(at(rest)))?;
        if header & NEW_SERIES != 0 {
            let delta = unzigzag(varint::get(&mut rest).ok_or(Corrupt(at(rest)))?);
            series = Some(series.unwrap_or(0).wrapping_add(delta));
        }
        // The first sample names its series.
        let series_id = series.ok_or(Corrupt(1))?;
        let value = if header & REAL != 0 {
            let (bytes, after) = rest.split_first_chunk::<8>().ok_or(Corrupt(at(rest)))?;
            rest = after;
            f64::from_le_bytes(*bytes)
        } else {
            value_codec::untagged(unzigzag(varint::get(&mut rest).ok_or(Corrupt(at(rest)))?))
        };
        each(RunSample {
            ts,
            series_id,
            observation: header & OBSERVATION != 0,
            value,
        });
    }
    Ok(())
}

/// Turns the samples of one minute, gathered from its runs in the order they were
/// written (each run in arrival order, runs in write order), into what the store shows,
/// sorted by (ts, series_id, seq): of values at one (series, ts) the last written, at
/// seq 0; observations at one (series, ts) each, at seq 0, 1, 2, … in arrival order.
///
/// Sorts `gathered` in place (the caller reuses it).
pub fn resolve(gathered: &mut [RunSample], out: &mut Vec<RawSample>) {
    // Stable: arrival order survives within each (ts, series).
    gathered.sort_by_key(|s| (s.ts, s.series_id));
    for group in gathered.chunk_by(|a, b| (a.ts, a.series_id) == (b.ts, b.series_id)) {
        if group.iter().any(|s| s.observation) {
            out.extend(group.iter().enumerate().map(|(seq, s)| RawSample {
                series_id: s.series_id,
                timestamp: s.ts,
                seq: seq as i64,
                value: s.value,
            }));
        } else {
            let last = group[group.len() - 1];
            out.push(RawSample {
                series_id: last.series_id,
                timestamp: last.ts,
                seq: 0,
                value: last.value,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MINUTE: i64 = 1_700_000_040_000;

    fn sample(ts: i64, series_id: i64, observation: bool, value: f64) -> RunSample {
        RunSample {
            ts,
            series_id,
            observation,
            value,
        }
    }

    fn round_trip(samples: &[RunSample]) -> Vec<RunSample> {
        let mut blob = Vec::new();
        encode(MINUTE, samples.iter().copied(), &mut blob);
        let mut back = Vec::new();
        decode(MINUTE, &blob, |s| back.push(s)).unwrap();
        back
    }

    #[test]
    fn values_keep_their_bits() {
        let odd = [
            0.0,
            -0.0,
            1.0,
            -7.0,
            123.456,
            0.001,
            1e300,
            -1e-300,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            f64::MIN_POSITIVE,
            4503599627370496.0,
            f64::NAN,
        ];
        let samples: Vec<_> = odd
            .iter()
            .enumerate()
            .map(|(i, &v)| sample(MINUTE + i as i64, 5, false, v))
            .collect();
        let back = round_trip(&samples);
        assert_eq!(back.len(), samples.len());
        for (a, b) in samples.iter().zip(&back) {
            assert_eq!(a.value.to_bits(), b.value.to_bits(), "{}", a.value);
        }
    }

    #[test]
    fn whole_numbers_and_thousandths_take_few_bytes() {
        let mut blob = Vec::new();
        // Four series of 25 samples each, 10 ms apart, as a remote-write request sends them.
        let samples = (0..100).map(|i| sample(MINUTE + (i % 25) * 10, 1 + i / 25, false, 12.5 + i as f64));
        encode(MINUTE, samples, &mut blob);
        // Per sample: a 2-byte header and a 3-byte value, less than the f64's 8 bytes
        // alone; the series is written only when it changes.
        assert!(blob.len() <= 1 + 100 * 5 + 4, "{} bytes", blob.len());
    }

    #[test]
    fn later_values_replace_earlier_ones_and_observations_are_numbered() {
        let mut gathered = vec![
            // first run
            sample(MINUTE + 5, 1, false, 1.0),
            sample(MINUTE + 5, 2, true, 10.0),
            sample(MINUTE + 5, 2, true, 11.0),
            // second run
            sample(MINUTE + 1, 1, false, 0.5),
            sample(MINUTE + 5, 1, false, 2.0),
            sample(MINUTE + 5, 2, true, 12.0),
        ];
        let mut out = Vec::new();
        resolve(&mut gathered, &mut out);
        let got: Vec<_> = out
            .iter()
            .map(|s| (s.timestamp - MINUTE, s.series_id, s.seq, s.value))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 1, 0, 0.5),
                (5, 1, 0, 2.0),
                (5, 2, 0, 10.0),
                (5, 2, 1, 11.0),
                (5, 2, 2, 12.0),
            ]
        );
    }

    #[test]
    fn damage_is_reported_not_misread() {
        let mut blob = Vec::new();
        encode(MINUTE, [sample(MINUTE + 3, 9, false, 0.1234)], &mut blob);
        for cut in 0..blob.len() {
            if cut == 1 {
                continue; // a version byte alone is an empty run
            }
            assert!(decode(MINUTE, &blob[..cut], |_| {}).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(MINUTE, &[2, 0, 0, 0], |_| {}), Err(Corrupt(0)));
        // A first sample that does not name its series.
        assert_eq!(decode(MINUTE, &[1, 0, 0], |_| {}), Err(Corrupt(1)));
        // A sample outside the run's minute.
        let mut outside = Vec::new();
        encode(MINUTE, [sample(MINUTE + 60_000, 9, false, 1.0)], &mut outside);
        assert!(decode(MINUTE, &outside, |_| {}).is_err());
        let mut last_ms = Vec::new();
        encode(MINUTE, [sample(MINUTE + 59_999, 9, false, 1.0)], &mut last_ms);
        assert!(decode(MINUTE, &last_ms, |_| {}).is_ok());
    }

    fn run_strategy() -> impl Strategy<Value = Vec<RunSample>> {
        let value = prop_oneof![
            (-1_000_000i64..1_000_000).prop_map(|n| n as f64),
            (-1_000_000i64..1_000_000).prop_map(|n| n as f64 / 1000.0),
            any::<f64>(),
        ];
        // Series from a few, so that neighbours often share one.
        let series = prop_oneof![1i64..4, 1i64..1 << 40];
        prop::collection::vec((0i64..60_000, series, any::<bool>(), value), 0..200).prop_map(|v| {
            v.into_iter()
                .map(|(off, series, obs, value)| sample(MINUTE + off, series, obs, value))
                .collect()
        })
    }

    proptest! {
        #[test]
        fn runs_round_trip(samples in run_strategy()) {
            let back = round_trip(&samples);
            prop_assert_eq!(back.len(), samples.len());
            for (a, b) in samples.iter().zip(&back) {
                prop_assert_eq!((a.ts, a.series_id, a.observation), (b.ts, b.series_id, b.observation));
                prop_assert_eq!(a.value.to_bits(), b.value.to_bits());
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(MINUTE, &bytes, |_| {});
        }

        /// However values and observations are split into runs, resolving gives what
        /// applying them one by one (upsert values, append observations) gives.
        #[test]
        fn resolving_matches_applying_writes_in_order(
            writes in prop::collection::vec((0i64..4, 1i64..4, any::<bool>(), -100i64..100), 0..60),
            cuts in prop::collection::vec(0usize..60, 0..5),
        ) {
            // A series is values or observations, never both.
            let writes: Vec<RunSample> = writes
                .into_iter()
                .map(|(off, series, _, v)| sample(MINUTE + off, series, series == 3, v as f64))
                .collect();
            let mut expected: std::collections::BTreeMap<(i64, i64, i64), f64> = Default::default();
            for w in &writes {
                if w.observation {
                    let seq = expected.range((w.ts, w.series_id, 0)..(w.ts, w.series_id, i64::MAX)).count() as i64;
                    expected.insert((w.ts, w.series_id, seq), w.value);
                } else {
                    expected.insert((w.ts, w.series_id, 0), w.value);
                }
            }
            // Split the writes into runs at the cuts, each in arrival order as the writer
            // stores it.
            let mut bounds: Vec<usize> = cuts.into_iter().filter(|&c| c < writes.len()).collect();
            bounds.extend([0, writes.len()]);
            bounds.sort_unstable();
            let mut gathered = Vec::new();
            for w in bounds.windows(2) {
                gathered.extend(round_trip(&writes[w[0]..w[1]]));
            }
            let mut out = Vec::new();
            resolve(&mut gathered, &mut out);
            let got: Vec<_> = out.iter().map(|s| ((s.timestamp, s.series_id, s.seq), s.value)).collect();
            prop_assert_eq!(got, expected.into_iter().collect::<Vec<_>>());
        }
    }
}
