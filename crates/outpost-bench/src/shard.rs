//! Simulator shards: `bench fleet` spreads its simulated agents over several processes
//! (`outpost bench fleet-shard`, hidden), because this machine caps a process at 20,000
//! descriptors and each simulated agent holds one. The parent speaks to each shard over its
//! stdin/stdout, one JSON [`Cmd`] a line, answered by one JSON [`Reply`] a line; the shard logs
//! to stderr. Times cross processes as Unix milliseconds (one machine, one clock).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};

use crate::sim::{self, Endpoint, Joiner, Kind, LinkModel, Sim, SimAgent};

/// Most agents one shard process takes (its descriptors: one per agent, plus joins and logs).
pub const MAX_PER_SHARD: usize = 15_000;

/// A command from the parent.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Cmd {
    /// First line: who the shard is and where the hubs are.
    Init {
        shard: u32,
        hubs: Vec<String>,
        ca_pem: String,
        join_token: String,
        model: LinkModel,
        join_concurrency: usize,
    },
    /// Join agents `sim-<from>` .. `sim-<to - 1>` (global indices) and start them.
    Join { from: usize, to: usize },
    /// How many agents hold a generation and have reported.
    Ready,
    /// Remember every agent's generation (for `WaitPast`).
    Arm,
    /// Wait until every agent holds a generation above the one armed; their arrival times.
    WaitPast { limit_secs: u64 },
    /// Wait until every agent holds revision `revision` (or later) of `key`; arrival times.
    WaitRevision {
        key: String,
        revision: u64,
        limit_secs: u64,
    },
    /// Latencies and counts recorded in [from, to) (Unix ms).
    Samples { from: f64, to: f64 },
    /// Connection times: the latest, and how many agents have not connected since `since`.
    Connected { since: f64 },
    /// Stop the agents and exit.
    Stop,
}

/// The answer to one [`Cmd`]; fields not relevant to the command are left empty.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub agents: usize,
    #[serde(default)]
    pub joined: usize,
    #[serde(default)]
    pub join_errors: Vec<String>,
    #[serde(default)]
    pub synced: usize,
    #[serde(default)]
    pub reported: usize,
    /// Unix ms per agent (WaitPast, WaitRevision).
    #[serde(default)]
    pub times: Vec<f64>,
    /// Latencies (ms) per kind (Samples: join, sync_first, status).
    #[serde(default)]
    pub latencies: BTreeMap<Kind, Vec<f64>>,
    #[serde(default)]
    pub counts: BTreeMap<Kind, usize>,
    /// Connected: latest connection (Unix ms) and agents not connected since `since`.
    #[serde(default)]
    pub last_connected: f64,
    #[serde(default)]
    pub not_connected: usize,
}

struct State {
    shard: u32,
    sim: Arc<Sim>,
    joiner: Arc<Joiner>,
    agents: Vec<Arc<SimAgent>>,
    /// Global index of this shard's first agent (set by the first Join).
    first: Option<usize>,
    armed: Vec<u64>,
}

/// The shard process: read commands from stdin, answer on stdout, until `Stop` or EOF.
pub async fn shard_main() -> Result<()> {
    let nofile = crate::harness::raise_nofile(1 << 20);
    // stdin is read by a thread of its own (commands are rare; tokio's stdin is a feature this
    // crate does not otherwise need)
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut out = std::io::stdout();
    let first = lines.recv().await.context("no init line on stdin")?;
    let Cmd::Init {
        shard,
        hubs,
        ca_pem,
        join_token,
        model,
        join_concurrency,
    } = serde_json::from_str(&first).context("the first line must be an init command")?
    else {
        bail!("the first line must be an init command");
    };
    let mut eps = Vec::new();
    for h in &hubs {
        eps.push(Endpoint::parse(h).await?);
    }
    let mut st = State {
        shard,
        sim: Sim::new(model),
        joiner: Arc::new(Joiner::new(eps, &join_token, ca_pem, join_concurrency)?),
        agents: Vec::new(),
        first: None,
        armed: Vec::new(),
    };
    eprintln!("fleet shard {shard}: RLIMIT_NOFILE {nofile}, {} hub(s)", hubs.len());
    send(&mut out, &Reply::default()).await?;
    while let Some(line) = lines.recv().await {
        let cmd: Cmd = match serde_json::from_str(&line) {
            Ok(c) => c,
            Err(e) => {
                send(
                    &mut out,
                    &Reply {
                        error: Some(format!("bad command: {e}")),
                        ..Reply::default()
                    },
                )
                .await?;
                continue;
            }
        };
        if matches!(cmd, Cmd::Stop) {
            st.sim.stop.store(true, Ordering::Relaxed);
            send(&mut out, &Reply::default()).await?;
            break;
        }
        let r = handle(&mut st, cmd).await.unwrap_or_else(|e| Reply {
            error: Some(format!("{e:#}")),
            ..Reply::default()
        });
        send(
            &mut out,
            &Reply {
                agents: st.agents.len(),
                ..r
            },
        )
        .await?;
    }
    Ok(())
}

