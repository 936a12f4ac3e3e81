//! Reply blocks: built for SURB-ACKs and for the exit's replies, handed to exit sessions, and
//! the keys kept to open what comes back on them.
//!
//! Bounds on the keys kept for blocks never used: at most [`max_reply_keys`] of its stock
//! target per exit session (the oldest go first: an exit spends its newest blocks first, so
//! the oldest are the last it would use, if ever), and none beyond the exit session
//! itself, which is forgotten `exit_session_idle` (at most [`crate::stream::SESSION_IDLE`])
//! after its last message, as the exit forgets it and the blocks it holds. Stock targets grow
//! past `surbs_target` only for sessions whose exit runs dry, and the keys of all sessions
//! together stay within `max_exit_sessions × max_reply_keys(surbs_target)` (past it, a
//! session forgets its own oldest), so that many exist at once at most, and none of an exit
//! session idle for [`crate::stream::SESSION_IDLE`].

use std::time::Duration;

use rand::CryptoRng;

use super::ClientSession;
use super::exits::ExitRef;
use crate::directory::path::relays_conflict;
use crate::directory::{ConsensusRelay, Epoch, IdentityKey};
use crate::packet::{Address, RouteHop, SurbId};
use crate::stream::surbs_item_len;
use crate::surb::{ReplyBlock, ReplyKey, build_reply_block_with_id};
use crate::time::Instant;

/// The most reply keys kept for one exit session: four times the blocks it is kept stocked
/// with (at least 16).
pub fn max_reply_keys(surbs_target: usize) -> usize {
    surbs_target.max(4) * 4
}

/// Blocks that fit one packet with its SURB-ACK and room for a stream ack (a `Surbs` item of
/// four is 1,590 bytes).
pub const BLOCKS_PER_MESSAGE: usize = 4;

/// Blocks that fit one packet without a SURB-ACK with room for a stream ack (a `Surbs` item
/// of five is 1,986 bytes): a message of blocks alone needs no acknowledgement
/// ([`super::compose`]), so a download's upstream packets carry this many.
pub const BLOCKS_PER_UNACKNOWLEDGED: usize = 5;

/// Reply blocks built ahead on the driver's workers ([`ClientSession::prebuild_reply_blocks`]).
#[derive(Default)]
pub(super) struct Prebuilt {
    /// How many to keep, built or being built.
    pub(super) target: usize,
    pub(super) ready: std::collections::VecDeque<ReadyBlock>,
    /// Jobs given out and not yet back.
    pub(super) building: usize,
}

impl Prebuilt {
    pub(super) fn heap_bytes(&self) -> usize {
        self.ready
            .iter()
            .map(|b| {
                std::mem::size_of::<ReadyBlock>()
                    + b.relays.len() * std::mem::size_of::<IdentityKey>()
            })
            .sum()
    }
}

/// What is kept for a reply block handed to an exit session.
pub(super) struct ReplyKeyEntry {
    pub(super) key: ReplyKey,
    pub(super) exit: ExitRef,
    /// The mixes of its route (paid when the reply arrives).
    pub(super) relays: Vec<IdentityKey>,
}

impl ReplyKeyEntry {
    pub(super) fn heap_bytes(&self) -> usize {
        self.relays.len() * std::mem::size_of::<IdentityKey>()
    }
}

/// A route back to this client: its hops (the gateway last) and its mixes.
#[derive(Clone, Debug)]
pub(super) struct ReplyRoute {
    hops: Vec<RouteHop>,
    pub(super) relays: Vec<IdentityKey>,
}

/// A reply block for a worker thread to build ([`ClientSession::poll_block_job`]). The
/// session chose everything that needs its state (the route, the delays, the identifier the
/// reply comes back under); what is left is the block's scalar multiplications, the
/// session's costliest work, which any thread can do.
#[derive(Clone, Debug)]
pub struct BlockJob {
    route: ReplyRoute,
    delays: Vec<Duration>,
    id: SurbId,
    address: Address,
    epoch: Epoch,
}

impl BlockJob {
    /// The sum of the delays its mixes hold the reply (the last delay is the gateway's).
    fn mix_delay(&self) -> Duration {
        self.delays[..self.delays.len().saturating_sub(1)]
            .iter()
            .sum()
    }

    /// Builds the block, for [`ClientSession::handle_built_block`].
    pub fn build<R: CryptoRng + ?Sized>(self, rng: &mut R) -> BuiltBlock {
        let result = build_reply_block_with_id(
            rng,
            &self.route.hops,
            &self.delays,
            self.address,
            self.epoch,
            self.id,
        );
        BuiltBlock {
            mix_delay: self.mix_delay(),
            result,
            relays: self.route.relays,
            epoch: self.epoch,
        }
    }
}

