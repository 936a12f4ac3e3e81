//! The event queue: a calendar queue (Brown, 1988) ordered by (time, sequence number).
//!
//! A binary heap of the ~40,000 pending events of a 10,000-client network spends most of its
//! time in cache misses. Here time is cut into buckets of a fixed width; a ring of buckets
//! covers the near future, each bucket an unsorted vector sorted only when the clock reaches
//! it, and events beyond the ring wait in a small binary heap. Pops come out in exactly the
//! order a heap of (time, sequence) would give, so the queue does not change any result.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// Fewest and most buckets in the ring (powers of two).
const MIN_BUCKETS: usize = 4096;
const MAX_BUCKETS: usize = 1 << 21;

/// An entry: ordered by time, then by the sequence number the queue assigned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    t: u64,
    seq: u64,
}

/// A monotone priority queue of `T` by time: nothing may be pushed before the last pop.
#[derive(Debug)]
pub struct EventQueue<T> {
    width: u64,
    /// The bucket the clock is in (absolute index: time / width).
    current: u64,
    /// The current bucket's events, sorted with the earliest last.
    now: Vec<(Key, T)>,
    /// A power of two of buckets, covering `width · ring.len()` of the near future.
    ring: Vec<Vec<(Key, T)>>,
    /// Events in `ring`.
    in_ring: usize,
    /// Events at or beyond the end of the ring.
    later: BinaryHeap<Reverse<KeyOnly<T>>>,
    seq: u64,
}

/// Heap entry ordered by key only (`T` need not be ordered).
#[derive(Debug)]
struct KeyOnly<T>(Key, T);

impl<T> PartialEq for KeyOnly<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}
impl<T> Eq for KeyOnly<T> {}
impl<T> PartialOrd for KeyOnly<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for KeyOnly<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.cmp(&other.0)
    }
}

impl<T> EventQueue<T> {
    /// A queue whose buckets are `width_ns` wide (aim for a few dozen events per bucket)
    /// and whose ring reaches at least `horizon_ns` ahead (most events should land in it:
    /// the far heap's pops miss the cache), within 4,096 and 2²¹ buckets.
    pub fn new(width_ns: u64, horizon_ns: u64) -> Self {
        let width = width_ns.max(1);
        let buckets = usize::try_from(horizon_ns.div_ceil(width))
            .unwrap_or(MAX_BUCKETS)
            .clamp(MIN_BUCKETS, MAX_BUCKETS)
            .next_power_of_two();
        EventQueue {
            width,
            current: 0,
            now: Vec::new(),
            ring: (0..buckets).map(|_| Vec::new()).collect(),
            in_ring: 0,
            later: BinaryHeap::new(),
            seq: 0,
        }
    }

    /// Schedules `item` at `t` (not before the last popped time). Items at the same time pop
    /// in the order they were pushed.
    pub fn push(&mut self, t: u64, item: T) {
        self.seq += 1;
        let key = Key { t, seq: self.seq };
        let bucket = t / self.width;
        if bucket <= self.current {
            // Earliest last: insert after every later key.
            let at = self.now.partition_point(|(k, _)| *k > key);
            self.now.insert(at, (key, item));
        } else if bucket < self.current + self.ring.len() as u64 {
            let slot = (bucket as usize) & (self.ring.len() - 1);
            self.ring[slot].push((key, item));
            self.in_ring += 1;
        } else {
            self.later.push(Reverse(KeyOnly(key, item)));
        }
    }

    /// The earliest event and its time.
    pub fn pop(&mut self) -> Option<(u64, T)> {
        if self.settle()? {
            self.later
                .pop()
                .map(|Reverse(KeyOnly(k, item))| (k.t, item))
        } else {
            self.now.pop().map(|(k, item)| (k.t, item))
        }
    }

    /// The earliest event's time, without removing it.
    pub fn peek_time(&mut self) -> Option<u64> {
        if self.settle()? {
            self.later.peek().map(|Reverse(l)| l.0.t)
        } else {
            self.now.last().map(|(k, _)| k.t)
        }
    }

    /// Moves the clock until the earliest event is at hand: `Some(true)` if it waits in the far
    /// heap, `Some(false)` if it is the current bucket's last, `None` if the queue is empty.
    fn settle(&mut self) -> Option<bool> {
        loop {
            let from_later = match (self.now.last(), self.later.peek()) {
                (Some((k, _)), Some(Reverse(l))) => l.0 < *k,
                (None, Some(Reverse(l))) => l.0.t / self.width <= self.current,
                (Some(_), None) => false,
                (None, None) if self.in_ring == 0 => return None,
                (None, None) => false,
            };
            if from_later || !self.now.is_empty() {
                return Some(from_later);
            }
            self.advance();
        }
    }

    /// Moves the clock to the next bucket that can hold an event.
    fn advance(&mut self) {
        if self.in_ring == 0 {
            // Nothing near: jump to the first far event's bucket.
            if let Some(Reverse(l)) = self.later.peek() {
                self.current = l.0.t / self.width;
            }
            return;
        }
        self.current += 1;
        let mask = self.ring.len() - 1;
        let slot = &mut self.ring[(self.current as usize) & mask];
        if !slot.is_empty() {
            self.in_ring -= slot.len();
            std::mem::swap(&mut self.now, slot);
            self.now.sort_unstable_by_key(|e| Reverse(e.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    /// Random pushes between pops, with ties and far events, pop in exactly a heap's order.
    #[test]
    fn pops_in_time_then_push_order() {
        for (seed, width, horizon) in [
            (1u64, 1u64, 0u64),
            (2, 10, 0),
            (3, 1000, 0),
            (4, 1 << 30, 0),
            (5, 10, 1 << 20),
            (6, 3, 100_000_000),
        ] {
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut q = EventQueue::new(width, horizon);
            let mut reference = BinaryHeap::new();
            let mut seq = 0u64;
            let mut now = 0u64;
            let mut popped = 0;
            for _ in 0..20_000 {
                for _ in 0..rng.random_range(0..3) {
                    let dt = match rng.random_range(0..10) {
                        0 => 0,
                        1 => rng.random_range(0..100_000_000),
                        _ => rng.random_range(0..20_000),
                    };
                    seq += 1;
                    q.push(now + dt, seq);
                    reference.push(Reverse((now + dt, seq)));
                }
                let peeked = q.peek_time();
                let got = q.pop();
                let want = reference.pop().map(|Reverse(x)| x);
                assert_eq!(peeked, got.map(|(t, _)| t), "seed {seed} width {width}");
                assert_eq!(got, want, "seed {seed} width {width}");
                if let Some((t, _)) = got {
                    now = t;
                    popped += 1;
                }
            }
            while let Some(Reverse(want)) = reference.pop() {
                assert_eq!(q.pop(), Some(want));
            }
            assert_eq!(q.pop(), None);
            assert!(popped > 10_000);
        }
    }
}
