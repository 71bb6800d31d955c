//! The outpost hub: the HTTPS server agents dial out to and operators talk to (docs/protocol.md).
//!
//! Owns: the hub's data directory (CA, server certificate, admin token, SQLite database), the
//! main store on SQLite or PostgreSQL ([`store`]), join
//! (with the node-label rules of `outpost_core::link`) and two-phase certificate renewal (also
//! of expired certificates), the connection budget, authorization of every route, durable storage of objects, nodes,
//! per-node desired state with generations, statuses and events, and the long-poll that hands
//! each node its desired state. Must never: decide placement or render workloads itself (that is
//! `outpost-core`, called from [`scheduler`]), parse manifests beyond calling `outpost-api`, trust
//! anything a node says about another node, or block an async task on SQLite: SQLite calls are
//! short statements run on the blocking pool, and errors become HTTP answers only in
//! [`error::HubError`].

//!
//! Module layers (arrows point one way): `server` (TLS, connections, routes) -> `api`,
//! `images` (handlers) -> `extract` -> `service` (the command layer: [`service::Command`],
//! [`service::Query`], the node protocol) -> `store`, `monitor`, `data`, `logs`, `metrics`,
//! `rollouts`, `scheduler`, `validate`, `views`, `error`; `controllers` (`alerts`, `webhook`)
//! -> `service`.

pub mod accounts;
pub mod accounts_api;
pub mod alerts;
pub mod api;
pub mod authz;
pub mod controllers;
pub mod dashboard;
pub mod data;
pub mod error;
pub mod exec;
pub mod exec_api;
pub mod extract;
pub mod files;
pub mod gitops;
pub mod gitops_api;
pub mod gitops_fetch;
pub mod images;
pub mod logs;
pub mod metrics;
pub mod models;
pub mod monitor;
pub mod node_vitals;
pub mod openapi;
pub mod replicas;
pub mod rollouts;
pub mod scheduler;
pub mod server;
pub mod service;
pub mod session;
pub mod store;
pub mod sync_reads;
pub mod validate;
pub mod views;
pub mod webhook;
pub mod witness;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use error::HubError;
pub use server::Peer;
pub use store::{PgStore, SqliteStore, Store};

pub use outpost_api::now_ms;

/// Variable that caps the hub's tokio blocking pool ([`blocking_threads`]).
pub const BLOCKING_THREADS_ENV: &str = "OUTPOST_HUB_BLOCKING_THREADS";

/// Default cap of the hub's blocking pool. What runs there: the SQLite store's calls (they
/// take turns on its one connection, so a thread beyond the few that keep it busy only
/// waits), the alert monitor's calls on its own connection, the pipeline records, accounts,
/// password hashing, scheduling plans (CPU: no faster with more threads than cores), file
/// reads of blob downloads (`tokio::fs`) and webhook DNS look-ups. Every one is short, none
/// waits for another blocking task, and the pool's queue is first come, first served: with
/// the pool full, a call waits for the calls ahead of it, not for a long task, so a monitor
/// call or a sync's store read waits a few store calls at most. 16 is enough to keep the one
/// store connection, the monitor's, two cores of CPU work and a few file reads going at once;
/// tokio's own default (512) let a join storm grow 515 threads that all waited on the one
/// connection (BENCHMARKS.md §4), each with its stack and malloc cache.
pub const DEFAULT_BLOCKING_THREADS: usize = 16;

/// The blocking-pool cap from the value of [`BLOCKING_THREADS_ENV`] (None: the default).
pub fn blocking_threads(value: Option<&str>) -> Result<usize, String> {
    let Some(v) = value else {
        return Ok(DEFAULT_BLOCKING_THREADS);
    };
    match v.trim().parse::<usize>() {
        Ok(n) if (1..=4096).contains(&n) => Ok(n),
        _ => Err(format!(
            "{BLOCKING_THREADS_ENV}={v:?} is not a thread count from 1 to 4096; unset it for the default ({DEFAULT_BLOCKING_THREADS})"
        )),
    }
}

/// Default grace period before a silent node counts as Offline.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(90);

