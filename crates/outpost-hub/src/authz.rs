//! The service's access layer (docs/accounts.md): who a request's credentials belong to, whether
//! that [`Caller`] may run a [`Command`] or [`Query`] (through `outpost_core::access`), what of
//! a read's answer its scope lets it see, the account commands, and the audit record of every
//! command. `Service::execute_as` and `Service::query_as` call in here; handlers never decide.
//!
//! Scoped callers: lists (nodes, workloads, rollouts, pipelines, alerts, errors, data) are
//! filtered to what is in scope; one object or node out of scope reads as not found (it does
//! not exist for this account); a change to something out of scope is refused (403).

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;

use outpost_api::accounts::{AuditEntry, RevokeResponse, UserRequest, WhoAmI, MIN_PASSWORD};
use outpost_api::{DeleteResponse, Kind, Object, ObjectId};
use outpost_core::access::{object_target, Action, Role, Scope, Target};

use outpost_core::render::workload_key;

use crate::accounts::{check_login, hash_password, Caller, UserRow, Via};
use crate::error::HubError;
use crate::service::{now_ms, sha256, Command, Query, Reply, Service};
use crate::validate;

/// How long ago `--since` may reach, and the most entries one audit read returns.
const AUDIT_LIMIT: u32 = 10_000;

/// The audit text of a command: (action, target, detail).
fn describe(cmd: &Command) -> (String, String, String) {
    let files = |files: &[outpost_api::ManifestFile]| -> String {
        match validate::parse_batch(files) {
            Ok((objects, _)) => objects
                .iter()
                .map(|o| workload_key(&o.id()))
                .collect::<Vec<_>>()
                .join(","),
            Err(_) => files.iter().map(|f| f.name.clone()).collect::<Vec<_>>().join(","),
        }
    };
    match cmd {
        Command::Apply { files: f, force } => (
            "apply".into(),
            files(f),
            if *force { "force".into() } else { String::new() },
        ),
        Command::GitOpsApply { owner, file } => {
            ("gitops apply".into(), files(std::slice::from_ref(file)), owner.clone())
        }
        Command::GitOpsSync { namespace, name } => (
            "gitops sync".into(),
            format!("gitrepo/{namespace}/{name}"),
            String::new(),
        ),
        Command::Delete { files: f } => ("delete".into(), files(f), String::new()),
        Command::DeleteObject { id } => ("delete".into(), workload_key(id), String::new()),
        Command::Undo { id, to_revision } => (
            "undo".into(),
            workload_key(id),
            to_revision.map(|r| format!("to revision {r}")).unwrap_or_default(),
        ),
        Command::CreateToken(r) => (
            "join-token create".into(),
            "join-token".into(),
            r.labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
        ),
        Command::DeleteNode { name } => ("node delete".into(), format!("node/{name}"), String::new()),
        Command::TagImage(t) => ("image tag".into(), t.name.clone(), t.digest.clone()),
        Command::Rollout { id, action } => (format!("rollout {}", action.as_str()), workload_key(id), String::new()),
        Command::AddUser(u) => (
            "user add".into(),
            format!("user/{}", u.name),
            format!("role={} selector={}", u.role, u.selector.clone().unwrap_or_default()),
        ),
        Command::RemoveUser { name } => ("user rm".into(), format!("user/{name}"), String::new()),
        Command::NewUserToken { name, .. } => ("user token".into(), format!("user/{name}"), String::new()),
        Command::RevokeUserTokens { name, id } => (
            "user revoke".into(),
            format!("user/{name}"),
            id.clone()
                .map(|i| format!("token {i}"))
                .unwrap_or_else(|| "every token".into()),
        ),
    }
}

impl Service {
    // -----------------------------------------------------------------------------------------
    // Authentication

