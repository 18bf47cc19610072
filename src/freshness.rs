//! Replica reads that are fresh enough: a [`Freshness`] rule on an extra node
//! ([`EngineBuilder::extra_node_with`](crate::engine::EngineBuilder::extra_node_with)).
//!
//! A standby replays the primary's WAL some time after the primary wrote it, so a read sent
//! to it can miss what was just committed. Two rules bound that:
//!
//! - **read your writes** ([`Freshness::read_your_writes`]): a read through the node waits,
//!   up to a limit, until the standby has replayed every commit made through the primary
//!   engine before the read began (its `pg_last_wal_replay_lsn()` has reached that commit's
//!   WAL position), or else goes to the primary — or fails, as the caller chose;
//! - **bounded lag** ([`Freshness::max_lag`]): the node is used while its replay lag is under
//!   a bound, otherwise the primary (or an error).
//!
//! Every question these rules ask has the rule's own duration as its limit (the wait of read
//! your writes, the bound of bounded lag): a node that does not answer in time is not fresh
//! enough, and a primary that does not say where its writes are fails the read with a timeout.
//!
//! Each decision is logged at debug level (target `pgengine::query`), inside the caller's
//! span: the node, where the read went, and why.
//!
//! **Where the commit positions come from.** With a read-your-writes node configured, a
//! transaction's COMMIT (and an [`Atomic`](crate::atomic::Atomic)'s) asks
//! `pg_current_wal_insert_lsn()` in the same write and round trip, just after it: that
//! position is at or past the commit's record. A statement run outside a transaction through
//! the engine (autocommit), or a connection handed out by
//! [`acquire`](crate::PostgresEngine::acquire), may write without such an answer: it is
//! counted, and the next read-your-writes read asks the primary for its current position
//! once before it waits (a statement whose first word is `SELECT`, `SHOW`, `VALUES` or
//! `TABLE` is taken not to write; a function it calls that writes is not seen). Reads that
//! do not go through such a node cost nothing more, and a read whose position the node is
//! already known to have replayed asks nothing.
//!
//! Writes made elsewhere (another engine, another process) are not "yours": use
//! [`Freshness::max_lag`] for them.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::engine::PostgresEngine;
use crate::error::{Error, Result};

/// A freshness rule for reads through an extra node. See the [module](self) docs.
///
/// ```no_run
/// # async fn demo(primary: pgengine::Config, standby: pgengine::Config) -> pgengine::Result<()> {
/// use std::time::Duration;
/// use pgengine::{PostgresEngine, freshness::Freshness};
///
/// let engine = PostgresEngine::builder(primary)
///     .extra_node_with(
///         "replica",
///         PostgresEngine::new(standby),
///         Freshness::read_your_writes(Duration::from_millis(200)),
///     )
///     .build();
/// engine.execute("INSERT INTO band (name) VALUES ('Pythonistas')").await?;
/// // Waits until the standby has replayed the INSERT (or reads from the primary after 200 ms).
/// let n: i64 = engine.node("replica")?.query_one("SELECT count(*) FROM band").await?.get(0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Freshness {
    rule: Rule,
    otherwise: Fallback,
}

#[derive(Debug, Clone, Copy)]
enum Rule {
    Any,
    ReadYourWrites { max_wait: Duration },
    MaxLag { max_lag: Duration },
}

/// What a read does when the node is not fresh enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fallback {
    /// It goes to the primary (the default).
    Primary,
    /// It fails with [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) (read your writes) or
    /// [`ErrorKind::Pool`](crate::ErrorKind::Pool) (bounded lag), and nothing is sent to the
    /// primary.
    Error,
}

impl Freshness {
    /// No rule: reads go to the node however far behind it is (what
    /// [`extra_node`](crate::engine::EngineBuilder::extra_node) does).
    pub fn any() -> Freshness {
        Freshness {
            rule: Rule::Any,
            otherwise: Fallback::Primary,
        }
    }

    /// Read your writes: wait up to `max_wait` for the node to replay every commit made
    /// through the primary engine before the read, then fall back.
    pub fn read_your_writes(max_wait: Duration) -> Freshness {
        Freshness {
            rule: Rule::ReadYourWrites { max_wait },
            otherwise: Fallback::Primary,
        }
    }

    /// Bounded lag: use the node while its replay lag is under `max_lag`, then fall back.
    pub fn max_lag(max_lag: Duration) -> Freshness {
        Freshness {
            rule: Rule::MaxLag { max_lag },
            otherwise: Fallback::Primary,
        }
    }

    /// What a read does when the node is not fresh enough (the primary by default).
    pub fn otherwise(mut self, fallback: Fallback) -> Freshness {
        self.otherwise = fallback;
        self
    }

