//! Operator accounts (docs/accounts.md) against a real hub and real agents: every route of
//! docs/openapi.yaml for every role, label-scoped accounts, expiring and revoked tokens, the
//! audit log, browser sessions with CSRF, and the first-start admin token.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

struct Answer {
    status: u16,
    body: String,
    headers: reqwest::header::HeaderMap,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// One request to the hub: bearer `token` (if any), extra headers, JSON or raw body.
fn call(
    hub: &Hub,
    method: &str,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: Option<Body>,
) -> Answer {
    outpost_pki::install_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(&hub.ca_pem(), None).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let mut r = c.request(method.parse().unwrap(), format!("{}{path}", hub.url));
        if let Some(t) = token {
            r = r.bearer_auth(t.trim());
        }
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r = match body {
            Some(Body::Json(v)) => r.json(&v),
            Some(Body::Raw(b)) => r.body(b),
            None => r,
        };
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        // An event stream (`/v1/watch`) never ends: its status and headers are the answer.
        let stream = headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        Answer {
            status,
            body: if stream {
                String::new()
            } else {
                resp.text().await.unwrap()
            },
            headers,
        }
    })
}

enum Body {
    Json(Value),
    Raw(Vec<u8>),
}

fn get(hub: &Hub, path: &str, token: &str) -> Answer {
    call(hub, "GET", path, Some(token), &[], None)
}

fn post(hub: &Hub, path: &str, token: &str, body: Value) -> Answer {
    call(hub, "POST", path, Some(token), &[], Some(Body::Json(body)))
}

fn files(yaml: &str) -> Value {
    json!({"files": [{"name": "m.yaml", "content": yaml}]})
}

/// `outpost user add ...` with the admin token; returns the new token.
fn add_user(hub: &Hub, args: &[&str]) -> String {
    let mut a = vec!["user", "add"];
    a.extend(args);
    hub.cli(&a).trim().to_string()
}

/// A workload pinned to `site`.
fn pinned(name: &str, site: &str) -> String {
    sleeper_ds(name, &marker(), &format!("      nodeSelector: {{site: {site}}}\n"))
}

const ZERO_DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Every operation of docs/openapi.yaml: (method, path template, security).
fn operations() -> Vec<(String, String, Value)> {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.yaml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&text).unwrap();
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            if !["get", "post", "put", "delete", "head", "patch"].contains(&method.as_str()) {
                continue;
            }
            let security = op.get("security").cloned().unwrap_or(Value::Null);
            out.push((method.to_uppercase(), path.clone(), security));
        }
    }
    assert!(out.len() > 40, "the route list looks short: {}", out.len());
    out
}

/// The path with every parameter filled in (names of things that do not exist).
fn fill(path: &str) -> String {
    path.replace("{node}", "no-such-node")
        .replace("{kind}", "deployment")
        .replace("{namespace}", "default")
        .replace("{name}", "no-such-thing")
        .replace("{action}", "pause")
        .replace("{digest}", ZERO_DIGEST)
        .replace("{id}", "00000000")
        + if path == "/v1/logs" {
            "?node=no-such-node&workload=default/x"
        } else {
            ""
        }
}

/// A well-formed body for each route that takes one (so a refusal is the role's, not the body's).
fn body_for(method: &str, path: &str) -> Option<Body> {
    let deployment = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: rbac-probe}\nspec:\n  replicas: 1\n  template:\n    spec:\n      containers:\n      - {name: main, image: 'x:1', command: [/bin/true]}\n";
    Some(match (method, path) {
        ("PUT", _) => Body::Raw(b"not an archive".to_vec()),
        ("POST", "/v1/apply") | ("POST", "/v1/delete") => Body::Json(files(deployment)),
        ("POST", "/v1/images/tags") | ("POST", "/v1/models/tags") => {
            Body::Json(json!({"name": "probe:1", "digest": ZERO_DIGEST, "size": 0, "pushed_at": 0}))
        }
        ("POST", "/v1/users") => Body::Json(json!({"name": "probe", "role": "viewer"})),
        ("POST", "/v1/session") => Body::Json(json!({"user": "nobody", "password": "nothing-at-all"})),
        ("POST", _) => Body::Json(json!({})),
        _ => return None,
    })
}

