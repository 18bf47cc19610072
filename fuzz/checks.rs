// The checks behind pgengine's fuzz targets, one public function per target, each taking the
// fuzzer's raw bytes. They are shared by two users:
//
// - the fuzz crate (fuzz/src/lib.rs), whose targets in fuzz/fuzz_targets/ call them;
// - tests/fuzz_regressions.rs, which replays every saved input through them with plain
//   `cargo test`, and tests/record_corpus.rs, which runs `client_session` against a real server.
//
// Both `include!` this file, so it has no inner attributes and uses only crates that pgengine
// itself depends on (bytes, tokio, base64, hmac, sha2).
//
// A check does more than "must not panic": each asserts an invariant that holds for every
// input, so a wrong answer is a crash too.

use std::collections::HashMap;
use std::future::poll_fn;
use std::time::Duration;

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use pgengine::config::pgpass_lookup;
use pgengine::connection::Transport;
use pgengine::protocol::scram::{
    Gs2Binding, MAX_ITERATIONS, ScramSha256, parse_server_final, parse_server_first,
};
use pgengine::protocol::{self, BackendMessage, DataRow};
use pgengine::{Config, Connection, ErrorKind, Row, SimpleRow, TransactionStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------------------------
// backend_decoder: framing and every server message.
// ---------------------------------------------------------------------------------------------

/// A small message length limit, to exercise the limit check next to the default one.
const SMALL_LIMIT: usize = 64;

/// Feeds `data` as a stream of server messages through `read_message` until it is incomplete
/// or corrupt, then decodes it once more as a single message body with the first byte as tag.
/// Every decoded message is re-encoded: decoding that again gives the same message, and every
/// kind but ErrorResponse/NoticeResponse (whose field order and unknown fields are not kept)
/// comes back byte for byte.
pub fn check_backend_decoder(data: &[u8]) {
    let max = protocol::DEFAULT_MAX_MESSAGE_LEN;
    let mut buf = BytesMut::from(data);
    let mut frames: Vec<(BackendMessage, usize)> = Vec::new();
    loop {
        let before = buf.len();
        let header = protocol::frame_len(&buf, max);
        match protocol::read_message(&mut buf, max) {
            Ok(Some(msg)) => {
                let len = match header {
                    Ok(Some(len)) => len,
                    other => panic!("read_message framed a message whose header is {other:?}"),
                };
                assert_eq!(
                    before - buf.len(),
                    1 + len,
                    "read_message must consume exactly one message"
                );
                let start = data.len() - before;
                check_message(&msg, &data[start..start + 1 + len]);
                frames.push((msg, len));
            }
            Ok(None) => {
                assert_eq!(
                    buf.len(),
                    before,
                    "an incomplete message must stay in the buffer"
                );
                match header {
                    Ok(None) => assert!(before < 5, "a whole header was called incomplete"),
                    Ok(Some(len)) => assert!(before < 1 + len, "a whole message was left unread"),
                    Err(e) => panic!("frame_len refused a header read_message accepted: {e}"),
                }
                break;
            }
            // Corrupt: nothing after it can be trusted, so a reader stops here.
            Err(_) => break,
        }
    }

    // The same stream under a small limit: the same messages, up to the first that is longer.
    let mut small = BytesMut::from(data);
    for (expected, len) in &frames {
        match protocol::read_message(&mut small, SMALL_LIMIT) {
            Ok(Some(msg)) => {
                assert!(
                    *len <= SMALL_LIMIT,
                    "a {len}-byte message passed a {SMALL_LIMIT}-byte limit"
                );
                assert_eq!(&msg, expected, "the length limit changed a message");
            }
            Ok(None) => panic!("a whole message was called incomplete under a smaller limit"),
            Err(_) => {
                assert!(
                    *len > SMALL_LIMIT,
                    "a {len}-byte message failed a {SMALL_LIMIT}-byte limit"
                );
                break;
            }
        }
    }

    // One message body, given directly: after the tag byte, and after a whole (ignored) header.
    if let Some((&tag, body)) = data.split_first() {
        decode_direct(tag, body);
        if let Some(body) = body.get(4..) {
            decode_direct(tag, body);
        }
    }
}

fn decode_direct(tag: u8, body: &[u8]) {
    if let Ok(msg) = BackendMessage::decode(tag, Bytes::copy_from_slice(body)) {
        let len = i32::try_from(body.len() + 4).expect("fuzz inputs are small");
        let mut frame = vec![tag];
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body);
        check_message(&msg, &frame);
    }
}

