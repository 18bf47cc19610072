//! Records real server traffic for the fuzz seed corpus, and checks the recordings.
//!
//! Each session below connects to the throwaway cluster through a recording transport (every
//! byte read from and written to the socket is kept) and runs a [`checks::Script`] with the
//! very code of the `connection` fuzz target (fuzz/checks.rs). The test then checks that the
//! server's bytes decode as a sensible message sequence, and that replaying them through the
//! fuzz target's fake server gives the client the same outcome it had live — true for every
//! session but SCRAM, whose replayed server messages answer another client nonce.
//!
//! With `PGENGINE_RECORD_CORPUS=<dir>` set, each session's bytes are also written there as seeds:
//! `<dir>/connection/` (the target's input header + the server's bytes), `<dir>/backend_decoder/`
//! (the server's bytes, and each message alone) and `<dir>/scram/` (the SCRAM messages). See
//! fuzz/run-ci.sh's header for how they become the committed corpus.
//!
//! Not in the published crate (Cargo.toml's `include` leaves it out): it compiles fuzz/checks.rs
//! into itself, and cargo does not package fuzz/, a crate of its own.

mod common;

#[allow(dead_code)]
mod checks {
    include!("../fuzz/checks.rs");
}

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use checks::{FUZZ_SCRIPT, Script, SessionOutcome};
use pgengine::protocol::{self, Authentication, BackendMessage};
use pgengine::testing::TempCluster;
use pgengine::{Config, ErrorKind};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The bytes that went each way on one connection.
#[derive(Default)]
struct Traffic {
    from_server: Vec<u8>,
    to_server: Vec<u8>,
}

