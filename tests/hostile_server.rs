//! A hostile server: the scripted server of `mock` sends what no honest PostgreSQL would —
//! absurd length prefixes, truncated or unknown messages, rows that do not match their
//! description, authentication it cannot finish — or simply stops answering.
//!
//! Each case checks what a caller relies on: the error is typed (`kind()`, a SQLSTATE, or a
//! message naming the problem), it comes in bounded time (every call runs under a 10 s hang
//! detector — not a timing assertion, a guard that turns a hang into a failure), the connection
//! is marked broken when the byte stream can no longer be trusted, and memory stays bounded
//! when a length prefix promises a huge message. No real server is needed.

mod mock;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use pgengine::SqlState;
use pgengine::error::Severity;
use pgengine::protocol::{Authentication, BackendMessage, FrontendMessage};
use pgengine::{Config, Connection, Error, ErrorKind, TransactionStatus};

use mock::{
    Kind, MockServer, Step, auth, command_complete, encode, error_response, error_response_fields,
    extended_query_start, framed, header, int4_columns, int4_row, md5_request, notice, parameter,
    ready, reply_server_first, sasl_request, script, simple_query_start, text_columns, text_row,
    trust_login,
};

/// The hang detector's limit: far above anything these tests need.
const HANG: Duration = Duration::from_secs(10);

/// Runs `fut` under the hang detector.
async fn guard<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(HANG, fut).await {
        Ok(v) => v,
        Err(_) => panic!("hang: {what} did not finish within {HANG:?}"),
    }
}

async fn connect(config: &Config) -> Connection {
    guard("connect", Connection::connect(config))
        .await
        .expect("the scripted login succeeds")
}

async fn connect_err(config: &Config) -> Error {
    guard("connect", Connection::connect(config))
        .await
        .expect_err("connect must fail against this script")
}

#[track_caller]
fn assert_error(err: &Error, kind: ErrorKind, fragment: &str) {
    assert_eq!(err.kind(), kind, "wrong kind of error: {err}");
    assert!(
        err.to_string().contains(fragment),
        "the error should mention {fragment:?}: {err}"
    );
}

/// The connection must say it is broken and refuse the next request at once, without reading
/// from a stream it can no longer trust.
async fn assert_broken(conn: &mut Connection) {
    assert!(
        conn.is_broken(),
        "the connection should be broken: {conn:?}"
    );
    assert!(!conn.is_idle());
    let err = guard(
        "a query on a broken connection",
        conn.simple_query("SELECT 1"),
    )
    .await
    .expect_err("a broken connection refuses queries");
    assert_eq!(err.kind(), ErrorKind::Closed, "{err}");
}

// ---- Memory ---------------------------------------------------------------------------------

/// Tests that measure the process's memory run one at a time, so they do not see each other.
static MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A field of /proc/self/status, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Samples the process's memory on a thread of its own and keeps the peaks: a buffer that is
/// allocated and freed again while the client fails would not show in a reading taken after.
struct MemoryWatch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(u64, u64)>,
    rss: u64,
    size: u64,
}

/// How much the process grew while watched, in MiB.
#[derive(Debug)]
struct Growth {
    /// Resident memory (VmRSS): pages actually touched.
    rss: u64,
    /// Address space (VmSize): also counts memory reserved but not touched yet, which is how a
    /// `reserve(len)` of the promised length would show.
    size: u64,
}

impl MemoryWatch {
    fn start() -> MemoryWatch {
        let rss = status_kib("VmRSS");
        let size = status_kib("VmSize");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut peak_rss, mut peak_size) = (0, 0);
            loop {
                peak_rss = peak_rss.max(status_kib("VmRSS"));
                peak_size = peak_size.max(status_kib("VmSize"));
                if flag.load(Ordering::Relaxed) {
                    return (peak_rss, peak_size);
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        MemoryWatch {
            stop,
            thread,
            rss,
            size,
        }
    }

    fn stop(self) -> Growth {
        self.stop.store(true, Ordering::Relaxed);
        let (rss, size) = self.thread.join().expect("the memory sampler runs");
        Growth {
            rss: rss.saturating_sub(self.rss) / 1024,
            size: size.saturating_sub(self.size) / 1024,
        }
    }
}

/// Generous limits: far below the 1 GiB a hostile length prefix asks for, far above the noise
/// of other tests running in the same process.
#[track_caller]
fn assert_bounded(growth: &Growth) {
    assert!(
        growth.rss < 64,
        "resident memory grew by {} MiB: the length prefix was trusted",
        growth.rss
    );
    assert!(
        growth.size < 512,
        "address space grew by {} MiB: the promised length was reserved",
        growth.size
    );
}

// ---- The scripted server itself -------------------------------------------------------------

/// The happy path first, so that a failure below is the client's and not the script's.
#[tokio::test]
async fn scripted_login_and_query_work() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("hello")])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    assert_eq!(conn.process_id(), mock::PROCESS_ID);
    assert_eq!(conn.parameter("server_version"), Some("16.4"));
    let results = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .unwrap();
    assert_eq!(results[0].rows()[0].get("s"), Some("hello"));
    guard("close", conn.close()).await.unwrap();
    let t = server.finish().await;
    assert_eq!(t.kinds(), [Kind::Startup, Kind::Query, Kind::Terminate]);
    let FrontendMessage::Query(sql) = &t.messages[1] else {
        unreachable!()
    };
    assert_eq!(sql, "SELECT s");
}

