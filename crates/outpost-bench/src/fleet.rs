//! `outpost bench fleet`: thousands of simulated agents that behave like today's agent on the
//! wire ([`crate::sim`]: one HTTP/2 connection each, `wait=3600&ka=100` long-polls, status on
//! change plus an hourly heartbeat, the agent's TCP keepalive and backoff), run in several
//! simulator processes ([`crate::shard`], at most 15,000 agents each: this machine caps a
//! process at 20,000 descriptors), against a hub tier it starts ([`crate::tier`]: one SQLite
//! hub, or PostgreSQL and N replicas; with `--tiers` several tiers in turn, then compared;
//! CPU, memory and descriptors of every hub process, and of PostgreSQL's process tree, read
//! from `/proc`) or an existing hub tier (`--hub-url`). Agent i dials hub URL i mod N.
//! Everything is measured from outside the hubs.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use outpost_api::{ApplyRequest, ManifestFile};

use crate::harness;
use crate::procfs::{self, Meter};
use crate::shard::{self, Cmd, Reply, Shard};
use crate::sim::{unix_ms, Kind, LinkModel};
use crate::stats::{bytes, ms, Summary};
use crate::table;
use crate::tier::{self, Postgres, Store, Tier, TierSpec};

#[derive(clap::Args, Clone, Debug)]
pub struct FleetArgs {
    /// Fleet sizes to step through, e.g. 1000,5000,15000 (agents are added, never removed).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    pub agents: Vec<usize>,
    /// Idle window per size, seconds (hub CPU and memory per idle agent are taken over it).
    #[arg(long, default_value_t = 60)]
    pub window_secs: u64,
    /// Status heartbeat period, seconds, +-20 % jitter (the agent's: hourly).
    #[arg(long, default_value_t = 3600)]
    pub heartbeat_secs: u64,
    /// Long-poll hold each agent asks for (`wait=`; the agent's: 3600 s).
    #[arg(long, default_value_t = outpost_api::AGENT_LONG_POLL_SECS)]
    pub wait_secs: u64,
    /// TCP keepalive idle time of each agent's connection, announced as `ka=` (the agent's: 100 s).
    #[arg(long, default_value_t = 100)]
    pub ka_secs: u64,
    /// Joins in flight at once, over all simulator processes.
    #[arg(long, default_value_t = 8)]
    pub join_concurrency: usize,
    /// Most simulated agents per simulator process (each holds one descriptor per agent; this
    /// machine caps a process at 20,000).
    #[arg(long, default_value_t = shard::MAX_PER_SHARD)]
    pub per_process: usize,
    /// Changes timed per size (one DaemonSet on every node, new command each time).
    #[arg(long, default_value_t = 3)]
    pub changes: usize,
    /// Skip the reconnect storm (SIGKILL + restart of the hub) after the largest size.
    #[arg(long)]
    pub no_storm: bool,
    /// Skip the three-wave rollout (10 %, 50 %, 100 % of the rest, zero bake) measured per size
    /// against an all-at-once change.
    #[arg(long)]
    pub no_rollout: bool,
    /// Keep the fleet DaemonSet while agents join (by default it is deleted before a join wave
    /// and applied again after it).
    #[arg(long)]
    pub keep_workloads_during_join: bool,
    /// Hub processes of the tier the bench starts: 1 (default), or N replicas on one
    /// PostgreSQL (needs `--store postgres`), on distinct loopback ports, each advertising all.
    #[arg(long)]
    pub hubs: Option<usize>,
    /// The store of the tier the bench starts: `sqlite` (default; one hub process) or
    /// `postgres` (a PostgreSQL server the bench starts in its work dir, or `--pg-url`).
    #[arg(long)]
    pub store: Option<String>,
    /// Several tiers in one run, each measured in turn with fresh simulators, then compared:
    /// e.g. `sqlite,postgres:3` (one SQLite hub, then three replicas on PostgreSQL). Instead
    /// of `--hubs`/`--store`.
    #[arg(long, value_delimiter = ',')]
    pub tiers: Vec<String>,
    /// An existing PostgreSQL server for the PostgreSQL tiers (a URL whose user may create
    /// databases, e.g. postgres://postgres@127.0.0.1:5432/postgres); each tier gets a new
    /// database on it, dropped at the end. Without it the bench starts a server of its own in
    /// its work dir (Debian's postgresql; as `nobody` when run as root).
    #[arg(long)]
    pub pg_url: Option<String>,
    /// Point at an existing hub tier instead of starting a hub: its URLs, comma-separated;
    /// agents are spread over them (agent i dials URL i mod N). Needs `--token` and `--ca`.
    /// Hub CPU and memory are then not measured, and there is no reconnect storm.
    #[arg(long, value_delimiter = ',')]
    pub hub_url: Vec<String>,
    /// With `--hub-url`: an admin token of that tier.
    #[arg(long, env = "OUTPOST_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// With `--hub-url`: the tier's CA certificate (PEM).
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

impl FleetArgs {
    fn model(&self) -> LinkModel {
        LinkModel {
            wait_secs: self.wait_secs,
            ka_secs: self.ka_secs,
            heartbeat_secs: self.heartbeat_secs,
        }
    }

