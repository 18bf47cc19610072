//! `Config::parse` held against libpq itself.
//!
//! The module docs of `src/config.rs` promise that "a string that works with `psql` works here
//! too". This test checks that promise against the real thing: the system's libpq (through
//! `pq-sys`) reads every connection string in [`CASES`] and so does our parser, and the two
//! must agree (PostgreSQL docs §34.1.1 "Connection Strings", §34.1.2 "Parameter Key Words").
//!
//! libpq checks a connection string in two stages, and the comparison follows them:
//!
//! 1. `PQconninfoParse` checks the syntax and the key words only. It reads no environment and
//!    does not look at values: `sslmode=bogus` and `port=abc` pass. When it refuses a string,
//!    we must refuse it too, and both messages must name the same culprit.
//! 2. The values are checked when connecting (`connectOptions2`, `PQconnectPoll`,
//!    `connectDBComplete`). We check them while parsing instead, so a string that libpq parses
//!    but would refuse at connect time may be refused by us early: such rows are marked
//!    [`Expect::SemanticError`], and the test makes libpq try to connect to confirm that it
//!    refuses the same value. Any other string libpq parses must parse here, with the same
//!    host, hostaddr, port, user, password, dbname, options, application_name,
//!    connect_timeout, sslmode and target_session_attrs.
//!
//! Both sides read the connection string alone. `Config::parse` reads no environment; libpq
//! reads the `PG*` variables when it connects, so they are removed from this test process
//! before libpq is first called (see [`without_pg_environment`]).
//!
//! The table records what libpq 15 says. A few rows differ on purpose and say why: key words
//! newer than libpq 15, a URI rule that newer libpq added, and features pgengine does not have.
//! Every password in the table contains [`SECRET`], and no error of ours may show it.

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsString};
use std::net::IpAddr;
use std::os::raw::c_char;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::ptr;
use std::sync::Once;
use std::time::Duration;

use pgengine::config::{Config, SslMode, TargetSessionAttrs};

/// Every password in [`CASES`] contains this, so one check shows that no error leaks one.
const SECRET: &str = "s3cr";