// ---- Length prefixes ------------------------------------------------------------------------

#[tokio::test]
async fn length_prefix_of_2_pow_31_minus_1_during_startup() {
    let _one_at_a_time = MEMORY.lock().await;
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::SendRaw(header(b'R', i32::MAX)),
    ])
    .await;
    let watch = MemoryWatch::start();
    let err = connect_err(&server.config()).await;
    let growth = watch.stop();
    assert_error(&err, ErrorKind::Protocol, "exceeds the limit");
    assert_bounded(&growth);
    server.finish().await;
}

#[tokio::test]
async fn length_prefix_of_2_pow_31_minus_1_between_rows() {
    let _one_at_a_time = MEMORY.lock().await;
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::SendRaw(header(b'D', i32::MAX)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let watch = MemoryWatch::start();
    {
        let mut rows = guard("query_stream", conn.query_stream("SELECT n"))
            .await
            .expect("the query starts");
        let first = guard("the first row", rows.try_next()).await;
        assert_eq!(
            first
                .expect("row 1 is fine")
                .expect("a row")
                .get::<_, i32>(0),
            1
        );
        let err = guard("the second row", rows.try_next())
            .await
            .expect_err("the second row's length is absurd");
        assert_error(&err, ErrorKind::Protocol, "exceeds the limit");
    }
    let growth = watch.stop();
    assert_bounded(&growth);
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn length_prefix_just_under_1_gib_then_a_trickle_then_eof() {
    let _one_at_a_time = MEMORY.lock().await;
    // 4 MiB of the promised 1 GiB arrive, in 64 KiB pieces, before the server hangs up.
    let mut trickle = vec![
        Step::Send(int4_row(&[1])),
        Step::SendRaw(header(b'D', (1 << 30) - 1)),
    ];
    for _ in 0..64 {
        trickle.push(Step::SendRaw(vec![0x5a; 64 * 1024]));
        trickle.push(Step::Sleep(Duration::from_millis(1)));
    }
    trickle.push(Step::Close);
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        trickle,
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let watch = MemoryWatch::start();
    let err = guard("query", conn.query("SELECT n"))
        .await
        .expect_err("the connection ends in the middle of a message");
    let growth = watch.stop();
    assert_error(&err, ErrorKind::Closed, "in the middle of a message");
    assert_bounded(&growth);
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

// ---- Truncation and closed sockets ----------------------------------------------------------

#[tokio::test]
async fn truncated_message_then_eof_during_startup() {
    let md5 = encode(&auth(Authentication::Md5Password { salt: *b"abcd" }));
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::SendRaw(md5[..md5.len() - 3].to_vec()),
        Step::Close,
    ])
    .await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Closed, "in the middle of a message");
    server.finish().await;
}

#[tokio::test]
async fn truncated_row_then_eof_mid_query() {
    let row = encode(&text_row(&[Some("second")]));
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("first")])),
            Step::SendRaw(row[..row.len() / 2].to_vec()),
            Step::Close,
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .expect_err("the server hung up in the middle of a row");
    assert_error(&err, ErrorKind::Closed, "in the middle of a message");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn server_closes_right_after_the_startup_packet() {
    let server = MockServer::start(vec![Step::Expect(Kind::Startup), Step::Close]).await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Closed, "closed the connection");
    server.finish().await;
}

#[tokio::test]
async fn server_closes_between_rows() {
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![Step::Send(int4_row(&[1])), Step::Close],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let mut rows = guard("query_stream", conn.query_stream("SELECT n"))
        .await
        .expect("the query starts");
    let first = guard("the first row", rows.try_next()).await;
    assert_eq!(first.expect("row 1").expect("a row").get::<_, i32>(0), 1);
    let err = guard("the second row", rows.try_next())
        .await
        .expect_err("the server hung up");
    assert_error(&err, ErrorKind::Closed, "closed the connection");
    drop(rows);
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

// ---- Malformed messages ---------------------------------------------------------------------

#[tokio::test]
async fn unknown_message_type_during_startup() {
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::SendRaw(framed(b'@', b"what is this")),
    ])
    .await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Protocol, "unknown message type");
    server.finish().await;
}

