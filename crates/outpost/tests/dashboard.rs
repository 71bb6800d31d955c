//! The web dashboard in a real headless Chromium driven over WebDriver (fantoccini and
//! chromedriver), against a real hub and real agents on loopback (docs/dashboard.md): log in;
//! the overview's counts equal `outpost get nodes`; a killed workload's restart shows on the
//! node page without a reload, with vitals charts from the node's own history and an
//! interactive terminal (a TTY shell: typed commands, a line read from stdin, the exit code);
//! a rollout paused and resumed from the UI; a viewer sees no
//! mutating button and a forged action is refused (403); a cross-site POST with the session
//! cookie but without the CSRF token is refused.
//!
//! Chromium and chromedriver come from Debian (`chromium chromium-driver`, installed by
//! scripts/test.sh). Without them the test is skipped, except under CI (`CI=true`), where it
//! fails. With `OUTPOST_DASHBOARD_SCREENSHOTS=DIR` it saves the overview and node page to
//! `DIR/dashboard-overview.png` and `DIR/dashboard-node.png` (the ones in docs/).

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A headless Chromium behind chromedriver, driven synchronously.
struct Ui {
    rt: tokio::runtime::Runtime,
    c: Client,
    driver: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Ui {
    fn drop(&mut self) {
        let c = self.c.clone();
        let _ = self.rt.block_on(async move { c.close().await });
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

impl Ui {
    /// None (skip) when Chromium is missing outside CI; under CI a missing browser fails.
    fn start() -> Option<Ui> {
        let found = Path::new(CHROMIUM).exists() && Path::new(CHROMEDRIVER).exists();
        if !found {
            assert!(
                std::env::var("CI").ok().as_deref() != Some("true"),
                "{CHROMIUM} or {CHROMEDRIVER} is missing: install chromium and chromium-driver (scripts/test.sh does)"
            );
            eprintln!("skipping: {CHROMIUM} or {CHROMEDRIVER} is missing (apt install chromium chromium-driver)");
            return None;
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        wait_for("chromedriver listening", 20.0, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        let profile = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let caps = json!({
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1400,1000", "--ignore-certificate-errors",
                    format!("--user-data-dir={}", profile.path().display()),
                ],
            },
        });
        let caps = match caps {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let c = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a WebDriver session with headless Chromium");
        Some(Ui {
            rt,
            c,
            driver,
            _profile: profile,
        })
    }

    fn goto(&self, url: &str) {
        self.rt.block_on(self.c.goto(url)).expect("navigate");
    }

    /// Run a script (its `return` value), with `arguments`.
    fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt.block_on(self.c.execute(script, args)).expect("script")
    }

    /// Run an async script: it calls `arguments[arguments.length - 1]` with its result.
    fn js_async(&self, script: &str, args: Vec<Value>) -> Value {
        self.rt
            .block_on(self.c.execute_async(script, args))
            .expect("async script")
    }

    /// The text of the first element matching `css`, None when there is none.
    fn text(&self, css: &str) -> Option<String> {
        let v = self.js(
            "const e = document.querySelector(arguments[0]); return e ? e.textContent : null;",
            vec![json!(css)],
        );
        v.as_str().map(str::to_string)
    }

    fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length;",
            vec![json!(css)],
        )
        .as_u64()
        .unwrap_or(0) as usize
    }

    /// Act on the element matching `css`. The live views re-render on every refresh, so the
    /// element found may be replaced before the action lands: find it again then (up to 10 s).
    fn on<F, Fut>(&self, what: &str, css: &str, act: F)
    where
        F: Fn(fantoccini::elements::Element) -> Fut,
        Fut: std::future::Future<Output = Result<(), fantoccini::error::CmdError>>,
    {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match self
                .rt
                .block_on(async { act(self.c.find(Locator::Css(css)).await?).await })
            {
                Ok(()) => return,
                Err(e) if e.is_stale_element_reference() && std::time::Instant::now() < deadline => continue,
                Err(e) => panic!("{what} {css}: {e}"),
            }
        }
    }

    fn click(&self, css: &str) {
        self.on("click", css, |e| async move { e.click().await.map(drop) });
    }

    fn fill(&self, css: &str, text: &str) {
        self.on("fill", css, |e| async move {
            e.clear().await?;
            e.send_keys(text).await
        });
    }

