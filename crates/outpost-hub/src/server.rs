//! HTTPS transport: the TLS accept loop, per-connection HTTP/2 and HTTP/1.1 serving, the request
//! extractors (peer certificate, admin token, JSON bodies) and the route table.
//!
//! Connections are a scarce resource (one descriptor each), so the accept loop keeps a table of
//! them and `outpost_core::link` decides:
//! - at most `max_total` connections (from `RLIMIT_NOFILE`, leaving headroom for the database,
//!   images and webhooks: `outpost_core::link::budget`); a connection beyond that is accepted and closed at once, so the
//!   kernel's backlog never fills with connections nobody serves;
//! - a source address holds at most `max_certless_per_ip` connections that have not shown a node
//!   certificate (handshakes, operators, joins, idle sockets); agents, once their certificate
//!   is verified, do not count, so a site behind one NAT address is not limited;
//! - when a limit is reached, the longest-idle certless connection (no bytes and no request
//!   for a second or more) is dropped to make room: a pile of idle sockets cannot lock out an
//!   operator or an agent. Connections with a node certificate are never dropped this way;
//! - every connection is closed after `idle_timeout` without bytes and without a request in
//!   flight (a held long-poll is a request in flight); the TLS handshake must finish, and the
//!   first request start, within `header_read_timeout`; an HTTP/1 request head (also the wait
//!   for the next one on a kept-alive connection) must arrive within `idle_timeout`;
//! - failed `accept` calls are logged at most every 10 s, with how many were not logged.
//!
//! The extractors live in `crate::extract`, the handlers in `crate::api` and `crate::images`.
//!
//! An error answer sent before the request body was read (a wrong token on a large apply) would
//! end the HTTP/2 stream with a reset that several clients report as a stream error instead of
//! the answer; [`DrainOnDrop`] reads the rest of such a body (up to 16 MiB and 10 s) before the
//! stream ends, so the client gets the `ApiError`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, Request};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::Router;
use hyper::body::{Body as _, Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioIo, TokioTimer};
use outpost_api::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use outpost_core::link::{self, Admit, Candidate, ConnLimits};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::error::HubError;
use crate::service::Service;
use crate::{accounts_api, api, images};

pub use crate::extract::{Peer, BODY_LIMIT};

