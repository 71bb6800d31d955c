//! Bandwidth: bytes between one real agent and the hub, through a counting TCP proxy (agent ->
//! proxy -> hub; TLS passes through untouched and verifies because the hub certificate covers
//! 127.0.0.1). Counts TLS bytes, i.e. TCP payload; IP/TCP headers are estimated separately.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{self, count_sleepers, HubProc};
use crate::stats::bytes;
use crate::table;

#[derive(clap::Args, Clone, Debug)]
pub struct BandwidthArgs {
    /// Seconds to let the agent connect, sync and report before counting.
    #[arg(long, default_value_t = 40)]
    pub warmup_secs: u64,
    /// Length of the counting window, seconds (the long-poll is 30 s, the heartbeat 60 s).
    #[arg(long, default_value_t = 300)]
    pub secs: u64,
    /// Process workloads running (healthy) on the node.
    #[arg(long, default_value_t = 10)]
    pub workloads: usize,
    /// Run the agent in a network namespace of its own (root and `ip` needed) and count every
    /// packet at its veth: IP and TCP headers, ACKs, keepalives and TLS records, instead of the
    /// TLS payload a proxy sees.
    #[arg(long)]
    pub netns: bool,
}

/// A network namespace joined to the root one by a veth pair: the agent's side has
/// 10.213.0.2/30, the root side 10.213.0.1/30, whose interface counters see every packet.
struct Veth {
    ns: String,
    host_if: String,
}

const HOST_IP: [u8; 4] = [10, 213, 0, 1];

fn ip(args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("ip").args(args).output()?;
    anyhow::ensure!(
        o.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(())
}

impl Veth {
    fn create() -> Result<Veth> {
        let id = std::process::id();
        let v = Veth {
            ns: format!("obw-{id}"),
            host_if: format!("obwh{id}"),
        };
        let peer = format!("obwn{id}");
        ip(&["netns", "add", &v.ns])?;
        ip(&["link", "add", &v.host_if, "type", "veth", "peer", "name", &peer])?;
        ip(&["link", "set", &peer, "netns", &v.ns])?;
        ip(&["addr", "add", "10.213.0.1/30", "dev", &v.host_if])?;
        ip(&["link", "set", &v.host_if, "up"])?;
        // Count the TCP packets between agent and hub at the IP layer (headers, ACKs, keepalive
        // probes, TLS records), apart from the test link's own ARP and IPv6 neighbour traffic,
        // which a WAN link does not carry to the hub.
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            iptables(&[
                "-I",
                chain,
                dir,
                &v.host_if,
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                &v.ns,
            ])?;
        }
        for args in [
            vec!["addr", "add", "10.213.0.2/30", "dev", peer.as_str()],
            vec!["link", "set", peer.as_str(), "up"],
            vec!["link", "set", "lo", "up"],
        ] {
            let mut a = vec!["netns", "exec", v.ns.as_str(), "ip"];
            a.extend(args);
            ip(&a)?;
        }
        Ok(v)
    }

    /// [bytes from the agent, packets from it, bytes to it, packets to it], as the root side's
    /// interface counts them (Ethernet frames).
    fn counters(&self) -> Result<[u64; 4]> {
        let read = |f: &str| -> Result<u64> {
            let p = format!("/sys/class/net/{}/statistics/{f}", self.host_if);
            Ok(std::fs::read_to_string(&p)?.trim().parse()?)
        };
        Ok([
            read("rx_bytes")?,
            read("rx_packets")?,
            read("tx_bytes")?,
            read("tx_packets")?,
        ])
    }

    /// [bytes from the agent, packets from it, bytes to it, packets to it] of TCP between agent
    /// and hub, IP headers included, as the root namespace's firewall counts them.
    fn tcp_counters(&self) -> Result<[u64; 4]> {
        let mut out = [0u64; 4];
        for (i, chain) in ["INPUT", "OUTPUT"].into_iter().enumerate() {
            let o = std::process::Command::new("iptables")
                .args(["-w", "-n", "-v", "-x", "-L", chain])
                .output()?;
            anyhow::ensure!(
                o.status.success(),
                "iptables -L {chain}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            let text = String::from_utf8_lossy(&o.stdout);
            let tag = format!("/* {} */", self.ns);
            let line = text
                .lines()
                .find(|l| l.contains(&tag))
                .ok_or_else(|| anyhow::anyhow!("iptables {chain}: the counting rule {tag} is gone"))?;
            let mut f = line.split_whitespace();
            let pkts: u64 = f.next().unwrap_or("").parse()?;
            let bytes: u64 = f.next().unwrap_or("").parse()?;
            out[i * 2] = bytes;
            out[i * 2 + 1] = pkts;
        }
        Ok(out)
    }
}

fn iptables(args: &[&str]) -> Result<()> {
    let o = std::process::Command::new("iptables").arg("-w").args(args).output()?;
    anyhow::ensure!(
        o.status.success(),
        "iptables {}: {} (the bench needs root and iptables)",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr).trim()
    );
    Ok(())
}

