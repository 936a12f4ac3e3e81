//! Every deadline the session keeps, by name. [`super::ClientSession::poll_timeout`] is the
//! earliest of them; [`super::ClientSession::handle_timeout`] acts on all that are due
//! (the send tick is acted on by [`super::ClientSession::poll_transmit`]).

use super::ClientSession;
use crate::time::Instant;

/// A named deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Timer {
    /// The next λ_P, λ_L or λ_D emission (a real or cover packet, a loop, a drop).
    Send,
    /// The earliest packet whose acknowledgement is overdue (re-sent, or its streams fail).
    Retransmit,
    /// The oldest loop still out is counted missing.
    LoopMissing,
    /// The oldest message without a route gives up (`no_path_timeout`).
    NoPath,
    /// The exit session idle longest is forgotten (`exit_session_idle`).
    ExitIdle,
}

impl Timer {
    /// Every timer.
    pub const ALL: [Timer; 5] = [
        Timer::Send,
        Timer::Retransmit,
        Timer::LoopMissing,
        Timer::NoPath,
        Timer::ExitIdle,
    ];
}

impl ClientSession {
    /// When `timer` next fires, if it is set.
    pub fn timer(&self, timer: Timer) -> Option<Instant> {
        match timer {
            Timer::Send => self.cover.poll_timeout().filter(|_| !self.paced),
            Timer::Retransmit => self.retransmit_deadline(),
            Timer::LoopMissing => self.loop_deadline(),
            Timer::NoPath => self.no_path_deadline(),
            Timer::ExitIdle => self.exit_idle_deadline(),
        }
    }
}
