//! Hardening of the join, certificate and transport paths (issue 9), end to end: real hub and
//! agent processes on loopback, real TLS, real SQLite, real descriptor and file-size limits.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rt() -> tokio::runtime::Runtime {
    outpost_pki::install_provider();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// An HTTPS client with the admin token's CA, and optionally a node identity.
fn https(hub: &Hub, identity: Option<(&str, &str)>) -> reqwest::Client {
    outpost_pki::install_provider();
    let tls = outpost_pki::client_config(&hub.ca_pem(), identity).unwrap();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

fn node_json(hub: &Hub, name: &str) -> Option<Value> {
    hub.node(name)
}

fn online(hub: &Hub, name: &str) -> bool {
    node_json(hub, name).is_some_and(|n| n["status"] == "Online")
}

/// Every file under `dir`, as bytes, concatenated (to look for a value anywhere).
fn all_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(all_bytes(&p));
        } else if let Ok(b) = std::fs::read(&p) {
            out.extend(b);
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

/// Defect 2: a join-token holder cannot take another node's placement and Secrets.
#[test]
fn an_impostor_never_receives_another_nodes_secret() {
    let hub = Hub::start();
    let victim_token = hub.token(&["--labels", "site=store-001"]);
    let _victim = hub.join("victim", &victim_token).running();
    let m = marker();
    let secret = format!("s3cret-{m}");
    hub.apply(&format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: db}}\nstringData: {{password: {secret}}}\n---\n\
         apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: pinned}}\nspec:\n  template:\n    spec:\n\
         \x20     runtimeClassName: process\n      nodeSelector: {{kubernetes.io/hostname: victim}}\n\
         \x20     containers:\n      - name: main\n        command: [/bin/sleep, '{m}']\n\
         \x20       env:\n        - name: PASSWORD\n          valueFrom: {{secretKeyRef: {{name: db, key: password}}}}\n"
    ));
    wait_for("the pinned DaemonSet running on the victim", 30.0, || {
        (hub.phase("victim", "daemonset/default/pinned")? == "Running").then_some(())
    });

    // Any token: the impostor asks for the victim's hostname, or the victim's site.
    let other = hub.token(&["--labels", "site=store-002"]);
    let join = |labels: &str| {
        std::process::Command::new(BIN)
            .args([
                "agent", "join", "--hub", &hub.url, "--token", &other, "--name", "impostor",
            ])
            .args(["--labels", labels, "--data-dir"])
            .arg(hub.dir.join("impostor-try"))
            .output()
            .unwrap()
    };
    for (labels, says) in [
        ("kubernetes.io/hostname=victim", "the hub sets it to the node's name"),
        ("site=store-001", "the join token sets site"),
        ("role=pinned", "a node may set only"),
    ] {
        let o = join(labels);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{labels}: the join must be refused");
        assert!(
            err.contains("label_not_allowed") && err.contains(says),
            "{labels}: {err}"
        );
        assert!(!hub.dir.join("impostor-try/identity.json").exists(), "nothing written");
        assert!(node_json(&hub, "impostor").is_none(), "nothing stored at the hub");
    }

    // Joined with what it may set, the impostor gets the hub's hostname and the token's site.
    // A DaemonSet for every node shows when it has received its desired state.
    let m2 = marker();
    hub.apply(&sleeper_ds("everywhere", &m2, ""));
    let mut imp = hub.join("impostor", &other);
    imp.start();
    wait_for(
        "the impostor synced (it runs the DaemonSet for every node)",
        30.0,
        || (hub.phase("impostor", "daemonset/default/everywhere")? == "Running").then_some(()),
    );
    let n = node_json(&hub, "impostor").unwrap();
    assert_eq!(n["labels"]["kubernetes.io/hostname"], "impostor");
    assert_eq!(n["labels"]["site"], "store-002");
    assert_eq!(hub.placement("impostor", "daemonset/default/pinned"), None);
    imp.stop();
    assert!(
        !contains(&all_bytes(&imp.dir), &secret),
        "the victim's secret must not be anywhere in the impostor's data dir"
    );
}

