//! The session's errors: what a call could not do ([`SessionError`]), and why a stream failed
//! on the client's side ([`StreamFailure`]).

use crate::stream::Refusal;

/// What [`super::ClientSession`] could not do. [`SessionError::Bug`] is this crate's own
/// fault, never the input's or the network's: log it loudly.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The gateway is not in the consensus, or no longer serves as a gateway.
    #[error("the gateway is not a gateway in the consensus")]
    GatewayNotListed,
    /// No exit's policy allows the destination.
    #[error("no exit relay's policy allows this destination")]
    NoExit,
    /// The consensus offers no route or exit for the stream (the reason, as the path
    /// selector gave it).
    #[error("cannot build a path: {0}")]
    NoPath(String),
    /// Every exit session slot holds streams or packets in flight (the cap, as configured).
    #[error(
        "{cap} exit sessions are in use, none of them idle; close streams or use fewer isolation tokens"
    )]
    TooManyExitSessions { cap: usize },
    /// The session carries as many streams as it may.
    #[error("{cap} streams are open; close some first")]
    TooManyStreams { cap: usize },
    /// The payer has signed tickets worth `max_spend` (see
    /// [`super::SessionConfig::max_spend`]): no new stream opens.
    #[error(
        "the spending cap is reached: tickets worth {spent} have been signed, the cap is {cap} \
         (max_spend); no new stream opens"
    )]
    SpendLimit { spent: u64, cap: u64 },
    /// The consensus' parameters cannot drive the cover schedules or delays.
    #[error("the consensus' network parameters are unusable: {0}")]
    Params(String),
    /// A bug in this crate (what went wrong, for the report).
    #[error("internal error in the client session (a bug): {0}")]
    Bug(String),
}

impl SessionError {
    /// The SOCKS5 reply code for a stream this refused.
    pub fn socks_code(&self) -> u8 {
        match self {
            SessionError::NoExit | SessionError::SpendLimit { .. } => {
                Refusal::NotAllowed.socks_code()
            }
            SessionError::NoPath(_) | SessionError::GatewayNotListed => {
                Refusal::NetworkUnreachable.socks_code()
            }
            SessionError::TooManyExitSessions { .. }
            | SessionError::TooManyStreams { .. }
            | SessionError::Params(_)
            | SessionError::Bug(_) => Refusal::General.socks_code(),
        }
    }

    /// A path selector's error, sorted: no exit, or no path.
    pub(super) fn from_path(e: crate::Error) -> Self {
        match e {
            crate::Error::NoExit => SessionError::NoExit,
            crate::Error::Path(why) => SessionError::NoPath(why),
            other => SessionError::NoPath(other.to_string()),
        }
    }
}

/// Why the session gave up on a stream (the exit's own resets and refusals arrive as
/// [`super::Event::Reset`] and [`super::Event::Refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StreamFailure {
    /// A packet carrying the stream went unacknowledged through every allowed attempt.
    #[error("a packet of the stream was not acknowledged after every attempt")]
    NotAcknowledged,
    /// No route to the exit could be built for as long as the session waits for one
    /// (`SessionConfig::no_path_timeout`).
    #[error("no route to the exit could be built (every mix of a layer is excluded or gone)")]
    NoPath,
    /// The stream's exit is not in the consensus in force.
    #[error("the stream's exit left the consensus")]
    ExitLeftConsensus,
    /// A bug in this crate kept the stream's packets from being built.
    #[error("internal error building the stream's packets (a bug)")]
    Bug,
}

impl StreamFailure {
    /// The SOCKS5 reply code to give for it (while the stream is opening; after that the
    /// connection is closed).
    pub fn socks_code(self) -> u8 {
        match self {
            StreamFailure::NotAcknowledged => Refusal::TtlExpired.socks_code(),
            StreamFailure::NoPath | StreamFailure::ExitLeftConsensus => {
                Refusal::NetworkUnreachable.socks_code()
            }
            StreamFailure::Bug => Refusal::General.socks_code(),
        }
    }

    /// A short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            StreamFailure::NotAcknowledged => "not_acknowledged",
            StreamFailure::NoPath => "no_path",
            StreamFailure::ExitLeftConsensus => "exit_left_consensus",
            StreamFailure::Bug => "bug",
        }
    }
}