/// A reply block a [`BlockJob`] built.
pub struct BuiltBlock {
    result: crate::Result<(ReplyBlock, ReplyKey)>,
    mix_delay: Duration,
    relays: Vec<IdentityKey>,
    epoch: Epoch,
}

impl BuiltBlock {
    fn ready(self) -> crate::Result<ReadyBlock> {
        let (block, key) = self.result?;
        Ok(ReadyBlock {
            block,
            key,
            relays: self.relays,
            mix_delay: self.mix_delay,
        })
    }
}

/// A built block with its key and the mixes of its route (paid when its reply arrives):
/// one built ahead waits in the session's stock for an exit that needs it.
pub(super) struct ReadyBlock {
    pub(super) block: ReplyBlock,
    pub(super) key: ReplyKey,
    pub(super) relays: Vec<IdentityKey>,
    /// The sum of the delays its mixes hold the reply.
    pub(super) mix_delay: Duration,
}

impl ClientSession {
    /// Keeps up to `n` reply blocks built ahead, off the session's thread: from then on the
    /// driver takes [`Self::poll_block_job`]s, builds them on worker threads and hands them
    /// back with [`Self::handle_built_block`], and a packet that carries blocks to an exit
    /// takes them from that stock before it builds any itself. `0` (the default): every
    /// block is built when a packet needs it.
    pub fn prebuild_reply_blocks(&mut self, n: usize) {
        self.prebuilt.target = n;
        while self.prebuilt.ready.len() > n {
            self.prebuilt.ready.pop_front();
        }
    }

    /// The next block to build ahead, while the stock and the blocks being built are fewer
    /// than [`Self::prebuild_reply_blocks`] asks for; `None` then, or if no route can be
    /// built now. Every job given out must come back through [`Self::handle_built_block`],
    /// or be given up with [`Self::block_job_lost`].
    pub fn poll_block_job<R: CryptoRng + ?Sized>(&mut self, rng: &mut R) -> Option<BlockJob> {
        if self.prebuilt.ready.len() + self.prebuilt.building >= self.prebuilt.target {
            return None;
        }
        // No exit to avoid yet: the exit that takes the block must not conflict with its
        // mixes, which is checked then.
        let route = self.reply_route(rng, None).ok()?;
        self.prebuilt.building += 1;
        Some(self.block_job(rng, route))
    }

    /// The job of building a block over `route`: its delays and identifier drawn now.
    fn block_job<R: CryptoRng + ?Sized>(&self, rng: &mut R, route: ReplyRoute) -> BlockJob {
        let delays = self.delay.sample_n(rng, route.hops.len());
        let id = self.mint_surb_id(rng);
        BlockJob {
            route,
            delays,
            id,
            address: self.config.address,
            epoch: self.consensus.epoch,
        }
    }

    /// A block a worker built: into the stock, unless the consensus moved to another epoch
    /// while it was built (its hops' keys are gone then) or the stock was shrunk.
    pub fn handle_built_block(&mut self, built: BuiltBlock) {
        self.prebuilt.building = self.prebuilt.building.saturating_sub(1);
        let current = built.epoch == self.consensus.epoch;
        match built.ready() {
            Ok(ready) if current && self.prebuilt.ready.len() < self.prebuilt.target => {
                self.stats.reply_blocks_prebuilt += 1;
                self.prebuilt.ready.push_back(ready);
            }
            Ok(_) => self.stats.prebuilt_blocks_discarded += 1,
            Err(_) => self.stats.bugs += 1,
        }
    }

    /// A job from [`Self::poll_block_job`] that will not come back (the driver could not
    /// queue it, or its worker is gone).
    pub fn block_job_lost(&mut self) {
        self.prebuilt.building = self.prebuilt.building.saturating_sub(1);
    }

    /// Empties the stock of blocks built ahead (their hops' keys left with the epoch).
    pub(super) fn drop_prebuilt_blocks(&mut self) {
        self.stats.prebuilt_blocks_discarded += self.prebuilt.ready.len() as u64;
        self.prebuilt.ready.clear();
    }