/// The explicit table: may `role` (unscoped) use this operator route? A route added to
/// docs/openapi.yaml lands here and is checked for every role.
fn allowed(role: &str, method: &str, path: &str) -> bool {
    let admin_only = matches!(
        (method, path),
        ("POST", "/v1/tokens")
            | ("GET" | "POST", "/v1/users")
            | ("DELETE", "/v1/users/{name}")
            | ("POST" | "DELETE", "/v1/users/{name}/tokens")
            | ("DELETE", "/v1/users/{name}/tokens/{id}")
            | ("GET", "/v1/audit")
            | ("DELETE", "/v1/nodes/{node}")
    );
    let mutating = matches!(method, "POST" | "PUT" | "DELETE" | "PATCH" | "HEAD");
    match role {
        "admin" => true,
        "operator" => !admin_only,
        "viewer" => !admin_only && !mutating && path != "/v1/logs",
        "metrics" => path == "/metrics" || path == "/v1/whoami" || (method, path) == ("GET", "/v1/session"),
        r => panic!("no such role {r}"),
    }
}

#[test]
fn every_route_answers_each_role_as_the_table_says() {
    let hub = Hub::start();
    let tokens: Vec<(&str, String)> = ["admin", "operator", "viewer", "metrics"]
        .into_iter()
        .map(|r| (r, add_user(&hub, &[&format!("probe-{r}"), "--role", r])))
        .collect();
    let mut checked = 0;
    for (method, template, security) in operations() {
        // Node routes (mTLS), public ones and the session routes are not operator routes;
        // the session is tested below.
        let operator_route =
            !matches!(&security, Value::Array(a) if a.is_empty() || a.iter().all(|s| s.get("admin").is_none()));
        if !operator_route {
            continue;
        }
        let path = fill(&template);
        for (role, token) in &tokens {
            let a = call(&hub, &method, &path, Some(token), &[], body_for(&method, &template));
            let want = allowed(role, &method, &template);
            if want {
                assert!(
                    a.status != 401 && a.status != 403,
                    "{role} {method} {template}: refused ({}) but allowed by the table: {}",
                    a.status,
                    a.body
                );
            } else {
                assert_eq!(a.status, 403, "{role} {method} {template}: {}", a.body);
                if method != "HEAD" {
                    assert!(
                        a.body.contains(&format!("role {role} may not")),
                        "{role} {method} {template}: the refusal names the role: {}",
                        a.body
                    );
                }
            }
            checked += 1;
        }
        // No credentials at all: 401.
        let a = call(&hub, &method, &path, None, &[], body_for(&method, &template));
        assert_eq!(a.status, 401, "anonymous {method} {template}: {}", a.body);
    }
    assert!(checked > 100, "only {checked} checks");
    // The first-start admin token is admin.
    let me = get(&hub, "/v1/whoami", &hub.token).json();
    assert_eq!(
        (me["user"].as_str(), me["role"].as_str()),
        (Some("admin"), Some("admin"))
    );
    // The metrics account scrapes /metrics.
    let m = get(&hub, "/metrics", &tokens[3].1);
    assert_eq!(m.status, 200);
    assert!(m.body.contains("outpost_"), "{}", m.body);
    // The viewer's refusals are audited with its name.
    let audit = hub.json(&["audit", "--user", "probe-viewer"]);
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "apply" && e["result"].as_str().unwrap().starts_with("denied: ")),
        "{audit:#}"
    );
}