    pub(crate) fn wants_commit_positions(&self) -> bool {
        matches!(self.rule, Rule::ReadYourWrites { .. })
    }

    fn is_any(&self) -> bool {
        matches!(self.rule, Rule::Any)
    }
}

/// What a primary engine knows of its writes, for read-your-writes nodes.
#[derive(Debug, Default)]
pub(crate) struct Writes {
    /// The highest commit position learned (an LSN as a number).
    known: AtomicU64,
    /// Writes acknowledged without a position, since the primary was last asked for one.
    unknown: AtomicU64,
}

impl Writes {
    /// A commit's position, from the answer to [`POSITION_QUERY`].
    pub(crate) fn committed_at(&self, answer: Option<&str>) {
        match answer.and_then(parse_lsn) {
            Some(lsn) => {
                self.known.fetch_max(lsn, Ordering::AcqRel);
            }
            None => self.wrote_somewhere(),
        }
    }

    /// What a COMMIT's round trip said of its position ([`POSITION_QUERY`] asked after it): a
    /// commit at a known position, or — lost, not committed, not asked — a write whose
    /// position is not known (counting one that did not happen only makes a read wait).
    pub(crate) fn after_commit(&self, reply: &crate::connection::CommitReply) {
        match &reply.after {
            Some(Ok(position)) if reply.commit.is_ok() => self.committed_at(position.as_deref()),
            _ => self.wrote_somewhere(),
        }
    }

    /// A write whose position is not known.
    pub(crate) fn wrote_somewhere(&self) {
        self.unknown.fetch_add(1, Ordering::AcqRel);
    }

    /// The position every write acknowledged so far is at or before: asks `primary` once if
    /// some were acknowledged without one.
    /// The primary gets `limit` to answer.
    async fn position(&self, primary: &PostgresEngine, limit: Duration) -> Result<u64> {
        let unknown = self.unknown.load(Ordering::Acquire);
        if unknown > 0 {
            let answer = primary.ask_one(POSITION_QUERY, limit).await?;
            self.committed_at(answer.as_deref());
            // Those counted before the question are covered by its answer.
            self.unknown.fetch_sub(unknown, Ordering::AcqRel);
        }
        Ok(self.known.load(Ordering::Acquire))
    }
}

/// The primary's current WAL insert position, asked just after a COMMIT in the same round
/// trip: at or past the commit's record.
pub(crate) const POSITION_QUERY: &str = "SELECT pg_current_wal_insert_lsn()::text";

/// A standby's replay position.
const REPLAY_QUERY: &str = "SELECT pg_last_wal_replay_lsn()::text";

/// A standby's replay lag in seconds: 0 when it has replayed all it received, otherwise the
/// age of the last transaction it replayed.
const LAG_QUERY: &str = "SELECT CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM \
                         pg_last_wal_replay_lsn() THEN 0 ELSE coalesce(extract(epoch FROM \
                         now() - pg_last_xact_replay_timestamp()), 0) END::text";

/// How long a lag measurement is trusted.
const LAG_TTL: Duration = Duration::from_millis(100);

/// A node with its rule, as its primary keeps it.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) engine: PostgresEngine,
    freshness: Freshness,
    /// The highest replay position seen on the node.
    replayed: AtomicU64,
    /// The last lag measured, and when.
    lag: Mutex<Option<(Instant, Duration)>>,
}

impl Node {
    pub(crate) fn new(engine: PostgresEngine, freshness: Freshness) -> Node {
        Node {
            engine,
            freshness,
            replayed: AtomicU64::new(0),
            lag: Mutex::new(None),
        }
    }

    pub(crate) fn freshness(&self) -> &Freshness {
        &self.freshness
    }

    pub(crate) fn has_rule(&self) -> bool {
        !self.freshness.is_any()
    }
}

/// A node engine's link to its primary, for its rule: set on the handle
/// [`PostgresEngine::node`] returns.
#[derive(Debug, Clone)]
pub(crate) struct NodeLink {
    pub(crate) name: std::sync::Arc<str>,
    pub(crate) node: std::sync::Arc<Node>,
    pub(crate) primary: PostgresEngine,
}

