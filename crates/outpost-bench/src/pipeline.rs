//! Edge data pipeline benchmarks (BENCHMARKS.md):
//! - `mqtt`: MQTT ingest rate into the agent's pipeline at QoS 0 and 1, against Debian's
//!   mosquitto measured in the same run with the same publisher (a minimal MQTT 3.1.1 client in
//!   this module, pre-encoded packets, several connections). mosquitto's end is a subscriber
//!   that received every message; the agent's end is its pipeline counter (every record through
//!   the rules and, for the stateful stream used, fsynced into the spool). Also the agent's RSS
//!   idle with the pipeline and listeners on, and its peak under load.
//! - `reduction`: a replayed sensor stream with known anomalies posted to the agent's HTTP
//!   ingest; bytes sent upstream (TLS bytes through a counting proxy between agent and hub)
//!   against the raw bytes, every anomaly checked at the hub; spool bytes per record; bytes on
//!   the wire per 1,000 records forwarded as they are.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::bandwidth::CountingProxy;
use crate::harness::{free_port, outpost_bin, wait_for, HubProc};
use crate::stats::bytes;
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct MqttArgs {
    /// Messages per run (each of QoS 0 and QoS 1, each broker).
    #[arg(long, default_value_t = 200_000)]
    pub messages: u64,
    /// Publisher connections.
    #[arg(long, default_value_t = 4)]
    pub publishers: u64,
    /// QoS 1 messages in flight per connection.
    #[arg(long, default_value_t = 256)]
    pub inflight: usize,
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    pub mosquitto: std::path::PathBuf,
}

#[derive(clap::Args, Clone, Debug)]
pub struct ReductionArgs {
    /// Sensor readings replayed.
    #[arg(long, default_value_t = 500_000)]
    pub records: u64,
    /// Distinct sensors.
    #[arg(long, default_value_t = 50)]
    pub sensors: u64,
    /// One reading in this many is an anomaly (a spike above the threshold).
    #[arg(long, default_value_t = 5_000)]
    pub anomaly_every: u64,
    /// Records forwarded as they are, to measure bytes on the wire per 1,000 records.
    #[arg(long, default_value_t = 50_000)]
    pub passthrough: u64,
}

/// An agent started with pipeline settings in its environment.
struct Agent {
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl Agent {
    fn start(dir: &Path, hub: Option<&str>, env: &[(&str, String)]) -> Result<Agent> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))?;
        let _ = std::fs::remove_file(dir.join("pipeline/listen.json"));
        let mut c = Command::new(outpost_bin()?);
        c.args(["agent", "run", "--stop-workloads-on-exit", "--data-dir"])
            .arg(dir);
        if let Some(h) = hub {
            c.args(["--hub", h]);
        }
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .env("OUTPOST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start `outpost agent run`")?;
        Ok(Agent {
            dir: dir.to_path_buf(),
            child: Some(child),
        })
    }
    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }
    async fn listen(&self) -> Result<(String, String)> {
        let p = self.dir.join("pipeline/listen.json");
        wait_for(
            "agent listeners",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || {
                let m: serde_json::Map<String, Value> =
                    serde_json::from_str(&std::fs::read_to_string(&p).ok()?).ok()?;
                let mqtt = m.get("mqtt").and_then(Value::as_str).unwrap_or_default().to_string();
                Some((mqtt, m.get("ingest")?.as_str()?.to_string()))
            },
        )
        .await
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

struct Proc(Child);
impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One HTTP/1.1 request with a fresh connection: (status, body).
async fn http(addr: &str, method: &str, path: &str, body: &[u8]) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(addr).await?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((
        status,
        out.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default(),
    ))
}

async fn stream_stats(ingest: &str, stream: &str) -> Option<Value> {
    let (_, body) = http(ingest, "GET", "/v1/stats", b"").await.ok()?;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["streams"].as_array()?.iter().find(|s| s["stream"] == stream).cloned()
}

fn remaining(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

fn connect_packet(id: &str) -> Vec<u8> {
    let mut vh = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60];
    vh.extend_from_slice(&(id.len() as u16).to_be_bytes());
    vh.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10];
    remaining(vh.len(), &mut p);
    p.extend(vh);
    p
}

fn publish_packet(topic: &str, payload: &[u8], qos: u8, pkid: u16, out: &mut Vec<u8>) {
    let mut len = 2 + topic.len() + payload.len();
    if qos > 0 {
        len += 2;
    }
    out.push(0x30 | (qos << 1));
    remaining(len, out);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        out.extend_from_slice(&pkid.to_be_bytes());
    }
    out.extend_from_slice(payload);
}