impl Drop for Veth {
    fn drop(&mut self) {
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let _ = iptables(&[
                "-D",
                chain,
                dir,
                &self.host_if,
                "-p",
                "tcp",
                "-m",
                "comment",
                "--comment",
                &self.ns,
            ]);
        }
        // deleting the namespace deletes its end of the pair, and so the pair
        let _ = ip(&["netns", "del", &self.ns]);
        let _ = ip(&["link", "del", &self.host_if]);
    }
}

/// Byte and segment counters of a [`CountingProxy`].
#[derive(Default, Debug)]
pub struct Counters {
    /// agent -> hub payload bytes
    pub up: AtomicU64,
    /// hub -> agent payload bytes
    pub down: AtomicU64,
    /// read() chunks each way: a lower bound on data segments
    pub up_chunks: AtomicU64,
    pub down_chunks: AtomicU64,
    pub connections: AtomicU64,
}

impl Counters {
    pub fn snapshot(&self) -> [u64; 5] {
        [
            self.up.load(Ordering::Relaxed),
            self.down.load(Ordering::Relaxed),
            self.up_chunks.load(Ordering::Relaxed),
            self.down_chunks.load(Ordering::Relaxed),
            self.connections.load(Ordering::Relaxed),
        ]
    }
}

/// A TCP proxy on 127.0.0.1 that forwards every connection to `target` and counts bytes.
pub struct CountingProxy {
    pub port: u16,
    pub counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: &AtomicU64,
    chunks: &AtomicU64,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                n.fetch_add(k as u64, Ordering::Relaxed);
                chunks.fetch_add(1, Ordering::Relaxed);
                if to.write_all(&buf[..k]).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown().await;
}

impl CountingProxy {
    pub async fn start(target: std::net::SocketAddr) -> Result<CountingProxy> {
        let l = TcpListener::bind("127.0.0.1:0").await?;
        let port = l.local_addr()?.port();
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = l.accept().await {
                let c = c.clone();
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(target).await else {
                        return;
                    };
                    c.connections.fetch_add(1, Ordering::Relaxed);
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(pump(cr, sw, &c.up, &c.up_chunks), pump(sr, cw, &c.down, &c.down_chunks));
                });
            }
        });
        Ok(CountingProxy { port, counters, task })
    }
}

/// Join an agent, give it `a.workloads` sleepers, start it (in `netns`, through `hub_url`) and
/// wait until they run and the warm-up has passed: from then on it is idle and healthy.
async fn idle_agent(
    hub: &HubProc,
    a: &BandwidthArgs,
    marker: u64,
    netns: Option<String>,
    hub_url: Option<&str>,
) -> Result<harness::AgentProc> {
    let token = hub.join_token(1).await?;
    let mut agent = hub.join("bandwidth-1", &token).await?;
    agent.netns = netns;
    let (yaml, args) = harness::sleepers(a.workloads, crate::marker_base() + marker);
    if a.workloads > 0 {
        hub.apply(&yaml).await?;
    }
    agent.start(hub_url)?;
    let n = a.workloads;
    harness::wait_for(
        "workloads running",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || (count_sleepers(&args) == n).then_some(()),
    )
    .await?;
    eprintln!("bandwidth: warm-up {} s, window {} s", a.warmup_secs, a.secs);
    tokio::time::sleep(Duration::from_secs(a.warmup_secs)).await;
    Ok(agent)
}

/// Bytes in a window scaled to an hour and a 30.4-day month.
pub fn per_hour_and_month(bytes_in_window: u64, secs: f64) -> (f64, f64) {
    let h = bytes_in_window as f64 * 3600.0 / secs;
    (h, h * 730.0)
}

