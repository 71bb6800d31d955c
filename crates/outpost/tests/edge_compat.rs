//! Kubernetes fields edge workloads need, on real processes and real containers with a real
//! hub and agents: securityContext (uid/gid, capabilities, no_new_privs), the downward API,
//! PersistentVolumeClaims across revisions and agent restarts, the articles' AGV node affinity,
//! hostNetwork/capabilities/devices in Docker, CronJobs on the node's clock with the hub down,
//! node ports assigned by the hub, and `--privileged deny`.

mod common;

use common::*;

fn status_field(pid: u32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{field}:")))
        .map(|l| l[field.len() + 1..].trim().to_string())
        .unwrap_or_default()
}

fn cap_bit(hex: &str, cap: u32) -> bool {
    u64::from_str_radix(hex, 16).unwrap() & (1 << cap) != 0
}

fn environ(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_RAW: u32 = 13;
const CAP_SYS_ADMIN: u32 = 21;

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").is_err(), "these tests need root under CI");
        eprintln!("skipping: needs root (uid/gid switches and capabilities)");
    }
    root
}

#[test]
fn process_security_context_and_downward_api_are_real() {
    if !root() {
        return;
    }
    let hub = Hub::start();
    let token = hub.token(&["--labels", "site=edge-1"]);
    let _agent = hub.join("box-1", &token).running();
    let (m1, m2) = (marker(), marker());
    hub.apply(&format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: sec}}
