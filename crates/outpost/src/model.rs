//! `outpost model push|ls`: ONNX models delivered through the hub (docs/inference.md).
//!
//! `push` checks the file is an ONNX model and hashes it (both streaming: a model larger than
//! memory is never read whole), uploads it only if the hub does not hold that digest yet (the
//! hub checks it again), and names it.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::client::Client;

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
    let detail = format!(", ONNX IR {}", summary.ir_version);
    let t = crate::image::upload_and_tag(c, "/v1/models", file, name, &digest, size, &detail).await?;
    println!("pushed model {} ({}, {} bytes)", t.name, t.digest, t.size);
    Ok(())
}

pub async fn list(c: &Client) -> Result<()> {
    crate::image::list_tags(
        c,
        "/v1/models/tags",
        "MODEL",
        "the hub has no models; push one with `outpost model push FILE --name NAME:TAG`",
    )
    .await
}
