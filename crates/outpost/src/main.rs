//! The `outpost` binary: argument parsing and wiring only. The hub lives in `outpost-hub`, the
//! agent in `outpost-agent`, decisions in `outpost-core`; this crate turns command lines into
//! calls to them and answers into tables or JSON/YAML.

mod client;
mod data;
mod demo;
mod exec;
mod gitops;
mod image;
mod install;
mod kustomize;
mod logs;
mod model;
mod output;
mod user;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "outpost",
    version,
    about = "Run software on fleets of small edge sites from one place."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub (HTTPS API for agents and operators, built-in CA, embedded SQLite).
    Hub(HubArgs),
    /// Manage join tokens.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Run the agent on an edge box, or join it to a hub.
    Agent(AgentArgs),
    /// Store the hub URL and a token (the admin token or an account token) for the other commands.
    Login(LoginArgs),
    /// Create or update objects from manifest files (several documents per file), or from the
    /// render of a kustomization directory (-k).
    Apply {
        /// A file or a directory of .yaml/.yml files; repeatable.
        #[arg(short = 'f', long = "filename", required_unless_present = "kustomize")]
        files: Vec<PathBuf>,
        /// A kustomization directory, rendered by outpost's Kustomize engine.
        #[arg(short = 'k', long = "kustomize", conflicts_with = "files")]
        kustomize: Option<PathBuf>,
        /// Apply over objects a GitRepo owns; its next commit puts the repository's version back.
        #[arg(long)]
        force: bool,
    },
    /// Show what applying a kustomization directory would create, change (field by field) or
    /// delete at the hub, without changing anything.
    Diff {
        /// The kustomization directory.
        #[arg(short = 'k', long = "kustomize")]
        kustomize: PathBuf,
    },
    /// Kustomize, offline: render a kustomization directory as `kubectl kustomize` does.
    Kustomize {
        #[command(subcommand)]
        cmd: kustomize::KustomizeCmd,
    },
    /// Delete objects named in files, or one object by kind and name.
    Delete(DeleteArgs),
    /// List nodes, deployments, daemonsets, workloads, rollouts, pipelines or alerts.
    Get {
        /// nodes | deployments | daemonsets | workloads | rollouts | pipelines | alerts
        what: String,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Show one node or workload in detail, with its recent events.
    Describe {
        /// node | deployment | daemonset
        kind: String,
        name: String,
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Follow Git repositories (Kustomize base + overlays) and roll out each commit.
    Gitops {
        #[command(subcommand)]
        cmd: gitops::GitopsCmd,
    },
    /// Images delivered through the hub, for sites with no registry.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// Fleet rollouts: status (waves, nodes, reasons), pause, resume, abort, undo, history.
    Rollout {
        #[command(subcommand)]
        cmd: RolloutCmd,
    },
    /// Start a hub and three agents on this machine with a sample app, and show what runs where.
    Demo(demo::DemoArgs),
    /// A workload's log from its node (fetched through the node's own outbound link), or the
    /// error lines nodes forwarded (--errors).
    Logs(logs::LogsArgs),
    /// Run a command in a workload's container on a node (or a node shell), through the node's
    /// own outbound link: `outpost exec NODE WORKLOAD [-c C] [-i] [-t] -- CMD...`.
    Exec(exec::ExecArgs),
    /// Records of the edge data pipeline stored at the hub: tail or query a stream.
    Data {
        #[command(subcommand)]
        cmd: data::DataCmd,
    },
    /// ONNX models delivered through the hub (docs/inference.md).
    Model {
        #[command(subcommand)]
        cmd: ModelCmd,
    },
    /// Serve one ONNX model over HTTP (KServe v2 and POST /infer). The agent runs this for
    /// workloads with `runtimeClassName: onnx` (docs/inference.md); it also runs by hand.
    ServeModel(ServeModelArgs),
    /// Operator accounts: roles (admin, operator, viewer, metrics), label scopes, tokens
    /// (docs/accounts.md).
    User {
        #[command(subcommand)]
        cmd: user::UserCmd,
    },
    /// The audit log of every change (who, what, when, from where, result); admin only.
    Audit {
        /// Only entries newer than this (e.g. 1h, 7d).
        #[arg(long)]
        since: Option<String>,
        /// Only this account's entries (`admin` is the first-start admin token).
        #[arg(long)]
        user: Option<String>,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 1000)]
        limit: u32,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Measure outpost: agent footprint, propagation, offline recovery, bandwidth, fleet scale (simulator).
    Bench(outpost_bench::BenchArgs),
}

