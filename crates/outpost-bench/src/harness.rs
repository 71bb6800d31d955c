//! Real `outpost hub` and `outpost agent` processes on loopback, started from this very binary
//! (`std::env::current_exe()`), with data dirs under one work dir, and the real CLI to drive them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The `outpost` executable that is running this benchmark.
pub fn outpost_bin() -> Result<PathBuf> {
    std::env::current_exe().context("cannot find the running outpost executable")
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Poll `f` every `every` until it returns Some, or fail after `limit` naming `what`.
pub async fn wait_for<T>(what: &str, limit: Duration, every: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// Raise this process's open-file limit to `want` (or the hard limit, raising that too when
/// allowed); children inherit it. Returns the soft limit in effect.
pub fn raise_nofile(want: u64) -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        let target = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: (want as libc::rlim_t).max(lim.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &target) != 0 {
            let soft = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &soft);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
    let cur = lim.rlim_cur as u64;
    cur
}

pub struct HubProc {
    pub dir: PathBuf,
    pub port: u16,
    pub url: String,
    pub token: String,
    /// The address the hub listens on (and advertises, so its certificate covers it).
    pub ip: std::net::IpAddr,
    /// Every URL this hub advertises (itself alone, or every replica of its tier).
    pub advertise: Vec<String>,
    /// Extra `outpost hub` arguments (e.g. `--store postgres://...`) and environment (e.g.
    /// `OUTPOST_CA_KEY_SECRET`), kept across restarts.
    pub extra_args: Vec<String>,
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

impl HubProc {
    /// Start a hub with its data in `<work>/hub` and its log in `<work>/hub.log`.
    pub async fn start(work: &Path) -> Result<HubProc> {
        Self::start_on(work, std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// The same, listening on (and advertising) `ip`, e.g. a veth address reachable from a
    /// network namespace.
    pub async fn start_on(work: &Path, ip: std::net::IpAddr) -> Result<HubProc> {
        let mut h = Self::new(work, ip, free_port()?);
        h.launch().await?;
        Ok(h)
    }

    /// A hub not started yet: data in `<work>/hub`, log in `<work>/hub.log`, listening on
    /// `ip:port` and advertising itself (set `advertise`, `extra_args` and `env` before
    /// [`HubProc::launch`] for a replica of a tier).
    pub fn new(work: &Path, ip: std::net::IpAddr, port: u16) -> HubProc {
        let url = format!("https://{ip}:{port}");
        HubProc {
            dir: work.to_path_buf(),
            port,
            advertise: vec![url.clone()],
            url,
            token: String::new(),
            ip,
            extra_args: Vec::new(),
            env: Vec::new(),
            child: None,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("hub/ca.pem")
    }

    pub fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(self.ca_file()).context("reading the hub CA")
    }

    /// Start the hub process and wait until it answers the CLI.
    pub async fn launch(&mut self) -> Result<()> {
        self.spawn()?;
        self.ready().await
    }

    /// Start the hub process without waiting for it.
    pub fn spawn(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("hub.log"))?;
        let child = Command::new(outpost_bin()?)
            .args(["hub", "--listen", &format!("{}:{}", self.ip, self.port), "--data-dir"])
            .arg(self.dir.join("hub"))
            .args(["--advertise", &self.advertise.join(","), "--offline-after", "90s"])
            .args(&self.extra_args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start `outpost hub`")?;
        self.child = Some(child);
        Ok(())
    }

    /// Wait until the hub started by [`HubProc::spawn`] has its admin token and answers the CLI.
    pub async fn ready(&mut self) -> Result<()> {
        let tf = self.dir.join("hub/admin.token");
        self.token = wait_for(
            "hub admin token",
            Duration::from_secs(30),
            Duration::from_millis(20),
            || {
                std::fs::read_to_string(&tf)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            },
        )
        .await?;
        let end = Instant::now() + Duration::from_secs(60);
        while self.try_cli(&["get", "nodes", "-o", "json"]).await.is_err() {
            if Instant::now() > end {
                bail!(
                    "the hub did not answer within 60 s; see {}",
                    self.dir.join("hub.log").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// SIGKILL the hub without reaping it (so several can be killed at the same instant;
    /// [`HubProc::kill9`] reaps).
    pub fn signal_kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }

    /// SIGKILL the hub and reap it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn cli_command(&self, args: &[&str]) -> Result<tokio::process::Command> {
        let mut c = tokio::process::Command::new(outpost_bin()?);
        c.args(args)
            .env("OUTPOST_HUB", &self.url)
            .env("OUTPOST_TOKEN", &self.token)
            .env("OUTPOST_CA_FILE", self.ca_file())
            .env("OUTPOST_CONFIG", self.dir.join("no-config.json"))
            .stdin(Stdio::null());
        Ok(c)
    }

    /// Run a CLI command; stdout on success, stderr as the error otherwise.
    pub async fn try_cli(&self, args: &[&str]) -> Result<String> {
        let o = self.cli_command(args)?.output().await?;
        if !o.status.success() {
            bail!("outpost {args:?} failed: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// `outpost apply -f` of `yaml` (written to a file in the work dir).
    pub async fn apply(&self, yaml: &str) -> Result<String> {
        let f = self.dir.join("manifest.yaml");
        tokio::fs::write(&f, yaml).await?;
        self.try_cli(&["apply", "-f", &f.to_string_lossy()]).await
    }

    pub async fn join_token(&self, uses: u32) -> Result<String> {
        Ok(self
            .try_cli(&["token", "create", "--uses", &uses.to_string(), "--ttl", "0"])
            .await?
            .trim()
            .to_string())
    }

    /// Join an agent through the CLI into `<work>/agent-<name>`.
    pub async fn join(&self, name: &str, token: &str) -> Result<AgentProc> {
        let dir = self.dir.join(format!("agent-{name}"));
        let o = tokio::process::Command::new(outpost_bin()?)
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
            .env("OUTPOST_LOG", "warn")
            .output()
            .await?;
        if !o.status.success() {
            bail!("join {name} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(AgentProc {
            dir,
            child: None,
            netns: None,
        })
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub struct AgentProc {
    pub dir: PathBuf,
    child: Option<Child>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
}

impl AgentProc {
    /// `outpost agent run --stop-workloads-on-exit`, optionally with `--hub URL`.
    pub fn start(&mut self, hub: Option<&str>) -> Result<u32> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))?;
        let mut c = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(outpost_bin()?);
                c
            }
            None => Command::new(outpost_bin()?),
        };
        c.args(["agent", "run", "--stop-workloads-on-exit", "--data-dir"])
            .arg(&self.dir);
        if let Some(h) = hub {
            c.args(["--hub", h]);
        }
        let child = c
            .env("OUTPOST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start `outpost agent run`")?;
        let pid = child.id();
        self.child = Some(child);
        Ok(pid)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM and wait: with --stop-workloads-on-exit the agent stops its workloads first.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Live (non-zombie) processes whose command line is exactly `args`.
pub fn pids_with_cmdline(args: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = args.iter().flat_map(|a| a.bytes().chain(std::iter::once(0))).collect();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
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
    out
}

/// How many live processes run `/bin/sleep <arg>` for each of `args`.
pub fn count_sleepers(args: &[String]) -> usize {
    args.iter().map(|a| pids_with_cmdline(&["/bin/sleep", a]).len()).sum()
}

/// A process DaemonSet on every node running `/bin/sleep <arg>`.
pub fn sleeper_ds(name: &str, arg: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 2\n      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{arg}']}}\n"
    )
}

/// `n` sleeper DaemonSets `bench-0..n` in one multi-document manifest; returns it and the args.
pub fn sleepers(n: usize, base: u64) -> (String, Vec<String>) {
    let args: Vec<String> = (0..n).map(|i| (base + i as u64).to_string()).collect();
    let yaml = args
        .iter()
        .enumerate()
        .map(|(i, a)| sleeper_ds(&format!("bench-{i}"), a))
        .collect::<Vec<_>>()
        .join("---\n");
    (yaml, args)
}

/// Today's date and this machine, for reports.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| crate::procfs::parse_kb_field(&s, "MemTotal"))
        .unwrap_or(0);
    format!("{cpu}, {cores} cores, {:.0} GiB RAM", mem as f64 / (1u64 << 30) as f64)
}
