//! [`Listener`]: LISTEN/NOTIFY on a connection of its own, as a [`Stream`] of
//! [`ListenEvent`]s that outlives the connection under it.
//!
//! A listening session only hears notifications while it exists: when its connection is lost
//! (a server restart, a failover, `pg_terminate_backend`, a network cut) its LISTENs go with
//! it, and anything NOTIFYed before a new session has run LISTEN again is never delivered to
//! anyone (the LISTEN command's docs: a session listens from the moment its LISTEN commits).
//! So the listener, on losing its connection, opens a new one with the engine's settings,
//! re-LISTENs every channel, and then yields [`ListenEvent::Reconnected`] before any further
//! notification, so that the application knows to look at the data itself instead of trusting
//! that it heard about every change.
//!
//! Reconnecting waits between attempts, from [`ListenOptions::min_backoff`] doubling up to
//! [`ListenOptions::max_backoff`] (each wait drawn at random between half of that and all of
//! it, so that many listeners that lost the same server do not all come back at the same
//! instant), and keeps trying for as long as the failure can heal by
//! itself: the server is down, starting up or shutting down, out of connection slots, or does
//! not answer in time. A failure that retrying cannot cure — authentication refused, the
//! database dropped, a setting or certificate wrong — is yielded as the stream's last item.
//!
//! The connection is never one of the pool's: a pooled connection is handed to other users,
//! who would get its notifications mixed with their queries, a pool undoes the LISTENs of a
//! connection that comes back to it, and it closes idle connections when it likes. Everything that uses the connection — LISTEN, UNLISTEN, a
//! reconnect — runs as one piece of work owned by the listener, not by the caller's future:
//! a caller that is dropped half way leaves that work to be finished by the next call or poll,
//! so the connection is never left in the middle of a request and the set of channels always
//! says what the server listens to.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::Stream;
use futures::stream::FusedStream;
use postgres_protocol::escape::escape_identifier;

use crate::connection::{Connection, Notification};
use crate::error::{Error, ErrorKind, Result, SqlState};
use crate::pool::{ConnectionManager, Manager};

/// The default for [`ListenOptions::min_backoff`].
pub const DEFAULT_MIN_BACKOFF: Duration = Duration::from_millis(50);
/// The default for [`ListenOptions::max_backoff`].
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// The default for [`ListenOptions::attempt_timeout`].
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How a [`Listener`] reconnects after losing its connection.
///
/// ```
/// use std::time::Duration;
/// use pgengine::listen::ListenOptions;
///
/// let options = ListenOptions::default()
///     .min_backoff(Duration::from_millis(100))
///     .max_backoff(Duration::from_secs(2));
/// assert_eq!(options.get_max_backoff(), Duration::from_secs(2));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenOptions {
    min_backoff: Duration,
    max_backoff: Duration,
    attempt_timeout: Duration,
}

impl Default for ListenOptions {
    fn default() -> Self {
        ListenOptions {
            min_backoff: DEFAULT_MIN_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
        }
    }
}

impl ListenOptions {
    /// Sets the wait after the first failed reconnect attempt (default
    /// [`DEFAULT_MIN_BACKOFF`]); each further failure doubles it, up to
    /// [`max_backoff`](Self::max_backoff). The first attempt is made at once, and each wait
    /// actually taken is drawn at random between half of the backoff and all of it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let options = pgengine::listen::ListenOptions::default().min_backoff(Duration::from_millis(10));
    /// assert_eq!(options.get_min_backoff(), Duration::from_millis(10));
    /// ```
    pub fn min_backoff(mut self, wait: Duration) -> Self {
        self.min_backoff = wait;
        self
    }

    /// Sets the longest wait between reconnect attempts (default [`DEFAULT_MAX_BACKOFF`]). A
    /// value below [`min_backoff`](Self::min_backoff) is raised to it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let options = pgengine::listen::ListenOptions::default().max_backoff(Duration::from_secs(1));
    /// assert_eq!(options.get_max_backoff(), Duration::from_secs(1));
    /// ```
    pub fn max_backoff(mut self, wait: Duration) -> Self {
        self.max_backoff = wait;
        self
    }

