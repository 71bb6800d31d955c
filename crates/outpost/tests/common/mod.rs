//! Test harness: a real `outpost hub` process and real `outpost agent` processes on loopback,
//! with temp data dirs, driven through the real CLI. Every wait is a condition with a deadline.
#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_outpost");

/// Poll `f` every 50 ms until it returns Some, or panic after `secs` with `what`.
pub fn wait_for<T>(what: &str, secs: f64, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + Duration::from_secs_f64(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {secs}s waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The outpost binary, run under `wrap` (e.g. `ip netns exec NS`) when it is not empty.
pub fn outpost_under<S: AsRef<std::ffi::OsStr>>(wrap: &[S]) -> Command {
    match wrap.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(BIN);
            c
        }
        None => Command::new(BIN),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Hub {
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    pub token: String,
    child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
    /// Extra `outpost hub` arguments and environment (kept across restarts).
    pub extra_args: Vec<String>,
    pub extra_env: Vec<(String, String)>,
    /// The address the hub listens on (loopback unless a test needs another interface).
    pub listen_ip: String,
    /// A command the hub is started under, e.g. `prlimit --nofile=256:256 --`.
    pub wrapper: Vec<String>,
}

impl Hub {
    pub fn start() -> Hub {
        Hub::start_with(&[], &[])
    }

    /// Like [`Hub::start`], with extra hub arguments and environment variables.
    pub fn start_with(args: &[&str], env: &[(&str, &str)]) -> Hub {
        Hub::start_on("127.0.0.1", args, env)
    }

    /// Like [`Hub::start_with`], listening on `ip` (also advertised in its certificate).
    pub fn start_on(ip: &str, args: &[&str], env: &[(&str, &str)]) -> Hub {
        Hub::start_full(ip, &[], args, env)
    }

    /// Like [`Hub::start_with`], with the hub started under `wrapper` (e.g. `prlimit ... --`).
    pub fn start_under(wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Hub {
        Hub::start_full("127.0.0.1", wrapper, args, env)
    }

    /// A hub listening on `ip`, started under `wrapper`, with extra arguments and environment.
    pub fn start_full(ip: &str, wrapper: &[&str], args: &[&str], env: &[(&str, &str)]) -> Hub {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Hub {
            dir: tmp.path().to_path_buf(),
            port: free_port(),
            url: String::new(),
            token: String::new(),
            child: None,
            _tmp: Some(tmp),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            extra_env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            listen_ip: ip.to_string(),
            wrapper: wrapper.iter().map(|a| a.to_string()).collect(),
        };
        h.url = format!("https://{ip}:{}", h.port);
        h.launch();
        h
    }

    /// A hub listening on `port` with this hub's settings, when it is given one.
    pub fn start_on_port(port: u16, args: &[&str]) -> Hub {
        let tmp = tempfile::tempdir().unwrap();
        let mut h = Hub {
            dir: tmp.path().to_path_buf(),
            port,
            url: format!("https://127.0.0.1:{port}"),
            token: String::new(),
            child: None,
            _tmp: Some(tmp),
            extra_args: args.iter().map(|a| a.to_string()).collect(),
            extra_env: Vec::new(),
            listen_ip: "127.0.0.1".into(),
            wrapper: Vec::new(),
        };
        h.launch();
        h
    }

    /// A second hub process serving the same fleet: the same data dir (CA, admin token, SQLite
    /// database in WAL mode), another port, the same extra arguments (e.g. `--advertise`).
    /// Started after this one has created the data dir.
    pub fn replica(&self, port: u16) -> Hub {
        let mut h = Hub {
            dir: self.dir.clone(),
            port,
            url: format!("https://{}:{port}", self.listen_ip),
            token: String::new(),
            child: None,
            _tmp: None,
            extra_args: self.extra_args.clone(),
            extra_env: self.extra_env.clone(),
            listen_ip: self.listen_ip.clone(),
            wrapper: self.wrapper.clone(),
        };
        h.launch();
        h
    }

    /// Another hub process on the same database with a data dir of its own (PostgreSQL
    /// replicas): the same extra arguments and environment, another port; the operator copied
    /// the admin token into its data dir (docs/postgres.md). Nothing else is shared on disk.
    pub fn replica_elsewhere(&self, port: u16) -> Hub {
        let tmp = tempfile::tempdir().unwrap();
        let hub_dir = tmp.path().join("hub");
        std::fs::create_dir_all(&hub_dir).unwrap();
        std::fs::copy(self.dir.join("hub/admin.token"), hub_dir.join("admin.token")).unwrap();
        let mut h = Hub {
            dir: tmp.path().to_path_buf(),
            port,
            url: format!("https://{}:{port}", self.listen_ip),
            token: String::new(),
            child: None,
            _tmp: Some(tmp),
            extra_args: self.extra_args.clone(),
            extra_env: self.extra_env.clone(),
            listen_ip: self.listen_ip.clone(),
            wrapper: self.wrapper.clone(),
        };
        h.launch();
        h
    }

    /// A hub on PostgreSQL needs a CA secret (docs/postgres.md): the tests' own, unless the
    /// test gives one.
    fn pg_secret(&self) -> Option<(&'static str, &'static str)> {
        let on_pg = self.extra_args.iter().any(|a| a.starts_with("postgres"));
        let given = self.extra_args.iter().any(|a| a == "--ca-secret-file")
            || self.extra_env.iter().any(|(k, _)| k == "OUTPOST_CA_KEY_SECRET");
        (on_pg && !given).then_some(("OUTPOST_CA_KEY_SECRET", "outpost-tests-ca-secret"))
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hub.log"))
            .unwrap();
        let child = outpost_under(&self.wrapper)
            .args([
                "hub",
                "--listen",
                &format!("{}:{}", self.listen_ip, self.port),
                "--data-dir",
            ])
            .arg(self.dir.join("hub"))
            .args(["--advertise", &self.url, "--offline-after", "3s"])
            .args(&self.extra_args)
            .envs(self.pg_secret())
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let tf = self.dir.join("hub/admin.token");
        self.token = wait_for("hub admin token", 20.0, || {
            std::fs::read_to_string(&tf).ok().filter(|t| !t.is_empty())
        });
        wait_for("hub answering", 20.0, || {
            self.try_cli(&["get", "nodes", "-o", "json"])
                .status
                .success()
                .then_some(())
        });
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("hub/ca.pem")
    }

    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.ca_file()).unwrap()
    }

    /// The hub's process id (the wrapper's, which execs the hub).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("hub running").id()
    }

    /// SIGKILL the hub process.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    /// The CLI with this hub's settings (stdin, stdout and stderr as the caller sets them).
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .env("OUTPOST_HUB", &self.url)
            .env("OUTPOST_TOKEN", self.token.trim())
            .env("OUTPOST_CA_FILE", self.ca_file())
            .env("OUTPOST_CONFIG", self.dir.join("no-config.json"));
        c
    }

    pub fn try_cli(&self, args: &[&str]) -> Output {
        self.command(args).stdin(Stdio::null()).output().unwrap()
    }

    /// Run a CLI command that must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            o.status.success(),
            "outpost {args:?} failed:\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Run a CLI command that must fail; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> String {
        let o = self.try_cli(args);
        assert!(
            !o.status.success(),
            "outpost {args:?} should have failed:\n{}",
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stderr).into_owned()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.extend(["-o", "json"]);
        serde_json::from_str(&self.cli(&a)).unwrap()
    }

    pub fn token(&self, extra: &[&str]) -> String {
        let mut a = vec!["token", "create"];
        a.extend(extra);
        self.cli(&a).trim().to_string()
    }

    pub fn apply(&self, yaml: &str) -> String {
        let f = self.dir.join(format!(
            "m-{}.yaml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::write(&f, yaml).unwrap();
        self.cli(&["apply", "-f", f.to_str().unwrap()])
    }

    pub fn apply_err(&self, yaml: &str) -> String {
        let f = self.dir.join("bad.yaml");
        std::fs::write(&f, yaml).unwrap();
        self.cli_err(&["apply", "-f", f.to_str().unwrap()])
    }

    /// The status of `key` on `node` from `outpost get workloads -o json`, if reported.
    pub fn placement(&self, node: &str, key: &str) -> Option<Value> {
        let all = self.json(&["get", "workloads"]);
        all.as_array()?
            .iter()
            .find(|p| p["node"] == node && p["key"] == key)
            .cloned()
    }

    pub fn phase(&self, node: &str, key: &str) -> Option<String> {
        self.placement(node, key)?
            .get("status")?
            .get("phase")?
            .as_str()
            .map(String::from)
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.json(&["get", "nodes"])
            .as_array()?
            .iter()
            .find(|n| n["name"] == name)
            .cloned()
    }

    /// Join an agent (through the CLI) into a fresh data dir.
    pub fn join(&self, name: &str, token: &str) -> Agent {
        self.join_wrapped(name, token, &[])
    }

    /// Join an agent whose commands run under `wrap` (e.g. `ip netns exec NS`); the agent
    /// keeps running under it.
    pub fn join_wrapped(&self, name: &str, token: &str, wrap: &[&str]) -> Agent {
        self.join_with(name, token, wrap, &[])
    }

    /// Like [`Hub::join_wrapped`], with extra `outpost agent join` arguments (e.g. `--labels`).
    pub fn join_with(&self, name: &str, token: &str, wrap: &[&str], extra: &[&str]) -> Agent {
        let dir = self.dir.join(format!("agent-{name}"));
        let o = outpost_under(wrap)
            .args([
                "agent",
                "join",
                "--hub",
                &self.url,
                "--token",
                token,
                "--name",
                name,
                "--data-dir",
            ])
            .arg(&dir)
            .args(extra)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "join {name} failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Agent {
            name: name.into(),
            dir,
            child: None,
            env: Vec::new(),
            wrap: wrap.iter().map(|w| w.to_string()).collect(),
        }
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Agent {
    pub name: String,
    pub dir: PathBuf,
    child: Option<Child>,
    /// Extra environment for the agent process (e.g. monitoring intervals).
    pub env: Vec<(String, String)>,
    /// A command the agent runs under, e.g. `ip netns exec NS` or `faketime -3h`.
    pub wrap: Vec<String>,
}

impl Agent {
    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .unwrap();
        let c = outpost_under(&self.wrap)
            .args(["agent", "run", "--stop-workloads-on-exit", "--data-dir"])
            .arg(&self.dir)
            .env("OUTPOST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(c);
    }

    pub fn running(mut self) -> Agent {
        self.start();
        self
    }

    /// `kill -9` the agent: its workloads stay alive, as after an agent crash.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: with --stop-workloads-on-exit the agent stops its workloads.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn identity(&self) -> (String, String, String) {
        let id: Value =
            serde_json::from_str(&std::fs::read_to_string(self.dir.join("identity.json")).unwrap()).unwrap();
        let key = std::fs::read_to_string(self.dir.join("node.key")).unwrap();
        (
            id["ca_pem"].as_str().unwrap().into(),
            id["cert_pem"].as_str().unwrap().into(),
            key,
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
        // Workloads of a killed agent survive it by design; clean up after the test.
        for pid in pids_with_env("OUTPOST_AGENT_ID=")
            .into_iter()
            .filter(|p| environ_contains(*p, &self.dir))
        {
            // SAFETY: kill(2) on a process group this test's agent created.
            unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
        }
    }
}

fn environ_contains(pid: u32, dir: &Path) -> bool {
    // The agent id is a hash of the data dir; the log path under it is in no environ, so match
    // by the workload dir the process was started in.
    std::fs::read_link(format!("/proc/{pid}/cwd"))
        .map(|cwd| cwd.starts_with(dir))
        .unwrap_or(false)
}

/// Pids of live process-group leaders whose environment contains `needle`.
pub fn pids_with_env(needle: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !env.split(|b| *b == 0).any(|v| v.starts_with(needle.as_bytes())) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        let f: Vec<&str> = rest.split(' ').collect();
        if f[0] != "Z" && f[2] == pid.to_string() {
            out.push(pid);
        }
    }
    out
}

/// Live processes whose command line is exactly `args`.
pub fn pids_with_cmdline(args: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if std::fs::read(format!("/proc/{pid}/cmdline")).ok().as_deref() == Some(&want[..]) {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true);
            if !zombie {
                out.push(pid);
            }
        }
    }
    out.sort();
    out
}

