//! What the gateway delivers: acknowledgements of the session's packets, the exits' replies,
//! and its own loops coming back. Junk and repeats are counted and cost nothing.

use rand::CryptoRng;

use super::exits::ExitRef;
use super::reply_blocks::{BLOCKS_PER_MESSAGE, max_reply_keys};
use super::streams::StreamState;
use super::{ClientSession, Event, StreamId};
use crate::packet::SurbId;
use crate::payload::Content;
use crate::stream::{ExitItem, ExitMessage};
use crate::time::Instant;

/// Delivered identifiers remembered against repeats.
pub const RECENT_DELIVERIES: usize = 4096;

impl ClientSession {
    /// Takes a delivery from the gateway.
    ///
    /// Takes `rng` because a delivery may make a payment to the gateway due (sent by the
    /// next [`ClientSession::poll_transmit`]).
    pub fn handle_delivery<R: CryptoRng + ?Sized>(
        &mut self,
        surb_id: SurbId,
        payload: &[u8],
        now: Instant,
        rng: &mut R,
    ) {
        if !self.admit_delivery(surb_id, now, rng) {
            return;
        }
        if let Some(p) = self.pending.get(&surb_id) {
            let is_ack = matches!(
                p.key.open(payload).and_then(|b| Content::decode(&b)),
                Ok(Content::Ack)
            );
            if !is_ack {
                // Not a valid ack: keep waiting for the real one.
                self.stats.bad_replies += 1;
                return;
            }
            if let Some(p) = self.take_pending(&surb_id) {
                self.acknowledged(&p);
                self.carried(&p.ack_relays);
            }
            return;
        }
        if let Some(entry) = self.reply_keys.remove(&surb_id) {
            self.stats.replies += 1;
            self.carried(&entry.relays);
            if let Some(e) = self.exits.get_mut(&entry.exit) {
                // One block fewer at the exit. The exit spends its newest blocks first, so
                // which block came back says nothing about the older ones: a lost reply keeps
                // the estimate high until the exit's `SurbsHeld` says how many it has, or its
                // silence brings a top-up (`compose`).
                e.surbs_at_exit = e.surbs_at_exit.saturating_sub(1);
                e.last_heard = now;
                e.last_active = now;
            }
            // Anything but one whole exit message is a bad reply.
            let message = entry
                .key
                .open(payload)
                .and_then(|b| Content::decode(&b))
                .ok()
                .and_then(|c| match c {
                    Content::Data { fragment } if fragment.count == 1 => {
                        ExitMessage::decode(&fragment.data).ok()
                    }
                    _ => None,
                });
            match message {
                Some(m) => self.exit_message(entry.exit, m),
                None => self.stats.bad_replies += 1,
            }
            return;
        }
        if self.loops.remove(&surb_id).is_some() {
            self.stats.loops_returned += 1;
            return;
        }
        self.stats.unknown_deliveries += 1;
    }

    /// A delivery the driver could not hand over (its queue to the session was full). The
    /// gateway charged for it, so it is paid for as if it had been taken, if it was this
    /// client's own and not a repeat: otherwise the gateway's tab would run ahead of the
    /// payer for good, and enough drops would get an honest client cut off. What it carried
    /// is lost; the session's timeouts recover it as they would a loss in the network.
    pub fn delivery_dropped<R: CryptoRng + ?Sized>(
        &mut self,
        surb_id: SurbId,
        now: Instant,
        rng: &mut R,
    ) {
        if self.admit_delivery(surb_id, now, rng) {
            self.stats.dropped_deliveries_paid += 1;
        }
    }

    /// Whether a delivery is this client's own and new; if so it is remembered against
    /// repeats and counted for the gateway (which charged for it).
    fn admit_delivery<R: CryptoRng + ?Sized>(
        &mut self,
        surb_id: SurbId,
        now: Instant,
        rng: &mut R,
    ) -> bool {
        self.observe(now);
        // Paid for only if it is this client's own (its tag verifies, or without tags it is
        // outstanding) and not a repeat: junk addressed to the client costs it nothing.
        let own = match &self.config.delivery_tags {
            Some(tags) => tags.is_mine(&surb_id),
            None => {
                self.pending.contains_key(&surb_id)
                    || self.reply_keys.contains_key(&surb_id)
                    || self.loops.contains_key(&surb_id)
            }
        };
        if !own {
            self.stats.foreign_deliveries += 1;
            return false;
        }
        if !self.recent_set.insert(surb_id) {
            self.stats.duplicate_deliveries += 1;
            return false;
        }
        self.recent_deliveries.push_back(surb_id);
        if self.recent_deliveries.len() > RECENT_DELIVERIES
            && let Some(old) = self.recent_deliveries.pop_front()
        {
            self.recent_set.remove(&old);
        }
        self.gateway_frame(now, rng);
        true
    }