    /// Sets how long one reconnect attempt (connecting, authenticating, re-LISTENing) may
    /// take before it counts as failed and the next is scheduled (default
    /// [`DEFAULT_ATTEMPT_TIMEOUT`]): a server that accepts the connection but never answers
    /// must not stall the listener for good.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let options = pgengine::listen::ListenOptions::default().attempt_timeout(Duration::from_secs(5));
    /// assert_eq!(options.get_attempt_timeout(), Duration::from_secs(5));
    /// ```
    pub fn attempt_timeout(mut self, limit: Duration) -> Self {
        self.attempt_timeout = limit;
        self
    }

    /// The wait after the first failed reconnect attempt.
    ///
    /// ```
    /// use pgengine::listen::{DEFAULT_MIN_BACKOFF, ListenOptions};
    /// assert_eq!(ListenOptions::default().get_min_backoff(), DEFAULT_MIN_BACKOFF);
    /// ```
    pub fn get_min_backoff(&self) -> Duration {
        self.min_backoff
    }

    /// The longest wait between reconnect attempts (never below the shortest).
    ///
    /// ```
    /// use std::time::Duration;
    /// use pgengine::listen::ListenOptions;
    /// let options = ListenOptions::default()
    ///     .min_backoff(Duration::from_secs(2))
    ///     .max_backoff(Duration::from_secs(1));
    /// assert_eq!(options.get_max_backoff(), Duration::from_secs(2));
    /// ```
    pub fn get_max_backoff(&self) -> Duration {
        self.max_backoff.max(self.min_backoff)
    }

    /// How long one reconnect attempt may take.
    ///
    /// ```
    /// use pgengine::listen::{DEFAULT_ATTEMPT_TIMEOUT, ListenOptions};
    /// assert_eq!(ListenOptions::default().get_attempt_timeout(), DEFAULT_ATTEMPT_TIMEOUT);
    /// ```
    pub fn get_attempt_timeout(&self) -> Duration {
        self.attempt_timeout
    }
}

/// What a [`Listener`] yields.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenEvent {
    /// A `NOTIFY` on one of the listened channels.
    Notification(Notification),
    /// The connection was lost and a new one now listens to every channel again.
    /// Notifications sent in between were not delivered and never will be: re-read whatever
    /// state the notifications stand for.
    Reconnected,
}

/// Notifications from `LISTEN` on a dedicated connection that reconnects and re-LISTENs after
/// a loss. Made by [`PostgresEngine::listen`](crate::PostgresEngine::listen); a
/// [`Stream`] of [`ListenEvent`]s.
///
/// Notifications come in the order the server sends them: in commit order of the notifying
/// transactions (the NOTIFY command's docs). The stream ends only after
/// [`close`](Self::close) — which consumes the listener — or after yielding an error that
/// reconnecting cannot cure; dropping the listener closes its connection.
///
/// ```no_run
/// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
/// use futures::StreamExt;
/// use pgengine::listen::ListenEvent;
///
/// let mut listener = engine.listen("orders").await?;
/// listener.listen("invoices").await?;
/// while let Some(event) = listener.next().await {
///     match event? {
///         ListenEvent::Notification(n) => println!("{}: {}", n.channel, n.payload),
///         // Notifications may have been missed: look at the tables themselves.
///         ListenEvent::Reconnected => println!("reconnected"),
///         _ => {}
///     }
/// }
/// # Ok(())
/// # }
/// ```
pub struct Listener {
    manager: ConnectionManager,
    options: ListenOptions,
    /// What the server listens to for us, or will once a reconnect in progress is done.
    /// Changed only in `finish`, when the LISTEN or UNLISTEN has run.
    channels: BTreeSet<String>,
    state: State,
    /// Notifications received on a connection that was then lost and not yet yielded: they
    /// were sent before the loss, so they come before `Reconnected`.
    salvaged: VecDeque<Notification>,
    /// A `Reconnected` is owed before anything the new connection received.
    reconnected: bool,
}

