use super::defaults::{default_host, user_from_passwd};
use super::*;
use proptest::prelude::*;

/// One setting of a parsed config, rendered as text so that the cases below read as a table.
fn setting(config: &Config, name: &str) -> String {
    let join = |items: Vec<String>| items.join(",");
    match name {
        "hosts" => join(
            config
                .get_hosts()
                .iter()
                .map(|h| match h {
                    Host::Tcp(name) => format!("tcp:{name}"),
                    Host::Unix(path) => format!("unix:{}", path.display()),
                })
                .collect(),
        ),
        "hostaddrs" => join(
            config
                .get_hostaddrs()
                .iter()
                .map(|a| a.as_ref().map(ToString::to_string).unwrap_or_default())
                .collect(),
        ),
        "ports" => join(config.get_ports().iter().map(|p| p.to_string()).collect()),
        "user" => config.get_user().unwrap_or("-").to_owned(),
        "password" => config
            .get_password()
            .map_or("-".to_owned(), |p| String::from_utf8_lossy(p).into_owned()),
        "dbname" => config.get_dbname().unwrap_or("-").to_owned(),
        "options" => config.get_options().unwrap_or("-").to_owned(),
        "application_name" => config.get_application_name().unwrap_or("-").to_owned(),
        "effective_application_name" => config
            .effective_application_name()
            .unwrap_or("-")
            .to_owned(),
        "connect_timeout" => config
            .get_connect_timeout()
            .map_or("-".to_owned(), |t| t.as_secs().to_string()),
        "sslmode" => config.get_ssl_mode().as_str().to_owned(),
        "sslnegotiation" => format!("{:?}", config.get_ssl_negotiation()),
        "keepalives" => config.get_keepalives().to_string(),
        "keepalives_idle" => format!("{:?}", config.get_keepalives_idle()),
        "keepalives_count" => format!("{:?}", config.get_keepalives_count()),
        "tcp_user_timeout" => format!("{:?}", config.get_tcp_user_timeout()),
        "target_session_attrs" => format!("{:?}", config.get_target_session_attrs()),
        "load_balance_hosts" => format!("{:?}", config.get_load_balance_hosts()),
        "channel_binding" => format!("{:?}", config.get_channel_binding()),
        "require_auth" => config.get_require_auth().unwrap_or("-").to_owned(),
        "passfile" => config
            .get_passfile()
            .map_or("-".to_owned(), |p| p.display().to_string()),
        "max_protocol_version" => config.get_max_protocol_version().unwrap_or("-").to_owned(),
        "ssl_sni" => config.get_ssl_sni().to_string(),
        other => panic!("test asks for unknown setting {other}"),
    }
}

type Case = (
    &'static str,
    std::result::Result<&'static [(&'static str, &'static str)], &'static str>,
);

