//! Exit sessions: one per (exit, isolation token), each with its own identifier at the exit,
//! its streams and the reply blocks it holds.
//!
//! Bounds. At most `SessionConfig::max_exit_sessions` exist at once (default
//! [`super::DEFAULT_MAX_EXIT_SESSIONS`]). A session is *idle* when it has no streams, no reset
//! waiting to be sent and no message in flight; an idle session is forgotten
//! `SessionConfig::exit_session_idle` (default [`crate::stream::SESSION_IDLE`], the exit's own
//! limit) after the last message either way, with the keys of its reply blocks. At the cap, a
//! new (exit, token) pair takes the place of the idle session quiet for longest; if none is
//! idle, the stream is refused with [`SessionError::TooManyExitSessions`].

use std::collections::VecDeque;

use rand::{Rng, RngExt};

use super::{ClientSession, Result, SessionError, StreamFailure};
use crate::directory::IdentityKey;
use crate::packet::SurbId;
use crate::stream::StreamId;
use crate::time::Instant;

/// A SOCKS user name and password, used only to keep streams apart.
pub type Isolation = Option<(Vec<u8>, Vec<u8>)>;

/// The session's own handle on an exit session (never reused).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) struct ExitRef(pub(super) u64);

/// An exit session: one per (exit, isolation token).
pub(super) struct ExitSession {
    pub(super) exit: IdentityKey,
    /// Its key in the index (kept to remove it from there).
    pub(super) isolation: Isolation,
    pub(super) id: u64,
    /// Reply blocks the exit is believed to hold: what was handed to it, less one for each
    /// reply back. Lost replies leave it high; the exit says what it holds with every
    /// message (`SurbsHeld`), and it is cut to that plus the blocks on their way there.
    pub(super) surbs_at_exit: usize,
    /// Reply blocks to keep it stocked with (see `SessionConfig::surbs_target`).
    pub(super) stock_target: usize,
    pub(super) streams: Vec<StreamId>,
    /// When the exit last answered, and when it was last sent reply blocks unasked: an exit
    /// that went quiet while streams are open may have run out of blocks (its request for
    /// more can be lost with the last one), so it gets a few every `reply_timeout`.
    pub(super) last_heard: Instant,
    pub(super) last_topup: Instant,
    /// The last message either way, or stream opened: when it counts as idle from.
    pub(super) last_active: Instant,
    /// The identifiers of the reply blocks handed to this exit, oldest first, at most
    /// [`super::reply_blocks::max_reply_keys`]: the keys of older ones are forgotten (some
    /// may have been answered already; their keys are gone from `reply_keys` then).
    pub(super) reply_ids: VecDeque<SurbId>,
    /// Reply blocks sent in messages without a SURB-ACK, with when each message has
    /// likely reached the exit and the exit's word on it come back: till then they count as
    /// on their way. Oldest first, at most [`MAX_UNACKNOWLEDGED_IN_FLIGHT`] messages.
    pub(super) unacknowledged_blocks: VecDeque<(Instant, usize)>,
}

/// Messages without a SURB-ACK whose blocks are counted on their way to one exit: at λ_P =
/// 400/s, those of a round trip of over half a second.
pub(super) const MAX_UNACKNOWLEDGED_IN_FLIGHT: usize = 256;

impl ExitSession {
    /// Bytes of its isolation token.
    pub(super) fn isolation_len(&self) -> usize {
        self.isolation
            .as_ref()
            .map_or(0, |(u, p)| u.len() + p.len())
    }
}

