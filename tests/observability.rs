//! What an engine tells its operators, against the real cluster: no parameter value ever in a
//! log line or an error's `Display` or `Debug`, whatever fails and wherever; the pool's counts and wait times; the
//! `after_connect` hook on every new connection.

mod common;

use std::sync::{Arc, Mutex};

use common::Captured;
use std::time::Duration;

use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{PostgresEngine, Query};

/// The tests of this binary run one at a time: `tracing` caches which callsites a
/// subscriber wants, and a subscriber set on one test's thread while another test's thread
/// has none can leave a callsite's cached interest wrong for a moment (a span then goes
/// unrecorded).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const CANARY: &str = "canary-7f3a91";
/// A canary the server quotes in an out-of-range message (22003).
const NUMBER_CANARY: &str = "745196270";

#[tokio::test]
async fn no_parameter_value_reaches_a_log_line_whatever_fails() {
    let _one = ONE_AT_A_TIME.lock().await;
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(logs.subscriber_at(tracing::Level::TRACE));

    let config = common::tcp_config(TempCluster::SUPERUSER);
    let node = PostgresEngine::builder(config.clone())
        .log_queries(true)
        .build();
    let engine = PostgresEngine::builder(config)
        .log_queries(true)
        .extra_node("node", node)
        .build();
    engine
        .run_ddl(
            "DROP TABLE IF EXISTS obs_t; CREATE TABLE obs_t (
                 short varchar(5), uniq text UNIQUE, chk text CHECK (length(chk) < 5))",
        )
        .await
        .unwrap();
    engine
        .execute(("INSERT INTO obs_t (uniq) VALUES ($1)", (CANARY,)))
        .await
        .unwrap();

    // Every failure shape, each with the canary as a parameter value.
    let failing = || {
        vec![
            (
                SqlState::INVALID_TEXT_REPRESENTATION,
                Query::new("SELECT $1::text::int4").bind(CANARY),
            ),
            (
                SqlState::STRING_DATA_RIGHT_TRUNCATION,
                Query::new("INSERT INTO obs_t (short) VALUES ($1)").bind(CANARY),
            ),
            (
                SqlState::UNIQUE_VIOLATION,
                Query::new("INSERT INTO obs_t (uniq) VALUES ($1)").bind(CANARY),
            ),
            (
                SqlState::CHECK_VIOLATION,
                Query::new("INSERT INTO obs_t (chk) VALUES ($1)").bind(CANARY),
            ),
            (
                SqlState::NUMERIC_VALUE_OUT_OF_RANGE,
                Query::new("SELECT $1::text::int2").bind(NUMBER_CANARY),
            ),
        ]
    };
    for pipelined in [false, true] {
        let mut options = PoolOptions::default().max_size(2);
        if pipelined {
            options = options.pipeline(2);
        }
        engine.start_connection_pool(options).await.unwrap();
        for (code, query) in failing() {
            let e = engine.query(query).await.unwrap_err();
            assert_eq!(e.code(), Some(&code), "{e}");
            // Nor in the error's Display or Debug; the server's own words are still there.
            for shown in [
                format!("{e}"),
                format!("{e:?}"),
                format!("{}", e.redacted()),
            ] {
                assert!(
                    !shown.contains(CANARY) && !shown.contains(NUMBER_CANARY),
                    "{code}: {shown}"
                );
            }
            let db = e.as_db_error().unwrap();
            let full = format!("{} {}", db.message(), db.detail().unwrap_or(""));
            if code != SqlState::STRING_DATA_RIGHT_TRUNCATION {
                assert!(
                    full.contains(CANARY) || full.contains(NUMBER_CANARY),
                    "{code}: {full}"
                );
            }
        }
        engine.close_connection_pool().await.unwrap();
    }
    for (code, query) in failing() {
        // A node, a transaction (and an engine query routed into it), a savepoint scope, an
        // Atomic, a batch.
        let e = engine.node("node").unwrap().query(query).await.unwrap_err();
        assert_eq!(e.code(), Some(&code));
        let inner = engine.clone();
        let sql = query_text(&code);
        let e = engine
            .transaction()
            .run(|tx| async move {
                tx.savepoint_scope(|_| async move { inner.execute(bound(sql)).await })
                    .await
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(&code));
        let mut atomic = engine.atomic();
        atomic.add(bound(sql));
        assert_eq!(atomic.await.unwrap_err().code(), Some(&code));
        if sql.starts_with("SELECT") {
            let e = engine.batch(bound(sql), 10).await.unwrap_err();
            assert_eq!(e.code(), Some(&code));
        }
    }
    // COPY data with the canary in a column that refuses it.
    let mut conn = engine.acquire().await.unwrap();
    let mut sink = conn.copy_in("COPY obs_t (chk) FROM STDIN").await.unwrap();
    sink.write(format!("{CANARY}\n").as_bytes()).await.unwrap();
    assert_eq!(
        sink.finish().await.unwrap_err().code(),
        Some(&SqlState::CHECK_VIOLATION)
    );
    drop(conn);

    let text = logs.text();
    assert!(
        text.contains("failed"),
        "the failures were logged at all:\n{text}"
    );
    for line in text.lines() {
        assert!(
            !line.contains(CANARY) && !line.contains(NUMBER_CANARY),
            "a value reached the log: {line}"
        );
    }
}

