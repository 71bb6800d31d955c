//! `outpost data tail|query STREAM`: pipeline records the hub stored (docs/pipeline.md).
//!
//! `query` prints the newest records that match (oldest first); `tail` prints the last few and,
//! with `-f`, keeps printing new ones as they arrive (polls the hub once a second with the
//! cursor of the last record seen, so nothing is printed twice or skipped).

use std::time::Duration;

use anyhow::Result;
use outpost_api::pipeline::StoredRecord;
use outpost_api::RolloutState;

use crate::client::Client;
use crate::output::{age, table};
use crate::Format;

#[derive(clap::Subcommand)]
pub enum DataCmd {
    /// The last records of a stream; -f keeps printing new ones.
    Tail(DataArgs),
    /// Records of a stream that match the filters.
    Query(DataArgs),
}

#[derive(clap::Args)]
pub struct DataArgs {
    /// The stream, as named in the Pipeline.
    stream: String,
    /// Only records from this node.
    #[arg(long)]
    node: Option<String>,
    /// Only records that reached their node within this long (e.g. 10m, 2h).
    #[arg(long, value_parser = crate::parse_duration)]
    since: Option<Duration>,
    /// record, anomaly, aggregate or sample.
    #[arg(long)]
    kind: Option<String>,
    /// How many records (tail: 10, query: 100; at most 10,000).
    #[arg(short = 'n', long)]
    limit: Option<u32>,
    /// Only records stored after this cursor, oldest first (query: page through everything
    /// with the `cursor` of the last record printed).
    #[arg(long)]
    after: Option<i64>,
    /// Keep printing new records (tail only).
    #[arg(short = 'f', long)]
    follow: bool,
    #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
    output: Format,
}

/// The query of `GET /v1/data` (encoded by reqwest).
fn query(a: &DataArgs, limit: u32, after: Option<i64>) -> Vec<(&'static str, String)> {
    let mut q = vec![("stream", a.stream.clone()), ("limit", limit.to_string())];
    if let Some(n) = &a.node {
        q.push(("node", n.clone()));
    }
    if let Some(s) = a.since {
        q.push(("since_secs", s.as_secs().to_string()));
    }
    if let Some(k) = &a.kind {
        q.push(("kind", k.clone()));
    }
    if let Some(c) = after {
        q.push(("after", c.to_string()));
    }
    q
}

fn print(records: &[StoredRecord], format: Format, header: bool) -> Result<()> {
    match format {
        Format::Json => {
            for r in records {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        Format::Yaml => {
            for r in records {
                print!("---\n{}", serde_saphyr::to_string(r)?);
            }
        }
        Format::Table => {
            let rows: Vec<Vec<String>> = records
                .iter()
                .map(|r| {
                    let mut data = r.record.data.to_string();
                    if data.len() > 100 {
                        data.truncate(97);
                        data.push_str("...");
                    }
                    vec![
                        age(Some(r.record.at)),
                        r.node.clone(),
                        r.record.kind.as_str().to_string(),
                        r.record.rules.join(","),
                        r.record.key.clone().unwrap_or_default(),
                        data,
                    ]
                })
                .collect();
            if rows.is_empty() {
                return Ok(());
            }
            let t = table(&["AGE", "NODE", "KIND", "RULES", "KEY", "DATA"], &rows);
            if header {
                print!("{t}");
            } else {
                print!("{}", t.split_once('\n').map_or("", |x| x.1));
            }
        }
    }
    Ok(())
}

/// `outpost get pipelines`.
pub async fn get_pipelines(c: &Client, f: Format) -> Result<()> {
    let ps: Vec<outpost_api::pipeline::PipelineInfo> = c.get("/v1/pipelines").await?;
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(&ps)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(&ps)?),
        Format::Table => {
            let rows: Vec<Vec<String>> = ps
                .iter()
                .map(|p| {
                    // nodes on the current revision with their gate passed, of all placed
                    let done = p
                        .placements
                        .iter()
                        .filter(|x| x.running_revision == Some(p.revision) && x.state == Some(RolloutState::Complete))
                        .count();
                    vec![
                        p.name.clone(),
                        p.revision.to_string(),
                        format!("{done}/{}", p.placements.len()),
                        p.streams.join(","),
                        p.sinks.join(","),
                        p.node_selector
                            .iter()
                            .map(|(k, v)| format!("{k}={v}"))
                            .collect::<Vec<_>>()
                            .join(","),
                        age(Some(p.updated_at)),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAME", "REVISION", "UP-TO-DATE", "STREAMS", "SINKS", "SELECTOR", "AGE"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

pub async fn run(c: &Client, cmd: DataCmd) -> Result<()> {
    match cmd {
        DataCmd::Query(a) => {
            let recs: Vec<StoredRecord> = c
                .get_query("/v1/data", &query(&a, a.limit.unwrap_or(100), a.after))
                .await?;
            if recs.is_empty() && a.after.is_none() && a.output == Format::Table {
                eprintln!("no records for stream {} (yet); check `outpost get pipelines` (the NODES column) and `curl <agent ingest>/v1/stats` on the node", a.stream);
            }
            print(&recs, a.output, true)
        }
        DataCmd::Tail(a) => {
            let recs: Vec<StoredRecord> = c.get_query("/v1/data", &query(&a, a.limit.unwrap_or(10), None)).await?;
            print(&recs, a.output, true)?;
            if !a.follow {
                return Ok(());
            }
            let mut after = recs.last().map(|r| r.cursor).unwrap_or(0);
            let mut header = recs.is_empty();
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let recs: Vec<StoredRecord> = c.get_query("/v1/data", &query(&a, 1000, Some(after))).await?;
                if let Some(l) = recs.last() {
                    after = l.cursor;
                    print(&recs, a.output, header)?;
                    header = false;
                }
            }
        }
    }
}
