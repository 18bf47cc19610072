//! `query_stream` reads rows from the socket as they are pulled: a million rows pass through
//! while the process's resident memory stays far below the result's size. Alone in its own
//! test binary, so no other test's allocations blur the measurement.

mod common;

use futures::TryStreamExt;

/// The process's resident set size, from /proc (Linux).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

#[tokio::test]
async fn a_million_rows_stream_in_bounded_memory() {
    let mut conn = common::connect().await;
    // A real table, not generate_series in the query: the server materialises a set-returning
    // function's output before sending the first row, which would not test our side at all.
    conn.simple_query(
        "CREATE TEMP TABLE big AS \
         SELECT g AS id, repeat('x', 200) AS pad FROM generate_series(1, 1000000) g",
    )
    .await
    .unwrap();

    let before = rss_bytes();
    let mut peak = before;
    let mut count = 0u64;
    let mut sum = 0i64;
    let mut stream = conn.query_stream("SELECT id, pad FROM big").await.unwrap();
    while let Some(row) = stream.try_next().await.unwrap() {
        sum += i64::from(row.get::<_, i32>(0));
        assert_eq!(row.get::<_, &str>(1).len(), 200);
        count += 1;
        if count.is_multiple_of(50_000) {
            peak = peak.max(rss_bytes());
        }
    }
    drop(stream);
    assert_eq!(count, 1_000_000);
    assert_eq!(sum, 1_000_000 * 1_000_001 / 2);
    // The rows total over 200 MB on the wire; holding them would show. The bound leaves room
    // for the allocator and runtime, not for the result.
    let growth = peak.saturating_sub(before);
    assert!(
        growth < 48 << 20,
        "resident memory grew by {} MiB",
        growth >> 20
    );
    eprintln!(
        "resident memory grew by {} KiB while streaming",
        growth >> 10
    );
    assert!(conn.is_idle());
}
