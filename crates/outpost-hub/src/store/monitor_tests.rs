//! The monitoring store's suite ([`MonitorStore`]: alerts, the webhook outbox, leases with
//! fencing, retention), every case on SQLite and on a real PostgreSQL, as in `tests.rs`.

use std::sync::Arc;

use outpost_api::{AlertState, ErrorBatch, ErrorLine, Labels, NodeEvent, RolloutEvent, ALERT_FIRING, ALERT_RESOLVED};
use outpost_core::alerts::{AlertKey, HubAlert, HubTransition};
use outpost_core::lease::{Fence, Timing};
use outpost_core::waves::AlertChange;

use super::*;
use crate::monitor::{MonitorStore, SqliteMonitor, SqliteMonitorStore};

enum Backend {
    Sqlite(tempfile::TempDir),
    Pg(String),
}

impl Backend {
    fn sqlite() -> Backend {
        Backend::Sqlite(tempfile::tempdir().expect("temp dir"))
    }

    fn pg(case: &str) -> Option<Backend> {
        testkit::pg_database(case).map(Backend::Pg)
    }

    /// The main store and a monitoring store on it (a second call: another replica).
    async fn open(&self, hooks: &[&str]) -> (Arc<dyn Store>, Arc<dyn MonitorStore>) {
        let hooks: Vec<String> = hooks.iter().map(|s| s.to_string()).collect();
        match self {
            Backend::Sqlite(d) => {
                let path = d.path().join("hub.db");
                let s = SqliteStore::open(&path).expect("open the store");
                let m = SqliteMonitor::open(&path, hooks).expect("open the monitor");
                (Arc::new(s), Arc::new(SqliteMonitorStore(Arc::new(m))))
            }
            Backend::Pg(url) => {
                let s = PgStore::connect(url).await.expect("open the store");
                let m = s.monitor(hooks);
                (Arc::new(s), Arc::new(m))
            }
        }
    }
}

macro_rules! both {
    ($($case:ident),* $(,)?) => {$(
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() -> anyhow::Result<()> {
                super::$case(super::Backend::sqlite()).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                match super::Backend::pg(stringify!($case)) {
                    Some(b) => super::$case(b).await,
                    None => Ok(()),
                }
            }
        }
    )*};
}

both!(
    node_alerts_transition_once,
    hub_and_fleet_alerts_transition_once,
    outbox_enqueue_claim_retry_deliver,
    resolved_alerts_are_pruned,
    a_stalled_lease_holder_is_fenced_off,
    revisions_past_the_last_n_go_unless_used,
    error_lines_and_vitals_round_trip,
);

fn deployment_image(name: &str, image: &str) -> Vec<Object> {
    let mut objs = outpost_api::parse_file(
        "t.yaml",
        &format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  template:\n    spec:\n      containers: [{{name: c, image: {image}}}]\n"
        ),
    )
    .expect("valid test manifest")
    .objects;
    for o in &mut objs {
        let ns = o.meta().ns().to_string();
        o.meta_mut().namespace = Some(ns);
    }
    objs
}

fn deployment(name: &str) -> Vec<Object> {
    deployment_image(name, "nginx:1")
}

fn rollout(workload: &str, revision: u64, phase: &str) -> anyhow::Result<outpost_core::waves::Rollout> {
    Ok(serde_json::from_value(serde_json::json!({
        "workload": workload, "revision": revision, "phase": phase, "policy": "default",
        "started_at": 1, "updated_at": 2,
    }))?)
}

fn ev(seq: u64, at: i64, firing: bool, msg: &str) -> NodeEvent {
    NodeEvent {
        seq,
        at,
        workload: None,
        reason: if firing { ALERT_FIRING } else { ALERT_RESOLVED }.into(),
        message: msg.into(),
    }
}

fn key(node: &str, name: &str) -> AlertKey {
    AlertKey {
        node: node.into(),
        name: name.into(),
        subject: String::new(),
    }
}

fn fire(node: &str, name: &str, at: i64) -> HubTransition {
    HubTransition::Fire {
        key: key(node, name),
        alert: HubAlert {
            started_at: at,
            summary: format!("{name} on {node}"),
        },
    }
}

