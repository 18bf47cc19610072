//! LISTEN/NOTIFY against the real server: a `Listener` hearing several channels in order and
//! stopping on UNLISTEN; payloads with non-ASCII text and the longest size the server allows;
//! a listener that reconnects and re-LISTENs after `pg_terminate_backend`, a server restart,
//! or a loss noticed by `listen`, and ends only on a failure that cannot heal; and plain
//! connections that keep every notification that arrives during queries, transactions, row
//! streams and pipelines without ever taking one for a query's result.
//!
//! Every test uses channel names of its own: the tests run in parallel on one shared cluster,
//! and a NOTIFY reaches every session listening to its channel in the database. Waits are
//! bounded by `LIMIT` only so that a failing test cannot hang; nothing asserts on time.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{connect, tcp_config};
use futures::StreamExt;
use pgengine::SqlState;
use pgengine::listen::{ListenEvent, ListenOptions, Listener};
use pgengine::pool::PoolOptions;
use pgengine::testing::TempCluster;
use pgengine::{Config, Connection, ErrorKind, Notification, PostgresEngine};
use tokio::time::timeout;

/// The longest any single wait may take before the test fails.
const LIMIT: Duration = Duration::from_secs(20);

fn engine() -> PostgresEngine {
    PostgresEngine::new(tcp_config(TempCluster::SUPERUSER))
}

/// Fast reconnects, so that a test spends little time in backoff.
fn quick() -> ListenOptions {
    ListenOptions::default()
        .min_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(200))
}

/// Sends one notification, in a transaction of its own.
async fn notify(conn: &mut Connection, channel: &str, payload: &str) {
    conn.execute(("SELECT pg_notify($1, $2)", (channel, payload)))
        .await
        .unwrap_or_else(|e| panic!("NOTIFY {channel:?} failed: {e}"));
}

async fn next_event(listener: &mut Listener) -> ListenEvent {
    match timeout(LIMIT, listener.next()).await {
        Err(_) => panic!("no event within {LIMIT:?} ({listener:?})"),
        Ok(None) => panic!("the listener ended"),
        Ok(Some(Err(e))) => panic!("the listener failed: {e}"),
        Ok(Some(Ok(event))) => event,
    }
}

async fn next_notification(listener: &mut Listener) -> Notification {
    match next_event(listener).await {
        ListenEvent::Notification(n) => n,
        other => panic!("expected a notification, got {other:?}"),
    }
}

/// Waits on a plain connection for one more notification.
async fn wait_on(conn: &mut Connection) -> Notification {
    timeout(LIMIT, conn.next_notification())
        .await
        .unwrap_or_else(|_| panic!("no notification within {LIMIT:?}"))
        .unwrap_or_else(|e| panic!("waiting for a notification failed: {e}"))
}

/// Collects notifications on `conn` until one with payload `last` (included), taking what
/// is already queued first.
async fn collect_until(conn: &mut Connection, got: &mut Vec<Notification>, last: &str) {
    got.extend(conn.take_notifications());
    while !got.iter().any(|n| n.payload == last) {
        let n = wait_on(conn).await;
        got.push(n);
    }
}

