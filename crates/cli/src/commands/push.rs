//! `mcp-metrics push`: builds a JSON batch from `name=value[,tag=value]...` arguments,
//! signs it exactly as DESIGN.md §4.1 specifies and sends it.

use anyhow::{Context, bail};
use mcp_metrics_core::model::Kind;
use mcp_metrics_core::signature::sign;
use mcp_metrics_core::time::{now_ms, parse_time_param};
use serde_json::{Map, Value, json};

use crate::cli::PushArgs;

/// Parses `name=value[,tag=value]...`.
pub fn parse_sample(text: &str) -> anyhow::Result<(String, f64, Map<String, Value>)> {
    let mut parts = text.split(',');
    let first = parts.next().unwrap_or_default();
    let (name, value) = first
        .split_once('=')
        .with_context(|| format!("{text:?} is not name=value[,tag=value]..."))?;
    let value: f64 = value
        .trim()
        .parse()
        .with_context(|| format!("{value:?} in {text:?} is not a number"))?;
    let mut tags = Map::new();
    for part in parts {
        let (k, v) = part
            .split_once('=')
            .with_context(|| format!("tag {part:?} in {text:?} is not tag=value"))?;
        tags.insert(k.trim().to_owned(), Value::String(v.to_owned()));
    }
    Ok((name.trim().to_owned(), value, tags))
}

pub async fn run(args: PushArgs) -> anyhow::Result<()> {
    mcp_metrics_server::install_crypto_provider();
    let Some(kind) = Kind::parse(&args.kind) else {
        bail!("--type must be gauge, counter or histogram, not {:?}", args.kind);
    };
    let timestamp = match &args.timestamp {
        Some(t) => parse_time_param(t).with_context(|| format!("--timestamp {t:?} is not unix ms or RFC 3339"))?,
        None => now_ms(),
    };
    let mut metrics = Vec::new();
    for text in &args.samples {
        let (name, value, tags) = parse_sample(text)?;
        metrics
            .push(json!({"name": name, "value": value, "type": kind.as_str(), "timestamp": timestamp, "tags": tags}));
    }
    let body = json!({"server_id": args.server, "metrics": metrics}).to_string();
    let signature = sign(args.secret.as_bytes(), now_ms() / 1000, body.as_bytes());
    let url = format!("{}/api/v1/metrics", args.url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .header("x-api-key", &args.key)
        .header("x-signature", signature)
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}; is `mcp-metrics serve` running there?"))?;
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let detail = answer.get("detail").and_then(Value::as_str).unwrap_or("no detail");
        let code = answer.get("code").and_then(Value::as_str).unwrap_or("unknown");
        bail!("the service refused the push ({status}, {code}): {detail}");
    }
    let accepted = answer.get("accepted").and_then(Value::as_u64).unwrap_or(0);
    println!("accepted {accepted} of {} samples", args.samples.len());
    if let Some(rejected) = answer.get("rejected").and_then(Value::as_array) {
        for r in rejected {
            let index = r.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            println!(
                "rejected {:?}: {} ({})",
                args.samples.get(index).map(String::as_str).unwrap_or("?"),
                r.get("detail").and_then(Value::as_str).unwrap_or(""),
                r.get("code").and_then(Value::as_str).unwrap_or("")
            );
        }
        if !rejected.is_empty() {
            bail!("{} samples were rejected", rejected.len());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_samples() {
        let (name, value, tags) = parse_sample("response_time=120.5,tool=search,region=eu").unwrap();
        assert_eq!((name.as_str(), value), ("response_time", 120.5));
        assert_eq!(tags.get("tool"), Some(&Value::String("search".into())));
        assert_eq!(tags.len(), 2);
        assert!(parse_sample("novalue").is_err());
        assert!(parse_sample("x=abc").is_err());
        assert!(parse_sample("x=1,badtag").is_err());
    }
}