fn query_text(code: &SqlState) -> &'static str {
    match *code {
        SqlState::INVALID_TEXT_REPRESENTATION => "SELECT $1::text::int4",
        SqlState::STRING_DATA_RIGHT_TRUNCATION => "INSERT INTO obs_t (short) VALUES ($1)",
        SqlState::UNIQUE_VIOLATION => "INSERT INTO obs_t (uniq) VALUES ($1)",
        SqlState::CHECK_VIOLATION => "INSERT INTO obs_t (chk) VALUES ($1)",
        _ => "SELECT $1::text::int2",
    }
}

fn bound(sql: &'static str) -> Query {
    let value = if sql.ends_with("int2") {
        NUMBER_CANARY
    } else {
        CANARY
    };
    Query::new(sql).bind(value)
}

#[tokio::test]
async fn the_pool_counts_failed_connects_and_measures_acquire_waits() {
    let _one = ONE_AT_A_TIME.lock().await;
    let engine = PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER));
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let held = engine.acquire().await.unwrap();
    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.acquire().await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    drop(held);
    waiter.await.unwrap().unwrap();
    let stats = engine.pool_stats().unwrap();
    assert_eq!(stats.acquired, 2);
    assert!(
        stats.acquire_wait_max >= Duration::from_millis(150),
        "{stats:?}"
    );
    assert!(stats.acquire_wait_total >= stats.acquire_wait_max);
    assert_eq!(stats.connect_failures, 0);
    engine.close_connection_pool().await.unwrap();

    // A server that refuses: every failed connect is counted.
    let mut wrong = common::tcp_config(TempCluster::SUPERUSER);
    wrong.dbname("no_such_database");
    let engine = PostgresEngine::new(wrong);
    engine
        .start_connection_pool(PoolOptions::default().max_size(2))
        .await
        .unwrap();
    for _ in 0..3 {
        let e = engine.acquire().await.unwrap_err();
        assert_eq!(e.code(), Some(&SqlState::UNDEFINED_DATABASE), "{e}");
    }
    assert_eq!(engine.pool_stats().unwrap().connect_failures, 3);
}

#[tokio::test]
async fn after_connect_sets_up_every_new_connection_and_again_after_a_reset() {
    let _one = ONE_AT_A_TIME.lock().await;
    let setup = PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER));
    setup
        .run_ddl("CREATE SCHEMA IF NOT EXISTS obs_app; CREATE TABLE IF NOT EXISTS obs_app.marker (x int)")
        .await
        .unwrap();
    let runs = Arc::new(Mutex::new(0));
    let counted = runs.clone();
    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .after_connect(move |conn| {
            let counted = counted.clone();
            Box::pin(async move {
                *counted.lock().unwrap() += 1;
                conn.simple_query("SET search_path TO obs_app, public")
                    .await?;
                Ok(())
            })
        })
        .build();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let path = |engine: PostgresEngine| async move {
        engine
            .query_one("SELECT current_setting('search_path')")
            .await
            .unwrap()
            .get::<_, String>(0)
    };
    assert_eq!(path(engine.clone()).await, "obs_app, public");
    // The hook's setting is where the session begins: no reset for it, one run.
    assert_eq!(path(engine.clone()).await, "obs_app, public");
    assert_eq!(*runs.lock().unwrap(), 1);
    // A SET through the engine is undone, and the hook runs again after the reset.
    engine.execute("SET search_path TO public").await.unwrap();
    assert_eq!(path(engine.clone()).await, "obs_app, public");
    assert_eq!(*runs.lock().unwrap(), 2);
    engine.close_connection_pool().await.unwrap();

    // A failing hook: the connection is not handed out, and the error is the hook's.
    let engine = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
        .after_connect(|conn| {
            Box::pin(async move {
                conn.simple_query("SELECT 1/0").await?;
                Ok(())
            })
        })
        .build();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let e = engine.query("SELECT 1").await.unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::DIVISION_BY_ZERO), "{e}");
    assert!(e.to_string().contains("after_connect"), "{e}");
    let stats = engine.pool_stats().unwrap();
    assert_eq!((stats.size, stats.connect_failures), (0, 1), "{stats:?}");
}