/// What libpq accepts, and what it rejects, with the message (or part of it) we expect.
/// Kept one case per line so that it reads as a table.
#[rustfmt::skip]
const CASES: &[Case] = &[
    // --- URLs ---
    ("postgresql://alice:secret@db.example.com:6432/shop?application_name=web&sslmode=require",
        Ok(&[("user", "alice"), ("password", "secret"), ("hosts", "tcp:db.example.com"), ("ports", "6432"),
             ("dbname", "shop"), ("application_name", "web"), ("sslmode", "require")])),
    ("postgres://h", Ok(&[("hosts", "tcp:h"), ("ports", ""), ("dbname", "-")])),
    ("postgresql://", Ok(&[("hosts", ""), ("user", "-"), ("dbname", "-")])),
    ("postgresql://localhost/", Ok(&[("hosts", "tcp:localhost"), ("dbname", "-")])),
    ("postgresql://u@h", Ok(&[("user", "u"), ("password", "-"), ("hosts", "tcp:h")])),
    ("postgresql://u:@h", Ok(&[("user", "u"), ("password", "-")])),
    ("postgresql://:pw@h", Ok(&[("user", "-"), ("password", "pw")])),
    ("postgresql://u:p:q@h", Ok(&[("user", "u"), ("password", "p:q")])),
    ("postgresql://us%65r:p%40ss%2Fw%3Ard@h/d%62?options=-c%20geqo%3Doff",
        Ok(&[("user", "user"), ("password", "p@ss/w:rd"), ("dbname", "db"), ("options", "-c geqo=off")])),
    ("postgresql://h/caf%C3%A9", Ok(&[("dbname", "café")])),
    ("postgresql://[::1]:5433/db", Ok(&[("hosts", "tcp:::1"), ("ports", "5433")])),
    ("postgresql://[2001:db8::1]/db", Ok(&[("hosts", "tcp:2001:db8::1"), ("ports", "")])),
    ("postgresql://[::1],[fe80::2]:7/db", Ok(&[("hosts", "tcp:::1,tcp:fe80::2"), ("ports", "5432,7")])),
    ("postgresql://%2Fvar%2Frun%2Fpostgresql/db", Ok(&[("hosts", "unix:/var/run/postgresql"), ("dbname", "db")])),
    ("postgresql:///db?host=/tmp", Ok(&[("hosts", "unix:/tmp"), ("dbname", "db")])),
    ("postgresql:///db?host=%2Ftmp&port=5433", Ok(&[("hosts", "unix:/tmp"), ("ports", "5433")])),
    ("postgresql://h1:1,h2:2,h3:3/db", Ok(&[("hosts", "tcp:h1,tcp:h2,tcp:h3"), ("ports", "1,2,3")])),
    ("postgresql://h1,h2:2/db", Ok(&[("hosts", "tcp:h1,tcp:h2"), ("ports", "5432,2")])),
    ("postgresql://h1,h2/db", Ok(&[("hosts", "tcp:h1,tcp:h2"), ("ports", "5432,5432")])),
    ("postgresql://h?ssl=true", Ok(&[("sslmode", "require")])),
    ("postgresql://h?", Ok(&[("hosts", "tcp:h")])),
    ("postgresql://h?sslmode=disable&", Ok(&[("sslmode", "disable")])),
    ("postgresql://h?connect_timeout=10", Ok(&[("connect_timeout", "10")])),
    ("postgresql://h/db?user=other", Ok(&[("user", "other")])),
    ("postgresql://u@h/db?password=%41b", Ok(&[("password", "Ab")])),
    ("postgresql://h?application_name=%20spaced%20", Ok(&[("application_name", " spaced ")])),
    ("postgresql://h?application_name= trimmed ", Ok(&[("application_name", "trimmed")])),
    ("postgresql://h:/db", Ok(&[("hosts", "tcp:h"), ("ports", "")])),
    ("postgresql://h:99999/db", Err("invalid port number: \"99999\"")),
    ("postgresql://h:x1/db", Err("invalid port number: \"x1\"")),
    ("postgresql://h:0/db", Err("invalid port number: \"0\"")),
    ("postgresql://h/%ZZ", Err("invalid percent-encoded token: \"%ZZ\"")),
    ("postgresql://h/db%4", Err("invalid percent-encoded token: \"db%4\"")),
    ("postgresql://h/a%00b", Err("forbidden value %00 in percent-encoded value")),
    ("postgresql://h/%FF", Err("invalid UTF-8")),
    ("postgresql://h/a b", Err("unexpected spaces found in \"a b\"")),
    ("postgresql://[::1/db", Err("looking for matching \"]\"")),
    ("postgresql://[]/db", Err("IPv6 host address may not be empty")),
    ("postgresql://[::1]x/db", Err("unexpected character \"x\" at position 19")),
    ("postgresql://h?foo=1", Err("invalid URI query parameter: \"foo\"")),
    ("postgresql://h?ssl=false", Err("invalid URI query parameter: \"ssl\"")),
    ("postgresql://h?sslmode", Err("missing key/value separator \"=\" in URI query parameter: \"sslmode\"")),
    ("postgresql://h?a=1=2", Err("extra key/value separator \"=\" in URI query parameter: \"a\"")),
    ("postgresql://h?sslmode=maybe", Err("invalid sslmode value: \"maybe\"")),
    ("postgresql://h1,h2:2,h3:3/db?port=1,2", Err("could not match 2 port numbers to 3 hosts")),
    ("postgresql://h?service=x", Err("service files are not supported")),
    // --- key=value ---
    ("host=localhost port=5432 dbname=mydb user=me password=pw connect_timeout=10",
        Ok(&[("hosts", "tcp:localhost"), ("ports", "5432"), ("dbname", "mydb"), ("user", "me"),
             ("password", "pw"), ("connect_timeout", "10")])),
    ("", Ok(&[("hosts", ""), ("user", "-")])),
    ("   \t\n ", Ok(&[("hosts", "")])),
    ("host = db   user =  me", Ok(&[("hosts", "tcp:db"), ("user", "me")])),
    ("dbname='my db' user='o\\'brien'", Ok(&[("dbname", "my db"), ("user", "o'brien")])),
    ("application_name='back\\\\slash'", Ok(&[("application_name", "back\\slash")])),
    ("application_name=a\\ b\\'c", Ok(&[("application_name", "a b'c")])),
    ("dbname='' user=x", Ok(&[("dbname", ""), ("user", "x")])),
    ("dbname=", Ok(&[("dbname", "")])),
    // libpq: a quoted value ends at its closing quote, and what follows starts a new key.
    ("dbname='a''b'", Err("missing \"=\" after \"'b'\"")),
    // libpq skips blanks after '=', so the next pair becomes the value.
    ("host= port=5432", Ok(&[("hosts", "tcp:port=5432"), ("ports", "")])),
    ("user=a user=b", Ok(&[("user", "b")])),
    ("host=/tmp", Ok(&[("hosts", "unix:/tmp")])),
    ("host=@abstract", Ok(&[("hosts", "unix:@abstract")])),
    ("host=a,b port=5432,5433", Ok(&[("hosts", "tcp:a,tcp:b"), ("ports", "5432,5433")])),
    ("host=a,b,c port=6000", Ok(&[("hosts", "tcp:a,tcp:b,tcp:c"), ("ports", "6000")])),
    ("host=a,,/s", Ok(&[("hosts", "tcp:a,tcp:,unix:/s")])),
    ("host=a,b port=,7", Ok(&[("ports", "5432,7")])),
    ("port=' 42 '", Ok(&[("ports", "42")])),
    ("hostaddr=127.0.0.1,::1 host=a,b", Ok(&[("hostaddrs", "127.0.0.1,::1")])),
    ("connect_timeout=0", Ok(&[("connect_timeout", "-")])),
    ("connect_timeout=-5", Ok(&[("connect_timeout", "-")])),
    ("connect_timeout=1", Ok(&[("connect_timeout", "2")])),
    ("keepalives=0 keepalives_idle=30 keepalives_count=-1",
        Ok(&[("keepalives", "false"), ("keepalives_idle", "Some(30s)"), ("keepalives_count", "Some(0)")])),
    ("keepalives=1", Ok(&[("keepalives", "true")])),
    ("tcp_user_timeout=250", Ok(&[("tcp_user_timeout", "Some(250ms)")])),
    ("sslmode=verify-ca", Ok(&[("sslmode", "verify-ca")])),
    ("requiressl=1", Ok(&[("sslmode", "require")])),
    ("sslrootcert=system", Ok(&[("sslmode", "verify-full")])),
    ("sslmode=require sslnegotiation=direct", Ok(&[("sslnegotiation", "Direct")])),
    ("sslcompression=1 gssencmode=disable krbsrvname=pg sslsni=0", Ok(&[("ssl_sni", "false")])),
    ("client_encoding=UTF8", Ok(&[])),
    ("client_encoding=utf-8", Ok(&[])),
    ("client_encoding=auto", Ok(&[])),
    ("target_session_attrs=prefer-standby", Ok(&[("target_session_attrs", "PreferStandby")])),
    ("load_balance_hosts=random", Ok(&[("load_balance_hosts", "Random")])),
    ("channel_binding=require", Ok(&[("channel_binding", "Require")])),
    ("require_auth=scram-sha-256,none", Ok(&[("require_auth", "scram-sha-256,none")])),
    ("require_auth=!password,!md5", Ok(&[("require_auth", "!password,!md5")])),
    ("max_protocol_version=latest min_protocol_version=3.0", Ok(&[("max_protocol_version", "latest")])),
    ("passfile=/run/pgpass", Ok(&[("passfile", "/run/pgpass")])),
    ("fallback_application_name=tool", Ok(&[("application_name", "-"), ("effective_application_name", "tool")])),
    ("foo=bar", Err("invalid connection option \"foo\"")),
    ("=bar", Err("invalid connection option \"\"")),
    ("port=abc", Err("invalid port number: \"abc\"")),
    ("port=70000", Err("invalid port number: \"70000\"")),
    ("host=a port=5432,x", Err("invalid port number: \"x\"")),
    ("sslmode=bogus", Err("invalid sslmode value: \"bogus\"")),
    ("sslnegotiation=tls", Err("invalid sslnegotiation value: \"tls\"")),
    ("target_session_attrs=master", Err("invalid target_session_attrs value: \"master\"")),
    ("load_balance_hosts=yes", Err("invalid load_balance_hosts value: \"yes\"")),
    ("channel_binding=on", Err("invalid channel_binding value: \"on\"")),
    ("connect_timeout=ten", Err("invalid integer value \"ten\" for connection option \"connect_timeout\"")),
    ("connect_timeout=99999999999", Err("invalid integer value \"99999999999\"")),
    ("keepalives=yes", Err("invalid integer value \"yes\" for connection option \"keepalives\"")),
    ("hostaddr=not-an-ip", Err("could not parse network address \"not-an-ip\"")),
    ("host=a,b hostaddr=127.0.0.1", Err("could not match 2 host names to 1 hostaddr values")),
    ("dbname='unterminated", Err("unterminated quoted string in connection info string")),
    ("dbname='ends in escape\\", Err("unterminated quoted string")),
    ("host", Err("missing \"=\" after \"host\" in connection info string")),
    ("host=a dbname", Err("missing \"=\" after \"dbname\"")),
    ("host x=1", Err("missing \"=\" after \"host\"")),
    ("host=a,b port=1,2,3", Err("could not match 3 port numbers to 2 hosts")),
    ("client_encoding=LATIN1", Err("client_encoding \"LATIN1\" is not supported")),
    ("gssencmode=require", Err("gssencmode value \"require\" invalid when GSSAPI support is not compiled in")),
    ("gssencmode=allow", Err("invalid gssencmode value: \"allow\"")),
    ("service=prod", Err("service files are not supported")),
    ("replication=database", Err("replication connections are not supported")),
    ("require_auth=md5,!password", Err("negative require_auth method \"!password\" cannot be mixed with non-negative methods")),
    ("require_auth=!md5,password", Err("require_auth method \"password\" cannot be mixed with negative methods")),
    ("require_auth=kerberos", Err("invalid require_auth value: \"kerberos\"")),
    ("require_auth=md5,md5", Err("require_auth method \"md5\" is specified more than once")),
    ("require_auth=md5,", Err("invalid require_auth value: \"\"")),
    ("max_protocol_version=3.1", Err("invalid max_protocol_version value: \"3.1\"")),
    ("min_protocol_version=3.2 max_protocol_version=3.0", Err("min_protocol_version \"3.2\" is greater than max_protocol_version \"3.0\"")),
    ("ssl_min_protocol_version=TLSv1.4", Err("invalid \"ssl_min_protocol_version\" value: \"TLSv1.4\"")),
    ("ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2", Err("invalid SSL protocol version range")),
    ("sslmode=prefer sslnegotiation=direct", Err("weak sslmode \"prefer\" may not be used with sslnegotiation=direct")),
    ("sslrootcert=system sslmode=require", Err("weak sslmode \"require\" may not be used with sslrootcert=system")),
    ("user='a\u{0}b'", Err("connection option \"user\" contains a NUL character")),
    ("POSTGRESQL://u:hunter2@h/db", Err("looks like a URL")),
];

