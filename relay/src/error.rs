//! The relay library's error type.

use std::path::PathBuf;

/// What can stop the relay from starting or running.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The configuration file could not be read.
    #[error("cannot read config {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration does not parse or breaks a rule.
    #[error("invalid config {path}: {reason}")]
    Config { path: PathBuf, reason: String },
    /// A key file is missing, unreadable or malformed.
    #[error("key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    /// State on disk could not be read or written.
    #[error("state {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Stored replay state is corrupt.
    #[error("replay state {path}: {reason}")]
    ReplayState { path: PathBuf, reason: String },
    /// The store of winning tickets failed (disk full, corruption, ...).
    #[error("payment store {path}: {reason}")]
    PaymentStore { path: PathBuf, reason: String },
    /// The ledger client could not be set up.
    #[error("ledger: {0}")]
    Ledger(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The metrics endpoint could not start.
    #[error("metrics endpoint: {0}")]
    Metrics(String),
    /// A protocol-level failure that is fatal here (e.g. an unusable exit policy).
    #[error(transparent)]
    Protocol(#[from] murmur_protocol::Error),
}

/// Result with the relay error.
pub type Result<T> = std::result::Result<T, Error>;
