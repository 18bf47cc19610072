//! A scripted PostgreSQL server on loopback, for exact, deterministic flow and fault tests
//! (after jackc/pgx's `internal/pgmock`): "expect this message, send that one".
//!
//! A test writes a script, a list of [`Step`]s, and starts a [`MockServer`] with it. The server
//! accepts one connection on `127.0.0.1:0` and plays the script against it, in order:
//!
//! - [`Step::Expect`] reads the next client message and checks its kind. The first message of
//!   a connection is untagged (StartupMessage, PostgreSQL docs §55.2.1) and decoded with
//!   `FrontendMessage::decode_startup`; every later one with `FrontendMessage::decode`.
//! - [`Step::Send`] writes a well-formed message, [`Step::SendRaw`] any bytes at all (a
//!   malformed message, a hostile length prefix, half a message).
//! - [`Step::Reply`] writes messages computed from the last client message (e.g. a SCRAM
//!   server-first-message must repeat the client's nonce).
//! - [`Step::Sleep`], [`Step::Wait`] pause; [`Step::Close`] closes the socket; [`Step::Hang`]
//!   stops answering but keeps the socket open until the server is dropped.
//!
//! When the script runs out the server keeps reading and recording until the client closes the
//! socket, so a test can check what the client sent after the scripted part (or that it sent
//! nothing, e.g. no password). Everything the client sent is recorded, both decoded and as raw
//! bytes, in a [`Transcript`].
//!
//! A step that does not match what the client did ends the script: the server records why and
//! closes the socket, and [`MockServer::finish`] fails the test with that reason. A write that
//! fails because the client already hung up also ends the script, but is no failure (see
//! [`Transcript::client_gone_at`]): a hostile script may go on past the point where a correct
//! client gives up.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pgengine::Config;
use pgengine::protocol::{
    Authentication, BackendMessage, DEFAULT_MAX_MESSAGE_LEN, DataRow, FieldDescription,
    FrontendMessage, TransactionStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// The kind of a client message, for [`Step::Expect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Startup,
    SslRequest,
    GssEncRequest,
    CancelRequest,
    /// PasswordMessage, SASLInitialResponse and SASLResponse (all tagged `'p'`).
    Password,
    Query,
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Flush,
    Sync,
    Terminate,
    CopyData,
    CopyDone,
    CopyFail,
}

impl Kind {
    /// The kind of a decoded client message.
    pub fn of(msg: &FrontendMessage) -> Kind {
        match msg {
            FrontendMessage::Startup { .. } => Kind::Startup,
            FrontendMessage::SslRequest => Kind::SslRequest,
            FrontendMessage::GssEncRequest => Kind::GssEncRequest,
            FrontendMessage::CancelRequest { .. } => Kind::CancelRequest,
            FrontendMessage::Password(_) => Kind::Password,
            FrontendMessage::Query(_) => Kind::Query,
            FrontendMessage::Parse { .. } => Kind::Parse,
            FrontendMessage::Bind { .. } => Kind::Bind,
            FrontendMessage::Describe { .. } => Kind::Describe,
            FrontendMessage::Execute { .. } => Kind::Execute,
            FrontendMessage::Close { .. } => Kind::Close,
            FrontendMessage::Flush => Kind::Flush,
            FrontendMessage::Sync => Kind::Sync,
            FrontendMessage::Terminate => Kind::Terminate,
            FrontendMessage::CopyData(_) => Kind::CopyData,
            FrontendMessage::CopyDone => Kind::CopyDone,
            FrontendMessage::CopyFail(_) => Kind::CopyFail,
        }
    }
}

/// Computes the messages of a [`Step::Reply`] from the last message the client sent.
pub type ReplyFn = Box<dyn FnOnce(&FrontendMessage) -> Vec<BackendMessage> + Send>;