/// Whether backend `pid` is gone, waiting a bounded while for it to exit.
async fn backend_gone(admin: &mut Connection, pid: i32) -> bool {
    for _ in 0..200 {
        let row = admin
            .query_one((
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                (pid,),
            ))
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

async fn terminate(admin: &mut Connection, pid: i32) {
    let row = admin
        .query_one(("SELECT pg_terminate_backend($1)", (pid,)))
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "backend {pid} was not there to end");
}

// --- the Listener -------------------------------------------------------------------------

#[tokio::test]
async fn a_listener_receives_notifications_in_order_with_channel_payload_and_sender() {
    let mut listener = engine().listen("listen_order").await.unwrap();
    let mut other = connect().await;
    for i in 0..20 {
        notify(&mut other, "listen_order", &format!("message {i}")).await;
    }
    for i in 0..20 {
        let n = next_notification(&mut listener).await;
        assert_eq!(n.channel, "listen_order");
        assert_eq!(n.payload, format!("message {i}"));
        assert_eq!(n.process_id, other.process_id());
    }
    // A NOTIFY without a payload arrives with an empty one.
    other
        .simple_query(r#"NOTIFY "listen_order""#)
        .await
        .unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "");
    listener.close().await.unwrap();
}

#[tokio::test]
async fn a_listener_hears_several_channels_and_unlisten_stops_delivery() {
    let mut listener = engine().listen("listen_multi_a").await.unwrap();
    listener.listen("listen_multi_b").await.unwrap();
    listener.listen("listen_multi_c").await.unwrap();
    assert!(
        listener
            .channels()
            .eq(["listen_multi_a", "listen_multi_b", "listen_multi_c"])
    );
    let mut other = connect().await;
    notify(&mut other, "listen_multi_b", "1").await;
    notify(&mut other, "listen_multi_a", "2").await;
    notify(&mut other, "listen_multi_c", "3").await;
    notify(&mut other, "listen_multi_unheard", "x").await;
    notify(&mut other, "listen_multi_a", "4").await;
    let got: Vec<(String, String)> = {
        let mut got = Vec::new();
        for _ in 0..4 {
            let n = next_notification(&mut listener).await;
            got.push((n.channel, n.payload));
        }
        got
    };
    let expected = [
        ("listen_multi_b", "1"),
        ("listen_multi_a", "2"),
        ("listen_multi_c", "3"),
        ("listen_multi_a", "4"),
    ];
    assert_eq!(
        got,
        expected.map(|(c, p)| (c.to_owned(), p.to_owned())),
        "in commit order, and nothing from a channel not listened to"
    );

    listener.unlisten("listen_multi_b").await.unwrap();
    assert!(listener.channels().eq(["listen_multi_a", "listen_multi_c"]));
    // Notifications arrive in commit order: had the first been delivered, it would come
    // before the second.
    notify(&mut other, "listen_multi_b", "after unlisten").await;
    notify(&mut other, "listen_multi_c", "marker").await;
    let n = next_notification(&mut listener).await;
    assert_eq!(
        (n.channel.as_str(), n.payload.as_str()),
        ("listen_multi_c", "marker")
    );
}

#[tokio::test]
async fn channel_names_are_taken_exactly_as_given() {
    // Mixed case, a space, a double quote and non-ASCII letters: quoted as an identifier, the
    // name is the one pg_notify() uses, not folded to lower case nor able to break the SQL.
    let odd = "Listen \"Grüße\" Ω";
    let mut listener = engine().listen(odd).await.unwrap();
    listener.listen("listen_case").await.unwrap();
    let mut other = connect().await;
    notify(&mut other, "listen_CASE", "other case: not ours").await;
    notify(&mut other, odd, "odd").await;
    notify(&mut other, "listen_case", "lower").await;
    let n = next_notification(&mut listener).await;
    assert_eq!((n.channel.as_str(), n.payload.as_str()), (odd, "odd"));
    let n = next_notification(&mut listener).await;
    assert_eq!(
        (n.channel.as_str(), n.payload.as_str()),
        ("listen_case", "lower")
    );
}

#[tokio::test]
async fn payloads_keep_non_ascii_text_up_to_the_longest_size_allowed() {
    let mut listener = engine().listen("listen_payload").await.unwrap();
    let mut other = connect().await;
    let text = "Grüße, 世界! 🎉 \"quoted\" 'single' \\ back\nnew line\ttab";
    notify(&mut other, "listen_payload", text).await;
    // The NOTIFY command's docs: the payload "must be shorter than 8000 bytes" — 7999 bytes
    // is the most, here mostly 2-, 3- and 4-byte UTF-8 characters.
    let mut longest = String::new();
    while longest.len() + "ü€😀".len() <= 7999 {
        longest.push_str("ü€😀");
    }
    while longest.len() < 7999 {
        longest.push('x');
    }
    assert_eq!(longest.len(), 7999);
    notify(&mut other, "listen_payload", &longest).await;
    // One byte more is refused by the server (22023 invalid_parameter_value), and the
    // notifying connection stays usable.
    let too_long = format!("{longest}y");
    let err = other
        .execute(("SELECT pg_notify($1, $2)", ("listen_payload", too_long)))
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_PARAMETER_VALUE),
        "{err}"
    );
    notify(&mut other, "listen_payload", "after").await;

    assert_eq!(next_notification(&mut listener).await.payload, text);
    let n = next_notification(&mut listener).await;
    assert_eq!(n.payload.len(), 7999);
    assert_eq!(n.payload, longest);
    assert_eq!(next_notification(&mut listener).await.payload, "after");
}

