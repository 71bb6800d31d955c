//! `outpost agent install|uninstall` and `outpost hub install|uninstall` in a real systemd:
//! a Debian container with systemd as PID 1, built once with debootstrap and `docker import`
//! (cached as the image `outpost-test/systemd:bookworm`), on the host network so its agent
//! reaches a hub on loopback. Checks the unit, idempotency (a second install changes and
//! restarts nothing), Restart=always after `kill -9`, workloads adopted across that restart,
//! and uninstall (twice, then --purge).
//!
//! Where systemd cannot run (no Docker Engine, no debootstrap), the test says so loudly and
//! fails under CI.

mod common;

use std::process::Command;

use common::*;

const IMAGE: &str = "outpost-test/systemd:bookworm";

fn skip_or_fail(why: &str) -> bool {
    assert!(
        std::env::var("CI").is_err(),
        "systemd install test cannot run: {why}; scripts/test.sh must provide Docker and debootstrap"
    );
    eprintln!("SKIPPING the systemd install test: {why}");
    true
}

fn sh(cmd: &str) -> std::process::Output {
    Command::new("sh").args(["-c", cmd]).output().unwrap()
}

/// Build the systemd image once (debootstrap of Debian bookworm, imported into Docker).
fn ensure_image() -> Result<(), String> {
    if sh(&format!("docker image inspect {IMAGE}")).status.success() {
        return Ok(());
    }
    if !sh("command -v debootstrap").status.success() {
        return Err("debootstrap is not installed".into());
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let o = sh(&format!(
        "debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,procps bookworm {} http://deb.debian.org/debian",
        root.display()
    ));
    if !o.status.success() {
        return Err(format!("debootstrap failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    let o = sh(&format!(
        "tar -C {} -c . | docker import -c 'CMD [\"/sbin/init\"]' - {IMAGE}",
        root.display()
    ));
    if !o.status.success() {
        return Err(format!("docker import failed: {}", String::from_utf8_lossy(&o.stderr)));
    }
    Ok(())
}

struct Box_ {
    name: String,
}

impl Box_ {
    fn start() -> Box_ {
        let name = format!("outpost-systemd-{}", std::process::id());
        let _ = sh(&format!("docker rm -f {name}"));
        let o = Command::new("docker")
            .args([
                "run",
                "-d",
                "--name",
                &name,
                // systemd as PID 1 needs SYS_ADMIN and the cgroup tree (read-only suffices on a
                // cgroup v1 host); --privileged is not needed (and not allowed in every sandbox)
                "--cap-add",
                "SYS_ADMIN",
                "--security-opt",
                "seccomp=unconfined",
                "-v",
                "/sys/fs/cgroup:/sys/fs/cgroup:ro",
                "--network",
                "host",
                "--tmpfs",
                "/run",
                "--tmpfs",
                "/run/lock",
                "-v",
                &format!("{BIN}:/opt/outpost/outpost:ro"),
                IMAGE,
                "/sbin/init",
            ])
            .output()
            .unwrap();
        if !o.status.success() {
            let _ = sh(&format!("docker rm -f {name}"));
            panic!(
                "cannot start the systemd container: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
        let b = Box_ { name };
        wait_for("systemd is up in the container", 60.0, || {
            let s = b.exec(&["systemctl", "is-system-running"]);
            let s = String::from_utf8_lossy(&s.stdout).trim().to_string();
            matches!(s.as_str(), "running" | "degraded").then_some(())
        });
        b
    }

    fn exec(&self, args: &[&str]) -> std::process::Output {
        Command::new("docker")
            .arg("exec")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let o = self.exec(args);
        assert!(
            o.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    fn out(&self, args: &[&str]) -> String {
        String::from_utf8_lossy(&self.exec(args).stdout).trim().to_string()
    }

    fn main_pid(&self, unit: &str) -> u32 {
        self.out(&["systemctl", "show", "-p", "MainPID", "--value", unit])
            .parse()
            .unwrap_or(0)
    }
}

impl Drop for Box_ {
    fn drop(&mut self) {
        let _ = sh(&format!("docker rm -f {}", self.name));
    }
}

#[test]
fn install_and_uninstall_in_a_real_systemd() {
    if !sh("docker info").status.success() {
        skip_or_fail("no Docker Engine to run the systemd container");
        return;
    }
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("not root");
        return;
    }
    if let Err(e) = ensure_image() {
        skip_or_fail(&e);
        return;
    }
    let hub = Hub::start();
    let token = hub.token(&["--labels", "site=sysd"]);
    let b = Box_::start();
    let bin = "/opt/outpost/outpost";

    // install: joins, writes, enables and starts the unit
    let first = b.ok(&[
        bin, "agent", "install", "--hub", &hub.url, "--token", &token, "--name", "sysd-box",
    ]);
    assert!(
        first.contains("joined") && first.contains("enabled outpost-agent.service"),
        "{first}"
    );
    assert_eq!(b.out(&["systemctl", "is-enabled", "outpost-agent"]), "enabled");
    assert_eq!(b.out(&["systemctl", "is-active", "outpost-agent"]), "active");
    let unit = b.ok(&["cat", "/etc/systemd/system/outpost-agent.service"]);
    for want in [
        "ExecStart=/usr/local/bin/outpost agent run --data-dir /var/lib/outpost/agent",
        "Restart=always",
        "KillMode=process",
        "LimitNOFILE=65536",
        "MemoryMax=256M",
    ] {
        assert!(unit.contains(want), "{want}:\n{unit}");
    }
    assert_eq!(
        b.out(&["systemctl", "show", "-p", "LimitNOFILE", "--value", "outpost-agent"]),
        "65536"
    );
    wait_for("the node reports to the hub", 30.0, || {
        hub.node("sysd-box").filter(|n| n["status"] == "Online")
    });
    let m = marker();
    hub.apply(&sleeper_ds("in-box", &m, "      nodeSelector: {site: sysd}\n"));
    let workload = || b.out(&["pgrep", "-f", &format!("^/bin/sleep {m}$")]);
    let w1 = wait_for("the workload runs under the service", 30.0, || {
        Some(workload()).filter(|p| !p.is_empty())
    });

    // install again: nothing changes, nothing restarts
    let pid = b.main_pid("outpost-agent");
    let mtime = b.ok(&["stat", "-c", "%Y", "/etc/systemd/system/outpost-agent.service"]);
    let second = b.ok(&[
        bin, "agent", "install", "--hub", &hub.url, "--token", &token, "--name", "sysd-box",
    ]);
    assert!(second.contains("nothing changed"), "{second}");
    assert_eq!(b.main_pid("outpost-agent"), pid);
    assert_eq!(
        b.ok(&["stat", "-c", "%Y", "/etc/systemd/system/outpost-agent.service"]),
        mtime
    );

    // Restart=always: a killed agent comes back by itself; its workload is adopted, not restarted
    b.ok(&["kill", "-9", &pid.to_string()]);
    wait_for("systemd restarted the agent", 30.0, || {
        let p = b.main_pid("outpost-agent");
        (p != 0 && p != pid).then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(workload(), w1, "the workload kept running across the agent's restart");

    // uninstall: service gone, workloads stopped, data kept; twice is fine; --purge deletes data
    let u = b.ok(&[bin, "agent", "uninstall"]);
    assert!(u.contains("removed outpost-agent.service"), "{u}");
    assert!(
        b.exec(&["test", "-e", "/etc/systemd/system/outpost-agent.service"])
            .status
            .code()
            == Some(1)
    );
    assert_ne!(b.out(&["systemctl", "is-active", "outpost-agent"]), "active");
    wait_for("the workload stopped", 20.0, || workload().is_empty().then_some(()));
    assert!(b
        .exec(&["test", "-e", "/var/lib/outpost/agent/identity.json"])
        .status
        .success());
    let again = b.ok(&[bin, "agent", "uninstall"]);
    assert!(again.contains("nothing changed"), "{again}");
    b.ok(&[bin, "agent", "uninstall", "--purge"]);
    assert!(!b.exec(&["test", "-e", "/var/lib/outpost/agent"]).status.success());

    // the hub as a service too
    let port = 20000 + (std::process::id() % 10000) as u16 + 5000;
    let listen = format!("127.0.0.1:{port}");
    let h = b.ok(&[bin, "hub", "install", "--", "--listen", &listen]);
    assert!(h.contains("started outpost-hub.service"), "{h}");
    assert_eq!(b.out(&["systemctl", "is-active", "outpost-hub"]), "active");
    assert!(b
        .ok(&["cat", "/etc/systemd/system/outpost-hub.service"])
        .contains("LimitNOFILE=1048576"));
    wait_for("the installed hub listens", 30.0, || {
        std::net::TcpStream::connect(&listen).ok()
    });
    let h2 = b.ok(&[bin, "hub", "install", "--", "--listen", &listen]);
    assert!(h2.contains("nothing changed"), "{h2}");
    b.ok(&[bin, "hub", "uninstall", "--purge"]);
    assert!(!b.exec(&["test", "-e", "/var/lib/outpost/hub"]).status.success());
}