/// Checks one decoded message against the frame (tag, length, body) it came from.
fn check_message(msg: &BackendMessage, frame: &[u8]) {
    assert_eq!(msg.tag(), frame[0], "a message decoded under another tag");
    let _ = format!("{msg:?}");
    if let BackendMessage::DataRow(row) = msg {
        check_data_row(row);
    }
    let mut encoded = BytesMut::new();
    if let Err(e) = msg.encode(&mut encoded) {
        panic!("a decoded message cannot be encoded again: {e}: {msg:?}");
    }
    let mut again = encoded.clone();
    match protocol::read_message(&mut again, protocol::DEFAULT_MAX_MESSAGE_LEN) {
        Ok(Some(decoded)) => assert_eq!(&decoded, msg, "decode(encode(m)) != m"),
        other => panic!("a re-encoded message does not decode: {other:?}: {msg:?}"),
    }
    assert!(again.is_empty(), "a re-encoded message has trailing bytes");
    if !matches!(
        msg,
        BackendMessage::ErrorResponse(_) | BackendMessage::NoticeResponse(_)
    ) {
        assert_eq!(
            &encoded[..],
            frame,
            "a message is not re-encoded byte for byte"
        );
    }
}

/// Walks a DataRow: the columns tile the body exactly, and `value` agrees with `ranges`.
fn check_data_row(row: &DataRow) {
    let buf = row.buffer();
    let ranges: Vec<_> = row.ranges().collect();
    assert_eq!(
        ranges.len(),
        row.len(),
        "ranges() yields one item per column"
    );
    assert_eq!(row.ranges().size_hint(), (row.len(), Some(row.len())));
    assert_eq!(row.is_empty(), ranges.is_empty());
    let mut pos = 0;
    for (i, range) in ranges.iter().enumerate() {
        // Each column starts with its Int32 length.
        pos += 4;
        match range {
            Some(r) => {
                assert_eq!(r.start, pos, "column {i} does not follow its length");
                assert!(r.end <= buf.len(), "column {i} runs past the row");
                assert_eq!(row.value(i), Some(&buf[r.clone()]));
                pos = r.end;
            }
            None => assert_eq!(row.value(i), None),
        }
    }
    assert_eq!(pos, buf.len(), "the columns do not cover the whole row");
    assert_eq!(
        row.value(row.len()),
        None,
        "a column past the end has a value"
    );
    let _ = format!("{row:?}");
}

// ---------------------------------------------------------------------------------------------
// connection: the client state machine against a fuzzed server.
// ---------------------------------------------------------------------------------------------

/// What a session runs once connected: one simple query, one extended query with the `int4`
/// value 1 for `$1`, and one row stream read to its end.
#[derive(Debug, Clone, Copy)]
pub struct Script {
    /// For `simple_query`.
    pub simple: &'static str,
    /// For `query`, with one parameter.
    pub extended: &'static str,
    /// For `query_stream`.
    pub stream: &'static str,
    /// For `copy_out`.
    pub copy: &'static str,
}

/// The script of the `connection` target. tests/record_corpus.rs records real servers
/// answering it (and other scripts of the same shape) for the seed corpus.
pub const FUZZ_SCRIPT: Script = Script {
    simple: "SELECT 1 AS one, NULL AS nothing, 'drei ü' AS text",
    extended: "SELECT $1::int4 AS n, 'x'::text AS t",
    stream: "SELECT generate_series(1, 3)",
    copy: "COPY (SELECT 1, 'x') TO STDOUT",
};

/// First byte of a `connection` input's flags: run with the statement cache off.
pub const NO_STATEMENT_CACHE: u8 = 1;

