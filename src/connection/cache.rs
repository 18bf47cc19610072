//! The connection's prepared-statement cache: SQL text → a named statement on the server, its
//! parameter types and its result columns. Least recently used entries are evicted; the caller
//! must then Close the evicted statement on the server (we hand back its name for that).
//!
//! Plain data, no I/O: the connection decides when to Parse and Close.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use postgres_types::Type;

use crate::row::Column;

/// A statement the server has parsed and described: a shared handle, so that taking one from
/// the cache for every query costs one reference count, not one per part.
#[derive(Debug, Clone)]
pub(crate) struct Statement(Arc<Described>);

#[derive(Debug)]
pub(crate) struct Described {
    /// The server-side name; `""` for the unnamed statement.
    pub(crate) name: Arc<str>,
    /// The parameter types from ParameterDescription.
    pub(crate) param_types: Arc<[Type]>,
    /// The result columns from RowDescription (empty for NoData).
    pub(crate) columns: Arc<[Column]>,
    /// Running it changes the session for whoever uses the connection next (see
    /// `crate::sql::effects`): read once from the SQL, when the statement is prepared.
    pub(crate) changes_session: bool,
    /// The cache's clock when the statement was last used: the least recently used is
    /// evicted first. Kept here, not beside the map's key, so that a use found through the
    /// cache's last entry is counted without a lookup in the map.
    last_used: AtomicU64,
}

impl Statement {
    pub(crate) fn new(
        name: Arc<str>,
        param_types: Arc<[Type]>,
        columns: Arc<[Column]>,
        changes_session: bool,
    ) -> Self {
        Statement(Arc::new(Described {
            name,
            param_types,
            columns,
            changes_session,
            last_used: AtomicU64::new(0),
        }))
    }

    /// The same statement with other result columns.
    pub(crate) fn with_columns(&self, columns: Arc<[Column]>) -> Self {
        Statement::new(
            self.name.clone(),
            self.param_types.clone(),
            columns,
            self.changes_session,
        )
    }
}

impl std::ops::Deref for Statement {
    type Target = Described;

    fn deref(&self) -> &Described {
        &self.0
    }
}

impl Statement {
    fn used_at(&self, clock: u64) {
        self.last_used.store(clock, Ordering::Relaxed);
    }

    fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
    }
}

/// An LRU map from SQL text to prepared statements.
pub(crate) struct StatementCache {
    capacity: usize,
    entries: HashMap<Arc<str>, Statement, BuildHasherDefault<FxHasher>>,
    /// The entry the last lookup found. A statement run again and again (every statement of
    /// an `Atomic` of the same INSERT, a service's hot query) is found by comparing its text
    /// with this one's, without hashing it (measured: about 100 instructions a query for a
    /// 52-byte statement). Forgotten whenever the map changes.
    last: Option<(Arc<str>, Statement)>,
    /// Increases on every use; an entry's `last_used` orders eviction.
    clock: u64,
    /// Names are never reused on one connection, so a late CloseComplete or a stale name can
    /// never be confused with a newer statement.
    next_id: u64,
    /// A random number drawn for this cache, in every statement name (`pge_<tag>_<n>`): no
    /// other connection or client names a statement the same, so a statement looked for on
    /// the wrong server session (behind a transaction-mode pooler) is missing (SQLSTATE
    /// 26000), never another client's statement of the same shape.
    tag: u64,
}

impl StatementCache {
    /// A cache of `capacity` statements whose names carry `tag` (drawn at random by the
    /// connection; the cache itself draws nothing).
    pub(crate) fn new(capacity: usize, tag: u64) -> StatementCache {
        StatementCache {
            tag,
            capacity,
            entries: HashMap::default(),
            last: None,
            clock: 0,
            next_id: 0,
        }
    }

    /// The most statements kept; 0 means none are kept (unnamed statements only).
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// The cached statement for `sql`, marked as just used.
    pub(crate) fn get(&mut self, sql: &str) -> Option<&Statement> {
        self.clock += 1;
        let hit = matches!(&self.last, Some((text, _)) if **text == *sql);
        if !hit {
            let (text, statement) = self.entries.get_key_value(sql)?;
            self.last = Some((text.clone(), statement.clone()));
        }
        let (_, statement) = self.last.as_ref()?;
        statement.used_at(self.clock);
        Some(statement)
    }

    /// A fresh statement name, or `""` (the unnamed statement) when caching is off.
    pub(crate) fn next_name(&mut self) -> Arc<str> {
        if self.capacity == 0 {
            return Arc::from("");
        }
        self.next_id += 1;
        Arc::from(format!("pge_{:016x}_{}", self.tag, self.next_id))
    }

    /// Makes room for one more entry: returns the names of statements evicted to do so, which
    /// the caller must Close on the server.
    pub(crate) fn make_room(&mut self) -> Vec<Arc<str>> {
        let mut evicted = Vec::new();
        while self.capacity > 0 && self.entries.len() >= self.capacity {
            match self.evict_oldest() {
                Some(name) => evicted.push(name),
                None => break,
            }
        }
        evicted
    }

    /// Remembers `statement` for `sql` (after [`StatementCache::make_room`]) and returns the
    /// name of a different statement it replaced. Does nothing when caching is off.
    pub(crate) fn insert(&mut self, sql: &str, statement: Statement) -> Option<Arc<str>> {
        if self.capacity == 0 || statement.name.is_empty() {
            return None;
        }
        self.clock += 1;
        self.last = None;
        let name = statement.name.clone();
        statement.used_at(self.clock);
        let old = self.entries.insert(sql.into(), statement);
        // Another statement for the same SQL is replaced: its name must be Closed.
        old.map(|old| old.name.clone()).filter(|old| *old != name)
    }

