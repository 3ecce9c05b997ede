//! Where the store lives, parsed from `store.path` (`P0_RELAY_DB`): a SQLite file path, or a
//! `postgres://` / `postgresql://` URL in libpq's form. Any other URL is refused, never taken
//! for a file name, and a password in a URL is a `Secret` that no message prints.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::postgres::tls::Verify;
use crate::secret::Secret;

/// The store's location.
#[derive(Clone)]
pub enum StoreLocation {
    Sqlite(PathBuf),
    Postgres(Box<PgLocation>),
}

/// A PostgreSQL database, as a libpq URL names it.
#[derive(Clone)]
pub struct PgLocation {
    /// Connection settings without the password (`connect_config` adds it).
    config: tokio_postgres::Config,
    password: Option<Secret>,
    /// How the server's certificate is checked (from `sslmode` and `sslrootcert`).
    pub verify: Verify,
    /// The URL with its password replaced by `***`, for messages.
    shown: String,
}

impl PgLocation {
    /// The settings to connect with, password included.
    pub fn connect_config(&self) -> tokio_postgres::Config {
        let mut c = self.config.clone();
        if let Some(p) = &self.password {
            c.password(p.expose());
        }
        c
    }

    pub fn ssl_mode(&self) -> tokio_postgres::config::SslMode {
        self.config.get_ssl_mode()
    }

    /// Whether the database is reached over the network without checking who answers: a host
    /// other than loopback and a certificate not verified (the URL's own `sslmode`). Anyone on
    /// the path could then stand in for the database, and whoever writes the database can
    /// approve.
    pub fn unverified_remote(&self) -> bool {
        matches!(self.verify, Verify::None) && !local(&self.config)
    }
}

/// Whether every host the config names is this machine (loopback, or a Unix socket).
fn local(config: &tokio_postgres::Config) -> bool {
    use tokio_postgres::config::Host;
    let loopback = |name: &str| {
        name.eq_ignore_ascii_case("localhost")
            || name
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    };
    config.get_hosts().iter().all(|h| match h {
        Host::Tcp(name) => loopback(name),
        #[cfg(unix)]
        Host::Unix(_) => true,
    }) && config.get_hostaddrs().iter().all(|a| a.is_loopback())
}

/// `scheme://` at the start: the text is meant as a URL, not a file name.
fn url_scheme(text: &str) -> Option<&str> {
    let (scheme, _) = text.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')))
    .then_some(scheme)
}

/// `text` with any password in its user info replaced by `***`.
fn redact(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_owned();
    };
    // The user info runs to the last `@`, so a password holding an unencoded `/`, `?` or `#`
    // is still hidden whole (an `@` further on hides more, never less).
    let (userinfo, after) = match rest.rfind('@') {
        Some(at) => (Some(&rest[..at]), &rest[at + 1..]),
        None => (None, rest),
    };
    let mut out = format!("{scheme}://");
    if let Some(userinfo) = userinfo {
        match userinfo.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{userinfo}@")),
        }
    }
    // A `password=` parameter (libpq's form) is hidden too.
    match after.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => kv.to_owned(),
                })
                .collect();
            out.push_str(&format!("{path}?{}", query.join("&")));
        }
        None => out.push_str(after),
    }
    out
}

#[cfg(test)]
mod redaction {
    use super::redact;

    #[test]
    fn passwords_in_the_user_info_and_the_query_are_hidden() {
        for (url, want) in [
            ("postgres://u:pw@h:5432/db", "postgres://u:***@h:5432/db"),
            ("postgres://u:p/w?x#y@h/db", "postgres://u:***@h/db"),
            (
                "postgres://u@h/db?sslmode=require&password=pw",
                "postgres://u@h/db?sslmode=require&password=***",
            ),
            ("postgres://h/db", "postgres://h/db"),
        ] {
            assert_eq!(redact(url), want, "{url}");
        }
    }
}