#[tokio::test]
async fn every_entry_point_traces_its_queries_with_the_database_conventions() {
    let _one = ONE_AT_A_TIME.lock().await;
    use futures::StreamExt;
    let logs = Captured::default();
    let _guard = tracing::subscriber::set_default(logs.spans_subscriber());

    let config = common::tcp_config(TempCluster::SUPERUSER);
    let engine = PostgresEngine::builder(config.clone())
        .log_queries(true)
        .extra_node("node", PostgresEngine::new(config.clone()))
        .build();
    engine
        .run_ddl("DROP TABLE IF EXISTS obs_trace; CREATE TABLE obs_trace (x int)")
        .await
        .unwrap();
    // Fresh connections, a pool, a pipelined pool.
    engine.query("SELECT 1 AS ep_fresh").await.unwrap();
    engine
        .start_connection_pool(PoolOptions::default().max_size(2))
        .await
        .unwrap();
    engine.query("SELECT 1 AS ep_pooled").await.unwrap();
    engine.close_connection_pool().await.unwrap();
    engine
        .start_connection_pool(PoolOptions::default().max_size(2).pipeline(2))
        .await
        .unwrap();
    engine.query("SELECT 1 AS ep_pipelined").await.unwrap();
    assert_eq!(
        engine
            .query("SELECT 1/0 AS ep_fails")
            .await
            .unwrap_err()
            .code(),
        Some(&SqlState::DIVISION_BY_ZERO)
    );
    // A node, a transaction with a savepoint and an engine query routed into it.
    engine
        .node("node")
        .unwrap()
        .query("SELECT 1 AS ep_node")
        .await
        .unwrap();
    let inner = engine.clone();
    engine
        .transaction()
        .run(|tx| async move {
            tx.query("SELECT 1 AS ep_tx").await?;
            tx.savepoint_scope(|_| async move { inner.query("SELECT 1 AS ep_savepoint").await })
                .await
        })
        .await
        .unwrap();
    // An Atomic's statements, a batch, COPY both ways, a LISTEN.
    let mut atomic = engine.atomic();
    atomic.add("INSERT INTO obs_trace VALUES (1) -- ep_atomic_a");
    atomic.add("INSERT INTO obs_trace VALUES (2) -- ep_atomic_b");
    atomic.await.unwrap();
    let mut batch = engine
        .batch("SELECT x AS ep_batch FROM obs_trace", 1)
        .await
        .unwrap();
    while batch.next_batch().await.unwrap().is_some() {}
    drop(batch);
    {
        let mut conn = engine.acquire().await.unwrap();
        let mut sink = conn
            .copy_in("COPY obs_trace FROM STDIN -- ep_copy_in")
            .await
            .unwrap();
        sink.write(b"3\n").await.unwrap();
        sink.finish().await.unwrap();
        let out = conn
            .copy_out("COPY obs_trace TO STDOUT -- ep_copy_out")
            .await
            .unwrap();
        let chunks: Vec<_> = out.collect().await;
        assert_eq!(chunks.len(), 3);
    }
    let listener = engine.listen("ep_channel").await.unwrap();
    drop(listener);
    engine.close_connection_pool().await.unwrap();

    let text = logs.text();
    // Each a span of its own, closed, with the conventions' fields.
    let closed_span = |marker: &str| {
        text.lines()
            .find(|l| l.contains(marker) && l.contains("query{") && l.ends_with_close())
            .unwrap_or_else(|| panic!("no closed query span for {marker}:\n{text}"))
            .to_owned()
    };
    for marker in [
        "ep_fresh",
        "ep_pooled",
        "ep_pipelined",
        "ep_node",
        "ep_tx",
        "ep_savepoint",
        "ep_atomic_a",
        "ep_atomic_b",
        "ep_batch",
        "ep_copy_in",
        "ep_copy_out",
        "ep_channel",
    ] {
        let line = closed_span(marker);
        for field in [
            "db.system.name=\"postgresql\"",
            "db.operation.name=",
            "db.query.text=",
            "server.address=",
            "server.port=",
        ] {
            assert!(line.contains(field), "{marker} lacks {field}: {line}");
        }
    }
    assert!(closed_span("ep_fails").contains("db.response.status_code=\"22012\""));
    assert!(closed_span("ep_pooled").contains("db.response.returned_rows=1"));
    assert!(closed_span("ep_pooled").contains("pgengine.acquire_wait_us="));
    assert!(closed_span("ep_pipelined").contains("pgengine.pipeline_wait_us="));
    // The transaction's statements are its children, and its outcome is recorded.
    assert!(closed_span("ep_tx").contains("transaction{"));
    assert!(closed_span("ep_savepoint").contains("transaction{"));
    assert!(
        text.lines()
            .any(|l| l.contains("transaction{") && l.contains("pgengine.outcome=\"committed\"")),
        "{text}"
    );
    // log_queries logs every path too: the Atomic's statements are logged one by one.
    assert!(
        text.lines()
            .any(|l| l.contains("pgengine::query: query") && l.contains("ep_atomic_b")),
        "{text}"
    );
}

trait EndsWithClose {
    fn ends_with_close(&self) -> bool;
}

impl EndsWithClose for str {
    fn ends_with_close(&self) -> bool {
        self.contains(": close time.busy=")
    }
}
