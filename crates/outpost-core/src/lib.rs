//! outpost's decisions, as pure functions: where workloads run (`schedule`), what a node runs
//! (`render`), how the agent supervises processes (`supervise`), the hub link's rules (`link`:
//! join labels, certificate renewal, connection admission), fleet rollouts in waves
//! (`waves`), which hub endpoint an agent uses (`hubs`), GitOps (`gitops`: a node's variant, fetch schedule, commit acceptance), and
//! site-local failover (`site_ha`: membership, who runs a failover copy, quorum, the hub witness),
//! who may do what (`access`: roles, label scopes), and what hub replicas on one database look at
//! again and when (`replicas`).
//!
//! Owns: every policy that can be stated as `decide(state, now) -> actions`. Must never: do I/O,
//! read the clock (callers pass `now`), sleep, or depend on an async runtime. Every function here
//! is tested table-style without sockets, files or timers.

pub mod access;
pub mod admission;
pub mod agent_update;
pub mod alerts;
pub mod cron;
pub mod exec_relay;
#[doc(hidden)]
pub mod fuzz;
pub mod gitops;
pub mod hubs;
pub mod inference;
pub mod lease;
pub mod link;
pub mod pipeline;
pub mod probe;
pub mod render;
pub mod replicas;
pub mod retention;
pub mod retry;
pub mod rollout;
pub mod schedule;
pub mod site_ha;
pub mod supervise;
pub mod vitals;
pub mod waves;

use std::collections::BTreeMap;

use outpost_api::WorkloadSpec;

/// What changed between the workloads a node holds (key -> hash) and what it should hold.
/// Returns (keys to upsert, keys to remove), both sorted.
pub fn bundle_changes(
    held: &BTreeMap<String, String>,
    want: &BTreeMap<String, WorkloadSpec>,
) -> (Vec<String>, Vec<String>) {
    let upsert = want
        .iter()
        .filter(|(k, s)| held.get(*k) != Some(&site_ha::delivery_hash(s)))
        .map(|(k, _)| k.clone())
        .collect();
    let remove = held.keys().filter(|k| !want.contains_key(*k)).cloned().collect();
    (upsert, remove)
}