#[test]
fn connection_strings_parse_as_libpq_does() {
    for (input, expected) in CASES {
        match (Config::parse(input), expected) {
            (Ok(config), Ok(settings)) => {
                for (name, value) in *settings {
                    assert_eq!(setting(&config, name), *value, "{name} of {input:?}");
                }
            }
            (Err(err), Err(fragment)) => {
                let message = err.to_string();
                assert!(
                    message.contains(fragment),
                    "error for {input:?} was {message:?}, expected it to contain {fragment:?}"
                );
                assert_eq!(err.kind(), crate::error::ErrorKind::Config);
            }
            (Ok(config), Err(fragment)) => {
                panic!("{input:?} parsed as {config:?}, expected an error with {fragment:?}")
            }
            (Err(err), Ok(_)) => panic!("{input:?} failed: {err}"),
        }
    }
}

#[test]
fn errors_never_show_a_password() {
    let cases = [
        "postgresql://u:hunter2%ZZ@h/db",
        "postgresql://u:hunter2%00@h/db",
        "postgresql://u:hunter2%FF@h/db", // not UTF-8 is fine for a password: must parse
        "postgresql://u@h/db?password=hunter2%ZZ",
        "postgresql://u@h/db?password=hunter2 x",
        "postgresql://u@h/db?sslpassword=hunter2%G0",
        "postgresql://u:hunter2/x@h/db",
        "postgresql://u:hun/ter2@h:5432/db",
        "POSTGRES://u:hunter2@h/db",
        "password='hunter2",
    ];
    for input in cases {
        if let Err(err) = Config::parse(input) {
            let shown = format!("{err} {err:?}");
            assert!(!shown.contains("hunter2"), "{input:?} leaked: {shown}");
            assert!(!shown.contains("hun"), "{input:?} leaked: {shown}");
        }
    }
    let err = Config::parse("postgresql://u:hunter2%ZZ@h/db").unwrap_err();
    assert!(
        err.to_string()
            .contains("invalid percent-encoding in password")
    );
    let config = Config::parse("postgresql://u:hunter2%FF@h/db").unwrap();
    assert_eq!(config.get_password(), Some(&b"hunter2\xff"[..]));
}