    /// Key presses into the element (WebDriver keys: `\u{E007}` is Enter).
    fn type_keys(&self, css: &str, text: &str) {
        self.on("type into", css, |e| async move { e.send_keys(text).await });
    }

    fn screenshot(&self, path: &Path) {
        let png = self.rt.block_on(self.c.screenshot()).expect("screenshot");
        std::fs::write(path, png).unwrap();
    }

    /// The session cookie the browser holds (HttpOnly: only WebDriver sees it).
    fn session_cookie(&self) -> String {
        let all = self.rt.block_on(self.c.get_all_cookies()).expect("cookies");
        all.iter()
            .find(|c| c.name() == "outpost_session")
            .map(|c| c.value().to_string())
            .expect("the session cookie")
    }

    fn log_in(&self, hub: &Hub, user: &str, password: &str) {
        self.goto(&format!("{}/", hub.url));
        wait_for("the login form", 20.0, || {
            (self.js(
                "const v = document.querySelector('#login-view'); return !!v && !v.hidden;",
                vec![],
            ) == json!(true))
            .then_some(())
        });
        self.fill("#login-user", user);
        self.fill("#login-password", password);
        self.click("#login-submit");
        wait_for("logged in, the overview", 20.0, || {
            let who = self.text("#who").unwrap_or_default();
            (who.starts_with(user) && self.text("#count-total").is_some()).then_some(())
        });
    }

    fn log_out(&self) {
        self.click("#logout");
        wait_for("back at the login form", 20.0, || {
            (self.js(
                "const v = document.querySelector('#login-view'); return !!v && !v.hidden;",
                vec![],
            ) == json!(true))
            .then_some(())
        });
    }

    /// `fetch` from the page: (status, body). `csrf`: send the tab's CSRF token.
    fn fetch(&self, method: &str, path: &str, csrf: bool) -> (u16, String) {
        let v = self.js_async(
            "const [method, path, csrf, done] = arguments;
             const headers = {};
             if (csrf) headers['X-CSRF-Token'] = sessionStorage.getItem('outpost.csrf') || '';
             fetch(path, {method, headers, credentials: 'same-origin'})
               .then(async r => done([r.status, await r.text()]))
               .catch(e => done([0, String(e)]));",
            vec![json!(method), json!(path), json!(csrf)],
        );
        (
            v[0].as_u64().unwrap_or(0) as u16,
            v[1].as_str().unwrap_or_default().to_string(),
        )
    }

    fn count_of(&self, key: &str) -> u64 {
        self.text(&format!("#count-{key} .n"))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(u64::MAX)
    }
}

