//! SQL text as the server's lexer sees it: words, placeholders and semicolons outside string
//! literals, quoted identifiers, dollar-quoted bodies and comments. No I/O, no state.
//!
//! Two things are read from it:
//!
//! - how many parameters the server will see (the highest `$n`), checked against the values
//!   before anything is sent ([`count_placeholders`]);
//! - what each statement does beyond its own work ([`effects`]): whether it controls the
//!   transaction (`BEGIN`, `COMMIT`, `SAVEPOINT`, …) or changes the session for whoever uses
//!   the connection next (`SET`, `LISTEN`, `PREPARE`, a temporary table, a session advisory
//!   lock, …). The engine routes on this: such a statement must never share a pipelined
//!   connection with other tasks' queries, and transaction control outside a transaction
//!   scope cannot do what it says when each statement runs on whichever connection is free.
//!
//! The classification reads the statement's leading keywords the way PostgreSQL's grammar
//! does (PostgreSQL docs, SQL Commands). It errs on the safe side: a statement that might
//! change the session (`DO`, a call of `set_config`) is taken as one that does.

use smallvec::SmallVec;

/// One token of SQL text. Literals, quoted identifiers and dollar-quoted strings are
/// [`Token::Other`]: nothing inside them is a keyword, a placeholder or a semicolon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token<'a> {
    /// An unquoted identifier or keyword, as written (compare with `eq_ignore_ascii_case`).
    Word(&'a str),
    /// `$n` (`usize::MAX` when `n` does not fit).
    Param(usize),
    Semicolon,
    OpenParen,
    Other,
}

/// The tokens of `sql`, in order.
struct Tokens<'a> {
    sql: &'a str,
    i: usize,
}

fn tokens(sql: &str) -> Tokens<'_> {
    Tokens { sql, i: 0 }
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

impl<'a> Iterator for Tokens<'a> {
    type Item = Token<'a>;

    fn next(&mut self) -> Option<Token<'a>> {
        let b = self.sql.as_bytes();
        loop {
            let i = self.i;
            let c = *b.get(i)?;
            match c {
                c if c.is_ascii_whitespace() => self.i += 1,
                b'-' if b.get(i + 1) == Some(&b'-') => {
                    self.i = b[i..]
                        .iter()
                        .position(|&c| c == b'\n')
                        .map_or(b.len(), |p| i + p + 1);
                }
                b'/' if b.get(i + 1) == Some(&b'*') => self.i = skip_block_comment(b, i + 2),
                b'\'' => {
                    self.i = skip_quoted(b, i + 1, b'\'', false);
                    return Some(Token::Other);
                }
                b'"' => {
                    self.i = skip_quoted(b, i + 1, b'"', false);
                    return Some(Token::Other);
                }
                b';' => {
                    self.i += 1;
                    return Some(Token::Semicolon);
                }
                b'(' => {
                    self.i += 1;
                    return Some(Token::OpenParen);
                }
                b'$' => {
                    let digits = b[i + 1..].iter().take_while(|c| c.is_ascii_digit()).count();
                    if digits > 0 {
                        self.i = i + 1 + digits;
                        let n = self.sql[i + 1..i + 1 + digits]
                            .parse::<usize>()
                            .unwrap_or(usize::MAX);
                        return Some(Token::Param(n));
                    }
                    match dollar_tag_end(b, i) {
                        Some(end) => {
                            // $tag$ … $tag$: skip to the matching closing tag.
                            let tag = &b[i..=end];
                            self.i = find(b, end + 1, tag).map_or(b.len(), |p| p + tag.len());
                        }
                        None => self.i += 1,
                    }
                    return Some(Token::Other);
                }
                c if is_ident_start(c) => {
                    let len = b[i..].iter().take_while(|&&c| is_ident_char(c)).count();
                    self.i = i + len;
                    // E'…' strings honour backslash escapes; standard ones only doubled quotes.
                    if len == 1 && matches!(c, b'e' | b'E') && b.get(self.i) == Some(&b'\'') {
                        self.i = skip_quoted(b, self.i + 1, b'\'', true);
                        return Some(Token::Other);
                    }
                    return Some(Token::Word(&self.sql[i..i + len]));
                }
                c if c.is_ascii_digit() => {
                    // A number (digits, a point, an exponent); `1e5` is one token.
                    let len = b[i..]
                        .iter()
                        .take_while(|&&c| c.is_ascii_alphanumeric() || c == b'.' || c == b'_')
                        .count();
                    self.i = i + len;
                    return Some(Token::Other);
                }
                _ => {
                    self.i += 1;
                    return Some(Token::Other);
                }
            }
        }
    }
}

