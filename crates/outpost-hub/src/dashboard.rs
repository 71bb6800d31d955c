//! The web dashboard (docs/dashboard.md): static pages embedded in the binary and served at `/`,
//! the JSON the pages read that no other route answers (fleet overview counts, a paginated node
//! list, a node's recent vitals), and `GET /v1/watch`, a server-sent event stream telling open
//! pages that something they show changed.
//!
//! The pages are plain HTML, CSS and JavaScript under `src/dashboard/`, no framework and nothing
//! fetched from elsewhere: the CSP (`crate::session::CSP`) allows only the hub's own files. They
//! log in with `POST /v1/session`, keep the CSRF token in the tab's sessionStorage and send it
//! on every mutating request; every route checks the caller's role and scope as for the CLI.
//!
//! Must never: decide anything itself (counting is `crate::views::fleet_counts`, reachability
//! `crate::views::node_summary`), or serve a page without `session::html_headers`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures_util::Stream;
use outpost_api::{AlertInfo, Labels, NodeCondition, UnixMs, Vitals};
use outpost_core::access::{Action, Scope};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::error::HubError;
use crate::extract::{ApiQuery, Caller};
use crate::service::{now_ms, Query, Reply, Service};
use crate::store::{DesiredRow, Store, StoreError};
use crate::views::{self, FleetCounts, NodeSummary};

type St = State<Arc<Service>>;

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const APP_CSS: &str = include_str!("dashboard/app.css");
const TERM_JS: &str = include_str!("dashboard/term.js");

/// Vitals samples kept per node in memory (the hub stores only the latest one): at the agents'
/// cadence (a sample when vitals moved, at most every 5 min, at least hourly) that is 12 h to
/// 6 days.
pub const VITALS_KEPT: usize = 144;
/// How often `GET /v1/watch` sends a `tick`, for what changes with time alone (a node turning
/// Stale or Offline).
pub const WATCH_TICK: Duration = Duration::from_secs(10);
/// Most nodes in one page of `GET /v1/dashboard/nodes`.
pub const MAX_PAGE: u32 = 500;

/// A change an open page may show: `kind` is `status` (a node's status report, `node` set) or
/// `change` (an operator's change: apply, delete, rollout action, token, user).
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// One vitals sample as the node page charts it (the same shape as the node's own history).
pub use outpost_api::VitalsPoint;

/// What open pages listen to, and the vitals history the hub keeps in memory.
pub struct Live {
    tx: broadcast::Sender<Change>,
    vitals: Mutex<HashMap<String, VecDeque<VitalsPoint>>>,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(256).0,
            vitals: Mutex::new(HashMap::new()),
        }
    }
}

impl Live {
    /// Tell the open pages (none listening is fine).
    pub fn changed(&self, kind: &'static str, node: Option<&str>) {
        let _ = self.tx.send(Change {
            kind,
            node: node.map(str::to_string),
        });
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Change> {
        self.tx.subscribe()
    }

    /// Keep a node's vitals sample (a repeated sample is kept once).
    pub fn record_vitals(&self, node: &str, v: &Vitals) {
        let mut m = self.vitals.lock().unwrap_or_else(|p| p.into_inner());
        let q = m.entry(node.to_string()).or_default();
        if q.back().is_some_and(|p| p.at >= v.at) {
            return;
        }
        if q.len() == VITALS_KEPT {
            q.pop_front();
        }
        q.push_back(VitalsPoint::of(v));
    }

    pub fn vitals(&self, node: &str) -> Vec<VitalsPoint> {
        let m = self.vitals.lock().unwrap_or_else(|p| p.into_inner());
        m.get(node).map(|q| q.iter().copied().collect()).unwrap_or_default()
    }

    pub fn forget(&self, node: &str) {
        self.vitals.lock().unwrap_or_else(|p| p.into_inner()).remove(node);
    }
}

// ---------------------------------------------------------------------------------------------
// Pages

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut h = HeaderMap::new();
    crate::session::html_headers(&mut h);
    h.insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-cache"));
    (StatusCode::OK, h, body).into_response()
}

/// `GET /`: the dashboard (one page; the views are `#/...` fragments).
pub async fn index() -> Response {
    asset(INDEX_HTML, "text/html; charset=utf-8")
}