/// Defect 3: a certificate that expired while the agent was stopped is renewed when the agent
/// starts; the hub warned about it meanwhile; `describe node` tells the truth; an agent whose
/// node was deleted says what to do.
#[test]
fn a_node_whose_certificate_expired_offline_comes_back_by_itself() {
    let hub = Hub::start_with(&["--node-cert-lifetime", "12s"], &[("OUTPOST_ALERT_EVAL_MS", "200")]);
    let t = hub.token(&[]);
    let mut late = hub.join("late", &t);
    let mut gone = hub.join("gone", &t);
    let m = marker();
    hub.apply(&sleeper_ds("everywhere", &m, ""));
    let (_, cert, _) = late.identity();
    let not_after = outpost_pki::not_after_unix(&cert).unwrap();
    assert!(not_after - now_s() <= 12, "the hub's --node-cert-lifetime is used");
    wait_for("both certificates to expire", 30.0, || {
        (now_s() > not_after + 1).then_some(())
    });

    // While the nodes are away with expired certificates, the hub says so.
    let alerts = wait_for("NodeCertificateExpiring for both", 10.0, || {
        let a = hub.json(&["get", "alerts"]);
        let firing: Vec<String> = a
            .as_array()?
            .iter()
            .filter(|a| a["name"] == "NodeCertificateExpiring" && a["state"] == "Firing")
            .map(|a| a["node"].as_str().unwrap_or("").to_string())
            .collect();
        (firing.len() == 2).then_some(a)
    });
    assert!(alerts.to_string().contains("the certificate of late"), "{alerts}");
    let d = hub.cli(&["describe", "node", "late"]);
    assert!(d.contains("Certificate:    EXPIRED"), "{d}");

    // gone is deleted at the hub: its agent cannot renew and says what to do.
    hub.cli(&["delete", "node", "gone"]);
    gone.start();
    late.start();
    wait_for("late online again", 30.0, || online(&hub, "late").then_some(()));
    wait_for("the workload running on late", 30.0, || {
        (hub.phase("late", "daemonset/default/everywhere")? == "Running").then_some(())
    });
    let (_, renewed, _) = late.identity();
    assert_ne!(renewed, cert, "a renewed certificate is saved");
    let log = late.log();
    assert!(
        log.contains("the node certificate expired") && log.contains("node certificate renewed"),
        "{log}"
    );
    // It keeps renewing by itself (12 s certificates) and stays online.
    let first = outpost_pki::not_after_unix(&renewed).unwrap();
    let second = wait_for("a second renewal while running", 30.0, || {
        let (_, c, _) = late.identity();
        let na = outpost_pki::not_after_unix(&c).unwrap();
        (na > first).then_some(na)
    });
    wait_for("the hub sees the node use its newest certificate", 30.0, || {
        let n = node_json(&hub, "late")?;
        (n["cert_expires_at"].as_i64()? >= second * 1000).then_some(())
    });
    wait_for("the certificate alert resolved for late", 10.0, || {
        let a = hub.json(&["get", "alerts"]);
        a.as_array()?
            .iter()
            .all(|a| !(a["name"] == "NodeCertificateExpiring" && a["node"] == "late" && a["state"] == "Firing"))
            .then_some(())
    });
    let d = hub.cli(&["describe", "node", "late"]);
    assert!(d.contains("Certificate:    expires in"), "{d}");

    let text = wait_for("gone's agent explains", 30.0, || {
        let l = gone.log();
        l.contains("the hub no longer knows node gone").then_some(l)
    });
    assert!(
        text.contains("ERROR") && text.contains("outpost agent --hub URL --token T"),
        "{text}"
    );
}

/// Defect 4: a renewal whose answer is lost leaves the agent working.
#[test]
fn a_renewal_whose_answer_is_lost_leaves_the_agent_working() {
    let hub = Hub::start();
    let t = hub.token(&[]);
    let mut a = hub.join("keeper", &t).running();
    let m1 = marker();
    hub.apply(&sleeper_ds("first", &m1, ""));
    wait_for("first running", 30.0, || {
        (hub.phase("keeper", "daemonset/default/first")? == "Running").then_some(())
    });
    // Someone with the node's key renews, twice, and throws the answers away.
    let (_, cert, key) = a.identity();
    let c = https(&hub, Some((&cert, &key)));
    rt().block_on(async {
        for _ in 0..2 {
            let csr_pem = outpost_pki::NodeKey::csr_for(&key, "keeper").unwrap();
            let r = c
                .post(format!("{}/v1/nodes/keeper/renew", hub.url))
                .json(&outpost_api::RenewRequest { csr_pem })
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    });
    // The agent, still on its old certificate, gets and reports the next change...
    let m2 = marker();
    hub.apply(&sleeper_ds("second", &m2, ""));
    wait_for("second running", 30.0, || {
        (hub.phase("keeper", "daemonset/default/second")? == "Running").then_some(())
    });
    // ...also after a restart.
    a.kill9();
    a.start();
    let m3 = marker();
    hub.apply(&sleeper_ds("third", &m3, ""));
    wait_for("third running after the restart", 30.0, || {
        (hub.phase("keeper", "daemonset/default/third")? == "Running").then_some(())
    });
    assert!(!a.log().contains("unknown_node"), "{}", a.log());
}

/// A TCP connection from `src` (a loopback address) to the hub.
fn connect_from(src: &str, hub: &Hub) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.bind(&src.parse::<SocketAddr>().unwrap().into())?;
    let to: SocketAddr = format!("127.0.0.1:{}", hub.port).parse().unwrap();
    sock.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(sock.into())
}

/// Open a TLS connection without a client certificate and finish the handshake.
fn tls_idle(src: &str, hub: &Hub, cfg: &Arc<rustls::ClientConfig>) -> Option<TcpStream> {
    let mut tcp = connect_from(src, hub).ok()?;
    tcp.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut conn = rustls::ClientConnection::new(cfg.clone(), "127.0.0.1".try_into().unwrap()).ok()?;
    while conn.is_handshaking() {
        conn.complete_io(&mut tcp).ok()?;
    }
    Some(tcp)
}