/// One step of a script.
// `Send` holds a whole message inline so scripts read `Step::Send(msg)`; a script is a few
// dozen steps, so the size of each does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// Read the next client message and fail the script unless it is of this kind.
    Expect(Kind),
    /// Write one message.
    Send(BackendMessage),
    /// Write these bytes exactly as they are.
    SendRaw(Vec<u8>),
    /// Write the messages computed from the last client message.
    Reply(ReplyFn),
    /// Wait this long.
    Sleep(Duration),
    /// Wait until the test calls `notify_one` on this (a permit given earlier counts), so a
    /// test can order the server's next move after something the client did or did not do.
    Wait(Arc<Notify>),
    /// Close the socket; the script ends here.
    Close,
    /// Stop answering and stop reading, but keep the socket open until the server is dropped.
    Hang,
}

impl std::fmt::Debug for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Expect(k) => write!(f, "Expect({k:?})"),
            Step::Send(m) => write!(f, "Send({:?})", m.tag() as char),
            Step::SendRaw(b) => write!(f, "SendRaw({} bytes)", b.len()),
            Step::Reply(_) => f.write_str("Reply"),
            Step::Sleep(d) => write!(f, "Sleep({d:?})"),
            Step::Wait(_) => f.write_str("Wait"),
            Step::Close => f.write_str("Close"),
            Step::Hang => f.write_str("Hang"),
        }
    }
}

/// Joins script parts: `script([trust_login(), vec![Step::Expect(Kind::Query), …]])`.
pub fn script(parts: impl IntoIterator<Item = Vec<Step>>) -> Vec<Step> {
    parts.into_iter().flatten().collect()
}

/// What the client sent, as far as the server read it.
#[derive(Debug, Clone, Default)]
pub struct Transcript {
    /// Every client message decoded, in order (those read by `Expect` and those read after
    /// the script ended).
    pub messages: Vec<FrontendMessage>,
    /// Every byte the client sent, in order.
    pub raw: Vec<u8>,
    /// Why the script stopped early, if it did.
    pub failure: Option<String>,
    /// True once the script ran to its end (or to `Close` / `Hang`).
    pub completed: bool,
    /// The step at which the script stopped because the client had closed the socket and a
    /// write failed. Not a failure: a hostile script often goes on past the point where a
    /// correct client gives up, and whether the client's close or the server's write comes
    /// first is a race.
    pub client_gone_at: Option<String>,
}

impl Transcript {
    /// The kinds of the client's messages, in order.
    pub fn kinds(&self) -> Vec<Kind> {
        self.messages.iter().map(Kind::of).collect()
    }

    /// True if the raw bytes contain `needle` anywhere.
    pub fn raw_contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.raw.windows(needle.len()).any(|w| w == needle)
    }
}

/// A scripted server listening on loopback for one connection.
pub struct MockServer {
    addr: SocketAddr,
    transcript: Arc<Mutex<Transcript>>,
    task: Option<JoinHandle<()>>,
}

