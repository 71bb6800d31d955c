//! Account, audit and session routes (docs/accounts.md, docs/openapi.yaml): thin handlers over
//! the [`Service`]; every change goes through `Service::execute_as` (checked and audited).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header::SET_COOKIE;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_api::accounts::{SessionRequest, SessionResponse, UserRequest, UserTokenRequest, WhoAmI};
use serde::Deserialize;

use crate::error::HubError;
use crate::extract::{ApiJson, ApiQuery, Caller, Peer};
use crate::service::{Command, Query, Reply, Service};

type St = State<Arc<Service>>;
type Answer = Result<Reply, HubError>;

/// A JSON object body as `T` (serde would also read `T` from an array of its fields).
fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, HubError> {
    if !v.is_object() {
        return Err(HubError::BadRequest("the request body must be a JSON object".into()));
    }
    serde_json::from_value(v)
        .map_err(|e| HubError::BadRequest(format!("the request body is not what this route expects ({e})")))
}

/// `GET /v1/users`.
pub async fn list(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::Users).await
}

/// `POST /v1/users`: add an account; the answer carries its first token (shown once).
pub async fn add(State(svc): St, c: Caller, ApiJson(req): ApiJson<serde_json::Value>) -> Answer {
    let req: UserRequest = object(req)?;
    svc.execute_as(&c, Command::AddUser(req)).await
}

/// `DELETE /v1/users/{name}`.
pub async fn remove(State(svc): St, c: Caller, Path(name): Path<String>) -> Answer {
    svc.execute_as(&c, Command::RemoveUser { name }).await
}

/// `POST /v1/users/{name}/tokens`: a new token (shown once).
pub async fn new_token(
    State(svc): St,
    c: Caller,
    Path(name): Path<String>,
    ApiJson(req): ApiJson<serde_json::Value>,
) -> Answer {
    let req: UserTokenRequest = object(req)?;
    svc.execute_as(
        &c,
        Command::NewUserToken {
            name,
            expires_secs: req.expires_secs,
        },
    )
    .await
}

/// `DELETE /v1/users/{name}/tokens`: revoke every token of the account.
pub async fn revoke_all(State(svc): St, c: Caller, Path(name): Path<String>) -> Answer {
    svc.execute_as(&c, Command::RevokeUserTokens { name, id: None }).await
}

/// `DELETE /v1/users/{name}/tokens/{id}`: revoke one token.
pub async fn revoke_one(State(svc): St, c: Caller, Path((name, id)): Path<(String, String)>) -> Answer {
    svc.execute_as(&c, Command::RevokeUserTokens { name, id: Some(id) })
        .await
}

#[derive(Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    since_secs: Option<u64>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

/// `GET /v1/audit[?since_secs=&user=&limit=]` (admin): oldest first.
pub async fn audit(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<AuditQuery>) -> Answer {
    svc.query_as(
        &c,
        Query::Audit {
            since_secs: q.since_secs,
            user: q.user,
            limit: q.limit,
        },
    )
    .await
}

/// `GET /v1/whoami`: the caller's account, role and scope.
pub async fn whoami(c: Caller) -> Json<WhoAmI> {
    Json(Service::whoami(&c))
}

/// `POST /v1/session`: log in with a password; sets the session cookie and answers with the
/// CSRF token.
pub async fn login(State(svc): St, peer: Peer, ApiJson(req): ApiJson<serde_json::Value>) -> Result<Response, HubError> {
    let req: SessionRequest = object(req)?;
    let (s, c) = svc.login(&req.user, &req.password, peer.remote).await?;
    let cookie = crate::session::set_cookie(&s.id, svc.sessions.limits().max);
    let body = SessionResponse {
        user: c.name.clone(),
        role: c.role.as_str().into(),
        selector: c.scope.to_string(),
        csrf_token: s.csrf,
        expires_at: s.expires_at,
    };
    Ok(([(SET_COOKIE, cookie)], Json(body)).into_response())
}

/// `DELETE /v1/session`: log out (the cookie's session ends; needs the CSRF token).
pub async fn logout(State(svc): St, c: Caller, headers: HeaderMap) -> Result<Response, HubError> {
    let Some(id) = crate::session::cookie(&headers).filter(|_| c.via == crate::accounts::Via::Session) else {
        return Err(HubError::BadRequest(
            "this request carries no session cookie; logging out ends a browser session".into(),
        ));
    };
    svc.logout(&c, &id).await;
    Ok((
        [(SET_COOKIE, crate::session::clear_cookie())],
        Json(serde_json::json!({"logged_out": c.name})),
    )
        .into_response())
}
