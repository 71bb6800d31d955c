//! The store's test suite, run on both backends: every case is an async function taking a
//! [`Backend`], and `both!` makes a `sqlite` and a `postgres` test of it. The PostgreSQL one
//! gets its own database on the test server (`testkit`), so cases run in parallel.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;
use outpost_api::{RestartPolicy, Runtime};
use rusqlite::Connection;

/// Where a case's store lives; it may be opened again (a hub restart).
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

    fn path(&self) -> PathBuf {
        match self {
            Backend::Sqlite(d) => d.path().join("hub.db"),
            Backend::Pg(_) => unreachable!("not a file"),
        }
    }

    async fn try_open(&self) -> Result<Arc<dyn Store>> {
        Ok(match self {
            Backend::Sqlite(_) => Arc::new(SqliteStore::open(&self.path())?),
            Backend::Pg(url) => Arc::new(PgStore::connect(url).await?),
        })
    }

    async fn open(&self) -> Arc<dyn Store> {
        self.try_open().await.expect("open the test store")
    }

    /// The account store of this backend (the PostgreSQL one after the store migrated the
    /// schema), with this audit age bound.
    async fn accounts(&self, audit_max_age: std::time::Duration) -> Arc<dyn AccountStore> {
        match self {
            Backend::Sqlite(_) => Arc::new(accounts::SqliteAccounts(Arc::new(
                crate::accounts::Accounts::open(&self.path(), audit_max_age).expect("account tables"),
            ))),
            Backend::Pg(url) => {
                let s = PgStore::connect(url).await.expect("open the test store");
                Arc::new(accounts::PgAccounts::new(s.pool(), audit_max_age))
            }
        }
    }

    async fn records(&self) -> crate::data::DataStore {
        match self {
            Backend::Sqlite(_) => crate::data::DataStore::open(&self.path()).expect("record tables"),
            Backend::Pg(url) => {
                let s = PgStore::connect(url).await.expect("open the test store");
                crate::data::DataStore::on(Arc::new(records::PgRecords::new(s.pool())))
            }
        }
    }

    /// The monitoring store on the same database (retention runs there).
    async fn monitor(&self) -> Arc<dyn crate::monitor::MonitorStore> {
        match self {
            Backend::Sqlite(_) => Arc::new(crate::monitor::SqliteMonitorStore(Arc::new(
                crate::monitor::SqliteMonitor::open(&self.path(), vec![]).expect("open the monitor"),
            ))),
            Backend::Pg(url) => Arc::new(
                PgStore::connect(url)
                    .await
                    .expect("open the test store")
                    .monitor(vec![]),
            ),
        }
    }

    /// Run SQL valid in both dialects on the database behind the store's back.
    async fn exec_both(&self, sql: &str) -> anyhow::Result<()> {
        match self {
            Backend::Sqlite(_) => Connection::open(self.path())?.execute_batch(sql)?,
            Backend::Pg(url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
                    .execute(&pool)
                    .await?;
                pool.close().await;
            }
        }
        Ok(())
    }

    /// Run SQL on the database behind the store's back (one dialect each).
    async fn exec(&self, sqlite: &str, pg: &'static str) -> anyhow::Result<()> {
        match self {
            Backend::Sqlite(_) => Connection::open(self.path())?.execute_batch(sqlite)?,
            Backend::Pg(url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                sqlx::raw_sql(pg).execute(&pool).await?;
                pool.close().await;
            }
        }
        Ok(())
    }
}

impl Backend {
    /// One number read from the database behind the store's back.
    async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(match self {
            Backend::Sqlite(_) => Connection::open(self.path())?.query_row(sql, [], |r| r.get(0))?,
            Backend::Pg(url) => {
                let pool = sqlx::PgPool::connect(url).await?;
                let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await?;
                pool.close().await;
                n
            }
        })
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
    apply_is_all_or_nothing,
    delete_is_all_or_nothing,
    workload_revision_moves_only_with_the_template,
    generation_never_decreases_across_reopen_and_rejoin,
    contacts_are_read_at_once_and_written_with_the_next_status_or_contact_batch,
    group_commit_isolates_a_failing_report,
    a_report_group_stores_what_its_reports_store_one_by_one,
    join_checks_token_and_name_and_merges_labels,
    racing_joins_for_the_last_use_one_wins,
    renewal_is_two_phase,
    tombstones_give_deltas_until_pruned,
    a_sync_group_reads_what_each_sync_reads,
    a_spec_is_stored_once_and_goes_when_no_node_holds_it,
    events_are_stored_once_and_acked_by_highest_seq,
    events_are_pruned_past_the_limit,
    rollouts_round_trip_and_go_with_their_workload,
    gitops_state_round_trips,
    images_and_schedule_inputs_round_trip,
    a_newer_schema_is_refused,
    an_unchanged_plan_writes_nothing_and_bumps_nothing,
    accounts_users_roles_and_scopes,
    account_tokens_expire_and_are_revoked,
    audit_is_ordered_filtered_and_pruned,
    sessions_are_created_touched_and_expire,
    data_records_insert_query_limit_and_retention,
);

fn token(id: &str, uses: Option<u64>) -> TokenRow {
    TokenRow {
        id: id.into(),
        secret_sha256: "s".into(),
        labels: [("site".to_string(), "hq".to_string())].into(),
        expires_at: None,
        uses_left: uses,
        used: 0,
        created_at: 0,
        node_labels: vec!["rack".into()],
    }
}

fn new_node(name: &str) -> NewNode {
    NewNode {
        name: name.into(),
        labels: Labels::new(),
        cert_fp: format!("fp-{name}"),
        cert_not_after: 0,
    }
}

fn spec(key: &str, hash: &str) -> WorkloadSpec {
    WorkloadSpec {
        key: key.into(),
        kind: Kind::DaemonSet,
        namespace: "default".into(),
        name: key.rsplit('/').next().unwrap_or(key).into(),
        revision: 1,
        hash: hash.into(),
        runtime: Runtime::Process,
        restart_policy: RestartPolicy::Always,
        grace_seconds: 30,
        containers: vec![],
        volumes: vec![],
        min_ready_seconds: 0,
        progress_deadline_seconds: 600,
        host_network: false,
        host_pid: false,
        job: None,
        agent_update: None,
        pipeline: None,
        failover: None,
    }
}

fn change(node: &str, upsert: &[(&str, &str)], remove: &[&str]) -> Plan {
    let c = NodeChange {
        upsert: upsert.iter().map(|(k, h)| spec(k, h)).collect(),
        remove: remove.iter().map(|s| s.to_string()).collect(),
        prefetch: None,
    };
    Plan {
        changes: [(node.to_string(), c)].into(),
        ..Default::default()
    }
}

fn objects(yaml: &str) -> Vec<Object> {
    let mut objs = outpost_api::parse_file("t.yaml", yaml)
        .expect("valid test manifest")
        .objects;
    for o in &mut objs {
        let ns = o.meta().ns().to_string();
        o.meta_mut().namespace = Some(ns);
    }
    objs
}

const CM_AND_BOOM: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: ok}\ndata: {a: b}\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: boom}\ndata: {a: b}\n";