async fn node_alerts_transition_once(b: Backend) -> anyhow::Result<()> {
    let (_s, m) = b.open(&["http://a", "http://b"]).await;
    let l = Labels::new();
    let batch = [
        ev(1, 100, true, "NodeCpuHigh: CPU 95%"),
        ev(2, 200, true, "NodeMemoryHigh: 97%"),
        ev(3, 300, false, "NodeCpuHigh: CPU back"),
    ];
    assert_eq!(m.node_report("n", &l, &batch, None, None, 1000).await?.len(), 3);
    assert!(
        m.node_report("n", &l, &batch, None, None, 2000).await?.is_empty(),
        "a resent batch changes nothing"
    );
    let all = m.alerts(true).await?;
    let cpu = all.iter().find(|a| a.name == "NodeCpuHigh").expect("cpu alert");
    assert_eq!(
        (cpu.state, cpu.started_at, cpu.resolved_at),
        (AlertState::Resolved, 100, Some(300))
    );
    assert_eq!(m.alerts(false).await?.len(), 1, "only the memory alert fires");
    assert_eq!(m.hook_queue().await?.1, 6, "3 transitions x 2 URLs");
    m.forget_node("n").await?;
    assert!(m.alerts(true).await?.is_empty());
    // forgetting reset the node's sequence: the same events count again
    assert_eq!(m.node_report("n", &l, &batch[..1], None, None, 3000).await?.len(), 1);
    Ok(())
}

async fn hub_and_fleet_alerts_transition_once(b: Backend) -> anyhow::Result<()> {
    let (_s, m) = b.open(&["http://a"]).await;
    let labels = [("n".to_string(), Labels::from([("site".to_string(), "x".to_string())]))].into();
    let out = m.apply_hub(&[fire("n", "NodeOffline", 10)], &labels, None, 20).await?;
    assert_eq!((out.len(), out[0].labels["site"].as_str()), (1, "x"));
    assert_eq!(
        m.firing_hub_alerts().await?,
        [key("n", "NodeOffline")].into_iter().collect()
    );
    let resolve = HubTransition::Resolve {
        key: key("n", "NodeOffline"),
        at: 50,
    };
    let out = m.apply_hub(&[resolve], &labels, None, 50).await?;
    assert_eq!(
        (out[0].state, out[0].started_at, out[0].resolved_at),
        (AlertState::Resolved, 10, Some(50))
    );
    assert!(m.firing_hub_alerts().await?.is_empty());
    // a fleet alert fires once and resolves once
    let f = AlertChange::Fire("fetch failed".into());
    assert_eq!(
        m.fleet_alert("GitRepoFailing", "default/repo", "gitops", &f, 60)
            .await?
            .len(),
        1
    );
    assert!(m
        .fleet_alert("GitRepoFailing", "default/repo", "gitops", &f, 61)
        .await?
        .is_empty());
    let r = AlertChange::Resolve;
    assert_eq!(
        m.fleet_alert("GitRepoFailing", "default/repo", "gitops", &r, 62)
            .await?
            .len(),
        1
    );
    assert!(m
        .fleet_alert("GitRepoFailing", "default/repo", "gitops", &r, 63)
        .await?
        .is_empty());
    assert_eq!(m.hook_queue().await?.1, 4, "four transitions, one URL");
    Ok(())
}

async fn outbox_enqueue_claim_retry_deliver(b: Backend) -> anyhow::Result<()> {
    let (_s, m) = b.open(&["http://a", "http://b"]).await;
    let l = Labels::new();
    let batch = [ev(1, 100, true, "A: 1"), ev(2, 200, true, "B: 2")];
    m.node_report("n", &l, &batch, None, None, 1000).await?;
    let due = m.claim_hooks(1000, 10, None).await?;
    assert_eq!(due.len(), 4);
    assert!(due.windows(2).all(|w| w[0].id < w[1].id), "oldest first");
    assert_eq!(
        m.claim_hooks(999, 10, None).await?.len(),
        0,
        "nothing due before it was queued"
    );
    // the first row to http://a fails: it and every later row to http://a wait
    let first_a = due.iter().find(|h| h.url == "http://a").expect("a row to a").clone();
    m.hook_retry(first_a.id, "http://a", 1, 5000, None).await?;
    let due = m.claim_hooks(1000, 10, None).await?;
    assert!(due.iter().all(|h| h.url == "http://b"), "http://a waits: {due:?}");
    assert_eq!(m.hook_queue().await?, (Some(1000), 4));
    for h in &due {
        m.hook_done(h.id, None).await?;
    }
    let due = m.claim_hooks(5000, 10, None).await?;
    assert_eq!(due.len(), 2);
    assert_eq!((due[0].id, due[0].attempts), (first_a.id, 1));
    for h in &due {
        m.hook_done(h.id, None).await?;
    }
    assert_eq!(m.hook_queue().await?, (None, 0));
    Ok(())
}