spec:
  template:
    metadata: {{labels: {{app: sec, tier: edge}}, annotations: {{owner: ops}}}}
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      securityContext: {{runAsUser: 65534, runAsGroup: 65534}}
      containers:
      - name: nobody
        image: 'sleeper:1'
        command: [/bin/sleep, '{m1}']
        securityContext:
          allowPrivilegeEscalation: false
          capabilities: {{drop: [ALL], add: [NET_BIND_SERVICE]}}
        resources: {{limits: {{cpu: 250m, memory: 64Mi}}}}
        env:
        - {{name: NODE_NAME, valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}}}
        - {{name: HOST_IP, valueFrom: {{fieldRef: {{fieldPath: status.hostIP}}}}}}
        - {{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}
        - {{name: POD_NS, valueFrom: {{fieldRef: {{fieldPath: metadata.namespace}}}}}}
        - {{name: TIER, valueFrom: {{fieldRef: {{fieldPath: \"metadata.labels['tier']\"}}}}}}
        - {{name: OWNER, valueFrom: {{fieldRef: {{fieldPath: \"metadata.annotations['owner']\"}}}}}}
        - {{name: CPU_M, valueFrom: {{resourceFieldRef: {{resource: limits.cpu, divisor: 1m}}}}}}
        - {{name: MEM_MI, valueFrom: {{resourceFieldRef: {{resource: limits.memory, divisor: 1Mi}}}}}}
      - name: rootless-raw
        image: 'sleeper:1'
        command: [/bin/sleep, '{m2}']
        securityContext: {{runAsUser: 0, capabilities: {{drop: [NET_RAW, SYS_ADMIN]}}}}
"
    ));
    let p1 = wait_for("the nobody container", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m1]).first().copied()
    });
    let p2 = wait_for("the root container", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m2]).first().copied()
    });
    // runAsUser/runAsGroup are the real ids
    assert!(
        status_field(p1, "Uid").starts_with("65534\t65534\t65534"),
        "{}",
        status_field(p1, "Uid")
    );
    assert!(
        status_field(p1, "Gid").starts_with("65534\t65534\t65534"),
        "{}",
        status_field(p1, "Gid")
    );
    // drop ALL + add NET_BIND_SERVICE: exactly that one capability, effective for a non-root user
    let eff = status_field(p1, "CapEff");
    assert!(cap_bit(&eff, CAP_NET_BIND_SERVICE), "CapEff {eff}");
    assert!(
        !cap_bit(&eff, CAP_NET_RAW) && !cap_bit(&eff, CAP_SYS_ADMIN),
        "CapEff {eff}"
    );
    assert_eq!(status_field(p1, "NoNewPrivs"), "1");
    // root with NET_RAW and SYS_ADMIN dropped: gone from effective and bounding sets
    assert!(status_field(p2, "Uid").starts_with("0\t"));
    let (eff, bnd) = (status_field(p2, "CapEff"), status_field(p2, "CapBnd"));
    assert!(
        !cap_bit(&eff, CAP_NET_RAW) && !cap_bit(&bnd, CAP_NET_RAW),
        "CapEff {eff} CapBnd {bnd}"
    );
    assert!(
        !cap_bit(&eff, CAP_SYS_ADMIN) && !cap_bit(&bnd, CAP_SYS_ADMIN),
        "CapEff {eff} CapBnd {bnd}"
    );
    assert!(
        cap_bit(&eff, CAP_NET_BIND_SERVICE),
        "root keeps what it did not drop: {eff}"
    );
    // the downward API
    let env = environ(p1);
    let has = |kv: &str| assert!(env.iter().any(|e| e == kv), "{kv} not in {env:?}");
    has("NODE_NAME=box-1");
    has("POD_NAME=sec-box-1");
    has("POD_NS=default");
    has("TIER=edge");
    has("OWNER=ops");
    has("CPU_M=250");
    has("MEM_MI=64");
    let host_ip = env.iter().find_map(|e| e.strip_prefix("HOST_IP=")).unwrap().to_string();
    let ip: std::net::IpAddr = host_ip.parse().expect("HOST_IP is an address");
    // it is one of this machine's addresses
    assert!(
        std::net::UdpSocket::bind((ip, 0)).is_ok(),
        "{ip} is not an address of this host"
    );
    // describe says the workload is privileged (capabilities added)
    let d = hub.cli(&["describe", "daemonset", "sec"]);
    assert!(
        d.contains("Privileged:") && d.contains("adds capabilities NET_BIND_SERVICE"),
        "{d}"
    );
}

#[test]
fn pvc_data_survives_a_revision_change_and_an_agent_restart() {
    if !root() {
        return;
    }
    let hub = Hub::start();
    let token = hub.token(&["--labels", "site=edge-1"]);
    let mut agent = hub.join("box-1", &token).running();
    let m = marker();
    let manifest = |rev: &str| {
        format!(
            "apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: data}}
spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: keeper}}
spec:
  minReadySeconds: 1
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: 'keeper:1'
        command: [/bin/sh, -c, 'echo {rev} >> /var/lib/keeper/log; exec /bin/sleep {m}']
        env: [{{name: REV, value: '{rev}'}}]
        volumeMounts: [{{name: data, mountPath: /var/lib/keeper}}]
      volumes: [{{name: data, persistentVolumeClaim: {{claimName: data}}}}]
"
        )
    };
    // a workload naming a claim that does not exist is refused at apply
    let err = hub.apply_err(
        &manifest("r1")
            .split("---\n")
            .nth(1)
            .unwrap()
            .replace("keeper", "orphan"),
    );
    assert!(
        err.contains("PersistentVolumeClaim default/data does not exist"),
        "{err}"
    );
    hub.apply(&manifest("r1"));
    let log = agent.dir.join("volumes/default/data/log");
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_for("revision 1 wrote into the claim", 30.0, || {
        (read() == "r1\n").then_some(())
    });
    hub.apply(&manifest("r2"));
    wait_for("revision 2 appended to the same claim", 30.0, || {
        (read() == "r1\nr2\n").then_some(())
    });
    let pid = wait_for("revision 2 running", 10.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });
    // an agent restart adopts the process (no third line) and keeps the data
    agent.kill9();
    agent.start();
    wait_for("the agent is back", 30.0, || {
        agent.log().contains("re-adopted running process").then_some(())
    });
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m]), vec![pid]);
    // as after a reboot: workload and agent gone, then the agent starts the workload again
    agent.kill9();
    runtime_kill(pid);
    agent.start();
    wait_for("the workload ran again on the kept data", 30.0, || {
        (read() == "r1\nr2\nr2\n").then_some(())
    });
    // deleting the claim while a workload uses it is refused
    let err = hub.cli_err(&["delete", "persistentvolumeclaim", "data"]);
    assert!(err.contains("keeper") || err.contains("in use"), "{err}");
}

fn runtime_kill(pid: u32) {
    // SAFETY: kill(2) on a process group this test owns.
    unsafe { libc::kill(-(pid as i32), libc::SIGKILL) };
}