    /// A block from the stock that may go to `exit_relay`: none of its mixes conflicts with
    /// the exit (as a route built for it would avoid them), none is among `suspects`, and
    /// each is still listed. Blocks through a suspect or a relay no longer listed are
    /// dropped; those that only conflict with this exit stay for another.
    pub(super) fn take_prebuilt_block(
        &mut self,
        exit_relay: Option<&ConsensusRelay>,
        suspects: &[IdentityKey],
    ) -> Option<ReadyBlock> {
        let rules = self.config.path_rules;
        let mut stale = Vec::new();
        let mut found = None;
        for (i, block) in self.prebuilt.ready.iter().enumerate() {
            let usable = block
                .relays
                .iter()
                .all(|id| self.consensus.relay(id).is_some() && !suspects.contains(id));
            if !usable {
                stale.push(i);
                continue;
            }
            let conflicts = exit_relay.is_some_and(|e| {
                block
                    .relays
                    .iter()
                    .filter_map(|id| self.consensus.relay(id))
                    .any(|m| relays_conflict(m, e, rules))
            });
            if !conflicts {
                found = Some(i);
                break;
            }
        }
        // Every stale block lies before the one found: taking that one first moves none.
        let block = found.and_then(|i| self.prebuilt.ready.remove(i));
        for &i in stale.iter().rev() {
            self.prebuilt.ready.remove(i);
        }
        self.stats.prebuilt_blocks_discarded += stale.len() as u64;
        block
    }

