//! Remote exec routes (docs/exec.md, docs/openapi.yaml): thin handlers over the [`Service`] and
//! the relay in `crate::exec`. Operator routes take a [`Caller`] allowed to exec on the node
//! (operators and admins within their scope; a node shell is for admins); node routes are mTLS.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::header::CONTENT_TYPE;
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use outpost_api::exec::{ExecStart, Frame, FrameDecoder, EXEC_MEDIA_TYPE, EXEC_SESSION_HEADER};

use crate::error::HubError;
use crate::extract::{ApiJson, Caller, Peer};
use crate::service::Service;

type St = State<Arc<Service>>;

/// Who opened a session (only they may send it input).
fn owner(c: &Caller) -> String {
    c.name.clone()
}

/// `POST /v1/nodes/{node}/exec`: run a command on the node; the answer's body is the output
/// frame stream, its `x-outpost-exec-session` header the session for input.
pub async fn open(
    State(svc): St,
    c: Caller,
    Path(node): Path<String>,
    ApiJson(start): ApiJson<ExecStart>,
) -> Result<Response, HubError> {
    let (id, opened, deadline) = svc.exec(&c, &node, &owner(&c), start).await?;
    let body = Body::from_stream(crate::exec::output_stream(opened, deadline));
    Response::builder()
        .header(CONTENT_TYPE, EXEC_MEDIA_TYPE)
        .header(EXEC_SESSION_HEADER, id)
        .body(body)
        .map_err(|e| HubError::Internal(e.to_string()))
}

/// `POST /v1/exec/{id}/input`: input frames (stdin bytes, end of input, terminal size) for an
/// open session, from the operator who opened it.
pub async fn input(
    State(svc): St,
    c: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, HubError> {
    c.require_role(outpost_core::access::Action::Exec)?;
    let mut dec = FrameDecoder::default();
    dec.push(&body);
    let mut frames = Vec::new();
    while let Some(f) = dec.next_frame().map_err(|e| HubError::BadRequest(e.to_string()))? {
        if matches!(f, Frame::Stdout(_) | Frame::Stderr(_) | Frame::Exit(_)) {
            return Err(HubError::BadRequest(
                "input carries stdin, end-of-input and resize frames only".into(),
            ));
        }
        frames.push(f);
    }
    if dec.pending() > 0 {
        return Err(HubError::BadRequest(format!(
            "the body ends inside a frame ({} bytes left over)",
            dec.pending()
        )));
    }
    if let Some(shared) = svc.store.shared() {
        // Replicas: the session may be served by another replica; its input goes through the store.
        return match crate::exec::remote::send_input(
            &svc.links.exec,
            shared,
            &owner(&c),
            &id,
            &frames,
            std::time::Duration::from_secs(30),
        )
        .await?
        {
            Ok(()) => Ok(Json(serde_json::json!({}))),
            Err(crate::exec::SessionError::Stalled) => Err(HubError::Conflict(format!(
                "exec session {id}: the node has not read the input sent before; send more once it has"
            ))),
            Err(_) => Err(HubError::NotFound(format!(
                "exec session {id} (ended, or opened by someone else)"
            ))),
        };
    }
    let tx = svc
        .links
        .exec
        .input(&owner(&c), &id)
        .map_err(|_| HubError::NotFound(format!("exec session {id} (ended, or opened by someone else)")))?;
    for f in frames {
        tx.send(f)
            .await
            .map_err(|_| HubError::NotFound(format!("exec session {id} (ended)")))?;
    }
    Ok(Json(serde_json::json!({})))
}

/// `POST /v1/nodes/{node}/exec/{id}/output` (mTLS): the node's output frames, streamed while the
/// command runs; ends with the Exit frame.
pub async fn node_output(
    State(svc): St,
    peer: Peer,
    Path((node, id)): Path<(String, String)>,
    body: Body,
) -> Result<Json<serde_json::Value>, HubError> {
    let tx = svc.exec_output(&peer, &node, &id).await?;
    let mut stream = body.into_data_stream();
    let mut dec = FrameDecoder::default();
    while let Some(Ok(chunk)) = stream.next().await {
        dec.push(&chunk);
        while let Some(f) = dec.next_frame().map_err(|e| HubError::BadRequest(e.to_string()))? {
            if matches!(f, Frame::Stdin(_) | Frame::StdinEof | Frame::Resize { .. }) {
                return Err(HubError::BadRequest(
                    "output carries stdout, stderr and exit frames only".into(),
                ));
            }
            let exit = matches!(f, Frame::Exit(_));
            // The operator stopped reading: the session is over (the node's input ends too).
            if tx.send(f).await.is_err() || exit {
                return Ok(Json(serde_json::json!({})));
            }
        }
    }
    // Cut short: the operator's stream says the link dropped.
    Ok(Json(serde_json::json!({})))
}

/// `GET /v1/nodes/{node}/exec/{id}/input` (mTLS): the operator's input frames; the stream ends
/// when the session does, and then the node ends the command.
pub async fn node_input(
    State(svc): St,
    peer: Peer,
    Path((node, id)): Path<(String, String)>,
) -> Result<Response, HubError> {
    let rx = svc.exec_input(&peer, &node, &id).await?;
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|f| (Ok::<_, Infallible>(f.encode()), rx))
    });
    Response::builder()
        .header(CONTENT_TYPE, EXEC_MEDIA_TYPE)
        .body(Body::from_stream(frames))
        .map_err(|e| HubError::Internal(e.to_string()))
}