#[test]
fn operator_applies_and_rolls_out_and_every_change_is_audited() {
    let hub = Hub::start();
    let ops = add_user(&hub, &["ops", "--role", "operator"]);
    let a = post(&hub, "/v1/apply", &ops, files(&pinned("op-web", "a")));
    assert_eq!(a.status, 200, "{}", a.body);
    let a = post(&hub, "/v1/apply", &ops, files(&pinned("op-web", "a")));
    assert_eq!(a.status, 200, "a second revision: {}", a.body);
    // No node matches, so each rollout completes at once; undo makes revision 1's template
    // revision 3.
    let u = wait_for("the second rollout", 10.0, || {
        let a = post(
            &hub,
            "/v1/objects/daemonset/default/op-web/rollout/undo",
            &ops,
            json!({}),
        );
        (a.status != 404 && a.status != 409).then_some(a)
    });
    assert_eq!(u.status, 200, "{}", u.body);
    // ... but may not manage accounts or read the audit log.
    let u = post(&hub, "/v1/users", &ops, json!({"name": "eve", "role": "admin"}));
    assert_eq!(u.status, 403, "{}", u.body);
    assert!(u.body.contains("role operator may not manage-users"), "{}", u.body);
    assert_eq!(get(&hub, "/v1/audit", &ops).status, 403);
    // The admin token deletes; everything is in the audit log with who and from where.
    hub.cli(&["delete", "daemonset", "op-web"]);
    let audit = hub.json(&["audit"]);
    let rows: Vec<(String, String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            assert!(e["peer"].as_str().unwrap().starts_with("127.0.0.1:"), "{e}");
            let s = |k: &str| e[k].as_str().unwrap().to_string();
            (
                s("user"),
                s("action"),
                s("target"),
                s("result").chars().take(6).collect(),
            )
        })
        .collect();
    let want = |u: &str, a: &str, t: &str, r: &str| (u.to_string(), a.to_string(), t.to_string(), r.to_string());
    for w in [
        want("admin", "user add", "user/ops", "ok"),
        want("ops", "apply", "daemonset/default/op-web", "ok"),
        want("ops", "rollout undo", "daemonset/default/op-web", "ok"),
        want("ops", "user add", "user/eve", "denied"),
        want("admin", "delete", "daemonset/default/op-web", "ok"),
    ] {
        assert!(rows.contains(&w), "{w:?} missing from {rows:#?}");
    }
    // `outpost audit --user` filters.
    let mine = hub.json(&["audit", "--user", "ops"]);
    assert!(mine.as_array().unwrap().iter().all(|e| e["user"] == "ops"));
}