/// Has the hub closed this connection? (EOF or reset; data, like a TLS ticket, is read away.)
fn closed(s: &mut TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// Defect 5: hundreds of idle connections against a hub with 256 descriptors: operators and
/// agents still get in, idle connections are closed, accept errors do not flood the log.
#[test]
fn idle_connections_cannot_starve_a_hub_of_descriptors() {
    let hub = Hub::start_under(
        &["prlimit", "--nofile=256:256", "--"],
        &["--idle-timeout", "4s", "--header-read-timeout", "2s"],
        &[],
    );
    let started = Instant::now();
    let mut tls_cfg = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
    tls_cfg.alpn_protocols.clear();
    let tls_cfg = Arc::new(tls_cfg);
    // 100 bare TCP connections from one address, 200 finished TLS handshakes from ten others.
    let mut idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| connect_from("127.0.0.2:0", &hub).ok())
        .collect();
    for i in 0..200 {
        let src = format!("127.0.0.{}:0", 3 + i % 10);
        if let Some(s) = tls_idle(&src, &hub, &tls_cfg) {
            idle.push(s);
        }
    }
    let held = idle.len();
    eprintln!("opened {held} idle connections in {:?}", started.elapsed());
    assert!(held >= 200, "the test could open only {held} connections");

    // An operator command and a real agent still work.
    let t0 = Instant::now();
    let out = wait_for("an operator command answered", 10.0, || {
        let o = hub.try_cli(&["get", "nodes", "-o", "json"]);
        o.status.success().then_some(o)
    });
    eprintln!("operator command answered after {:?}", t0.elapsed());
    assert_eq!(
        serde_json::from_slice::<Value>(&out.stdout).unwrap(),
        serde_json::json!([])
    );
    let t = hub.token(&[]);
    let _a = hub.join("survivor", &t).running();
    let m = marker();
    hub.apply(&sleeper_ds("alive", &m, ""));
    wait_for("the agent runs a workload", 30.0, || {
        (hub.phase("survivor", "daemonset/default/alive")? == "Running").then_some(())
    });

    // Every idle connection is closed by the hub.
    wait_for("the idle connections closed", 20.0, || {
        idle.iter_mut().all(closed).then_some(())
    });
    eprintln!("all idle connections closed after {:?}", started.elapsed());

    // A kept-alive HTTP/1.1 connection that made a request is closed after --idle-timeout.
    let mut h1 = (*tls_cfg).clone();
    h1.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = connect_from("127.0.0.1:0", &hub).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(h1), "127.0.0.1".try_into().unwrap()).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /v1/ca HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut answer = [0u8; 12];
    tls.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let asked = Instant::now();
    let mut tcp = tls.sock;
    wait_for("the kept-alive connection closed", 15.0, || {
        closed(&mut tcp).then_some(())
    });
    let after = asked.elapsed();
    assert!(
        after >= Duration::from_secs(3),
        "closed after {after:?}, before --idle-timeout"
    );
    // The agent's link is never idle (it holds a long-poll): it still delivers changes.
    let m2 = marker();
    hub.apply(&sleeper_ds("still", &m2, ""));
    wait_for("the agent runs the next workload", 30.0, || {
        (hub.phase("survivor", "daemonset/default/still")? == "Running").then_some(())
    });
    hub.cli(&["get", "nodes"]);
    let log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap();
    let accept_errors = log.matches("accept failed").count();
    let refusals = log.matches("refusing a connection").count();
    let periods = started.elapsed().as_secs() as usize / 10 + 1;
    assert!(
        accept_errors <= periods && refusals <= periods,
        "at most one line per 10 s: {accept_errors} accept errors, {refusals} refusals in {periods} periods"
    );
}

/// Defect 6: a failed upload leaves no `.upload-*` file; one a crash left is removed at start.
#[test]
fn failed_image_uploads_leave_nothing_behind() {
    let mut hub = Hub::start();
    let images = hub.dir.join("hub/images");
    let temps = || -> Vec<String> {
        std::fs::read_dir(&images)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".upload-"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let rt = rt();
    let put = |hub: &Hub, body: reqwest::Body, digest: &str| {
        let c = https(hub, None);
        let url = format!("{}/v1/images/blobs/{digest}", hub.url);
        let token = hub.token.trim().to_string();
        rt.block_on(async move { c.put(url).bearer_auth(token).body(body).send().await })
    };
    let blob = vec![7u8; 4 << 20];
    let digest = format!("sha256:{}", hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&blob)));

    // A full disk: the hub's file size limit below the upload.
    let biggest = all_files_max(&hub.dir);
    let limit = (biggest + (1 << 20)).to_string();
    let prlimit = |v: &str| {
        let o = std::process::Command::new("prlimit")
            .args(["--pid", &hub.pid().to_string(), &format!("--fsize={v}:")])
            .output()
            .unwrap();
        assert!(o.status.success(), "prlimit: {}", String::from_utf8_lossy(&o.stderr));
    };
    assert!(blob.len() as u64 > biggest + (1 << 20) + (1 << 20));
    prlimit(&limit);
    let r = put(&hub, blob.clone().into(), &digest).unwrap();
    let status = r.status();
    let text = rt.block_on(r.text()).unwrap();
    prlimit("unlimited");
    assert_eq!(status, 507, "{text}");
    assert!(
        text.contains("insufficient_storage") && text.contains("free space"),
        "{text}"
    );
    assert_eq!(temps(), Vec::<String>::new(), "no temporary file after a failed write");

    // The client goes away half-way.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        vec![Ok(vec![1u8; 1 << 20]), Err(std::io::Error::other("client gave up"))];
    let r = put(
        &hub,
        reqwest::Body::wrap_stream(futures_util::stream::iter(chunks)),
        &digest,
    );
    assert!(r.is_err() || !r.unwrap().status().is_success());
    wait_for("the broken upload's temporary file removed", 10.0, || {
        temps().is_empty().then_some(())
    });

    // A crash left one behind: the next start removes it.
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join(".upload-deadbeef"), b"half").unwrap();
    hub.restart();
    assert_eq!(temps(), Vec::<String>::new());
    // And a good upload still works.
    let r = put(&hub, blob.into(), &digest).unwrap();
    assert_eq!(r.status(), 201);
    assert!(images.join(format!("sha256-{}", &digest[7..])).exists());
    assert_eq!(temps(), Vec::<String>::new());
}