#[test]
fn a_version_1_database_is_upgraded() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("hub.db");
    {
        let c = Connection::open(&path)?;
        c.execute_batch(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('schema_version', '1');
             CREATE TABLE tokens (id TEXT PRIMARY KEY, secret_sha256 TEXT NOT NULL, labels TEXT NOT NULL,
                expires_at INTEGER, uses_left INTEGER, used INTEGER NOT NULL DEFAULT 0, created_at INTEGER NOT NULL);
             INSERT INTO tokens VALUES ('t', 's', '{}', NULL, NULL, 0, 0);
             CREATE TABLE nodes (name TEXT PRIMARY KEY, labels TEXT NOT NULL, cert_fp TEXT NOT NULL UNIQUE,
                cert_not_after INTEGER NOT NULL, joined_at INTEGER NOT NULL, last_seen INTEGER,
                generation INTEGER NOT NULL, applied_generation INTEGER NOT NULL DEFAULT 0,
                tombstone_floor INTEGER NOT NULL DEFAULT 0, agent_version TEXT, uptime_secs INTEGER, token_id TEXT);
             INSERT INTO nodes (name, labels, cert_fp, cert_not_after, joined_at, generation)
                VALUES ('impostor', '{\"kubernetes.io/hostname\":\"victim\",\"site\":\"s\"}', 'fp', 0, 0, 1);",
        )?;
    }
    let s = SqliteCore::open(&path)?;
    let n = s.node("impostor")?.expect("kept");
    assert_eq!(n.labels["kubernetes.io/hostname"], "impostor");
    assert_eq!(n.labels["site"], "s");
    assert_eq!(s.token("t")?.expect("kept").node_labels, Vec::<String>::new());
    s.renew("impostor", "fp2", 5)?;
    assert!(s.node_by_cert("fp2")?.is_some());
    drop(s);
    // Opening again changes nothing.
    let s = SqliteCore::open(&path)?;
    assert_eq!(s.node("impostor")?.expect("kept").cert_fp, "fp2");
    Ok(())
}

/// token, secret, now, expected
type Case = (Option<TokenRow>, &'static str, i64, Result<(), TokenProblem>);

#[test]
fn token_check_table() {
    let t = |expires_at, uses_left, used| TokenRow {
        expires_at,
        uses_left,
        used,
        ..token("t", None)
    };
    let cases: &[Case] = &[
        (Some(t(None, None, 5)), "s", 0, Ok(())),
        (None, "s", 0, Err(TokenProblem::Unknown { id: "t".into() })),
        (
            Some(t(None, None, 0)),
            "x",
            0,
            Err(TokenProblem::Unknown { id: "t".into() }),
        ),
        (Some(t(Some(100), None, 0)), "s", 99, Ok(())),
        (
            Some(t(Some(100), None, 0)),
            "s",
            150,
            Err(TokenProblem::Expired {
                id: "t".into(),
                ago_ms: 50,
            }),
        ),
        (
            Some(t(None, Some(0), 3)),
            "s",
            0,
            Err(TokenProblem::UsedUp {
                id: "t".into(),
                used: 3,
            }),
        ),
    ];
    for (i, (tok, secret, now, want)) in cases.iter().enumerate() {
        assert_eq!(&check_token(tok.as_ref(), "t", secret, *now), want, "case {i}");
    }
}

fn status(generation: u64, events: Vec<NodeEvent>) -> StatusReport {
    StatusReport {
        agent_version: "t".into(),
        uptime_secs: 1,
        generation,
        full: true,
        workloads: vec![],
        removed: vec![],
        events,
    }
}

fn ev(seq: u64) -> NodeEvent {
    NodeEvent {
        seq,
        at: 10,
        workload: None,
        reason: "Started".into(),
        message: format!("m{seq}"),
    }
}

fn actions(r: &[ApplyResult]) -> Vec<&str> {
    r.iter().map(|r| r.action.as_str()).collect()
}

async fn apply_is_all_or_nothing(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    // Make the second insert of the batch fail inside the transaction.
    b.exec(
        "CREATE TRIGGER boom BEFORE INSERT ON objects WHEN NEW.name = 'boom'
         BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN
           IF NEW.name = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN NEW; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER boom BEFORE INSERT ON objects FOR EACH ROW EXECUTE FUNCTION boom();",
    )
    .await?;
    assert!(s.apply(&objects(CM_AND_BOOM), 1).await.is_err());
    assert!(
        s.objects().await?.is_empty(),
        "the first object of a failed batch must not be stored"
    );
    b.exec("DROP TRIGGER boom", "DROP TRIGGER boom ON objects").await?;
    let r = s.apply(&objects(CM_AND_BOOM), 2).await?;
    assert_eq!(actions(&r), ["created", "created"]);
    let r = s.apply(&objects(CM_AND_BOOM), 3).await?;
    assert_eq!(actions(&r), ["unchanged", "unchanged"]);
    Ok(())
}

async fn delete_is_all_or_nothing(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    let objs = objects(CM_AND_BOOM);
    s.apply(&objs, 1).await?;
    b.exec(
        "CREATE TRIGGER boom BEFORE DELETE ON objects WHEN OLD.name = 'boom'
         BEGIN SELECT RAISE(ABORT, 'boom'); END;",
        "CREATE FUNCTION boom() RETURNS trigger AS $$ BEGIN
           IF OLD.name = 'boom' THEN RAISE EXCEPTION 'boom'; END IF; RETURN OLD; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER boom BEFORE DELETE ON objects FOR EACH ROW EXECUTE FUNCTION boom();",
    )
    .await?;
    let ids: Vec<ObjectId> = objs.iter().map(Object::id).collect();
    assert!(s.delete_objects(&ids).await.is_err());
    assert_eq!(s.objects().await?.len(), 2, "a failed delete batch removes nothing");
    b.exec("DROP TRIGGER boom", "DROP TRIGGER boom ON objects").await?;
    let mut with_ghost = ids.clone();
    with_ghost.push(ObjectId {
        kind: Kind::ConfigMap,
        namespace: "default".into(),
        name: "ghost".into(),
    });
    let (deleted, missing) = s.delete_objects(&with_ghost).await?;
    assert_eq!((deleted, missing.len()), (ids, 1));
    assert!(s.objects().await?.is_empty());
    Ok(())
}

async fn workload_revision_moves_only_with_the_template(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    let dep = |replicas: u32, image: &str| {
        objects(&format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: web}}\nspec:\n  replicas: {replicas}\n  template:\n    spec:\n      containers: [{{name: c, image: {image}}}]\n"
        ))
    };
    assert_eq!(s.apply(&dep(1, "nginx:1"), 1).await?[0].revision, Some(1));
    let r = s.apply(&dep(2, "nginx:1"), 2).await?;
    assert_eq!((r[0].action.as_str(), r[0].revision), ("configured", Some(1)));
    let r = s.apply(&dep(2, "nginx:2"), 3).await?;
    assert_eq!((r[0].action.as_str(), r[0].revision), ("configured", Some(2)));
    let id = dep(1, "x")[0].id();
    assert_eq!(
        s.revisions(&id).await?.iter().map(|r| r.revision).collect::<Vec<_>>(),
        [1, 2]
    );
    let stored = s.object(&id).await?.expect("stored");
    assert_eq!((stored.created_at, stored.updated_at), (1, 3));
    Ok(())
}

async fn generation_never_decreases_across_reopen_and_rejoin(b: Backend) -> anyhow::Result<()> {
    let first;
    {
        let s = b.open().await;
        s.create_token(&token("t", None)).await?;
        s.join("t", "s", &new_node("a"), 0).await?;
        s.commit_plan(&change("a", &[("daemonset/default/x", "h1")], &[]))
            .await?;
        first = s.node("a").await?.expect("joined").generation;
        assert!(first >= 2);
    }
    let s = b.open().await;
    let bumped = s
        .commit_plan(&change("a", &[("daemonset/default/x", "h2")], &[]))
        .await?;
    assert!(bumped["a"] > first, "{bumped:?} after {first}");
    assert!(s.delete_node("a").await?);
    s.join("t", "s", &new_node("a"), 0).await?;
    let rejoined = s.node("a").await?.expect("rejoined").generation;
    assert!(rejoined > bumped["a"]);
    Ok(())
}

