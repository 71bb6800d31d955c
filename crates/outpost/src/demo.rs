//! `outpost demo`: a hub and three agents on this machine, as separate processes with temporary
//! data dirs, the sample app from `examples/demo-app.yaml` applied, sensor readings sent through
//! a box's data pipeline, a new revision rolled out canary first, and a tour of what to try.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use outpost_api::pipeline::{RecordKind, StoredRecord};
use outpost_api::rollout::{RolloutInfo, RolloutPhase};
use outpost_api::{ManifestFile, Phase, TokenRequest, TokenResponse, WorkloadInfo};

use crate::client::{self, Client, Config};
use crate::output;

const SAMPLE_APP: &str = include_str!("../../../examples/demo-app.yaml");

#[derive(Args)]
pub struct DemoArgs {
    /// Stop by itself after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    seconds: Option<u64>,
    /// Where to put the demo's data dirs (default: a new directory under /tmp, removed at exit).
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Proc {
    name: String,
    child: Child,
}

fn spawn(name: &str, args: &[&str], env: &[(&str, String)], log: &Path) -> Result<Proc> {
    let exe = std::env::current_exe().context("cannot find the outpost binary")?;
    let out = std::fs::File::create(log)?;
    let child = Command::new(exe)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc {
        name: name.to_string(),
        child,
    })
}

async fn wait_for<T>(what: &str, deadline: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub async fn run(a: DemoArgs) -> Result<()> {
    let owned_dir = a.dir.is_none();
    let base = a
        .dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("outpost-demo-{}", std::process::id())));
    std::fs::create_dir_all(&base)?;
    let mut procs: Vec<Proc> = Vec::new();
    let result = demo(&base, &mut procs, a.seconds).await;
    // Stop agents first (they stop their workloads), then the hub.
    for p in procs.iter_mut().rev() {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) };
    }
    let end = Instant::now() + Duration::from_secs(15);
    for p in procs.iter_mut().rev() {
        while p.child.try_wait().ok().flatten().is_none() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = p.child.kill();
        let _ = p.child.wait();
    }
    if owned_dir {
        let _ = std::fs::remove_dir_all(&base);
        eprintln!("demo stopped; removed {}", base.display());
    } else {
        eprintln!("demo stopped; data kept in {}", base.display());
    }
    result
}