#[test]
fn debug_hides_secrets() {
    let config =
        Config::parse("postgresql://u:topsecret@h/db?sslpassword=keysecret&sslmode=require")
            .unwrap();
    let shown = format!("{config:?} {config:#?}");
    assert!(!shown.contains("topsecret"), "{shown}");
    assert!(!shown.contains("keysecret"), "{shown}");
    assert!(shown.contains("<redacted>"));
    assert!(shown.contains("Require"));
    let mut built = Config::new();
    built.password(b"bytes-secret");
    assert!(!format!("{built:?}").contains("bytes-secret"));
}

#[test]
fn builder_and_from_str_agree_with_parse() {
    let parsed: Config = "host=a,/tmp port=1,2 user=u dbname=d".parse().unwrap();
    let mut built = Config::new();
    built
        .host("a")
        .host_path("/tmp")
        .port(1)
        .port(2)
        .user("u")
        .dbname("d");
    assert_eq!(parsed.effective_hosts(), built.effective_hosts());
    assert_eq!(parsed.get_user(), built.get_user());
    assert_eq!(parsed.get_dbname(), built.get_dbname());
    assert!(built.validate().is_ok());
    assert!(built.require_auth("gss,oops").is_err());
    assert_eq!(
        built.get_require_auth(),
        None,
        "a rejected list must not be stored"
    );
}