impl MockServer {
    /// Binds `127.0.0.1:0` and plays `script` against the first client that connects.
    pub async fn start(script: Vec<Step>) -> MockServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("the mock server binds a loopback port");
        let addr = listener
            .local_addr()
            .expect("a bound listener has an address");
        let transcript = Arc::new(Mutex::new(Transcript::default()));
        let record = transcript.clone();
        let task = tokio::spawn(async move {
            let (socket, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    record.lock().unwrap().failure = Some(format!("accept failed: {e}"));
                    return;
                }
            };
            drop(listener);
            let mut conn = Session {
                socket,
                buf: BytesMut::new(),
                started: false,
                last: None,
                client_gone: false,
                record,
            };
            conn.run(script).await;
        });
        MockServer {
            addr,
            transcript,
            task: Some(task),
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The port the server listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Settings to reach this server as user `u` with password `p` (connect_timeout 2 s).
    pub fn config(&self) -> Config {
        self.config_with("user=u password=p connect_timeout=2")
    }

    /// Settings to reach this server with other `key=value` settings than [`MockServer::config`]
    /// (host and port are added here).
    /// Plain text unless the settings name an `sslmode`: scripts start at the
    /// StartupMessage, and the default `prefer` would send an SSLRequest first.
    pub fn config_with(&self, settings: &str) -> Config {
        let tls = if settings.contains("sslmode=") {
            ""
        } else {
            "sslmode=disable "
        };
        Config::parse(&format!(
            "host=127.0.0.1 port={} {tls}{settings}",
            self.addr.port()
        ))
        .expect("the mock server's settings parse")
    }

    /// What the client has sent so far, without waiting for the script.
    pub fn transcript(&self) -> Transcript {
        self.transcript.lock().unwrap().clone()
    }

    /// Waits for the script to end — after its last step the server reads until the client
    /// closes the socket, so drop the client first — and returns the transcript. Fails the
    /// test if the script stopped early, or did not end within 10 seconds.
    pub async fn finish(mut self) -> Transcript {
        let task = self.task.take().expect("finish is called once");
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            panic!(
                "mock server: the script did not end within 10 s (is the client still \
                 connected, or did the script end in Hang?); transcript so far: {:?}",
                self.transcript().kinds()
            );
        }
        let t = self.transcript();
        if let Some(failure) = &t.failure {
            panic!("mock server: the script stopped early: {failure}");
        }
        t
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        // A script that ended in Hang (or is still waiting) holds the socket until now.
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// The server's side of the one connection.
struct Session {
    socket: TcpStream,
    /// Bytes read but not yet decoded.
    buf: BytesMut,
    /// True once the untagged startup-phase message has been read.
    started: bool,
    /// The last client message, for `Reply`.
    last: Option<FrontendMessage>,
    /// Set when a write failed because the client had closed the socket.
    client_gone: bool,
    record: Arc<Mutex<Transcript>>,
}

impl Session {
    async fn run(&mut self, script: Vec<Step>) {
        for (i, step) in script.into_iter().enumerate() {
            let what = format!("step {i} ({step:?})");
            let r = match step {
                Step::Expect(kind) => self.expect(kind).await,
                Step::Send(msg) => {
                    let mut out = BytesMut::new();
                    match msg.encode(&mut out) {
                        Ok(()) => self.write(&out).await,
                        Err(e) => Err(format!("cannot encode the message: {e}")),
                    }
                }
                Step::SendRaw(bytes) => self.write(&bytes).await,
                Step::Reply(reply) => match self.last.as_ref() {
                    Some(last) => {
                        let mut out = BytesMut::new();
                        let mut r = Ok(());
                        for msg in reply(last) {
                            if let Err(e) = msg.encode(&mut out) {
                                r = Err(format!("cannot encode the reply: {e}"));
                            }
                        }
                        match r {
                            Ok(()) => self.write(&out).await,
                            Err(e) => Err(e),
                        }
                    }
                    None => Err("Reply before any client message".to_owned()),
                },
                Step::Sleep(d) => {
                    tokio::time::sleep(d).await;
                    Ok(())
                }
                Step::Wait(gate) => {
                    gate.notified().await;
                    Ok(())
                }
                Step::Close => {
                    self.record.lock().unwrap().completed = true;
                    // Closing a socket with unread bytes in it makes the kernel send a reset
                    // instead of a clean end of stream: read (and record) them first.
                    self.read_available();
                    let _ = self.socket.shutdown().await;
                    return;
                }
                Step::Hang => {
                    self.record.lock().unwrap().completed = true;
                    std::future::pending::<()>().await;
                    return;
                }
            };
            if let Err(e) = r {
                let mut record = self.record.lock().unwrap();
                if self.client_gone {
                    record.client_gone_at = Some(what);
                } else {
                    record.failure = Some(format!("{what}: {e}"));
                }
                return;
            }
        }
        self.record.lock().unwrap().completed = true;
        self.drain().await;
    }

    async fn write(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.socket.write_all(bytes).await.map_err(|e| {
            use std::io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
            self.client_gone = matches!(e.kind(), BrokenPipe | ConnectionReset | ConnectionAborted);
            format!("write failed: {e}")
        })
    }

    /// Reads more bytes from the client, recording them; `Ok(false)` at end of stream.
    async fn fill(&mut self) -> Result<bool, String> {
        let mut chunk = [0u8; 8192];
        let n = match self.socket.read(&mut chunk).await {
            Ok(n) => n,
            // A client that gives up may reset the connection instead of closing it.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => return Err(format!("read failed: {e}")),
        };
        self.buf.extend_from_slice(&chunk[..n]);
        self.record
            .lock()
            .unwrap()
            .raw
            .extend_from_slice(&chunk[..n]);
        Ok(n > 0)
    }

    /// Records whatever the client has sent that is already here, without waiting.
    fn read_available(&mut self) {
        let mut chunk = [0u8; 8192];
        while let Ok(n) = self.socket.try_read(&mut chunk) {
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&chunk[..n]);
            self.record
                .lock()
                .unwrap()
                .raw
                .extend_from_slice(&chunk[..n]);
        }
    }

    /// Decodes the next client message from the buffer, if it is all there.
    fn decode(&mut self) -> Result<Option<FrontendMessage>, String> {
        let r = if self.started {
            FrontendMessage::decode(&mut self.buf, DEFAULT_MAX_MESSAGE_LEN)
        } else {
            FrontendMessage::decode_startup(&mut self.buf)
        };
        r.map_err(|e| format!("the client sent a malformed message: {e}"))
    }

    /// Reads the next whole client message; `Ok(None)` if the client closed first.
    async fn next_message(&mut self) -> Result<Option<FrontendMessage>, String> {
        loop {
            if let Some(msg) = self.decode()? {
                // SSLRequest and GSSENCRequest come before the StartupMessage, still untagged.
                if !matches!(
                    msg,
                    FrontendMessage::SslRequest | FrontendMessage::GssEncRequest
                ) {
                    self.started = true;
                }
                self.record.lock().unwrap().messages.push(msg.clone());
                self.last = Some(msg.clone());
                return Ok(Some(msg));
            }
            if !self.fill().await? {
                return Ok(None);
            }
        }
    }

    async fn expect(&mut self, kind: Kind) -> Result<(), String> {
        loop {
            let Some(msg) = self.next_message().await? else {
                return Err(format!(
                    "expected {kind:?}, but the client closed the connection"
                ));
            };
            let got = Kind::of(&msg);
            // A client may ask for encryption before its StartupMessage: this server does
            // not speak TLS or GSSAPI and says so with 'N', as a real server without them.
            if kind == Kind::Startup && matches!(got, Kind::SslRequest | Kind::GssEncRequest) {
                self.write(b"N").await?;
                continue;
            }
            if got != kind {
                return Err(format!("expected {kind:?}, got {msg:?}"));
            }
            return Ok(());
        }
    }

    /// After the script: record whatever the client still sends until it closes the socket.
    async fn drain(&mut self) {
        loop {
            match self.decode() {
                Ok(Some(msg)) => {
                    self.record.lock().unwrap().messages.push(msg);
                    continue;
                }
                Ok(None) => {}
                // Undecodable: keep recording raw bytes only.
                Err(_) => self.buf.clear(),
            }
            match self.fill().await {
                Ok(true) => {}
                Ok(false) | Err(_) => return,
            }
        }
    }
}