/// A connection that does not finish within this time is hung: the fake server closes its
/// side after its last byte, so every read ends, one way or another.
const HANG_LIMIT: Duration = Duration::from_secs(5);

/// What one step of a session gave: the rows (each rendered as text) or the error's kind.
pub type Step = Result<Vec<String>, ErrorKind>;

/// What a whole session gave: whether it connected, then each step of the script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOutcome {
    /// `Ok` once startup and authentication succeeded.
    pub connect: Result<(), ErrorKind>,
    /// The simple query, the extended query and the stream, in order (empty if not connected).
    pub steps: Vec<Step>,
}

/// The settings of the fuzzed client: a user and a password, so that cleartext, MD5 and SCRAM
/// requests can all be answered.
pub fn fuzz_config() -> Config {
    let mut config = Config::new();
    config
        .user("fuzz")
        .password("fuzz-secret ü")
        .dbname("fuzz")
        .application_name("pgengine-fuzz");
    config
}

/// Connects over `stream` and runs `script`, recording what each step gave. Asserts after each
/// step that the connection's state agrees with the result: a request that succeeded leaves it
/// usable, an I/O, protocol or closed error leaves it broken (the stream cannot be trusted),
/// and a usable connection owes no answers. Every column of every row is decoded.
pub async fn client_session(
    stream: impl Transport,
    config: &Config,
    script: &Script,
    flags: u8,
) -> SessionOutcome {
    let mut conn = match Connection::connect_stream(stream, config).await {
        Ok(conn) => conn,
        Err(e) => {
            return SessionOutcome {
                connect: Err(e.kind()),
                steps: Vec::new(),
            };
        }
    };
    if flags & NO_STATEMENT_CACHE != 0 {
        conn.set_statement_cache_capacity(0);
    }
    let mut steps = Vec::new();

    let simple = conn.simple_query(script.simple).await.map(|results| {
        let _ = format!("{results:?}");
        results
            .iter()
            .flat_map(|r| r.rows().iter().map(simple_row_text))
            .collect()
    });
    steps.push(step(&mut conn, simple, "simple_query"));

    let extended = conn
        .query((script.extended, (1i32,)))
        .await
        .map(|rows| rows.iter().map(row_text).collect());
    steps.push(step(&mut conn, extended, "query"));

    let streamed = match conn.query_stream(script.stream).await {
        Ok(mut rows) => {
            let mut texts = Vec::new();
            let mut error = None;
            // Read to the end even after an error: the stream must end by itself.
            while let Some(row) = poll_fn(|cx| rows.poll_next_row(cx)).await {
                match row {
                    Ok(row) if error.is_none() => texts.push(row_text(&row)),
                    Ok(_) => panic!("a row stream yielded a row after an error"),
                    Err(e) => {
                        assert!(error.is_none(), "a row stream yielded two errors: {e}");
                        error = Some(e);
                    }
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(texts),
            }
        }
        Err(e) => Err(e),
    };
    steps.push(step(&mut conn, streamed, "query_stream"));

    let copied = match conn.copy_out(script.copy).await {
        Ok(mut data) => {
            let mut chunks = Vec::new();
            let mut error = None;
            // As the row stream: read to the end even after an error.
            while let Some(chunk) = poll_fn(|cx| data.poll_next_data(cx)).await {
                match chunk {
                    Ok(bytes) if error.is_none() => chunks.push(format!("{bytes:?}")),
                    Ok(_) => panic!("a COPY stream yielded data after an error"),
                    Err(e) => {
                        assert!(error.is_none(), "a COPY stream yielded two errors: {e}");
                        error = Some(e);
                    }
                }
            }
            match error {
                Some(e) => Err(e),
                None => Ok(chunks),
            }
        }
        Err(e) => Err(e),
    };
    steps.push(step(&mut conn, copied, "copy_out"));

    // Closing must end too, whatever state the connection is in.
    let _ = conn.close().await;
    SessionOutcome {
        connect: Ok(()),
        steps,
    }
}

fn step(conn: &mut Connection, result: pgengine::Result<Vec<String>>, what: &str) -> Step {
    // What a caller may look at between requests must work in any state.
    let _ = (
        format!("{conn:?}"),
        conn.take_notifications(),
        conn.parameter("TimeZone"),
    );
    if !conn.is_broken() {
        // Every request reads its answers through to the last ReadyForQuery before it
        // returns, successful or not: a usable connection owes nothing, so it is idle exactly
        // when the server said it is outside a transaction.
        assert_eq!(
            conn.is_idle(),
            conn.transaction_status() == TransactionStatus::Idle,
            "{what} returned {} with answers still owed",
            if result.is_ok() { "Ok" } else { "an error" }
        );
    }
    match result {
        Ok(rows) => {
            assert!(
                !conn.is_broken(),
                "{what} succeeded but left the connection broken"
            );
            Ok(rows)
        }
        Err(e) => {
            if matches!(
                e.kind(),
                ErrorKind::Io | ErrorKind::Protocol | ErrorKind::Closed
            ) {
                assert!(
                    conn.is_broken(),
                    "{what} failed with a {} error but left the connection usable: {e}",
                    e.kind()
                );
            }
            Err(e.kind())
        }
    }
}

fn simple_row_text(row: &SimpleRow) -> String {
    (0..row.len())
        .map(|i| match row.try_get(i) {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {}", e.kind()),
        })
        .collect::<Vec<_>>()
        .join("|")
}

fn row_text(row: &Row) -> String {
    // Debug decodes the values of common types itself.
    let _ = format!("{row:?}");
    (0..row.len())
        .map(|i| column_text(row, i))
        .collect::<Vec<_>>()
        .join("|")
}

/// Decodes a column as the first of several Rust types that accepts its type and its bytes,
/// so that the value decoders see the fuzzed bytes too.
fn column_text(row: &Row, i: usize) -> String {
    macro_rules! try_as {
        ($($t:ty),*) => {$(
            if let Ok(v) = row.try_get::<_, Option<$t>>(i) {
                return format!("{v:?}");
            }
        )*};
    }
    try_as!(
        bool,
        i8,
        i16,
        i32,
        i64,
        u32,
        f32,
        f64,
        String,
        Vec<u8>,
        std::time::SystemTime,
        std::net::IpAddr,
        HashMap<String, Option<String>>,
        Vec<Option<bool>>,
        Vec<Option<i16>>,
        Vec<Option<i32>>,
        Vec<Option<i64>>,
        Vec<Option<f64>>,
        Vec<Option<String>>,
        Vec<Option<Vec<u8>>>
    );
    format!("raw {:?}", row.raw(i))
}

thread_local! {
    /// One runtime per thread, made once: building one per input would dominate the run time.
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime can be built");
}

/// Runs one `connection` input and returns the session's outcome. The input is
/// `chunk flags server-bytes…`: the fake server waits for the client's StartupMessage, sends
/// the server bytes (all at once for chunk 0, else in pieces of `chunk` bytes, letting the
/// client run between pieces), then closes its side. An input too short for the header runs
/// with no server bytes at all. Panics if the session hangs.
pub fn run_connection_input(data: &[u8]) -> SessionOutcome {
    let (chunk, flags, server_bytes) = match data {
        [chunk, flags, rest @ ..] => (*chunk, *flags, rest),
        _ => (0, 0, &[][..]),
    };
    RUNTIME.with(|rt| {
        rt.block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let config = fuzz_config();
            let session = client_session(client, &config, &FUZZ_SCRIPT, flags);
            let server = fake_server(server, server_bytes, chunk);
            match tokio::time::timeout(HANG_LIMIT, async { tokio::join!(session, server).0 }).await
            {
                Ok(outcome) => outcome,
                Err(_) => panic!(
                    "HANG: the session did not end within {HANG_LIMIT:?} after the server \
                     closed its side"
                ),
            }
        })
    })
}

