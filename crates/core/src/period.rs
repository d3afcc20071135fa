//! Chart periods and their resolutions (DESIGN.md §4.3): each period is served from the
//! coarsest stored level that still gives at most ~1,500 points per series; 5-minute and
//! 6-hour points are merged from finer stored buckets.

use crate::rollup::Level;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Period {
    H1,
    H6,
    H24,
    D7,
    D30,
    D90,
    Y1,
}

impl Period {
    pub const ALL: [Period; 7] = [
        Period::H1,
        Period::H6,
        Period::H24,
        Period::D7,
        Period::D30,
        Period::D90,
        Period::Y1,
    ];

    pub fn parse(s: &str) -> Option<Period> {
        Period::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::H1 => "1h",
            Period::H6 => "6h",
            Period::H24 => "24h",
            Period::D7 => "7d",
            Period::D30 => "30d",
            Period::D90 => "90d",
            Period::Y1 => "1y",
        }
    }

    pub fn duration_ms(self) -> i64 {
        const H: i64 = 3_600_000;
        match self {
            Period::H1 => H,
            Period::H6 => 6 * H,
            Period::H24 => 24 * H,
            Period::D7 => 7 * 24 * H,
            Period::D30 => 30 * 24 * H,
            Period::D90 => 90 * 24 * H,
            Period::Y1 => 365 * 24 * H,
        }
    }

    /// Width of one point.
    pub fn resolution_ms(self) -> i64 {
        match self {
            Period::H1 => 60_000,
            Period::H6 | Period::H24 => 300_000,
            Period::D7 => 3_600_000,
            Period::D30 => 6 * 3_600_000,
            Period::D90 | Period::Y1 => 86_400_000,
        }
    }

    pub fn resolution_label(self) -> &'static str {
        match self {
            Period::H1 => "1m",
            Period::H6 | Period::H24 => "5m",
            Period::D7 => "1h",
            Period::D30 => "6h",
            Period::D90 | Period::Y1 => "1d",
        }
    }

    /// The stored rollup level points are built from.
    pub fn source_level(self) -> Level {
        match self {
            Period::H1 | Period::H6 | Period::H24 => Level::Minute,
            Period::D7 | Period::D30 => Level::Hour,
            Period::D90 | Period::Y1 => Level::Day,
        }
    }

    /// `Cache-Control: max-age`: short for live periods, long for the year.
    pub fn max_age_secs(self) -> u64 {
        match self {
            Period::H1 => 5,
            Period::H6 => 15,
            Period::H24 => 30,
            Period::D7 => 60,
            Period::D30 => 120,
            Period::D90 | Period::Y1 => 300,
        }
    }

    /// The window ending at `now`: (from, to) aligned to whole points, `to` exclusive
    /// and including the point that contains `now`.
    pub fn window(self, now: i64) -> (i64, i64) {
        let step = self.resolution_ms();
        let to = crate::rollup::align(now, step) + step;
        (to - self.duration_ms(), to)
    }

    pub fn points(self) -> i64 {
        self.duration_ms() / self.resolution_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_table() {
        let table: Vec<(&str, &str, i64, Level)> = Period::ALL
            .iter()
            .map(|p| (p.as_str(), p.resolution_label(), p.points(), p.source_level()))
            .collect();
        assert_eq!(
            table,
            vec![
                ("1h", "1m", 60, Level::Minute),
                ("6h", "5m", 72, Level::Minute),
                ("24h", "5m", 288, Level::Minute),
                ("7d", "1h", 168, Level::Hour),
                ("30d", "6h", 120, Level::Hour),
                ("90d", "1d", 90, Level::Day),
                ("1y", "1d", 365, Level::Day),
            ]
        );
        for p in Period::ALL {
            assert!(p.points() <= 1500);
            assert_eq!(
                p.resolution_ms() % p.source_level().bucket_ms(),
                0,
                "{p:?} points are whole source buckets"
            );
            assert_eq!(Period::parse(p.as_str()), Some(p));
        }
        assert!(Period::D30.max_age_secs() > Period::H1.max_age_secs());
        assert_eq!(Period::parse("2h"), None);
    }

    #[test]
    fn window_is_aligned_and_contains_now() {
        let now = 1_750_000_123_456;
        for p in Period::ALL {
            let (from, to) = p.window(now);
            assert_eq!(to - from, p.duration_ms());
            assert_eq!(from % p.resolution_ms(), 0);
            assert!(from <= now && now < to);
        }
    }
}