fn all_files_max(dir: &std::path::Path) -> u64 {
    let mut max = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            all_files_max(&p)
        } else {
            std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0)
        };
        max = max.max(m);
    }
    max
}

/// A "hub" that reads one HTTP/1.1 request completely and then dies without answering.
fn dying_hub() -> (
    u16,
    std::path::PathBuf,
    tempfile::TempDir,
    std::thread::JoinHandle<usize>,
) {
    outpost_pki::install_provider();
    let dir = tempfile::tempdir().unwrap();
    let ca = outpost_pki::CaMaterial::generate("dying").unwrap();
    let (chain, key) = ca.issue_server(&["127.0.0.1".into()]).unwrap();
    let mut cfg = outpost_pki::server_config(&ca, &chain, &key).unwrap();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let cfg = Arc::new(cfg);
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.cert_pem).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let t = std::thread::spawn(move || {
        let (tcp, _) = listener.accept().unwrap();
        let conn = rustls::ServerConnection::new(cfg).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        // headers, then Content-Length bytes of body
        let body_len = loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the client hung up first");
            got.extend_from_slice(&buf[..n]);
            if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().unwrap())
                    .unwrap_or(0);
                break end + 4 + len;
            }
        };
        while got.len() < body_len {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        let _ = s.flush();
        // the hub dies here: the connection closes with no answer
        got.len()
    });
    (port, ca_file, dir, t)
}

/// Defect 11: a change whose answer is lost says it may have been applied; a hub that is not
/// there says so instead.
#[test]
fn a_lost_answer_to_a_change_says_it_may_have_been_applied() {
    let (port, ca, dir, hub) = dying_hub();
    let manifest = dir.path().join("app.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: v}\n",
    )
    .unwrap();
    let cli = |port: u16, args: &[&str]| {
        std::process::Command::new(BIN)
            .args(args)
            .env("OUTPOST_HUB", format!("https://127.0.0.1:{port}"))
            .env("OUTPOST_TOKEN", "t")
            .env("OUTPOST_CA_FILE", &ca)
            .env("OUTPOST_CONFIG", dir.path().join("none.json"))
            .output()
            .unwrap()
    };
    let o = cli(port, &["apply", "-f", manifest.to_str().unwrap()]);
    let read = hub.join().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(read > 0 && !o.status.success(), "{err}");
    assert!(
        err.contains("the hub may have applied the change; check with `outpost get workloads`"),
        "{err}"
    );
    assert!(!err.contains("is `outpost hub` running"), "{err}");

    // Nothing listens: the request was never sent, and the message says so.
    let free = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let o = cli(free, &["apply", "-f", manifest.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("cannot reach the hub") && !err.contains("may have applied"),
        "{err}"
    );
}

/// A box that loses power while holding its long-poll sends nothing more (no FIN, no RST: here
/// its link goes down). The agent announced that it probes its own connection (`ka=` on sync,
/// 3 s here), so the hub sends no probes of its own and watches for the agent's instead: when
/// they stop, it closes the connection and the node turns Offline, long before the agent's
/// 600 s hold would have ended and long before the hub's own keepalive (90 s) would have fired.
/// While the box was up, the held long-poll kept it Online past `--offline-after` without it
/// polling, and a change still reached it at once.
#[test]
fn a_box_that_dies_holding_its_long_poll_turns_offline_when_its_probes_stop() {
    let ns = Netns::new();
    // (the harness starts hubs with --offline-after 3s; the hub's own keepalive stays at 90 s)
    let hub = Hub::start_on(&ns.host_ip, &[], &[]);
    let token = hub.token(&[]);
    let wrap = ns.wrap();
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let mut a = hub.join_wrapped("held-box", &token, &wrap);
    a.env.push(("OUTPOST_LONG_POLL_SECS".into(), "600".into()));
    a.env.push(("OUTPOST_LINK_KEEPALIVE_SECS".into(), "3".into()));
    let a = a.running();
    wait_for("the node Online", 30.0, || online(&hub, "held-box").then_some(()));
    // A change reaches it at once, during a long hold.
    let m = marker();
    hub.apply(&format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: held}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      containers:\n      - {{name: main, command: [/bin/sleep, '{m}']}}\n"
    ));
    wait_for("the workload running on the node", 30.0, || {
        let w = hub.json(&["get", "workloads"]);
        w.as_array()?
            .iter()
            .any(|p| p["status"]["phase"] == "Running")
            .then_some(())
    });
    // Online for several probe periods and twice --offline-after with nothing but the held
    // long-poll and the agent's probes: the hub does not mistake probes for silence.
    let quiet = Instant::now() + Duration::from_secs(10);
    while Instant::now() < quiet {
        assert!(online(&hub, "held-box"), "a node holding its long-poll is Online");
        std::thread::sleep(Duration::from_millis(250));
    }
    ns.cut();
    let cut = Instant::now();
    wait_for("the node Offline after its link died", 60.0, || {
        (node_status(&hub, "held-box").as_deref() == Some("Offline")).then_some(())
    });
    // probes every 3 s + 1.5 s grace, then --offline-after has long passed; the hub's own
    // keepalive would have needed 90 s
    assert!(
        cut.elapsed() < Duration::from_secs(15),
        "found dead in {:?}",
        cut.elapsed()
    );
    drop(a);
}

