//! Beyond one server, against real ones: a streaming standby made by the harness with
//! `pg_basebackup -R` serves as Piccolo's read-replica node; multi-host connection strings
//! pick a server by `target_session_attrs`; and an engine follows a failover to a promoted
//! standby without a restart, never committing a write twice or losing an acknowledged one.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{Config, Connection, ErrorKind, PostgresEngine};

/// A primary and its standby, shared by the tests that do not stop either.
fn pair() -> &'static (TempCluster, TempCluster) {
    static PAIR: OnceLock<(TempCluster, TempCluster)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let primary = TempCluster::start().expect("primary starts");
        let standby = primary.standby().expect("standby made and started");
        primary
            .psql("CREATE TABLE replicated (id int8, note text)")
            .unwrap();
        let started = Instant::now();
        while standby
            .psql("SELECT to_regclass('replicated') IS NOT NULL")
            .unwrap()
            != "t"
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the table never replayed"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        (primary, standby)
    })
}

fn config(cluster: &TempCluster) -> Config {
    Config::parse(&format!(
        "{} connect_timeout=10",
        cluster.socket_conninfo(TempCluster::SUPERUSER)
    ))
    .unwrap()
}

/// Settings naming both servers over TCP, `first` then `second`, plus `extra`.
fn both(first: &TempCluster, second: &TempCluster, extra: &str) -> Config {
    Config::parse(&format!(
        "host=127.0.0.1,127.0.0.1 port={},{} user={} dbname=postgres connect_timeout=10 {extra}",
        first.port(),
        second.port(),
        TempCluster::SUPERUSER
    ))
    .unwrap()
}

/// Polls `check` until it returns true, for at most 30 s (replay is usually milliseconds).
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_replica_node_serves_reads_once_replayed() {
    let (primary, standby) = pair();
    let replica = PostgresEngine::new(config(standby));
    let engine = PostgresEngine::builder(config(primary))
        .extra_node("read_1", replica)
        .build();
    let id: i64 = engine
        .query_one("SELECT (extract(epoch FROM clock_timestamp()) * 1e6)::int8")
        .await
        .unwrap()
        .get(0);
    engine
        .execute((
            "INSERT INTO replicated VALUES ($1, 'from the primary')",
            (id,),
        ))
        .await
        .unwrap();
    let read_1 = engine.node("read_1").unwrap();
    let in_recovery: bool = read_1
        .query_one("SELECT pg_is_in_recovery()")
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the node is the standby");
    eventually("the write replayed on the standby", async || {
        read_1
            .query_opt(("SELECT note FROM replicated WHERE id = $1", (id,)))
            .await
            .unwrap()
            .is_some()
    })
    .await;

    // A batch routed to the node reads there too.
    let mut batch = engine
        .batch(
            pgengine::Query::new("SELECT pg_is_in_recovery(), note FROM replicated WHERE id = $1")
                .bind(id),
            10,
        )
        .node("read_1")
        .start()
        .await
        .unwrap();
    let rows = batch.next_batch().await.unwrap().expect("one batch");
    assert_eq!(rows.len(), 1);
    assert!(rows[0].get::<_, bool>(0), "the batch ran on the standby");
    assert_eq!(rows[0].get::<_, String>(1), "from the primary");
}

