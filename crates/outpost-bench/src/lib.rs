//! `outpost bench`: benchmarks as programs, and the fleet simulator operators use to size a hub.
//!
//! Owns: starting real hub and agent processes from the running `outpost` binary, measuring
//! them from `/proc` (RSS, PSS, CPU ticks, descriptors), a counting TCP proxy for bytes on the
//! wire, and a simulator of thousands of agents that speak the real protocol like today's agent (own
//! keys and certificates, one HTTP/2 connection each, hour-long polls, status on change) in
//! several simulator processes, against a hub tier it starts (one SQLite hub, or PostgreSQL
//! and N hub replicas: [`tier`]) or an existing tier. Every benchmark prints a Markdown report
//! with its method, the date and the machine.
//!
//! Must never: run in the test suite (only its pure helpers are unit-tested, plus one small
//! smoke run of the two-tier fleet mode, `crates/outpost/tests/bench_fleet.rs`), link the hub or
//! the agent in-process (they are measured as the separate processes users run), or change
//! what it measures to flatter a number.

pub mod bandwidth;
pub mod failover;
pub mod fleet;
pub mod footprint;
pub mod gitops;
pub mod harness;
pub mod inference;
pub mod kustomize;
pub mod offline;
pub mod pipeline;
pub mod procfs;
pub mod propagation;
pub mod shard;
pub mod sim;
pub mod stats;
pub mod tier;

use std::path::PathBuf;

use anyhow::{Context, Result};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
    /// Keep data dirs and logs here instead of a temporary directory.
    #[arg(long, global = true)]
    pub work_dir: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
pub enum BenchCmd {
    /// Agent RSS/CPU idle with 0 and 10 workloads beside prometheus-node-exporter; binary size.
    Footprint(footprint::FootprintArgs),
    /// `outpost apply` -> changed workload running on 1 and on 10 agents, p50/p99.
    Propagation(propagation::PropagationArgs),
    /// Agent start with the hub unreachable -> all workloads running.
    Offline(offline::OfflineArgs),
    /// Bytes per node per hour, idle and healthy, both directions.
    Bandwidth(bandwidth::BandwidthArgs),
    /// Simulate N agents against a hub tier (one SQLite hub, or PostgreSQL + N replicas, or
    /// several tiers in turn): CPU and memory per process, latency, change fan-out, reconnect storm.
    Fleet(fleet::FleetArgs),
    /// One simulator process of `bench fleet` (started by it; JSON lines on stdin/stdout).
    #[command(hide = true)]
    FleetShard,
    /// MQTT ingest into the agent's pipeline at QoS 0 and 1, beside mosquitto in the same run.
    Mqtt(pipeline::MqttArgs),
    /// A replayed sensor stream with known anomalies: bytes upstream vs raw, anomalies exact.
    Reduction(pipeline::ReductionArgs),
    /// `git push` -> running on every real agent, with the webhook and with polling.
    Gitops(gitops::GitopsArgs),
    /// Render time of an `overlaysBy` repository (500 site overlays), beside `kubectl kustomize`.
    Kustomize(kustomize::KustomizeArgs),
    /// The ONNX model endpoint at 1/4/16 clients beside Flask + onnxruntime; RSS; binary size.
    Inference(inference::InferenceArgs),
    /// Site failover after power cuts (network namespaces), warm and cold, beside keepalived VRRP.
    Failover(failover::FailoverArgs),
    /// Footprint, propagation, offline and bandwidth with their defaults, one after the other.
    Agent,
}

/// A Markdown table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut s = format!("| {} |\n|{}\n", headers.join(" | "), " --- |".repeat(headers.len()));
    for r in rows {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

/// A base for `/bin/sleep` arguments unique to this run, so processes of concurrent runs and
/// tests (which use 100000000..199999999) are never confused.
pub fn marker_base() -> u64 {
    900_000_000 + u64::from(std::process::id() % 90_000) * 1_000
}

fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d %H:%M %Z")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// Run one benchmark and print its report on stdout (progress goes to stderr).
pub async fn run(a: BenchArgs) -> Result<()> {
    if let BenchCmd::FleetShard = a.cmd {
        // stdout carries the shard's JSON replies only
        return shard::shard_main().await;
    }
    let tmp;
    let work = match &a.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("outpost-bench-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    println!(
        "outpost {} bench, {}, {}{}\n",
        env!("CARGO_PKG_VERSION"),
        today(),
        harness::machine(),
        if cfg!(debug_assertions) { " (DEBUG build)" } else { "" }
    );
    let sub = |name: &str| -> Result<PathBuf> {
        let d = work.join(name);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    };
    let report = match a.cmd {
        BenchCmd::Footprint(x) => footprint::footprint(x, &sub("footprint")?).await?,
        BenchCmd::Propagation(x) => propagation::propagation(x, &sub("propagation")?).await?,
        BenchCmd::Offline(x) => offline::offline(x, &sub("offline")?).await?,
        BenchCmd::Bandwidth(x) => bandwidth::bandwidth(x, &sub("bandwidth")?).await?,
        BenchCmd::Fleet(x) => fleet::fleet(x, &sub("fleet")?).await?,
        BenchCmd::FleetShard => unreachable!("handled above"),
        BenchCmd::Mqtt(x) => pipeline::mqtt(x, &sub("mqtt")?).await?,
        BenchCmd::Reduction(x) => pipeline::reduction(x, &sub("reduction")?).await?,
        BenchCmd::Gitops(x) => gitops::gitops(x, &sub("gitops")?).await?,
        BenchCmd::Kustomize(x) => kustomize::kustomize(x, &sub("kustomize")?).await?,
        BenchCmd::Inference(x) => inference::inference(x, &sub("inference")?).await?,
        BenchCmd::Failover(x) => failover::failover(x, &sub("failover")?).await?,
        BenchCmd::Agent => {
            let mut out = String::new();
            out.push_str(&footprint::footprint(defaults(), &sub("footprint")?).await?);
            out.push('\n');
            out.push_str(&propagation::propagation(defaults(), &sub("propagation")?).await?);
            out.push('\n');
            out.push_str(&offline::offline(defaults(), &sub("offline")?).await?);
            out.push('\n');
            out.push_str(&bandwidth::bandwidth(defaults(), &sub("bandwidth")?).await?);
            out
        }
    };
    println!("{report}");
    Ok(())
}

/// An argument struct with its clap defaults.
fn defaults<T: clap::Args>() -> T {
    let cmd = T::augment_args(clap::Command::new("d").no_binary_name(true));
    let m = cmd.get_matches_from(Vec::<String>::new());
    T::from_arg_matches(&m).expect("defaults parse")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_come_from_clap() {
        let f: footprint::FootprintArgs = defaults();
        assert_eq!((f.warmup_secs, f.secs), (20, 60));
        let b: bandwidth::BandwidthArgs = defaults();
        assert_eq!(b.secs, 300);
    }

    #[test]
    fn markdown_table() {
        let t = table(&["a", "b"], &[vec!["1".into(), "2".into()]]);
        assert_eq!(t, "| a | b |\n| --- | --- |\n| 1 | 2 |\n");
    }
}
