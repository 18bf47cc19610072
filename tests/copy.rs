//! COPY against the real server: text and binary data in and out, checked by reading the
//! table back (or against the exact bytes PostgreSQL sends); CopyFail, server errors in the
//! middle of the data, dropped sinks and streams, a timeout, transactions, and COPY
//! statements sent where they do not belong — each leaving the connection idle and usable.
//!
//! Every test has tables of its own: the tests run in parallel on one shared cluster. Two
//! tests against a scripted server check the exact messages of the dropped-sink and
//! server-error paths.

mod common;
mod mock;

use std::time::{Duration, SystemTime};

use common::{connect, tcp_config};
use futures::TryStreamExt;
use mock::{Kind, MockServer, Step, error_response, ready, script, trust_login};
use pgengine::SqlState;
use pgengine::pool::PoolOptions;
use pgengine::protocol::{BackendMessage, CopyFormat, FrontendMessage};
use pgengine::testing::TempCluster;
use pgengine::{
    BinaryCopyInWriter, Connection, ErrorKind, PostgresEngine, TransactionStatus, Type,
};

/// Creates (afresh) table `name` with `columns`.
async fn table(conn: &mut Connection, name: &str, columns: &str) {
    conn.simple_query(&format!(
        "DROP TABLE IF EXISTS {name}; CREATE TABLE {name} ({columns})"
    ))
    .await
    .unwrap();
}

async fn count(conn: &mut Connection, table: &str) -> i64 {
    conn.query_one(format!("SELECT count(*) FROM {table}").as_str())
        .await
        .unwrap()
        .get(0)
}

/// The connection answers a query of its own, and is idle afterwards.
async fn assert_usable(conn: &mut Connection) {
    let row = conn
        .query_one(("SELECT $1::int4 * 2", (21,)))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);
    assert!(conn.is_idle(), "{conn:?}");
}

/// The text-format line of row `i` of the (id int8, name text, score float8) tables.
fn text_row(i: i64) -> String {
    if i % 100 == 7 {
        format!("{i}\t\\N\t{}\n", i as f64 / 4.0)
    } else {
        format!("{i}\tname {i}\t{}\n", i as f64 / 4.0)
    }
}

/// Copies `lines` into `sql`, one write per line, and finishes; the first error from any step.
async fn copy_lines(
    conn: &mut Connection,
    sql: &str,
    lines: impl IntoIterator<Item = String>,
) -> pgengine::Result<u64> {
    let mut sink = conn.copy_in(sql).await?;
    for line in lines {
        sink.write(line.as_bytes()).await?;
    }
    sink.finish().await
}