/// Refuse a client of a newer major protocol; answer a client that names its protocol with the
/// hub's own (`x-outpost-protocol`), so an agent knows what it may use (a zstd status body
/// from 1.4 on). HPACK sends the repeated header as one byte.
async fn check_protocol(req: Request, next: Next) -> Response {
    let named = req.headers().contains_key(PROTOCOL_HEADER);
    if let Some(v) = req.headers().get(PROTOCOL_HEADER) {
        let text = v.to_str().unwrap_or("").trim().to_string();
        let major = text.split('.').next().and_then(|m| m.parse::<u32>().ok());
        if !matches!(major, Some(m) if m <= PROTOCOL_VERSION) {
            return HubError::ProtocolVersion { got: text }.into_response();
        }
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let mut resp = next.run(req).await;
    tracing::debug!(%method, %path, status = resp.status().as_u16(), "request");
    if named {
        resp.headers_mut().insert(
            PROTOCOL_HEADER,
            axum::http::HeaderValue::from_static(outpost_api::PROTOCOL),
        );
    }
    resp
}

async fn no_route(req: Request) -> HubError {
    HubError::NotFound(format!("route {} {}", req.method(), req.uri().path()))
}

async fn wrong_method(req: Request) -> HubError {
    HubError::MethodNotAllowed {
        method: req.method().to_string(),
        path: req.uri().path().to_string(),
    }
}

/// Variable that sets how many joins and syncs may work at once (`outpost_core::admission`;
/// default from the CPU count).
pub const ADMISSION_LIMIT_ENV: &str = "OUTPOST_HUB_ADMISSION_LIMIT";

/// Admission control for joins and syncs: a bounded semaphore, and the recent admitted and
/// refused counts that `outpost_core::admission::admit` turns into a `Retry-After`.
pub struct Admission {
    sem: Arc<tokio::sync::Semaphore>,
    limit: usize,
    window: Mutex<AdmitWindow>,
    /// Busy answers and places in use are counted here (`/metrics`).
    metrics: Arc<crate::metrics::Metrics>,
}

/// Counts of the current second and of the one before.
struct AdmitWindow {
    start: Instant,
    admitted: u64,
    refused: u64,
    last_admitted: u64,
    last_refused: u64,
}

impl Admission {
    pub fn new(limit: usize, metrics: Arc<crate::metrics::Metrics>) -> Self {
        metrics.admission_limit.set(i64::try_from(limit).unwrap_or(i64::MAX));
        Admission {
            sem: Arc::new(tokio::sync::Semaphore::new(limit)),
            limit,
            metrics,
            window: Mutex::new(AdmitWindow {
                start: Instant::now(),
                admitted: 0,
                refused: 0,
                last_admitted: 0,
                last_refused: 0,
            }),
        }
    }

    /// The limit from [`ADMISSION_LIMIT_ENV`], else from the CPU count.
    pub fn from_env(metrics: Arc<crate::metrics::Metrics>) -> Self {
        let configured = std::env::var(ADMISSION_LIMIT_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Admission::new(outpost_core::admission::limit(cpus, configured), metrics)
    }

    /// Let a join or sync in (its ticket holds the place until released or dropped), or say
    /// after how many seconds to come back.
    fn try_enter(&self) -> Result<crate::service::AdmitTicket, u64> {
        let permit = self.sem.clone().try_acquire_owned();
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let elapsed = w.start.elapsed();
        if elapsed >= Duration::from_secs(1) {
            let recent = elapsed < Duration::from_secs(2);
            w.last_admitted = if recent { w.admitted } else { 0 };
            w.last_refused = if recent { w.refused } else { 0 };
            (w.admitted, w.refused, w.start) = (0, 0, Instant::now());
        }
        match permit {
            Ok(p) => {
                w.admitted += 1;
                Ok(crate::service::AdmitTicket::new(
                    p,
                    self.metrics.admission_in_use.clone(),
                ))
            }
            Err(_) => {
                let load = outpost_core::admission::Load {
                    in_flight: self.limit - self.sem.available_permits().min(self.limit),
                    limit: self.limit,
                    refused_recently: w.refused + w.last_refused,
                    admitted_per_sec: w.admitted.max(w.last_admitted) as f64,
                };
                w.refused += 1;
                match outpost_core::admission::admit(&load, rand::random()) {
                    outpost_core::admission::Admit::Later { retry_after_secs } => Err(retry_after_secs),
                    // a place came free since the try: let it come back at once
                    outpost_core::admission::Admit::Enter => Err(1),
                }
            }
        }
    }
}

/// Joins and syncs pass here: admitted with a ticket (a sync gives its place back when it
/// starts waiting), or answered `503` with `Retry-After` (docs/protocol.md §6).
async fn admit(
    axum::extract::State(adm): axum::extract::State<Arc<Admission>>,
    mut req: Request,
    next: Next,
) -> Response {
    match adm.try_enter() {
        Ok(ticket) => {
            req.extensions_mut().insert(ticket.clone());
            let resp = next.run(req).await;
            drop(ticket);
            resp
        }
        Err(secs) => {
            adm.metrics.busy_answer(crate::metrics::route_of(req.uri().path()));
            tracing::debug!(path = %req.uri().path(), retry_after = secs, "busy: request refused by admission control");
            crate::error::busy_response(
                format!(
                    "the hub is busy with many agents connecting at once; retry after {secs} s (agents do so by themselves)"
                ),
                secs,
            )
        }
    }
}

/// Syncs pass here. A poll from a node that already holds the newest generation this process
/// knows for it (the poll again that follows every answer) goes to its handler without a
/// place: after a change every connected agent answers and polls again at once, and refusing
/// those polls (5,000 agents: ~10,000 busy answers in three changes) left agents without a held
/// poll for up to `Retry-After` (30 s), so the next change reached them that late. The handler
/// reads the store as for any poll; only admission is skipped. Every other sync (a node behind,
/// or unknown to this process, as after a restart) goes through [`admit`].
async fn admit_sync(
    axum::extract::State((adm, svc)): axum::extract::State<(Arc<Admission>, Arc<Service>)>,
    req: Request,
    next: Next,
) -> Response {
    if up_to_date_poll(&svc, req.uri()) {
        return next.run(req).await;
    }
    admit(axum::extract::State(adm), req, next).await
}

/// Whether `uri` is `/v1/nodes/{node}/sync?generation=N` for a node whose poll skips admission
/// (`outpost_core::admission::skips_admission`).
fn up_to_date_poll(svc: &Service, uri: &axum::http::Uri) -> bool {
    let Some(node) = uri
        .path()
        .strip_prefix("/v1/nodes/")
        .and_then(|p| p.strip_suffix("/sync"))
    else {
        return false;
    };
    let since = uri
        .query()
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("generation="))
        .and_then(|v| v.parse::<u64>().ok());
    outpost_core::admission::skips_admission(since, svc.known_generation(node))
}

/// glibc gives each thread that allocates under contention an arena of its own (up to 8 per
/// CPU) and keeps what is freed in it: after a wave of joins on the blocking pool, ~30 KiB per
/// connected agent stayed in arenas nobody used again (BENCHMARKS.md §4, `MALLOC_ARENA_MAX=1`:
/// 111.5 -> 79.4 KiB per idle agent). Limit the arenas to one per CPU, unless
/// `MALLOC_ARENA_MAX` is set (glibc reads it itself). Threads that already have an arena keep
/// it, so call this early. No-op outside glibc.
pub fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = libc::c_int::try_from(cpus).unwrap_or(1);
        // SAFETY: mallopt only sets a tunable of the allocator; any value is accepted.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, n) } != 1 {
            tracing::debug!("cannot limit malloc arenas");
        }
    }
}