fn skip_quoted(b: &[u8], mut i: usize, quote: u8, backslash_escapes: bool) -> usize {
    while i < b.len() {
        if backslash_escapes && b[i] == b'\\' {
            i += 2;
        } else if b[i] == quote {
            if b.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return i + 1;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

fn skip_block_comment(b: &[u8], mut i: usize) -> usize {
    // Block comments nest in PostgreSQL.
    let mut depth = 1;
    while i < b.len() {
        if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
            depth += 1;
            i += 2;
        } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
            depth -= 1;
            i += 2;
            if depth == 0 {
                return i;
            }
        } else {
            i += 1;
        }
    }
    b.len()
}

/// If a dollar-quote tag (`$$` or `$name$`) starts at `i`, the index of its closing `$`.
fn dollar_tag_end(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'$' => return Some(j),
            // A tag cannot start with a digit (that would be a placeholder).
            c if is_ident_char(c) && c != b'$' && !(j == i + 1 && c.is_ascii_digit()) => j += 1,
            _ => return None,
        }
    }
    None
}

fn find(hay: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(needle.len())
        .position(|w| w == needle)
        .map(|p| from + p)
}

/// The number of parameters the server will see in `sql`: the highest `$n` outside string
/// literals, quoted identifiers, dollar-quoted strings and comments. PostgreSQL itself takes the
/// highest number, so `$2` alone means two parameters.
///
/// ```
/// use pgengine::query::count_placeholders;
/// assert_eq!(count_placeholders("SELECT $1, '$2', \"$3\", $$ $4 $$ -- $5\n, $2"), 2);
/// ```
pub fn count_placeholders(sql: &str) -> usize {
    tokens(sql)
        .filter_map(|t| match t {
            Token::Param(n) => Some(n),
            _ => None,
        })
        .max()
        .unwrap_or(0)
}

/// The first keyword of `sql` (after comments, white space and opening parentheses: `(SELECT
/// …) UNION …`), if it starts with one: the statement's operation, as a trace names it.
pub(crate) fn first_keyword(sql: &str) -> Option<&str> {
    match tokens(sql).find(|t| *t != Token::OpenParen)? {
        Token::Word(w) => Some(w),
        _ => None,
    }
}

/// A statement that controls the transaction block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Control {
    /// `BEGIN`, `START TRANSACTION`.
    Begin,
    /// `COMMIT`, `END`.
    Commit,
    /// `ROLLBACK`, `ABORT`.
    Rollback,
    /// `SAVEPOINT`.
    Savepoint,
    /// `RELEASE [SAVEPOINT]`.
    Release,
    /// `ROLLBACK TO [SAVEPOINT]`.
    RollbackTo,
    /// `PREPARE TRANSACTION` (two-phase commit's first phase).
    PrepareTransaction,
}

impl Control {
    /// The statement as a user would name it.
    pub(crate) fn keyword(self) -> &'static str {
        match self {
            Control::Begin => "BEGIN",
            Control::Commit => "COMMIT",
            Control::Rollback => "ROLLBACK",
            Control::Savepoint => "SAVEPOINT",
            Control::Release => "RELEASE",
            Control::RollbackTo => "ROLLBACK TO SAVEPOINT",
            Control::PrepareTransaction => "PREPARE TRANSACTION",
        }
    }
}

/// What the statements of some SQL text do beyond their own work.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// The transaction-control statements, in order.
    pub(crate) control: SmallVec<[Control; 2]>,
    /// Some statement changes (or may change) the session for whoever uses the connection
    /// next.
    pub(crate) session: bool,
}

