//! `outpost get` and `outpost describe`: tables for people, stable JSON/YAML for scripts (the
//! hub's API types, unchanged).

use anyhow::{bail, Result};
use outpost_api::{Kind, NodeInfo, Placement, WorkloadInfo};
use serde::Serialize;

use crate::client::Client;
use crate::{Format, RolloutCmd, RolloutTarget};

/// Plain column-aligned table.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}   ", w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(headers.to_vec())];
    for r in rows {
        out.push(line(r.iter().map(String::as_str).collect()));
    }
    out.join("\n") + "\n"
}

use outpost_api::{human_duration, now_ms};

/// How long ago `ms` was: `3s`, `5m`, `2h`, `4d` (outpost's one duration formatter).
pub fn age(ms: Option<i64>) -> String {
    let Some(ms) = ms else { return "-".into() };
    human_duration(now_ms().saturating_sub(ms))
}

/// The volumes of a workload and where each container mounts them, for `describe`. Sensitive
/// host paths are flagged with the reason.
pub fn volumes_text(obj: &outpost_api::Object) -> String {
    use outpost_api::checks::host_path_risk;
    let Some(t) = obj.template() else { return String::new() };
    let pod = &t.spec;
    let privileges = outpost_api::checks::privileges("spec", pod);
    let privileged = if privileges.is_empty() {
        String::new()
    } else {
        let mut p = String::from("Privileged:     yes (outpost hub --privileged deny refuses this)\n");
        for (field, what) in &privileges {
            p.push_str(&format!("  {field}: {what}\n"));
        }
        p
    };
    if pod.volumes.is_empty() {
        return format!("{privileged}Volumes:        <none>\n");
    }
    let rows: Vec<Vec<String>> = pod
        .volumes
        .iter()
        .map(|v| {
            let source = if let Some(h) = &v.host_path {
                let kind = h.type_.as_deref().filter(|t| !t.is_empty()).unwrap_or("Directory");
                format!("hostPath {} ({kind})", h.path)
            } else if let Some(c) = &v.config_map {
                format!("configMap {}{}", c.name, if c.optional { " (optional)" } else { "" })
            } else if let Some(sec) = &v.secret {
                format!(
                    "secret {}{}",
                    sec.secret_name,
                    if sec.optional { " (optional)" } else { "" }
                )
            } else if let Some(p) = &v.persistent_volume_claim {
                format!("persistentVolumeClaim {} (a directory on the node)", p.claim_name)
            } else {
                "emptyDir".into()
            };
            vec![v.name.clone(), source]
        })
        .collect();
    let mut out = privileged;
    out.push_str("Volumes:\n");
    out.push_str(&indent(&table(&["NAME", "SOURCE"], &rows)));
    let mut mounts = Vec::new();
    for c in &pod.containers {
        for m in &c.volume_mounts {
            let host = pod
                .volumes
                .iter()
                .find(|v| v.name == m.name)
                .and_then(|v| v.host_path.as_ref());
            let warning = host
                .and_then(|h| host_path_risk(&h.path, m.read_only))
                .map(|r| format!("WARNING: {r}"))
                .unwrap_or_default();
            mounts.push(vec![
                c.name.clone(),
                m.name.clone(),
                m.mount_path.clone(),
                if m.read_only { "ro".into() } else { "rw".into() },
                warning,
            ]);
        }
    }
    if !mounts.is_empty() {
        out.push_str("Mounts:\n");
        out.push_str(&indent(&table(&["CONTAINER", "VOLUME", "PATH", "MODE", ""], &mounts)));
    }
    out
}

/// `describe node`'s certificate line; `expires_at` and `now` in Unix milliseconds.
fn cert_expiry(expires_at: i64, now: i64) -> String {
    use outpost_hub::error::human_duration;
    let left = expires_at - now;
    if left >= 0 {
        format!(
            "expires in {} (the agent renews it with a third of its life left)",
            human_duration(left)
        )
    } else {
        format!(
            "EXPIRED {} ago; the agent renews it when it next reaches the hub",
            human_duration(-left)
        )
    }
}