    /// The caller a bearer token stands for: the first-start admin token, or an account token.
    pub async fn caller_for_token(&self, token: &str, remote: Option<SocketAddr>) -> Result<Caller, HubError> {
        if self.is_admin(token) {
            return Ok(Caller::admin(remote));
        }
        if !token.starts_with("opu_") {
            return Err(HubError::Unauthorized);
        }
        let found = self.accounts.authenticate(token, now_ms()).await?;
        match found {
            Ok(Some(u)) => Ok(Caller {
                name: u.name,
                role: u.role,
                scope: u.scope,
                via: Via::Token,
                remote,
            }),
            Ok(None) => Err(HubError::Unauthorized),
            Err(refusal) => Err(HubError::Credential(refusal.to_string())),
        }
    }

    /// The caller a session cookie stands for. A mutating request must carry the session's
    /// CSRF token (`X-CSRF-Token`).
    pub async fn caller_for_session(
        &self,
        id: &str,
        csrf: Option<&str>,
        mutating: bool,
        remote: Option<SocketAddr>,
    ) -> Result<Caller, HubError> {
        let (user, csrf_sha) = self
            .sessions
            .check(id, now_ms())
            .await
            .map_err(|e| HubError::Credential(e.to_string()))?;
        if mutating && csrf.map(sha256) != Some(csrf_sha) {
            return Err(HubError::NotAllowed(
                "this request comes with a session cookie but without its CSRF token: send the token the login returned in the X-CSRF-Token header".into(),
            ));
        }
        let Some(u) = self.account(&user).await? else {
            self.sessions.remove_user(&user).await;
            return Err(HubError::Credential(format!(
                "the account {user} of this session was removed; log in with another"
            )));
        };
        Ok(Caller {
            name: u.name,
            role: u.role,
            scope: u.scope,
            via: Via::Session,
            remote,
        })
    }

    async fn account(&self, name: &str) -> Result<Option<UserRow>, HubError> {
        Ok(self.accounts.user(name).await?)
    }

    // -----------------------------------------------------------------------------------------
    // Sessions

    /// `POST /v1/session`: check the password and start a session; audited either way.
    pub async fn login(
        &self,
        user: &str,
        password: &str,
        remote: Option<SocketAddr>,
    ) -> Result<(crate::session::NewSession, Caller), HubError> {
        let u = self.account(user).await?;
        let pw = password.to_string();
        let row = u.clone();
        let ok = tokio::task::spawn_blocking(move || check_login(row.as_ref(), &pw))
            .await
            .map_err(|e| HubError::Internal(format!("password check failed: {e}")))?;
        let caller = match (ok, u) {
            (true, Some(u)) if u.role != Role::Metrics => Caller {
                name: u.name,
                role: u.role,
                scope: u.scope,
                via: Via::Session,
                remote,
            },
            _ => {
                let who = Caller {
                    name: user.chars().take(64).collect(),
                    role: Role::Viewer,
                    scope: Scope::all(),
                    via: Via::Session,
                    remote,
                };
                let e = HubError::Credential(
                    "wrong user or password (accounts without a password, and metrics accounts, cannot log in)".into(),
                );
                self.audit(&who, "login", "session", "", Err(&e)).await;
                return Err(e);
            }
        };
        let s = self.sessions.create(&caller.name, now_ms()).await;
        self.audit(&caller, "login", "session", "", Ok(())).await;
        Ok((s, caller))
    }

    /// `DELETE /v1/session`.
    pub async fn logout(&self, caller: &Caller, id: &str) {
        self.sessions.remove(id).await;
        self.audit(caller, "logout", "session", "", Ok(())).await;
    }

    // -----------------------------------------------------------------------------------------
    // Audit

