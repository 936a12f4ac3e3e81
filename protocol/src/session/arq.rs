//! Acknowledgements and retransmission, and the rule that no message is lost silently.
//!
//! A message, once composed from its streams' state, is in exactly one place until it is
//! acknowledged or its streams are failed (one sent without a SURB-ACK, which says only what
//! is said again if it is lost, leaves once sent: see [`super::compose`]):
//! - *pending*: built and sent (or queued for its send tick), waiting for its SURB-ACK until
//!   its deadline, `1.5 × (its delays) + ack_slack`;
//! - *to retransmit*: its deadline passed; it is rebuilt on a fresh route at the next tick;
//! - *stalled*: building it failed (no route: the suspect set or the path preferences leave a
//!   layer empty, or a relay has no key for the epoch; or a bug). It is tried again at each
//!   later tick, without using up an attempt.
//!
//! It leaves only by: an acknowledgement; `max_attempts` sends without one (its streams fail
//! with [`StreamFailure::NotAcknowledged`]); staying stalled for `no_path_timeout` (its
//! streams fail with [`StreamFailure::NoPath`], or [`StreamFailure::Bug`] if the build failed
//! for a bug); or its exit leaving the consensus (its streams fail with
//! [`StreamFailure::ExitLeftConsensus`] at once: no packet can reach that exit). Each is
//! counted in [`super::SessionStats`]. While any message is stalled no new one is composed,
//! so stream data stays in the streams' buffers (bounded by their windows) rather than piling
//! up in messages.
//!
//! Suspects. Relays on the routes of lost packets are counted by consecutive losses; an
//! acknowledged packet clears the relays on its routes. Relays at [`SUSPECT_AFTER`] are left
//! out of new paths, so retransmissions route around a dead mix. Suspicion never leaves a
//! layer empty ([`crate::directory::path::PathSelector::excluding`] keeps a layer whose every
//! relay is suspect): when every mix of a layer is suspect, messages go on through that layer
//! and fail by `max_attempts`. What makes a route impossible is the consensus (a layer, or
//! every mix of it the path preferences allow, gone; keys missing for the epoch).

use std::time::Duration;

use rand::{CryptoRng, RngExt};

use super::exits::{ExitRef, MAX_UNACKNOWLEDGED_IN_FLIGHT};
use super::reply_blocks::{ReadyBlock, ReplyRoute};
use super::routes::Queued;
use super::{ClientSession, StreamFailure};
use crate::directory::IdentityKey;
use crate::fragment::Fragment;
use crate::payload::Content;
use crate::stream::{ClientItem, StreamId};
use crate::surb::ReplyKey;
use crate::time::Instant;

/// Consecutive lost packets after which a relay is left out of new paths.
pub const SUSPECT_AFTER: u32 = 2;

/// A message for an exit session, and what it carries.
pub(super) struct Outgoing {
    pub(super) exit: ExitRef,
    pub(super) fragment: Fragment,
    pub(super) streams: Vec<StreamId>,
    /// Reply blocks it hands the exit.
    pub(super) reply_blocks: usize,
    /// Times it was sent so far.
    pub(super) attempts: u32,
    /// Whether it goes with a SURB-ACK and is re-sent until acknowledged; if not, it is sent
    /// once and forgotten (see [`super::compose`]: nothing in it is lost with it).
    pub(super) acknowledged: bool,
}

impl Outgoing {
    pub(super) fn heap_bytes(&self) -> usize {
        self.fragment.data.len() + self.streams.len() * std::mem::size_of::<StreamId>()
    }
}

/// A packet waiting for its acknowledgement.
pub(super) struct Pending {
    pub(super) out: Outgoing,
    /// The mixes of its forward route and of its SURB-ACK's route.
    pub(super) relays: Vec<IdentityKey>,
    /// The mixes of its SURB-ACK's route alone: paid when the acknowledgement arrives.
    pub(super) ack_relays: Vec<IdentityKey>,
    pub(super) deadline: Instant,
    /// When it was built and queued for its send tick.
    pub(super) sent_at: Instant,
    pub(super) key: ReplyKey,
}

/// Doublings of a packet's timeout for its re-sends: the fifth and later wait 16 times the
/// first.
const MAX_BACKOFF_DOUBLINGS: u32 = 4;

impl Pending {
    pub(super) fn heap_bytes(&self) -> usize {
        self.out.heap_bytes()
            + (self.relays.len() + self.ack_relays.len()) * std::mem::size_of::<IdentityKey>()
    }
}

