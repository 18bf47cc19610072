//! PostgresEngine and its own pool against the real cluster: concurrency, timeouts, clean
//! returns, dropped futures, nodes, versions, extensions and query logging.

mod common;

use std::time::Duration;

use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{ErrorKind, PostgresEngine, TransactionStatus};

fn engine() -> PostgresEngine {
    PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER))
}

async fn pooled(max: usize) -> PostgresEngine {
    let engine = engine();
    let options = PoolOptions::default()
        .max_size(max)
        .acquire_timeout(Duration::from_secs(10));
    engine.start_connection_pool(options).await.unwrap();
    engine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_concurrent_queries_through_a_pool_of_ten() {
    let engine = pooled(10).await;
    let tasks: Vec<_> = (0..500i32)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let row = engine.query_one(("SELECT $1::int4 * 2", (i,))).await?;
                Ok::<_, pgengine::Error>(row.get::<_, i32>(0) == i * 2)
            })
        })
        .collect();
    for t in tasks {
        assert!(
            t.await.unwrap().unwrap(),
            "a query returned another query's answer"
        );
    }
    let stats = engine.pool_stats().unwrap();
    assert!(stats.size <= 10, "{stats:?}");
    assert_eq!(stats.acquired, 500);
    assert_eq!((stats.in_use, stats.waiters), (0, 0));
    assert_eq!(stats.opened - stats.closed, stats.size as u64);
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test]
async fn acquire_timeout_fires_and_a_dropped_waiter_leaves_no_trace() {
    let engine = engine();
    let options = PoolOptions::default()
        .max_size(2)
        .acquire_timeout(Duration::from_millis(200));
    engine.start_connection_pool(options).await.unwrap();
    let a = engine.acquire().await.unwrap();
    let b = engine.acquire().await.unwrap();
    let err = engine.acquire().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    {
        let waiting = engine.acquire();
        assert!(
            tokio::time::timeout(Duration::from_millis(20), waiting)
                .await
                .is_err()
        );
    }
    let stats = engine.pool_stats().unwrap();
    assert_eq!((stats.waiters, stats.timeouts, stats.in_use), (0, 1, 2));
    drop((a, b));
    assert_eq!(
        engine.query_one("SELECT 1").await.unwrap().get::<_, i32>(0),
        1
    );
}

#[tokio::test]
async fn a_connection_returned_mid_transaction_is_clean_for_the_next_user() {
    let engine = pooled(1).await;
    engine
        .run_ddl("CREATE TABLE IF NOT EXISTS pool_clean (v int)")
        .await
        .unwrap();
    let pid = {
        let mut conn = engine.acquire().await.unwrap();
        conn.simple_query("BEGIN; INSERT INTO pool_clean VALUES (1)")
            .await
            .unwrap();
        assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
        conn.process_id()
        // Dropped inside the transaction.
    };
    let mut conn = engine.acquire().await.unwrap();
    assert_eq!(
        conn.process_id(),
        pid,
        "the same connection, rolled back and reused"
    );
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    let row = conn
        .query_one("SELECT pg_current_xact_id_if_assigned()::text")
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<&str>>(0),
        None,
        "no transaction is open"
    );
    let row = conn
        .query_one("SELECT count(*) FROM pool_clean")
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, i64>(0),
        0,
        "the abandoned insert was rolled back"
    );
}

