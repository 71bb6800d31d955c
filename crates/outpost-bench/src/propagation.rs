//! Propagation: from the moment `outpost apply` is started at the hub until the changed
//! workload's new process is alive on 1 and on 10 real agents on this machine.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::harness::{pids_with_cmdline, sleeper_ds, HubProc};
use crate::stats::{ms, Summary};
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct PropagationArgs {
    /// Changes per case (1 agent, 10 agents).
    #[arg(long, default_value_t = 20)]
    pub rounds: usize,
    /// Agents for the fleet case.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
}

/// A DaemonSet change, timed until `want` processes run the new command.
async fn one_change(hub: &HubProc, yaml: &str, arg: &str, want: usize) -> Result<Vec<Duration>> {
    let t0 = Instant::now();
    let apply = hub.apply(yaml);
    tokio::pin!(apply);
    let mut arrivals = Vec::new();
    let mut applied = false;
    let deadline = t0 + Duration::from_secs(30);
    loop {
        if !applied {
            tokio::select! {
                r = &mut apply => { r?; applied = true; }
                _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            }
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let n = pids_with_cmdline(&["/bin/sleep", arg]).len();
        while arrivals.len() < n.min(want) {
            arrivals.push(t0.elapsed());
        }
        if arrivals.len() >= want && applied {
            return Ok(arrivals);
        }
        if Instant::now() > deadline {
            bail!(
                "change to {arg} reached {} of {want} agents within 30 s",
                arrivals.len()
            );
        }
    }
}

/// A RolloutPolicy for every workload: one wave, no bake. Propagation times the link, not
/// rollout waves (the built-in policy would send a change to 10 nodes in four gated waves).
pub const ALL_AT_ONCE: &str = "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: all-at-once}\nspec:\n  waves:\n  - {percent: 100}\n  bake: 0s\n  tinyFleet: 1000000\n";

pub async fn propagation(a: PropagationArgs, work: &std::path::Path) -> Result<String> {
    let hub = HubProc::start(work).await?;
    hub.apply(ALL_AT_ONCE).await?;
    let one = hub
        .try_cli(&["token", "create", "--uses", "1", "--ttl", "0", "--labels", "prop=one"])
        .await?;
    let rest = hub.join_token(a.agents as u32).await?;
    let mut agents = Vec::new();
    for i in 0..a.agents {
        let t = if i == 0 { one.trim() } else { rest.as_str() };
        let mut ag = hub.join(&format!("prop-{i}"), t).await?;
        ag.start(None)?;
        agents.push(ag);
    }
    // let every agent connect and settle
    tokio::time::sleep(Duration::from_secs(3)).await;
    let base = crate::marker_base() + 500;
    let mut rows = Vec::new();
    for (case, want, selector) in [("1 agent", 1usize, true), ("10 agents", a.agents, false)] {
        let mut per_change = Vec::new();
        let mut per_agent = Vec::new();
        for r in 0..a.rounds {
            let arg = (base + if selector { 0 } else { 10_000 } + r as u64).to_string();
            let mut yaml = sleeper_ds(if selector { "prop-one" } else { "prop-all" }, &arg);
            if selector {
                yaml = yaml.replace(
                    "      containers:",
                    "      nodeSelector: {prop: one}\n      containers:",
                );
            }
            let arrivals = one_change(&hub, &yaml, &arg, want).await?;
            per_change.push(*arrivals.last().unwrap_or(&Duration::ZERO));
            per_agent.extend(arrivals);
            // let the old process finish stopping before the next change
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let c = Summary::of_durations(&per_change);
        let p = Summary::of_durations(&per_agent);
        rows.push(vec![
            case.to_string(),
            c.n.to_string(),
            ms(p.p50),
            ms(p.p99),
            ms(c.p50),
            ms(c.p99),
            ms(c.max),
        ]);
    }
    drop(agents);
    Ok(format!(
        "Propagation: start of `outpost apply` -> new process alive (polled every 5 ms), {} changes per case\n\n{}",
        a.rounds,
        table(
            &[
                "case",
                "changes",
                "per agent p50",
                "per agent p99",
                "all agents p50",
                "all agents p99",
                "all agents max"
            ],
            &rows
        )
    ))
}