/// Add an account with a password (and a label scope); returns the CLI's output (its token).
fn add_user(hub: &Hub, name: &str, role: &str, password: &str, selector: &[&str]) -> String {
    let mut args = vec!["user", "add", name, "--role", role, "--password-stdin"];
    args.extend(selector);
    let mut c = hub.command(&args);
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// GET with a bearer token: (status, body as JSON, Null when it is not).
fn get_as(hub: &Hub, token: &str, path: &str) -> (u16, Value) {
    let (status, body) = api_get_as(hub, token, path);
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

/// A process DaemonSet labelled `app: <name>`, `sleep <marker>`.
fn app(name: &str, marker: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {{name: {name}, labels: {{app: {name}}}}}\nspec:\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{marker}']}}\n"
    )
}

/// (Online, Offline) as `outpost get nodes` counts them.
fn cli_counts(hub: &Hub) -> (u64, u64, u64) {
    let nodes = hub.json(&["get", "nodes"]);
    let all = nodes.as_array().unwrap();
    let on = all.iter().filter(|n| n["status"] == "Online").count() as u64;
    let off = all.iter().filter(|n| n["status"] == "Offline").count() as u64;
    (all.len() as u64, on, off)
}

fn page_counts(ui: &Ui) -> (u64, u64, u64) {
    (
        ui.count_of("total"),
        ui.count_of("online") + ui.count_of("stale"),
        ui.count_of("offline"),
    )
}

fn restarts(ui: &Ui, key: &str) -> Option<u64> {
    ui.text(&format!("tr[data-workload='{key}'] td.restarts"))?
        .trim()
        .parse()
        .ok()
}

fn screenshots_dir() -> Option<PathBuf> {
    std::env::var_os("OUTPOST_DASHBOARD_SCREENSHOTS").map(PathBuf::from)
}

#[test]
fn dashboard_in_a_real_browser() {
    let Some(ui) = Ui::start() else { return };
    let hub = Hub::start();
    let token_a = hub.token(&["--labels", "site=north,tier=edge"]);
    let token_b = hub.token(&["--labels", "site=south,tier=edge"]);
    let _a1 = hub.join("north-1", &token_a).running();
    let _a2 = hub.join("north-2", &token_a).running();
    let mut b1 = hub.join("south-1", &token_b).running();
    add_user(&hub, "olga", "operator", "olga-password-1", &[]);
    add_user(&hub, "victor", "viewer", "victor-password-1", &[]);
    let out = add_user(&hub, "sam", "viewer", "sam-password-12", &["--selector", "site=south"]);
    // the token is the first line
    let sam = out.lines().next().unwrap_or_default().trim().to_string();
    hub.apply(
        "apiVersion: outpost.dev/v1\nkind: RolloutPolicy\nmetadata: {name: kiosk}\nspec:\n  selector: {app: kiosk}\n  waves:\n  - {count: 1, bake: 600s}\n  - {percent: 100}\n  tinyFleet: 1\n"
    );
    let m1 = marker();
    hub.apply(&app("kiosk", &m1));
    let key = "daemonset/default/kiosk";
    wait_for("kiosk running on the three nodes", 60.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).len() == 3).then_some(())
    });

    // log in; the overview's counts equal `outpost get nodes`
    ui.log_in(&hub, "olga", "olga-password-1");
    wait_for("the overview counts three online nodes", 30.0, || {
        let cli = cli_counts(&hub);
        (cli == (3, 3, 0) && page_counts(&ui) == cli).then_some(())
    });
    assert_eq!(ui.count("#node-table tbody tr[data-node]"), 3);
    // the JSON behind it: a label filter, a refused selector naming the field, a scoped account
    let (st, v) = get_as(&hub, hub.token.trim(), "/v1/dashboard/overview?selector=site%3Dnorth");
    assert_eq!((st, v["counts"]["total"].as_u64()), (200, Some(2)), "{v}");
    let (st, v) = get_as(&hub, hub.token.trim(), "/v1/dashboard/nodes?selector=nonsense");
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or_default().starts_with("selector:"),
        "{v}"
    );
    let (st, v) = get_as(&hub, &sam, "/v1/dashboard/nodes");
    assert_eq!(st, 200, "{v}");
    let names: Vec<&str> = v["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert_eq!(names, ["south-1"], "a site=south account sees only its site");
    assert_eq!(
        ui.text("#sites").map(|t| t.contains("north") && t.contains("south")),
        Some(true)
    );
    if let Some(dir) = screenshots_dir() {
        ui.screenshot(&dir.join("dashboard-overview.png"));
    }
    // a node going away shows on the open page (a tick), and the counts still agree
    b1.kill9();
    wait_for("the overview counts south-1 offline, as the CLI does", 40.0, || {
        let cli = cli_counts(&hub);
        (cli == (3, 2, 1) && page_counts(&ui) == cli).then_some(())
    });
    b1.start();

    // the node page shows a killed workload's restart live, without a reload
    ui.goto(&format!("{}/#/node/north-1", hub.url));
    let before = wait_for("the node page lists kiosk", 30.0, || restarts(&ui, key));
    ui.js("window.__same_page = 'yes';", vec![]);
    // kill every copy (whichever is north-1's restarts)
    for p in pids_with_cmdline(&["/bin/sleep", &m1]) {
        unsafe { libc::kill(p as i32, libc::SIGKILL) };
    }
    wait_for("the restart on the open node page", 60.0, || {
        restarts(&ui, key).filter(|r| *r > before).map(|_| ())
    });
    assert_eq!(
        ui.js("return window.__same_page || null;", vec![]),
        json!("yes"),
        "no reload"
    );
    // the vitals charts are drawn from the node's own history, through its link
    wait_for("vitals charts from the node's own history", 30.0, || {
        let source = ui.js(
            "const e = document.querySelector('#vitals-source'); return e ? e.dataset.source || null : null;",
            vec![],
        );
        (ui.count("#vitals .chart polyline") == 4 && source == json!("node")).then_some(())
    });
    let note = ui.text("#vitals-source").unwrap_or_default();
    assert!(note.contains("node's own history"), "{note}");
    // the terminal: one TTY session in the workload, keys streamed, output drawn by the emulator
    wait_for("kiosk Running again on the page", 60.0, || {
        (ui.text(&format!("tr[data-workload='{key}'] td:nth-child(4)"))? == "Running").then_some(())
    });
    wait_for("the terminal offers kiosk", 20.0, || {
        (ui.js("return document.querySelector('#term-workload').value;", vec![]) == json!(key)).then_some(())
    });
    ui.click("#term-connect");
    wait_for("the terminal connected", 40.0, || {
        ui.text("#term-status").filter(|t| t.starts_with("connected"))
    });
    let screen = || {
        ui.js(
            "return document.querySelector('#term-screen').dataset.text || '';",
            vec![],
        )
        .as_str()
        .unwrap_or_default()
        .to_string()
    };
    let expect = |what: &str, want: &str| {
        let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            wait_for(what, 40.0, || screen().contains(want).then_some(()))
        }));
        assert!(done.is_ok(), "{what}: the terminal shows {:?}", screen());
    };
    ui.type_keys("#term-screen", "echo dash-$((6*7)) $(tty | cut -c1-8)\u{E007}");
    expect("the command's output", "dash-42 /dev/pts");
    // interactive stdin: `read` takes a line typed on the terminal
    ui.type_keys("#term-screen", "read x; echo got-$x\u{E007}");
    ui.type_keys("#term-screen", "hello\u{E007}");
    expect("the line read from the terminal", "got-hello");
    if let Some(dir) = screenshots_dir() {
        ui.screenshot(&dir.join("dashboard-node.png"));
    }
    ui.type_keys("#term-screen", "exit 3\u{E007}");
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for("the exit code shown", 40.0, || {
            ui.text("#term-status").filter(|t| t.starts_with("exit 3"))
        })
    }));
    assert!(
        done.is_ok(),
        "status {:?}, the terminal shows {:?}",
        ui.text("#term-status"),
        screen()
    );

    // pause and resume a rollout from the UI
    let m2 = marker();
    hub.apply(&app("kiosk", &m2));
    ui.goto(&format!("{}/#/rollouts", hub.url));
    let sel = format!("div.rollout[data-workload='{key}']");
    wait_for("the rollout of revision 2 with its buttons", 30.0, || {
        ui.text(&format!("{sel} h2"))
            .filter(|t| t.contains("revision 2") && t.contains("Progressing"))
            .filter(|_| ui.count(&format!("{sel} button[data-action]")) == 4)
    });
    ui.click(&format!("{sel} button[data-action='pause']"));
    wait_for("Paused on the page and for the CLI", 20.0, || {
        let page = ui.text(&format!("{sel} .phase"))?;
        let cli = hub.json(&["rollout", "status", "kiosk"]);
        (page == "Paused" && cli["phase"] == "Paused").then_some(())
    });
    ui.click(&format!("{sel} button[data-action='resume']"));
    wait_for("resumed on the page and for the CLI", 20.0, || {
        let page = ui.text(&format!("{sel} .phase"))?;
        let cli = hub.json(&["rollout", "status", "kiosk"]);
        (page == "Progressing" && cli["phase"] == "Progressing").then_some(())
    });
    let audit = hub.cli(&["audit"]);
    assert!(audit.contains("olga"), "the UI's actions are audited as olga: {audit}");

    // a cross-site POST with the cookie but without the CSRF token is refused
    let cookie = ui.session_cookie();
    let (status, body) = forged_post(&hub, &cookie, "/v1/objects/daemonset/default/kiosk/rollout/pause");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("CSRF"), "{body}");
    let (status, _) = ui.fetch("POST", "/v1/objects/daemonset/default/kiosk/rollout/pause", false);
    assert_eq!(status, 403, "same-origin fetch without the token is refused too");
    assert_eq!(hub.json(&["rollout", "status", "kiosk"])["phase"], "Progressing");

    // a viewer sees no mutating button, and the forged action is refused
    ui.log_out();
    ui.log_in(&hub, "victor", "victor-password-1");
    ui.goto(&format!("{}/#/rollouts", hub.url));
    wait_for("the viewer's rollouts page", 20.0, || ui.text(&format!("{sel} h2")));
    assert_eq!(ui.count("button[data-action]"), 0, "no rollout button for a viewer");
    ui.goto(&format!("{}/#/node/north-1", hub.url));
    wait_for("the viewer's node page", 20.0, || restarts(&ui, key));
    assert_eq!(ui.count("#term-screen"), 0, "no terminal for a viewer");
    let (status, body) = ui.fetch("POST", "/v1/objects/daemonset/default/kiosk/rollout/pause", true);
    assert_eq!(status, 403, "{body}");
    assert_eq!(hub.json(&["rollout", "status", "kiosk"])["phase"], "Progressing");

    // logout ends the session: the cookie no longer works
    ui.log_out();
    let (status, _) = ui.fetch("GET", "/v1/nodes", false);
    assert_eq!(status, 401);
}