#[test]
fn effective_hosts_pairs_ports_like_libpq() {
    let one_port = Config::parse("host=a,b port=7").unwrap();
    assert_eq!(
        one_port.effective_hosts(),
        vec![(Host::Tcp("a".into()), 7), (Host::Tcp("b".into()), 7)]
    );
    let no_port = Config::parse("host=a").unwrap();
    assert_eq!(
        no_port.effective_hosts(),
        vec![(Host::Tcp("a".into()), 5432)]
    );

    // No host at all: exactly one default slot, socket or localhost depending on the box.
    let default = Config::new().effective_hosts();
    assert_eq!(default.len(), 1);
    assert_eq!(default[0].1, 5432);
    assert!(
        matches!(&default[0].0, Host::Tcp(n) if n == "localhost")
            || default[0].0 == Host::Unix(DEFAULT_SOCKET_DIR.into())
    );

    // An empty entry in a list is the default host too.
    let with_gap = Config::parse("host=a,,b").unwrap().effective_hosts();
    assert_eq!(with_gap.len(), 3);
    assert_eq!(with_gap[1].0, default_host());

    // hostaddr alone names the slots; with host names, the names stay.
    let addrs = Config::parse("hostaddr=10.0.0.1,10.0.0.2 port=1,2").unwrap();
    assert_eq!(
        addrs.effective_hosts(),
        vec![
            (Host::Tcp("10.0.0.1".into()), 1),
            (Host::Tcp("10.0.0.2".into()), 2)
        ]
    );
    let named = Config::parse("host=db hostaddr=10.0.0.1").unwrap();
    assert_eq!(
        named.effective_hosts(),
        vec![(Host::Tcp("db".into()), 5432)]
    );
}

#[test]
fn validate_applies_defaults_that_parse_may_not_assume() {
    // Two ports and no host: PGHOST may still supply two hosts, so parse accepts it...
    let config = Config::parse("port=1,2").unwrap();
    // ...but with the default single host, it cannot connect.
    let err = config.validate().unwrap_err();
    assert!(
        err.to_string()
            .contains("could not match 2 port numbers to 1 hosts")
    );

    let direct = Config::parse("sslnegotiation=direct").unwrap();
    assert!(
        direct
            .validate()
            .unwrap_err()
            .to_string()
            .contains("weak sslmode \"prefer\"")
    );
    let fixed = direct
        .with_env_var_defaults(vars(&[("PGSSLMODE", "verify-full")]))
        .unwrap();
    assert!(fixed.validate().is_ok());
}

fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

#[test]
fn environment_variables_map_to_settings() {
    let config = Config::from_env_vars(vars(&[
        ("PGHOST", "envhost,/tmp"),
        ("PGPORT", "6000,6001"),
        ("PGUSER", "envuser"),
        ("PGPASSWORD", "envpw"),
        ("PGDATABASE", "envdb"),
        ("PGAPPNAME", "envapp"),
        ("PGCONNECT_TIMEOUT", "7"),
        ("PGPASSFILE", "/env/pgpass"),
        ("PGSSLMODE", "disable"),
        ("PGTARGETSESSIONATTRS", "standby"),
        ("PGREQUIREAUTH", "scram-sha-256"),
        ("PGSERVICE", "ignored"),
        ("PGDATA", "/not/ours"),
        ("PATH", "/bin"),
    ]))
    .unwrap();
    for (name, value) in [
        ("hosts", "tcp:envhost,unix:/tmp"),
        ("ports", "6000,6001"),
        ("user", "envuser"),
        ("password", "envpw"),
        ("dbname", "envdb"),
        ("application_name", "envapp"),
        ("connect_timeout", "7"),
        ("passfile", "/env/pgpass"),
        ("sslmode", "disable"),
        ("target_session_attrs", "Standby"),
        ("require_auth", "scram-sha-256"),
    ] {
        assert_eq!(setting(&config, name), value, "{name}");
    }

    let legacy = Config::from_env_vars(vars(&[("PGREQUIRESSL", "1")])).unwrap();
    assert_eq!(legacy.get_ssl_mode(), SslMode::Require);
    let both =
        Config::from_env_vars(vars(&[("PGREQUIRESSL", "1"), ("PGSSLMODE", "allow")])).unwrap();
    assert_eq!(both.get_ssl_mode(), SslMode::Allow);
}

#[test]
fn malformed_environment_names_the_variable() {
    for (var, value, fragment) in [
        (
            "PGPORT",
            "eighty",
            "invalid port number: \"eighty\" (from environment variable PGPORT)",
        ),
        ("PGSSLMODE", "sure", "(from environment variable PGSSLMODE)"),
        ("PGCONNECT_TIMEOUT", "soon", "PGCONNECT_TIMEOUT"),
        ("PGCLIENTENCODING", "SJIS", "PGCLIENTENCODING"),
        ("PGREQUIREAUTH", "md5,!md5", "PGREQUIREAUTH"),
        (
            "PGPASSWORD",
            "with\0nul-hunter2",
            "invalid value in environment variable PGPASSWORD",
        ),
    ] {
        let err = Config::from_env_vars(vars(&[(var, value)])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains(fragment), "{var}: {message}");
        assert!(!message.contains("hunter2"), "{var}: {message}");
    }
}

#[test]
fn connection_string_wins_over_environment() {
    let env = vars(&[
        ("PGHOST", "envhost"),
        ("PGPORT", "6000"),
        ("PGUSER", "envuser"),
        ("PGPASSWORD", "envpw"),
        ("PGDATABASE", "envdb"),
        ("PGAPPNAME", "envapp"),
        ("PGCONNECT_TIMEOUT", "7"),
        ("PGSSLMODE", "require"),
    ]);
    let config = Config::parse("postgresql://strhost/strdb?connect_timeout=0&sslmode=disable")
        .unwrap()
        .with_env_var_defaults(env.clone())
        .unwrap();
    for (name, value) in [
        ("hosts", "tcp:strhost"),
        ("dbname", "strdb"),
        ("ports", "6000"),
        ("user", "envuser"),
        ("password", "envpw"),
        ("application_name", "envapp"),
        // Explicit zero ("forever") is a setting too: it blocks PGCONNECT_TIMEOUT.
        ("connect_timeout", "-"),
        ("sslmode", "disable"),
    ] {
        assert_eq!(setting(&config, name), value, "{name}");
    }

    // An explicitly empty value also counts as given, as in libpq.
    let empty_host = Config::parse("host=''")
        .unwrap()
        .with_env_var_defaults(env.clone())
        .unwrap();
    assert_eq!(setting(&empty_host, "hosts"), "");

    // Setters count as given too.
    let mut built = Config::new();
    built.user("builder");
    let built = built.with_env_var_defaults(env).unwrap();
    assert_eq!(built.get_user(), Some("builder"));
    assert_eq!(built.get_dbname(), Some("envdb"));
}

