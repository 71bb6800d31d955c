//! Image and model blobs (`crate::images`, `crate::models`), content-addressed by SHA-256,
//! behind one interface, [`BlobStore`]:
//! - on SQLite, files `<data-dir>/images/sha256-<hex>` as before;
//! - on PostgreSQL, the tables `blobs` (digest, size, chunk size) and `blob_chunks` (digest,
//!   chunk number, at most [`CHUNK`] bytes of `bytea`), shared by every replica: a blob pushed
//!   through one is served by all.
//!
//! An upload is always streamed to a temporary file first (in the images directory, hashed on
//! the way, checked: `crate::images`); only a verified file is handed to [`BlobStore::put_file`].
//! On PostgreSQL it is copied in [`CHUNK`]-sized pieces inside one transaction that first
//! inserts the `blobs` row: a blob is visible only complete, and two replicas storing the same
//! digest at once serialize on that row (the second stores nothing). Reads stream one chunk at
//! a time from any offset (`Range: bytes=N-`), so neither direction holds a whole blob in
//! memory.

use std::path::{Path, PathBuf};

use axum::body::Body;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::HubError;

/// Bytes per stored chunk on PostgreSQL.
pub const CHUNK: usize = 1 << 20;

/// Where blobs live. See the module docs.
#[derive(Clone)]
pub enum BlobStore {
    /// Files in this directory (`<data-dir>/images`).
    Disk(PathBuf),
    /// The shared database; `upload_dir` holds uploads while they are checked.
    Pg { pool: PgPool, upload_dir: PathBuf },
}

/// A blob's bytes from an offset: its full length and a stream of the rest.
pub struct BlobRead {
    pub len: u64,
    pub body: Body,
}

/// A local file with a blob's content: the blob itself on disk, a temporary copy otherwise.
pub enum LocalBlob {
    Stored(PathBuf),
    Copy(tempfile::TempPath),
}

impl LocalBlob {
    pub fn path(&self) -> &Path {
        match self {
            LocalBlob::Stored(p) => p,
            LocalBlob::Copy(t) => t,
        }
    }
}

fn pg_err(e: sqlx::Error) -> HubError {
    HubError::from(super::StoreError::from(e))
}

fn io_err(what: &str, e: std::io::Error) -> HubError {
    HubError::Internal(format!("{what}: {e}"))
}

/// `sha256:<hex>` checked, as `<hex>`.
pub fn digest_hex(digest: &str) -> Result<&str, HubError> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| HubError::BadRequest(format!("{digest:?} is not a digest like sha256:<64 hex digits>")))
}

impl BlobStore {
    /// Where uploads are written while they are hashed and checked.
    pub fn upload_dir(&self) -> &Path {
        match self {
            BlobStore::Disk(d) => d,
            BlobStore::Pg { upload_dir, .. } => upload_dir,
        }
    }

    fn file(dir: &Path, digest: &str) -> Result<PathBuf, HubError> {
        Ok(dir.join(format!("sha256-{}", digest_hex(digest)?)))
    }