#[derive(Subcommand)]
enum ModelCmd {
    /// Upload an ONNX file to the hub (stored once per content) and name it.
    Push {
        file: PathBuf,
        /// e.g. digits:v2; workloads name it as `image` with runtimeClassName: onnx.
        #[arg(long)]
        name: String,
    },
    /// List the models the hub holds.
    Ls,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Upload an image from the local Docker Engine to the hub (stored once per content).
    Push {
        /// e.g. my-app:v1.2.3
        image: String,
        #[arg(long, env = "OUTPOST_DOCKER_SOCKET", default_value = outpost_agent::docker::DEFAULT_SOCKET)]
        docker_socket: String,
    },
    /// List the images the hub holds.
    Ls,
}

#[derive(Subcommand)]
enum RolloutCmd {
    /// List a workload's revisions.
    History(RolloutTarget),
    /// Roll back. During a rollout: every updated node returns to its previous revision (nodes
    /// not yet updated are untouched). After it, or with --to-revision N: that revision's
    /// template (the previous one by default) becomes a new revision, sent to every node in
    /// one wave.
    Undo {
        #[command(flatten)]
        target: RolloutTarget,
        #[arg(long)]
        to_revision: Option<u64>,
    },
    /// The rollout of the current revision: waves, node counts per state, per-node reasons.
    Status {
        #[command(flatten)]
        target: RolloutTarget,
        /// Watch until the rollout ends (progress bars on a terminal; with -o json, one JSON
        /// object per line on each change). Exits 1 if it Failed, was rolled back or aborted.
        #[arg(short = 'w', long)]
        watch: bool,
        #[arg(short = 'o', long, value_enum, default_value_t = Format::Table)]
        output: Format,
    },
    /// Stop opening waves: no further node gets the revision until `resume`.
    Pause(RolloutTarget),
    /// Go on with a paused rollout (after the failure threshold paused it, the failures so
    /// far are accepted).
    Resume(RolloutTarget),
    /// Stop for good: updated nodes keep the revision, the others keep theirs.
    Abort(RolloutTarget),
}

#[derive(Args)]
struct RolloutTarget {
    /// deployment | daemonset, or the workload's name alone (deployments are tried first)
    kind: String,
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
pub enum Format {
    Table,
    Json,
    Yaml,
}

#[derive(Args)]
struct HubArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8443")]
    listen: std::net::SocketAddr,
    /// Where the hub keeps its CA, admin token and database.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// URL agents use to reach the hub, or the URLs of every hub replica, or one load-balancer
    /// URL (comma-separated or repeated). Every host goes into the server certificate, and
    /// agents are told the list: they spread over it and fail over along it.
    #[arg(long, value_delimiter = ',')]
    advertise: Vec<String>,
    /// File holding the secret the CA key is encrypted under at rest (else the environment
    /// variable OUTPOST_CA_KEY_SECRET; neither: the key is stored unencrypted). A plain key is
    /// encrypted on the first start with a secret (docs/security.md).
    #[arg(long)]
    ca_secret_file: Option<PathBuf>,
    /// A node without contact for this long is Offline (e.g. 90s, 5m).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    offline_after: Duration,
    /// POST every alert firing and resolution to this URL (JSON, see docs/alerts.md); repeatable.
    #[arg(long = "webhook")]
    webhooks: Vec<String>,
    /// Raise the NodeOffline alert once a node has been silent this long.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    node_offline_alert: Duration,
    /// Host paths workloads may mount: warn (accept all, warn about /, /etc read-write, the
    /// Docker socket, ...), deny-sensitive (refuse those) or deny (refuse every hostPath).
    #[arg(long, default_value = "warn", value_parser = clap::builder::PossibleValuesParser::new(["warn", "deny-sensitive", "deny"]))]
    host_paths: String,
    /// Exempt host paths under this prefix from --host-paths (repeatable): `--host-paths deny`
    /// with prefixes is a strict allow-list.
    #[arg(long = "host-path-allow", value_name = "PREFIX")]
    host_path_allow: Vec<String>,
    /// Privileged workloads (privileged containers, added capabilities, hostNetwork, hostPID):
    /// allow, or deny them at apply.
    #[arg(long, default_value = "allow", value_parser = clap::builder::PossibleValuesParser::new(["allow", "deny"]))]
    privileged: String,
    /// How long node certificates are valid; agents renew with a third left.
    #[arg(long, env = "OUTPOST_NODE_CERT_LIFETIME", default_value = "90d", value_parser = parse_duration)]
    node_cert_lifetime: Duration,
    /// Close connections idle this long (no bytes, no request in flight).
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// A new connection must finish its TLS handshake and start its first request within this.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    header_read_timeout: Duration,
    /// Probe a connection idle this long (TCP keepalive; two unanswered probes 10 s apart end
    /// it): how soon a box that lost power while holding its long-poll turns Offline.
    #[arg(long, default_value = "90s", value_parser = parse_duration)]
    keepalive: Duration,
    /// Connections one address may hold without a node certificate (default: from the
    /// descriptor limit, at most 128).
    #[arg(long)]
    max_conns_per_ip: Option<usize>,
    /// A browser session unused this long ends (docs/accounts.md).
    #[arg(long, default_value = "30m", value_parser = parse_duration)]
    session_idle: Duration,
    /// A browser session ends this long after login, used or not.
    #[arg(long, default_value = "12h", value_parser = parse_duration)]
    session_lifetime: Duration,
    /// Audit entries older than this are removed (at most 100,000 are kept).
    #[arg(long, default_value = "90d", value_parser = parse_duration)]
    audit_retention: Duration,
    /// With replicas on one PostgreSQL store: how often each looks for changes made through the
    /// others even without a notification (docs/postgres.md).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    replica_poll: Duration,
    /// Where the hub keeps its state: `sqlite` (hub.db in the data dir) or a PostgreSQL URL
    /// (postgres://user:password@host/db; docs/postgres.md). The CA, monitoring, pipeline and
    /// account tables stay in the data dir either way.
    // Checked by `parse_store` after parsing: clap would echo a refused value, password and all.
    #[arg(long, env = "OUTPOST_STORE", default_value = "sqlite")]
    store: String,
}

