//! `outpost logs` and `outpost get alerts`: the operator's side of monitoring.
//!
//! `outpost logs NODE WORKLOAD` asks the hub, which relays the request to the node over the
//! node's own long-poll and waits for its answer (the hub never dials a node). `-f` follows by
//! repeated requests: each asks for the bytes after the offset the previous answer ended at,
//! once a second. `--errors` reads the error lines nodes forwarded to the hub instead (works
//! while the node is offline).

use std::time::Duration;

use anyhow::{bail, Context, Result};
use outpost_api::{AlertInfo, AlertState, LogData, NodeInfo, StoredErrorLine};

use crate::client::Client;
use crate::output::{age, table};
use crate::Format;

#[derive(clap::Args)]
pub struct LogsArgs {
    /// The node (as in `outpost get nodes`). Optional with --errors.
    node: Option<String>,
    /// Workload: its key (`deployment/default/web`) or its name when unique on the node.
    workload: Option<String>,
    /// Container (default: the workload's first container with a log).
    #[arg(short = 'c', long)]
    container: Option<String>,
    /// Only log segments written within this long (e.g. 10m, 2h); with --errors, lines forwarded within it.
    #[arg(long, value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// Only the last N lines.
    #[arg(long)]
    tail: Option<u32>,
    /// Keep printing new output (polls the node once a second through the hub).
    #[arg(short = 'f', long)]
    follow: bool,
    /// Show the error lines nodes forwarded to the hub (no request to the node).
    #[arg(long)]
    errors: bool,
}

/// Webhook URLs must be http(s).
pub fn check_webhooks(urls: &[String]) -> Result<Vec<String>> {
    for u in urls {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--webhook {u:?} is not an http:// or https:// URL");
        }
    }
    Ok(urls.to_vec())
}

/// Resolve a workload name to its key using what the node reports.
async fn workload_key(c: &Client, node: &str, w: &str) -> Result<String> {
    if w.contains('/') {
        return Ok(w.to_string());
    }
    let n: NodeInfo = c.get(&format!("/v1/nodes/{node}")).await?;
    let keys: Vec<&str> = n
        .workloads
        .iter()
        .map(|s| s.key.as_str())
        .filter(|k| k.rsplit('/').next() == Some(w))
        .collect();
    match keys.as_slice() {
        [k] => Ok(k.to_string()),
        [] => bail!(
            "node {node} runs no workload named {w:?}; see `outpost describe node {node}` (use the full key, e.g. deployment/default/{w})"
        ),
        many => bail!("{w:?} is ambiguous on {node}: {}; give the full key", many.join(", ")),
    }
}

pub async fn run(c: &Client, a: LogsArgs) -> Result<()> {
    if a.errors {
        return errors(c, &a).await;
    }
    let (Some(node), Some(w)) = (&a.node, &a.workload) else {
        bail!("usage: outpost logs NODE WORKLOAD [-c CONTAINER] [--since 10m] [--tail N] [-f], or outpost logs --errors [NODE [WORKLOAD]]");
    };
    let key = workload_key(c, node, w).await?;
    let mut q: Vec<(&str, String)> = vec![("node", node.clone()), ("workload", key)];
    if let Some(ct) = &a.container {
        q.push(("container", ct.clone()));
    }
    let mut first = q.clone();
    if let Some(t) = a.tail {
        first.push(("tail", t.to_string()));
    }
    if let Some(s) = a.since {
        first.push(("since_secs", s.as_secs().to_string()));
    }
    let d: LogData = c.get_query("/v1/logs", &first).await?;
    if let Some(e) = d.error {
        bail!("{e}");
    }
    if d.truncated {
        eprintln!("(older output cut: an answer holds the newest 1 MiB; use --tail or --since)");
    }
    print!("{}", d.text);
    if !a.follow {
        return Ok(());
    }
    let mut offset = d.offset;
    let container = d.container;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut next = q.clone();
        next.retain(|(k, _)| *k != "container");
        next.push(("container", container.clone()));
        next.push(("from_offset", offset.to_string()));
        match c.get_query::<LogData, _>("/v1/logs", &next).await {
            Ok(d) if d.error.is_none() => {
                if d.offset < offset {
                    eprintln!("(log rotated)");
                }
                print!("{}", d.text);
                offset = d.offset;
            }
            Ok(d) => bail!("{}", d.error.unwrap_or_default()),
            Err(e) => eprintln!("(waiting for the node: {e:#})"),
        }
    }
}

async fn errors(c: &Client, a: &LogsArgs) -> Result<()> {
    let mut q: Vec<(&str, String)> = vec![("limit", "10000".into())];
    if let Some(n) = &a.node {
        q.push(("node", n.clone()));
        if let Some(w) = &a.workload {
            let key = if w.contains('/') {
                w.clone()
            } else {
                workload_key(c, n, w).await?
            };
            q.push(("workload", key));
        }
    }
    if let Some(s) = a.since {
        q.push(("since_secs", s.as_secs().to_string()));
    }
    let mut lines: Vec<StoredErrorLine> = c
        .get_query("/v1/errors", &q)
        .await
        .context("reading forwarded errors")?;
    if let Some(t) = a.tail {
        let skip = lines.len().saturating_sub(t as usize);
        lines.drain(..skip);
    }
    for l in &lines {
        println!(
            "{} {} {}/{}: {}",
            age(Some(l.line.at)),
            l.node,
            l.line.workload,
            l.line.container,
            l.line.line
        );
    }
    if lines.is_empty() {
        eprintln!("no forwarded error lines");
    }
    Ok(())
}

/// `outpost get alerts`: firing first, then resolved within the last 7 days.
pub async fn get_alerts(c: &Client, f: Format) -> Result<()> {
    let alerts: Vec<AlertInfo> = c.get_query("/v1/alerts", &[("all", "true")]).await?;
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(&alerts)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(&alerts)?),
        Format::Table => {
            let rows: Vec<Vec<String>> = alerts
                .iter()
                .map(|a| {
                    vec![
                        match a.state {
                            AlertState::Firing => "FIRING".into(),
                            AlertState::Resolved => format!("resolved {} ago", age(a.resolved_at)),
                        },
                        a.severity.clone(),
                        a.name.clone(),
                        if a.node.is_empty() {
                            "(fleet)".into()
                        } else {
                            a.node.clone()
                        },
                        if a.subject.is_empty() {
                            "-".into()
                        } else {
                            a.subject.clone()
                        },
                        age(Some(a.started_at)),
                        a.source.clone(),
                        a.summary.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["STATE", "SEVERITY", "ALERT", "NODE", "SUBJECT", "SINCE", "SOURCE", "SUMMARY"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_webhook_urls() {
        assert!(check_webhooks(&["ftp://x".into()]).is_err());
        assert!(check_webhooks(&["http://127.0.0.1:9/h".into()]).is_ok());
    }
}