/// What the listener's connection is doing.
enum State {
    /// Idle, listening; polling the stream reads from it. (Boxed: a connection is large,
    /// and the other states are small.)
    Listening(Box<Connection>),
    /// A LISTEN, an UNLISTEN, a clean-up or a reconnect, owning the connection until done.
    Working(Work),
    /// Closed, or ended by an error that reconnecting cannot cure; the stream yields the error
    /// once, then ends.
    Ended(Option<Error>),
}

type Work = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// What a finished piece of work hands back.
struct Outcome {
    /// The connection to go on with, or the error that ends the listener.
    conn: Result<Box<Connection>>,
    /// The connection is a new one.
    reconnected: bool,
    /// Notifications the lost connection had received and nobody had taken.
    salvaged: Vec<Notification>,
    /// Applied to the channel set when `answer` is Ok.
    change: Option<Change>,
    /// What the caller who asked for the work gets.
    answer: Result<()>,
}

impl Outcome {
    fn kept(conn: Box<Connection>, change: Option<Change>, answer: Result<()>) -> Outcome {
        Outcome {
            conn: Ok(conn),
            reconnected: false,
            salvaged: Vec::new(),
            change,
            answer,
        }
    }

    fn replaced(
        conn: Result<Box<Connection>>,
        salvaged: Vec<Notification>,
        change: Option<Change>,
    ) -> Outcome {
        let answer = match &conn {
            Ok(_) => Ok(()),
            Err(e) => Err(Error::closed(format!(
                "the listener lost its connection and could not open another: {e}"
            ))
            .with_source(e.duplicate())),
        };
        Outcome {
            reconnected: conn.is_ok(),
            conn,
            salvaged,
            change,
            answer,
        }
    }
}

/// A change to the set of channels.
#[derive(Clone)]
enum Change {
    Listen(String),
    Unlisten(String),
}

impl Change {
    fn sql(&self) -> String {
        match self {
            Change::Listen(channel) => listen_sql(channel),
            Change::Unlisten(channel) => format!("UNLISTEN {}", escape_identifier(channel)),
        }
    }

    fn apply(self, channels: &mut BTreeSet<String>) {
        match self {
            Change::Listen(channel) => {
                channels.insert(channel);
            }
            Change::Unlisten(channel) => {
                channels.remove(&channel);
            }
        }
    }
}

/// The channel is quoted as an identifier, so its name is taken exactly as given (case and
/// all), the same name `pg_notify(channel, payload)` takes.
fn listen_sql(channel: &str) -> String {
    format!("LISTEN {}", escape_identifier(channel))
}

impl Listener {
    /// Opens a connection with `manager`'s settings and LISTENs to `channel`. A failure here
    /// is returned as is: reconnecting is for connections lost later.
    pub(crate) async fn open(
        manager: ConnectionManager,
        channel: &str,
        options: ListenOptions,
    ) -> Result<Listener> {
        let mut conn = manager.connect().await?;
        if let Err(e) = conn.simple_query(&listen_sql(channel)).await {
            let _ = conn.close().await;
            return Err(e);
        }
        Ok(Listener {
            manager,
            options,
            channels: BTreeSet::from([channel.to_owned()]),
            state: State::Listening(conn),
            salvaged: VecDeque::new(),
            reconnected: false,
        })
    }