/// The route table of docs/protocol.md.
pub fn router(svc: Arc<Service>) -> Router {
    let admission = Arc::new(Admission::from_env(svc.metrics.clone()));
    let admitted = || middleware::from_fn_with_state(admission.clone(), admit);
    Router::new()
        .route("/v1/openapi.yaml", get(crate::openapi::spec))
        .route("/v1/ca", get(api::ca))
        .route("/v1/join", post(api::join).layer(admitted()))
        .route(
            "/v1/nodes/{node}/sync",
            get(api::sync).layer(middleware::from_fn_with_state(
                (admission.clone(), svc.clone()),
                admit_sync,
            )),
        )
        .route("/v1/nodes/{node}/status", post(api::status))
        .route("/v1/nodes/{node}/renew", post(api::renew))
        .route("/v1/nodes/{node}/witness", post(crate::witness::claim))
        // monitoring, alerts and logs (docs/alerts.md)
        .route("/v1/nodes/{node}/errors", post(api::node_errors))
        .route("/v1/nodes/{node}/logs/{id}", post(api::node_logs))
        .route("/v1/nodes/{node}/vitals/{id}", post(crate::node_vitals::answer))
        .route("/v1/nodes/{node}/vitals", get(crate::node_vitals::get))
        .route("/v1/logs", get(api::logs))
        // remote exec (docs/exec.md)
        .route("/v1/nodes/{node}/exec", post(crate::exec_api::open))
        .route("/v1/exec/{id}/input", post(crate::exec_api::input))
        .route("/v1/nodes/{node}/exec/{id}/output", post(crate::exec_api::node_output))
        .route("/v1/nodes/{node}/exec/{id}/input", get(crate::exec_api::node_input))
        .route("/v1/errors", get(api::errors))
        .route("/v1/alerts", get(api::alerts))
        // edge data pipeline (docs/pipeline.md)
        .route("/v1/nodes/{node}/data", post(api::node_data))
        .route("/v1/data", get(api::data))
        .route("/v1/pipelines", get(api::pipelines))
        .route("/metrics", get(api::metrics))
        .route("/v1/tokens", post(api::create_token))
        .route("/v1/apply", post(api::apply))
        .route("/v1/delete", post(api::delete))
        .route(
            "/v1/objects/{kind}/{namespace}/{name}",
            get(api::get_object).delete(api::delete_object),
        )
        .route("/v1/objects/{kind}/{namespace}/{name}/revisions", get(api::revisions))
        .route("/v1/objects/{kind}/{namespace}/{name}/undo", post(api::undo))
        .route("/v1/objects/{kind}/{namespace}/{name}/rollout", get(api::rollout))
        .route(
            "/v1/objects/{kind}/{namespace}/{name}/rollout/{action}",
            post(api::rollout_action),
        )
        .route("/v1/rollouts", get(api::rollouts))
        .route("/v1/gitops", get(crate::gitops_api::list))
        .route("/v1/gitops/{name}", get(crate::gitops_api::one))
        .route("/v1/gitops/{name}/sync", post(crate::gitops_api::sync))
        .route("/v1/gitops/{name}/diff", get(crate::gitops_api::diff))
        .route("/v1/gitops/{name}/webhook", post(crate::gitops_api::webhook))
        .route(
            "/v1/images/blobs/{digest}",
            get(images::get_blob)
                .head(images::head_blob)
                .put(images::put_blob)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/tags", get(images::get_tags).post(images::put_tag))
        .route(
            "/v1/models/blobs/{digest}",
            put(crate::models::put_blob).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/models/tags",
            get(crate::models::get_tags).post(crate::models::put_tag),
        )
        // accounts, audit, browser sessions (docs/accounts.md)
        .route("/v1/users", get(accounts_api::list).post(accounts_api::add))
        .route("/v1/users/{name}", delete(accounts_api::remove))
        .route(
            "/v1/users/{name}/tokens",
            post(accounts_api::new_token).delete(accounts_api::revoke_all),
        )
        .route("/v1/users/{name}/tokens/{id}", delete(accounts_api::revoke_one))
        .route("/v1/audit", get(accounts_api::audit))
        .route("/v1/whoami", get(accounts_api::whoami))
        .route(
            "/v1/session",
            get(accounts_api::whoami)
                .post(accounts_api::login)
                .delete(accounts_api::logout),
        )
        // the web dashboard (docs/dashboard.md)
        .route("/", get(crate::dashboard::index))
        .route("/ui/app.js", get(crate::dashboard::app_js))
        .route("/ui/app.css", get(crate::dashboard::app_css))
        .route("/ui/term.js", get(crate::dashboard::term_js))
        .route("/v1/watch", get(crate::dashboard::watch))
        .route("/v1/dashboard/overview", get(crate::dashboard::overview))
        .route("/v1/dashboard/nodes", get(crate::dashboard::nodes))
        .route("/v1/dashboard/nodes/{node}/vitals", get(crate::dashboard::vitals))
        .route("/v1/workloads", get(api::workloads))
        .route("/v1/nodes", get(api::nodes))
        .route("/v1/nodes/{node}", get(api::node).delete(api::delete_node))
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(middleware::from_fn_with_state(
            svc.clone(),
            crate::dashboard::notify_changes,
        ))
        .layer(middleware::from_fn(check_protocol))
        .layer(middleware::from_fn_with_state(
            svc.metrics.clone(),
            crate::metrics::track,
        ))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(svc)
}

/// How the hub serves connections; see the module docs.
#[derive(Clone, Copy, Debug)]
pub struct ServeConfig {
    pub limits: ConnLimits,
    /// Close a connection after this long without bytes and without a request in flight; an
    /// HTTP/1 request head (the next one on a kept-alive connection too) must arrive within it.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish, and the first request start, within this.
    pub header_read_timeout: Duration,
    /// Idle time before TCP keepalive probes ([`KEEPALIVE_IDLE`] by default).
    pub keepalive: Duration,
}

/// A certless connection idle at least this long may be dropped to make room for a new one.
const EVICT_MIN_IDLE_MS: i64 = 1000;
/// Most bytes of an unread request body read (and discarded) so that an early answer arrives.
const DRAIN_LIMIT: usize = 16 << 20;
/// Longest time spent doing so.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// Bytes moved and requests in flight on one connection, for the idle rules.
struct Activity {
    epoch: Instant,
    /// Milliseconds after `epoch` of the last byte read or written.
    last_io: AtomicU64,
    busy: AtomicUsize,
    /// Requests started on this connection.
    requests: AtomicU64,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let a = Self {
            epoch,
            last_io: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        };
        a.touch();
        a
    }
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    fn touch(&self) {
        self.last_io.store(self.now_ms(), Ordering::Relaxed);
    }
    /// None while a request is in flight, else how long since the last byte.
    fn idle_ms(&self) -> Option<i64> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        Some(self.now_ms().saturating_sub(self.last_io.load(Ordering::Relaxed)) as i64)
    }
}

