//! Images delivered through the hub, for sites that cannot reach a registry.
//!
//! `outpost image push` uploads the `docker save` archive of an image once: blobs are stored by
//! the SHA-256 of their content (`crate::store::blobs`: under `<data-dir>/images/sha256-<hex>`
//! on SQLite, in the shared database on PostgreSQL) (so pushing the same
//! archive again, or under another name, stores nothing new) and names point at blobs in the
//! `image_tags` table. Agents resolve a name to a digest and download the blob over their own
//! mTLS link, resuming with `Range: bytes=N-` after a broken link.
//!
//! Uploads are streamed to a temporary file (`.upload-*`), hashed on the way, and renamed into
//! place only when the digest matches the one in the URL: a blob file is always complete. A
//! failed upload (a broken body, a wrong digest, a full disk, the client gone) removes its
//! temporary file at once; the hub start removes any a crash left behind
//! ([`sweep_stale_uploads`]). A full disk is answered `507 insufficient_storage`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use outpost_api::ImageTag;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::error::HubError;
use outpost_core::access::{Action, Target};

use crate::extract::{ApiJson, ApiQuery, Caller, MaybeCaller, Peer};
use crate::service::{Command, ImageReader, Query, Reply, Service};

type St = State<Arc<Service>>;

/// Prefix of upload temporary files in the images directory.
pub(crate) const UPLOAD_PREFIX: &str = ".upload-";

/// Remove the temporary files of uploads a crash interrupted (none is running at start).
/// Returns how many were removed.
pub fn sweep_stale_uploads(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for e in entries.flatten() {
        if !e.file_name().to_string_lossy().starts_with(UPLOAD_PREFIX) {
            continue;
        }
        match std::fs::remove_file(e.path()) {
            Ok(()) => removed += 1,
            Err(err) => tracing::warn!(file = %e.path().display(), error = %err, "cannot remove an interrupted upload"),
        }
    }
    if removed > 0 {
        tracing::info!(dir = %dir.display(), removed, "removed interrupted image uploads");
    }
    removed
}

/// Why writing an upload failed: a full disk (or file size limit) is the operator's to fix.
pub(crate) fn storage_error(e: std::io::Error) -> HubError {
    use nix::errno::Errno;
    match e.raw_os_error().map(Errno::from_raw) {
        Some(Errno::ENOSPC | Errno::EFBIG | Errno::EDQUOT) => {
            HubError::InsufficientStorage(format!("writing the image upload failed: {e}"))
        }
        _ => HubError::Internal(format!("storing image upload: {e}")),
    }
}

/// `PUT /v1/images/blobs/{digest}` (admin): store an archive.
pub async fn put_blob(
    State(svc): St,
    c: Caller,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Response, HubError> {
    audited_upload(&svc, &c, "image push", &digest, req, |_| Ok(())).await
}

/// An upload of an image or model archive, checked against the caller's role and recorded in the
/// audit log (who, digest, size; refusals and failures too).
pub(crate) async fn audited_upload(
    svc: &Service,
    c: &Caller,
    action: &str,
    digest: &str,
    req: Request,
    check: impl FnOnce(&std::path::Path) -> Result<(), HubError>,
) -> Result<Response, HubError> {
    if let Err(e) = c.require(Action::PushImage, Target::Fleet) {
        svc.audit(c, action, digest, "", Err(&e)).await;
        return Err(e);
    }
    let declared = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let r = store_blob(svc, digest, req, check).await;
    let detail = match &r {
        Ok((_, Some(bytes))) => format!("{bytes} bytes"),
        Ok((_, None)) => "already stored".to_string(),
        Err(_) => declared.map(|b| format!("{b} bytes declared")).unwrap_or_default(),
    };
    svc.audit(c, action, digest, &detail, r.as_ref().map(|_| ())).await;
    r.map(|(resp, _)| resp)
}

/// Stream an upload into the blob store: hashed on the way, `check`ed on the complete temporary
/// file (models: the ONNX check), renamed into place only when both pass. Returns the answer
/// and the bytes stored (None: the archive was stored already).
async fn store_blob(
    svc: &Service,
    digest: &str,
    req: Request,
    check: impl FnOnce(&std::path::Path) -> Result<(), HubError>,
) -> Result<(Response, Option<u64>), HubError> {
    let digest = digest.to_string();
    if svc.blobs.size(&digest).await?.is_some() {
        return Ok((StatusCode::OK.into_response(), None));
    }
    let images_dir = svc.blobs.upload_dir();
    std::fs::create_dir_all(images_dir).map_err(storage_error)?;
    // Removed when dropped: on every error return, and when the client goes away mid-upload
    // (the handler is dropped).
    let tmp = tempfile::Builder::new()
        .prefix(UPLOAD_PREFIX)
        .tempfile_in(images_dir)
        .map_err(storage_error)?;
    let (file, tmp) = tmp.into_parts();
    let mut f = tokio::fs::File::from_std(file);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut stream = req.into_body().into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| HubError::BadRequest(format!("upload broke off: {e}; push again")))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
        f.write_all(&chunk).await.map_err(storage_error)?;
    }
    f.sync_all().await.map_err(storage_error)?;
    drop(f);
    let actual = hex::encode(hasher.finalize());
    if format!("sha256:{actual}") != digest {
        return Err(HubError::BadRequest(format!(
            "the upload's digest is sha256:{actual}, not {digest}; push again"
        )));
    }
    check(&tmp)?;
    if !svc.blobs.put_file(&digest, tmp).await? {
        return Ok((StatusCode::OK.into_response(), None));
    }
    tracing::info!(digest = %digest, bytes = size, "blob stored");
    Ok((StatusCode::CREATED.into_response(), Some(size)))
}