/// A POST as another site would make it: the session cookie, an Origin elsewhere, no token.
fn forged_post(hub: &Hub, cookie: &str, path: &str) -> (u16, String) {
    api_call(
        hub,
        |c, url| {
            c.post(url)
                .header("cookie", format!("outpost_session={cookie}"))
                .header("origin", "https://attacker.example")
                .header("content-type", "application/x-www-form-urlencoded")
                .body("x=1")
        },
        path,
    )
}

/// `GET /v1/nodes/{node}/vitals`: the node's own history through its link, older than the
/// hub's start; bounded; scope-checked; an offline node answers at once naming since when.
#[test]
fn node_vitals_history_through_the_link() {
    let mut hub = Hub::start();
    let token = hub.token(&["--labels", "site=north"]);
    let mut a = hub.join("hist-1", &token);
    a.env.push(("OUTPOST_VITALS_INTERVAL_MS".into(), "200".into()));
    a.start();
    wait_for("hist-1 online", 30.0, || {
        (node_status(&hub, "hist-1").as_deref() == Some("Online")).then_some(())
    });
    let path = "/v1/nodes/hist-1/vitals?since=24h";
    let first = wait_for("a point of the node's history", 30.0, || {
        let (st, body) = api_get(&hub, path);
        let v: Value = serde_json::from_str(&body).ok()?;
        (st == 200).then(|| v["points"].as_array()?.first()?["at"].as_i64())?
    });

    // the hub restarts and forgets what it kept in memory; the node still has its history
    let restarted = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    hub.restart();
    let v = wait_for("the history again after the hub's restart", 40.0, || {
        let (st, body) = api_get(&hub, path);
        (st == 200).then(|| serde_json::from_str::<Value>(&body).ok())?
    });
    let points = v["points"].as_array().unwrap();
    assert!(!points.is_empty() && points.len() <= 300, "{v}");
    assert_eq!(points[0]["at"].as_i64(), Some(first), "the same oldest point: {v}");
    assert!(first < restarted, "a point older than the hub's start: {v}");
    for p in points {
        for k in ["cpu", "mem", "disk", "load1"] {
            assert!(p[k].is_number(), "{k} in {p}");
        }
    }
    let (st, body) = api_get(&hub, "/v1/dashboard/nodes/hist-1/vitals");
    let kept: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st, 200);
    assert!(
        kept.as_array().unwrap().iter().all(|p| p["at"].as_i64() > Some(first)),
        "the hub's own samples start after its restart: {kept}"
    );
    // a short window, and bounded points
    let (st, body) = api_get(&hub, "/v1/nodes/hist-1/vitals?since=24h&points=1");
    let one: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((st, one["points"].as_array().map(Vec::len)), (200, Some(1)), "{one}");

    // bad input names the field
    let (st, body) = api_get(&hub, "/v1/nodes/hist-1/vitals?since=yesterday");
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("since:"), "{body}");
    let (st, body) = api_get(&hub, "/v1/nodes/hist-1/vitals?points=5000");
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("points:"), "{body}");

    // a viewer reads it; a viewer scoped to another site does not see the node
    let viewer = add_user(&hub, "vera", "viewer", "vera-password-1", &[]);
    let viewer = viewer.lines().next().unwrap().trim().to_string();
    let (st, body) = api_get_as(&hub, &viewer, path);
    assert_eq!(st, 200, "{body}");
    let south = add_user(&hub, "sid", "viewer", "sid-password-12", &["--selector", "site=south"]);
    let south = south.lines().next().unwrap().trim().to_string();
    let (st, body) = api_get_as(&hub, &south, path);
    assert_eq!(st, 404, "out of scope reads as not found: {body}");

    // offline: at once, naming since when
    a.kill9();
    wait_for("hist-1 offline", 30.0, || {
        (node_status(&hub, "hist-1").as_deref() == Some("Offline")).then_some(())
    });
    let t = std::time::Instant::now();
    let (st, body) = api_get(&hub, path);
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("offline since"), "{body}");
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "answered at once");
}