    /// The blob's size, None when it is not stored.
    pub async fn size(&self, digest: &str) -> Result<Option<u64>, HubError> {
        match self {
            BlobStore::Disk(d) => Ok(tokio::fs::metadata(Self::file(d, digest)?).await.ok().map(|m| m.len())),
            BlobStore::Pg { pool, .. } => {
                digest_hex(digest)?;
                let n: Option<i64> = sqlx::query_scalar("SELECT size FROM blobs WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(pool)
                    .await
                    .map_err(pg_err)?;
                Ok(n.map(|n| n as u64))
            }
        }
    }

    /// Keep a verified upload under `digest`. False when it was stored already (the upload is
    /// then dropped).
    pub async fn put_file(&self, digest: &str, tmp: tempfile::TempPath) -> Result<bool, HubError> {
        match self {
            BlobStore::Disk(d) => {
                let path = Self::file(d, digest)?;
                if path.exists() {
                    return Ok(false);
                }
                tmp.persist(&path).map_err(|e| crate::images::storage_error(e.error))?;
                Ok(true)
            }
            BlobStore::Pg { pool, .. } => {
                let mut tx = pool.begin().await.map_err(pg_err)?;
                let fresh = copy_file_in(&mut tx, digest, &tmp).await?;
                tx.commit().await.map_err(pg_err)?;
                Ok(fresh)
            }
        }
    }

    /// The blob from byte `from` on (0: all of it); None when it is not stored.
    pub async fn read(&self, digest: &str, from: u64) -> Result<Option<BlobRead>, HubError> {
        match self {
            BlobStore::Disk(d) => {
                let Ok(mut f) = tokio::fs::File::open(Self::file(d, digest)?).await else {
                    return Ok(None);
                };
                let len = f.metadata().await.map_err(|e| io_err("reading a blob", e))?.len();
                if from > 0 {
                    f.seek(std::io::SeekFrom::Start(from))
                        .await
                        .map_err(|e| io_err("reading a blob", e))?;
                }
                Ok(Some(BlobRead {
                    len,
                    body: Body::from_stream(tokio_util::io::ReaderStream::new(f)),
                }))
            }
            BlobStore::Pg { pool, .. } => {
                digest_hex(digest)?;
                let row: Option<(i64, i64)> = sqlx::query_as("SELECT size, chunk_size FROM blobs WHERE digest = $1")
                    .bind(digest)
                    .fetch_optional(pool)
                    .await
                    .map_err(pg_err)?;
                let Some((len, chunk)) = row else { return Ok(None) };
                let (len, chunk) = (len as u64, chunk.max(1) as u64);
                let state = (
                    pool.clone(),
                    digest.to_string(),
                    (from / chunk) as i64,
                    (from % chunk) as usize,
                    from < len,
                );
                let stream = futures_util::stream::unfold(state, |(pool, digest, n, skip, more)| async move {
                    if !more {
                        return None;
                    }
                    let data: Result<Option<Vec<u8>>, sqlx::Error> =
                        sqlx::query_scalar("SELECT data FROM blob_chunks WHERE digest = $1 AND n = $2")
                            .bind(&digest)
                            .bind(n)
                            .fetch_optional(&pool)
                            .await;
                    match data {
                        Ok(Some(mut d)) => {
                            let bytes = if skip > 0 { d.split_off(skip.min(d.len())) } else { d };
                            Some((Ok(axum::body::Bytes::from(bytes)), (pool, digest, n + 1, 0, true)))
                        }
                        Ok(None) => None,
                        Err(e) => Some((Err(std::io::Error::other(e)), (pool, digest, n, 0, false))),
                    }
                });
                Ok(Some(BlobRead {
                    len,
                    body: Body::from_stream(stream),
                }))
            }
        }
    }

    /// A local file with the blob's content (to check a model), None when it is not stored.
    pub async fn local(&self, digest: &str) -> Result<Option<LocalBlob>, HubError> {
        match self {
            BlobStore::Disk(d) => {
                let p = Self::file(d, digest)?;
                Ok(p.exists().then_some(LocalBlob::Stored(p)))
            }
            BlobStore::Pg { upload_dir, .. } => {
                let Some(r) = self.read(digest, 0).await? else {
                    return Ok(None);
                };
                tokio::fs::create_dir_all(upload_dir)
                    .await
                    .map_err(crate::images::storage_error)?;
                let tmp = tempfile::Builder::new()
                    .prefix(crate::images::UPLOAD_PREFIX)
                    .tempfile_in(upload_dir)
                    .map_err(crate::images::storage_error)?;
                let (file, path) = tmp.into_parts();
                let mut f = tokio::fs::File::from_std(file);
                let mut s = r.body.into_data_stream();
                use futures_util::StreamExt;
                use tokio::io::AsyncWriteExt;
                while let Some(c) = s.next().await {
                    let c = c.map_err(|e| HubError::Internal(format!("reading blob {digest}: {e}")))?;
                    f.write_all(&c).await.map_err(crate::images::storage_error)?;
                }
                f.flush().await.map_err(crate::images::storage_error)?;
                Ok(Some(LocalBlob::Copy(path)))
            }
        }
    }
}

/// Fill `buf` from `f` as far as it goes; the bytes read (less than `buf.len()` only at the end).
async fn read_full(f: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = f.read(&mut buf[got..]).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// Copy a verified file into `blobs`/`blob_chunks` inside the caller's transaction, in [`CHUNK`]
/// pieces. False when the digest is stored already (nothing is copied).
pub async fn copy_file_in(tx: &mut sqlx::PgConnection, digest: &str, path: &Path) -> Result<bool, HubError> {
    digest_hex(digest)?;
    let mut f = tokio::fs::File::open(path)
        .await
        .map_err(|e| io_err("reading the upload", e))?;
    let size = f.metadata().await.map_err(|e| io_err("reading the upload", e))?.len();
    let fresh = sqlx::query(
        "INSERT INTO blobs (digest, size, chunk_size, stored_at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (digest) DO NOTHING",
    )
    .bind(digest)
    .bind(size as i64)
    .bind(CHUNK as i64)
    .bind(outpost_api::now_ms())
    .execute(&mut *tx)
    .await
    .map_err(pg_err)?
    .rows_affected()
        > 0;
    if !fresh {
        return Ok(false);
    }
    let mut buf = vec![0u8; CHUNK];
    let mut n = 0i64;
    loop {
        let got = read_full(&mut f, &mut buf)
            .await
            .map_err(|e| io_err("reading the upload", e))?;
        if got == 0 {
            break;
        }
        sqlx::query("INSERT INTO blob_chunks (digest, n, data) VALUES ($1, $2, $3)")
            .bind(digest)
            .bind(n)
            .bind(&buf[..got])
            .execute(&mut *tx)
            .await
            .map_err(pg_err)?;
        n += 1;
    }
    Ok(true)
}