impl Effects {
    /// Whether the statements, run in order on one connection that starts idle, end with no
    /// transaction block left open and never end or change a block they did not open. If not,
    /// the first statement that breaks the rule.
    pub(crate) fn unbalanced(&self) -> Option<Control> {
        let mut open = false;
        for &c in &self.control {
            match c {
                Control::Begin if !open => open = true,
                Control::Begin => return Some(c),
                Control::Commit | Control::Rollback | Control::PrepareTransaction if open => {
                    open = false;
                }
                Control::Savepoint | Control::Release | Control::RollbackTo if open => {}
                _ => return Some(c),
            }
        }
        open.then_some(Control::Begin)
    }
}

/// Functions whose call changes the session beyond the statement: a setting made for the
/// session (`set_config(…, false)`: the third argument is not read, so any call counts) and
/// session-level advisory locks (the `_xact_` ones end with the transaction).
const SESSION_FUNCTIONS: &[&str] = &[
    "set_config",
    "pg_advisory_lock",
    "pg_advisory_lock_shared",
    "pg_try_advisory_lock",
    "pg_try_advisory_lock_shared",
];

/// Statements whose leading keyword alone says that they change the session: settings,
/// channels, cursors (`DECLARE … WITH HOLD` outlives its transaction; `FETCH`, `MOVE`,
/// `CLOSE` act on the session's cursors), SQL prepared statements, `DISCARD`, `LOAD`, and
/// `DO` (its body is not read here).
const SESSION_STATEMENTS: &[&str] = &[
    "reset",
    "listen",
    "unlisten",
    "declare",
    "fetch",
    "move",
    "close",
    "deallocate",
    "discard",
    "load",
    "do",
];

/// Reads what every statement of `sql` does beyond its own work.
///
/// ```text
/// "BEGIN"                            control [Begin]
/// "  /* x */ commit AND CHAIN"       control [Commit]
/// "COMMIT PREPARED 'gid'"            plain (not the current transaction)
/// "SET search_path TO app"           session
/// "SET LOCAL work_mem = '1MB'"       plain (ends with its transaction)
/// "CREATE TEMP TABLE t (x int)"      session
/// "SELECT set_config('a.b', $1, false)"   session
/// ```
pub(crate) fn effects(sql: &str) -> Effects {
    let mut effects = Effects::default();
    let mut statement = Statement::default();
    for token in tokens(sql) {
        if token == Token::Semicolon && statement.body_depth == 0 {
            statement.finish(&mut effects);
            statement = Statement::default();
        } else {
            statement.push(token, &mut effects);
        }
    }
    statement.finish(&mut effects);
    effects
}

/// [`effects`] of one statement sent with the extended protocol (the server refuses a Parse
/// of several): its leading keywords decide, unless the text holds one of the few words that
/// can change the session from further in (`temp`, `set_config`, `advisory_lock`, in any
/// case), and then the whole text is read. This runs on every query the engine routes, so
/// the common statement costs one pass over its bytes and a few tokens, not a full read.
pub(crate) fn statement_effects(sql: &str) -> StatementEffects {
    // Applications send the same few statements again and again: the last readings of this
    // thread are kept, by their whole text (compared byte for byte, so a reading is never
    // taken for another text).
    thread_local! {
        static READ: std::cell::RefCell<Readings> = std::cell::RefCell::new((0, Default::default()));
    }
    READ.with(|read| {
        let mut read = read.borrow_mut();
        if let Some((_, effects)) = read.1.iter().flatten().find(|(text, _)| **text == *sql) {
            return *effects;
        }
        let effects = StatementEffects::of(&read_statement(sql));
        let (next, slots) = &mut *read;
        slots[*next] = Some((Box::from(sql), effects));
        *next = (*next + 1) % slots.len();
        effects
    })
}

/// The last statements a thread read, and the next slot to fill.
type Readings = (usize, [Option<(Box<str>, StatementEffects)>; 8]);

/// What one statement does beyond its work: what [`statement_effects`] gives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StatementEffects {
    /// It controls the transaction block.
    pub(crate) control: Option<Control>,
    /// It changes (or may change) the session.
    pub(crate) session: bool,
}

