//! Offline recovery: an agent that already holds 10 process workloads starts with its hub
//! unreachable (hub process killed, and `--hub` pointing at an unroutable address); time from
//! spawning `outpost agent run` until all 10 processes are alive.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::harness::{self, count_sleepers, HubProc};
use crate::stats::{ms, Summary};
use crate::table;

/// TEST-NET-1 (RFC 5737): nothing answers there.
const UNREACHABLE_HUB: &str = "https://192.0.2.1:8443";

#[derive(clap::Args, Clone, Debug)]
pub struct OfflineArgs {
    /// Agent starts to time.
    #[arg(long, default_value_t = 10)]
    pub runs: usize,
    /// Process workloads on the node.
    #[arg(long, default_value_t = 10)]
    pub workloads: usize,
}

pub async fn offline(a: OfflineArgs, work: &std::path::Path) -> Result<String> {
    let mut hub = HubProc::start(work).await?;
    let token = hub.join_token(1).await?;
    let mut agent = hub.join("offline-1", &token).await?;
    agent.start(None)?;
    let (yaml, args) = harness::sleepers(a.workloads, crate::marker_base() + 300);
    hub.apply(&yaml).await?;
    let n = a.workloads;
    harness::wait_for(
        "workloads running",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || (count_sleepers(&args) == n).then_some(()),
    )
    .await?;
    // the agent has persisted its desired state; now the hub goes away for good
    agent.stop();
    hub.kill9();
    let mut times = Vec::new();
    for run in 0..a.runs {
        harness::wait_for(
            "workloads stopped",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || (count_sleepers(&args) == 0).then_some(()),
        )
        .await?;
        let t0 = Instant::now();
        agent.start(Some(UNREACHABLE_HUB))?;
        harness::wait_for(
            "workloads running offline",
            Duration::from_secs(60),
            Duration::from_millis(5),
            || (count_sleepers(&args) == n).then_some(()),
        )
        .await
        .with_context(|| format!("run {run}"))?;
        times.push(t0.elapsed());
        agent.stop();
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let s = Summary::of_durations(&times);
    Ok(format!(
        "Offline recovery: spawn `outpost agent run` (hub killed, --hub {UNREACHABLE_HUB}) -> all {n} workload processes alive (polled every 5 ms)\n\n{}",
        table(
            &["runs", "median", "p99 (= max at this n)", "max", "mean"],
            &[vec![s.n.to_string(), ms(s.p50), ms(s.p99), ms(s.max), ms(s.mean)]]
        )
    ))
}