#[tokio::test]
async fn text_copy_in_of_many_small_writes_reads_back() {
    let mut conn = connect().await;
    table(
        &mut conn,
        "copy_text_in",
        "id int8, name text, score float8",
    )
    .await;
    const ROWS: i64 = 50_000;
    let mut sink = conn
        .copy_in("COPY copy_text_in (id, name, score) FROM STDIN")
        .await
        .unwrap();
    assert!(!sink.is_binary());
    assert_eq!(sink.columns(), 3);
    for i in 0..ROWS {
        let line = text_row(i);
        // Rows split across writes: the server sees one stream of bytes.
        let (a, b) = line.as_bytes().split_at(line.len() / 2);
        sink.write(a).await.unwrap();
        sink.write(b).await.unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), ROWS as u64);
    assert!(conn.is_idle());

    let row = conn
        .query_one("SELECT count(*), sum(id)::int8, count(name), sum(score) FROM copy_text_in")
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), ROWS);
    assert_eq!(row.get::<_, i64>(1), ROWS * (ROWS - 1) / 2);
    assert_eq!(row.get::<_, i64>(2), ROWS - ROWS / 100);
    assert_eq!(row.get::<_, f64>(3), (ROWS * (ROWS - 1) / 2) as f64 / 4.0);
    let row = conn
        .query_one("SELECT name, score FROM copy_text_in WHERE id = 4242")
        .await
        .unwrap();
    assert_eq!(
        row.get::<_, Option<String>>(0).as_deref(),
        Some("name 4242")
    );
    assert_eq!(row.get::<_, f64>(1), 1060.5);
    let row = conn
        .query_one("SELECT name FROM copy_text_in WHERE id = 4207")
        .await
        .unwrap();
    assert_eq!(row.get::<_, Option<String>>(0), None);
    // One CopyData per 64 KiB or so, not one per write: a handful of round trips in all.
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn one_large_write_and_csv_copy_in() {
    let mut conn = connect().await;
    table(&mut conn, "copy_csv_in", "id int4, note text").await;
    const ROWS: i32 = 40_000;
    let mut csv = String::new();
    for i in 0..ROWS {
        csv.push_str(&format!("{i},\"a, \"\"quoted\"\" note {i}\"\n"));
    }
    assert!(
        csv.len() > 5 * 64 * 1024,
        "the data spans several CopyData messages"
    );
    let mut sink = conn
        .copy_in("COPY copy_csv_in FROM STDIN (FORMAT csv)")
        .await
        .unwrap();
    sink.write(csv.as_bytes()).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), ROWS as u64);
    let row = conn
        .query_one("SELECT count(*), max(note) FILTER (WHERE id = 17) FROM copy_csv_in")
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), i64::from(ROWS));
    assert_eq!(row.get::<_, String>(1), "a, \"quoted\" note 17");
    assert_usable(&mut conn).await;
}

/// One row of the binary test table: every value `Option`, so NULL goes through each type.
#[derive(Debug, Clone, PartialEq)]
struct Typed {
    a: Option<i32>,
    b: Option<i64>,
    c: Option<String>,
    d: Option<f64>,
    e: Option<bool>,
    f: Option<Vec<u8>>,
    g: Option<SystemTime>,
    h: Option<i16>,
}

fn typed_rows() -> Vec<Typed> {
    let epoch_2000 = SystemTime::UNIX_EPOCH + Duration::from_secs(946_684_800);
    (0..1000)
        .map(|i: i32| Typed {
            a: (i % 10 != 1).then_some(i - 500),
            b: (i % 10 != 2).then_some(i64::from(i) * 10_000_000_000),
            c: (i % 10 != 3).then(|| format!("text {i} ü \t \\ \n end")),
            d: (i % 10 != 4).then_some(f64::from(i) / 3.0),
            e: (i % 10 != 5).then_some(i % 2 == 0),
            f: (i % 10 != 6).then(|| (0..=(i % 256) as u8).collect()),
            // Whole microseconds: what timestamptz keeps.
            g: (i % 10 != 7).then(|| epoch_2000 + Duration::from_micros(i as u64 * 1_234_567)),
            h: (i % 10 != 8).then_some(i as i16),
        })
        .collect()
}

const TYPED_COLUMNS: &str = "a int4, b int8, c text, d float8, e bool, f bytea, g timestamptz, \
                             h int2";
const TYPED_TYPES: [Type; 8] = [
    Type::INT4,
    Type::INT8,
    Type::TEXT,
    Type::FLOAT8,
    Type::BOOL,
    Type::BYTEA,
    Type::TIMESTAMPTZ,
    Type::INT2,
];

async fn read_typed(conn: &mut Connection, table: &str) -> Vec<Typed> {
    conn.query(format!("SELECT a, b, c, d, e, f, g, h FROM {table} ORDER BY h, a").as_str())
        .await
        .unwrap()
        .iter()
        .map(|r| Typed {
            a: r.get(0),
            b: r.get(1),
            c: r.get(2),
            d: r.get(3),
            e: r.get(4),
            f: r.get(5),
            g: r.get(6),
            h: r.get(7),
        })
        .collect()
}