#[test]
fn agv_affinity_snippet_schedules_only_onto_the_labelled_zone() {
    let hub = Hub::start();
    let floor = hub.token(&["--labels", "topology.kubernetes.io/zone=factory-floor-1"]);
    let office = hub.token(&["--labels", "topology.kubernetes.io/zone=office"]);
    let none = hub.token(&[]);
    let _a = hub.join("floor-box", &floor).running();
    let _b = hub.join("office-box", &office).running();
    let _c = hub.join("bare-box", &none).running();
    for n in ["floor-box", "office-box", "bare-box"] {
        wait_for("nodes online", 20.0, || hub.node(n));
    }
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/examples/edge-compat/agv-scheduler.yaml"
    );
    let Ok(seed) = std::fs::read_to_string(path) else {
        assert!(
            std::env::var("CI").is_err(),
            "shared/examples must be beside the checkout under CI"
        );
        return;
    };
    // three replicas: only one node may run them
    let seed = seed.replace("replicas: 1", "replicas: 3");
    hub.apply(&seed);
    let key = "deployment/default/agv-scheduler";
    wait_for("placed on the factory floor", 20.0, || hub.placement("floor-box", key));
    let all = hub.json(&["get", "workloads"]);
    let nodes: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["key"] == key)
        .map(|p| p["node"].as_str().unwrap())
        .collect();
    assert_eq!(nodes, vec!["floor-box"], "{all}");
    // NotIn and DoesNotExist exclude the labelled nodes
    hub.apply(&format!(
        "{}\n",
        sleeper_ds("not-floor", &marker(), "")
            .replace(
                "      runtimeClassName: process\n",
                "      runtimeClassName: process\n      affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchExpressions: [{key: topology.kubernetes.io/zone, operator: NotIn, values: [factory-floor-1]}]}]}}}\n"
            )
    ));
    let key = "daemonset/default/not-floor";
    wait_for("placed", 20.0, || hub.placement("office-box", key));
    wait_for("placed", 20.0, || hub.placement("bare-box", key));
    assert!(hub.placement("floor-box", key).is_none());
}

#[test]
fn node_ports_are_assigned_and_collisions_refused() {
    let hub = Hub::start();
    let svc = |name: &str, node_port: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, selector: {{app: {name}}}, ports: [{{port: 80{node_port}}}]}}\n"
        )
    };
    hub.apply(&svc("first", ""));
    let err = hub.apply_err(&svc("second", ", nodePort: 30000"));
    assert!(
        err.contains("30000/TCP is already used by Service/default/first"),
        "{err}"
    );
    hub.apply(&svc("second", ""));
    hub.apply(&svc("first", ""));
    let err = hub.apply_err(&svc("third", ", nodePort: 30001"));
    assert!(err.contains("already used by Service/default/second"), "{err}");
}

#[test]
fn privileged_workloads_can_be_forbidden_fleet_wide() {
    let hub = Hub::start_with(&["--privileged", "deny"], &[]);
    let err = hub.apply_err(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: net}\nspec:\n  template:\n    spec:\n      hostNetwork: true\n      containers: [{name: c, image: 'app:1'}]\n",
    );
    assert!(
        err.contains("spec.template.spec.hostNetwork") && err.contains("--privileged deny"),
        "{err}"
    );
    let err = hub.apply_err(
        "apiVersion: batch/v1\nkind: CronJob\nmetadata: {name: cj}\nspec:\n  schedule: '@hourly'\n  jobTemplate:\n    spec:\n      template:\n        spec:\n          restartPolicy: Never\n          containers: [{name: c, image: 'app:1', securityContext: {privileged: true}}]\n",
    );
    assert!(err.contains("securityContext.privileged"), "{err}");
    // an ordinary workload is fine
    hub.apply("apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: plain}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: 'app:1'}]\n");
}

