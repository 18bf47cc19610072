//! Authentication against a real server: every method the harness's pg_hba.conf sets up
//! (trust, password, md5, scram-sha-256), over TCP and the Unix socket, with right and wrong
//! passwords, and passwords from the connection string, PGPASSWORD-style settings and .pgpass.

mod common;

use common::{cluster, socket_config, tcp_config};
use pgengine::SqlState;
use pgengine::testing::TempCluster;
use pgengine::{Config, Connection, ErrorKind};

/// The users whose pg_hba.conf line demands a password, with the method it names.
const PASSWORD_USERS: [(&str, &str); 3] = [
    (TempCluster::PASSWORD_USER, "password"),
    (TempCluster::MD5_USER, "md5"),
    (TempCluster::SCRAM_USER, "scram-sha-256"),
];

/// Connects and asks the server who we are and how we got in (`pg_stat_activity` knows the
/// user; `pg_hba_file_rules` knows the method the user's line demands).
async fn whoami(config: &Config) -> pgengine::Result<String> {
    let mut conn = Connection::connect(config).await?;
    let rows = conn.simple_query("SELECT current_user").await?;
    let user = rows[0].rows()[0]
        .get(0)
        .expect("current_user is not NULL")
        .to_owned();
    conn.close().await?;
    Ok(user)
}

#[tokio::test]
async fn trust_over_tcp_and_socket() {
    for config in [
        tcp_config(TempCluster::SUPERUSER),
        socket_config(TempCluster::SUPERUSER),
    ] {
        assert_eq!(whoami(&config).await.unwrap(), TempCluster::SUPERUSER);
    }
}

#[tokio::test]
async fn every_password_method_with_the_right_password() {
    for (user, method) in PASSWORD_USERS {
        for mut config in [tcp_config(user), socket_config(user)] {
            config.password(TempCluster::PASSWORD);
            let got = whoami(&config)
                .await
                .unwrap_or_else(|e| panic!("{method}: {e}"));
            assert_eq!(got, user, "{method}");
        }
    }
}

#[tokio::test]
async fn every_password_method_with_a_wrong_password_is_28p01() {
    for (user, method) in PASSWORD_USERS {
        for mut config in [tcp_config(user), socket_config(user)] {
            config.password("not the password");
            let err = whoami(&config).await.expect_err(method);
            assert_eq!(err.kind(), ErrorKind::Auth, "{method}: {err}");
            assert_eq!(
                err.code(),
                Some(&SqlState::INVALID_PASSWORD),
                "{method}: {err}"
            );
            assert!(!err.to_string().contains("not the password"), "{err}");
        }
    }
}

#[tokio::test]
async fn a_missing_password_is_a_clear_auth_error() {
    for (user, method) in PASSWORD_USERS {
        let mut config = tcp_config(user);
        // An empty passfile makes sure no ~/.pgpass of the machine answers for us.
        config.passfile("/dev/null");
        let err = whoami(&config).await.expect_err(method);
        assert_eq!(err.kind(), ErrorKind::Auth, "{method}: {err}");
        assert!(err.to_string().contains("password"), "{method}: {err}");
    }
}

#[tokio::test]
async fn password_in_the_url_is_percent_decoded() {
    // The harness password has a space and a non-ASCII letter: both need escaping in a URL.
    for (user, method) in PASSWORD_USERS {
        let url = cluster().url_with_password(user, TempCluster::PASSWORD);
        let config = Config::parse(&url).unwrap();
        assert_eq!(
            whoami(&config)
                .await
                .unwrap_or_else(|e| panic!("{method}: {e}")),
            user
        );
    }
}

#[tokio::test]
async fn password_from_a_pgpass_file() {
    let dir = std::env::temp_dir().join(format!("pgengine-pgpass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("pgpass");
    // ':' and '\' in a password are escaped with '\'; the harness password has neither, so
    // write a first line that must not match (other port) to check matching, then ours.
    let port = cluster().port();
    let contents = format!(
        "# comment\n127.0.0.1:{}:*:{user}:wrong\n127.0.0.1:{port}:*:{user}:{pw}\n",
        port.wrapping_add(1),
        user = TempCluster::SCRAM_USER,
        pw = TempCluster::PASSWORD
    );
    std::fs::write(&file, contents).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let mut config = tcp_config(TempCluster::SCRAM_USER);
    config.passfile(&file);
    assert_eq!(whoami(&config).await.unwrap(), TempCluster::SCRAM_USER);

    // libpq ignores a password file that others can read; so do we.
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = whoami(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Auth, "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unknown_user_and_database_carry_their_sqlstate() {
    // pg_hba.conf trusts everyone else, so the server checks the role and fails with 28000.
    let err = whoami(&tcp_config("no_such_role")).await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    assert_eq!(err.kind(), ErrorKind::Auth);

    let mut config = tcp_config(TempCluster::SUPERUSER);
    config.dbname("no_such_database");
    let err = whoami(&config).await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_DATABASE), "{err}");
    assert_eq!(err.kind(), ErrorKind::Db);
}

#[tokio::test]
async fn refused_connection_is_an_io_error() {
    // Port 1 on loopback: nothing listens there.
    let config = Config::parse("host=127.0.0.1 port=1 user=x connect_timeout=5").unwrap();
    let err = Connection::connect(&config).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io, "{err}");
}

#[tokio::test]
async fn second_host_is_tried_when_the_first_refuses() {
    let url = format!(
        "host=127.0.0.1,127.0.0.1 port=1,{} user={} dbname=postgres",
        cluster().port(),
        TempCluster::SUPERUSER
    );
    let config = Config::parse(&url).unwrap();
    assert_eq!(whoami(&config).await.unwrap(), TempCluster::SUPERUSER);
}

#[tokio::test]
async fn startup_parameters_reach_the_server() {
    let mut config = tcp_config(TempCluster::SUPERUSER);
    config.application_name("pgengine-auth-test");
    config.options("-c search_path=pg_catalog -c statement_timeout=1234");
    let mut conn = Connection::connect(&config).await.unwrap();
    let r = conn
        .simple_query(
            "SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid(); \
             SHOW search_path; SHOW statement_timeout",
        )
        .await
        .unwrap();
    assert_eq!(r[0].rows()[0].get(0), Some("pgengine-auth-test"));
    assert_eq!(r[1].rows()[0].get(0), Some("pg_catalog"));
    assert_eq!(r[2].rows()[0].get(0), Some("1234ms"));
    // ParameterStatus tracking: the server reported these at startup.
    assert_eq!(
        conn.parameter("application_name"),
        Some("pgengine-auth-test")
    );
    assert_eq!(conn.parameter("client_encoding"), Some("UTF8"));
    assert!(
        conn.parameter("server_version")
            .unwrap()
            .starts_with(char::is_numeric)
    );
    assert!(conn.process_id() > 0);
}

#[tokio::test]
async fn debug_output_never_shows_the_password() {
    let url = cluster().url_with_password(TempCluster::SCRAM_USER, TempCluster::PASSWORD);
    let config = Config::parse(&url).unwrap();
    let shown = format!("{config:?}");
    assert!(!shown.contains(TempCluster::PASSWORD), "{shown}");
    let conn = Connection::connect(&config).await.unwrap();
    assert!(!format!("{conn:?}").contains(TempCluster::PASSWORD));
}