impl StatementEffects {
    fn of(effects: &Effects) -> StatementEffects {
        StatementEffects {
            control: effects.control.first().copied(),
            session: effects.session,
        }
    }

    /// Neither transaction control nor a session change: safe to share a connection.
    pub(crate) fn is_plain(&self) -> bool {
        self.control.is_none() && !self.session
    }
}

/// [`statement_effects`] without the memory of what was read.
fn read_statement(sql: &str) -> Effects {
    if has_session_marker(sql.as_bytes()) {
        return effects(sql);
    }
    // Most statements (SELECT, INSERT, UPDATE, DELETE, WITH, …) are known by their first word.
    match tokens(sql).next() {
        Some(Token::Word(first))
            if LEADING_WORDS
                .iter()
                .chain(SESSION_STATEMENTS)
                .any(|k| first.eq_ignore_ascii_case(k)) => {}
        _ => return Effects::default(),
    }
    let mut effects = Effects::default();
    let mut statement = Statement::default();
    for token in tokens(sql).take(4) {
        if token == Token::Semicolon {
            break;
        }
        statement.push(token, &mut effects);
    }
    statement.finish(&mut effects);
    effects
}

/// The first words, besides [`SESSION_STATEMENTS`], whose statements [`Statement::finish`]
/// reads further: transaction control, and `SET`, `PREPARE` and `CREATE`, whose next words
/// decide.
const LEADING_WORDS: &[&str] = &[
    "begin",
    "start",
    "commit",
    "end",
    "rollback",
    "abort",
    "savepoint",
    "release",
    "prepare",
    "set",
    "create",
];

/// Whether `sql` holds, anywhere and in any case, a word that can change the session from
/// past a statement's leading keywords: `temp` (`CREATE OR REPLACE TEMP`, `INTO TEMP`,
/// `pg_temp`), `set_config`, `advisory_lock`.
fn has_session_marker(b: &[u8]) -> bool {
    let at = |from: usize, word: &[u8]| {
        b.get(from..from + word.len())
            .is_some_and(|w| w.eq_ignore_ascii_case(word))
    };
    // One pass, looking closer only at `_` and at an `m`.
    (0..b.len()).any(|i| match b[i] {
        b'_' => {
            (i >= 3 && at(i - 3, b"set") && at(i + 1, b"config"))
                || (i >= 8 && at(i - 8, b"advisory") && at(i + 1, b"lock"))
        }
        // A letter's lower case is its byte with 0x20 set.
        c if c | 0x20 == b'm' => i >= 2 && at(i - 2, b"temp"),
        _ => false,
    })
}

/// One statement being read: its first three words and what its later words showed.
#[derive(Default)]
struct Statement<'a> {
    leading: [&'a str; 3],
    words: usize,
    /// Every token so far was a word: the leading keywords are still being read.
    other_seen: bool,
    previous: Option<Token<'a>>,
    /// `CREATE [OR REPLACE] FUNCTION` or `PROCEDURE`: its body may be SQL-standard.
    routine: bool,
    /// Inside a SQL-standard routine body (`CREATE FUNCTION … BEGIN ATOMIC … END`), where
    /// semicolons do not end the statement: `BEGIN` and `CASE` open, `END` closes (as psql
    /// counts them).
    body_depth: usize,
}