    /// A fresh route back to this client through its gateway, avoiding `avoid`.
    pub(super) fn reply_route<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        avoid: Option<&ConsensusRelay>,
    ) -> crate::Result<ReplyRoute> {
        let (mut hops, relays) = self.mix_route(rng, avoid)?;
        hops.push(self.gateway.route_hop(self.consensus.epoch)?);
        Ok(ReplyRoute { hops, relays })
    }

    /// A reply block that may go to `exit_relay`: from the stock built ahead if one there
    /// fits ([`Self::take_prebuilt_block`], with the `suspects` of now), else built here on a
    /// fresh route. `Ok(None)` if no route can be built now; `Err` if building failed (a
    /// bug).
    pub(super) fn ready_block<R: CryptoRng + ?Sized>(
        &mut self,
        rng: &mut R,
        exit_relay: Option<&ConsensusRelay>,
        suspects: &[IdentityKey],
    ) -> crate::Result<Option<ReadyBlock>> {
        if let Some(ready) = self.take_prebuilt_block(exit_relay, suspects) {
            return Ok(Some(ready));
        }
        let Ok(route) = self.reply_route(rng, exit_relay) else {
            return Ok(None);
        };
        self.build_reply_block(rng, route).map(Some)
    }

    /// A reply block over `route`, built here, with its key and mixes.
    pub(super) fn build_reply_block<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        route: ReplyRoute,
    ) -> crate::Result<ReadyBlock> {
        self.block_job(rng, route).build(rng).ready()
    }

    /// A block taken from the stock and not used after all: back where it was, first.
    pub(super) fn give_back_prebuilt_block(&mut self, ready: ReadyBlock) {
        self.prebuilt.ready.push_front(ready);
    }

    /// The relays suspected now, if the stock built ahead has blocks to check against them
    /// (a route built now avoids them by itself).
    pub(super) fn suspects_for_stock(&self) -> Vec<IdentityKey> {
        if self.prebuilt.ready.is_empty() {
            Vec::new()
        } else {
            self.suspected()
        }
    }

    /// Up to `want` (at most [`BLOCKS_PER_UNACKNOWLEDGED`]) fresh reply blocks for exit session `exit`, fitting in
    /// `room` bytes of a message; their keys are kept. Fewer if routes cannot be built now.
    pub(super) fn issue_reply_blocks<R: CryptoRng + ?Sized>(
        &mut self,
        exit: ExitRef,
        want: usize,
        room: usize,
        now: Instant,
        rng: &mut R,
    ) -> Vec<ReplyBlock> {
        let Some(session) = self.exits.get(&exit) else {
            return Vec::new();
        };
        let exit_relay = self.consensus.relay(&session.exit).cloned();
        // For the stock's blocks; its routes avoided the suspects of when they were built.
        let suspects = self.suspects_for_stock();
        let mut blocks = Vec::new();
        for _ in 0..want.min(BLOCKS_PER_UNACKNOWLEDGED) {
            if surbs_item_len(blocks.len() + 1) > room {
                break;
            }
            let ready = match self.ready_block(rng, exit_relay.as_ref(), &suspects) {
                Ok(Some(ready)) => ready,
                Ok(None) => break,
                Err(_) => {
                    self.stats.bugs += 1;
                    break;
                }
            };
            let id = ready.key.surb_id();
            self.reply_keys.insert(
                id,
                ReplyKeyEntry {
                    key: ready.key,
                    exit,
                    relays: ready.relays,
                },
            );
            blocks.push(ready.block);
            self.remember_reply_id(exit, id);
        }
        if let Some(e) = self.exits.get_mut(&exit)
            && !blocks.is_empty()
        {
            e.surbs_at_exit += blocks.len();
            self.stats.reply_blocks_sent += blocks.len() as u64;
            e.last_topup = now;
        }
        blocks
    }

    /// Records block `id` as handed to `exit`, forgetting the keys of its oldest blocks past
    /// [`max_reply_keys`]. An exit that stays silent while its streams are open is topped up
    /// every `reply_timeout`: without the bound its keys would pile up for ever.
    fn remember_reply_id(&mut self, exit: ExitRef, id: crate::packet::SurbId) {
        let total_cap = self.config.max_exit_sessions * max_reply_keys(self.config.surbs_target);
        let Some(e) = self.exits.get_mut(&exit) else {
            return;
        };
        let cap = max_reply_keys(e.stock_target);
        e.reply_ids.push_back(id);
        while e.reply_ids.len() > cap
            || (self.reply_keys.len() > total_cap && e.reply_ids.len() > 1)
        {
            if let Some(old) = e.reply_ids.pop_front()
                && self.reply_keys.remove(&old).is_some()
            {
                self.stats.reply_keys_expired += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    use super::*;
    use crate::directory::synthetic::{SyntheticNetwork, generate};
    use crate::directory::{Consensus, NetworkParams};
    use crate::session::SessionConfig;
    use crate::stream::Target;

    /// A session over a synthetic network of `mixes_per_layer` mixes a layer and one exit,
    /// whose first layer-1 mix and exit declare one family (`relate`), and that mix.
    fn session(relate: bool) -> (ClientSession, IdentityKey, ChaCha20Rng) {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let shape = SyntheticNetwork {
            mixes_per_layer: 2,
            gateways: 1,
            exits: 1,
            params: NetworkParams::nym_like(),
            epoch: 3,
        };
        let (mut consensus, _): (Consensus, _) = generate(&mut rng, &shape);
        let mix = consensus
            .relays
            .iter()
            .find(|r| r.roles.mix && r.layer == Some(1))
            .map(|r| r.identity)
            .unwrap();
        let exit = consensus
            .relays
            .iter()
            .find(|r| r.roles.exit)
            .map(|r| r.identity)
            .unwrap();
        if relate {
            for r in &mut consensus.relays {
                if r.identity == mix {
                    r.family_members.push(exit);
                } else if r.identity == exit {
                    r.family_members.push(mix);
                }
            }
        }
        let gateway = consensus
            .relays
            .iter()
            .find(|r| r.roles.gateway)
            .map(|r| r.identity)
            .unwrap();
        let session = ClientSession::new(
            SessionConfig::new(Address([9; crate::ADDRESS_LEN])),
            Arc::new(consensus),
            gateway,
            Instant::ZERO,
            &mut rng,
        )
        .unwrap();
        (session, mix, rng)
    }

    /// Runs every job the session wants, inline, as the client's workers would.
    fn build_all(session: &mut ClientSession, rng: &mut ChaCha20Rng) -> usize {
        let mut n = 0;
        while let Some(job) = session.poll_block_job(rng) {
            let built = job.build(rng);
            session.handle_built_block(built);
            n += 1;
        }
        n
    }

    /// The stock holds what was asked for and no more, counting the jobs out.
    #[test]
    fn the_stock_is_bounded_with_the_jobs_out() {
        let (mut s, _, mut rng) = session(false);
        assert!(s.poll_block_job(&mut rng).is_none(), "off by default");
        s.prebuild_reply_blocks(6);
        let out: Vec<_> = std::iter::from_fn(|| s.poll_block_job(&mut rng)).collect();
        assert_eq!(out.len(), 6, "jobs out count against the stock");
        s.block_job_lost();
        assert!(
            s.poll_block_job(&mut rng).is_some(),
            "a lost job is replaced"
        );
        for job in out.into_iter().skip(1) {
            s.handle_built_block(job.build(&mut rng));
        }
        assert_eq!(s.prebuilt.ready.len(), 5);
        s.prebuild_reply_blocks(2);
        assert_eq!(s.prebuilt.ready.len(), 2, "shrinking drops the excess");
        assert_eq!(s.state_size().prebuilt_blocks, 2);
    }

    /// A block built ahead goes only to an exit none of its mixes shares a family with (a
    /// route built for that exit would avoid them); the others stay in stock for another.
    #[test]
    fn a_prebuilt_block_never_goes_to_an_exit_of_its_mixes_family() {
        let (mut s, related_mix, mut rng) = session(true);
        s.prebuild_reply_blocks(32);
        assert_eq!(build_all(&mut s, &mut rng), 32);
        let through_mix = |s: &ClientSession| {
            s.prebuilt
                .ready
                .iter()
                .filter(|b| b.relays.contains(&related_mix))
                .count()
        };
        // Two mixes a layer: about half the blocks go through the related one.
        let related = through_mix(&s);
        assert!(related > 4 && related < 28, "{related}");
        s.open_stream(Target::Host("example.com".into(), 80), None, &mut rng)
            .unwrap();
        let exit = *s.exits.keys().next().unwrap();
        let mut handed = 0;
        for _ in 0..8 {
            handed += s
                .issue_reply_blocks(
                    exit,
                    BLOCKS_PER_MESSAGE,
                    usize::MAX,
                    Instant::ZERO,
                    &mut rng,
                )
                .len();
        }
        assert_eq!(handed, 32);
        for key in s.reply_keys.values() {
            assert!(!key.relays.contains(&related_mix), "{:?}", key.relays);
        }
        assert_eq!(through_mix(&s), related, "kept for another exit");
        assert_eq!(s.stats.prebuilt_blocks_discarded, 0);
    }

    /// Blocks are built for one epoch's keys: a new epoch empties the stock, and a block
    /// built for the old one after the change is thrown away, not handed out.
    #[test]
    fn a_new_epoch_empties_the_stock() {
        let (mut s, _, mut rng) = session(false);
        s.prebuild_reply_blocks(4);
        build_all(&mut s, &mut rng);
        s.prebuild_reply_blocks(5);
        let late = s.poll_block_job(&mut rng).unwrap();
        let mut next = (*s.consensus).clone();
        next.epoch += 1;
        s.set_consensus(Arc::new(next), Instant::ZERO, &mut rng)
            .unwrap();
        assert!(s.prebuilt.ready.is_empty());
        s.handle_built_block(late.build(&mut rng));
        assert!(s.prebuilt.ready.is_empty());
        assert_eq!(s.stats.prebuilt_blocks_discarded, 5);
        assert_eq!(s.stats.reply_blocks_prebuilt, 4);
    }

    /// Messages sent without a SURB-ACK leave their blocks counted on the way to the exit for
    /// about a round trip, and no more than `MAX_UNACKNOWLEDGED_IN_FLIGHT` of them per exit
    /// session: a client sending faster than its round trip drains keeps a bounded record.
    #[test]
    fn blocks_sent_without_an_ack_are_counted_for_a_round_trip_and_bounded() {
        use crate::fragment::Fragment;
        use crate::session::arq::Outgoing;
        use crate::session::exits::MAX_UNACKNOWLEDGED_IN_FLIGHT;

        let (mut s, _, mut rng) = session(false);
        s.open_stream(Target::Host("example.com".into(), 80), None, &mut rng)
            .unwrap();
        let exit = *s.exits.keys().next().unwrap();
        let sends = MAX_UNACKNOWLEDGED_IN_FLIGHT + 20;
        for i in 0..sends {
            let out = Outgoing {
                exit,
                fragment: Fragment {
                    message_id: i as u64,
                    index: 0,
                    count: 1,
                    data: vec![0; 64],
                },
                streams: Vec::new(),
                reply_blocks: 2,
                attempts: 0,
                acknowledged: false,
            };
            assert!(s.transmit(Instant::ZERO, &mut rng, out).is_ok());
        }
        assert_eq!(s.stats.unacknowledged_sent, sends as u64);
        assert!(s.pending.is_empty(), "nothing waits for an ack");
        assert_eq!(
            s.exits[&exit].unacknowledged_blocks.len(),
            MAX_UNACKNOWLEDGED_IN_FLIGHT
        );
        assert_eq!(
            s.reply_blocks_in_flight(exit),
            2 * MAX_UNACKNOWLEDGED_IN_FLIGHT
        );
        // A minute on, every one of them has had its round trip: none counts, none is kept.
        s.observe(Instant::ZERO + std::time::Duration::from_secs(60));
        assert_eq!(s.reply_blocks_in_flight(exit), 0);
        assert!(s.exits[&exit].unacknowledged_blocks.is_empty());
    }
}