struct Entry {
    ip: IpAddr,
    certless: bool,
    activity: Arc<Activity>,
    evict: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, Entry>,
    certless_by_ip: HashMap<IpAddr, usize>,
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if e.certless {
            self.uncount(e.ip);
        }
        Some(e)
    }
    fn uncount(&mut self, ip: IpAddr) {
        if let Some(n) = self.certless_by_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                self.certless_by_ip.remove(&ip);
            }
        }
    }
    /// Drop the longest-idle certless connection among those `matching`.
    fn evict(&mut self, matching: impl Fn(&Entry) -> bool) -> bool {
        let candidates = self
            .conns
            .iter()
            .filter(|(_, e)| e.certless && matching(e))
            .map(|(id, e)| Candidate {
                id: *id,
                idle_ms: e.activity.idle_ms(),
            });
        let Some(id) = link::victim(candidates, EVICT_MIN_IDLE_MS) else {
            return false;
        };
        if let Some(e) = self.remove(id) {
            tracing::debug!(remote = %e.ip, "closing an idle connection to make room");
            e.evict.notify_one();
        }
        true
    }
}

/// Every open connection, for admission (see the module docs).
struct ConnTable {
    epoch: Instant,
    inner: Mutex<Inner>,
}

/// A connection's place in the table; dropping it frees the place.
struct Slot {
    table: Arc<ConnTable>,
    id: u64,
    activity: Arc<Activity>,
    evict: Arc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.table.lock().remove(self.id);
    }
}