pub async fn bandwidth(a: BandwidthArgs, work: &std::path::Path) -> Result<String> {
    if a.netns {
        return bandwidth_netns(a, work).await;
    }
    let hub = HubProc::start(work).await?;
    let proxy = CountingProxy::start(([127, 0, 0, 1], hub.port).into()).await?;
    let url = format!("https://127.0.0.1:{}", proxy.port);
    let agent = idle_agent(&hub, &a, 700, None, Some(&url)).await?;
    let n = a.workloads;
    let s0 = proxy.counters.snapshot();
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let s1 = proxy.counters.snapshot();
    drop(agent);
    let d: Vec<u64> = s0.iter().zip(s1.iter()).map(|(a, b)| b - a).collect();
    let secs = a.secs as f64;
    let (up_h, up_m) = per_hour_and_month(d[0], secs);
    let (down_h, down_m) = per_hour_and_month(d[1], secs);
    let (tot_h, tot_m) = per_hour_and_month(d[0] + d[1], secs);
    // IPv4 + TCP with timestamps = 52 B per packet; assume one ACK per data chunk
    let overhead = (d[2] + d[3]) * 2 * 52;
    let (wire_h, wire_m) = per_hour_and_month(d[0] + d[1] + overhead, secs);
    let rows = vec![
        vec!["agent -> hub".into(), bytes(d[0] as f64), bytes(up_h), bytes(up_m)],
        vec!["hub -> agent".into(), bytes(d[1] as f64), bytes(down_h), bytes(down_m)],
        vec![
            "both (TLS payload)".into(),
            bytes((d[0] + d[1]) as f64),
            bytes(tot_h),
            bytes(tot_m),
        ],
        vec![
            "both incl. est. IP/TCP headers + ACKs".into(),
            bytes((d[0] + d[1] + overhead) as f64),
            bytes(wire_h),
            bytes(wire_m),
        ],
    ];
    Ok(format!(
        "Bandwidth, one agent idle and healthy ({n} process workloads running), window {} s after {} s warm-up; \
         {} new TCP connections, {} data chunks up, {} down in the window\n\n{}",
        a.secs,
        a.warmup_secs,
        d[4],
        d[2],
        d[3],
        table(&["direction", "in window", "per hour", "per month (730 h)"], &rows)
    ))
}

/// The agent in its own network namespace, counted at the veth.
async fn bandwidth_netns(a: BandwidthArgs, work: &std::path::Path) -> Result<String> {
    let veth = Veth::create()?;
    let hub = HubProc::start_on(work, std::net::Ipv4Addr::from(HOST_IP).into()).await?;
    let agent = idle_agent(&hub, &a, 710, Some(veth.ns.clone()), None).await?;
    let n = a.workloads;
    let (c0, t0) = (veth.counters()?, veth.tcp_counters()?);
    tokio::time::sleep(Duration::from_secs(a.secs)).await;
    let (c1, t1) = (veth.counters()?, veth.tcp_counters()?);
    drop(agent);
    let d: Vec<u64> = c0.iter().zip(c1.iter()).map(|(a, b)| b - a).collect();
    let t: Vec<u64> = t0.iter().zip(t1.iter()).map(|(a, b)| b - a).collect();
    let secs = a.secs as f64;
    let (up, down) = (t[0], t[2]);
    let mb = |x: f64| format!("{:.2} MB", x / 1e6);
    let row = |what: &str, b: u64, pk: u64| {
        let (h, m) = per_hour_and_month(b, secs);
        vec![what.to_string(), bytes(b as f64), pk.to_string(), bytes(h), mb(m)]
    };
    let rows = vec![
        row("agent -> hub (TCP, IP bytes)", up, t[1]),
        row("hub -> agent (TCP, IP bytes)", down, t[3]),
        row("both (TCP, IP bytes)", up + down, t[1] + t[3]),
        row(
            "every frame at the interface (+ Ethernet headers, ARP, IPv6 ND of the test link)",
            d[0] + d[2],
            d[1] + d[3],
        ),
    ];
    Ok(format!(
        "Bandwidth at the interface, one agent in its own network namespace, idle and healthy ({n} process \
         workloads running), window {} s after {} s warm-up\n\n{}",
        a.secs,
        a.warmup_secs,
        table(
            &["direction", "in window", "packets", "per hour", "per month (730 h)"],
            &rows
        )
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_to_hour_and_month() {
        let (h, m) = per_hour_and_month(1000, 300.0);
        assert_eq!(h, 12_000.0);
        assert_eq!(m, 12_000.0 * 730.0);
    }
}
