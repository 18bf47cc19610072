//! Behind a real PgBouncer (Debian's, started by the harness on loopback) in transaction
//! pooling mode, with fewer server connections than clients so that consecutive transactions
//! of one client land on different server sessions: with the statement cache off every kind
//! of work succeeds; with it on, the error says what to change.

mod common;

use std::time::Duration;

use common::cluster;
use pgengine::pool::PoolOptions;
use pgengine::testing::{PgBouncer, TempCluster};
use pgengine::{Config, Connection, PostgresEngine, Query};
use postgres_types::{IsNull, ToSql, Type, to_sql_checked};

fn bouncer(mode: &str, pool_size: usize) -> PgBouncer {
    cluster()
        .pgbouncer(mode, pool_size)
        .expect("pgbouncer starts (CI installs Debian's pgbouncer)")
}

fn config(bouncer: &PgBouncer) -> Config {
    Config::parse(&format!(
        "{} connect_timeout=10",
        bouncer.conninfo(TempCluster::SUPERUSER)
    ))
    .unwrap()
}

async fn engine(bouncer: &PgBouncer, pipeline: usize) -> PostgresEngine {
    let engine = PostgresEngine::builder(config(bouncer))
        .statement_cache_capacity(0)
        .build();
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(6)
                .pipeline(pipeline)
                .acquire_timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    engine
}

/// A value only the server can type (an enum): its statement must be described first.
#[derive(Debug)]
struct Mood(&'static str);

impl ToSql for Mood {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }
    fn accepts(ty: &Type) -> bool {
        ty.name() == "bouncer_mood"
    }
    to_sql_checked!();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_work_in_transaction_mode_without_the_cache() {
    let bouncer = bouncer("transaction", 2);
    cluster()
        .psql(
            "DROP TABLE IF EXISTS bouncer_t; CREATE TABLE bouncer_t (id int PRIMARY KEY, note text);
             DROP TYPE IF EXISTS bouncer_mood; CREATE TYPE bouncer_mood AS ENUM ('sad', 'happy');
             INSERT INTO bouncer_t SELECT g, 'row ' || g FROM generate_series(1000, 2999) g;",
        )
        .unwrap();
    for pipeline in [0, 2] {
        let engine = engine(&bouncer, pipeline).await;
        // Many tasks, more than the two server connections: each gets its own answers.
        let tasks: Vec<_> = (0..8i32)
            .map(|t| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    for i in 0..40i32 {
                        let n = t * 1000 + i;
                        let row = engine
                            .query_one(("SELECT $1::int4 + 1, $2::text", (n, format!("t{t}"))))
                            .await
                            .unwrap();
                        assert_eq!(row.get::<_, i32>(0), n + 1);
                        assert_eq!(row.get::<_, String>(1), format!("t{t}"));
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // A parameter type only the server knows: described, then parsed again with it.
        for _ in 0..10 {
            let row = engine
                .query_one(("SELECT $1::bouncer_mood::text", (Mood("happy"),)))
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "happy");
        }
        // A transaction with a savepoint rolled back to.
        let base = 10 * (pipeline as i32 + 1);
        engine
            .transaction()
            .run(|tx| async move {
                tx.execute(("INSERT INTO bouncer_t VALUES ($1, 'kept')", (base,)))
                    .await?;
                let sp = tx.savepoint(Some("before_second")).await?;
                tx.execute(("INSERT INTO bouncer_t VALUES ($1, 'undone')", (base + 1,)))
                    .await?;
                sp.rollback_to().await?;
                tx.execute(("INSERT INTO bouncer_t VALUES ($1, 'kept')", (base + 2,)))
                    .await?;
                Ok(())
            })
            .await
            .unwrap();
        let kept: Vec<i32> = engine
            .query((
                "SELECT id FROM bouncer_t WHERE id BETWEEN $1 AND $2 ORDER BY id",
                (base, base + 2),
            ))
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(kept, [base, base + 2]);
        // Atomic: all or nothing.
        let mut atomic = engine.atomic();
        atomic.add(Query::new("INSERT INTO bouncer_t VALUES ($1, 'a')").bind(base + 3));
        atomic.add(Query::new("INSERT INTO bouncer_t VALUES ($1, 'dup')").bind(base));
        assert!(
            atomic.run().await.is_err(),
            "the duplicate fails the whole Atomic"
        );
        assert!(
            engine
                .query_opt(("SELECT 1 FROM bouncer_t WHERE id = $1", (base + 3,)))
                .await
                .unwrap()
                .is_none()
        );
        let mut atomic = engine.atomic();
        atomic.add(Query::new("INSERT INTO bouncer_t VALUES ($1, 'a')").bind(base + 3));
        atomic.add(Query::new("INSERT INTO bouncer_t VALUES ($1, 'b')").bind(base + 4));
        atomic.run().await.unwrap();
        // A batch over a native portal (inside its own transaction).
        let mut batch = engine
            .batch("SELECT id FROM bouncer_t WHERE id >= 1000 ORDER BY id", 300)
            .start()
            .await
            .unwrap();
        let mut seen = 0;
        while let Some(rows) = batch.next_batch().await.unwrap() {
            for row in rows {
                assert_eq!(row.get::<_, i32>(0), 1000 + seen);
                seen += 1;
            }
        }
        assert_eq!(seen, 2000);
        drop(batch);
        engine.close_connection_pool().await.unwrap();
    }
}

#[tokio::test]
async fn cancel_through_pgbouncer() {
    let bouncer = bouncer("transaction", 2);
    let mut conn = Connection::connect(&config(&bouncer)).await.unwrap();
    conn.set_statement_cache_capacity(0);
    let token = conn.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query().await.unwrap();
    });
    let err = conn.execute("SELECT pg_sleep(30)").await.unwrap_err();
    assert_eq!(err.code(), Some("57014"), "{err}");
    assert_eq!(
        conn.query_one("SELECT 3::int")
            .await
            .unwrap()
            .get::<_, i32>(0),
        3
    );
}

