//! `outpost bench failover`: site failover time after power cuts (issue 18, docs/site-ha.md),
//! measured from outside, beside keepalived's VRRP failover of a plain virtual IP in the same
//! namespaces.
//!
//! The site: `--boxes` network namespaces on one bridge (a veth each, the same interface name
//! `site0` in every box), the hub on the bridge in the root namespace, one agent per box joined
//! with its site address. The workload: a failover Deployment running `busybox httpd` on a
//! port, with a virtual IP on `site0`, warm (a copy runs on every box) or cold (only on the
//! active box).
//!
//! A power cut of the active box: every process of its namespace gets SIGKILL and its cable
//! leaves the switch (its bridge port goes down), at once; the clock starts there. A client in
//! the root namespace (a device on the site, beside the hub) connects to `vip:port` every 2 ms
//! (20 ms connect timeout); the failover time is the first accepted connection after the cut:
//! detection, the takeover, the gratuitous ARP and (cold) the start of the copy. Then the box
//! comes back (its address cleared, as a reboot would, its link up, its agent started) and
//! rejoins as a standby before the next cut, which hits the box now active.
//!
//! keepalived: the same boxes, the outpost agents stopped, one `keepalived` per box with a
//! VRRPv3 instance (advertisements every 50 ms, like outpost's heartbeats; `nopreempt`, so a
//! box coming back does not take the address back) holding another virtual IP, and `busybox
//! httpd` running on every box; the same cut and the same client.
//!
//! Needs root, iproute2, busybox and keepalived (scripts/test.sh installs keepalived).

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::harness::{outpost_bin, wait_for, HubProc};
use crate::stats::{ms, Summary};
use crate::table;

#[derive(clap::Args, Debug)]
pub struct FailoverArgs {
    /// Power cuts per mode (warm, cold, keepalived).
    #[arg(long, default_value_t = 30)]
    pub cuts: usize,
    /// Boxes on the site (3: a majority decides; 2: the hub is the witness).
    #[arg(long, default_value_t = 3)]
    pub boxes: usize,
    /// Which measurements to run, comma-separated: warm, cold, keepalived.
    #[arg(long, value_delimiter = ',', default_value = "warm,cold,keepalived")]
    pub modes: Vec<String>,
}

const IFACE: &str = "site0";

fn sh(args: &[&str]) -> Result<String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {args:?}"))?;
    if !o.status.success() {
        bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).into_owned())
}

struct Site {
    tag: String,
    k: u32,
    n: usize,
}