/// `GET /v1/images/blobs/{digest}` (admin or node), with `Range: bytes=N-` for resuming.
pub async fn get_blob(
    State(svc): St,
    peer: Peer,
    MaybeCaller(caller): MaybeCaller,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<Response, HubError> {
    svc.image_reader(caller.as_ref(), &peer).await?;
    let not_found = || HubError::NotFound(format!("image archive {digest}"));
    let len = svc.blobs.size(&digest).await?.ok_or_else(not_found)?;
    let from = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok())
        .filter(|n| *n < len);
    let blob = svc
        .blobs
        .read(&digest, from.unwrap_or(0))
        .await?
        .ok_or_else(not_found)?;
    let len = blob.len;
    let mut resp = match from {
        Some(n) => {
            let mut r = Response::new(blob.body);
            *r.status_mut() = StatusCode::PARTIAL_CONTENT;
            let range = format!("bytes {n}-{}/{len}", len - 1);
            r.headers_mut()
                .insert(header::CONTENT_RANGE, range.parse().expect("ascii"));
            r.headers_mut().insert(header::CONTENT_LENGTH, (len - n).into());
            r
        }
        None => {
            let mut r = Response::new(blob.body);
            r.headers_mut().insert(header::CONTENT_LENGTH, len.into());
            r
        }
    };
    resp.headers_mut()
        .insert(header::ACCEPT_RANGES, "bytes".parse().expect("ascii"));
    Ok(resp)
}

/// `HEAD /v1/images/blobs/{digest}` (admin): is it stored already?
pub async fn head_blob(State(svc): St, c: Caller, Path(digest): Path<String>) -> Result<StatusCode, HubError> {
    c.require(Action::PushImage, Target::Fleet)?;
    Ok(if svc.blobs.size(&digest).await?.is_some() {
        StatusCode::OK
    } else {
        StatusCode::NOT_FOUND
    })
}

/// `POST /v1/images/tags` (admin): name an uploaded archive.
pub async fn put_tag(State(svc): St, c: Caller, ApiJson(t): ApiJson<ImageTag>) -> Result<Reply, HubError> {
    svc.execute_as(&c, Command::TagImage(t)).await
}

/// `?name=` of the tag routes (images and models).
#[derive(Deserialize)]
pub struct TagQuery {
    pub(crate) name: Option<String>,
}

/// `GET /v1/images/tags?name=IMAGE` (admin or node): one tag; without `name`, all (admin).
pub async fn get_tags(
    State(svc): St,
    peer: Peer,
    MaybeCaller(caller): MaybeCaller,
    ApiQuery(q): ApiQuery<TagQuery>,
) -> Result<Reply, HubError> {
    let who = svc.image_reader(caller.as_ref(), &peer).await?;
    match q.name {
        Some(name) => svc.query(Query::ImageTag { name }).await,
        None if who == ImageReader::Admin => svc.query(Query::ImageTags).await,
        None => Err(HubError::NotAllowed(
            "a node may only ask for one image (?name=IMAGE); listing every image needs an account token".into(),
        )),
    }
}