#[tokio::test]
async fn unknown_message_type_mid_query() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("a")])),
            Step::SendRaw(framed(b'@', b"what is this")),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .expect_err("the message type is unknown");
    assert_error(&err, ErrorKind::Protocol, "unknown message type");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn data_row_with_more_columns_than_row_description_simple() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["only"])),
        vec![
            Step::Send(text_row(&[Some("a"), Some("b")])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SELECT only"))
        .await
        .expect_err("the row does not match its description");
    assert_error(
        &err,
        ErrorKind::Protocol,
        "DataRow has 2 columns but RowDescription has 1",
    );
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn data_row_with_more_columns_than_row_description_extended() {
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["only"])),
        vec![
            Step::Send(int4_row(&[1, 2])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("query", conn.query("SELECT only"))
        .await
        .expect_err("the row does not match its description");
    assert_error(
        &err,
        ErrorKind::Protocol,
        "DataRow has 2 columns but RowDescription has 1",
    );
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

/// Rows that arrive in one read are taken together; a bad one among them must still fail the
/// query only after the good rows before it, and break the connection.
fn rows_then(bad: Vec<u8>) -> Vec<u8> {
    let mut raw = Vec::new();
    for n in 1..=3 {
        raw.extend(encode(&int4_row(&[n])));
    }
    raw.extend(bad);
    raw.extend(encode(&command_complete("SELECT 4")));
    raw.extend(encode(&ready(TransactionStatus::Idle)));
    raw
}

/// A server that answers an extended `SELECT n` with [`rows_then`] `bad`.
async fn answering_with_rows_then(bad: Vec<u8>) -> MockServer {
    MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![Step::SendRaw(rows_then(bad))],
    ]))
    .await
}

/// The bad rows for [`rows_then`]: one with a column too many, one whose value runs past its
/// end; and the error each must give.
fn bad_rows() -> [(Vec<u8>, &'static str); 2] {
    [
        (
            encode(&int4_row(&[4, 5])),
            "DataRow has 2 columns but RowDescription has 1",
        ),
        (framed(b'D', &[0, 1, 0, 0, 0, 9, 1, 2]), "truncated"),
    ]
}

#[tokio::test]
async fn a_bad_row_among_rows_read_together_streamed_ends_the_rows_after_those_before_it() {
    for (bad, expected) in bad_rows() {
        let server = answering_with_rows_then(bad).await;
        let mut conn = connect(&server.config()).await;
        {
            let mut rows = guard("query_stream", conn.query_stream("SELECT n"))
                .await
                .expect("the query starts");
            for n in 1..=3 {
                let row = guard("a good row", rows.try_next())
                    .await
                    .expect("the rows before the bad one are fine")
                    .expect("a row");
                assert_eq!(row.get::<_, i32>(0), n);
            }
            let err = guard("the bad row", rows.try_next())
                .await
                .expect_err("the fourth row is bad");
            assert_error(&err, ErrorKind::Protocol, expected);
            assert!(
                guard("after the error", rows.try_next())
                    .await
                    .expect("the stream is over")
                    .is_none()
            );
        }
        assert_broken(&mut conn).await;
        drop(conn);
        server.finish().await;
    }
}

#[tokio::test]
async fn a_bad_row_among_rows_read_together_fails_the_query() {
    for (bad, expected) in bad_rows() {
        let server = answering_with_rows_then(bad).await;
        let mut conn = connect(&server.config()).await;
        let err = guard("query", conn.query("SELECT n"))
            .await
            .expect_err("the fourth row is bad");
        assert_error(&err, ErrorKind::Protocol, expected);
        assert_broken(&mut conn).await;
        drop(conn);
        server.finish().await;
    }
}

#[tokio::test]
async fn column_length_of_minus_2() {
    // One column whose length is -2: only -1 (NULL) is a valid negative length.
    let row = framed(b'D', &[0, 1, 0xff, 0xff, 0xff, 0xfe]);
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::SendRaw(row),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .expect_err("-2 is not a column length");
    assert_error(&err, ErrorKind::Protocol, "column length of -2");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn ready_for_query_with_an_unknown_status_during_startup() {
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::Send(auth(Authentication::Ok)),
        Step::SendRaw(framed(b'Z', b"X")),
    ])
    .await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Protocol, "unknown transaction status");
    server.finish().await;
}

