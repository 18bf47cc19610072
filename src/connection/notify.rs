//! Waiting for notifications on an idle connection.
//!
//! A session that has run `LISTEN channel` is sent a NotificationResponse for every `NOTIFY`
//! on that channel. The server sends them whenever it likes (PostgreSQL docs §55.2.7
//! "Asynchronous Operations"): in the middle of another request's responses, or while the
//! connection sits idle with nothing asked. The first case is handled where every message is
//! read, `Connection::poll_read`, which queues the notification and reads on, so that a query
//! never sees one as its result. This file covers the second case: reading the socket while
//! no request is in flight, for as long as it takes, until a notification arrives or the
//! session ends.
//!
//! The server holds back notifications while the session is inside a transaction block and
//! delivers them just after it ends (the NOTIFY command's docs, "Notes"). Waiting inside a
//! transaction could therefore never end — nothing else can run on the connection meanwhile to
//! end the transaction — so it is refused, as is waiting while responses to an earlier request
//! are still owed (those messages belong to that request and must be drained first).

use std::future::poll_fn;
use std::task::{Context, Poll};

use super::{Connection, Notification};
use crate::error::{Error, Result};
use crate::protocol::{BackendMessage, TransactionStatus};

impl Connection {
    /// Waits for the next notification on a channel this connection listens to (`LISTEN`).
    /// Notifications already received — during earlier queries, say — come first, oldest
    /// first; then the socket is read while the connection is idle.
    ///
    /// Cancel-safe: a notification is taken off the queue only when it is returned, so the
    /// future can be dropped (a timeout, a `select!`) without losing one.
    ///
    /// Fails with [`ErrorKind::Busy`] when nothing is queued and the connection still owes
    /// responses to an earlier request, or a transaction is open (the server holds back
    /// notifications until it ends). Fails, and leaves the connection broken, when the session
    /// ends: closed by the server (a restart, `pg_terminate_backend`), a FATAL error, or an
    /// I/O error.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// conn.simple_query(r#"LISTEN "jobs""#).await?;
    /// let n = conn.next_notification().await?;
    /// println!("{} from backend {}: {}", n.channel, n.process_id, n.payload);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// [`ErrorKind::Busy`]: crate::ErrorKind::Busy
    pub async fn next_notification(&mut self) -> Result<Notification> {
        poll_fn(|cx| self.poll_notification(cx)).await
    }

    /// Polls for the next notification: the poll form of
    /// [`next_notification`](Self::next_notification), for a hand-written `Future` or
    /// `Stream`. Returns `Poll::Pending` (and wakes `cx` when more arrives) while the
    /// connection is idle and nothing is queued.
    ///
    /// ```no_run
    /// # async fn demo(conn: &mut pgengine::Connection) -> pgengine::Result<()> {
    /// let n = std::future::poll_fn(|cx| conn.poll_notification(cx)).await?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn poll_notification(&mut self, cx: &mut Context<'_>) -> Poll<Result<Notification>> {
        // What was received before the session ended is still owed to the caller: the queue
        // first, the connection's state second.
        if let Some(n) = self.notifications.pop_front() {
            return Poll::Ready(Ok(n));
        }
        if let Some(reason) = &self.broken {
            return Poll::Ready(Err(Error::closed(format!(
                "the connection is broken: {reason}"
            ))));
        }
        if self.is_busy() {
            return Poll::Ready(Err(Error::busy(
                "cannot wait for notifications while responses to an earlier request are \
                 still owed (its future was dropped): run a query or reset() the connection \
                 first",
            )));
        }
        if self.status != TransactionStatus::Idle {
            return Poll::Ready(Err(Error::busy(
                "cannot wait for notifications inside a transaction block: the server holds \
                 them back until the transaction ends",
            )));
        }
        // With no request in flight, poll_read queues every notification and reads on; it
        // returns only when the socket has nothing more (Pending) or with something that
        // has no business arriving while idle.
        let ended = match self.poll_read(cx) {
            Poll::Pending => None,
            Poll::Ready(Err(e)) => Some(e),
            Poll::Ready(Ok(BackendMessage::ErrorResponse(db))) => {
                // An error with no request to answer ends the session: the server sends one
                // only on its way out (idle_session_timeout, a crash of another backend).
                self.mark_broken(format!("the server ended the session: {}", db.message()));
                Some(Error::db(db))
            }
            Poll::Ready(Ok(other)) => {
                Some(self.unexpected(&other, "an idle wait for notifications"))
            }
        };
        // Notifications that came in the same read as the end are delivered first; the
        // end is then reported by the next call, from `broken`.
        if let Some(n) = self.notifications.pop_front() {
            return Poll::Ready(Ok(n));
        }
        match ended {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }
}
