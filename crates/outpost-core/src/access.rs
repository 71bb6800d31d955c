//! Who may do what (docs/accounts.md): the decision "may a caller with this role and scope do
//! this [`Action`] on this [`Target`]", as one pure function, [`check`].
//!
//! - A [`Role`] grants a set of actions: `admin` everything; `operator` reads, logs, apply,
//!   delete, rollout actions, exec and GitOps syncs; `viewer` reads; `metrics` only `/metrics`.
//! - A [`Scope`] (a label selector such as `site=a`; a key given twice allows either value)
//!   limits an account to some nodes. A node is in scope when its labels match the selector. A
//!   placed object (a workload, Pipeline, AlertPolicy, AgentUpdate) is in scope when its
//!   `nodeSelector` pins every key of the scope to an allowed value: then every node it can
//!   ever run on is in scope, whatever labels nodes get later. Anything else (ConfigMaps,
//!   Secrets, Services, RolloutPolicies, GitRepos, images, join tokens, users, the audit log,
//!   `/metrics`) concerns the whole fleet: only an account without a scope may touch it.
//!
//! Must never: look anything up. Callers load the node's labels or the object's selector and
//! pass them in.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use outpost_api::Labels;

/// An account's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Admin,
    Operator,
    Viewer,
    /// Scrapes `/metrics` and nothing else.
    Metrics,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Admin, Role::Operator, Role::Viewer, Role::Metrics];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::Viewer => "viewer",
            Role::Metrics => "metrics",
        }
    }

    /// Whether this role grants `action` (scope aside).
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Admin => true,
            Role::Operator => matches!(
                action,
                Read | Logs | Apply | Delete | Rollout | Exec | GitOpsSync | PushImage | Metrics
            ),
            Role::Viewer => matches!(action, Read | Metrics),
            Role::Metrics => matches!(action, Metrics),
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller asks to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Read nodes, workloads, rollouts, alerts, errors, pipelines, data, images, GitRepos.
    Read,
    /// Fetch a workload's full log from its node.
    Logs,
    /// Create or change objects.
    Apply,
    /// Delete objects.
    Delete,
    /// Pause, resume, abort or undo a rollout; undo a workload to an earlier revision.
    Rollout,
    /// Run a command in a workload.
    Exec,
    /// Run a shell on the node itself, outside any workload.
    NodeShell,
    /// Ask a GitRepo to fetch now.
    GitOpsSync,
    /// Upload images and models and tag them.
    PushImage,
    /// Create join tokens.
    JoinToken,
    /// Remove a node from the fleet.
    DeleteNode,
    /// Add, list and remove accounts and their tokens.
    ManageUsers,
    /// Read the audit log.
    ReadAudit,
    /// Scrape `/metrics`.
    Metrics,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Read => "read",
            Action::Logs => "logs",
            Action::Apply => "apply",
            Action::Delete => "delete",
            Action::Rollout => "rollout",
            Action::Exec => "exec",
            Action::NodeShell => "node-shell",
            Action::GitOpsSync => "gitops-sync",
            Action::PushImage => "push-image",
            Action::JoinToken => "join-token",
            Action::DeleteNode => "delete-node",
            Action::ManageUsers => "manage-users",
            Action::ReadAudit => "read-audit",
            Action::Metrics => "metrics",
        }
    }

    /// The least role that grants this action.
    pub fn least_role(self) -> Role {
        [Role::Metrics, Role::Viewer, Role::Operator, Role::Admin]
            .into_iter()
            .find(|r| r.allows(self))
            .unwrap_or(Role::Admin)
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label selector limiting an account to some nodes: key -> allowed values. Empty: the
/// whole fleet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope(BTreeMap<String, BTreeSet<String>>);

/// Why a selector text is not a scope.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("{0:?} is not key=value")]
    NotPair(String),
    #[error("{0:?}: {1}")]
    BadLabel(String, String),
}

impl Scope {
    /// The whole fleet.
    pub fn all() -> Self {
        Self::default()
    }