async fn mqtt_connect(addr: &str, id: &str) -> Result<TcpStream> {
    let mut s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    s.write_all(&connect_packet(id)).await?;
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await?;
    if ack[0] != 0x20 || ack[3] != 0 {
        bail!("CONNACK refused: {ack:?}");
    }
    Ok(s)
}

/// Publish `n` messages on one connection; at QoS 1 with `inflight` unacknowledged at most.
async fn publisher(addr: String, id: String, n: u64, qos: u8, inflight: usize, sent: Arc<AtomicU64>) -> Result<()> {
    let s = mqtt_connect(&addr, &id).await?;
    let (mut rd, mut wr) = s.into_split();
    let acked = Arc::new(AtomicU64::new(0));
    let reader = if qos > 0 {
        let acked = acked.clone();
        Some(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            let mut carry = 0usize;
            loop {
                let k = match rd.read(&mut buf[carry..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(k) => k,
                };
                let total = carry + k;
                let whole = total / 4 * 4;
                acked.fetch_add((whole / 4) as u64, Ordering::Relaxed);
                buf.copy_within(whole..total, 0);
                carry = total - whole;
                if acked.load(Ordering::Relaxed) >= n {
                    return;
                }
            }
        }))
    } else {
        None
    };
    let mut batch = Vec::with_capacity(64 << 10);
    let mut i = 0u64;
    while i < n {
        batch.clear();
        while i < n && batch.len() < 32 << 10 {
            if qos > 0 {
                while i - acked.load(Ordering::Relaxed) >= inflight as u64 {
                    if !batch.is_empty() {
                        wr.write_all(&batch).await?;
                        batch.clear();
                    }
                    tokio::task::yield_now().await;
                }
            }
            let payload = format!("{{\"sensor\":\"s{}\",\"v\":{}.5,\"seq\":{i}}}", i % 50, 20 + i % 7);
            let pkid = (i % 65_000 + 1) as u16;
            publish_packet(&format!("bench/{id}"), payload.as_bytes(), qos, pkid, &mut batch);
            i += 1;
        }
        wr.write_all(&batch).await?;
        sent.fetch_add(batch.len() as u64, Ordering::Relaxed);
    }
    if let Some(r) = reader {
        let _ = tokio::time::timeout(Duration::from_secs(120), r).await;
    }
    // Keep the connection until the end is measured elsewhere.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(())
}

/// A subscriber that counts messages (for mosquitto's side).
async fn subscriber(addr: &str, count: Arc<AtomicU64>) -> Result<tokio::task::JoinHandle<()>> {
    let mut s = mqtt_connect(addr, "bench-sub").await?;
    // SUBSCRIBE bench/# at QoS 1 (QoS 1 publications are delivered at QoS 1 and acknowledged).
    let topic = b"bench/#";
    let mut p = vec![0x82];
    remaining(2 + 2 + topic.len() + 1, &mut p);
    p.extend_from_slice(&1u16.to_be_bytes());
    p.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    p.extend_from_slice(topic);
    p.push(1);
    s.write_all(&p).await?;
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).await?;
    Ok(tokio::spawn(async move {
        let (mut rd, mut wr) = s.into_split();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        let mut chunk = vec![0u8; 256 << 10];
        loop {
            let k = match rd.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(k) => k,
            };
            buf.extend_from_slice(&chunk[..k]);
            let mut pos = 0;
            let mut acks = Vec::new();
            loop {
                if pos + 2 > buf.len() {
                    break;
                }
                let (mut len, mut mul, mut j) = (0usize, 1usize, pos + 1);
                let mut complete = false;
                while j < buf.len() {
                    let b = buf[j];
                    len += (b & 0x7f) as usize * mul;
                    mul *= 128;
                    j += 1;
                    if b & 0x80 == 0 {
                        complete = true;
                        break;
                    }
                }
                if !complete || j + len > buf.len() {
                    break;
                }
                let h = buf[pos];
                if h >> 4 == 3 {
                    count.fetch_add(1, Ordering::Relaxed);
                    if (h >> 1) & 3 == 1 {
                        let tl = u16::from_be_bytes([buf[j], buf[j + 1]]) as usize;
                        let pk = [buf[j + 2 + tl], buf[j + 3 + tl]];
                        acks.extend_from_slice(&[0x40, 2, pk[0], pk[1]]);
                    }
                }
                pos = j + len;
            }
            buf.drain(..pos);
            if !acks.is_empty() && wr.write_all(&acks).await.is_err() {
                return;
            }
        }
    }))
}

