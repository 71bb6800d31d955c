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

/// Print an answer as JSON or YAML (`-o json|yaml`).
pub fn print_value<T: Serialize>(v: &T, f: Format) -> Result<()> {
    print(v, f)
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
            // Site failover (docs/site-ha.md): which box runs the copy.
            let phase = match s.site_role.as_deref() {
                Some("standby") if s.phase == outpost_api::Phase::Running => "Standby (warm)".to_string(),
                Some("standby") => "Standby".to_string(),
                Some(role) => format!("{phase} ({role})"),
                None => phase,
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
        "rollouts" | "rollout" | "ro" => {
            let rs: Vec<outpost_api::RolloutInfo> = c.get("/v1/rollouts").await?;
            if f != Format::Table {
                return print(&rs, f);
            }
            let now = now_ms();
            let rows: Vec<Vec<String>> = rs
                .iter()
                .map(|r| {
                    let open = r.waves.iter().filter(|w| w.state != "Planned").count();
                    vec![
                        r.workload.clone(),
                        r.revision.to_string(),
                        r.phase.as_str().to_string(),
                        format!("{open}/{}", r.waves.len()),
                        counts_text(&r.counts),
                        r.policy.clone(),
                        human_duration(now - r.started_at),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["WORKLOAD", "REVISION", "PHASE", "WAVES", "NODES", "POLICY", "AGE"],
                    &rows
                )
            );
        }
        "pipelines" | "pipeline" | "pl" => return crate::data::get_pipelines(c, f).await,
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
                bail!("cannot list {other:?}: use nodes, deployments, daemonsets, workloads, rollouts, pipelines or alerts");
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

/// `(kind, name)` from `rollout CMD NAME`, `rollout CMD KIND NAME` or `rollout CMD KIND/NAME`.
async fn rollout_object(c: &Client, t: &RolloutTarget) -> Result<(Kind, String)> {
    let named = match (&t.name, t.kind.split_once('/')) {
        (Some(name), _) => Some((t.kind.as_str(), name.as_str())),
        (None, Some((kind, name))) => Some((kind, name)),
        (None, None) => None,
    };
    match named {
        Some((kind, name)) => {
            let Some(k) = Kind::parse_cli(kind).filter(|k| k.is_workload() || k.is_rolled_out()) else {
                bail!("{kind:?} is not a workload kind: use deployment, daemonset, agentupdate or pipeline");
            };
            Ok((k, name.to_string()))
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
    let t = match &cmd {
        RolloutCmd::History(t)
        | RolloutCmd::Pause(t)
        | RolloutCmd::Resume(t)
        | RolloutCmd::Abort(t)
        | RolloutCmd::Undo { target: t, .. }
        | RolloutCmd::Status { target: t, .. } => t,
    };
    let (kind, name) = rollout_object(c, t).await?;
    let base = format!(
        "/v1/objects/{}/{}/{name}",
        kind.as_str().to_ascii_lowercase(),
        t.namespace
    );
    match cmd {
        RolloutCmd::History(_) => {
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
        RolloutCmd::Undo {
            to_revision: Some(n), ..
        } => {
            let r: outpost_api::ApplyResult = c
                .post(
                    &format!("{base}/undo"),
                    &outpost_api::UndoRequest { to_revision: Some(n) },
                )
                .await?;
            println!(
                "{} rolled back ({}, now revision {})",
                r.object,
                r.action,
                r.revision.unwrap_or_default()
            );
        }
        RolloutCmd::Undo { to_revision: None, .. } => {
            let r: outpost_api::RolloutActionResult = c.post(&format!("{base}/rollout/undo"), &()).await?;
            match r.revision {
                Some(n) => println!("{} rolled back (now revision {n}): {}", r.workload, r.message),
                None => println!("{} rolled back: {}", r.workload, r.message),
            }
        }
        RolloutCmd::Pause(_) | RolloutCmd::Resume(_) | RolloutCmd::Abort(_) => {
            let action = match cmd {
                RolloutCmd::Pause(_) => "pause",
                RolloutCmd::Resume(_) => "resume",
                _ => "abort",
            };
            let r: outpost_api::RolloutActionResult = c.post(&format!("{base}/rollout/{action}"), &()).await?;
            println!("{}: {} ({})", r.workload, r.message, r.phase.as_str());
        }
        RolloutCmd::Status { watch, output, .. } => {
            let info = match c.get::<outpost_api::RolloutInfo>(&format!("{base}/rollout")).await {
                Ok(i) => i,
                // No rollout recorded (a hub older than rollouts): the per-node view.
                Err(_) if !watch => return placements_status(c, &base).await,
                Err(e) => return Err(e),
            };
            if watch {
                return watch_rollout(c, &base, info, output).await;
            }
            match output {
                Format::Table => print!("{}", rollout_text(&info, now_ms())),
                f => print(&info, f)?,
            }
        }
    }
    Ok(())
}

/// The per-node view of a workload without a recorded rollout.
async fn placements_status(c: &Client, base: &str) -> Result<()> {
    let w: WorkloadInfo = c.get(base).await?;
    println!(
        "{} {}/{}: revision {}, {} of {} ready",
        w.kind, w.namespace, w.name, w.revision, w.ready, w.desired
    );
    print!(
        "{}",
        indent(&table(PLACEMENT_HEADERS, &placement_rows(std::slice::from_ref(&w))))
    );
    Ok(())
}

/// Is the rollout over (for `-w`)?
fn rollout_done(i: &outpost_api::RolloutInfo) -> bool {
    !matches!(i.phase, outpost_api::RolloutPhase::Progressing)
}

/// How `-w` ends: Complete and Paused succeed, the others fail with the reason.
fn rollout_exit(i: &outpost_api::RolloutInfo) -> Result<()> {
    use outpost_api::RolloutPhase::*;
    match i.phase {
        Complete | Progressing => Ok(()),
        Paused => {
            eprintln!(
                "{} revision {} is paused{}; `outpost rollout resume` goes on",
                i.workload,
                i.revision,
                i.reason.as_ref().map(|r| format!(": {r}")).unwrap_or_default()
            );
            Ok(())
        }
        Failed | RolledBack | Aborted => bail!(
            "the rollout of {} revision {} is {}: {}",
            i.workload,
            i.revision,
            i.phase.as_str(),
            i.reason.clone().unwrap_or_default()
        ),
    }
}

/// A wave's progress: nodes that passed or failed, of its nodes.
fn wave_done(w: &outpost_api::WaveInfo) -> u64 {
    ["Passed", "Failed", "Reverted"]
        .iter()
        .map(|k| u64::from(w.counts.get(*k).copied().unwrap_or(0)))
        .sum()
}

fn counts_text(counts: &std::collections::BTreeMap<String, u32>) -> String {
    use outpost_api::NodeRolloutState::*;
    let parts: Vec<String> = [Pending, Waiting, Queued, Updating, Passed, Failed, Reverted]
        .iter()
        .filter_map(|s| {
            counts
                .get(s.as_str())
                .filter(|n| **n > 0)
                .map(|n| format!("{n} {}", s.as_str()))
        })
        .collect();
    if parts.is_empty() {
        "no nodes".into()
    } else {
        parts.join(", ")
    }
}

fn wave_line(w: &outpost_api::WaveInfo, now: i64) -> String {
    let when = match (w.completed_at, w.gates_done_at, w.opened_at) {
        (Some(t), _, _) => format!("completed {} ago", human_duration(now - t)),
        (None, Some(t), _) => format!(
            "baking, {} left",
            human_duration((t + w.bake_secs as i64 * 1000 - now).max(0))
        ),
        (None, None, Some(t)) => format!("opened {} ago", human_duration(now - t)),
        _ => "not opened".into(),
    };
    format!(
        "wave {} {:<16} {:<9} {:>4} node{}  {}  ({when})",
        w.index + 1,
        w.name,
        w.state,
        w.nodes,
        if w.nodes == 1 { " " } else { "s" },
        counts_text(&w.counts)
    )
}

/// `outpost rollout status NAME` for people.
pub fn rollout_text(i: &outpost_api::RolloutInfo, now: i64) -> String {
    let mut out = format!(
        "{} revision {}: {} (policy {}, from revision {}, started {} ago)\n",
        i.workload,
        i.revision,
        i.phase.as_str(),
        i.policy,
        i.previous_revision.map_or("-".into(), |r| r.to_string()),
        human_duration(now - i.started_at)
    );
    if let Some(r) = &i.reason {
        out.push_str(&format!("Reason:  {r}\n"));
    }
    out.push_str(&format!("Nodes:   {}\n", counts_text(&i.counts)));
    if !i.waves.is_empty() {
        out.push_str("Waves:\n");
        for w in &i.waves {
            out.push_str(&format!("  {}\n", wave_line(w, now)));
        }
    }
    if !i.nodes.is_empty() {
        let rows: Vec<Vec<String>> = i
            .nodes
            .iter()
            .map(|n| {
                vec![
                    n.node.clone(),
                    n.wave.map_or("-".into(), |w| (w + 1).to_string()),
                    n.state.as_str().to_string(),
                    n.desired_revision.to_string(),
                    n.running_revision.map_or("-".into(), |r| r.to_string()),
                    n.gate.map_or("-".into(), |g| format!("{g:?}")),
                    if n.online { "Online".into() } else { "Offline".into() },
                    n.reason.clone().unwrap_or_default(),
                ]
            })
            .collect();
        out.push_str(&table(
            &[
                "NODE",
                "WAVE",
                "STATE",
                "WANTED",
                "RUNNING",
                "GATE",
                "NODE STATUS",
                "REASON",
            ],
            &rows,
        ));
    }
    if let Some(e) = i.events.last() {
        out.push_str(&format!(
            "Last event: {} {} ago: {}\n",
            e.reason,
            human_duration(now - e.at),
            e.message
        ));
    }
    out
}

/// `outpost rollout status NAME -w`: follow until the rollout ends.
async fn watch_rollout(c: &Client, base: &str, mut info: outpost_api::RolloutInfo, f: Format) -> Result<()> {
    use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let json = f != Format::Table;
    let multi = MultiProgress::with_draw_target(if tty && !json {
        ProgressDrawTarget::stdout()
    } else {
        ProgressDrawTarget::hidden()
    });
    let style = ProgressStyle::with_template("{prefix:<28} [{bar:30}] {pos:>4}/{len:<4} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let head = multi.add(ProgressBar::new_spinner());
    let mut bars: Vec<ProgressBar> = Vec::new();
    let mut last = String::new();
    loop {
        let now = now_ms();
        if json {
            let line = serde_json::to_string(&info)?;
            if line != last {
                println!("{line}");
                last = line;
            }
        } else if tty {
            head.set_message(format!(
                "{} revision {}: {} — {}",
                info.workload,
                info.revision,
                info.phase.as_str(),
                counts_text(&info.counts)
            ));
            head.tick();
            for (k, w) in info.waves.iter().enumerate() {
                if bars.len() <= k {
                    let b = multi.add(ProgressBar::new(0));
                    b.set_style(style.clone());
                    bars.push(b);
                }
                let b = &bars[k];
                b.set_prefix(format!("wave {} {}", w.index + 1, w.name));
                b.set_length(u64::from(w.nodes));
                b.set_position(wave_done(w));
                b.set_message(format!("{} {}", w.state, counts_text(&w.counts)));
            }
        } else {
            // Not a terminal: a line per change.
            let line = format!(
                "{} revision {}: {}; {}{}",
                info.workload,
                info.revision,
                info.phase.as_str(),
                counts_text(&info.counts),
                info.waves
                    .iter()
                    .rfind(|w| w.state != "Planned")
                    .map(|w| format!("; {}", wave_line(w, now)))
                    .unwrap_or_default()
            );
            let key = format!("{:?} {:?}", info.phase, info.counts);
            if key != last {
                println!("{line}");
                last = key;
            }
        }
        if rollout_done(&info) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(1000)).await;
        info = c.get(&format!("{base}/rollout")).await?;
    }
    for b in &bars {
        b.finish();
    }
    head.finish();
    if tty && !json {
        drop(multi);
        print!("{}", rollout_text(&info, now_ms()));
    }
    rollout_exit(&info)
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