/// A unique number for `sleep` so each test can count its own processes.
pub fn marker() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{}{:03}",
        100000 + std::process::id() % 100000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A process DaemonSet running `sleep <marker>`.
pub fn sleeper_ds(name: &str, marker: &str, selector: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 2\n{selector}      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{marker}']}}\n"
    )
}

/// Every record of a pipeline stream the hub stored (paged with `outpost data query --after`).
pub fn stored_records(hub: &Hub, stream: &str) -> Vec<Value> {
    let mut all: Vec<Value> = Vec::new();
    loop {
        let after = all.last().map_or(0, |r| r["cursor"].as_i64().unwrap());
        let out = hub.cli(&[
            "data",
            "query",
            stream,
            "-n",
            "10000",
            "--after",
            &after.to_string(),
            "-o",
            "json",
        ]);
        let page: Vec<Value> = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        if page.is_empty() {
            return all;
        }
        all.extend(page);
    }
}

/// Is a Docker Engine reachable? Under CI (`scripts/test.sh` sets `CI`) it must be: the script
/// starts one, so a missing engine fails the test instead of skipping it.
pub fn docker_ready() -> bool {
    let ok = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").is_err(),
            "no Docker Engine: scripts/test.sh must install and start dockerd"
        );
        eprintln!("skipping: no Docker Engine reachable (run scripts/test.sh, which starts one)");
    }
    ok
}

