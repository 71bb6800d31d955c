//! GitOps routes (docs/gitops.md, docs/openapi.yaml): thin handlers over the [`Service`]. The
//! webhook route takes no token: it is authorized by the GitRepo's shared secret
//! (`crate::gitops::webhook_authorized`), and audited as `webhook:gitrepo/<namespace>/<name>`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use serde::Deserialize;

use crate::error::HubError;
use crate::extract::{ApiQuery, Caller, Peer};
use crate::service::{Command, Query, Reply, Service};

type St = State<Arc<Service>>;
type Answer = Result<Reply, HubError>;

#[derive(Debug, Default, Deserialize)]
pub struct NsQuery {
    /// The GitRepo's namespace (default `default`).
    #[serde(default)]
    pub namespace: Option<String>,
    /// `diff` only: the commit to compare (default: the last fetched).
    #[serde(default)]
    pub commit: Option<String>,
}

impl NsQuery {
    fn ns(&self) -> String {
        self.namespace.clone().unwrap_or_else(|| "default".into())
    }
}

pub async fn list(State(svc): St, c: Caller) -> Answer {
    svc.query_as(&c, Query::GitRepos { only: None }).await
}

pub async fn one(State(svc): St, c: Caller, Path(name): Path<String>, ApiQuery(q): ApiQuery<NsQuery>) -> Answer {
    let r = svc
        .query_as(
            &c,
            Query::GitRepos {
                only: Some((q.ns(), name)),
            },
        )
        .await?;
    match r {
        Reply::GitRepos(mut v) if v.len() == 1 => Ok(Reply::GitRepo(Box::new(v.remove(0)))),
        other => Ok(other),
    }
}

pub async fn sync(State(svc): St, c: Caller, Path(name): Path<String>, ApiQuery(q): ApiQuery<NsQuery>) -> Answer {
    svc.execute_as(
        &c,
        Command::GitOpsSync {
            namespace: q.ns(),
            name,
        },
    )
    .await
}

pub async fn diff(State(svc): St, c: Caller, Path(name): Path<String>, ApiQuery(q): ApiQuery<NsQuery>) -> Answer {
    if let Some(c) = &q.commit {
        if c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(HubError::BadRequest(format!(
                "commit {c:?} is not a commit id (hex digits, abbreviated or full)"
            )));
        }
    }
    svc.query_as(
        &c,
        Query::GitDiff {
            namespace: q.ns(),
            name,
            commit: q.commit.clone(),
        },
    )
    .await
}

/// `POST /v1/gitops/{name}/webhook`: a push notification from the Git host.
pub async fn webhook(
    State(svc): St,
    peer: Peer,
    Path(name): Path<String>,
    ApiQuery(q): ApiQuery<NsQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let ns = q.ns();
    let (g, objects) = crate::gitops::repo(&svc, &ns, &name).await?;
    let Some(secret) = crate::gitops::webhook_secret(&g, &objects) else {
        return Err(HubError::NotAllowed(format!(
            "gitrepo/{ns}/{name} has no webhook secret: set spec.webhook.secretRef to a Secret with a `token` key"
        )));
    };
    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    if !crate::gitops::webhook_authorized(&secret, h("x-hub-signature-256"), h("x-outpost-token"), &body) {
        tracing::warn!(gitrepo = %format!("{ns}/{name}"), "webhook refused: wrong or missing signature");
        return Err(HubError::NotAllowed(
            "the webhook carries no valid X-Hub-Signature-256 (HMAC-SHA256 of the body with the shared secret) or X-Outpost-Token; check the secret configured at the Git host".into(),
        ));
    }
    tracing::info!(gitrepo = %format!("{ns}/{name}"), "webhook: fetching now");
    let who = Caller::system(format!("webhook:gitrepo/{ns}/{name}"), peer.remote);
    svc.execute_as(&who, Command::GitOpsSync { namespace: ns, name }).await
}
