//! Protocol 3.2 (PostgreSQL 18) against the real server the suite runs on — PostgreSQL 15
//! negotiates down to 3.0, PostgreSQL 18 accepts 3.2 and its 32-byte cancel keys — and the
//! negotiation's edge cases against a scripted server.

mod common;
mod mock;

use std::time::Duration;

use common::tcp_config;
use mock::{Kind, MockServer, Step, after_auth, auth, script};
use pgengine::SqlState;
use pgengine::protocol::{Authentication, BackendMessage, FrontendMessage, frontend};
use pgengine::testing::TempCluster;
use pgengine::{Connection, ErrorKind};

fn server_version_num(conn: &Connection) -> u32 {
    // server_version is reported at startup; "18.1", "15.18 (Debian ...)".
    let text = conn.parameter("server_version").unwrap();
    let major: u32 = text.split(['.', ' ']).next().unwrap().parse().unwrap();
    major
}

#[tokio::test]
async fn latest_protocol_is_negotiated_with_the_real_server() {
    let with = |query: &str| {
        let url = common::cluster().url(TempCluster::SUPERUSER);
        pgengine::Config::parse(&format!("{url}?{query}")).unwrap()
    };
    let plain = Connection::connect(&tcp_config(TempCluster::SUPERUSER))
        .await
        .unwrap();
    assert_eq!(plain.protocol_version(), (3, 0), "3.0 unless asked");
    let major = server_version_num(&plain);

    let mut conn = Connection::connect(&with("max_protocol_version=latest"))
        .await
        .unwrap();
    let expected = if major >= 18 { (3, 2) } else { (3, 0) };
    assert_eq!(conn.protocol_version(), expected, "server {major}");
    eprintln!("server {major}: protocol {:?}", conn.protocol_version());

    // The cancel key of this protocol version works (32 bytes under 3.2).
    let token = conn.cancel_token();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        token.cancel_query().await.unwrap();
    });
    let err = conn.execute("SELECT pg_sleep(30)").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED), "{err}");
    assert_eq!(
        conn.query_one(("SELECT $1::int", (9,)))
            .await
            .unwrap()
            .get::<_, i32>(0),
        9
    );

    // Insisting on 3.2 fails cleanly before PostgreSQL 18.
    match Connection::connect(&with("max_protocol_version=3.2&min_protocol_version=3.2")).await {
        Ok(conn) => {
            assert!(major >= 18);
            assert_eq!(conn.protocol_version(), (3, 2));
        }
        Err(e) => {
            assert!(major < 18, "{e}");
            assert_eq!(e.kind(), ErrorKind::Config, "{e}");
            assert!(e.to_string().contains("min_protocol_version"), "{e}");
        }
    }
}

/// StartupMessage (checked to ask for 3.2) in, NegotiateProtocolVersion out.
fn negotiate(newest_minor: i32, unrecognized: &[&str]) -> Vec<Step> {
    vec![
        Step::Expect(Kind::Startup),
        Step::Send(BackendMessage::NegotiateProtocolVersion {
            newest_minor,
            unrecognized: unrecognized.iter().map(|s| s.to_string()).collect(),
        }),
    ]
}

fn asked_version(t: &mock::Transcript) -> i32 {
    match &t.messages[0] {
        FrontendMessage::Startup { version, .. } => *version,
        other => panic!("not a startup packet: {other:?}"),
    }
}

#[tokio::test]
async fn negotiate_protocol_version_falls_back_to_3_0() {
    let server = MockServer::start(script([
        negotiate(0, &[]),
        vec![Step::Send(auth(Authentication::Ok))],
        after_auth(),
    ]))
    .await;
    let conn = Connection::connect(&server.config_with("user=u max_protocol_version=3.2"))
        .await
        .unwrap();
    assert_eq!(conn.protocol_version(), (3, 0));
    drop(conn);
    let t = server.finish().await;
    assert_eq!(asked_version(&t), frontend::PROTOCOL_3_2);
}

#[tokio::test]
async fn a_bad_negotiation_is_refused() {
    for (newest, unrecognized, settings, kind) in [
        // Offering more than we asked for.
        (5, vec![], "max_protocol_version=3.2", ErrorKind::Protocol),
        (1, vec![], "", ErrorKind::Protocol),
        // Options we never sent.
        (
            0,
            vec!["_pq_.bogus"],
            "max_protocol_version=3.2",
            ErrorKind::Protocol,
        ),
        // Below what we insist on.
        (
            0,
            vec![],
            "max_protocol_version=3.2 min_protocol_version=3.2",
            ErrorKind::Config,
        ),
    ] {
        let server = MockServer::start(negotiate(newest, &unrecognized)).await;
        let err = Connection::connect(&server.config_with(&format!("user=u {settings}")))
            .await
            .expect_err(settings);
        assert_eq!(
            err.kind(),
            kind,
            "3.{newest} {unrecognized:?} {settings}: {err}"
        );
        drop(server);
    }
}

#[tokio::test]
async fn the_whole_version_number_is_understood_too() {
    // What PostgreSQL itself sends: (3 << 16) | 0.
    let server = MockServer::start(script([
        negotiate(3 << 16, &[]),
        vec![Step::Send(auth(Authentication::Ok))],
        after_auth(),
    ]))
    .await;
    let conn = Connection::connect(&server.config_with("user=u max_protocol_version=latest"))
        .await
        .unwrap();
    assert_eq!(conn.protocol_version(), (3, 0));
}