async fn contacts_are_read_at_once_and_written_with_the_next_status_or_contact_batch(b: Backend) -> anyhow::Result<()> {
    {
        let s = b.open().await;
        s.create_token(&token("t", None)).await?;
        s.join("t", "s", &new_node("a"), 0).await?;
        assert_eq!(s.touch("a", 5_000).await?, Some(0), "previous contact: the join");
        assert_eq!(s.touch("a", 9_000).await?, Some(5_000));
        assert_eq!(s.touch("ghost", 9_000).await?, None);
        assert_eq!(
            s.node("a").await?.expect("a").last_seen,
            Some(9_000),
            "readers see the contact at once"
        );
    }
    // not yet written: a restarted hub has only the join
    let s = b.open().await;
    assert_eq!(s.node("a").await?.expect("a").last_seen, None);
    s.touch("a", 20_000).await?;
    s.record_status("a", &status(0, vec![]), 15_000).await?;
    if s.shared().is_some() {
        // Where replicas share the store, the contact writer writes contacts (in a short
        // transaction of its own), not the reports.
        s.flush_contacts(15_000).await?;
    }
    drop(s);
    let s = b.open().await;
    assert_eq!(
        s.node("a").await?.expect("a").last_seen,
        Some(20_000),
        "written with the status transaction, or by the contact writer"
    );
    Ok(())
}

async fn group_commit_isolates_a_failing_report(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    s.join("t", "s", &new_node("b"), 0).await?;
    let batch = vec![
        ("a".to_string(), status(0, vec![ev(1), ev(2)]), 10),
        ("gone".to_string(), status(0, vec![ev(7)]), 10),
        ("b".to_string(), status(0, vec![ev(5)]), 10),
    ];
    let out = s.record_statuses(&batch).await?;
    assert_eq!(out[0], Ok(2));
    assert!(out[1].is_err(), "an unknown node's report is refused alone: {out:?}");
    assert_eq!(out[2], Ok(5));
    drop(s);
    let s = b.open().await;
    assert_eq!(s.events("a", 10).await?.len(), 2, "committed");
    assert_eq!(s.events("b", 10).await?.len(), 1, "committed");
    Ok(())
}

fn ws(key: &str, hash: &str) -> WorkloadStatus {
    WorkloadStatus {
        key: key.into(),
        revision: 1,
        hash: hash.into(),
        phase: outpost_api::Phase::Running,
        containers: vec![],
        ready: true,
        rollout: None,
        site_role: None,
    }
}

/// PostgreSQL writes a group in a few statements over all its reports: the result must be what
/// the same reports give one at a time (full reports dropping what they do not list, a key listed
/// twice, removals, events sent again, a generation clamped to what the node was sent).
async fn a_report_group_stores_what_its_reports_store_one_by_one(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    let first = |n: usize| StatusReport {
        workloads: vec![ws("k1", "a"), ws("k2", "a"), ws("k3", "a")],
        ..status(0, (1..=2 + n as u64).map(ev).collect())
    };
    let second = |n: usize| match n {
        0 => StatusReport {
            workloads: vec![ws("k1", "b"), ws("k1", "c")],
            ..status(1, vec![])
        },
        1 => StatusReport {
            full: false,
            workloads: vec![ws("k4", "a")],
            removed: vec!["k2".into(), "k9".into()],
            ..status(1, vec![ev(3), ev(4)])
        },
        _ => status(999, vec![ev(2), ev(5), ev(6)]),
    };
    for p in ["g", "s"] {
        for n in 0..3 {
            s.join("t", "s", &new_node(&format!("{p}{n}")), 0).await?;
        }
    }
    let mut acks = BTreeMap::new();
    for round in [&first as &dyn Fn(usize) -> StatusReport, &second] {
        let group: Vec<(String, StatusReport, UnixMs)> = (0..3).map(|n| (format!("g{n}"), round(n), 10)).collect();
        for (n, r) in s.record_statuses(&group).await?.into_iter().enumerate() {
            acks.insert(format!("g{n}"), r.map_err(anyhow::Error::msg)?);
        }
        for n in 0..3 {
            acks.insert(format!("s{n}"), s.record_status(&format!("s{n}"), &round(n), 10).await?);
        }
    }
    for n in 0..3 {
        let (g, one) = (format!("g{n}"), format!("s{n}"));
        assert_eq!(acks[&g], acks[&one], "events acked, node {n}");
        let keys =
            |rows: Vec<(String, WorkloadStatus)>| rows.into_iter().map(|(_, w)| (w.key, w.hash)).collect::<Vec<_>>();
        assert_eq!(
            keys(s.statuses(Some(&g)).await?),
            keys(s.statuses(Some(&one)).await?),
            "statuses, node {n}"
        );
        let seqs = |e: Vec<NodeEvent>| e.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(s.events(&g, 100).await?),
            seqs(s.events(&one, 100).await?),
            "events, node {n}"
        );
        let (gn, sn) = (s.node(&g).await?.expect("g"), s.node(&one).await?.expect("s"));
        assert_eq!(
            gn.applied_generation,
            gn.generation.min(second(n).generation),
            "node {n}"
        );
        assert_eq!(
            sn.applied_generation,
            sn.generation.min(second(n).generation),
            "node {n}"
        );
        assert_eq!((gn.last_seen, gn.uptime_secs), (sn.last_seen, sn.uptime_secs));
    }
    assert_eq!(
        s.statuses(Some("g0"))
            .await?
            .into_iter()
            .map(|(_, w)| (w.key, w.hash))
            .collect::<Vec<_>>(),
        [("k1".to_string(), "c".to_string())],
        "the full report kept only k1, its last listing"
    );
    assert_eq!(acks["g2"], 6);
    Ok(())
}

async fn join_checks_token_and_name_and_merges_labels(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", Some(1))).await?;
    // Labels the node may not set refuse the join and use nothing up.
    for (k, v) in [("site", "edge"), ("kubernetes.io/hostname", "other"), ("zone", "z")] {
        let mut n = new_node("a");
        n.labels.insert(k.into(), v.into());
        let refused = s.join("t", "s", &n, 0).await;
        assert!(matches!(refused, Err(StoreError::Labels(_))), "{k}: {refused:?}");
    }
    assert!(s.node("a").await?.is_none());
    let mut n = new_node("a");
    n.labels.insert("rack".into(), "r7".into());
    n.labels.insert("kubernetes.io/os".into(), "linux".into());
    let labels = s.join("t", "s", &n, 0).await?;
    assert_eq!(labels["site"], "hq", "the token's label");
    assert_eq!(labels["rack"], "r7", "a key the token allows");
    assert_eq!(labels["kubernetes.io/hostname"], "a", "set by the hub");
    assert_eq!(s.node("a").await?.expect("joined").labels, labels);
    let again = s.join("t", "s", &new_node("b"), 0).await;
    assert!(
        matches!(again, Err(StoreError::Token(TokenProblem::UsedUp { used: 1, .. }))),
        "{again:?}"
    );
    s.create_token(&token("u", None)).await?;
    assert!(matches!(
        s.join("u", "s", &new_node("a"), 0).await,
        Err(StoreError::NodeExists(_))
    ));
    assert!(matches!(
        s.join("u", "wrong", &new_node("c"), 0).await,
        Err(StoreError::Token(TokenProblem::Unknown { .. }))
    ));
    assert_eq!(
        s.token("u").await?.expect("token").used,
        0,
        "refused joins use nothing up"
    );
    Ok(())
}

