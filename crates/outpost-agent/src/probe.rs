//! Running probes against a unit's process. Decisions about results live in
//! `outpost_core::probe`; this module only executes checks on a schedule and reports them.
//!
//! httpGet: a plain HTTP/1.1 GET (no TLS); any status from 200 to 399 passes. tcpSocket: a TCP
//! connect. exec: the command runs with the container's environment and working directory, in
//! the process's mount namespace (so it sees the same volume mounts), and passes on exit code 0.
//! Every check is bounded by the probe's `timeoutSeconds`.

use std::path::PathBuf;
use std::time::Duration;

use outpost_api::{ProbeAction, ProbeSpec};
use outpost_core::probe::ProbeKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

#[derive(Debug)]
pub struct ProbeEvent {
    pub unit: String,
    pub pid: u32,
    pub kind: ProbeKind,
    pub ok: bool,
    pub message: String,
}

/// What an exec probe needs to look like the container.
#[derive(Clone)]
pub struct ExecContext {
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// For containers: exec through the engine instead.
    pub container: Option<(crate::docker::Engine, String)>,
}

/// Start one task per probe; they stop when aborted (the reconciler aborts them when the process
/// exits). A startup probe stops after its first success.
pub fn spawn(
    unit: &str,
    pid: u32,
    probes: [(ProbeKind, Option<ProbeSpec>); 3],
    ctx: ExecContext,
    tx: mpsc::UnboundedSender<ProbeEvent>,
) -> Vec<JoinHandle<()>> {
    probes
        .into_iter()
        .filter_map(|(kind, spec)| spec.map(|s| (kind, s)))
        .map(|(kind, spec)| {
            let (unit, tx, ctx) = (unit.to_string(), tx.clone(), ctx.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(spec.initial_delay_seconds)).await;
                loop {
                    let timeout = Duration::from_secs(spec.timeout_seconds);
                    let (ok, message) = match tokio::time::timeout(timeout, check(&spec.action, pid, &ctx)).await {
                        Ok(r) => r,
                        Err(_) => (false, format!("timed out after {} s", spec.timeout_seconds)),
                    };
                    if tx
                        .send(ProbeEvent {
                            unit: unit.clone(),
                            pid,
                            kind,
                            ok,
                            message,
                        })
                        .is_err()
                    {
                        return;
                    }
                    if kind == ProbeKind::Startup && ok {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(spec.period_seconds)).await;
                }
            })
        })
        .collect()
}

async fn check(action: &ProbeAction, pid: u32, ctx: &ExecContext) -> (bool, String) {
    match action {
        ProbeAction::TcpSocket { host, port } => match tokio::net::TcpStream::connect((host.as_str(), *port)).await {
            Ok(_) => (true, String::new()),
            Err(e) => (false, format!("dial tcp {host}:{port}: {e}")),
        },
        ProbeAction::HttpGet {
            host,
            port,
            path,
            headers,
        } => http_get(host, *port, path, headers).await,
        ProbeAction::Exec { command } => match &ctx.container {
            Some((engine, id)) => match engine.exec(id, command, Duration::from_secs(3600)).await {
                Ok((0, _)) => (true, String::new()),
                Ok((code, out)) => (
                    false,
                    format!(
                        "{} exited with code {code}{}",
                        command.join(" "),
                        if out.is_empty() {
                            String::new()
                        } else {
                            format!(": {out}")
                        }
                    ),
                ),
                Err(e) => (false, e),
            },
            None => exec(command, pid, ctx).await,
        },
    }
}

async fn http_get(host: &str, port: u16, path: &str, headers: &[(String, String)]) -> (bool, String) {
    let url = format!("http://{host}:{port}{path}");
    let mut s = match tokio::net::TcpStream::connect((host, port)).await {
        Ok(s) => s,
        Err(e) => return (false, format!("GET {url}: {e}")),
    };
    let mut req =
        format!("GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: outpost-probe\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    if let Err(e) = s.write_all(req.as_bytes()).await {
        return (false, format!("GET {url}: {e}"));
    }
    let mut buf = vec![0u8; 1024];
    let mut n = 0;
    while n < buf.len() {
        match s.read(&mut buf[n..]).await {
            Ok(0) => break,
            Ok(k) => {
                n += k;
                if buf[..n].windows(2).any(|w| w == b"\r\n") {
                    break;
                }
            }
            Err(e) => return (false, format!("GET {url}: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&buf[..n]);
    let code: Option<u16> = line.split_whitespace().nth(1).and_then(|c| c.parse().ok());
    match code {
        Some(c) if (200..400).contains(&c) => (true, String::new()),
        Some(c) => (false, format!("HTTP {c} from {url}")),
        None => (false, format!("GET {url}: not an HTTP answer")),
    }
}

async fn exec(command: &[String], pid: u32, ctx: &ExecContext) -> (bool, String) {
    let Some(exe) = command.first() else {
        return (false, "empty command".into());
    };
    let mut cmd = tokio::process::Command::new(exe);
    cmd.args(&command[1..])
        .env_clear()
        .envs(ctx.env.iter().cloned())
        .current_dir(&ctx.cwd);
    cmd.stdin(std::process::Stdio::null()).kill_on_drop(true);
    // Enter the process's mount namespace when it has its own (bind-mounted volumes).
    let ours = std::fs::read_link("/proc/self/ns/mnt").ok();
    let theirs = std::fs::read_link(format!("/proc/{pid}/ns/mnt")).ok();
    if theirs.is_some() && ours != theirs {
        if let Ok(f) = std::fs::File::open(format!("/proc/{pid}/ns/mnt")) {
            use std::os::fd::IntoRawFd;
            let fd = f.into_raw_fd();
            // SAFETY: setns(2) on an fd opened before fork; no allocation in the closure.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(fd, libc::CLONE_NEWNS) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let out = cmd.output().await;
            // SAFETY: closing the fd we opened above, in the parent.
            unsafe { libc::close(fd) };
            return exec_result(command, out);
        }
    }
    exec_result(command, cmd.output().await)
}

fn exec_result(command: &[String], out: std::io::Result<std::process::Output>) -> (bool, String) {
    match out {
        Ok(o) if o.status.success() => (true, String::new()),
        Ok(o) => {
            let mut text = String::from_utf8_lossy(&o.stderr).trim().to_string();
            if text.is_empty() {
                text = String::from_utf8_lossy(&o.stdout).trim().to_string();
            }
            text.truncate(200);
            let code = o.status.code().map_or("a signal".to_string(), |c| format!("code {c}"));
            (
                false,
                format!(
                    "{} exited with {code}{}",
                    command.join(" "),
                    if text.is_empty() {
                        String::new()
                    } else {
                        format!(": {text}")
                    }
                ),
            )
        }
        Err(e) => (false, format!("cannot run {}: {e}", command.join(" "))),
    }
}

/// The last `n` lines of a log file (at most 2 KiB read), for failure reports.
pub fn tail(path: &std::path::Path, n: usize) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(2048)));
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
