//! The statement cache, observed through the connection's counters and the server's own
//! `pg_prepared_statements` view (read with the simple protocol, which does not touch the
//! cache).

mod common;

use common::connect;
use pgengine::SqlState;
use pgengine::{BorrowedParams, Connection, ErrorKind, TransactionStatus};

/// Our prepared statements as the server lists them, by statement text.
async fn server_statements(conn: &mut Connection) -> Vec<String> {
    let r = conn
        .simple_query("SELECT statement FROM pg_prepared_statements ORDER BY prepare_time, name")
        .await
        .unwrap();
    r[0].rows()
        .iter()
        .map(|row| row.get(0).unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn second_run_sends_no_parse_and_one_round_trip_each() {
    let mut conn = connect().await;
    let before = conn.stats();
    let sql = "SELECT $1::int4 * 2";
    assert_eq!(
        conn.query_one((sql, (21i32,)))
            .await
            .unwrap()
            .get::<_, i32>(0),
        42
    );
    let first = conn.stats();
    assert_eq!(first.parses - before.parses, 1);
    // A new statement with parameters still takes a single round trip.
    assert_eq!(first.round_trips - before.round_trips, 1);
    assert_eq!(
        conn.query_one((sql, (5i32,)))
            .await
            .unwrap()
            .get::<_, i32>(0),
        10
    );
    let second = conn.stats();
    assert_eq!(second.parses, first.parses, "no Parse the second time");
    assert_eq!(second.cache_hits - first.cache_hits, 1);
    assert_eq!(second.round_trips - first.round_trips, 1);
    assert_eq!(server_statements(&mut conn).await, [sql]);
}

#[tokio::test]
async fn capacity_zero_uses_unnamed_statements_only() {
    let mut conn = connect().await;
    conn.set_statement_cache_capacity(0);
    for i in 0..3i64 {
        let row = conn.query_one(("SELECT $1::int8 + 1", (i,))).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i + 1);
    }
    assert_eq!(conn.stats().parses, 3);
    assert_eq!(conn.cached_statements(), 0);
    assert!(server_statements(&mut conn).await.is_empty());
}

#[tokio::test]
async fn eviction_closes_the_statement_on_the_server() {
    let mut conn = connect().await;
    conn.set_statement_cache_capacity(2);
    for sql in ["SELECT 1", "SELECT 2", "SELECT 3"] {
        conn.query(sql).await.unwrap();
    }
    assert_eq!(conn.cached_statements(), 2);
    assert_eq!(server_statements(&mut conn).await, ["SELECT 2", "SELECT 3"]);
    // Using "SELECT 2" makes "SELECT 3" the least recently used.
    conn.query("SELECT 2").await.unwrap();
    conn.query("SELECT 4").await.unwrap();
    assert_eq!(server_statements(&mut conn).await, ["SELECT 2", "SELECT 4"]);
    // Shrinking the cache closes what no longer fits, in front of the next request.
    conn.set_statement_cache_capacity(1);
    conn.query("SELECT 2").await.unwrap();
    assert_eq!(server_statements(&mut conn).await.len(), 1);
}

#[tokio::test]
async fn ddl_that_changes_the_result_type_is_retried_once() {
    let mut conn = connect().await;
    conn.simple_query("CREATE TEMP TABLE d (a int); INSERT INTO d VALUES (1)")
        .await
        .unwrap();
    let rows = conn.query("SELECT * FROM d").await.unwrap();
    assert_eq!(rows[0].len(), 1);
    conn.simple_query("ALTER TABLE d ADD COLUMN b text DEFAULT 'new'")
        .await
        .unwrap();
    let parses = conn.stats().parses;
    // The cached plan returns one column; the table now has two: the server refuses the old
    // plan (0A000), and the query is prepared again and retried transparently.
    let rows = conn.query("SELECT * FROM d").await.unwrap();
    assert_eq!(rows[0].len(), 2);
    assert_eq!(rows[0].get::<_, &str>("b"), "new");
    assert_eq!(conn.stats().parses, parses + 1);

    // Inside a transaction the failed attempt aborted it: the error is the caller's to see.
    conn.simple_query("BEGIN; ALTER TABLE d ADD COLUMN c int")
        .await
        .unwrap();
    let err = conn.query("SELECT * FROM d").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::FEATURE_NOT_SUPPORTED), "{err}");
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    conn.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(conn.query("SELECT * FROM d").await.unwrap()[0].len(), 2);
}