/// What libpq does with a connection string, and therefore what `Config::parse` must do.
enum Expect {
    /// `PQconninfoParse` accepts it and reports exactly these values for the compared key words
    /// (as libpq stores them: raw text, before any defaulting); our getters must agree.
    Accept(&'static [(&'static str, &'static str)]),
    /// `PQconninfoParse` refuses it; so must we, and both messages contain this text.
    Reject(&'static str),
    /// `PQconninfoParse` accepts it, libpq refuses it when connecting, we refuse it while
    /// parsing; libpq's connect error and ours both contain this text.
    SemanticError(&'static str),
    /// libpq accepts it; pgengine refuses on purpose because it lacks the feature (service
    /// files, replication, GSSAPI, text that is not UTF-8). Our message contains this text.
    Unsupported(&'static str),
    /// A key word that libpq knows from this major version on. An older libpq says
    /// `invalid connection option "<key>"`; we follow the newer one and accept it.
    KeywordSince(u32, &'static str),
    /// A string that libpq refuses from this major version on (while parsing or when
    /// connecting), with a message containing this text, and that an older libpq accepts; we
    /// follow the newer one.
    RejectedSince(u32, &'static str),
    /// Contains a NUL, which no C string can carry, so libpq cannot be asked; we must refuse
    /// it (a NUL would cut the value short in the startup packet), naming this text.
    NulByte(&'static str),
}

use Expect::*;

/// The key words compared with libpq in accepted strings.
const COMPARED: [&str; 11] = [
    "host",
    "hostaddr",
    "port",
    "user",
    "password",
    "dbname",
    "options",
    "application_name",
    "connect_timeout",
    "sslmode",
    "target_session_attrs",
];

#[rustfmt::skip]
const CASES: &[(&str, Expect)] = &[
    // ---- key=value: layout, quoting and escapes (§34.1.1.1) --------------------------------
    ("", Accept(&[])),
    ("   ", Accept(&[])),
    ("host=localhost port=5432 dbname=mydb user=alice",
        Accept(&[("host", "localhost"), ("port", "5432"), ("dbname", "mydb"), ("user", "alice")])),
    ("host = db  port= 6432   dbname =shop",
        Accept(&[("host", "db"), ("port", "6432"), ("dbname", "shop")])),
    ("\thost=db\tuser=bob  ", Accept(&[("host", "db"), ("user", "bob")])),
    ("\n host=db\r\n\x0bport=1\x0c", Accept(&[("host", "db"), ("port", "1")])),
    // C's isspace in the "C" locale: a no-break space is part of the value.
    ("host=a\u{a0}port=1", Accept(&[("host", "a\u{a0}port=1")])),
    ("dbname='my db' user='o\\'brien'", Accept(&[("dbname", "my db"), ("user", "o'brien")])),
    ("password='s3cr\\\\et' application_name=back\\\\slash",
        Accept(&[("password", "s3cr\\et"), ("application_name", "back\\slash")])),
    ("application_name=it\\'s", Accept(&[("application_name", "it's")])),
    ("options='-c search_path=\\'a b\\''", Accept(&[("options", "-c search_path='a b'")])),
    ("host=a\\", Accept(&[("host", "a")])),
    // Quotes only count at the start of a value, and '=' only once.
    ("host=a'b", Accept(&[("host", "a'b")])),
    ("dbname=a=b", Accept(&[("dbname", "a=b")])),
    ("host==a", Accept(&[("host", "=a")])),
    ("host='' dbname=''", Accept(&[("host", ""), ("dbname", "")])),
    ("host=", Accept(&[("host", "")])),
    // libpq's quirk: after "=", blanks are skipped, so the value is the next word.
    ("host= port=1", Accept(&[("host", "port=1")])),
    ("host=a host=b", Accept(&[("host", "b")])),
    ("user=a user=''", Accept(&[("user", "")])),
    ("application_name=café", Accept(&[("application_name", "café")])),
    ("dbname=postgresql://h/db", Accept(&[("dbname", "postgresql://h/db")])),
    ("user=alice password=s3cr3t", Accept(&[("user", "alice"), ("password", "s3cr3t")])),
    ("host=db keepalives=1 keepalives_idle=30 sslcert=/c.pem", Accept(&[("host", "db")])),
    ("client_encoding=UTF8", Accept(&[])),
    ("gssencmode=disable channel_binding=require", Accept(&[])),
    ("dbname='unterminated", Reject("unterminated quoted string")),
    ("host='a\\", Reject("unterminated quoted string")),
    ("host", Reject(r#"missing "=" after "host""#)),
    ("host=a dbname", Reject(r#"missing "=" after "dbname""#)),
    ("host='a'b", Reject(r#"missing "=" after "b""#)),
    ("foo=bar", Reject(r#"invalid connection option "foo""#)),
    // libpq's key words are case-sensitive.
    ("Host=x", Reject(r#"invalid connection option "Host""#)),
    ("dbName=x", Reject(r#"invalid connection option "dbName""#)),
    ("=value", Reject(r#"invalid connection option """#)),
    ("host='a'=b", Reject(r#"invalid connection option """#)),
    // Not one of the two URI designators (which are case-sensitive): read as key=value.
    ("postgresq://h", Reject(r#"missing "=""#)),
    ("POSTGRESQL://h/db", Reject(r#"missing "=""#)),
    // libpq quotes the whole word here, password and all; we must not.
    (" postgresql://u:s3cr@h", Reject(r#"missing "=""#)),
    ("host=a\0b", NulByte("host")),
    ("password=s3cr\0et", NulByte("password")),

    // ---- hosts, host addresses and ports ---------------------------------------------------
    ("host=a,b port=1,2", Accept(&[("host", "a,b"), ("port", "1,2")])),
    ("host=a,b,c port=5433", Accept(&[("host", "a,b,c"), ("port", "5433")])),
    ("host=a,,b", Accept(&[("host", "a,,b")])),
    ("host=a,b port=,6432", Accept(&[("host", "a,b"), ("port", ",6432")])),
    ("host=a,b,c port=1,,3", Accept(&[("host", "a,b,c"), ("port", "1,,3")])),
    ("port=1,2", Accept(&[("port", "1,2")])),
    ("port=' 5433'", Accept(&[("port", " 5433")])),
    ("port=''", Accept(&[("port", "")])),
    ("host=/var/run/postgresql", Accept(&[("host", "/var/run/postgresql")])),
    ("host=/tmp,db.example.com port=5432,6432",
        Accept(&[("host", "/tmp,db.example.com"), ("port", "5432,6432")])),
    ("host=@abstract", Accept(&[("host", "@abstract")])),
    ("hostaddr=127.0.0.1 host=db", Accept(&[("host", "db"), ("hostaddr", "127.0.0.1")])),
    ("hostaddr=::1", Accept(&[("hostaddr", "::1")])),
    ("host=a,b hostaddr=127.0.0.1,::1",
        Accept(&[("host", "a,b"), ("hostaddr", "127.0.0.1,::1")])),
    ("hostaddr='' host=a", Accept(&[("host", "a"), ("hostaddr", "")])),
    // An empty hostaddr entry means "look the host name up" for that slot (connectOptions2).
    ("host=a,b hostaddr=,127.0.0.2", Accept(&[("host", "a,b"), ("hostaddr", ",127.0.0.2")])),
    // libpq hands hostaddr to getaddrinfo(AI_NUMERICHOST), which takes inet_aton's short
    // forms and IPv6 zone ids; PQconnectStart gets as far as connecting to both.
    ("hostaddr=127.1", Accept(&[("hostaddr", "127.1")])),
    ("hostaddr=fe80::1%lo", Accept(&[("hostaddr", "fe80::1%lo")])),
    ("port=abc", SemanticError("abc")),
    ("port=0", SemanticError(r#"invalid port number: "0""#)),
    ("port=65536", SemanticError(r#"invalid port number: "65536""#)),
    ("host=a,b port=1,2,3", SemanticError("could not match 3 port numbers to 2 hosts")),
    ("host=a port=1,2", SemanticError("could not match 2 port numbers to 1 hosts")),
    // An empty host is one (default) host.
    ("host='' port=1,2", SemanticError("could not match 2 port numbers to 1 hosts")),
    ("host=a,b hostaddr=127.0.0.1,::1,127.0.0.2",
        SemanticError("could not match 2 host names to 3 hostaddr values")),
    ("host=a,b hostaddr=127.0.0.1",
        SemanticError("could not match 2 host names to 1 hostaddr values")),
    ("hostaddr=not-an-ip", SemanticError(r#"could not parse network address "not-an-ip""#)),
    ("hostaddr=' 127.0.0.1'", SemanticError(r#"could not parse network address " 127.0.0.1""#)),

    // ---- connect_timeout, sslmode, target_session_attrs, options ---------------------------
    ("connect_timeout=10", Accept(&[("connect_timeout", "10")])),
    ("connect_timeout=0", Accept(&[("connect_timeout", "0")])),
    ("connect_timeout=1", Accept(&[("connect_timeout", "1")])),
    ("connect_timeout=-5", Accept(&[("connect_timeout", "-5")])),
    ("connect_timeout=' 7 '", Accept(&[("connect_timeout", " 7 ")])),
    ("connect_timeout=+3", Accept(&[("connect_timeout", "+3")])),
    ("connect_timeout=abc", SemanticError("connect_timeout")),
    ("connect_timeout=10s", SemanticError("connect_timeout")),
    ("connect_timeout=99999999999", SemanticError("connect_timeout")),
    ("connect_timeout=''", SemanticError("connect_timeout")),
    ("sslmode=require", Accept(&[("sslmode", "require")])),
    ("sslmode=verify-full", Accept(&[("sslmode", "verify-full")])),
    ("sslmode=disable", Accept(&[("sslmode", "disable")])),
    ("requiressl=1", Accept(&[("sslmode", "require")])),
    ("requiressl=yes", Accept(&[("sslmode", "prefer")])),
    ("sslmode=disable requiressl=1", Accept(&[("sslmode", "require")])),
    ("sslmode=bogus", SemanticError(r#"invalid sslmode value: "bogus""#)),
    ("sslmode=Require", SemanticError(r#"invalid sslmode value: "Require""#)),
    ("sslmode=''", SemanticError(r#"invalid sslmode value: """#)),
    ("channel_binding=bogus", SemanticError(r#"invalid channel_binding value: "bogus""#)),
    ("gssencmode=bogus", SemanticError(r#"invalid gssencmode value: "bogus""#)),
    ("ssl_min_protocol_version=TLSv1.4", SemanticError(r#""TLSv1.4""#)),
    ("ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
        SemanticError("invalid SSL protocol version range")),
    ("target_session_attrs=read-write", Accept(&[("target_session_attrs", "read-write")])),
    ("target_session_attrs=prefer-standby",
        Accept(&[("target_session_attrs", "prefer-standby")])),
    ("target_session_attrs=master",
        SemanticError(r#"invalid target_session_attrs value: "master""#)),
    ("options='-c search_path=app,public -c statement_timeout=5s'",
        Accept(&[("options", "-c search_path=app,public -c statement_timeout=5s")])),
    ("options=-c\\ geqo=off", Accept(&[("options", "-c geqo=off")])),
    ("options=-csearch_path=app", Accept(&[("options", "-csearch_path=app")])),

    // ---- URIs (§34.1.1.2) -----------------------------------------------------------------
    ("postgresql://alice:s3cr3t@db.example.com:5433/shop",
        Accept(&[("user", "alice"), ("password", "s3cr3t"), ("host", "db.example.com"),
                 ("port", "5433"), ("dbname", "shop")])),
    ("postgres://db/shop", Accept(&[("host", "db"), ("dbname", "shop")])),
    ("postgresql://", Accept(&[])),
    ("postgresql://h/", Accept(&[("host", "h")])),
    ("postgresql://h?", Accept(&[("host", "h")])),
    ("postgresql://@h", Accept(&[("host", "h")])),
    ("postgresql://u:@h", Accept(&[("user", "u"), ("host", "h")])),
    ("postgresql://u@", Accept(&[("user", "u")])),
    ("postgresql://u%3Ax:s3cr@h", Accept(&[("user", "u:x"), ("password", "s3cr"), ("host", "h")])),
    // User info is whatever comes before the first '@' that precedes any '/', even a '?'.
    ("postgresql://h?user=a@b", Accept(&[("user", "h?user=a"), ("host", "b")])),
    ("postgresql://:s3cr@h", Accept(&[("password", "s3cr"), ("host", "h")])),
    ("postgresql:///shop?host=/tmp", Accept(&[("dbname", "shop"), ("host", "/tmp")])),
    ("postgresql://%2Fvar%2Frun%2Fpostgresql/shop",
        Accept(&[("host", "/var/run/postgresql"), ("dbname", "shop")])),
    ("postgresql://[::1]:5432/db", Accept(&[("host", "::1"), ("port", "5432"), ("dbname", "db")])),
    ("postgresql://[::1]", Accept(&[("host", "::1")])),
    ("postgresql://[::1]:5432,[::2]:5433/db",
        Accept(&[("host", "::1,::2"), ("port", "5432,5433"), ("dbname", "db")])),
    ("postgresql://[::1],h2/db", Accept(&[("host", "::1,h2"), ("port", ","), ("dbname", "db")])),
    // The host list is decoded after it is joined, so %2C separates hosts.
    ("postgresql://a%2Cb/db", Accept(&[("host", "a,b"), ("dbname", "db")])),
    ("postgresql://h1:1,h2:2/db", Accept(&[("host", "h1,h2"), ("port", "1,2"), ("dbname", "db")])),
    ("postgresql://h1,h2:6432/db",
        Accept(&[("host", "h1,h2"), ("port", ",6432"), ("dbname", "db")])),
    ("postgresql://h1:1,h2/db", Accept(&[("host", "h1,h2"), ("port", "1,"), ("dbname", "db")])),
    ("postgresql://h,/db", Accept(&[("host", "h,"), ("port", ","), ("dbname", "db")])),
    ("postgresql://h:/db", Accept(&[("host", "h"), ("dbname", "db")])),
    ("postgresql://:5433/db", Accept(&[("port", "5433"), ("dbname", "db")])),
    ("postgresql://u:s3cr%40t%20x@h/db",
        Accept(&[("user", "u"), ("password", "s3cr@t x"), ("host", "h"), ("dbname", "db")])),
    // An unencoded '@' in the password: the first '@' ends the user info.
    ("postgresql://u:s3cr@t@h/db",
        Accept(&[("user", "u"), ("password", "s3cr"), ("host", "t@h"), ("dbname", "db")])),
    // Not valid UTF-8: compared as text with U+FFFD, since both sides keep the bytes.
    ("postgresql://u:%FFs3cr@h", Accept(&[("user", "u"), ("password", "\u{fffd}s3cr"), ("host", "h")])),
    ("postgresql://us%65r@h/d%62?application_name=my%20app&options=-c%20geqo%3Doff",
        Accept(&[("user", "user"), ("host", "h"), ("dbname", "db"),
                 ("application_name", "my app"), ("options", "-c geqo=off")])),
    ("postgresql://h/db?application_name=%E2%82%AC",
        Accept(&[("host", "h"), ("dbname", "db"), ("application_name", "€")])),
    ("postgresql://h/db?application_name=",
        Accept(&[("host", "h"), ("dbname", "db"), ("application_name", "")])),
    ("postgres://h?dbname=a%2Fb", Accept(&[("host", "h"), ("dbname", "a/b")])),
    ("postgresql://h/db#frag", Accept(&[("host", "h"), ("dbname", "db#frag")])),
    ("postgresql://h?host=a&host=b", Accept(&[("host", "b")])),
    ("postgresql://h?host=a&", Accept(&[("host", "a")])),
    ("postgresql://h?port=", Accept(&[("host", "h"), ("port", "")])),
    ("postgresql://h/db?dbname=", Accept(&[("host", "h"), ("dbname", "")])),
    ("postgresql://h?password=s3cr%20x", Accept(&[("password", "s3cr x"), ("host", "h")])),
    ("postgresql://h/db?target_session_attrs=any&target_session_attrs=standby",
        Accept(&[("host", "h"), ("dbname", "db"), ("target_session_attrs", "standby")])),
    ("postgresql://h?port=%35%34%33%33", Accept(&[("host", "h"), ("port", "5433")])),
    ("postgresql://h/db?u%73er=x", Accept(&[("host", "h"), ("dbname", "db"), ("user", "x")])),
    ("postgresql://h/db?hostaddr=127.0.0.1",
        Accept(&[("host", "h"), ("dbname", "db"), ("hostaddr", "127.0.0.1")])),
    ("postgresql://u@h/db?connect_timeout=5&sslmode=verify-full&target_session_attrs=read-only",
        Accept(&[("user", "u"), ("host", "h"), ("dbname", "db"), ("connect_timeout", "5"),
                 ("sslmode", "verify-full"), ("target_session_attrs", "read-only")])),
    ("postgresql://h/db?options=-c%20search_path%3Dapp",
        Accept(&[("host", "h"), ("dbname", "db"), ("options", "-c search_path=app")])),
    // JDBC's spelling, which libpq accepts for "true" only (after percent-decoding).
    ("postgresql://h?ssl=true", Accept(&[("host", "h"), ("sslmode", "require")])),
    ("postgresql://h?ssl=%74rue", Accept(&[("host", "h"), ("sslmode", "require")])),
    ("postgresql://u@h?requiressl=1", Accept(&[("user", "u"), ("host", "h"), ("sslmode", "require")])),
    ("postgresql://h?ssl=false", Reject(r#"invalid URI query parameter: "ssl""#)),
    ("postgresql://h/db?foo=bar", Reject(r#"invalid URI query parameter: "foo""#)),
    ("postgresql://h/db?Host=x", Reject(r#"invalid URI query parameter: "Host""#)),
    ("postgresql://h/%zz", Reject(r#"invalid percent-encoded token: "%zz""#)),
    ("postgresql://h/db%", Reject(r#"invalid percent-encoded token: "db%""#)),
    ("postgresql://h/d%00b", Reject(r#"forbidden value %00 in percent-encoded value: "d%00b""#)),
    ("postgresql://h?foo=%00", Reject("forbidden value %00")),
    // libpq quotes the password in these two; we name the part instead.
    ("postgresql://u:s3cr%zz@h", Reject("invalid percent-encod")),
    ("postgresql://u:s3cr%00@h", Reject("forbidden value %00")),
    ("postgresql://h?=x", Reject(r#"invalid URI query parameter: """#)),
    ("postgresql://h?sslmode", Reject(r#"missing key/value separator "=" in URI query parameter: "sslmode""#)),
    ("postgresql://h?&", Reject(r#"missing key/value separator "=" in URI query parameter: """#)),
    ("postgresql://h?a=b=c", Reject(r#"extra key/value separator "=" in URI query parameter: "a""#)),
    ("postgresql://[::1", Reject(r#"matching "]" in IPv6 host address"#)),
    ("postgresql://[]", Reject("IPv6 host address may not be empty")),
    ("postgresql://[::1]x", Reject(r#"unexpected character "x" at position 19"#)),
    ("postgresql://h:abc/db", SemanticError("abc")),
    ("postgresql://h:6543:7/db", SemanticError("6543:7")),
    ("postgresql://h/db?sslmode=bogus", SemanticError(r#"invalid sslmode value: "bogus""#)),
    ("postgresql://h1,h2/db?port=1,2,3", SemanticError("could not match 3 port numbers to 2 hosts")),
    // An unencoded '/' in the password: libpq reads "u" as the host and "s3cr" as the port.
    // libpq's connect error quotes that port; ours must not, and still say what is wrong.
    ("postgresql://u:s3cr/x@h/db", SemanticError("port")),
    ("postgresql://h/d\0b", NulByte("dbname")),

    // ---- libpq versions and features pgengine leaves out ----------------------------------
    ("require_auth=scram-sha-256", KeywordSince(16, "require_auth")),
    ("load_balance_hosts=random", KeywordSince(16, "load_balance_hosts")),
    ("sslmode=require sslnegotiation=direct", KeywordSince(17, "sslnegotiation")),
    ("max_protocol_version=3.2", KeywordSince(18, "max_protocol_version")),
    // libpq 18 refuses unencoded spaces inside a URI part (and quotes the part, password or
    // not); libpq 15 keeps them.
    ("postgresql://h/my db", RejectedSince(18, "unexpected spaces")),
    ("postgresql://u:s3cr t@h/db", RejectedSince(18, "unexpected spaces")),
    // libpq 16 refuses, when connecting, the system trust store without host name checks.
    ("sslrootcert=system sslmode=require", RejectedSince(16, "weak sslmode")),
    ("service=foo", Unsupported("service")),
    ("replication=database", Unsupported("replication")),
    ("gssencmode=require", Unsupported("gssencmode")),
    ("client_encoding=LATIN1", Unsupported("client_encoding")),
    // libpq passes the byte 0xFF on; pgengine keeps names as UTF-8 text.
    ("postgresql://h/%FF", Unsupported("invalid UTF-8")),
];

// ------------------------------------------------------------------------------------------
// libpq, through pq-sys.
// ------------------------------------------------------------------------------------------

/// Removes every `PG*` variable from this process's environment, once, before libpq runs.
///
/// libpq fills what a connection string leaves out from the environment when it connects
/// (`conninfo_add_defaults`), and looks up `PGSERVICE` before anything else: with
/// `PGSERVICE=nosuch` in the shell, every connection attempt fails with `definition of service
/// "nosuch" not found` instead of the error of the value under test. Pinning each setting in
/// the string cannot help there (an empty `service=` is looked up too), so the variables go.
/// The comparison is of connection strings, so nothing is lost; `Config::parse` never reads them.
///
/// Every function below that calls libpq calls this first, and `Once` holds the other threads
/// until it has finished: no thread is inside libpq, which reads the environment without Rust's
/// lock, while the variables are removed.
fn without_pg_environment() {
    static REMOVED: Once = Once::new();
    REMOVED.call_once(|| {
        let names: Vec<OsString> = std::env::vars_os()
            .map(|(name, _)| name)
            .filter(|name| name.as_bytes().starts_with(b"PG"))
            .collect();
        if !names.is_empty() {
            println!("libpq runs without the environment's {names:?}");
        }
        for name in names {
            // SAFETY: no other thread reads the environment except through Rust's own
            // functions, which take the lock this takes: the only C code here that reads it is
            // libpq, and no thread calls libpq before this `call_once` has returned.
            unsafe { std::env::remove_var(&name) };
        }
    });
}

/// What libpq's `PQconninfoParse` makes of `s`: the key words it set (and only those: it fills
/// no defaults and reads no environment), or its error message.
fn libpq_parse(s: &str) -> Result<BTreeMap<String, String>, String> {
    without_pg_environment();
    let conninfo = CString::new(s).expect("strings with a NUL are not given to libpq");
    let mut errmsg: *mut c_char = ptr::null_mut();
    // SAFETY: `conninfo` is a NUL-terminated string that lives until the end of this function,
    // and `errmsg` is a valid place for libpq to store a pointer; libpq keeps neither.
    let options = unsafe { pq_sys::PQconninfoParse(conninfo.as_ptr(), &mut errmsg) };
    if options.is_null() {
        if errmsg.is_null() {
            return Err("PQconninfoParse failed without a message (out of memory)".to_owned());
        }
        // SAFETY: on failure libpq sets `errmsg` to a malloc'd NUL-terminated string that the
        // caller owns; it is copied before it is freed, once, with libpq's own PQfreemem.
        let message = unsafe {
            let message = CStr::from_ptr(errmsg)
                .to_string_lossy()
                .trim_end()
                .to_owned();
            pq_sys::PQfreemem(errmsg.cast());
            message
        };
        return Err(message);
    }

    let mut values = BTreeMap::new();
    // SAFETY: a non-NULL result is an array of PQconninfoOption ended by an entry whose
    // `keyword` is NULL; each `keyword` and each non-NULL `val` is a NUL-terminated string
    // owned by the array. We copy them while the array is alive, never step past the
    // terminator, and free the array once with PQconninfoFree, which frees the strings too.
    unsafe {
        let mut option = options;
        while !(*option).keyword.is_null() {
            if !(*option).val.is_null() {
                let keyword = CStr::from_ptr((*option).keyword).to_string_lossy();
                let val = CStr::from_ptr((*option).val).to_string_lossy();
                values.insert(keyword.into_owned(), val.into_owned());
            }
            option = option.add(1);
        }
        pq_sys::PQconninfoFree(options);
    }
    Ok(values)
}

/// libpq's major version (15 for 150018).
fn libpq_major_version() -> u32 {
    without_pg_environment();
    // SAFETY: PQlibVersion takes nothing and only returns a constant.
    let version = unsafe { pq_sys::PQlibVersion() };
    u32::try_from(version / 10_000).expect("libpq reports a positive version")
}

/// A Unix socket that accepts connections and closes them at once: a "server" in a directory
/// of our own, so that libpq can be made to connect without any network traffic.
///
/// libpq 15 checks most values before it opens a socket, but `connect_timeout`
/// only in `connectDBComplete`, and only if the first connection attempt did not already fail.
/// So a directory without a socket is not enough: the attempt must get somewhere, and our
/// socket lets it, then hangs up so that `PQconnectdb` returns at once.
struct HangUpServer {
    dir: PathBuf,
}

impl HangUpServer {
    fn start() -> HangUpServer {
        let dir = std::env::temp_dir().join(format!("pgengine-libpq-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the socket directory");
        let socket = dir.join(".s.PGSQL.5432");
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket).expect("bind the hang-up socket");
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                drop(stream);
            }
        });
        HangUpServer { dir }
    }
}

impl Drop for HangUpServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Quotes a value for a key=value string (§34.1.1.1): single quotes, `\` before `'` and `\`.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Whether libpq could take this hostaddr entry for an address off this machine. Only used to
/// refuse to run a connection attempt that might leave the machine.
fn may_leave_machine(addr: &str) -> bool {
    match addr.parse::<IpAddr>() {
        Ok(ip) => !ip.is_loopback(),
        // getaddrinfo's numeric forms (127.1, 0x7f.1, fe80::1%lo) use only these characters.
        Err(_) => addr
            .chars()
            .all(|c| c.is_ascii_hexdigit() || matches!(c, '.' | ':' | '%' | 'x' | 'X')),
    }
}

/// Makes libpq connect with the settings it parsed (`parsed`, from [`libpq_parse`]), every host
/// replaced by the hang-up server, and returns libpq's error message. libpq must fail: on a
/// bad value before connecting, otherwise when the server hangs up.
fn libpq_connect_error(parsed: &BTreeMap<String, String>, server: &HangUpServer) -> String {
    without_pg_environment();
    let mut conninfo = String::new();
    for (key, value) in parsed {
        if key != "host" {
            conninfo.push_str(&format!("{key}={} ", quote(value)));
        }
    }
    // As many hosts as the string gave, so that libpq's list-length checks see what it parsed.
    let host_count = parsed.get("host").map_or(1, |h| h.split(',').count());
    let dir = server.dir.to_str().expect("temp dir is UTF-8");
    conninfo.push_str(&format!("host={}", quote(&vec![dir; host_count].join(","))));
    if let Some(addrs) = parsed.get("hostaddr") {
        assert!(
            !addrs.split(',').any(may_leave_machine),
            "a SemanticError row must not make libpq connect off this machine: {addrs}"
        );
    }
    // The hang-up server's socket is named for port 5432, which a libpq built with another
    // default port would not look for.
    if !parsed.contains_key("port") {
        conninfo.push_str(" port=5432");
    }

    let conninfo = CString::new(conninfo).expect("parsed values hold no NUL");
    // SAFETY: `conninfo` is NUL-terminated and outlives the call. PQconnectdb returns a
    // connection object (NULL only when out of memory, checked below) that we read with
    // PQstatus/PQerrorMessage, copy the message from before PQfinish, and finish exactly once.
    unsafe {
        let conn = pq_sys::PQconnectdb(conninfo.as_ptr());
        assert!(!conn.is_null(), "PQconnectdb: out of memory");
        let status = pq_sys::PQstatus(conn);
        let message = CStr::from_ptr(pq_sys::PQerrorMessage(conn))
            .to_string_lossy()
            .trim_end()
            .to_owned();
        pq_sys::PQfinish(conn);
        assert_eq!(
            status,
            pq_sys::ConnStatusType::CONNECTION_BAD,
            "libpq cannot have connected to a server that hangs up"
        );
        message
    }
}

// ------------------------------------------------------------------------------------------
// The comparison.
// ------------------------------------------------------------------------------------------

/// C's isspace in the "C" locale, which libpq's integer parsing skips around a number.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// libpq's `parse_int_param`: strtol in base 10, blanks around allowed, must fit in an int.
fn libpq_int(value: &str) -> Option<i32> {
    value.trim_matches(is_c_space).parse().ok()
}

/// A comma-separated list as libpq splits it; an empty value is an empty list.
fn libpq_list(value: &str) -> Vec<&str> {
    if value.is_empty() {
        Vec::new()
    } else {
        value.split(',').collect()
    }
}

/// What a connection would use, from libpq's raw parse result: the values libpq would act on,
/// written so that they can be compared with [`ours`].
fn libpq_meaning(parsed: &BTreeMap<String, String>) -> BTreeMap<&'static str, String> {
    let raw = |key: &str| parsed.get(key).map(String::as_str);
    let text = |key: &str| format!("{:?}", raw(key));
    let mut meaning = BTreeMap::new();
    meaning.insert("host", raw("host").unwrap_or("").to_owned());
    let addrs = libpq_list(raw("hostaddr").unwrap_or(""))
        .into_iter()
        .map(|a| {
            a.parse::<IpAddr>()
                .map_or(a.to_owned(), |ip| ip.to_string())
        });
    meaning.insert("hostaddr", addrs.collect::<Vec<_>>().join(","));
    // connectOptions2: an empty entry is the default port, 5432.
    let ports = libpq_list(raw("port").unwrap_or("")).into_iter().map(|p| {
        if p.is_empty() {
            "5432".to_owned()
        } else {
            libpq_int(p).map_or(p.to_owned(), |n| n.to_string())
        }
    });
    meaning.insert("port", ports.collect::<Vec<_>>().join(","));
    for key in ["user", "password", "dbname", "options", "application_name"] {
        meaning.insert(key, text(key));
    }
    // connectDBComplete: zero or less waits forever; one second is raised to two.
    let timeout = match raw("connect_timeout").map(|t| (t, libpq_int(t))) {
        None | Some((_, Some(..=0))) => "forever".to_owned(),
        Some((_, Some(1))) => "2s".to_owned(),
        Some((_, Some(n))) => format!("{n}s"),
        Some((t, None)) => format!("unparsable {t:?}"),
    };
    meaning.insert("connect_timeout", timeout);
    // The compiled-in defaults of a libpq built with TLS.
    meaning.insert("sslmode", raw("sslmode").unwrap_or("prefer").to_owned());
    let attrs = raw("target_session_attrs").unwrap_or("any");
    meaning.insert("target_session_attrs", attrs.to_owned());
    meaning
}

/// The same settings from our getters, in the form of [`libpq_meaning`].
fn ours(config: &Config) -> BTreeMap<&'static str, String> {
    let join = |items: Vec<String>| items.join(",");
    let text = |value: Option<&str>| format!("{value:?}");
    let mut meaning = BTreeMap::new();
    meaning.insert(
        "host",
        join(config.get_hosts().iter().map(ToString::to_string).collect()),
    );
    meaning.insert(
        "hostaddr",
        join(
            config
                .get_hostaddrs()
                .iter()
                .map(|a| a.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect(),
        ),
    );
    meaning.insert(
        "port",
        join(config.get_ports().iter().map(ToString::to_string).collect()),
    );
    meaning.insert("user", text(config.get_user()));
    let password = config.get_password().map(String::from_utf8_lossy);
    meaning.insert("password", text(password.as_deref()));
    meaning.insert("dbname", text(config.get_dbname()));
    meaning.insert("options", text(config.get_options()));
    meaning.insert("application_name", text(config.get_application_name()));
    let timeout = config
        .get_connect_timeout()
        .map_or("forever".to_owned(), |t: Duration| {
            format!("{}s", t.as_secs())
        });
    meaning.insert("connect_timeout", timeout);
    let ssl_mode = match config.get_ssl_mode() {
        SslMode::Disable => "disable",
        SslMode::Allow => "allow",
        SslMode::Prefer => "prefer",
        SslMode::Require => "require",
        SslMode::VerifyCa => "verify-ca",
        SslMode::VerifyFull => "verify-full",
        other => panic!("sslmode {other:?} is new: add it to this comparison"),
    };
    meaning.insert("sslmode", ssl_mode.to_owned());
    let attrs = match config.get_target_session_attrs() {
        TargetSessionAttrs::Any => "any",
        TargetSessionAttrs::ReadWrite => "read-write",
        TargetSessionAttrs::ReadOnly => "read-only",
        TargetSessionAttrs::Primary => "primary",
        TargetSessionAttrs::Standby => "standby",
        TargetSessionAttrs::PreferStandby => "prefer-standby",
        other => panic!("target_session_attrs {other:?} is new: add it to this comparison"),
    };
    meaning.insert("target_session_attrs", attrs.to_owned());
    meaning
}

/// `Config::parse`, with its error as text.
fn our_parse(s: &str) -> Result<Config, String> {
    Config::parse(s).map_err(|e| e.to_string())
}

/// Both parsers accepted `s`: they must mean the same settings.
fn compare_accepted(s: &str, parsed: &BTreeMap<String, String>) -> Result<(), String> {
    let config =
        our_parse(s).map_err(|e| format!("libpq accepts it ({parsed:?}), we refuse it: {e}"))?;
    let (theirs, ours) = (libpq_meaning(parsed), ours(&config));
    if theirs == ours {
        return Ok(());
    }
    let differences: Vec<String> = COMPARED
        .iter()
        .filter(|key| theirs[*key] != ours[*key])
        .map(|key| format!("{key}: libpq {} / ours {}", theirs[key], ours[key]))
        .collect();
    Err(format!("values differ: {}", differences.join("; ")))
}

/// Both refused `s`: each message must contain `culprit`.
fn compare_errors(libpq: &str, ours: &str, culprit: &str) -> Result<(), String> {
    if libpq.contains(culprit) && ours.contains(culprit) {
        Ok(())
    } else {
        Err(format!(
            "both refuse it, but not both naming {culprit:?}: libpq says {libpq:?}, we say {ours:?}"
        ))
    }
}

/// Checks one row; an `Err` says how libpq, the table and our parser disagree.
fn check_case(s: &str, expect: &Expect, version: u32, server: &HangUpServer) -> Result<(), String> {
    if let NulByte(culprit) = expect {
        assert!(s.contains('\0'), "a NulByte row needs a NUL");
        return match our_parse(s) {
            Ok(_) => Err(
                "we accept a NUL, which no C string (and no startup packet) can carry".to_owned(),
            ),
            Err(e) if e.contains(culprit) => Ok(()),
            Err(e) => Err(format!("our error does not name {culprit:?}: {e}")),
        };
    }
    let libpq = libpq_parse(s);
    match (expect, libpq) {
        (Accept(table), Ok(parsed)) => {
            let compared: BTreeMap<String, String> = parsed
                .iter()
                .filter(|(key, _)| COMPARED.contains(&key.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let listed: BTreeMap<String, String> = table
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
            if compared != listed {
                return Err(format!("the table is wrong: libpq reports {compared:?}"));
            }
            compare_accepted(s, &parsed)
        }
        (Unsupported(culprit), Ok(_)) => match our_parse(s) {
            Ok(_) => Err("marked unsupported, but we accept it: compare it instead".to_owned()),
            Err(e) if e.contains(culprit) => Ok(()),
            Err(e) => Err(format!("our error does not name {culprit:?}: {e}")),
        },
        (KeywordSince(since, key), libpq) if version < *since => {
            let expected = format!("invalid connection option \"{key}\"");
            match (libpq, our_parse(s)) {
                (Err(e), Ok(_)) if e.contains(&expected) => Ok(()),
                (libpq, ours) => Err(format!(
                    "expected libpq {version} to refuse {key:?} and us to accept it: libpq {libpq:?}, ours {:?}",
                    ours.map(|_| "accepted")
                )),
            }
        }
        (KeywordSince(..), Ok(parsed)) => compare_accepted(s, &parsed),
        (RejectedSince(since, culprit), Ok(parsed)) if version < *since => match our_parse(s) {
            Ok(_) => Err(format!(
                "libpq {since} refuses it, we accept it ({parsed:?})"
            )),
            Err(e) if e.contains(culprit) => Ok(()),
            Err(e) => Err(format!("our error does not name {culprit:?}: {e}")),
        },
        (SemanticError(culprit) | RejectedSince(_, culprit), Ok(parsed)) => {
            let libpq_error = libpq_connect_error(&parsed, server);
            match our_parse(s) {
                Ok(_) => Err(format!(
                    "we accept it; libpq, connecting, says {libpq_error:?}"
                )),
                Err(e) => compare_errors(&libpq_error, &e, culprit),
            }
        }
        (Reject(culprit) | RejectedSince(_, culprit), Err(libpq_error)) => match our_parse(s) {
            Ok(_) => Err(format!("libpq refuses it ({libpq_error:?}), we accept it")),
            Err(e) => compare_errors(&libpq_error, &e, culprit),
        },
        (_, Ok(parsed)) => Err(format!("the table is wrong: libpq accepts it: {parsed:?}")),
        (_, Err(e)) => Err(format!("the table is wrong: libpq refuses it: {e:?}")),
    }
}

#[test]
fn connection_strings_mean_what_libpq_says() {
    let version = libpq_major_version();
    let server = HangUpServer::start();
    let mut failures = Vec::new();
    let (mut libpq_accepts, mut libpq_refuses) = (0, 0);
    for (s, expect) in CASES {
        if !s.contains('\0') {
            match libpq_parse(s) {
                Ok(_) => libpq_accepts += 1,
                Err(_) => libpq_refuses += 1,
            }
        }
        if let Err(why) = check_case(s, expect, version, &server) {
            failures.push(format!("{s:?}: {why}"));
        }
        // Whatever else the row expects, an error of ours must never show a password.
        if let Err(e) = our_parse(s).map(drop)
            && e.contains(SECRET)
        {
            failures.push(format!("{s:?}: our error shows a password: {e}"));
        }
    }
    println!(
        "{} cases against libpq {version}: PQconninfoParse accepts {libpq_accepts}, refuses \
         {libpq_refuses}, {} not given to libpq (NUL)",
        CASES.len(),
        CASES.len() - libpq_accepts - libpq_refuses
    );
    assert!(
        failures.is_empty(),
        "{} of {} connection strings are read differently from libpq {version}:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
}

#[test]
fn libpq_helper_reports_values_and_errors() {
    let parsed = libpq_parse("host=a port=1").unwrap();
    assert_eq!(parsed.get("host").map(String::as_str), Some("a"));
    assert_eq!(parsed.get("port").map(String::as_str), Some("1"));
    assert_eq!(parsed.len(), 2, "no defaults are filled in: {parsed:?}");
    assert_eq!(
        libpq_parse("nope=1").unwrap_err(),
        r#"invalid connection option "nope""#
    );
}

#[test]
fn table_is_large_and_has_no_duplicates() {
    assert!(CASES.len() >= 60, "{} cases", CASES.len());
    let mut seen = std::collections::BTreeSet::new();
    for (s, _) in CASES {
        assert!(seen.insert(*s), "{s:?} is in the table twice");
    }
}