#[tokio::test]
async fn binary_copy_in_of_several_types_with_nulls_reads_back() {
    let mut conn = connect().await;
    table(&mut conn, "copy_binary_in", TYPED_COLUMNS).await;
    let rows = typed_rows();
    let sink = conn
        .copy_in("COPY copy_binary_in (a, b, c, d, e, f, g, h) FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    assert!(sink.is_binary());
    let mut writer = BinaryCopyInWriter::new(sink, &TYPED_TYPES).unwrap();
    for r in &rows {
        writer
            .write_row(&[&r.a, &r.b, &r.c, &r.d, &r.e, &r.f, &r.g, &r.h])
            .await
            .unwrap();
    }
    assert_eq!(writer.finish().await.unwrap(), rows.len() as u64);
    assert!(conn.is_idle());

    let mut expected = rows.clone();
    expected.sort_by_key(|r| (r.h.is_none(), r.h, r.a));
    let got = read_typed(&mut conn, "copy_binary_in").await;
    assert_eq!(got.len(), expected.len());
    for (got, want) in got.iter().zip(&expected) {
        assert_eq!(got, want);
    }
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn binary_writer_refuses_mismatches_and_keeps_the_copy_open() {
    let mut conn = connect().await;
    table(&mut conn, "copy_binary_checks", "a int8, b text").await;

    // A text-format COPY: the writer refuses it, and the dropped sink fails the COPY.
    let sink = conn
        .copy_in("COPY copy_binary_checks FROM STDIN")
        .await
        .unwrap();
    let err = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("FORMAT binary"), "{err}");
    assert_usable(&mut conn).await;

    // The wrong number of types for the columns.
    let sink = conn
        .copy_in("COPY copy_binary_checks FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let err = BinaryCopyInWriter::new(sink, &[Type::INT8]).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert_usable(&mut conn).await;

    // A value of the wrong Rust type, or the wrong number of values: that row is not sent,
    // and the rows around it are.
    let sink = conn
        .copy_in("COPY copy_binary_checks FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let mut writer = BinaryCopyInWriter::new(sink, &[Type::INT8, Type::TEXT]).unwrap();
    writer.write_row(&[&1i64, &"one"]).await.unwrap();
    let err = writer.write_row(&[&2i32, &"two"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("column 1"), "{err}");
    let err = writer.write_row(&[&2i64]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    writer.write_row(&[&3i64, &None::<String>]).await.unwrap();
    assert_eq!(writer.finish().await.unwrap(), 2);
    let rows = conn
        .query("SELECT a, b FROM copy_binary_checks ORDER BY a")
        .await
        .unwrap();
    let got: Vec<(i64, Option<String>)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(got, vec![(1, Some("one".to_owned())), (3, None)]);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn copy_out_text_is_the_exact_bytes_one_row_per_item() {
    let mut conn = connect().await;
    table(
        &mut conn,
        "copy_text_out",
        "id int4, name text, score float8",
    )
    .await;
    conn.simple_query(
        "INSERT INTO copy_text_out VALUES (1, 'plain', 1.5), (2, NULL, -2), \
         (3, E'tab\\there, back\\\\slash, new\\nline', 0.25)",
    )
    .await
    .unwrap();
    let mut out = conn
        .copy_out("COPY (SELECT * FROM copy_text_out ORDER BY id) TO STDOUT")
        .await
        .unwrap();
    assert!(!out.is_binary());
    assert_eq!(out.columns(), 3);
    let mut items = Vec::new();
    while let Some(data) = out.try_next().await.unwrap() {
        items.push(data);
    }
    assert_eq!(out.rows_affected(), Some(3));
    let items: Vec<&[u8]> = items.iter().map(|b| b.as_ref()).collect();
    assert_eq!(
        items,
        vec![
            &b"1\tplain\t1.5\n"[..],
            b"2\t\\N\t-2\n",
            b"3\ttab\\there, back\\\\slash, new\\nline\t0.25\n",
        ]
    );
    drop(out);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn copy_out_binary_is_the_exact_bytes() {
    let mut conn = connect().await;
    let mut out = conn
        .copy_out(
            "COPY (SELECT 7::int4, NULL::text, 'hi'::text, true UNION ALL \
             SELECT -1, 'x', NULL, false) TO STDOUT (FORMAT binary)",
        )
        .await
        .unwrap();
    assert!(out.is_binary());
    assert_eq!(out.columns(), 4);
    let mut data = Vec::new();
    while let Some(chunk) = out.try_next().await.unwrap() {
        data.extend_from_slice(&chunk);
    }
    assert_eq!(out.rows_affected(), Some(2));
    drop(out);

    let mut want: Vec<u8> = b"PGCOPY\n\xff\r\n\0".to_vec();
    want.extend_from_slice(&0i32.to_be_bytes()); // flags
    want.extend_from_slice(&0i32.to_be_bytes()); // header extension length
    let field = |want: &mut Vec<u8>, value: Option<&[u8]>| match value {
        None => want.extend_from_slice(&(-1i32).to_be_bytes()),
        Some(v) => {
            want.extend_from_slice(&(v.len() as i32).to_be_bytes());
            want.extend_from_slice(v);
        }
    };
    want.extend_from_slice(&4i16.to_be_bytes());
    field(&mut want, Some(&7i32.to_be_bytes()));
    field(&mut want, None);
    field(&mut want, Some(b"hi"));
    field(&mut want, Some(&[1]));
    want.extend_from_slice(&4i16.to_be_bytes());
    field(&mut want, Some(&(-1i32).to_be_bytes()));
    field(&mut want, Some(b"x"));
    field(&mut want, None);
    field(&mut want, Some(&[0]));
    want.extend_from_slice(&(-1i16).to_be_bytes()); // trailer
    assert_eq!(data, want);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn binary_copy_out_then_in_round_trips_a_table() {
    let mut conn = connect().await;
    table(&mut conn, "copy_round_src", TYPED_COLUMNS).await;
    table(&mut conn, "copy_round_dst", TYPED_COLUMNS).await;
    let sink = conn
        .copy_in("COPY copy_round_src FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    let mut writer = BinaryCopyInWriter::new(sink, &TYPED_TYPES).unwrap();
    for r in typed_rows() {
        writer
            .write_row(&[&r.a, &r.b, &r.c, &r.d, &r.e, &r.f, &r.g, &r.h])
            .await
            .unwrap();
    }
    writer.finish().await.unwrap();

    let mut data = Vec::new();
    let mut out = conn
        .copy_out("COPY copy_round_src TO STDOUT (FORMAT binary)")
        .await
        .unwrap();
    while let Some(chunk) = out.try_next().await.unwrap() {
        data.extend_from_slice(&chunk);
    }
    drop(out);
    let mut sink = conn
        .copy_in("COPY copy_round_dst FROM STDIN (FORMAT binary)")
        .await
        .unwrap();
    sink.write(&data).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 1000);
    assert_eq!(
        read_typed(&mut conn, "copy_round_dst").await,
        read_typed(&mut conn, "copy_round_src").await
    );
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn abort_copies_nothing_and_leaves_the_connection_idle() {
    let mut conn = connect().await;
    table(&mut conn, "copy_abort", "id int8, name text, score float8").await;
    let mut sink = conn.copy_in("COPY copy_abort FROM STDIN").await.unwrap();
    // Enough that some of it has gone out before the abort.
    for i in 0..20_000 {
        sink.write(text_row(i).as_bytes()).await.unwrap();
    }
    sink.abort("the caller changed its mind").await.unwrap();
    assert!(conn.is_idle(), "{conn:?}");
    assert_eq!(count(&mut conn, "copy_abort").await, 0);
    // The same connection copies again.
    let copied = copy_lines(
        &mut conn,
        "COPY copy_abort FROM STDIN",
        (0..5).map(text_row),
    )
    .await
    .unwrap();
    assert_eq!(copied, 5);
    assert_eq!(count(&mut conn, "copy_abort").await, 5);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn a_malformed_value_mid_copy_is_22p02_and_copies_nothing() {
    let mut conn = connect().await;
    table(
        &mut conn,
        "copy_bad_value",
        "id int8, name text, score float8",
    )
    .await;
    let lines = (0..30_000).map(|i| {
        if i == 20_000 {
            "not-a-number\tx\t1\n".to_owned()
        } else {
            text_row(i)
        }
    });
    let err = copy_lines(&mut conn, "COPY copy_bad_value FROM STDIN", lines)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err}"
    );
    let db = err.as_db_error().unwrap();
    assert!(
        db.where_().unwrap_or("").contains("COPY copy_bad_value"),
        "{db:?}"
    );
    assert!(conn.is_idle(), "{conn:?}");
    assert_eq!(count(&mut conn, "copy_bad_value").await, 0);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn a_unique_violation_mid_copy_is_23505_and_copies_nothing() {
    let mut conn = connect().await;
    table(
        &mut conn,
        "copy_unique",
        "id int8 PRIMARY KEY, name text, score float8",
    )
    .await;
    let lines = (0..10_000).chain([5_000]).map(text_row);
    let err = copy_lines(&mut conn, "COPY copy_unique FROM STDIN", lines)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(
        err.as_db_error().unwrap().constraint(),
        Some("copy_unique_pkey")
    );
    assert!(conn.is_idle(), "{conn:?}");
    assert_eq!(count(&mut conn, "copy_unique").await, 0);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn an_error_the_server_sent_mid_copy_stops_the_next_write() {
    let mut conn = connect().await;
    table(&mut conn, "copy_early_error", "id int4").await;
    let mut sink = conn
        .copy_in("COPY copy_early_error FROM STDIN")
        .await
        .unwrap();
    // The first row is bad; a full buffer makes it go out at once.
    let mut first = b"oops\n".to_vec();
    first.resize(70 * 1024, b'\n');
    sink.write(&first).await.unwrap();
    // Time for the server's error to arrive; then the next buffer that goes out finds it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let chunk = "1\n".repeat(40 * 1024);
    let mut failed = None;
    for _ in 0..10 {
        if let Err(e) = sink.write(chunk.as_bytes()).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("a write reports the server's error");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err}"
    );
    // The server has said ReadyForQuery: the connection is clean while the sink still lives,
    // and the sink keeps giving the same answer.
    assert_eq!(
        sink.write(b"2\n").await.unwrap_err().code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION)
    );
    assert_eq!(
        sink.finish().await.unwrap_err().code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION)
    );
    assert!(conn.is_idle(), "{conn:?}");
    assert_eq!(count(&mut conn, "copy_early_error").await, 0);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn a_dropped_sink_is_failed_before_the_next_query() {
    let mut conn = connect().await;
    table(
        &mut conn,
        "copy_dropped_sink",
        "id int8, name text, score float8",
    )
    .await;
    let mut sink = conn
        .copy_in("COPY copy_dropped_sink FROM STDIN")
        .await
        .unwrap();
    for i in 0..20_000 {
        sink.write(text_row(i).as_bytes()).await.unwrap();
    }
    drop(sink);
    assert!(conn.is_busy(), "{conn:?}");
    assert!(!conn.is_idle());
    assert_eq!(count(&mut conn, "copy_dropped_sink").await, 0);
    assert!(conn.is_idle(), "{conn:?}");
    // A sink dropped before anything was written, too.
    let sink = conn
        .copy_in("COPY copy_dropped_sink FROM STDIN")
        .await
        .unwrap();
    drop(sink);
    assert_usable(&mut conn).await;
    assert_eq!(count(&mut conn, "copy_dropped_sink").await, 0);
}

#[tokio::test]
async fn a_pool_cleans_a_connection_whose_sink_was_dropped() {
    let engine = PostgresEngine::new(tcp_config(TempCluster::SUPERUSER));
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    let pid = {
        let mut conn = engine.acquire().await.unwrap();
        table(
            &mut conn,
            "copy_pool_sink",
            "id int8, name text, score float8",
        )
        .await;
        let mut sink = conn
            .copy_in("COPY copy_pool_sink FROM STDIN")
            .await
            .unwrap();
        for i in 0..20_000 {
            sink.write(text_row(i).as_bytes()).await.unwrap();
        }
        drop(sink);
        conn.process_id()
    };
    let mut conn = engine.acquire().await.unwrap();
    // The same connection, cleaned before it was handed out again.
    assert_eq!(conn.process_id(), pid);
    assert!(conn.is_idle(), "{:?}", *conn);
    assert_eq!(count(&mut conn, "copy_pool_sink").await, 0);
    drop(conn);
    let stats = engine.pool_stats().unwrap();
    assert_eq!((stats.opened, stats.closed), (1, 0), "{stats:?}");
    engine.close_connection_pool().await.unwrap();
}

#[tokio::test]
async fn a_copy_out_stream_dropped_part_way_leaves_the_next_query_its_own_answer() {
    let mut conn = connect().await;
    let mut out = conn
        .copy_out("COPY (SELECT g, repeat('x', 100) FROM generate_series(1, 2000000) g) TO STDOUT")
        .await
        .unwrap();
    for want in 1..=3 {
        let line = out.try_next().await.unwrap().unwrap();
        assert!(line.starts_with(format!("{want}\t").as_bytes()), "{line:?}");
    }
    drop(out);
    assert!(conn.is_busy());
    assert_usable(&mut conn).await;
    // And a second COPY out on the same connection reads its own data from the start.
    let mut out = conn
        .copy_out("COPY (SELECT 'second') TO STDOUT")
        .await
        .unwrap();
    assert_eq!(out.try_next().await.unwrap().unwrap().as_ref(), b"second\n");
    assert_eq!(out.try_next().await.unwrap(), None);
    drop(out);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn an_error_in_the_middle_of_copy_out_ends_the_stream() {
    let mut conn = connect().await;
    let mut out = conn
        .copy_out("COPY (SELECT 1 / (500 - g) FROM generate_series(1, 1000) g) TO STDOUT")
        .await
        .unwrap();
    let mut rows = 0;
    let err = loop {
        match out.try_next().await {
            Ok(Some(_)) => rows += 1,
            Ok(None) => panic!("the stream ended without the division's error"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO), "{err}");
    assert!(rows < 500, "{rows}");
    assert_eq!(out.try_next().await.unwrap(), None);
    drop(out);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn copy_inside_a_transaction_that_fails_leaves_it_failed() {
    let mut conn = connect().await;
    table(&mut conn, "copy_in_tx", "id int4").await;
    conn.simple_query("BEGIN; INSERT INTO copy_in_tx VALUES (-1)")
        .await
        .unwrap();
    let err = copy_lines(
        &mut conn,
        "COPY copy_in_tx FROM STDIN",
        ["1\n".to_owned(), "two\n".to_owned()],
    )
    .await
    .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_TEXT_REPRESENTATION),
        "{err}"
    );
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    let err = conn.execute("SELECT 1").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "{err}"
    );
    conn.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(count(&mut conn, "copy_in_tx").await, 0);

    // An abort fails the transaction as well; a finished COPY commits with it.
    conn.simple_query("BEGIN").await.unwrap();
    let mut sink = conn.copy_in("COPY copy_in_tx FROM STDIN").await.unwrap();
    sink.write(b"1\n").await.unwrap();
    sink.abort("no").await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    conn.simple_query("ROLLBACK").await.unwrap();
    conn.simple_query("BEGIN").await.unwrap();
    let copied = copy_lines(&mut conn, "COPY copy_in_tx FROM STDIN", ["5\n".to_owned()])
        .await
        .unwrap();
    assert_eq!(copied, 1);
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    conn.simple_query("COMMIT").await.unwrap();
    assert_eq!(count(&mut conn, "copy_in_tx").await, 1);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn simple_query_refuses_copy_data_clearly_and_stays_usable() {
    let mut conn = connect().await;
    table(&mut conn, "copy_simple", "id int4").await;
    let err = conn
        .simple_query("COPY copy_simple FROM STDIN")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("copy_in"), "{err}");
    assert!(conn.is_idle(), "{conn:?}");
    assert_eq!(count(&mut conn, "copy_simple").await, 0);

    let err = conn
        .simple_query("COPY (SELECT 1) TO STDOUT")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("copy_out"), "{err}");
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn copy_in_and_copy_out_refuse_other_statements_and_stay_usable() {
    let mut conn = connect().await;
    table(&mut conn, "copy_wrong", "id int4").await;

    let err = conn.copy_in("COPY (SELECT 1) TO STDOUT").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("copy_out"), "{err}");
    assert!(conn.is_idle());

    let err = conn
        .copy_out("COPY copy_wrong FROM STDIN")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.to_string().contains("copy_in"), "{err}");
    assert!(conn.is_idle());

    let err = conn.copy_in("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(conn.is_idle());

    let err = conn
        .copy_in("COPY copy_no_such_table FROM STDIN")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err}");
    assert!(conn.is_idle());

    let err = conn
        .copy_out("COPY (SELECT nope) TO STDOUT")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_COLUMN), "{err}");
    assert!(conn.is_idle());

    // Statements before the COPY in the same string run; their results are not returned.
    let copied = copy_lines(
        &mut conn,
        "INSERT INTO copy_wrong VALUES (100); COPY copy_wrong FROM STDIN",
        ["1\n".to_owned()],
    )
    .await
    .unwrap();
    assert_eq!(copied, 1);
    assert_eq!(count(&mut conn, "copy_wrong").await, 2);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn notices_raised_for_every_copied_row_are_all_delivered() {
    let mut conn = connect().await;
    table(&mut conn, "copy_noisy", "id int4").await;
    conn.simple_query(
        "CREATE OR REPLACE FUNCTION copy_noisy_notice() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE NOTICE 'row % has arrived, and this notice is a fair bit longer than \
         the row itself', NEW.id; RETURN NEW; END $$; \
         CREATE TRIGGER copy_noisy_notice BEFORE INSERT ON copy_noisy \
         FOR EACH ROW EXECUTE FUNCTION copy_noisy_notice()",
    )
    .await
    .unwrap();
    let notices = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = notices.clone();
    conn.set_notice_handler(move |_| {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    });
    const ROWS: usize = 100_000;
    let copied = copy_lines(
        &mut conn,
        "COPY copy_noisy FROM STDIN",
        (0..ROWS).map(|i| format!("{i}\n")),
    )
    .await
    .unwrap();
    assert_eq!(copied, ROWS as u64);
    assert_eq!(notices.load(std::sync::atomic::Ordering::Relaxed), ROWS);
    assert_usable(&mut conn).await;
}

#[tokio::test]
async fn a_copy_that_runs_out_of_time_is_failed_and_the_connection_recovers() {
    let mut conn = connect().await;
    table(&mut conn, "copy_timeout", "id int4").await;
    conn.set_query_timeout(Some(Duration::from_millis(300)));
    let mut sink = conn.copy_in("COPY copy_timeout FROM STDIN").await.unwrap();
    sink.write(b"1\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let chunk = "2\n".repeat(40 * 1024);
    let err = sink.write(chunk.as_bytes()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert_eq!(sink.finish().await.unwrap_err().kind(), ErrorKind::Timeout);
    conn.set_query_timeout(None);
    assert_eq!(count(&mut conn, "copy_timeout").await, 0);
    assert_usable(&mut conn).await;
}

/// A text COPY of one column, as the server announces it.
fn copy_in_response() -> BackendMessage {
    BackendMessage::CopyInResponse(CopyFormat {
        format: 0,
        column_formats: vec![0],
    })
}

/// Bounds a step against the scripted server, which may be waiting for something that never
/// comes.
async fn guard<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("hang: {what}"))
}

#[tokio::test]
async fn a_dropped_sink_sends_copy_fail_before_the_next_query_and_nothing_else() {
    let server = MockServer::start(script([
        trust_login(),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(copy_in_response()),
            Step::Expect(Kind::CopyData),
            Step::Expect(Kind::CopyFail),
            Step::Send(error_response("ERROR", "57014", "COPY from stdin failed")),
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Expect(Kind::Query),
            Step::Send(BackendMessage::EmptyQueryResponse),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = guard("connect", Connection::connect(&server.config()))
        .await
        .unwrap();
    let mut sink = guard("copy_in", conn.copy_in("COPY t FROM STDIN"))
        .await
        .unwrap();
    // A full buffer goes out as one CopyData; the rest stays buffered and is never sent.
    guard("write", sink.write(&vec![b'1'; 64 * 1024 + 10]))
        .await
        .unwrap();
    drop(sink);
    assert!(conn.is_busy());
    guard("the next query", conn.simple_query(""))
        .await
        .unwrap();
    assert!(conn.is_idle(), "{conn:?}");
    guard("close", conn.close()).await.unwrap();
    let t = server.finish().await;
    assert_eq!(
        t.kinds(),
        [
            Kind::Startup,
            Kind::Query,
            Kind::CopyData,
            Kind::CopyFail,
            Kind::Query,
            Kind::Terminate
        ]
    );
    let FrontendMessage::CopyData(data) = &t.messages[2] else {
        unreachable!()
    };
    assert_eq!(data.len(), 64 * 1024);
}

#[tokio::test]
async fn after_a_server_error_mid_copy_no_more_copy_messages_are_sent() {
    let server = MockServer::start(script([
        trust_login(),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(copy_in_response()),
            Step::Expect(Kind::CopyData),
            Step::Send(error_response("ERROR", "23505", "duplicate key value")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = guard("connect", Connection::connect(&server.config()))
        .await
        .unwrap();
    let mut sink = guard("copy_in", conn.copy_in("COPY t FROM STDIN"))
        .await
        .unwrap();
    let chunk = vec![b'1'; 64 * 1024];
    guard("write", sink.write(&chunk)).await.unwrap();
    // Once the error has arrived, the next write that would send finds it first.
    let mut failed = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Err(e) = guard("write", sink.write(&chunk)).await {
            failed = Some(e);
            break;
        }
    }
    let err = failed.expect("a write reports the server's error");
    assert_eq!(err.code(), Some(&SqlState::UNIQUE_VIOLATION), "{err}");
    assert_eq!(
        guard("finish", sink.finish()).await.unwrap_err().code(),
        Some(&SqlState::UNIQUE_VIOLATION)
    );
    assert!(conn.is_idle(), "{conn:?}");
    guard("close", conn.close()).await.unwrap();
    let t = server.finish().await;
    // Data sent before the error arrived is the server's to ignore; after it, nothing of the
    // COPY goes out: no CopyDone, no CopyFail.
    let kinds = t.kinds();
    assert_eq!(kinds[..3], [Kind::Startup, Kind::Query, Kind::CopyData]);
    assert_eq!(kinds.last(), Some(&Kind::Terminate));
    assert!(
        kinds[2..kinds.len() - 1]
            .iter()
            .all(|k| *k == Kind::CopyData),
        "{kinds:?}"
    );
}
