//! A gateway's inboxes: deliveries for a client that is briefly away.
//!
//! Anyone can send packets whose last hop is a gateway and whose destination is any address,
//! so an inbox is kept only for an address that has a live session or had one within
//! `inbox_ttl` (the address is the hash of the key the client proved, see
//! [`murmur_client_link`]); frames for any other address are dropped and counted
//! (`inbox_unknown_address`). What inboxes hold is bounded per address (`inbox_packets`
//! frames, `inbox_bytes`) and in total (`inbox_total_bytes`), and the addresses remembered
//! are bounded too (live sessions are at most `max_clients`; recently ended ones at most as
//! many again, the oldest forgotten first).
//!
//! Sans-IO apart from the metrics: the caller passes `now`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use murmur_protocol::frame::Frame;
use murmur_protocol::packet::Address;

/// The bounds, from the gateway's configuration.
#[derive(Clone, Copy, Debug)]
pub struct InboxLimits {
    /// Frames kept for one address.
    pub frames_per_address: usize,
    /// Bytes kept for one address.
    pub bytes_per_address: usize,
    /// Bytes kept across all addresses.
    pub total_bytes: usize,
    /// Addresses of ended sessions remembered at once.
    pub recent_sessions: usize,
    /// How long after its session ended an address keeps its inbox.
    pub ttl: Duration,
}

/// Why a frame was not kept (the `reason` label of the dropped-packet counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotKept {
    /// No live or recent session has this address.
    UnknownAddress,
    /// The address's inbox is full.
    AddressFull,
    /// All inboxes together are full.
    TotalFull,
}

impl NotKept {
    pub fn label(self) -> &'static str {
        match self {
            NotKept::UnknownAddress => "inbox_unknown_address",
            NotKept::AddressFull => "inbox_full",
            NotKept::TotalFull => "inbox_total_full",
        }
    }
}

/// Whether an address's session is up, or until when its inbox is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Known {
    /// Up, as the session of this generation.
    Live(u64),
    EndedUntil(Instant),
}

#[derive(Default)]
struct Inbox {
    frames: VecDeque<Frame>,
    bytes: usize,
}

/// The inboxes of one gateway.
pub struct Inboxes {
    limits: InboxLimits,
    known: HashMap<Address, Known>,
    /// Ended sessions in the order they ended (entries may be stale: checked against `known`).
    ended: VecDeque<(Instant, Address)>,
    /// Addresses in `known` whose session ended.
    recent: usize,
    boxes: HashMap<Address, Inbox>,
    total_bytes: usize,
}

/// Bytes one frame takes in an inbox.
fn frame_bytes(frame: &Frame) -> usize {
    match frame {
        Frame::Deliver { payload, .. } => murmur_protocol::SURB_ID_LEN + payload.len(),
        _ => murmur_protocol::frame::FRAME_LEN,
    }
}

impl Inboxes {
    pub fn new(limits: InboxLimits) -> Inboxes {
        Inboxes {
            limits,
            known: HashMap::new(),
            ended: VecDeque::new(),
            recent: 0,
            boxes: HashMap::new(),
            total_bytes: 0,
        }
    }

    /// Session `generation` for `address` is up (its key was proven): what waited for it,
    /// oldest first.
    pub fn session_started(&mut self, address: Address, generation: u64) -> VecDeque<Frame> {
        self.set_known(address, Some(Known::Live(generation)));
        self.take(address)
    }

    /// Records what is known of `address` (`None`: forgotten), keeping `recent` exact.
    fn set_known(&mut self, address: Address, known: Option<Known>) {
        let was = match known {
            Some(k) => self.known.insert(address, k),
            None => self.known.remove(&address),
        };
        let ended = |k: Option<Known>| matches!(k, Some(Known::EndedUntil(_)));
        match (ended(was), ended(known)) {
            (false, true) => self.recent += 1,
            (true, false) => self.recent -= 1,
            _ => {}
        }
    }

    /// Session `generation` for `address` ended at `now`: deliveries are kept for it until
    /// `ttl` passes (unless a newer session for it is up). Forgets the oldest ended session
    /// if too many are remembered.
    pub fn session_ended(&mut self, address: Address, generation: u64, now: Instant) {
        if self
            .known
            .get(&address)
            .is_some_and(|k| *k != Known::Live(generation))
        {
            return;
        }
        let until = now + self.limits.ttl;
        self.set_known(address, Some(Known::EndedUntil(until)));
        self.ended.push_back((until, address));
        while self.recent > self.limits.recent_sessions {
            let Some((at, oldest)) = self.ended.pop_front() else {
                break;
            };
            if self.known.get(&oldest) == Some(&Known::EndedUntil(at)) {
                self.forget(oldest);
            }
        }
    }

    /// Keeps `frame` for `address` if a live or recent session has it and the bounds allow.
    pub fn keep(&mut self, address: Address, frame: Frame, now: Instant) -> Result<(), NotKept> {
        match self.known.get(&address) {
            Some(Known::Live(_)) => {}
            Some(Known::EndedUntil(until)) if *until > now => {}
            _ => return Err(NotKept::UnknownAddress),
        }
        let len = frame_bytes(&frame);
        let inbox = self.boxes.entry(address).or_default();
        if inbox.frames.len() >= self.limits.frames_per_address
            || inbox.bytes + len > self.limits.bytes_per_address
        {
            return Err(NotKept::AddressFull);
        }
        if self.total_bytes + len > self.limits.total_bytes {
            if inbox.frames.is_empty() {
                self.boxes.remove(&address);
            }
            return Err(NotKept::TotalFull);
        }
        inbox.frames.push_back(frame);
        inbox.bytes += len;
        self.total_bytes += len;
        Ok(())
    }