fn print<T: Serialize>(v: &T, f: Format) -> Result<()> {
    match f {
        Format::Json => println!("{}", serde_json::to_string_pretty(v)?),
        Format::Yaml => print!("{}", serde_saphyr::to_string(v)?),
        Format::Table => unreachable!("tables are printed by the caller"),
    }
    Ok(())
}

fn labels(l: &std::collections::BTreeMap<String, String>, skip_well_known: bool) -> String {
    let s: Vec<String> = l
        .iter()
        .filter(|(k, _)| !(skip_well_known && k.starts_with("kubernetes.io/")))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if s.is_empty() {
        "<none>".into()
    } else {
        s.join(",")
    }
}

pub fn placement_rows(ws: &[WorkloadInfo]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for w in ws {
        for p in &w.placements {
            rows.push(placement_row(p));
        }
    }
    rows.sort();
    rows
}

fn placement_row(p: &Placement) -> Vec<String> {
    let (phase, restarts, pids, started, reason) = match &p.status {
        Some(s) => {
            let restarts: u32 = s.containers.iter().map(|c| c.restarts).sum();
            let pids: Vec<String> = s
                .containers
                .iter()
                .filter_map(|c| c.pid)
                .map(|p| p.to_string())
                .collect();
            let started = s.containers.iter().filter_map(|c| c.started_at).min();
            let reason = s
                .containers
                .iter()
                .filter_map(|c| c.reason.clone())
                .next()
                .unwrap_or_default();
            let rolled = s.rollout.as_ref().filter(|r| {
                r.target_revision == p.desired_revision
                    && matches!(
                        r.state,
                        outpost_api::RolloutState::RolledBack | outpost_api::RolloutState::Failed
                    )
            });
            let phase = match rolled {
                Some(r) => format!("{:?} (running revision {})", r.state, s.revision),
                None if s.revision != p.desired_revision => format!("{} (updating)", s.phase.as_str()),
                None => s.phase.as_str().to_string(),
            };
            (
                phase,
                restarts.to_string(),
                if pids.is_empty() { "-".into() } else { pids.join(",") },
                age(started),
                reason,
            )
        }
        None => ("Pending".into(), "0".into(), "-".into(), "-".into(), String::new()),
    };
    let phase = if p.node_status == "Online" {
        phase
    } else {
        format!("{phase} (node offline)")
    };
    let reason = if reason.len() > 60 {
        format!("{}...", &reason[..57])
    } else {
        reason
    };
    vec![
        p.node.clone(),
        p.key.clone(),
        p.desired_revision.to_string(),
        phase,
        restarts,
        pids,
        started,
        reason,
    ]
}

pub const PLACEMENT_HEADERS: &[&str] = &[
    "NODE",
    "WORKLOAD",
    "REVISION",
    "PHASE",
    "RESTARTS",
    "PID",
    "AGE",
    "LAST REASON",
];