/// A client that does not say it probes (an agent older than protocol 1.4, here curl holding a
/// long-poll with the node's certificate) is probed by the hub's own TCP keepalive, as before:
/// when its box dies the node still turns Offline.
#[test]
fn a_long_poll_without_agent_probes_is_found_dead_by_the_hubs_keepalive() {
    let ns = Netns::new();
    let hub = Hub::start_on(&ns.host_ip, &["--keepalive", "3s"], &[]);
    let token = hub.token(&[]);
    let wrap = ns.wrap();
    let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
    let mut a = hub.join_wrapped("old-box", &token, &wrap).running();
    wait_for("the node Online", 30.0, || online(&hub, "old-box").then_some(()));
    let generation = node_json(&hub, "old-box").unwrap()["generation"].as_u64().unwrap();
    a.kill9();
    // the node's own identity, for curl
    let id: Value = serde_json::from_slice(&std::fs::read(a.dir.join("identity.json")).unwrap()).unwrap();
    let ca = a.dir.join("curl-ca.pem");
    let cert = a.dir.join("curl-cert.pem");
    std::fs::write(&ca, id["ca_pem"].as_str().unwrap()).unwrap();
    std::fs::write(&cert, id["cert_pem"].as_str().unwrap()).unwrap();
    let url = format!(
        "{}/v1/nodes/old-box/sync?generation={generation}&wait=600",
        id["hub"].as_str().unwrap()
    );
    let mut cmd = std::process::Command::new(wrap[0]);
    cmd.args(&wrap[1..])
        .args(["curl", "-sS", "--max-time", "700", "--cacert"]);
    cmd.arg(&ca)
        .arg("--cert")
        .arg(&cert)
        .arg("--key")
        .arg(a.dir.join("node.key"));
    cmd.arg(&url);
    let mut curl = cmd.spawn().expect("curl in the namespace");
    wait_for("the node Online again through curl's held long-poll", 30.0, || {
        online(&hub, "old-box").then_some(())
    });
    let quiet = Instant::now() + Duration::from_secs(8);
    while Instant::now() < quiet {
        assert!(online(&hub, "old-box"), "a node holding its long-poll is Online");
        std::thread::sleep(Duration::from_millis(250));
    }
    ns.cut();
    let cut = Instant::now();
    wait_for("the node Offline after its link died", 60.0, || {
        (node_status(&hub, "old-box").as_deref() == Some("Offline")).then_some(())
    });
    // the hub's keepalive 3 s + 2 probes 1 s apart
    assert!(
        cut.elapsed() < Duration::from_secs(15),
        "found dead in {:?}",
        cut.elapsed()
    );
    let _ = curl.kill();
    let _ = curl.wait();
}

/// A status report compressed with zstd (what a 1.4 agent sends for its larger reports) is
/// stored like a plain one; the hub names its protocol to a client that names its own; a body
/// that claims zstd and is not is refused with a message that says so, and changes nothing.
#[test]
fn a_zstd_status_report_is_stored_and_the_hub_names_its_protocol() {
    let hub = Hub::start();
    let token = hub.token(&[]);
    let mut a = hub.join("zipper", &token).running();
    wait_for("the node Online", 30.0, || online(&hub, "zipper").then_some(()));
    a.kill9();
    let (_, cert, key) = a.identity();
    let c = https(&hub, Some((&cert, &key)));
    let report = serde_json::json!({
        "agent_version": "zstd-9.9.9", "uptime_secs": 1, "generation": 0, "full": false,
        "workloads": [], "removed": [], "events": [],
    });
    let plain = serde_json::to_vec(&report).unwrap();
    let packed = zstd::bulk::compress(&plain, 3).unwrap();
    let url = format!("{}/v1/nodes/zipper/status", hub.url);
    rt().block_on(async {
        let bad = c
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "zstd")
            .header(outpost_api::PROTOCOL_HEADER, outpost_api::PROTOCOL)
            .body(plain.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(bad.status(), 400);
        let text = bad.text().await.unwrap();
        assert!(text.contains("zstd"), "{text}");
        let r = c
            .post(&url)
            .header("content-type", "application/json")
            .header("content-encoding", "zstd")
            .header(outpost_api::PROTOCOL_HEADER, outpost_api::PROTOCOL)
            .body(packed)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
        assert_eq!(
            r.headers()
                .get(outpost_api::PROTOCOL_HEADER)
                .and_then(|v| v.to_str().ok()),
            Some(outpost_api::PROTOCOL)
        );
    });
    let n = node_json(&hub, "zipper").unwrap();
    assert_eq!(n["agent_version"], "zstd-9.9.9", "{n}");
}

