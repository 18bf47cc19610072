//! The connection's I/O core under load and faults: pipelines far larger than the sockets'
//! buffers, a COPY whose server talks back on every row, a server that stops reading, and
//! the memory a large value leaves behind.
//!
//! Every case runs under a hang detector (not a timing assertion: a guard that turns a
//! deadlock into a failure). Real server unless the case needs a scripted one.

mod common;
mod mock;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{ErrorKind, PostgresEngine, Query};

use mock::{MockServer, Step, script};

/// Turns a hang into a failure; far above what any case here needs.
async fn bounded<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(300), f)
        .await
        .unwrap_or_else(|_| panic!("{what} hung"))
}

/// Over the cluster's Unix socket, whose buffers hold far less than loopback TCP's (which
/// autotune to megabytes and would hide a writer that never reads).
fn engine() -> PostgresEngine {
    PostgresEngine::new(common::socket_config(TempCluster::SUPERUSER))
}

/// Makes `table` (id int, payload text) whose insert trigger raises a NOTICE of 500 bytes for
/// every row, and counts the notices `conn` receives.
async fn noisy_table(conn: &mut pgengine::Connection, table: &str) -> Arc<AtomicUsize> {
    conn.simple_query(&format!(
        "DROP TABLE IF EXISTS {table}; CREATE UNLOGGED TABLE {table} (id int, payload text);
         CREATE OR REPLACE FUNCTION {table}_notice() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN RAISE NOTICE 'row % %', NEW.id, repeat('n', 500); RETURN NEW; END $$;
         CREATE TRIGGER {table}_notice BEFORE INSERT ON {table}
         FOR EACH ROW EXECUTE FUNCTION {table}_notice();"
    ))
    .await
    .unwrap();
    let notices = Arc::new(AtomicUsize::new(0));
    let counter = notices.clone();
    conn.set_notice_handler(move |_: &pgengine::DbError| {
        counter.fetch_add(1, Ordering::Relaxed);
    });
    notices
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_atomic_of_100000_statements_is_read_while_it_is_written() {
    let engine = engine();
    // Small answers: 100,000 of them fill the server's socket long before the last
    // statement is sent.
    let mut atomic = engine.atomic();
    for i in 0..100_000i32 {
        atomic.add(Query::new("SELECT $1::int4").bind(i));
    }
    let results = bounded("a 100,000-statement atomic", atomic.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100_000);
    for (i, (rows, _)) in results.iter().enumerate() {
        assert_eq!(rows[0].get::<_, i32>(0), i as i32);
    }
    drop(results);
    // 1 KB answers: 100 MB come back while the pipeline goes out.
    let mut atomic = engine.atomic();
    for _ in 0..100_000 {
        atomic.add("SELECT repeat('x', 1000)");
    }
    let results = bounded("an atomic of 1 KB answers", atomic.run())
        .await
        .unwrap();
    assert_eq!(results.len(), 100_000);
    assert!(
        results
            .iter()
            .all(|(rows, _)| rows[0].get::<_, &str>(0).len() == 1000)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transactions_pipeline_of_100000_statements_is_read_while_it_is_written() {
    let engine = engine();
    engine
        .run_ddl("DROP TABLE IF EXISTS io_tx; CREATE TABLE io_tx (x int)")
        .await
        .unwrap();
    let inner = engine.clone();
    let n = bounded(
        "a transaction's pipeline",
        engine.transaction().run(|_tx| async move {
            // An Atomic inside a transaction joins it: one pipeline on its connection.
            let mut atomic = inner.atomic();
            for i in 0..100_000i32 {
                atomic.add(Query::new("INSERT INTO io_tx VALUES ($1)").bind(i));
            }
            Ok::<_, pgengine::Error>(atomic.run().await?.len())
        }),
    )
    .await
    .unwrap();
    assert_eq!(n, 100_000);
    let stored: i64 = engine
        .query_one("SELECT count(*) FROM io_tx")
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 100_000);
    // And 1 KB answers: 100 MB come back while the transaction's pipeline goes out.
    let inner = engine.clone();
    let lengths = bounded(
        "a transaction's pipeline of 1 KB answers",
        engine.transaction().run(|_tx| async move {
            let mut atomic = inner.atomic();
            for _ in 0..100_000 {
                atomic.add("SELECT repeat('y', 1000)");
            }
            Ok::<_, pgengine::Error>(
                atomic
                    .run()
                    .await?
                    .iter()
                    .map(|(rows, _)| rows[0].get::<_, &str>(0).len())
                    .collect::<Vec<_>>(),
            )
        }),
    )
    .await
    .unwrap();
    assert_eq!(lengths.len(), 100_000);
    assert!(lengths.iter().all(|&n| n == 1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_pool_carries_100000_queries_from_64_tasks() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(8).pipeline(8))
        .await
        .unwrap();
    let tasks: Vec<_> = (0..64i64)
        .map(|task| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for i in 0..1_563i64 {
                    let n = task * 10_000 + i;
                    let row = engine.query_one(("SELECT $1::int8", (n,))).await.unwrap();
                    assert_eq!(row.get::<_, i64>(0), n, "another query's answer");
                }
            })
        })
        .collect();
    for t in tasks {
        bounded("a task of the pipelined pool", t).await.unwrap();
    }
    engine.close_connection_pool().await.unwrap();
}