    /// Also listens to `channel`; returns once the server does. If the connection turns out
    /// to be lost, this first reconnects (and the stream yields
    /// [`ListenEvent::Reconnected`] next).
    ///
    /// If the future is dropped before it finishes, the LISTEN still completes, on the next
    /// call or poll of the stream.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let mut listener = engine.listen("orders").await?;
    /// listener.listen("Invoices").await?; // case-sensitive: pg_notify('Invoices', …)
    /// assert_eq!(listener.channels().collect::<Vec<_>>(), ["Invoices", "orders"]);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn listen(&mut self, channel: &str) -> Result<()> {
        self.change(Change::Listen(channel.to_owned())).await
    }

    /// Stops listening to `channel`. Notifications on it that were already received may still
    /// be yielded.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let mut listener = engine.listen("orders").await?;
    /// listener.unlisten("orders").await?;
    /// assert_eq!(listener.channels().count(), 0);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn unlisten(&mut self, channel: &str) -> Result<()> {
        self.change(Change::Unlisten(channel.to_owned())).await
    }

    /// The channels listened to, in name order.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let listener = engine.listen("orders").await?;
    /// assert!(listener.channels().eq(["orders"]));
    /// # Ok(())
    /// # }
    /// ```
    pub fn channels(&self) -> impl Iterator<Item = &str> {
        self.channels.iter().map(String::as_str)
    }

    /// The server process id of the current connection (`pg_backend_pid()`, and the
    /// `process_id` of notifications this listener's own session sends); `None` while a
    /// LISTEN or a reconnect is in progress, or once the listener has ended.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let listener = engine.listen("orders").await?;
    /// println!("listening as backend {:?}", listener.process_id());
    /// # Ok(())
    /// # }
    /// ```
    pub fn process_id(&self) -> Option<i32> {
        match &self.state {
            State::Listening(conn) => Some(conn.process_id()),
            _ => None,
        }
    }

    /// Closes the connection (Terminate): the server forgets its LISTENs.
    ///
    /// ```no_run
    /// # async fn demo(engine: pgengine::PostgresEngine) -> pgengine::Result<()> {
    /// let listener = engine.listen("orders").await?;
    /// listener.close().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn close(mut self) -> Result<()> {
        match std::mem::replace(&mut self.state, State::Ended(None)) {
            State::Listening(conn) => (*conn).close().await,
            // Work in progress is dropped with the connection it holds.
            State::Working(_) | State::Ended(_) => Ok(()),
        }
    }

    /// Runs a LISTEN or UNLISTEN as the listener's work and waits for it.
    async fn change(&mut self, change: Change) -> Result<()> {
        // One piece of work at a time: what a dropped caller left behind finishes first. Its
        // answer was for that caller.
        let _ = self.settle().await;
        let conn = match std::mem::replace(&mut self.state, State::Ended(None)) {
            State::Listening(conn) => conn,
            State::Ended(error) => {
                let ended = match &error {
                    Some(e) => Error::closed(format!("the listener has ended: {e}"))
                        .with_source(e.duplicate()),
                    None => Error::closed("the listener is closed"),
                };
                self.state = State::Ended(error);
                return Err(ended);
            }
            State::Working(work) => {
                self.state = State::Working(work);
                return Err(Error::busy("the listener is busy with earlier work"));
            }
        };
        let mut after = self.channels.clone();
        change.clone().apply(&mut after);
        let sql = change.sql();
        let reconnect = self.reconnect(after);
        self.state = State::Working(Box::pin(async move {
            let mut conn = conn;
            match conn.simple_query(&sql).await {
                Ok(_) => Outcome::kept(conn, Some(change), Ok(())),
                // The server refused (or the statement timed out): the connection is fine.
                Err(e) if !conn.is_broken() => Outcome::kept(conn, None, Err(e)),
                // The connection was lost; a new one listens to the channels as changed.
                Err(e) => {
                    let salvaged = conn.take_notifications();
                    drop(conn);
                    Outcome::replaced(reconnect.run(e).await, salvaged, Some(change))
                }
            }
        }));
        self.settle().await
    }

    /// Waits for the work in progress, if any, and returns its answer.
    async fn settle(&mut self) -> Result<()> {
        poll_fn(|cx| self.poll_settle(cx)).await
    }

    fn poll_settle(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let outcome = match &mut self.state {
            State::Working(work) => ready!(work.as_mut().poll(cx)),
            State::Listening(_) | State::Ended(_) => return Poll::Ready(Ok(())),
        };
        Poll::Ready(self.finish(outcome))
    }

    /// Takes in what a piece of work hands back: the one place the state leaves `Working`.
    fn finish(&mut self, outcome: Outcome) -> Result<()> {
        self.salvaged.extend(outcome.salvaged);
        self.reconnected |= outcome.reconnected;
        match outcome.conn {
            Ok(conn) => {
                if let (Ok(()), Some(change)) = (&outcome.answer, outcome.change) {
                    change.apply(&mut self.channels);
                }
                self.state = State::Listening(conn);
            }
            Err(e) => self.state = State::Ended(Some(e)),
        }
        outcome.answer
    }

    /// The connection failed while waiting (`cause`): reconnect if it is lost, otherwise
    /// bring it back to idle (and reconnect if even that fails).
    fn repair(&mut self, cause: Error) {
        let State::Listening(mut conn) = std::mem::replace(&mut self.state, State::Ended(None))
        else {
            return;
        };
        let reconnect = self.reconnect(self.channels.clone());
        self.state = State::Working(Box::pin(async move {
            let cause = if conn.is_broken() {
                cause
            } else {
                match conn.reset().await {
                    Ok(()) => return Outcome::kept(conn, None, Ok(())),
                    Err(e) => e,
                }
            };
            let salvaged = conn.take_notifications();
            drop(conn);
            Outcome::replaced(reconnect.run(cause).await, salvaged, None)
        }));
    }

    fn reconnect(&self, channels: BTreeSet<String>) -> Reconnect {
        Reconnect {
            manager: self.manager.clone(),
            channels,
            options: self.options,
        }
    }
}

