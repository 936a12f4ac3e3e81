//! Composing: one message for an exit session, filling one packet, from what its streams have
//! waiting: resets of abandoned streams, opens (and opens whose answer is overdue), acks of
//! the exit's data, reply blocks, data within each stream's window, and ends of data.
//!
//! Composing cannot fail: what it takes from the streams is in the message it returns, and
//! from there the ARQ answers for it ([`super::arq`]).
//!
//! A message of reply blocks, stream acks and gap reports alone goes without a SURB-ACK and
//! is never re-sent: each of those is said again if it is lost (the exit reports its stock
//! with every reply, which corrects the count believed there; an ack is repeated in every
//! later message until one that is acknowledged carries it; a gap is reported again each
//! `gap_grace` while it lasts). Such a message fills the whole packet, with one block more
//! than room beside a SURB-ACK leaves, and spares the client a block's build and the network
//! the acknowledgement's way back. In a download nearly every upstream packet is one.

use std::time::Duration;

use rand::CryptoRng;

use super::ClientSession;
use super::exits::ExitRef;
use super::reply_blocks::BLOCKS_PER_UNACKNOWLEDGED;
use super::streams::{Gap, StreamState};
use crate::payload::{FORWARD_FRAGMENT_DATA_LEN, REPLY_FRAGMENT_DATA_LEN};
use crate::stream::{
    CLIENT_MESSAGE_OVERHEAD, ClientItem, ClientMessage, DATA_ITEM_OVERHEAD, MAX_RECEIVED_RANGES,
    StreamId, received_item_len, surbs_item_len,
};
use crate::time::Instant;

/// Reply blocks kept at an exit while data waits to go up: enough for its acks over a round
/// trip (it acks once per timeout per stream, a few times), not for a download.
const UPLOAD_STOCK: usize = 12;

/// A message's room in a packet without a SURB-ACK.
const UNACKNOWLEDGED_BUDGET: usize = REPLY_FRAGMENT_DATA_LEN - CLIENT_MESSAGE_OVERHEAD;

/// Encoded sizes of the fixed-size items.
const RESET_ITEM_LEN: usize = 5;
const OFFSET_ITEM_LEN: usize = 13;

/// The shortest wait before a gap in the exit's data is announced, whatever the delays.
const MIN_GAP_GRACE: Duration = Duration::from_millis(5);

/// A composed message: what it says, the streams whose data or state it carries (they fail
/// if it is never acknowledged), and whether it goes with a SURB-ACK.
pub(super) struct Composed {
    pub(super) message: ClientMessage,
    pub(super) streams: Vec<StreamId>,
    pub(super) acknowledged: bool,
}

impl ClientSession {
    /// How long a gap in the exit's data may last before it is announced: a reply's mean
    /// delay through its three mixes, by when most replies that overtook others are matched
    /// by the ones they overtook.
    fn gap_grace(&self) -> Duration {
        (self.delay.mean() * 3).max(MIN_GAP_GRACE)
    }

