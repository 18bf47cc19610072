//! The one client trait: a single generic function runs through every implementor against the
//! real cluster (engines with and without a pool, pipelined, a node, inside a transaction
//! scope, transactions, savepoints, pooled and plain connections), and the row streams and
//! batches that hold a connection give it back clean.

mod common;

use std::future::Future;
use std::time::Duration;

use futures::TryStreamExt;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{Client, ErrorKind, PostgresEngine, Query, TransactionStatus, TxState};

/// An application's own error, which a transaction scope returns unchanged.
#[derive(Debug)]
enum AppError {
    Undo,
    #[allow(dead_code)]
    Db(pgengine::Error),
}

impl From<pgengine::Error> for AppError {
    fn from(e: pgengine::Error) -> AppError {
        AppError::Db(e)
    }
}

fn engine() -> PostgresEngine {
    PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER))
}

/// Fails the test instead of hanging it.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within 60 s"))
}

async fn fresh_table(engine: &PostgresEngine, name: &str) {
    engine
        .run_ddl(&format!(
            "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} (id int4 PRIMARY KEY, name text)"
        ))
        .await
        .unwrap();
}

/// What [`exercise`] saw, to compare across implementors.
#[derive(Debug, PartialEq)]
struct Seen {
    inserted: u64,
    names: Vec<String>,
    pairs: Vec<(i32, String)>,
    one: String,
    none: bool,
    streamed: Vec<i32>,
    batches: Vec<usize>,
    simple_results: usize,
    wrong_count: ErrorKind,
}

/// Everything the trait offers, with every query form, written once.
async fn exercise(mut db: impl Client, table: &str) -> pgengine::Result<Seen> {
    let mut inserted = 0;
    // (sql, tuple of values), (sql, slice of borrowed values), Query, String.
    inserted += db
        .execute((
            format!("INSERT INTO {table} VALUES ($1, $2)"),
            (1i32, "one"),
        ))
        .await?;
    let (id, name) = (2i32, "two".to_owned());
    let borrowed: pgengine::BorrowedParams = &[&id, &name];
    inserted += db
        .execute((format!("INSERT INTO {table} VALUES ($1, $2)"), borrowed))
        .await?;
    inserted += db
        .execute(
            Query::new(format!("INSERT INTO {table} VALUES ($1, $2)"))
                .bind(3i32)
                .bind("three"),
        )
        .await?;
    inserted += db
        .execute(format!(
            "INSERT INTO {table} VALUES (4, 'four'), (5, 'five')"
        ))
        .await?;

    let names = db
        .query(format!("SELECT name FROM {table} ORDER BY id"))
        .await?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    let pairs = db
        .query_as::<(i32, String), _>(format!(
            "SELECT id, name FROM {table} WHERE id <= 2 ORDER BY id"
        ))
        .await?;
    let one: String = db
        .query_one((format!("SELECT name FROM {table} WHERE id = $1"), (3i32,)))
        .await?
        .get(0);
    let none = db
        .query_opt(format!("SELECT name FROM {table} WHERE id = 99"))
        .await?
        .is_none();
    let (one_as,): (String,) = db
        .query_one_as(format!("SELECT name FROM {table} WHERE id = 4"))
        .await?;
    assert_eq!(one_as, "four");
    let missing: Option<(i32,)> = db
        .query_opt_as(format!("SELECT id FROM {table} WHERE id = 99"))
        .await?;
    assert_eq!(missing, None);

    let streamed = {
        let stream = db
            .query_stream(format!("SELECT id FROM {table} ORDER BY id"))
            .await?;
        let rows: Vec<pgengine::Row> = stream.try_collect().await?;
        rows.iter().map(|r| r.get::<_, i32>(0)).collect()
    };
    let batches = {
        let mut batch = db
            .batch(format!("SELECT id FROM {table} ORDER BY id"), 2)
            .await?;
        let mut sizes = Vec::new();
        while let Some(rows) = batch.next_batch().await? {
            sizes.push(rows.len());
        }
        sizes
    };
    let simple_results = db
        .simple_query(&format!("SELECT 1; SELECT count(*) FROM {table}"))
        .await?
        .len();
    let wrong_count = db
        .query_one(format!("SELECT id FROM {table}"))
        .await
        .expect_err("five rows are not exactly one")
        .kind();
    Ok(Seen {
        inserted,
        names,
        pairs,
        one,
        none,
        streamed,
        batches,
        simple_results,
        wrong_count,
    })
}