impl ConnTable {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn len(&self) -> usize {
        self.lock().conns.len()
    }

    /// A place for a new connection from `ip`, or None when it must be refused.
    fn admit(self: &Arc<Self>, ip: IpAddr, limits: &ConnLimits) -> Option<Slot> {
        let mut g = self.lock();
        let from_ip = g.certless_by_ip.get(&ip).copied().unwrap_or(0);
        let room = match link::admit(g.conns.len(), from_ip, limits) {
            Admit::Accept => true,
            Admit::EvictSameSource => g.evict(|e| e.ip == ip),
            Admit::EvictAny => g.evict(|_| true),
        };
        if !room {
            return None;
        }
        let id = g.next_id;
        g.next_id += 1;
        let activity = Arc::new(Activity::new(self.epoch));
        let evict = Arc::new(Notify::new());
        g.conns.insert(
            id,
            Entry {
                ip,
                certless: true,
                activity: activity.clone(),
                evict: evict.clone(),
            },
        );
        *g.certless_by_ip.entry(ip).or_default() += 1;
        Some(Slot {
            table: self.clone(),
            id,
            activity,
            evict,
        })
    }

    /// The connection showed a node certificate: it no longer counts against its address.
    fn certified(&self, id: u64) {
        let mut g = self.lock();
        let ip = match g.conns.get_mut(&id) {
            Some(e) if e.certless => {
                e.certless = false;
                e.ip
            }
            _ => return,
        };
        g.uncount(ip);
    }
}

