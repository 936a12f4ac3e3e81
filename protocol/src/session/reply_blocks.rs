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
use crate::directory::{ConsensusRelay, IdentityKey};
use crate::packet::RouteHop;
use crate::stream::surbs_item_len;
use crate::surb::{ReplyBlock, ReplyKey, build_reply_block_with_id};
use crate::time::Instant;

/// The most reply keys kept for one exit session: four times the blocks it is kept stocked
/// with (at least 16).
pub fn max_reply_keys(surbs_target: usize) -> usize {
    surbs_target.max(4) * 4
}

/// Blocks that fit one packet with room for a stream ack (a `Surbs` item of four is 1,590
/// bytes).
pub const BLOCKS_PER_MESSAGE: usize = 4;

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
pub(super) struct ReplyRoute {
    hops: Vec<RouteHop>,
    pub(super) relays: Vec<IdentityKey>,
}

impl ClientSession {
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

    /// A reply block over `route`; returns the block, its key and the sum of its delays.
    pub(super) fn build_reply_block<R: CryptoRng + ?Sized>(
        &self,
        rng: &mut R,
        route: &ReplyRoute,
    ) -> crate::Result<(ReplyBlock, ReplyKey, Duration)> {
        let delays = self.delay.sample_n(rng, route.hops.len());
        let total = delays[..delays.len() - 1].iter().sum();
        let id = self.mint_surb_id(rng);
        let (block, key) = build_reply_block_with_id(
            rng,
            &route.hops,
            &delays,
            self.config.address,
            self.consensus.epoch,
            id,
        )?;
        Ok((block, key, total))
    }

    /// Up to `want` (at most four) fresh reply blocks for exit session `exit`, fitting in
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
        let mut blocks = Vec::new();
        for _ in 0..want.min(BLOCKS_PER_MESSAGE) {
            if surbs_item_len(blocks.len() + 1) > room {
                break;
            }
            let Ok(route) = self.reply_route(rng, exit_relay.as_ref()) else {
                break;
            };
            let Ok((block, key, _)) = self.build_reply_block(rng, &route) else {
                self.stats.bugs += 1;
                break;
            };
            let id = key.surb_id();
            self.reply_keys.insert(
                id,
                ReplyKeyEntry {
                    key,
                    exit,
                    relays: route.relays,
                },
            );
            blocks.push(block);
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
