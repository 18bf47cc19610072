//! [`Client`]: one surface for everything that runs queries, so that code using the database
//! is written once — for an engine (and its nodes), a transaction, a savepoint, a connection
//! from the engine or the pool, a connection of one's own.
//!
//! Every implementor takes every query form ([`ToQuery`]: `&str`, `String`, [`Query`],
//! `(sql, params)` with a tuple or a slice of values), and offers the same methods with the
//! same meaning; where a statement runs is the implementor's business. An engine runs it in
//! the transaction scope of the current task if there is one, otherwise on a connection of
//! its own (pipelined when the pool pipelines); a transaction or a savepoint runs it in the
//! transaction; a connection runs it on itself.
//!
//! ```no_run
//! use pgengine::{Client, PostgresEngine, Result};
//!
//! /// Works on an engine, a transaction, a savepoint or a connection.
//! async fn rename(mut db: impl Client, id: i32, name: &str) -> Result<u64> {
//!     db.execute(("UPDATE band SET name = $2 WHERE id = $1", (id, name))).await
//! }
//!
//! # async fn demo(engine: PostgresEngine, mut conn: pgengine::Connection) -> Result<()> {
//! rename(&engine, 1, "Pythonistas").await?;
//! let tx = engine.begin().await?;
//! rename(&tx, 2, "Rustaceans").await?;
//! tx.commit().await?;
//! rename(&mut conn, 3, "Gophers").await?;
//! # Ok(())
//! # }
//! ```
//!
//! Pass a client by value as above (`&engine`, `&tx`, `&mut conn` are clients), or take
//! `&mut impl Client` to use it again after the call.
//!
//! The trait is generic, so a call through it costs what a direct call costs; it is therefore
//! not object safe (a `dyn Client` would box every call's future). It is sealed: the set of
//! implementors is this crate's, and methods can be added to it without breaking anyone.

use std::borrow::Borrow;
use std::future::Future;

use crate::batch::{AsyncBatch, check_batch};
use crate::connection::{Connection, Lease, RowStream};
use crate::engine::{EngineConnection, PostgresEngine};
use crate::error::Result;
use crate::from_row::FromRow;
#[cfg(doc)]
use crate::query::Query;
use crate::query::ToQuery;
use crate::row::{Row, SimpleQueryResult};
use crate::savepoint::Savepoint;
use crate::transaction::{PostgresTransaction, TxConnection};

mod sealed {
    /// Only this crate's types are clients.
    pub trait Sealed {}
}

/// What runs queries: [`PostgresEngine`] (and its nodes), [`PostgresTransaction`],
/// [`Savepoint`], [`EngineConnection`], [`TxConnection`] and [`Connection`], by value, by
/// shared reference where their methods need no `&mut` (`&PostgresEngine`,
/// `&PostgresTransaction`, `&Savepoint`), and by `&mut`. See the [module](self) docs.
pub trait Client: sealed::Sealed + Send {
    /// Runs a query and returns its rows.
    fn query<Q>(&mut self, query: Q) -> impl Future<Output = Result<Vec<Row>>> + Send
    where
        Q: ToQuery + Send;

    /// Runs a query that must return exactly one row
    /// ([`ErrorKind::RowCount`](crate::ErrorKind::RowCount) otherwise).
    fn query_one<Q>(&mut self, query: Q) -> impl Future<Output = Result<Row>> + Send
    where
        Q: ToQuery + Send;

    /// Runs a query that must return at most one row
    /// ([`ErrorKind::RowCount`](crate::ErrorKind::RowCount) otherwise).
    fn query_opt<Q>(&mut self, query: Q) -> impl Future<Output = Result<Option<Row>>> + Send
    where
        Q: ToQuery + Send;

    /// Runs a statement and returns the number of rows it affected (or returned).
    fn execute<Q>(&mut self, query: Q) -> impl Future<Output = Result<u64>> + Send
    where
        Q: ToQuery + Send;