// ---- Messages -------------------------------------------------------------------------------

/// The bytes of one message as a server would send it.
pub fn encode(msg: &BackendMessage) -> Vec<u8> {
    let mut out = BytesMut::new();
    msg.encode(&mut out).expect("the message encodes");
    out.to_vec()
}

/// A tagged message with the given body and a correct length.
pub fn framed(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = header(tag, body.len() as i32 + 4);
    out.extend_from_slice(body);
    out
}

/// Just a tag and a length field: what follows is up to the test.
pub fn header(tag: u8, len: i32) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// One column of a RowDescription with a built-in type and a format (0 text, 1 binary).
pub fn field(name: &str, type_oid: u32, format: i16) -> FieldDescription {
    FieldDescription {
        name: name.to_owned(),
        table_oid: 0,
        column_id: 0,
        type_oid,
        type_size: -1,
        type_modifier: -1,
        format,
    }
}

/// The OID of `text`.
pub const TEXT: u32 = 25;
/// The OID of `int4`.
pub const INT4: u32 = 23;

/// A RowDescription of text columns (as the simple query protocol returns them).
pub fn text_columns(names: &[&str]) -> BackendMessage {
    BackendMessage::RowDescription(names.iter().map(|n| field(n, TEXT, 0)).collect())
}

/// A RowDescription of binary int4 columns (as the extended protocol returns them to us).
pub fn int4_columns(names: &[&str]) -> BackendMessage {
    BackendMessage::RowDescription(names.iter().map(|n| field(n, INT4, 1)).collect())
}

