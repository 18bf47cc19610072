//! Replica reads that are fresh enough, on a real streaming standby whose replay is paused
//! (`pg_wal_replay_pause()`) and resumed: read-your-writes waits for the standby or goes to
//! the primary, bounded lag sends reads to the primary while the standby lags, and a node
//! without a rule reads whatever the standby has.

use std::time::{Duration, Instant};

use pgengine::freshness::{Fallback, Freshness};
use pgengine::testing::TempCluster;
use pgengine::{Config, ErrorKind, PostgresEngine};

fn config(cluster: &TempCluster) -> Config {
    Config::parse(&format!(
        "{} connect_timeout=10",
        cluster.socket_conninfo(TempCluster::SUPERUSER)
    ))
    .unwrap()
}

/// The row count a read sees, and the port of the server that answered it.
async fn read(engine: &PostgresEngine) -> pgengine::Result<(i64, u16)> {
    let row = engine
        .query_one("SELECT count(*), current_setting('port')::int4 FROM fresh")
        .await?;
    Ok((row.get(0), row.get::<_, i32>(1) as u16))
}

/// Polls until `check` holds, for at most 30 s.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let started = Instant::now();
    while !check().await {
        assert!(started.elapsed() < Duration::from_secs(30), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn reads_through_a_node_are_as_fresh_as_its_rule_says() {
    tokio::time::timeout(Duration::from_secs(300), scenario())
        .await
        .expect("the scenario finished within 300 s");
}

async fn scenario() {
    let (primary, standby) = tokio::task::spawn_blocking(|| {
        let primary = TempCluster::start().expect("primary starts");
        let standby = primary.standby().expect("standby starts");
        (primary, standby)
    })
    .await
    .unwrap();
    let (primary_port, standby_port) = (primary.port(), standby.port());
    let build = |freshness: Freshness| {
        PostgresEngine::builder(config(&primary))
            .extra_node_with("replica", PostgresEngine::new(config(&standby)), freshness)
            .build()
    };
    let wait = Duration::from_millis(300);
    let engine = build(Freshness::read_your_writes(wait));
    let strict = build(Freshness::read_your_writes(wait).otherwise(Fallback::Error));
    let bounded = build(Freshness::max_lag(Duration::from_millis(200)));
    let plain = build(Freshness::any());
    let node = engine.node("replica").unwrap();

    engine.run_ddl("CREATE TABLE fresh (v int)").await.unwrap();
    eventually("the table replays", async || {
        plain
            .node("replica")
            .unwrap()
            .query("SELECT 1 FROM fresh")
            .await
            .is_ok()
    })
    .await;

    // Replay running: an autocommit write is read back from the standby.
    engine
        .execute("INSERT INTO fresh VALUES (1)")
        .await
        .unwrap();
    assert_eq!(read(&node).await.unwrap(), (1, standby_port));

    // Replay paused: a committed transaction cannot be seen on the standby, so after the wait
    // the read goes to the primary — and sees it.
    standby.psql("SELECT pg_wal_replay_pause()").unwrap();
    engine
        .transaction()
        .run(|tx| async move { tx.execute("INSERT INTO fresh VALUES (2)").await })
        .await
        .unwrap();
    assert_eq!(read(&node).await.unwrap(), (2, primary_port));
    // An Atomic's commit too.
    let mut atomic = engine.atomic();
    atomic.add("INSERT INTO fresh VALUES (3)");
    atomic.await.unwrap();
    assert_eq!(read(&node).await.unwrap(), (3, primary_port));
    // A stream through the node follows the same rule.
    {
        use futures::TryStreamExt;
        let rows: Vec<pgengine::Row> = node
            .query_stream("SELECT v FROM fresh")
            .await
            .unwrap()
            .try_collect()
            .await
            .unwrap();
        assert_eq!(rows.len(), 3);
    }
    // Told to fail instead: a timeout, and nothing sent to the primary.
    strict
        .execute("INSERT INTO fresh VALUES (4)")
        .await
        .unwrap();
    let err = read(&strict.node("replica").unwrap()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    // Without a rule the standby answers with what it has: stale.
    assert_eq!(
        read(&plain.node("replica").unwrap()).await.unwrap(),
        (1, standby_port)
    );
    // Bounded lag: the standby has not replayed for a while, so the primary answers.
    tokio::time::sleep(Duration::from_millis(300)).await;
    bounded
        .execute("INSERT INTO fresh VALUES (5)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        read(&bounded.node("replica").unwrap()).await.unwrap(),
        (5, primary_port)
    );

    // Replay resumed: the standby catches up and answers again, with everything.
    standby.psql("SELECT pg_wal_replay_resume()").unwrap();
    assert_eq!(read(&node).await.unwrap(), (5, standby_port));
    let bounded_node = bounded.node("replica").unwrap();
    eventually("the standby's lag is under the bound again", async || {
        read(&bounded_node).await.unwrap().1 == standby_port
    })
    .await;
    assert_eq!(read(&bounded_node).await.unwrap().0, 5);
}
