//! The agent's reading of its model servers' counters: every second (`OUTPOST_MODEL_STATS_MS`)
//! while ONNX serving workloads run, `GET /v2/models/{name}/stats` over loopback from each, kept
//! in a [`Board`] that the vitals sampler (figures forwarded to the hub, node alert rules) and the
//! reconciler (the model's update gate, `outpost_core::inference::gate_verdict`) read.
//!
//! Owns: which servers to ask (the reconciler says, [`Board::set_targets`]) and the last reading
//! of each. Must never: decide anything about the figures, or block: a server that does not
//! answer within 500 ms keeps its previous reading, which ages (the gate ignores stale ones).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use outpost_api::{ModelCounters, UnixMs, WorkloadSpec};
use serde::Deserialize;
use tokio::sync::watch;
use tracing::debug;

use crate::reconcile::now_ms;

/// A serving container the agent runs: where its server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Workload key.
    pub key: String,
    pub name: String,
    pub version: String,
    pub port: u16,
}

/// One reading of a model server.
#[derive(Clone, Debug, PartialEq)]
pub struct Reading {
    pub key: String,
    pub model: String,
    pub version: String,
    /// The server process that answered (the gate judges only the revision's own server).
    pub pid: u32,
    pub at: UnixMs,
    pub counters: ModelCounters,
}

#[derive(Default)]
struct Inner {
    targets: Vec<Target>,
    readings: BTreeMap<String, Reading>,
}

/// Shared between the reconciler, the sampler and the scrape loop.
#[derive(Clone, Default)]
pub struct Board(Arc<RwLock<Inner>>);

/// The model servers of the specs that run: one per workload (its first serving container).
pub fn targets<'a>(specs: impl IntoIterator<Item = &'a WorkloadSpec>) -> Vec<Target> {
    specs
        .into_iter()
        .filter_map(|w| {
            let m = w.containers.iter().find_map(|c| c.model.as_ref())?;
            let (name, version) = m.name_version();
            Some(Target {
                key: w.key.clone(),
                name: name.to_string(),
                version: version.to_string(),
                port: m.port,
            })
        })
        .collect()
}

impl Board {
    /// The servers to ask from now on; readings of workloads no longer served are dropped.
    pub fn set_targets(&self, t: Vec<Target>) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        if g.targets == t {
            return;
        }
        g.readings.retain(|k, _| t.iter().any(|x| &x.key == k));
        g.targets = t;
    }

    fn targets(&self) -> Vec<Target> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).targets.clone()
    }

    pub fn reading(&self, key: &str) -> Option<Reading> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .readings
            .get(key)
            .cloned()
    }

    pub fn readings(&self) -> Vec<Reading> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .readings
            .values()
            .cloned()
            .collect()
    }

    fn put(&self, r: Reading) {
        let mut g = self.0.write().unwrap_or_else(|e| e.into_inner());
        if g.targets.iter().any(|t| t.key == r.key) {
            g.readings.insert(r.key.clone(), r);
        }
    }
}

#[derive(Deserialize)]
struct Stats {
    #[serde(flatten)]
    counters: ModelCounters,
    pid: u32,
}

/// Ask every target's server for its counters, every `every`, until shutdown. Idle (no
/// request, no HTTP client) while no serving workload runs.
pub async fn scrape_loop(board: Board, every: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut client: Option<reqwest::Client> = None;
    loop {
        let targets = board.targets();
        if !targets.is_empty() && client.is_none() {
            match reqwest::Client::builder()
                .timeout(Duration::from_millis(500))
                .no_proxy()
                .build()
            {
                Ok(c) => client = Some(c),
                Err(e) => tracing::warn!(error = %e, "cannot build the model stats client; no model figures"),
            }
        }
        if let Some(client) = &client {
            for t in &targets {
                board.put_result(t, read(client, t).await);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

async fn read(client: &reqwest::Client, t: &Target) -> Result<Stats, reqwest::Error> {
    let url = format!("http://127.0.0.1:{}/v2/models/{}/stats", t.port, t.name);
    client.get(&url).send().await?.error_for_status()?.json::<Stats>().await
}

impl Board {
    fn put_result(&self, t: &Target, got: Result<Stats, reqwest::Error>) {
        match got {
            Ok(s) => self.put(Reading {
                key: t.key.clone(),
                model: t.name.clone(),
                version: t.version.clone(),
                pid: s.pid,
                at: now_ms(),
                counters: s.counters,
            }),
            Err(e) => debug!(workload = %t.key, error = %e, "model server stats not read"),
        }
    }
}