/// One run: publish `n` messages at `qos` to `addr`; `done` says how many arrived at the end.
async fn run_once(
    addr: &str,
    a: &MqttArgs,
    qos: u8,
    done: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = u64> + Send>>,
    tag: &str,
) -> Result<(f64, u64, f64)> {
    let start_count = done().await;
    let t0 = Instant::now();
    let sent = Arc::new(AtomicU64::new(0));
    let per = a.messages / a.publishers;
    let mut tasks = Vec::new();
    for p in 0..a.publishers {
        tasks.push(tokio::spawn(publisher(
            addr.to_string(),
            format!("{tag}-{qos}-{p}"),
            per,
            qos,
            a.inflight,
            sent.clone(),
        )));
    }
    let want = per * a.publishers;
    let (mut last_c, mut last_at, mut last_change) = (0u64, t0.elapsed(), Instant::now());
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let c = done().await.saturating_sub(start_count);
        if c != last_c {
            (last_c, last_at, last_change) = (c, t0.elapsed(), Instant::now());
        }
        // Done, or stalled for 3 s (the rest was dropped, QoS 0), or out of time.
        if c >= want || Instant::now() > deadline || (c > 0 && last_change.elapsed() > Duration::from_secs(3)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    for t in tasks {
        let _ = t.await;
    }
    let got = last_c;
    let secs = last_at.as_secs_f64().max(1e-6);
    Ok((got as f64 / secs, got, publish_secs))
}

pub async fn mqtt(a: MqttArgs, work: &Path) -> Result<String> {
    let hub = HubProc::start(work).await?;
    let token = hub.join_token(1).await?;
    let joined = hub.join("bench-mqtt", &token).await?;
    let dir = joined.dir.clone();
    drop(joined);
    let (mport, iport) = (free_port()?, free_port()?);
    let agent = Agent::start(
        &dir,
        None,
        &[
            ("OUTPOST_MQTT_LISTEN", format!("127.0.0.1:{mport}")),
            ("OUTPOST_INGEST_LISTEN", format!("127.0.0.1:{iport}")),
        ],
    )?;
    let (maddr, ingest) = agent.listen().await?;
    if maddr.is_empty() {
        bail!(
            "the agent's MQTT broker did not start; see {}",
            dir.join("agent.log").display()
        );
    }
    hub.apply(
        "apiVersion: outpost.dev/v1
kind: Pipeline
metadata: {name: bench}
spec:
  streams:
  - name: bench
    mqtt: ['bench/#']
    key: sensor
    anomalies:
    - {name: hot, field: v, above: 1000}
    aggregate: {every: 10s, fields: [v]}
    sinks: [hub]
  sinks:
  - {name: hub, type: hub}
",
    )
    .await?;
    wait_for(
        "pipeline stream running",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || std::fs::read_dir(dir.join("spool")).ok()?.next().map(|_| ()),
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss = crate::procfs::rss_bytes(agent.pid()).unwrap_or(0);

    let mport2 = free_port()?;
    let mosq = if a.mosquitto.exists() {
        let conf = work.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {mport2} 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 0\n"
            ),
        )?;
        let log = std::fs::File::create(work.join("mosquitto.log"))?;
        let c = Command::new(&a.mosquitto)
            .arg("-c")
            .arg(&conf)
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start mosquitto")?;
        let p = Proc(c);
        wait_for("mosquitto", Duration::from_secs(10), Duration::from_millis(50), || {
            std::net::TcpStream::connect(("127.0.0.1", mport2)).ok().map(|_| ())
        })
        .await?;
        Some(p)
    } else {
        eprintln!("{} not found: measuring outpost alone", a.mosquitto.display());
        None
    };
    let mosq_version = Command::new(&a.mosquitto)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().next().map(str::to_string))
        .unwrap_or_default();

    let mut rows = Vec::new();
    let mut peak_rss = idle_rss;
    for qos in [0u8, 1] {
        eprintln!("mqtt: outpost QoS {qos}, {} messages", a.messages);
        let ing = ingest.clone();
        let pid = agent.pid();
        let peak = Arc::new(AtomicU64::new(0));
        let pk = peak.clone();
        let (rate, got, _) = run_once(
            &maddr,
            &a,
            qos,
            move || {
                let ing = ing.clone();
                let pk = pk.clone();
                Box::pin(async move {
                    pk.fetch_max(crate::procfs::rss_bytes(pid).unwrap_or(0), Ordering::Relaxed);
                    stream_stats(&ing, "bench")
                        .await
                        .and_then(|s| s["received"].as_u64())
                        .unwrap_or(0)
                })
            },
            "op",
        )
        .await?;
        peak_rss = peak_rss.max(peak.load(Ordering::Relaxed));
        rows.push(vec![
            "outpost agent (into the pipeline: rules + spool fsync)".to_string(),
            qos.to_string(),
            format!("{got} / {}", a.messages),
            format!("{:.0}", rate),
        ]);
        if mosq.is_some() {
            eprintln!("mqtt: mosquitto QoS {qos}");
            let count = Arc::new(AtomicU64::new(0));
            let sub = subscriber(&format!("127.0.0.1:{mport2}"), count.clone()).await?;
            let c2 = count.clone();
            let (rate, got, _) = run_once(
                &format!("127.0.0.1:{mport2}"),
                &a,
                qos,
                move || {
                    let c = c2.clone();
                    Box::pin(async move { c.load(Ordering::Relaxed) })
                },
                "mq",
            )
            .await?;
            sub.abort();
            rows.push(vec![
                format!("mosquitto ({mosq_version}), to one subscriber"),
                qos.to_string(),
                format!("{got} / {}", a.messages),
                format!("{:.0}", rate),
            ]);
        }
    }
    let st = stream_stats(&ingest, "bench").await.unwrap_or_default();
    let mut out = String::new();
    out.push_str(&format!(
        "MQTT ingest, {} messages per run (~45-byte JSON), {} publisher connections, QoS 1 with {} in flight per connection; same publisher for both brokers\n\n",
        a.messages, a.publishers, a.inflight
    ));
    out.push_str(&table(&["broker", "QoS", "received", "msg/s"], &rows));
    out.push('\n');
    out.push_str(&table(
        &["agent RSS", "value"],
        &[
            vec![
                "idle, pipeline and MQTT/HTTP listeners on".into(),
                bytes(idle_rss as f64),
            ],
            vec!["peak during the runs".into(), bytes(peak_rss as f64)],
            vec![
                "spool bytes written per record (stateful stream: raw records kept until a checkpoint)".into(),
                format!(
                    "{:.1}",
                    st["written_bytes"].as_f64().unwrap_or(0.0) / st["received"].as_f64().unwrap_or(1.0).max(1.0)
                ),
            ],
        ],
    ));
    drop(agent);
    drop(mosq);
    Ok(out)
}