    /// Forgets the statement for `sql` and returns it (so its name can be Closed).
    pub(crate) fn remove(&mut self, sql: &str) -> Option<Statement> {
        self.last = None;
        self.entries.remove(sql)
    }

    /// Changes the capacity and returns the names of the statements that no longer fit, which
    /// the caller must Close. Names keep counting up, so none is ever reused.
    pub(crate) fn set_capacity(&mut self, capacity: usize) -> Vec<Arc<str>> {
        self.capacity = capacity;
        self.last = None;
        if capacity == 0 {
            return self.entries.drain().map(|(_, s)| s.name.clone()).collect();
        }
        let mut evicted = Vec::new();
        while self.entries.len() > capacity {
            evicted.extend(self.evict_oldest());
        }
        evicted
    }

    fn evict_oldest(&mut self) -> Option<Arc<str>> {
        self.last = None;
        let oldest = self
            .entries
            .iter()
            .min_by_key(|(_, s)| s.last_used())
            .map(|(k, _)| k.clone())?;
        self.entries.remove(&oldest).map(|s| s.name.clone())
    }

    /// Forgets everything (e.g. after `DISCARD ALL` or `DEALLOCATE ALL` dropped the statements
    /// on the server).
    pub(crate) fn clear(&mut self) {
        self.last = None;
        self.entries.clear();
    }
}

/// The Fx hash (from rustc): a multiply and a rotate per word. The keys are SQL texts this
/// process wrote, so the DoS resistance of the default SipHash buys nothing here, and hashing
/// the SQL happens on every query.
#[derive(Default)]
pub(crate) struct FxHasher(u64);

impl Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let word = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stmt(cache: &mut StatementCache) -> Statement {
        Statement::new(cache.next_name(), Arc::from([]), Arc::from([]), false)
    }

    #[test]
    fn evicts_least_recently_used() {
        let mut c = StatementCache::new(2, 7);
        let a = stmt(&mut c);
        assert!(c.make_room().is_empty());
        c.insert("a", a.clone());
        let b = stmt(&mut c);
        assert!(c.make_room().is_empty());
        c.insert("b", b);
        // Using "a" makes "b" the oldest.
        assert_eq!(c.get("a").unwrap().name, a.name);
        let evicted = c.make_room();
        assert_eq!(evicted.len(), 1);
        assert_eq!(&*evicted[0], "pge_0000000000000007_2");
        let d = stmt(&mut c);
        c.insert("d", d);
        assert!(c.get("b").is_none());
        assert!(c.get("a").is_some());
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn the_last_entry_found_is_never_one_the_map_no_longer_holds() {
        let mut c = StatementCache::new(2, 7);
        let a = stmt(&mut c);
        c.insert("a", a.clone());
        // Found through the map, then again through the last entry: the same statement.
        assert_eq!(c.get("a").unwrap().name, a.name);
        assert_eq!(c.get("a").unwrap().name, a.name);
        // A new statement for the same text replaces it: the last entry is not the old one.
        let a2 = stmt(&mut c);
        assert_eq!(c.insert("a", a2.clone()).as_deref(), Some(&*a.name));
        assert_eq!(c.get("a").unwrap().name, a2.name);
        // Removed, cleared, evicted or dropped by a smaller capacity: not found.
        c.remove("a");
        assert!(c.get("a").is_none());
        c.insert("a", a2.clone());
        assert!(c.get("a").is_some());
        c.clear();
        assert!(c.get("a").is_none());
        c.insert("a", a2.clone());
        assert!(c.get("a").is_some());
        assert_eq!(c.set_capacity(0).len(), 1);
        assert!(c.get("a").is_none());
        c.set_capacity(1);
        c.insert("a", a2);
        assert!(c.get("a").is_some());
        let b = stmt(&mut c);
        assert_eq!(c.make_room().len(), 1);
        c.insert("b", b.clone());
        assert!(c.get("a").is_none());
        assert_eq!(c.get("b").unwrap().name, b.name);
    }

    #[test]
    fn a_use_found_through_the_last_entry_counts_for_eviction() {
        let mut c = StatementCache::new(2, 7);
        let a = stmt(&mut c);
        c.insert("a", a);
        let b = stmt(&mut c);
        c.insert("b", b.clone());
        // "a" is found through the map, then several times through the last entry, last of
        // all: "b" is the least recently used.
        for _ in 0..3 {
            c.get("a").unwrap();
        }
        assert_eq!(c.make_room(), vec![b.name.clone()]);
    }

    #[test]
    fn capacity_zero_keeps_nothing_and_uses_the_unnamed_statement() {
        let mut c = StatementCache::new(0, 7);
        let s = stmt(&mut c);
        assert_eq!(&*s.name, "");
        assert!(c.make_room().is_empty());
        c.insert("a", s);
        assert!(c.get("a").is_none());
    }

    #[test]
    fn names_are_never_reused_and_carry_the_caches_tag() {
        let mut c = StatementCache::new(1, 7);
        let names: Vec<_> = (0..5).map(|_| c.next_name()).collect();
        let mut unique = names.clone();
        unique.dedup();
        assert_eq!(names, unique);
        // Two caches (two connections, two clients) never name a statement alike.
        let mut other = StatementCache::new(1, 0xfeed);
        assert_eq!(&*other.next_name(), "pge_000000000000feed_1");
        assert_ne!(c.next_name(), other.next_name());
    }
}