#[test]
fn a_scoped_account_neither_sees_nor_changes_anything_outside_its_selector() {
    let hub = Hub::start_with(&["--node-offline-alert", "1s"], &[]);
    let _a = hub.join("site-a-1", &hub.token(&["--labels", "site=a"])).running();
    let mut b = hub.join("site-b-1", &hub.token(&["--labels", "site=b"])).running();
    for n in ["site-a-1", "site-b-1"] {
        wait_for("nodes online", 20.0, || {
            (node_status(&hub, n).as_deref() == Some("Online")).then_some(())
        });
    }
    hub.apply(&pinned("web-a", "a"));
    hub.apply(&pinned("web-b", "b"));
    for site in ["a", "b"] {
        hub.apply(&format!(
            "apiVersion: outpost.dev/v1\nkind: Pipeline\nmetadata: {{name: sensors-{site}}}\nspec:\n  nodeSelector: {{site: {site}}}\n  streams:\n  - {{name: readings, key: sensor, sinks: [hub]}}\n  sinks:\n  - {{name: hub, type: hub}}\n"
        ));
    }
    wait_for("every rollout recorded (two DaemonSets, two Pipelines)", 15.0, || {
        let r = get(&hub, "/v1/rollouts", &hub.token).json();
        (r.as_array().unwrap().len() == 4).then_some(())
    });
    let t = add_user(&hub, &["ops-a", "--role", "operator", "--selector", "site=a"]);
    let names = |v: Value, key: &str| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x[key].as_str().unwrap().to_string())
            .collect()
    };

    // Lists are filtered.
    assert_eq!(names(get(&hub, "/v1/nodes", &t).json(), "name"), ["site-a-1"]);
    assert_eq!(names(get(&hub, "/v1/workloads", &t).json(), "name"), ["web-a"]);
    let mut rollouts = names(get(&hub, "/v1/rollouts", &t).json(), "workload");
    rollouts.sort();
    assert_eq!(rollouts, ["daemonset/default/web-a", "pipeline/default/sensors-a"]);
    assert_eq!(get(&hub, "/v1/gitops", &t).json(), json!([]));
    assert_eq!(names(get(&hub, "/v1/pipelines", &t).json(), "name"), ["sensors-a"]);
    assert_eq!(
        names(get(&hub, "/v1/pipelines", &hub.token).json(), "name"),
        ["sensors-a", "sensors-b"]
    );
    // One thing out of scope does not exist for this account.
    for path in [
        "/v1/nodes/site-b-1",
        "/v1/objects/daemonset/default/web-b",
        "/v1/objects/daemonset/default/web-b/revisions",
        "/v1/objects/daemonset/default/web-b/rollout",
        "/v1/logs?node=site-b-1&workload=default/web-b",
    ] {
        let a = get(&hub, path, &t);
        assert_eq!(a.status, 404, "{path}: {}", a.body);
        assert!(!a.body.contains("site=b"), "{path} leaks the labels: {}", a.body);
    }
    for path in [
        "/v1/nodes/site-a-1",
        "/v1/objects/daemonset/default/web-a",
        "/v1/objects/daemonset/default/web-a/rollout",
    ] {
        assert_eq!(get(&hub, path, &t).status, 200, "{path}");
    }
    // Changes out of scope are refused and change nothing.
    let refused = [
        (
            "web-b changed",
            post(&hub, "/v1/apply", &t, files(&pinned("web-b", "a"))),
        ),
        (
            "new on site b",
            post(&hub, "/v1/apply", &t, files(&pinned("web-b2", "b"))),
        ),
        (
            "no selector",
            post(&hub, "/v1/apply", &t, files(&sleeper_ds("everywhere", "1", ""))),
        ),
        (
            "a ConfigMap (the whole fleet's)",
            post(
                &hub,
                "/v1/apply",
                &t,
                files("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\ndata: {k: v}\n"),
            ),
        ),
        (
            "delete by file",
            post(&hub, "/v1/delete", &t, files(&pinned("web-b", "b"))),
        ),
        (
            "delete",
            call(
                &hub,
                "DELETE",
                "/v1/objects/daemonset/default/web-b",
                Some(&t),
                &[],
                None,
            ),
        ),
        (
            "pause",
            post(&hub, "/v1/objects/daemonset/default/web-b/rollout/pause", &t, json!({})),
        ),
        (
            "undo",
            post(&hub, "/v1/objects/daemonset/default/web-b/undo", &t, json!({})),
        ),
        ("metrics (the whole fleet's)", get(&hub, "/metrics", &t)),
    ];
    for (what, a) in refused {
        assert_eq!(a.status, 403, "{what}: {}", a.body);
        assert!(a.body.contains("limited to nodes site=a"), "{what}: {}", a.body);
    }
    let wb = get(&hub, "/v1/objects/daemonset/default/web-b", &hub.token).json();
    assert_eq!(wb["node_selector"]["site"], "b", "web-b unchanged");
    let all = names(get(&hub, "/v1/workloads", &hub.token).json(), "name");
    assert_eq!(all, ["web-a", "web-b"], "nothing created or deleted");
    // In scope it works.
    assert_eq!(post(&hub, "/v1/apply", &t, files(&pinned("web-a2", "a"))).status, 200);
    let p = post(&hub, "/v1/objects/daemonset/default/web-a/rollout/pause", &t, json!({}));
    assert!(
        p.status == 200 || p.status == 409,
        "allowed (409: nothing left to pause): {}",
        p.body
    );
    // A scoped admin is still limited to its scope, and has no fleet-wide powers.
    let sa = add_user(&hub, &["admin-a", "--role", "admin", "--selector", "site=a"]);
    let d = call(&hub, "DELETE", "/v1/nodes/site-b-1", Some(&sa), &[], None);
    assert_eq!(d.status, 403, "{}", d.body);
    assert_eq!(get(&hub, "/v1/users", &sa).status, 403);
    assert_eq!(post(&hub, "/v1/tokens", &sa, json!({})).status, 403);

    // Alerts, errors: site b's node goes offline and alerts; the scoped account does not see it.
    b.kill9();
    wait_for("site b's NodeOffline alert", 30.0, || {
        let all = get(&hub, "/v1/alerts", &hub.token).json();
        all.as_array()
            .unwrap()
            .iter()
            .any(|a| a["node"] == "site-b-1" && a["name"] == "NodeOffline")
            .then_some(())
    });
    let mine = get(&hub, "/v1/alerts?all=true", &t).json();
    assert!(
        mine.as_array().unwrap().iter().all(|a| a["node"] == "site-a-1"),
        "{mine:#}"
    );
    let errs = get(&hub, "/v1/errors", &t).json();
    assert!(
        errs.as_array().unwrap().iter().all(|e| e["node"] == "site-a-1"),
        "{errs:#}"
    );
}