#[tokio::test]
async fn ready_for_query_with_an_unknown_status_after_a_query() {
    let server = MockServer::start(script([
        trust_login(),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(command_complete("SET")),
            Step::SendRaw(framed(b'Z', b"X")),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SET x = 1"))
        .await
        .expect_err("'X' is no transaction status");
    assert_error(&err, ErrorKind::Protocol, "unknown transaction status");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

// ---- Authentication -------------------------------------------------------------------------

#[tokio::test]
async fn unknown_authentication_method() {
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::SendRaw(framed(b'R', &99i32.to_be_bytes())),
    ])
    .await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Auth, "code 99");
    let t = server.finish().await;
    assert_eq!(
        t.kinds(),
        [Kind::Startup],
        "nothing is sent after the request"
    );
}

#[tokio::test]
async fn gss_sspi_and_kerberos_are_refused_by_name() {
    for (request, name) in [
        (Authentication::Gss, "GSSAPI"),
        (Authentication::Sspi, "SSPI"),
        (Authentication::KerberosV5, "Kerberos"),
    ] {
        let server =
            MockServer::start(vec![Step::Expect(Kind::Startup), Step::Send(auth(request))]).await;
        let err = connect_err(&server.config()).await;
        assert_error(&err, ErrorKind::Auth, name);
        let t = server.finish().await;
        assert_eq!(
            t.kinds(),
            [Kind::Startup],
            "{name}: nothing is sent after it"
        );
    }
}

#[tokio::test]
async fn scram_server_nonce_that_does_not_extend_ours() {
    for (case, make) in [
        (
            "another nonce",
            Box::new(|_: &str| "r=notyournonce123,s=c2FsdA==,i=16".to_owned())
                as Box<dyn FnOnce(&str) -> String + Send>,
        ),
        (
            "our nonce, not extended",
            Box::new(|ours: &str| format!("r={ours},s=c2FsdA==,i=16")),
        ),
    ] {
        let server = MockServer::start(script([
            sasl_request(),
            vec![Step::Expect(Kind::Password), reply_server_first(make)],
        ]))
        .await;
        let err = connect_err(&server.config()).await;
        assert_error(&err, ErrorKind::Auth, "nonce does not extend");
        let t = server.finish().await;
        // No SASLResponse (no proof) goes to a server that failed the nonce check.
        assert_eq!(t.kinds(), [Kind::Startup, Kind::Password], "{case}");
    }
}

#[tokio::test]
async fn scram_wrong_server_signature() {
    for garbage in [
        // Valid base64 of 32 zero bytes: the right shape, the wrong signature.
        "v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "v=not*base64",
    ] {
        let server = MockServer::start(script([
            sasl_request(),
            vec![
                Step::Expect(Kind::Password),
                reply_server_first(|ours| format!("r={ours}server,s=c2FsdA==,i=16")),
                Step::Expect(Kind::Password),
                Step::Send(auth(Authentication::SaslFinal(Bytes::from_static(
                    garbage.as_bytes(),
                )))),
            ],
        ]))
        .await;
        let err = connect_err(&server.config()).await;
        assert_eq!(err.kind(), ErrorKind::Auth, "{garbage}: {err}");
        assert!(err.to_string().contains("signature"), "{garbage}: {err}");
        server.finish().await;
    }
}

#[tokio::test]
async fn scram_authentication_ok_without_sasl_final() {
    let server = MockServer::start(script([
        sasl_request(),
        vec![
            Step::Expect(Kind::Password),
            reply_server_first(|ours| format!("r={ours}server,s=c2FsdA==,i=16")),
            Step::Expect(Kind::Password),
            Step::Send(auth(Authentication::Ok)),
        ],
    ]))
    .await;
    let err = connect_err(&server.config()).await;
    assert_error(&err, ErrorKind::Auth, "without proving its identity");
    server.finish().await;
}

#[tokio::test]
async fn password_request_without_a_password_sends_none() {
    let requests = [
        (
            "cleartext",
            vec![
                Step::Expect(Kind::Startup),
                Step::Send(auth(Authentication::CleartextPassword)),
            ],
        ),
        ("md5", md5_request()),
        ("SCRAM", sasl_request()),
    ];
    for (method, request) in requests {
        let server = MockServer::start(request).await;
        // No password, and a password file that cannot exist (not the user's ~/.pgpass).
        let config = server.config_with("user=u passfile=/nonexistent/pgpass connect_timeout=2");
        let err = connect_err(&config).await;
        assert_error(&err, ErrorKind::Auth, "none was given");
        let t = server.finish().await;
        assert_eq!(
            t.kinds(),
            [Kind::Startup],
            "{method}: only the startup packet"
        );
        let mut startup = bytes::BytesMut::new();
        t.messages[0].encode(&mut startup).unwrap();
        assert_eq!(
            t.raw,
            startup.to_vec(),
            "{method}: the client sent bytes after the startup packet"
        );
    }
}

#[tokio::test]
async fn require_auth_refuses_before_any_secret_is_sent() {
    let request = |method: &str| match method {
        "cleartext" => vec![
            Step::Expect(Kind::Startup),
            Step::Send(auth(Authentication::CleartextPassword)),
        ],
        "md5" => md5_request(),
        "SCRAM" => sasl_request(),
        _ => trust_login(),
    };
    let rules = [
        ("cleartext", "require_auth=scram-sha-256"),
        ("cleartext", "require_auth=!password"),
        ("md5", "require_auth=scram-sha-256"),
        ("md5", "require_auth=!md5,!password"),
        ("SCRAM", "require_auth=md5"),
        ("SCRAM", "require_auth=!scram-sha-256"),
        ("none", "require_auth=scram-sha-256"),
        // channel binding is impossible without TLS: no password may go out either.
        ("cleartext", "channel_binding=require"),
        ("md5", "channel_binding=require"),
        ("SCRAM", "channel_binding=require"),
    ];
    for (method, rule) in rules {
        let server = MockServer::start(request(method)).await;
        let config = server.config_with(&format!("user=u password=secret-pw {rule}"));
        let err = connect_err(&config).await;
        assert_eq!(err.kind(), ErrorKind::Auth, "{method} {rule}: {err}");
        let t = server.finish().await;
        assert_eq!(
            t.kinds(),
            [Kind::Startup],
            "{method} {rule}: only the startup packet"
        );
        assert!(
            !t.raw_contains(b"secret-pw"),
            "{method} {rule}: the password was sent"
        );
        let mut startup = bytes::BytesMut::new();
        t.messages[0].encode(&mut startup).unwrap();
        assert_eq!(
            t.raw,
            startup.to_vec(),
            "{method} {rule}: bytes after the startup packet"
        );
    }
}

// ---- Errors and timeouts at startup ---------------------------------------------------------

#[tokio::test]
async fn fatal_error_during_startup_carries_its_sqlstate() {
    let server = MockServer::start(vec![
        Step::Expect(Kind::Startup),
        Step::Send(auth(Authentication::Ok)),
        Step::Send(error_response(
            "FATAL",
            "53300",
            "sorry, too many clients already",
        )),
        Step::Close,
    ])
    .await;
    let err = connect_err(&server.config()).await;
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS), "{err}");
    assert_eq!(err.kind(), ErrorKind::Db, "{err}");
    let db = err.as_db_error().expect("the server's fields are kept");
    assert_eq!(db.severity(), "FATAL");
    assert_eq!(db.message(), "sorry, too many clients already");
    server.finish().await;
}