async fn racing_joins_for_the_last_use_one_wins(b: Backend) -> anyhow::Result<()> {
    // Two stores on one database: two hub processes (or replicas) racing.
    let (s1, s2) = (b.open().await, b.open().await);
    for round in 0..20 {
        let t = format!("t{round}");
        s1.create_token(&token(&t, Some(1))).await?;
        let (n1, n2) = (new_node(&format!("a{round}")), new_node(&format!("b{round}")));
        let (r1, r2) = tokio::join!(
            tokio::spawn({
                let (s, t) = (s1.clone(), t.clone());
                async move { s.join(&t, "s", &n1, 0).await }
            }),
            tokio::spawn({
                let (s, t) = (s2.clone(), t.clone());
                async move { s.join(&t, "s", &n2, 0).await }
            }),
        );
        let (r1, r2) = (r1?, r2?);
        let refused = |r: &Result<Labels>| {
            matches!(r, Err(StoreError::Token(TokenProblem::UsedUp { .. })))
                // SQLite: the loser may find the database locked for longer than its timeout
                || matches!(r, Err(StoreError::Sqlite(_)))
        };
        assert!(
            (r1.is_ok() && refused(&r2)) || (r2.is_ok() && refused(&r1)),
            "round {round}: exactly one join wins: {r1:?} / {r2:?}"
        );
        let tok = s1.token(&t).await?.expect("token");
        assert_eq!((tok.used, tok.uses_left), (1, Some(0)), "round {round}");
        let joined = s1
            .nodes()
            .await?
            .iter()
            .filter(|n| n.name.ends_with(&round.to_string()))
            .count();
        assert!(joined >= 1, "round {round}");
    }
    let names: Vec<String> = s1.nodes().await?.into_iter().map(|n| n.name).collect();
    assert_eq!(names.len(), 20, "one node per token: {names:?}");
    Ok(())
}

async fn renewal_is_two_phase(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    async fn owner(s: &dyn Store, fp: &str) -> Result<Option<(String, bool)>> {
        s.node_by_cert(fp).await.map(|o| o.map(|o| (o.node, o.promoted)))
    }
    assert_eq!(owner(&*s, "fp-a").await?, Some(("a".into(), false)));
    // A renewal whose answer was lost: the old certificate still works, and so would the new.
    s.renew("a", "fp-a2", 100).await?;
    assert_eq!(owner(&*s, "fp-a").await?, Some(("a".into(), false)));
    // The node renews again (it never got fp-a2): the newest one replaces it.
    s.renew("a", "fp-a3", 200).await?;
    assert_eq!(owner(&*s, "fp-a2").await?, None);
    assert_eq!(s.node("a").await?.expect("node").cert_not_after, 0, "not switched yet");
    // First use of the new certificate switches over; the old one stops working.
    assert_eq!(owner(&*s, "fp-a3").await?, Some(("a".into(), true)));
    assert_eq!(owner(&*s, "fp-a3").await?, Some(("a".into(), false)));
    assert_eq!(owner(&*s, "fp-a").await?, None);
    let n = s.node("a").await?.expect("node");
    assert_eq!((n.cert_fp.as_str(), n.cert_not_after), ("fp-a3", 200));
    Ok(())
}

async fn tombstones_give_deltas_until_pruned(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    let g1 = s.commit_plan(&change("a", &[("k/a", "1"), ("k/b", "1")], &[])).await?["a"];
    let g2 = s.commit_plan(&change("a", &[], &["k/a"])).await?["a"];
    assert!(g2 > g1);

    let d = s.sync("a", g1).await?.expect("node exists");
    assert_eq!(
        (d.generation, d.full, d.upsert.len(), d.remove.clone()),
        (g2, false, 0, vec!["k/a".to_string()])
    );
    let full = s.sync("a", 0).await?.expect("node exists");
    assert!(full.full);
    assert_eq!(full.upsert.iter().map(|w| w.key.as_str()).collect::<Vec<_>>(), ["k/b"]);
    assert!(s.sync("a", g2).await?.expect("node exists").upsert.is_empty());
    assert!(
        s.sync("a", g2 + 10).await?.expect("node exists").full,
        "an agent ahead of the hub gets everything"
    );

    // Re-adding a removed key drops its tombstone: the delta holds only the upsert.
    let g3 = s.commit_plan(&change("a", &[("k/a", "2")], &[])).await?["a"];
    let d = s.sync("a", g1).await?.expect("node exists");
    assert_eq!((d.full, d.remove.len(), d.upsert.len()), (false, 0, 1));

    // Once the agent reports g3 applied, tombstones up to it are pruned and older deltas go full.
    let g4 = s.commit_plan(&change("a", &[], &["k/b"])).await?["a"];
    s.record_status("a", &status(g3, vec![]), 5).await?;
    assert!(s.sync("a", g1).await?.expect("node exists").full);
    let d = s.sync("a", g3).await?.expect("node exists");
    assert_eq!(
        (d.generation, d.full, d.remove.clone()),
        (g4, false, vec!["k/b".to_string()])
    );
    assert!(s.sync("ghost", 0).await?.is_none());
    Ok(())
}

/// A group of sync reads gives every read what `sync`, `node` (labels) and `prefetch` give
/// one at a time: deltas with removals, full answers (from zero, behind the tombstone floor,
/// ahead of the hub), up-to-date reads (no prefetch), a node read twice, an unknown node.
async fn a_sync_group_reads_what_each_sync_reads(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    let mut labelled = new_node("b");
    labelled.labels = [("rack".to_string(), "r1".to_string())].into();
    for n in [new_node("a"), labelled, new_node("c")] {
        s.join("t", "s", &n, 0).await?;
    }
    let g1 = s.commit_plan(&change("a", &[("k/a", "1"), ("k/b", "1")], &[])).await?["a"];
    let g2 = s.commit_plan(&change("a", &[("k/c", "1")], &["k/a"])).await?["a"];
    let mut with_hint = change("b", &[("k/x", "1")], &[]);
    with_hint.changes.get_mut("b").expect("b").prefetch = Some(vec![spec("k/y", "p")]);
    let gb = s.commit_plan(&with_hint).await?["b"];
    // c: a tombstone pruned past, so an old generation reads full.
    let c1 = s.commit_plan(&change("c", &[("k/a", "1")], &[])).await?["c"];
    let c2 = s.commit_plan(&change("c", &[], &["k/a"])).await?["c"];
    s.record_status("c", &status(c2, vec![]), 5).await?;
    let c3 = s.commit_plan(&change("c", &[("k/d", "1")], &[])).await?["c"];
    assert!(c3 > c2 && c2 > c1);

    let reads: Vec<(String, u64)> = [
        ("a", g1),
        ("a", 0),
        ("b", 0),
        ("ghost", 0),
        ("a", g2),
        ("b", gb),
        ("a", g2 + 10),
        ("c", c1),
        ("c", c2),
    ]
    .into_iter()
    .map(|(n, g)| (n.to_string(), g))
    .collect();
    let group = s.sync_group(&reads).await?;
    assert_eq!(group.len(), reads.len());
    for ((node, since), got) in reads.iter().zip(&group) {
        let want = match s.sync(node, *since).await? {
            None => None,
            Some(sync) => Some(crate::store::SyncRead {
                prefetch: if sync.generation != *since {
                    s.prefetch(node).await?
                } else {
                    vec![]
                },
                sync,
                labels: s.node(node).await?.expect("known").labels,
            }),
        };
        assert_eq!(got, &want, "read of {node} from {since}");
    }
    // And the cases are the ones meant.
    let at = |k: usize| group[k].as_ref().expect("known");
    assert_eq!(
        (at(0).sync.full, at(0).sync.remove.clone()),
        (false, vec!["k/a".to_string()])
    );
    assert!(at(1).sync.full && at(7).sync.full && at(6).sync.full);
    assert_eq!(at(2).prefetch.len(), 1);
    assert_eq!(at(2).labels.get("rack").map(String::as_str), Some("r1"));
    assert!(at(4).sync.upsert.is_empty() && at(5).prefetch.is_empty(), "up to date");
    assert!(!at(8).sync.full && at(8).sync.upsert.len() == 1);
    assert!(group[3].is_none());
    assert!(s.sync_group(&[]).await?.is_empty());
    Ok(())
}