#[test]
fn expired_revoked_and_removed_tokens_are_refused_with_a_clear_message() {
    let hub = Hub::start();
    let short = add_user(&hub, &["brief", "--role", "viewer", "--expires", "1s"]);
    assert_eq!(get(&hub, "/v1/nodes", &short).status, 200);
    let a = wait_for("the token to expire", 10.0, || {
        let a = get(&hub, "/v1/nodes", &short);
        (a.status == 401).then_some(a)
    });
    assert!(
        a.body.contains("the token")
            && a.body.contains("of user brief expired")
            && a.body.contains("outpost user token brief"),
        "{}",
        a.body
    );
    // A new token works; revoking it ends it.
    let fresh = hub.cli(&["user", "token", "brief"]).trim().to_string();
    assert_eq!(get(&hub, "/v1/nodes", &fresh).status, 200);
    hub.cli(&["user", "revoke", "brief"]);
    let a = get(&hub, "/v1/nodes", &fresh);
    assert_eq!(a.status, 401);
    assert!(a.body.contains("of user brief was revoked"), "{}", a.body);
    // Removing the account ends every token.
    let other = hub.cli(&["user", "token", "brief"]).trim().to_string();
    let ls = hub.json(&["user", "ls"]);
    assert_eq!(ls[0]["name"], "brief");
    assert_eq!(ls[0]["tokens"].as_array().unwrap().len(), 3);
    hub.cli(&["user", "rm", "brief"]);
    let a = get(&hub, "/v1/nodes", &other);
    assert_eq!(a.status, 401);
    assert!(a.body.contains("missing or unknown token"), "{}", a.body);
    // `outpost login` takes an account token and says who it is.
    let viewer = add_user(&hub, &["reader", "--role", "viewer", "--selector", "site=a"]);
    let o = Command::new(BIN)
        .args(["login", "--hub", &hub.url, "--token", &viewer])
        .env("OUTPOST_CONFIG", hub.dir.join("reader-config.json"))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("as reader (viewer, limited to site=a)"), "{out}");
    // A viewer may not read Secrets.
    hub.apply("apiVersion: v1\nkind: Secret\nmetadata: {name: s}\nstringData: {k: v}\n");
    let r = get(
        &hub,
        "/v1/objects/secret/default/s",
        &add_user(&hub, &["peek", "--role", "viewer"]),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body.contains("role viewer may not read Secrets"), "{}", r.body);
    hub.cli(&["user", "rm", "reader"]);
    hub.cli(&["user", "rm", "peek"]);
    // Bad input names the field and changes nothing.
    for (args, field) in [
        (vec!["user", "add", "x", "--role", "root"], "role"),
        (
            vec!["user", "add", "x", "--role", "viewer", "--selector", "site"],
            "selector",
        ),
        (
            vec!["user", "add", "x", "--role", "viewer", "--expires", "soon"],
            "--expires",
        ),
        (vec!["user", "add", "Bad Name", "--role", "viewer"], "NAME"),
        (vec!["user", "rm", "nobody"], "user nobody"),
    ] {
        let e = hub.cli_err(&args);
        assert!(e.contains(field), "{args:?}: {e}");
    }
    add_user(&hub, &["twice", "--role", "viewer"]);
    for body in [json!([null]), json!([]), json!(["twice", 5])] {
        let a = post(&hub, "/v1/users/twice/tokens", &hub.token, body.clone());
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        assert!(a.body.contains("must be a JSON object"), "{}", a.body);
    }
    let e = hub.cli_err(&["user", "add", "twice", "--role", "admin"]);
    assert!(e.contains("name: user twice exists"), "{e}");
    assert_eq!(hub.json(&["user", "ls"]).as_array().unwrap().len(), 1);
}