/// `docker ARGS`, which must succeed; its trimmed output.
pub fn docker(args: &[&str]) -> String {
    let o = Command::new("docker").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Build a busybox-based image from a folder: `/bin` with busybox and `applets`, `/www/index.html`
/// holding `page`, and `changes` (Dockerfile lines such as `CMD [...]`).
pub fn build_image(name: &str, applets: &[&str], page: &str, changes: &[&str]) {
    if has_image(name) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("bin")).unwrap();
    std::fs::create_dir_all(dir.path().join("www")).unwrap();
    std::fs::copy("/bin/busybox", dir.path().join("bin/busybox")).expect("busybox-static provides /bin/busybox");
    for a in applets {
        std::os::unix::fs::symlink("busybox", dir.path().join("bin").join(a)).unwrap();
    }
    std::fs::write(dir.path().join("www/index.html"), page).unwrap();
    let mut cmd = Command::new("sh");
    let mut script = format!(
        "tar -C {} -c . | docker import -c 'ENV PATH=/bin'",
        dir.path().display()
    );
    for c in changes {
        script.push_str(&format!(" -c '{c}'"));
    }
    script.push_str(&format!(" - {name}"));
    let o = cmd.args(["-c", &script]).output().unwrap();
    assert!(
        o.status.success(),
        "building {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

pub fn has_image(name: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Read one HTTP POST from `conn` (a webhook test receiver), answer 200, and return its JSON
/// body (None when it is not JSON).
pub fn read_json_post(conn: std::net::TcpStream) -> Option<Value> {
    use std::io::{BufRead, BufReader, Read, Write};
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut len = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    let v = r
        .read_exact(&mut body)
        .ok()
        .and_then(|_| serde_json::from_slice(&body).ok());
    let mut w = conn;
    let _ = w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
    v
}

/// Run a command that must succeed (`ip ...` for network namespaces).
pub fn sh(args: &[&str]) {
    let o = Command::new(args[0]).args(&args[1..]).output().unwrap();
    assert!(
        o.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A network namespace joined to the host by a veth pair: the host side holds `HOST_IP`, the
/// namespace side `NS_IP`. Cutting the link takes the namespace's end down, as a site's
/// modem losing its uplink would: the hub sees nothing, the agent's packets go nowhere.
pub struct Netns {
    pub name: String,
    pub host_ip: String,
}

impl Netns {
    pub fn new() -> Netns {
        use std::sync::atomic::{AtomicU32, Ordering};
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = (std::process::id() * 7 + SEQ.fetch_add(1, Ordering::Relaxed)) % 200 + 20;
        let name = format!("opchaos{n}");
        let (vh, vn) = (format!("opvh{n}"), format!("opvn{n}"));
        let host_ip = format!("10.77.{n}.1");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &vh]).output();
        sh(&["ip", "netns", "add", &name]);
        sh(&["ip", "link", "add", &vh, "type", "veth", "peer", "name", &vn]);
        sh(&["ip", "link", "set", &vn, "netns", &name]);
        sh(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &vh]);
        sh(&["ip", "link", "set", &vh, "up"]);
        let ns = ["ip", "netns", "exec", &name];
        sh(&[&ns[..], &["ip", "addr", "add", &format!("10.77.{n}.2/30"), "dev", &vn]].concat());
        sh(&[&ns[..], &["ip", "link", "set", &vn, "up"]].concat());
        sh(&[&ns[..], &["ip", "link", "set", "lo", "up"]].concat());
        Netns { name, host_ip }
    }
    pub fn ns_if(&self) -> String {
        self.name.replace("opchaos", "opvn")
    }
    pub fn wrap(&self) -> Vec<String> {
        ["ip", "netns", "exec", &self.name].map(String::from).to_vec()
    }
    /// Take the namespace's end of the link down (the hub sees nothing more from it).
    pub fn cut(&self) {
        self.link("down");
    }
    pub fn heal(&self) {
        self.link("up");
    }
    fn link(&self, state: &str) {
        let ns_if = self.ns_if();
        sh(&["ip", "netns", "exec", &self.name, "ip", "link", "set", &ns_if, state]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// A node's status word in `outpost get nodes` (Online, Offline, ...).
pub fn node_status(hub: &Hub, name: &str) -> Option<String> {
    let out = hub.try_cli(&["get", "nodes", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    v.as_array()?
        .iter()
        .find(|n| n["name"] == name)
        .and_then(|n| n["status"].as_str())
        .map(String::from)
}

/// GET an operator route with the admin token; returns (status, body).
pub fn api_get(hub: &Hub, path: &str) -> (u16, String) {
    api_get_as(hub, hub.token.trim(), path)
}

/// GET an operator route with `token`; returns (status, body).
pub fn api_get_as(hub: &Hub, token: &str, path: &str) -> (u16, String) {
    api_call(hub, |c, url| c.get(url).bearer_auth(token), path)
}

/// POST JSON to an operator route with the admin token; returns (status, body).
pub fn api_post(hub: &Hub, path: &str, body: &Value) -> (u16, String) {
    api_call(hub, |c, url| c.post(url).bearer_auth(hub.token.trim()).json(body), path)
}

/// One HTTPS request to the hub (verified against its CA), built by `build` from a client and
/// the full URL of `path`; returns (status, body).
pub fn api_call(
    hub: &Hub,
    build: impl FnOnce(&reqwest::Client, String) -> reqwest::RequestBuilder,
    path: &str,
) -> (u16, String) {
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let r = build(&c, format!("{}{path}", hub.url)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The value of the first sample of `metric` whose labels contain every `want` pair.
pub fn metric(text: &str, metric: &str, want: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")) || l.starts_with(&format!("{metric} ")))
        .find(|l| want.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// `promtool check metrics` on the text: must pass. Without promtool: a failure under CI,
/// a printed notice otherwise (scripts/test.sh installs it).
pub fn promtool_accepts(text: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("promtool is required under CI (scripts/test.sh installs the Debian package prometheus): {e}");
            }
            eprintln!(
                "NOTICE: promtool not found ({e}); skipping the promtool check. Install the Debian package prometheus."
            );
            return;
        }
    };
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejected /metrics:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Run one SQL statement with `psql` against `url`; its unaligned, tuples-only output.
pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql").args([url, "-qAtc", sql]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A free loopback port not in `taken`.
pub fn other_port(taken: &[u16]) -> u16 {
    loop {
        let p = free_port();
        if !taken.contains(&p) {
            return p;
        }
    }
}

/// Run `outpost exec ARGS` through `hub` with `input` on its stdin; (exit code, stdout, stderr).
pub fn exec(hub: &Hub, args: &[&str], input: &str) -> (i32, String, String) {
    let mut a = vec!["exec"];
    a.extend(args);
    let mut child = hub
        .command(&a)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