async fn events_are_stored_once_and_acked_by_highest_seq(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    assert_eq!(s.record_status("a", &status(0, vec![ev(1), ev(2)]), 1).await?, 2);
    assert_eq!(s.record_status("a", &status(0, vec![ev(2), ev(3)]), 2).await?, 3);
    let seqs = |v: Vec<NodeEvent>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
    assert_eq!(seqs(s.events("a", 50).await?), [1, 2, 3]);
    assert_eq!(seqs(s.events("a", 2).await?), [2, 3]);
    Ok(())
}

async fn events_are_pruned_past_the_limit(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    let kept = u64::try_from(EVENTS_KEPT)?;
    let first: Vec<NodeEvent> = (1..=kept).map(ev).collect();
    s.record_status("a", &status(0, first), 1).await?;
    assert_eq!(s.events("a", 5_000).await?.len(), first_len(kept));
    let more: Vec<NodeEvent> = (kept + 1..=kept + 5).map(ev).collect();
    assert_eq!(s.record_status("a", &status(0, more), 2).await?, kept + 5);
    let left = s.events("a", 5_000).await?;
    assert_eq!(left.len(), first_len(kept), "only the newest are kept");
    assert_eq!(left.first().map(|e| e.seq), Some(6));
    // Statuses: a full report replaces the node's list; `removed` drops single ones.
    let mut r = status(0, vec![]);
    r.workloads = serde_json::from_value(serde_json::json!([
        {"key": "daemonset/default/x", "revision": 1, "hash": "h", "phase": "Running", "containers": []},
        {"key": "daemonset/default/y", "revision": 1, "hash": "h", "phase": "Running", "containers": []}
    ]))?;
    s.record_status("a", &r, 3).await?;
    assert_eq!(s.statuses(Some("a")).await?.len(), 2);
    r.workloads.truncate(1);
    s.record_status("a", &r, 4).await?;
    assert_eq!(
        s.statuses(None).await?.len(),
        1,
        "a full report drops what it does not list"
    );
    r.full = false;
    r.workloads.clear();
    r.removed = vec!["daemonset/default/x".into()];
    s.record_status("a", &r, 5).await?;
    assert!(s.statuses(Some("a")).await?.is_empty());
    assert!(s.delete_node("a").await?);
    assert!(
        s.events("a", 10).await?.is_empty(),
        "a deleted node's events go with it"
    );
    assert!(!s.delete_node("a").await?);
    Ok(())
}

fn first_len(kept: u64) -> usize {
    usize::try_from(kept).unwrap_or(usize::MAX)
}

fn rollout(workload: &str, revision: u64, phase: &str) -> anyhow::Result<outpost_core::waves::Rollout> {
    Ok(serde_json::from_value(serde_json::json!({
        "workload": workload, "revision": revision, "phase": phase, "policy": "default",
        "started_at": 1, "updated_at": 2, "from": {"n1": revision - 1}, "previous": revision - 1
    }))?)
}

async fn rollouts_round_trip_and_go_with_their_workload(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    let dep = objects(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx:1}]\n",
    );
    s.apply(&dep, 1).await?;
    let key = outpost_core::render::workload_key(&dep[0].id());
    let r2 = rollout(&key, 2, "Progressing")?;
    s.put_rollout(&r2).await?;
    s.put_rollout(&rollout("daemonset/default/other", 4, "Complete")?)
        .await?;
    assert_eq!(s.rollout(&key).await?, Some(r2));
    let r3 = rollout(&key, 3, "Paused")?;
    s.put_rollout(&r3).await?;
    assert_eq!(
        s.rollout(&key).await?,
        Some(r3.clone()),
        "one per workload: the new replaces the old"
    );
    assert_eq!(
        s.rollouts()
            .await?
            .iter()
            .map(|r| r.workload.as_str())
            .collect::<Vec<_>>(),
        ["daemonset/default/other", key.as_str()]
    );
    let inputs = s.schedule_inputs().await?;
    assert_eq!(inputs.rollouts.get(&key), Some(&r3));
    s.delete_objects(&[dep[0].id()]).await?;
    assert_eq!(s.rollout(&key).await?, None, "deleted with its workload");
    assert!(s.rollout("daemonset/default/other").await?.is_some());
    Ok(())
}

async fn gitops_state_round_trips(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.put_gitops_state("ns/b", Some("{\"x\":1}"), 1).await?;
    s.put_gitops_state("ns/a", Some("{\"x\":2}"), 1).await?;
    s.put_gitops_state("ns/b", Some("{\"x\":3}"), 2).await?;
    assert_eq!(
        s.gitops_states().await?,
        [
            ("ns/a".to_string(), "{\"x\":2}".to_string()),
            ("ns/b".to_string(), "{\"x\":3}".to_string())
        ]
    );
    s.put_gitops_state("ns/a", None, 3).await?;
    drop(s);
    let s = b.open().await;
    assert_eq!(
        s.gitops_states().await?.len(),
        1,
        "forgotten, and the rest survives a reopen"
    );
    Ok(())
}

async fn images_and_schedule_inputs_round_trip(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    let img = |name: &str, digest: &str| ImageTag {
        name: name.into(),
        digest: digest.into(),
        size: 42,
        pushed_at: 7,
    };
    s.put_image_tag(&img("b:1", "d1")).await?;
    s.put_image_tag(&img("a:1", "d2")).await?;
    s.put_image_tag(&img("b:1", "d3")).await?;
    assert_eq!(s.image_tag("b:1").await?, Some(img("b:1", "d3")));
    assert_eq!(s.image_tags().await?, [img("a:1", "d2"), img("b:1", "d3")]);
    assert_eq!(s.image_tag("c:1").await?, None);

    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("n1"), 0).await?;
    let dep = objects(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: [{name: c, image: nginx:1}]\n",
    );
    s.apply(&dep, 1).await?;
    let mut plan = change("n1", &[("deployment/default/web", "h")], &[]);
    plan.assignments.insert(dep[0].id(), ["n1".to_string()].into());
    let mut c = plan.changes.remove("n1").expect("change");
    c.prefetch = Some(vec![spec("deployment/default/web", "p")]);
    plan.changes.insert("n1".into(), c);
    s.commit_plan(&plan).await?;
    let inputs = s.schedule_inputs().await?;
    assert_eq!(inputs.nodes.len(), 1);
    assert_eq!(inputs.objects.len(), 1);
    assert_eq!(inputs.assignments[&dep[0].id()], ["n1".to_string()].into());
    assert_eq!(inputs.held_revisions["n1"]["deployment/default/web"], 1);
    assert_eq!(inputs.held_prefetch["n1"]["deployment/default/web"], "p");
    assert_eq!(s.prefetch("n1").await?.len(), 1);
    let desired = s.desired().await?;
    assert_eq!((desired.len(), desired[0].node.as_str()), (1, "n1"));
    Ok(())
}

async fn a_newer_schema_is_refused(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    drop(s);
    b.exec(
        "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
        "UPDATE meta SET value = '99' WHERE key = 'schema_version'",
    )
    .await?;
    match b.try_open().await {
        Err(e @ StoreError::SchemaTooNew { found: 99, .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("newer hub release"), "{msg}");
            assert!(!msg.contains("password"), "{msg}");
        }
        Err(e) => panic!("wrong refusal: {e}"),
        Ok(_) => panic!("a database from a newer hub must be refused"),
    }
    Ok(())
}

fn user(name: &str, role: outpost_core::access::Role, scope: &str) -> crate::accounts::UserRow {
    crate::accounts::UserRow {
        name: name.into(),
        role,
        scope: outpost_core::access::Scope::parse(scope).expect("scope"),
        password: Some(format!("hash-of-{name}")),
        created_at: 1000,
    }
}