#[tokio::test]
async fn session_changes_are_undone_before_the_next_user() {
    for pipelined in [false, true] {
        let engine = engine();
        let mut options = PoolOptions::default()
            .max_size(1)
            .acquire_timeout(Duration::from_secs(10));
        if pipelined {
            options = options.pipeline(1);
        }
        engine.start_connection_pool(options).await.unwrap();
        let before = engine
            .query_one("SELECT pg_backend_pid(), current_setting('work_mem'), current_setting('application_name')")
            .await
            .unwrap();
        let (pid, work_mem, app) = (
            before.get::<_, i32>(0),
            before.get::<_, String>(1),
            before.get::<_, String>(2),
        );
        assert_ne!(work_mem, "77MB");
        // One user changes the session: settings (one of them set at startup), a channel,
        // and a notification waiting on it.
        engine.execute("SET work_mem = '77MB'").await.unwrap();
        engine
            .execute("SET application_name = 'someone else'")
            .await
            .unwrap();
        engine.execute("LISTEN pool_reset").await.unwrap();
        engine.execute("NOTIFY pool_reset").await.unwrap();
        engine
            .execute(
                "DO $$ BEGIN CREATE ROLE pool_reset_role; \
                 EXCEPTION WHEN duplicate_object THEN NULL; END $$",
            )
            .await
            .unwrap();
        engine.execute("SET ROLE pool_reset_role").await.unwrap();

        let mut conn = engine.acquire().await.unwrap();
        assert_eq!(
            conn.process_id(),
            pid,
            "the same connection, cleaned and reused ({pipelined})"
        );
        assert!(!conn.session_changed());
        assert!(
            conn.take_notifications().is_empty(),
            "the last user's notification is gone"
        );
        let after = conn
            .query_one(
                "SELECT current_setting('work_mem'), current_setting('application_name'), \
                 (SELECT count(*) FROM pg_listening_channels()), current_user::text",
            )
            .await
            .unwrap();
        assert_eq!(
            after.get::<_, String>(0),
            work_mem,
            "pipelined: {pipelined}"
        );
        assert_eq!(
            after.get::<_, String>(1),
            app,
            "the startup setting is kept"
        );
        assert_eq!(after.get::<_, i64>(2), 0, "no channel is listened to");
        assert_eq!(
            after.get::<_, String>(3),
            TempCluster::SUPERUSER,
            "the role is the session's own again"
        );
        drop(conn);
        assert_eq!(
            engine.pool_stats().unwrap().opened,
            1,
            "nothing was discarded"
        );
        engine.close_connection_pool().await.unwrap();
    }

    // Told not to, the pool hands the session on as it is.
    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .reset_session(false)
        .build();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    engine.execute("SET work_mem = '77MB'").await.unwrap();
    let row = engine.query_one("SHOW work_mem").await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "77MB");
    engine.close_connection_pool().await.unwrap();
}

/// Polls a future at most `polls` times, then gives up on it (drops it): a cancellation at
/// an exact point of its progress (tokio-postgres's `Cancellable` idea).
struct Cancellable<F> {
    fut: std::pin::Pin<Box<F>>,
    polls: usize,
}

impl<F: std::future::Future> std::future::Future for Cancellable<F> {
    type Output = Option<F::Output>;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        if self.polls == 0 {
            return std::task::Poll::Ready(None);
        }
        self.polls -= 1;
        self.fut.as_mut().poll(cx).map(Some)
    }
}

#[tokio::test]
async fn futures_dropped_at_every_point_never_leave_a_dirty_connection() {
    let engine = pooled(3).await;
    let mut completed = 0;
    let mut dropped = 0;
    for i in 0..1000i64 {
        // Rows of 100 kB arrive over several reads, so drop points fall before sending, after
        // sending, and part way through the answer.
        let polls = (i % 12) as usize;
        let q = engine.query((
            "SELECT $1::int8, repeat('x', 100000) FROM generate_series(1, 2)",
            (i,),
        ));
        match (Cancellable {
            fut: Box::pin(q),
            polls,
        })
        .await
        {
            Some(rows) => {
                let rows = rows.unwrap();
                assert_eq!(rows[1].get::<_, i64>(0), i);
                completed += 1;
            }
            None => dropped += 1,
        }
        // Whatever happened, the next query gets its own answer.
        let check = -i - 1;
        let row = engine
            .query_one(("SELECT $1::int8", (check,)))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i64>(0), check, "iteration {i}");
    }
    // A connection returned with an abandoned query is cleaned in the background (cancel,
    // read to ReadyForQuery) before it is idle again.
    let mut stats = engine.pool_stats().unwrap();
    for _ in 0..100 {
        if stats.in_use == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        stats = engine.pool_stats().unwrap();
    }
    eprintln!("completed {completed}, dropped {dropped}, pool {stats:?}");
    // Both outcomes happened, so the test exercised what it claims to.
    assert!(
        completed > 0 && dropped > 0,
        "completed {completed}, dropped {dropped}"
    );
    // Connections with an abandoned query were cleaned and reused, not thrown away (only a
    // write cut off half way leaves one that cannot be cleaned).
    assert!(
        stats.closed < dropped / 4,
        "connections dropped mid-query were discarded instead of drained: {stats:?}"
    );
    assert_eq!(stats.in_use, 0);
    assert_eq!(stats.opened - stats.closed, stats.size as u64, "{stats:?}");
}

