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

/// Log lines, captured whole, for tests that read what was logged.
#[derive(Clone, Default)]
pub struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Everything logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// A subscriber that writes here, at `level` and above.
    pub fn subscriber_at(&self, level: tracing::Level) -> impl tracing::Subscriber + Send + Sync {
        let out = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish()
    }

    /// The same, with a line for every span as it closes (its fields and timings).
    pub fn spans_subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let out = self.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_ansi(false)
            .with_writer(move || out.clone())
            .finish()
    }

    /// A subscriber at DEBUG level.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        self.subscriber_at(tracing::Level::DEBUG)
    }
}
