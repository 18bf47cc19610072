//! The password file, `~/.pgpass` (§34.16).
//!
//! When no password was given, a connection looks for one here, as libpq does: in `passfile`
//! if set, else in `$HOME/.pgpass`. A file that group or others may access is ignored with a
//! warning, because a readable file of passwords is a leak the user should hear about. The
//! matching itself ([`pgpass_lookup`]) is a pure function of the file's text, so it can be
//! tested and fuzzed without files.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use super::{Config, Host, LOCALHOST, is_unix_socket_path};

impl Config {
    /// The password to offer `host`:`port`: the explicit one if given and not empty, else the
    /// first matching line of the password file (`passfile`, else `~/.pgpass`; §34.16). A
    /// password file that group or others can access is ignored with a warning, as libpq does.
    /// Nothing about the password is ever logged.
    ///
    /// ```
    /// use pgengine::config::{Config, Host};
    ///
    /// let config = Config::parse("password=x passfile=/nonexistent")?;
    /// assert_eq!(config.password_for(&Host::Tcp("db".into()), 5432), Some(b"x".to_vec()));
    /// # Ok::<(), pgengine::Error>(())
    /// ```
    pub fn password_for(&self, host: &Host, port: u16) -> Option<Vec<u8>> {
        if let Some(password) = self.password.as_ref().filter(|p| !p.0.is_empty()) {
            return Some(password.0.clone());
        }
        let path = self.pgpass_path()?;
        let contents = read_pgpass_file(&path)?;
        let user = self.effective_user().ok()?;
        let dbname = self.effective_dbname().ok()?;
        pgpass_lookup(&contents, &host.pgpass_key(), port, &dbname, &user).map(String::into_bytes)
    }

    fn pgpass_path(&self) -> Option<PathBuf> {
        match self.passfile.as_deref() {
            Some(path) if !path.as_os_str().is_empty() => Some(path.to_path_buf()),
            _ => std::env::var_os("HOME")
                .filter(|home| !home.is_empty())
                .map(|home| Path::new(&home).join(".pgpass")),
        }
    }
}

/// Reads the password file if libpq would: a missing file is silently skipped; one that is not
/// a plain file, or that group or others may access, is skipped with a warning naming the path
/// (a world-readable file of passwords is a leak the user should hear about).
fn read_pgpass_file(path: &Path) -> Option<String> {
    let mut file = File::open(path).ok()?;
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() {
        tracing::warn!(path = %path.display(), "password file is not a plain file; ignoring it");
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                path = %path.display(),
                "password file has group or world access; permissions should be u=rw (0600) \
                 or less; ignoring it"
            );
            return None;
        }
    }
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Finds the password for a connection in the contents of a password file (§34.16), as libpq's
/// `passwordFromFile` does. Each line is `hostname:port:database:username:password`; each of
/// the first four fields is `*` (anything) or a literal in which `\` takes the next character
/// literally (so `\:` and `\\`); lines starting with `#` and empty lines are skipped; the first
/// matching line wins, and its password ends at the next unescaped `:`.
///
/// An empty `host` means `localhost`. A socket directory (a host starting with `/` or `@`)
/// matches its own path and also `localhost`, the name the docs give local socket connections.
pub fn pgpass_lookup(
    contents: &str,
    host: &str,
    port: u16,
    dbname: &str,
    user: &str,
) -> Option<String> {
    if dbname.is_empty() || user.is_empty() {
        return None;
    }
    let host = if host.is_empty() { LOCALHOST } else { host };
    let local_socket = is_unix_socket_path(host);
    let port = port.to_string();
    contents.split('\n').find_map(|line| {
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let rest = match_pgpass_field(line, host).or_else(|| {
            local_socket
                .then(|| match_pgpass_field(line, LOCALHOST))
                .flatten()
        })?;
        let rest = match_pgpass_field(rest, &port)?;
        let rest = match_pgpass_field(rest, dbname)?;
        let rest = match_pgpass_field(rest, user)?;
        Some(unescape_pgpass_password(rest))
    })
}

/// If the first field of `line` matches `token`, returns what follows its `:`.
fn match_pgpass_field<'a>(line: &'a str, token: &str) -> Option<&'a str> {
    if let Some(rest) = line.strip_prefix("*:") {
        return Some(rest);
    }
    let mut chars = line.char_indices();
    let mut expected = token.chars();
    loop {
        let (i, c) = chars.next()?;
        let (c, escaped) = if c == '\\' {
            (chars.next()?.1, true)
        } else {
            (c, false)
        };
        if c == ':' && !escaped {
            return expected.next().is_none().then(|| &line[i + 1..]);
        }
        if expected.next() != Some(c) {
            return None;
        }
    }
}

fn unescape_pgpass_password(field: &str) -> String {
    let mut password = String::new();
    let mut chars = field.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            ':' => break,
            // A backslash at the very end stays, as in libpq.
            '\\' => password.push(chars.next().unwrap_or('\\')),
            c => password.push(c),
        }
    }
    password
}