impl<'a> Statement<'a> {
    fn push(&mut self, token: Token<'a>, effects: &mut Effects) {
        if !matches!(token, Token::Word(_)) {
            self.other_seen = true;
        }
        if let Token::Word(w) = token {
            if self.words < 3 && !self.other_seen {
                self.leading[self.words] = w;
            }
            self.words += 1;
            if self.is(0, "create")
                && self.words <= 4
                && (w.eq_ignore_ascii_case("function") || w.eq_ignore_ascii_case("procedure"))
            {
                self.routine = true;
            }
            if self.routine {
                if w.eq_ignore_ascii_case("begin") || w.eq_ignore_ascii_case("case") {
                    self.body_depth += 1;
                } else if w.eq_ignore_ascii_case("end") {
                    self.body_depth = self.body_depth.saturating_sub(1);
                }
            }
            // A temporary object lives as long as the session: CREATE [LOCAL|GLOBAL] TEMP …,
            // CREATE OR REPLACE TEMP VIEW, SELECT … INTO TEMP, or one named in pg_temp.
            let temp = (w.eq_ignore_ascii_case("temp") || w.eq_ignore_ascii_case("temporary"))
                && matches!(self.previous, Some(Token::Word(p))
                    if ["create", "local", "global", "into", "replace"]
                        .iter()
                        .any(|k| p.eq_ignore_ascii_case(k)));
            if temp || w.eq_ignore_ascii_case("pg_temp") {
                effects.session = true;
            }
        }
        if token == Token::OpenParen
            && let Some(Token::Word(f)) = self.previous
            && SESSION_FUNCTIONS.iter().any(|s| f.eq_ignore_ascii_case(s))
        {
            effects.session = true;
        }
        self.previous = Some(token);
    }

    fn is(&self, i: usize, keyword: &str) -> bool {
        self.leading[i].eq_ignore_ascii_case(keyword)
    }

