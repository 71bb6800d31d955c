//! HTTPS transport: the TLS accept loop, per-connection HTTP/1.1 serving, the request
//! extractors (peer certificate, admin token, JSON bodies) and the route table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use outpost_api::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use serde::de::DeserializeOwned;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::error::HubError;
use crate::state::{sha256, HubState};
use crate::{api, images};

/// Who is on the other end of the connection: the SHA-256 of the client certificate, if one
/// was presented (it chains to the hub CA; whether the hub knows it is checked per route).
#[derive(Clone, Debug, Default)]
pub struct Peer {
    pub cert_fp: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Peer>().cloned().unwrap_or_default())
    }
}

/// Proof that the request carries the admin token.
pub struct Admin;

impl FromRequestParts<Arc<HubState>> for Admin {
    type Rejection = HubError;
    async fn from_request_parts(parts: &mut Parts, st: &Arc<HubState>) -> Result<Self, HubError> {
        let given = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // Comparing digests keeps the comparison independent of where the strings differ.
        match given {
            Some(t) if sha256(t) == st.admin_token_sha256 => Ok(Admin),
            _ => Err(HubError::Unauthorized),
        }
    }
}

/// `axum::Json` whose rejection is a [`HubError`] (so it gets an `ApiError` body).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HubError;
    async fn from_request(req: Request, st: &S) -> Result<Self, HubError> {
        match axum::Json::<T>::from_request(req, st).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(HubError::BadRequest(format!(
                "the request body is not what this route expects ({}); check that client and hub are the same release",
                e.body_text()
            ))),
        }
    }
}

/// `axum::extract::Query` whose rejection is a [`HubError`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = HubError;
    async fn from_request_parts(parts: &mut Parts, st: &S) -> Result<Self, HubError> {
        match axum::extract::Query::<T>::from_request_parts(parts, st).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(HubError::BadRequest(format!("invalid query string: {}", e.body_text()))),
        }
    }
}

async fn check_protocol(req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get(PROTOCOL_HEADER) {
        let text = v.to_str().unwrap_or("").trim().to_string();
        let major = text.split('.').next().and_then(|m| m.parse::<u32>().ok());
        if !matches!(major, Some(m) if m <= PROTOCOL_VERSION) {
            return HubError::ProtocolVersion { got: text }.into_response();
        }
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let resp = next.run(req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    resp
}

async fn no_route(req: Request) -> HubError {
    HubError::NotFound(format!("route {} {}", req.method(), req.uri().path()))
}

async fn wrong_method() -> HubError {
    HubError::BadRequest("this route does not accept that HTTP method; see docs/protocol.md".into())
}

/// The route table of docs/protocol.md.
pub fn router(state: Arc<HubState>) -> Router {
    Router::new()
        .route("/v1/ca", get(api::ca))
        .route("/v1/join", post(api::join))
        .route("/v1/nodes/{node}/sync", get(api::sync))
        .route("/v1/nodes/{node}/status", post(api::status))
        .route("/v1/nodes/{node}/renew", post(api::renew))
        // monitoring, alerts and logs (docs/alerts.md)
        .route("/v1/nodes/{node}/errors", post(crate::logs::node_errors))
        .route("/v1/nodes/{node}/logs/{id}", post(crate::logs::node_logs))
        .route("/v1/logs", get(crate::logs::get_logs))
        .route("/v1/errors", get(crate::logs::get_errors))
        .route("/v1/alerts", get(crate::alerts::get_alerts))
        // edge data pipeline (docs/pipeline.md)
        .route("/v1/nodes/{node}/data", post(crate::data::node_data))
        .route("/v1/data", get(crate::data::get_data))
        .route("/v1/pipelines", get(crate::data::get_pipelines))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/tokens", post(api::create_token))
        .route("/v1/apply", post(api::apply))
        .route("/v1/delete", post(api::delete))
        .route(
            "/v1/objects/{kind}/{namespace}/{name}",
            get(api::get_object).delete(api::delete_object),
        )
        .route("/v1/objects/{kind}/{namespace}/{name}/revisions", get(api::revisions))
        .route("/v1/objects/{kind}/{namespace}/{name}/undo", post(api::undo))
        .route(
            "/v1/images/blobs/{digest}",
            get(images::get_blob)
                .head(images::head_blob)
                .put(images::put_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/tags", get(images::get_tags).post(images::put_tag))
        .route("/v1/workloads", get(api::workloads))
        .route("/v1/nodes", get(api::nodes))
        .route("/v1/nodes/{node}", get(api::node).delete(api::delete_node))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn(check_protocol))
        .layer(middleware::from_fn_with_state(state.clone(), crate::metrics::track))
        .layer(DefaultBodyLimit::max(16 << 20))
        .with_state(state)
}

/// Accept TLS connections until `shutdown` flips, then give open connections a moment to
/// finish and drop the rest.
pub async fn serve(listener: TcpListener, tls: TlsAcceptor, router: Router, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => {
                    conns.spawn(serve_conn(tcp, remote, tls.clone(), router.clone(), shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(2), drain).await.is_err() {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    tracing::info!("hub stopped");
}

async fn serve_conn(
    tcp: TcpStream,
    remote: SocketAddr,
    tls: TlsAcceptor,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    let stream = match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%remote, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%remote, "TLS handshake timed out");
            return;
        }
    };
    let cert_fp = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| outpost_pki::fingerprint(c.as_ref()));
    let peer = Peer { cert_fp };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        router.clone().oneshot(req)
    });
    // HTTP/2 when the client offers it (agents do: the long-poll and status reports then share
    // one connection), HTTP/1.1 otherwise.
    let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
        }
    }
}
