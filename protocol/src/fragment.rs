//! Messages split into fixed-size packets, and put back together.
//!
//! A message of up to [`MAX_FRAGMENTS`] fragments is cut into pieces that each fit one packet.
//! The [`Reassembler`] accepts fragments in any order, ignores duplicates (also of messages it
//! has already completed, for a while), and gives up on a message when it has seen no new
//! fragment of it for the configured timeout. Its memory is bounded: a fragment that would
//! exceed the bound is refused with [`Error::ReassemblyFull`] and counted by the driver.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Duration;

use crate::time::Instant;
use crate::{Error, Result};

/// Bytes of a fragment's header: message id, index, count.
pub const FRAGMENT_HEADER_LEN: usize = 8 + 2 + 2;

/// The most fragments one message may have.
pub const MAX_FRAGMENTS: u16 = 1024;

/// One piece of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fragment {
    /// Random per message, chosen by the sender.
    pub message_id: u64,
    /// This piece's position, from 0.
    pub index: u16,
    /// How many pieces the message has (1 to [`MAX_FRAGMENTS`]).
    pub count: u16,
    pub data: Vec<u8>,
}

impl Fragment {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        FRAGMENT_HEADER_LEN + self.data.len()
    }

    /// Appends the encoding to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.message_id.to_be_bytes());
        out.extend_from_slice(&self.index.to_be_bytes());
        out.extend_from_slice(&self.count.to_be_bytes());
        out.extend_from_slice(&self.data);
    }

    /// Decodes a fragment that fills all of `bytes` (its data runs to the end).
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < FRAGMENT_HEADER_LEN {
            return Err(Error::Truncated {
                what: "fragment header",
                needed: FRAGMENT_HEADER_LEN,
                got: bytes.len(),
            });
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&bytes[..8]);
        let index = u16::from_be_bytes([bytes[8], bytes[9]]);
        let count = u16::from_be_bytes([bytes[10], bytes[11]]);
        let fragment = Fragment {
            message_id: u64::from_be_bytes(id),
            index,
            count,
            data: bytes[FRAGMENT_HEADER_LEN..].to_vec(),
        };
        fragment.validate()?;
        Ok(fragment)
    }

    fn validate(&self) -> Result<()> {
        let invalid = |reason| Error::FragmentInvalid {
            index: self.index,
            count: self.count,
            reason,
        };
        if self.count == 0 || self.count > MAX_FRAGMENTS {
            return Err(invalid("count out of range"));
        }
        if self.index >= self.count {
            return Err(invalid("index not below count"));
        }
        Ok(())
    }
}

/// The largest message that fits in fragments of `fragment_data_len` bytes.
pub fn max_message_len(fragment_data_len: usize) -> usize {
    fragment_data_len.saturating_mul(usize::from(MAX_FRAGMENTS))
}

/// Cuts `message` into fragments of at most `fragment_data_len` data bytes each.
/// An empty message is one empty fragment.
pub fn split_message(
    message_id: u64,
    message: &[u8],
    fragment_data_len: usize,
) -> Result<Vec<Fragment>> {
    if fragment_data_len == 0 || message.len() > max_message_len(fragment_data_len) {
        return Err(Error::TooLong {
            what: "message",
            len: message.len(),
            max: max_message_len(fragment_data_len),
        });
    }
    let count = message.len().div_ceil(fragment_data_len).max(1);
    let count16 = u16::try_from(count).map_err(|_| Error::TooLong {
        what: "message",
        len: message.len(),
        max: max_message_len(fragment_data_len),
    })?;
    if message.is_empty() {
        return Ok(vec![Fragment {
            message_id,
            index: 0,
            count: 1,
            data: Vec::new(),
        }]);
    }
    Ok(message
        .chunks(fragment_data_len)
        .zip(0u16..)
        .map(|(chunk, index)| Fragment {
            message_id,
            index,
            count: count16,
            data: chunk.to_vec(),
        })
        .collect())
}

/// Bounds on what a [`Reassembler`] holds.
#[derive(Clone, Debug)]
pub struct ReassemblyLimits {
    /// Messages in progress at once.
    pub max_partial_messages: usize,
    /// Data bytes buffered across all messages in progress.
    pub max_buffered_bytes: usize,
    /// Messages in progress for one owner (see [`Reassembler::insert_owned`]).
    pub max_partial_messages_per_owner: usize,
    /// Data bytes buffered for one owner's messages in progress.
    pub max_buffered_bytes_per_owner: usize,
    /// A message with no new fragment for this long is given up.
    pub timeout: Duration,
    /// How many completed message ids are remembered to drop late duplicates.
    pub remember_completed: usize,
}

