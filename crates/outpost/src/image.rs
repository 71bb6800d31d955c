//! `outpost image push|ls`: deliver images through the hub to sites with no registry.
//!
//! `push` exports the image from the local Docker Engine (what `docker save` produces), hashes
//! it while spooling it to a temporary file, uploads it only if the hub does not have that
//! digest yet, and names it.

use anyhow::{bail, Context, Result};
use futures_util::StreamExt;
use outpost_api::ImageTag;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::client::Client;
use crate::output::{age, table};

pub async fn push(c: &Client, image: &str, socket: &str) -> Result<()> {
    if let Err(e) = outpost_api::validate_image_ref(image) {
        bail!("{e}; name it the way a manifest's image field does, e.g. my-app:v1.2.3");
    }
    let docker = bollard::Docker::connect_with_socket(socket, 600, bollard::API_DEFAULT_VERSION)
        .with_context(|| format!("cannot use the Docker socket {socket}"))?
        .negotiate_version()
        .await
        .with_context(|| {
            format!("cannot reach the Docker Engine at {socket}; `outpost image push` exports images from it")
        })?;
    docker.inspect_image(image).await.with_context(|| {
        format!("image {image} is not in the local Docker Engine; build, pull or `docker load` it first")
    })?;
    let tmp = tempfile::NamedTempFile::new()?;
    let mut f = tokio::fs::File::from_std(tmp.reopen()?);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut s = docker.export_image(image);
    while let Some(chunk) = s.next().await {
        let chunk = chunk.with_context(|| format!("exporting {image}"))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        f.write_all(&chunk).await?;
    }
    f.flush().await?;
    let digest = format!("sha256:{}", hex::encode(hasher.finalize()));
    let blob = format!("/v1/images/blobs/{digest}");
    if c.exists(&blob).await? {
        eprintln!("{image}: the hub already has {digest} ({size} bytes); not uploading again");
    } else {
        eprintln!("{image}: uploading {size} bytes ({digest})");
        let file = tokio::fs::File::open(tmp.path()).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
        c.put_stream(&blob, body, size).await?;
    }
    let t: ImageTag = c
        .post(
            "/v1/images/tags",
            &ImageTag {
                name: image.to_string(),
                digest,
                size,
                pushed_at: 0,
            },
        )
        .await?;
    println!("pushed {} ({}, {} bytes)", t.name, t.digest, t.size);
    Ok(())
}

pub async fn list(c: &Client) -> Result<()> {
    let tags: Vec<ImageTag> = c.get("/v1/images/tags").await?;
    if tags.is_empty() {
        bail!("the hub has no images; push one with `outpost image push IMAGE`");
    }
    let rows: Vec<Vec<String>> = tags
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                t.digest.clone(),
                t.size.to_string(),
                age(Some(t.pushed_at)),
            ]
        })
        .collect();
    print!("{}", table(&["IMAGE", "DIGEST", "SIZE", "AGE"], &rows));
    Ok(())
}

/// `outpost agent publish FILE`: upload an agent binary as a blob (by content, once) and print
/// the AgentUpdate manifest that rolls it out.
pub async fn publish_binary(c: &Client, file: &std::path::Path, version: Option<&str>) -> Result<()> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    if !bytes.starts_with(b"\x7fELF") && !bytes.starts_with(b"#!") {
        bail!(
            "{} is not an executable (no ELF header); publish the outpost binary built for the boxes",
            file.display()
        );
    }
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&bytes)));
    let blob = format!("/v1/images/blobs/{digest}");
    let size = bytes.len() as u64;
    if c.exists(&blob).await? {
        eprintln!("the hub already has {digest}");
    } else {
        eprintln!("uploading {size} bytes ({digest})");
        c.put_stream(&blob, reqwest::Body::from(bytes), size).await?;
    }
    println!(
        "apiVersion: outpost.dev/v1\nkind: AgentUpdate\nmetadata: {{name: agent}}\nspec:\n  digest: {digest}\n{}  nodeSelector: {{}}\n  healthDeadlineSeconds: 120",
        version.map(|v| format!("  version: {v:?}\n")).unwrap_or_default()
    );
    Ok(())
}