#[derive(Clone, Debug)]
pub struct HubConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Host names or IPs (or URLs, whose host is used) for the server certificate; `localhost`
    /// and `127.0.0.1` are always added.
    pub advertise: Vec<String>,
    /// The hub endpoints agents are told (join and sync answers, docs/protocol.md §6): `https://`
    /// URLs of every replica, or one load-balancer URL. Normalized (sorted, deduplicated) at
    /// start; empty: agents keep the URL they joined through.
    pub endpoints: Vec<String>,
    /// The secret the CA key is sealed under at rest (`files::ca_secret`); None: stored as PEM.
    pub ca_secret: Option<Vec<u8>>,
    /// A node is Offline when the hub has had no contact for this long (default 90 s).
    pub offline_after: Duration,
    /// How long a sync long-poll is held open without changes (default 30 s).
    pub long_poll: Duration,
    /// Webhook URLs that receive every alert firing and resolution (`--webhook`).
    pub webhooks: Vec<String>,
    /// A node silent this long raises the `NodeOffline` alert (default 5 min).
    pub node_offline_alert: Duration,
    /// Which host paths workloads may mount (`--host-paths`, `--host-path-allow`).
    pub host_paths: validate::HostPathPolicy,
    /// How long the node certificates the hub signs are valid (default 90 days).
    pub node_cert_lifetime: Duration,
    /// Close a connection after this long without bytes and without a request in flight
    /// (default 90 s; agents always hold a long-poll, so this only closes idle ones); also the
    /// longest wait for an HTTP/1 request head.
    pub idle_timeout: Duration,
    /// The TLS handshake must finish, and the first request start, within this (default 10 s).
    pub header_read_timeout: Duration,
    /// Probe a connection idle this long with TCP keepalive (default 90 s): a node whose box
    /// died while holding its long-poll turns Offline within this + 20 s.
    pub keepalive: Duration,
    /// Connections one source address may hold without a node certificate (default: a quarter
    /// of the connection budget, at most 128; see `outpost_core::link::budget`).
    pub max_conns_per_ip: Option<usize>,
    /// How long browser sessions last (idle and absolute; docs/accounts.md).
    pub sessions: session::SessionLimits,
    /// Audit entries older than this are removed (default 90 days; at most
    /// `accounts::AUDIT_MAX_ROWS` are kept).
    pub audit_max_age: Duration,
    /// Where the main store lives: `None` is SQLite (`hub.db` in the data dir), a
    /// `postgres://` URL is PostgreSQL (`--store`; docs/postgres.md). The monitoring, pipeline
    /// and account tables stay in `hub.db` either way, for now.
    pub store: Option<String>,
    /// Replicas on a shared PostgreSQL store look for changes made through the others at least
    /// this often, notification or not (`crate::replicas`).
    pub replica_poll: Duration,
}

impl HubConfig {
    /// Defaults for everything but where to listen and where to keep data.
    pub fn new(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            listen,
            data_dir,
            advertise: Vec::new(),
            endpoints: Vec::new(),
            ca_secret: None,
            offline_after: DEFAULT_OFFLINE_AFTER,
            long_poll: Duration::from_secs(outpost_api::LONG_POLL_SECS),
            webhooks: Vec::new(),
            node_offline_alert: Duration::from_secs(300),
            host_paths: validate::HostPathPolicy::default(),
            node_cert_lifetime: outpost_pki::NODE_CERT_LIFETIME,
            idle_timeout: Duration::from_secs(90),
            keepalive: server::KEEPALIVE_IDLE,
            header_read_timeout: Duration::from_secs(10),
            max_conns_per_ip: None,
            sessions: session::SessionLimits::default(),
            audit_max_age: accounts::AUDIT_MAX_AGE,
            store: None,
            replica_poll: Duration::from_secs(5),
        }
    }
}