/// A TCP relay on loopback (a stand-in for a TCP load balancer): every connection it accepts
/// is copied to `to`; its own sockets probe nothing, so an agent's keepalive probes end at it.
struct Relay {
    port: u16,
    accepted: Arc<std::sync::atomic::AtomicUsize>,
}

impl Relay {
    fn start(to: SocketAddr) -> Relay {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let n = accepted.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(down) = c else { return };
                n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(up) = TcpStream::connect(to) else { continue };
                let (mut d2, mut u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                let (mut d1, mut u1) = (down, up);
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut d1, &mut u1);
                    let _ = u1.shutdown(std::net::Shutdown::Write);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut u2, &mut d2);
                    let _ = d2.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Relay { port, accepted }
    }
}

/// Behind a TCP load balancer an agent's keepalive probes reach the balancer, never the hub.
/// When the probes it was promised do not come, the hub asks itself before it gives up; the
/// balancer answers, so a quiet agent keeps its one connection (no reconnect every period).
#[test]
fn behind_a_tcp_relay_the_hub_asks_before_it_drops_a_quiet_agent() {
    let hub = Hub::start();
    let token = hub.token(&[]);
    let mut a = hub.join("behind-lb", &token);
    let port: u16 = hub
        .url
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let relay = Relay::start(SocketAddr::from(([127, 0, 0, 1], port)));
    // the node talks to the hub only through the relay (`agent run --hub` pins that URL)
    a.wrap = vec![
        "sh".into(),
        "-c".into(),
        format!("exec \"$@\" --hub https://127.0.0.1:{}", relay.port),
        "sh".into(),
    ];
    // it announces probes every 2 s (ka=2): the hub expects a segment within 3 s
    a.env.push(("OUTPOST_LINK_KEEPALIVE_SECS".into(), "2".into()));
    let a = a.running();
    wait_for("the node reporting through the relay", 30.0, || {
        let n = node_json(&hub, "behind-lb")?;
        (relay.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 1
            && n["agent_version"].is_string()
            && n["status"] == "Online")
            .then_some(())
    });
    let before = relay.accepted.load(std::sync::atomic::Ordering::SeqCst);
    // five of its periods and more with nothing but the held long-poll
    let quiet = Instant::now() + Duration::from_secs(16);
    while Instant::now() < quiet {
        assert!(online(&hub, "behind-lb"), "a quiet node behind a relay stays Online");
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(
        relay.accepted.load(std::sync::atomic::Ordering::SeqCst),
        before,
        "the hub dropped the quiet agent's connection and it had to reconnect"
    );
    drop(a);
}

/// Seconds of a `Debug`-printed Duration ("12s", "1.5s", "250ms").
fn debug_secs(s: &str) -> Option<f64> {
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse::<f64>().ok().map(|v| v / 1000.0);
    }
    s.strip_suffix('s')?.parse().ok()
}

/// A runtime running a join whose body never ends: it holds the one place of a hub started
/// with `OUTPOST_HUB_ADMISSION_LIMIT=1` until the task is aborted.
fn hold_the_one_place(hub: &Hub) -> (tokio::runtime::Runtime, tokio::task::JoinHandle<()>) {
    use futures_util::StreamExt;
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = https(hub, None);
    let url = format!("{}/v1/join", hub.url);
    let holder = rt.spawn(async move {
        let body = futures_util::stream::once(async { Ok::<_, std::io::Error>(b"{".to_vec()) })
            .chain(futures_util::stream::pending());
        let _ = client
            .post(url)
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(body))
            .send()
            .await;
    });
    (rt, holder)
}

