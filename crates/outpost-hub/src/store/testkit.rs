//! PostgreSQL for tests: a fresh database per test, on the server `OUTPOST_TEST_PG` names
//! (`scripts/test.sh` starts one and sets it), or else on a throwaway cluster this kit starts
//! itself (Debian's `postgresql` binaries, `initdb` + `pg_ctl` in a temp dir, as `nobody` when
//! run as root, listening on 127.0.0.1 and a unix socket in that dir). That cluster is shared
//! by every test process of the user (a lock file guards its start) and left running for the
//! next run; `pg_ctl -D $TMPDIR/outpost-test-pg-$UID/data stop` ends it.
//!
//! Tests that restart the server get a cluster of their own ([`Cluster`]).
//!
//! Under CI (`CI` set) a PostgreSQL that cannot be had fails the test; elsewhere the test is
//! skipped with a message. Test support only: the hub never calls this.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

/// The variable naming a PostgreSQL server for tests: a URL whose user may create databases,
/// e.g. `postgres://postgres@127.0.0.1:5433/postgres`.
pub const ENV: &str = "OUTPOST_TEST_PG";

/// A new, empty database for one test and its URL; `None` (after saying why) when PostgreSQL
/// cannot be had outside CI. Panics under CI when it cannot.
pub fn pg_database(prefix: &str) -> Option<String> {
    let server = server()?;
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let clean: String = prefix
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(30)
        .collect();
    let name = format!(
        "t_{clean}_{}_{}_{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let out = Command::new(psql())
        .args([server.as_str(), "-v", "ON_ERROR_STOP=1", "-qc"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
    assert!(
        out.status.success(),
        "CREATE DATABASE {name} on {server} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(with_database(&server, &name))
}

/// The server URL with another database name.
fn with_database(server: &str, db: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let base = match base[after_scheme..].find('/') {
        Some(i) => &base[..after_scheme + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

fn server() -> Option<String> {
    static SERVER: OnceLock<Option<String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            if let Ok(url) = std::env::var(ENV) {
                return Some(url);
            }
            match start_shared() {
                Ok(url) => Some(url),
                Err(e) if std::env::var_os("CI").is_some() => {
                    panic!("PostgreSQL is needed (set {ENV} or install Debian's postgresql): {e}")
                }
                Err(e) => {
                    eprintln!("skipping the PostgreSQL part: {e} (set {ENV} or install postgresql)");
                    None
                }
            }
        })
        .clone()
}

/// Debian's server binaries, newest version first.
fn bindir() -> Result<PathBuf, String> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    found
        .pop()
        .ok_or_else(|| "no initdb under /usr/lib/postgresql/*/bin".into())
}

fn psql() -> PathBuf {
    bindir()
        .map(|b| b.join("psql"))
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| "psql".into())
}

/// Run a server binary, as `nobody` when we are root (PostgreSQL refuses to run as root).
fn run_as_owner(bin: &Path, args: &[&str]) -> Result<(), String> {
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(bin);
        c
    } else {
        Command::new(bin)
    };
    let out = cmd
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} failed: {}{}",
            bin.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn answers(url: &str) -> bool {
    Command::new(psql())
        .args([url, "-qAtc", "SELECT 1"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// `initdb` a cluster under `root` (`root/data`, a socket dir `root/sock`) and start it on a
/// free loopback port; the port.
fn fresh_cluster(root: &Path) -> Result<u16, String> {
    let bin = bindir()?;
    let url_of = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/postgres");
    let data = root.join("data");
    let _ = std::fs::remove_dir_all(&data);
    let sock = root.join("sock");
    std::fs::create_dir_all(&sock).map_err(|e| format!("{e}"))?;
    if nix::unistd::geteuid().is_root() {
        let nobody = nix::unistd::User::from_name("nobody")
            .ok()
            .flatten()
            .ok_or("no user nobody to run PostgreSQL as")?;
        for d in [root, &sock] {
            nix::unistd::chown(d, Some(nobody.uid), Some(nobody.gid)).map_err(|e| format!("chown: {e}"))?;
        }
    }
    let d = data.to_string_lossy().to_string();
    run_as_owner(
        &bin.join("initdb"),
        &["-D", &d, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
    )?;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("{e}"))?;
        l.local_addr().map_err(|e| format!("{e}"))?.port()
    };
    let opts = format!(
        "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c max_connections=300",
        sock.display()
    );
    let log = root.join("server.log").to_string_lossy().to_string();
    run_as_owner(&bin.join("pg_ctl"), &["-D", &d, "-o", &opts, "-l", &log, "-w", "start"])?;
    if !answers(&url_of(port)) {
        return Err(format!("the test cluster started but does not answer; see {log}"));
    }
    Ok(port)
}

/// A PostgreSQL cluster of one test's own, for tests that restart or stop the server (the
/// shared one must keep running for the others). Stopped and removed when dropped.
pub struct Cluster {
    root: tempfile::TempDir,
    /// The admin URL (database `postgres`).
    pub url: String,
}

impl Cluster {
    /// A fresh cluster; `None` (after saying why) when PostgreSQL's binaries are missing outside
    /// CI. Panics under CI when it cannot start one.
    pub fn start() -> Option<Cluster> {
        let root = match tempfile::Builder::new().prefix("outpost-pg-own-").tempdir() {
            Ok(r) => r,
            Err(e) => panic!("cannot create a temp dir: {e}"),
        };
        match fresh_cluster(root.path()) {
            Ok(port) => Some(Cluster {
                root,
                url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            }),
            Err(e) if std::env::var_os("CI").is_some() => panic!("PostgreSQL is needed for this test: {e}"),
            Err(e) => {
                eprintln!("skipping: cannot start a PostgreSQL cluster of the test's own: {e}");
                None
            }
        }
    }

    /// A new database on this cluster; its URL.
    pub fn database(&self, name: &str) -> String {
        let out = Command::new(psql())
            .args([self.url.as_str(), "-v", "ON_ERROR_STOP=1", "-qc"])
            .arg(format!("CREATE DATABASE {name}"))
            .output()
            .unwrap_or_else(|e| panic!("cannot run psql: {e}"));
        assert!(
            out.status.success(),
            "CREATE DATABASE {name} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        with_database(&self.url, name)
    }

    /// `pg_ctl restart -m fast`: every connection is cut, the server is back when this returns.
    pub fn restart(&self) {
        let bin = bindir().expect("the cluster started, so its binaries exist");
        let d = self.root.path().join("data").to_string_lossy().to_string();
        // With its log file again: without one the server would hold our output pipes open.
        let log = self.root.path().join("server.log").to_string_lossy().to_string();
        run_as_owner(
            &bin.join("pg_ctl"),
            &["-D", &d, "-l", &log, "-m", "fast", "-w", "restart"],
        )
        .unwrap_or_else(|e| panic!("cannot restart the test's PostgreSQL: {e}"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Ok(bin) = bindir() {
            let d = self.root.path().join("data").to_string_lossy().to_string();
            let _ = run_as_owner(&bin.join("pg_ctl"), &["-D", &d, "-m", "immediate", "-w", "stop"]);
        }
    }
}

/// Start (or find running) this user's shared test cluster; its admin URL.
fn start_shared() -> Result<String, String> {
    bindir()?;
    let root = std::env::temp_dir().join(format!("outpost-test-pg-{}", nix::unistd::getuid()));
    std::fs::create_dir_all(&root).map_err(|e| format!("cannot create {}: {e}", root.display()))?;
    let lock = std::fs::File::create(root.join("lock")).map_err(|e| format!("lock file: {e}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| format!("cannot lock {}: {e}", root.display()))?;
    let url_of = |port: u16| format!("postgres://postgres@127.0.0.1:{port}/postgres");
    if let Some(port) = std::fs::read_to_string(root.join("port"))
        .ok()
        .and_then(|p| p.trim().parse::<u16>().ok())
    {
        if answers(&url_of(port)) {
            return Ok(url_of(port));
        }
    }
    // Nothing answers: a fresh cluster.
    let port = fresh_cluster(&root)?;
    std::fs::write(root.join("port"), port.to_string()).map_err(|e| format!("{e}"))?;
    Ok(url_of(port))
}

#[cfg(test)]
mod tests {
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
            assert_eq!(super::with_database(server, "x"), want);
        }
    }
}
