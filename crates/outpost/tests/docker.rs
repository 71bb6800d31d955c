//! Docker workloads on a real Docker Engine (started by scripts/test.sh): run, update, automatic
//! rollback to the previous image, NodePort, limits, adoption across an agent restart, a
//! container removed from outside, images delivered through the hub, and the two example
//! manifests from ../shared/examples.

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

const APPLETS: &[&str] = &["sh", "httpd", "sleep", "cat", "echo", "test", "wget", "true"];

fn images() {
    build_image("local/web:1", APPLETS, "v1", &[]);
    build_image("local/web:2", APPLETS, "v2", &[]);
    // a broken release: no httpd in the image, so the container exits at once
    build_image("local/web:3", &["sh", "sleep"], "v3", &[]);
}

fn web(name: &str, image: &str, node_port: u16, extra_spec: &str) -> String {
    format!(
        "apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}}}
spec:
  replicas: 1
  minReadySeconds: 1
{extra_spec}  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      containers:
      - name: web
        image: {image}
        command: [httpd, -f, -p, '8080', -h, /www]
        ports: [{{containerPort: 8080, name: http}}]
        readinessProbe: {{httpGet: {{path: /index.html, port: http}}, periodSeconds: 1}}
        resources: {{limits: {{cpu: 500m, memory: 64Mi}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}}}
spec:
  type: NodePort
  selector: {{app: {name}}}
  ports: [{{port: 8080, targetPort: http, nodePort: {node_port}}}]
"
    )
}

fn get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(2))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains("200 OK")
        .then(|| out.rsplit("\r\n\r\n").next().unwrap_or("").trim().to_string())
}

/// Container ids of a workload on this machine, by the agent's labels.
fn containers_of(key: &str) -> Vec<String> {
    let out = docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=outpost.workload={key}"),
    ]);
    out.lines().map(String::from).collect()
}

fn status(hub: &Hub, node: &str, key: &str) -> Option<Value> {
    hub.placement(node, key)?.get("status").cloned()
}

#[test]
fn run_update_rollback_nodeport_limits_adoption_and_outside_removal() {
    if !docker_ready() {
        return;
    }
    images();
    let hub = Hub::start();
    let t = hub.token(&[]);
    let mut a = hub.join("dock", &t).running();
    let key = "deployment/default/shop";
    hub.apply(&web("shop", "local/web:1", 30081, ""));
    wait_for("v1 served on NodePort 30081", 30.0, || {
        (get(30081)? == "v1").then_some(())
    });
    let st = wait_for("Complete at the hub", 20.0, || {
        let s = status(&hub, "dock", key)?;
        (s["rollout"]["state"] == "Complete" && s["ready"] == true).then_some(s)
    });
    assert_eq!(st["phase"], "Running");
    // limits reach the engine
    let ids = containers_of(key);
    assert_eq!(ids.len(), 1);
    let inspect = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}}",
        &ids[0],
    ]);
    assert_eq!(inspect, "67108864 500000000");

    // update to v2, then a broken v3 rolls back to v2 by itself
    hub.apply(&web("shop", "local/web:2", 30081, ""));
    wait_for("v2 served", 30.0, || (get(30081)? == "v2").then_some(()));
    wait_for("v2 Complete", 20.0, || {
        (status(&hub, "dock", key)?["rollout"]["state"] == "Complete").then_some(())
    });
    hub.apply(&web("shop", "local/web:3", 30081, ""));
    let st = wait_for("v3 rolled back", 40.0, || {
        let s = status(&hub, "dock", key)?;
        (s["rollout"]["state"] == "RolledBack" && s["rollout"]["target_revision"] == 3).then_some(s)
    });
    assert_eq!(st["revision"], 2, "{st}");
    let reason = st["rollout"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("\"httpd\": executable file not found"),
        "the engine's reason reaches the hub: {st}"
    );
    wait_for("v2 served again", 20.0, || (get(30081)? == "v2").then_some(()));

    // agent kill -9 + restart: the running container is adopted, same id
    let before = wait_for("one v2 container", 10.0, || {
        Some(containers_of(key)).filter(|c| c.len() == 1)
    });
    a.kill9();
    a.start();
    wait_for("adopted", 15.0, || {
        a.log().contains("re-adopted running container").then_some(())
    });
    assert_eq!(containers_of(key), before, "same container, not restarted");
    assert_eq!(get(30081).as_deref(), Some("v2"));

    // removed from outside: it comes back
    docker(&["rm", "-f", &before[0]]);
    let after = wait_for("a new container", 20.0, || {
        Some(containers_of(key)).filter(|c| c.len() == 1 && c[0] != before[0])
    });
    assert_ne!(after, before);
    wait_for("v2 served again", 20.0, || (get(30081)? == "v2").then_some(()));
    // containers it does not own are left alone
    let foreign = docker(&[
        "run",
        "-d",
        "--label",
        "outpost.unit=deployment/default/shop/web",
        "local/web:1",
        "sleep",
        "300",
    ]);
    a.kill9();
    a.start();
    wait_for("adopted again", 15.0, || {
        (a.log().matches("re-adopted running container").count() >= 2).then_some(())
    });
    assert!(
        docker(&["inspect", "--format", "{{.State.Running}}", &foreign]) == "true",
        "a foreign container is untouched"
    );
    docker(&["rm", "-f", &foreign]);
    hub.cli(&["delete", "deployment", "shop"]);
    wait_for("containers removed", 20.0, || {
        containers_of(key).is_empty().then_some(())
    });
}