impl Default for ReassemblyLimits {
    fn default() -> Self {
        ReassemblyLimits {
            max_partial_messages: 4096,
            max_buffered_bytes: 64 << 20,
            max_partial_messages_per_owner: 4096,
            max_buffered_bytes_per_owner: 64 << 20,
            timeout: Duration::from_secs(60),
            remember_completed: 16_384,
        }
    }
}

/// What [`Error::ReassemblyFull`] says when one owner's messages in progress are at their bound.
pub const OWNER_MESSAGES: &str = "owner's messages in progress";
/// What [`Error::ReassemblyFull`] says when one owner's buffered bytes are at their bound.
pub const OWNER_BYTES: &str = "owner's buffered bytes";

/// What a fragment did.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembled {
    /// Stored; the message still misses fragments.
    Pending,
    /// The message is whole.
    Complete { message_id: u64, message: Vec<u8> },
    /// Already had this fragment, or the message was already delivered: ignored.
    Duplicate,
}

struct Partial {
    owner: u64,
    count: u16,
    received: u16,
    pieces: Vec<Option<Vec<u8>>>,
    bytes: usize,
    deadline: Instant,
}

/// Puts messages back together from fragments arriving in any order.
pub struct Reassembler {
    limits: ReassemblyLimits,
    partial: HashMap<u64, Partial>,
    buffered_bytes: usize,
    /// Per owner with a message in progress: (messages, bytes).
    owners: HashMap<u64, (usize, usize)>,
    /// One entry per message in progress; an entry whose message has since made progress is
    /// pushed back with its new deadline when it surfaces.
    deadlines: BinaryHeap<Reverse<(Instant, u64)>>,
    completed: HashMap<u64, Instant>,
    completed_order: VecDeque<(Instant, u64)>,
}

