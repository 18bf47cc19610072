//! One connection against a real server: the simple and extended query protocols, errors with
//! their SQLSTATE and fields, recovery after every error, transaction status from
//! ReadyForQuery, notices, notifications and parameter changes.

mod common;

use std::sync::{Arc, Mutex};

use common::connect;
use pgengine::SqlState;
use pgengine::error::Severity;
use pgengine::{ErrorKind, TransactionStatus};

#[tokio::test]
async fn multi_statement_simple_query_returns_every_result() {
    let mut conn = connect().await;
    let results = conn
        .simple_query(
            "CREATE TEMP TABLE m (id int, name text); \
             INSERT INTO m VALUES (1, 'one'), (2, NULL), (3, 'drei ü'); \
             SELECT id, name FROM m ORDER BY id; \
             SELECT 'x' AS only",
        )
        .await
        .unwrap();
    assert_eq!(results.len(), 4);
    assert_eq!(results[0].tag(), "CREATE TABLE");
    assert_eq!(results[1].tag(), "INSERT 0 3");
    assert_eq!(results[1].rows_affected(), 3);
    let select = &results[2];
    assert_eq!(
        select
            .columns()
            .iter()
            .map(|c| c.name())
            .collect::<Vec<_>>(),
        ["id", "name"]
    );
    let rows: Vec<(Option<&str>, Option<&str>)> = select
        .rows()
        .iter()
        .map(|r| (r.get(0), r.get("name")))
        .collect();
    assert_eq!(
        rows,
        [
            (Some("1"), Some("one")),
            (Some("2"), None),
            (Some("3"), Some("drei ü"))
        ]
    );
    assert_eq!(select.rows_affected(), 3);
    assert_eq!(results[3].rows()[0].get("only"), Some("x"));
}

#[tokio::test]
async fn empty_query_returns_no_result() {
    let mut conn = connect().await;
    assert!(conn.simple_query("").await.unwrap().is_empty());
    assert!(conn.simple_query(" ; ").await.unwrap().is_empty());
    assert_eq!(conn.simple_query("SELECT 1").await.unwrap().len(), 1);
}

#[tokio::test]
async fn errors_carry_sqlstate_and_the_connection_recovers() {
    let mut conn = connect().await;
    conn.simple_query("CREATE TEMP TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1)")
        .await
        .unwrap();
    let cases = [
        ("SELECT 1/0", SqlState::DIVISION_BY_ZERO),
        ("SELEC 1", SqlState::SYNTAX_ERROR),
        ("INSERT INTO u VALUES (1)", SqlState::UNIQUE_VIOLATION),
        ("SELECT * FROM no_such_table", SqlState::UNDEFINED_TABLE),
    ];
    for (sql, code) in cases {
        let err = conn.simple_query(sql).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Db, "{sql}: {err}");
        assert_eq!(err.code(), Some(&code), "{sql}: {err}");
        assert!(!conn.is_broken());
        assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
        // The very next query on the same connection works.
        let r = conn.simple_query("SELECT 42").await.unwrap();
        assert_eq!(r[0].rows()[0].get(0), Some("42"));
        // And so does the extended protocol.
        let err = conn.execute(sql).await.unwrap_err();
        assert_eq!(err.code(), Some(&code), "extended {sql}: {err}");
        let rows = conn.query(("SELECT $1::int4", (7i32,))).await.unwrap();
        assert_eq!(rows[0].get::<_, i32>(0), 7);
    }
}

#[tokio::test]
async fn unique_violation_has_every_field() {
    let mut conn = connect().await;
    conn.simple_query("CREATE TEMP TABLE f (id int CONSTRAINT f_pk PRIMARY KEY)")
        .await
        .unwrap();
    conn.simple_query("INSERT INTO f VALUES (5)").await.unwrap();
    let err = conn
        .simple_query("INSERT INTO f VALUES (5)")
        .await
        .unwrap_err();
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.severity(), "ERROR");
    assert_eq!(db.severity_nonlocalized(), Some("ERROR"));
    assert_eq!(db.severity_level(), Some(Severity::Error));
    assert_eq!(*db.code(), SqlState::UNIQUE_VIOLATION);
    assert_eq!(db.code().name(), Some("unique_violation"));
    assert!(db.message().contains("f_pk"), "{db:?}");
    assert_eq!(db.detail(), Some("Key (id)=(5) already exists."));
    assert_eq!(db.table(), Some("f"));
    assert_eq!(db.constraint(), Some("f_pk"));
    assert!(db.schema().unwrap().starts_with("pg_temp"));
    assert!(db.file().is_some() && db.line().is_some() && db.routine().is_some());

    let err = conn.simple_query("SELECT 1 +").await.unwrap_err();
    assert!(matches!(
        err.as_db_error().unwrap().position(),
        Some(pgengine::error::ErrorPosition::Original(_))
    ));
}