    /// Runs a query and returns a stream of its rows, read as it is polled (memory stays
    /// bounded). On an engine outside a transaction the stream holds a connection of its own
    /// until dropped; in a transaction, the transaction's other methods refuse with
    /// [`ErrorKind::Busy`](crate::ErrorKind::Busy) until it is dropped, and dropping it
    /// before its end fails the transaction (see [`PostgresTransaction::query_stream`]).
    fn query_stream<Q>(&mut self, query: Q) -> impl Future<Output = Result<RowStream<'_>>> + Send
    where
        Q: ToQuery + Send;

    /// Fetches the rows of `query` in batches of at most `batch_size` through a portal (see
    /// [`AsyncBatch`]): in the transaction if there is one, otherwise in a read-only one of
    /// the batch's own.
    fn batch<Q>(
        &mut self,
        query: Q,
        batch_size: usize,
    ) -> impl Future<Output = Result<AsyncBatch<'_>>> + Send
    where
        Q: ToQuery + Send;

    /// Runs SQL without parameters, several statements allowed, with the simple query
    /// protocol: DDL, scripts. On an engine this is [`PostgresEngine::run_ddl`].
    fn simple_query(
        &mut self,
        sql: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryResult>>> + Send;

    /// Runs a query and builds a `T` from each row ([`FromRow`]: tuples, and structs with
    /// `#[derive(FromRow)]`).
    fn query_as<T, Q>(&mut self, query: Q) -> impl Future<Output = Result<Vec<T>>> + Send
    where
        T: FromRow,
        Q: ToQuery + Send,
    {
        async move { self.query(query).await?.iter().map(T::from_row).collect() }
    }

    /// [`query_one`](Self::query_one), and builds a `T` from the row.
    fn query_one_as<T, Q>(&mut self, query: Q) -> impl Future<Output = Result<T>> + Send
    where
        T: FromRow,
        Q: ToQuery + Send,
    {
        async move { T::from_row(&self.query_one(query).await?) }
    }

    /// [`query_opt`](Self::query_opt), and builds a `T` from the row if there is one.
    fn query_opt_as<T, Q>(&mut self, query: Q) -> impl Future<Output = Result<Option<T>>> + Send
    where
        T: FromRow,
        Q: ToQuery + Send,
    {
        async move {
            self.query_opt(query)
                .await?
                .as_ref()
                .map(T::from_row)
                .transpose()
        }
    }
}

/// Implements [`Client`] for a type whose methods need no `&mut`, and for a shared reference
/// to it. Each method calls the inherent method of the same name of `$target` — the type
/// itself, or the transaction a savepoint belongs to, got by `$get` from `$this` — except
/// `simple_query`, which calls `$simple`.
macro_rules! client_by_shared_ref {
    ($ty:ty => $target:ty, |$this:ident| $get:expr, $simple:ident) => {
        impl sealed::Sealed for $ty {}
        impl sealed::Sealed for &$ty {}
        client_by_shared_ref!(@impl $ty, $ty => $target, |$this| $get, $simple);
        client_by_shared_ref!(@impl &$ty, $ty => $target, |$this| $get, $simple);
    };
    (@impl $self_ty:ty, $ty:ty => $target:ty, |$this:ident| $get:expr, $simple:ident) => {
        impl Client for $self_ty {
            async fn query<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Vec<Row>> {
                let $this: &$ty = shared(self);
                <$target>::query($get, query).await
            }

            async fn query_one<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Row> {
                let $this: &$ty = shared(self);
                <$target>::query_one($get, query).await
            }

            async fn query_opt<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Option<Row>> {
                let $this: &$ty = shared(self);
                <$target>::query_opt($get, query).await
            }

            async fn execute<Q: ToQuery + Send>(&mut self, query: Q) -> Result<u64> {
                let $this: &$ty = shared(self);
                <$target>::execute($get, query).await
            }

            async fn query_stream<Q: ToQuery + Send>(
                &mut self,
                query: Q,
            ) -> Result<RowStream<'_>> {
                let $this: &$ty = shared(self);
                <$target>::query_stream($get, query).await
            }

            async fn batch<Q: ToQuery + Send>(
                &mut self,
                query: Q,
                batch_size: usize,
            ) -> Result<AsyncBatch<'_>> {
                // Not through the inherent methods' 'static batch: a batch's type is
                // invariant in its lifetime, and the lease is not.
                let batch_size = check_batch(&query, batch_size)?;
                let $this: &$ty = shared(self);
                let conn = <$target>::lease($get).await?;
                AsyncBatch::start(conn, &query, batch_size).await
            }

            async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
                let $this: &$ty = shared(self);
                <$target>::$simple($get, sql).await
            }
        }
    };
}