async fn demo(base: &Path, procs: &mut Vec<Proc>, seconds: Option<u64>) -> Result<()> {
    let port = free_port()?;
    let url = format!("https://127.0.0.1:{port}");
    let hub_dir = base.join("hub");
    let listen = format!("127.0.0.1:{port}");
    let hub_args = [
        "hub",
        "--listen",
        &listen,
        "--data-dir",
        hub_dir.to_str().unwrap_or("."),
        "--advertise",
        &url,
    ];
    procs.push(spawn("hub", &hub_args, &[], &base.join("hub.log"))?);
    eprintln!("starting a hub on {url} ...");
    let token_file = hub_dir.join("admin.token");
    let admin = wait_for("the hub's admin token", Duration::from_secs(20), async || {
        std::fs::read_to_string(&token_file)
            .ok()
            .filter(|t| !t.trim().is_empty())
    })
    .await
    .with_context(|| format!("the hub did not start; see {}", base.join("hub.log").display()))?;
    let ca_pem = std::fs::read_to_string(hub_dir.join("ca.pem"))?;
    let c = Client::new(&url, &admin, &ca_pem)?;
    wait_for("the hub to answer", Duration::from_secs(20), async || {
        c.get::<Vec<outpost_api::NodeInfo>>("/v1/nodes").await.ok()
    })
    .await?;

    // Let `outpost get ...` in another terminal talk to this hub.
    let cfg_path = client::config_path();
    if cfg_path.exists() {
        let _ = std::fs::copy(&cfg_path, cfg_path.with_extension("json.before-demo"));
    }
    client::save_config(&Config {
        hub: url.clone(),
        token: admin.trim().to_string(),
        ca_pem: ca_pem.clone(),
    })?;

    let boxes = [
        ("store-001-box-1", "store-001"),
        ("store-001-box-2", "store-001"),
        ("store-002-box-1", "store-002"),
    ];
    // Each box's pipeline listeners (MQTT and HTTP ingest) on their own loopback ports.
    let mut listeners = Vec::new();
    for (name, site) in boxes {
        let req = TokenRequest {
            labels: [("site".to_string(), site.to_string())].into(),
            ttl_secs: Some(600),
            uses: Some(1),
            ..Default::default()
        };
        let t: TokenResponse = c.post("/v1/tokens", &req).await?;
        let dir = base.join(name);
        outpost_agent::join(&outpost_agent::JoinOptions {
            hub: url.clone(),
            token: t.token,
            name: Some(name.to_string()),
            labels: Default::default(),
            data_dir: dir.clone(),
        })
        .await?;
        let d = dir.to_str().unwrap_or(".").to_string();
        let (mqtt, ingest) = (free_port()?, free_port()?);
        listeners.push((name, mqtt, ingest));
        procs.push(spawn(
            name,
            &["agent", "run", "--data-dir", &d, "--stop-workloads-on-exit"],
            &[
                ("OUTPOST_MQTT_LISTEN", format!("127.0.0.1:{mqtt}")),
                ("OUTPOST_INGEST_LISTEN", format!("127.0.0.1:{ingest}")),
            ],
            &base.join(format!("{name}.log")),
        )?);
    }
    eprintln!(
        "joined three agents: {}",
        boxes.iter().map(|b| b.0).collect::<Vec<_>>().join(", ")
    );
    wait_for("three agents online", Duration::from_secs(30), async || {
        let nodes: Vec<outpost_api::NodeInfo> = c.get("/v1/nodes").await.ok()?;
        (nodes.iter().filter(|n| n.status == "Online").count() == 3).then_some(())
    })
    .await?;

    let app = base.join("demo-app.yaml");
    std::fs::write(&app, SAMPLE_APP)?;
    let r: outpost_api::ApplyResponse = c
        .post(
            "/v1/apply",
            &outpost_api::ApplyRequest {
                files: vec![ManifestFile {
                    name: app.display().to_string(),
                    content: SAMPLE_APP.into(),
                }],
            },
        )
        .await?;
    for res in &r.results {
        eprintln!("applied {} ({})", res.object, res.action);
    }
    let ws = wait_for(
        "the sample app to run (3 edge-monitor, 2 greeter)",
        Duration::from_secs(30),
        async || {
            let ws: Vec<WorkloadInfo> = c.get("/v1/workloads").await.ok()?;
            let running = ws
                .iter()
                .flat_map(|w| &w.placements)
                .filter(|p| p.status.as_ref().is_some_and(|s| s.phase == Phase::Running))
                .count();
            (running == 5).then_some(ws)
        },
    )
    .await?;

    println!("\nWhat runs where:\n");
    print!(
        "{}",
        output::table(output::PLACEMENT_HEADERS, &output::placement_rows(&ws))
    );

    let (box1, box1_mqtt, box1_ingest) = listeners[0];
    pipeline_tour(&c, box1, box1_ingest).await?;
    rollout_tour(&c).await?;
    exec_tour(&c, &ws).await?;
    let password = dashboard_account(&c).await?;
    let hub_pid = procs[0].child.id();
    let some_pid = ws
        .iter()
        .find(|w| w.name == "greeter")
        .and_then(|w| w.placements.first())
        .and_then(|p| p.status.as_ref())
        .and_then(|s| s.containers.first())
        .and_then(|c| c.pid);
    println!(
        "\nProcesses: hub pid {hub_pid}; agents {}",
        procs[1..]
            .iter()
            .map(|p| format!("{} pid {}", p.name, p.child.id()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "Data and logs: {}   (workload output: <box>/workloads/*/*.log)",
        base.display()
    );
    println!("\nDashboard: {url}/  (log in as `demo`, password `{password}`, an operator; accept the demo CA)");
    println!("\nTry, in another terminal:");
    println!("  outpost get nodes");
    println!("  outpost get workloads");
    if let Some(pid) = some_pid {
        println!("  kill {pid}                      # a greeter process dies; its agent restarts it");
    }
    println!("  kill {hub_pid}                      # stop the hub: every workload keeps running");
    println!("  outpost describe deployment greeter");
    println!("  outpost rollout history daemonset edge-monitor");
    println!("  mosquitto_pub -p {box1_mqtt} -t sensors/s2/temp -m '{{\"sensor\": \"s2\", \"temp\": 91}}'");
    println!("  outpost data query readings          # the hot reading above, from {box1}");
    println!("  outpost exec {box1} edge-monitor -it -- /bin/sh   # a shell in a workload, over the box's own link");
    println!("  outpost audit                        # who changed what, and every exec");
    println!("\nPress Ctrl-C to stop the demo.");

    let stop = async {
        match seconds {
            Some(s) => tokio::time::sleep(Duration::from_secs(s)).await,
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    };
    tokio::pin!(stop);
    let mut hub_reported = false;
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if !hub_reported && procs[0].child.try_wait().ok().flatten().is_some() {
                    hub_reported = true;
                    println!("\nThe hub stopped. The agents keep every workload running from their local state;");
                    println!("check with `ps -ef | grep greeter`. Start the hub again with:");
                    println!("  outpost {}", hub_args.join(" "));
                }
            }
        }
    }
    Ok(())
}