#[tokio::test]
async fn without_a_pool_each_query_uses_a_fresh_connection() {
    let engine = engine();
    assert!(engine.pool_stats().is_none());
    let a: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let b: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_ne!(a, b);
    // Starting twice and closing when none runs are warnings, not errors.
    engine.close_connection_pool().await.unwrap();
    engine
        .start_connection_pool(PoolOptions::default())
        .await
        .unwrap();
    engine
        .start_connection_pool(PoolOptions::default())
        .await
        .unwrap();
    let a: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    let b: i32 = engine
        .query_one("SELECT pg_backend_pid()")
        .await
        .unwrap()
        .get(0);
    assert_eq!(a, b, "the pool reuses its connection");
    engine.close_connection_pool().await.unwrap();
    assert!(engine.pool_stats().is_none());
}

#[tokio::test]
async fn extra_nodes_and_versions() {
    let replica = engine();
    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .extra_node("read_1", replica)
        .build();
    let node = engine.node("read_1").unwrap();
    assert_eq!(
        node.query_one("SELECT 1").await.unwrap().get::<_, i32>(0),
        1
    );
    let err = engine.node("read_2").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Config);
    assert!(
        err.to_string().contains("read_2") && err.to_string().contains("read_1"),
        "{err}"
    );

    let num: String = engine
        .query_one("SHOW server_version_num")
        .await
        .unwrap()
        .get(0);
    let num: u32 = num.parse().unwrap();
    let v = engine.server_version().await.unwrap();
    assert_eq!(v.major, num / 10000);
    assert_eq!(v.minor, num % 10000);
    assert_eq!(
        engine.get_version().await.unwrap(),
        format!("{}.{}", v.major, v.minor).parse::<f64>().unwrap()
    );
}

use common::Captured;

#[tokio::test]
async fn prep_database_creates_quoted_extensions_and_warns_without_privilege() {
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber());

    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .extensions(["pg_trgm"])
        .build();
    engine.prep_database().await.unwrap();
    let row = engine
        .query_one("SELECT count(*) FROM pg_extension WHERE extname = 'pg_trgm'")
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    engine.prep_database().await.unwrap(); // IF NOT EXISTS: idempotent

    // A name is an identifier, never SQL: this one is looked up as a (missing) extension.
    engine
        .run_ddl("CREATE TABLE IF NOT EXISTS survivor (v int)")
        .await
        .unwrap();
    let evil = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .extensions(["x\"; DROP TABLE survivor; --"])
        .build();
    let err = evil.prep_database().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    assert!(
        engine.query("SELECT * FROM survivor").await.is_ok(),
        "the table survived"
    );

    // A user without the privilege for an untrusted extension: a warning, not an error.
    let mut config = common::tcp_config(TempCluster::PASSWORD_USER);
    config.password(TempCluster::PASSWORD);
    let unprivileged = PostgresEngine::builder(config)
        .extensions(["file_fdw"])
        .build();
    unprivileged.prep_database().await.unwrap();
    let text = logs.text();
    assert!(text.contains("WARN") && text.contains("file_fdw"), "{text}");
}