fn expected() -> Seen {
    Seen {
        inserted: 5,
        names: ["one", "two", "three", "four", "five"]
            .map(String::from)
            .to_vec(),
        pairs: vec![(1, "one".into()), (2, "two".into())],
        one: "three".into(),
        none: true,
        streamed: vec![1, 2, 3, 4, 5],
        batches: vec![2, 2, 1],
        simple_results: 2,
        wrong_count: ErrorKind::RowCount,
    }
}

async fn count(engine: &PostgresEngine, table: &str) -> i64 {
    engine
        .query_one(format!("SELECT count(*) FROM {table}"))
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn one_function_runs_through_every_client() {
    bounded("every client", async {
        let plain = engine();
        let pooled = engine();
        pooled
            .start_connection_pool(PoolOptions::default().max_size(2))
            .await
            .unwrap();
        let pipelined = engine();
        pipelined
            .start_connection_pool(PoolOptions::default().max_size(2).pipeline(1))
            .await
            .unwrap();
        let with_node = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
            .extra_node("replica", engine())
            .build();
        let node = with_node.node("replica").unwrap();

        // Engines: by shared reference, by value, by &mut.
        fresh_table(&plain, "client_engine_ref").await;
        assert_eq!(
            exercise(&plain, "client_engine_ref").await.unwrap(),
            expected()
        );
        fresh_table(&plain, "client_engine_owned").await;
        assert_eq!(
            exercise(plain.clone(), "client_engine_owned")
                .await
                .unwrap(),
            expected()
        );
        fresh_table(&pooled, "client_engine_pooled").await;
        let mut by_mut = pooled.clone();
        assert_eq!(
            exercise(&mut by_mut, "client_engine_pooled").await.unwrap(),
            expected()
        );
        fresh_table(&pipelined, "client_engine_pipelined").await;
        assert_eq!(
            exercise(&pipelined, "client_engine_pipelined")
                .await
                .unwrap(),
            expected()
        );
        fresh_table(&node, "client_engine_node").await;
        assert_eq!(
            exercise(&node, "client_engine_node").await.unwrap(),
            expected()
        );

        // An engine inside a transaction scope runs in the transaction: rolled back by the
        // scope's error, nothing stays.
        fresh_table(&plain, "client_engine_scope").await;
        let inside = plain.clone();
        let outcome = plain
            .transaction()
            .run(|_tx| async move {
                assert_eq!(
                    exercise(&inside, "client_engine_scope").await.unwrap(),
                    expected()
                );
                Err::<(), _>(AppError::Undo)
            })
            .await;
        assert!(matches!(outcome, Err(AppError::Undo)), "{outcome:?}");
        assert_eq!(count(&plain, "client_engine_scope").await, 0);

        // Transactions: the rows are there after commit, and gone after rollback.
        fresh_table(&plain, "client_tx").await;
        let tx = plain.begin().await.unwrap();
        assert_eq!(exercise(&tx, "client_tx").await.unwrap(), expected());
        assert_eq!(tx.state().await, TxState::Active);
        tx.commit().await.unwrap();
        assert_eq!(count(&plain, "client_tx").await, 5);

        fresh_table(&plain, "client_tx_owned").await;
        let tx = plain.begin().await.unwrap();
        assert_eq!(
            exercise(tx.clone(), "client_tx_owned").await.unwrap(),
            expected()
        );
        tx.rollback().await.unwrap();
        assert_eq!(count(&plain, "client_tx_owned").await, 0);

        // A savepoint: its work is the transaction's.
        fresh_table(&plain, "client_savepoint").await;
        let tx = plain.begin().await.unwrap();
        let sp = tx.savepoint(None).await.unwrap();
        assert_eq!(exercise(&sp, "client_savepoint").await.unwrap(), expected());
        sp.rollback_to().await.unwrap();
        tx.commit().await.unwrap();
        assert_eq!(count(&plain, "client_savepoint").await, 0);

        // A transaction's lent connection.
        fresh_table(&plain, "client_tx_connection").await;
        let tx = plain.begin().await.unwrap();
        {
            let mut lent = tx.connection().await.unwrap();
            assert_eq!(
                exercise(&mut lent, "client_tx_connection").await.unwrap(),
                expected()
            );
        }
        tx.commit().await.unwrap();
        assert_eq!(count(&plain, "client_tx_connection").await, 5);

        // Connections: the engine's (pooled and fresh) and one of our own.
        fresh_table(&pooled, "client_engine_conn").await;
        let mut conn = pooled.acquire().await.unwrap();
        assert!(conn.is_pooled());
        assert_eq!(
            exercise(&mut conn, "client_engine_conn").await.unwrap(),
            expected()
        );
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
        drop(conn);
        let conn = plain.acquire().await.unwrap();
        assert!(!conn.is_pooled());
        fresh_table(&plain, "client_fresh_conn").await;
        assert_eq!(
            exercise(conn, "client_fresh_conn").await.unwrap(),
            expected()
        );

        fresh_table(&plain, "client_conn").await;
        let mut conn = common::connect().await;
        assert_eq!(
            exercise(&mut conn, "client_conn").await.unwrap(),
            expected()
        );
        // The batch's own read-only transaction ended with it.
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
        fresh_table(&plain, "client_conn_owned").await;
        assert_eq!(
            exercise(conn, "client_conn_owned").await.unwrap(),
            expected()
        );

        pooled.close_connection_pool().await.unwrap();
        pipelined.close_connection_pool().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_stream_in_a_transaction_refuses_other_queries_instead_of_waiting_for_itself() {
    bounded("stream in a transaction", async {
        let engine = engine();
        let tx = engine.begin().await.unwrap();
        let mut stream = tx
            .query_stream("SELECT generate_series(1, 10)")
            .await
            .unwrap();
        // The same task asks for the connection the stream holds: refused at once.
        let busy = tx.execute("SELECT 1").await.unwrap_err();
        assert_eq!(busy.kind(), ErrorKind::Busy, "{busy}");
        let mut n = 0;
        while let Some(row) = stream.try_next().await.unwrap() {
            n += row.get::<_, i32>(0);
        }
        assert_eq!(n, 55);
        drop(stream);
        // Read to its end: the transaction goes on.
        assert_eq!(tx.state().await, TxState::Active);
        tx.execute("SELECT 1").await.unwrap();

        // Dropped half way: nobody saw how the statement ended, so the block must not commit.
        let mut stream = tx
            .query_stream("SELECT generate_series(1, 100000)")
            .await
            .unwrap();
        stream.try_next().await.unwrap().unwrap();
        drop(stream);
        assert_eq!(tx.state().await, TxState::Failed);
        let refused = tx.commit().await.unwrap_err();
        assert_eq!(
            refused.transaction_error(),
            Some(pgengine::TransactionError::NotCommitted),
            "{refused}"
        );
    })
    .await;
}

#[tokio::test]
async fn engine_streams_hold_a_pooled_connection_until_dropped() {
    bounded("engine stream", async {
        let engine = engine();
        engine
            .start_connection_pool(PoolOptions::default().max_size(1))
            .await
            .unwrap();
        let mut stream = engine
            .query_stream("SELECT generate_series(1, 100000)")
            .await
            .unwrap();
        stream.try_next().await.unwrap().unwrap();
        assert_eq!(engine.pool_stats().unwrap().in_use, 1);
        // Dropped half way: the pool reads the rest away and the next query gets the
        // connection clean.
        drop(stream);
        let n: i64 = engine
            .query_one("SELECT 41::int8 + 1")
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 42);
        // Transaction control cannot be streamed outside a transaction.
        let refused = engine.query_stream("COMMIT").await.unwrap_err();
        assert_eq!(
            refused.transaction_error(),
            Some(pgengine::TransactionError::ControlStatement)
        );
        engine.close_connection_pool().await.unwrap();
    })
    .await;
}

#[tokio::test]
async fn a_batch_dropped_early_on_a_plain_connection_leaves_no_transaction_open() {
    bounded("batch on a connection", async {
        let mut conn = common::connect().await;
        conn.execute("CREATE TEMP TABLE after_batch (v int)")
            .await
            .unwrap();
        {
            let mut batch = Client::batch(&mut conn, "SELECT generate_series(1, 100000)", 10)
                .await
                .unwrap();
            assert_eq!(batch.next_batch().await.unwrap().unwrap().len(), 10);
        }
        // The batch's read-only block was rolled back before this: it can write, and it is
        // not inside a block.
        conn.execute("INSERT INTO after_batch VALUES (1)")
            .await
            .unwrap();
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);

        // Inside the connection's own block, a batch joins it: it sees the block's rows, and
        // leaves the block open.
        conn.simple_query("BEGIN").await.unwrap();
        conn.execute("INSERT INTO after_batch VALUES (2)")
            .await
            .unwrap();
        let mut batch = Client::batch(&mut conn, "SELECT v FROM after_batch ORDER BY v", 10)
            .await
            .unwrap();
        let rows = batch.next_batch().await.unwrap().unwrap();
        assert_eq!(rows.len(), 2);
        assert!(batch.next_batch().await.unwrap().is_none());
        drop(batch);
        assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
        conn.simple_query("ROLLBACK").await.unwrap();
        let left: i64 = conn
            .query_one("SELECT count(*) FROM after_batch")
            .await
            .unwrap()
            .get(0);
        assert_eq!(left, 1);
    })
    .await;
}

#[tokio::test]
async fn atomic_and_batch_take_every_query_form() {
    bounded("query forms", async {
        let engine = engine();
        fresh_table(&engine, "client_forms").await;
        let name = "borrowed".to_owned();
        let mut atomic = engine.atomic();
        atomic.add(("INSERT INTO client_forms VALUES ($1, $2)", (1i32, &name)));
        atomic.add(
            Query::new("INSERT INTO client_forms VALUES ($1, $2)")
                .bind(2i32)
                .bind("owned"),
        );
        atomic.add("INSERT INTO client_forms VALUES (3, 'text')");
        assert_eq!(atomic.len(), 3);
        atomic.await.unwrap();

        let low = 2i32;
        let mut batches = engine
            .batch(
                (
                    "SELECT name FROM client_forms WHERE id >= $1 ORDER BY id",
                    (low,),
                ),
                1,
            )
            .await
            .unwrap();
        let mut names = Vec::new();
        while let Some(rows) = batches.try_next().await.unwrap() {
            names.extend(rows.iter().map(|r| r.get::<_, String>(0)));
        }
        assert_eq!(names, ["owned", "text"]);
    })
    .await;
}

/// The rows of `ROWS_SQL`, as a test expects them: (g, 'name-g', g as float8 or NULL every 7th).
const ROWS: i32 = 20_000;
const ROWS_SQL: &str = "SELECT g, 'name-' || g AS name, CASE WHEN g % 7 = 0 THEN NULL \
                        ELSE g::float8 END AS x FROM generate_series(1, 20000) g";

fn check_row(row: &pgengine::Row, g: i32) {
    assert_eq!(row.len(), 3);
    assert_eq!(row.columns()[1].name(), "name");
    assert_eq!(row.get::<_, i32>(0), g);
    assert_eq!(row.get::<_, &str>("name"), format!("name-{g}"));
    let x: Option<f64> = row.get(2);
    assert_eq!(x, (g % 7 != 0).then_some(g as f64));
}

#[tokio::test]
async fn rows_read_together_are_whole_and_outlive_their_query_and_engine() {
    // Many rows arrive in each read and are taken together, sharing one piece of the read
    // buffer: every path that reads rows must give each its own values, in order, and the
    // rows must stay whole after the stream, the batch and the engine are gone, wherever
    // they are moved and dropped.
    let rows = bounded("rows read together", async {
        let engine = engine();
        engine
            .start_connection_pool(PoolOptions::default().max_size(2))
            .await
            .unwrap();
        let queried = engine.query(ROWS_SQL).await.unwrap();
        let streamed: Vec<_> = engine
            .query_stream(ROWS_SQL)
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        let mut batched = Vec::new();
        let mut batches = engine.batch(ROWS_SQL, 1000).await.unwrap();
        while let Some(batch) = batches.next_batch().await.unwrap() {
            assert!(batch.len() <= 1000);
            batched.extend(batch);
        }
        drop(batches);
        let mut atomic = engine.atomic();
        atomic.add(ROWS_SQL);
        let (atomic_rows, _) = atomic.run().await.unwrap().pop().unwrap();
        engine.close_connection_pool().await.unwrap();

        let pipelined = engine_with(PoolOptions::default().max_size(2).pipeline(2)).await;
        let piped = pipelined.query(ROWS_SQL).await.unwrap();
        pipelined.close_connection_pool().await.unwrap();
        [queried, streamed, batched, atomic_rows, piped]
    })
    .await;
    for rows in &rows {
        assert_eq!(rows.len(), ROWS as usize);
        for (row, g) in rows.iter().zip(1..) {
            check_row(row, g);
        }
    }
    // Clones read the same; rows of one read moved to other threads and dropped there, in
    // any order, leave the others whole.
    let [queried, streamed, ..] = rows;
    let clones: Vec<_> = queried.iter().step_by(3).cloned().collect();
    let threads: Vec<_> = [queried, streamed]
        .into_iter()
        .flat_map(|rows| {
            let mut rows = rows.into_iter().zip(1..).collect::<Vec<_>>();
            let odd: Vec<_> = rows.iter().filter(|(_, g)| g % 2 == 1).cloned().collect();
            rows.retain(|(_, g)| g % 2 == 0);
            [odd, rows]
        })
        .map(|rows| {
            std::thread::spawn(move || {
                for (row, g) in rows.iter().rev() {
                    check_row(row, *g);
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    for (row, g) in clones.iter().zip((1..).step_by(3)) {
        check_row(row, g);
    }
}

#[tokio::test]
async fn rows_read_together_keep_their_values_when_their_types_are_looked_up() {
    // A type defined at run time makes the first rows be read before their types are known,
    // then given the looked-up columns.
    bounded("rows retyped", async {
        let engine = engine_with(PoolOptions::default().max_size(1)).await;
        engine
            .run_ddl(
                "DROP TYPE IF EXISTS rows_mood CASCADE; \
                 CREATE TYPE rows_mood AS ENUM ('sad', 'ok', 'happy')",
            )
            .await
            .unwrap();
        let sql = MOODS_SQL;
        // Without a statement cache too: the batch's statement is then the unnamed one.
        let uncached = PostgresEngine::builder(common::tcp_config(TempCluster::SUPERUSER))
            .statement_cache_capacity(0)
            .build();
        uncached
            .start_connection_pool(PoolOptions::default().max_size(1))
            .await
            .unwrap();
        for engine in [&engine, &uncached] {
            // Every batch, not only the first: the lookup runs between two of them.
            check_mood_batches(engine.batch(sql, 1000).await.unwrap()).await;
            // The statement the batch cached is run again with the types looked up.
            let rows = engine.query(sql).await.unwrap();
            assert_eq!(rows.len(), 5000);
            check_moods(&rows, 1);
            let streamed: Vec<_> = engine
                .query_stream(sql)
                .await
                .unwrap()
                .try_collect()
                .await
                .unwrap();
            check_moods(&streamed, 1);
        }
        uncached.close_connection_pool().await.unwrap();
        // Inside a transaction of the caller's (the batch opens none, and the lookup runs in
        // it); the second time the types are known.
        let in_tx = engine_with(PoolOptions::default().max_size(1)).await;
        let tx = in_tx.begin().await.unwrap();
        for _ in 0..2 {
            check_mood_batches(tx.batch(sql, 1000).await.unwrap()).await;
        }
        tx.commit().await.unwrap();
        in_tx.close_connection_pool().await.unwrap();
        engine.run_ddl("DROP TYPE rows_mood").await.unwrap();
        engine.close_connection_pool().await.unwrap();
    })
    .await;
}

/// 5,000 rows of a type defined at run time: (g, the g-th of sad, ok, happy).
const MOODS_SQL: &str = "SELECT g, (ARRAY['sad', 'ok', 'happy']::rows_mood[])[g % 3 + 1] AS mood \
                         FROM generate_series(1, 5000) g";

/// Checks rows of [`MOODS_SQL`] starting with row `from`.
fn check_moods(rows: &[pgengine::Row], from: i32) {
    for (row, g) in rows.iter().zip(from..) {
        assert_eq!(row.get::<_, i32>(0), g);
        assert_eq!(row.columns()[1].type_().name(), "rows_mood");
        let mood = ["sad", "ok", "happy"][(g % 3) as usize];
        assert_eq!(row.raw(1), Some(mood.as_bytes()));
    }
}

/// Reads every batch of [`MOODS_SQL`], checking each row, and that all 5,000 came.
async fn check_mood_batches(mut batches: pgengine::batch::AsyncBatch<'_>) {
    let mut from = 1;
    while let Some(batch) = batches.next_batch().await.unwrap() {
        check_moods(&batch, from);
        from += batch.len() as i32;
    }
    assert_eq!(from, 5001);
}

async fn engine_with(options: PoolOptions) -> PostgresEngine {
    let engine = engine();
    engine.start_connection_pool(options).await.unwrap();
    engine
}