/// `outpost user add` with a password on standard input.
fn add_user_with_password(hub: &Hub, name: &str, role: &str, password: &str) {
    let mut child = Command::new(BIN)
        .args(["user", "add", name, "--role", role, "--password-stdin"])
        .env("OUTPOST_HUB", &hub.url)
        .env("OUTPOST_TOKEN", hub.token.trim())
        .env("OUTPOST_CA_FILE", hub.ca_file())
        .env("OUTPOST_CONFIG", hub.dir.join("no-config.json"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn login(hub: &Hub, user: &str, password: &str) -> Answer {
    call(
        hub,
        "POST",
        "/v1/session",
        None,
        &[],
        Some(Body::Json(json!({"user": user, "password": password}))),
    )
}

#[test]
fn browser_sessions_need_the_csrf_token_to_change_anything_and_expire() {
    let hub = Hub::start_with(&["--session-idle", "2s"], &[]);
    add_user_with_password(&hub, "web-ops", "operator", "a long enough password");
    assert_eq!(login(&hub, "web-ops", "wrong password here").status, 401);
    assert_eq!(login(&hub, "nobody", "a long enough password").status, 401);
    let l = login(&hub, "web-ops", "a long enough password");
    assert_eq!(l.status, 200, "{}", l.body);
    let set = l.headers["set-cookie"].to_str().unwrap().to_string();
    for flag in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set.split(';').next().unwrap().to_string();
    let csrf = l.json()["csrf_token"].as_str().unwrap().to_string();
    let with = |method: &str, path: &str, csrf: Option<&str>, body: Option<Body>| {
        let mut h = vec![("cookie", cookie.as_str())];
        if let Some(c) = csrf {
            h.push(("x-csrf-token", c));
        }
        call(&hub, method, path, None, &h, body)
    };
    // Reads need only the cookie.
    let me = with("GET", "/v1/whoami", None, None);
    assert_eq!(me.status, 200);
    assert_eq!(me.json()["role"], "operator");
    // A forged cross-site POST (the cookie, no CSRF token) is refused and applies nothing.
    let ds = pinned("from-browser", "a");
    let a = with("POST", "/v1/apply", None, Some(Body::Json(files(&ds))));
    assert_eq!(a.status, 403, "{}", a.body);
    assert!(a.body.contains("X-CSRF-Token"), "{}", a.body);
    let a = with(
        "POST",
        "/v1/apply",
        Some("0123456789abcdef"),
        Some(Body::Json(files(&ds))),
    );
    assert_eq!(a.status, 403, "wrong token: {}", a.body);
    assert_eq!(hub.json(&["get", "workloads"]), json!([]));
    // With it, accepted.
    let a = with("POST", "/v1/apply", Some(&csrf), Some(Body::Json(files(&ds))));
    assert_eq!(a.status, 200, "{}", a.body);
    // Logout needs the CSRF token too, and ends the session.
    assert_eq!(with("DELETE", "/v1/session", None, None).status, 403);
    assert_eq!(with("DELETE", "/v1/session", Some(&csrf), None).status, 200);
    let a = with("GET", "/v1/whoami", None, None);
    assert_eq!(a.status, 401);
    assert!(a.body.contains("log in again"), "{}", a.body);
    // An idle session expires (2 s here).
    let l = login(&hub, "web-ops", "a long enough password");
    let cookie2 = l.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        call(&hub, "GET", "/v1/whoami", None, &[("cookie", &cookie2)], None).status,
        200
    );
    // Every request would keep it alive, so nothing polls: the condition is the clock itself.
    std::thread::sleep(std::time::Duration::from_millis(2300));
    let a = call(&hub, "GET", "/v1/whoami", None, &[("cookie", &cookie2)], None);
    assert_eq!(a.status, 401);
    assert!(a.body.contains("without use; log in again"), "{}", a.body);
    // Logins are audited.
    let audit = hub.json(&["audit", "--user", "web-ops"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(
        actions.contains(&"login") && actions.contains(&"logout") && actions.contains(&"apply"),
        "{actions:?}"
    );
}

/// A DaemonSet pinned to `site` that prints `count` error lines `ERROR <site>-<n>` after
/// `delay` seconds, then sleeps.
fn error_printer(site: &str, delay: u32, count: u32) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: errors-{site}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      nodeSelector: {{site: {site}}}\n      containers:\n      - name: main\n        image: 'errors:1'\n        command: [/bin/sh, -c, 'sleep {delay}; for i in $(seq 1 {count}); do echo \"ERROR {site}-$i\"; done; exec sleep 100000']\n"
    )
}

#[test]
fn a_scoped_limit_counts_only_rows_in_scope() {
    let hub = Hub::start();
    let _a = hub.join("site-a-1", &hub.token(&["--labels", "site=a"])).running();
    let _b = hub.join("site-b-1", &hub.token(&["--labels", "site=b"])).running();
    // site a's lines first, then many newer ones from site b
    hub.apply(&error_printer("a", 0, 4));
    hub.apply(&error_printer("b", 3, 30));
    let lines = |v: &Value, node: &str| v.as_array().unwrap().iter().filter(|e| e["node"] == node).count();
    // ~6 s alone; over 60 s twice under the whole suite's load on two cores.
    wait_for("site a's 4 lines, then site b's 30, forwarded", 120.0, || {
        let all = get(&hub, "/v1/errors", &hub.token).json();
        let newest = get(&hub, "/v1/errors?limit=3", &hub.token).json();
        (lines(&all, "site-a-1") == 4 && lines(&all, "site-b-1") == 30 && lines(&newest, "site-b-1") == 3).then_some(())
    });
    let t = add_user(&hub, &["ops-a", "--role", "operator", "--selector", "site=a"]);
    let mine = get(&hub, "/v1/errors?limit=2", &t).json();
    let got: Vec<&str> = mine
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["line"].as_str().unwrap())
        .collect();
    assert_eq!(
        got,
        ["ERROR a-3", "ERROR a-4"],
        "the newest 2 of site a, oldest first: {mine:#}"
    );
    let mine = get(&hub, "/v1/errors", &t).json();
    assert_eq!(lines(&mine, "site-a-1"), 4, "{mine:#}");
    assert_eq!(lines(&mine, "site-b-1"), 0, "{mine:#}");
}

#[test]
fn a_browser_session_survives_a_hub_restart_and_logout_deletes_it() {
    let mut hub = Hub::start();
    add_user_with_password(&hub, "web-ops", "operator", "a long enough password");
    let l = login(&hub, "web-ops", "a long enough password");
    assert_eq!(l.status, 200, "{}", l.body);
    let cookie = l.headers["set-cookie"]
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let csrf = l.json()["csrf_token"].as_str().unwrap().to_string();
    let with = |hub: &Hub, method: &str, path: &str, body: Option<Body>| {
        call(
            hub,
            method,
            path,
            None,
            &[("cookie", &cookie), ("x-csrf-token", &csrf)],
            body,
        )
    };
    assert_eq!(with(&hub, "GET", "/v1/whoami", None).status, 200);
    hub.restart();
    let me = with(&hub, "GET", "/v1/whoami", None);
    assert_eq!(me.status, 200, "the cookie still works after the restart: {}", me.body);
    assert_eq!(me.json()["user"], "web-ops");
    // its CSRF token too
    let a = with(
        &hub,
        "POST",
        "/v1/apply",
        Some(Body::Json(files(&pinned("after-restart", "a")))),
    );
    assert_eq!(a.status, 200, "{}", a.body);
    // logout deletes the stored session: after another restart it is still gone
    assert_eq!(with(&hub, "DELETE", "/v1/session", None).status, 200);
    assert_eq!(with(&hub, "GET", "/v1/whoami", None).status, 401);
    hub.restart();
    let a = with(&hub, "GET", "/v1/whoami", None);
    assert_eq!(a.status, 401, "{}", a.body);
    assert!(a.body.contains("log in again"), "{}", a.body);
}

#[test]
fn image_uploads_are_audited_with_their_digest_and_size() {
    use sha2::Digest;
    let hub = Hub::start();
    let viewer = add_user(&hub, &["uploader-v", "--role", "viewer"]);
    let archive = b"an image archive, for the audit log".to_vec();
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&archive)));
    let path = format!("/v1/images/blobs/{digest}");
    let put = |token: &str| call(&hub, "PUT", &path, Some(token), &[], Some(Body::Raw(archive.clone())));
    assert_eq!(put(&viewer).status, 403);
    assert_eq!(put(&hub.token).status, 201);
    assert_eq!(put(&hub.token).status, 200, "stored already");
    let audit = hub.json(&["audit"]);
    let entries: Vec<(String, String, String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "image push")
        .map(|e| {
            let s = |k: &str| e[k].as_str().unwrap_or_default().to_string();
            (s("user"), s("target"), s("detail"), s("result"))
        })
        .collect();
    let size = format!("{} bytes", archive.len());
    assert_eq!(entries.len(), 3, "{audit:#}");
    assert_eq!(
        (entries[0].0.as_str(), entries[0].1.as_str()),
        ("uploader-v", digest.as_str())
    );
    assert!(entries[0].3.starts_with("denied"), "{entries:?}");
    assert_eq!(
        (
            &entries[1].0[..],
            &entries[1].1[..],
            &entries[1].2[..],
            &entries[1].3[..]
        ),
        ("admin", digest.as_str(), size.as_str(), "ok")
    );
    assert_eq!(entries[2].2, "already stored");
}