#[test]
fn images_come_through_the_hub_and_missing_images_are_reported() {
    if !docker_ready() {
        return;
    }
    images();
    let hub = Hub::start();
    let t = hub.token(&[]);
    let a = hub.join("remote", &t).running();
    // an image only the hub has
    let name = format!("local/hubonly:{}", marker());
    docker(&["tag", "local/web:1", &name]);
    let out = hub.cli(&["image", "push", &name]);
    assert!(out.contains("pushed"), "{out}");
    // pushing the same content again uploads nothing
    let o = hub.try_cli(&["image", "push", &name]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("already has"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let tags = hub.cli(&["image", "ls"]);
    let digest = tags
        .lines()
        .find(|l| l.contains(&name))
        .unwrap()
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    docker(&["rmi", &name]);
    assert!(!has_image(&name));
    // half of the archive is already on the node from a broken download: it resumes
    let blob = Command::new("curl")
        .args(["-sf", "--cacert"])
        .arg(hub.ca_file())
        .args([
            "-H",
            &format!("Authorization: Bearer {}", hub.token.trim()),
            &format!("{}/v1/images/blobs/{digest}", hub.url),
        ])
        .output()
        .unwrap()
        .stdout;
    assert!(blob.len() > 1000, "blob downloaded for the test");
    let hex = digest.trim_start_matches("sha256:");
    std::fs::create_dir_all(a.dir.join("images")).unwrap();
    std::fs::write(a.dir.join(format!("images/{hex}.partial")), &blob[..blob.len() / 2]).unwrap();

    hub.apply(&web("fromhub", &name, 30082, ""));
    wait_for("served from the hub's image", 60.0, || {
        (get(30082)? == "v1").then_some(())
    });
    assert!(
        a.log().contains("resuming image download"),
        "download resumed:\n{}",
        a.log()
    );
    assert!(a.log().contains("image loaded from the hub"));

    // an image that is nowhere: a clear reason, and the other workload keeps running
    hub.apply(&web("ghost", "local/does-not-exist:1", 30083, ""));
    let st = wait_for("ImagePullBackOff reported", 60.0, || {
        let s = status(&hub, "remote", "deployment/default/ghost")?;
        let r = s["containers"][0]["reason"].as_str()?.to_string();
        r.contains("ImagePullBackOff").then_some(r)
    });
    assert!(st.contains("outpost image push local/does-not-exist:1"), "{st}");
    assert_eq!(get(30082).as_deref(), Some("v1"), "the other workload is undisturbed");
    hub.cli(&["delete", "deployment", "fromhub"]);
    hub.cli(&["delete", "deployment", "ghost"]);
    wait_for("containers removed", 20.0, || {
        containers_of("deployment/default/fromhub").is_empty().then_some(())
    });
}

#[test]
fn the_example_manifests_run_as_they_are() {
    if !docker_ready() {
        return;
    }
    images();
    // Local images stand in for the articles' registry images, under the same names.
    build_image(
        "local/edge-infer:1",
        APPLETS,
        "inference ok",
        &[r#"CMD ["httpd", "-f", "-p", "5000", "-h", "/www"]"#],
    );
    build_image(
        "local/video-analyzer:1",
        APPLETS,
        "",
        &[r#"CMD ["sh", "-c", "echo analyzing; ls /data; sleep 100000"]"#],
    );
    docker(&["tag", "local/edge-infer:1", "registry.example.com/edge-infer:v1.0"]);
    docker(&["tag", "local/video-analyzer:1", "my-repo/video-analyzer:v1"]);
    let hub = Hub::start();
    let t = hub.token(&["--labels", "node-role.kubernetes.io/edge=true"]);
    let _a = hub.join("edge-node", &t).running();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/examples");
    if !std::path::Path::new(examples).exists() {
        assert!(
            std::env::var("CI").is_err(),
            "shared/examples must be beside the checkout under CI"
        );
        return;
    }
    let out = hub.cli(&["apply", "-f", examples]);
    assert!(out.contains("Deployment/edge/edge-infer-service created"), "{out}");
    assert!(out.contains("Service/edge/edge-infer-service created"), "{out}");
    assert!(out.contains("Deployment/default/video-analyzer created"), "{out}");
    // seed 002: the inference service answers on NodePort 30001 of the edge node
    wait_for("edge-infer on NodePort 30001", 60.0, || {
        (get(30001)? == "inference ok").then_some(())
    });
    // seed 004: the analyzer runs on the named node with its limits and host path
    let st = wait_for("video-analyzer running", 60.0, || {
        let s = status(&hub, "edge-node", "deployment/default/video-analyzer")?;
        (s["phase"] == "Running").then_some(s)
    });
    assert_eq!(st["containers"][0]["restarts"], 0);
    let ids = containers_of("deployment/default/video-analyzer");
    let inspect = docker(&[
        "inspect",
        "--format",
        "{{.HostConfig.Memory}} {{.HostConfig.NanoCpus}} {{range .Mounts}}{{.Source}}:{{.Destination}}{{end}}",
        &ids[0],
    ]);
    assert_eq!(inspect, "536870912 1000000000 /mnt/videos:/data");
    hub.cli(&["delete", "-f", examples]);
    // a shell as PID 1 ignores SIGTERM: the default 30 s grace period runs out, then SIGKILL
    wait_for("containers removed", 45.0, || {
        containers_of("deployment/default/video-analyzer")
            .is_empty()
            .then_some(())
    });
}