/// A DataRow of text values (`None` for NULL).
pub fn text_row(values: &[Option<&str>]) -> BackendMessage {
    BackendMessage::DataRow(
        values
            .iter()
            .map(|v| v.map(|s| Bytes::copy_from_slice(s.as_bytes())))
            .collect::<DataRow>(),
    )
}

/// A DataRow of binary int4 values.
pub fn int4_row(values: &[i32]) -> BackendMessage {
    BackendMessage::DataRow(
        values
            .iter()
            .map(|v| Some(Bytes::copy_from_slice(&v.to_be_bytes())))
            .collect::<DataRow>(),
    )
}

/// CommandComplete with a tag such as `"SELECT 2"`.
pub fn command_complete(tag: &str) -> BackendMessage {
    BackendMessage::CommandComplete(bytes::Bytes::from(tag.to_owned()))
}

/// ReadyForQuery with the given transaction status.
pub fn ready(status: TransactionStatus) -> BackendMessage {
    BackendMessage::ReadyForQuery(status)
}

/// The body of an ErrorResponse or NoticeResponse with severity, SQLSTATE and message.
fn error_fields(severity: &str, code: &str, message: &str) -> Bytes {
    fields_body(&[
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', message),
    ])
}

/// The body of an ErrorResponse or NoticeResponse with exactly these fields.
fn fields_body(fields: &[(u8, &str)]) -> Bytes {
    let mut body = Vec::new();
    for (ty, value) in fields {
        body.push(*ty);
        body.extend_from_slice(value.as_bytes());
        body.push(0);
    }
    body.push(0);
    Bytes::from(body)
}

/// An ErrorResponse with exactly these `(field type, value)` pairs (e.g. a localised `S`
/// beside the never-localised `V`).
pub fn error_response_fields(fields: &[(u8, &str)]) -> BackendMessage {
    BackendMessage::decode(b'E', fields_body(fields)).expect("the ErrorResponse decodes")
}

/// An ErrorResponse. (`DbError` has no public constructor, so it is decoded from its bytes.)
pub fn error_response(severity: &str, code: &str, message: &str) -> BackendMessage {
    BackendMessage::decode(b'E', error_fields(severity, code, message))
        .expect("the ErrorResponse decodes")
}

/// A NoticeResponse.
pub fn notice(severity: &str, code: &str, message: &str) -> BackendMessage {
    BackendMessage::decode(b'N', error_fields(severity, code, message))
        .expect("the NoticeResponse decodes")
}

/// A ParameterStatus.
pub fn parameter(name: &str, value: &str) -> BackendMessage {
    BackendMessage::ParameterStatus {
        name: name.to_owned(),
        value: value.to_owned(),
    }
}

/// An Authentication message.
pub fn auth(a: Authentication) -> BackendMessage {
    BackendMessage::Authentication(a)
}

// ---- Script prefixes ------------------------------------------------------------------------

