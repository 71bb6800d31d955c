//! Site-local high availability (issue 18, docs/site-ha.md) on a real site: network namespaces
//! on a bridge made by the test, one agent per namespace joined with its site address, the hub
//! in the root namespace on the bridge. A power cut is `kill -9` of every process of a box's
//! namespace; a partition takes a box's veth down. Needs root: under CI (`CI` set) a site that
//! cannot be made fails the test instead of skipping it.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

fn sh(args: &[&str]) -> Result<String, String> {
    let o = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{args:?}: {e}"))?;
    if o.status.success() {
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    } else {
        Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)))
    }
}

/// The site interface's name inside every box.
const SITE_IF: &str = "site0";

/// `n` boxes, each a network namespace with a veth on one bridge; the bridge holds the hub's
/// address.
struct Site {
    tag: String,
    k: u32,
    n: usize,
}

impl Site {
    /// A site of `n` boxes on a bridge whose name no running test holds: creating the bridge
    /// is the lock (`ip link add` refuses a name that exists), so concurrent test processes
    /// never share, or clean up, each other's site.
    fn new(n: usize) -> Option<Site> {
        let start = std::process::id();
        let mut err = String::from("no free site number");
        for a in 0..200 {
            let k = 10 + (start + a) % 200;
            let site = Site {
                tag: format!("opha{k}"),
                k,
                n,
            };
            match sh(&["ip", "link", "add", &site.bridge(), "type", "bridge"]) {
                Ok(_) => match site.make() {
                    Ok(()) => return Some(site),
                    Err(e) => {
                        err = e;
                        break; // Drop cleans what was made
                    }
                },
                Err(e) if e.contains("File exists") => continue,
                Err(e) => {
                    err = e;
                    break;
                }
            }
        }
        assert!(
            std::env::var("CI").is_err(),
            "cannot make the site's network namespaces (root and iproute2 needed): {err}"
        );
        eprintln!("skipping: cannot make network namespaces: {err}");
        None
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
        format!("10.88.{}.{}", self.k, i + 1)
    }
    fn hub_ip(&self) -> String {
        format!("10.88.{}.254", self.k)
    }
    fn wrap(&self, i: usize) -> Vec<String> {
        ["ip", "netns", "exec", &self.ns(i)].map(String::from).to_vec()
    }