#[tokio::test]
async fn a_terminated_listener_reconnects_listens_again_and_says_so() {
    let mut listener = engine()
        .listen_with("listen_kill_a", quick())
        .await
        .unwrap();
    listener.listen("listen_kill_b").await.unwrap();
    let mut other = connect().await;
    notify(&mut other, "listen_kill_a", "before").await;
    assert_eq!(next_notification(&mut listener).await.payload, "before");

    let first = listener.process_id().expect("listening");
    terminate(&mut other, first).await;
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    let second = listener.process_id().expect("listening again");
    assert_ne!(first, second, "a new session");

    // `Reconnected` comes after the new session's LISTENs: anything sent now is heard, on
    // every channel.
    notify(&mut other, "listen_kill_b", "after b").await;
    notify(&mut other, "listen_kill_a", "after a").await;
    let n = next_notification(&mut listener).await;
    assert_eq!(
        (n.channel.as_str(), n.payload.as_str()),
        ("listen_kill_b", "after b")
    );
    let n = next_notification(&mut listener).await;
    assert_eq!(
        (n.channel.as_str(), n.payload.as_str(), n.process_id),
        ("listen_kill_a", "after a", other.process_id())
    );

    // And again: the listener keeps healing.
    terminate(&mut other, second).await;
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    notify(&mut other, "listen_kill_a", "third session").await;
    assert_eq!(
        next_notification(&mut listener).await.payload,
        "third session"
    );
}

#[tokio::test]
async fn notifications_received_before_a_loss_come_before_reconnected() {
    let mut listener = engine()
        .listen_with("listen_before_loss", quick())
        .await
        .unwrap();
    let mut other = connect().await;
    let pid = listener.process_id().unwrap();
    // One transaction: the listening session sends both notifications together, so once
    // the first is here the second is already on its way, ahead of the FATAL goodbye.
    other
        .simple_query(
            "BEGIN; SELECT pg_notify('listen_before_loss', 'one'); \
             SELECT pg_notify('listen_before_loss', 'two'); COMMIT",
        )
        .await
        .unwrap();
    assert_eq!(next_notification(&mut listener).await.payload, "one");
    terminate(&mut other, pid).await;
    assert_eq!(next_notification(&mut listener).await.payload, "two");
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    notify(&mut other, "listen_before_loss", "three").await;
    assert_eq!(next_notification(&mut listener).await.payload, "three");
}

#[tokio::test]
async fn a_listener_survives_a_server_restart() {
    let private = Arc::new(TempCluster::start().expect("a private cluster starts"));
    let config = Config::parse(&private.url(TempCluster::SUPERUSER)).unwrap();
    let engine = PostgresEngine::new(config.clone());
    let mut listener = engine.listen_with("listen_restart", quick()).await.unwrap();
    let mut other = Connection::connect(&config).await.unwrap();
    notify(&mut other, "listen_restart", "before").await;
    assert_eq!(next_notification(&mut listener).await.payload, "before");

    // The restart runs while the stream is being polled: the listener sees its connection
    // closed, then retries while the server is down and starting up.
    let restarting = {
        let private = private.clone();
        tokio::task::spawn_blocking(move || private.restart())
    };
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    restarting.await.unwrap().expect("the cluster restarts");

    let mut other = Connection::connect(&config).await.unwrap();
    notify(&mut other, "listen_restart", "after").await;
    let n = next_notification(&mut listener).await;
    assert_eq!(
        (n.payload.as_str(), n.process_id),
        ("after", other.process_id())
    );
    listener.close().await.unwrap();
}