#[test]
fn cronjob_fires_on_the_minute_offline_and_forbid_holds() {
    let hub_dir = tempfile::tempdir().unwrap();
    let mut hub = Hub::start();
    let token = hub.token(&[]);
    let agent = hub.join("box-1", &token).running();
    let out = hub_dir.path().join("cron");
    hub.apply(&format!(
        "apiVersion: batch/v1
kind: CronJob
metadata: {{name: tick}}
spec:
  schedule: '* * * * *'
  timeZone: Asia/Shanghai
  concurrencyPolicy: Forbid
  successfulJobsHistoryLimit: 1
  jobTemplate:
    spec:
      backoffLimit: 0
      template:
        spec:
          runtimeClassName: process
          restartPolicy: Never
          containers:
          - name: run
            image: 'tick:1'
            command: [/bin/sh, -c, 'd={}; date +%s >> $d/runs; if [ -e $d/running ]; then echo OVERLAP >> $d/runs; fi; touch $d/running; sleep 75; rm $d/running']
",
        out.display()
    ));
    std::fs::create_dir_all(&out).unwrap();
    // the node holds the CronJob: take the hub away, the node runs it on its own clock
    let workloads = agent.dir.join("workloads");
    wait_for("the CronJob reached the node", 30.0, || {
        std::fs::read_dir(&workloads)
            .ok()?
            .flatten()
            .any(|d| d.path().join("job.json").exists())
            .then_some(())
    });
    hub.kill();
    let runs = || std::fs::read_to_string(out.join("runs")).unwrap_or_default();
    // first fire within a minute, second run two minutes later (the one in between is
    // skipped: the first is still running), never two at once
    wait_for("two runs", 200.0, || (runs().lines().count() >= 2).then_some(()));
    let text = runs();
    assert!(!text.contains("OVERLAP"), "{text}");
    let times: Vec<i64> = text.lines().map(|l| l.parse().unwrap()).collect();
    for t in &times {
        assert!(t % 60 < 10, "a run started {} s after its minute: {text}", t % 60);
    }
    let gap = times[1] - times[0];
    assert!((115..=125).contains(&gap), "runs {gap} s apart: {text}");
    let log = agent.log();
    assert!(log.contains("concurrencyPolicy: Forbid"), "the skipped run is logged");
}

/// A busybox image with the applets these tests use (`local/edge-tools:1`).
fn tools_image() -> &'static str {
    let name = "local/edge-tools:1";
    let have = std::process::Command::new("docker")
        .args(["image", "inspect", name])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("bin")).unwrap();
        std::fs::create_dir_all(dir.path().join("www")).unwrap();
        std::fs::copy("/bin/busybox", dir.path().join("bin/busybox")).expect("busybox-static provides /bin/busybox");
        for a in ["sh", "httpd", "sleep", "test", "cat", "echo", "touch"] {
            std::os::unix::fs::symlink("busybox", dir.path().join("bin").join(a)).unwrap();
        }
        std::fs::write(dir.path().join("www/index.html"), "host-network").unwrap();
        let o = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "tar -C {} -c . | docker import -c 'ENV PATH=/bin' - {name}",
                    dir.path().display()
                ),
            ])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    name
}

fn container_pid(label_workload: &str) -> Option<u32> {
    let o = std::process::Command::new("docker")
        .args([
            "ps",
            "-q",
            "--filter",
            &format!("label=outpost.workload={label_workload}"),
        ])
        .output()
        .ok()?;
    let id = String::from_utf8_lossy(&o.stdout).lines().next()?.to_string();
    let o = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.State.Pid}}", &id])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

fn http_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    write!(s, "GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

#[test]
fn docker_host_network_capabilities_user_and_devices() {
    if !docker_ready() {
        return;
    }
    let image = tools_image();
    let hub = Hub::start();
    let token = hub.token(&[]);
    let _agent = hub.join("box-1", &token).running();
    let port = 20000 + (std::process::id() % 5000) as u16;
    hub.apply(&format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: hostnet}}
spec:
  template:
    spec:
      hostNetwork: true
      terminationGracePeriodSeconds: 1
      containers:
      - name: web
        image: {image}
        command: [httpd, -f, -p, '127.0.0.1:{port}', -h, /www]
        securityContext:
          runAsUser: 1000
          runAsGroup: 1000
          capabilities: {{drop: [NET_RAW]}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: device}}
spec:
  template:
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: {image}
        command: [sh, -c, 'test -c /dev/serial0 && echo ok > /dev/serial0 && touch /ok && exec sleep 3600']
        volumeMounts: [{{name: tty, mountPath: /dev/serial0}}]
        readinessProbe: {{exec: {{command: [test, -e, /ok]}}, periodSeconds: 1}}
      volumes: [{{name: tty, hostPath: {{path: /dev/null, type: CharDevice}}}}]
"
    ));
    // the container binds a host port itself: no port publishing, the host network
    let page = wait_for("the hostNetwork container answers on the host", 60.0, || http_get(port));
    assert!(page.contains("host-network"), "{page}");
    let pid = wait_for("container pid", 30.0, || container_pid("daemonset/default/hostnet"));
    assert!(
        status_field(pid, "Uid").starts_with("1000\t"),
        "{}",
        status_field(pid, "Uid")
    );
    assert!(
        status_field(pid, "Gid").starts_with("1000\t"),
        "{}",
        status_field(pid, "Gid")
    );
    let bnd = status_field(pid, "CapBnd");
    assert!(!cap_bit(&bnd, CAP_NET_RAW), "NET_RAW dropped: CapBnd {bnd}");
    let netns = |p: u32| std::fs::read_link(format!("/proc/{p}/ns/net")).unwrap();
    assert_eq!(
        netns(pid),
        netns(std::process::id()),
        "shares the host's network namespace"
    );
    // a character device hostPath is usable inside the container (device cgroup allows it)
    wait_for("the device container is ready", 60.0, || {
        hub.placement("box-1", "daemonset/default/device")
            .filter(|p| p["status"]["ready"] == true)
    });
}

