//! # pgengine
//!
//! An async PostgreSQL engine for Rust, built on its own implementation of the PostgreSQL
//! frontend/backend wire protocol (version 3.0, and 3.2 when asked for).
//!
//! The crate is layered, lowest first; a lower layer never names a higher one:
//!
//! - `protocol`: bytes in, bytes out. Every message's encoder and decoder, framing with a
//!   length limit, and the authentication exchanges (MD5, SCRAM-SHA-256, SCRAM-SHA-256-PLUS's
//!   channel binding hash) as pure state machines. No I/O, no tokio. Private: with the
//!   feature `unstable-protocol` it is public as `pgengine::protocol` for tests, fuzzing and
//!   tools that speak the protocol themselves, **outside semver** (a new message or field may
//!   come in any release).
//! - [`config`]: connection settings from libpq-style URLs and `key=value` strings, the `PG*`
//!   environment variables and the `.pgpass` file.
//! - [`connection`]: one socket (TCP, Unix, or any stream): TLS (rustls, libpq's `sslmode`s),
//!   startup, authentication, the simple and extended query protocols, COPY in and out, the
//!   statement cache, catalog type lookups, the server's `ReadyForQuery` transaction status,
//!   cancellation, query timeouts, and draining an abandoned request before the connection's
//!   next use.
//! - [`pool`]: a connection pool whose core knows nothing of PostgreSQL, its PostgreSQL seam,
//!   and the pipelined mode that carries many tasks' queries over shared connections.
//! - [`engine`]: [`PostgresEngine`], the object an application shares: settings, extensions,
//!   read-replica nodes, query logging and its own pool.
//! - [`listen`]: [`Listener`], LISTEN/NOTIFY on a connection of its own that reconnects and
//!   re-LISTENs after a loss, and says that notifications may have been missed.
//! - [`transaction`], [`savepoint`], [`atomic`], [`batch`]: Piccolo's concepts —
//!   [`PostgresTransaction`] driven by ReadyForQuery, [`Savepoint`], all-or-nothing
//!   [`Atomic`](atomic::Atomic) runs in one round trip, and [`AsyncBatch`](batch::AsyncBatch)
//!   over a native portal.
//! - [`row`], [`query`], [`types`]: rows decoded lazily through `postgres-types`, queries and
//!   their parameters, and the value types postgres-types lacks; [`from_row`]: whole rows into
//!   tuples and, with the `derive` feature, structs (`#[derive(FromRow)]`, and postgres-types'
//!   `#[derive(ToSql, FromSql)]` for enums and composite types). Beside them, the private `sql`
//!   module reads SQL text as the server lexes it: placeholders, and whether a statement
//!   controls the transaction or changes the session (the engine routes on it).
//! - [`client`]: [`Client`], the one trait every query runner implements (engines and their
//!   nodes, transactions, savepoints, connections), with the same methods and query forms;
//!   [`from_row`]'s [`FromRow`] turns its rows into tuples and derived structs.
//! - [`retry`], [`freshness`]: transactions (and Atomic runs) tried again when a new attempt
//!   can fix their failure, with the outcome of a COMMIT whose answer was lost found out from
//!   the server; replica reads that wait for the reader's own writes or keep under a lag bound.
//! - [`error`]: the one [`Error`] type, with a [`ErrorKind`] a caller can match on and every
//!   field of a server error.
//! - `testing` (feature `testing`): `testing::TempCluster`, a throwaway PostgreSQL cluster
//!   for tests, examples and benchmarks.
//!
//! ```no_run
//! # async fn demo() -> pgengine::Result<()> {
//! use pgengine::{Config, Connection};
//!
//! let config: Config = "postgres://app@localhost/appdb".parse()?;
//! let mut conn = Connection::connect(&config).await?;
//! let results = conn.simple_query("SELECT 1; SELECT 'two'").await?;
//! assert_eq!(results.len(), 2);
//! conn.close().await?;
//! # Ok(())
//! # }
//! ```

#![warn(missing_docs)]

pub mod atomic;
pub mod batch;
pub mod client;
pub mod config;
pub mod connection;
pub mod engine;
pub mod error;
pub mod freshness;
pub mod from_row;
pub mod listen;
mod outcome;
pub mod pool;
#[cfg(feature = "unstable-protocol")]
pub mod protocol;
// Without the feature the codec is the crate's own business; the test-server half of it
// (encoding what a server sends) is then unused.
#[cfg(not(feature = "unstable-protocol"))]
#[allow(dead_code, unused_imports)]
mod protocol;
pub mod query;
pub mod retry;
pub mod row;
pub mod savepoint;
mod sql;
#[cfg(feature = "testing")]
pub mod testing;
pub mod transaction;
pub mod types;

pub use client::Client;
pub use config::Config;
pub use connection::{
    BinaryCopyInWriter, CancelToken, Connection, ConnectionStats, CopyInSink, CopyOutStream,
    Notification, RowStream, TransactionStatus,
};
pub use engine::PostgresEngine;
pub use error::SqlState;
pub use error::{DbError, Error, ErrorKind, Redacted, Result, TransactionError};
pub use from_row::FromRow;
pub use listen::{ListenEvent, ListenOptions, Listener};
/// `#[derive(FromRow)]` (feature `derive`): see [`FromRow`](trait@FromRow) for its attributes.
#[cfg(feature = "derive")]
pub use pgengine_derive::FromRow;
// With the `derive` feature, `FromSql` and `ToSql` also bring postgres-types' derive macros.
pub use postgres_types::{FromSql, ToSql, Type};
pub use query::{BorrowedParams, Query, ToQuery};
pub use retry::{RetryError, RetryPolicy};
pub use row::{Column, Row, SimpleQueryResult, SimpleRow};
pub use savepoint::Savepoint;
pub use transaction::{
    IsolationLevel, PostgresTransaction, TransactionBuilder, TxConnection, TxState,
};

/// The README's examples, compiled as doctests so that the front page stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