async fn send(out: &mut std::io::Stdout, r: &Reply) -> Result<()> {
    use std::io::Write;
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    out.write_all(&line)?;
    out.flush()?;
    Ok(())
}

async fn handle(st: &mut State, cmd: Cmd) -> Result<Reply> {
    match cmd {
        Cmd::Init { .. } => bail!("init twice"),
        Cmd::Stop => unreachable!("handled by the caller"),
        Cmd::Join { from, to } => {
            let base = *st.first.get_or_insert(from);
            if to.saturating_sub(base) > MAX_PER_SHARD {
                bail!("a shard takes at most {MAX_PER_SHARD} agents");
            }
            let mut set = tokio::task::JoinSet::new();
            for idx in from..to {
                let src = sim::source_addr(st.shard, idx - base);
                let (joiner, sim) = (st.joiner.clone(), st.sim.clone());
                set.spawn(async move { (idx, joiner.join(&sim, idx, src, BTreeMap::new()).await) });
            }
            let mut joined = Vec::new();
            let mut errors = Vec::new();
            while let Some(r) = set.join_next().await {
                let (idx, r) = r.context("a join task failed")?;
                match r {
                    Ok(a) => {
                        let a = Arc::new(a);
                        st.sim.run(a.clone());
                        joined.push((idx, a));
                    }
                    Err(e) if errors.len() < 3 => errors.push(format!("{e:#}")),
                    Err(_) => errors.push(String::new()),
                }
            }
            joined.sort_by_key(|(i, _)| *i);
            let n = joined.len();
            st.agents.extend(joined.into_iter().map(|(_, a)| a));
            Ok(Reply {
                joined: n,
                join_errors: errors,
                ..Reply::default()
            })
        }
        Cmd::Ready => Ok(Reply {
            synced: st
                .agents
                .iter()
                .filter(|a| a.generation.load(Ordering::Relaxed) > 0)
                .count(),
            reported: st
                .agents
                .iter()
                .filter(|a| *a.reported_at.lock().unwrap_or_else(|p| p.into_inner()) > 0.0)
                .count(),
            ..Reply::default()
        }),
        Cmd::Arm => {
            st.armed = st.agents.iter().map(|a| a.generation.load(Ordering::Relaxed)).collect();
            Ok(Reply::default())
        }
        Cmd::WaitPast { limit_secs } => {
            let armed = st.armed.clone();
            let times = wait_each(&st.agents, limit_secs, |i, a| {
                a.generation.load(Ordering::Relaxed) > armed.get(i).copied().unwrap_or(0)
            })
            .await?;
            Ok(Reply {
                times,
                ..Reply::default()
            })
        }
        Cmd::WaitRevision {
            key,
            revision,
            limit_secs,
        } => {
            let times = wait_each(&st.agents, limit_secs, |_, a| {
                a.workloads
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .is_some_and(|(r, _)| *r >= revision)
            })
            .await?;
            Ok(Reply {
                times,
                ..Reply::default()
            })
        }
        Cmd::Samples { from, to } => {
            let mut latencies = BTreeMap::new();
            for k in [Kind::Join, Kind::SyncFirst, Kind::Status] {
                latencies.insert(k, st.sim.latencies(k, from, to));
            }
            Ok(Reply {
                latencies,
                counts: st.sim.counts(from, to),
                ..Reply::default()
            })
        }
        Cmd::Connected { since } => {
            let at: Vec<f64> = st
                .agents
                .iter()
                .map(|a| *a.connected_at.lock().unwrap_or_else(|p| p.into_inner()))
                .collect();
            Ok(Reply {
                last_connected: at.iter().copied().fold(0.0, f64::max),
                not_connected: at.iter().filter(|t| **t < since).count(),
                ..Reply::default()
            })
        }
    }
}