/// Opening a new connection that listens to `channels`, retrying with backoff.
struct Reconnect {
    manager: ConnectionManager,
    channels: BTreeSet<String>,
    options: ListenOptions,
}

impl Reconnect {
    /// Tries until a connection listens, or a failure that cannot heal.
    async fn run(self, cause: Error) -> Result<Box<Connection>> {
        tracing::warn!(
            target: "pgengine::listen",
            "lost the listening connection, reconnecting: {}",
            cause.redacted()
        );
        let mut wait = self.options.get_min_backoff();
        let mut attempt = 1u32;
        loop {
            let limit = self.options.get_attempt_timeout();
            let tried = tokio::time::timeout(limit, self.attempt())
                .await
                .unwrap_or_else(|_| {
                    Err(Error::timeout(format!(
                        "a reconnect attempt did not finish within {limit:?}"
                    )))
                });
            match tried {
                Ok(conn) => {
                    tracing::info!(
                        target: "pgengine::listen",
                        attempt,
                        "listening again on a new connection"
                    );
                    return Ok(conn);
                }
                Err(e) if !can_heal(&e) => {
                    tracing::error!(
                        target: "pgengine::listen",
                        attempt,
                        "giving up reconnecting: {}",
                        e.redacted()
                    );
                    return Err(e);
                }
                Err(e) => tracing::warn!(
                    target: "pgengine::listen",
                    attempt,
                    retry_in_ms = wait.as_millis() as u64,
                    "reconnect attempt failed: {}",
                    e.redacted()
                ),
            }
            tokio::time::sleep(jittered(wait)).await;
            wait = (wait * 2).min(self.options.get_max_backoff());
            attempt = attempt.saturating_add(1);
        }
    }

    async fn attempt(&self) -> Result<Box<Connection>> {
        let mut conn = self.manager.connect().await?;
        if !self.channels.is_empty() {
            // One round trip: the statements of one simple Query run as one transaction, so
            // either every channel is listened to again or none is.
            let sql: Vec<String> = self.channels.iter().map(|c| listen_sql(c)).collect();
            conn.simple_query(&sql.join("; ")).await?;
        }
        Ok(conn)
    }
}

/// Whether retrying can cure a failure to reconnect. The server being down, starting up or
/// shutting down, or out of connection slots passes; a wrong password, a dropped database or a
/// bad setting does not, and retrying those forever would only hide them.
fn can_heal(e: &Error) -> bool {
    match e.kind() {
        ErrorKind::Io | ErrorKind::Closed | ErrorKind::Timeout => true,
        // SQLSTATE classes (PostgreSQL docs Appendix A): 08 connection exception, 53
        // insufficient resources (too_many_connections), 57 operator intervention (57P01
        // admin_shutdown, 57P03 cannot_connect_now while starting up or shutting down), 58
        // system error. 25006 is LISTEN refused by a hot standby, which heals when a
        // failover makes it (or another host) the primary.
        ErrorKind::Db => e.code().is_some_and(|code| {
            matches!(
                code.class(),
                SqlState::CONNECTION_EXCEPTION
                    | SqlState::INSUFFICIENT_RESOURCES
                    | SqlState::OPERATOR_INTERVENTION
                    | SqlState::SYSTEM_ERROR
            ) || *code == SqlState::READ_ONLY_SQL_TRANSACTION
        }),
        _ => false,
    }
}