    fn exit_message(&mut self, exit: ExitRef, message: ExitMessage) {
        for item in message.items {
            match item {
                ExitItem::Opened { stream, window } => {
                    self.window_granted(exit, stream, window);
                    self.opened(exit, stream);
                }
                ExitItem::Refused { stream, reason } => {
                    if self.stream_of(exit, stream).is_some() {
                        self.end_stream(stream);
                        self.events
                            .push_back(Event::Refused(stream, reason.socks_code()));
                    }
                }
                ExitItem::Reset { stream, reason } => {
                    if self.stream_of(exit, stream).is_some() {
                        self.end_stream(stream);
                        self.events
                            .push_back(Event::Reset(stream, reason.socks_code()));
                    }
                }
                ExitItem::Data {
                    stream,
                    offset,
                    bytes,
                } => {
                    self.opened(exit, stream);
                    let Some(s) = self.stream_of(exit, stream) else {
                        continue;
                    };
                    if let Ok(ready) = s.recv.insert(offset, &bytes)
                        && !ready.is_empty()
                    {
                        s.unconsumed += ready.len() as u64;
                        self.events.push_back(Event::Data(stream, ready));
                    }
                    self.maybe_eof(stream);
                }
                ExitItem::Fin { stream, offset } => {
                    self.opened(exit, stream);
                    if let Some(s) = self.stream_of(exit, stream) {
                        let _ = s.recv.finish_at(offset);
                    }
                    self.maybe_eof(stream);
                }
                // Not an open: the exit takes data for a stream it is still connecting.
                ExitItem::Ack { stream, offset } => self.exit_acked(exit, stream, offset),
                ExitItem::SurbsHeld { have } => self.exit_holds(exit, usize::from(have)),
            }
        }
    }

    /// The exit said it holds `have` reply blocks. The count of blocks believed there is cut
    /// to that and what is on its way (so lost replies do not leave it high for ever), and
    /// the stock to keep grows while the exit runs dry, shrinks while it holds more than
    /// half of it.
    fn exit_holds(&mut self, exit: ExitRef, have: usize) {
        let on_the_way = self.reply_blocks_in_flight(exit);
        let (floor, ceiling) = (self.config.surbs_target, self.config.max_surbs_target);
        // Growth stops where the session's keys would pass the bound they had before
        // stocks grew (see `reply_blocks`).
        let room = self.reply_keys.len() + BLOCKS_PER_MESSAGE
            <= self.config.max_exit_sessions * max_reply_keys(floor);
        let Some(e) = self.exits.get_mut(&exit) else {
            return;
        };
        // Messages acknowledged since the exit said this may have brought it more: the cut
        // errs low by at most those, and a few blocks too many cost less than a stall.
        e.surbs_at_exit = e.surbs_at_exit.min(have + on_the_way);
        if have == 0 && room {
            e.stock_target = (e.stock_target + BLOCKS_PER_MESSAGE).min(ceiling.max(floor));
        } else if have * 2 > e.stock_target {
            e.stock_target = e.stock_target.saturating_sub(1).max(floor);
        }
    }

    /// The exit says (or the destination's data or end shows) that `stream` is open.
    /// Replies cross the mixnet on independent paths with independent delays, so the reply
    /// carrying `Opened` may arrive after one carrying the stream's first bytes: the
    /// application hears `Opened` first either way, and once.
    fn opened(&mut self, exit: ExitRef, stream: StreamId) {
        if let Some(s) = self.stream_of(exit, stream)
            && s.state == StreamState::Opening
        {
            s.state = StreamState::Open;
            self.events.push_back(Event::Opened(stream));
        }
    }
}