impl StoreLocation {
    /// Parses the value of `key` (for messages); relative file paths are resolved against
    /// `base`, the config file's folder.
    pub fn parse(key: &str, text: &str, base: &Path) -> Result<StoreLocation, String> {
        let text = text.trim();
        let Some(scheme) = url_scheme(text) else {
            let p = Path::new(text);
            return Ok(StoreLocation::Sqlite(if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }));
        };
        let shown = redact(text);
        if !matches!(
            scheme.to_ascii_lowercase().as_str(),
            "postgres" | "postgresql"
        ) {
            return Err(format!(
                "{key}: `{shown}` is a URL but not a PostgreSQL one: use a file path (SQLite) \
                 or postgres://user@host:5432/database"
            ));
        }
        // Schemes are case-insensitive; the driver knows them in lower case.
        let text = format!("{}{}", scheme.to_ascii_lowercase(), &text[scheme.len()..]);
        let (text, mut verify, mode_given) = take_verification(&text);
        let mut config = tokio_postgres::Config::from_str(&text)
            .map_err(|e| format!("{key}: `{shown}` is not a valid PostgreSQL URL: {e}"))?;
        // A database across the network is verified unless the URL itself says otherwise
        // (libpq would `prefer` TLS without checking who answers).
        if !mode_given && !local(&config) {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
            if let Verify::None = verify {
                verify = Verify::Full { root_cert: None };
            }
        }
        if config.get_hosts().is_empty() {
            return Err(format!(
                "{key}: `{shown}` names no host: write postgres://user@host:5432/database"
            ));
        }
        if config.get_user().is_none() {
            return Err(format!(
                "{key}: `{shown}` names no user: write postgres://user@host:5432/database"
            ));
        }
        let password = config
            .get_password()
            .map(|p| Secret::new(String::from_utf8_lossy(p).into_owned()));
        // Keep the password out of the config that is cloned and passed around; it is
        // added back only when connecting.
        let mut bare = tokio_postgres::Config::new();
        copy_without_password(&config, &mut bare);
        if bare.get_connect_timeout().is_none() {
            bare.connect_timeout(std::time::Duration::from_secs(5));
        }
        config = bare;
        let verify = match verify {
            Verify::Full { root_cert } => Verify::Full {
                root_cert: root_cert.map(|p| if p.is_absolute() { p } else { base.join(p) }),
            },
            v => v,
        };
        Ok(StoreLocation::Postgres(Box::new(PgLocation {
            config,
            password,
            verify,
            shown,
        })))
    }

    pub fn is_postgres(&self) -> bool {
        matches!(self, StoreLocation::Postgres(_))
    }
}

/// Takes libpq's `sslmode=verify-ca|verify-full` and `sslrootcert` out of the URL (the driver
/// knows only disable, prefer and require): they become `require` plus a verifying connector.
/// Also says whether the URL names an `sslmode` at all.
fn take_verification(text: &str) -> (String, Verify, bool) {
    let Some((head, query)) = text.split_once('?') else {
        return (text.to_owned(), Verify::None, false);
    };
    let (mut verify, mut root_cert, mut require) = (false, None, false);
    let mode_given = query.split('&').any(|p| p.starts_with("sslmode="));
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(v).decode_utf8_lossy();
        match (k, value.as_ref()) {
            ("sslmode", "verify-ca" | "verify-full") => {
                verify = true;
                kept.push("sslmode=require".to_owned());
            }
            ("sslmode", "require") => {
                require = true;
                kept.push(pair.to_owned());
            }
            ("sslrootcert", path) => root_cert = Some(PathBuf::from(path)),
            _ => kept.push(pair.to_owned()),
        }
    }
    // As libpq: with a root certificate named, `require` verifies too; and so does a URL
    // that names one without a mode (which the caller then verifies whatever the host).
    let verify = if verify || ((require || !mode_given) && root_cert.is_some()) {
        Verify::Full { root_cert }
    } else {
        Verify::None
    };
    let text = if kept.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", kept.join("&"))
    };
    (text, verify, mode_given)
}

fn copy_without_password(from: &tokio_postgres::Config, to: &mut tokio_postgres::Config) {
    use tokio_postgres::config::Host;
    if let Some(u) = from.get_user() {
        to.user(u);
    }
    if let Some(d) = from.get_dbname() {
        to.dbname(d);
    }
    if let Some(o) = from.get_options() {
        to.options(o);
    }
    if let Some(a) = from.get_application_name() {
        to.application_name(a);
    }
    for h in from.get_hosts() {
        match h {
            Host::Tcp(name) => {
                to.host(name);
            }
            #[cfg(unix)]
            Host::Unix(path) => {
                to.host_path(path);
            }
        }
    }
    for a in from.get_hostaddrs() {
        to.hostaddr(*a);
    }
    for p in from.get_ports() {
        to.port(*p);
    }
    if let Some(t) = from.get_connect_timeout() {
        to.connect_timeout(*t);
    }
    if let Some(t) = from.get_tcp_user_timeout() {
        to.tcp_user_timeout(*t);
    }
    to.keepalives(from.get_keepalives());
    to.keepalives_idle(from.get_keepalives_idle());
    to.ssl_mode(from.get_ssl_mode());
    to.target_session_attrs(from.get_target_session_attrs());
    to.channel_binding(from.get_channel_binding());
    to.load_balance_hosts(from.get_load_balance_hosts());
}

impl fmt::Display for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.shown)
    }
}

impl fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PgLocation({})", self.shown)
    }
}

impl fmt::Display for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "{}", p.display()),
            StoreLocation::Postgres(pg) => write!(f, "{pg}"),
        }
    }
}

impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(p) => write!(f, "Sqlite({})", p.display()),
            StoreLocation::Postgres(pg) => write!(f, "Postgres({pg})"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_postgres::config::SslMode;

    fn parse(text: &str) -> Result<StoreLocation, String> {
        StoreLocation::parse("store.path", text, Path::new("/etc/relay"))
    }

    fn pg(text: &str) -> PgLocation {
        match parse(text) {
            Ok(StoreLocation::Postgres(p)) => *p,
            other => panic!("{text}: {other:?}"),
        }
    }

    #[test]
    fn file_paths_are_sqlite_resolved_against_the_config_folder() {
        for (text, want) in [
            ("data/relay.db", "/etc/relay/data/relay.db"),
            ("/var/lib/relay.db", "/var/lib/relay.db"),
            (
                "./postgres-data/relay.db",
                "/etc/relay/./postgres-data/relay.db",
            ),
            ("postgres:relay.db", "/etc/relay/postgres:relay.db"),
        ] {
            match parse(text) {
                Ok(StoreLocation::Sqlite(p)) => assert_eq!(p, Path::new(want), "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
    }

    #[test]
    fn postgres_urls_in_libpq_form() {
        let p = pg("postgres://relay:s3cr3t-pw@db.internal:6543/relay?sslmode=require");
        let c = p.connect_config();
        assert_eq!(c.get_user(), Some("relay"));
        assert_eq!(c.get_dbname(), Some("relay"));
        assert_eq!(c.get_ports(), &[6543]);
        assert_eq!(c.get_password(), Some(&b"s3cr3t-pw"[..]));
        assert!(matches!(p.ssl_mode(), SslMode::Require));
        for (mode, want) in [("disable", "Disable"), ("prefer", "Prefer")] {
            let p = pg(&format!("postgresql://u@h/d?sslmode={mode}"));
            assert_eq!(format!("{:?}", p.ssl_mode()), want);
        }
        assert_eq!(
            p.verify,
            Verify::None,
            "require encrypts without verifying, as libpq"
        );
        let p = pg("postgres://u@h/d?sslmode=verify-full&sslrootcert=ca.pem");
        assert!(matches!(p.ssl_mode(), SslMode::Require));
        assert_eq!(
            p.verify,
            Verify::Full {
                root_cert: Some(PathBuf::from("/etc/relay/ca.pem"))
            }
        );
        let p = pg("postgres://u@h/d?sslmode=verify-ca");
        assert_eq!(p.verify, Verify::Full { root_cert: None });
        // Without a mode, a database on this machine is as libpq would have it (prefer); one
        // across the network is verified against the system's roots (or `sslrootcert`).
        assert!(matches!(
            pg("postgres://u@localhost/d").ssl_mode(),
            SslMode::Prefer
        ));
        assert!(matches!(
            pg("postgres://u@127.0.0.1/d").ssl_mode(),
            SslMode::Prefer
        ));
        assert!(!pg("postgres://u@127.0.0.1/d").unverified_remote());
        let remote = pg("postgres://u@h/d");
        assert!(matches!(remote.ssl_mode(), SslMode::Require));
        assert!(matches!(remote.verify, Verify::Full { root_cert: None }));
        assert!(!remote.unverified_remote());
        let with_ca = pg("postgres://u@db.internal/d?sslrootcert=ca.pem");
        assert!(matches!(
            with_ca.verify,
            Verify::Full { root_cert: Some(_) }
        ));
        // A mode the URL names is kept, and said to be unverified.
        for mode in ["disable", "prefer", "require"] {
            assert!(
                pg(&format!("postgres://u@db.internal/d?sslmode={mode}")).unverified_remote(),
                "{mode}"
            );
        }
        assert_eq!(
            pg("POSTGRES://u@h/d").connect_config().get_dbname(),
            Some("d")
        );
        assert!(parse("postgres://u@h/d").unwrap().is_postgres());
    }

    #[test]
    fn the_password_is_never_printed() {
        let loc = parse("postgres://relay:s3cr3t-pw@db:5432/relay").unwrap();
        let StoreLocation::Postgres(p) = &loc else {
            panic!()
        };
        for shown in [
            format!("{loc}"),
            format!("{loc:?}"),
            format!("{p}"),
            format!("{p:?}"),
            format!("{:?}", p.connect_config()),
        ] {
            assert!(!shown.contains("s3cr3t"), "{shown}");
        }
        assert_eq!(loc.to_string(), "postgres://relay:***@db:5432/relay");
        // Errors about a URL redact it too.
        for bad in [
            "mysql://root:s3cr3t-pw@db/relay",
            "postgres://relay:s3cr3t-pw@db/relay?sslmode=sometimes",
            "postgres://relay:s3cr3t-pw@db/relay?nonsense=1",
        ] {
            let e = parse(bad).unwrap_err();
            assert!(!e.contains("s3cr3t"), "{e}");
            assert!(e.starts_with("store.path: "), "{e}");
        }
    }

    #[test]
    fn other_urls_are_errors_naming_the_setting() {
        for text in [
            "mysql://root@db/relay",
            "sqlite:///var/lib/relay.db",
            "file:///var/lib/relay.db",
            "https://db.example/relay",
            "redis://cache:6379",
        ] {
            let e = parse(text).unwrap_err();
            assert!(
                e.contains("store.path") && e.contains("not a PostgreSQL"),
                "{e}"
            );
        }
        let e = parse("postgres://u@h/d?sslmode=sometimes").unwrap_err();
        assert!(e.contains("sslmode"), "{e}");
        let e = parse("postgres:///relay").unwrap_err();
        assert!(e.contains("no host") || e.contains("no user"), "{e}");
    }
}