    /// Refuse arguments that cannot work, naming the field.
    fn check(&self) -> Result<()> {
        if self.agents.is_empty() || self.agents.contains(&0) {
            bail!("--agents: give fleet sizes above 0, e.g. --agents 1000,5000");
        }
        if !(1..=600).contains(&self.ka_secs) {
            bail!("--ka-secs: the hub accepts 1-600 s (docs/protocol.md §4); the agent uses 100");
        }
        if !(1..=3600).contains(&self.wait_secs) {
            bail!("--wait-secs: the hub holds 1-3600 s; the agent asks 3600");
        }
        if self.heartbeat_secs == 0 {
            bail!("--heartbeat-secs: must be at least 1 (the agent's is 3600)");
        }
        if self.per_process == 0 || self.per_process > shard::MAX_PER_SHARD {
            bail!(
                "--per-process: 1-{} agents (a process holds one descriptor per agent, 20,000 at most here)",
                shard::MAX_PER_SHARD
            );
        }
        if !self.hub_url.is_empty() && (self.token.is_none() || self.ca.is_none()) {
            bail!("--hub-url needs --token (an admin token of that tier) and --ca (its CA certificate)");
        }
        if !self.hub_url.is_empty() && (!self.tiers.is_empty() || self.hubs.is_some() || self.store.is_some()) {
            bail!("--hub-url points at an existing tier: leave out --tiers, --hubs and --store (they start one)");
        }
        let specs = self.tier_specs()?;
        if let Some(u) = &self.pg_url {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                bail!("--pg-url: not a PostgreSQL URL; write postgres://user@host:5432/postgres");
            }
            if !specs.iter().any(|t| t.store == Store::Postgres) {
                bail!("--pg-url: no tier uses PostgreSQL; add --store postgres or a postgres:N tier to --tiers");
            }
        }
        Ok(())
    }

    /// The tiers to start, in order (empty with `--hub-url`).
    fn tier_specs(&self) -> Result<Vec<TierSpec>> {
        if !self.hub_url.is_empty() {
            return Ok(Vec::new());
        }
        if !self.tiers.is_empty() {
            if self.hubs.is_some() || self.store.is_some() {
                bail!("--tiers: give either --tiers or --hubs/--store, not both");
            }
            return self
                .tiers
                .iter()
                .map(|t| TierSpec::parse(t.trim()).map_err(|e| anyhow::anyhow!("--tiers: {e}")))
                .collect();
        }
        let store = match self.store.as_deref() {
            None | Some("sqlite") => Store::Sqlite,
            Some("postgres") | Some("pg") => Store::Postgres,
            Some(other) => bail!("--store: {other:?} is neither sqlite nor postgres"),
        };
        let hubs = self.hubs.unwrap_or(1);
        if hubs == 0 || hubs > tier::MAX_HUBS {
            bail!("--hubs: give 1-{} hub processes", tier::MAX_HUBS);
        }
        if store == Store::Sqlite && hubs > 1 {
            bail!("--hubs: SQLite is one hub process's database; {hubs} replicas need --store postgres");
        }
        Ok(vec![
            TierSpec::new(store, hubs).map_err(|e| anyhow::anyhow!("--hubs: {e}"))?
        ])
    }
}

fn ds(arg: u64) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: fleet-app, labels: {{app: fleet-app}}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - {{name: main, image: 'app:{arg}', command: [/bin/sleep, '{arg}']}}\n"
    )
}

/// The RolloutPolicy of the fleet app: every change at once (the timed changes measure the
/// link, not waves), or three waves of 10 %, 50 % and 100 % of the rest with zero bake.
fn policy(three_waves: bool) -> String {
    let waves = if three_waves {
        "  waves:\n  - {percent: 10}\n  - {percent: 50}\n  - {percent: 100}\n"
    } else {
        "  waves:\n  - {percent: 100}\n"
    };
    format!(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {{name: fleet-app}}\nspec:\n  selector: {{app: fleet-app}}\n{waves}  bake: 0s\n  tinyFleet: 1\n  failureThreshold: {{percent: 100, minSample: 1}}\n"
    )
}

const APP_KEY: &str = "daemonset/default/fleet-app";

struct Admin {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Admin {
    /// The same operator at another hub of the tier.
    fn at(&self, url: &str) -> Admin {
        Admin {
            http: self.http.clone(),
            url: url.to_string(),
            token: self.token.clone(),
        }
    }

