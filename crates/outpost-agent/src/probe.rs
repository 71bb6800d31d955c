//! Running probes against a unit's process. Decisions about results live in
//! `outpost_core::probe`; this module only executes checks on a schedule and reports them.
//!
//! httpGet: a plain HTTP GET through reqwest (TLS for `scheme: HTTPS`, without verifying the
//! certificate, as the kubelet does; no proxy, redirects not followed, the
//! probe's headers as given, IPv6 hosts bracketed); any status from 200 to 399 passes, as in
//! Kubernetes. tcpSocket: a TCP connect. exec: the command runs with the container's environment and working directory, in
//! the process's mount namespace (so it sees the same volume mounts), and passes on exit code 0.
//! Every check is bounded by the probe's `timeoutSeconds`.

use std::path::PathBuf;
use std::time::Duration;

use outpost_api::{ProbeAction, ProbeSpec};
use outpost_core::probe::ProbeKind;
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
                    let (ok, message) =
                        match tokio::time::timeout(timeout, check(&spec.action, pid, &ctx, timeout)).await {
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

async fn check(action: &ProbeAction, pid: u32, ctx: &ExecContext, timeout: Duration) -> (bool, String) {
    match action {
        ProbeAction::TcpSocket { host, port } => match tokio::net::TcpStream::connect((bare_host(host), *port)).await {
            Ok(_) => (true, String::new()),
            Err(e) => (false, format!("dial tcp {host}:{port}: {e}")),
        },
        ProbeAction::HttpGet {
            host,
            port,
            path,
            headers,
            https,
        } => http_get(host, *port, path, headers, timeout, *https).await,
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

/// The probes' HTTP client: plain HTTP, no proxy, no connection reuse (each probe opens a
/// fresh connection, as the kubelet's do), redirects not followed (a 3xx answer passes).
fn http_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        // Probes speak plain HTTP; the TLS config only names the ring provider, so building
        // the client never depends on a process-wide default.
        let tls = rustls::ClientConfig::builder_with_provider(outpost_pki::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .user_agent("outpost-probe")
            .build()
            .expect("a plain HTTP client builds")
    })
}

/// The client of `scheme: HTTPS` probes: TLS that accepts any certificate (a probe checks that
/// the workload answers, not who it is; the kubelet does not verify either).
fn https_client() -> &'static reqwest::Client {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    CLIENT.get_or_init(|| {
        let provider = outpost_pki::provider();
        let tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyCert(provider)))
            .with_no_client_auth();
        reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .pool_max_idle_per_host(0)
            .user_agent("outpost-probe")
            .build()
            .expect("an HTTPS probe client builds")
    })
}

#[derive(Debug)]
struct AnyCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A probe's host as written (`127.0.0.1`, `::1`, `[::1]`, `example.local`) without brackets.
fn bare_host(host: &str) -> &str {
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

/// `http://host:port/path` with IPv6 literals bracketed; `path` may carry a query.
pub fn probe_url(host: &str, port: u16, path: &str) -> Result<reqwest::Url, String> {
    let host = bare_host(host);
    let mut url = reqwest::Url::parse("http://localhost/").expect("static URL");
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => url.set_ip_host(ip).map_err(|_| format!("bad probe host {host:?}"))?,
        Err(_) => url
            .set_host(Some(host))
            .map_err(|e| format!("bad probe host {host:?}: {e}"))?,
    }
    url.set_port(Some(port)).map_err(|_| format!("bad probe port {port}"))?;
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    url.join(&path).map_err(|e| format!("bad probe path {path:?}: {e}"))
}

/// Kubernetes' httpGet: any status from 200 to 399 passes; the probe's headers are sent as
/// given (a `Host` header among them replaces the one derived from the URL).
async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    timeout: Duration,
    https: bool,
) -> (bool, String) {
    let mut url = match probe_url(host, port, path) {
        Ok(u) => u,
        Err(e) => return (false, e),
    };
    let client = if https {
        let _ = url.set_scheme("https");
        https_client()
    } else {
        http_client()
    };
    let mut req = client.get(url.clone()).timeout(timeout);
    for (k, v) in headers {
        req = req.header(k.as_str(), v.as_str());
    }
    match req.send().await {
        Ok(resp) => {
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                (true, String::new())
            } else {
                (false, format!("HTTP {code} from {url}"))
            }
        }
        Err(e) if e.is_timeout() => (false, format!("GET {url}: timed out after {} s", timeout.as_secs())),
        Err(e) => (false, format!("GET {url}: {}", error_chain(&e))),
    }
}