/// `--store`: SQLite in the data dir, or a PostgreSQL URL.
#[derive(Clone, Debug)]
enum StoreArg {
    Sqlite,
    Postgres(String),
}

fn parse_store(s: &str) -> Result<StoreArg, String> {
    if s == "sqlite" {
        Ok(StoreArg::Sqlite)
    } else if s.starts_with("postgres://") || s.starts_with("postgresql://") {
        Ok(StoreArg::Postgres(s.to_string()))
    } else {
        Err(format!(
            "{:?} is neither `sqlite` nor a PostgreSQL URL; write postgres://user:password@host:5432/dbname",
            outpost_hub::store::pg_redact(s)
        ))
    }
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token; prints it.
    Create {
        /// Labels every node joining with this token gets: k=v,k2=v2
        #[arg(long, value_parser = parse_labels)]
        labels: Option<Labels>,
        /// How long the token is valid (e.g. 24h, 30m; 0 = no expiry).
        #[arg(long, default_value = "24h", value_parser = parse_duration)]
        ttl: Duration,
        /// How many nodes may join with it, at least 1 (default: unlimited until it expires).
        #[arg(long)]
        uses: Option<u32>,
        /// Label keys a joining node may set on itself with `--labels` (besides
        /// kubernetes.io/os, kubernetes.io/arch and node.outpost.dev/*): k1,k2
        #[arg(long, value_delimiter = ',')]
        node_labels: Vec<String>,
    },
}

type Labels = BTreeMap<String, String>;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentArgs {
    #[command(subcommand)]
    cmd: Option<AgentCmd>,
    /// Join (when this box has not joined yet) and run.
    #[command(flatten)]
    join: JoinArgs,
}

#[derive(Subcommand)]
enum AgentCmd {
    /// Join a hub with a token: generates the node key here and gets a certificate.
    Join(JoinArgs),
    /// Run the agent from its data dir (no hub needed to start workloads).
    Run(RunArgs),
    /// Install the agent as a systemd service: copy the binary, join (once), write and enable
    /// the unit, start it. Idempotent.
    Install(install::AgentInstallArgs),
    /// Stop and remove the agent's service and its workloads (--purge: and its data).
    Uninstall(install::UninstallArgs),
    /// Upload an outpost binary to the hub for agents to update to; prints the AgentUpdate
    /// manifest that rolls it out (edit its nodeSelector, then `outpost apply -f`).
    Publish {
        /// The outpost binary (e.g. target/release/outpost for the boxes' architecture).
        file: PathBuf,
        /// A label for people; agents report their own version.
        #[arg(long)]
        version: Option<String>,
    },
    /// The self-update watchdog (started by the agent from the previous binary).
    #[command(hide = true)]
    UpdateWatchdog {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        exe: PathBuf,
        #[arg(long)]
        pid: u32,
        #[arg(last = true)]
        args: Vec<String>,
    },
}