/// An agent in single-box mode (`agent run --manifests DIR`), killed on drop.
struct LocalAgent {
    child: std::process::Child,
}

impl LocalAgent {
    fn start(data: &std::path::Path, manifests: &std::path::Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let child = outpost_under::<&str>(&[])
            .args([
                "agent",
                "run",
                "--name",
                "solo",
                "--labels",
                "site=shop-1",
                "--data-dir",
            ])
            .arg(data)
            .arg("--manifests")
            .arg(manifests)
            .env("OUTPOST_LOG", "info")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        LocalAgent { child }
    }
    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LocalAgent {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn local_app(marker: &str, extra: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: app}}
spec:
  minReadySeconds: 1
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      nodeSelector: {{site: shop-1}}
      containers:
      - name: main
        image: 'app:1'
        command: [/bin/sh, -c, '{extra}exec /bin/sleep {marker}']
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: elsewhere}}
spec:
  template:
    spec:
      runtimeClassName: process
      nodeSelector: {{site: shop-2}}
      containers: [{{name: main, image: 'app:1', command: [/bin/sleep, '{marker}9']}}]
"
    )
}

#[test]
fn single_box_mode_runs_supervises_rolls_back_and_later_joins_a_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (data, manifests) = (dir.path().join("agent"), dir.path().join("manifests"));
    std::fs::create_dir_all(&manifests).unwrap();
    let (m1, m2) = (marker(), marker());
    std::fs::write(manifests.join("app.yaml"), local_app(&m1, "")).unwrap();
    let mut agent = LocalAgent::start(&data, &manifests);
    let p1 = wait_for("the local workload runs with no hub", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m1]).first().copied()
    });
    // only what selects this node runs
    assert!(pids_with_cmdline(&["/bin/sleep", &format!("{m1}9")]).is_empty());
    // supervised: killed, it comes back
    runtime_kill(p1);
    let p1b = wait_for("restarted after a crash", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m1])
            .first()
            .copied()
            .filter(|p| *p != p1)
    });
    // status is kept on the box
    let status = || std::fs::read_to_string(data.join("status.json")).unwrap_or_default();
    wait_for("status.json", 20.0, || {
        status().contains("local/daemonset/default/app").then_some(())
    });
    // a change of the directory is a new revision
    std::fs::write(manifests.join("app.yaml"), local_app(&m2, "")).unwrap();
    wait_for("the new revision replaced the old", 30.0, || {
        (pids_with_cmdline(&["/bin/sleep", &m1]).is_empty() && !pids_with_cmdline(&["/bin/sleep", &m2]).is_empty())
            .then_some(())
    });
    assert!(!pids_with_cmdline(&["/bin/sleep", &m1]).contains(&p1b));
    wait_for("revision 2 became last-known-good", 30.0, || {
        status().contains("\"Complete\"").then_some(())
    });
    // a broken revision is rolled back on the box, by the box
    std::fs::write(manifests.join("app.yaml"), local_app(&m2, "exit 3; ")).unwrap();
    wait_for("rolled back to revision 2", 90.0, || {
        status().contains("RolledBack").then_some(())
    });
    wait_for("revision 2 runs again", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m2]).first().copied()
    });
    // a broken file is refused; what runs keeps running
    std::fs::write(
        manifests.join("typo.yaml"),
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: bad}\nspec: {replicas: x}\n",
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        log.contains("the manifest directory is refused") && log.contains("typo.yaml"),
        "{log}"
    );
    std::fs::remove_file(manifests.join("typo.yaml")).unwrap();
    std::fs::write(manifests.join("app.yaml"), local_app(&m2, "")).unwrap();
    let p2 = wait_for("revision 2 running", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m2]).first().copied()
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    let p2 = pids_with_cmdline(&["/bin/sleep", &m2]).first().copied().unwrap_or(p2);

    // Later the box joins a hub: its local workload is kept (adopted, not restarted) and the
    // hub's workloads run beside it.
    agent.kill9();
    let hub = Hub::start();
    let token = hub.token(&["--labels", "site=shop-1"]);
    let o = outpost_under::<&str>(&[])
        .args([
            "agent",
            "join",
            "--hub",
            &hub.url,
            "--token",
            &token,
            "--name",
            "solo",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let _agent = LocalAgent::start(&data, &manifests);
    let m3 = marker();
    hub.apply(&sleeper_ds("from-hub", &m3, ""));
    wait_for("the hub's workload runs", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m3]).first().copied()
    });
    wait_for("the hub knows the node", 20.0, || hub.node("solo"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(
        pids_with_cmdline(&["/bin/sleep", &m2]),
        vec![p2],
        "the local workload was not restarted"
    );
}

#[test]
fn https_probes_and_config_map_items() {
    let hub = Hub::start();
    let token = hub.token(&[]);
    let agent = hub.join("box-1", &token).running();
    let port = hub.url.rsplit(':').next().unwrap().trim_end_matches('/').to_string();
    let m = marker();
    // the hub itself is an HTTPS server with a certificate the probe cannot verify: an HTTPS
    // probe passes anyway (as the kubelet's do); configMap items pick and rename keys
    hub.apply(&format!(
        "apiVersion: v1
kind: ConfigMap
metadata: {{name: cfg}}
data: {{Corefile: 'a', Other: 'b'}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: tls}}
spec:
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      containers:
      - name: main
        image: 'app:1'
        command: [/bin/sleep, '{m}']
        readinessProbe: {{httpGet: {{scheme: HTTPS, port: {port}, path: /v1/ca}}, periodSeconds: 1}}
        volumeMounts: [{{name: cfg, mountPath: {dir}/cfg}}]
      volumes: [{{name: cfg, configMap: {{name: cfg, items: [{{key: Corefile, path: main.conf}}]}}}}]
",
        dir = agent.dir.display()
    ));
    wait_for("ready through an HTTPS probe", 30.0, || {
        hub.placement("box-1", "daemonset/default/tls")
            .filter(|p| p["status"]["ready"] == true)
    });
    let files = agent.dir.join("workloads/daemonset_default_tls/volumes/cfg");
    let mut names: Vec<String> = std::fs::read_dir(&files)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    assert_eq!(names, vec!["main.conf"]);
    assert_eq!(std::fs::read_to_string(files.join("main.conf")).unwrap(), "a");
    // an item naming a key the ConfigMap lacks is refused at apply
    let err = hub.apply_err(
        "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: bad}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: 'app:1'}]\n      volumes: [{name: v, configMap: {name: cfg, items: [{key: NodeHosts, path: hosts}]}}]\n",
    );
    assert!(err.contains("ConfigMap default/cfg has no key \"NodeHosts\""), "{err}");
}