/// A transport that keeps a copy of everything read and written.
struct Recording<T> {
    inner: T,
    traffic: Arc<Mutex<Traffic>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Recording<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        self.traffic
            .lock()
            .unwrap()
            .from_server
            .extend_from_slice(read);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Recording<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let n = ready!(Pin::new(&mut self.inner).poll_write(cx, buf))?;
        self.traffic
            .lock()
            .unwrap()
            .to_server
            .extend_from_slice(&buf[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// One recorded session: who logs in, with what password, and what it runs.
struct Session {
    name: &'static str,
    user: &'static str,
    password: Option<&'static str>,
    script: Script,
}

const fn session(name: &'static str, user: &'static str, script: Script) -> Session {
    Session {
        name,
        user,
        password: Some(TempCluster::PASSWORD),
        script,
    }
}

const fn script(simple: &'static str, extended: &'static str, stream: &'static str) -> Script {
    Script {
        simple,
        extended,
        stream,
        copy: FUZZ_SCRIPT.copy,
    }
}

const SESSIONS: &[Session] = &[
    Session {
        password: None,
        ..session("trust", TempCluster::SUPERUSER, FUZZ_SCRIPT)
    },
    session("cleartext", TempCluster::PASSWORD_USER, FUZZ_SCRIPT),
    session("md5", TempCluster::MD5_USER, FUZZ_SCRIPT),
    session("scram", TempCluster::SCRAM_USER, FUZZ_SCRIPT),
    Session {
        password: Some("not the password"),
        ..session("wrong_password", TempCluster::MD5_USER, FUZZ_SCRIPT)
    },
    session(
        "errors",
        TempCluster::SUPERUSER,
        script(
            "SELECT 1/0",
            "SELECT $1::int4 / 0",
            "SELECT * FROM no_such_table",
        ),
    ),
    session(
        "notices",
        TempCluster::SUPERUSER,
        script(
            "DO $$BEGIN RAISE NOTICE 'hello'; RAISE WARNING 'careful'; END$$; \
             SET application_name = 'recorded'; LISTEN ch; NOTIFY ch, 'payload'",
            "SELECT $1::int4, current_setting('application_name')",
            "SELECT pg_notify('ch', 'second'), 1",
        ),
    ),
    session(
        "multi_statement",
        TempCluster::SUPERUSER,
        script(
            "CREATE TEMP TABLE t (a int, b text); INSERT INTO t VALUES (1, 'x'), (2, NULL); \
             SELECT * FROM t; ; BEGIN",
            "SELECT a, b FROM t WHERE a >= $1",
            "SELECT t.*, g FROM t CROSS JOIN generate_series(1, 20) g",
        ),
    ),
    session(
        "types",
        TempCluster::SUPERUSER,
        script(
            "CREATE TYPE pg_temp.mood AS ENUM ('sad', 'happy'); \
             CREATE TYPE pg_temp.pair AS (x int, y text)",
            "SELECT $1::int4, ARRAY[1, NULL, 3]::int4[], '\\x0102'::bytea, 1.5::float8, true, \
             'ü'::text, now(), '{\"a\": 1}'::jsonb, '1 day'::interval, '127.0.0.1'::inet, \
             'a=>1'::text, 7::int8, 2::int2, 'c'::\"char\", 12::oid",
            "SELECT 'happy'::pg_temp.mood, ROW(1, 'a')::pg_temp.pair",
        ),
    ),
    session(
        "copy",
        TempCluster::SUPERUSER,
        script(
            "CREATE TEMP TABLE c (a int); COPY (SELECT generate_series(1, 3)) TO STDOUT; \
             COPY c FROM STDIN",
            "SELECT $1::int4 WHERE false",
            "",
        ),
    ),
    session(
        "failed_transaction",
        TempCluster::SUPERUSER,
        script("BEGIN; SELECT 1/0", "SELECT $1::int4", "ROLLBACK"),
    ),
    session(
        "empty",
        TempCluster::SUPERUSER,
        script("", "SELECT $1::int4 WHERE false", ";"),
    ),
    session(
        "terminated",
        TempCluster::SUPERUSER,
        script(
            "SELECT pg_terminate_backend(pg_backend_pid())",
            "SELECT $1::int4",
            "SELECT 1",
        ),
    ),
];

/// Runs `session` against the cluster and returns its outcome and its traffic.
async fn record(session: &Session) -> (SessionOutcome, Traffic) {
    let cluster = common::cluster();
    let socket = TcpStream::connect((cluster.host(), cluster.port()))
        .await
        .expect("the cluster accepts TCP connections");
    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let transport = Recording {
        inner: socket,
        traffic: traffic.clone(),
    };
    let mut config = Config::new();
    config.user(session.user).dbname("postgres");
    if let Some(password) = session.password {
        config.password(password);
    }
    let outcome = checks::client_session(transport, &config, &session.script, 0).await;
    let traffic = std::mem::take(&mut *traffic.lock().unwrap());
    (outcome, traffic)
}

/// Splits a recording into its messages, each with its bytes; fails on anything that does
/// not frame and decode cleanly.
fn messages(bytes: &[u8]) -> Vec<(BackendMessage, Vec<u8>)> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while !buf.is_empty() {
        let before = buf.len();
        let msg = protocol::read_message(&mut buf, protocol::DEFAULT_MAX_MESSAGE_LEN)
            .expect("recorded server bytes decode")
            .expect("a recording ends on a whole message");
        let start = bytes.len() - before;
        out.push((msg, bytes[start..bytes.len() - buf.len()].to_vec()));
    }
    out
}

/// The SASL payloads of the client's messages (SASLInitialResponse and SASLResponse, both
/// tagged 'p', as is PasswordMessage), after the untagged StartupMessage.
fn client_sasl_payloads(bytes: &[u8]) -> Vec<Vec<u8>> {
    let startup_len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    let mut rest = &bytes[startup_len..];
    let mut out = Vec::new();
    while rest.len() >= 5 {
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        let (msg, tail) = rest.split_at(1 + len);
        if msg[0] == b'p' {
            out.push(msg[5..].to_vec());
        }
        rest = tail;
    }
    out
}

fn seed_dir() -> Option<std::path::PathBuf> {
    std::env::var_os("PGENGINE_RECORD_CORPUS")
        .filter(|d| !d.is_empty())
        .map(Into::into)
}

fn write_seed(dir: &std::path::Path, target: &str, name: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("the seed directory can be made");
    std::fs::write(dir.join(name), bytes).expect("a seed can be written");
}

// A plain test with a runtime of its own for the live sessions: the replay runs on the fuzz
// target's runtime, which cannot start inside another.
#[test]
fn recorded_sessions_decode_and_replay() {
    let seeds = seed_dir();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime for the live sessions");
    for session in SESSIONS {
        let name = session.name;
        let (live, traffic) = runtime.block_on(record(session));
        let msgs = messages(&traffic.from_server);
        let tags: String = msgs.iter().map(|(m, _)| m.tag() as char).collect();
        assert!(
            tags.starts_with('R'),
            "{name}: the server's first message: {tags}"
        );

        // The replay: the fuzz target's fake server sends the recorded bytes.
        let mut input = vec![0, 0];
        input.extend_from_slice(&traffic.from_server);
        let replayed = checks::run_connection_input(&input);

        match name {
            "scram" => {
                assert_eq!(live.connect, Ok(()), "{name}: {live:?}");
                // The recorded server-first-message extends another client's nonce.
                assert_eq!(replayed.connect, Err(ErrorKind::Auth), "{name}");
            }
            "wrong_password" => {
                assert_eq!(live.connect, Err(ErrorKind::Auth), "{name}");
                assert_eq!(replayed, live, "{name}");
            }
            _ => {
                assert_eq!(live.connect, Ok(()), "{name}: {live:?}");
                assert_eq!(
                    replayed, live,
                    "{name}: replay differs from the live session"
                );
                // Every request was answered through to its ReadyForQuery, or the session ended.
                assert!(tags.contains('Z'), "{name}: {tags}");
            }
        }
        match name {
            "trust" | "cleartext" | "md5" | "scram" => {
                let rows = |s: &str| Ok(vec![s.to_owned()]);
                assert_eq!(
                    live.steps[0],
                    rows("Some(\"1\")|None|Some(\"drei ü\")"),
                    "{name}"
                );
                assert_eq!(live.steps[1], rows("Some(1)|Some(\"x\")"), "{name}");
                let three = (1..=3).map(|i| format!("Some({i})")).collect();
                assert_eq!(live.steps[2], Ok(three), "{name}");
            }
            "errors" | "failed_transaction" => {
                assert!(
                    live.steps.iter().take(2).all(|s| *s == Err(ErrorKind::Db)),
                    "{live:?}"
                );
            }
            "terminated" => {
                assert_eq!(live.steps[0], Err(ErrorKind::Db), "{live:?}");
                assert_eq!(live.steps[1], Err(ErrorKind::Closed), "{live:?}");
            }
            "copy" => assert_eq!(live.steps[0], Err(ErrorKind::Conversion), "{live:?}"),
            _ => assert!(live.steps.iter().all(Result::is_ok), "{name}: {live:?}"),
        }

        let Some(dir) = &seeds else { continue };
        write_seed(dir, "connection", name, &input);
        write_seed(dir, "backend_decoder", name, &traffic.from_server);
        for (i, (_, bytes)) in msgs.iter().enumerate() {
            write_seed(dir, "backend_decoder", &format!("{name}_{i:03}"), bytes);
        }
        if name == "scram" {
            write_scram_seed(dir, &msgs, &traffic.to_server);
        }
    }
}

/// The SCRAM seed: the password, and the recorded server messages with the recorded client
/// nonce replaced by the fuzz target's fixed one.
fn write_scram_seed(dir: &std::path::Path, msgs: &[(BackendMessage, Vec<u8>)], to_server: &[u8]) {
    let payloads = client_sasl_payloads(to_server);
    // SASLInitialResponse: mechanism NUL, Int32 length, client-first-message.
    let initial = &payloads[0];
    let nul = initial.iter().position(|&b| b == 0).unwrap();
    let client_first = std::str::from_utf8(&initial[nul + 5..]).unwrap();
    let client_nonce = client_first.split_once(",r=").unwrap().1;
    let sasl = |want_final: bool| {
        msgs.iter()
            .find_map(|(m, _)| match m {
                BackendMessage::Authentication(Authentication::SaslContinue(d)) if !want_final => {
                    Some(d.clone())
                }
                BackendMessage::Authentication(Authentication::SaslFinal(d)) if want_final => {
                    Some(d.clone())
                }
                _ => None,
            })
            .expect("a SCRAM session has both server messages")
    };
    let server_first = String::from_utf8(sasl(false).to_vec())
        .unwrap()
        .replace(client_nonce, checks::SCRAM_CLIENT_NONCE);
    let mut seed = TempCluster::PASSWORD.as_bytes().to_vec();
    seed.push(0);
    seed.extend_from_slice(server_first.as_bytes());
    seed.push(0);
    seed.extend_from_slice(&sasl(true));
    write_seed(dir, "scram", "recorded", &seed);
}