    /// Everything but the bridge, which [`Site::new`] made. Namespaces and veths of this
    /// number left by a killed run go first.
    fn make(&self) -> Result<(), String> {
        for i in 0..self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
            let _ = sh(&["ip", "link", "del", &self.host_if(i)]);
        }
        let br = self.bridge();
        sh(&["ip", "addr", "add", &format!("{}/24", self.hub_ip()), "dev", &br])?;
        sh(&["ip", "link", "set", &br, "up"])?;
        // Docker sets FORWARD to DROP and bridged frames pass iptables here: let the site's
        // boxes talk to each other.
        sh(&["iptables", "-I", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"])?;
        for i in 0..self.n {
            let (ns, h, v) = (self.ns(i), self.host_if(i), format!("{}n{i}", self.tag));
            sh(&["ip", "netns", "add", &ns])?;
            sh(&["ip", "link", "add", &h, "type", "veth", "peer", "name", &v])?;
            sh(&["ip", "link", "set", &v, "netns", &ns])?;
            sh(&["ip", "link", "set", &h, "master", &br])?;
            sh(&["ip", "link", "set", &h, "up"])?;
            let x = |a: &[&str]| sh(&[&["ip", "netns", "exec", &ns][..], a].concat());
            // The same interface name on every box, as on a real site (`failover-interface`).
            x(&["ip", "link", "set", &v, "name", SITE_IF])?;
            x(&["ip", "addr", "add", &format!("{}/24", self.ip(i)), "dev", SITE_IF])?;
            x(&["ip", "link", "set", SITE_IF, "up"])?;
            x(&["ip", "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    fn clean(&self) {
        for i in 0..self.n {
            let _ = sh(&["ip", "netns", "del", &self.ns(i)]);
            let _ = sh(&["ip", "link", "del", &self.host_if(i)]);
        }
        let br = self.bridge();
        while sh(&["iptables", "-D", "FORWARD", "-i", &br, "-o", &br, "-j", "ACCEPT"]).is_ok() {}
        let _ = sh(&["ip", "link", "del", &br]);
    }

    /// A partition: box `i`'s cable out of the switch.
    fn cut(&self, i: usize) {
        sh(&["ip", "link", "set", &self.host_if(i), "down"]).unwrap();
    }
    fn heal(&self, i: usize) {
        sh(&["ip", "link", "set", &self.host_if(i), "up"]).unwrap();
    }

    /// Boxes `a` and `b` stop hearing each other; both still reach the hub (and the others).
    fn split(&self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let ns = self.ns(x);
            let ip = self.ip(y);
            sh(&[
                "ip", "netns", "exec", &ns, "iptables", "-I", "INPUT", "-s", &ip, "-j", "DROP",
            ])
            .unwrap();
        }
    }

    /// A power cut: every process of box `i`'s namespace killed at once.
    fn power_cut(&self, i: usize) {
        let pids = sh(&["ip", "netns", "pids", &self.ns(i)]).unwrap();
        for p in pids.split_whitespace() {
            let _ = sh(&["kill", "-9", p]);
        }
    }

    /// Which box a process runs in.
    fn box_of(&self, pid: u32) -> Option<usize> {
        let ns = sh(&["ip", "netns", "identify", &pid.to_string()]).ok()?;
        (0..self.n).find(|i| self.ns(*i) == ns.trim())
    }

    /// The boxes running a copy of `marker`'s sleep, one entry per copy.
    fn copies(&self, marker: &str) -> Vec<usize> {
        let mut v: Vec<usize> = pids_with_cmdline(&["/bin/sleep", marker])
            .into_iter()
            .filter_map(|p| self.box_of(p))
            .collect();
        v.sort();
        v
    }

    /// The site interface's MAC address on box `i`.
    fn mac(&self, i: usize) -> String {
        sh(&[
            "ip",
            "netns",
            "exec",
            &self.ns(i),
            "cat",
            &format!("/sys/class/net/{SITE_IF}/address"),
        ])
        .unwrap()
        .trim()
        .to_string()
    }

    /// Does box `i` hold `ip` on its site interface?
    fn holds(&self, i: usize, ip: &str) -> bool {
        sh(&["ip", "-n", &self.ns(i), "-4", "addr", "show", "dev", SITE_IF])
            .unwrap_or_default()
            .contains(&format!("inet {ip}/"))
    }

    /// Join box `i` to `hub` with its site address and start its agent (with a peer deadline
    /// other than the default when `deadline_ms` says so).
    fn join(&self, hub: &Hub, token: &str, i: usize, deadline_ms: Option<u32>) -> Agent {
        let wrap = self.wrap(i);
        let wrap: Vec<&str> = wrap.iter().map(String::as_str).collect();
        let label = format!("node.outpost.dev/site-ip={}", self.ip(i));
        let mut a = hub.join_with(&self.ns(i), token, &wrap, &["--labels", &label]);
        if let Some(d) = deadline_ms {
            a.env.push(("OUTPOST_SITE_DEADLINE_MS".into(), d.to_string()));
        }
        a.running()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        self.clean();
    }
}

fn failover(name: &str, marker: &str, standbys: u32, policy: &str) -> String {
    format!(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: {name}\n  annotations: {{outpost.dev/failover: site, outpost.dev/failover-standbys: '{standbys}', outpost.dev/failover-policy: {policy}}}\nspec:\n  replicas: 1\n  template:\n    spec:\n      runtimeClassName: process\n      terminationGracePeriodSeconds: 1\n      containers:\n      - {{name: main, image: 'sleeper:1', command: [/bin/sleep, '{marker}']}}\n"
    )
}

/// A site of `n` boxes with a hub on the bridge and `site=<tag>` on every box.
fn site_with_hub(n: usize) -> Option<(Site, Hub, Vec<Agent>)> {
    site_with_deadline(n, None)
}

/// Like [`site_with_hub`], with the agents' peer deadline set. The partition tests check that
/// the copy never moves needlessly; on this shared 2-core machine, busy with other test
/// processes, a debug-build agent can stall past the 250 ms default and be taken for dead, which
/// boxes running only their own workloads do not. The failover timings use the default.
fn site_with_deadline(n: usize, deadline_ms: Option<u32>) -> Option<(Site, Hub, Vec<Agent>)> {
    let site = Site::new(n)?;
    let hub = Hub::start_on(&site.hub_ip(), &[], &[]);
    let token = hub.token(&["--labels", &format!("site={}", site.tag)]);
    let agents = (0..n).map(|i| site.join(&hub, &token, i, deadline_ms)).collect();
    Some((site, hub, agents))
}

/// Wait until exactly one copy runs; its box.
fn one_copy(site: &Site, marker: &str, secs: f64) -> usize {
    wait_for("exactly one copy", secs, || match site.copies(marker)[..] {
        [b] => Some(b),
        _ => None,
    })
}

/// For `secs`, every sample sees exactly one copy, on `on`, with the same pid.
fn stays_one(site: &Site, marker: &str, on: usize, secs: f64) {
    let pid = pids_with_cmdline(&["/bin/sleep", marker]);
    let end = Instant::now() + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        assert_eq!(site.copies(marker), vec![on], "exactly one copy, on box {on}");
        assert_eq!(
            pids_with_cmdline(&["/bin/sleep", marker]),
            pid,
            "the copy was not restarted"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Power cut of the active box: returns (new box, failover time as seen from outside).
fn cut_power(site: &Site, marker: &str, active: usize) -> (usize, Duration) {
    let t0 = Instant::now();
    site.power_cut(active);
    let end = t0 + Duration::from_secs(15);
    loop {
        if let [b] = site.copies(marker)[..] {
            if b != active {
                return (b, t0.elapsed());
            }
        }
        assert!(Instant::now() < end, "no standby took over within 15 s");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn power_cut_moves_the_copy_and_the_returning_box_stands_down() {
    let Some((site, hub, mut agents)) = site_with_hub(3) else {
        return;
    };
    let m = marker();
    hub.apply(&failover("gw", &m, 2, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    // outpost get workloads shows who is active and who stands by.
    let key = "deployment/default/gw";
    wait_for("roles at the hub", 20.0, || {
        let roles: Vec<String> = (0..3)
            .map(|i| {
                hub.placement(&site.ns(i), key)
                    .and_then(|p| p["status"]["site_role"].as_str().map(String::from))
                    .unwrap_or_default()
            })
            .collect();
        (roles.iter().filter(|r| *r == "active").count() == 1
            && roles.iter().filter(|r| *r == "standby").count() == 2
            && roles[active] == "active")
            .then_some(())
    });

    let table = hub.cli(&["get", "workloads"]);
    let row = |i: usize| {
        table
            .lines()
            .find(|l| l.starts_with(&site.ns(i)))
            .unwrap_or("")
            .to_string()
    };
    assert!(row(active).contains("Running (active)"), "{table}");
    let standby = (active + 1) % 3;
    assert!(row(standby).contains("Standby"), "{table}");

    let (now_on, took) = cut_power(&site, &m, active);
    eprintln!("site failover after a power cut (hub up): {} ms", took.as_millis());
    stays_one(&site, &m, now_on, 1.0);
    wait_for("the takeover event at the hub", 20.0, || {
        hub.cli(&["describe", "node", &site.ns(now_on)])
            .contains("SiteTakeover")
            .then_some(())
    });

    // The box comes back: it hears the new owner and stays standby; the copy is not restarted.
    agents[active].kill9();
    agents[active].start();
    wait_for("the returned box reports standby", 30.0, || {
        (hub.placement(&site.ns(active), key)?["status"]["site_role"] == "standby").then_some(())
    });
    stays_one(&site, &m, now_on, 2.0);
}

#[test]
fn power_cut_with_the_hub_stopped() {
    let Some((site, mut hub, _agents)) = site_with_hub(3) else {
        return;
    };
    let m = marker();
    hub.apply(&failover("gw", &m, 2, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    hub.kill();
    let (now_on, took) = cut_power(&site, &m, active);
    eprintln!("site failover after a power cut (hub down): {} ms", took.as_millis());
    stays_one(&site, &m, now_on, 1.5);
}

#[test]
fn a_cut_off_box_stands_down_and_the_majority_keeps_one_copy() {
    let Some((site, hub, _agents)) = site_with_deadline(3, Some(2_000)) else {
        return;
    };
    let m = marker();
    hub.apply(&failover("gw", &m, 2, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    // The active box loses the site network: it is a minority of one and stops its copy; the
    // two others elect one of them.
    site.cut(active);
    let now_on = wait_for("the majority runs the only copy", 15.0, || match site.copies(&m)[..] {
        [b] if b != active => Some(b),
        _ => None,
    });
    stays_one(&site, &m, now_on, 1.5);
    // Healed: the cut-off box hears the newer owner; still exactly one copy, not restarted.
    site.heal(active);
    stays_one(&site, &m, now_on, 2.0);
}

#[test]
fn two_boxes_without_the_hub_follow_the_policy() {
    let Some((site, mut hub, _agents)) = site_with_deadline(2, Some(2_000)) else {
        return;
    };
    let (ma, ms) = (marker(), marker());
    hub.apply(&format!(
        "{}---\n{}",
        failover("avail", &ma, 1, "preferAvailability"),
        failover("safe", &ms, 1, "preferSafety")
    ));
    let a_on = one_copy(&site, &ma, 40.0);
    let s_on = one_copy(&site, &ms, 40.0);
    stays_one(&site, &ma, a_on, 1.0);
    hub.kill();
    site.cut(0);
    // preferAvailability: the standby takes over, so both boxes run a copy while apart.
    wait_for("a copy on each side (preferAvailability)", 15.0, || {
        (site.copies(&ma) == vec![0, 1]).then_some(())
    });
    // preferSafety: never two copies; the holder keeps its copy.
    stays_one(&site, &ms, s_on, 1.5);
    // Healed: the duplicate ends, exactly one copy of each.
    site.heal(0);
    let kept = one_copy(&site, &ma, 15.0);
    stays_one(&site, &ma, kept, 1.5);
    stays_one(&site, &ms, s_on, 0.5);
}

/// Does a host answer at `ip`? A TCP connection to a closed port is refused by the host that
/// holds the address (no ping binary here); nobody there means a timeout.
fn answers(ip: &str) -> bool {
    let addr: std::net::SocketAddr = format!("{ip}:9").parse().unwrap();
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

#[test]
fn the_virtual_ip_follows_the_copy() {
    let Some((site, hub, _agents)) = site_with_hub(3) else {
        return;
    };
    let m = marker();
    let vip = format!("10.88.{}.100", site.k);
    let yaml = failover("gw", &m, 2, "preferAvailability").replace(
        "outpost.dev/failover-policy: preferAvailability}",
        &format!(
            "outpost.dev/failover-policy: preferAvailability, outpost.dev/failover-vip: {vip}/24, outpost.dev/failover-interface: {SITE_IF}}}"
        ),
    );
    hub.apply(&yaml);
    let active = one_copy(&site, &m, 40.0);
    wait_for("the active box holds the virtual IP", 10.0, || {
        site.holds(active, &vip).then_some(())
    });
    assert!(
        (0..3).filter(|i| site.holds(*i, &vip)).count() == 1,
        "only the active box holds it"
    );
    // Devices on the site (here: the hub's side of the bridge) reach it, at the active box.
    assert!(answers(&vip), "the virtual IP answers");
    let neigh = || sh(&["ip", "neigh", "show", &vip, "dev", &site.bridge()]).unwrap_or_default();
    assert!(neigh().contains(&site.mac(active)), "{}", neigh());

    let (now_on, took) = cut_power(&site, &m, active);
    eprintln!("site failover with a virtual IP: {} ms", took.as_millis());
    wait_for("the new box holds the virtual IP", 10.0, || {
        site.holds(now_on, &vip).then_some(())
    });
    // The gratuitous ARP moved the site's neighbour entry to the new box at once (without it the
    // entry would point at the dead box until it went stale).
    wait_for("the site's ARP entry points at the new box", 3.0, || {
        neigh().contains(&site.mac(now_on)).then_some(())
    });
    assert!(answers(&vip), "the virtual IP answers from the new box");
}

#[test]
fn a_new_revision_reaches_active_and_standbys() {
    let Some((site, hub, _agents)) = site_with_hub(3) else {
        return;
    };
    let (m1, m2) = (marker(), marker());
    hub.apply(&failover("gw", &m1, 2, "preferAvailability"));
    let active = one_copy(&site, &m1, 40.0);
    // Revision 2: the fleet rollout completes (standbys do not hold it up) and one copy of the
    // new revision runs, on the active box.
    hub.apply(&failover("gw", &m2, 2, "preferAvailability"));
    let on = one_copy(&site, &m2, 40.0);
    assert_eq!(on, active, "the active box runs the new revision");
    wait_for("the old revision gone", 20.0, || {
        site.copies(&m1).is_empty().then_some(())
    });
    wait_for("the rollout complete", 40.0, || {
        let rs = hub.json(&["get", "rollouts"]);
        rs.as_array()?
            .iter()
            .any(|r| r["workload"] == "deployment/default/gw" && r["revision"] == 2 && r["phase"] == "Complete")
            .then_some(())
    });
    // The standbys hold revision 2 too: after a power cut the new box runs it.
    let (now_on, _) = cut_power(&site, &m2, active);
    assert_ne!(now_on, active);
    assert!(site.copies(&m1).is_empty(), "no box went back to revision 1");
}

#[test]
fn two_boxes_with_the_hub_as_witness_keep_one_copy() {
    let Some((site, hub, _agents)) = site_with_deadline(2, Some(2_000)) else {
        return;
    };
    let m = marker();
    // The default policy, preferAvailability: without the witness the standby would start a
    // second copy when it stops hearing the active box (two_boxes_without_the_hub_follow_the_policy).
    hub.apply(&failover("gw", &m, 1, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    // The pair stops hearing itself, both boxes still reach the hub: the active box renews its
    // lease at the hub before the standby claims, the hub keeps the copy where it runs.
    site.split(0, 1);
    stays_one(&site, &m, active, 5.0);
    // The active box dies while the pair is split: the hub grants the standby the copy once the
    // lease lapsed.
    let (now_on, took) = cut_power(&site, &m, active);
    eprintln!("pair failover through the hub witness: {} ms", took.as_millis());
    assert_ne!(now_on, active);
    stays_one(&site, &m, now_on, 1.0);
}

#[test]
fn a_joining_box_does_not_restart_the_active_copy() {
    let Some(site) = Site::new(3) else {
        return;
    };
    let hub = Hub::start_on(&site.hub_ip(), &[], &[]);
    let token = hub.token(&["--labels", &format!("site={}", site.tag)]);
    let _a: Vec<Agent> = (0..2).map(|i| site.join(&hub, &token, i, Some(2_000))).collect();
    let m = marker();
    hub.apply(&failover("gw", &m, 2, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    // A third box joins the site: it becomes a member (standby) and every member receives the
    // new member list, without the active copy restarting.
    let _c = site.join(&hub, &token, 2, Some(2_000));
    let key = "deployment/default/gw";
    let pid = pids_with_cmdline(&["/bin/sleep", &m]);
    wait_for("the new box holds the workload as a standby", 30.0, || {
        (hub.placement(&site.ns(2), key)?["status"]["site_role"] == "standby").then_some(())
    });
    stays_one(&site, &m, active, 1.5);
    assert_eq!(
        pids_with_cmdline(&["/bin/sleep", &m]),
        pid,
        "the active copy was not restarted"
    );
}

/// The pid of `marker`'s copy on box `i`, if one runs there.
fn pid_on(site: &Site, marker: &str, i: usize) -> Option<u32> {
    pids_with_cmdline(&["/bin/sleep", marker])
        .into_iter()
        .find(|p| site.box_of(*p) == Some(i))
}

#[test]
fn a_warm_standby_is_promoted_without_a_restart() {
    let Some((site, hub, _agents)) = site_with_hub(3) else {
        return;
    };
    let m = marker();
    let vip = format!("10.88.{}.100", site.k);
    let yaml = failover("gw", &m, 2, "preferAvailability").replace(
        "outpost.dev/failover-policy: preferAvailability}",
        &format!(
            "outpost.dev/failover-policy: preferAvailability, outpost.dev/failover-warm: 'true', outpost.dev/failover-vip: {vip}/24, outpost.dev/failover-interface: {SITE_IF}}}"
        ),
    );
    hub.apply(&yaml);
    // Warm: a copy runs on every box; only the active one holds the virtual IP.
    wait_for("a copy on every box", 40.0, || {
        (site.copies(&m) == vec![0, 1, 2]).then_some(())
    });
    let active = wait_for("one box holds the virtual IP", 20.0, || {
        match (0..3).filter(|i| site.holds(*i, &vip)).collect::<Vec<_>>()[..] {
            [a] => Some(a),
            _ => None,
        }
    });
    let key = "deployment/default/gw";
    wait_for("the hub sees one active and two warm standbys", 20.0, || {
        let table = hub.cli(&["get", "workloads"]);
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with(&site.tag)).collect();
        (rows.iter().filter(|l| l.contains("Standby (warm)")).count() == 2
            && rows.iter().filter(|l| l.contains("Running (active)")).count() == 1)
            .then_some(())
    });
    let standby_status = hub.placement(&site.ns((active + 1) % 3), key).expect("placement");
    assert_eq!(
        standby_status["status"]["ready"], false,
        "a warm standby is not ready: {standby_status}"
    );
    let before: Vec<Option<u32>> = (0..3).map(|i| pid_on(&site, &m, i)).collect();

    // Power cut: the best-ranked live standby takes the virtual IP; its copy is the one that
    // already ran (promotion, not a start).
    let t0 = Instant::now();
    site.power_cut(active);
    let now_on = wait_for("another box holds the virtual IP", 15.0, || {
        (0..3).find(|i| *i != active && site.holds(*i, &vip))
    });
    eprintln!("warm site failover (virtual IP moved): {} ms", t0.elapsed().as_millis());
    assert_eq!(
        pid_on(&site, &m, now_on),
        before[now_on],
        "the warm copy was promoted, not restarted"
    );
    wait_for("the hub names the new active box", 20.0, || {
        (hub.placement(&site.ns(now_on), key)?["status"]["site_role"] == "active").then_some(())
    });
    assert_eq!(
        pid_on(&site, &m, now_on),
        before[now_on],
        "the copy kept running through its gate"
    );
}

#[test]
fn a_restarted_agent_on_the_active_box_keeps_its_copy() {
    let Some((site, hub, mut agents)) = site_with_deadline(3, Some(2_000)) else {
        return;
    };
    let m = marker();
    hub.apply(&failover("gw", &m, 2, "preferAvailability"));
    let active = one_copy(&site, &m, 40.0);
    stays_one(&site, &m, active, 1.0);
    let key = "deployment/default/gw";
    wait_for("the hub names the active box", 20.0, || {
        (hub.placement(&site.ns(active), key)?["status"]["site_role"] == "active").then_some(())
    });
    // The agent (not the box) restarts: its copy keeps running, and the restarted agent resumes
    // as active from its persisted claim instead of starting as standby and stopping it.
    agents[active].kill9();
    agents[active].start();
    stays_one(&site, &m, active, 4.0);
    let events = hub.cli(&["describe", "node", &site.ns(active)]);
    assert!(!events.contains("SiteStandDown"), "{events}");
    assert_eq!(
        hub.placement(&site.ns(active), key).expect("placement")["status"]["site_role"],
        "active"
    );
}

/// The state of `name` about `subject` on `node` at the hub, if it was ever raised.
fn alert_state(hub: &Hub, name: &str, node: &str, subject: &str) -> Option<String> {
    let (code, body) = api_get(hub, "/v1/alerts?all=true");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str::<serde_json::Value>(&body)
        .ok()?
        .as_array()?
        .iter()
        .find(|a| a["name"] == name && a["node"] == node && a["subject"] == subject)
        .and_then(|a| a["state"].as_str().map(String::from))
}

#[test]
fn a_takeover_is_an_alert_and_the_hub_follows_what_the_site_decided() {
    let Some((site, hub, mut agents)) = site_with_hub(3) else {
        return;
    };
    let (m1, m2) = (marker(), marker());
    let key = "deployment/default/gw";
    hub.apply(&failover("gw", &m1, 2, "preferAvailability"));
    let active = one_copy(&site, &m1, 40.0);
    stays_one(&site, &m1, active, 1.0);
    let (now_on, _) = cut_power(&site, &m1, active);
    let (new_node, old_node) = (site.ns(now_on), site.ns(active));
    // An alert on the box that took over, and the hub's view names it active.
    wait_for("SiteFailover firing at the hub", 20.0, || {
        (alert_state(&hub, "SiteFailover", &new_node, key)?.as_str() == "Firing").then_some(())
    });
    wait_for("the hub names the new active box", 20.0, || {
        (hub.placement(&new_node, key)?["status"]["site_role"] == "active").then_some(())
    });
    assert!(
        alert_state(&hub, "SiteFailover", &old_node, key).is_none(),
        "only the box that took over raises it"
    );
    // The dead box comes back as a standby: the site is whole again and the alert resolves.
    agents[active].kill9();
    agents[active].start();
    wait_for("the returned box reports standby", 30.0, || {
        (hub.placement(&old_node, key)?["status"]["site_role"] == "standby").then_some(())
    });
    wait_for("SiteFailover resolved", 20.0, || {
        (alert_state(&hub, "SiteFailover", &new_node, key)?.as_str() == "Resolved").then_some(())
    });
    // A new revision rolls out where the site put the copy: the hub does not move it back to
    // the box that ran it before (its better rank does not count while another box is active).
    hub.apply(&failover("gw", &m2, 2, "preferAvailability"));
    let on = one_copy(&site, &m2, 40.0);
    assert_eq!(on, now_on, "the revision runs on the box the site chose");
    wait_for("the rollout complete", 40.0, || {
        let rs = hub.json(&["get", "rollouts"]);
        rs.as_array()?
            .iter()
            .any(|r| r["workload"] == key && r["revision"] == 2 && r["phase"] == "Complete")
            .then_some(())
    });
    stays_one(&site, &m2, now_on, 1.0);
    assert!(site.copies(&m1).is_empty(), "the old revision is gone everywhere");
}

/// POST a witness claim as `agent` (its certificate) to `/v1/nodes/{path_node}/witness`.
fn claim(hub: &Hub, agent: &Agent, path_node: &str, body: &str) -> (u16, String) {
    outpost_pki::install_provider();
    let (ca, cert, key) = agent.identity();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = outpost_pki::client_config(&ca, Some((&cert, &key))).unwrap();
        let c = reqwest::Client::builder().use_preconfigured_tls(tls).build().unwrap();
        let r = c
            .post(format!("{}/v1/nodes/{path_node}/witness", hub.url))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

#[test]
fn the_witness_answers_only_a_member_of_a_pair_about_its_own_workload() {
    let hub = Hub::start();
    let token = hub.token(&["--labels", "site=wit"]);
    let port = free_port();
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let labels = format!(
                "node.outpost.dev/site-ip=127.0.0.{},node.outpost.dev/site-port={port}",
                i + 2
            );
            hub.join_with(&format!("wit{i}"), &token, &[], &["--labels", &labels])
                .running()
        })
        .collect();
    let (mp, mt) = (marker(), marker());
    hub.apply(&format!(
        "{}---\n{}",
        failover("pair", &mp, 1, "preferAvailability"),
        failover("trio", &mt, 2, "preferAvailability")
    ));
    let pair = "deployment/default/pair";
    let holds = |i: usize| hub.placement(&format!("wit{i}"), pair).is_some();
    let members: Vec<usize> = wait_for("the pair placed on two boxes", 30.0, || {
        let m: Vec<usize> = (0..3).filter(|i| holds(*i)).collect();
        (m.len() == 2).then_some(m)
    });
    let outsider = (0..3).find(|i| !members.contains(i)).unwrap();
    let (a, b) = (members[0], members[1]);
    let body = |w: &str, e: u64| format!("{{\"workload\":\"{w}\",\"epoch\":{e}}}");
    // The first claim of a silent pair gets the copy; the other member's claim right after
    // finds the lease fresh and learns the holder.
    let (code, text) = claim(&hub, &agents[a], &format!("wit{a}"), &body(pair, 7));
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["owner"].as_str(), v["epoch"].as_u64()),
        (Some(format!("wit{a}").as_str()), Some(7))
    );
    let (code, text) = claim(&hub, &agents[b], &format!("wit{b}"), &body(pair, 8));
    assert_eq!(code, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["owner"], format!("wit{a}"), "{text}");
    // A box that does not hold the workload, a workload of three boxes, another node's route,
    // a body without its epoch: refused, saying why.
    let (code, text) = claim(&hub, &agents[outsider], &format!("wit{outsider}"), &body(pair, 9));
    assert_eq!(code, 404, "{text}");
    assert!(text.contains("did not place it there"), "{text}");
    let (code, text) = claim(
        &hub,
        &agents[a],
        &format!("wit{a}"),
        &body("deployment/default/trio", 1),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("workload:") && text.contains("two-box"), "{text}");
    let (code, text) = claim(&hub, &agents[a], &format!("wit{b}"), &body(pair, 9));
    assert_eq!(code, 403, "{text}");
    let (code, text) = claim(
        &hub,
        &agents[a],
        &format!("wit{a}"),
        &format!("{{\"workload\":\"{pair}\"}}"),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("epoch"), "{text}");
}