impl ClientSession {
    /// The exit session for (`exit`, `isolation`), made if there is none (at the cap, in the
    /// place of the idlest idle one).
    pub(super) fn exit_session_for<R: Rng + ?Sized>(
        &mut self,
        exit: IdentityKey,
        isolation: Isolation,
        rng: &mut R,
    ) -> Result<ExitRef> {
        let key = (exit, isolation);
        if let Some(&index) = self.exit_index.get(&key) {
            return Ok(index);
        }
        if self.exits.len() >= self.config.max_exit_sessions {
            let idlest = self
                .exits
                .iter()
                .filter(|(r, _)| self.is_idle(**r))
                .min_by_key(|(_, e)| e.last_active)
                .map(|(r, _)| *r);
            let Some(idlest) = idlest else {
                self.stats.opens_refused_full += 1;
                return Err(SessionError::TooManyExitSessions {
                    cap: self.config.max_exit_sessions,
                });
            };
            self.forget_exit_session(idlest);
            self.stats.exit_sessions_evicted += 1;
        }
        let index = ExitRef(self.next_exit);
        self.next_exit += 1;
        let (exit, isolation) = key;
        self.exit_index.insert((exit, isolation.clone()), index);
        self.exits.insert(
            index,
            ExitSession {
                exit,
                isolation,
                id: rng.random(),
                surbs_at_exit: 0,
                stock_target: self.config.surbs_target,
                streams: Vec::new(),
                last_heard: Instant::ZERO,
                last_topup: Instant::ZERO,
                last_active: self.now,
                reply_ids: VecDeque::new(),
                unacknowledged_blocks: VecDeque::new(),
            },
        );
        Ok(index)
    }

    /// No streams, no reset waiting, nothing in flight: the session can go without anything
    /// being lost.
    fn is_idle(&self, exit: ExitRef) -> bool {
        self.exits.get(&exit).is_some_and(|e| e.streams.is_empty())
            && !self.aborted.iter().any(|(e, _)| *e == exit)
            && !self.pending.values().any(|p| p.out.exit == exit)
            && !self.stalled.iter().any(|s| s.out.exit == exit)
    }

    /// When the next exit session may be forgotten as idle (see [`Self::is_idle`]).
    pub(super) fn exit_idle_deadline(&self) -> Option<Instant> {
        self.exits
            .values()
            .filter(|e| e.streams.is_empty())
            .map(|e| e.last_active + self.config.exit_session_idle)
            .min()
    }

    /// Forgets exit sessions idle since `exit_session_idle` before `now`.
    pub(super) fn expire_exit_sessions(&mut self, now: Instant) {
        let idle_for = self.config.exit_session_idle;
        let due: Vec<ExitRef> = self
            .exits
            .iter()
            .filter(|(_, e)| e.streams.is_empty() && e.last_active + idle_for <= now)
            .map(|(r, _)| *r)
            .collect();
        for exit in due {
            if self.is_idle(exit) {
                self.forget_exit_session(exit);
                self.stats.exit_sessions_expired += 1;
            } else if let Some(e) = self.exits.get_mut(&exit) {
                // Something is still in flight for it: it counts as active until that ends.
                e.last_active = now;
            }
        }
    }

    /// Fails the streams of exit sessions whose exit the consensus no longer lists, and
    /// forgets those sessions with what they had in flight (no packet can reach the exit).
    pub(super) fn drop_departed_exits(&mut self) {
        let departed: Vec<ExitRef> = self
            .exits
            .iter()
            .filter(|(_, e)| self.consensus.relay(&e.exit).is_none_or(|r| !r.roles.exit))
            .map(|(r, _)| *r)
            .collect();
        for exit in departed {
            let streams = self
                .exits
                .get(&exit)
                .map(|e| e.streams.clone())
                .unwrap_or_default();
            self.fail_streams(&streams, StreamFailure::ExitLeftConsensus);
            self.drop_in_flight(exit);
            self.forget_exit_session(exit);
        }
    }

    /// Forgets an exit session and the keys of the reply blocks it holds.
    pub(super) fn forget_exit_session(&mut self, exit: ExitRef) {
        let Some(e) = self.exits.remove(&exit) else {
            return;
        };
        self.exit_index.remove(&(e.exit, e.isolation));
        for id in e.reply_ids {
            if self.reply_keys.remove(&id).is_some() {
                self.stats.reply_keys_expired += 1;
            }
        }
        self.aborted.retain(|(x, _)| *x != exit);
    }
}