/// The data pipeline: 25 readings posted to a box's HTTP ingest; the hub receives only the two
/// hot ones and one summary per 10 readings.
async fn pipeline_tour(c: &Client, node: &str, ingest: u16) -> Result<()> {
    let http = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{ingest}/v1/streams/readings");
    let temps: Vec<f64> = (0..25)
        .map(|i| {
            if i == 7 || i == 19 {
                85.5
            } else {
                20.0 + f64::from(i % 5)
            }
        })
        .collect();
    let mut sent = 0;
    for (i, t) in temps.iter().enumerate() {
        let body = serde_json::json!({"sensor": "s1", "temp": t}).to_string();
        sent += body.len();
        // The first post waits for the Pipeline to reach the box (404 until it has the stream).
        let wait = if i == 0 {
            Duration::from_secs(30)
        } else {
            Duration::from_secs(5)
        };
        wait_for(&format!("{node}'s ingest to take a reading"), wait, async || {
            let r = http
                .post(&url)
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            r.ok().filter(|r| r.status().is_success()).map(|_| ())
        })
        .await?;
    }
    let recs = wait_for(
        "the hub to receive the readings' results",
        Duration::from_secs(30),
        async || {
            let recs: Vec<StoredRecord> = c
                .get_query(
                    "/v1/data",
                    &[("stream", "readings".to_string()), ("limit", "100".to_string())],
                )
                .await
                .ok()?;
            let n = |k: RecordKind| recs.iter().filter(|r| r.record.kind == k).count();
            (n(RecordKind::Anomaly) == 2 && n(RecordKind::Aggregate) == 2).then_some(recs)
        },
    )
    .await?;
    let upstream: usize = recs.iter().map(|r| r.record.data.to_string().len()).sum();
    println!(
        "\nData pipeline: 25 readings ({sent} bytes) posted to {node}; the hub received {} records \
         ({upstream} bytes of data): the 2 hot readings as they came and 2 summaries of 10.",
        recs.len()
    );
    Ok(())
}

/// Run a command in a greeter replica through the hub and its box's own link (docs/exec.md).
async fn exec_tour(c: &Client, ws: &[WorkloadInfo]) -> Result<()> {
    let Some(node) = ws
        .iter()
        .find(|w| w.name == "greeter")
        .and_then(|w| w.placements.first())
        .map(|p| p.node.clone())
    else {
        return Ok(());
    };
    println!("\nRemote exec: `outpost exec {node} greeter -- sh -c 'echo hello from $OUTPOST_NODE'` prints:");
    let code = crate::exec::once(c, &node, "greeter", &["/bin/sh", "-c", "echo hello from $OUTPOST_NODE"]).await?;
    if code != 0 {
        bail!("the demo's exec ended with code {code}");
    }
    Ok(())
}

/// An operator account with a password for the dashboard (docs/dashboard.md); its password.
async fn dashboard_account(c: &Client) -> Result<String> {
    let mut bytes = [0u8; 9];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    let password = hex::encode(bytes);
    let _: serde_json::Value = c
        .post(
            "/v1/users",
            &outpost_api::accounts::UserRequest {
                name: "demo".into(),
                role: "operator".into(),
                selector: None,
                expires_secs: None,
                password: Some(password.clone()),
            },
        )
        .await?;
    Ok(password)
}

/// A new edge-monitor revision, rolled out under the demo's RolloutPolicy: the canary box first,
/// a bake, then the others. Prints the rollout's events as they happen.
async fn rollout_tour(c: &Client) -> Result<()> {
    let v2 = SAMPLE_APP.replace("load $(cut", "v2 load $(cut");
    let _: outpost_api::ApplyResponse = c
        .post(
            "/v1/apply",
            &outpost_api::ApplyRequest {
                files: vec![ManifestFile {
                    name: "demo-app-v2.yaml".into(),
                    content: v2,
                }],
            },
        )
        .await?;
    println!("\nRolling out edge-monitor revision 2 (policy `demo`: one canary box, then the rest):");
    let mut shown = 0;
    let end = Instant::now() + Duration::from_secs(90);
    loop {
        let r: Option<RolloutInfo> = c.get("/v1/objects/daemonset/default/edge-monitor/rollout").await.ok();
        if let Some(r) = r.filter(|r| r.revision >= 2) {
            for e in r.events.iter().skip(shown) {
                println!("  {:<18} {}", e.reason, e.message);
            }
            shown = shown.max(r.events.len());
            match r.phase {
                RolloutPhase::Complete => return Ok(()),
                RolloutPhase::Progressing | RolloutPhase::Paused => {}
                other => bail!("the demo rollout ended {other:?}: {}", r.reason.unwrap_or_default()),
            }
        }
        if Instant::now() > end {
            bail!("timed out after 90 s waiting for the demo rollout to complete");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
