//! The one error type of the directory crate.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Everything that can stop the authority or fail a client call, in words an operator can act
/// on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// The config parses but a value is unusable.
    #[error("config: {0}")]
    Config(String),
    /// The key file cannot be read, written or parsed, or `keygen` would overwrite one.
    #[error(transparent)]
    Key(#[from] murmur_service::KeyError),
    /// The state directory cannot be used.
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The listening socket cannot be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The HTTP server stopped with an error.
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
    /// An HTTP request could not be completed (connection refused, timeout, ...).
    #[error("request to {url} failed: {message}")]
    Http { url: String, message: String },
    /// The server answered with an error status.
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    /// A response was larger than the caller allows.
    #[error("response from {url} exceeds {limit} bytes")]
    TooLarge { url: String, limit: usize },
    /// A document was refused by the protocol rules (signatures, epoch, encoding, ...).
    #[error(transparent)]
    Protocol(#[from] murmur_protocol::Error),
    /// No authority served a consensus that verified.
    #[error("no authority served a usable consensus (last error: {0})")]
    NoConsensus(Box<Error>),
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

/// Result with the directory error.
pub type Result<T> = std::result::Result<T, Error>;