#[tokio::test]
async fn queries_are_logged_without_their_parameter_values() {
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber());
    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .log_queries(true)
        .log_responses(true)
        .build();
    let secret = "hunter2-secret-value";
    engine
        .query(("SELECT length($1::text) AS n", (secret,)))
        .await
        .unwrap();
    engine.query("SELECT 1/0").await.unwrap_err();
    let text = logs.text();
    assert!(text.contains("SELECT length($1::text) AS n"), "{text}");
    // Each query's start and end carry one id (numbered across the process).
    let id_of = |needle: &str| -> String {
        let line = text
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle}: {text}"));
        let at = line.rfind("query_id=").expect("an id") + "query_id=".len();
        line[at..].split_whitespace().next().unwrap().to_owned()
    };
    let started = id_of("sql=\"SELECT length");
    let done = id_of(": done");
    assert_eq!(started, done, "{text}");
    assert!(
        text.contains("duration_ms") && text.contains("rows=1"),
        "{text}"
    );
    assert!(
        text.contains(": failed") && text.contains("code=\"22012\""),
        "{text}"
    );
    assert!(
        !text.contains(secret),
        "a parameter value was logged: {text}"
    );

    // Logging is off unless asked for.
    let quiet = Captured::default();
    let _guard = tracing::subscriber::set_default(quiet.subscriber());
    engine_without_logs().query("SELECT 1").await.unwrap();
    assert!(
        !quiet.text().contains("pgengine::query"),
        "{}",
        quiet.text()
    );
}

fn engine_without_logs() -> PostgresEngine {
    engine()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_queries_from_many_tasks_share_connections() {
    let engine = engine();
    // Shallow pipelines, so that 500 tasks fill the first one and spill onto the others.
    let options = PoolOptions::default()
        .max_size(4)
        .pipeline(3)
        .pipeline_depth(4);
    engine.start_connection_pool(options).await.unwrap();
    let tasks: Vec<_> = (0..500i64)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                if i % 7 == 3 {
                    // Failing queries in the same batches touch no other query.
                    let err = engine
                        .query_one(("SELECT $1::int8 / 0", (i,)))
                        .await
                        .unwrap_err();
                    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
                    return true;
                }
                let row = engine
                    .query_one(("SELECT $1::int8 * 3, $2::text", (i, format!("t{i}"))))
                    .await
                    .unwrap();
                row.get::<_, i64>(0) == i * 3 && row.get::<_, String>(1) == format!("t{i}")
            })
        })
        .collect();
    for t in tasks {
        assert!(t.await.unwrap(), "a query returned another query's answer");
    }
    // Many queries travelled per round trip: the drivers borrowed few connections, few times.
    let stats = engine.pool_stats().unwrap();
    assert!(stats.acquired < 500, "{stats:?}");
    let conn = engine.acquire().await.unwrap();
    assert!(conn.is_idle());
    drop(conn);

    // Transactions keep a connection to themselves and still work beside the pipeline.
    let inner = engine.clone();
    let (a, b) = engine
        .transaction()
        .run(|tx| async move {
            let a: i64 = tx.query_one("SELECT txid_current()").await?.get(0);
            let b: i64 = inner.query_one("SELECT txid_current()").await?.get(0);
            Ok::<_, pgengine::Error>((a, b))
        })
        .await
        .unwrap();
    assert_eq!(
        a, b,
        "engine queries inside the transaction are not pipelined away"
    );
    engine.close_connection_pool().await.unwrap();
}

/// The backend a pipelined query ran on, after `secs` seconds of sleep.
async fn backend_after_sleep(engine: PostgresEngine, secs: f64) -> i32 {
    engine
        .query_one(("SELECT pg_backend_pid() FROM pg_sleep($1)", (secs,)))
        .await
        .unwrap()
        .get(0)
}