impl NodeLink {
    /// Where a read through the node goes: `None` for the node itself, or the primary.
    pub(crate) async fn choose(&self) -> Result<Option<PostgresEngine>> {
        let fresh = match self.node.freshness.rule {
            Rule::Any => return Ok(None),
            Rule::ReadYourWrites { max_wait } => self.replayed_writes(max_wait).await?,
            Rule::MaxLag { max_lag } => self.lag_under(max_lag).await?,
        };
        if let Err(why) = fresh {
            return match self.node.freshness.otherwise {
                Fallback::Primary => {
                    tracing::debug!(
                        target: "pgengine::query",
                        node = &*self.name,
                        decision = "primary",
                        "the node is not fresh enough ({why}): reading from the primary"
                    );
                    Ok(Some(self.primary.clone()))
                }
                Fallback::Error => Err(match self.node.freshness.rule {
                    Rule::ReadYourWrites { .. } => {
                        Error::timeout(format!("node {:?} is not fresh enough: {why}", &*self.name))
                    }
                    _ => Error::pool(format!("node {:?} is not fresh enough: {why}", &*self.name)),
                }
                .retry_safe()),
            };
        }
        tracing::debug!(
            target: "pgengine::query",
            node = &*self.name,
            decision = "node",
            "the node is fresh enough"
        );
        Ok(None)
    }

    /// Waits up to `max_wait` for the node to replay the primary's writes so far.
    async fn replayed_writes(&self, max_wait: Duration) -> Result<std::result::Result<(), String>> {
        let target = self
            .primary
            .writes()
            .position(&self.primary, max_wait)
            .await?;
        if self.node.replayed.load(Ordering::Acquire) >= target {
            return Ok(Ok(()));
        }
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            // The question gets what is left of the wait (at least a moment).
            let left = max_wait
                .saturating_sub(started.elapsed())
                .max(Duration::from_millis(1));
            let replayed = self.node.engine.ask_one(REPLAY_QUERY, left).await;
            // A node that cannot say how far it is, is not fresh enough.
            let replayed = match replayed {
                Ok(answer) => answer,
                Err(e) => return Ok(Err(format!("it could not be asked: {}", e.redacted()))),
            };
            let replayed = replayed.as_deref().and_then(parse_lsn).unwrap_or(0);
            self.node.replayed.fetch_max(replayed, Ordering::AcqRel);
            if replayed >= target {
                return Ok(Ok(()));
            }
            if started.elapsed() + pause > max_wait {
                return Ok(Err(format!(
                    "it had replayed to {} and the reader's writes reach {} after {max_wait:?}",
                    format_lsn(replayed),
                    format_lsn(target)
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Whether the node's replay lag is under `max_lag` (measured at most every
    /// [`LAG_TTL`]).
    async fn lag_under(&self, max_lag: Duration) -> Result<std::result::Result<(), String>> {
        let cached = *self.node.lag.lock().unwrap_or_else(|p| p.into_inner());
        let lag = match cached {
            Some((at, lag)) if at.elapsed() < LAG_TTL => lag,
            _ => {
                // A node slower to answer than the bound is too far behind anyway.
                let answer = match self.node.engine.ask_one(LAG_QUERY, max_lag).await {
                    Ok(answer) => answer,
                    // A node that cannot say how far behind it is, is not fresh enough.
                    Err(e) => return Ok(Err(format!("it could not be asked: {}", e.redacted()))),
                };
                let seconds: f64 = answer
                    .as_deref()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(f64::INFINITY);
                let lag = Duration::try_from_secs_f64(seconds.max(0.0)).unwrap_or(Duration::MAX);
                *self.node.lag.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), lag));
                lag
            }
        };
        Ok(if lag < max_lag {
            Ok(())
        } else {
            Err(format!("its replay lag is {lag:?}, over {max_lag:?}"))
        })
    }
}

/// True for a statement taken not to write: one whose first word is `SELECT`, `SHOW`,
/// `VALUES` or `TABLE`.
pub(crate) fn reads_only(sql: &str) -> bool {
    crate::sql::first_keyword(sql).is_some_and(|word| {
        ["SELECT", "SHOW", "VALUES", "TABLE"]
            .iter()
            .any(|w| word.eq_ignore_ascii_case(w))
    })
}

/// Reads an LSN as PostgreSQL prints it (`16/B374D848`) as a number.
fn parse_lsn(text: &str) -> Option<u64> {
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from_str_radix(high, 16).ok()? << 32) | u64::from_str_radix(low, 16).ok()?)
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsns_read_as_numbers_in_order() {
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert!(parse_lsn("1/0") > parse_lsn("0/FFFFFFFF"));
        assert_eq!(parse_lsn("nonsense"), None);
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }

    #[test]
    fn only_plain_reads_are_taken_not_to_write() {
        assert!(reads_only("select 1"));
        assert!(reads_only("  (SELECT 1) UNION SELECT 2"));
        assert!(reads_only("TABLE band"));
        assert!(!reads_only("INSERT INTO band VALUES (1)"));
        assert!(!reads_only(
            "WITH x AS (DELETE FROM band RETURNING *) SELECT * FROM x"
        ));
        assert!(!reads_only("selectx"));
    }
}
