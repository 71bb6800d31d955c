//! `outpost model push|ls`: ONNX models delivered through the hub (docs/inference.md).
//!
//! `push` checks the file is an ONNX model and hashes it (both streaming: a model larger than
//! memory is never read whole), uploads it only if the hub does not hold that digest yet (the
//! hub checks it again), and names it.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use outpost_api::ImageTag;
use sha2::{Digest, Sha256};

use crate::client::Client;
use crate::output::{age, table};

/// Hash a file in 64 KiB reads.
fn sha256_file(path: &Path) -> Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok((format!("sha256:{}", hex::encode(h.finalize())), size))
}

pub async fn push(c: &Client, file: &Path, name: &str) -> Result<()> {
    if let Err(e) = outpost_api::validate_image_ref(name) {
        bail!("--name {name:?}: {e}; name the model NAME:TAG, e.g. digits:v2");
    }
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {}", file.display()))?;
    let summary = outpost_api::onnx::check_onnx(std::io::BufReader::with_capacity(1 << 16, f))
        .map_err(|e| anyhow::anyhow!("{} is not an ONNX model: {e}; nothing was pushed", file.display()))?;
    let (digest, size) = sha256_file(file)?;
    if c.exists(&format!("/v1/images/blobs/{digest}")).await? {
        eprintln!("{name}: the hub already has {digest} ({size} bytes); not uploading again");
    } else {
        eprintln!(
            "{name}: uploading {size} bytes ({digest}, ONNX IR {})",
            summary.ir_version
        );
        let f = tokio::fs::File::open(file).await?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        c.put_stream(&format!("/v1/models/blobs/{digest}"), body, size).await?;
    }
    let t: ImageTag = c
        .post(
            "/v1/models/tags",
            &ImageTag {
                name: name.to_string(),
                digest,
                size,
                pushed_at: 0,
            },
        )
        .await?;
    println!("pushed model {} ({}, {} bytes)", t.name, t.digest, t.size);
    Ok(())
}

pub async fn list(c: &Client) -> Result<()> {
    let tags: Vec<ImageTag> = c.get("/v1/models/tags").await?;
    if tags.is_empty() {
        bail!("the hub has no models; push one with `outpost model push FILE --name NAME:TAG`");
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
    print!("{}", table(&["MODEL", "DIGEST", "SIZE", "AGE"], &rows));
    Ok(())
}