#[derive(Args, Clone)]
struct JoinArgs {
    /// Hub URL, e.g. https://hub.example.com:8443
    #[arg(long)]
    hub: Option<String>,
    /// Join token from `outpost token create`.
    #[arg(long)]
    token: Option<String>,
    /// Node name (default: this host's name).
    #[arg(long)]
    name: Option<String>,
    /// Extra node labels: k=v,k2=v2. Only keys under node.outpost.dev/, kubernetes.io/os|arch and
    /// keys the token allows (`token create --node-labels`); the token's own labels cannot change.
    #[arg(long, value_parser = parse_labels)]
    labels: Option<Labels>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use this hub URL instead of the one stored at join.
    #[arg(long)]
    hub: Option<String>,
    /// Stop all workloads when the agent exits (used by `outpost demo`).
    #[arg(long, hide = true)]
    stop_workloads_on_exit: bool,
    /// The Docker Engine's (or podman's) API socket.
    #[arg(long, env = "OUTPOST_DOCKER_SOCKET")]
    docker_socket: Option<String>,
    /// Single-box mode: run the workloads of this manifest directory (re-read on change), with
    /// no hub at all or beside the hub's workloads once this box has joined one.
    #[arg(long, value_name = "DIR")]
    manifests: Option<PathBuf>,
    /// Node name for a box that has not joined a hub (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Node labels for a box that has not joined a hub, k=v,k2=v2 (local workloads select by them).
    #[arg(long, value_parser = parse_labels)]
    labels: Option<Labels>,
}

#[derive(Args)]
struct ServeModelArgs {
    /// The ONNX file.
    #[arg(long, required_unless_present = "model_ref")]
    model: Option<PathBuf>,
    /// A model pushed to the hub (`digits:v2`, `digits@sha256:<hex>`), fetched into the agent's
    /// cache in --data-dir with its identity.
    #[arg(long, requires = "data_dir")]
    model_ref: Option<String>,
    /// The agent's data dir (with --model-ref).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The model's name in URLs (`/v2/models/NAME/infer`).
    #[arg(long, default_value = "model")]
    name: String,
    /// The version it reports (a tag or digest).
    #[arg(long, default_value = "1")]
    version: String,
    /// Address to listen on (loopback unless the site's devices must reach it).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Largest request body; larger requests get 413.
    #[arg(long, default_value_t = outpost_agent::inference::server::DEFAULT_MAX_BODY)]
    max_request_bytes: usize,
    /// The node name answered as `node_id` by POST /infer.
    #[arg(long, env = "OUTPOST_NODE", default_value = "")]
    node: String,
}

#[derive(Args)]
struct LoginArgs {
    #[arg(long)]
    hub: String,
    /// An account token (`outpost user add`), or the admin token the hub printed at its first
    /// start (also in <hub data dir>/admin.token).
    #[arg(long)]
    token: String,
    /// The hub CA's SHA-256 fingerprint, as the hub prints it. Without it, the CA is trusted on
    /// first use and its fingerprint printed for you to compare.
    #[arg(long)]
    ca_fingerprint: Option<String>,
}

#[derive(Args)]
struct DeleteArgs {
    /// Manifest files or directories whose objects to delete.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    /// deployment | daemonset | configmap | secret | node
    kind: Option<String>,
    name: Option<String>,
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

fn parse_labels(s: &str) -> Result<Labels, String> {
    let mut out = Labels::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("label {part:?} is not key=value"))?;
        if k.is_empty() {
            return Err(format!("label {part:?} has an empty key"));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

/// The one duration parser (`90s`, `5m`, `24h`, `7d`; overflow-checked), for clap.
pub(crate) use outpost_api::parse_duration;

/// `outpost hub ca-secret`: the secret the CA key is encrypted under (docs/security.md).
#[derive(Parser, Debug)]
#[command(name = "outpost hub ca-secret")]
struct CaSecretCli {
    #[command(subcommand)]
    cmd: CaSecretCmd,
}

#[derive(Subcommand, Debug)]
enum CaSecretCmd {
    /// Re-encrypt the CA key under a new secret (a plain key is encrypted). Hubs that run keep
    /// the key they loaded: restart each with the new secret afterwards.
    Rotate {
        /// The hub's data directory.
        #[arg(long, alias = "data")]
        data_dir: Option<PathBuf>,
        /// File holding the current secret (else OUTPOST_CA_KEY_SECRET).
        #[arg(long)]
        ca_secret_file: Option<PathBuf>,
        /// File holding the new secret (else OUTPOST_CA_KEY_NEW_SECRET).
        #[arg(long)]
        new_secret_file: Option<PathBuf>,
        /// A `postgres://` URL: re-encrypt the CA key the replicas share in that database
        /// instead of the data dir's (else OUTPOST_STORE).
        #[arg(long, env = "OUTPOST_STORE")]
        store: Option<String>,
    },
}

fn ca_secret(c: CaSecretCli) -> Result<()> {
    let CaSecretCmd::Rotate {
        data_dir,
        ca_secret_file,
        new_secret_file,
        store,
    } = c.cmd;
    let dir = data_dir.unwrap_or_else(|| default_dir("hub"));
    let old = outpost_hub::files::ca_secret(ca_secret_file.as_deref())?;
    let new = match new_secret_file {
        Some(f) => {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("cannot read the new secret file {} (--new-secret-file)", f.display()))?;
            text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()
        }
        None => std::env::var("OUTPOST_CA_KEY_NEW_SECRET")
            .unwrap_or_default()
            .into_bytes(),
    };
    if new.is_empty() {
        bail!(
            "no new secret: give --new-secret-file FILE or set OUTPOST_CA_KEY_NEW_SECRET (e.g. `openssl rand -hex 32`)"
        );
    }
    if old.as_deref() == Some(&new[..]) {
        bail!("the new secret is the current one; give another");
    }
    if let Some(url) = store.filter(|s| s.starts_with("postgres://") || s.starts_with("postgresql://")) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?;
        rt.block_on(async {
            let pg = outpost_hub::PgStore::connect(&url).await.with_context(|| {
                format!(
                    "cannot open the PostgreSQL store {}",
                    outpost_hub::store::pg_redact(&url)
                )
            })?;
            outpost_hub::store::authority::rotate(&pg.pool(), old.as_deref(), &new).await
        })?;
        println!(
            "the CA key in {} was re-encrypted under the new secret; restart every hub replica with the new secret (OUTPOST_CA_KEY_SECRET or --ca-secret-file)",
            outpost_hub::store::pg_redact(&url)
        );
        return Ok(());
    }
    let done = outpost_hub::files::DataDir::new(dir.clone()).rotate_ca_secret(old.as_deref(), &new)?;
    let what = match done {
        outpost_hub::files::Rotated::Resealed => "re-encrypted under the new secret",
        outpost_hub::files::Rotated::Sealed => "was stored unencrypted; it is now encrypted under the new secret",
    };
    println!(
        "the CA key in {} {what}; restart every hub of this fleet with the new secret (OUTPOST_CA_KEY_SECRET or --ca-secret-file)",
        dir.join("ca.key").display()
    );
    Ok(())
}