/// A message that could not be built, since `since`.
pub(super) struct Stalled {
    pub(super) out: Outgoing,
    pub(super) since: Instant,
    /// Whether the last failure was a bug rather than a missing route.
    pub(super) bug: bool,
}

/// Where a message's SURB-ACK comes from.
enum AckSource {
    /// The stock built ahead.
    Built(ReadyBlock),
    /// A route chosen now, to build the block on.
    Route(ReplyRoute),
}

/// Why a message could not be built.
pub(super) enum BuildFailure {
    /// Its exit is not in the consensus: it never will be, with this exit session.
    ExitGone,
    /// No route now (suspects, preferences, keys): maybe later.
    NoRoute,
    /// A bug: building what the session composed failed.
    Bug,
}

impl ClientSession {
    /// Builds `out` into a packet to its exit on a fresh route, with a fresh SURB-ACK on a
    /// fresh route back if it is to be acknowledged, and records it pending (one not to be
    /// acknowledged is sent and forgotten). On failure hands `out` back, untouched.
    pub(super) fn transmit<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
        out: Outgoing,
    ) -> std::result::Result<Queued, (Outgoing, BuildFailure)> {
        let Some(exit) = self
            .exits
            .get(&out.exit)
            .and_then(|e| self.consensus.relay(&e.exit))
            .filter(|r| r.roles.exit)
            .cloned()
        else {
            return Err((out, BuildFailure::ExitGone));
        };
        // Every route first: a failure here costs no Sphinx work. The SURB-ACK comes from
        // the blocks built ahead where one fits this exit (given back if the route there
        // fails), else it is built on a route chosen now.
        let ack_source = if out.acknowledged {
            let suspects = self.suspects_for_stock();
            match self.take_prebuilt_block(Some(&exit), &suspects) {
                Some(ready) => Some(AckSource::Built(ready)),
                None => match self.reply_route(rng, Some(&exit)) {
                    Ok(route) => Some(AckSource::Route(route)),
                    Err(_) => return Err((out, BuildFailure::NoRoute)),
                },
            }
        } else {
            None
        };
        let there = self
            .mix_route(rng, Some(&exit))
            .and_then(|(mut route, payees)| {
                route.push(exit.route_hop(self.consensus.epoch)?);
                Ok((route, payees))
            });
        let Ok((route, mut payees)) = there else {
            if let Some(AckSource::Built(ready)) = ack_source {
                self.give_back_prebuilt_block(ready);
            }
            return Err((out, BuildFailure::NoRoute));
        };
        let delays = self.delay.sample_n(rng, route.len());
        let ack = match ack_source {
            Some(AckSource::Built(ready)) => Some(ready),
            Some(AckSource::Route(r)) => match self.build_reply_block(rng, r) {
                Ok(ready) => Some(ready),
                Err(_) => {
                    self.stats.bugs += 1;
                    return Err((out, BuildFailure::Bug));
                }
            },
            None => None,
        };
        // The mixes paid when its ack arrives: those of its route and of the ack's.
        let mut relays = ack.as_ref().map(|a| a.relays.clone()).unwrap_or_default();
        relays.extend(payees.iter().copied());
        payees.push(exit.identity);
        let fragment = out.fragment.clone();
        let (content, ack) = match ack {
            Some(a) => (
                Content::DataWithAck {
                    ack: a.block,
                    fragment,
                },
                Some((a.key, a.relays, a.mix_delay)),
            ),
            None => (Content::Data { fragment }, None),
        };
        let forward_delay: Duration = delays[..delays.len() - 1].iter().sum();
        let sealed = self.seal(
            rng,
            now,
            route,
            &payees,
            delays,
            exit.address(),
            [0; 16],
            &content,
        );
        let Ok(job) = sealed else {
            self.stats.bugs += 1;
            return Err((out, BuildFailure::Bug));
        };
        if let Some(e) = self.exits.get_mut(&out.exit) {
            e.last_active = now;
        }
        let Some((key, ack_relays, ack_delay)) = ack else {
            self.stats.unacknowledged_sent += 1;
            // Its blocks are on their way for about a round trip: the route's delays there
            // and a reply's mean delay back, or the round trip acks took lately if longer.
            let round_trip = (forward_delay + self.delay.mean() * 3)
                .max(self.ack_rtt.reorder_window().unwrap_or_default());
            if out.reply_blocks > 0
                && let Some(e) = self.exits.get_mut(&out.exit)
            {
                if e.unacknowledged_blocks.len() >= MAX_UNACKNOWLEDGED_IN_FLIGHT {
                    e.unacknowledged_blocks.pop_front();
                }
                e.unacknowledged_blocks
                    .push_back((now + round_trip, out.reply_blocks));
            }
            return Ok(Queued { job });
        };
        // The route's own delays, or what acks have taken lately if more (relays' queues
        // add to the delays a client picks), doubled with each re-send: a loaded network
        // that answers late is not made to carry every packet again (congestion collapse).
        let by_route = (forward_delay + ack_delay).mul_f64(1.5) + self.config.ack_slack;
        let measured = self.ack_rtt.timeout().unwrap_or_default();
        let rto = by_route.max(measured) * (1 << out.attempts.min(MAX_BACKOFF_DOUBLINGS));
        let deadline = now + rto;
        let id = key.surb_id();
        self.deadlines.insert((deadline, id), ());
        self.pending.insert(
            id,
            Pending {
                out: Outgoing {
                    attempts: out.attempts + 1,
                    ..out
                },
                relays,
                ack_relays,
                deadline,
                sent_at: now,
                key,
            },
        );
        Ok(Queued { job })
    }

    /// The next real packet: a stalled message first, then a retransmission, then a new
    /// message for some exit.
    pub(super) fn next_real<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
    ) -> Option<Queued> {
        if let Some(stalled) = self.stalled.pop_front() {
            // If it still finds no route, it waits for a later tick (the others would fail
            // alike).
            return self.send_or_stall(now, rng, stalled.out, stalled.since, true);
        }
        while let Some(id) = self.retransmit.pop_front() {
            if let Some(p) = self.take_pending(&id) {
                return self.send_or_stall(now, rng, p.out, now, false);
            }
        }
        let order = self.round_robin_order();
        for exit in order {
            let Some(composed) = self.compose(exit, now, rng) else {
                continue;
            };
            let (message, streams) = (composed.message, composed.streams);
            self.round_robin = exit;
            let data = match message.encode() {
                Ok(data) => data,
                Err(_) => {
                    // Composing keeps within the packet's budget; a message that does not
                    // encode is a bug, and its streams cannot go on.
                    self.stats.bugs += 1;
                    self.fail_streams(&streams, StreamFailure::Bug);
                    return None;
                }
            };
            let reply_blocks = message
                .items
                .iter()
                .map(|item| match item {
                    ClientItem::Surbs(blocks) => blocks.len(),
                    _ => 0,
                })
                .sum();
            let out = Outgoing {
                exit,
                fragment: Fragment {
                    message_id: rng.random(),
                    index: 0,
                    count: 1,
                    data,
                },
                streams,
                reply_blocks,
                attempts: 0,
                acknowledged: composed.acknowledged,
            };
            return self.send_or_stall(now, rng, out, now, false);
        }
        None
    }

    /// Transmits `out`, or stalls it (waiting for a route since `since`; `oldest` if it was
    /// the oldest stalled already).
    fn send_or_stall<R: CryptoRng + ?Sized>(
        &mut self,
        now: Instant,
        rng: &mut R,
        out: Outgoing,
        since: Instant,
        oldest: bool,
    ) -> Option<Queued> {
        let resend = out.attempts > 0;
        match self.transmit(now, rng, out) {
            Ok(q) => {
                self.stats.retransmits += u64::from(resend);
                Some(q)
            }
            Err((out, why)) => {
                self.stall(out, why, since, oldest);
                None
            }
        }
    }

    /// Reply blocks on their way to exit session `exit`: in messages not yet acknowledged
    /// (sent, to be re-sent, or waiting for a route), and in those sent without a SURB-ACK
    /// within about a round trip (forgetting older ones).
    pub(super) fn reply_blocks_in_flight(&mut self, exit: ExitRef) -> usize {
        let now = self.now;
        let unacknowledged = self.exits.get_mut(&exit).map_or(0, |e| {
            e.unacknowledged_blocks.retain(|&(t, _)| t > now);
            e.unacknowledged_blocks.iter().map(|&(_, n)| n).sum()
        });
        let pending = self.pending.values().map(|p| &p.out);
        let stalled = self.stalled.iter().map(|s| &s.out);
        let acknowledged: usize = pending
            .chain(stalled)
            .filter(|out| out.exit == exit)
            .map(|out| out.reply_blocks)
            .sum();
        acknowledged + unacknowledged
    }

    /// Exit sessions in the order the next message is looked for: after the last one served.
    fn round_robin_order(&self) -> Vec<ExitRef> {
        let after = self.round_robin;
        self.exits
            .range(after..)
            .skip_while(|(r, _)| **r == after)
            .chain(self.exits.range(..=after))
            .map(|(r, _)| *r)
            .collect()
    }

    /// Keeps `out` to try again on a later tick (at the front if it was the oldest already),
    /// or fails its streams at once if its exit is gone.
    fn stall(&mut self, out: Outgoing, why: BuildFailure, since: Instant, oldest: bool) {
        self.stats.builds_deferred += 1;
        let bug = match why {
            BuildFailure::ExitGone => {
                self.fail_streams(&out.streams, StreamFailure::ExitLeftConsensus);
                return;
            }
            BuildFailure::NoRoute => false,
            BuildFailure::Bug => true,
        };
        let stalled = Stalled { out, since, bug };
        if oldest {
            self.stalled.push_front(stalled);
        } else {
            self.stalled.push_back(stalled);
        }
    }

    /// When the oldest stalled message is given up.
    pub(super) fn no_path_deadline(&self) -> Option<Instant> {
        self.stalled
            .front()
            .map(|s| s.since + self.config.no_path_timeout)
    }

    /// Fails the streams of messages stalled for `no_path_timeout`.
    pub(super) fn give_up_unroutable(&mut self, now: Instant) {
        let timeout = self.config.no_path_timeout;
        while let Some(s) = self.stalled.front() {
            if s.since + timeout > now {
                break;
            }
            let Some(s) = self.stalled.pop_front() else {
                break;
            };
            let why = if s.bug {
                StreamFailure::Bug
            } else {
                StreamFailure::NoPath
            };
            self.fail_streams(&s.out.streams, why);
        }
    }

    /// Removes a pending packet and its deadline.
    pub(super) fn take_pending(&mut self, id: &crate::packet::SurbId) -> Option<Pending> {
        let p = self.pending.remove(id)?;
        self.deadlines.remove(&(p.deadline, *id));
        Some(p)
    }

    /// The packet `p` was acknowledged: the relays on its routes are cleared of suspicion.
    pub(super) fn acknowledged(&mut self, p: &Pending) {
        self.stats.acks += 1;
        if p.out.attempts == 1 {
            self.ack_rtt
                .sample(self.now.saturating_duration_since(p.sent_at));
        }
        for r in &p.relays {
            self.suspects.remove(r);
        }
        if let Some(e) = self.exits.get_mut(&p.out.exit) {
            e.last_active = self.now;
        }
    }

    /// When the earliest pending packet's acknowledgement is overdue.
    pub(super) fn retransmit_deadline(&self) -> Option<Instant> {
        self.deadlines.keys().next().map(|(t, _)| *t)
    }

    /// Queues packets whose acknowledgement is overdue to be re-sent, suspecting the relays
    /// on their routes, or fails their streams after the last attempt.
    pub(super) fn expire_unacknowledged(&mut self, now: Instant) {
        while let Some((&(t, id), _)) = self.deadlines.iter().next() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id));
            let Some(p) = self.pending.get(&id) else {
                continue;
            };
            if p.attempts() >= self.config.max_attempts {
                if let Some(p) = self.pending.remove(&id) {
                    self.fail_streams(&p.out.streams, StreamFailure::NotAcknowledged);
                }
                continue;
            }
            for r in &p.relays {
                *self.suspects.entry(*r).or_insert(0) += 1;
            }
            self.retransmit.push_back(id);
        }
    }

    /// Drops what is in flight for `exit` (its exit is gone; its streams were failed).
    pub(super) fn drop_in_flight(&mut self, exit: ExitRef) {
        let ids: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, p)| p.out.exit == exit)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.take_pending(&id);
        }
        self.stalled.retain(|s| s.out.exit != exit);
    }

    /// Relays suspected enough to be left out of new paths.
    pub(super) fn suspected(&self) -> Vec<IdentityKey> {
        self.suspects
            .iter()
            .filter(|(_, n)| **n >= SUSPECT_AFTER)
            .map(|(k, _)| *k)
            .collect()
    }
}

impl Pending {
    fn attempts(&self) -> u32 {
        self.out.attempts
    }
}
