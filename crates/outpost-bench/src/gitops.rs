//! GitOps: from `git push` returning until the changed workload's new process is alive on every
//! real agent, with the hub told by its webhook and with the hub polling (docs/gitops.md); and
//! the same on simulated agents (`bench fleet`'s, speaking the real protocol) until every one
//! holds the new spec, optionally spread over `--sites` overlays of one fleet workload.

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
    /// Simulated agents (0: none). They run after the real agents' cases, with a hub of their own.
    #[arg(long, default_value_t = 0)]
    pub sim_agents: usize,
    /// For the simulated agents: an `overlaysBy: site` repository with this many site overlays
    /// (each gives the DaemonSet its own env, so it is one fleet workload with a variant per
    /// site; agents are spread over the sites round-robin). 0: one target for every node.
    #[arg(long, default_value_t = 0)]
    pub sites: usize,
    /// Simulated joins in flight at once.
    #[arg(long, default_value_t = 8)]
    pub join_concurrency: usize,
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
    commit_in(work, "app", arg)
}

fn commit_in(work: &Path, dir: &str, arg: &str) -> Result<()> {
    std::fs::write(work.join(dir).join("ds.yaml"), sleeper_ds("gitops-app", arg))?;
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
    add_with(hub, url, poll, &["--target", "all=app"]).await
}

async fn add_with(hub: &HubProc, url: &str, poll: &str, targets: &[&str]) -> Result<String> {
    let mut args = vec!["gitops", "add", "bench", "--url", url];
    args.extend_from_slice(targets);
    args.extend(["--poll-interval", poll, "--webhook-secret", "bench-hook"]);
    hub.try_cli(&args).await
}

pub async fn gitops(a: GitopsArgs, work: &Path) -> Result<String> {
    let mut out = String::new();
    if a.agents > 0 {
        out.push_str(&real(a.clone(), &work.join("real")).await?);
    }
    if a.sim_agents > 0 {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&simulated(&a, &work.join("sim")).await?);
    }
    Ok(out)
}

/// The simulated case: one hub, `--sim-agents` simulated agents, webhook and polling.
async fn simulated(a: &GitopsArgs, work: &Path) -> Result<String> {
    let n = a.sim_agents;
    let nofile = crate::harness::raise_nofile(1 << 20);
    let repo = work.join("repo");
    let bare = work.join("remote.git");
    let dir = if a.sites > 0 { "base" } else { "app" };
    for d in [&repo.join(dir), &bare] {
        std::fs::create_dir_all(d)?;
    }
    git(&bare, &["init", "--bare", "-q", "-b", "main"])?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["remote", "add", "origin", &bare.to_string_lossy()])?;
    std::fs::write(repo.join(dir).join("policy.yaml"), ALL_AT_ONCE)?;
    std::fs::write(
        repo.join(dir).join("kustomization.yaml"),
        "resources: [policy.yaml, ds.yaml]\n",
    )?;
    std::fs::write(repo.join(dir).join("ds.yaml"), sleeper_ds("gitops-app", "1"))?;
    for s in 0..a.sites {
        let o = repo.join(format!("overlays/store-{s:04}"));
        std::fs::create_dir_all(&o)?;
        std::fs::write(
            o.join("kustomization.yaml"),
            "resources: [../../base]\npatches:\n- path: site.yaml\n",
        )?;
        std::fs::write(
            o.join("site.yaml"),
            format!(
                "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: gitops-app}}\nspec:\n  template:\n    spec:\n      containers:\n      - name: main\n        env: [{{name: SITE, value: store-{s:04}}}]\n"
            ),
        )?;
    }
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "init"])?;
    git(&repo, &["push", "-q", "origin", "main"])?;

    let hub = HubProc::start(work).await?;
    let token = hub
        .try_cli(&[
            "token",
            "create",
            "--uses",
            &n.to_string(),
            "--ttl",
            "0",
            "--node-labels",
            "site",
        ])
        .await?
        .trim()
        .to_string();
    eprintln!("gitops: joining {n} simulated agents (RLIMIT_NOFILE {nofile})");
    let sites = a.sites;
    let fleet = crate::sim::SimFleet::start(&hub, &token, n, a.join_concurrency, |i| {
        if sites > 0 {
            [("site".to_string(), format!("store-{:04}", i % sites))].into()
        } else {
            Default::default()
        }
    })
    .await?;
    hub.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: bench-hook}\nstringData: {token: bench-hook}\n")
        .await?;
    let url = format!("file://{}", bare.display());
    let key = "daemonset/default/gitops-app";
    let targets: Vec<&str> = if sites > 0 {
        vec!["--overlays-by", "site"]
    } else {
        vec!["--target", "all=app"]
    };
    add_with(&hub, &url, "10m", &targets).await?;
    let none = vec![None; n];
    fleet
        .wait_changed(key, &none, Instant::now(), Duration::from_secs(300))
        .await
        .context("the first commit")?;
    eprintln!("gitops: {n} simulated agents hold the first commit");
    let base = crate::marker_base() + 800;
    let mut rows = Vec::new();
    for (case, poll) in [("webhook", None), ("polling", Some(a.poll_secs))] {
        if let Some(p) = poll {
            add_with(&hub, &url, &format!("{p}s"), &targets).await?;
            tokio::time::sleep(Duration::from_secs(p + 1)).await;
        }
        let mut per_commit = Vec::new();
        let mut per_agent = Vec::new();
        for r in 0..a.rounds {
            let arg = (base + if poll.is_some() { 10_000 } else { 0 } + r as u64).to_string();
            let before = fleet.hashes(key);
            commit_in(&repo, dir, &arg)?;
            let t0 = Instant::now();
            if poll.is_none() {
                webhook(&hub).await?;
            }
            let got = fleet.wait_changed(key, &before, t0, Duration::from_secs(120)).await?;
            let last = got.iter().copied().fold(0.0, f64::max);
            eprintln!("gitops: {case} commit {r}: every agent in {last:.0} ms");
            per_commit.push(last);
            per_agent.extend(got);
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let c = Summary::of(&per_commit);
        let p = Summary::of(&per_agent);
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
    drop(fleet);
    Ok(format!(
        "GitOps: `git push` returned -> every one of {n} simulated agents holds the new spec (file:// remote, one DaemonSet, one wave, {}), {} commits per case\n\n{}",
        if sites > 0 {
            format!("overlaysBy site over {sites} site overlays: one fleet workload with {} variants", sites + 1)
        } else {
            "one target".to_string()
        },
        a.rounds,
        table(
            &["case", "commits", "per agent p50", "per agent p99", "all agents p50", "all agents p99", "all agents max"],
            &rows
        )
    ))
}

async fn real(a: GitopsArgs, work: &Path) -> Result<String> {
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