#[tokio::test]
async fn an_error_in_a_multi_statement_query_stops_the_rest() {
    let mut conn = connect().await;
    conn.simple_query("CREATE TEMP TABLE s (v int)")
        .await
        .unwrap();
    let err = conn
        .simple_query("INSERT INTO s VALUES (1); SELECT 1/0; INSERT INTO s VALUES (2)")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DIVISION_BY_ZERO));
    // The simple protocol runs a multi-statement string as one implicit transaction: the
    // error rolled back the first INSERT too, and the last one never ran.
    let r = conn.simple_query("SELECT count(*) FROM s").await.unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("0"));
}

#[tokio::test]
async fn transaction_status_follows_ready_for_query() {
    let mut conn = connect().await;
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    assert!(conn.is_idle());
    conn.simple_query("BEGIN").await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::InTransaction);
    assert!(!conn.is_idle());
    conn.simple_query("SELECT 1/0").await.unwrap_err();
    assert_eq!(conn.transaction_status(), TransactionStatus::Failed);
    let err = conn.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::IN_FAILED_SQL_TRANSACTION),
        "in a failed transaction: {err}"
    );
    conn.simple_query("ROLLBACK").await.unwrap();
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    assert!(conn.is_idle());
}

#[tokio::test]
async fn extended_protocol_binds_and_reads_binary_values() {
    let mut conn = connect().await;
    let sql = "SELECT $1::int8 AS big, $2::text AS t, $3::float8 AS f, $4::bool AS b, \
               $5::int4 AS n, $6::bytea AS raw";
    let params = (-5i64, "héllo", 2.5f64, true, None::<i32>, vec![0u8, 255]);
    let rows = conn.query((sql, params)).await.unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(row.get::<_, i64>("big"), -5);
    assert_eq!(row.get::<_, &str>("t"), "héllo");
    assert_eq!(row.get::<_, f64>("f"), 2.5);
    assert!(row.get::<_, bool>("b"));
    assert_eq!(row.get::<_, Option<i32>>("n"), None);
    assert_eq!(row.get::<_, Vec<u8>>("raw"), vec![0u8, 255]);
    assert_eq!(row.columns()[0].type_(), &pgengine::Type::INT8);

    // Reading a column as the wrong type is an error, not a panic or garbage.
    let err = row.try_get::<_, i32>("t").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion);
    assert!(row.try_get::<_, i32>("no_such_column").is_err());
    assert!(row.try_get::<_, i32>(99usize).is_err());
}

#[tokio::test]
async fn wrong_parameters_fail_before_anything_runs() {
    let mut conn = connect().await;
    conn.simple_query("CREATE TEMP TABLE p (v int8)")
        .await
        .unwrap();
    // Too few and too many values.
    for params in [vec![], vec![1i64, 2]] {
        let q = pgengine::Query::new("INSERT INTO p VALUES ($1)");
        let q = params.into_iter().fold(q, |q, v| q.bind(v));
        let err = conn.execute(&q).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
        assert!(err.safe_to_retry());
    }
    // A value whose type the column cannot take: the server, which sees the type chosen for
    // the value (text), refuses the statement before running it.
    let err = conn
        .execute(("INSERT INTO p VALUES ($1)", ("text",)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::DATATYPE_MISMATCH), "{err}");
    let r = conn.simple_query("SELECT count(*) FROM p").await.unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("0"));
    assert_eq!(
        conn.execute(("INSERT INTO p VALUES ($1)", (1i64,)))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test]
async fn notices_reach_the_handler() {
    let mut conn = connect().await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    conn.set_notice_handler(move |n| {
        sink.lock()
            .unwrap()
            .push((n.code().clone(), n.message().to_owned()))
    });
    conn.simple_query("DO $$ BEGIN RAISE NOTICE 'hello %', 42; RAISE WARNING 'careful'; END $$")
        .await
        .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (SqlState::SUCCESSFUL_COMPLETION, "hello 42".to_owned()),
            (SqlState::WARNING, "careful".to_owned())
        ]
    );
}

#[tokio::test]
async fn parameter_changes_are_tracked() {
    let mut conn = connect().await;
    conn.simple_query("SET TimeZone = 'Asia/Tokyo'")
        .await
        .unwrap();
    assert_eq!(conn.parameter("TimeZone"), Some("Asia/Tokyo"));
    conn.execute("SET application_name = 'renamed'")
        .await
        .unwrap();
    assert_eq!(conn.parameter("application_name"), Some("renamed"));
}

#[tokio::test]
async fn notifications_are_kept_not_mistaken_for_results() {
    let mut listener = connect().await;
    let mut sender = connect().await;
    listener.simple_query("LISTEN pgengine_chan").await.unwrap();
    sender
        .simple_query("NOTIFY pgengine_chan, 'payload 1'")
        .await
        .unwrap();
    sender
        .execute("SELECT pg_notify('pgengine_chan', 'payload 2')")
        .await
        .unwrap();
    // The notifications arrive during the listener's next query, which still returns its rows.
    let r = listener.simple_query("SELECT 'result'").await.unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("result"));
    let got: Vec<String> = listener
        .take_notifications()
        .into_iter()
        .map(|n| n.payload)
        .collect();
    assert_eq!(got, ["payload 1", "payload 2"]);
    assert!(listener.take_notifications().is_empty());
}

