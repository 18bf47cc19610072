//! What became of a COMMIT whose answer was lost: the transaction learns its id in the
//! COMMIT's own round trip ([`COMMIT_ID_QUERY`], asked just before it), and after a loss a new
//! connection asks the server `pg_xact_status` of that id. Used by transactions
//! ([`TransactionBuilder::track_commit`](crate::transaction::TransactionBuilder::track_commit))
//! and by Atomic runs that retry.

use std::time::Duration;

use crate::engine::PostgresEngine;
use crate::error::{Error, Result, TransactionError};

/// Asked just before a tracked COMMIT, in the same round trip: the transaction's id (none if
/// it wrote nothing) and [`SERVER_EPOCH`].
pub(crate) const COMMIT_ID_QUERY: &str = "SELECT pg_current_xact_id_if_assigned()::text || ' ' || \
                               coalesce((SELECT stats_reset FROM pg_stat_archiver)::text, '')";

/// What tells one run of a server from another: the archiver's statistics are reset when the
/// server starts and after a crash restart, and a standby promoted in a failover has its
/// own. (Reset by hand it changes too, which only makes an outcome unknown.)
const SERVER_EPOCH: &str = "SELECT coalesce((SELECT stats_reset FROM pg_stat_archiver)::text, '')";

/// How long a lost COMMIT's outcome is looked for.
const OUTCOME_CHECK_LIMIT: Duration = Duration::from_secs(10);

/// What a tracked transaction learned of itself just before its COMMIT.
#[derive(Debug, PartialEq)]
pub(crate) enum CommitId {
    /// It wrote nothing, so it has no id.
    NoneAssigned,
    /// Its id, and the server's epoch marker.
    Assigned { id: u64, epoch: String },
}

impl CommitId {
    /// Reads the answer to [`COMMIT_ID_QUERY`]: `"<id> <epoch>"`, or NULL when no id was
    /// assigned. `None` for anything else.
    /// What the answer to [`COMMIT_ID_QUERY`] in a COMMIT's round trip said, if it came.
    pub(crate) fn learned(answer: Option<Result<Option<String>>>) -> Option<CommitId> {
        CommitId::parse(answer?.ok()?.as_deref())
    }

    pub(crate) fn parse(answer: Option<&str>) -> Option<CommitId> {
        let Some(answer) = answer else {
            return Some(CommitId::NoneAssigned);
        };
        let (id, epoch) = answer.split_once(' ')?;
        Some(CommitId::Assigned {
            id: id.parse().ok()?,
            epoch: epoch.to_owned(),
        })
    }
}

/// Finds out what became of a COMMIT whose answer was lost with `lost`, from the
/// transaction's id if it learned it (see [`TransactionBuilder::track_commit`]).
pub(crate) async fn resolve_lost_commit(
    engine: &PostgresEngine,
    id: Option<CommitId>,
    lost: Error,
) -> Result<()> {
    let unknown = |why: String| {
        Err(Error::transaction(
            TransactionError::OutcomeUnknown,
            format!(
                "the connection was lost after COMMIT was sent and before its answer \
                 arrived ({}): the transaction may or may not have committed; {why}",
                lost.redacted()
            ),
        )
        .with_source(lost.duplicate()))
    };
    let id = match id {
        None => {
            return unknown(
                "its id was not learned (track_commit is off, the server \
                                is older than 13, or the id's answer was lost too)"
                    .into(),
            );
        }
        // It wrote nothing: whether the COMMIT ran changes nothing.
        Some(CommitId::NoneAssigned) => return Ok(()),
        Some(CommitId::Assigned { id, epoch }) => (id, epoch),
    };
    let deadline = tokio::time::Instant::now() + OUTCOME_CHECK_LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, ask_xact_status(engine, id.0)).await {
            Err(_) => {
                return unknown(format!(
                    "asking the server within {OUTCOME_CHECK_LIMIT:?} did not tell"
                ));
            }
            Ok(Err(e)) => {
                return unknown(format!("asking the server failed: {}", e.redacted()));
            }
            Ok(Ok((status, now_epoch))) => {
                if now_epoch.as_deref() != Some(id.1.as_str()) {
                    return unknown(
                        "the server answering is not the one the transaction ran on, or \
                         it restarted after a crash since (a lost COMMIT's id may then \
                         belong to another transaction)"
                            .into(),
                    );
                }
                match status.as_deref() {
                    Some("committed") => return Ok(()),
                    Some("aborted") => {
                        return Err(Error::transaction(
                            TransactionError::NotCommitted,
                            format!(
                                "the connection was lost during COMMIT ({}); the server \
                                 says the transaction was aborted: nothing was saved",
                                lost.redacted()
                            ),
                        )
                        .with_source(lost.duplicate()));
                    }
                    // Its backend has not finished with it yet: ask again.
                    Some("in progress") if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    other => {
                        return unknown(format!("the server says {other:?}"));
                    }
                }
            }
        }
    }
}

/// `pg_xact_status` of transaction `id`, and the epoch marker of the server answering.
async fn ask_xact_status(
    engine: &PostgresEngine,
    id: u64,
) -> Result<(Option<String>, Option<String>)> {
    // The id is a number we parsed: it goes into the text as digits only.
    let sql = format!("SELECT pg_xact_status('{id}'::xid8)::text, ({SERVER_EPOCH})");
    let mut conn = engine.checkout(false).await?;
    let results = conn.simple_query(&sql).await?;
    let row = results
        .first()
        .and_then(|r| r.rows().first())
        .ok_or_else(|| Error::protocol("pg_xact_status returned no row"))?;
    Ok((row.get(0).map(str::to_owned), row.get(1).map(str::to_owned)))
}