pub async fn reduction(a: ReductionArgs, work: &Path) -> Result<String> {
    let hub = HubProc::start(work).await?;
    let token = hub.join_token(1).await?;
    let joined = hub.join("bench-reduction", &token).await?;
    let dir = joined.dir.clone();
    drop(joined);
    let proxy = CountingProxy::start(format!("127.0.0.1:{}", hub.port).parse()?).await?;
    let via = format!("https://127.0.0.1:{}", proxy.port);
    let iport = free_port()?;
    let agent = Agent::start(
        &dir,
        Some(&via),
        &[
            ("OUTPOST_MQTT_LISTEN", "off".to_string()),
            ("OUTPOST_INGEST_LISTEN", format!("127.0.0.1:{iport}")),
        ],
    )?;
    let (_, ingest) = agent.listen().await?;
    hub.apply(
        "apiVersion: outpost.dev/v1
kind: Pipeline
metadata: {name: reduce}
spec:
  streams:
  - name: sensors
    key: sensor
    anomalies:
    - {name: spike, field: v, above: 80}
    aggregate: {count: 1000, fields: [v]}
    sinks: [hub]
  - name: passthrough
    sinks: [hub]
  sinks:
  - {name: hub, type: hub}
",
    )
    .await?;
    wait_for(
        "streams running",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            std::fs::read_dir(dir.join("spool"))
                .ok()
                .map(|d| d.count())
                .filter(|n| *n >= 2)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The replayed stream: each sensor drifts around 20-25; one reading in `anomaly_every` is a
    // spike to 90+. Sent in NDJSON bodies of 1,000.
    let mut raw_bytes = 0u64;
    let mut anomalies = BTreeSet::new();
    let before = proxy.counters.snapshot();
    let t0 = Instant::now();
    let mut body = Vec::with_capacity(64 << 10);
    for i in 0..a.records {
        let spike = i % a.anomaly_every == a.anomaly_every / 2;
        let v = if spike {
            anomalies.insert(i);
            90.0 + (i % 10) as f64
        } else {
            20.0 + ((i * 7919) % 500) as f64 / 100.0
        };
        let line = json!({"sensor": format!("s{}", i % a.sensors), "seq": i, "v": v}).to_string();
        raw_bytes += line.len() as u64;
        body.extend_from_slice(line.as_bytes());
        body.push(b'\n');
        if (i + 1) % 1000 == 0 || i + 1 == a.records {
            let (code, resp) = http(&ingest, "POST", "/v1/streams/sensors", &body).await?;
            if code != 200 {
                bail!("ingest answered {code}: {resp}");
            }
            body.clear();
        }
    }
    let replay_secs = t0.elapsed().as_secs_f64();
    let delivered = |ing: String| async move {
        let s = stream_stats(&ing, "sensors").await?;
        (s["sinks"]["hub"]["acked"] == s["committed"]).then_some(s)
    };
    let mut st = None;
    for _ in 0..600 {
        if let Some(s) = delivered(ingest.clone()).await {
            st = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = st.context("the hub did not get everything within 2 min")?;
    let after = proxy.counters.snapshot();
    let up = after[0] - before[0];
    let down = after[1] - before[1];
    // Every anomaly, exactly: read them back from the hub.
    let got = hub
        .try_cli(&[
            "data", "query", "sensors", "--kind", "anomaly", "-n", "10000", "-o", "json",
        ])
        .await?;
    let at_hub: Vec<u64> = got
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|r| r["data"]["seq"].as_u64())
        .collect();
    let exact = at_hub.iter().copied().collect::<BTreeSet<_>>() == anomalies && at_hub.len() == anomalies.len();
    let aggs = hub
        .try_cli(&[
            "data",
            "query",
            "sensors",
            "--kind",
            "aggregate",
            "-n",
            "10000",
            "-o",
            "json",
        ])
        .await?
        .lines()
        .count();

    // Bytes on the wire per 1,000 records forwarded as they are.
    let before2 = proxy.counters.snapshot();
    let mut pbody = Vec::new();
    let mut praw = 0u64;
    for i in 0..a.passthrough {
        let line = json!({"sensor": format!("s{}", i % a.sensors), "seq": i, "v": 20.5}).to_string();
        praw += line.len() as u64;
        pbody.extend_from_slice(line.as_bytes());
        pbody.push(b'\n');
        if (i + 1) % 1000 == 0 || i + 1 == a.passthrough {
            http(&ingest, "POST", "/v1/streams/passthrough", &pbody).await?;
            pbody.clear();
        }
    }
    let mut pst = Value::Null;
    for _ in 0..600 {
        if let Some(s) = stream_stats(&ingest, "passthrough").await {
            if s["sinks"]["hub"]["acked"] == s["committed"] && s["received"].as_u64() == Some(a.passthrough) {
                pst = s;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let after2 = proxy.counters.snapshot();
    let pup = after2[0] - before2[0];

    let rows = vec![
        vec!["readings replayed".into(), a.records.to_string()],
        vec!["raw bytes (JSON lines)".into(), bytes(raw_bytes as f64)],
        vec![
            "replay time".into(),
            format!(
                "{replay_secs:.1} s ({:.0} records/s over HTTP)",
                a.records as f64 / replay_secs
            ),
        ],
        vec![
            "anomalies injected / at the hub".into(),
            format!(
                "{} / {} ({})",
                anomalies.len(),
                at_hub.len(),
                if exact { "every one, exactly" } else { "MISMATCH" }
            ),
        ],
        vec!["aggregate records at the hub".into(), aggs.to_string()],
        vec![
            "bytes sent upstream (agent -> hub, TLS, whole window)".into(),
            format!(
                "{} ({:.3} % of raw)",
                bytes(up as f64),
                up as f64 * 100.0 / raw_bytes as f64
            ),
        ],
        vec!["bytes hub -> agent in the window".into(), bytes(down as f64)],
        vec![
            "spool bytes written per reading".into(),
            format!("{:.1}", st["written_bytes"].as_f64().unwrap_or(0.0) / a.records as f64),
        ],
        vec![
            format!(
                "pass-through: {} records ({}) forwarded as they are",
                a.passthrough,
                bytes(praw as f64)
            ),
            format!(
                "{} upstream = {} per 1,000 records",
                bytes(pup as f64),
                bytes(pup as f64 * 1000.0 / a.passthrough as f64)
            ),
        ],
        vec![
            "pass-through spool bytes written per record".into(),
            format!(
                "{:.1}",
                pst["written_bytes"].as_f64().unwrap_or(0.0) / a.passthrough as f64
            ),
        ],
    ];
    let mut out = format!(
        "Telemetry reduction: {} sensors, a spike above 80 in one reading of {}, rules = threshold anomaly + count windows of 1,000 per sensor (count, min, max, mean, p95), hub sink (zstd batches)\n\n",
        a.sensors, a.anomaly_every
    );
    out.push_str(&table(&["measure", "value"], &rows));
    drop(agent);
    Ok(out)
}