/// The `connection` target: any server byte stream, no panic, no hang, consistent state.
pub fn check_connection(data: &[u8]) {
    let _ = run_connection_input(data);
}

async fn fake_server(stream: tokio::io::DuplexStream, script: &[u8], chunk: u8) {
    let (mut rd, mut wr) = tokio::io::split(stream);
    // The StartupMessage has no tag: an Int32 length that counts itself, then the body.
    let mut len = [0u8; 4];
    if rd.read_exact(&mut len).await.is_err() {
        return;
    }
    let len = u32::from_be_bytes(len) as usize;
    let mut body = vec![0u8; len.saturating_sub(4).min(1 << 16)];
    if rd.read_exact(&mut body).await.is_err() {
        return;
    }
    let send = async move {
        let size = if chunk == 0 {
            script.len().max(1)
        } else {
            usize::from(chunk)
        };
        for piece in script.chunks(size) {
            if wr.write_all(piece).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        // Closing our side is what makes every wait of the client end.
        let _ = wr.shutdown().await;
    };
    // Whatever the client sends later is read and dropped, so its writes never block.
    let drain = async move {
        let mut sink = [0u8; 4096];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    };
    tokio::join!(send, drain);
}

// ---------------------------------------------------------------------------------------------
// scram: the SCRAM-SHA-256 client against fuzzed server messages.
// ---------------------------------------------------------------------------------------------

/// The client nonce of every fuzzed exchange; seeds carry server-first-messages extending it.
pub const SCRAM_CLIENT_NONCE: &str = "fuzzClientNonce0123456789";

/// Iteration counts above this are not run: each costs three PBKDF2 runs per input, and
/// MAX_ITERATIONS (10,000,000) would take seconds.
pub const SCRAM_FUZZ_MAX_ITERATIONS: u32 = 4096;

/// Input: `password NUL server-first NUL server-final`. Parses both server messages, then runs
/// a whole exchange with them. When the client accepts the server-first-message, its proof
/// must verify as a server would verify it, and the server-final-message must be accepted if
/// and only if it carries the right server signature.
pub fn check_scram(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let password = parts.next().unwrap_or_default();
    let server_first = parts.next().unwrap_or_default();
    let server_final = parts.next().unwrap_or_default();

    let parsed_first = std::str::from_utf8(server_first).ok().map(|s| {
        parse_server_first(s).map(|p| (p.nonce.to_owned(), p.salt.to_owned(), p.iterations))
    });
    if let Some(Ok((nonce, salt, iterations))) = &parsed_first {
        let text = std::str::from_utf8(server_first).unwrap_or_default();
        assert!(text.starts_with(&format!("r={nonce},s={salt},i=")));
        assert!((1..=MAX_ITERATIONS).contains(iterations));
        if *iterations > SCRAM_FUZZ_MAX_ITERATIONS {
            return;
        }
    }
    let parsed_final = std::str::from_utf8(server_final)
        .ok()
        .map(|s| parse_server_final(s).map(str::to_owned));

    let mut scram =
        ScramSha256::with_nonce(password, Gs2Binding::Unsupported, SCRAM_CLIENT_NONCE.into());
    assert_eq!(
        scram.client_first(),
        format!("n,,n=,r={SCRAM_CLIENT_NONCE}").as_bytes()
    );
    assert!(!scram.is_done());
    // The state machine refuses the messages out of order.
    let mut early = ScramSha256::with_nonce(password, Gs2Binding::Unsupported, "n".into());
    assert!(early.finish(server_final).is_err() && early.is_done());

    let client_final = match scram.update(server_first) {
        Ok(client_final) => client_final,
        Err(_) => {
            assert!(scram.is_done(), "a failed step must end the exchange");
            assert!(scram.update(server_first).is_err());
            assert!(scram.finish(server_final).is_err());
            return;
        }
    };
    // Accepted: it must have been a well-formed message whose nonce extends ours.
    let Some(Ok((nonce, salt, iterations))) = parsed_first else {
        panic!("update accepted a server-first-message that does not parse");
    };
    assert!(nonce.starts_with(SCRAM_CLIENT_NONCE) && nonce.len() > SCRAM_CLIENT_NONCE.len());
    assert!(!scram.is_done());

    let client_final = String::from_utf8(client_final).expect("client-final is ASCII");
    let without_proof = format!("c=biws,r={nonce}");
    let proof = client_final
        .strip_prefix(&format!("{without_proof},p="))
        .unwrap_or_else(|| panic!("malformed client-final-message {client_final:?}"));
    let proof = BASE64_STANDARD.decode(proof).expect("the proof is base64");
    assert_eq!(proof.len(), 32);

    // What the server computes (RFC 5802 §3), for passwords SASLprep leaves as they are.
    let expected_signature = printable_ascii(password).then(|| {
        let salt = BASE64_STANDARD
            .decode(&salt)
            .expect("update checked the salt");
        let salted = scram_hi(password, &salt, iterations);
        let client_key = scram_hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(client_key).into();
        let server_first = std::str::from_utf8(server_first).expect("it parsed");
        let auth_message = format!("n=,r={SCRAM_CLIENT_NONCE},{server_first},{without_proof}");
        let client_signature = scram_hmac(&stored_key, auth_message.as_bytes());
        let recovered: Vec<u8> = proof
            .iter()
            .zip(client_signature)
            .map(|(p, s)| p ^ s)
            .collect();
        let recovered_stored: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&recovered).into();
        assert_eq!(
            recovered_stored, stored_key,
            "the client proof does not verify"
        );
        scram_hmac(&scram_hmac(&salted, b"Server Key"), auth_message.as_bytes())
    });

    let accepted = scram.finish(server_final).is_ok();
    assert!(scram.is_done());
    assert!(
        scram.finish(server_final).is_err(),
        "an exchange finished twice"
    );
    if let Some(expected) = expected_signature {
        let right = matches!(&parsed_final, Some(Ok(v))
            if BASE64_STANDARD.decode(v).is_ok_and(|v| v == expected));
        assert_eq!(
            accepted, right,
            "server-final {server_final:?} wrongly judged"
        );

        // And the right server-final-message, on a fresh exchange, is accepted.
        let mut fresh =
            ScramSha256::with_nonce(password, Gs2Binding::Unsupported, SCRAM_CLIENT_NONCE.into());
        fresh
            .update(server_first)
            .expect("accepted once, accepted again");
        let good = format!("v={}", BASE64_STANDARD.encode(expected));
        fresh
            .finish(good.as_bytes())
            .expect("the right signature is accepted");
    }
}

