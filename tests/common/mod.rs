//! Shared by the integration tests: the throwaway cluster of this test binary and shortcuts to
//! connect to it.

#![allow(dead_code)]

use pgengine::testing::TempCluster;
use pgengine::{Config, Connection};

/// The cluster shared by every test in this binary (started on first use, stopped at exit).
pub fn cluster() -> &'static TempCluster {
    TempCluster::shared()
}

/// Settings for `user` over TCP, without a password.
pub fn tcp_config(user: &str) -> Config {
    Config::parse(&cluster().url(user)).expect("the harness URL parses")
}

/// Settings for `user` over the cluster's Unix socket, without a password.
pub fn socket_config(user: &str) -> Config {
    Config::parse(&cluster().socket_conninfo(user)).expect("the harness conninfo parses")
}

/// A connection as the superuser over TCP.
pub async fn connect() -> Connection {
    Connection::connect(&tcp_config(TempCluster::SUPERUSER))
        .await
        .expect("superuser connects")
}