/// Logs a repeating problem at most once per `every`, with how many were not logged.
pub(crate) struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub(crate) const fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }
    /// Some(number not logged since the last time) when this one should be logged.
    pub(crate) fn check(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.duration_since(t) < self.every => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

/// Accept TLS connections until `shutdown` flips, then give open connections a moment to
/// finish and drop the rest.
pub async fn serve(
    listener: TcpListener,
    tls: TlsAcceptor,
    router: Router,
    cfg: ServeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let table = Arc::new(ConnTable::new());
    let mut conns = JoinSet::new();
    let mut accept_errors = Throttle::new(Duration::from_secs(10));
    let mut refusals = Throttle::new(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, remote)) => match table.admit(remote.ip(), &cfg.limits) {
                    Some(slot) => {
                        conns.spawn(serve_conn(tcp, remote, slot, tls.clone(), router.clone(), cfg, shutdown.clone()));
                    }
                    None => {
                        if let Some(more) = refusals.check(Instant::now()) {
                            tracing::warn!(%remote, open = table.len(), max = cfg.limits.max_total,
                                per_source = cfg.limits.max_certless_per_ip, not_logged = more,
                                "refusing a connection: the hub holds as many as it may and none is idle");
                        }
                        drop(tcp);
                    }
                },
                Err(e) => {
                    if let Some(more) = accept_errors.check(Instant::now()) {
                        tracing::warn!(error = %e, open = table.len(), not_logged = more,
                            "accept failed; if this is \"Too many open files\", raise the hub's descriptor limit (LimitNOFILE)");
                    }
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

/// How long an idle connection waits before the hub probes it (TCP keepalive), by default.
pub const KEEPALIVE_IDLE: Duration = Duration::from_secs(90);
/// Two unanswered probes (or data unacknowledged as long) end the connection.
pub const KEEPALIVE_PROBES: u32 = 2;

/// Probes a ninth of the idle time apart, between 1 and 10 s (10 s for the default 90 s).
fn keepalive_interval(idle: Duration) -> Duration {
    (idle / 9).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Find dead peers of held connections from the hub's side: a node whose box lost power
/// while holding a long-poll (no FIN, no RST) is noticed within
/// idle + probes x interval (110 s by default) and turns Offline, without the node sending
/// anything (docs/protocol.md §11). Costs two bare TCP segments per idle `idle`.
fn keep_alive(tcp: &tokio::net::TcpStream, idle: Duration) -> std::io::Result<()> {
    let s = socket2::SockRef::from(tcp);
    let interval = keepalive_interval(idle);
    s.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(idle)
            .with_interval(interval)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    s.set_tcp_user_timeout(Some(idle + interval * KEEPALIVE_PROBES))
}

/// What the agent on a connection said about its own keepalive (docs/protocol.md §12). An
/// agent that probes its idle connection every N s says so on each sync (`ka=N`); the hub
/// then stops probing that connection and instead watches the segments arriving on it
/// (`tcpi_segs_in` counts the agent's bare probes too): one probe pair per period serves both
/// ends, and a silence past `outpost_core::link::peer_silent` ends the connection.
#[derive(Debug, Default)]
pub struct ConnLiveness {
    agent_probe_secs: AtomicU64,
    /// Wakes the connection's loop when the announcement changed, so the watch starts at once.
    changed: Notify,
}

impl ConnLiveness {
    /// The agent probes every `secs` of idle time (clamped to `link::AGENT_PROBE_SECS`).
    pub fn agent_probes(&self, secs: u64) {
        let r = link::AGENT_PROBE_SECS;
        let secs = secs.clamp(*r.start(), *r.end());
        if self.agent_probe_secs.swap(secs, Ordering::Relaxed) != secs {
            self.changed.notify_one();
        }
    }

    fn probe_ms(&self) -> Option<i64> {
        match self.agent_probe_secs.load(Ordering::Relaxed) {
            0 => None,
            s => Some(s as i64 * 1000),
        }
    }
}

/// What `TCP_INFO` says of a socket's receiving side: the segments received so far
/// (`tcpi_segs_in`, Linux 4.2+, bare keepalive probes included) and how long ago the last data
/// or ACK came (`tcpi_last_data_recv`, `tcpi_last_ack_recv`, ms; probes move neither).
struct Received {
    segs: u32,
    recv_ago_ms: u32,
}

fn received(fd: std::os::fd::RawFd) -> Option<Received> {
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `fd` is the open socket of a connection this task still owns (the caller holds
    // it), and `info`/`len` describe a writable buffer of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (rc == 0 && len as usize >= std::mem::size_of::<libc::tcp_info>()).then_some(Received {
        segs: info.tcpi_segs_in,
        recv_ago_ms: info.tcpi_last_data_recv.min(info.tcpi_last_ack_recv),
    })
}

/// The hub's watch of an agent-probed connection: the segment count last seen, when the agent
/// was last heard (or the hub started asking), the last look, and whether the hub is probing
/// it itself. Times are ms since `start` (`outpost_core::link::{heard_at, next_look_ms}`).
struct SegsWatch {
    segs: Option<u32>,
    start: Instant,
    since_ms: i64,
    looked_ms: i64,
    asking: bool,
}

/// The TCP stream, recording when bytes move.
struct Tracked {
    io: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            me.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.activity.touch();
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        let r = Pin::new(&mut me.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            me.activity.touch();
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Counts a request as in flight until its handler has answered.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        a.requests.fetch_add(1, Ordering::Relaxed);
        Self(a)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A request body that, when dropped unread (an early error answer), reads and discards the
/// rest in the background, so the stream ends cleanly after the answer (see the module docs).
pub struct DrainOnDrop {
    inner: Option<Incoming>,
}

impl DrainOnDrop {
    pub fn new(body: Incoming) -> Self {
        Self { inner: Some(body) }
    }
}

impl hyper::body::Body for DrainOnDrop {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut().inner.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map(|b| b.size_hint()).unwrap_or_default()
    }
}

impl Drop for DrainOnDrop {
    fn drop(&mut self) {
        let Some(mut body) = self.inner.take() else { return };
        if body.is_end_stream() {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let mut left = DRAIN_LIMIT;
            let read = async {
                while let Some(Ok(frame)) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
                    let n = frame.data_ref().map_or(0, |d| d.len());
                    if n >= left {
                        return;
                    }
                    left -= n;
                }
            };
            let _ = tokio::time::timeout(DRAIN_TIME, read).await;
        });
    }
}

async fn serve_conn(
    tcp: TcpStream,
    remote: SocketAddr,
    slot: Slot,
    tls: TlsAcceptor,
    router: Router,
    cfg: ServeConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    if let Err(e) = keep_alive(&tcp, cfg.keepalive) {
        tracing::debug!(%remote, error = %e, "cannot set TCP keepalive; a dead peer of this connection is found only by its timeouts");
    }
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tcp);
    let liveness = Arc::new(ConnLiveness::default());
    let tracked = Tracked {
        io: tcp,
        activity: slot.activity.clone(),
    };
    let stream = tokio::select! {
        r = tokio::time::timeout(cfg.header_read_timeout, tls.accept(tracked)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%remote, "TLS handshake timed out");
                return;
            }
        },
        _ = slot.evict.notified() => return,
    };
    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first());
    let closed = tokio_util::sync::CancellationToken::new();
    // Whatever ends this connection (close, error, keepalive failure, eviction) ends the
    // long-polls held on it.
    let _closed_on_return = closed.clone().drop_guard();
    let peer = Peer {
        cert_fp: cert.map(|c| outpost_pki::fingerprint(c.as_ref())),
        cert_not_after: cert
            .and_then(|c| outpost_pki::not_after_der(c.as_ref()).ok())
            .map(|s| s.saturating_mul(1000)),
        closed: Some(closed),
        remote: Some(remote),
        liveness: Some(liveness.clone()),
    };
    if peer.cert_fp.is_some() {
        slot.table.certified(slot.id);
    }
    let activity = slot.activity.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(peer.clone());
        let busy = Busy::new(activity.clone());
        let answer = router.clone().oneshot(req.map(DrainOnDrop::new));
        async move {
            let r = answer.await;
            drop(busy);
            r
        }
    });
    // HTTP/2 when the client offers it (agents do: the long-poll and status reports then share
    // one connection), HTTP/1.1 otherwise.
    let mut builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
    // hyper's head timer also runs while a kept-alive connection waits for its next request,
    // so it gets the idle timeout; the first request must start within header_read_timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.idle_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    let mut watch: Option<SegsWatch> = None;
    loop {
        // An agent that probes this connection itself: stop the hub's probes, watch its.
        let mut check = None;
        if let Some(probe_ms) = liveness.probe_ms() {
            // SAFETY: `fd` belongs to the connection `conn` owns, alive while this loop runs.
            let sock = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let sock = socket2::SockRef::from(&sock);
            let w = watch.get_or_insert_with(|| {
                if let Err(e) = sock.set_keepalive(false) {
                    tracing::debug!(%remote, error = %e, "cannot stop the hub's keepalive probes");
                }
                SegsWatch {
                    segs: received(fd).map(|r| r.segs),
                    start: Instant::now(),
                    since_ms: 0,
                    looked_ms: 0,
                    asking: false,
                }
            });
            let now_ms = w.start.elapsed().as_millis() as i64;
            let got = received(fd);
            let now_segs = got.as_ref().map(|r| r.segs);
            let moved = now_segs != w.segs;
            if moved {
                w.segs = now_segs;
                let recv_ms = got.map(|r| now_ms - i64::from(r.recv_ago_ms));
                w.since_ms = link::heard_at(now_ms, w.looked_ms, link::look_step_ms(probe_ms), recv_ms);
            }
            w.looked_ms = now_ms;
            let quiet = now_ms - w.since_ms;
            match link::watch_step(w.asking, moved, quiet, probe_ms) {
                link::Watch::Wait => {}
                link::Watch::StopAsking => {
                    w.asking = false;
                    let _ = sock.set_keepalive(false);
                }
                link::Watch::Ask => {
                    // two probes a second apart; the kernel ends the connection when neither
                    // is answered (behind a TCP load balancer, the balancer answers them)
                    tracing::debug!(%remote, silent_ms = quiet, probe_ms, "no keepalive probe from the agent; probing it");
                    w.asking = true;
                    w.since_ms = now_ms;
                    if let Err(e) = sock.set_tcp_keepalive(
                        &socket2::TcpKeepalive::new()
                            .with_time(Duration::from_secs(1))
                            .with_interval(Duration::from_secs(1))
                            .with_retries(KEEPALIVE_PROBES),
                    ) {
                        tracing::debug!(%remote, error = %e, "cannot probe; closing the silent connection");
                        return;
                    }
                }
                link::Watch::Close => {
                    tracing::debug!(%remote, "the agent's connection answers neither its probes nor ours; closing it");
                    return;
                }
            }
            let next = link::next_look_ms(probe_ms, w.since_ms, now_ms, w.asking);
            check = Some(Duration::from_millis(next.max(1) as u64));
        }
        let idle = if slot.activity.requests.load(Ordering::Relaxed) == 0 {
            cfg.header_read_timeout
        } else {
            cfg.idle_timeout
        }
        .as_millis() as i64;
        let wait = match slot.activity.idle_ms() {
            Some(i) if i >= idle => {
                tracing::debug!(%remote, idle_ms = i, "closing an idle connection");
                break;
            }
            Some(i) => idle - i,
            None => idle,
        };
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%remote, error = %e, "connection ended with an error");
                }
                return;
            }
            _ = shutdown.changed() => break,
            _ = slot.evict.notified() => return,
            _ = tokio::time::sleep(Duration::from_millis(wait.max(1) as u64).min(check.unwrap_or(Duration::MAX))) => {}
            _ = liveness.changed.notified() => {}
        }
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_logs_once_per_period_with_the_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(t.check(t0), Some(0));
        assert_eq!(t.check(t0 + Duration::from_secs(1)), None);
        assert_eq!(t.check(t0 + Duration::from_secs(9)), None);
        assert_eq!(t.check(t0 + Duration::from_secs(10)), Some(2));
        assert_eq!(t.check(t0 + Duration::from_secs(11)), None);
    }

    #[test]
    fn table_counts_certless_connections_and_evicts_the_idle() {
        // an epoch a minute back, so "idle since the epoch" means idle for a minute
        let mut table = ConnTable::new();
        table.epoch = Instant::now().checked_sub(Duration::from_secs(60)).expect("uptime");
        let table = Arc::new(table);
        let limits = ConnLimits {
            max_total: 3,
            max_certless_per_ip: 2,
        };
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let s1 = table.admit(a, &limits).expect("room");
        let s2 = table.admit(a, &limits).expect("room");
        // a holds its two certless places, none idle for a second: refused
        assert!(table.admit(a, &limits).is_none());
        // once one shows a certificate, a has room again
        table.certified(s1.id);
        let s3 = table.admit(a, &limits).expect("room after a certificate");
        assert_eq!(table.len(), 3);
        // full: b's connection needs an idle certless one to go; s2 and s3 are not idle yet
        assert!(table.admit(b, &limits).is_none());
        s2.activity.last_io.store(0, Ordering::Relaxed);
        s3.activity.last_io.store(0, Ordering::Relaxed);
        s3.activity.busy.fetch_add(1, Ordering::Relaxed);
        let s4 = table.admit(b, &limits).expect("s2 made room");
        assert!(!table.lock().conns.contains_key(&s2.id), "s2 evicted");
        assert!(table.lock().conns.contains_key(&s1.id), "certified ones stay");
        // the evicted connection's slot is released without harm
        drop(s2);
        assert_eq!(table.len(), 3);
        drop((s1, s3, s4));
        assert_eq!(table.len(), 0);
        assert!(table.lock().certless_by_ip.is_empty());
    }
}