/// Admission control (docs/protocol.md §6, "Busy hub"), end to end: a hub with one place
/// (`OUTPOST_HUB_ADMISSION_LIMIT=1`), held by a join whose body is still coming. Joins and
/// syncs get `503 busy` with a `Retry-After` that grows with the refused requests; a real
/// agent waits at least what it was told (not its 1-1.5 s backoff), does not give up, and gets
/// in once the place is free.
#[test]
fn a_busy_hub_answers_503_retry_after_and_the_agent_waits_then_gets_in() {
    let hub = Hub::start_with(&[], &[("OUTPOST_HUB_ADMISSION_LIMIT", "1")]);
    let t = hub.token(&[]);
    let agent = hub.join("busy-1", &t);
    let (rt, holder) = hold_the_one_place(&hub);
    let _in_runtime = rt.enter();
    let probe = https(&hub, None);
    let join_url = format!("{}/v1/join", hub.url);
    let refused = |rt: &tokio::runtime::Runtime| {
        let r = rt
            .block_on(probe.post(&join_url).json(&serde_json::json!({})).send())
            .ok()?;
        if r.status() != 503 {
            return None;
        }
        let ra: u64 = r.headers().get("retry-after")?.to_str().ok()?.parse().ok()?;
        let body: Value = rt.block_on(r.json()).ok()?;
        Some((ra, body))
    };
    let (ra, body) = wait_for("the hub busy", 20.0, || refused(&rt));
    assert!((1..=30).contains(&ra), "Retry-After {ra}");
    assert_eq!(body["code"], "busy", "{body}");
    assert!(body["message"].as_str().unwrap().contains("retry after"), "{body}");

    // Keep refused requests coming (~40/s) while the agent starts: its Retry-After is then
    // many seconds, well above its own first backoff.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let hammer = {
        let (stop, probe, url) = (stop.clone(), https(&hub, None), join_url.clone());
        rt.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = probe.post(&url).json(&serde_json::json!({})).send().await;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    let agent = agent.running();
    let line = wait_for("the agent told it is busy", 30.0, || {
        agent.log().lines().find(|l| l.contains("503 busy")).map(str::to_string)
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    hammer.abort();
    let told: u64 = line
        .split("retry after ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no Retry-After in {line}"));
    let waited = line
        .split("retry_in=")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(debug_secs)
        .unwrap_or_else(|| panic!("no retry_in in {line}"));
    assert!(
        told >= 3,
        "with refused requests coming, Retry-After is several seconds: {line}"
    );
    assert!(waited >= told as f64, "the agent waits at least Retry-After: {line}");
    let before = Instant::now();
    // Free the place: the agent gets in on its next try and reports.
    holder.abort();
    wait_for("the agent connected after the busy answer", 60.0, || {
        agent.log().contains("connected to hub").then_some(())
    });
    wait_for("the node online with its report", 30.0, || {
        let n = node_json(&hub, "busy-1")?;
        (n["agent_version"].is_string()).then_some(())
    });
    eprintln!(
        "told {told} s, waited {waited} s, in {:?} after the place came free",
        before.elapsed()
    );
}

/// The poll that follows every answer is not refused by a busy hub (issue 16): after a change
/// every connected agent answers and polls again at once; refused, an agent held no poll for up
/// to `Retry-After` and the next change reached it that late. With admission's one place held
/// by a join whose body never ends, a connected agent still gets two changes one after the
/// other, and is never told the hub is busy.
#[test]
fn a_busy_hub_lets_an_up_to_date_agent_poll_again_and_it_gets_every_change() {
    let hub = Hub::start_with(&[], &[("OUTPOST_HUB_ADMISSION_LIMIT", "1")]);
    let t = hub.token(&[]);
    let agent = hub.join("fresh-1", &t).running();
    wait_for("the node online with its report", 30.0, || {
        node_json(&hub, "fresh-1")?["agent_version"].is_string().then_some(())
    });
    let (rt, holder) = hold_the_one_place(&hub);
    let _in_runtime = rt.enter();
    let in_use = || sample(&api_get(&hub, "/metrics").1, "outpost_hub_admission_in_use");
    wait_for("the place held", 20.0, || (in_use() == Some(1.0)).then_some(()));
    for round in 0..2 {
        hub.apply(&sleeper_ds("fresh-app", &marker(), ""));
        let n = wait_for(&format!("change {round} applied by the agent"), 20.0, || {
            let n = node_json(&hub, "fresh-1")?;
            (n["generation"].as_u64()? > 0 && n["applied_generation"] == n["generation"]).then_some(n)
        });
        eprintln!("change {round}: generation {}", n["generation"]);
    }
    let (_, m) = api_get(&hub, "/metrics");
    assert_eq!(
        sample(&m, "outpost_hub_admission_in_use"),
        Some(1.0),
        "the place stayed held:\n{m}"
    );
    assert!(
        !agent.log().contains("503 busy"),
        "the agent was told the hub is busy:\n{}",
        agent.log()
    );
    holder.abort();
}

/// The value of the sample `series` (name and labels as printed) in a `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Busy answers show in `/metrics` (issue 16): with the one place of admission control held by
/// a join whose body never ends, the gauges read 1 of 1 in use, and every join and sync
/// refused with `503 busy` moves `outpost_hub_busy_answers_total` for its route by one; once
/// the place is free the in-use gauge goes back to 0.
#[test]
fn a_busy_hub_counts_its_busy_answers_and_places_in_metrics() {
    let hub = Hub::start_with(&[], &[("OUTPOST_HUB_ADMISSION_LIMIT", "1")]);
    let metrics = || {
        let (code, text) = api_get(&hub, "/metrics");
        assert_eq!(code, 200, "{text}");
        text
    };
    let read = |text: &str, series: &str| sample(text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    let m = metrics();
    assert_eq!(read(&m, "outpost_hub_admission_limit"), 1.0);
    assert_eq!(read(&m, "outpost_hub_admission_in_use"), 0.0);
    assert_eq!(read(&m, "outpost_hub_busy_answers_total{route=\"join\"}"), 0.0);
    assert_eq!(read(&m, "outpost_hub_busy_answers_total{route=\"sync\"}"), 0.0);

    let (rt, holder) = hold_the_one_place(&hub);
    let _in_runtime = rt.enter();
    let m = wait_for("the place held", 20.0, || {
        let m = metrics();
        (sample(&m, "outpost_hub_admission_in_use") == Some(1.0)).then_some(m)
    });
    let joins_before = read(&m, "outpost_hub_busy_answers_total{route=\"join\"}");
    let syncs_before = read(&m, "outpost_hub_busy_answers_total{route=\"sync\"}");
    let probe = https(&hub, None);
    let status = |req: reqwest::RequestBuilder| rt.block_on(req.send()).expect("an answer").status().as_u16();
    for _ in 0..3 {
        let join = probe.post(format!("{}/v1/join", hub.url)).json(&serde_json::json!({}));
        assert_eq!(status(join), 503);
    }
    for _ in 0..2 {
        assert_eq!(status(probe.get(format!("{}/v1/nodes/n1/sync", hub.url))), 503);
    }
    let m = metrics();
    assert_eq!(
        read(&m, "outpost_hub_busy_answers_total{route=\"join\"}") - joins_before,
        3.0,
        "{m}"
    );
    assert_eq!(
        read(&m, "outpost_hub_busy_answers_total{route=\"sync\"}") - syncs_before,
        2.0,
        "{m}"
    );
    assert_eq!(read(&m, "outpost_hub_admission_in_use"), 1.0);
    promtool_accepts(&m);

    holder.abort();
    wait_for("the place given back", 20.0, || {
        (sample(&metrics(), "outpost_hub_admission_in_use") == Some(0.0)).then_some(())
    });
}

/// Threads of a process now (`/proc/PID/task`).
fn threads_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// The hub's blocking pool is capped (`OUTPOST_HUB_BLOCKING_THREADS`, issue 16): with ONE
/// blocking thread the hub still joins agents, places and runs a workload, takes their status
/// reports, answers `/metrics` (the fleet view) and raises its monitor's alerts (the monitor's
/// calls on its own connection share the pool with the store's): no blocking call waits for
/// another, so none starves, and the hub never grows past its workers and that one thread
/// however many requests come at once. A bad value stops the hub at start with an error that
/// names the variable.
#[test]
fn a_hub_with_one_blocking_thread_serves_joins_syncs_and_its_monitor() {
    let hub = Hub::start_with(
        &["--node-offline-alert", "1s"],
        &[("OUTPOST_HUB_BLOCKING_THREADS", "1")],
    );
    let base = threads_of(hub.pid());
    let t = hub.token(&[]);
    let agents: Vec<Agent> = (0..3).map(|i| hub.join(&format!("bt-{i}"), &t).running()).collect();
    let m = marker();
    hub.apply(&sleeper_ds("bt", &m, ""));
    for i in 0..3 {
        let node = format!("bt-{i}");
        wait_for("the workload running on every node", 60.0, || {
            (hub.phase(&node, "daemonset/default/bt").as_deref() == Some("Running")).then_some(())
        });
    }
    // Many operator reads at once, each a store call on the blocking pool.
    let burst: Vec<_> = (0..24)
        .map(|_| {
            let mut c = hub.command(&["get", "nodes", "-o", "json"]);
            c.stdout(std::process::Stdio::piped()).spawn().expect("cli")
        })
        .collect();
    for c in burst {
        let out = c.wait_with_output().expect("cli");
        assert!(out.status.success(), "{out:?}");
    }
    let (code, text) = api_get(&hub, "/metrics");
    assert_eq!(code, 200, "{text}");
    assert!(text.contains("outpost_hub_connected_agents 3"), "{text}");
    let peak = threads_of(hub.pid());
    assert!(
        peak <= base + 1,
        "the blocking pool grew past its one thread: {base} threads at start, {peak} now"
    );
    // The monitor still runs: a killed agent turns Offline (--offline-after 3s) and the
    // monitor raises its alert through its own blocking calls.
    drop(agents);
    wait_for("a node Offline after its agent died", 60.0, || {
        (node_status(&hub, "bt-0").as_deref() == Some("Offline")).then_some(())
    });
    wait_for("its NodeOffline alert", 60.0, || {
        let (_, body) = api_get(&hub, "/v1/alerts");
        let all: Value = serde_json::from_str(&body).ok()?;
        all.as_array()?
            .iter()
            .any(|a| a["node"] == "bt-0" && a["name"] == "NodeOffline")
            .then_some(())
    });
    assert!(threads_of(hub.pid()) <= base + 1, "the pool stayed at one thread");

    let dir = tempfile::tempdir().unwrap();
    let out = outpost_under::<&str>(&[])
        .args(["hub", "--listen", &format!("127.0.0.1:{}", free_port()), "--data-dir"])
        .arg(dir.path())
        .env("OUTPOST_HUB_BLOCKING_THREADS", "lots")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("OUTPOST_HUB_BLOCKING_THREADS") && err.contains("1 to 4096"),
        "{err}"
    );
    assert!(!dir.path().join("hub.db").exists(), "a refused start changes nothing");
}