impl Site {
    fn new(n: usize) -> Result<Site> {
        let k = std::process::id() % 200 + 20;
        let s = Site {
            tag: format!("opbf{k}"),
            k,
            n,
        };
        s.clean();
        let br = s.bridge();
        sh(&["ip", "link", "add", &br, "type", "bridge"])?;
        sh(&["ip", "addr", "add", &format!("{}/24", s.hub_ip()), "dev", &br])?;
        sh(&["ip", "link", "set", &br, "up"])?;
        sh(&["iptables", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])?;
        for i in 0..n {
            let (ns, h, v) = (s.ns(i), s.host_if(i), format!("{}n{i}", s.tag));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &v])?;
            sh(&["ip", "link", "set", &v, "netns", &ns])?;
            sh(&["ip", "link", "set", &h, "master", &br])?;
            sh(&["ip", "link", "set", &h, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", &v, "name", IFACE])?;
            sh(&["ip", "-n", &ns, "addr", "add", &format!("{}/24", s.ip(i)), "dev", IFACE])?;
            sh(&["ip", "-n", &ns, "link", "set", IFACE, "up"])?;
            sh(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(s)
    }
    fn bridge(&self) -> String {
        format!("{}br", self.tag)
    }
    fn ns(&self, i: usize) -> String {
        format!("{}-{i}", self.tag)
    }
    fn host_if(&self, i: usize) -> String {
        format!("{}h{i}", self.tag)
    }
    fn ip(&self, i: usize) -> String {
        format!("10.89.{}.{}", self.k, i + 1)
    }
    fn hub_ip(&self) -> String {
        format!("10.89.{}.254", self.k)
    }
    fn vip(&self, last: u8) -> String {
        format!("10.89.{}.{last}", self.k)
    }
    fn clean(&self) {
        for i in 0..self.n {
            self.kill_all(i);
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
            let _ = sh(&["ip", "link", "del", &self.host_if(i)]);
        }
        let br = self.bridge();
        while sh(&["iptables", "-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"]).is_ok() {}
        let _ = sh(&["ip", "link", "del", &br]);
    }
    fn pids(&self, i: usize) -> Vec<i32> {
        sh(&["ip", "netns", "pids", &self.ns(i)])
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
    fn kill_all(&self, i: usize) {
        for p in self.pids(i) {
            // SAFETY: kill(2) with a pid read from the namespace; no memory is involved.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
    }
    /// The box holding `vip`, if exactly one does.
    fn holder(&self, vip: &str) -> Option<usize> {
        let v: Vec<usize> = (0..self.n)
            .filter(|i| {
                sh(&["ip", "-n", &self.ns(*i), "-4", "addr", "show", "dev", IFACE])
                    .unwrap_or_default()
                    .contains(&format!("inet {vip}/"))
            })
            .collect();
        match v[..] {
            [b] => Some(b),
            _ => None,
        }
    }
    /// Power cut of box `i`: its cable out, then every process killed, at once (the cable
    /// first, so nothing a dying process sends, such as keepalived's priority-0 advertisement
    /// on SIGTERM from its parent's death, reaches the site). Returns when it started.
    fn power_cut(&self, i: usize) -> Result<Instant> {
        let pids = self.pids(i);
        let t0 = Instant::now();
        sh(&["ip", "link", "set", &self.host_if(i), "down"])?;
        for p in pids {
            // SAFETY: as in `kill_all`.
            unsafe {
                libc::kill(p, libc::SIGKILL);
            }
        }
        self.kill_all(i); // anything forked meanwhile
        Ok(t0)
    }
    /// The box is powered on again: addresses from before are gone (as after a reboot), the
    /// cable is back.
    fn power_on(&self, i: usize, vip: &str) -> Result<()> {
        let _ = sh(&[
            "ip",
            "-n",
            &self.ns(i),
            "addr",
            "del",
            &format!("{vip}/24"),
            "dev",
            IFACE,
        ]);
        sh(&["ip", "link", "set", &self.host_if(i), "up"])?;
        Ok(())
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.clean();
    }
}

/// Connect to `addr` every 2 ms until a connection is accepted; the time since `t0`.
fn first_answer(addr: SocketAddr, t0: Instant, limit: Duration) -> Option<Duration> {
    while t0.elapsed() < limit {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(20)).is_ok() {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

fn spawn_in(ns: &str, args: &[&str], log: &std::path::Path, env: &[(&str, &str)]) -> Result<Child> {
    let log = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).spawn()?)
}

fn deployment(name: &str, port: u16, vip: &str, warm: bool, www: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  annotations:\n    outpost.dev/failover: site\n    outpost.dev/failover-standbys: '2'\n    outpost.dev/failover-warm: '{warm}'\n    outpost.dev/failover-vip: {vip}/24\n    outpost.dev/failover-interface: {IFACE}\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - name: web\n        image: 'httpd:1'\n        command: [/usr/bin/busybox, httpd, -f, -p, '0.0.0.0:{port}', -h, '{www}']\n"
    )
}

struct Agents<'a> {
    site: &'a Site,
    dirs: Vec<std::path::PathBuf>,
    children: Vec<Option<Child>>,
}

impl Agents<'_> {
    fn start(&mut self, i: usize) -> Result<()> {
        let bin = outpost_bin()?;
        let dir = self.dirs[i].to_string_lossy().into_owned();
        let c = spawn_in(
            &self.site.ns(i),
            &[&bin.to_string_lossy(), "agent", "run", "--data-dir", &dir],
            &self.dirs[i].join("agent.log"),
            &[("OUTPOST_LOG", "info")],
        )?;
        self.children[i] = Some(c);
        Ok(())
    }
    fn reap(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The role `node` reports for `key` at the hub.
async fn role(hub: &HubProc, node: &str, key: &str) -> Option<String> {
    let out = hub.try_cli(&["get", "workloads", "-o", "json"]).await.ok()?;
    let v: serde_json::Value = serde_json::from_str(&out).ok()?;
    v.as_array()?
        .iter()
        .find(|p| p["node"] == node && p["key"] == key)
        .and_then(|p| p["status"]["site_role"].as_str().map(String::from))
}

/// Power cuts of the active box of an outpost site: the failover times.
async fn outpost_cuts(
    site: &Site,
    hub: &HubProc,
    agents: &mut Agents<'_>,
    warm: bool,
    cuts: usize,
    work: &std::path::Path,
) -> Result<(Vec<Duration>, usize, usize)> {
    let (name, port, last) = if warm {
        ("fo-warm", 8080, 100)
    } else {
        ("fo-cold", 8081, 101)
    };
    let vip = site.vip(last);
    let key = format!("deployment/default/{name}");
    let www = work.join("www");
    std::fs::create_dir_all(&www)?;
    hub.apply(&deployment(name, port, &vip, warm, &www.to_string_lossy()))
        .await?;
    let addr: SocketAddr = format!("{vip}:{port}").parse()?;
    let mut times = Vec::new();
    let mut failed = 0;
    let mut stalls = 0;
    for c in 0..cuts {
        // Settled: one box holds the address and serves; every box reports its role.
        let active = wait_for(
            "one box holding the virtual IP",
            Duration::from_secs(60),
            Duration::from_millis(50),
            || site.holder(&vip),
        )
        .await?;
        wait_for(
            "the service answering",
            Duration::from_secs(60),
            Duration::from_millis(20),
            || TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok(),
        )
        .await?;
        for i in 0..site.n {
            let want = if i == active { "active" } else { "standby" };
            let end = Instant::now() + Duration::from_secs(60);
            while role(hub, &site.ns(i), &key).await.as_deref() != Some(want) {
                if Instant::now() > end {
                    // Counted and reported, not fatal: the cut still measures the failover.
                    eprintln!("box {i} did not report {want} for {key} at the hub within 60 s; see its agent.log");
                    stalls += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        // The peers hear each other (startup grace of a box that came back, plus margin).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let t0 = site.power_cut(active)?;
        let took = tokio::task::spawn_blocking(move || first_answer(addr, t0, Duration::from_secs(10))).await?;
        match took {
            Some(t) => times.push(t),
            None => failed += 1,
        }
        eprintln!(
            "{} cut {}/{cuts}: box {active} -> {}",
            if warm { "warm" } else { "cold" },
            c + 1,
            took.map_or("no answer within 10 s".into(), |t| ms(t.as_secs_f64() * 1000.0))
        );
        agents.reap(active);
        site.power_on(active, &vip)?;
        agents.start(active)?;
    }
    hub.try_cli(&["delete", "deployment", name]).await?;
    // Nothing of this mode is left running before the next.
    wait_for(
        "the copies gone",
        Duration::from_secs(60),
        Duration::from_millis(100),
        || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(50))
                .is_err()
                .then_some(())
        },
    )
    .await?;
    Ok((times, failed, stalls))
}

fn keepalived_conf(iface: &str, prio: u32, vip: &str, k: u32) -> String {
    format!(
        "global_defs {{\n  vrrp_version 3\n  router_id ob{k}\n  vrrp_garp_master_delay 0\n}}\nvrrp_instance VI_{k} {{\n  state BACKUP\n  nopreempt\n  interface {iface}\n  virtual_router_id {}\n  priority {prio}\n  advert_int 0.05\n  virtual_ipaddress {{\n    {vip}/24 dev {iface}\n  }}\n}}\n",
        k % 250 + 1
    )
}

/// The same power cuts with keepalived holding a plain virtual IP and httpd on every box.
fn keepalived_cuts(site: &Site, cuts: usize, work: &std::path::Path) -> Result<(Vec<Duration>, usize, usize)> {
    let vip = site.vip(200);
    let port = 8082;
    let www = work.join("www");
    std::fs::create_dir_all(&www)?;
    let start = |i: usize| -> Result<()> {
        let d = work.join(format!("keepalived-{i}"));
        // A reboot empties /run: no pid file of the killed instance is left to be mistaken
        // for a running daemon.
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
        let conf = d.join("keepalived.conf");
        std::fs::write(&conf, keepalived_conf(IFACE, 100 + i as u32, &vip, site.k))?;
        let p = |f: &str| d.join(f).to_string_lossy().into_owned();
        let log = d.join("log");
        spawn_in(
            &site.ns(i),
            &[
                "keepalived",
                "-n",
                "-l",
                "-D",
                "-P",
                "-f",
                &conf.to_string_lossy(),
                "-p",
                &p("k.pid"),
                "-r",
                &p("v.pid"),
                "-c",
                &p("c.pid"),
            ],
            &log,
            &[],
        )?;
        spawn_in(
            &site.ns(i),
            &[
                "/usr/bin/busybox",
                "httpd",
                "-f",
                "-p",
                &format!("0.0.0.0:{port}"),
                "-h",
                &www.to_string_lossy(),
            ],
            &log,
            &[],
        )?;
        Ok(())
    };
    for i in 0..site.n {
        start(i)?;
    }
    let addr: SocketAddr = format!("{vip}:{port}").parse()?;
    let mut times = Vec::new();
    let mut failed = 0;
    for c in 0..cuts {
        let end = Instant::now() + Duration::from_secs(60);
        let active = loop {
            if let Some(a) = site.holder(&vip) {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    break a;
                }
            }
            if Instant::now() > end {
                bail!(
                    "keepalived: no box holds {vip} and serves within 60 s; see {}",
                    work.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        std::thread::sleep(Duration::from_millis(1500));
        let t0 = site.power_cut(active)?;
        let took = first_answer(addr, t0, Duration::from_secs(10));
        match took {
            Some(t) => times.push(t),
            None => failed += 1,
        }
        eprintln!(
            "keepalived cut {}/{cuts}: box {active} -> {}",
            c + 1,
            took.map_or("no answer within 10 s".into(), |t| ms(t.as_secs_f64() * 1000.0))
        );
        site.power_on(active, &vip)?;
        start(active)?;
    }
    for i in 0..site.n {
        site.kill_all(i);
    }
    Ok((times, failed, 0))
}

pub async fn failover(a: FailoverArgs, work: &std::path::Path) -> Result<String> {
    if a.boxes < 2 {
        bail!("--boxes: a site needs at least 2 boxes for failover");
    }
    let site = Site::new(a.boxes).context("cannot make the site's network namespaces (root and iproute2 needed)")?;
    let hub = HubProc::start_on(work, site.hub_ip().parse()?).await?;
    let token = hub
        .try_cli(&[
            "token",
            "create",
            "--uses",
            &a.boxes.to_string(),
            "--ttl",
            "0",
            "--labels",
            &format!("site={}", site.tag),
        ])
        .await?
        .trim()
        .to_string();
    let mut agents = Agents {
        site: &site,
        dirs: Vec::new(),
        children: Vec::new(),
    };
    for i in 0..a.boxes {
        let dir = work.join(format!("agent-{i}"));
        let o = tokio::process::Command::new(outpost_bin()?)
            .args([
                "agent",
                "join",
                "--hub",
                &hub.url,
                "--token",
                &token,
                "--name",
                &site.ns(i),
                "--data-dir",
            ])
            .arg(&dir)
            .args(["--labels", &format!("node.outpost.dev/site-ip={}", site.ip(i))])
            .env("OUTPOST_LOG", "warn")
            .output()
            .await?;
        if !o.status.success() {
            bail!("join of box {i} failed: {}", String::from_utf8_lossy(&o.stderr));
        }
        agents.dirs.push(dir);
        agents.children.push(None);
        agents.start(i)?;
    }
    let mut rows = Vec::new();
    let mut row = |what: &str, (t, failed, stalls): (Vec<Duration>, usize, usize)| {
        let s = Summary::of_durations(&t);
        rows.push(vec![
            what.to_string(),
            s.n.to_string(),
            failed.to_string(),
            stalls.to_string(),
            ms(s.p50),
            ms(s.p99),
            ms(s.max),
        ]);
    };
    let mode = |m: &str| a.modes.iter().any(|x| x == m);
    if mode("warm") {
        row(
            "outpost, warm standby",
            outpost_cuts(&site, &hub, &mut agents, true, a.cuts, work).await?,
        );
    }
    if mode("cold") {
        row(
            "outpost, cold standby",
            outpost_cuts(&site, &hub, &mut agents, false, a.cuts, work).await?,
        );
    }
    for i in 0..a.boxes {
        agents.reap(i);
        site.kill_all(i);
    }
    if mode("keepalived") {
        // Blocking on purpose: nothing else runs in this process meanwhile.
        let r = keepalived_cuts(&site, a.cuts, work)?;
        row("keepalived VRRPv3 (advert 50 ms), plain VIP", r);
    }
    Ok(format!(
        "Site failover after a power cut of the active box ({} boxes in network namespaces on one bridge, \
         the hub up; peer deadline {} ms, heartbeats every {} ms), measured by a client connecting to \
         the virtual IP every 2 ms from the bridge\n\n{}",
        a.boxes,
        outpost_core::site_ha::DEADLINE_MS,
        outpost_core::site_ha::HEARTBEAT_MS,
        table(
            &[
                "failover",
                "cuts answered",
                "no answer in 10 s",
                "role not at the hub in 60 s",
                "p50",
                "p99",
                "max"
            ],
            &rows
        )
    ))
}