/// `outpost hub migrate`: move an SQLite hub into PostgreSQL (docs/postgres.md).
#[derive(Parser, Debug)]
#[command(name = "outpost hub migrate")]
struct MigrateCli {
    /// The SQLite hub's data directory (the hub must be stopped).
    #[arg(long)]
    from: PathBuf,
    /// The empty PostgreSQL database: a `postgres://` URL.
    #[arg(long)]
    to: String,
    /// File holding the CA secret the key is sealed under in the database (else
    /// OUTPOST_CA_KEY_SECRET); required.
    #[arg(long)]
    ca_secret_file: Option<PathBuf>,
}

fn migrate(c: MigrateCli) -> Result<()> {
    if !(c.to.starts_with("postgres://") || c.to.starts_with("postgresql://")) {
        bail!(
            "--to: {} is not a postgres:// URL",
            outpost_hub::store::pg_redact(&c.to)
        );
    }
    let secret = outpost_hub::files::ca_secret(c.ca_secret_file.as_deref())?.context(
        "the CA key goes into PostgreSQL only encrypted; set OUTPOST_CA_KEY_SECRET or --ca-secret-file (e.g. `openssl rand -hex 32`)",
    )?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let shown = outpost_hub::store::pg_redact(&c.to);
    let counts = rt.block_on(async {
        let pg = outpost_hub::PgStore::connect(&c.to)
            .await
            .with_context(|| format!("cannot open the PostgreSQL store {shown}"))?;
        outpost_hub::store::migrate::migrate(&c.from, &pg.pool(), &secret).await
    })?;
    for (what, n) in &counts {
        match n {
            Some(n) => println!("{what:<18} {n}"),
            None => println!("{what:<18} skipped (no such table on one side)"),
        }
    }
    println!(
        "migrated {} into {shown}; start the hub with --store {shown} and the same CA secret (agents keep their identities)",
        c.from.display()
    );
    Ok(())
}