async fn resolved_alerts_are_pruned(b: Backend) -> anyhow::Result<()> {
    let (_s, m) = b.open(&[]).await;
    let l = Labels::new();
    m.node_report(
        "n",
        &l,
        &[ev(1, 1, true, "A: x"), ev(2, 2, false, "A: y")],
        None,
        None,
        1000,
    )
    .await?;
    m.node_report("n", &l, &[ev(3, 3, true, "B: x")], None, None, 1000)
        .await?;
    let week = 7 * 86_400_000;
    assert_eq!(m.prune(None, 1000 + week - 1).await?, 0, "not yet a week old");
    assert_eq!(m.prune(None, 1000 + week + 1).await?, 1, "the resolved one goes");
    let left = m.alerts(true).await?;
    assert_eq!(
        left.iter().map(|a| a.name.as_str()).collect::<Vec<_>>(),
        ["B"],
        "firing ones stay"
    );
    Ok(())
}

async fn a_stalled_lease_holder_is_fenced_off(b: Backend) -> anyhow::Result<()> {
    // Two replicas on one database.
    let (s, a) = b.open(&["http://hook"]).await;
    let (_s2, bb) = b.open(&["http://hook"]).await;
    let t = Timing::new(3000, 1000);
    let la = a
        .lease_acquire("rollouts", "A", 1000, &t)
        .await?
        .expect("free: A takes it");
    assert_eq!((la.token, la.expires_at), (1, 4000));
    // One process per SQLite file: there another holder takes the lease at once (below).
    let sqlite = matches!(b, Backend::Sqlite(_));
    if !sqlite {
        assert!(
            bb.lease_acquire("rollouts", "B", 2000, &t).await?.is_none(),
            "A holds it"
        );
    }
    let renewed = a.lease_acquire("rollouts", "A", 2500, &t).await?.expect("A renews");
    assert_eq!(
        (renewed.token, renewed.expires_at),
        (1, 5500),
        "a renewal keeps the token"
    );
    assert!(
        bb.lease_acquire("other", "B", 2500, &t).await?.is_some(),
        "leases are per name"
    );
    let fa = Fence {
        lease: "rollouts".into(),
        holder: "A".into(),
        token: 1,
    };
    // A writes as holder.
    let dep = deployment("web");
    s.apply(&dep, 1).await?;
    let key = outpost_core::render::workload_key(&dep[0].id());
    let r1 = rollout(&key, 1, "Progressing")?;
    let started = RolloutEvent {
        at: 1,
        reason: "RolloutStarted".into(),
        message: "m".into(),
    };
    a.record_rollout(&r1, std::slice::from_ref(&started), None, Some(&fa), 2600)
        .await?;
    // A stalls past its lease; B takes over with a new token.
    let lb = bb
        .lease_acquire("rollouts", "B", 5500, &t)
        .await?
        .expect("expired: B takes it");
    assert_eq!(lb.token, 2, "a new holder, a new token");
    let fb = Fence {
        lease: "rollouts".into(),
        holder: "B".into(),
        token: 2,
    };
    // A comes back and acts on what it decided before: every fenced write is refused, whole.
    let r2 = rollout(&key, 1, "Complete")?;
    let err = a
        .record_rollout(
            &r2,
            std::slice::from_ref(&started),
            Some(&AlertChange::Fire("x".into())),
            Some(&fa),
            5600,
        )
        .await
        .expect_err("A's token is stale");
    assert!(err.is_fenced(), "{err}");
    assert_eq!(s.rollout(&key).await?, Some(r1.clone()), "the rollout is unchanged");
    assert!(a.alerts(true).await?.is_empty(), "no alert was written");
    let queued = bb.claim_hooks(10_000, 10, Some(&fb)).await?;
    assert_eq!(queued.len(), 1, "only A's first event is queued");
    assert!(a
        .claim_hooks(10_000, 10, Some(&fa))
        .await
        .expect_err("stale")
        .is_fenced());
    assert!(a
        .hook_done(queued[0].id, Some(&fa))
        .await
        .expect_err("stale")
        .is_fenced());
    assert!(a
        .hook_retry(queued[0].id, "http://hook", 1, 9, Some(&fa))
        .await
        .expect_err("stale")
        .is_fenced());
    assert!(a
        .apply_hub(&[fire("n", "NodeOffline", 1)], &Default::default(), Some(&fa), 5600)
        .await
        .expect_err("stale")
        .is_fenced());
    assert!(a.prune(Some(&fa), 5600).await.expect_err("stale").is_fenced());
    assert!(a.prune_revisions(0, Some(&fa)).await.expect_err("stale").is_fenced());
    if !sqlite {
        assert!(
            a.lease_acquire("rollouts", "A", 5600, &t).await?.is_none(),
            "A cannot renew"
        );
    }
    // B acts.
    bb.record_rollout(&r2, &[], None, Some(&fb), 5700).await?;
    assert_eq!(s.rollout(&key).await?, Some(r2));
    bb.hook_done(queued[0].id, Some(&fb)).await?;
    assert_eq!(bb.hook_queue().await?.1, 0);
    if sqlite {
        // A restarted hub takes its predecessor's lease at once, with a new token.
        let l = bb
            .lease_acquire("rollouts", "B2", 5800, &t)
            .await?
            .expect("taken at once");
        assert_eq!((l.token, l.expires_at), (3, 8800));
        bb.lease_acquire("rollouts", "B", 5900, &t).await?.expect("and back");
    } else {
        assert!(
            bb.lease_acquire("rollouts", "B2", 5800, &t).await?.is_none(),
            "B holds it"
        );
    }
    let rows = bb.leases().await?;
    assert_eq!(
        rows.iter()
            .map(|(n, l)| (n.as_str(), l.holder.as_str(), l.token))
            .collect::<Vec<_>>(),
        [("other", "B", 1), ("rollouts", "B", if sqlite { 4 } else { 2 })]
    );
    Ok(())
}

