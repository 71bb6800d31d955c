//! The hub as witness for two-box sites (docs/site-ha.md, "Who runs the copy"): a box that
//! cannot hear the other box of its pair asks here, over its own mTLS link to the hub, who
//! holds the copy of a failover workload. `outpost_core::site_ha::witness` decides (the holder
//! renews its lease; the other box gets the copy at a newer epoch once the lease lapsed); this
//! module keeps the leases and checks who may ask.
//!
//! The leases live in memory: they matter for a few hundred milliseconds at a time, while a
//! pair cannot hear itself. A hub restart forgets them; the next claimant gets the copy and the
//! other box learns it at its next claim (docs/site-ha.md).
//!
//! Must never: decide itself (the core does), or answer a node for a workload it does not hold.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::Json;
use outpost_api::now_ms;
use outpost_api::site::{WitnessAnswer, WitnessClaim};
use outpost_core::site_ha::{witness, Lease, LEASE_MS};

use crate::error::HubError;
use crate::extract::{ApiJson, Peer};
use crate::service::Service;

/// Longest workload key accepted (`deployment/<namespace>/<name>`, each name at most 253).
const MAX_KEY: usize = 600;

/// The witness's lease per failover workload.
#[derive(Default)]
pub struct Leases(Mutex<HashMap<String, Lease>>);

impl Leases {
    /// Apply `node`'s claim at `now`; the lease after it.
    pub fn claim(&self, workload: &str, node: &str, epoch: u64, now: i64) -> Lease {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let next = witness(m.get(workload), node, epoch, now, LEASE_MS);
        let moved = m.get(workload).is_none_or(|l| l.owner != next.owner);
        if moved {
            tracing::info!(workload, owner = %next.owner, epoch = next.epoch, "site witness: copy granted");
        }
        m.insert(workload.to_string(), next.clone());
        next
    }
}

impl Service {
    /// `POST /v1/nodes/{node}/witness`: `node`'s claim on a two-box failover workload it holds.
    pub async fn site_witness(&self, peer: &Peer, node: &str, claim: WitnessClaim) -> Result<WitnessAnswer, HubError> {
        self.authorize_node(peer, node).await?;
        if claim.workload.is_empty() || claim.workload.len() > MAX_KEY {
            return Err(HubError::BadRequest(format!(
                "workload: must be a workload key of 1 to {MAX_KEY} characters, like deployment/default/gw"
            )));
        }
        let n = node.to_string();
        let held = self.store.sync(&n, 0).await?.ok_or(HubError::UnknownNode)?;
        let spec = held.upsert.iter().find(|w| w.key == claim.workload).ok_or_else(|| {
            HubError::NotFound(format!(
                "failover workload {} on node {node} (the hub did not place it there)",
                claim.workload
            ))
        })?;
        let members = spec.failover.as_ref().map_or(0, |f| f.members.len());
        if members != 2 {
            return Err(HubError::BadRequest(format!(
                "workload: {} has {members} boxes holding it; the hub witnesses only two-box failover workloads (three or more decide by majority)",
                claim.workload
            )));
        }
        let lease = self.leases.claim(&claim.workload, node, claim.epoch, now_ms());
        Ok(WitnessAnswer {
            owner: lease.owner,
            epoch: lease.epoch,
        })
    }
}

/// `POST /v1/nodes/{node}/witness` (mTLS, own node only).
pub async fn claim(
    State(svc): State<Arc<Service>>,
    peer: Peer,
    Path(node): Path<String>,
    ApiJson(claim): ApiJson<WitnessClaim>,
) -> Result<Json<WitnessAnswer>, HubError> {
    Ok(Json(svc.site_witness(&peer, &node, claim).await?))
}
