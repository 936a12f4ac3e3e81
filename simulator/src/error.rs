//! The one error type of the simulator library.

use std::path::PathBuf;

/// Everything that can stop a simulation, in words a user can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A scenario does not parse or does not make sense.
    #[error("{origin}: {message}")]
    Scenario { origin: String, message: String },
    /// A `--set KEY=VALUE` override is malformed.
    #[error("override `{0}`: {1}")]
    Override(String, String),
    /// A traffic trace has a bad line.
    #[error("trace {path}, line {line}: {message}")]
    Trace {
        path: PathBuf,
        line: usize,
        message: String,
    },
    /// A sweep or plot input is unusable.
    #[error("{0}")]
    Input(String),
    /// Drawing a plot failed.
    #[error("plot {path}: {message}")]
    Plot { path: PathBuf, message: String },
    /// One of the engine's threads could not start, or stopped with a panic.
    #[error("the simulator's {0} thread {1}")]
    Thread(&'static str, String),
    /// The protocol layer refused a parameter (a rate or a delay).
    #[error(transparent)]
    Protocol(#[from] murmur_protocol::Error),
}

/// Result with the simulator error.
pub type Result<T> = std::result::Result<T, Error>;