#[tokio::test]
async fn statements_dropped_behind_our_back_are_prepared_again() {
    let mut conn = connect().await;
    conn.query("SELECT 'kept'").await.unwrap();
    conn.execute("DEALLOCATE ALL").await.unwrap();
    let row = conn.query_one("SELECT 'kept'").await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "kept");
    conn.simple_query("DISCARD ALL").await.unwrap();
    assert_eq!(conn.cached_statements(), 0);
    assert_eq!(
        conn.query_one("SELECT 'kept'")
            .await
            .unwrap()
            .get::<_, &str>(0),
        "kept"
    );
}

#[tokio::test]
async fn other_value_types_for_the_same_sql_prepare_a_new_statement() {
    let mut conn = connect().await;
    let sql = "SELECT $1 + 1";
    assert_eq!(
        conn.query_one((sql, (1i32,)))
            .await
            .unwrap()
            .get::<_, i32>(0),
        2
    );
    assert_eq!(
        conn.query_one((sql, (1i64,)))
            .await
            .unwrap()
            .get::<_, i64>(0),
        2
    );
    assert_eq!(
        conn.query_one((sql, (1.5f64,)))
            .await
            .unwrap()
            .get::<_, f64>(0),
        2.5
    );
    // Each statement the server held for the SQL was closed when replaced.
    assert_eq!(server_statements(&mut conn).await, [sql]);
}

/// A value only the server can type: an enum that postgres-types knows by name alone.
#[derive(Debug)]
struct Mood(&'static str);

impl postgres_types::ToSql for Mood {
    fn to_sql(
        &self,
        _: &postgres_types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.extend_from_slice(self.0.as_bytes());
        Ok(postgres_types::IsNull::No)
    }
    fn accepts(ty: &postgres_types::Type) -> bool {
        ty.name() == "mood"
    }
    postgres_types::to_sql_checked!();
}

#[tokio::test]
async fn values_of_user_defined_types_ask_the_server_for_the_type() {
    let mut conn = connect().await;
    conn.simple_query(
        "CREATE TYPE pg_temp.mood AS ENUM ('sad', 'happy'); \
         CREATE TYPE pg_temp.pair AS (label text, n int4)",
    )
    .await
    .unwrap();
    let trips = |conn: &Connection| conn.stats().round_trips;

    let start = trips(&conn);
    let sql = "SELECT $1::mood::text";
    let row = conn.query_one((sql, (Mood("happy"),))).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "happy");
    // Parse+Describe, two catalog lookups (the type, its labels), then Bind.
    assert_eq!(trips(&conn) - start, 4);

    let start = trips(&conn);
    let row = conn.query_one((sql, (Mood("sad"),))).await.unwrap();
    assert_eq!(row.get::<_, &str>(0), "sad");
    assert_eq!(trips(&conn) - start, 1, "cached statement: one round trip");

    // Another statement with the type: no lookups any more, just Describe then Bind.
    let start = trips(&conn);
    let row = conn
        .query_one(("SELECT $1::mood = 'sad'", (Mood("sad"),)))
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(trips(&conn) - start, 2);

    // A result column of the type, read by name through postgres-types' Kind::Enum.
    let row = conn.query_one("SELECT 'happy'::mood AS m").await.unwrap();
    assert_eq!(row.columns()[0].type_().name(), "mood");
    assert!(matches!(
        row.columns()[0].type_().kind(),
        postgres_types::Kind::Enum(labels) if labels == &["sad", "happy"]
    ));
    assert_eq!(row.get::<_, MoodOut>(0).0, "happy");

    // A composite result, its fields typed.
    let rows = conn
        .query("SELECT ROW('x', 5)::pair AS p FROM generate_series(1, 3)")
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    match rows[0].columns()[0].type_().kind() {
        postgres_types::Kind::Composite(fields) => {
            assert_eq!(fields[0].name(), "label");
            assert_eq!(fields[1].type_(), &postgres_types::Type::INT4);
        }
        other => panic!("not a composite: {other:?}"),
    }

    // A value of another type makes a statement typed for it, which the server refuses to
    // run: integer has no cast to mood.
    let err = conn.query_one((sql, (5i32,))).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::CANNOT_COERCE), "{err}");
    assert!(conn.is_idle());
}