#[tokio::test]
async fn connect_timeout_fires_when_the_server_hangs_during_startup() {
    let server = MockServer::start(vec![Step::Expect(Kind::Startup), Step::Hang]).await;
    let mut config = server.config();
    config.connect_timeout(Duration::from_millis(300));
    let err = connect_err(&config).await;
    assert_error(&err, ErrorKind::Timeout, "could not connect");
    assert_eq!(server.transcript().kinds(), [Kind::Startup]);
}

// ---- A server that stops answering mid-result -----------------------------------------------

/// Observed design: dropping a query future half way leaves the connection owing the rest of
/// the response (`pending` > 0). It is not broken — the stream is still in step — but it is
/// not idle either, so a pool will not hand it out. The next request on it first reads the
/// owed response to its ReadyForQuery; against a server that never sends it, that waits
/// forever, as there is no per-query timeout yet.
#[tokio::test]
async fn dropped_query_on_a_hung_server_leaves_the_connection_not_idle() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![Step::Send(text_row(&[Some("stale")])), Step::Hang],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    // Cancellation, not a timing assertion: the server never answers.
    let dropped =
        tokio::time::timeout(Duration::from_millis(300), conn.simple_query("SELECT s")).await;
    assert!(
        dropped.is_err(),
        "the hung query cannot finish: {dropped:?}"
    );
    assert!(
        !conn.is_idle(),
        "a connection that owes a response must not look reusable: {conn:?}"
    );
    match tokio::time::timeout(Duration::from_millis(300), conn.simple_query("SELECT 2")).await {
        // Observed: it waits for the owed ReadyForQuery (no per-query timeout yet).
        Err(_elapsed) => assert!(!conn.is_idle()),
        Ok(Err(e)) => assert!(
            matches!(
                e.kind(),
                ErrorKind::Closed | ErrorKind::Io | ErrorKind::Timeout
            ),
            "{e}"
        ),
        Ok(Ok(results)) => panic!("the next query returned {results:?} from a hung server"),
    }
}

