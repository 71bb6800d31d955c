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
    let t = upload_and_tag(c, "/v1/images", tmp.path(), image, &digest, size, "").await?;
    println!("pushed {} ({}, {} bytes)", t.name, t.digest, t.size);
    Ok(())
}

/// Upload `file` (`size` bytes hashing to `digest`) to `{routes}/blobs/` unless the hub's blob
/// store already holds that digest, then name it `name` at `{routes}/tags`. `detail` is added to
/// the upload message.
pub(crate) async fn upload_and_tag(
    c: &Client,
    routes: &str,
    file: &std::path::Path,
    name: &str,
    digest: &str,
    size: u64,
    detail: &str,
) -> Result<ImageTag> {
    // One blob store for images, models and agent binaries: a digest it holds is not sent again.
    if c.exists(&format!("/v1/images/blobs/{digest}")).await? {
        eprintln!("{name}: the hub already has {digest} ({size} bytes); not uploading again");
    } else {
        eprintln!("{name}: uploading {size} bytes ({digest}{detail})");
        let f = tokio::fs::File::open(file).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        c.put_stream(&format!("{routes}/blobs/{digest}"), body, size).await?;
    }
    c.post(
        &format!("{routes}/tags"),
        &ImageTag {
            name: name.to_string(),
            digest: digest.to_string(),
            size,
            pushed_at: 0,
        },
    )
    .await
}

pub async fn list(c: &Client) -> Result<()> {
    list_tags(
        c,
        "/v1/images/tags",
        "IMAGE",
        "the hub has no images; push one with `outpost image push IMAGE`",
    )
    .await
}

/// `image ls` / `model ls`: the names at `route` as a table, or `empty` as the error.
pub(crate) async fn list_tags(c: &Client, route: &str, header: &str, empty: &str) -> Result<()> {
    let tags: Vec<ImageTag> = c.get(route).await?;
    if tags.is_empty() {
        bail!("{empty}");
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
    print!("{}", table(&[header, "DIGEST", "SIZE", "AGE"], &rows));
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