/// The process id the scripted server reports in BackendKeyData.
pub const PROCESS_ID: i32 = 4242;

/// What a server sends after a successful authentication, up to the first ReadyForQuery
/// (§55.2.1): ParameterStatus for server_version and client_encoding, BackendKeyData, and
/// ReadyForQuery Idle. AuthenticationOk itself is not included.
pub fn after_auth() -> Vec<Step> {
    vec![
        Step::Send(parameter("server_version", "16.4")),
        Step::Send(parameter("client_encoding", "UTF8")),
        Step::Send(BackendMessage::BackendKeyData {
            process_id: PROCESS_ID,
            secret_key: Bytes::from_static(&[1, 2, 3, 4]),
        }),
        Step::Send(ready(TransactionStatus::Idle)),
    ]
}

/// A server with `trust` authentication: StartupMessage in, AuthenticationOk and
/// [`after_auth`] out.
pub fn trust_login() -> Vec<Step> {
    script([
        vec![
            Step::Expect(Kind::Startup),
            Step::Send(auth(Authentication::Ok)),
        ],
        after_auth(),
    ])
}

/// The salt of [`md5_request`].
pub const MD5_SALT: [u8; 4] = *b"s4lt";

/// StartupMessage in, AuthenticationMD5Password out (the client's answer is up to the test).
pub fn md5_request() -> Vec<Step> {
    vec![
        Step::Expect(Kind::Startup),
        Step::Send(auth(Authentication::Md5Password { salt: MD5_SALT })),
    ]
}

/// StartupMessage in, AuthenticationSASL offering SCRAM-SHA-256 out (the client's
/// SASLInitialResponse is up to the test).
pub fn sasl_request() -> Vec<Step> {
    vec![
        Step::Expect(Kind::Startup),
        Step::Send(auth(Authentication::Sasl(vec!["SCRAM-SHA-256".to_owned()]))),
    ]
}

/// The client nonce from a SASLInitialResponse (`n,,n=,r=<nonce>`).
pub fn client_nonce(msg: &FrontendMessage) -> String {
    let FrontendMessage::Password(body) = msg else {
        panic!("not a SASLInitialResponse: {msg:?}");
    };
    let (_, data) =
        FrontendMessage::sasl_initial_response(body).expect("a well-formed SASLInitialResponse");
    let data = String::from_utf8(data.expect("client-first-message").to_vec())
        .expect("client-first-message is UTF-8");
    data.rsplit_once("r=")
        .expect("client-first-message has a nonce")
        .1
        .to_owned()
}

/// A [`Step::Reply`] to a SASLInitialResponse with the server-first-message built by `make`
/// from the client's nonce. Few iterations: nothing here is secret, and tests stay fast.
pub fn reply_server_first(make: impl FnOnce(&str) -> String + Send + 'static) -> Step {
    Step::Reply(Box::new(move |msg| {
        let first = make(&client_nonce(msg));
        vec![auth(Authentication::SaslContinue(Bytes::from(first)))]
    }))
}

/// A simple query's start: Query in, RowDescription out.
pub fn simple_query_start(columns: BackendMessage) -> Vec<Step> {
    vec![Step::Expect(Kind::Query), Step::Send(columns)]
}

/// An uncached extended query's start: the client's one-write pipeline (Parse, Describe, Bind,
/// Execute, Sync) in; ParseComplete, ParameterDescription (no parameters), the row description
/// and BindComplete out. Rows are up to the test.
pub fn extended_query_start(columns: BackendMessage) -> Vec<Step> {
    vec![
        Step::Expect(Kind::Parse),
        Step::Expect(Kind::Describe),
        Step::Expect(Kind::Bind),
        Step::Expect(Kind::Execute),
        Step::Expect(Kind::Sync),
        Step::Send(BackendMessage::ParseComplete),
        Step::Send(BackendMessage::ParameterDescription(Vec::new())),
        Step::Send(columns),
        Step::Send(BackendMessage::BindComplete),
    ]
}
