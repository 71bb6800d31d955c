//! The hub tier `bench fleet` starts: one hub on SQLite, or PostgreSQL and N hub replicas on
//! it (`--hubs N --store postgres`, or `--tiers sqlite,postgres:3` for several tiers in one
//! run). PostgreSQL is Debian's server, started by the bench in its work dir (`initdb` +
//! `pg_ctl`, as `nobody` when run as root: PostgreSQL refuses root), or an existing server
//! (`--pg-url`); each tier gets a database of its own. Replicas listen on distinct loopback
//! ports, share the CA through the database (sealed under one `OUTPOST_CA_KEY_SECRET`), and
//! each advertises all of them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::{self, HubProc};

/// Where a tier keeps its state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Sqlite,
    Postgres,
}

/// One hub tier: its store and how many hub processes serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TierSpec {
    pub store: Store,
    pub hubs: usize,
}

/// Most replicas a tier may have (each holds a pool of 16 PostgreSQL connections).
pub const MAX_HUBS: usize = 16;

impl TierSpec {
    /// `sqlite`, `sqlite:1`, `postgres`, `postgres:N` (N hub replicas, 1..=16); the error says
    /// what is wrong without the flag name (the caller adds it).
    pub fn parse(s: &str) -> Result<TierSpec, String> {
        let (store, n) = match s.split_once(':') {
            Some((st, n)) => (st, Some(n)),
            None => (s, None),
        };
        let store = match store {
            "sqlite" => Store::Sqlite,
            "postgres" | "pg" => Store::Postgres,
            _ => {
                return Err(format!(
                    "{s:?} is not a tier; write sqlite or postgres:N (N hub replicas), e.g. sqlite,postgres:3"
                ))
            }
        };
        let hubs = match n {
            None => 1,
            Some(n) => n
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_HUBS).contains(n))
                .ok_or_else(|| format!("{s:?}: the number of hub replicas must be 1-{MAX_HUBS}"))?,
        };
        TierSpec::new(store, hubs)
    }

    /// A tier, refused when SQLite would need several processes.
    pub fn new(store: Store, hubs: usize) -> Result<TierSpec, String> {
        if !(1..=MAX_HUBS).contains(&hubs) {
            return Err(format!("{hubs} hub replicas: give 1-{MAX_HUBS}"));
        }
        if store == Store::Sqlite && hubs > 1 {
            return Err(format!(
                "SQLite is one hub process's database: {hubs} replicas need PostgreSQL (postgres:{hubs}, or --store postgres)"
            ));
        }
        Ok(TierSpec { store, hubs })
    }

    /// `sqlite` or `postgres:N`, as `--tiers` takes it.
    pub fn label(&self) -> String {
        match self.store {
            Store::Sqlite => "sqlite".into(),
            Store::Postgres => format!("postgres:{}", self.hubs),
        }
    }
}

/// Debian's PostgreSQL server binaries, newest version first.
fn pg_bindir() -> Result<PathBuf> {
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("no /usr/lib/postgresql: install Debian's postgresql, or give --pg-url of a server")?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    found.sort();
    found
        .pop()
        .map(|(_, b)| b)
        .context("no initdb under /usr/lib/postgresql/*/bin: install Debian's postgresql, or give --pg-url")
}

fn psql_bin() -> PathBuf {
    pg_bindir()
        .map(|b| b.join("psql"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into())
}

/// `server` with its database replaced by `db` (query kept); a URL that does not parse is
/// refused, naming the flag it came from.
pub fn with_database(server: &str, db: &str) -> Result<String> {
    let mut u = url::Url::parse(server).with_context(|| format!("--pg-url: {} is not a URL", redact(server)))?;
    u.set_path(&format!("/{db}"));
    Ok(u.to_string())
}

/// A PostgreSQL URL with its password replaced, for messages.
fn redact(server: &str) -> String {
    match url::Url::parse(server) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "the value given".into(),
    }
}

/// The cluster the bench started itself.
struct OwnCluster {
    bin: PathBuf,
    data: PathBuf,
    log: PathBuf,
    as_nobody: bool,
}

impl OwnCluster {
    fn run(&self, tool: &str, args: &[&str]) -> Result<()> {
        run_as(self.as_nobody, &self.bin.join(tool), args)
    }
}