    async fn rollout(&self) -> Result<outpost_api::RolloutInfo> {
        let r = self
            .http
            .get(format!("{}/v1/objects/daemonset/default/fleet-app/rollout", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!(
                "rollout status failed: {} {}",
                r.status(),
                r.text().await.unwrap_or_default()
            );
        }
        Ok(r.json().await?)
    }

    async fn apply(&self, yaml: String) -> Result<()> {
        let req = ApplyRequest {
            files: vec![ManifestFile {
                name: "fleet.yaml".into(),
                content: yaml,
            }],
        };
        let r = self
            .http
            .post(format!("{}/v1/apply", self.url))
            .bearer_auth(&self.token)
            .json(&req)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("apply failed: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }

    async fn delete_app(&self) -> Result<()> {
        let r = self
            .http
            .delete(format!("{}/v1/objects/daemonset/default/fleet-app", self.url))
            .bearer_auth(&self.token)
            .send()
            .await?;
        if !r.status().is_success() {
            bail!("delete failed: {} {}", r.status(), r.text().await.unwrap_or_default());
        }
        Ok(())
    }
}

/// A join token with `uses` uses from an existing tier, through the CLI.
async fn tier_join_token(url: &str, token: &str, ca: &std::path::Path, uses: usize) -> Result<String> {
    let out = tokio::process::Command::new(harness::outpost_bin()?)
        .args(["token", "create", "--uses", &uses.to_string(), "--ttl", "0"])
        .env("OUTPOST_HUB", url)
        .env("OUTPOST_TOKEN", token)
        .env("OUTPOST_CA_FILE", ca)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "cannot create a join token on {url}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Every shard's latencies of `kind` in [from, to), and the summed counts.
async fn samples(
    shards: &mut [Shard],
    from: f64,
    to: f64,
) -> Result<(Vec<Reply>, std::collections::BTreeMap<Kind, usize>)> {
    let rs = shard::all(shards, |_| Some(Cmd::Samples { from, to })).await?;
    let mut counts = std::collections::BTreeMap::new();
    for r in &rs {
        for (k, n) in &r.counts {
            *counts.entry(*k).or_insert(0) += n;
        }
    }
    Ok((rs, counts))
}

fn lat(rs: &[Reply], kind: Kind) -> Vec<f64> {
    rs.iter()
        .flat_map(|r| r.latencies.get(&kind).cloned().unwrap_or_default())
        .collect()
}

/// Arm every shard, run `change`, wait until every agent holds a newer generation; per-agent
/// arrival times in ms after the start of `change`.
async fn time_change<F: std::future::Future<Output = Result<()>>>(
    shards: &mut [Shard],
    limit_secs: u64,
    change: F,
) -> Result<Vec<f64>> {
    shard::all(shards, |_| Some(Cmd::Arm)).await?;
    let t = unix_ms();
    change.await?;
    let rs = shard::all(shards, |_| Some(Cmd::WaitPast { limit_secs })).await?;
    Ok(rs
        .iter()
        .flat_map(|r| r.times.iter().map(|x| (x - t).max(0.0)))
        .collect())
}

/// Wait until every agent of every shard holds a generation and has reported once.
async fn wait_ready(shards: &mut [Shard], n: usize, limit: Duration) -> Result<()> {
    let t = Instant::now();
    loop {
        let rs = shard::all(shards, |_| Some(Cmd::Ready)).await?;
        let (synced, reported) = rs.iter().fold((0, 0), |(s, r), x| (s + x.synced, r + x.reported));
        if synced >= n && reported >= n {
            return Ok(());
        }
        if t.elapsed() > limit {
            bail!("after {limit:?} only {synced} of {n} agents synced and {reported} reported");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The processes of a tier the bench started, each measured on its own: every hub replica,
/// and PostgreSQL as one process tree (postmaster + backends) when the server is ours.
#[derive(Clone, Default)]
struct TierProcs {
    /// (name, pid) per hub process.
    hubs: Vec<(String, u32)>,
    /// The postmaster of our own PostgreSQL server.
    pg: Option<u32>,
}

impl TierProcs {
    fn of(tier: Option<&Tier>, pg: Option<u32>) -> TierProcs {
        TierProcs {
            hubs: tier
                .map(|t| {
                    t.hubs
                        .iter()
                        .enumerate()
                        .filter_map(|(i, h)| Some((format!("hub-{i} (:{})", h.port), h.pid()?)))
                        .collect()
                })
                .unwrap_or_default(),
            pg,
        }
    }

    fn hub_pids(&self) -> Vec<u32> {
        self.hubs.iter().map(|(_, p)| *p).collect()
    }

    /// One meter per process (hubs first, then PostgreSQL's tree), named.
    fn meters(&self) -> Vec<(String, Option<Meter>)> {
        let mut v: Vec<(String, Option<Meter>)> =
            self.hubs.iter().map(|(n, p)| (n.clone(), Meter::start(*p))).collect();
        if let Some(pm) = self.pg {
            v.push(("postgres (postmaster + backends)".into(), Meter::start_tree(pm)));
        }
        v
    }
}

/// Finish named meters.
fn finish(ms: Vec<(String, Option<Meter>)>) -> Vec<(String, Option<procfs::Usage>)> {
    ms.into_iter().map(|(n, m)| (n, m.and_then(Meter::finish))).collect()
}

/// CPU (% of one core, summed) and RSS at the end (summed) of the hub processes of `us`
/// (PostgreSQL left out), if any was measured.
fn hub_sum(us: &[(String, Option<procfs::Usage>)]) -> Option<(f64, u64)> {
    let hubs: Vec<&procfs::Usage> = us
        .iter()
        .filter(|(n, _)| n.starts_with("hub"))
        .filter_map(|(_, u)| u.as_ref())
        .collect();
    (!hubs.is_empty()).then(|| {
        (
            hubs.iter().map(|u| u.cpu_pct).sum(),
            hubs.iter().map(|u| u.rss_end).sum(),
        )
    })
}

fn pg_usage(us: &[(String, Option<procfs::Usage>)]) -> Option<&procfs::Usage> {
    us.iter()
        .find(|(n, _)| n.starts_with("postgres"))
        .and_then(|(_, u)| u.as_ref())
}

/// "CPU %, RSS (PSS)" of one process or tree.
fn usage_cell(u: Option<&procfs::Usage>) -> String {
    u.map_or("-".into(), |u| {
        format!(
            "{:.1} %, {} (PSS {})",
            u.cpu_pct,
            bytes(u.rss_end as f64),
            bytes(u.pss_end as f64)
        )
    })
}

/// What one tier's run gives the comparison table.
#[derive(Clone, Debug, Default)]
struct TierSummary {
    agents: usize,
    join_rate: String,
    status_p99: String,
    change_all: String,
    hubs_idle: String,
    pg_idle: String,
    storm: String,
}

/// The report of one tier's run and its summary.
struct TierRun {
    text: String,
    summary: TierSummary,
}

/// Apply `yaml` through the first hub of `urls` that takes it, trying them in turn until
/// `limit`; the time it took and the URL that took it.
async fn apply_first(admin: &Admin, urls: &[String], yaml: &str, limit: Duration) -> Result<(Duration, String)> {
    let t = Instant::now();
    loop {
        for u in urls {
            if admin.at(u).apply(yaml.to_string()).await.is_ok() {
                return Ok((t.elapsed(), u.clone()));
            }
        }
        if t.elapsed() > limit {
            bail!("no hub of the tier took a change within {limit:?} of its restart; see the hub logs in the work dir");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn fleet(a: FleetArgs, work: &std::path::Path) -> Result<String> {
    a.check()?;
    let nofile = harness::raise_nofile(1 << 20);
    eprintln!("fleet: RLIMIT_NOFILE {nofile} (inherited by the hubs and the simulator processes)");
    if !a.hub_url.is_empty() {
        return Ok(run_tier(&a, None, TierProcs::default(), nofile).await?.text);
    }
    let specs = a.tier_specs()?;
    let mut pg: Option<Postgres> = None;
    let mut out = String::new();
    let mut sums = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let dir = work.join(format!("tier-{i}-{}", spec.label().replace(':', "-")));
        let store_url = if spec.store == Store::Postgres {
            if pg.is_none() {
                pg = Some(match &a.pg_url {
                    Some(u) => Postgres::existing(u)?,
                    None => {
                        eprintln!("fleet: starting PostgreSQL in {}", work.join("pg").display());
                        // `work` is `<bench work dir>/fleet`
                        Postgres::start(&work.join("pg"), work.parent().unwrap_or(work))?
                    }
                });
            }
            let db = format!("outpost_bench_{}_{i}", std::process::id());
            Some(pg.as_mut().context("started above")?.create_database(&db)?)
        } else {
            None
        };
        eprintln!("fleet: tier {}: starting {} hub process(es)", spec.label(), spec.hubs);
        let mut t = Tier::start(*spec, &dir, store_url.as_deref()).await?;
        let pg_pid = store_url
            .is_some()
            .then(|| pg.as_ref().and_then(Postgres::postmaster_pid))
            .flatten();
        let procs = TierProcs::of(Some(&t), pg_pid);
        let r = run_tier(&a, Some(&mut t), procs, nofile).await;
        drop(t);
        let mut section = String::new();
        if specs.len() > 1 {
            section.push_str(&format!(
                "## Tier {}: {} hub process(es) on {}\n\n",
                spec.label(),
                spec.hubs,
                match spec.store {
                    Store::Sqlite => "SQLite (in the hub's data dir)".to_string(),
                    Store::Postgres => "one PostgreSQL database".to_string(),
                }
            ));
        }
        match r {
            Ok(r) => {
                section.push_str(&r.text);
                sums.push((spec, r.summary));
            }
            // One tier alone: its error is the run's. Of several, the others still run and
            // the report says which failed and why.
            Err(e) if specs.len() == 1 => return Err(e.context(format!("tier {}", spec.label()))),
            Err(e) => section.push_str(&format!("The tier failed: {e:#}\n")),
        }
        section.push('\n');
        // Each tier's report as soon as it is done: a run of several tiers takes long, and a
        // later one may not finish.
        if specs.len() > 1 {
            eprintln!("fleet: tier {} done\n\n{section}", spec.label());
        }
        out.push_str(&section);
    }
    if sums.len() > 1 {
        let rows: Vec<Vec<String>> = sums
            .iter()
            .map(|(spec, s)| {
                vec![
                    spec.label(),
                    spec.hubs.to_string(),
                    s.agents.to_string(),
                    s.join_rate.clone(),
                    s.status_p99.clone(),
                    s.change_all.clone(),
                    s.hubs_idle.clone(),
                    s.pg_idle.clone(),
                    s.storm.clone(),
                ]
            })
            .collect();
        out.push_str(&format!(
            "## Comparison (largest size of each tier)\n\n{}",
            table(
                &[
                    "tier",
                    "hub processes",
                    "agents",
                    "join rate (last step)",
                    "status p99 (after changes)",
                    "change -> all agents (max)",
                    "hubs idle: CPU (sum, % of 1 core), RSS (sum)",
                    "PostgreSQL idle: CPU, RSS (PSS)",
                    "storm: all re-synced / gave up",
                ],
                &rows,
            )
        ));
    }
    Ok(out)
}

/// The whole sequence against one tier: joins, idle window, changes, rollouts per size, then
/// the reconnect storm. `tier` is None for an existing tier (`--hub-url`).
async fn run_tier(a: &FleetArgs, tier: Option<&mut Tier>, mut procs: TierProcs, nofile: u64) -> Result<TierRun> {
    let max = a.agents.iter().copied().max().unwrap_or(0);
    // ---- the hub tier
    let (urls, admin_token, ca_pem, join_token) = match tier.as_deref() {
        Some(t) => {
            let h = t.hubs.first().context("a tier has a hub")?;
            let jt = h.join_token(u32::try_from(max).unwrap_or(u32::MAX)).await?;
            (t.urls(), h.token.clone(), h.ca_pem()?, jt)
        }
        None => {
            let (token, ca) = (a.token.clone().unwrap_or_default(), a.ca.clone().unwrap_or_default());
            let ca_pem = std::fs::read_to_string(&ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            let jt = tier_join_token(&a.hub_url[0], &token, &ca, max).await?;
            (a.hub_url.clone(), token, ca_pem, jt)
        }
    };
    let hub_rss0: Option<u64> = {
        let v: Vec<u64> = procs.hub_pids().into_iter().filter_map(procfs::rss_bytes).collect();
        (!v.is_empty()).then(|| v.iter().sum())
    };
    let ca_cfg = outpost_pki::client_config(&ca_pem, None)?;
    let admin = Admin {
        http: reqwest::Client::builder().use_preconfigured_tls(ca_cfg).build()?,
        url: urls[0].clone(),
        token: admin_token,
    };
    // ---- the simulator processes
    let n_shards = max.div_ceil(a.per_process).max(1);
    let mut shards = Vec::new();
    for i in 0..n_shards {
        shards.push(
            Shard::spawn(Cmd::Init {
                shard: i as u32,
                hubs: urls.clone(),
                ca_pem: ca_pem.clone(),
                join_token: join_token.clone(),
                model: a.model(),
                join_concurrency: a.join_concurrency.div_ceil(n_shards).max(1),
            })
            .await?,
        );
    }
    eprintln!("fleet: {n_shards} simulator process(es), {} hub URL(s)", urls.len());
    let mut held = vec![0usize; n_shards];
    let mut arg = crate::marker_base() + 900;
    admin.apply(policy(false)).await?;
    if a.keep_workloads_during_join {
        admin.apply(ds(arg)).await?;
    }
    let mut rows = Vec::new();
    let mut proc_rows = Vec::new();
    let mut rollout_rows = Vec::new();
    let mut notes = Vec::new();
    let mut total = 0usize;
    let mut prev_idle: Option<(usize, u64)> = hub_rss0.map(|r| (0, r));
    let mut summary = TierSummary::default();
    for &n in &a.agents {
        if n <= total {
            continue;
        }
        // ---- join up to n
        if !a.keep_workloads_during_join && total > 0 {
            admin.delete_app().await?;
        }
        let j0 = unix_ms();
        let jt = Instant::now();
        let ranges = shard::split(total, n, n_shards, &held);
        let rs = shard::all(&mut shards, |i| {
            let r = ranges[i].clone();
            (!r.is_empty()).then_some(Cmd::Join {
                from: r.start,
                to: r.end,
            })
        })
        .await?;
        let join_secs = jt.elapsed().as_secs_f64();
        for (i, r) in ranges.iter().enumerate() {
            held[i] += r.len();
        }
        let joined: usize = rs.iter().map(|r| r.joined).sum();
        let join_errors: usize = rs.iter().map(|r| r.join_errors.len()).sum();
        for e in rs
            .iter()
            .flat_map(|r| r.join_errors.iter())
            .filter(|e| !e.is_empty())
            .take(3)
        {
            eprintln!("fleet: {e}");
        }
        let new = n - total;
        total += joined;
        if !a.keep_workloads_during_join {
            arg += 1;
            admin.apply(ds(arg)).await?;
        }
        eprintln!("fleet: {total} agents joined ({joined} new in {join_secs:.1} s, {join_errors} errors); waiting for first sync and report");
        wait_ready(&mut shards, total, Duration::from_secs(900)).await?;
        // the idle window starts once every agent holds the DaemonSet and its report landed
        wait_revision(&mut shards, app_revision(&admin).await?, 900).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (jr, _) = samples(&mut shards, j0, unix_ms()).await?;
        let joins = Summary::of(&lat(&jr, Kind::Join));
        // ---- idle window: every agent connected and holding its long-poll
        let w0 = unix_ms();
        let named = procs.meters();
        let n_named = named.len();
        let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
        let mut all: Vec<Option<Meter>> = named.into_iter().map(|(_, m)| m).collect();
        all.extend(shards.iter().filter_map(|s| s.pid()).map(Meter::start));
        let mut live: Vec<Meter> = Vec::new();
        let mut slots = Vec::new();
        for m in all {
            slots.push(m.is_some());
            live.extend(m);
        }
        eprintln!("fleet: {total} agents: idle window {} s", a.window_secs);
        procfs::watch(&mut live, Duration::from_secs(a.window_secs)).await;
        let w1 = unix_ms();
        let mut finished = live.into_iter().map(Meter::finish);
        let mut us: Vec<Option<procfs::Usage>> = slots
            .iter()
            .map(|had| if *had { finished.next().flatten() } else { None })
            .collect();
        let sim_us: Vec<procfs::Usage> = us.split_off(n_named).into_iter().flatten().collect();
        let tier_us: Vec<(String, Option<procfs::Usage>)> = names.into_iter().zip(us).collect();
        let hubs_idle = hub_sum(&tier_us);
        let sim_cpu: f64 = sim_us.iter().map(|u| u.cpu_pct).sum();
        let sim_rss: u64 = sim_us.iter().map(|u| u.rss_end).sum();
        let busy = sim_us.first().map(|u| u.machine_busy_pct).unwrap_or(0.0);
        let fds_threads: Vec<(usize, u64)> = procs
            .hub_pids()
            .into_iter()
            .filter_map(|p| Some((procfs::fd_count(p)?, procfs::threads(p)?)))
            .collect();
        let (_, wc) = samples(&mut shards, w0, w1).await?;
        let c = |k| wc.get(&k).copied().unwrap_or(0);
        let per_agent = match (hubs_idle, prev_idle) {
            (Some((_, rss)), Some((n0, r0))) if total > n0 => {
                let d = (rss as f64 - r0 as f64) / (total - n0) as f64;
                format!("{} ({n0} -> {total})", bytes(d))
            }
            _ => "-".into(),
        };
        if let Some((_, rss)) = hubs_idle {
            prev_idle = Some((total, rss));
        }
        // ---- changes
        let c0 = unix_ms();
        let change_meters = procs.meters();
        let mut to_all = Vec::new();
        let mut per = Vec::new();
        for _ in 0..a.changes {
            arg += 1;
            let yaml = ds(arg);
            let times = time_change(&mut shards, 600, admin.apply(yaml)).await?;
            let mut sorted = times.clone();
            sorted.sort_by(|a, b| a.total_cmp(b));
            let at = |p: f64| crate::stats::percentile(&sorted, p).map(ms).unwrap_or_default();
            eprintln!(
                "fleet: {total} agents: change {arg} reached agents at p10 {} / p50 {} / p90 {} / p99 {} / all {}",
                at(10.0),
                at(50.0),
                at(90.0),
                at(99.0),
                at(100.0)
            );
            to_all.push(times.iter().copied().fold(0.0, f64::max));
            per.extend(times);
            // the agents' delta reports (250 ms debounce) land before the next change
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
        let change_us = finish(change_meters);
        let (cr, cc) = samples(&mut shards, c0, unix_ms()).await?;
        eprintln!(
            "fleet: {total} agents: {} busy answers (503 + Retry-After) during the changes",
            cc.get(&Kind::Busy).unwrap_or(&0)
        );
        let status = Summary::of(&lat(&cr, Kind::Status));
        let all_s = Summary::of(&to_all);
        let per_s = Summary::of(&per);
        for ((name, idle), (_, during)) in tier_us.iter().zip(&change_us) {
            let is_pg = name.starts_with("postgres");
            let pid = procs.hubs.iter().find(|(n, _)| n == name).map(|(_, p)| *p);
            proc_rows.push(vec![
                total.to_string(),
                name.clone(),
                idle.as_ref().map_or("-".into(), |u| format!("{:.1} %", u.cpu_pct)),
                idle.as_ref().map_or("-".into(), |u| {
                    format!("{} (PSS {})", bytes(u.rss_end as f64), bytes(u.pss_end as f64))
                }),
                if is_pg {
                    idle.as_ref().map_or("-".into(), |u| format!("{} processes", u.procs))
                } else {
                    match pid.and_then(|p| Some((procfs::fd_count(p)?, procfs::threads(p)?))) {
                        Some((f, t)) => format!("{f} / {t}"),
                        None => "-".into(),
                    }
                },
                during.as_ref().map_or("-".into(), |u| format!("{:.1} %", u.cpu_pct)),
                during.as_ref().map_or("-".into(), |u| bytes(u.rss_max as f64)),
            ]);
        }
        let join_rate = format!("{:.0}/s", joined as f64 / join_secs);
        summary = TierSummary {
            agents: total,
            join_rate: join_rate.clone(),
            status_p99: ms(status.p99),
            change_all: ms(all_s.max),
            hubs_idle: hubs_idle.map_or("-".into(), |(cpu, rss)| format!("{cpu:.1} %, {}", bytes(rss as f64))),
            pg_idle: usage_cell(pg_usage(&tier_us)),
            storm: "-".into(),
        };
        rows.push(vec![
            total.to_string(),
            n_shards.to_string(),
            join_rate,
            ms(joins.p99),
            hubs_idle.map_or("-".into(), |(cpu, _)| format!("{cpu:.1} %")),
            hubs_idle.map_or("-".into(), |(_, rss)| bytes(rss as f64)),
            per_agent,
            if fds_threads.is_empty() {
                "-".into()
            } else {
                let (f, t) = fds_threads.iter().fold((0, 0), |(f, t), (a, b)| (f + a, t + b));
                format!("{f} / {t}")
            },
            format!("{} / {} / {}", c(Kind::Status), c(Kind::Sync204), c(Kind::Connect)),
            format!("{}/{}/{}", c(Kind::StatusErr), c(Kind::SyncErr), c(Kind::ConnectErr)),
            format!("{} / {} ({} reports)", ms(status.p50), ms(status.p99), status.n),
            format!("{} / {} / {}", ms(per_s.p50), ms(per_s.p99), ms(all_s.max)),
            format!(
                "{}/{}/{}",
                cc.get(&Kind::StatusErr).unwrap_or(&0),
                cc.get(&Kind::SyncErr).unwrap_or(&0),
                cc.get(&Kind::ConnectErr).unwrap_or(&0)
            ),
            format!("{:.0} %, {} / {:.0} %", sim_cpu, bytes(sim_rss as f64), busy),
        ]);
        eprintln!("fleet: {:?}", rows.last());
        if !a.no_rollout {
            eprintln!("fleet: {total} agents: all-at-once change, then a three-wave rollout");
            let row = rollout_row(&admin, &mut shards, total, &procs.hub_pids(), &mut arg).await?;
            eprintln!("fleet: {row:?}");
            rollout_rows.push(row);
        }
        if join_errors > 0 || joined < new {
            notes.push(format!("{} of {new} joins failed at the {n} step", new - joined));
        }
    }
    // ---- reconnect storm: every hub process of the tier at once (PostgreSQL stays up)
    let mut storm = String::new();
    if let (Some(t), false) = (tier, a.no_storm || total == 0) {
        eprintln!(
            "fleet: reconnect storm with {total} agents, {} hub process(es)",
            t.hubs.len()
        );
        shard::all(&mut shards, |_| Some(Cmd::Arm)).await?;
        let s0 = unix_ms();
        let t0 = Instant::now();
        t.kill_all();
        t.spawn_all()?;
        procs = TierProcs::of(Some(&*t), procs.pg);
        let ms_ = procs.meters();
        arg += 1;
        let (_, via) = apply_first(&admin, &t.urls(), &ds(arg), tier::RESTART_LIMIT).await?;
        let up = t0.elapsed();
        t.ready_all().await?;
        let all_up = t0.elapsed();
        let rs = shard::all(&mut shards, |_| Some(Cmd::WaitPast { limit_secs: 900 })).await?;
        let times: Vec<f64> = rs.iter().flat_map(|r| r.times.iter().map(|x| x - s0)).collect();
        let cr = shard::all(&mut shards, |_| Some(Cmd::Connected { since: s0 })).await?;
        let last = cr.iter().map(|r| r.last_connected).fold(0.0, f64::max) - s0;
        let not_connected: usize = cr.iter().map(|r| r.not_connected).sum();
        let (_, sc) = samples(&mut shards, s0, unix_ms()).await?;
        let rec = finish(ms_);
        let ps = Summary::of(&times);
        summary.storm = format!("{} / {not_connected}", ms(ps.max));
        let per_proc: Vec<String> = rec
            .iter()
            .map(|(n, u)| {
                u.as_ref().map_or(format!("{n}: -"), |u| {
                    format!("{n}: {:.0} %, RSS max {}", u.cpu_pct, bytes(u.rss_max as f64))
                })
            })
            .collect();
        storm =
            format!(
            "Reconnect storm, {total} agents: SIGKILL every hub process of the tier at once, restart them all, apply \
             one change through the first that takes it ({via}); time from the kill{}\n\n{}",
            if procs.pg.is_some() { "; PostgreSQL stays up" } else { "" },
            table(
                &[
                    "first hub back (took the change)",
                    "every hub back",
                    "all agents reconnected",
                    "all agents re-synced (hold the new generation)",
                    "p50 agent re-synced",
                    "failed connects / failed syncs / busy answers (503 + Retry-After)",
                    "agents not reconnected (gave up)",
                    "CPU (% of 1 core) and RSS max per process during recovery",
                ],
                &[vec![
                    ms(up.as_secs_f64() * 1000.0),
                    ms(all_up.as_secs_f64() * 1000.0),
                    ms(last),
                    ms(ps.max),
                    ms(ps.p50),
                    format!(
                        "{} / {} / {}",
                        sc.get(&Kind::ConnectErr).unwrap_or(&0),
                        sc.get(&Kind::SyncErr).unwrap_or(&0),
                        sc.get(&Kind::Busy).unwrap_or(&0)
                    ),
                    not_connected.to_string(),
                    per_proc.join("; "),
                ]]
            )
        );
    }
    shard::stop(&mut shards).await;
    let m = a.model();
    let mut out = format!(
        "Fleet simulator: {total} simulated agents max in {n_shards} process(es), {} hub URL(s) (agent i dials URL i mod {}); \
         per agent one HTTP/2 connection, sync wait={} s ka={} s, heartbeat {} s +-20 %; idle window {} s, {} changes per size, \
         RLIMIT_NOFILE {nofile}\n\n",
        urls.len(),
        urls.len(),
        m.wait_secs,
        m.ka_secs,
        m.heartbeat_secs,
        a.window_secs,
        a.changes
    );
    out.push_str(&table(
        &[
            "agents",
            "sim processes",
            "join rate",
            "join p99",
            "hub CPU idle (% of 1 core, all hubs)",
            "hub RSS idle (all hubs)",
            "hub RSS per idle agent (between sizes)",
            "hub fds / threads (all hubs)",
            "in idle window: reports / long-polls ended / connects",
            "idle errors status/sync/connect",
            "status p50 / p99 (after changes)",
            "change -> agent p50 / p99 / all agents (max)",
            "change errors status/sync/connect",
            "simulator CPU, RSS / machine busy",
        ],
        &rows,
    ));
    if !proc_rows.is_empty() {
        out.push_str(&format!(
            "\nPer process of the tier (hubs; PostgreSQL as its process tree, summed; PSS shares shared pages)\n\n{}",
            table(
                &[
                    "agents",
                    "process",
                    "CPU idle (% of 1 core)",
                    "RSS idle (PSS)",
                    "fds / threads",
                    "CPU during changes",
                    "RSS max during changes",
                ],
                &proc_rows,
            )
        ));
    }
    if !rollout_rows.is_empty() {
        out.push_str(&format!(
            "\nRollouts (process DaemonSet on every node; simulated nodes pass their gate at once): an all-at-once \
             change, then three waves of 10 %, 50 % and 100 % of the rest with zero bake; hub CPU time over each\n\n{}",
            table(
                &[
                    "agents",
                    "all at once: to every agent / hub CPU",
                    "per wave: nodes, open -> complete (hub clock)",
                    "three waves: every agent holds it / rollout Complete",
                    "three waves: hub CPU",
                    "phase",
                ],
                &rollout_rows,
            )
        ));
    }
    if !storm.is_empty() {
        out.push('\n');
        out.push_str(&storm);
    }
    for n in notes {
        out.push_str(&format!("\nnote: {n}\n"));
    }
    Ok(TierRun { text: out, summary })
}

/// The fleet app's revision as the hub has it now.
async fn app_revision(admin: &Admin) -> Result<u64> {
    Ok(admin.rollout().await?.revision)
}

async fn wait_revision(shards: &mut [Shard], revision: u64, limit_secs: u64) -> Result<()> {
    shard::all(shards, |_| {
        Some(Cmd::WaitRevision {
            key: APP_KEY.into(),
            revision,
            limit_secs,
        })
    })
    .await?;
    Ok(())
}

/// One all-at-once change and one three-wave rollout (zero bake), each timed and with the hub's
/// CPU time over it; returns the table row.
async fn rollout_row(
    admin: &Admin,
    shards: &mut [Shard],
    total: usize,
    hub_pids: &[u32],
    arg: &mut u64,
) -> Result<Vec<String>> {
    // CPU summed over every hub process of the tier
    let meter = |pids: &[u32]| -> Vec<Meter> { pids.iter().filter_map(|p| Meter::start(*p)).collect() };
    let done = |ms: Vec<Meter>| -> Option<procfs::Usage> {
        let us: Vec<procfs::Usage> = ms.into_iter().filter_map(Meter::finish).collect();
        let first = us.first()?.clone();
        Some(procfs::Usage {
            cpu_pct: us.iter().map(|u| u.cpu_pct).sum(),
            ..first
        })
    };
    // all at once
    *arg += 1;
    let m = meter(hub_pids);
    let t = Instant::now();
    admin.apply(ds(*arg)).await?;
    let rev = app_revision(admin).await?;
    wait_revision(shards, rev, 600).await?;
    let all_at_once = t.elapsed();
    while admin.rollout().await?.phase != outpost_api::RolloutPhase::Complete {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("the all-at-once rollout did not complete");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let once = done(m);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // three waves, zero bake
    admin.apply(policy(true)).await?;
    *arg += 1;
    let m = meter(hub_pids);
    let t = Instant::now();
    admin.apply(ds(*arg)).await?;
    let rev = app_revision(admin).await?;
    wait_revision(shards, rev, 900).await?;
    let to_all = t.elapsed();
    let info = loop {
        let i = admin.rollout().await?;
        if i.phase == outpost_api::RolloutPhase::Complete || t.elapsed() > Duration::from_secs(900) {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let complete = t.elapsed();
    let waves = done(m);
    admin.apply(policy(false)).await?;
    let per_wave: Vec<String> = info
        .waves
        .iter()
        .filter_map(|w| {
            let d = w.completed_at? - w.opened_at?;
            Some(format!("{} nodes {}", w.nodes, ms(d as f64)))
        })
        .collect();
    let cpu = |u: &procfs::Usage| u.cpu_pct / 100.0 * u.secs;
    Ok(vec![
        total.to_string(),
        format!(
            "{} / {}",
            ms(all_at_once.as_secs_f64() * 1000.0),
            once.as_ref().map_or("-".into(), |u| format!("{:.2} s", cpu(u)))
        ),
        per_wave.join("; "),
        format!(
            "{} / {}",
            ms(to_all.as_secs_f64() * 1000.0),
            ms(complete.as_secs_f64() * 1000.0)
        ),
        waves.as_ref().map_or("-".into(), |u| {
            format!("{:.2} s ({:.0} % of 1 core)", cpu(u), u.cpu_pct)
        }),
        info.phase.as_str().to_string(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::{Store, TierSpec};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: FleetArgs,
    }

    fn parse(args: &[&str]) -> FleetArgs {
        Cli::try_parse_from(std::iter::once("fleet").chain(args.iter().copied()))
            .expect("parses")
            .a
    }

    #[test]
    fn defaults_model_todays_agent() {
        let a = parse(&[]);
        assert_eq!(a.model(), LinkModel::default());
        assert_eq!(a.per_process, 15_000);
        a.check().expect("defaults are valid");
    }

    #[test]
    fn bad_arguments_name_the_field() {
        for (args, field) in [
            (&["--agents", "0"][..], "--agents"),
            (&["--ka-secs", "0"][..], "--ka-secs"),
            (&["--ka-secs", "601"][..], "--ka-secs"),
            (&["--wait-secs", "3601"][..], "--wait-secs"),
            (&["--heartbeat-secs", "0"][..], "--heartbeat-secs"),
            (&["--per-process", "20000"][..], "--per-process"),
            (&["--hub-url", "https://10.0.0.1:8443"][..], "--hub-url"),
            (&["--hubs", "3"][..], "--hubs"),
            (&["--hubs", "3", "--store", "sqlite"][..], "--hubs"),
            (&["--hubs", "0", "--store", "postgres"][..], "--hubs"),
            (&["--hubs", "17", "--store", "postgres"][..], "--hubs"),
            (&["--store", "mysql"][..], "--store"),
            (&["--tiers", "sqlite,sqlite:3"][..], "--tiers"),
            (&["--tiers", "postgres:0"][..], "--tiers"),
            (&["--tiers", "oracle"][..], "--tiers"),
            (&["--tiers", "sqlite", "--hubs", "2"][..], "--tiers"),
            (&["--pg-url", "mysql://x"][..], "--pg-url"),
            (&["--pg-url", "postgres://p@h/postgres"][..], "--pg-url"),
            (
                &["--hub-url", "https://a:1", "--token", "t", "--ca", "/c", "--hubs", "2"][..],
                "--hub-url",
            ),
        ] {
            let mut a = parse(args);
            if args.len() == 2 && field == "--hub-url" {
                a.token = None;
            }
            let e = a.check().expect_err(field).to_string();
            assert!(e.starts_with(field), "{args:?}: {e}");
        }
        let a = parse(&[
            "--hub-url",
            "https://a:1,https://b:2",
            "--token",
            "t",
            "--ca",
            "/ca.pem",
        ]);
        assert_eq!(a.hub_url.len(), 2);
        a.check().expect("a tier with token and CA");
        assert!(a.tier_specs().unwrap().is_empty(), "an existing tier starts nothing");
    }

    #[test]
    fn the_tiers_to_start() {
        let specs = |args: &[&str]| {
            let a = parse(args);
            a.check().expect("valid");
            a.tier_specs().unwrap()
        };
        let sqlite = TierSpec::new(Store::Sqlite, 1).unwrap();
        let pg = |n| TierSpec::new(Store::Postgres, n).unwrap();
        assert_eq!(specs(&[]), vec![sqlite], "one SQLite hub by default");
        assert_eq!(specs(&["--hubs", "3", "--store", "postgres"]), vec![pg(3)]);
        assert_eq!(specs(&["--store", "postgres"]), vec![pg(1)]);
        assert_eq!(specs(&["--tiers", "sqlite,postgres:3"]), vec![sqlite, pg(3)]);
        assert_eq!(
            specs(&["--tiers", "postgres:2", "--pg-url", "postgres://u@h:5432/postgres"]),
            vec![pg(2)]
        );
    }
}