#[tokio::test]
async fn a_write_sent_to_the_replica_is_25006() {
    let (_, standby) = pair();
    let engine = PostgresEngine::new(config(standby));
    let err = engine
        .execute("CREATE TABLE written_on_a_standby (id int)")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    assert!(err.to_string().contains("read-only transaction"), "{err}");
    // Inside a transaction too; the connection stays usable for reads.
    let mut conn = Connection::connect(&config(standby)).await.unwrap();
    let err = conn
        .simple_query("BEGIN; INSERT INTO replicated VALUES (1, 'x'); COMMIT")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{err}"
    );
    // The explicit block failed with it: the server's word, not ours.
    assert_eq!(
        conn.transaction_status(),
        pgengine::TransactionStatus::Failed
    );
    conn.simple_query("ROLLBACK").await.unwrap();
    assert!(conn.is_idle());
    conn.query_one("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_pooled_replica_connection_has_its_session_reset_in_recovery() {
    let (_, standby) = pair();
    let engine = PostgresEngine::new(config(standby));
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let pid: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    engine.execute("SET work_mem = '77MB'").await.unwrap();
    // SET, RESET ALL, UNLISTEN and CLOSE only touch the backend's own state: a standby runs
    // them, so the connection is cleaned, not discarded.
    let mut conn = engine.acquire().await.unwrap();
    assert_eq!(conn.process_id(), pid, "the same connection");
    assert!(!conn.session_changed());
    let row = conn
        .query_one("SELECT current_setting('work_mem'), pg_is_in_recovery()")
        .await
        .unwrap();
    assert_ne!(row.get::<_, &str>(0), "77MB");
    assert!(row.get::<_, bool>(1), "on the standby");
    drop(conn);
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test]
async fn target_session_attrs_pick_the_right_server() {
    let (primary, standby) = pair();
    let in_recovery = async |config: &Config| -> pgengine::Result<bool> {
        let mut conn = Connection::connect(config).await?;
        Ok(conn.query_one("SELECT pg_is_in_recovery()").await?.get(0))
    };
    // Standby listed first, so "any" and the first-match rule are told apart.
    let cases = [
        ("", true),
        ("target_session_attrs=any", true),
        ("target_session_attrs=read-write", false),
        ("target_session_attrs=primary", false),
        ("target_session_attrs=read-only", true),
        ("target_session_attrs=standby", true),
        ("target_session_attrs=prefer-standby", true),
    ];
    for (attrs, standby_expected) in cases {
        let got = in_recovery(&both(standby, primary, attrs)).await.unwrap();
        assert_eq!(got, standby_expected, "{attrs}");
        // The same with the primary listed first.
        let got = in_recovery(&both(primary, standby, attrs)).await.unwrap();
        let expected = match attrs {
            "" | "target_session_attrs=any" => false,
            _ => standby_expected,
        };
        assert_eq!(got, expected, "{attrs}, primary first");
    }
    // No server of the kind asked for: an error naming why, retry-safe.
    let only_primary = |attrs: &str| {
        Config::parse(&format!(
            "host=127.0.0.1 port={} user={} dbname=postgres {attrs}",
            primary.port(),
            TempCluster::SUPERUSER
        ))
        .unwrap()
    };
    let err = in_recovery(&only_primary("target_session_attrs=standby"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("target_session_attrs=standby"),
        "{err}"
    );
    assert!(err.safe_to_retry());
    // prefer-standby settles for a primary when there is no standby.
    assert!(
        !in_recovery(&only_primary("target_session_attrs=prefer-standby"))
            .await
            .unwrap()
    );
    // A session made read-only by default_transaction_read_only is not read-write either.
    let mut read_only = only_primary("target_session_attrs=read-write");
    read_only.options("-c default_transaction_read_only=on");
    let err = in_recovery(&read_only).await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}

#[tokio::test]
async fn load_balance_hosts_random_uses_every_host() {
    let (primary, standby) = pair();
    let config = both(primary, standby, "load_balance_hosts=random");
    let mut seen = [0; 2];
    for _ in 0..40 {
        let mut conn = Connection::connect(&config).await.unwrap();
        let standby: bool = conn
            .query_one("SELECT pg_is_in_recovery()")
            .await
            .unwrap()
            .get(0);
        seen[standby as usize] += 1;
        conn.close().await.unwrap();
    }
    // 40 fair coin flips all landing on one side: about one chance in 5 * 10^11.
    assert!(seen[0] > 0 && seen[1] > 0, "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_to_a_promoted_standby_without_a_restart() {
    let primary = TempCluster::start().unwrap();
    let standby = primary.standby().unwrap();
    let engine = PostgresEngine::new(both(&primary, &standby, "target_session_attrs=read-write"));
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(2)
                .acquire_timeout(Duration::from_secs(5)),
        )
        .await
        .unwrap();
    // No primary key: a write committed twice would show as two rows.
    engine
        .run_ddl("CREATE TABLE failover (id int)")
        .await
        .unwrap();
    let mut acknowledged = Vec::new();
    let mut failed = Vec::new();
    for id in 0..20 {
        engine
            .execute(("INSERT INTO failover VALUES ($1)", (id,)))
            .await
            .unwrap();
        acknowledged.push(id);
    }

    // The primary goes away (a fast shutdown sends the standby all WAL first) and the standby
    // is promoted, while the application keeps writing.
    primary.stop().unwrap();
    let promoted = {
        let started = Instant::now();
        let mut id = 20;
        let mut promoted_at = None;
        loop {
            match engine
                .execute(("INSERT INTO failover VALUES ($1)", (id,)))
                .await
            {
                Ok(_) => acknowledged.push(id),
                Err(e) => {
                    assert!(promoted_at.is_none() || failed.len() < 1000, "{e}");
                    failed.push(id);
                }
            }
            id += 1;
            if promoted_at.is_none() && id == 25 {
                standby.promote().unwrap();
                promoted_at = Some(id);
            }
            if acknowledged.len() >= 40 {
                break true;
            }
            if started.elapsed() > Duration::from_secs(60) {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    assert!(promoted, "the engine never reached the promoted standby");
    let server: (bool, i32) = {
        let row = engine
            .query_one("SELECT pg_is_in_recovery(), current_setting('port')::int")
            .await
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(
        server,
        (false, i32::from(standby.port())),
        "writes go to the new primary"
    );

    let mut conn = Connection::connect(&config(&standby)).await.unwrap();
    let rows = conn
        .query("SELECT id, count(*)::int FROM failover GROUP BY id")
        .await
        .unwrap();
    let counts: std::collections::HashMap<i32, i32> =
        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    for id in &acknowledged {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "acknowledged write {id} lost or doubled"
        );
    }
    for (id, n) in &counts {
        assert_eq!(*n, 1, "write {id} committed {n} times");
        assert!(
            acknowledged.contains(id) || failed.contains(id),
            "write {id} came from nowhere"
        );
    }
    eprintln!(
        "acknowledged {}, failed during the failover {}, of which committed anyway {}",
        acknowledged.len(),
        failed.len(),
        failed.iter().filter(|id| counts.contains_key(id)).count()
    );
}