/// Run a server binary, as `nobody` when `as_nobody`.
fn run_as(as_nobody: bool, bin: &Path, args: &[&str]) -> Result<()> {
    let mut c = if as_nobody {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = c
        .args(args)
        .output()
        .with_context(|| format!("cannot run {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "{} {} failed: {}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn id_of(flag: &str) -> Result<u32> {
    let o = Command::new("id").args([flag, "nobody"]).output()?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .context("no user nobody to run PostgreSQL as (PostgreSQL refuses root)")
}

/// The PostgreSQL server of a run: one the bench started in its work dir, or an existing one.
pub struct Postgres {
    /// A URL of the server whose user may create databases (database `postgres`).
    pub admin_url: String,
    own: Option<OwnCluster>,
    databases: Vec<String>,
}

impl Postgres {
    /// `initdb` a cluster in `root` (`root/data`, a socket dir `root/sock`, `root/server.log`)
    /// and start it on a free loopback port with the server's default durability (fsync on,
    /// synchronous commit), like a production server.
    /// Run as root, `nobody` must be able to enter `root`: directories from `ours` (the
    /// bench's work dir) down are opened to others for traversal (`o+x`).
    pub fn start(root: &Path, ours: &Path) -> Result<Postgres> {
        let bin = pg_bindir()?;
        let data = root.join("data");
        let sock = root.join("sock");
        std::fs::create_dir_all(&sock).with_context(|| format!("cannot create {}", sock.display()))?;
        // SAFETY: geteuid has no preconditions.
        let as_nobody = unsafe { libc::geteuid() } == 0;
        if as_nobody {
            let (uid, gid) = (id_of("-u")?, id_of("-g")?);
            for d in [root, &sock] {
                std::os::unix::fs::chown(d, Some(uid), Some(gid))
                    .with_context(|| format!("cannot give {} to nobody", d.display()))?;
            }
            traversable(root, ours)?;
        }
        let c = OwnCluster {
            bin,
            log: root.join("server.log"),
            data,
            as_nobody,
        };
        let d = c.data.to_string_lossy().to_string();
        c.run(
            "initdb",
            &["-D", &d, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
        )?;
        let port = harness::free_port()?;
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=300",
            sock.display()
        );
        let log = c.log.to_string_lossy().to_string();
        c.run("pg_ctl", &["-D", &d, "-o", &opts, "-l", &log, "-w", "start"])?;
        let pg = Postgres {
            admin_url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            own: Some(c),
            databases: Vec::new(),
        };
        pg.psql("SELECT 1")
            .with_context(|| format!("PostgreSQL started but does not answer; see {log}"))?;
        Ok(pg)
    }

    /// An existing server (`--pg-url`): its user must be able to create databases.
    pub fn existing(url: &str) -> Result<Postgres> {
        let pg = Postgres {
            admin_url: url.to_string(),
            own: None,
            databases: Vec::new(),
        };
        pg.psql("SELECT 1").context("--pg-url: the server does not answer")?;
        Ok(pg)
    }

    fn psql(&self, sql: &str) -> Result<String> {
        let out = Command::new(psql_bin())
            .args([self.admin_url.as_str(), "-v", "ON_ERROR_STOP=1", "-qAtc", sql])
            .output()
            .context("cannot run psql")?;
        if !out.status.success() {
            bail!("{sql}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// A new, empty database; its URL. Dropped when this server handle is.
    pub fn create_database(&mut self, name: &str) -> Result<String> {
        self.psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        self.psql(&format!("CREATE DATABASE {name}"))?;
        self.databases.push(name.to_string());
        with_database(&self.admin_url, name)
    }

    /// The postmaster's process id when the server is ours (its backends are its children).
    pub fn postmaster_pid(&self) -> Option<u32> {
        let c = self.own.as_ref()?;
        std::fs::read_to_string(c.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        match &self.own {
            Some(c) => {
                let d = c.data.to_string_lossy().to_string();
                let _ = c.run("pg_ctl", &["-D", &d, "-m", "fast", "-w", "stop"]);
            }
            None => {
                for db in std::mem::take(&mut self.databases) {
                    let _ = self.psql(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"));
                }
            }
        }
    }
}

/// Make sure `nobody` can reach `dir`: every ancestor must let others through (`o+x`); those
/// at or under `ours` (the bench's work dir) are made so, others are refused with what to do.
fn traversable(dir: &Path, ours: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for a in dir.ancestors().skip(1) {
        let Ok(m) = std::fs::metadata(a) else { continue };
        let mode = m.permissions().mode();
        if mode & 0o001 != 0 {
            continue;
        }
        if !a.starts_with(ours) {
            bail!(
                "PostgreSQL runs as nobody (it refuses root), which cannot enter {}; give --work-dir \
                 under a directory others may enter, or --pg-url of a running server",
                a.display()
            );
        }
        std::fs::set_permissions(a, std::fs::Permissions::from_mode(mode | 0o001))
            .with_context(|| format!("cannot let nobody enter {}", a.display()))?;
    }
    Ok(())
}

/// A running tier: its hub processes (and, for PostgreSQL, the database it uses).
pub struct Tier {
    pub spec: TierSpec,
    pub hubs: Vec<HubProc>,
}

impl Tier {
    /// Start the tier's hubs under `dir` (`dir/hub-<i>`), on `store_url` for PostgreSQL.
    /// Replica 0 starts first (it creates the CA and the admin token), then the others, each
    /// with the admin token copied into its data dir, as an operator would.
    pub async fn start(spec: TierSpec, dir: &Path, store_url: Option<&str>) -> Result<Tier> {
        let ip: std::net::IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
        let mut ports = Vec::new();
        while ports.len() < spec.hubs {
            let p = harness::free_port()?;
            if !ports.contains(&p) {
                ports.push(p);
            }
        }
        let urls: Vec<String> = ports.iter().map(|p| format!("https://{ip}:{p}")).collect();
        // one CA secret for the tier, random per run
        let secret = format!("outpost-bench-{:016x}", rand::random::<u64>());
        let mut hubs = Vec::new();
        for (i, port) in ports.iter().enumerate() {
            let mut h = HubProc::new(&dir.join(format!("hub-{i}")), ip, *port);
            if let Some(url) = store_url {
                h.advertise = urls.clone();
                h.extra_args = vec!["--store".into(), url.into()];
                h.env = vec![("OUTPOST_CA_KEY_SECRET".into(), secret.clone())];
            }
            if i > 0 {
                let src = hubs
                    .first()
                    .map(|h0: &HubProc| h0.dir.join("hub/admin.token"))
                    .context("replica 0 first")?;
                std::fs::create_dir_all(h.dir.join("hub"))?;
                std::fs::copy(&src, h.dir.join("hub/admin.token")).context("copying the admin token")?;
            }
            h.launch()
                .await
                .with_context(|| format!("starting hub {i} of tier {}", spec.label()))?;
            hubs.push(h);
        }
        Ok(Tier { spec, hubs })
    }

    pub fn urls(&self) -> Vec<String> {
        self.hubs.iter().map(|h| h.url.clone()).collect()
    }

    /// SIGKILL every hub at once (signals first, then reaping).
    pub fn kill_all(&mut self) {
        for h in &mut self.hubs {
            h.signal_kill();
        }
        for h in &mut self.hubs {
            h.kill9();
        }
    }

    /// Start every hub again without waiting.
    pub fn spawn_all(&mut self) -> Result<()> {
        for h in &mut self.hubs {
            h.spawn()?;
        }
        Ok(())
    }

    /// Wait until every hub answers.
    pub async fn ready_all(&mut self) -> Result<()> {
        for h in &mut self.hubs {
            h.ready().await?;
        }
        Ok(())
    }
}

/// How long to wait for the first hub of a restarted tier.
pub const RESTART_LIMIT: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tier_specs() {
        let ok = |s: &str| TierSpec::parse(s).unwrap();
        assert_eq!(
            ok("sqlite"),
            TierSpec {
                store: Store::Sqlite,
                hubs: 1
            }
        );
        assert_eq!(
            ok("sqlite:1"),
            TierSpec {
                store: Store::Sqlite,
                hubs: 1
            }
        );
        assert_eq!(
            ok("postgres"),
            TierSpec {
                store: Store::Postgres,
                hubs: 1
            }
        );
        assert_eq!(
            ok("postgres:3"),
            TierSpec {
                store: Store::Postgres,
                hubs: 3
            }
        );
        assert_eq!(ok("postgres:3").label(), "postgres:3");
        assert_eq!(ok("sqlite").label(), "sqlite");
        for (bad, says) in [
            ("sqlite:3", "need PostgreSQL"),
            ("postgres:0", "1-16"),
            ("postgres:17", "1-16"),
            ("postgres:x", "1-16"),
            ("mysql", "not a tier"),
            ("", "not a tier"),
        ] {
            let e = TierSpec::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn database_names_go_into_the_url() {
        for (server, want) in [
            ("postgres://p@127.0.0.1:5/postgres", "postgres://p@127.0.0.1:5/x"),
            (
                "postgres://p@h:5/postgres?sslmode=disable",
                "postgres://p@h:5/x?sslmode=disable",
            ),
            ("postgres://p@h:5", "postgres://p@h:5/x"),
        ] {
            assert_eq!(with_database(server, "x").unwrap(), want);
        }
    }
}