    /// One message for exit session `exit`, or `None` if nothing waits.
    pub(super) fn compose<R: CryptoRng + ?Sized>(
        &mut self,
        exit: ExitRef,
        now: Instant,
        rng: &mut R,
    ) -> Option<Composed> {
        let budget = FORWARD_FRAGMENT_DATA_LEN - CLIENT_MESSAGE_OVERHEAD;
        // Acks this message carries, with what was acked before: one without a SURB-ACK
        // leaves them to be said again.
        let mut acks_here = Vec::new();
        // Announced with each open: the exit grants at most this.
        let own_window = u32::try_from(self.stream_window()).unwrap_or(u32::MAX);
        let mut used = 0;
        let mut items = Vec::new();
        let mut carried = Vec::new();
        let session = self.exits.get(&exit)?;
        let session_id = session.id;
        let stream_ids = session.streams.clone();
        // Resets of aborted streams.
        let mut keep = std::collections::VecDeque::new();
        while let Some((e, stream)) = self.aborted.pop_front() {
            if e == exit && used + RESET_ITEM_LEN <= budget {
                items.push(ClientItem::Reset { stream });
                used += RESET_ITEM_LEN;
            } else {
                keep.push_back((e, stream));
            }
        }
        self.aborted = keep;
        let mut wants_surbs = false;
        let mut reopened = false;
        let reply_timeout = self.config.reply_timeout;
        let gap_grace = self.gap_grace();
        // Streams whose open this message carries: their data may ride with it. A stream's
        // later data waits until the exit answered the open, since a message can overtake
        // an earlier one on another route, and an exit cannot place data for a stream it has
        // not opened (it drops it, its packet acknowledged: the data would be lost).
        let mut opening_here = Vec::new();
        for &id in &stream_ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            let unanswered = s.state == StreamState::Opening
                && s.open_sent
                && now.saturating_duration_since(s.open_sent_at) >= reply_timeout;
            if !s.open_sent || unanswered {
                let item = ClientItem::Open {
                    stream: id,
                    target: s.target.clone(),
                    window: own_window,
                };
                if used + item.encoded_len() > budget {
                    break;
                }
                used += item.encoded_len();
                items.push(item);
                s.open_sent = true;
                s.open_sent_at = now;
                carried.push(id);
                opening_here.push(id);
                wants_surbs = true;
                // Its reply blocks may have been spent on the lost answer.
                reopened |= unanswered;
            }
            let consumed = s.recv.delivered() - s.unconsumed;
            let ack = consumed + u64::from(s.recv.is_finished() && s.unconsumed == 0);
            if ack > s.acked_sent && used + OFFSET_ITEM_LEN <= budget {
                items.push(ClientItem::Ack {
                    stream: id,
                    offset: ack,
                });
                used += OFFSET_ITEM_LEN;
                acks_here.push((id, s.acked_sent));
                s.acked_sent = ack;
            }
            // A gap that outlasts the reordering of replies is announced, with what is held
            // beyond the ack, and again each `gap_grace` while it lasts (what arrived since
            // must not time out at the exit): the exit then re-sends only what is missing,
            // not everything after it. Replies overtake one another all the time (each takes
            // its own route and delays), and most gaps fill within `gap_grace`; announcing
            // each would cost a reply block's room in most packets of a download.
            if s.recv.pending_bytes() == 0 {
                s.gap = None;
            } else {
                let at = s.recv.delivered();
                let mut gap = match s.gap {
                    Some(g) if g.at == at => g,
                    _ => Gap {
                        at,
                        waiting_since: now,
                    },
                };
                if now.saturating_duration_since(gap.waiting_since) >= gap_grace {
                    let ranges = s.recv.held_ranges(ack, MAX_RECEIVED_RANGES);
                    if used + received_item_len(ranges.len()) <= budget {
                        used += received_item_len(ranges.len());
                        gap.waiting_since = now;
                        items.push(ClientItem::Received { stream: id, ranges });
                    }
                }
                s.gap = Some(gap);
            }
            if s.state == StreamState::Open || !s.outbox.is_empty() {
                wants_surbs = true;
            }
        }
        // Reply blocks: keep the exit stocked while it has streams, and top up an exit that
        // went quiet with streams still open.
        let active = stream_ids
            .iter()
            .any(|id| self.streams.get(id).is_some_and(|s| !s.eof_reported));
        let session = self.exits.get_mut(&exit)?;
        if reopened {
            session.surbs_at_exit = 0;
        }
        let quiet = active
            && now.saturating_duration_since(session.last_heard) >= reply_timeout
            && now.saturating_duration_since(session.last_topup) >= reply_timeout;
        let stocked = if quiet { 0 } else { session.surbs_at_exit };
        // While data waits to go up, a small stock serves the exit's acks, and the packet's
        // room goes to the data: each block costs 400 bytes of upload.
        let uploading = stream_ids.iter().any(|id| {
            self.streams
                .get(id)
                .is_some_and(|s| !s.outbox.is_empty() && s.send_room() > 0)
        });
        let target = if stream_ids.is_empty() {
            0
        } else if uploading {
            session.stock_target.min(UPLOAD_STOCK)
        } else {
            session.stock_target
        };
        let mut blocks = Vec::new();
        let mut want = 0;
        if (wants_surbs || quiet) && stocked < target {
            // A packet that tops the exit up carries as many blocks as fit, not only the
            // shortfall: in a download the shortfall is mostly a block or two, and a packet
            // with fewer than it could carry wastes its tick's reply capacity (the download's
            // λ_P bound counts a full packet of blocks per tick). While data waits to go up,
            // the room is the data's.
            want = if uploading {
                target - stocked
            } else {
                (target - stocked).max(BLOCKS_PER_UNACKNOWLEDGED)
            };
            blocks = self.issue_reply_blocks(exit, want, budget - used, now, rng);
            if !blocks.is_empty() {
                used += surbs_item_len(blocks.len());
            }
        }
        // Data within each stream's window, then ends of data.
        for &id in &stream_ids {
            let Some(s) = self.streams.get_mut(&id) else {
                continue;
            };
            if s.state != StreamState::Open && !opening_here.contains(&id) {
                continue;
            }
            let room = budget.saturating_sub(used + DATA_ITEM_OVERHEAD);
            let take = s.outbox.len().min(room).min(s.send_room());
            if take > 0 {
                let bytes: Vec<u8> = s.outbox.drain(..take).collect();
                items.push(ClientItem::Data {
                    stream: id,
                    offset: s.sent,
                    bytes,
                });
                used += DATA_ITEM_OVERHEAD + take;
                s.sent += take as u64;
                carried.push(id);
            }
            if s.app_closed
                && s.outbox.is_empty()
                && !s.fin_sent
                && used + OFFSET_ITEM_LEN <= budget
            {
                items.push(ClientItem::Fin {
                    stream: id,
                    offset: s.sent,
                });
                used += OFFSET_ITEM_LEN;
                s.fin_sent = true;
                carried.push(id);
            }
        }
        let acknowledged = blocks.is_empty()
            || items
                .iter()
                .any(|item| !matches!(item, ClientItem::Ack { .. } | ClientItem::Received { .. }));
        if !acknowledged {
            for (id, before) in acks_here {
                if let Some(s) = self.streams.get_mut(&id) {
                    s.acked_sent = before;
                }
            }
            // The SURB-ACK's room: blocks up to the whole packet's budget.
            let others = used - surbs_item_len(blocks.len());
            let fit = (0..=BLOCKS_PER_UNACKNOWLEDGED)
                .rev()
                .find(|&n| others + surbs_item_len(n) <= UNACKNOWLEDGED_BUDGET)
                .unwrap_or(0);
            let more = fit.min(want).saturating_sub(blocks.len());
            if more > 0 {
                let extra = self.issue_reply_blocks(exit, more, usize::MAX, now, rng);
                blocks.extend(extra);
            }
        }
        if !blocks.is_empty() {
            items.push(ClientItem::Surbs(blocks));
        }
        let finished: Vec<StreamId> = stream_ids
            .iter()
            .copied()
            .filter(|id| self.streams.get(id).is_some_and(|s| s.finished()))
            .collect();
        for id in finished {
            self.end_stream(id);
        }
        if items.is_empty() {
            return None;
        }
        if let Some(e) = self.exits.get_mut(&exit) {
            e.last_active = now;
        }
        carried.sort_unstable();
        carried.dedup();
        Some(Composed {
            message: ClientMessage {
                session: session_id,
                items,
            },
            streams: carried,
            acknowledged,
        })
    }
}