const BASE64_STANDARD: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// SASLprep maps printable ASCII to itself, so the server-side computation can use the bytes.
fn printable_ascii(password: &[u8]) -> bool {
    !password.is_empty() && password.iter().all(|b| (0x20..0x7f).contains(b))
}

fn scram_hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(key).expect("HMAC takes keys of any size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// Hi() of RFC 5802, written out independently of pgengine's.
fn scram_hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = scram_hmac(password, &block);
    let mut out = u;
    for _ in 1..iterations {
        u = scram_hmac(password, &u);
        for (o, x) in out.iter_mut().zip(u) {
            *o ^= x;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// conninfo: connection strings and the password file.
// ---------------------------------------------------------------------------------------------

/// Two passwords of the same shape (same length and character classes), so a connection
/// string parses the same with either: whatever differs between the two results depends on
/// the password's value, which only `get_password` may show.
const PASSWORD_A: [&str; 3] = ["Secret1x", "'Secret1x'", "Sec\\ret1x"];
const PASSWORD_B: [&str; 3] = ["Hidden2y", "'Hidden2y'", "Hid\\den2y"];
const PASSWORD_A_URL: [&str; 3] = ["Secret1x", "%53ecret1x", "Secre%741x"];
const PASSWORD_B_URL: [&str; 3] = ["Hidden2y", "%48idden2y", "Hidde%6e2y"];

/// Input: a mode byte, then text. Mode bit 7 selects the password file; otherwise bits 0-1
/// place a password in the connection string (0: nowhere, 1: `password=` first, 2: in a URL's
/// user info, 3: in a URL's query) and bits 2-3 spell it (plain, quoted/percent-encoded,
/// escaped).
pub fn check_conninfo(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    if mode & 0x80 != 0 {
        check_pgpass(&text);
        return;
    }
    let spelling = usize::from((mode >> 2) & 3) % 3;
    let place = mode & 3;
    let with = |password: &str, url_password: &str| match place {
        0 => text.to_string(),
        1 => format!("password={password} {text}"),
        2 => format!("postgresql://u:{url_password}@{text}"),
        _ => {
            let sep = if text.contains('?') { '&' } else { '?' };
            format!("{text}{sep}password={url_password}")
        }
    };
    let input_a = with(PASSWORD_A[spelling], PASSWORD_A_URL[spelling]);
    let input_b = with(PASSWORD_B[spelling], PASSWORD_B_URL[spelling]);
    let a = Config::parse(&input_a);
    if let Ok(config) = &a {
        check_config_debug(config);
    }
    if place == 0 {
        return;
    }
    let b = Config::parse(&input_b);
    match (&a, &b) {
        (Ok(ca), Ok(cb)) => {
            let is = |c: &Config, p: &str| c.get_password() == Some(p.as_bytes());
            if is(ca, "Secret1x") && is(cb, "Hidden2y") {
                assert_eq!(
                    format!("{ca:?}"),
                    format!("{cb:?}"),
                    "Debug of a Config depends on its password: {input_a:?}"
                );
            }
        }
        (Err(ea), Err(eb)) => {
            // With the password first (place 1 and 2) nothing else can take it in, so an
            // error that names it leaks it.
            if place != 3 {
                let (ea, eb) = (ea.to_string(), eb.to_string());
                for (secret, msg, other) in [("Secret1x", &ea, &eb), ("Hidden2y", &eb, &ea)] {
                    assert!(
                        !msg.contains(secret) || other.contains(secret),
                        "an error message shows the password: {msg:?} for {input_a:?}"
                    );
                }
                assert_eq!(
                    ea.replace("Hidden2y", "Secret1x"),
                    eb.replace("Hidden2y", "Secret1x"),
                    "the error depends on the password's value"
                );
            }
        }
        _ => panic!(
            "the password's value decided whether {input_a:?} parses: {:?} vs {:?}",
            a.as_ref().err().map(ToString::to_string),
            b.as_ref().err().map(ToString::to_string)
        ),
    }
}

/// Debug of a Config must not depend on the password: replacing it changes nothing.
fn check_config_debug(config: &Config) {
    let shown = format!("{config:?}");
    if config.get_password().is_some() {
        let mut other = config.clone();
        other.password("zz-other-password-zz");
        assert_eq!(
            shown,
            format!("{other:?}"),
            "Debug of a Config shows its password"
        );
    }
}

/// Input fields, NUL-separated: `contents host port dbname user password`. Looks up the
/// arbitrary contents, then a line made from the other fields (escaped as the file format
/// requires) put first: that lookup must return the password exactly.
fn check_pgpass(text: &str) {
    let mut fields = text.split('\0');
    let mut next = || fields.next().unwrap_or_default();
    let (contents, host, port, dbname, user, password) =
        (next(), next(), next(), next(), next(), next());
    let port: u16 = port.parse().unwrap_or(5432);
    let _ = pgpass_lookup(contents, host, port, dbname, user);

    let line_safe = |s: &str| !s.contains(['\n', '\r']);
    if host.is_empty()
        || dbname.is_empty()
        || user.is_empty()
        || ![host, dbname, user, password].into_iter().all(line_safe)
    {
        return;
    }
    let escape = |s: &str| {
        let mut out = String::new();
        for c in s.chars() {
            if matches!(c, ':' | '\\') {
                out.push('\\');
            }
            out.push(c);
        }
        out
    };
    // A leading '#' would make the line a comment; escaped, it is a literal '#'.
    let host_field = match escape(host) {
        h if h.starts_with('#') => format!("\\{h}"),
        h => h,
    };
    let line = format!(
        "{host_field}:{port}:{}:{}:{}\n{contents}",
        escape(dbname),
        escape(user),
        escape(password)
    );
    assert_eq!(
        pgpass_lookup(&line, host, port, dbname, user).as_deref(),
        Some(password),
        "the first matching line's password, escaped, does not come back: {line:?}"
    );
}
