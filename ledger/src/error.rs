//! The one error type of the ledger crate, and the refusals it carries.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Why the ledger refused a request. A refusal never moves money. Each kind has its own
/// metrics label and HTTP status; over HTTP it travels as its label, so a
/// [`LedgerClient`](crate::client::LedgerClient) returns the same kind as the embedded
/// [`Ledger`](crate::Ledger) would.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Refusal {
    /// The request does not parse, or a value in it is unusable.
    Malformed,
    /// The request body is larger than the server reads.
    TooLarge,
    /// The request body did not arrive in time.
    BodyTimeout,
    /// The request's signature is not its signer's.
    BadSignature,
    /// The request's timestamp is outside the ledger's window around its clock.
    StaleRequest,
    /// This signed request was already decided once.
    ReplayedRequest,
    /// The account or pot holds less than the request moves.
    InsufficientFunds,
    /// No pot has this key.
    UnknownPot,
    /// A withdrawal from a pot with no warning outstanding.
    NotWarned,
    /// A withdrawal before the warning's notice period is over.
    NoticeNotOver,
    /// A withdrawal of more than was warned.
    ExceedsWarned,
    /// This ticket (pot, nonce) was already redeemed.
    AlreadyRedeemed,
    /// The redeemer is not the ticket's recipient.
    WrongRecipient,
    /// The ticket's expiry has passed.
    TicketExpired,
    /// The ticket's signature is not its pot's.
    ForgedTicket,
    /// The reveal does not open the ticket's commitment.
    RevealMismatch,
    /// The ticket did not win.
    NotAWinner,
    /// The signer, or everyone together, sent requests faster than the ledger takes them;
    /// nothing was decided: send it again later.
    RateLimited,
}

impl Refusal {
    /// Every kind, for tables and tests.
    pub const ALL: [Refusal; 18] = [
        Refusal::Malformed,
        Refusal::TooLarge,
        Refusal::BodyTimeout,
        Refusal::BadSignature,
        Refusal::StaleRequest,
        Refusal::ReplayedRequest,
        Refusal::InsufficientFunds,
        Refusal::UnknownPot,
        Refusal::NotWarned,
        Refusal::NoticeNotOver,
        Refusal::ExceedsWarned,
        Refusal::AlreadyRedeemed,
        Refusal::WrongRecipient,
        Refusal::TicketExpired,
        Refusal::ForgedTicket,
        Refusal::RevealMismatch,
        Refusal::NotAWinner,
        Refusal::RateLimited,
    ];

    /// A short stable label: the `reason` of an HTTP refusal and of the metrics.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Malformed => "malformed",
            Refusal::TooLarge => "too_large",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::BadSignature => "bad_signature",
            Refusal::StaleRequest => "stale_request",
            Refusal::ReplayedRequest => "replayed_request",
            Refusal::InsufficientFunds => "insufficient_funds",
            Refusal::UnknownPot => "unknown_pot",
            Refusal::NotWarned => "not_warned",
            Refusal::NoticeNotOver => "notice_not_over",
            Refusal::ExceedsWarned => "exceeds_warned",
            Refusal::AlreadyRedeemed => "already_redeemed",
            Refusal::WrongRecipient => "wrong_recipient",
            Refusal::TicketExpired => "ticket_expired",
            Refusal::ForgedTicket => "forged_ticket",
            Refusal::RevealMismatch => "reveal_mismatch",
            Refusal::NotAWinner => "not_a_winner",
            Refusal::RateLimited => "rate_limited",
        }
    }

    /// The kind with this label.
    pub fn from_label(label: &str) -> Option<Refusal> {
        Refusal::ALL.into_iter().find(|r| r.label() == label)
    }

    /// The HTTP status the server answers with.
    pub fn status(self) -> u16 {
        match self {
            Refusal::Malformed | Refusal::StaleRequest => 400,
            Refusal::BadSignature => 401,
            Refusal::WrongRecipient => 403,
            Refusal::UnknownPot => 404,
            Refusal::BodyTimeout => 408,
            Refusal::ReplayedRequest
            | Refusal::InsufficientFunds
            | Refusal::NotWarned
            | Refusal::ExceedsWarned
            | Refusal::AlreadyRedeemed => 409,
            Refusal::TicketExpired => 410,
            Refusal::TooLarge => 413,
            Refusal::ForgedTicket | Refusal::RevealMismatch | Refusal::NotAWinner => 422,
            Refusal::NoticeNotOver => 425,
            Refusal::RateLimited => 429,
        }
    }

    /// A refusal of this kind, saying why.
    pub fn because(self, message: impl Into<String>) -> Error {
        Error::Refused {
            refusal: self,
            message: message.into(),
        }
    }
}

/// Everything that can fail in the ledger, in words an operator or a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The ledger refused the request; no money moved.
    #[error("refused ({}): {message}", refusal.label())]
    Refused { refusal: Refusal, message: String },
    /// The database failed (disk full, corruption, ...).
    #[error("ledger database: {0}")]
    Storage(String),
    /// The config file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {message}")]
    ConfigParse { path: PathBuf, message: String },
    /// The config parses but a value is unusable, or does not fit the database.
    #[error("config: {0}")]
    Config(String),
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
    /// The server answered with an error that is not a known refusal.
    #[error("{url} answered {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    /// The answer is not signed by the ledger's key (missing, malformed or wrong signature):
    /// whoever answered may not be the ledger, so nothing in the answer is believed. Never a
    /// refusal; callers treat it like a network failure and ask again.
    #[error("{url}: unauthenticated answer ({message})")]
    Unauthenticated { url: String, message: String },
    /// The ledger's key file cannot be used.
    #[error("ledger key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// The async runtime could not start.
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
}

impl Error {
    /// The refusal, if this is one.
    pub fn refusal(&self) -> Option<Refusal> {
        match self {
            Error::Refused { refusal, .. } => Some(*refusal),
            _ => None,
        }
    }

    /// A short stable label for metrics: the refusal's, or the kind of failure.
    pub fn label(&self) -> &'static str {
        match self {
            Error::Refused { refusal, .. } => refusal.label(),
            Error::Storage(_) => "storage",
            Error::Http { .. } | Error::Status { .. } => "http",
            Error::Unauthenticated { .. } => "unauthenticated",
            _ => "internal",
        }
    }
}

/// Result with the ledger error.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_distinct_and_round_trip() {
        let mut labels: Vec<_> = Refusal::ALL.iter().map(|r| r.label()).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), Refusal::ALL.len());
        for r in Refusal::ALL {
            assert_eq!(Refusal::from_label(r.label()), Some(r));
            assert!((400..500).contains(&r.status()));
        }
        assert_eq!(Refusal::from_label("nonsense"), None);
    }
}