#[test]
fn effective_user_and_dbname() {
    let config = Config::parse("user=ann").unwrap();
    assert_eq!(config.effective_user().unwrap(), "ann");
    assert_eq!(config.effective_dbname().unwrap(), "ann");
    let config = Config::parse("user=ann dbname=shop").unwrap();
    assert_eq!(config.effective_dbname().unwrap(), "shop");
    let status = "Name:\tcat\nUid:\t1000\t1001\t1001\t1001\nGid:\t1\n";
    let passwd =
        "root:x:0:0::/root:/bin/sh\nann:x:1000:1000::/h:/bin/sh\nbob:x:1001:1::/h:/bin/sh\n";
    assert_eq!(user_from_passwd(status, passwd).as_deref(), Some("bob"));
    assert_eq!(user_from_passwd("Uid:\t5\t5\t5\t5\n", passwd), None);
    assert_eq!(user_from_passwd("", passwd), None);
}

const PGPASS: &str = "\
# hostname:port:database:username:password
db.example.com:5432:shop:alice:first
db.example.com:5432:shop:alice:second-never-used
*:5433:*:alice:any-host-on-5433
localhost:5432:*:bob:local-bob
/tmp:5432:*:carol:socket-carol
we\\:ird\\\\host:5432:*:dave:esc\\:aped\\\\pw:ignored-after-colon
db.example.com:5432:*:*:fallback

   # indented lines are not comments in libpq, but this one matches nothing
trailing:5432:d:u:ends-with-backslash\\
";

#[test]
fn pgpass_matching() {
    let lookup = |host, port, db, user| pgpass_lookup(PGPASS, host, port, db, user);
    assert_eq!(
        lookup("db.example.com", 5432, "shop", "alice").as_deref(),
        Some("first")
    );
    assert_eq!(
        lookup("elsewhere", 5433, "x", "alice").as_deref(),
        Some("any-host-on-5433")
    );
    assert_eq!(
        lookup("db.example.com", 5432, "other", "zed").as_deref(),
        Some("fallback")
    );
    assert_eq!(lookup("elsewhere", 5432, "x", "alice"), None);
    assert_eq!(lookup("db.example.com", 5431, "shop", "alice"), None);
    // Escapes: "\:" and "\\" in fields and in the password; the password ends at ':'.
    assert_eq!(
        lookup("we:ird\\host", 5432, "x", "dave").as_deref(),
        Some("esc:aped\\pw")
    );
    assert_eq!(
        lookup("trailing", 5432, "d", "u").as_deref(),
        Some("ends-with-backslash\\")
    );
    // Unix sockets: matched by their path, and also by "localhost".
    assert_eq!(
        lookup("/tmp", 5432, "x", "carol").as_deref(),
        Some("socket-carol")
    );
    assert_eq!(
        lookup("/var/run/postgresql", 5432, "x", "bob").as_deref(),
        Some("local-bob")
    );
    assert_eq!(lookup("", 5432, "x", "bob").as_deref(), Some("local-bob"));
    assert_eq!(
        lookup("localhost", 5432, "x", "bob").as_deref(),
        Some("local-bob")
    );
    assert_eq!(
        lookup("/tmp", 5432, "x", "bob").as_deref(),
        Some("local-bob")
    );
    // Comment lines never match, even ones that look like entries.
    assert_eq!(pgpass_lookup("#h:1:d:u:pw\n", "#h", 1, "d", "u"), None);
    // A line with too few fields never matches; nor do empty user or database names.
    assert_eq!(pgpass_lookup("h:1:d:u\n", "h", 1, "d", "u"), None);
    assert_eq!(pgpass_lookup("*:*:*:*:pw\n", "h", 1, "", "u"), None);
    assert_eq!(
        pgpass_lookup("*:*:*:*:pw\r\n", "h", 1, "d", "u").as_deref(),
        Some("pw")
    );
    // "*" is a wildcard only as a whole field.
    assert_eq!(pgpass_lookup("h*:1:d:u:pw\n", "hx", 1, "d", "u"), None);
    assert_eq!(
        pgpass_lookup("\\*:1:d:u:pw\n", "*", 1, "d", "u").as_deref(),
        Some("pw")
    );
}

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "pgengine-config-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(unix)]
#[test]
fn pgpass_file_is_used_only_when_private() {
    use std::os::unix::fs::PermissionsExt;

    let dir = TempDir::new("pgpass");
    let path = dir.0.join("pgpass");
    std::fs::write(&path, "db:5432:shop:alice:from-file\n").unwrap();
    let mut config = Config::new();
    config.user("alice").dbname("shop").passfile(&path);
    let host = Host::Tcp("db".into());

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_eq!(
        config.password_for(&host, 5432),
        None,
        "0644 must be ignored"
    );

    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        config.password_for(&host, 5432),
        Some(b"from-file".to_vec())
    );
    assert_eq!(config.password_for(&host, 5433), None);

    // An explicit password wins; an empty one does not count (libpq).
    config.password("explicit");
    assert_eq!(config.password_for(&host, 5432), Some(b"explicit".to_vec()));
    config.password("");
    assert_eq!(
        config.password_for(&host, 5432),
        Some(b"from-file".to_vec())
    );

    // Unix-socket connections find "localhost" entries.
    std::fs::write(&path, "localhost:5432:*:alice:via-socket\n").unwrap();
    assert_eq!(
        config.password_for(&Host::Unix("/some/dir".into()), 5432),
        Some(b"via-socket".to_vec())
    );

    // A missing file or a directory is no password, not an error.
    config.passfile(dir.0.join("missing"));
    assert_eq!(config.password_for(&host, 5432), None);
    config.passfile(&dir.0);
    assert_eq!(config.password_for(&host, 5432), None);
}