// One thread: each query's choice of connection is made before the next task runs.
#[tokio::test(flavor = "current_thread")]
async fn pipelined_queries_are_not_queued_behind_slow_ones() {
    let engine = engine();
    let options = PoolOptions::default().max_size(4).pipeline(4);
    engine.start_connection_pool(options).await.unwrap();
    // Nothing is known of how long queries take: four at once go to four connections.
    let tasks: Vec<_> = (0..4)
        .map(|_| tokio::spawn(backend_after_sleep(engine.clone(), 0.2)))
        .collect();
    let mut pids = Vec::new();
    for t in tasks {
        pids.push(t.await.unwrap());
    }
    pids.sort();
    pids.dedup();
    assert_eq!(pids.len(), 4, "slow queries shared a connection: {pids:?}");

    // Quick answers, pipelined on every connection, teach the pipeline that queries are
    // quick (answers to queries that found a connection idle teach it nothing)...
    for _ in 0..20 {
        let burst: Vec<_> = (0..16)
            .map(|_| tokio::spawn(backend_after_sleep(engine.clone(), 0.0)))
            .collect();
        for t in burst {
            t.await.unwrap();
        }
    }
    // ...then one of its queries turns out slow: a query sent while it runs goes elsewhere
    // instead of waiting behind it.
    let slow = tokio::spawn(backend_after_sleep(engine.clone(), 1.0));
    // Longer than the 50 ms a query may wait behind others.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let fast = backend_after_sleep(engine.clone(), 0.0).await;
    let slow = slow.await.unwrap();
    assert_ne!(fast, slow, "the quick query waited behind the slow one");
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test]
async fn pipelined_mode_falls_back_for_queries_it_cannot_carry() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(2).pipeline(1))
        .await
        .unwrap();
    // More values than placeholders: the pipeline hands the query back, and run on its own
    // the server's description gives the real error, not an internal one.
    let err = engine
        .query_one(("SELECT $1::int4", (1i32, 2i32)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion);
    assert!(
        err.to_string().contains("1 parameters but 2 values"),
        "{err}"
    );
    // Placeholders inside literals are not placeholders, pipelined or not.
    let row = engine
        .query_one(("SELECT $1::int4 + 1, E'\\'$2', $$ $3 $$", (1i32,)))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 2);
    assert_eq!(row.get::<_, &str>(1), "'$2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_changes_how_answers_are_waited_for_not_what_they_are() {
    let run = async {
        let engine = PostgresEngine::builder(common::socket_config(TempCluster::SUPERUSER))
            .busy_poll(Duration::from_micros(50))
            .build();
        engine
            .start_connection_pool(PoolOptions::default().max_size(4))
            .await
            .unwrap();
        for i in 0..300i32 {
            let row = engine
                .query_one(("SELECT $1::int4 * 2", (i,)))
                .await
                .unwrap();
            assert_eq!(row.get::<_, i32>(0), i * 2);
        }
        // An answer far later than the limit: asked for, then slept for, then read.
        let row = engine
            .query_one("SELECT 7 FROM pg_sleep(0.05)")
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), 7);
        // Transactions and savepoints, and tasks sharing the two runtime workers.
        let tasks: Vec<_> = (0..8i32)
            .map(|t| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let tx = engine.begin().await?;
                    let mut kept = 0i32;
                    for i in 0..20i32 {
                        let sp = tx.savepoint(None).await?;
                        let row = tx.query_one(("SELECT $1::int4 + $2", (t, i))).await?;
                        kept += row.get::<_, i32>(0);
                        if i % 2 == 0 {
                            sp.rollback_to().await?;
                        }
                    }
                    tx.commit().await?;
                    Ok::<_, pgengine::Error>(kept)
                })
            })
            .collect();
        for (t, task) in tasks.into_iter().enumerate() {
            let t = t as i32;
            let expected: i32 = (0..20).map(|i| t + i).sum();
            assert_eq!(task.await.unwrap().unwrap(), expected);
        }
        engine.close_connection_pool().await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("busy-polling connections hung");
}
