//! GitOps: from `git push` returning until the changed workload's new process is alive on every
//! real agent, with the hub told by its webhook and with the hub polling (docs/gitops.md).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{pids_with_cmdline, sleeper_ds, HubProc};
use crate::propagation::ALL_AT_ONCE;
use crate::stats::{ms, Summary};
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct GitopsArgs {
    /// Commits per case (webhook, polling).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Real agents.
    #[arg(long, default_value_t = 10)]
    pub agents: usize,
    /// The polling case's poll interval (seconds, at least 5).
    #[arg(long, default_value_t = 5)]
    pub poll_secs: u64,
}

fn git(dir: &Path, args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("git")
        .args(["-c", "user.name=bench", "-c", "user.email=bench@example.com"])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .context("running git (install it: apt-get install git)")?;
    if !o.status.success() {
        bail!("git {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// Write the app with `arg`, commit and push.
fn commit(work: &Path, arg: &str) -> Result<()> {
    std::fs::write(work.join("app/ds.yaml"), sleeper_ds("gitops-app", arg))?;
    git(work, &["commit", "-q", "-am", arg])?;
    git(work, &["push", "-q", "origin", "main"])
}

async fn webhook(hub: &HubProc) -> Result<()> {
    let o = tokio::process::Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "--cacert"])
        .arg(hub.ca_file())
        .args(["-X", "POST", "-H", "X-Outpost-Token: bench-hook", "--data", "{}"])
        .arg(format!("{}/v1/gitops/bench/webhook", hub.url))
        .output()
        .await
        .context("running curl")?;
    if !o.status.success() {
        bail!("webhook POST failed ({})", o.status);
    }
    Ok(())
}

/// Times from `t0` until each of `want` processes runs `arg`.
async fn arrivals(t0: Instant, arg: &str, want: usize, limit: Duration) -> Result<Vec<Duration>> {
    let mut out = Vec::new();
    loop {
        let n = pids_with_cmdline(&["/bin/sleep", arg]).len();
        while out.len() < n.min(want) {
            out.push(t0.elapsed());
        }
        if out.len() >= want {
            return Ok(out);
        }
        if t0.elapsed() > limit {
            bail!("commit {arg} reached {} of {want} agents within {limit:?}", out.len());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn add(hub: &HubProc, url: &str, poll: &str) -> Result<String> {
    hub.try_cli(&[
        "gitops",
        "add",
        "bench",
        "--url",
        url,
        "--target",
        "all=app",
        "--poll-interval",
        poll,
        "--webhook-secret",
        "bench-hook",
    ])
    .await
}

pub async fn gitops(a: GitopsArgs, work: &Path) -> Result<String> {
    let repo = work.join("repo");
    let bare = work.join("remote.git");
    for d in [&repo.join("app"), &bare] {
        std::fs::create_dir_all(d)?;
    }
    git(&bare, &["init", "--bare", "-q", "-b", "main"])?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["remote", "add", "origin", &bare.to_string_lossy()])?;
    std::fs::write(repo.join("app/policy.yaml"), ALL_AT_ONCE)?;
    std::fs::write(
        repo.join("app/kustomization.yaml"),
        "resources: [policy.yaml, ds.yaml]\n",
    )?;
    std::fs::write(repo.join("app/ds.yaml"), sleeper_ds("gitops-app", "1"))?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "init"])?;
    git(&repo, &["push", "-q", "origin", "main"])?;

    let hub = HubProc::start(work).await?;
    let token = hub.join_token(a.agents as u32).await?;
    let mut agents = Vec::new();
    for i in 0..a.agents {
        let mut ag = hub.join(&format!("git-{i}"), &token).await?;
        ag.start(None)?;
        agents.push(ag);
    }
    hub.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: bench-hook}\nstringData: {token: bench-hook}\n")
        .await?;
    let url = format!("file://{}", bare.display());
    // Webhook case: polling every 10 minutes, so only the webhook brings commits in.
    add(&hub, &url, "10m").await?;
    let base = crate::marker_base() + 700;
    arrivals(Instant::now(), "1", a.agents, Duration::from_secs(60)).await?;
    let mut rows = Vec::new();
    for (case, poll) in [("webhook", None), ("polling", Some(a.poll_secs))] {
        if let Some(p) = poll {
            add(&hub, &url, &format!("{p}s")).await?;
            tokio::time::sleep(Duration::from_secs(p + 1)).await;
        }
        let mut per_commit = Vec::new();
        let mut per_agent = Vec::new();
        for r in 0..a.rounds {
            let arg = (base + if poll.is_some() { 10_000 } else { 0 } + r as u64).to_string();
            commit(&repo, &arg)?;
            let t0 = Instant::now();
            if poll.is_none() {
                webhook(&hub).await?;
            }
            let got = arrivals(t0, &arg, a.agents, Duration::from_secs(60)).await?;
            per_commit.push(*got.last().unwrap_or(&Duration::ZERO));
            per_agent.extend(got);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let c = Summary::of_durations(&per_commit);
        let p = Summary::of_durations(&per_agent);
        rows.push(vec![
            match poll {
                Some(p) => format!("{case} (every {p} s)"),
                None => case.to_string(),
            },
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
        "GitOps: `git push` returned -> new process alive on every one of {} real agents (file:// remote, one DaemonSet, one wave), {} commits per case\n\n{}",
        a.agents,
        a.rounds,
        table(
            &["case", "commits", "per agent p50", "per agent p99", "all agents p50", "all agents p99", "all agents max"],
            &rows
        )
    ))
}