#[tokio::test]
async fn listen_after_an_unnoticed_loss_reconnects_and_reconnected_comes_first() {
    let mut listener = engine()
        .listen_with("listen_unnoticed_a", quick())
        .await
        .unwrap();
    let mut other = connect().await;
    let pid = listener.process_id().unwrap();
    terminate(&mut other, pid).await;
    assert!(backend_gone(&mut other, pid).await);
    // The stream was not polled: `listen` is what finds the connection gone. It reconnects,
    // and the new session listens to both channels.
    listener.listen("listen_unnoticed_b").await.unwrap();
    assert!(
        listener
            .channels()
            .eq(["listen_unnoticed_a", "listen_unnoticed_b"])
    );
    notify(&mut other, "listen_unnoticed_b", "b").await;
    notify(&mut other, "listen_unnoticed_a", "a").await;
    assert_eq!(next_event(&mut listener).await, ListenEvent::Reconnected);
    assert_eq!(next_notification(&mut listener).await.payload, "b");
    assert_eq!(next_notification(&mut listener).await.payload, "a");
}

#[tokio::test]
async fn a_dropped_listen_call_is_finished_by_the_next_call() {
    let mut listener = engine().listen("listen_dropped_a").await.unwrap();
    {
        let call = listener.listen("listen_dropped_b");
        futures::pin_mut!(call);
        // Sends the LISTEN and waits for the answer: dropped right there.
        let _ = futures::poll!(call.as_mut());
    }
    listener.listen("listen_dropped_c").await.unwrap();
    assert!(
        listener
            .channels()
            .eq(["listen_dropped_a", "listen_dropped_b", "listen_dropped_c"])
    );
    let mut other = connect().await;
    notify(&mut other, "listen_dropped_b", "b").await;
    notify(&mut other, "listen_dropped_c", "c").await;
    assert_eq!(next_notification(&mut listener).await.payload, "b");
    assert_eq!(next_notification(&mut listener).await.payload, "c");

    // A dropped call followed by polling the stream: the stream finishes it.
    {
        let call = listener.unlisten("listen_dropped_b");
        futures::pin_mut!(call);
        let _ = futures::poll!(call.as_mut());
    }
    notify(&mut other, "listen_dropped_a", "a").await;
    assert_eq!(next_notification(&mut listener).await.payload, "a");
    assert!(
        listener
            .channels()
            .eq(["listen_dropped_a", "listen_dropped_c"])
    );
}

#[tokio::test]
async fn opening_a_listener_reports_failures_at_once() {
    // No retrying here: a first connection that fails says the settings are wrong.
    let err = engine().listen("").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
    let mut config = tcp_config(TempCluster::SUPERUSER);
    config.dbname("listen_no_such_db");
    let err = PostgresEngine::new(config)
        .listen("listen_no_db")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_DATABASE), "{err}");
}

#[tokio::test]
async fn a_refused_listen_leaves_the_listener_working() {
    let mut listener = engine().listen("listen_refused").await.unwrap();
    // A zero-length identifier is a syntax error on the server.
    let err = listener.listen("").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::SYNTAX_ERROR), "{err}");
    assert!(listener.channels().eq(["listen_refused"]));
    let mut other = connect().await;
    notify(&mut other, "listen_refused", "still here").await;
    assert_eq!(next_notification(&mut listener).await.payload, "still here");
}

#[tokio::test]
async fn a_listener_whose_database_is_dropped_ends_with_the_error() {
    let mut admin = connect().await;
    admin
        .simple_query("DROP DATABASE IF EXISTS listen_gone_db")
        .await
        .unwrap();
    admin
        .simple_query("CREATE DATABASE listen_gone_db")
        .await
        .unwrap();
    let mut config = tcp_config(TempCluster::SUPERUSER);
    config.dbname("listen_gone_db");
    let mut listener = PostgresEngine::new(config)
        .listen_with("listen_gone", quick())
        .await
        .unwrap();
    // FORCE ends the listener's session first; its reconnect then finds no database, which
    // waiting cannot cure.
    admin
        .simple_query("DROP DATABASE listen_gone_db WITH (FORCE)")
        .await
        .unwrap();
    let end = timeout(LIMIT, listener.next()).await.expect("an answer");
    let err = match end {
        Some(Err(e)) => e,
        other => panic!("expected the error that ended the listener, got {other:?}"),
    };
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_DATABASE), "{err}");
    assert!(timeout(LIMIT, listener.next()).await.unwrap().is_none());
    assert!(futures::stream::FusedStream::is_terminated(&listener));
    let err = listener.listen("listen_gone_2").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
}