/// Wait until `holds` is true for every agent; each agent's time is its last sync answer
/// (Unix ms), taken when it is first seen holding.
async fn wait_each(
    agents: &[Arc<SimAgent>],
    limit_secs: u64,
    holds: impl Fn(usize, &SimAgent) -> bool,
) -> Result<Vec<f64>> {
    let t = Instant::now();
    let mut arrived = vec![false; agents.len()];
    let mut times = Vec::with_capacity(agents.len());
    loop {
        for (i, a) in agents.iter().enumerate() {
            if !arrived[i] && holds(i, a.as_ref()) {
                arrived[i] = true;
                times.push(*a.synced_at.lock().unwrap_or_else(|p| p.into_inner()));
            }
        }
        if times.len() == agents.len() {
            return Ok(times);
        }
        if t.elapsed() > Duration::from_secs(limit_secs) {
            bail!(
                "only {} of {} agents of this shard got there within {limit_secs} s",
                times.len(),
                agents.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The parent's handle on one shard process.
pub struct Shard {
    pub index: u32,
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Shard {
    /// Start `outpost bench fleet-shard` and initialise it.
    pub async fn spawn(init: Cmd) -> Result<Shard> {
        let Cmd::Init { shard, .. } = &init else {
            bail!("a shard starts with an init command");
        };
        let index = *shard;
        let mut child = tokio::process::Command::new(crate::harness::outpost_bin()?)
            .args(["bench", "fleet-shard"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start a simulator shard process")?;
        let stdin = child.stdin.take().context("shard stdin")?;
        let stdout = child.stdout.take().context("shard stdout")?;
        let mut s = Shard {
            index,
            child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        };
        s.send(&init).await?;
        s.recv().await?;
        Ok(s)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn send(&mut self, c: &Cmd) -> Result<()> {
        let mut line = serde_json::to_vec(c)?;
        line.push(b'\n');
        self.stdin.write_all(&line).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Reply> {
        let line = self
            .lines
            .next_line()
            .await?
            .with_context(|| format!("simulator shard {} exited", self.index))?;
        let r: Reply = serde_json::from_str(&line).with_context(|| format!("shard {}: bad reply", self.index))?;
        if let Some(e) = &r.error {
            bail!("simulator shard {}: {e}", self.index);
        }
        Ok(r)
    }
}

/// Send each shard its command (`cmd(shard index)`; `None` skips it), then collect the replies:
/// the shards work at the same time.
pub async fn all(shards: &mut [Shard], cmd: impl Fn(usize) -> Option<Cmd>) -> Result<Vec<Reply>> {
    let mut sent = Vec::new();
    for (i, s) in shards.iter_mut().enumerate() {
        if let Some(c) = cmd(i) {
            s.send(&c).await?;
            sent.push(i);
        }
    }
    let mut out = Vec::new();
    for i in sent {
        out.push(shards[i].recv().await?);
    }
    Ok(out)
}

/// Stop every shard and wait for it to exit.
pub async fn stop(shards: &mut [Shard]) {
    let _ = all(shards, |_| Some(Cmd::Stop)).await;
    for s in shards.iter_mut() {
        let _ = tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await;
    }
}

/// Shard processes a fleet of `max` agents needs.
pub fn shard_count(max: usize) -> usize {
    max.div_ceil(MAX_PER_SHARD).max(1)
}

/// Split the new agents `from..to` over `shards` shards so each ends with about the same
/// number: returns per shard the range it joins.
pub fn split(from: usize, to: usize, shards: usize, held: &[usize]) -> Vec<std::ops::Range<usize>> {
    let total = to;
    let per = total.div_ceil(shards.max(1));
    let mut next = from;
    let mut out = Vec::new();
    for s in 0..shards {
        let have = held.get(s).copied().unwrap_or(0);
        let take = per.saturating_sub(have).min(to - next);
        out.push(next..next + take);
        next += take;
    }
    if next < to {
        // rounding: the rest to the last shard
        if let Some(last) = out.last_mut() {
            *last = last.start..to;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_hold_at_most_their_share() {
        assert_eq!(shard_count(1_000), 1);
        assert_eq!(shard_count(15_000), 1);
        assert_eq!(shard_count(15_001), 2);
        assert_eq!(shard_count(100_000), 7);
        // 1,000 then 5,000 then 15,000 in two shards
        let r = split(0, 1_000, 2, &[0, 0]);
        assert_eq!(r, vec![0..500, 500..1_000]);
        let r = split(1_000, 5_000, 2, &[1_000, 0]);
        assert_eq!(r, vec![1_000..2_500, 2_500..5_000]);
        let r = split(5_000, 30_000, 2, &[2_500, 2_500]);
        assert_eq!(r, vec![5_000..17_500, 17_500..30_000]);
        let r = split(0, 100_000, 7, &[0; 7]);
        assert!(r.iter().all(|x| x.len() <= MAX_PER_SHARD));
        assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), 100_000);
    }

    #[test]
    fn commands_and_replies_are_json_lines() {
        let c = Cmd::WaitRevision {
            key: "daemonset/default/x".into(),
            revision: 3,
            limit_secs: 60,
        };
        let s = serde_json::to_string(&c).unwrap();
        assert!(!s.contains('\n'));
        assert!(s.starts_with(r#"{"op":"wait_revision""#), "{s}");
        let r = Reply {
            counts: [(Kind::Status, 2)].into_iter().collect(),
            ..Reply::default()
        };
        let back: Reply = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back.counts.get(&Kind::Status), Some(&2));
        // a reply with only an error parses
        let e: Reply = serde_json::from_str(r#"{"error":"x"}"#).unwrap();
        assert_eq!(e.error.as_deref(), Some("x"));
    }
}
