//! ONNX models delivered through the hub (docs/inference.md): `outpost model push FILE --name
//! digits:v2`.
//!
//! Models share the image blob store ([`crate::images`]): uploaded by content
//! (`PUT /v1/models/blobs/{digest}`, streamed to a temporary file and hashed on the way), stored
//! with them (`crate::store::blobs`: files in `<data-dir>/images` or chunks in PostgreSQL), downloaded by nodes with `GET /v1/images/blobs/{digest}`
//! and `Range` to resume. A model upload is also checked to be an ONNX model
//! ([`outpost_api::onnx::check_onnx`], streaming, constant memory) before it is kept: a corrupt
//! or non-ONNX file is refused with the reason and nothing is stored. Names live in the image
//! tag table under `model/<name:tag>`. The hub never deletes a blob, so the model of any
//! revision a node may roll back to stays available.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::Response;
use outpost_api::ImageTag;

use crate::error::HubError;
use outpost_core::access::{Action, Target};

use crate::extract::{ApiJson, ApiQuery, Caller, MaybeCaller, Peer};
use crate::images::TagQuery;
use crate::service::{Command, Query, Reply, Service};

type St = State<Arc<Service>>;

/// Model tags are stored as image tags with this prefix.
pub const TAG_PREFIX: &str = "model/";

fn onnx_check(path: &std::path::Path) -> Result<(), HubError> {
    let f = std::fs::File::open(path).map_err(|e| HubError::Internal(format!("reading the model upload: {e}")))?;
    outpost_api::onnx::check_onnx(std::io::BufReader::with_capacity(1 << 16, f))
        .map(|_| ())
        .map_err(|e| HubError::BadRequest(format!("the upload is not an ONNX model: {e}; nothing was stored")))
}

/// `PUT /v1/models/blobs/{digest}` (admin): store a model, refusing a file that is not ONNX.
pub async fn put_blob(
    State(svc): St,
    c: Caller,
    Path(digest): Path<String>,
    req: Request,
) -> Result<Response, HubError> {
    crate::images::audited_upload(&svc, &c, "model push", &digest, req, onnx_check).await
}

/// `POST /v1/models/tags` (admin): name a stored model (`{"name": "digits:v2", "digest": ...}`).
pub async fn put_tag(State(svc): St, c: Caller, ApiJson(mut t): ApiJson<ImageTag>) -> Result<Reply, HubError> {
    c.require(Action::PushImage, Target::Fleet)?;
    let Some(local) = svc.blobs.local(&t.digest).await? else {
        return Err(HubError::BadRequest(format!(
            "no model {} on the hub: upload it first (`outpost model push`)",
            t.digest
        )));
    };
    tokio::task::spawn_blocking(move || onnx_check(local.path()))
        .await
        .map_err(|e| HubError::Internal(e.to_string()))??;
    let name = t.name.clone();
    t.name = format!("{TAG_PREFIX}{name}");
    match svc.execute_as(&c, Command::TagImage(t)).await? {
        Reply::Image(mut t) => {
            t.name = name;
            Ok(Reply::Image(t))
        }
        other => Ok(other),
    }
}

/// `GET /v1/models/tags?name=digits:v2` (admin or node): the digest a model name points at;
/// without `name`, every model (admin).
pub async fn get_tags(
    State(svc): St,
    peer: Peer,
    MaybeCaller(caller): MaybeCaller,
    ApiQuery(q): ApiQuery<TagQuery>,
) -> Result<Reply, HubError> {
    let who = svc.image_reader(caller.as_ref(), &peer).await?;
    match q.name {
        Some(name) => match svc
            .query(Query::ImageTag {
                name: format!("{TAG_PREFIX}{name}"),
            })
            .await
        {
            Ok(Reply::Image(mut t)) => {
                t.name = name;
                Ok(Reply::Image(t))
            }
            Err(HubError::NotFound(_)) => Err(HubError::NotFound(format!(
                "model {name} (push it with `outpost model push FILE --name {name}`)"
            ))),
            other => other,
        },
        None if who == crate::service::ImageReader::Admin => match svc.query(Query::ImageTags).await? {
            Reply::Images(all) => Ok(Reply::Images(
                all.into_iter()
                    .filter_map(|mut t| {
                        t.name = t.name.strip_prefix(TAG_PREFIX)?.to_string();
                        Some(t)
                    })
                    .collect(),
            )),
            other => Ok(other),
        },
        None => Err(HubError::NotAllowed(
            "a node may only ask for one model (?name=NAME:TAG); listing every model needs an account token".into(),
        )),
    }
}