#[tokio::test]
async fn closing_or_dropping_a_listener_ends_its_session_and_it_is_not_from_the_pool() {
    let engine = engine();
    engine
        .start_connection_pool(PoolOptions::default().max_size(2))
        .await
        .unwrap();
    engine.query_one("SELECT 1").await.unwrap();
    let before = engine.pool_stats().expect("a pool runs");
    let listener = engine.listen("listen_close").await.unwrap();
    let after = engine.pool_stats().unwrap();
    assert_eq!(
        (after.opened, after.acquired),
        (before.opened, before.acquired),
        "the listener's connection is its own"
    );
    let mut admin = connect().await;
    let pid = listener.process_id().unwrap();
    listener.close().await.unwrap();
    assert!(
        backend_gone(&mut admin, pid).await,
        "close ends the session"
    );

    let listener = engine.listen("listen_close").await.unwrap();
    let pid = listener.process_id().unwrap();
    drop(listener);
    assert!(backend_gone(&mut admin, pid).await, "drop ends the session");
    engine.close_connection_pool().await.unwrap();
}

// --- plain connections --------------------------------------------------------------------

#[tokio::test]
async fn next_notification_returns_queued_ones_first_and_is_cancel_safe() {
    let mut conn = connect().await;
    conn.simple_query(r#"LISTEN "listen_conn_queue""#)
        .await
        .unwrap();
    // The session's own NOTIFYs are delivered when each transaction ends, before its
    // ReadyForQuery: they are queued by the time the query returns, never its result.
    let row = conn
        .query_one((
            "SELECT pg_notify($1, 'one'), 41 + 1 AS answer",
            ("listen_conn_queue",),
        ))
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>("answer"), 42);
    notify(&mut conn, "listen_conn_queue", "two").await;

    assert_eq!(wait_on(&mut conn).await.payload, "one");
    assert_eq!(wait_on(&mut conn).await.payload, "two");
    // Waits that are given up lose nothing.
    for _ in 0..20 {
        let gave_up = timeout(Duration::from_millis(5), conn.next_notification()).await;
        assert!(gave_up.is_err(), "nothing was sent: {gave_up:?}");
    }
    let mut other = connect().await;
    notify(&mut other, "listen_conn_queue", "three").await;
    let n = wait_on(&mut conn).await;
    assert_eq!(
        (n.payload.as_str(), n.process_id),
        ("three", other.process_id())
    );
    // The connection is as usable as before.
    let row = conn.query_one(("SELECT $1::text", ("ok",))).await.unwrap();
    assert_eq!(row.get::<_, String>(0), "ok");
    assert!(conn.is_idle());
}

#[tokio::test]
async fn next_notification_refuses_a_busy_connection_but_hands_out_what_is_queued() {
    let mut conn = connect().await;
    conn.simple_query(r#"LISTEN "listen_conn_busy""#)
        .await
        .unwrap();
    conn.simple_query("BEGIN; SELECT pg_notify('listen_conn_busy', 'queued'); COMMIT")
        .await
        .unwrap();

    conn.simple_query("BEGIN").await.unwrap();
    // Already received: handed out even inside a transaction.
    assert_eq!(wait_on(&mut conn).await.payload, "queued");
    // Nothing more can arrive until the transaction ends: refused, not a wait forever.
    let err = conn.next_notification().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    assert!(!conn.is_broken());
    conn.simple_query("COMMIT").await.unwrap();

    // A request whose future was dropped still owes its responses.
    {
        let query = conn.execute("SELECT pg_sleep(0.2)");
        futures::pin_mut!(query);
        let _ = futures::poll!(query.as_mut());
    }
    assert!(conn.is_busy());
    let err = conn.next_notification().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Busy, "{err}");
    conn.reset().await.unwrap();

    let mut other = connect().await;
    notify(&mut other, "listen_conn_busy", "after reset").await;
    assert_eq!(wait_on(&mut conn).await.payload, "after reset");
}