/// A running hub. Stop it with [`Hub::shutdown`]; dropping it leaves the server running.
pub struct Hub {
    /// The address actually bound (the configured port may be 0).
    pub addr: SocketAddr,
    pub ca_pem: String,
    /// SHA-256 of the CA certificate (the pin in join tokens).
    pub ca_fingerprint: String,
    /// The admin token; empty on a PostgreSQL replica that did not create it and has no copy
    /// in its data dir (docs/postgres.md).
    pub admin_token: String,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// The data dir's hub lock, held shared (SQLite; `store::migrate`).
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl Hub {
    /// Start serving. The first start creates the data directory (0700), CA, server
    /// certificate, admin token and database; later starts reuse them (re-issuing the server
    /// certificate when the advertised names changed). Returns the admin token as
    /// `created_admin_token` on first start only, so it can be printed once.
    pub async fn start(cfg: HubConfig) -> anyhow::Result<(Hub, Option<String>)> {
        outpost_pki::install_provider();
        ignore_file_size_signal();
        server::limit_malloc_arenas();
        let limits = connection_limits(cfg.max_conns_per_ip);
        let data_dir = files::DataDir::new(cfg.data_dir.clone());
        let db_path = data_dir.path("hub.db");
        let monitor_db = db_path.clone();
        let advertise = cfg.advertise.clone();
        let on_sqlite = cfg.store.is_none();
        let ca_secret = cfg.ca_secret.clone();
        // On SQLite the CA and admin token live in the data dir; on PostgreSQL in the database
        // (`store::authority`), loaded below once the store is open.
        let (material, sqlite, lock) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            if !on_sqlite {
                return Ok((None, None, None));
            }
            let material = data_dir.load_or_create(&advertise, ca_secret.as_deref())?;
            // Held while the hub runs: `outpost hub migrate` refuses a running hub.
            let lock = store::migrate::hold_hub_lock(&data_dir.root)?;
            let store = SqliteStore::open(&db_path).with_context(|| format!("cannot open {}", db_path.display()))?;
            Ok((Some(material), Some(store), Some(lock)))
        })
        .await
        .context("hub start-up task failed")??;
        // The monitoring tables and the controllers' leases live with the store: in hub.db on
        // SQLite, in the store's database on PostgreSQL (nothing of them in the data dir).
        #[allow(clippy::type_complexity)]
        let (store, monitor, pg): (Arc<dyn Store>, Arc<dyn monitor::MonitorStore>, Option<sqlx::PgPool>) =
            match (sqlite, &cfg.store) {
                (Some(s), _) => {
                    let path = monitor_db.clone();
                    let hooks = cfg.webhooks.clone();
                    let m = tokio::task::spawn_blocking(move || monitor::SqliteMonitor::open(&path, hooks))
                        .await
                        .context("hub start-up task failed")?
                        .with_context(|| format!("cannot open the monitoring tables in {}", monitor_db.display()))?;
                    (Arc::new(s), Arc::new(monitor::SqliteMonitorStore(Arc::new(m))), None)
                }
                (None, Some(url)) => {
                    let pg = store::PgStore::connect(url).await.with_context(|| {
                        format!(
                            "cannot open the PostgreSQL store {}; check that the server runs and the URL is right",
                            store::pg_redact(url)
                        )
                    })?;
                    let m = pg.monitor(cfg.webhooks.clone());
                    let pool = pg.pool();
                    (Arc::new(pg), Arc::new(m), Some(pool))
                }
                (None, None) => anyhow::bail!("no store configured"),
            };
        let material = match (material, &pg) {
            (Some(m), _) => m,
            (None, Some(pool)) => store::authority::load_or_create(
                pool,
                &files::DataDir::new(cfg.data_dir.clone()),
                &cfg.advertise,
                cfg.ca_secret.as_deref(),
            )
            .await
            .context("cannot load the hub's CA from the PostgreSQL store")?,
            (None, None) => anyhow::bail!("no store configured"),
        };

        let ca_fingerprint = material.ca.fingerprint().context("ca.pem is not a valid certificate")?;
        let tls = outpost_pki::server_config(&material.ca, &material.server_chain_pem, &material.server_key_pem)
            .context("cannot build the TLS configuration from server.pem/server.key; delete server.* to re-issue")?;
        let monitor_cfg = monitor::MonitorConfig {
            webhooks: cfg.webhooks.clone(),
            offline_alert: cfg.node_offline_alert,
            ..Default::default()
        };
        // Accounts, sessions, audit and pipeline records: in the shared database on PostgreSQL
        // (every replica sees them), in hub.db on SQLite.
        let (data, accounts): (data::DataStore, Arc<dyn store::AccountStore>) = match &pg {
            Some(pool) => (
                data::DataStore::on(Arc::new(store::records::PgRecords::new(pool.clone()))),
                Arc::new(store::accounts::PgAccounts::new(pool.clone(), cfg.audit_max_age)),
            ),
            None => (
                data::DataStore::open(&monitor_db)
                    .with_context(|| format!("cannot open the pipeline data tables in {}", monitor_db.display()))?,
                Arc::new(store::accounts::SqliteAccounts(Arc::new(
                    accounts::Accounts::open(&monitor_db, cfg.audit_max_age)
                        .with_context(|| format!("cannot open the account tables in {}", monitor_db.display()))?,
                ))),
            ),
        };
        let settings = service::Settings {
            offline_after: cfg.offline_after,
            long_poll: cfg.long_poll,
            images_dir: cfg.data_dir.join("images"),
            host_paths: cfg.host_paths.clone(),
            monitor: monitor_cfg,
            hubs: outpost_core::hubs::normalize(&cfg.endpoints).map_err(anyhow::Error::msg)?,
        };
        let authority = service::Authority {
            ca: material.ca.clone(),
            ca_fingerprint: ca_fingerprint.clone(),
            admin_token_sha256: material.admin_token_sha256,
            node_cert_lifetime: cfg.node_cert_lifetime,
        };
        images::sweep_stale_uploads(&settings.images_dir);
        let blobs = match &pg {
            Some(pool) => store::blobs::BlobStore::Pg {
                pool: pool.clone(),
                upload_dir: settings.images_dir.clone(),
            },
            None => store::blobs::BlobStore::Disk(settings.images_dir.clone()),
        };
        let svc = Arc::new(service::Service::new(
            store,
            monitor,
            Arc::new(data),
            authority,
            settings,
            accounts,
            cfg.sessions,
            blobs,
        ));
        svc.spawn_status_writer();
        svc.spawn_sync_readers();
        svc.spawn_join_writer();
        // Catch up on anything committed before a crash but not yet scheduled.
        svc.reschedule(now_ms()).await.context("initial scheduling failed")?;

