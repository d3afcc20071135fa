//! SQL of anonymous usage: salts, the event log, per-visitor day flags and daily
//! figures, all updated in the writer's transaction.

use std::collections::HashMap;

use mcp_metrics_core::usage::day_of;
use rusqlite::{Connection, TransactionBehavior, params};

use crate::{UsageDay, UsageRecord};

pub fn salt(conn: &mut Connection, day: i64, candidate: [u8; 32], now: i64) -> rusqlite::Result<[u8; 32]> {
    conn.execute(
        "INSERT INTO usage_salts (day, salt, created_at) VALUES (?1, ?2, ?3) ON CONFLICT (day) DO NOTHING",
        params![day, &candidate[..], now],
    )?;
    let stored: Vec<u8> = conn.query_row("SELECT salt FROM usage_salts WHERE day = ?1", [day], |r| r.get(0))?;
    Ok(stored.try_into().unwrap_or(candidate))
}

pub fn forget_before(conn: &mut Connection, day: i64) -> rusqlite::Result<u64> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let salts = tx.execute("DELETE FROM usage_salts WHERE day < ?1", [day])? as u64;
    tx.execute("DELETE FROM usage_visitors WHERE day < ?1", [day])?;
    tx.commit()?;
    Ok(salts)
}

pub fn record(conn: &mut Connection, events: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        // A server deleted while its events were queued loses them, not the batch.
        let mut live = super::LiveServers::new(&tx)?;
        let mut alive = Vec::with_capacity(events.len());
        for e in events {
            alive.push(live.contains([&e.server_id])?);
        }
        let mut new_visitor = tx.prepare_cached(
            "INSERT INTO usage_visitors (day, server_id, visitor, flags) VALUES (?1, ?2, ?3, 0)
             ON CONFLICT (day, server_id, visitor) DO NOTHING",
        )?;
        let mut first_of_kind = tx.prepare_cached(
            "UPDATE usage_visitors SET flags = flags | ?4 WHERE day = ?1 AND server_id = ?2 AND visitor = ?3 AND flags & ?4 = 0",
        )?;
        let mut log = tx.prepare_cached(
            "INSERT INTO server_usage (server_id, event, client, at, counted) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut daily: HashMap<(&str, i64), UsageDay> = HashMap::new();
        for e in events.iter().zip(&alive).filter(|(_, alive)| **alive).map(|(e, _)| e) {
            let day = day_of(e.at);
            let fresh = new_visitor.execute(params![day, e.server_id, &e.visitor[..]])? == 1;
            let counted = if e.kind.once_per_visitor_day() {
                first_of_kind.execute(params![day, e.server_id, &e.visitor[..], 1i64 << e.kind.index()])? == 1
            } else {
                true
            };
            log.execute(params![e.server_id, e.kind.as_str(), e.client, e.at, counted])?;
            let d = daily.entry((&e.server_id, day)).or_insert(UsageDay {
                day,
                ..UsageDay::default()
            });
            d.visitors += u64::from(fresh);
            d.counted[e.kind.index()] += u64::from(counted);
            d.raw[e.kind.index()] += 1;
        }
        let mut upsert = tx.prepare_cached(
            "INSERT INTO usage_daily (server_id, day, visitors, views, installs, tests, copy_config, repo_click,
                 raw_views, raw_installs, raw_tests, raw_copy_config, raw_repo_click)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
             ON CONFLICT (server_id, day) DO UPDATE SET
                 visitors = visitors + excluded.visitors, views = views + excluded.views,
                 installs = installs + excluded.installs, tests = tests + excluded.tests,
                 copy_config = copy_config + excluded.copy_config, repo_click = repo_click + excluded.repo_click,
                 raw_views = raw_views + excluded.raw_views, raw_installs = raw_installs + excluded.raw_installs,
                 raw_tests = raw_tests + excluded.raw_tests, raw_copy_config = raw_copy_config + excluded.raw_copy_config,
                 raw_repo_click = raw_repo_click + excluded.raw_repo_click",
        )?;
        for ((server_id, day), d) in daily {
            let c = d.counted.map(|v| v as i64);
            let r = d.raw.map(|v| v as i64);
            upsert.execute(params![
                server_id,
                day,
                d.visitors as i64,
                c[0],
                c[1],
                c[2],
                c[3],
                c[4],
                r[0],
                r[1],
                r[2],
                r[3],
                r[4]
            ])?;
        }
    }
    tx.commit()
}

pub fn days(conn: &Connection, server_id: &str, from_day: i64, to_day: i64) -> rusqlite::Result<Vec<UsageDay>> {
    let mut stmt = conn.prepare_cached(
        "SELECT day, visitors, views, installs, tests, copy_config, repo_click,
                raw_views, raw_installs, raw_tests, raw_copy_config, raw_repo_click
         FROM usage_daily WHERE server_id = ?1 AND day >= ?2 AND day <= ?3 ORDER BY day",
    )?;
    let rows = stmt.query_map(params![server_id, from_day, to_day], |r| {
        let get = |i: usize| r.get::<_, i64>(i).map(|v| v as u64);
        Ok(UsageDay {
            day: r.get(0)?,
            visitors: get(1)?,
            counted: [get(2)?, get(3)?, get(4)?, get(5)?, get(6)?],
            raw: [get(7)?, get(8)?, get(9)?, get(10)?, get(11)?],
        })
    })?;
    rows.collect()
}

pub fn purge_events(conn: &mut Connection, cutoff: i64) -> rusqlite::Result<u64> {
    Ok(conn.execute("DELETE FROM server_usage WHERE at < ?1", [cutoff])? as u64)
}