#[tokio::test]
async fn next_notification_fails_and_breaks_the_connection_when_its_session_ends() {
    let mut conn = connect().await;
    conn.simple_query(r#"LISTEN "listen_conn_end""#)
        .await
        .unwrap();
    let mut admin = connect().await;
    terminate(&mut admin, conn.process_id()).await;
    let err = timeout(LIMIT, conn.next_notification())
        .await
        .expect("an answer")
        .unwrap_err();
    // The FATAL 57P01 goodbye, or the closed socket if that is read first.
    assert!(
        err.code() == Some(&SqlState::ADMIN_SHUTDOWN) || err.is_closed(),
        "{err}"
    );
    assert!(conn.is_broken());
    let err = conn.next_notification().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
}

#[tokio::test]
async fn a_connection_running_many_queries_loses_no_notification() {
    const SENT: usize = 300;
    let mut conn = connect().await;
    conn.simple_query(r#"LISTEN "listen_busy_conn""#)
        .await
        .unwrap();
    let notifier = tokio::spawn(async {
        let mut other = connect().await;
        for i in 0..SENT {
            notify(&mut other, "listen_busy_conn", &i.to_string()).await;
        }
        notify(&mut other, "listen_busy_conn", "done").await;
        other.process_id()
    });

    let mut got = Vec::new();
    let mut round = 0i32;
    while !notifier.is_finished() || round < 100 {
        // The extended protocol, one row.
        let row = conn
            .query_one(("SELECT $1::int * 2", (round,)))
            .await
            .unwrap();
        assert_eq!(row.get::<_, i32>(0), round * 2);
        // The simple protocol, several statements.
        let results = conn
            .simple_query(&format!("SELECT {round}; SELECT 'r{round}'"))
            .await
            .unwrap();
        assert_eq!(results.len(), 2);
        assert_eq!(
            results[0].rows()[0].get(0),
            Some(round.to_string().as_str())
        );
        assert_eq!(
            results[1].rows()[0].get(0),
            Some(format!("r{round}").as_str())
        );
        // Many rows through a portal.
        let rows = conn
            .query(("SELECT g FROM generate_series(1, $1) g", (50,)))
            .await
            .unwrap();
        assert_eq!(
            rows.iter().map(|r| r.get::<_, i32>(0)).collect::<Vec<_>>(),
            (1..=50).collect::<Vec<_>>()
        );
        // A transaction: notifications wait for its end and then come like the rest.
        if round % 10 == 0 {
            conn.simple_query("BEGIN").await.unwrap();
            let n = conn.execute(("SELECT $1::int", (round,))).await.unwrap();
            assert_eq!(n, 1);
            conn.simple_query("COMMIT").await.unwrap();
        }
        got.extend(conn.take_notifications());
        round += 1;
    }
    let sender = notifier.await.unwrap();
    collect_until(&mut conn, &mut got, "done").await;

    let payloads: Vec<String> = got.iter().map(|n| n.payload.clone()).collect();
    let mut expected: Vec<String> = (0..SENT).map(|i| i.to_string()).collect();
    expected.push("done".to_owned());
    assert_eq!(payloads.len(), SENT + 1, "each notification exactly once");
    assert_eq!(payloads, expected, "none lost, none repeated, in order");
    assert!(
        got.iter()
            .all(|n| n.process_id == sender && n.channel == "listen_busy_conn")
    );
    eprintln!("{round} rounds of queries while {SENT} notifications arrived");
}

#[tokio::test]
async fn notifications_during_a_row_stream_and_a_transaction_are_kept_for_later() {
    let mut conn = connect().await;
    conn.simple_query(r#"LISTEN "listen_stream""#)
        .await
        .unwrap();
    // Each row notifies: the five notifications come after the statement's transaction, in
    // the middle of the extended protocol's responses, not as rows.
    let mut stream = conn
        .query_stream((
            "SELECT g, pg_notify('listen_stream', 'row ' || g) FROM generate_series(1, $1) g",
            (5,),
        ))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let Some(row) = stream.next().await {
        seen.push(row.unwrap().get::<_, i32>(0));
    }
    drop(stream);
    assert_eq!(seen, [1, 2, 3, 4, 5]);
    let mut got = Vec::new();
    collect_until(&mut conn, &mut got, "row 5").await;
    assert_eq!(
        got.iter().map(|n| n.payload.as_str()).collect::<Vec<_>>(),
        ["row 1", "row 2", "row 3", "row 4", "row 5"]
    );
    assert!(got.iter().all(|n| n.process_id == conn.process_id()));

    // Another session's NOTIFY committed while this one is inside a transaction is held by
    // the server until the transaction ends.
    conn.simple_query("BEGIN").await.unwrap();
    let mut other = connect().await;
    notify(&mut other, "listen_stream", "held").await;
    for i in 0..5 {
        let row = conn.query_one(("SELECT $1::int", (i,))).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i);
    }
    conn.simple_query("COMMIT").await.unwrap();
    let mut got = Vec::new();
    collect_until(&mut conn, &mut got, "held").await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].process_id, other.process_id());
}