/// The same, with a server that resumes after the client gave up: the next query reads away
/// the rest of the old result and returns only its own rows.
#[tokio::test]
async fn dropped_query_leftovers_are_not_mistaken_for_the_next_result() {
    let resume = Arc::new(tokio::sync::Notify::new());
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("stale 1")])),
            Step::Wait(resume.clone()),
            Step::Send(text_row(&[Some("stale 2")])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Expect(Kind::Query),
            Step::Send(text_columns(&["fresh"])),
            Step::Send(text_row(&[Some("new")])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let dropped =
        tokio::time::timeout(Duration::from_millis(300), conn.simple_query("SELECT s")).await;
    assert!(dropped.is_err(), "the server is paused: {dropped:?}");
    assert!(!conn.is_idle(), "{conn:?}");
    assert!(!conn.is_broken(), "{conn:?}");
    resume.notify_one();
    let results = guard("the next query", conn.simple_query("SELECT fresh"))
        .await
        .expect("the next query succeeds");
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].columns()[0].name(), "fresh");
    let values: Vec<_> = results[0].rows().iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [Some("new")]);
    assert!(conn.is_idle());
    drop(conn);
    let t = server.finish().await;
    assert_eq!(
        t.kinds().iter().filter(|k| **k == Kind::Query).count(),
        2,
        "{:?}",
        t.kinds()
    );
}

// ---- Asynchronous messages between rows -----------------------------------------------------

fn capture_notices(conn: &mut Connection) -> Arc<Mutex<Vec<String>>> {
    let notices = Arc::new(Mutex::new(Vec::new()));
    let sink = notices.clone();
    conn.set_notice_handler(move |n| sink.lock().unwrap().push(n.message().to_owned()));
    notices
}

#[tokio::test]
async fn notice_and_parameter_status_between_rows_simple() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("a")])),
            Step::Send(notice("NOTICE", "00000", "between rows")),
            Step::Send(parameter("TimeZone", "Europe/Paris")),
            Step::Send(text_row(&[None])),
            Step::Send(notice("WARNING", "01000", "and again")),
            Step::Send(text_row(&[Some("c")])),
            Step::Send(command_complete("SELECT 3")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let notices = capture_notices(&mut conn);
    let results = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .expect("asynchronous messages do not disturb a result");
    let values: Vec<_> = results[0].rows().iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [Some("a"), None, Some("c")]);
    assert_eq!(results[0].rows_affected(), 3);
    assert_eq!(*notices.lock().unwrap(), ["between rows", "and again"]);
    assert_eq!(conn.parameter("TimeZone"), Some("Europe/Paris"));
    assert!(conn.is_idle());
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn notice_and_parameter_status_between_rows_extended() {
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::Send(parameter("application_name", "changed")),
            Step::Send(notice("NOTICE", "00000", "between rows")),
            Step::Send(int4_row(&[2])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let notices = capture_notices(&mut conn);
    let rows = guard("query", conn.query("SELECT n"))
        .await
        .expect("asynchronous messages do not disturb a result");
    let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [1, 2]);
    assert_eq!(*notices.lock().unwrap(), ["between rows"]);
    assert_eq!(conn.parameter("application_name"), Some("changed"));
    assert!(conn.is_idle());
    drop(conn);
    server.finish().await;
}

fn notification() -> BackendMessage {
    BackendMessage::NotificationResponse {
        process_id: 99,
        channel: "jobs".to_owned(),
        payload: "42".to_owned(),
    }
}

