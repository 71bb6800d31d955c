//! Agent footprint: RSS, PSS and CPU of `outpost agent run` (the agent process only, not its
//! workloads) idle with 0 and with 10 process workloads, beside Debian's
//! prometheus-node-exporter measured in the same windows; stripped binary sizes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::harness::{self, count_sleepers, free_port, HubProc};
use crate::procfs::{Meter, Usage};
use crate::stats::bytes;
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct FootprintArgs {
    /// Seconds to let the agent settle before each window.
    #[arg(long, default_value_t = 20)]
    pub warmup_secs: u64,
    /// Length of each measurement window, seconds.
    #[arg(long, default_value_t = 60)]
    pub secs: u64,
    /// Reference exporter to measure beside the agent (skipped when missing).
    #[arg(long, default_value = "/usr/bin/prometheus-node-exporter")]
    pub node_exporter: PathBuf,
}

struct Exporter(std::process::Child);

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU share, or the clock-tick resolution when the process used less than one tick.
fn cpu(u: &Usage) -> String {
    let tick_pct = 100.0 / crate::procfs::ticks_per_sec() / u.secs.max(1.0);
    if u.cpu_pct < tick_pct {
        format!("< {tick_pct:.3} % (under 1 tick)")
    } else {
        format!("{:.3} %", u.cpu_pct)
    }
}

fn fmt_usage(what: &str, u: &Usage) -> Vec<String> {
    vec![
        what.to_string(),
        bytes(u.rss_mean as f64),
        bytes(u.rss_max as f64),
        bytes(u.pss_end as f64),
        cpu(u),
        format!("{:.0} %", u.machine_busy_pct),
    ]
}

pub async fn footprint(a: FootprintArgs, work: &std::path::Path) -> Result<String> {
    let hub = HubProc::start(work).await?;
    let token = hub.join_token(1).await?;
    let mut agent = hub.join("footprint-1", &token).await?;
    let agent_pid = agent.start(None)?;
    let exporter = if a.node_exporter.exists() {
        let port = free_port()?;
        let log = std::fs::File::create(work.join("node-exporter.log"))?;
        let child = std::process::Command::new(&a.node_exporter)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start node exporter")?;
        Some(Exporter(child))
    } else {
        eprintln!("{} not found: measuring the agent alone", a.node_exporter.display());
        None
    };
    let mut rows = Vec::new();
    for (label, n) in [("0 workloads", 0usize), ("10 workloads", 10)] {
        if n > 0 {
            let (yaml, args) = harness::sleepers(n, crate::marker_base());
            hub.apply(&yaml).await?;
            harness::wait_for(
                "10 workloads running",
                Duration::from_secs(60),
                Duration::from_millis(100),
                || (count_sleepers(&args) == n).then_some(()),
            )
            .await?;
        }
        eprintln!("footprint: {label}: warm-up {} s, window {} s", a.warmup_secs, a.secs);
        tokio::time::sleep(Duration::from_secs(a.warmup_secs)).await;
        let mut meters = vec![Meter::start(agent_pid).context("agent exited")?];
        if let Some(e) = &exporter {
            meters.push(Meter::start(e.0.id()).context("node exporter exited")?);
        }
        crate::procfs::watch(&mut meters, Duration::from_secs(a.secs)).await;
        let mut it = meters.into_iter();
        let agent_u = it.next().and_then(Meter::finish).context("agent exited")?;
        rows.push(fmt_usage(&format!("outpost agent, {label}"), &agent_u));
        if let Some(m) = it.next() {
            let u = m.finish().context("node exporter exited")?;
            rows.push(fmt_usage(
                &format!("prometheus-node-exporter (same window, {label})"),
                &u,
            ));
        }
    }
    agent.stop();
    let bin = harness::outpost_bin()?;
    let size = std::fs::metadata(&bin)?.len();
    let mut size_rows = vec![vec![
        format!(
            "outpost ({})",
            if cfg!(debug_assertions) {
                "DEBUG build: not representative"
            } else {
                "release"
            }
        ),
        bytes(size as f64),
        stripped(&bin),
    ]];
    if let Ok(m) = std::fs::metadata(&a.node_exporter) {
        size_rows.push(vec![
            "prometheus-node-exporter (Debian)".into(),
            bytes(m.len() as f64),
            stripped(&a.node_exporter),
        ]);
    }
    let mut out = String::new();
    out.push_str(&format!(
        "Footprint, agent process only (workloads excluded), warm-up {} s, window {} s, RSS sampled every 1 s\n\n",
        a.warmup_secs, a.secs
    ));
    out.push_str(&table(
        &[
            "process",
            "RSS mean",
            "RSS max",
            "PSS end",
            "CPU (% of one core)",
            "machine busy",
        ],
        &rows,
    ));
    out.push('\n');
    out.push_str(&table(&["binary", "size", "stripped"], &size_rows));
    Ok(out)
}

/// What `file(1)` says about symbols: "yes" for a stripped binary.
fn stripped(p: &std::path::Path) -> String {
    match std::process::Command::new("file").arg("-b").arg(p).output() {
        Ok(o) => {
            let t = String::from_utf8_lossy(&o.stdout);
            if t.contains("not stripped") {
                "no".into()
            } else if t.contains("stripped") {
                "yes".into()
            } else {
                "?".into()
            }
        }
        Err(_) => "? (no file(1))".into(),
    }
}
