//! Image prefetch for fleet rollouts with maintenance windows: the hub adds to a sync answer the
//! specs this node will be asked to run once its window opens (`SyncAnswer.prefetch`,
//! docs/protocol.md). This task fetches their container images now (local engine, then the
//! hub, then the registry, as for a start: `crate::images::ensure`), so activation inside the
//! window needs no download. Process workloads have nothing to fetch (their `image` is a
//! version label).
//!
//! A hint only: it never starts, stops or changes a workload, and a failed fetch is logged and
//! retried at activation. Must never: block the sync loop or the reconciler.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;

use outpost_api::{Runtime, WorkloadSpec};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::sync::HubClient;

/// Fetch the images of each batch of hints as it arrives (each image once per agent run).
pub async fn prefetch_loop(
    hub: Arc<HubClient>,
    data_dir: PathBuf,
    socket: String,
    agent_id: String,
    mut hints: mpsc::UnboundedReceiver<Vec<WorkloadSpec>>,
) {
    let mut done: BTreeSet<String> = BTreeSet::new();
    while let Some(specs) = hints.recv().await {
        let images: Vec<(String, outpost_api::PullPolicy, String, u64)> = specs
            .iter()
            .filter(|s| s.runtime == Runtime::Docker)
            .flat_map(|s| {
                s.containers.iter().filter_map(|c| {
                    c.image
                        .clone()
                        .map(|i| (i, c.image_pull_policy, s.key.clone(), s.revision))
                })
            })
            .filter(|(i, ..)| !done.contains(i))
            .collect();
        if images.is_empty() {
            continue;
        }
        let engine = match crate::docker::Engine::connect(&socket, &agent_id).await {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "cannot prefetch images: no container engine; they are fetched when the revision starts");
                continue;
            }
        };
        let dir = data_dir.join("images");
        for (image, policy, key, revision) in images {
            match crate::images::ensure(&engine, Some(&hub), &dir, &image, policy).await {
                Ok(()) => {
                    info!(image = %image, workload = %key, revision, "image prefetched before the maintenance window");
                    done.insert(image);
                }
                Err(e) => warn!(image = %image, workload = %key, revision, error = %e,
                    "image prefetch failed; it is fetched again when the revision starts"),
            }
        }
    }
}