#[tokio::test]
async fn notifications_on_a_pipelined_pool_connection_are_not_query_results() {
    const SENT: usize = 200;
    const TASKS: i32 = 8;
    const PER_TASK: i32 = 60;
    // One pooled connection carries every pipelined query, and it is the one that LISTENs:
    // kept listening when it goes back to the pool between batches.
    let engine = PostgresEngine::builder(tcp_config(TempCluster::SUPERUSER))
        .reset_session(false)
        .build();
    engine
        .start_connection_pool(
            PoolOptions::default()
                .max_size(1)
                .pipeline(1)
                .acquire_timeout(LIMIT),
        )
        .await
        .unwrap();
    let listening = {
        let mut conn = engine.acquire().await.unwrap();
        conn.simple_query(r#"LISTEN "listen_pipe""#).await.unwrap();
        conn.process_id()
    };

    let notifier = tokio::spawn(async {
        let mut other = connect().await;
        for i in 0..SENT {
            notify(&mut other, "listen_pipe", &i.to_string()).await;
        }
        notify(&mut other, "listen_pipe", "done").await;
        other.process_id()
    });
    let workers: Vec<_> = (0..TASKS)
        .map(|t| {
            let engine = engine.clone();
            tokio::spawn(async move {
                for j in 0..PER_TASK {
                    let v = t * 1000 + j;
                    if j % 4 == 0 {
                        // A query that notifies its own session: the notification comes
                        // between this query's responses and the next query's, inside
                        // one pipelined write's answers.
                        let rows = engine
                            .query((
                                "SELECT pg_notify('listen_pipe', $1), $2::int",
                                (format!("self {v}"), v),
                            ))
                            .await
                            .unwrap();
                        assert_eq!(rows.len(), 1);
                        assert_eq!(rows[0].get::<_, i32>(1), v);
                    } else {
                        let row = engine
                            .query_one(("SELECT $1::int, $2::text", (v, format!("t{v}"))))
                            .await
                            .unwrap();
                        assert_eq!(row.get::<_, i32>(0), v);
                        assert_eq!(row.get::<_, String>(1), format!("t{v}"));
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    let sender = notifier.await.unwrap();

    let mut conn = engine.acquire().await.unwrap();
    assert_eq!(
        conn.process_id(),
        listening,
        "still the listening connection"
    );
    let mut got = Vec::new();
    collect_until(&mut conn, &mut got, "done").await;
    drop(conn);

    let from_other: Vec<&str> = got
        .iter()
        .filter(|n| n.process_id == sender)
        .map(|n| n.payload.as_str())
        .collect();
    let mut expected: Vec<String> = (0..SENT).map(|i| i.to_string()).collect();
    expected.push("done".to_owned());
    assert_eq!(from_other, expected, "none lost, none repeated, in order");
    let from_self: BTreeSet<&str> = got
        .iter()
        .filter(|n| n.process_id == listening)
        .map(|n| n.payload.as_str())
        .collect();
    let expected_self: BTreeSet<String> = (0..TASKS)
        .flat_map(|t| {
            (0..PER_TASK)
                .filter(|j| j % 4 == 0)
                .map(move |j| t * 1000 + j)
        })
        .map(|v| format!("self {v}"))
        .collect();
    assert_eq!(
        from_self,
        expected_self
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>()
    );
    assert_eq!(
        got.len(),
        SENT + 1 + expected_self.len(),
        "each notification exactly once"
    );
    engine.close_connection_pool().await.unwrap();
}
