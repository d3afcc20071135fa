//! SQL of anonymous usage on PostgreSQL: salts shared by every node, the event log,
//! per-visitor day flags and daily figures, updated in one transaction per batch.

use std::collections::{HashMap, HashSet};

use mcp_metrics_core::usage::day_of;

use super::{PgResult, PoolClient, pipeline};
use crate::{UsageDay, UsageRecord};

pub async fn salt(client: &PoolClient, day: i64, candidate: [u8; 32], now: i64) -> PgResult<[u8; 32]> {
    // The first node to store a salt for the day wins; every other node reads that one.
    client
        .execute(
            "INSERT INTO usage_salts (day, salt, created_at) VALUES ($1, $2, $3) ON CONFLICT (day) DO NOTHING",
            &[&day, &&candidate[..], &now],
        )
        .await?;
    let row = client
        .query_one("SELECT salt FROM usage_salts WHERE day = $1", &[&day])
        .await?;
    let stored: &[u8] = row.get(0);
    Ok(stored.try_into().unwrap_or(candidate))
}

pub async fn forget_before(client: &mut PoolClient, day: i64) -> PgResult<u64> {
    let tx = client.transaction().await?;
    let salts = tx.execute("DELETE FROM usage_salts WHERE day < $1", &[&day]).await?;
    tx.execute("DELETE FROM usage_visitors WHERE day < $1", &[&day]).await?;
    tx.commit().await?;
    Ok(salts)
}

pub async fn record(client: &mut PoolClient, events: &[UsageRecord]) -> PgResult<()> {
    let tx = client.transaction().await?;
    // A server deleted while its events were queued loses them, not the batch.
    let ids: Vec<&str> = events
        .iter()
        .map(|e| e.server_id.as_str())
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    let live: HashSet<String> = tx
        .query("SELECT id FROM servers WHERE id = ANY($1)", &[&ids])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let events: Vec<&UsageRecord> = events.iter().filter(|e| live.contains(&e.server_id)).collect();

    let new_visitor = tx
        .prepare_cached(
            "INSERT INTO usage_visitors (day, server_id, visitor, flags) VALUES ($1, $2, $3, 0)
             ON CONFLICT (day, server_id, visitor) DO NOTHING",
        )
        .await?;
    let first_of_kind = tx
        .prepare_cached(
            "UPDATE usage_visitors SET flags = flags | $4
             WHERE day = $1 AND server_id = $2 AND visitor = $3 AND flags & $4 = 0",
        )
        .await?;
    // Two pipelines in event order: every visitor row first, then the flag updates.
    // Each outcome is the one a sequential loop gets: "fresh" depends only on earlier
    // visitor inserts, "counted" only on earlier flag updates of rows that exist by then.
    let days: Vec<i64> = events.iter().map(|e| day_of(e.at)).collect();
    let fresh = pipeline(events.iter().zip(&days).map(|(e, day)| {
        let (tx, new_visitor) = (&tx, &new_visitor);
        async move { tx.execute(new_visitor, &[day, &e.server_id, &&e.visitor[..]]).await }
    }))
    .await?;
    let counted = pipeline(events.iter().zip(&days).map(|(e, day)| {
        let (tx, first_of_kind) = (&tx, &first_of_kind);
        async move {
            if e.kind.once_per_visitor_day() {
                let bit = 1i64 << e.kind.index();
                Ok(tx
                    .execute(first_of_kind, &[day, &e.server_id, &&e.visitor[..], &bit])
                    .await?
                    == 1)
            } else {
                Ok::<_, tokio_postgres::Error>(true)
            }
        }
    }))
    .await?;
    let outcomes = fresh.into_iter().map(|n| n == 1).zip(counted);

    let mut daily: HashMap<(&str, i64), UsageDay> = HashMap::new();
    let (mut servers, mut kinds, mut clients, mut ats, mut counts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (e, (fresh, counted)) in events.iter().zip(outcomes) {
        let day = day_of(e.at);
        servers.push(e.server_id.as_str());
        kinds.push(e.kind.as_str());
        clients.push(e.client.as_deref());
        ats.push(e.at);
        counts.push(counted);
        let d = daily.entry((&e.server_id, day)).or_insert(UsageDay {
            day,
            ..UsageDay::default()
        });
        d.visitors += u64::from(fresh);
        d.counted[e.kind.index()] += u64::from(counted);
        d.raw[e.kind.index()] += 1;
    }
    if !servers.is_empty() {
        tx.execute(
            "INSERT INTO server_usage (server_id, event, client, at, counted)
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::bool[])",
            &[&servers, &kinds, &clients, &ats, &counts],
        )
        .await?;
    }
    // A fixed row order, so two nodes adding to the same days never deadlock.
    let mut daily: Vec<((&str, i64), UsageDay)> = daily.into_iter().collect();
    daily.sort_unstable_by_key(|(k, _)| *k);
    let upsert = tx
        .prepare_cached(
            "INSERT INTO usage_daily (server_id, day, visitors, views, installs, tests, copy_config, repo_click,
                 raw_views, raw_installs, raw_tests, raw_copy_config, raw_repo_click)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (server_id, day) DO UPDATE SET
                 visitors = usage_daily.visitors + EXCLUDED.visitors, views = usage_daily.views + EXCLUDED.views,
                 installs = usage_daily.installs + EXCLUDED.installs, tests = usage_daily.tests + EXCLUDED.tests,
                 copy_config = usage_daily.copy_config + EXCLUDED.copy_config,
                 repo_click = usage_daily.repo_click + EXCLUDED.repo_click,
                 raw_views = usage_daily.raw_views + EXCLUDED.raw_views,
                 raw_installs = usage_daily.raw_installs + EXCLUDED.raw_installs,
                 raw_tests = usage_daily.raw_tests + EXCLUDED.raw_tests,
                 raw_copy_config = usage_daily.raw_copy_config + EXCLUDED.raw_copy_config,
                 raw_repo_click = usage_daily.raw_repo_click + EXCLUDED.raw_repo_click",
        )
        .await?;
    pipeline(daily.iter().map(|((server_id, day), d)| {
        let c = d.counted.map(|v| v as i64);
        let r = d.raw.map(|v| v as i64);
        let visitors = d.visitors as i64;
        let (tx, upsert) = (&tx, &upsert);
        async move {
            tx.execute(
                upsert,
                &[
                    server_id, day, &visitors, &c[0], &c[1], &c[2], &c[3], &c[4], &r[0], &r[1], &r[2], &r[3], &r[4],
                ],
            )
            .await
        }
    }))
    .await?;
    tx.commit().await
}

pub async fn days(client: &PoolClient, server_id: &str, from_day: i64, to_day: i64) -> PgResult<Vec<UsageDay>> {
    let rows = client
        .query(
            "SELECT day, visitors, views, installs, tests, copy_config, repo_click,
                    raw_views, raw_installs, raw_tests, raw_copy_config, raw_repo_click
             FROM usage_daily WHERE server_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
            &[&server_id, &from_day, &to_day],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let get = |i: usize| r.get::<_, i64>(i) as u64;
            UsageDay {
                day: r.get(0),
                visitors: get(1),
                counted: [get(2), get(3), get(4), get(5), get(6)],
                raw: [get(7), get(8), get(9), get(10), get(11)],
            }
        })
        .collect())
}