async fn accounts_users_roles_and_scopes(b: Backend) -> anyhow::Result<()> {
    use outpost_core::access::Role;
    let a = b.accounts(crate::accounts::AUDIT_MAX_AGE).await;
    let t = a
        .add_user(&user("ops", Role::Operator, "site=a"), None)
        .await?
        .expect("new");
    assert_eq!(t.user, "ops");
    assert!(t.token.starts_with(&format!("opu_{}_", t.id)));
    assert!(
        a.add_user(&user("ops", Role::Admin, ""), None).await?.is_none(),
        "name taken"
    );
    a.add_user(&user("view", Role::Viewer, ""), Some(5000))
        .await?
        .expect("new");
    let u = a.user("ops").await?.expect("stored");
    assert_eq!(
        (u.role, u.scope.to_string(), u.password.as_deref()),
        (Role::Operator, "site=a".into(), Some("hash-of-ops"))
    );
    assert!(a.user("nobody").await?.is_none());
    let all = a.users().await?;
    assert_eq!(all.iter().map(|u| u.name.as_str()).collect::<Vec<_>>(), ["ops", "view"]);
    assert_eq!(
        (all[0].role.as_str(), all[0].selector.as_str(), all[0].has_password),
        ("operator", "site=a", true)
    );
    assert_eq!(all[1].tokens.len(), 1);
    assert_eq!(all[1].tokens[0].expires_at, Some(5000));
    assert!(a.remove_user("ops").await?);
    assert!(!a.remove_user("ops").await?, "gone already");
    assert!(
        a.authenticate(&t.token, 2000).await?.unwrap().is_none(),
        "tokens go with the account"
    );
    assert_eq!(a.users().await?.len(), 1);
    Ok(())
}

async fn account_tokens_expire_and_are_revoked(b: Backend) -> anyhow::Result<()> {
    use crate::accounts::TokenRefusal;
    use outpost_core::access::Role;
    let a = b.accounts(crate::accounts::AUDIT_MAX_AGE).await;
    let t = a
        .add_user(&user("ops", Role::Operator, ""), Some(10_000))
        .await?
        .expect("new");
    let u = a.authenticate(&t.token, 5000).await?.unwrap().expect("valid");
    assert_eq!(u.name, "ops");
    assert!(a.authenticate("opu_00000000_nope", 5000).await?.unwrap().is_none());
    assert!(matches!(
        a.authenticate(&t.token, 12_000).await?,
        Err(TokenRefusal::Expired { ago_ms: 2000, .. })
    ));
    let t2 = a.new_token("ops", None, 6000).await?.expect("account exists");
    let t3 = a.new_token("ops", None, 6000).await?.expect("account exists");
    assert!(a.new_token("nobody", None, 6000).await?.is_none());
    assert_eq!(a.revoke("ops", Some(&t2.id), 7000).await?, Some(vec![t2.id.clone()]));
    assert!(matches!(
        a.authenticate(&t2.token, 8000).await?,
        Err(TokenRefusal::Revoked { ago_ms: 1000, .. })
    ));
    assert!(
        a.authenticate(&t3.token, 8000).await?.is_ok(),
        "the other token still works"
    );
    let mut rest = vec![t.id.clone(), t3.id.clone()];
    rest.sort();
    assert_eq!(a.revoke("ops", None, 9000).await?, Some(rest), "all the unrevoked ones");
    assert_eq!(a.revoke("ops", None, 9000).await?, Some(vec![]));
    assert_eq!(a.revoke("nobody", None, 9000).await?, None);
    let listed = a.users().await?;
    assert!(listed[0].tokens.iter().all(|t| t.revoked_at.is_some()));
    assert!(
        listed[0].tokens.iter().any(|t| t.last_used_at == Some(5000)),
        "use recorded"
    );
    Ok(())
}

async fn audit_is_ordered_filtered_and_pruned(b: Backend) -> anyhow::Result<()> {
    let a = b.accounts(std::time::Duration::from_secs(60)).await;
    let entry = |at: i64, who: &str| outpost_api::accounts::AuditEntry {
        seq: 0,
        at,
        user: who.into(),
        action: "apply".into(),
        target: format!("t{at}"),
        detail: String::new(),
        peer: "127.0.0.1:1".into(),
        result: "ok".into(),
    };
    for (at, who) in [(1_000, "alice"), (20_000, "bob"), (30_000, "alice")] {
        a.record(&entry(at, who)).await?;
    }
    let all = a.audit(0, None, 10).await?;
    assert_eq!(
        all.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(),
        ["t1000", "t20000", "t30000"]
    );
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(a.audit(0, Some("alice"), 10).await?.len(), 2);
    assert_eq!(a.audit(20_000, None, 10).await?.len(), 2);
    assert_eq!(
        a.audit(0, None, 1).await?[0].target,
        "t30000",
        "the newest within the limit"
    );
    a.record(&entry(61_001, "carol")).await?;
    let kept: Vec<String> = a.audit(0, None, 10).await?.into_iter().map(|e| e.target).collect();
    assert_eq!(kept, ["t20000", "t30000", "t61001"], "older than 60 s went");
    Ok(())
}

async fn sessions_are_created_touched_and_expire(b: Backend) -> anyhow::Result<()> {
    use crate::session::{SessionLimits, SessionRefusal, Sessions};
    let a = b.accounts(crate::accounts::AUDIT_MAX_AGE).await;
    let limits = SessionLimits {
        idle: std::time::Duration::from_secs(600),
        max: std::time::Duration::from_secs(3600),
    };
    let one = Sessions::with_db(limits, a.clone());
    let s = one.create("alice", 0).await;
    let bob = one.create("bob", 0).await;
    assert_eq!(a.session_count().await?, 2);
    // touched at 2 min (written at most once a minute)
    assert!(one.check(&s.id, 120_000).await.is_ok());
    let (_, _, _, last_used) = a
        .session(&hex::encode(crate::service::sha256(&s.id)))
        .await?
        .expect("stored");
    assert_eq!(last_used, 120_000);
    // another process on the same tables (a restart, or another replica)
    let two = Sessions::with_db(limits, a.clone());
    assert_eq!(two.check(&s.id, 700_000).await.expect("alive").0, "alice");
    assert!(matches!(
        two.check(&bob.id, 700_000).await,
        Err(SessionRefusal::Idle(..))
    ));
    assert_eq!(a.session_count().await?, 1, "the idle one is deleted");
    assert!(matches!(
        two.check(&s.id, 3_600_000).await,
        Err(SessionRefusal::Expired(..))
    ));
    let c = one.create("carol", 4_000_000).await;
    assert_eq!(a.prune_sessions(0, 0).await?, 0);
    assert_eq!(a.prune_sessions(4_000_001, 0).await?, 1, "idle since before");
    assert_eq!(two.check(&c.id, 4_000_002).await, Err(SessionRefusal::Unknown));
    let d = one.create("dave", 5_000_000).await;
    assert!(two.remove(&d.id).await, "logout");
    assert_eq!(a.session_count().await?, 0);
    if a.shared() {
        assert_eq!(
            one.check(&d.id, 5_000_001).await,
            Err(SessionRefusal::Unknown),
            "logout elsewhere ends it here"
        );
    }
    let e = one.create("erin", 5_000_000).await;
    a.delete_user_sessions("erin").await?;
    assert_eq!(
        Sessions::with_db(limits, a.clone()).check(&e.id, 5_000_001).await,
        Err(SessionRefusal::Unknown)
    );
    Ok(())
}