/// `GET /ui/app.js`.
pub async fn app_js() -> Response {
    asset(APP_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/term.js`: the node page's terminal emulator.
pub async fn term_js() -> Response {
    asset(TERM_JS, "text/javascript; charset=utf-8")
}

/// `GET /ui/app.css`.
pub async fn app_css() -> Response {
    asset(APP_CSS, "text/css; charset=utf-8")
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Query of the overview and node list routes.
#[derive(Debug, Default, Deserialize)]
pub struct ListQuery {
    /// Label selector `k=v,k2=v2` (empty: every node in the caller's scope).
    #[serde(default)]
    pub selector: Option<String>,
    /// The label that groups nodes into sites (default `site`).
    #[serde(default)]
    pub group: Option<String>,
    #[serde(default)]
    pub offset: Option<u32>,
    /// Nodes per page (default 100, at most [`MAX_PAGE`]).
    #[serde(default)]
    pub limit: Option<u32>,
}

/// Node counts of one site (the nodes sharing a value of the grouping label).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SiteCounts {
    /// The label's value; empty for nodes without the label.
    pub site: String,
    pub counts: FleetCounts,
}

/// `GET /v1/dashboard/overview`.
#[derive(Clone, Debug, Serialize)]
pub struct Overview {
    pub counts: FleetCounts,
    pub group: String,
    pub sites: Vec<SiteCounts>,
    /// Firing alerts of nodes in scope.
    pub alerts: Vec<AlertInfo>,
    pub stale_after_secs: u64,
    pub offline_after_secs: u64,
}

/// `GET /v1/dashboard/nodes`: one page of the node list, by name.
#[derive(Clone, Debug, Serialize)]
pub struct NodePage {
    /// Nodes matching the selector (all pages).
    pub total: u32,
    pub offset: u32,
    pub limit: u32,
    pub nodes: Vec<NodeSummary>,
}

fn selector(q: &ListQuery) -> Result<Scope, HubError> {
    Scope::parse(q.selector.as_deref().unwrap_or(""))
        .map_err(|e| HubError::BadRequest(format!("selector: {e}; write it as key=value[,key=value]")))
}

/// Every node (by name) that `keep` accepts, summarized. Reads the nodes, statuses and
/// desired rows in one go; `conditions` come from the monitoring tables.
pub async fn load_summaries(
    store: &dyn Store,
    conditions: &BTreeMap<String, Vec<NodeCondition>>,
    keep: impl Fn(&Labels) -> bool,
    offline_after: Duration,
    now: UnixMs,
) -> Result<Vec<NodeSummary>, StoreError> {
    let nodes = store.nodes().await?;
    let mut statuses: HashMap<String, Vec<outpost_api::WorkloadStatus>> = HashMap::new();
    for (n, w) in store.statuses(None).await? {
        statuses.entry(n).or_default().push(w);
    }
    let desired = store.desired().await?;
    let mut by_node: HashMap<&str, Vec<&DesiredRow>> = HashMap::new();
    for d in &desired {
        by_node.entry(d.node.as_str()).or_default().push(d);
    }
    let mut out: Vec<NodeSummary> = nodes
        .iter()
        .filter(|n| keep(&n.labels))
        .map(|n| {
            views::node_summary(
                n,
                statuses.get(&n.name).map_or(&[][..], Vec::as_slice),
                by_node.get(n.name.as_str()).map_or(&[][..], Vec::as_slice),
                conditions.get(&n.name).map_or(&[][..], Vec::as_slice),
                offline_after,
                now,
            )
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// One page of `all`.
pub fn page(all: Vec<NodeSummary>, offset: Option<u32>, limit: Option<u32>) -> NodePage {
    let limit = limit.unwrap_or(100).clamp(1, MAX_PAGE);
    let offset = offset.unwrap_or(0);
    let total = all.len() as u32;
    let nodes = all.into_iter().skip(offset as usize).take(limit as usize).collect();
    NodePage {
        total,
        offset,
        limit,
        nodes,
    }
}

/// Counts per value of the grouping label, by value.
pub fn sites(all: &[NodeSummary], group: &str) -> Vec<SiteCounts> {
    let mut by: BTreeMap<&str, Vec<&NodeSummary>> = BTreeMap::new();
    for n in all {
        by.entry(n.labels.get(group).map_or("", String::as_str))
            .or_default()
            .push(n);
    }
    by.into_iter()
        .map(|(site, nodes)| SiteCounts {
            site: site.to_string(),
            counts: views::fleet_counts(nodes),
        })
        .collect()
}

async fn summaries_for(svc: &Arc<Service>, c: &Caller, q: &ListQuery) -> Result<Vec<NodeSummary>, HubError> {
    c.require_role(Action::Read)?;
    let filter = selector(q)?;
    let conditions = svc.monitor.conditions(None).await?;
    let scope = c.scope.clone();
    let offline_after = svc.settings.offline_after;
    Ok(load_summaries(
        &*svc.store,
        &conditions,
        |l| scope.matches_node(l) && filter.matches_node(l),
        offline_after,
        now_ms(),
    )
    .await?)
}

/// `GET /v1/dashboard/overview[?selector=&group=]`.
pub async fn overview(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Json<Overview>, HubError> {
    let all = summaries_for(&svc, &c, &q).await?;
    let group = q
        .group
        .clone()
        .filter(|g| !g.is_empty())
        .unwrap_or_else(|| "site".into());
    let in_view: std::collections::HashSet<&str> = all.iter().map(|n| n.name.as_str()).collect();
    let alerts = match svc.query_as(&c, Query::Alerts { all: false }).await? {
        Reply::Alerts(v) => v.into_iter().filter(|a| in_view.contains(a.node.as_str())).collect(),
        _ => Vec::new(),
    };
    Ok(Json(Overview {
        counts: views::fleet_counts(&all),
        sites: sites(&all, &group),
        group,
        alerts,
        stale_after_secs: views::stale_after(svc.settings.offline_after).as_secs(),
        offline_after_secs: svc.settings.offline_after.as_secs(),
    }))
}

/// `GET /v1/dashboard/nodes[?selector=&offset=&limit=]`.
pub async fn nodes(State(svc): St, c: Caller, ApiQuery(q): ApiQuery<ListQuery>) -> Result<Json<NodePage>, HubError> {
    let all = summaries_for(&svc, &c, &q).await?;
    Ok(Json(page(all, q.offset, q.limit)))
}

/// `GET /v1/dashboard/nodes/{node}/vitals`: the samples the hub kept since it started (what the
/// node page charts while the node is offline; `crate::node_vitals` fetches the node's own).
pub async fn vitals(State(svc): St, c: Caller, Path(node): Path<String>) -> Result<Json<Vec<VitalsPoint>>, HubError> {
    // the node route checks role and scope (a node out of scope reads as not found)
    svc.query_as(&c, Query::Node { name: node.clone() }).await?;
    Ok(Json(svc.live.vitals(&node)))
}

/// `GET /v1/watch`: server-sent events, `change` (JSON [`Change`]) when something changed, and
/// `tick` every [`WATCH_TICK`]. A scoped caller gets no `status` event of a node outside its scope.
pub async fn watch(State(svc): St, c: Caller) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, HubError> {
    c.require_role(Action::Read)?;
    let rx = svc.live.subscribe();
    let mut tick = tokio::time::interval(WATCH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let stream = futures_util::stream::unfold((rx, tick, svc, c), |(mut rx, mut tick, svc, c)| async move {
        loop {
            let ev = tokio::select! {
                r = rx.recv() => match r {
                    Ok(ch) => {
                        if let (Some(node), false) = (&ch.node, c.scope.is_all()) {
                            let n = node.clone();
                            let seen = svc.store.node(&n).await.ok().flatten();
                            if !seen.is_some_and(|row| c.sees_node(&row.labels)) {
                                continue;
                            }
                        }
                        Event::default().event("change").json_data(&ch).unwrap_or_default()
                    }
                    // missed some: one change says it all
                    Err(broadcast::error::RecvError::Lagged(_)) => Event::default().event("change").data("{\"kind\":\"change\"}"),
                    Err(broadcast::error::RecvError::Closed) => return None,
                },
                _ = tick.tick() => Event::default().event("tick").data("{}"),
            };
            return Some((Ok(ev), (rx, tick, svc, c)));
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Middleware: a successful operator change (any mutating request but the node protocol, exec
/// and sessions) is a `change` for open pages.
pub async fn notify_changes(State(svc): St, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let resp = next.run(req).await;
    let operator_change = method != Method::GET
        && method != Method::HEAD
        && resp.status().is_success()
        && !(path.starts_with("/v1/nodes/") && method != Method::DELETE)
        && !path.starts_with("/v1/exec/")
        && !path.starts_with("/v1/session")
        && !path.starts_with("/v1/images/")
        && !path.starts_with("/v1/models/");
    if operator_change {
        svc.live.changed("change", None);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(name: &str, site: Option<&str>, reach: views::Reach) -> NodeSummary {
        NodeSummary {
            name: name.into(),
            labels: site
                .map(|s| [("site".to_string(), s.to_string())].into())
                .unwrap_or_default(),
            reach,
            last_contact: 0,
            degraded: false,
            updating: false,
            reasons: Vec::new(),
            agent_version: None,
        }
    }

    #[test]
    fn pages_and_sites() {
        use views::Reach::*;
        let all = vec![
            summary("a", Some("x"), Online),
            summary("b", Some("x"), Offline),
            summary("c", Some("y"), Stale),
            summary("d", None, Online),
        ];
        let s = sites(&all, "site");
        let names: Vec<(&str, u32, u32)> = s
            .iter()
            .map(|s| (s.site.as_str(), s.counts.total, s.counts.online))
            .collect();
        assert_eq!(names, vec![("", 1, 1), ("x", 2, 1), ("y", 1, 0)]);
        let p = page(all.clone(), Some(1), Some(2));
        assert_eq!((p.total, p.offset, p.limit), (4, 1, 2));
        assert_eq!(p.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["b", "c"]);
        assert!(page(all.clone(), Some(10), None).nodes.is_empty());
        assert_eq!(page(all, None, Some(100_000)).limit, MAX_PAGE);
    }

    #[test]
    fn vitals_history_is_bounded_and_ordered() {
        let live = Live::default();
        let mut v: Vitals = serde_json::from_value(serde_json::json!({
            "at": 0, "cpu": 1.0, "mem": 2.0, "mem_total_bytes": 0, "disk_root": 3.0, "load1": 0.5
        }))
        .expect("vitals");
        for at in 1..=(VITALS_KEPT as i64 + 10) {
            v.at = at;
            live.record_vitals("n", &v);
            live.record_vitals("n", &v); // the same sample again is kept once
        }
        let h = live.vitals("n");
        assert_eq!(h.len(), VITALS_KEPT);
        assert_eq!(h.first().map(|p| p.at), Some(11));
        assert_eq!(h.last().map(|p| p.at), Some(VITALS_KEPT as i64 + 10));
        live.forget("n");
        assert!(live.vitals("n").is_empty());
    }

    /// Server time of one node-list page at 10,000 nodes (BENCHMARKS.md §10): rows written to a
    /// real SQLite file, then the route's work (read nodes, statuses and desired rows, summarize,
    /// sort, page) timed. Reports the time; asserts only what the page holds.
    #[test]
    fn node_list_page_at_10k_nodes() {
        use crate::store::SqliteStore;
        const NODES: usize = 10_000;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hub.db");
        let store = SqliteStore::open(&path).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let now = now_ms();
        {
            let mut c = rusqlite::Connection::open(&path).unwrap();
            let tx = c.transaction().unwrap();
            for i in 0..NODES {
                let name = format!("node-{i:05}");
                let labels = format!("{{\"site\":\"store-{:04}\",\"tier\":\"edge\"}}", i / 4);
                // a quarter silent for a minute (stale at the default 90 s), some offline
                let seen = now
                    - if i % 4 == 0 {
                        60_000
                    } else if i % 50 == 0 {
                        600_000
                    } else {
                        1_000
                    };
                tx.execute(
                    "INSERT INTO nodes (name, labels, cert_fp, cert_not_after, joined_at, last_seen, generation, applied_generation, agent_version)
                     VALUES (?1, ?2, ?3, 0, 0, ?4, 2, 2, '0.1.0')",
                    rusqlite::params![name, labels, format!("fp{i}"), seen],
                )
                .unwrap();
                for (w, hash) in [("daemonset/default/pos", "h1"), ("deployment/default/kiosk", "h2")] {
                    tx.execute(
                        "INSERT INTO node_workloads (node, key, spec, hash, changed_gen, revision) VALUES (?1, ?2, '{}', ?3, 1, 1)",
                        rusqlite::params![name, w, hash],
                    )
                    .unwrap();
                    let running = if i % 10 == 0 { "old" } else { hash };
                    let st = serde_json::json!({"key": w, "revision": 1, "hash": running, "phase": "Running",
                        "containers": [{"name": "main", "phase": "Running", "pid": 42, "restarts": 0,
                        "last_exit_code": null, "reason": null, "started_at": now, "ready": true}], "ready": true});
                    tx.execute(
                        "INSERT INTO workload_status (node, key, status, updated_at) VALUES (?1, ?2, ?3, ?4)",
                        rusqlite::params![name, w, st.to_string(), now],
                    )
                    .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        let conditions = BTreeMap::new();
        let mut times = Vec::new();
        let mut last = None;
        for _ in 0..7 {
            let t = std::time::Instant::now();
            let all = rt
                .block_on(load_summaries(
                    &store,
                    &conditions,
                    |_| true,
                    crate::DEFAULT_OFFLINE_AFTER,
                    now,
                ))
                .unwrap();
            let counts = views::fleet_counts(&all);
            let p = page(all, Some(5_000), Some(100));
            let body = serde_json::to_vec(&p).unwrap();
            times.push(t.elapsed());
            last = Some((p, counts, body.len()));
        }
        times.sort();
        let (p, counts, bytes) = last.unwrap();
        eprintln!(
            "node list page at {NODES} nodes: median {:?}, min {:?}, max {:?} ({} nodes, {bytes} bytes of JSON)",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1],
            p.nodes.len()
        );
        assert_eq!((p.total, p.nodes.len()), (NODES as u32, 100));
        assert_eq!(p.nodes[0].name, "node-05000");
        // every 4th stale; multiples of 50 but not of 4 offline; every 10th updating (if reachable)
        assert_eq!(
            (
                counts.total,
                counts.online,
                counts.stale,
                counts.offline,
                counts.updating,
                counts.degraded
            ),
            (10_000, 7_400, 2_500, 100, 900, 0)
        );
    }
}