#[tokio::test]
async fn notification_between_rows_is_not_a_row_simple() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("a")])),
            Step::Send(notification()),
            Step::Send(text_row(&[Some("b")])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let results = guard("simple_query", conn.simple_query("SELECT s"))
        .await
        .expect("a notification does not disturb a result");
    let values: Vec<_> = results[0].rows().iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [Some("a"), Some("b")]);
    let notes = conn.take_notifications();
    assert_eq!(notes.len(), 1);
    assert_eq!(
        (
            notes[0].process_id,
            notes[0].channel.as_str(),
            notes[0].payload.as_str()
        ),
        (99, "jobs", "42")
    );
    assert!(conn.is_idle());
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn notification_between_rows_is_not_a_row_extended() {
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::Send(notification()),
            Step::Send(int4_row(&[2])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let rows = guard("query", conn.query("SELECT n"))
        .await
        .expect("a notification does not disturb a result");
    let values: Vec<i32> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(values, [1, 2]);
    let notes = conn.take_notifications();
    assert_eq!(notes.len(), 1);
    assert_eq!(notes[0].channel, "jobs");
    assert!(conn.is_idle());
    drop(conn);
    server.finish().await;
}

// ---- A ReadyForQuery that answers nothing ---------------------------------------------------

/// A Query is always answered by at least one of CommandComplete, EmptyQueryResponse or
/// ErrorResponse before its ReadyForQuery (§55.2.2). A ReadyForQuery with nothing before it —
/// a duplicate from a broken server or pooler — must be refused: taken as the answer, it shifts
/// every later response by one, and the next query gets this one's rows.
#[tokio::test]
async fn stray_ready_for_query_is_not_taken_as_the_answer() {
    let server = MockServer::start(script([
        trust_login(),
        vec![
            // A second ReadyForQuery nobody asked for.
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Expect(Kind::Query),
            Step::Send(text_columns(&["s"])),
            Step::Send(text_row(&[Some("first")])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let first = guard("simple_query", conn.simple_query("SELECT 'first'")).await;
    let err = first.expect_err("a ReadyForQuery alone is no answer to a query");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

/// The same in the middle of a result: rows read so far must not be returned as a whole
/// result, silently cut short.
#[tokio::test]
async fn ready_for_query_in_the_middle_of_rows_is_refused() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![
            Step::Send(text_row(&[Some("a")])),
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Send(text_row(&[Some("b")])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let result = guard("simple_query", conn.simple_query("SELECT s")).await;
    let err = result.expect_err("the result was cut off by a ReadyForQuery");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

#[tokio::test]
async fn stray_ready_for_query_before_an_extended_query_answer() {
    let server = MockServer::start(script([
        trust_login(),
        vec![Step::Send(ready(TransactionStatus::Idle))],
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("query", conn.query("SELECT n"))
        .await
        .expect_err("a ReadyForQuery alone is no answer to a query");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

/// A cached statement's second run, whose answer the server sends as `answer`: the first run
/// prepared and cached it, so the second goes out as Bind, Execute, Sync alone.
fn second_run_answered_with(answer: Vec<Step>) -> Vec<Vec<Step>> {
    vec![
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::Send(command_complete("SELECT 1")),
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Expect(Kind::Bind),
            Step::Expect(Kind::Execute),
            Step::Expect(Kind::Sync),
        ],
        answer,
    ]
}

/// A cached statement's answer is read whole from its start (BindComplete, rows,
/// CommandComplete): rows without the BindComplete before them are no answer to the Bind,
/// nor is a ReadyForQuery alone; either breaks the connection rather than count as a result.
#[tokio::test]
async fn a_cached_statements_answer_without_bind_complete_is_refused() {
    let no_bind = vec![
        Step::Send(int4_row(&[2])),
        Step::Send(command_complete("SELECT 1")),
        Step::Send(ready(TransactionStatus::Idle)),
    ];
    let nothing = vec![Step::Send(ready(TransactionStatus::Idle))];
    for (answer, fragment) in [
        (no_bind, "unexpected message 'D' during Bind"),
        (nothing, "unexpected message 'Z'"),
    ] {
        let server = MockServer::start(script(second_run_answered_with(answer))).await;
        let mut conn = connect(&server.config()).await;
        let first = guard("first run", conn.query_one("SELECT n"))
            .await
            .unwrap();
        assert_eq!(first.get::<_, i32>(0), 1);
        let err = guard("second run", conn.query("SELECT n"))
            .await
            .expect_err("the answer did not start with BindComplete");
        assert_error(&err, ErrorKind::Protocol, fragment);
        assert_broken(&mut conn).await;
        drop(conn);
        server.finish().await;
    }
}

#[tokio::test]
async fn ready_for_query_in_the_middle_of_rows_is_refused_extended() {
    let server = MockServer::start(script([
        trust_login(),
        extended_query_start(int4_columns(&["n"])),
        vec![
            Step::Send(int4_row(&[1])),
            Step::Send(ready(TransactionStatus::Idle)),
            Step::Send(int4_row(&[2])),
            Step::Send(command_complete("SELECT 2")),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let result = guard("query", conn.query("SELECT n")).await;
    let err = result.expect_err("the result was cut off by a ReadyForQuery");
    assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
    assert_broken(&mut conn).await;
    drop(conn);
    server.finish().await;
}

/// A server that stops answering in the middle of a result: with a query timeout the query
/// fails with a typed Timeout error and a cancel goes out; when the rest of the answer does
/// not come within the drain timeout either, the connection is marked broken (a pool
/// discards it) and the next request says so.
#[tokio::test]
async fn hung_server_mid_result_times_out_and_breaks_the_connection() {
    let server = MockServer::start(script([
        trust_login(),
        simple_query_start(text_columns(&["s"])),
        vec![Step::Send(text_row(&[Some("first")])), Step::Hang],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    conn.set_query_timeout(Some(Duration::from_millis(300)));
    conn.set_drain_timeout(Duration::from_millis(300));
    let err = guard(
        "a hung server with a query timeout",
        conn.simple_query("SELECT s"),
    )
    .await
    .unwrap_err();
    assert_error(&err, ErrorKind::Timeout, "cancelled on the server");
    // The next request waits for the cancelled statement's end, which never comes.
    let err = guard("the next request", conn.simple_query("SELECT 1"))
        .await
        .unwrap_err();
    assert_error(&err, ErrorKind::Timeout, "nor answer its cancel");
    assert_broken(&mut conn).await;
}

/// The same in the middle of a row stream (the extended protocol, rows pulled one by one).
#[tokio::test]
async fn hung_server_mid_stream_times_out() {
    use futures::TryStreamExt;
    let server = MockServer::start(script([trust_login(), vec![Step::Hang]])).await;
    let mut conn = connect(&server.config()).await;
    conn.set_query_timeout(Some(Duration::from_millis(300)));
    conn.set_drain_timeout(Duration::from_millis(300));
    let result = guard("a hung server mid-stream", async {
        let mut rows = conn.query_stream("SELECT 1").await?;
        rows.try_next().await
    })
    .await;
    // The stream waited for its cancelled statement's end through the drain timeout.
    let err = result.unwrap_err();
    assert_error(&err, ErrorKind::Timeout, "nor answer its cancel");
    assert!(conn.is_broken());
}

/// A FATAL error from a server whose `lc_messages` is Russian: its localised severity is
/// "ВАЖНО" (PostgreSQL's own translation), the never-localised one "FATAL". The server ends
/// the session after it, so the connection is broken at once — even when, as here, a
/// ReadyForQuery follows that a reader going by the localised word would take as the end of
/// an ordinary failed query.
#[tokio::test]
async fn a_fatal_error_in_another_language_breaks_the_connection() {
    let server = MockServer::start(script([
        trust_login(),
        vec![
            Step::Expect(Kind::Query),
            Step::Send(error_response_fields(&[
                (b'S', "ВАЖНО"),
                (b'V', "FATAL"),
                (b'C', SqlState::ADMIN_SHUTDOWN.as_str()),
                (b'M', "завершение подключения по команде администратора"),
            ])),
            Step::Send(ready(TransactionStatus::Idle)),
        ],
    ]))
    .await;
    let mut conn = connect(&server.config()).await;
    let err = guard("simple_query", conn.simple_query("SELECT 1"))
        .await
        .expect_err("the session was ended");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
    let db = err.as_db_error().expect("the server's fields are kept");
    assert_eq!(db.severity(), "ВАЖНО");
    assert_eq!(db.severity_level(), Some(Severity::Fatal));
    assert_broken(&mut conn).await;
    drop(conn);
    let t = server.finish().await;
    assert_eq!(
        t.kinds()[..2],
        [Kind::Startup, Kind::Query],
        "{:?}",
        t.kinds()
    );
}

// ---- A failure after a failure --------------------------------------------------------------

/// The query fails, and then, before its ReadyForQuery, the session ends (as when PgBouncer
/// in statement mode drops a client whose block failed): the query's own error is reported,
/// not the one that ended the session, and the connection is broken. Through the extended
/// protocol (a row stream) and the simple one.
#[tokio::test]
async fn a_session_ending_after_a_query_error_keeps_the_query_error() {
    for extended in [true, false] {
        let query = if extended {
            extended_query_start(int4_columns(&["n"]))
        } else {
            vec![Step::Expect(Kind::Query)]
        };
        let server = MockServer::start(script([
            trust_login(),
            query,
            vec![
                Step::Send(error_response("ERROR", "22012", "division by zero")),
                Step::Send(error_response(
                    "FATAL",
                    "08P01",
                    "transaction blocks not allowed in statement pooling mode",
                )),
                Step::Close,
            ],
        ]))
        .await;
        let mut conn = connect(&server.config()).await;
        let err = if extended {
            guard("query", conn.query("SELECT 1 / 0 AS n"))
                .await
                .map(drop)
        } else {
            guard("simple_query", conn.simple_query("SELECT 1 / 0"))
                .await
                .map(drop)
        }
        .expect_err("the query failed");
        assert_eq!(
            err.code(),
            Some(&SqlState::DIVISION_BY_ZERO),
            "extended: {extended}: {err}"
        );
        assert_broken(&mut conn).await;
        drop(conn);
        server.finish().await;
    }
}