/// Reads a `mood` by name, as a derived `FromSql` would.
struct MoodOut(String);

impl<'a> postgres_types::FromSql<'a> for MoodOut {
    fn from_sql(
        _: &postgres_types::Type,
        raw: &'a [u8],
    ) -> Result<MoodOut, Box<dyn std::error::Error + Sync + Send>> {
        Ok(MoodOut(std::str::from_utf8(raw)?.to_owned()))
    }
    fn accepts(ty: &postgres_types::Type) -> bool {
        ty.name() == "mood"
    }
}

#[tokio::test]
async fn borrowed_params_of_mixed_types() {
    let mut conn = connect().await;
    let name = String::from("borrowed");
    let id = 7i64;
    let params: BorrowedParams = &[&id, &name];
    let row = conn
        .query_one(("SELECT $1::int8, $2::text", params))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 7);
    assert_eq!(row.get::<_, &str>(1), "borrowed");
    let err = conn
        .query_one("SELECT 1 UNION ALL SELECT 2")
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RowCount);
    assert!(
        conn.query_opt("SELECT 1 WHERE false")
            .await
            .unwrap()
            .is_none()
    );
}

/// An Atomic (one pipeline, one Sync) carrying the same new SQL several times parses it once:
/// the later copies bind the first copy's statement.
#[tokio::test]
async fn the_same_new_sql_in_one_pipeline_is_parsed_once() {
    use pgengine::PostgresEngine;
    use pgengine::pool::PoolOptions;
    use pgengine::testing::TempCluster;

    let engine = PostgresEngine::new(common::tcp_config(TempCluster::SUPERUSER));
    engine
        .start_connection_pool(PoolOptions::default().max_size(1))
        .await
        .unwrap();
    engine
        .run_ddl("DROP TABLE IF EXISTS cache_dup; CREATE TABLE cache_dup (v int4)")
        .await
        .unwrap();
    let insert = "INSERT INTO cache_dup (v) VALUES ($1)";
    let atomic = |values: std::ops::Range<i32>| {
        let mut atomic = engine.atomic();
        for v in values {
            atomic.add(pgengine::Query::new(insert).bind(v));
        }
        atomic
    };

    let before = engine.acquire().await.unwrap().stats();
    atomic(0..5).run().await.unwrap();
    let mut conn = engine.acquire().await.unwrap();
    let after = conn.stats();
    assert_eq!(
        after.parses - before.parses,
        3,
        "BEGIN, COMMIT and one INSERT for five copies"
    );
    let statements = server_statements(&mut conn).await;
    assert_eq!(
        statements.iter().filter(|s| s.as_str() == insert).count(),
        1,
        "{statements:?}"
    );
    drop(conn);
    // Warm: no Parse at all, and nothing was left to Close.
    atomic(5..10).run().await.unwrap();
    let warm = engine.acquire().await.unwrap().stats();
    assert_eq!(warm.parses, after.parses);
    assert_eq!(warm.closes, before.closes);
    let sum: i64 = engine
        .query_one("SELECT sum(v)::int8 FROM cache_dup")
        .await
        .unwrap()
        .get(0);
    assert_eq!(sum, 45, "every copy inserted its own value");

    // If the one Parse fails, the server runs nothing after it: one error, nothing committed,
    // the connection clean.
    let mut failing = engine.atomic();
    for v in 0..3 {
        failing.add(pgengine::Query::new("INSERT INTO cache_dup_missing VALUES ($1)").bind(v));
    }
    let err = failing.run().await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_TABLE), "{err}");
    assert!(err.to_string().contains("query 1 of 3"), "{err}");

    // A later copy whose value does not fit the first copy's parameter type gets its own.
    let mut mixed = engine.atomic();
    mixed.add(pgengine::Query::new("SELECT $1 AS x").bind(7i32));
    mixed.add(pgengine::Query::new("SELECT $1 AS x").bind("seven"));
    let results = mixed.run().await.unwrap();
    assert_eq!(results[0].0[0].get::<_, i32>(0), 7);
    assert_eq!(results[1].0[0].get::<_, String>(0), "seven");
    engine.close_connection_pool().await.unwrap();
}