    /// `k=v,k2=v2` (a key given twice allows either value); empty text is the whole fleet.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        let mut m: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .map(|(k, v)| (k.trim(), v.trim()))
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .ok_or_else(|| ScopeError::NotPair(part.to_string()))?;
            outpost_api::checks::validate_label_key(k)
                .and_then(|()| outpost_api::checks::validate_label_value(v))
                .map_err(|e| ScopeError::BadLabel(part.to_string(), e))?;
            m.entry(k.to_string()).or_default().insert(v.to_string());
        }
        Ok(Self(m))
    }

    pub fn is_all(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether a node with these labels is in scope.
    pub fn matches_node(&self, labels: &Labels) -> bool {
        self.0
            .iter()
            .all(|(k, allowed)| labels.get(k).is_some_and(|v| allowed.contains(v)))
    }

    /// Whether an object placed by this `nodeSelector` stays in scope: it pins every key of
    /// the scope to an allowed value (an empty selector means every node).
    pub fn covers_selector(&self, selector: &Labels) -> bool {
        self.matches_node(selector)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (k, vs) in &self.0 {
            for v in vs {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "{k}={v}")?;
            }
        }
        Ok(())
    }
}

/// What an action is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// Something of the whole fleet (users, join tokens, images, the audit log, `/metrics`,
    /// ConfigMaps, Secrets and other objects not placed by a nodeSelector).
    Fleet,
    /// A node, by its labels.
    Node(&'a Labels),
    /// An object placed by this nodeSelector.
    Placed(&'a Labels),
}

/// What an object is, for [`check`]: placed by its nodeSelector (workloads, Pipelines,
/// AlertPolicies, AgentUpdates), or of the whole fleet.
pub fn object_target(o: &outpost_api::Object) -> Target<'_> {
    use outpost_api::Object;
    match o {
        Object::Pipeline(p) => Target::Placed(&p.spec.node_selector),
        Object::AlertPolicy(p) => Target::Placed(&p.spec.node_selector),
        Object::AgentUpdate(u) => Target::Placed(&u.spec.node_selector),
        o => match o.template() {
            Some(t) => Target::Placed(&t.spec.node_selector),
            None => Target::Fleet,
        },
    }
}

/// Why [`check`] refused; the text is the operator-facing message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error(
        "role {role} may not {action} (that needs role {needs} or higher); ask an admin for an account with that role"
    )]
    Role { role: Role, action: Action, needs: Role },
    #[error("this account is limited to nodes {scope}; {what} is outside it")]
    Scope { scope: String, what: String },
}