    /// Takes what waits for `address`.
    fn take(&mut self, address: Address) -> VecDeque<Frame> {
        match self.boxes.remove(&address) {
            Some(inbox) => {
                self.total_bytes -= inbox.bytes;
                inbox.frames
            }
            None => VecDeque::new(),
        }
    }

    fn forget(&mut self, address: Address) -> usize {
        self.set_known(address, None);
        self.take(address).len()
    }

    /// Forgets the addresses whose sessions ended more than `ttl` ago, with their inboxes;
    /// returns how many frames were dropped.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let mut dropped = 0;
        while let Some(&(until, address)) = self.ended.front() {
            if until > now {
                break;
            }
            self.ended.pop_front();
            if self.known.get(&address) == Some(&Known::EndedUntil(until)) {
                dropped += self.forget(address);
            }
        }
        // Stale entries (the address came back) leave the queue as they reach its front; a
        // queue far longer than what it tracks is compacted.
        if self.ended.len() > 2 * self.limits.recent_sessions.max(16) {
            let known = &self.known;
            self.ended
                .retain(|(at, a)| known.get(a) == Some(&Known::EndedUntil(*at)));
        }
        dropped
    }

    /// Frames held, and their bytes.
    pub fn held(&self) -> (usize, usize) {
        (
            self.boxes.values().map(|i| i.frames.len()).sum(),
            self.total_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use murmur_protocol::PAYLOAD_SIZE;

    use super::*;

    fn frame(id: u8) -> Frame {
        Frame::Deliver {
            surb_id: [id; 16],
            payload: Box::new([id; PAYLOAD_SIZE]),
        }
    }

    fn limits() -> InboxLimits {
        InboxLimits {
            frames_per_address: 3,
            bytes_per_address: 10 * PAYLOAD_SIZE,
            total_bytes: 5 * (PAYLOAD_SIZE + 16),
            recent_sessions: 2,
            ttl: Duration::from_secs(10),
        }
    }

    #[test]
    fn only_live_or_recent_sessions_get_an_inbox() {
        let mut inboxes = Inboxes::new(limits());
        let t0 = Instant::now();
        let (a, b, stranger) = (Address([1; 32]), Address([2; 32]), Address([9; 32]));
        assert_eq!(
            inboxes.keep(stranger, frame(0), t0),
            Err(NotKept::UnknownAddress)
        );
        assert!(inboxes.session_started(a, 1).is_empty());
        inboxes.session_ended(a, 1, t0);
        inboxes.keep(a, frame(1), t0).unwrap();
        inboxes.keep(a, frame(2), t0).unwrap();
        inboxes.keep(a, frame(3), t0).unwrap();
        assert_eq!(inboxes.keep(a, frame(4), t0), Err(NotKept::AddressFull));
        // The client comes back: it gets its frames in order.
        let waiting: Vec<_> = inboxes.session_started(a, 1).into_iter().collect();
        assert_eq!(waiting, vec![frame(1), frame(2), frame(3)]);
        assert_eq!(inboxes.held(), (0, 0));
        // Past the ttl an ended session's address is unknown again.
        inboxes.session_started(b, 2);
        inboxes.session_ended(b, 1, t0);
        assert!(
            inboxes
                .keep(b, frame(5), t0 + Duration::from_secs(60))
                .is_ok(),
            "still live"
        );
        inboxes.session_ended(b, 2, t0);
        inboxes.keep(b, frame(5), t0).unwrap();
        let later = t0 + Duration::from_secs(10);
        assert_eq!(inboxes.sweep(later), 2);
        assert_eq!(
            inboxes.keep(b, frame(6), later),
            Err(NotKept::UnknownAddress)
        );
        assert_eq!(inboxes.held(), (0, 0));
    }

    #[test]
    fn total_bytes_and_remembered_sessions_are_bounded() {
        let mut inboxes = Inboxes::new(limits());
        let t0 = Instant::now();
        let addresses: Vec<Address> = (0..3).map(|i| Address([i; 32])).collect();
        for &a in &addresses[..2] {
            inboxes.session_started(a, 1);
            for i in 0..3 {
                let _ = inboxes.keep(a, frame(i), t0);
            }
        }
        // Two live sessions: 3 + 2 frames fit the total of 5, the sixth does not.
        assert_eq!(inboxes.held().0, 5);
        assert_eq!(inboxes.held().1, 5 * (PAYLOAD_SIZE + 16));
        // Three sessions end; only the two most recent are remembered.
        for &a in &addresses {
            inboxes.session_ended(a, 1, t0);
        }
        assert_eq!(
            inboxes.keep(addresses[0], frame(7), t0),
            Err(NotKept::UnknownAddress)
        );
        assert_eq!(inboxes.held().0, 2, "the forgotten address's frames went");
        inboxes.keep(addresses[2], frame(8), t0).unwrap();
    }
}
