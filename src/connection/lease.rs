//! [`Lease`]: the connection a row stream or a portal batch runs on, for as long as it runs.
//!
//! A stream from [`Connection::query_stream`] borrows the caller's connection. One from the
//! engine or a transaction holds what gives it a connection (a pooled connection, a locked
//! transaction) and gives that back when the stream is dropped: the holder's own `Drop` says
//! what that means (back to the pool, or the transaction's state after its statement).

use std::ops::{Deref, DerefMut};

use super::Connection;

/// A connection borrowed, or held, for one stream of results.
pub(crate) enum Lease<'a> {
    Borrowed(&'a mut Connection),
    Held(Box<dyn DerefMut<Target = Connection> + Send + 'a>),
}

impl Deref for Lease<'_> {
    type Target = Connection;

    fn deref(&self) -> &Connection {
        match self {
            Lease::Borrowed(conn) => conn,
            Lease::Held(holder) => holder,
        }
    }
}

impl DerefMut for Lease<'_> {
    fn deref_mut(&mut self) -> &mut Connection {
        match self {
            Lease::Borrowed(conn) => conn,
            Lease::Held(holder) => holder,
        }
    }
}