#[tokio::test]
async fn terminated_backend_breaks_the_connection() {
    let mut victim = connect().await;
    let mut admin = connect().await;
    let pid = victim.process_id();
    admin
        .query(("SELECT pg_terminate_backend($1)", (pid,)))
        .await
        .unwrap();
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    assert!(
        err.is_closed() || err.code() == Some(&SqlState::ADMIN_SHUTDOWN),
        "{err}"
    );
    assert!(victim.is_broken());
    // A broken connection refuses further work with a typed error instead of hanging.
    let err = victim.simple_query("SELECT 1").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

/// The same for a cached statement, whose answer the row reader reads from its start: the
/// session's FATAL (or the closed socket) is the error, with its SQLSTATE, not a result.
#[tokio::test]
async fn terminated_backend_breaks_a_cached_statements_connection() {
    let mut victim = connect().await;
    let mut admin = connect().await;
    let ask = ("SELECT $1::int4 + 1", (1i32,));
    assert_eq!(victim.query_one(ask).await.unwrap().get::<_, i32>(0), 2);
    admin
        .query(("SELECT pg_terminate_backend($1)", (victim.process_id(),)))
        .await
        .unwrap();
    let hits = victim.stats().cache_hits;
    let err = victim.query_one(ask).await.unwrap_err();
    assert!(
        err.is_closed() || err.code() == Some(&SqlState::ADMIN_SHUTDOWN),
        "{err}"
    );
    assert_eq!(
        victim.stats().cache_hits,
        hits + 1,
        "the cached statement ran"
    );
    assert!(victim.is_broken());
    let err = victim.query_one(ask).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed);
}

#[tokio::test]
async fn dropped_query_future_is_drained_before_the_next_query() {
    let mut conn = connect().await;
    // Poll a slow query just long enough for it to be sent, then drop it.
    {
        let fut = conn.simple_query("SELECT pg_sleep(0.2), 'stale'");
        let _ = tokio::time::timeout(std::time::Duration::from_millis(20), fut).await;
    }
    // The next query gets its own answer, not the abandoned one's.
    let r = conn.simple_query("SELECT 'fresh'").await.unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("fresh"));
    let rows = conn
        .query(("SELECT $1::text", ("also fresh",)))
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, &str>(0), "also fresh");
    assert!(conn.is_idle());
}

#[tokio::test]
async fn cancel_token_cancels_a_running_query() {
    let mut conn = connect().await;
    let token = conn.cancel_token();
    assert!(!format!("{token:?}").contains("secret"));
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        token.cancel_query().await
    });
    let err = conn.simple_query("SELECT pg_sleep(30)").await.unwrap_err();
    canceller.await.unwrap().unwrap();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    // The connection is reused afterwards.
    let r = conn.simple_query("SELECT 'after cancel'").await.unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("after cancel"));
}

/// Query futures must be `Send`, or they could not be spawned on a multi-threaded runtime.
/// (This is checked when the test compiles; running it only confirms that.)
#[test]
fn query_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    async fn all(conn: &mut pgengine::Connection) {
        let owned = pgengine::Query::new("SELECT $1::int4").bind(1i32);
        let _ = conn.query(&owned).await;
        let _ = conn.query(("SELECT $1::text", ("x",))).await;
        let _ = conn.execute("SELECT 1").await;
        let _ = conn.simple_query("SELECT 1").await;
        let _ = conn.query_stream("SELECT 1").await;
    }
    let fut = async {
        let mut conn = connect().await;
        all(&mut conn).await;
    };
    assert_send(&fut);
}

/// A parameter value whose `ToSql` fails: a conversion error with that failure as its source,
/// nothing sent, and the connection as ready as before.
#[tokio::test]
async fn a_value_that_cannot_be_sent_keeps_its_cause() {
    #[derive(Debug)]
    struct Unrepresentable;
    impl std::fmt::Display for Unrepresentable {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("this value has no PostgreSQL form")
        }
    }
    impl std::error::Error for Unrepresentable {}
    #[derive(Debug)]
    struct Refuses;
    impl pgengine::ToSql for Refuses {
        fn to_sql(
            &self,
            _: &pgengine::Type,
            _: &mut bytes::BytesMut,
        ) -> Result<postgres_types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
            Err(Box::new(Unrepresentable))
        }
        fn accepts(ty: &pgengine::Type) -> bool {
            *ty == pgengine::Type::INT4
        }
        postgres_types::to_sql_checked!();
    }

    let mut conn = connect().await;
    let err = conn
        .query(("SELECT $1::int4", (Refuses,)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conversion, "{err}");
    assert!(err.safe_to_retry(), "{err}");
    let source = std::error::Error::source(&err).expect("the ToSql error is the source");
    assert!(source.is::<Unrepresentable>(), "{source:?}");
    assert_eq!(conn.transaction_status(), TransactionStatus::Idle);
    let rows = conn.query(("SELECT $1::int4", (7i32,))).await.unwrap();
    assert_eq!(rows[0].get::<_, i32>(0), 7);
}