/// An error with its causes (reqwest's own text alone says only "error sending request").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = c.source();
    }
    out
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A one-shot HTTP server on `addr` answering `status`; returns its port and the request
    /// head it received.
    async fn serve_once(addr: &str, status: u16) -> (u16, tokio::task::JoinHandle<String>) {
        let l = tokio::net::TcpListener::bind(addr).await.unwrap();
        let port = l.local_addr().unwrap().port();
        let h = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let answer = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            s.write_all(answer.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf).to_ascii_lowercase()
        });
        (port, h)
    }

    fn headers(head: &str) -> Vec<&str> {
        head.lines().collect()
    }

    #[tokio::test]
    async fn http_probe_on_ipv6_loopback_sends_a_valid_host_header() {
        for host in ["::1", "[::1]"] {
            let (port, seen) = serve_once("[::1]:0", 200).await;
            let r = http_get(host, port, "/healthz?full=1", &[], Duration::from_secs(5), false).await;
            assert_eq!(r, (true, String::new()), "{host}");
            let head = seen.await.unwrap();
            assert!(head.starts_with("get /healthz?full=1 http/1.1"), "{head}");
            assert!(
                headers(&head).contains(&format!("host: [::1]:{port}").as_str()),
                "the Host header brackets the IPv6 literal:\n{head}"
            );
        }
    }

    #[tokio::test]
    async fn http_probe_passes_2xx_3xx_fails_others_and_sends_its_headers() {
        for (status, ok) in [
            (200, true),
            (204, true),
            (302, true),
            (399, true),
            (404, false),
            (500, false),
        ] {
            let (port, seen) = serve_once("127.0.0.1:0", status).await;
            let hdrs = vec![("X-Probe".to_string(), "yes".to_string())];
            let (passed, msg) = http_get("127.0.0.1", port, "ready", &hdrs, Duration::from_secs(5), false).await;
            assert_eq!(passed, ok, "HTTP {status}: {msg}");
            if !ok {
                assert!(msg.contains(&format!("HTTP {status}")), "{msg}");
            }
            let head = seen.await.unwrap();
            assert!(head.starts_with("get /ready http/1.1"), "{head}");
            assert!(headers(&head).contains(&"x-probe: yes"), "{head}");
            assert!(headers(&head).contains(&"user-agent: outpost-probe"), "{head}");
        }
        // a Host header from the probe wins over the URL's
        let (port, seen) = serve_once("127.0.0.1:0", 200).await;
        let hdrs = vec![("Host".to_string(), "app.example".to_string())];
        assert!(
            http_get("127.0.0.1", port, "/", &hdrs, Duration::from_secs(5), false)
                .await
                .0
        );
        let head = seen.await.unwrap();
        assert!(headers(&head).contains(&"host: app.example"), "{head}");
    }

    #[tokio::test]
    async fn http_probe_times_out_and_reports_refused_connections() {
        // accepts, never answers
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _hold = tokio::spawn(async move {
            let (s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(s);
        });
        let t = std::time::Instant::now();
        let (ok, msg) = http_get("127.0.0.1", port, "/", &[], Duration::from_millis(300), false).await;
        assert!(!ok && msg.contains("timed out"), "{msg}");
        assert!(t.elapsed() < Duration::from_secs(5));
        // nothing listens
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let (ok, msg) = http_get("127.0.0.1", port, "/", &[], Duration::from_secs(2), false).await;
        assert!(
            !ok && msg.starts_with(&format!("GET http://127.0.0.1:{port}/:")),
            "{msg}"
        );
    }

    #[test]
    fn urls_bracket_ipv6_and_keep_queries() {
        let u = |h, p| probe_url(h, 8080, p).unwrap().to_string();
        assert_eq!(u("::1", "/x"), "http://[::1]:8080/x");
        assert_eq!(u("[fe80::1]", "x?y=1"), "http://[fe80::1]:8080/x?y=1");
        assert_eq!(u("127.0.0.1", "/"), "http://127.0.0.1:8080/");
        assert_eq!(u("db.local", "/h"), "http://db.local:8080/h");
        assert!(probe_url("a b", 1, "/").is_err());
    }
}