/// The `&T` behind `&mut T` or `&mut &T`.
fn shared<T, S: Borrow<T> + ?Sized>(this: &S) -> &T {
    this.borrow()
}

client_by_shared_ref!(PostgresEngine => PostgresEngine, |engine| engine, run_ddl);
client_by_shared_ref!(PostgresTransaction => PostgresTransaction, |tx| tx, simple_query);
client_by_shared_ref!(Savepoint => PostgresTransaction, |sp| sp.transaction(), simple_query);

/// Implements [`Client`] for a type that dereferences to a [`Connection`].
macro_rules! client_by_connection {
    ($($ty:ty),*) => {$(
        impl sealed::Sealed for $ty {}
        impl Client for $ty {
            async fn query<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Vec<Row>> {
                Connection::query(self, query).await
            }

            async fn query_one<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Row> {
                Connection::query_one(self, query).await
            }

            async fn query_opt<Q: ToQuery + Send>(&mut self, query: Q) -> Result<Option<Row>> {
                Connection::query_opt(self, query).await
            }

            async fn execute<Q: ToQuery + Send>(&mut self, query: Q) -> Result<u64> {
                Connection::execute(self, query).await
            }

            async fn query_stream<Q: ToQuery + Send>(
                &mut self,
                query: Q,
            ) -> Result<RowStream<'_>> {
                Connection::query_stream(self, query).await
            }

            async fn batch<Q: ToQuery + Send>(
                &mut self,
                query: Q,
                batch_size: usize,
            ) -> Result<AsyncBatch<'_>> {
                let batch_size = check_batch(&query, batch_size)?;
                AsyncBatch::start(Lease::Borrowed(self), &query, batch_size).await
            }

            async fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryResult>> {
                Connection::simple_query(self, sql).await
            }
        }
    )*};
}

client_by_connection!(Connection, EngineConnection, TxConnection<'_>);

impl<C: Client> sealed::Sealed for &mut C {}

/// `&mut client` is a client, so that a function taking `impl Client` by value can be given
/// one that is used again afterwards.
impl<C: Client> Client for &mut C {
    fn query<Q>(&mut self, query: Q) -> impl Future<Output = Result<Vec<Row>>> + Send
    where
        Q: ToQuery + Send,
    {
        C::query(self, query)
    }

    fn query_one<Q>(&mut self, query: Q) -> impl Future<Output = Result<Row>> + Send
    where
        Q: ToQuery + Send,
    {
        C::query_one(self, query)
    }

    fn query_opt<Q>(&mut self, query: Q) -> impl Future<Output = Result<Option<Row>>> + Send
    where
        Q: ToQuery + Send,
    {
        C::query_opt(self, query)
    }

    fn execute<Q>(&mut self, query: Q) -> impl Future<Output = Result<u64>> + Send
    where
        Q: ToQuery + Send,
    {
        C::execute(self, query)
    }

    fn query_stream<Q>(&mut self, query: Q) -> impl Future<Output = Result<RowStream<'_>>> + Send
    where
        Q: ToQuery + Send,
    {
        C::query_stream(self, query)
    }

    fn batch<Q>(
        &mut self,
        query: Q,
        batch_size: usize,
    ) -> impl Future<Output = Result<AsyncBatch<'_>>> + Send
    where
        Q: ToQuery + Send,
    {
        C::batch(self, query, batch_size)
    }

    fn simple_query(
        &mut self,
        sql: &str,
    ) -> impl Future<Output = Result<Vec<SimpleQueryResult>>> + Send {
        C::simple_query(self, sql)
    }
}
