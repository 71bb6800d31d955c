//! Request extractors of the HTTP layer: the caller's certificate ([`Peer`], put into each
//! request by `crate::server`), the operator ([`Caller`]: an account or admin token, or a
//! session cookie with its CSRF token on mutating requests; docs/accounts.md), and JSON bodies
//! and query strings whose rejections are [`HubError`]s (so they get an `ApiError` body).

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::Method;
use serde::de::DeserializeOwned;

use crate::error::HubError;
use crate::service::Service;

pub use crate::service::Peer;

/// Largest request body (JSON routes; image uploads are streamed and unlimited).
pub const BODY_LIMIT: usize = 16 << 20;

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Infallible> {
        Ok(parts.extensions.get::<Peer>().cloned().unwrap_or_default())
    }
}

/// The bearer token of a request, if any.
pub fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

pub use crate::accounts::Caller;

/// The caller of a request that carries credentials; None when it carries none (a bearer
/// token wins over a session cookie).
async fn caller(parts: &Parts, svc: &Service) -> Option<Result<Caller, HubError>> {
    let remote = parts.extensions.get::<Peer>().and_then(|p| p.remote);
    if let Some(t) = bearer(parts) {
        return Some(svc.caller_for_token(t, remote).await);
    }
    let id = crate::session::cookie(&parts.headers)?;
    let mutating = !matches!(parts.method, Method::GET | Method::HEAD);
    let csrf = parts
        .headers
        .get(outpost_api::accounts::CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    Some(svc.caller_for_session(&id, csrf, mutating, remote).await)
}

/// Every operator route takes a [`Caller`] and checks it (`Caller::require`, or through
/// `Service::execute_as` / `Service::query_as`).
impl FromRequestParts<Arc<Service>> for Caller {
    type Rejection = HubError;
    async fn from_request_parts(parts: &mut Parts, svc: &Arc<Service>) -> Result<Self, HubError> {
        caller(parts, svc).await.unwrap_or(Err(HubError::Unauthorized))
    }
}

/// A caller if the request carries credentials (image routes also let nodes in by their
/// certificate); wrong credentials are refused all the same.
pub struct MaybeCaller(pub Option<Caller>);

impl FromRequestParts<Arc<Service>> for MaybeCaller {
    type Rejection = HubError;
    async fn from_request_parts(parts: &mut Parts, svc: &Arc<Service>) -> Result<Self, HubError> {
        caller(parts, svc).await.transpose().map(MaybeCaller)
    }
}

/// `axum::Json` whose rejection is a [`HubError`] (so it gets an `ApiError` body). A body sent
/// with `Content-Encoding: zstd` (agents compress their larger status reports, protocol 1.4)
/// is decompressed first, to at most [`BODY_LIMIT`] bytes.
pub struct ApiJson<T>(pub T);

fn is_zstd(req: &Request) -> bool {
    req.headers()
        .get(axum::http::header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("zstd"))
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = HubError;
    async fn from_request(req: Request, st: &S) -> Result<Self, HubError> {
        if is_zstd(&req) {
            let body = axum::body::to_bytes(req.into_body(), BODY_LIMIT)
                .await
                .map_err(|_| HubError::PayloadTooLarge { limit: BODY_LIMIT })?;
            let json = zstd::bulk::decompress(&body, BODY_LIMIT).map_err(|e| {
                HubError::BadRequest(format!(
                    "the body is not zstd data of at most {BODY_LIMIT} bytes ({e}); send it uncompressed"
                ))
            })?;
            return serde_json::from_slice(&json).map(ApiJson).map_err(|e| {
                HubError::BadRequest(format!(
                    "the request body is not what this route expects ({e}); check that client and hub are the same release"
                ))
            });
        }
        match axum::Json::<T>::from_request(req, st).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(match e.status() {
                axum::http::StatusCode::PAYLOAD_TOO_LARGE => HubError::PayloadTooLarge { limit: BODY_LIMIT },
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => HubError::BadRequest(
                    "the request body must be JSON: send `Content-Type: application/json`".into(),
                ),
                _ => HubError::BadRequest(format!(
                    "the request body is not what this route expects ({}); check that client and hub are the same release",
                    e.body_text()
                )),
            }),
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