/// Answers read together are handed from task to task (each wakes the next): tasks that
/// give up anywhere in that chain — their futures dropped before, while or after their answer
/// comes, or their whole task aborted — must not keep an answer from the tasks behind them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_answers_reach_every_task_while_tasks_around_them_give_up() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(4).pipeline(4))
        .await
        .unwrap();
    const QUERIES: i64 = 2_000;
    let tasks: Vec<_> = (0..48i64)
        .map(|task| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut answered = 0;
                for i in 0..QUERIES {
                    let n = task * 100_000 + i;
                    let query = engine.query_one(("SELECT $1::int8", (n,)));
                    let row = if task % 3 == 0 {
                        // Gives up after 0-2 ms: at every point of its wait.
                        let limit = Duration::from_micros((n * 7_919 % 2_000) as u64);
                        match tokio::time::timeout(limit, query).await {
                            Ok(row) => row,
                            Err(_) => continue,
                        }
                    } else {
                        query.await
                    };
                    assert_eq!(row.unwrap().get::<_, i64>(0), n, "another query's answer");
                    answered += 1;
                }
                answered
            })
        })
        .collect();
    // Tasks aborted at whatever point they have reached.
    let doomed: Vec<_> = (0..8)
        .map(|_| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let row = engine.query_one(("SELECT $1::int8", (n,))).await.unwrap();
                    assert_eq!(row.get::<_, i64>(0), n);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (k, task) in doomed.into_iter().enumerate() {
        task.abort();
        if k % 2 == 0 {
            tokio::time::sleep(Duration::from_micros(300)).await;
        }
    }
    let mut gave_up = 0;
    for (task, t) in tasks.into_iter().enumerate() {
        let answered = bounded("a task of the pipelined pool", t).await.unwrap();
        if task % 3 == 0 {
            gave_up += QUERIES - answered;
        } else {
            assert_eq!(answered, QUERIES, "task {task} lost an answer");
        }
    }
    assert!(gave_up > 0, "no task gave up: the test shows nothing");
    // The connections are fine for the next queries.
    let row = bounded("a query after", engine.query_one("SELECT 42::int4"))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_trigger_sends_a_notice_for_every_row_goes_through() {
    let mut conn = common::connect().await;
    let notices = noisy_table(&mut conn, "io_noisy").await;
    // 200,000 rows of 100 bytes (20 MB) draw 100 MB of notices back while they are sent.
    const ROWS: usize = 200_000;
    let line = |i: usize| format!("{i}\t{}\n", "p".repeat(100 - 2 - i.to_string().len()));
    let copied = bounded("a noisy COPY", async {
        let mut sink = conn.copy_in("COPY io_noisy FROM STDIN").await?;
        let mut chunk = String::new();
        for i in 0..ROWS {
            chunk.push_str(&line(i));
            if chunk.len() > 256 * 1024 {
                sink.write(chunk.as_bytes()).await?;
                chunk.clear();
            }
        }
        sink.write(chunk.as_bytes()).await?;
        sink.finish().await
    })
    .await
    .unwrap();
    assert_eq!(copied, ROWS as u64);
    assert_eq!(
        notices.load(Ordering::Relaxed),
        ROWS,
        "every notice was handled"
    );
    let n: i64 = conn
        .query_one("SELECT count(*) FROM io_noisy")
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, ROWS as i64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_of_one_gibibyte_whose_trigger_sends_a_notice_for_every_row_goes_through() {
    let mut conn = pgengine::Connection::connect(&common::socket_config(TempCluster::SUPERUSER))
        .await
        .unwrap();
    let notices = noisy_table(&mut conn, "io_big").await;
    // 10,240 rows of 100 KiB: 1 GiB sent, 5 MB of notices back while it goes.
    const ROWS: usize = 10_240;
    let payload = "p".repeat(100 * 1024);
    let copied = bounded("a 1 GiB noisy COPY", async {
        let mut sink = conn.copy_in("COPY io_big FROM STDIN").await?;
        for i in 0..ROWS {
            sink.write(format!("{i}\t").as_bytes()).await?;
            sink.write(payload.as_bytes()).await?;
            sink.write(b"\n").await?;
        }
        sink.finish().await
    })
    .await
    .unwrap();
    assert_eq!(copied, ROWS as u64);
    assert_eq!(notices.load(Ordering::Relaxed), ROWS);
    let total: i64 = conn
        .query_one("SELECT sum(length(payload))::int8 FROM io_big")
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, (ROWS * payload.len()) as i64);
    conn.simple_query("DROP TABLE io_big").await.unwrap();
}

#[tokio::test]
async fn an_engine_without_a_pool_does_not_wait_forever_to_connect() {
    let (config, server) = silent_server().await;
    let engine = PostgresEngine::builder(config)
        .query_timeout(Duration::from_secs(1))
        .build();
    let started = Instant::now();
    let e = bounded(
        "a fresh connect to a silent server",
        engine.query("SELECT 1"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    assert!(e.to_string().contains("opening a connection"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(1 + 10));
    server.abort();
}

#[tokio::test]
async fn a_server_that_stops_reading_gets_a_timeout_not_a_hang() {
    // It logs the client in, then neither reads nor answers.
    let server = MockServer::start(script([mock::trust_login(), vec![Step::Hang]])).await;
    let engine = PostgresEngine::builder(server.config())
        .query_timeout(Duration::from_secs(1))
        .build();
    // 64 MB: far more than the sockets between us hold.
    let mut atomic = engine.atomic();
    atomic.add(Query::new("SELECT length($1)").bind(vec![7u8; 64 << 20]));
    let started = Instant::now();
    let e = bounded("a write to a server that stopped reading", atomic.run())
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
    // Its own limit, with slack for a loaded machine: not the hang detector's.
    assert!(took < Duration::from_secs(1 + 10), "took {took:?}");
    drop(server);
}

#[tokio::test]
async fn a_connection_gives_back_what_a_large_value_made_it_take() {
    let mut conn = common::connect().await;
    conn.query("SELECT 1").await.unwrap();
    // An idle connection's buffers: 64 KiB to read into, 8 KiB to write from.
    let idle = 72 * 1024;
    assert!(conn.buffer_capacity() <= idle, "{}", conn.buffer_capacity());

    // A 256 MiB parameter.
    let big = vec![1u8; 256 << 20];
    let row = conn
        .query_one(("SELECT length($1::bytea)", (&big,)))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 256 << 20);
    drop(big);
    assert!(conn.buffer_capacity() <= idle, "{}", conn.buffer_capacity());

    // A 256 MiB row: while it lives it is the caller's; the connection keeps none of it.
    let row = conn
        .query_one("SELECT repeat('x', 256 * 1024 * 1024)")
        .await
        .unwrap();
    assert_eq!(row.get::<_, &str>(0).len(), 256 << 20);
    assert!(conn.buffer_capacity() <= idle, "{}", conn.buffer_capacity());
    drop(row);

    // A value over the 1 GiB a server accepts in a message is refused before it is sent,
    // and its encoded copy is not kept.
    let huge = vec![0u8; (1 << 30) + 16];
    let e = conn
        .query_one(("SELECT length($1::bytea)", (&huge,)))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Conversion, "{e}");
    drop(huge);
    assert!(conn.buffer_capacity() <= idle, "{}", conn.buffer_capacity());
    // And the connection is clean.
    let one: i32 = conn.query_one("SELECT 1").await.unwrap().get(0);
    assert_eq!(one, 1);
}

/// A server that accepts connections and never says a word: connecting hangs.
async fn silent_server() -> (pgengine::Config, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = listener.accept().await {
            held.push(socket);
        }
    });
    let config = pgengine::Config::parse(&format!("host=127.0.0.1 port={port} user=x")).unwrap();
    (config, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_query_queued_on_a_hung_pipelined_pool_fails_within_its_acquire_timeout() {
    let (config, server) = silent_server().await;
    let engine = PostgresEngine::new(config);
    let limit = Duration::from_secs(1);
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(2)
                .pipeline(2)
                .acquire_timeout(limit),
        )
        .await
        .unwrap();
    let started = Instant::now();
    let queries: Vec<_> = (0..40i32)
        .map(|i| {
            let engine = engine.clone();
            tokio::spawn(async move {
                let e = engine.query(("SELECT $1::int4", (i,))).await.unwrap_err();
                (e, started.elapsed())
            })
        })
        .collect();
    for q in queries {
        let (e, took) = bounded("a query on a hung pool", q).await.unwrap();
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("opening a new connection"), "{e}");
        // Its own acquire_timeout, once, with slack for a loaded machine — not one
        // acquire_timeout per query queued ahead of it.
        assert!(took < limit + Duration::from_secs(4), "took {took:?}: {e}");
    }
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_query_on_a_terminated_backend_keeps_its_sqlstate() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(1).pipeline(1))
        .await
        .unwrap();
    let sleeper = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.query("SELECT pg_sleep(30) AS io_victim").await })
    };
    let mut admin = common::connect().await;
    let killed = bounded("finding the victim", async {
        loop {
            let rows = admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                     WHERE query LIKE '%AS io\\_victim' AND pid <> pg_backend_pid()",
                )
                .await
                .unwrap();
            if !rows.is_empty() {
                break rows.len();
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(killed, 1);
    let e = bounded("the victim", sleeper).await.unwrap().unwrap_err();
    assert_eq!(e.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{e}");
    // The pool replaces the connection.
    let one: i32 = engine.query_one("SELECT 1").await.unwrap().get(0);
    assert_eq!(one, 1);
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_server_is_full_a_waiter_gets_the_next_connection_that_comes_back() {
    // A cluster of its own with room for six connections in all.
    let cluster = TempCluster::builder()
        .setting("max_connections", "6")
        .setting("superuser_reserved_connections", "0")
        .start()
        .unwrap();
    let config = pgengine::Config::parse(&cluster.socket_conninfo(TempCluster::SUPERUSER)).unwrap();
    let engine = PostgresEngine::new(config.clone());
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(4)
                .acquire_timeout(Duration::from_secs(20)),
        )
        .await
        .unwrap();
    let a = engine.acquire().await.unwrap();
    let b = engine.acquire().await.unwrap();
    // Other clients take every slot left.
    let mut others = Vec::new();
    while let Ok(conn) = pgengine::Connection::connect(&config).await {
        others.push(conn);
    }
    assert!(!others.is_empty());

    // The pool's own connection coming back serves the waiter.
    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move {
            engine
                .query_one("SELECT 1")
                .await
                .map(|r| r.get::<_, i32>(0))
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "53300 was handed over at once");
    drop(a);
    assert_eq!(bounded("the waiter", waiter).await.unwrap().unwrap(), 1);

    // Slots freed by other clients serve a waiter too.
    let c = engine.acquire().await.unwrap(); // the connection `a` left
    let waiter = {
        let engine = engine.clone();
        tokio::spawn(async move { engine.acquire().await.map(|_| ()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished());
    others.pop();
    bounded("the second waiter", waiter).await.unwrap().unwrap();

    // Past its deadline the error says the server refused, with its SQLSTATE.
    let short = PostgresEngine::new(config.clone());
    short
        .start_connection_pool(
            PoolOptions::default()
                .max_size(4)
                .acquire_timeout(Duration::from_millis(500)),
        )
        .await
        .unwrap();
    let held = short.acquire().await; // may or may not find a slot
    let filler = pgengine::Connection::connect(&config).await;
    let e = short.acquire().await.unwrap_err();
    if held.is_ok() {
        // It has a connection of its own, so it waited for it: a timeout that says why.
        assert_eq!(e.kind(), ErrorKind::Timeout, "{e}");
        assert!(e.to_string().contains("refused new connections"), "{e}");
    }
    assert_eq!(e.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{e}");
    drop((held, filler, b, c, others));
    short.close_connection_pool().await.unwrap();
    engine.close_connection_pool().await.unwrap();
}

/// The plain path: a connection over a tokio `UnixStream` the caller opened
/// (`Connection::connect_stream`), which uses none of `socket.rs`'s readability-only
/// registration or asking again, carries the same work: a result larger than the socket's
/// buffers streamed, a value larger than them sent, and a COPY whose server talks back on
/// every row while it is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_a_plain_tokio_socket_does_the_same_work() {
    use futures::TryStreamExt;
    let cluster = common::cluster();
    let path = cluster
        .socket_dir()
        .join(format!(".s.PGSQL.{}", cluster.port()));
    let socket = tokio::net::UnixStream::connect(path).await.unwrap();
    let config = common::socket_config(TempCluster::SUPERUSER);
    let mut conn = pgengine::Connection::connect_stream(socket, &config)
        .await
        .unwrap();

    let rows = bounded("a streamed result", async {
        let mut stream = conn
            .query_stream("SELECT g, repeat('r', 100) FROM generate_series(1, 200000) g")
            .await?;
        let mut n = 0i32;
        while let Some(row) = stream.try_next().await? {
            n += 1;
            assert_eq!(row.get::<_, i32>(0), n);
        }
        Ok::<_, pgengine::Error>(n)
    })
    .await
    .unwrap();
    assert_eq!(rows, 200_000);

    let big = vec![3u8; 64 << 20];
    let len: i32 = bounded(
        "a large value",
        conn.query_one(("SELECT length($1::bytea)", (&big,))),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(len, 64 << 20);

    let notices = noisy_table(&mut conn, "io_plain").await;
    const ROWS: usize = 100_000;
    let copied = bounded("a noisy COPY over a plain socket", async {
        let mut sink = conn.copy_in("COPY io_plain (id) FROM STDIN").await?;
        let data: String = (0..ROWS).map(|i| format!("{i}\n")).collect();
        sink.write(data.as_bytes()).await?;
        sink.finish().await
    })
    .await
    .unwrap();
    assert_eq!(copied, ROWS as u64);
    assert_eq!(notices.load(Ordering::Relaxed), ROWS);
}