        let listener = tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| {
            format!(
                "cannot listen on {}; is another hub running? pick another --listen",
                cfg.listen
            )
        })?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        controllers::spawn_all(&svc, stopped.clone());
        replicas::spawn(&svc, cfg.replica_poll, stopped.clone());
        let serve_cfg = server::ServeConfig {
            limits,
            idle_timeout: cfg.idle_timeout,
            header_read_timeout: cfg.header_read_timeout,
            keepalive: cfg.keepalive,
        };
        let task = tokio::spawn(server::serve(
            listener,
            acceptor,
            server::router(svc),
            serve_cfg,
            stopped,
        ));
        tracing::info!(addr = %addr, data_dir = %cfg.data_dir.display(), ca_fingerprint = %ca_fingerprint,
            max_connections = limits.max_total, max_certless_per_source = limits.max_certless_per_ip, "hub listening");
        let hub = Hub {
            addr,
            ca_pem: material.ca.cert_pem,
            ca_fingerprint,
            admin_token: material.admin_token,
            stop,
            task,
            _lock: lock,
        };
        Ok((hub, material.created_admin_token))
    }

    /// Stop accepting, give open requests a moment, close the database.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        if let Err(e) = self.task.await {
            tracing::error!(error = %e, "hub server task failed");
        }
    }
}

/// A write past the file size limit (`ulimit -f`) then fails with EFBIG, which the hub reports
/// (`insufficient_storage`), instead of killing the hub with SIGXFSZ.
fn ignore_file_size_signal() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    // SAFETY: SIG_IGN installs no handler code; nothing else in the hub handles SIGXFSZ.
    if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
        tracing::warn!(error = %e, "cannot ignore SIGXFSZ; a file size limit would stop the hub");
    }
}

/// Raise the descriptor limit to its hard limit, and size the connection budget from it.
fn connection_limits(per_ip: Option<usize>) -> outpost_core::link::ConnLimits {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let nofile = match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the descriptor limit; assuming 1024");
            1024
        }
    };
    let mut limits = outpost_core::link::budget(nofile);
    if let Some(n) = per_ip {
        limits.max_certless_per_ip = n.max(1);
    }
    limits
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_threads_from_the_environment() {
        let check = |value: Option<&str>, expected: Result<usize, ()>| {
            let got = blocking_threads(value);
            match (&got, expected) {
                (Ok(n), Ok(e)) => assert_eq!(*n, e, "{value:?}"),
                (Err(msg), Err(())) => {
                    assert!(msg.contains(BLOCKING_THREADS_ENV), "{msg}");
                    assert!(msg.contains("1 to 4096"), "{msg}");
                }
                _ => panic!("{value:?}: got {got:?}, expected {expected:?}"),
            }
        };
        check(None, Ok(DEFAULT_BLOCKING_THREADS));
        check(Some("1"), Ok(1));
        check(Some(" 64 "), Ok(64));
        check(Some("4096"), Ok(4096));
        check(Some("0"), Err(()));
        check(Some("4097"), Err(()));
        check(Some("-3"), Err(()));
        check(Some("lots"), Err(()));
        check(Some(""), Err(()));
    }
}
