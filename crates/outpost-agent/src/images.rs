//! Getting a container's image onto the node: the local engine first, then the hub (for sites
//! with no registry), then the image's registry.
//!
//! From the hub: `GET /v1/images/tags?name=IMAGE` gives the digest of the `docker save` archive;
//! the archive is downloaded to `<data-dir>/images/<digest>.partial`, resuming with an HTTP
//! Range request after a broken link, checked against its SHA-256, renamed, and loaded into the
//! engine. Images are never deleted by the agent, so the image of a node's last-known-good
//! revision stays available for a rollback with no link at all.

use std::path::{Path, PathBuf};

use bollard::query_parameters::{CreateImageOptions, ImportImageOptions};
use futures_util::StreamExt;
use outpost_api::{ImageTag, PullPolicy};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::info;

use crate::docker::Engine;
use crate::sync::HubClient;

/// Make `image` available to the engine according to `policy`. The error is the status reason.
pub async fn ensure(
    engine: &Engine,
    hub: Option<&HubClient>,
    dir: &Path,
    image: &str,
    policy: PullPolicy,
) -> Result<(), String> {
    let present = engine.api.inspect_image(image).await.is_ok();
    match (policy, present) {
        (PullPolicy::Never, true) | (PullPolicy::IfNotPresent, true) => return Ok(()),
        (PullPolicy::Never, false) => {
            return Err(format!(
                "ErrImageNeverPull: image {image} is not on this node and imagePullPolicy is Never"
            ))
        }
        _ => {}
    }
    let from_hub = match hub {
        None => "no hub: single-box mode".to_string(),
        Some(hub) => match fetch_from_hub(engine, hub, dir, image).await {
            Ok(true) => return Ok(()),
            Ok(false) => "not on the hub".to_string(),
            Err(e) => e,
        },
    };
    match pull(engine, image).await {
        Ok(()) => Ok(()),
        // Always, but nothing newer reachable: keep running with what the node has.
        Err(_) if present => Ok(()),
        Err(registry) => Err(format!(
            "ImagePullBackOff: image {image} is neither on this node nor on the hub ({from_hub}), and its registry \
             failed ({registry}); push it with `outpost image push {image}`"
        )),
    }
}

async fn pull(engine: &Engine, image: &str) -> Result<(), String> {
    let opts = CreateImageOptions {
        from_image: Some(image.to_string()),
        ..Default::default()
    };
    let mut s = engine.api.create_image(Some(opts), None, None);
    while let Some(r) = s.next().await {
        r.map_err(|e| first_line(&e.to_string()))?;
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or(s).chars().take(200).collect()
}

/// `Ok(false)` when the hub does not have the image.
async fn fetch_from_hub(engine: &Engine, hub: &HubClient, dir: &Path, image: &str) -> Result<bool, String> {
    let resp = hub.get_query("/v1/images/tags", &[("name", image)], None).await;
    let tag: ImageTag = match resp {
        Ok(r) => r.json().await.map_err(|e| format!("hub answered badly: {e}"))?,
        Err(crate::sync::LinkError::Hub { status: 404, .. }) => return Ok(false),
        Err(e) => return Err(format!("hub: {e}")),
    };
    let archive = download(hub, dir, &tag).await?;
    load(engine, &archive).await?;
    if engine.api.inspect_image(image).await.is_err() {
        return Err(format!("the hub's archive {} did not contain {image}", tag.digest));
    }
    info!(image, digest = %tag.digest, size = tag.size, "image loaded from the hub");
    Ok(true)
}

/// Download the archive, resuming a partial file. Returns the verified file.
pub async fn download(hub: &HubClient, dir: &Path, tag: &ImageTag) -> Result<PathBuf, String> {
    let hex = tag.digest.strip_prefix("sha256:").ok_or("bad digest")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let done = dir.join(format!("{hex}.tar"));
    if done.exists() {
        return Ok(done);
    }
    let partial = dir.join(format!("{hex}.partial"));
    let have = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
    let mut f = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&partial)
        .await
        .map_err(|e| e.to_string())?;
    let (mut resp, from) = match hub.get(&format!("/v1/images/blobs/{}", tag.digest), Some(have)).await {
        Ok(r) if r.status() == reqwest::StatusCode::PARTIAL_CONTENT => (r, have),
        Ok(r) => {
            f.set_len(0).await.map_err(|e| e.to_string())?;
            (r, 0)
        }
        Err(e) => return Err(format!("download {}: {e}", tag.digest)),
    };
    if from > 0 {
        info!(digest = %tag.digest, from, "resuming image download");
    }
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| format!("download {} broke: {e}; it resumes on retry", tag.digest))?
    {
        f.write_all(&chunk).await.map_err(|e| e.to_string())?;
    }
    f.sync_all().await.map_err(|e| e.to_string())?;
    drop(f);
    let actual = sha256_file(&partial).await?;
    if actual != hex {
        let _ = std::fs::remove_file(&partial);
        return Err(format!(
            "download of {} is corrupt (sha256 {actual}); starting over",
            tag.digest
        ));
    }
    std::fs::rename(&partial, &done).map_err(|e| e.to_string())?;
    Ok(done)
}

async fn sha256_file(p: &Path) -> Result<String, String> {
    let mut f = tokio::fs::File::open(p).await.map_err(|e| e.to_string())?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

async fn load(engine: &Engine, archive: &Path) -> Result<(), String> {
    let bytes = tokio::fs::read(archive).await.map_err(|e| e.to_string())?;
    let mut s = engine
        .api
        .import_image(ImportImageOptions::default(), bollard::body_full(bytes.into()), None);
    while let Some(r) = s.next().await {
        let info = r.map_err(|e| format!("docker load failed: {e}"))?;
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            return Err(format!("docker load failed: {err}"));
        }
    }
    Ok(())
}
