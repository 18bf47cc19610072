//! The pool's seam to PostgreSQL: how to open a [`Connection`], and whether one that comes back
//! can be handed to someone else. The connection's own state decides: the transaction status
//! of its last ReadyForQuery, and whether it still owes responses.

use super::{Disposition, Manager};
use crate::config::Config;
use crate::connection::{Connection, TransactionStatus};
use crate::error::Result;

/// Opens connections with one [`Config`] for a [`super::Pool`].
#[derive(Debug, Clone)]
pub struct ConnectionManager {
    config: Config,
    statement_cache_capacity: Option<usize>,
    query_timeout: Option<std::time::Duration>,
}

impl ConnectionManager {
    /// A manager that opens connections with `config`.
    pub fn new(config: Config) -> ConnectionManager {
        ConnectionManager {
            config,
            statement_cache_capacity: None,
            query_timeout: None,
        }
    }

    /// Sets the query timeout of every connection it opens (see
    /// [`Connection::set_query_timeout`]).
    pub fn query_timeout(mut self, timeout: Option<std::time::Duration>) -> ConnectionManager {
        self.query_timeout = timeout;
        self
    }

    /// Sets the statement cache capacity of every connection it opens (0 for PgBouncer in
    /// transaction pooling mode).
    pub fn statement_cache_capacity(mut self, capacity: usize) -> ConnectionManager {
        self.statement_cache_capacity = Some(capacity);
        self
    }
}

impl Manager for ConnectionManager {
    type Resource = Connection;

    async fn connect(&self) -> Result<Connection> {
        let mut conn = Connection::connect(&self.config).await?;
        if let Some(capacity) = self.statement_cache_capacity {
            conn.set_statement_cache_capacity(capacity);
        }
        conn.set_query_timeout(self.query_timeout);
        Ok(conn)
    }

    fn disposition(&self, conn: &Connection) -> Disposition {
        if conn.is_broken() || conn.is_busy() {
            // Broken, or a query's future was dropped half way: what the server will send
            // next is unknown, so nobody else may see this connection.
            Disposition::Discard
        } else if conn.transaction_status() != TransactionStatus::Idle {
            // A transaction left open (or failed) by its user: roll it back first.
            Disposition::Recycle
        } else {
            Disposition::Reuse
        }
    }

    async fn recycle(&self, conn: &mut Connection) -> Result<()> {
        conn.simple_query("ROLLBACK").await.map(|_| ())
    }

    async fn health_check(&self, conn: &mut Connection) -> Result<()> {
        // An empty query: the cheapest full round trip (EmptyQueryResponse, ReadyForQuery).
        conn.simple_query("").await.map(|_| ())
    }

    fn is_alive(&self, conn: &mut Connection) -> bool {
        conn.check_alive()
    }

    async fn close(&self, conn: Connection) {
        let _ = conn.close().await;
    }
}