pub async fn get(c: &Client, what: &str, f: Format) -> Result<()> {
    match what {
        "nodes" | "node" | "no" => {
            let nodes: Vec<NodeInfo> = c.get("/v1/nodes").await?;
            if f != Format::Table {
                return print(&nodes, f);
            }
            let rows: Vec<Vec<String>> = nodes
                .iter()
                .map(|n| {
                    let running = n
                        .workloads
                        .iter()
                        .filter(|w| w.phase == outpost_api::Phase::Running)
                        .count();
                    vec![
                        n.name.clone(),
                        n.status.clone(),
                        format!("{running}/{}", n.workloads.len()),
                        age(n.last_seen),
                        age(Some(n.joined_at)),
                        n.agent_version.clone().unwrap_or_else(|| "-".into()),
                        labels(&n.labels, true),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAME", "STATUS", "RUNNING", "LAST SEEN", "AGE", "VERSION", "LABELS"],
                    &rows
                )
            );
        }
        "alerts" | "alert" => return crate::logs::get_alerts(c, f).await,
        "workloads" | "workload" | "wl" => {
            let ws: Vec<WorkloadInfo> = c.get("/v1/workloads").await?;
            if f != Format::Table {
                let all: Vec<&Placement> = ws.iter().flat_map(|w| &w.placements).collect();
                return print(&all, f);
            }
            print!("{}", table(PLACEMENT_HEADERS, &placement_rows(&ws)));
        }
        other => {
            let Some(kind) = Kind::parse_cli(other).filter(|k| k.is_workload()) else {
                bail!("cannot list {other:?}: use nodes, deployments, daemonsets, workloads or alerts");
            };
            let ws: Vec<WorkloadInfo> = c.get("/v1/workloads").await?;
            let ws: Vec<WorkloadInfo> = ws.into_iter().filter(|w| w.kind == kind).collect();
            if f != Format::Table {
                return print(&ws, f);
            }
            let rows: Vec<Vec<String>> = ws
                .iter()
                .map(|w| {
                    vec![
                        w.namespace.clone(),
                        w.name.clone(),
                        format!("{}/{}", w.ready, w.desired),
                        w.scheduled.to_string(),
                        w.revision.to_string(),
                        format!("{:?}", w.runtime).to_ascii_lowercase(),
                        labels(&w.node_selector, false),
                        age(Some(w.created_at)),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "NAMESPACE",
                        "NAME",
                        "READY",
                        "SCHEDULED",
                        "REVISION",
                        "RUNTIME",
                        "NODE SELECTOR",
                        "AGE"
                    ],
                    &rows
                )
            );
        }
    }
    Ok(())
}

pub async fn describe(c: &Client, kind: &str, name: &str, ns: &str) -> Result<()> {
    if matches!(kind, "node" | "nodes" | "no") {
        let n: NodeInfo = c.get(&format!("/v1/nodes/{name}")).await?;
        println!("Name:           {}", n.name);
        println!("Status:         {} (last seen {} ago)", n.status, age(n.last_seen));
        println!("Joined:         {} ago", age(Some(n.joined_at)));
        println!("Agent version:  {}", n.agent_version.as_deref().unwrap_or("-"));
        println!(
            "Agent uptime:   {}",
            n.uptime_secs.map_or("-".into(), |s| format!("{s}s"))
        );
        println!(
            "Generation:     {} desired, {} applied",
            n.generation, n.applied_generation
        );
        if let Some(exp) = n.cert_expires_at {
            println!("Certificate:    {}", cert_expiry(exp, now_ms()));
        }
        println!("Labels:");
        for (k, v) in &n.labels {
            println!("  {k}={v}");
        }
        println!("Workloads:");
        let rows: Vec<Vec<String>> = n
            .workloads
            .iter()
            .flat_map(|w| {
                w.containers.iter().map(move |ct| {
                    vec![
                        w.key.clone(),
                        ct.name.clone(),
                        w.revision.to_string(),
                        ct.phase.as_str().to_string(),
                        ct.restarts.to_string(),
                        ct.pid.map_or("-".into(), |p| p.to_string()),
                        ct.last_exit_code.map_or("-".into(), |c| c.to_string()),
                        if ct.ready { "yes".into() } else { "no".into() },
                        ct.probe_failure
                            .clone()
                            .or_else(|| ct.reason.clone())
                            .unwrap_or_default(),
                    ]
                })
            })
            .collect();
        print!(
            "{}",
            indent(&table(
                &[
                    "WORKLOAD",
                    "CONTAINER",
                    "REVISION",
                    "PHASE",
                    "RESTARTS",
                    "PID",
                    "LAST EXIT",
                    "READY",
                    "REASON"
                ],
                &rows
            ))
        );
        for w in &n.workloads {
            if let Some(r) = w
                .rollout
                .as_ref()
                .filter(|r| r.state != outpost_api::RolloutState::Complete)
            {
                println!(
                    "Update of {}: {:?} (wanted revision {}, running {}){}",
                    w.key,
                    r.state,
                    r.target_revision,
                    w.revision,
                    r.reason.as_ref().map(|x| format!(": {x}")).unwrap_or_default()
                );
            }
        }
        for c in &n.conditions {
            println!("Condition {} (for {}): {}", c.kind, age(Some(c.since)), c.message);
        }
        print_events(&n.events);
        return Ok(());
    }
    let Some(k) = Kind::parse_cli(kind).filter(|k| k.is_workload()) else {
        bail!("cannot describe {kind:?}: use node, deployment or daemonset");
    };
    let w: WorkloadInfo = c
        .get(&format!("/v1/objects/{}/{ns}/{name}", k.as_str().to_ascii_lowercase()))
        .await?;
    println!("Name:           {}", w.name);
    println!("Namespace:      {}", w.namespace);
    println!("Kind:           {}", w.kind);
    println!("Revision:       {}", w.revision);
    println!("Runtime:        {:?}", w.runtime);
    println!("Node selector:  {}", labels(&w.node_selector, false));
    println!(
        "Replicas:       {} desired, {} scheduled, {} ready",
        w.desired, w.scheduled, w.ready
    );
    if let Some(note) = &w.note {
        println!("Note:           {note}");
    }
    match serde_json::from_value::<outpost_api::Object>(w.manifest.clone()) {
        Ok(obj) => print!("{}", volumes_text(&obj)),
        Err(e) => println!("Volumes:        (cannot read the stored manifest: {e})"),
    }
    println!("Placements:");
    print!(
        "{}",
        indent(&table(PLACEMENT_HEADERS, &placement_rows(std::slice::from_ref(&w))))
    );
    Ok(())
}

/// `(kind, name)` from `rollout status NAME` or `rollout status KIND NAME`.
async fn rollout_object(c: &Client, t: &RolloutTarget) -> Result<(Kind, String)> {
    match &t.name {
        Some(name) => {
            let Some(k) = Kind::parse_cli(&t.kind).filter(|k| k.is_workload()) else {
                bail!("{:?} is not a workload kind: use deployment or daemonset", t.kind);
            };
            Ok((k, name.clone()))
        }
        None => {
            for k in [Kind::Deployment, Kind::DaemonSet] {
                let path = format!(
                    "/v1/objects/{}/{}/{}",
                    k.as_str().to_ascii_lowercase(),
                    t.namespace,
                    t.kind
                );
                if c.get::<serde_json::Value>(&path).await.is_ok() {
                    return Ok((k, t.kind.clone()));
                }
            }
            bail!(
                "no deployment or daemonset named {:?} in namespace {}",
                t.kind,
                t.namespace
            )
        }
    }
}

pub async fn rollout(c: &Client, cmd: RolloutCmd) -> Result<()> {
    let (t, undo_to, what) = match &cmd {
        RolloutCmd::History(t) => (t, None, "history"),
        RolloutCmd::Undo { target, to_revision } => (target, *to_revision, "undo"),
        RolloutCmd::Status(t) => (t, None, "status"),
    };
    let (kind, name) = rollout_object(c, t).await?;
    let base = format!(
        "/v1/objects/{}/{}/{name}",
        kind.as_str().to_ascii_lowercase(),
        t.namespace
    );
    match what {
        "history" => {
            let revs: Vec<outpost_api::RevisionInfo> = c.get(&format!("{base}/revisions")).await?;
            let rows: Vec<Vec<String>> = revs
                .iter()
                .map(|r| {
                    vec![
                        format!("{}{}", r.revision, if r.current { " (current)" } else { "" }),
                        age(Some(r.created_at)),
                        r.template_hash.clone(),
                        r.images.join(","),
                    ]
                })
                .collect();
            print!("{}", table(&["REVISION", "AGE", "TEMPLATE HASH", "IMAGES"], &rows));
        }
        "undo" => {
            let r: outpost_api::ApplyResult = c
                .post(
                    &format!("{base}/undo"),
                    &outpost_api::UndoRequest { to_revision: undo_to },
                )
                .await?;
            println!(
                "{} rolled back ({}, now revision {})",
                r.object,
                r.action,
                r.revision.unwrap_or_default()
            );
        }
        _ => {
            let w: WorkloadInfo = c.get(&base).await?;
            println!(
                "{} {}/{}: revision {}, {} of {} ready",
                w.kind, w.namespace, w.name, w.revision, w.ready, w.desired
            );
            let rows: Vec<Vec<String>> = w
                .placements
                .iter()
                .map(|p| {
                    let s = p.status.as_ref();
                    let ro = s.and_then(|s| s.rollout.as_ref());
                    let state = match (s, ro) {
                        (None, _) => "Pending".to_string(),
                        (Some(_), Some(r)) if r.target_revision != p.desired_revision => "Updating".to_string(),
                        (Some(_), Some(r)) => format!("{:?}", r.state),
                        (Some(s), None) => s.phase.as_str().to_string(),
                    };
                    let reason = ro
                        .and_then(|r| r.reason.clone())
                        .or_else(|| s.and_then(|s| s.containers.iter().find_map(|c| c.probe_failure.clone())))
                        .unwrap_or_default();
                    vec![
                        p.node.clone(),
                        p.node_status.clone(),
                        p.desired_revision.to_string(),
                        s.map_or("-".into(), |s| s.revision.to_string()),
                        state,
                        s.map_or("-".into(), |s| if s.ready { "yes".into() } else { "no".into() }),
                        reason,
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NODE", "NODE STATUS", "WANTED", "RUNNING", "STATE", "READY", "REASON"],
                    &rows
                )
            );
        }
    }
    Ok(())
}

fn print_events(events: &[outpost_api::NodeEvent]) {
    if events.is_empty() {
        return;
    }
    println!("Events:");
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            vec![
                age(Some(e.at)),
                e.reason.clone(),
                e.workload.clone().unwrap_or_default(),
                e.message.clone(),
            ]
        })
        .collect();
    print!("{}", indent(&table(&["AGE", "REASON", "WORKLOAD", "MESSAGE"], &rows)));
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_lists_volumes_and_mounts() {
        let yaml = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: d}\nspec:\n  template:\n    spec:\n      containers:\n      - name: app\n        image: x\n        volumeMounts:\n        - {name: root, mountPath: /host, readOnly: true}\n        - {name: etc, mountPath: /host-etc}\n        - {name: cfg, mountPath: /cfg}\n      volumes:\n      - {name: root, hostPath: {path: /}}\n      - {name: etc, hostPath: {path: /etc, type: DirectoryOrCreate}}\n      - {name: cfg, configMap: {name: app-cfg}}\n      - {name: tmp, emptyDir: {}}\n";
        let obj = outpost_api::parse_file("d.yaml", yaml).unwrap().objects.remove(0);
        let want = "\
Volumes:
  NAME   SOURCE
  root   hostPath / (Directory)
  etc    hostPath /etc (DirectoryOrCreate)
  cfg    configMap app-cfg
  tmp    emptyDir
Mounts:
  CONTAINER   VOLUME   PATH        MODE
  app         root     /host       ro     WARNING: / is the host's whole file system
  app         etc      /host-etc   rw     WARNING: /etc is the host's configuration
  app         cfg      /cfg        rw
";
        assert_eq!(volumes_text(&obj), want);
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["A", "LONGER"],
            &[vec!["xyz".into(), "1".into()], vec!["q".into(), "22".into()]],
        );
        assert_eq!(t, "A     LONGER\nxyz   1\nq     22\n");
    }

    #[test]
    fn certificate_line_compares_milliseconds() {
        let now = 1_700_000_000_000;
        let day = 86_400_000;
        for (expires_at, want) in [
            (now + 90 * day, "expires in 90d "),
            (now + 90 * day - 1, "expires in 89d "),
            (now + 3 * 3600 * 1000, "expires in 3h "),
            (now + 30_000, "expires in 30s "),
            (now - 2 * day, "EXPIRED 2d ago"),
        ] {
            let got = cert_expiry(expires_at, now);
            assert!(got.starts_with(want), "{expires_at}: {got}");
        }
    }
}