impl Reassembler {
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            partial: HashMap::new(),
            buffered_bytes: 0,
            owners: HashMap::new(),
            deadlines: BinaryHeap::new(),
            completed: HashMap::new(),
            completed_order: VecDeque::new(),
        }
    }

    /// Messages in progress.
    pub fn partial_messages(&self) -> usize {
        self.partial.len()
    }

    /// Data bytes held for messages in progress.
    pub fn buffered_bytes(&self) -> usize {
        self.buffered_bytes
    }

    /// Messages in progress for `owner`, and their bytes.
    pub fn owner_usage(&self, owner: u64) -> (usize, usize) {
        self.owners.get(&owner).copied().unwrap_or((0, 0))
    }

    /// Takes one fragment (all messages have one owner).
    pub fn insert(&mut self, fragment: Fragment, now: Instant) -> Result<Assembled> {
        self.insert_owned(0, fragment, now)
    }

    /// Takes one fragment of a message charged to `owner` (an exit session): besides the
    /// global bounds, one owner's messages in progress and their bytes are bounded, so one
    /// owner cannot take the whole reassembler. Fragments of one message must name the same
    /// owner.
    pub fn insert_owned(
        &mut self,
        owner: u64,
        fragment: Fragment,
        now: Instant,
    ) -> Result<Assembled> {
        fragment.validate()?;
        let id = fragment.message_id;
        if self.completed.contains_key(&id) {
            return Ok(Assembled::Duplicate);
        }
        let deadline = now + self.limits.timeout;
        if let Some(partial) = self.partial.get_mut(&id) {
            if partial.count != fragment.count {
                return Err(Error::FragmentConflict {
                    message_id: id,
                    reason: "fragment count differs",
                });
            }
            if partial.owner != owner {
                return Err(Error::FragmentConflict {
                    message_id: id,
                    reason: "fragment names another owner",
                });
            }
            let slot = &mut partial.pieces[usize::from(fragment.index)];
            if slot.is_some() {
                return Ok(Assembled::Duplicate);
            }
            let len = fragment.data.len();
            if self.buffered_bytes + len > self.limits.max_buffered_bytes {
                return Err(Error::ReassemblyFull("buffered bytes"));
            }
            let usage = self.owners.entry(owner).or_insert((0, 0));
            if usage.1 + len > self.limits.max_buffered_bytes_per_owner {
                return Err(Error::ReassemblyFull(OWNER_BYTES));
            }
            usage.1 += len;
            self.buffered_bytes += len;
            partial.bytes += fragment.data.len();
            partial.received += 1;
            partial.deadline = deadline;
            *slot = Some(fragment.data);
            if partial.received < partial.count {
                return Ok(Assembled::Pending);
            }
            return Ok(self.finish(id, now));
        }
        if fragment.count == 1 {
            self.remember_completed(id, now);
            return Ok(Assembled::Complete {
                message_id: id,
                message: fragment.data,
            });
        }
        if self.partial.len() >= self.limits.max_partial_messages {
            return Err(Error::ReassemblyFull("messages in progress"));
        }
        if self.buffered_bytes + fragment.data.len() > self.limits.max_buffered_bytes {
            return Err(Error::ReassemblyFull("buffered bytes"));
        }
        let len = fragment.data.len();
        let (messages, bytes) = self.owner_usage(owner);
        if messages >= self.limits.max_partial_messages_per_owner {
            return Err(Error::ReassemblyFull(OWNER_MESSAGES));
        }
        if bytes + len > self.limits.max_buffered_bytes_per_owner {
            return Err(Error::ReassemblyFull(OWNER_BYTES));
        }
        self.owners.insert(owner, (messages + 1, bytes + len));
        let mut pieces = vec![None; usize::from(fragment.count)];
        pieces[usize::from(fragment.index)] = Some(fragment.data);
        self.buffered_bytes += len;
        self.partial.insert(
            id,
            Partial {
                owner,
                count: fragment.count,
                received: 1,
                pieces,
                bytes: len,
                deadline,
            },
        );
        self.deadlines.push(Reverse((deadline, id)));
        Ok(Assembled::Pending)
    }

    fn finish(&mut self, id: u64, now: Instant) -> Assembled {
        let Some(partial) = self.partial.remove(&id) else {
            return Assembled::Duplicate;
        };
        self.buffered_bytes -= partial.bytes;
        self.release_owner(partial.owner, partial.bytes);
        let mut message = Vec::with_capacity(partial.bytes);
        for piece in partial.pieces.into_iter().flatten() {
            message.extend_from_slice(&piece);
        }
        self.remember_completed(id, now);
        Assembled::Complete {
            message_id: id,
            message,
        }
    }

    /// One of `owner`'s messages, holding `bytes`, is no longer in progress.
    fn release_owner(&mut self, owner: u64, bytes: usize) {
        if let Some(usage) = self.owners.get_mut(&owner) {
            usage.0 = usage.0.saturating_sub(1);
            usage.1 = usage.1.saturating_sub(bytes);
            if usage.0 == 0 {
                self.owners.remove(&owner);
            }
        }
    }

    fn remember_completed(&mut self, id: u64, now: Instant) {
        if self.limits.remember_completed == 0 {
            return;
        }
        while self.completed_order.len() >= self.limits.remember_completed {
            if let Some((_, old)) = self.completed_order.pop_front() {
                self.completed.remove(&old);
            }
        }
        let until = now + self.limits.timeout;
        self.completed.insert(id, until);
        self.completed_order.push_back((until, id));
    }

    /// Gives up on messages past their deadline; returns their ids (reported incomplete).
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let mut expired = Vec::new();
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            let Some(partial) = self.partial.get(&id) else {
                continue;
            };
            if partial.deadline > now {
                self.deadlines.push(Reverse((partial.deadline, id)));
                continue;
            }
            if let Some(partial) = self.partial.remove(&id) {
                self.buffered_bytes -= partial.bytes;
                self.release_owner(partial.owner, partial.bytes);
                expired.push(id);
            }
        }
        while let Some(&(until, id)) = self.completed_order.front() {
            if until > now {
                break;
            }
            self.completed_order.pop_front();
            self.completed.remove(&id);
        }
        expired
    }

    /// The earliest time [`Self::expire`] has work to do.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let partial = self.deadlines.peek().map(|Reverse((t, _))| *t);
        let completed = self.completed_order.front().map(|(t, _)| *t);
        match (partial, completed) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_sizes() {
        assert_eq!(split_message(1, b"", 10).unwrap().len(), 1);
        assert_eq!(split_message(1, &[0; 10], 10).unwrap().len(), 1);
        assert_eq!(split_message(1, &[0; 11], 10).unwrap().len(), 2);
        assert!(split_message(1, &[0; 10 * 1024 + 1], 10).is_err());
        assert!(split_message(1, b"x", 0).is_err());
    }

    #[test]
    fn decode_refuses_bad_headers() {
        let mut buf = Vec::new();
        Fragment {
            message_id: 5,
            index: 2,
            count: 2,
            data: vec![],
        }
        .encode_into(&mut buf);
        assert!(matches!(
            Fragment::decode(&buf),
            Err(Error::FragmentInvalid { .. })
        ));
        assert!(matches!(
            Fragment::decode(&buf[..5]),
            Err(Error::Truncated { .. })
        ));
    }

    #[test]
    fn bounds_are_enforced_and_expiry_frees_them() {
        let limits = ReassemblyLimits {
            max_partial_messages: 2,
            max_buffered_bytes: 25,
            timeout: Duration::from_secs(1),
            remember_completed: 4,
            ..Default::default()
        };
        let mut r = Reassembler::new(limits);
        let t0 = Instant::ZERO;
        let frag = |id, index, len| Fragment {
            message_id: id,
            index,
            count: 2,
            data: vec![1; len],
        };
        assert_eq!(r.insert(frag(1, 0, 10), t0), Ok(Assembled::Pending));
        assert_eq!(r.insert(frag(2, 0, 10), t0), Ok(Assembled::Pending));
        assert_eq!(
            r.insert(frag(3, 0, 1), t0),
            Err(Error::ReassemblyFull("messages in progress"))
        );
        assert_eq!(
            r.insert(frag(1, 1, 10), t0),
            Err(Error::ReassemblyFull("buffered bytes"))
        );
        // Progress on message 2 pushes its deadline out.
        let t1 = t0 + Duration::from_millis(900);
        assert!(matches!(
            r.insert(frag(2, 1, 5), t1),
            Ok(Assembled::Complete { message_id: 2, .. })
        ));
        assert_eq!(r.insert(frag(2, 1, 5), t1), Ok(Assembled::Duplicate));
        assert_eq!(r.expire(t0 + Duration::from_millis(999)), Vec::<u64>::new());
        assert_eq!(r.expire(t0 + Duration::from_secs(1)), vec![1]);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(r.partial_messages(), 0);
        // After the completed window, message 2's id is forgotten.
        assert!(r.poll_timeout().is_some());
        r.expire(t1 + Duration::from_secs(1));
        assert_eq!(r.poll_timeout(), None);
        assert_eq!(
            r.insert(
                Fragment {
                    message_id: 2,
                    index: 0,
                    count: 3,
                    data: vec![]
                },
                t1
            ),
            Ok(Assembled::Pending)
        );
        assert!(matches!(
            r.insert(frag(2, 1, 1), t1),
            Err(Error::FragmentConflict { .. })
        ));
    }

    #[test]
    fn one_owner_cannot_take_the_whole_reassembler() {
        let mut r = Reassembler::new(ReassemblyLimits {
            max_partial_messages: 4,
            max_buffered_bytes: 100,
            max_partial_messages_per_owner: 2,
            max_buffered_bytes_per_owner: 30,
            timeout: Duration::from_secs(1),
            remember_completed: 16,
        });
        let t0 = Instant::ZERO;
        let frag = |id, index, len| Fragment {
            message_id: id,
            index,
            count: 3,
            data: vec![7; len],
        };
        assert_eq!(
            r.insert_owned(1, frag(1, 0, 10), t0),
            Ok(Assembled::Pending)
        );
        assert_eq!(
            r.insert_owned(1, frag(2, 0, 10), t0),
            Ok(Assembled::Pending)
        );
        assert_eq!(
            r.insert_owned(1, frag(3, 0, 1), t0),
            Err(Error::ReassemblyFull(OWNER_MESSAGES))
        );
        assert_eq!(
            r.insert_owned(1, frag(1, 1, 11), t0),
            Err(Error::ReassemblyFull(OWNER_BYTES))
        );
        // Another owner still has room, and may not add to owner 1's message.
        assert_eq!(
            r.insert_owned(2, frag(4, 0, 20), t0),
            Ok(Assembled::Pending)
        );
        assert!(matches!(
            r.insert_owned(2, frag(1, 1, 1), t0),
            Err(Error::FragmentConflict { .. })
        ));
        assert_eq!(r.owner_usage(1), (2, 20));
        assert_eq!(r.owner_usage(2), (1, 20));
        // Completing and expiring give the owner's share back.
        r.insert_owned(1, frag(1, 1, 5), t0).unwrap();
        assert!(matches!(
            r.insert_owned(1, frag(1, 2, 5), t0),
            Ok(Assembled::Complete { message_id: 1, .. })
        ));
        assert_eq!(r.owner_usage(1), (1, 10));
        r.expire(t0 + Duration::from_secs(1));
        assert_eq!(r.owner_usage(1), (0, 0));
        assert_eq!(r.owner_usage(2), (0, 0));
        assert_eq!(r.buffered_bytes(), 0);
    }

    #[test]
    fn stale_deadlines_are_rescheduled_not_expired() {
        let mut r = Reassembler::new(ReassemblyLimits {
            timeout: Duration::from_secs(1),
            ..Default::default()
        });
        let frag = |index| Fragment {
            message_id: 9,
            index,
            count: 3,
            data: vec![index as u8],
        };
        r.insert(frag(0), Instant::ZERO).unwrap();
        r.insert(frag(1), Instant::ZERO + Duration::from_millis(800))
            .unwrap();
        assert!(
            r.expire(Instant::ZERO + Duration::from_millis(1500))
                .is_empty()
        );
        assert_eq!(
            r.poll_timeout(),
            Some(Instant::ZERO + Duration::from_millis(1800))
        );
        assert_eq!(
            r.insert(frag(2), Instant::ZERO + Duration::from_millis(1700)),
            Ok(Assembled::Complete {
                message_id: 9,
                message: vec![0, 1, 2]
            })
        );
    }
}