fn labels_text(l: &Labels) -> String {
    if l.is_empty() {
        return "{}".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// May a caller with `role`, limited to `scope`, do `action` on `target`?
pub fn check(role: Role, scope: &Scope, action: Action, target: Target<'_>) -> Result<(), Denied> {
    if !role.allows(action) {
        return Err(Denied::Role {
            role,
            action,
            needs: action.least_role(),
        });
    }
    if scope.is_all() {
        return Ok(());
    }
    let (ok, what) = match target {
        Target::Fleet => (false, "this concerns the whole fleet".to_string()),
        Target::Node(l) => (scope.matches_node(l), format!("a node labelled {}", labels_text(l))),
        Target::Placed(s) => (
            scope.covers_selector(s),
            format!(
                "an object with nodeSelector {} (it must pin every key of the scope to an allowed value)",
                labels_text(s)
            ),
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(Denied::Scope {
            scope: scope.to_string(),
            what,
        })
    }
}

/// Whether a credential (account token or browser session) still works at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    Valid,
    /// Revoked at this time (Unix ms).
    Revoked(i64),
    /// Expired this many ms ago.
    Expired(i64),
    /// A session unused for longer than the idle limit, this many ms ago.
    Idle(i64),
}

/// An account token: revoked, past its expiry, or valid.
pub fn token_validity(expires_at: Option<i64>, revoked_at: Option<i64>, now: i64) -> Validity {
    if let Some(r) = revoked_at {
        return Validity::Revoked(r);
    }
    match expires_at {
        Some(e) if now >= e => Validity::Expired(now - e),
        _ => Validity::Valid,
    }
}

/// A browser session: it ends `max_ms` after login, or `idle_ms` after its last use.
pub fn session_validity(created_at: i64, last_used: i64, now: i64, idle_ms: i64, max_ms: i64) -> Validity {
    let absolute_end = created_at.saturating_add(max_ms);
    let idle_end = last_used.saturating_add(idle_ms);
    if now >= absolute_end {
        Validity::Expired(now - absolute_end)
    } else if now >= idle_end {
        Validity::Idle(now - idle_end)
    } else {
        Validity::Valid
    }
}

/// What the audit log's retention removes: entries recorded before the first value (Unix ms),
/// and those whose sequence number is at most the second (beyond `max_rows` newest).
pub fn audit_prune(now: i64, newest_seq: i64, max_age_ms: i64, max_rows: i64) -> (i64, i64) {
    (now.saturating_sub(max_age_ms), newest_seq.saturating_sub(max_rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(s: &str) -> Labels {
        s.split(',')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect()
    }

    enum T {
        Fleet,
        Node(&'static str),
        Placed(&'static str),
    }

    fn check_case(role: Role, scope: &str, action: Action, target: T, ok: bool) {
        let scope = Scope::parse(scope).unwrap();
        let (a, b);
        let t = match target {
            T::Fleet => Target::Fleet,
            T::Node(s) => {
                a = l(s);
                Target::Node(&a)
            }
            T::Placed(s) => {
                b = l(s);
                Target::Placed(&b)
            }
        };
        let got = check(role, &scope, action, t);
        assert_eq!(got.is_ok(), ok, "{role} {scope} {action} {t:?}: {got:?}");
    }

    #[test]
    fn roles_grant_their_actions() {
        use Action::*;
        let all = [
            Read,
            Logs,
            Apply,
            Delete,
            Rollout,
            Exec,
            NodeShell,
            GitOpsSync,
            PushImage,
            JoinToken,
            DeleteNode,
            ManageUsers,
            ReadAudit,
            Metrics,
        ];
        let table: [(Role, &[Action]); 4] = [
            (Role::Admin, &all),
            (
                Role::Operator,
                &[Read, Logs, Apply, Delete, Rollout, Exec, GitOpsSync, PushImage, Metrics],
            ),
            (Role::Viewer, &[Read, Metrics]),
            (Role::Metrics, &[Metrics]),
        ];
        for (role, granted) in table {
            for a in all {
                assert_eq!(role.allows(a), granted.contains(&a), "{role} {a}");
                check_case(role, "", a, T::Fleet, granted.contains(&a));
            }
        }
    }

    #[test]
    fn scope_limits_nodes_and_placed_objects() {
        use Action::*;
        let cases = [
            // node targets: labels must match
            (Role::Operator, "site=a", Exec, T::Node("site=a,zone=1"), true),
            (Role::Operator, "site=a", Exec, T::Node("site=b"), false),
            (Role::Operator, "site=a", Exec, T::Node(""), false),
            (Role::Viewer, "site=a,site=b", Read, T::Node("site=b"), true),
            (Role::Viewer, "site=a,region=eu", Read, T::Node("site=a"), false),
            (
                Role::Viewer,
                "site=a,region=eu",
                Read,
                T::Node("site=a,region=eu"),
                true,
            ),
            // placed objects: the selector pins every scope key to an allowed value
            (Role::Operator, "site=a", Apply, T::Placed("site=a"), true),
            (Role::Operator, "site=a", Apply, T::Placed("site=a,gpu=yes"), true),
            (Role::Operator, "site=a", Apply, T::Placed(""), false),
            (Role::Operator, "site=a", Apply, T::Placed("gpu=yes"), false),
            (Role::Operator, "site=a", Apply, T::Placed("site=b"), false),
            (Role::Operator, "site=a,site=b", Delete, T::Placed("site=b"), true),
            // the whole fleet: only unscoped accounts
            (Role::Operator, "site=a", Apply, T::Fleet, false),
            (Role::Admin, "site=a", ManageUsers, T::Fleet, false),
            (Role::Admin, "", ManageUsers, T::Fleet, true),
            (Role::Metrics, "site=a", Metrics, T::Fleet, false),
            // the role is checked first: a viewer in scope still cannot change anything
            (Role::Viewer, "site=a", Apply, T::Placed("site=a"), false),
            (Role::Viewer, "site=a", Logs, T::Node("site=a"), false),
            (Role::Operator, "site=a", NodeShell, T::Node("site=a"), false),
            (Role::Admin, "site=a", NodeShell, T::Node("site=a"), true),
        ];
        for (role, scope, action, target, ok) in cases {
            check_case(role, scope, action, target, ok);
        }
    }

    #[test]
    fn denials_name_the_role_or_scope() {
        let e = check(Role::Viewer, &Scope::all(), Action::Apply, Target::Fleet).unwrap_err();
        assert_eq!(
            e.to_string(),
            "role viewer may not apply (that needs role operator or higher); ask an admin for an account with that role"
        );
        let site_b = l("site=b");
        let e = check(
            Role::Operator,
            &Scope::parse("site=a").unwrap(),
            Action::Exec,
            Target::Node(&site_b),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "this account is limited to nodes site=a; a node labelled site=b is outside it"
        );
    }

    #[test]
    fn scope_text_round_trips_and_bad_text_is_refused() {
        let s = Scope::parse(" site=b, site=a ,region=eu").unwrap();
        assert_eq!(s.to_string(), "region=eu,site=a,site=b");
        assert_eq!(Scope::parse(&s.to_string()).unwrap(), s);
        assert!(Scope::parse("").unwrap().is_all());
        assert_eq!(Scope::parse("site"), Err(ScopeError::NotPair("site".into())));
        assert_eq!(Scope::parse("site="), Err(ScopeError::NotPair("site=".into())));
        assert!(matches!(Scope::parse("bad key=a"), Err(ScopeError::BadLabel(..))));
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        assert_eq!(Role::parse("root"), None);
    }

    #[test]
    fn credentials_expire_and_revoke() {
        let h = 3_600_000;
        let cases = [
            (token_validity(None, None, 10 * h), Validity::Valid),
            (token_validity(Some(10 * h), None, 10 * h - 1), Validity::Valid),
            (token_validity(Some(10 * h), None, 12 * h), Validity::Expired(2 * h)),
            (
                token_validity(Some(10 * h), Some(5 * h), 12 * h),
                Validity::Revoked(5 * h),
            ),
            (token_validity(None, Some(5 * h), 6 * h), Validity::Revoked(5 * h)),
            // session: 30 min idle, 12 h absolute
            (session_validity(0, 0, h / 4, h / 2, 12 * h), Validity::Valid),
            (session_validity(0, 0, h, h / 2, 12 * h), Validity::Idle(h / 2)),
            (
                session_validity(0, 11 * h + h / 2, 12 * h - 1, h / 2, 12 * h),
                Validity::Valid,
            ),
            (
                session_validity(0, 12 * h - 1, 13 * h, h / 2, 12 * h),
                Validity::Expired(h),
            ),
        ];
        for (i, (got, want)) in cases.into_iter().enumerate() {
            assert_eq!(got, want, "case {i}");
        }
    }

    #[test]
    fn audit_retention_bounds_age_and_rows() {
        let day = 86_400_000;
        assert_eq!(audit_prune(100 * day, 500, 90 * day, 100_000), (10 * day, -99_500));
        assert_eq!(audit_prune(100 * day, 250_000, 90 * day, 100_000), (10 * day, 150_000));
    }
}