    fn finish(&self, effects: &mut Effects) {
        if self.words == 0 {
            return;
        }
        let control = if self.is(0, "begin") || (self.is(0, "start") && self.is(1, "transaction")) {
            Some(Control::Begin)
        } else if (self.is(0, "commit") || self.is(0, "rollback")) && self.is(1, "prepared") {
            // Ends a prepared transaction, not the session's: it runs alone, like any command.
            None
        } else if self.is(0, "commit") || self.is(0, "end") {
            Some(Control::Commit)
        } else if self.is(0, "rollback") || self.is(0, "abort") {
            let to = self.is(1, "to")
                || ((self.is(1, "work") || self.is(1, "transaction")) && self.is(2, "to"));
            Some(if to && self.is(0, "rollback") {
                Control::RollbackTo
            } else {
                Control::Rollback
            })
        } else if self.is(0, "savepoint") {
            Some(Control::Savepoint)
        } else if self.is(0, "release") {
            Some(Control::Release)
        } else if self.is(0, "prepare") && self.is(1, "transaction") {
            Some(Control::PrepareTransaction)
        } else {
            None
        };
        if let Some(control) = control {
            effects.control.push(control);
            return;
        }
        let session = if self.is(0, "set") {
            // SET LOCAL, SET TRANSACTION and SET CONSTRAINTS end with their transaction;
            // SET SESSION CHARACTERISTICS and every other SET outlive it.
            !(self.is(1, "local") || self.is(1, "transaction") || self.is(1, "constraints"))
        } else if self.is(0, "prepare") {
            true
        } else {
            SESSION_STATEMENTS.iter().any(|k| self.is(0, k))
        };
        effects.session |= session;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn placeholders_outside_literals_and_comments() {
        let cases: &[(&str, usize)] = &[
            ("SELECT 1", 0),
            ("SELECT $1", 1),
            ("SELECT $2", 2),
            ("SELECT $1 + $10", 10),
            ("SELECT '$1'", 0),
            ("SELECT 'it''s $1'", 0),
            ("SELECT E'\\'$1'", 0),
            ("SELECT e'\\\\', $1", 1),
            ("SELECT \"$1\"", 0),
            ("SELECT 1 -- $1\n", 0),
            ("SELECT 1 -- $1\n + $2", 2),
            ("SELECT /* $1 /* $2 */ $3 */ $4", 4),
            ("SELECT $$ $1 $$, $2", 2),
            ("SELECT $tag$ $1 $tag$, $3", 3),
            ("SELECT $tag$ $1 $other$ $2 $tag$", 0),
            ("SELECT a$1 FROM t", 0),
            ("SELECT some_e'x' FROM t WHERE $1", 1),
            ("SELECT $99999999999999999999999", usize::MAX),
            ("SELECT 'unterminated $1", 0),
            ("SELECT 1e5, $1", 1),
        ];
        for (sql, n) in cases {
            assert_eq!(count_placeholders(sql), *n, "{sql}");
        }
    }

    fn control(sql: &str) -> Vec<Control> {
        effects(sql).control.to_vec()
    }

    #[test]
    fn transaction_control_is_found_however_it_is_written() {
        use Control::*;
        let cases: &[(&str, &[Control])] = &[
            ("BEGIN", &[Begin]),
            ("begin;", &[Begin]),
            ("  /* why */ BeGiN ISOLATION LEVEL SERIALIZABLE", &[Begin]),
            ("-- a comment\nSTART TRANSACTION READ ONLY", &[Begin]),
            ("COMMIT", &[Commit]),
            ("commit and chain", &[Commit]),
            ("END", &[Commit]),
            ("END TRANSACTION", &[Commit]),
            ("ROLLBACK", &[Rollback]),
            ("ABORT", &[Rollback]),
            ("rollback work", &[Rollback]),
            ("ROLLBACK TO sp1", &[RollbackTo]),
            ("ROLLBACK TRANSACTION TO SAVEPOINT sp1", &[RollbackTo]),
            ("SAVEPOINT sp1", &[Savepoint]),
            ("RELEASE sp1", &[Release]),
            ("RELEASE SAVEPOINT sp1", &[Release]),
            ("PREPARE TRANSACTION 'gid'", &[PrepareTransaction]),
            ("BEGIN; INSERT INTO t VALUES (1); COMMIT;", &[Begin, Commit]),
            // Not transaction control.
            ("COMMIT PREPARED 'gid'", &[]),
            ("ROLLBACK PREPARED 'gid'", &[]),
            ("SELECT 'BEGIN'", &[]),
            ("SELECT 1 -- COMMIT", &[]),
            ("SELECT \"begin\" FROM t", &[]),
            ("SELECT $$ ; COMMIT $$", &[]),
            ("DO $$ BEGIN PERFORM 1; END $$", &[]),
            ("INSERT INTO t (\"end\") VALUES (1)", &[]),
            ("SELECT begin FROM t", &[]),
            ("START_X", &[]),
            ("CREATE TABLE t (begin int); COMMIT", &[Commit]),
            // A SQL-standard function body's END does not end anything.
            (
                "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; SELECT 2; END",
                &[],
            ),
            (
                "CREATE PROCEDURE p() BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; END; COMMIT",
                &[Commit],
            ),
        ];
        for (sql, expected) in cases {
            assert_eq!(control(sql), *expected, "{sql}");
        }
    }

    #[test]
    fn session_changes_are_found_and_transaction_scoped_ones_are_not() {
        let session = [
            "SET application_name = 'x'",
            "set search_path to app",
            "SET SESSION work_mem = '1MB'",
            "SET ROLE other",
            "SET SESSION AUTHORIZATION other",
            "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
            "RESET ALL",
            "LISTEN ch",
            "UNLISTEN *",
            "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
            "FETCH 10 FROM c",
            "CLOSE ALL",
            "PREPARE q AS SELECT 1",
            "DEALLOCATE ALL",
            "DISCARD ALL",
            "LOAD 'auto_explain'",
            "DO $$ BEGIN PERFORM 1; END $$",
            "CREATE TEMP TABLE t (x int)",
            "create temporary table t (x int)",
            "CREATE LOCAL TEMPORARY TABLE t (x int)",
            "CREATE OR REPLACE TEMP VIEW v AS SELECT 1",
            "CREATE TABLE pg_temp.t (x int)",
            "SELECT * INTO TEMP t FROM s",
            "SELECT set_config('a.b', 'c', false)",
            "SELECT pg_catalog.set_config('a.b', $1, false)",
            "SELECT pg_advisory_lock(1)",
            "SELECT PG_TRY_ADVISORY_LOCK ( 1, 2 )",
            "SELECT 1; SET x = 1",
        ];
        for sql in session {
            let e = effects(sql);
            assert!(e.session && e.control.is_empty(), "{sql}: {e:?}");
        }
        let plain = [
            "SELECT 1",
            "SET LOCAL work_mem = '1MB'",
            "SET TRANSACTION ISOLATION LEVEL SERIALIZABLE",
            "SET CONSTRAINTS ALL DEFERRED",
            "SELECT temp FROM weather",
            "SELECT 'SET x = 1'",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT set_config_value FROM t",
            "UPDATE t SET x = 1",
            "INSERT INTO t (temp) VALUES (1)",
            "ALTER ROLE r SET work_mem = '1MB'",
            "NOTIFY ch",
            "",
            ";;",
        ];
        for sql in plain {
            let e = effects(sql);
            assert!(e.control.is_empty() && !e.session, "{sql}: {e:?}");
        }
    }

    #[test]
    fn the_quick_reading_knows_every_statement_the_full_one_does() {
        for word in SESSION_STATEMENTS.iter().chain(LEADING_WORDS) {
            for sql in [format!("{word} x"), format!("{word} transaction x")] {
                assert_eq!(read_statement(&sql), effects(&sql), "{sql}");
            }
        }
    }

    #[test]
    fn a_run_of_statements_must_close_what_it_opens() {
        use Control::*;
        let balanced = |sql| effects(sql).unbalanced();
        assert_eq!(balanced("SELECT 1"), None);
        assert_eq!(balanced("BEGIN; INSERT INTO t VALUES (1); COMMIT"), None);
        assert_eq!(
            balanced("BEGIN; SAVEPOINT a; ROLLBACK TO a; RELEASE a; END"),
            None
        );
        assert_eq!(balanced("BEGIN; PREPARE TRANSACTION 'x'"), None);
        assert_eq!(balanced("BEGIN; SELECT 1"), Some(Begin));
        assert_eq!(balanced("COMMIT"), Some(Commit));
        assert_eq!(balanced("ROLLBACK"), Some(Rollback));
        assert_eq!(balanced("SAVEPOINT a"), Some(Savepoint));
        assert_eq!(balanced("BEGIN; COMMIT; COMMIT"), Some(Commit));
        assert_eq!(balanced("BEGIN; BEGIN; COMMIT"), Some(Begin));
    }

    proptest! {
        /// Any text at all: the lexer ends, never panics, and every `$n` it reports is in
        /// the text.
        #[test]
        fn any_text_is_read_without_panic(sql in "(?s).{0,200}") {
            let _ = effects(&sql);
            let n = count_placeholders(&sql);
            prop_assert!(n == 0 || sql.contains('$'));
        }

        /// For one statement, the quick reading agrees with the full one.
        #[test]
        fn the_quick_reading_of_one_statement_agrees_with_the_full_one(
            words in prop::collection::vec(prop::sample::select(vec![
                "SELECT", "begin", "COMMIT", "set", "LOCAL", "x", "=", "1", "CREATE", "OR",
                "REPLACE", "temp", "TABLE", "INTO", "pg_temp.t", "set_config(", "'a'", "start",
                "TRANSACTION", "rollback", "TO", "prepare", "release", "pg_advisory_lock(",
                "/* c */", "$1", "(", ")", ",",
            ]), 0..8)
        ) {
            let sql = words.join(" ");
            prop_assert_eq!(read_statement(&sql), effects(&sql), "{}", sql);
            // Read again (now remembered), the same.
            let full = StatementEffects::of(&effects(&sql));
            prop_assert_eq!(statement_effects(&sql), full, "{}", sql);
            prop_assert_eq!(statement_effects(&sql), full, "{}", sql);
        }

        /// Statements glued with semicolons are read as the sum of their parts.
        #[test]
        fn statements_add_up(
            parts in prop::collection::vec(prop::sample::select(vec![
                "BEGIN", "COMMIT", "SELECT 1", "SET x = 1", "SAVEPOINT a", "SELECT ';'",
                "ROLLBACK TO a", "SELECT $$;$$", "/* ; */ SELECT 2",
            ]), 0..6)
        ) {
            let joined = parts.join(";");
            let mut expected = Effects::default();
            for p in &parts {
                let e = effects(p);
                expected.control.extend(e.control);
                expected.session |= e.session;
            }
            prop_assert_eq!(effects(&joined), expected);
        }
    }
}
