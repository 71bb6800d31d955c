//! The hub's fleet alert rules as a controller: load nodes, their statuses and conditions ->
//! `outpost_core::alerts::{fleet_alerts, condition_alerts, diff_hub_alerts}` -> write the
//! transitions (with their webhook rows) into the monitoring tables. Rules: `NodeOffline`,
//! `WorkloadRolledBack`, `NodeCertificateExpiring`, `NodeDiskFull`/`NodeStoreFailing`.
//!
//! Must never: decide an alert itself, or count silence while the hub was down.

use std::collections::{BTreeMap, BTreeSet};

use outpost_api::{AlertInfo, Labels, RolloutState, UnixMs};
use outpost_core::alerts::{self as rules, AlertKey, FleetNode, RolledBack};
use outpost_core::lease::Fence;

use crate::error::HubError;
use crate::service::Service;

/// One run of the hub's rules; its writes carry the `alert-rules` lease's `fence`. Silence counts only from `listening_since` (the hub's start):
/// while the hub itself was down, nodes could not reach it.
pub async fn evaluate_once(
    svc: &Service,
    listening_since: UnixMs,
    fence: Option<&Fence>,
    now: UnixMs,
) -> Result<Vec<AlertInfo>, HubError> {
    let (nodes, statuses) = (svc.store.nodes().await?, svc.store.statuses(None).await?);
    let fleet: Vec<FleetNode> = nodes
        .iter()
        .map(|n| FleetNode {
            name: n.name.clone(),
            last_contact: n.last_contact(),
            cert_not_after: n.cert_not_after,
        })
        .collect();
    let rollbacks: Vec<RolledBack> = statuses
        .iter()
        .filter_map(|(node, w)| {
            let r = w.rollout.as_ref()?;
            matches!(r.state, RolloutState::RolledBack | RolloutState::Failed).then(|| RolledBack {
                node: node.clone(),
                workload: w.key.clone(),
                since: r.since,
                reason: r.reason.clone().unwrap_or_else(|| format!("{:?}", r.state)),
            })
        })
        .collect();
    let mut want = rules::fleet_alerts(
        &fleet,
        &rollbacks,
        svc.settings.monitor.offline_alert.as_millis() as i64,
        outpost_core::link::expiry_warning_ms(svc.authority.node_cert_lifetime.as_millis() as i64),
        listening_since,
        now,
    );
    let labels: BTreeMap<String, Labels> = nodes.into_iter().map(|n| (n.name, n.labels)).collect();
    let existing: BTreeSet<String> = labels.keys().cloned().collect();
    let mut conditions = svc.monitor.conditions(None).await?;
    conditions.retain(|n, _| existing.contains(n));
    want.extend(rules::condition_alerts(&conditions));
    let firing: BTreeSet<AlertKey> = svc
        .monitor
        .firing_hub_alerts()
        .await?
        .into_iter()
        .filter(|k| existing.contains(&k.node))
        .collect();
    let ts = rules::diff_hub_alerts(&firing, &want, now);
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    let out = svc.monitor.apply_hub(&ts, &labels, fence, now).await?;
    svc.announce(&out);
    Ok(out)
}