fn default_dir(role: &str) -> PathBuf {
    if nix_is_root() {
        PathBuf::from(format!("/var/lib/outpost/{role}"))
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        home.join(".local/share/outpost").join(role)
    }
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("OUTPOST_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}

async fn ctrl_c_or_term() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn main() {
    outpost_pki::install_provider();
    // `outpost hub install|uninstall`: the hub's own flags stay flat (`outpost hub --listen ...`).
    let argv: Vec<String> = std::env::args().collect();
    if argv.get(1).map(String::as_str) == Some("hub") {
        let result = match argv.get(2).map(String::as_str) {
            Some("install") => Some(
                install::hub_install(<install::HubInstallArgs as Parser>::parse_from(&argv[2..]))
                    .map(|c| c.report("the outpost hub service")),
            ),
            Some("ca-secret") => Some(ca_secret(<CaSecretCli as Parser>::parse_from(&argv[2..]))),
            Some("migrate") => Some(migrate(<MigrateCli as Parser>::parse_from(&argv[2..]))),
            Some("uninstall") => Some(
                install::hub_uninstall(<install::HubUninstallArgs as Parser>::parse_from(&argv[2..]).u)
                    .map(|c| c.report("the outpost hub service (already uninstalled)")),
            ),
            _ => None,
        };
        if let Some(r) = result {
            if let Err(e) = r {
                eprintln!("error: {e:#}");
                std::process::exit(1);
            }
            return;
        }
    }
    let cli = Cli::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(2).enable_all();
    if matches!(cli.cmd, Cmd::Hub(_)) {
        // A storm must not grow hundreds of threads waiting on the one SQLite connection
        // (outpost_hub::DEFAULT_BLOCKING_THREADS says why this many).
        let cap = std::env::var(outpost_hub::BLOCKING_THREADS_ENV).ok();
        match outpost_hub::blocking_threads(cap.as_deref()) {
            Ok(n) => rt.max_blocking_threads(n),
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(2);
            }
        };
    }
    let rt = rt.build().expect("tokio runtime");
    if let Err(e) = rt.block_on(dispatch(cli.cmd)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn dispatch(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Hub(a) => run_hub(a).await,
        Cmd::Token {
            cmd:
                TokenCmd::Create {
                    labels,
                    ttl,
                    uses,
                    node_labels,
                },
        } => {
            let c = client::Client::from_env()?;
            let req = outpost_api::TokenRequest {
                labels: labels.unwrap_or_default(),
                ttl_secs: (!ttl.is_zero()).then_some(ttl.as_secs()),
                uses,
                node_labels,
            };
            token_request_checks(&req)?;
            let t: outpost_api::TokenResponse = c.post("/v1/tokens", &req).await?;
            println!("{}", t.token);
            Ok(())
        }
        Cmd::Agent(a) => match a.cmd {
            Some(AgentCmd::Join(j)) => {
                init_tracing();
                let id = agent_join(&j).await?;
                println!(
                    "joined {} as node {}; start it with `outpost agent run`",
                    id.hub, id.node
                );
                Ok(())
            }
            Some(AgentCmd::Run(r)) => agent_run(r).await,
            Some(AgentCmd::Publish { file, version }) => {
                let c = client::Client::from_env()?;
                image::publish_binary(&c, &file, version.as_deref()).await
            }
            Some(AgentCmd::UpdateWatchdog { dir, exe, pid, args }) => {
                outpost_agent::selfupdate::watchdog(&dir, &exe, pid, &args)
            }
            Some(AgentCmd::Install(i)) => {
                init_tracing();
                install::agent_install(i).await?.report("the outpost agent service");
                Ok(())
            }
            Some(AgentCmd::Uninstall(u)) => {
                install::agent_uninstall(u)
                    .await?
                    .report("the outpost agent service (already uninstalled)");
                Ok(())
            }
            None => {
                init_tracing();
                let dir = a.join.data_dir.clone().unwrap_or_else(|| default_dir("agent"));
                if !outpost_agent::Identity::exists(&dir) {
                    let id = agent_join(&a.join).await?;
                    eprintln!("joined {} as node {}", id.hub, id.node);
                }
                agent_run(RunArgs {
                    data_dir: Some(dir),
                    hub: None,
                    stop_workloads_on_exit: false,
                    docker_socket: None,
                    manifests: None,
                    name: None,
                    labels: None,
                })
                .await
            }
        },
        Cmd::Login(l) => client::login(&l.hub, &l.token, l.ca_fingerprint.as_deref()).await,
        Cmd::Apply {
            files,
            kustomize,
            force,
        } => {
            // Render first: a broken kustomization fails before the hub is contacted.
            let files = match kustomize {
                Some(dir) => vec![kustomize::manifest_file(&dir)?],
                None => client::read_manifests(&files)?,
            };
            let c = client::Client::from_env()?;
            let req = outpost_api::ApplyRequest { files };
            let path = if force { "/v1/apply?force=true" } else { "/v1/apply" };
            let r: outpost_api::ApplyResponse = c.post(path, &req).await?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            for res in &r.results {
                match res.revision {
                    Some(rev) => println!("{} {} (revision {rev})", res.object, res.action),
                    None => println!("{} {}", res.object, res.action),
                }
            }
            Ok(())
        }
        Cmd::Diff { kustomize: dir } => {
            // Render first, so a broken kustomization is reported without a hub.
            kustomize::render(&dir)?;
            kustomize::diff(&client::Client::from_env()?, &dir).await
        }
        Cmd::Kustomize { cmd } => kustomize::run(cmd),
        Cmd::Delete(d) => delete(d).await,
        Cmd::Get { what, output } => output::get(&client::Client::from_env()?, &what, output).await,
        Cmd::Describe { kind, name, namespace } => {
            output::describe(&client::Client::from_env()?, &kind, &name, &namespace).await
        }
        Cmd::Image {
            cmd: ImageCmd::Push { image, docker_socket },
        } => image::push(&client::Client::from_env()?, &image, &docker_socket).await,
        Cmd::Image { cmd: ImageCmd::Ls } => image::list(&client::Client::from_env()?).await,
        Cmd::Gitops { cmd } => gitops::run(&client::Client::from_env()?, cmd).await,
        Cmd::Rollout { cmd } => output::rollout(&client::Client::from_env()?, cmd).await,
        Cmd::Demo(a) => demo::run(a).await,
        Cmd::Logs(a) => logs::run(&client::Client::from_env()?, a).await,
        Cmd::Exec(a) => {
            let code = exec::run(&client::Client::from_env()?, a).await?;
            std::process::exit(code)
        }
        Cmd::Data { cmd } => data::run(&client::Client::from_env()?, cmd).await,
        Cmd::Bench(a) => outpost_bench::run(a).await,
        Cmd::Model {
            cmd: ModelCmd::Push { file, name },
        } => model::push(&client::Client::from_env()?, &file, &name).await,
        Cmd::User { cmd } => user::run(&client::Client::from_env()?, cmd).await,
        Cmd::Audit {
            since,
            user,
            limit,
            output,
        } => {
            user::audit(
                &client::Client::from_env()?,
                since.as_deref(),
                user.as_deref(),
                limit,
                output,
            )
            .await
        }
        Cmd::Model { cmd: ModelCmd::Ls } => model::list(&client::Client::from_env()?).await,
        Cmd::ServeModel(a) => {
            init_tracing();
            outpost_agent::inference::server::run(outpost_agent::inference::server::ServeOptions {
                model: a.model,
                model_ref: a.model_ref,
                data_dir: a.data_dir,
                name: a.name,
                version: a.version,
                listen: a.listen,
                max_body: a.max_request_bytes,
                node: a.node,
            })
            .await
        }
    }
}

async fn run_hub(a: HubArgs) -> Result<()> {
    init_tracing();
    let data_dir = a.data_dir.unwrap_or_else(|| default_dir("hub"));
    let endpoints = outpost_core::hubs::normalize(&a.advertise).map_err(|e| anyhow::anyhow!("--advertise: {e}"))?;
    let mut advertise: Vec<String> = Vec::new();
    for u in &a.advertise {
        let host = client::url_host(u)
            .with_context(|| format!("--advertise {u:?} is not a URL like https://hub.example.com:8443"))?;
        advertise.push(host);
    }
    let cfg = outpost_hub::HubConfig {
        listen: a.listen,
        data_dir: data_dir.clone(),
        advertise: advertise.clone(),
        endpoints,
        ca_secret: outpost_hub::files::ca_secret(a.ca_secret_file.as_deref())?,
        offline_after: a.offline_after,
        long_poll: Duration::from_secs(outpost_api::LONG_POLL_SECS),
        webhooks: logs::check_webhooks(&a.webhooks)?,
        node_offline_alert: a.node_offline_alert,
        host_paths: outpost_hub::validate::HostPathPolicy::new(
            a.host_paths.parse().map_err(anyhow::Error::msg)?,
            &a.host_path_allow,
        )
        .and_then(|p| p.with_privileged(&a.privileged))
        .map_err(anyhow::Error::msg)?,
        node_cert_lifetime: a.node_cert_lifetime,
        idle_timeout: a.idle_timeout,
        header_read_timeout: a.header_read_timeout,
        keepalive: a.keepalive,
        max_conns_per_ip: a.max_conns_per_ip,
        sessions: outpost_hub::session::SessionLimits {
            idle: a.session_idle,
            max: a.session_lifetime,
        },
        audit_max_age: a.audit_retention,
        replica_poll: a.replica_poll,
        store: match parse_store(&a.store).map_err(|e| anyhow::anyhow!("--store {e}"))? {
            StoreArg::Sqlite => None,
            StoreArg::Postgres(url) => Some(url),
        },
    };
    let (hub, created) = outpost_hub::Hub::start(cfg).await?;
    let url = a
        .advertise
        .first()
        .cloned()
        .unwrap_or_else(|| format!("https://{}", client::display_addr(hub.addr)));
    eprintln!(
        "outpost hub listening on {} (data dir {})",
        hub.addr,
        data_dir.display()
    );
    eprintln!("CA fingerprint: {}", hub.ca_fingerprint);
    if let Some(token) = created {
        eprintln!(
            "\nAdmin token (shown once; also in {}):\n  {token}",
            data_dir.join("admin.token").display()
        );
        eprintln!(
            "Log in with:\n  outpost login --hub {url} --token {token} --ca-fingerprint {}",
            hub.ca_fingerprint
        );
        eprintln!("Then join boxes with a token from `outpost token create`:\n  outpost agent --hub {url} --token <join token>\n");
    }
    ctrl_c_or_term().await;
    eprintln!("hub stopping");
    hub.shutdown().await;
    Ok(())
}

/// `outpost token create` refuses what the hub would refuse, naming the flag.
fn token_request_checks(req: &outpost_api::TokenRequest) -> Result<()> {
    req.validate().map_err(|e| {
        let flag = match e.field.split('.').next().unwrap_or("") {
            "uses" => "--uses",
            "ttl_secs" => "--ttl",
            _ => "--labels",
        };
        anyhow::anyhow!("{flag}: {}", e.reason)
    })
}

async fn agent_join(j: &JoinArgs) -> Result<outpost_agent::Identity> {
    let (Some(hub), Some(token)) = (&j.hub, &j.token) else {
        bail!("joining needs --hub URL and --token T (create a token on the hub with `outpost token create`)");
    };
    let o = outpost_agent::JoinOptions {
        hub: hub.clone(),
        token: token.clone(),
        name: j.name.clone(),
        labels: j.labels.clone().unwrap_or_default(),
        data_dir: j.data_dir.clone().unwrap_or_else(|| default_dir("agent")),
    };
    Ok(outpost_agent::join(&o).await?)
}

async fn agent_run(r: RunArgs) -> Result<()> {
    init_tracing();
    let o = outpost_agent::RunOptions {
        data_dir: r.data_dir.unwrap_or_else(|| default_dir("agent")),
        hub: r.hub,
        stop_workloads_on_exit: r.stop_workloads_on_exit,
        docker_socket: r.docker_socket,
        manifests: r.manifests,
        name: r.name,
        labels: r.labels.unwrap_or_default(),
        pipeline: outpost_agent::pipeline::Options::from_env(),
    };
    outpost_agent::run(o, ctrl_c_or_term()).await
}

async fn delete(d: DeleteArgs) -> Result<()> {
    let c = client::Client::from_env()?;
    let r: outpost_api::DeleteResponse = match (&d.kind, &d.name, d.files.is_empty()) {
        (None, None, false) => {
            let req = outpost_api::ApplyRequest {
                files: client::read_manifests(&d.files)?,
            };
            c.post("/v1/delete", &req).await?
        }
        (Some(kind), Some(name), true) if kind == "node" || kind == "nodes" => {
            c.delete(&format!("/v1/nodes/{name}")).await?;
            println!("node {name} deleted; its certificate no longer works");
            return Ok(());
        }
        (Some(kind), Some(name), true) => {
            let k = outpost_api::Kind::parse_cli(kind).with_context(|| {
                format!("unknown kind {kind:?}: use deployment, daemonset, configmap, secret or node")
            })?;
            c.delete_json(&format!(
                "/v1/objects/{}/{}/{name}",
                k.as_str().to_ascii_lowercase(),
                d.namespace
            ))
            .await?
        }
        _ => bail!("use either `outpost delete -f FILE` or `outpost delete KIND NAME [-n NAMESPACE]`"),
    };
    for o in &r.deleted {
        println!("{o} deleted");
    }
    for o in &r.not_found {
        println!("{o} not found");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_labels() {
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("5y").unwrap_err().contains("unknown unit"));
        // used to overflow (`n * 86400` unchecked)
        assert!(parse_duration("999999999999999d")
            .unwrap_err()
            .contains("longer than 100 years"));
        assert_eq!(parse_labels("a=1, b=2").unwrap().len(), 2);
        assert!(parse_labels("a").unwrap_err().contains("not key=value"));
    }

    #[test]
    fn token_create_arguments_are_checked() {
        let cli = |args: &[&str]| -> Result<()> {
            let mut all = vec!["outpost", "token", "create"];
            all.extend(args);
            let Cmd::Token {
                cmd:
                    TokenCmd::Create {
                        labels,
                        ttl,
                        uses,
                        node_labels,
                    },
            } = Cli::try_parse_from(all).map_err(|e| anyhow::anyhow!("{e}"))?.cmd
            else {
                unreachable!()
            };
            token_request_checks(&outpost_api::TokenRequest {
                labels: labels.unwrap_or_default(),
                ttl_secs: (!ttl.is_zero()).then_some(ttl.as_secs()),
                uses,
                node_labels,
            })
        };
        assert!(cli(&["--uses", "1", "--ttl", "0", "--labels", "site=a"]).is_ok());
        for (args, want) in [
            (&["--uses", "0"][..], "--uses: must be at least 1"),
            (&["--ttl", "36501d"], "longer than 100 years"),
            (
                &["--labels", "site=a b"],
                "--labels: \"a b\" is not a valid label value",
            ),
        ] {
            let e = cli(args).unwrap_err().to_string();
            assert!(e.contains(want), "{args:?}: {e}");
        }
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
