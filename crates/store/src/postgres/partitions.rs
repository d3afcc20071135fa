//! Daily partitions of the raw sample table: naming, creation ahead of time and on
//! demand, and the list of existing ones.
//!
//! Creation runs in autocommit on its own connection, never inside a write transaction:
//! a failed `CREATE` would abort the whole batch, and catalog locks taken by DDL would
//! be held until the batch commits. Several nodes may create the same day at once;
//! losing that race is success.

use tokio_postgres::Client;

pub const DAY_MS: i64 = 86_400_000;

/// Days since the epoch of a unix-ms instant (UTC).
pub fn day_of(ts: i64) -> i64 {
    ts.div_euclid(DAY_MS)
}

/// (year, month, day) of a day number, proleptic Gregorian (H. Hinnant's algorithm).
pub fn civil(day: i64) -> (i64, u32, u32) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// `server_metrics_p20261204` for the day containing 2026-12-04.
pub fn name(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("server_metrics_p{y:04}{m:02}{d:02}")
}

/// The day a partition name stands for, if it is one of ours.
pub fn parse_name(name: &str) -> Option<i64> {
    let digits = name.strip_prefix("server_metrics_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let y: i64 = digits[..4].parse().ok()?;
    let m: i64 = digits[4..6].parse().ok()?;
    let d: i64 = digits[6..].parse().ok()?;
    // Inverse of `civil`, days from civil.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// Days that have a partition now.
pub async fn existing(client: &Client) -> Result<Vec<i64>, tokio_postgres::Error> {
    let rows = client
        .query(
            "SELECT c.relname FROM pg_inherits i
             JOIN pg_class c ON c.oid = i.inhrelid
             JOIN pg_class p ON p.oid = i.inhparent
             WHERE p.relname = 'server_metrics' AND p.relnamespace = current_schema()::regnamespace",
            &[],
        )
        .await?;
    Ok(rows.iter().filter_map(|r| parse_name(r.get::<_, &str>(0))).collect())
}

/// Creates the partition of `day` unless it exists. A concurrent creator on another node
/// makes our `CREATE` fail with a duplicate table, a duplicate catalog row or an
/// overlap; the partition then exists, which is all the caller needs.
pub async fn create(client: &Client, day: i64) -> Result<(), tokio_postgres::Error> {
    let sql = format!(
        "CREATE TABLE IF NOT EXISTS {} PARTITION OF server_metrics FOR VALUES FROM ({}) TO ({})",
        name(day),
        day * DAY_MS,
        (day + 1) * DAY_MS
    );
    match client.batch_execute(&sql).await {
        Ok(()) => Ok(()),
        Err(e) => {
            let exists: bool = client
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name(day)])
                .await?
                .get(0);
            if exists { Ok(()) } else { Err(e) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(name(0), "server_metrics_p19700101");
        // 2026-12-04 is day 20_791.
        assert_eq!(name(20_791), "server_metrics_p20261204");
        for day in [-3650, -1, 0, 59, 60, 10_957, 11_016, 20_791, 2_932_896 - 1] {
            assert_eq!(parse_name(&name(day)), Some(day), "{day}");
        }
        assert_eq!(parse_name("server_metrics_daily"), None);
        assert_eq!(day_of(-1), -1);
    }
}
