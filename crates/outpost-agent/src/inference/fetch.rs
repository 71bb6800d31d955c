//! Getting a model file onto the node (docs/inference.md): from the node's cache, else from the
//! hub over the node's own mTLS link.
//!
//! `GET /v1/models/tags?name=digits:v2` gives the digest; the blob is downloaded with
//! [`crate::images::download`] (resumable with `Range`, SHA-256 checked, renamed into place when
//! complete) into `<data-dir>/models/<hex>.tar`. `<data-dir>/models/refs/<name:tag>` remembers
//! which digest a tag named, so a node restarted with no link serves the model it had. The agent
//! never deletes a model file, so the model of a last-known-good revision is always there for a
//! rollback without a link. A reference by digest (`digits@sha256:<hex>`) needs no lookup.

use std::path::{Path, PathBuf};

use outpost_api::ImageTag;
use tracing::info;

use crate::sync::{HubClient, LinkError};

pub fn models_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("models")
}

fn ref_file(data_dir: &Path, reference: &str) -> PathBuf {
    let safe: String = reference
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    models_dir(data_dir).join("refs").join(safe)
}

fn cached(data_dir: &Path, digest: &str) -> Option<PathBuf> {
    let hex = digest.strip_prefix("sha256:")?;
    let p = models_dir(data_dir).join(format!("{hex}.tar"));
    p.exists().then_some(p)
}

/// The local file of `reference`, fetching it from the hub when the node does not hold it.
pub async fn resolve(data_dir: &Path, reference: &str) -> Result<PathBuf, String> {
    let by_digest = reference.split_once('@').map(|(_, d)| d.to_string());
    if let Some(p) = by_digest.as_deref().and_then(|d| cached(data_dir, d)) {
        return Ok(p);
    }
    let hub = match crate::Identity::load(data_dir) {
        Ok(id) => Some(HubClient::new(id, data_dir.to_path_buf()).map_err(|e| e.to_string())?),
        Err(_) => None,
    };
    let remembered = std::fs::read_to_string(ref_file(data_dir, reference)).ok();
    let Some(hub) = hub else {
        return remembered
            .and_then(|d| cached(data_dir, d.trim()))
            .ok_or_else(|| format!("model {reference} is not on this node and the node has not joined a hub"));
    };
    let tag = match by_digest {
        Some(digest) => ImageTag {
            name: reference.to_string(),
            digest,
            size: 0,
            pushed_at: 0,
        },
        None => match hub.get_query("/v1/models/tags", &[("name", reference)], None).await {
            Ok(r) => r.json::<ImageTag>().await.map_err(|e| format!("hub answered badly: {e}"))?,
            Err(LinkError::Hub { status: 404, .. }) => {
                return Err(format!(
                    "model {reference} is not on the hub: push it with `outpost model push FILE --name {reference}`"
                ))
            }
            // No link: serve what this tag named when the node last fetched it.
            Err(e) => {
                return remembered.and_then(|d| cached(data_dir, d.trim())).ok_or_else(|| {
                    format!("model {reference} is not on this node and the hub cannot be reached ({e}); it is fetched when the link is back")
                })
            }
        },
    };
    if let Some(p) = cached(data_dir, &tag.digest) {
        remember(data_dir, reference, &tag.digest);
        return Ok(p);
    }
    let p = crate::images::download(&hub, &models_dir(data_dir), &tag).await?;
    remember(data_dir, reference, &tag.digest);
    info!(model = reference, digest = %tag.digest, "model downloaded from the hub");
    Ok(p)
}

fn remember(data_dir: &Path, reference: &str, digest: &str) {
    let f = ref_file(data_dir, reference);
    if let Some(dir) = f.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let _ = crate::identity::write_atomic(&f, digest.as_bytes(), 0o644);
}