/// Quotes a value for a `key=value` string the way libpq's docs say: single quotes, with
/// backslash before `'` and `\`.
fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

proptest! {
    #[test]
    fn parse_never_panics(s in "\\PC*") {
        let _ = Config::parse(&s);
    }

    #[test]
    fn parse_never_panics_on_urls(s in "(postgres|postgresql)://[a-z:@%/?=&,\\[\\]0-9 .\\PC]*") {
        let _ = Config::parse(&s);
    }

    #[test]
    fn pgpass_lookup_never_panics(
        contents in "[a-z*:\\\\#\n\r\u{e9}]*",
        host in "[a-z/:\\\\]*",
        port in any::<u16>(),
    ) {
        let _ = pgpass_lookup(&contents, &host, port, "d", "u");
    }

    #[test]
    fn quoted_values_round_trip(
        user in "[^\\x00]{1,20}",
        dbname in "[^\\x00]{0,20}",
        host in "[^\\x00,/@][^\\x00,]{0,20}",
        port in 1u16..,
        application_name in "[^\\x00]{0,30}",
        password in "[^\\x00]{0,20}",
    ) {
        let conninfo = format!(
            "user={} dbname = {}\thost={} port={port} application_name={} password={}",
            quote(&user), quote(&dbname), quote(&host), quote(&application_name), quote(&password),
        );
        let config = Config::parse(&conninfo).unwrap();
        prop_assert_eq!(config.get_user(), Some(user.as_str()));
        prop_assert_eq!(config.get_dbname(), Some(dbname.as_str()));
        prop_assert_eq!(config.get_hosts(), &[Host::Tcp(host.clone())]);
        prop_assert_eq!(config.get_ports(), &[port]);
        prop_assert_eq!(config.get_application_name(), Some(application_name.as_str()));
        prop_assert_eq!(config.get_password(), Some(password.as_bytes()));
    }

    #[test]
    fn percent_encoded_urls_round_trip(
        user in "[^\\x00]{1,20}",
        password in "[^\\x00]{1,20}",
        dbname in "[^\\x00]{1,20}",
        port in 1u16..,
    ) {
        let enc = |s: &str| s.bytes().map(|b| format!("%{b:02X}")).collect::<String>();
        let url = format!("postgresql://{}:{}@h:{port}/{}", enc(&user), enc(&password), enc(&dbname));
        let config = Config::parse(&url).unwrap();
        prop_assert_eq!(config.get_user(), Some(user.as_str()));
        prop_assert_eq!(config.get_password(), Some(password.as_bytes()));
        prop_assert_eq!(config.get_dbname(), Some(dbname.as_str()));
        prop_assert_eq!(config.get_ports(), &[port]);
    }
}