impl Stream for Listener {
    type Item = Result<ListenEvent>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Err(e) = ready!(this.poll_settle(cx)) {
                // The caller who asked for that work went away before its answer came.
                tracing::debug!(
                    target: "pgengine::listen",
                    "an abandoned LISTEN/UNLISTEN failed: {}",
                    e.redacted()
                );
            }
            if let Some(n) = this.salvaged.pop_front() {
                return Poll::Ready(Some(Ok(ListenEvent::Notification(n))));
            }
            if std::mem::take(&mut this.reconnected) {
                return Poll::Ready(Some(Ok(ListenEvent::Reconnected)));
            }
            let conn = match &mut this.state {
                State::Listening(conn) => conn,
                State::Ended(error) => return Poll::Ready(error.take().map(Err)),
                State::Working(_) => continue,
            };
            match conn.poll_notification(cx) {
                Poll::Ready(Ok(n)) => return Poll::Ready(Some(Ok(ListenEvent::Notification(n)))),
                Poll::Ready(Err(e)) => this.repair(e),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl FusedStream for Listener {
    fn is_terminated(&self) -> bool {
        matches!(self.state, State::Ended(None)) && self.salvaged.is_empty() && !self.reconnected
    }
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match &self.state {
            State::Listening(_) => "listening",
            State::Working(_) => "working",
            State::Ended(_) => "ended",
        };
        f.debug_struct("Listener")
            .field("channels", &self.channels)
            .field("state", &state)
            .field("process_id", &self.process_id())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// A wait between half of `backoff` and all of it, at random ("equal jitter").
fn jittered(backoff: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    // A randomly keyed hasher: random enough to spread reconnects, without a dependency.
    let random = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish();
    let half = backoff / 2;
    let spread = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
    half + Duration::from_nanos(random % spread.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_spread_between_half_and_all_of_the_backoff() {
        let backoff = Duration::from_millis(800);
        let waits: BTreeSet<Duration> = (0..64).map(|_| jittered(backoff)).collect();
        assert!(waits.iter().all(|w| (backoff / 2..=backoff).contains(w)));
        // 64 draws from 400 million nanoseconds: all alike would mean no jitter at all.
        assert!(waits.len() > 32, "{waits:?}");
        assert_eq!(jittered(Duration::ZERO), Duration::ZERO);
        assert!(jittered(Duration::from_nanos(1)) <= Duration::from_nanos(1));
    }

    #[test]
    fn channel_names_are_quoted_as_identifiers() {
        assert_eq!(listen_sql("orders"), r#"LISTEN "orders""#);
        assert_eq!(listen_sql(r#"We "Ü" ch"#), r#"LISTEN "We ""Ü"" ch""#);
        assert_eq!(Change::Unlisten("A b".into()).sql(), r#"UNLISTEN "A b""#);
    }

    #[test]
    fn changes_apply_to_the_channel_set() {
        let mut set = BTreeSet::new();
        Change::Listen("a".into()).apply(&mut set);
        Change::Listen("b".into()).apply(&mut set);
        Change::Listen("a".into()).apply(&mut set);
        Change::Unlisten("b".into()).apply(&mut set);
        Change::Unlisten("never".into()).apply(&mut set);
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["a"]);
    }

    #[test]
    fn only_failures_that_can_heal_are_retried() {
        assert!(can_heal(&Error::closed("the server closed the connection")));
        assert!(can_heal(&Error::timeout("no answer")));
        assert!(!can_heal(&Error::config("no host to connect to")));
        assert!(!can_heal(&Error::auth("password authentication failed")));
        assert!(!can_heal(&Error::protocol("garbage")));
    }

    #[test]
    fn a_listener_can_move_between_tasks() {
        fn send<T: Send>() {}
        send::<Listener>();
    }

    #[test]
    fn the_longest_wait_is_never_below_the_shortest() {
        let options = ListenOptions::default()
            .min_backoff(Duration::from_secs(3))
            .max_backoff(Duration::from_millis(1));
        assert_eq!(options.get_max_backoff(), Duration::from_secs(3));
    }
}