    /// Record one action in the audit log (exec and other routes outside [`Command`] call this
    /// too). A failure to record is logged, not returned: the action happened.
    pub async fn audit(
        &self,
        caller: &Caller,
        action: &str,
        target: &str,
        detail: &str,
        result: Result<(), &HubError>,
    ) {
        let e = AuditEntry {
            seq: 0,
            at: now_ms(),
            user: caller.name.clone(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
            peer: caller.remote_text(),
            result: match result {
                Ok(()) => "ok".into(),
                Err(HubError::NotAllowed(m)) | Err(HubError::Credential(m)) => format!("denied: {m}"),
                Err(e) => format!("failed: {e}"),
            },
        };
        tracing::info!(user = %e.user, action = %e.action, target = %e.target, peer = %e.peer, result = %e.result, "audit");
        if let Err(err) = self.accounts.record(&e).await {
            tracing::error!(error = %err, "cannot write the audit log");
        }
    }

    // -----------------------------------------------------------------------------------------
    // Commands and queries for a caller

    /// Run a command for `caller`: check it may, run it, record it in the audit log.
    pub async fn execute_as(&self, caller: &Caller, cmd: Command) -> Result<Reply, HubError> {
        let (action, target, detail) = describe(&cmd);
        let r = match self.authorize(caller, &cmd).await {
            Ok(()) => self.run(caller, cmd).await,
            Err(e) => Err(e),
        };
        self.audit(caller, &action, &target, &detail, r.as_ref().map(|_| ()))
            .await;
        r
    }

    /// Run a query for `caller`: check its role, run it, keep what its scope lets it see.
    pub async fn query_as(&self, caller: &Caller, q: Query) -> Result<Reply, HubError> {
        match &q {
            Query::Fleet => caller.require(Action::Metrics, Target::Fleet)?,
            Query::Users => caller.require(Action::ManageUsers, Target::Fleet)?,
            Query::Audit { .. } => caller.require(Action::ReadAudit, Target::Fleet)?,
            Query::Logs { node, .. } => {
                caller.require_role(Action::Logs)?;
                self.visible_node(caller, node).await?;
            }
            Query::Object { id } | Query::Revisions { id } | Query::Rollout { id } => {
                caller.require_role(Action::Read)?;
                if id.kind == Kind::Secret && !caller.role.allows(Action::Apply) {
                    return Err(HubError::NotAllowed(format!(
                        "{}: role {} may not read Secrets (that needs role operator or higher)",
                        caller.name, caller.role
                    )));
                }
                self.visible_object(caller, id).await?;
            }
            Query::Node { name } => {
                caller.require_role(Action::Read)?;
                self.visible_node(caller, name).await?;
            }
            Query::GitRepos { only: Some(_) } | Query::GitDiff { .. } => caller.require(Action::Read, Target::Fleet)?,
            _ => caller.require_role(Action::Read)?,
        }
        if let Query::GitRepos { only: None } = &q {
            if !caller.scope.is_all() {
                return Ok(Reply::GitRepos(Vec::new()));
            }
        }
        if caller.scope.is_all() {
            return self.query(q).await;
        }
        let r = match q {
            Query::Errors { node: None, .. } | Query::Data(crate::data::DataQuery { node: None, .. }) => {
                self.per_node(caller, q).await?
            }
            q => self.query(q).await?,
        };
        self.filter(caller, r).await
    }

    /// A limited list (`/v1/errors`, `/v1/data`) of every node a scoped caller sees: asked of
    /// each node in scope and merged, so the limit counts only rows the caller may see (asking
    /// all nodes and filtering after would hand back fewer than the limit).
    async fn per_node(&self, caller: &Caller, q: Query) -> Result<Reply, HubError> {
        let mut nodes: Vec<String> = self.nodes_in_scope(caller).await?.into_iter().collect();
        nodes.sort();
        match q {
            Query::Errors {
                workload,
                since_secs,
                limit,
                ..
            } => {
                let mut all = Vec::new();
                for n in nodes {
                    let one = Query::Errors {
                        node: Some(n),
                        workload: workload.clone(),
                        since_secs,
                        limit,
                    };
                    if let Reply::Errors(v) = self.query(one).await? {
                        all.extend(v);
                    }
                }
                // the store's order: oldest first by time, then node (descending), then sequence
                all.sort_by(|a, b| {
                    (a.line.at, std::cmp::Reverse(&a.node), a.line.seq).cmp(&(
                        b.line.at,
                        std::cmp::Reverse(&b.node),
                        b.line.seq,
                    ))
                });
                let keep = limit.unwrap_or(1000).min(10_000) as usize;
                let cut = all.len().saturating_sub(keep);
                Ok(Reply::Errors(all.split_off(cut)))
            }
            Query::Data(dq) => {
                let mut all = Vec::new();
                for n in nodes {
                    let one = crate::data::DataQuery {
                        node: Some(n),
                        ..dq.clone()
                    };
                    if let Reply::Records(v) = self.query(Query::Data(one)).await? {
                        all.extend(v);
                    }
                }
                all.sort_by_key(|r| r.cursor);
                let keep = dq.limit.unwrap_or(100).clamp(1, 10_000) as usize;
                if dq.after.is_some() {
                    // following: the oldest after the cursor
                    all.truncate(keep);
                } else {
                    let cut = all.len().saturating_sub(keep);
                    all = all.split_off(cut);
                }
                Ok(Reply::Records(all))
            }
            q => self.query(q).await,
        }
    }

    /// `GET /v1/whoami`.
    pub fn whoami(caller: &Caller) -> WhoAmI {
        WhoAmI {
            user: caller.name.clone(),
            role: caller.role.as_str().into(),
            selector: caller.scope.to_string(),
        }
    }

    /// A node out of the caller's scope reads as not found; an unknown node passes (the query
    /// answers not found itself).
    async fn visible_node(&self, caller: &Caller, name: &str) -> Result<(), HubError> {
        if caller.scope.is_all() {
            return Ok(());
        }
        let n = name.to_string();
        match self.store.node(&n).await? {
            Some(row) if !caller.sees_node(&row.labels) => Err(HubError::NotFound(format!("node {name}"))),
            _ => Ok(()),
        }
    }

    /// An object out of the caller's scope reads as not found.
    async fn visible_object(&self, caller: &Caller, id: &ObjectId) -> Result<(), HubError> {
        if caller.scope.is_all() {
            return Ok(());
        }
        let lookup = id.clone();
        match self.store.object(&lookup).await? {
            Some(o) if caller.require(Action::Read, object_target(&o.object)).is_err() => {
                Err(HubError::NotFound(id.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Names of the nodes in the caller's scope.
    async fn nodes_in_scope(&self, caller: &Caller) -> Result<HashSet<String>, HubError> {
        let nodes = self.store.nodes().await?;
        Ok(nodes
            .into_iter()
            .filter(|n| caller.sees_node(&n.labels))
            .map(|n| n.name)
            .collect())
    }

    /// Keep what a scoped caller may see of a list.
    async fn filter(&self, caller: &Caller, r: Reply) -> Result<Reply, HubError> {
        Ok(match r {
            Reply::Nodes(v) => Reply::Nodes(v.into_iter().filter(|n| caller.sees_node(&n.labels)).collect()),
            Reply::Workloads(v) => Reply::Workloads(
                v.into_iter()
                    .filter(|w| caller.sees_selector(&w.node_selector))
                    .collect(),
            ),
            Reply::Pipelines(v) => Reply::Pipelines(
                v.into_iter()
                    .filter(|p| caller.sees_selector(&p.node_selector))
                    .collect(),
            ),
            Reply::Rollouts(v) => {
                let objects = self.store.objects().await?;
                let visible: BTreeSet<String> = objects
                    .iter()
                    .filter(|o| caller.require(Action::Read, object_target(&o.object)).is_ok())
                    .map(|o| workload_key(&o.object.id()))
                    .collect();
                Reply::Rollouts(v.into_iter().filter(|r| visible.contains(&r.workload)).collect())
            }
            Reply::Alerts(v) => {
                let nodes = self.nodes_in_scope(caller).await?;
                Reply::Alerts(v.into_iter().filter(|a| nodes.contains(&a.node)).collect())
            }
            Reply::Errors(v) => {
                let nodes = self.nodes_in_scope(caller).await?;
                Reply::Errors(v.into_iter().filter(|e| nodes.contains(&e.node)).collect())
            }
            Reply::Records(v) => {
                let nodes = self.nodes_in_scope(caller).await?;
                Reply::Records(v.into_iter().filter(|e| nodes.contains(&e.node)).collect())
            }
            other => other,
        })
    }

    /// May `caller` run `cmd`? Role first, then the scope against every object or node it
    /// touches (for a change of a stored object: its stored version and its new one).
    async fn authorize(&self, caller: &Caller, cmd: &Command) -> Result<(), HubError> {
        let fleet = |a| caller.require(a, Target::Fleet);
        match cmd {
            Command::Apply { files, .. } => {
                caller.require_role(Action::Apply)?;
                self.authorize_objects(caller, Action::Apply, files).await
            }
            Command::Delete { files } => {
                caller.require_role(Action::Delete)?;
                self.authorize_objects(caller, Action::Delete, files).await
            }
            Command::DeleteObject { id } => self.authorize_stored(caller, Action::Delete, id).await,
            Command::Undo { id, .. } | Command::Rollout { id, .. } => {
                self.authorize_stored(caller, Action::Rollout, id).await
            }
            Command::GitOpsApply { .. } => {
                if caller.via == Via::Hub {
                    Ok(())
                } else {
                    Err(HubError::NotAllowed(
                        "only the hub's GitOps controller applies a GitRepo's commit".into(),
                    ))
                }
            }
            Command::GitOpsSync { .. } => fleet(Action::GitOpsSync),
            Command::CreateToken(_) => fleet(Action::JoinToken),
            Command::TagImage(_) => fleet(Action::PushImage),
            Command::DeleteNode { name } => {
                caller.require_role(Action::DeleteNode)?;
                let n = name.clone();
                match self.store.node(&n).await? {
                    Some(row) => caller.require_node(Action::DeleteNode, &row.labels),
                    None => fleet(Action::DeleteNode),
                }
            }
            Command::AddUser(_)
            | Command::RemoveUser { .. }
            | Command::NewUserToken { .. }
            | Command::RevokeUserTokens { .. } => fleet(Action::ManageUsers),
        }
    }

    async fn authorize_stored(&self, caller: &Caller, action: Action, id: &ObjectId) -> Result<(), HubError> {
        caller.require_role(action)?;
        if caller.scope.is_all() {
            return Ok(());
        }
        let lookup = id.clone();
        match self.store.object(&lookup).await? {
            Some(o) => caller.require(action, object_target(&o.object)),
            // Nothing to touch: the command answers not found.
            None => Ok(()),
        }
    }

    async fn authorize_objects(
        &self,
        caller: &Caller,
        action: Action,
        files: &[outpost_api::ManifestFile],
    ) -> Result<(), HubError> {
        if caller.scope.is_all() {
            return Ok(());
        }
        // Invalid manifests pass here: the command refuses them with its own messages.
        let Ok((objects, _)) = validate::parse_batch(files) else {
            return Ok(());
        };
        let ids: Vec<ObjectId> = objects.iter().map(Object::id).collect();
        let mut stored = Vec::with_capacity(ids.len());
        for id in &ids {
            stored.push(self.store.object(id).await?);
        }
        for (o, old) in objects.iter().zip(stored) {
            caller
                .require(action, object_target(o))
                .map_err(|e| HubError::NotAllowed(format!("{}: {e}", o.id())))?;
            if let Some(old) = old {
                caller
                    .require(action, object_target(&old.object))
                    .map_err(|e| HubError::NotAllowed(format!("{} as stored: {e}", o.id())))?;
            }
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Account commands

    pub(crate) async fn add_user(&self, req: UserRequest) -> Result<Reply, HubError> {
        outpost_api::accounts::check_user_name(&req.name)
            .map_err(|why| HubError::BadRequest(format!("name: {:?} {why}", req.name)))?;
        let role = Role::parse(&req.role).ok_or_else(|| {
            HubError::BadRequest(format!(
                "role: {:?} is not a role; use admin, operator, viewer or metrics",
                req.role
            ))
        })?;
        let scope = Scope::parse(req.selector.as_deref().unwrap_or(""))
            .map_err(|e| HubError::BadRequest(format!("selector: {e}; write it as key=value[,key=value...]")))?;
        let password = match req.password.as_deref() {
            Some(p) if p.chars().count() < MIN_PASSWORD => {
                return Err(HubError::BadRequest(format!(
                    "password: it has {} characters, at least {MIN_PASSWORD} are needed",
                    p.chars().count()
                )))
            }
            Some(_) if role == Role::Metrics => {
                return Err(HubError::BadRequest(
                    "password: a metrics account scrapes with its token and cannot log in; leave the password out"
                        .into(),
                ))
            }
            Some(p) => {
                let p = p.to_string();
                Some(
                    tokio::task::spawn_blocking(move || hash_password(&p))
                        .await
                        .map_err(|e| HubError::Internal(format!("password hashing failed: {e}")))??,
                )
            }
            None => None,
        };
        let now = now_ms();
        let expires_at = expiry(req.expires_secs, now)?;
        let row = UserRow {
            name: req.name.clone(),
            role,
            scope,
            password,
            created_at: now,
        };
        match self.accounts.add_user(&row, expires_at).await? {
            Some(t) => {
                tracing::info!(user = %req.name, role = %role, "account added");
                Ok(Reply::UserToken(t))
            }
            None => Err(HubError::Conflict(format!(
                "name: user {} exists; remove it first (`outpost user rm {}`) or pick another name",
                req.name, req.name
            ))),
        }
    }

    pub(crate) async fn remove_user(&self, name: String) -> Result<Reply, HubError> {
        if !self.accounts.remove_user(&name).await? {
            return Err(HubError::NotFound(format!("user {name} (see `outpost user ls`)")));
        }
        self.sessions.remove_user(&name).await;
        tracing::info!(user = %name, "account removed");
        Ok(Reply::Deleted(DeleteResponse {
            deleted: vec![format!("user/{name}")],
            not_found: vec![],
        }))
    }

    pub(crate) async fn new_user_token(&self, name: String, expires_secs: Option<u64>) -> Result<Reply, HubError> {
        let now = now_ms();
        let expires_at = expiry(expires_secs, now)?;
        self.accounts
            .new_token(&name, expires_at, now)
            .await?
            .map(Reply::UserToken)
            .ok_or_else(|| HubError::NotFound(format!("user {name} (see `outpost user ls`)")))
    }

    pub(crate) async fn revoke_user_tokens(&self, name: String, id: Option<String>) -> Result<Reply, HubError> {
        let revoked = self
            .accounts
            .revoke(&name, id.as_deref(), now_ms())
            .await?
            .ok_or_else(|| HubError::NotFound(format!("user {name} (see `outpost user ls`)")))?;
        if let (Some(id), true) = (&id, revoked.is_empty()) {
            return Err(HubError::NotFound(format!(
                "unrevoked token {id} of user {name} (see `outpost user ls`)"
            )));
        }
        Ok(Reply::Revoked(RevokeResponse { user: name, revoked }))
    }

    pub(crate) async fn audit_entries(
        &self,
        since_secs: Option<u64>,
        user: Option<String>,
        limit: Option<u32>,
    ) -> Result<Reply, HubError> {
        let since = since_secs.map_or(0, |s| outpost_api::ms_before(now_ms(), s));
        let limit = limit.unwrap_or(1000).min(AUDIT_LIMIT);
        Ok(Reply::Audit(self.accounts.audit(since, user.as_deref(), limit).await?))
    }
}

/// `expires_secs` as a time; 0 and None mean never.
fn expiry(expires_secs: Option<u64>, now: i64) -> Result<Option<i64>, HubError> {
    match expires_secs {
        None | Some(0) => Ok(None),
        Some(s) if s > outpost_api::MAX_DURATION_SECS => Err(HubError::BadRequest(format!(
            "expires_secs: {s} is more than the longest allowed ({} s)",
            outpost_api::MAX_DURATION_SECS
        ))),
        Some(s) => Ok(Some(
            now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX).saturating_mul(1000)),
        )),
    }
}
