//! GitOps end to end (issue 12, docs/gitops.md): a real hub and real agents follow real Git
//! remotes (a `file://` bare repository, and one served over Git's smart HTTP protocol by
//! `git http-backend` behind a small CGI server on loopback), render every target with the
//! Kustomize engine and roll each good commit out.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use serde_json::Value;

fn git(dir: &Path, args: &[&str]) -> String {
    let o = Command::new("git")
        .args([
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .output()
        .expect("git is installed (scripts/test.sh installs it)");
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// A bare remote and a working clone that pushes to it.
struct Repo {
    bare: PathBuf,
    work: PathBuf,
}

impl Repo {
    fn new(root: &Path) -> Repo {
        let bare = root.join("remote.git");
        let work = root.join("work");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::create_dir_all(&work).unwrap();
        git(&bare, &["init", "--bare", "-q", "-b", "main"]);
        git(&work, &["init", "-q", "-b", "main"]);
        git(&work, &["remote", "add", "origin", bare.to_str().unwrap()]);
        Repo { bare, work }
    }
    fn write(&self, path: &str, content: &str) {
        let p = self.work.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    /// Commit everything and push; returns the commit id.
    fn push(&self, msg: &str) -> String {
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", msg]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }
}

const ALL_AT_ONCE: &str = "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: all-at-once}\nspec:\n  waves:\n  - {percent: 100}\n  bake: 0s\n  tinyFleet: 1000\n";

/// A process DaemonSet `name` running `sleep <marker>`.
fn ds(name: &str, marker: &str) -> String {
    sleeper_ds(name, marker, "")
}

fn base(repo: &Repo, web: &str, extra: Option<&str>) {
    let mut res = vec!["policy.yaml", "web.yaml"];
    repo.write("base/policy.yaml", ALL_AT_ONCE);
    repo.write("base/web.yaml", &ds("web", web));
    match extra {
        Some(m) => {
            repo.write("base/extra.yaml", &ds("extra", m));
            res.push("extra.yaml");
        }
        None => {
            let _ = std::fs::remove_file(repo.work.join("base/extra.yaml"));
        }
    }
    repo.write("base/kustomization.yaml", &format!("resources: [{}]\n", res.join(", ")));
}

/// overlays/berlin: the web DaemonSet with another marker.
fn berlin(repo: &Repo, web: &str) {
    repo.write(
        "overlays/berlin/kustomization.yaml",
        "resources: [../../base]\npatches:\n- path: web.yaml\n",
    );
    repo.write(
        "overlays/berlin/web.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: web}}\nspec:\n  template:\n    spec:\n      containers:\n      - {{name: main, command: [/bin/sleep, '{web}']}}\n"
        ),
    );
}

fn running(marker: &str) -> usize {
    pids_with_cmdline(&["/bin/sleep", marker]).len()
}

fn wait_running(what: &str, marker: &str, n: usize) {
    wait_for(&format!("{what}: {n} x sleep {marker}"), 60.0, || {
        (running(marker) == n).then_some(())
    });
}

fn status(hub: &Hub, name: &str) -> Value {
    serde_json::from_str(&hub.cli(&["gitops", "status", name, "--json"])).unwrap()
}

fn alert_state(hub: &Hub, name: &str) -> Option<String> {
    let all = hub.json(&["get", "alerts"]);
    all.as_array()?
        .iter()
        .find(|a| a["name"] == name)
        .and_then(|a| a["state"].as_str().map(String::from))
}

#[test]
fn file_remote_overlays_ownership_prune_bad_commits_and_unreachable() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let (m_base, m_berlin, m_extra) = (marker(), marker(), marker());
    base(&repo, &m_base, Some(&m_extra));
    berlin(&repo, &m_berlin);
    let c1 = repo.push("base and berlin");

    let _b = hub.join("berlin-1", &hub.token(&["--labels", "site=berlin"])).running();
    let mut p = hub.join("paris-1", &hub.token(&["--labels", "site=paris"])).running();
    let url = format!("file://{}", repo.bare.display());
    // A bad spec is refused with the field named, and nothing is stored.
    let err = hub.cli_err(&[
        "gitops",
        "add",
        "fleet",
        "--url",
        "ssh://host/x",
        "--overlays-by",
        "site",
    ]);
    assert!(err.contains("spec.url"), "{err}");
    hub.cli(&[
        "gitops",
        "add",
        "fleet",
        "--url",
        &url,
        "--overlays-by",
        "site",
        "--poll-interval",
        "5s",
    ]);

    // Berlin gets its overlay's variant, Paris (no overlay) the base: two variants of ONE web.
    wait_running("berlin variant", &m_berlin, 1);
    wait_running("base variant", &m_base, 1);
    wait_running("extra on both", &m_extra, 2);
    let st = wait_for("status shows the running commit", 20.0, || {
        let s = status(&hub, "fleet");
        (s["running"] == c1.as_str()).then_some(s)
    });
    let targets: Vec<(&str, Option<&str>)> = st["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["name"].as_str().unwrap(), t["error"].as_str()))
        .collect();
    assert_eq!(targets, [("base", None), ("berlin", None)]);
    let objects: Vec<&str> = st["objects"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_str().unwrap())
        .collect();
    assert!(objects.contains(&"DaemonSet/default/web"), "{objects:?}");
    assert!(
        !objects.iter().any(|o| o.starts_with("DaemonSet/default/web-")),
        "{objects:?}"
    );

    // A hand apply over an owned object is refused; --force goes through (the hand version,
    // without variants, runs on both sites).
    let err = hub.apply_err(&ds("web", &m_base));
    assert!(err.contains("managed by GitOps") && err.contains("--force"), "{err}");
    let forced = marker();
    let f = tmp.path().join("forced.yaml");
    std::fs::write(&f, ds("web", &forced)).unwrap();
    hub.cli(&["apply", "--force", "-f", f.to_str().unwrap()]);
    wait_running("the forced version", &forced, 2);
    // A hand-applied object is never pruned, and GitOps never overwrites it.
    let hand = marker();
    hub.apply(&ds("by-hand", &hand));

    // Commit 2: base changes (a rollout), extra goes (pruned).
    let m_base2 = marker();
    base(&repo, &m_base2, None);
    let c2 = repo.push("new base, no extra");
    wait_running("new base variant", &m_base2, 1);
    wait_running("the next commit replaced the forced version", &forced, 0);
    wait_running("extra pruned", &m_extra, 0);
    wait_running("berlin's variant back", &m_berlin, 1);
    assert_eq!(running(&hand), 2, "the hand-applied DaemonSet stays");
    wait_for("running is commit 2", 20.0, || {
        (status(&hub, "fleet")["running"] == c2.as_str()).then_some(())
    });

    // Commit 3 is broken for berlin only: rejected whole, nothing of it applied, an alert.
    let m_base3 = marker();
    base(&repo, &m_base3, None);
    repo.write(
        "overlays/berlin/kustomization.yaml",
        "resources: [../../base]\npatches:\n- path: missing.yaml\n",
    );
    let c3 = repo.push("broken berlin");
    let st = wait_for("commit 3 rejected", 30.0, || {
        let s = status(&hub, "fleet");
        (s["rejected"] == c3.as_str()).then_some(s)
    });
    assert_eq!(st["running"], c2.as_str());
    let berlin_t = st["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "berlin")
        .unwrap();
    assert!(
        berlin_t["error"].as_str().unwrap().contains("missing.yaml"),
        "{berlin_t}"
    );
    assert_eq!(alert_state(&hub, "GitCommitRejected").as_deref(), Some("Firing"));
    assert_eq!(running(&m_base3), 0, "nothing of a rejected commit runs");
    assert_eq!(running(&m_base2), 1);

    // Commit 4 repairs it and goes through; the alert resolves.
    berlin(&repo, &m_berlin);
    let c4 = repo.push("fixed");
    wait_running("commit 4's base", &m_base3, 1);
    wait_for("running is commit 4", 20.0, || {
        (status(&hub, "fleet")["running"] == c4.as_str()).then_some(())
    });
    wait_for("rejection alert resolved", 20.0, || {
        (alert_state(&hub, "GitCommitRejected").as_deref() == Some("Resolved")).then_some(())
    });

    // Unreachable remote: the running commit stays, failures count, an alert fires.
    let moved = tmp.path().join("moved.git");
    std::fs::rename(&repo.bare, &moved).unwrap();
    hub.cli(&["gitops", "sync", "fleet"]);
    let st = wait_for("fetch failure shown (a fetch is bounded by 60 s)", 90.0, || {
        let s = status(&hub, "fleet");
        (s["failures"].as_u64() >= Some(1)).then_some(s)
    });
    assert_eq!(st["running"], c4.as_str());
    assert!(st["error"].as_str().unwrap().contains("remote.git"), "{st}");
    assert_eq!(alert_state(&hub, "GitRepoUnreachable").as_deref(), Some("Firing"));
    assert!(hub.cli(&["gitops", "ls"]).contains("unreachable"));
    assert_eq!(running(&m_base3), 1, "the last good commit keeps running");
    std::fs::rename(&moved, &repo.bare).unwrap();
    hub.cli(&["gitops", "sync", "fleet"]);
    wait_for("fetches again, the error cleared", 30.0, || {
        let s = status(&hub, "fleet");
        (s["failures"] == 0 && s["error"].is_null()).then_some(())
    });
    let ls = hub.cli(&["gitops", "ls"]);
    assert!(ls.contains(" ok"), "{ls}");
    wait_for("unreachable alert resolved", 20.0, || {
        (alert_state(&hub, "GitRepoUnreachable").as_deref() == Some("Resolved")).then_some(())
    });

    // gitops diff: the next commit's changes per object, before anything is applied.
    let m_base5 = marker();
    base(&repo, &m_base5, None);
    git(&repo.work, &["add", "-A"]);
    git(&repo.work, &["commit", "-q", "-m", "five"]);
    let c5 = git(&repo.work, &["rev-parse", "HEAD"]);
    // Not pushed: the hub's copy lacks it.
    let err = hub.cli_err(&["gitops", "diff", "fleet", "--commit", &c5]);
    assert!(err.contains("not in the hub's copy"), "{err}");
    let d = hub.cli(&["gitops", "diff", "fleet", "--commit", &c4]);
    assert!(d.contains("0 to create, 0 to change"), "{d}");

    // A node whose site label changes moves to the other variant: paris-1 re-joins as berlin.
    p.stop();
    hub.cli(&["delete", "node", "paris-1"]);
    std::fs::remove_dir_all(&p.dir).unwrap();
    wait_running("paris-1's base variant gone with it", &m_base3, 0);
    let _p2 = hub.join("paris-1", &hub.token(&["--labels", "site=berlin"])).running();
    wait_running("paris-1 now runs berlin's variant", &m_berlin, 2);
    assert_eq!(running(&m_base3), 0);

    // gitops rm: the GitRepo goes, its objects stay, and may then be changed by hand.
    hub.cli(&["gitops", "rm", "fleet"]);
    hub.apply(&ds("web", &m_base3));
}

/// Canary first, then the rest; no bake.
const CANARY: &str = "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: canary}\nspec:\n  waves:\n  - {name: canary, count: 1}\n  - {percent: 100}\n  bake: 0s\n  tinyFleet: 1\n";

/// `overlays/<site>`: the web DaemonSet running `sleep <marker>`.
fn overlay(repo: &Repo, site: &str, marker: &str) {
    repo.write(
        &format!("overlays/{site}/kustomization.yaml"),
        "resources: [../../base]\npatches:\n- path: web.yaml\n",
    );
    repo.write(
        &format!("overlays/{site}/web.yaml"),
        &format!(
            "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: web}}\nspec:\n  template:\n    spec:\n      containers:\n      - {{name: main, command: [/bin/sleep, '{marker}']}}\n"
        ),
    );
}

/// node -> (wave, desired revision) of the current rollout of `web`.
fn rollout_nodes(hub: &Hub) -> (Value, std::collections::BTreeMap<String, (u64, u64)>) {
    let r = hub.json(&["rollout", "status", "daemonset", "web"]);
    let nodes = r["nodes"]
        .as_array()
        .map(|ns| {
            ns.iter()
                .map(|n| {
                    (
                        n["node"].as_str().unwrap().to_string(),
                        (
                            n["wave"].as_u64().unwrap_or(99),
                            n["desired_revision"].as_u64().unwrap_or(0),
                        ),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    (r, nodes)
}

/// The issue's "one fleet workload with per-site variants": two sites with different overlays
/// get different variants of ONE workload through ONE rollout in waves; a commit that changes
/// one site's overlay rolls out to that site's nodes only (the others keep running, same
/// process); a node whose site label changes moves to the other variant.
#[test]
fn one_fleet_workload_with_per_site_variants() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let (m_base, m_b1, m_s1) = (marker(), marker(), marker());
    repo.write("base/policy.yaml", CANARY);
    repo.write("base/web.yaml", &ds("web", &m_base));
    repo.write("base/kustomization.yaml", "resources: [policy.yaml, web.yaml]\n");
    overlay(&repo, "berlin", &m_b1);
    overlay(&repo, "shanghai", &m_s1);
    repo.push("two sites");
    let _b1 = hub.join("berlin-1", &hub.token(&["--labels", "site=berlin"])).running();
    let _b2 = hub.join("berlin-2", &hub.token(&["--labels", "site=berlin"])).running();
    let mut s1 = hub
        .join("shanghai-1", &hub.token(&["--labels", "site=shanghai"]))
        .running();
    let url = format!("file://{}", repo.bare.display());
    hub.cli(&[
        "gitops",
        "add",
        "fleet",
        "--url",
        &url,
        "--overlays-by",
        "site",
        "--poll-interval",
        "1m",
    ]);
    wait_running("berlin's variant on both berlin nodes", &m_b1, 2);
    wait_running("shanghai's variant", &m_s1, 1);
    assert_eq!(running(&m_base), 0, "no node runs the base variant");

    // One workload: one object, one row per node under one key, one rollout.
    let st = status(&hub, "fleet");
    let web: Vec<&str> = st["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|o| o.as_str().filter(|o| o.contains("web")))
        .collect();
    assert_eq!(web, ["DaemonSet/default/web"]);
    let key = "daemonset/default/web";
    for n in ["berlin-1", "berlin-2", "shanghai-1"] {
        wait_for(&format!("{n} reports web at revision 1"), 30.0, || {
            (hub.placement(n, key)?["status"]["revision"] == 1).then_some(())
        });
    }
    let shanghai_pid = pids_with_cmdline(&["/bin/sleep", &m_s1]);

    // A commit changing only berlin's overlay: revision 2, rolled out to berlin's nodes only,
    // canary first; shanghai's process is the same one.
    let m_b2 = marker();
    overlay(&repo, "berlin", &m_b2);
    repo.push("berlin only");
    hub.cli(&["gitops", "sync", "fleet"]);
    wait_running("berlin's new variant", &m_b2, 2);
    wait_running("berlin's old variant gone", &m_b1, 0);
    let (r, nodes) = wait_for("the rollout of revision 2 Complete", 30.0, || {
        let (r, nodes) = rollout_nodes(&hub);
        (r["revision"] == 2 && r["phase"] == "Complete").then_some((r, nodes))
    });
    assert_eq!(
        nodes.keys().collect::<Vec<_>>(),
        ["berlin-1", "berlin-2"],
        "only berlin's nodes are in the rollout: {r}"
    );
    assert_eq!(
        nodes.values().filter(|(w, _)| *w == 0).count(),
        1,
        "one canary, then the rest: {r}"
    );
    assert_eq!(
        pids_with_cmdline(&["/bin/sleep", &m_s1]),
        shanghai_pid,
        "shanghai untouched"
    );
    assert_eq!(hub.placement("shanghai-1", key).unwrap()["status"]["revision"], 1);
    // gitops status: per target its nodes and the rollout on them.
    let st = status(&hub, "fleet");
    let target = |name: &str| {
        st["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(target("berlin")["nodes"], 2, "{st}");
    assert_eq!(target("shanghai")["nodes"], 1, "{st}");
    assert_eq!(target("base")["nodes"], 0, "{st}");
    assert_eq!(
        target("berlin")["rollouts"]["DaemonSet/default/web"],
        "Complete: 2 of 2 nodes updated, 0 failed (revision 2)",
        "{st}"
    );
    assert!(
        target("shanghai")["rollouts"].is_null(),
        "shanghai's variant did not change: {st}"
    );
    let text = hub.cli(&["gitops", "status", "fleet"]);
    assert!(
        text.contains("DaemonSet/default/web: Complete: 2 of 2 nodes updated"),
        "{text}"
    );

    // A commit changing both overlays: ONE rollout (revision 3) over all three nodes, in waves.
    let (m_b3, m_s3) = (marker(), marker());
    overlay(&repo, "berlin", &m_b3);
    overlay(&repo, "shanghai", &m_s3);
    repo.push("both sites");
    hub.cli(&["gitops", "sync", "fleet"]);
    wait_running("berlin's third variant", &m_b3, 2);
    wait_running("shanghai's second variant", &m_s3, 1);
    let (r, nodes) = wait_for("the rollout of revision 3 Complete", 30.0, || {
        let (r, nodes) = rollout_nodes(&hub);
        (r["revision"] == 3 && r["phase"] == "Complete").then_some((r, nodes))
    });
    assert_eq!(nodes.len(), 3, "{r}");
    assert_eq!(nodes.values().filter(|(w, _)| *w == 0).count(), 1, "{r}");
    assert!(nodes.values().all(|(_, rev)| *rev == 3), "{r}");

    // shanghai-1 re-joins as a berlin node: it moves to berlin's variant.
    s1.stop();
    hub.cli(&["delete", "node", "shanghai-1"]);
    std::fs::remove_dir_all(&s1.dir).unwrap();
    wait_running("shanghai's variant gone with its node", &m_s3, 0);
    let _s1b = hub
        .join("shanghai-1", &hub.token(&["--labels", "site=berlin"]))
        .running();
    wait_running("the node now runs berlin's variant", &m_b3, 3);
    assert_eq!(running(&m_s3), 0);
}

/// `git http-backend` behind a tiny CGI server: Git's smart HTTP protocol on loopback, with
/// HTTP basic auth.
fn http_backend(root: &Path, port: u16, user: &str, password: &str) -> Child {
    let script = root.join("serve.py");
    std::fs::write(
        &script,
        r#"
import base64, http.server, os, subprocess, sys
root, port, auth = sys.argv[1], int(sys.argv[2]), "Basic " + base64.b64encode(sys.argv[3].encode()).decode()
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_GET(self): self.cgi()
    def do_POST(self): self.cgi()
    def cgi(self):
        if self.headers.get("Authorization") != auth:
            self.send_response(401); self.send_header("WWW-Authenticate", 'Basic realm="git"')
            self.send_header("Content-Length", "0"); self.end_headers(); return
        path, _, qs = self.path.partition("?")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        env = dict(os.environ, GIT_PROJECT_ROOT=root, GIT_HTTP_EXPORT_ALL="1", PATH_INFO=path,
                   QUERY_STRING=qs, REQUEST_METHOD=self.command, REMOTE_USER="t", REMOTE_ADDR="127.0.0.1",
                   CONTENT_TYPE=self.headers.get("Content-Type", ""), CONTENT_LENGTH=str(len(body)),
                   HTTP_CONTENT_ENCODING=self.headers.get("Content-Encoding", ""),
                   HTTP_GIT_PROTOCOL=self.headers.get("Git-Protocol", ""))
        out = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True).stdout
        head, _, content = out.partition(b"\r\n\r\n")
        code, headers = 200, []
        for line in head.decode().split("\r\n"):
            k, _, v = line.partition(": ")
            if k.lower() == "status": code = int(v.split()[0])
            elif k: headers.append((k, v))
        self.send_response(code)
        for k, v in headers: self.send_header(k, v)
        self.send_header("Content-Length", str(len(content))); self.end_headers(); self.wfile.write(content)
http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"#,
    )
    .unwrap();
    Command::new("python3")
        .arg(&script)
        .arg(root)
        .arg(port.to_string())
        .arg(format!("{user}:{password}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

struct KillOnDrop(Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn webhook(hub: &Hub, name: &str, headers: &[String], body: &str) -> u16 {
    let mut c = Command::new("curl");
    c.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(hub.ca_file())
        .args(["-X", "POST", "--data-binary", body]);
    for h in headers {
        c.args(["-H", h]);
    }
    c.arg(format!("{}/v1/gitops/{name}/webhook", hub.url));
    let o = c.output().unwrap();
    String::from_utf8_lossy(&o.stdout).parse().unwrap_or(0)
}

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    k[..key.len()].copy_from_slice(key);
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    hex::encode(Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize())
}

#[test]
fn smart_http_remote_with_credentials_and_webhook() {
    let hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let m1 = marker();
    base(&repo, &m1, None);
    repo.push("one");
    let port = free_port();
    let _server = KillOnDrop(http_backend(tmp.path(), port, "ci", "s3cret-pw"));
    wait_for("git http-backend answering", 20.0, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    });
    let _a = hub.join("edge-1", &hub.token(&[])).running();
    hub.apply(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: git}\nstringData: {username: ci, password: s3cret-pw}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: hook}\nstringData: {token: hook-secret}\n",
    );
    let url = format!("http://127.0.0.1:{port}/remote.git");
    // Polling every 10 minutes: only the first fetch and the webhook can bring commits in.
    hub.cli(&[
        "gitops",
        "add",
        "edge",
        "--url",
        &url,
        "--target",
        "all=base",
        "--poll-interval",
        "10m",
        "--auth-secret",
        "git",
        "--webhook-secret",
        "hook",
    ]);
    wait_running("first commit over smart HTTP", &m1, 1);

    let m2 = marker();
    base(&repo, &m2, None);
    let c2 = repo.push("two");
    let body = format!("{{\"ref\":\"refs/heads/main\",\"after\":\"{c2}\"}}");
    // Wrong signature, no signature: refused, nothing fetched.
    assert_eq!(
        webhook(
            &hub,
            "edge",
            &[format!(
                "X-Hub-Signature-256: sha256={}",
                hmac_hex(b"wrong", body.as_bytes())
            )],
            &body
        ),
        403
    );
    assert_eq!(webhook(&hub, "edge", &[], &body), 403);
    assert_eq!(webhook(&hub, "nope", &[], &body), 404);
    let sig = format!(
        "X-Hub-Signature-256: sha256={}",
        hmac_hex(b"hook-secret", body.as_bytes())
    );
    let t0 = std::time::Instant::now();
    assert_eq!(webhook(&hub, "edge", &[sig], &body), 200);
    wait_running("webhook-triggered commit", &m2, 1);
    wait_running("old commit gone", &m1, 0);
    eprintln!("webhook -> running: {:?}", t0.elapsed());
    assert_eq!(status(&hub, "edge")["running"], c2.as_str());

    // The plain token header works too.
    let m3 = marker();
    base(&repo, &m3, None);
    repo.push("three");
    assert_eq!(
        webhook(&hub, "edge", &["X-Outpost-Token: hook-secret".into()], "{}"),
        200
    );
    wait_running("token-triggered commit", &m3, 1);

    // A changed spec is decided again at once: a path with no base fails to render.
    hub.cli(&[
        "gitops",
        "add",
        "edge",
        "--url",
        &url,
        "--target",
        "all=nowhere",
        "--poll-interval",
        "10m",
        "--auth-secret",
        "git",
        "--webhook-secret",
        "hook",
    ]);
    let st = wait_for("the new spec's render failure", 30.0, || {
        let s = status(&hub, "edge");
        s["targets"][0]["error"]
            .as_str()
            .map(String::from)
            .filter(|_| s["targets"][0]["path"] == "nowhere")
            .map(|e| (e, s))
    });
    assert!(st.0.contains("nowhere"), "{}", st.0);
    assert_eq!(running(&m3), 1, "the rejected spec changes nothing");
    hub.cli(&[
        "gitops",
        "add",
        "edge",
        "--url",
        &url,
        "--target",
        "all=base",
        "--poll-interval",
        "10m",
        "--auth-secret",
        "git",
        "--webhook-secret",
        "hook",
    ]);

    // Wrong credentials: the fetch fails with git's message, the running commit stays.
    hub.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: git}\nstringData: {username: ci, password: nope}\n");
    hub.cli(&["gitops", "sync", "edge"]);
    let t = std::time::Instant::now();
    let st = loop {
        let s = status(&hub, "edge");
        if s["failures"].as_u64() >= Some(1) {
            break s;
        }
        if t.elapsed().as_secs() > 90 {
            let log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap_or_default();
            panic!("no auth failure shown (a fetch is bounded by 60 s): {s}\nhub log:\n{log}");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let e = st["error"].as_str().unwrap();
    assert!(!e.contains("nope"), "the password never shows: {e}");
    assert_eq!(running(&m3), 1);
}

fn applied_in_log(hub: &Hub) -> usize {
    std::fs::read_to_string(hub.dir.join("hub.log"))
        .unwrap_or_default()
        .matches("commit applied")
        .count()
}

/// The controller's memory (commit running and fetched, last error, failures, backoff) is
/// stored: a restarted hub neither applies the running commit again nor forgets it, and a
/// failing repository stays failing with its count.
#[test]
fn controller_state_survives_a_hub_restart() {
    let mut hub = Hub::start();
    let tmp = tempfile::tempdir().unwrap();
    let repo = Repo::new(tmp.path());
    let m1 = marker();
    base(&repo, &m1, None);
    let c1 = repo.push("one");
    let _a = hub.join("edge-1", &hub.token(&[])).running();
    let url = format!("file://{}", repo.bare.display());
    // Polling every 10 minutes: after the first fetch, only `gitops sync` fetches.
    hub.cli(&[
        "gitops",
        "add",
        "keep",
        "--url",
        &url,
        "--target",
        "all=base",
        "--poll-interval",
        "10m",
    ]);
    wait_running("the first commit", &m1, 1);
    let before = wait_for("commit 1 running", 20.0, || {
        let s = status(&hub, "keep");
        (s["running"] == c1.as_str()).then_some(s)
    });
    assert_eq!(applied_in_log(&hub), 1);

    hub.restart();
    let after = status(&hub, "keep");
    assert_eq!(after["running"], c1.as_str(), "{after}");
    assert_eq!(after["fetched"], c1.as_str(), "{after}");
    assert_eq!(
        after["last_fetch"], before["last_fetch"],
        "no fetch at the restart: {after}"
    );
    hub.cli(&["gitops", "sync", "keep"]);
    wait_for("a fetch after the restart", 30.0, || {
        (status(&hub, "keep")["last_fetch"] != before["last_fetch"]).then_some(())
    });
    assert_eq!(applied_in_log(&hub), 1, "the running commit is not applied again");
    assert_eq!(running(&m1), 1);

    // A failing remote: its error and failure count survive a restart too.
    let moved = tmp.path().join("moved.git");
    std::fs::rename(&repo.bare, &moved).unwrap();
    hub.cli(&["gitops", "sync", "keep"]);
    let failing = wait_for("the fetch failure", 90.0, || {
        let s = status(&hub, "keep");
        (s["failures"].as_u64() >= Some(1)).then_some(s)
    });
    hub.restart();
    let st = status(&hub, "keep");
    assert_eq!(st["failures"], failing["failures"], "{st}");
    assert!(st["error"].as_str().unwrap_or_default().contains("remote.git"), "{st}");
    assert_eq!(st["next_fetch"], failing["next_fetch"], "the backoff is kept: {st}");
    assert_eq!(st["running"], c1.as_str());

    // Repaired: a good fetch of the running commit clears the error, applies nothing.
    std::fs::rename(&moved, &repo.bare).unwrap();
    hub.cli(&["gitops", "sync", "keep"]);
    wait_for("fetches again, the error cleared", 30.0, || {
        let s = status(&hub, "keep");
        (s["failures"] == 0 && s["error"].is_null()).then_some(())
    });
    assert_eq!(applied_in_log(&hub), 1);
    // A new commit after all that goes through as usual.
    let m2 = marker();
    base(&repo, &m2, None);
    let c2 = repo.push("two");
    hub.cli(&["gitops", "sync", "keep"]);
    wait_running("commit 2", &m2, 1);
    wait_for("commit 2 running", 20.0, || {
        (status(&hub, "keep")["running"] == c2.as_str()).then_some(())
    });
}
