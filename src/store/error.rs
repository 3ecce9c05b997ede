//! What can go wrong in a store, typed by what the caller does about it: try again later
//! (`Unavailable`), give up on this input (`Refused`), stop and upgrade or repair (`Schema`,
//! `Corrupt`). The receiver answers 503 with `Retry-After` for every one (the sender's retry
//! is safe); the types matter to the writers (a refused batch is written again in parts), to
//! a connection (dropped when unavailable) and to the CLI. Errors are cloneable, so one failed
//! batch gives each of its writers the same one.

/// A store's failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or cannot take a write now (gone, locked past the busy
    /// timeout, read-only): the same call may work later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The database refused this operation on its content (a constraint, a value it cannot
    /// hold): the same input fails again; other inputs go on.
    #[error("store: {0}")]
    Refused(String),
    /// The store's schema is not one this relay can work with (written by a newer relay, or a
    /// migration that failed); the relay does not start on it.
    #[error("store: {0}")]
    Schema(String),
    /// A stored value is not one the relay writes (a row changed behind its back).
    #[error("store: corrupt: {0}")]
    Corrupt(String),
    /// The store could not be set up as configured (a folder that cannot be made, a TLS root
    /// that cannot be read).
    #[error("store: {0}")]
    Setup(String),
    /// The relay is stopping: the store's writer is gone.
    #[error("store is shut down")]
    Closed,
}

impl StoreError {
    /// Whether the same call may work later (the database was unreachable or busy).
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode as C;
        match &e {
            rusqlite::Error::SqliteFailure(f, _) => match f.code {
                C::DatabaseBusy
                | C::DatabaseLocked
                | C::CannotOpen
                | C::DiskFull
                | C::ReadOnly
                | C::SystemIoFailure
                | C::OutOfMemory
                | C::FileLockingProtocolFailed
                | C::PermissionDenied => StoreError::Unavailable(e.to_string()),
                C::DatabaseCorrupt | C::NotADatabase => StoreError::Corrupt(e.to_string()),
                C::SchemaChanged => StoreError::Schema(e.to_string()),
                _ => StoreError::Refused(e.to_string()),
            },
            rusqlite::Error::FromSqlConversionFailure(..)
            | rusqlite::Error::IntegralValueOutOfRange(..)
            | rusqlite::Error::InvalidColumnType(..)
            | rusqlite::Error::Utf8Error(..) => StoreError::Corrupt(e.to_string()),
            _ => StoreError::Refused(e.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    /// A statement the server answered with an error refuses this input; anything else (a
    /// closed connection, a network or TLS failure) makes the database unavailable.
    fn from(e: tokio_postgres::Error) -> Self {
        if e.is_closed() {
            return StoreError::Unavailable(chain(&e));
        }
        match e.as_db_error() {
            Some(db) => match db.code().code() {
                // The connection is gone or the server is going away: class 08 (connection),
                // 57 but a cancelled statement (operator intervention: shutdown, cannot
                // connect now), 53300 (too many connections).
                c if c.starts_with("08")
                    || (c.starts_with("57") && c != "57014")
                    || c == "53300" =>
                {
                    StoreError::Unavailable(chain(&e))
                }
                // About this statement (a deadlock, a statement timeout, out of memory or
                // disk): it refuses the batch, which is then written again in parts, so the
                // delivery that caused it fails alone.
                _ => StoreError::Refused(chain(&e)),
            },
            // A row that does not convert to the type asked for.
            None if std::error::Error::source(&e).is_some_and(|s| {
                s.is::<WrongType>() || s.is::<tokio_postgres::types::WasNull>()
            }) =>
            {
                StoreError::Corrupt(chain(&e))
            }
            None => StoreError::Unavailable(chain(&e)),
        }
    }
}

/// A column read as a type it does not hold: tokio-postgres reports one as an error with no
/// database error and this (or `WasNull`) as its source.
type WrongType = tokio_postgres::types::WrongType;

impl From<std::io::Error> for StoreError {
    fn from(e: std::io::Error) -> Self {
        StoreError::Unavailable(e.to_string())
    }
}

/// An error with its causes (a TLS handshake failure says why: an untrusted certificate...).
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = c.source();
    }
    text
}