async fn data_records_insert_query_limit_and_retention(b: Backend) -> anyhow::Result<()> {
    use crate::data::DataQuery;
    use outpost_api::pipeline::{DataRecord, Pipeline, RecordKind};
    let d = b.records().await;
    let rec = |id: &str, pipeline: &str, kind: RecordKind| DataRecord {
        id: id.into(),
        pipeline: pipeline.into(),
        stream: "s".into(),
        at: 5,
        kind,
        rules: vec!["hot".into()],
        key: Some("k".into()),
        data: serde_json::json!({"v": id}),
    };
    let batch = [
        rec("a-1", "p", RecordKind::Record),
        rec("a-2", "p", RecordKind::Anomaly),
    ];
    assert_eq!(d.insert("n1", &batch, 100).await?, 2);
    assert_eq!(d.insert("n1", &batch, 101).await?, 0, "redelivered: nothing new");
    assert_eq!(d.insert("n2", &batch[..1], 102).await?, 1, "ids are per node");
    assert_eq!(d.insert("n2", &[rec("q-1", "q", RecordKind::Record)], 103).await?, 1);
    let all = d.query(&DataQuery::default(), 200).await?;
    assert_eq!(all.len(), 4);
    assert!(all.windows(2).all(|w| w[0].cursor < w[1].cursor));
    assert_eq!(all[1].record, batch[1], "read back as stored");
    let anomalies = d
        .query(
            &DataQuery {
                node: Some("n1".into()),
                kind: Some("anomaly".into()),
                ..Default::default()
            },
            200,
        )
        .await?;
    assert_eq!(
        anomalies.iter().map(|r| r.record.id.as_str()).collect::<Vec<_>>(),
        ["a-2"]
    );
    let newest = d
        .query(
            &DataQuery {
                limit: Some(2),
                ..Default::default()
            },
            200,
        )
        .await?;
    assert_eq!(
        newest.iter().map(|r| r.cursor).collect::<Vec<_>>(),
        [all[2].cursor, all[3].cursor]
    );
    let after = d
        .query(
            &DataQuery {
                after: Some(all[0].cursor),
                limit: Some(1),
                ..Default::default()
            },
            200,
        )
        .await?;
    assert_eq!(after[0].cursor, all[1].cursor);
    let p: Pipeline = serde_json::from_value(serde_json::json!({
        "apiVersion": "outpost.dev/v1", "kind": "Pipeline", "metadata": {"name": "p"},
        "spec": {"streams": [], "sinks": [{"name": "hub", "type": "hub", "retention": "1h"}]}
    }))?;
    d.set_pipelines(vec![(p, 1)]);
    // p keeps 1 h; q (no such pipeline any more) the default 7 days
    assert_eq!(d.prune(3_600_101).await?, 2, "n1's two p records are older than 1 h");
    let left = d.query(&DataQuery::default(), 0).await?;
    assert_eq!(left.len(), 2);
    let week = outpost_api::pipeline::DEFAULT_RETENTION_SECS as i64 * 1000;
    assert_eq!(d.prune(week + 104).await?, 2, "the rest past their retention");
    Ok(())
}

#[test]
fn store_urls_are_shown_without_their_password() {
    for (url, shown) in [
        ("postgres://u:secret@db:5432/x", "postgres://u:***@db:5432/x"),
        ("postgres://u@db/x", "postgres://u@db/x"),
        ("postgres://db/x?sslmode=require", "postgres://db/x?sslmode=require"),
        ("postgresql://u:p@ss:w@db/x", "postgresql://u:***@db/x"),
    ] {
        assert_eq!(pg::redact(url), shown);
    }
}

/// Placements are diffed: committing the plan that is stored writes no assignment row and
/// bumps no generation; a changed placement writes only its own rows; a node's inputs hold
/// only its rows.
async fn an_unchanged_plan_writes_nothing_and_bumps_nothing(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    for n in ["n1", "n2", "n3"] {
        s.join("t", "s", &new_node(n), 0).await?;
    }
    let dep = objects(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web}\nspec:\n  replicas: 2\n  template:\n    spec:\n      containers: [{name: c, image: nginx:1}]\n",
    );
    s.apply(&dep, 1).await?;
    let mut plan = change("n1", &[("deployment/default/web", "h")], &[]);
    plan.changes.insert(
        "n2".into(),
        change("n2", &[("deployment/default/web", "h")], &[]).changes["n2"].clone(),
    );
    plan.assignments
        .insert(dep[0].id(), ["n1".to_string(), "n2".to_string()].into());
    let first = s.commit_plan(&plan).await?;
    assert_eq!(first.keys().collect::<Vec<_>>(), ["n1", "n2"]);
    let gens = |inputs: &ScheduleInputs| inputs.nodes.iter().map(|n| n.generation).collect::<Vec<_>>();
    let before = s.schedule_inputs().await?;

    // Count every write to the placements from here on.
    b.exec(
        "CREATE TABLE writes (x INTEGER);
         CREATE TRIGGER wi AFTER INSERT ON assignments BEGIN INSERT INTO writes VALUES (1); END;
         CREATE TRIGGER wd AFTER DELETE ON assignments BEGIN INSERT INTO writes VALUES (1); END;
         CREATE TRIGGER wu AFTER UPDATE ON assignments BEGIN INSERT INTO writes VALUES (1); END;",
        "CREATE TABLE writes (x INTEGER);
         CREATE FUNCTION count_write() RETURNS trigger AS $$ BEGIN INSERT INTO writes VALUES (1); RETURN NULL; END $$ LANGUAGE plpgsql;
         CREATE TRIGGER w AFTER INSERT OR UPDATE OR DELETE ON assignments FOR EACH ROW EXECUTE FUNCTION count_write();",
    )
    .await?;
    let unchanged = Plan {
        assignments: before.assignments.clone(),
        ..Default::default()
    };
    assert_eq!(s.commit_plan(&unchanged).await?, BTreeMap::new(), "nothing bumped");
    assert_eq!(
        b.count("SELECT COUNT(*) FROM writes").await?,
        0,
        "no placement row written"
    );
    let after = s.schedule_inputs().await?;
    assert_eq!(gens(&after), gens(&before));
    assert_eq!(after.assignments, before.assignments);

    // One replica moves from n2 to n3: one row out, one in; no generation moves without a change.
    let mut moved = unchanged.clone();
    moved
        .assignments
        .insert(dep[0].id(), ["n1".to_string(), "n3".to_string()].into());
    assert_eq!(s.commit_plan(&moved).await?, BTreeMap::new());
    assert_eq!(
        b.count("SELECT COUNT(*) FROM writes").await?,
        2,
        "one delete and one insert"
    );
    assert_eq!(
        s.schedule_inputs().await?.assignments[&dep[0].id()],
        ["n1".to_string(), "n3".to_string()].into()
    );
    // A workload gone from the plan loses its placements.
    assert_eq!(s.commit_plan(&Plan::default()).await?, BTreeMap::new());
    assert!(s.schedule_inputs().await?.assignments.is_empty());

    // Some nodes' inputs: their rows only, the rest as for the fleet.
    let names = |v: &[&str]| v.iter().map(|n| n.to_string()).collect::<Vec<_>>();
    let one = s.schedule_inputs_for(&names(&["n2"])).await?;
    assert_eq!(one.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(), ["n2"]);
    assert_eq!(one.held.keys().collect::<Vec<_>>(), ["n2"]);
    assert_eq!(one.objects.len(), 1);
    let two = s.schedule_inputs_for(&names(&["n3", "nobody", "n2"])).await?;
    assert_eq!(
        two.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["n2", "n3"]
    );
    let all = s.schedule_inputs().await?;
    assert_eq!(
        two.held.keys().collect::<Vec<_>>(),
        all.held.keys().filter(|n| *n != "n1").collect::<Vec<_>>()
    );
    assert!(s.schedule_inputs_for(&names(&["nobody"])).await?.nodes.is_empty());
    Ok(())
}