#[tokio::test]
async fn with_the_cache_on_the_error_says_what_to_do() {
    // One server connection shared by two clients: both name their first statement pge_1.
    let bouncer = bouncer("transaction", 1);
    let mut a = Connection::connect(&config(&bouncer)).await.unwrap();
    let mut b = Connection::connect(&config(&bouncer)).await.unwrap();
    a.query_one("SELECT 1::int").await.unwrap();
    let err = b.query_one("SELECT 2::int").await.unwrap_err();
    eprintln!("{err}");
    assert!(matches!(err.code(), Some("42P05") | Some("26000")), "{err}");
    assert!(
        err.to_string().contains("statement_cache_capacity(0)"),
        "{err}"
    );
    // The same two clients with the cache off get along.
    a.set_statement_cache_capacity(0);
    b.set_statement_cache_capacity(0);
    for i in 0..10i32 {
        let (x, y) = (
            a.query_one(("SELECT $1::int", (i,)))
                .await
                .unwrap()
                .get::<_, i32>(0),
            b.query_one(("SELECT $1::int", (-i,)))
                .await
                .unwrap()
                .get::<_, i32>(0),
        );
        assert_eq!((x, y), (i, -i));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_mode_runs_statements_and_atomics_and_refuses_open_blocks() {
    let bouncer = bouncer("statement", 2);
    for pipeline in [0, 2] {
        let engine = engine(&bouncer, pipeline).await;
        let tasks: Vec<_> = (0..6i32)
            .map(|t| {
                let engine = engine.clone();
                tokio::spawn(async move {
                    for i in 0..20 {
                        let v = t * 100 + i;
                        let row = engine.query_one(("SELECT $1::int + 1", (v,))).await?;
                        assert_eq!(row.get::<_, i32>(0), v + 1);
                    }
                    Ok::<_, pgengine::Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().unwrap();
        }

        // PgBouncer refuses a transaction block left open between statements (and drops the
        // client): the error says so.
        let err = engine.begin().await.unwrap_err();
        assert_eq!(err.code(), Some("08P01"), "{err}");
        assert!(err.to_string().contains("statement pooling"), "{err}");
        // A batch keeps its portal's transaction open between fetches: refused the same way.
        let err = async {
            let mut batch = engine
                .batch("SELECT generate_series(1, 10)", 3)
                .start()
                .await?;
            while batch.next_batch().await?.is_some() {}
            Ok::<_, pgengine::Error>(())
        }
        .await
        .unwrap_err();
        assert_eq!(err.code(), Some("08P01"), "{err}");

        // An Atomic is one pipeline with one Sync: no statement ends with the block open, so
        // it runs, on one server connection, and stays all-or-nothing. One that fails ends
        // with its block failed, which PgBouncer answers by dropping the client (before or
        // instead of the server's error): nothing is committed either way.
        let table = format!("bouncer_stmt_{pipeline}");
        cluster()
            .psql(&format!(
                "DROP TABLE IF EXISTS {table}; CREATE TABLE {table} (v int)"
            ))
            .unwrap();
        let mut atomic = engine.atomic();
        atomic.add(format!("INSERT INTO {table} VALUES (1)"));
        atomic.add("SELECT 1 / 0");
        let err = atomic.run().await.unwrap_err();
        assert!(matches!(err.code(), Some("22012") | Some("08P01")), "{err}");
        assert!(err.to_string().contains("nothing was committed"), "{err}");
        let mut atomic = engine.atomic();
        atomic.add(format!("INSERT INTO {table} VALUES (2)"));
        atomic.add(format!("INSERT INTO {table} VALUES (3)"));
        atomic.run().await.unwrap();
        let rows = engine
            .query(format!("SELECT v FROM {table} ORDER BY v"))
            .await
            .unwrap();
        let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(values, [2, 3], "the failed Atomic left nothing");

        // The pool replaced what PgBouncer dropped; plain statements go on.
        let row = engine.query_one("SELECT 41 + 1").await.unwrap();
        assert_eq!(row.get::<_, i32>(0), 42);
        engine.close_connection_pool().await.unwrap();
    }
}