async fn revisions_past_the_last_n_go_unless_used(b: Backend) -> anyhow::Result<()> {
    let (s, m) = b.open(&[]).await;
    for image in 1..=6 {
        let obj = deployment_image("web", &format!("nginx:{image}"));
        s.apply(&obj, image).await?;
    }
    let other = deployment_image("api", "api:1");
    s.apply(&other, 1).await?;
    let id = deployment("web")[0].id();
    let key = outpost_core::render::workload_key(&id);
    let revs = |s: Arc<dyn Store>, id: outpost_api::ObjectId| async move {
        anyhow::Ok(s.revisions(&id).await?.iter().map(|r| r.revision).collect::<Vec<_>>())
    };
    assert_eq!(revs(s.clone(), id.clone()).await?, [1, 2, 3, 4, 5, 6]);
    // A rollout to 6 that goes back to 2 for one node keeps 2.
    let mut r = rollout(&key, 6, "Progressing")?;
    r.from = [("n1".to_string(), 2)].into();
    r.previous = Some(5);
    m.record_rollout(&r, &[], None, None, 10).await?;
    assert_eq!(m.prune_revisions(2, None).await?, 3, "1, 3 and 4 go");
    let mut left = revs(s.clone(), id.clone()).await?;
    left.sort_unstable();
    assert_eq!(left, [2, 5, 6]);
    assert_eq!(
        revs(s.clone(), other[0].id()).await?,
        [1],
        "the other object keeps its one"
    );
    assert_eq!(m.prune_revisions(2, None).await?, 0, "nothing more");
    m.compact().await?;
    Ok(())
}

async fn error_lines_and_vitals_round_trip(b: Backend) -> anyhow::Result<()> {
    let (_s, m) = b.open(&[]).await;
    let line = |seq: u64| ErrorLine {
        seq,
        at: seq as i64 * 10,
        workload: "daemonset/default/web".into(),
        container: "c".into(),
        line: format!("error {seq}"),
    };
    let batch = ErrorBatch {
        lines: vec![line(1), line(2)],
        ..Default::default()
    };
    assert_eq!(m.store_errors("n", &batch, 5).await?, (2, 2));
    assert_eq!(m.store_errors("n", &batch, 6).await?, (2, 0), "stored once");
    let got = m.errors(Some("n"), None, 0, 10).await?;
    assert_eq!(got.iter().map(|l| l.line.seq).collect::<Vec<_>>(), [1, 2]);
    assert!(m.errors(Some("other"), None, 0, 10).await?.is_empty());
    assert!(m.vitals().await?.is_empty());
    Ok(())
}