/// A PostgreSQL store with nodes a and b, and a pool of its own on the same database.
async fn nodes_a_and_b(b: &Backend) -> anyhow::Result<(Arc<dyn Store>, sqlx::PgPool)> {
    let Backend::Pg(url) = b else { unreachable!() };
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    s.join("t", "s", &new_node("a"), 0).await?;
    s.join("t", "s", &new_node("b"), 0).await?;
    Ok((s, sqlx::PgPool::connect(url).await?))
}

/// Wait (up to 10 s) until some session on this database waits for a lock.
async fn wait_for_a_lock_wait(pool: &sqlx::PgPool, never: &str) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
        )
        .fetch_one(pool)
        .await?;
        if waiting > 0 {
            return Ok(());
        }
        assert!(std::time::Instant::now() < deadline, "{never}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A plan that PostgreSQL picks as the victim of a deadlock on `nodes` (another replica's report
/// group or contact batch holding rows in another order) runs again and commits, so the change
/// still reaches its nodes. Found at 15,000 agents on three replicas (BENCHMARKS.md §4).
#[tokio::test]
async fn a_plan_that_loses_a_deadlock_runs_again() -> anyhow::Result<()> {
    let Some(b) = Backend::pg("plan_deadlock") else {
        return Ok(());
    };
    let (s, pool) = nodes_a_and_b(&b).await?;
    let mut other = pool.begin().await?;
    // The plan waits first, so it checks for a cycle first (after the default 1 s) and is
    // the one PostgreSQL fails; this transaction would check only after 30 s.
    sqlx::query("SET LOCAL deadlock_timeout = '30s'")
        .execute(&mut *other)
        .await?;
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'b' FOR UPDATE")
        .execute(&mut *other)
        .await?;
    let mut plan = change("a", &[("k/a", "1")], &[]);
    plan.changes.extend(change("b", &[("k/a", "1")], &[]).changes);
    let s2 = s.clone();
    let planned = tokio::spawn(async move { s2.commit_plan(&plan).await });
    // The plan holds a and waits for b.
    wait_for_a_lock_wait(&pool, "the plan never waited for b").await?;
    // Now a cycle: this transaction wants a, which the plan holds.
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'a' FOR UPDATE")
        .execute(&mut *other)
        .await?;
    other.commit().await?;
    let bumped = planned.await??;
    assert_eq!(
        bumped.keys().collect::<Vec<_>>(),
        ["a", "b"],
        "both nodes' changes committed"
    );
    for n in ["a", "b"] {
        let d = s.sync(n, 0).await?.expect("node exists");
        assert!(d.upsert.iter().any(|w| w.key == "k/a"), "{n} gets the change");
    }
    Ok(())
}

/// A group of status reports locks its nodes' rows in name order before it writes any of them,
/// as a plan does, whatever order the reports came in: a plan on one replica and a report group
/// on another cannot then wait on each other in a cycle (BENCHMARKS.md §4, 15,000 agents).
#[tokio::test]
async fn a_report_group_locks_its_nodes_in_name_order_before_writing() -> anyhow::Result<()> {
    let Some(b) = Backend::pg("report_lock_order") else {
        return Ok(());
    };
    let (s, pool) = nodes_a_and_b(&b).await?;
    let mut other = pool.begin().await?;
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'a' FOR UPDATE")
        .execute(&mut *other)
        .await?;
    // Reports of b, then a: the group must take a (held above) before it touches b.
    let batch = vec![
        ("b".to_string(), status(0, vec![]), 1),
        ("a".to_string(), status(0, vec![]), 1),
    ];
    let s2 = s.clone();
    let group = tokio::spawn(async move { s2.record_statuses(&batch).await });
    wait_for_a_lock_wait(&pool, "the report group never waited for a").await?;
    // The group waits for a holding nothing: b is free to lock.
    let b_free = sqlx::query("SELECT 1 FROM nodes WHERE name = 'b' FOR UPDATE NOWAIT")
        .execute(&mut *other)
        .await;
    assert!(b_free.is_ok(), "the report group locked b before a: {b_free:?}");
    other.commit().await?;
    let out = group.await??;
    assert!(out.iter().all(|r| r.is_ok()), "{out:?}");
    Ok(())
}

/// A spec many nodes hold is stored once (a fleet-wide change writes one spec and a reference
/// per node); every read gives each node the spec as it was planned; a retention run drops the
/// specs no node holds any more, and rows written inline before (an older hub) still read.
async fn a_spec_is_stored_once_and_goes_when_no_node_holds_it(b: Backend) -> anyhow::Result<()> {
    let s = b.open().await;
    s.create_token(&token("t", None)).await?;
    let nodes = ["n1", "n2", "n3", "n4"];
    for n in nodes {
        s.join("t", "s", &new_node(n), 0).await?;
    }
    let fleet = |hash: &str| {
        let mut plan = Plan::default();
        for n in nodes {
            plan.changes.insert(
                n.to_string(),
                change(
                    n,
                    &[("daemonset/default/agentd", hash), ("daemonset/default/own", n)],
                    &[],
                )
                .changes[n]
                    .clone(),
            );
        }
        plan
    };
    assert_eq!(s.commit_plan(&fleet("v1")).await?.len(), 4);
    // One shared spec and one per node.
    assert_eq!(b.count("SELECT COUNT(*) FROM specs").await?, 5);
    assert_eq!(
        b.count("SELECT COUNT(*) FROM node_workloads WHERE spec_addr IS NOT NULL AND spec = ''")
            .await?,
        8
    );
    let reads: Vec<(String, u64)> = nodes.iter().map(|n| (n.to_string(), 0)).collect();
    let group = s.sync_group(&reads).await?;
    for (n, read) in nodes.iter().zip(&group) {
        let want = vec![spec("daemonset/default/agentd", "v1"), spec("daemonset/default/own", n)];
        let one = s.sync(n, 0).await?.expect("known node");
        assert_eq!(one.upsert, want, "{n}");
        assert_eq!(read.as_ref().expect("known node").sync.upsert, want, "{n} in a group");
    }
    // The fleet moves on: the old shared spec is held by nobody and goes at the next retention
    // run; the per-node ones stay.
    s.commit_plan(&fleet("v2")).await?;
    assert_eq!(b.count("SELECT COUNT(*) FROM specs").await?, 6);
    if let Backend::Pg(url) = &b {
        // While a replica holds the write lock (a plan at work), the retention run leaves the
        // specs for its next run instead of waiting in the lock's queue.
        let other = sqlx::PgPool::connect(url).await?;
        let mut held = other.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(super::notify::WRITE_LOCK)
            .execute(&mut *held)
            .await?;
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            b.monitor().await.prune_revisions(50, None),
        )
        .await
        .expect("the retention run does not wait for the write lock")?;
        assert_eq!(b.count("SELECT COUNT(*) FROM specs").await?, 6);
        held.rollback().await?;
        other.close().await;
    }
    b.monitor().await.prune_revisions(50, None).await?;
    assert_eq!(b.count("SELECT COUNT(*) FROM specs").await?, 5);
    assert_eq!(
        s.sync("n1", 0).await?.expect("n1").upsert[0],
        spec("daemonset/default/agentd", "v2")
    );
    // A row with its spec inline (written before specs were stored once) reads as before.
    b.exec_both(&format!(
        "UPDATE node_workloads SET spec = '{}', spec_addr = NULL WHERE node = 'n2' AND key = 'daemonset/default/own'",
        serde_json::to_string(&spec("daemonset/default/own", "n2"))?
    ))
    .await?;
    assert_eq!(
        s.sync("n2", 0).await?.expect("n2").upsert[1],
        spec("daemonset/default/own", "n2")
    );
    Ok(())
}