#[test]
fn init_containers_run_first_and_not_again_after_an_agent_restart() {
    let hub = Hub::start();
    let token = hub.token(&[]);
    let mut agent = hub.join("box-1", &token).running();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display().to_string();
    let m = marker();
    hub.apply(&format!(
        "apiVersion: apps/v1
kind: DaemonSet
metadata: {{name: ordered}}
spec:
  template:
    spec:
      runtimeClassName: process
      terminationGracePeriodSeconds: 1
      initContainers:
      - name: prepare
        image: 'app:1'
        command: [/bin/sh, -c, 'sleep 1; echo prepared >> {d}/order']
      - name: then
        image: 'app:1'
        command: [/bin/sh, -c, 'echo then >> {d}/order']
      containers:
      - name: main
        image: 'app:1'
        command: [/bin/sh, -c, 'cat {d}/order > {d}/seen; exec /bin/sleep {m}']
"
    ));
    let pid = wait_for("the container started after its init container", 30.0, || {
        pids_with_cmdline(&["/bin/sleep", &m]).first().copied()
    });
    assert_eq!(
        std::fs::read_to_string(dir.path().join("seen")).unwrap(),
        "prepared\nthen\n"
    );
    wait_for("ready", 30.0, || {
        hub.placement("box-1", "daemonset/default/ordered")
            .filter(|p| p["status"]["ready"] == true)
    });
    agent.kill9();
    agent.start();
    wait_for("the agent adopted the container", 30.0, || {
        agent.log().contains("re-adopted running process").then_some(())
    });
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(pids_with_cmdline(&["/bin/sleep", &m]), vec![pid]);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("order")).unwrap(),
        "prepared\nthen\n",
        "the init container did not run again"
    );
}
