//! The adversary's bookkeeping: each honest mix's pool as a distribution over senders, the
//! distributions corrupt mixes hold for the packets they link, and the sender entropy of each
//! measured message. It is a pure function of the network's sequence of [`Op`]s, so it runs
//! on its own thread, a batch behind the network, and gives the same rows as if it ran inline.

use std::sync::mpsc::{Receiver, Sender};

use crate::anonymity::{Dist, Pool, Tracker};
use crate::report::MessageRow;

/// A distribution the network knows without the pools: the sender itself, or the clients of
/// a gateway the observer does not see into.
#[derive(Debug, Clone, Copy)]
pub(super) enum Known {
    Point(u32),
    Uniform { lo: u32, hi: u32 },
}

impl Known {
    fn dist(self) -> Dist {
        match self {
            Known::Point(s) => Dist::Point(s),
            Known::Uniform { lo, hi } => Dist::Uniform { lo, hi },
        }
    }
}

/// Where a packet entering a corrupt mix gets the distribution the mix then holds for it.
#[derive(Debug, Clone, Copy)]
pub(super) enum HoldFrom {
    Known(Known),
    /// The mixture of honest mix `m`, which it just left.
    Pool(u16),
    /// It came from a corrupt mix: the slot already holds its distribution.
    Kept,
}

/// Where a measured message's distribution is read on delivery.
#[derive(Debug, Clone, Copy)]
pub(super) enum ReadFrom {
    /// The pool of honest mix `m` it just left.
    Pool(u16),
    /// The slot of the corrupt mix it just left.
    Held(u32),
}

/// One change to what the adversary knows, in the network's order.
#[derive(Debug)]
pub(super) enum Op {
    /// A packet enters honest mix `m` with a known distribution.
    Add { m: u16, d: Known },
    /// A packet leaving honest mix `from` enters honest mix `m`.
    Mix { m: u16, from: u16 },
    /// A packet leaving a corrupt mix enters honest mix `m` with the slot's distribution
    /// (the point at `origin` if the slot has none).
    AddHeld { m: u16, slot: u32, origin: u32 },
    /// A packet enters a corrupt mix, which holds its distribution in `slot`.
    Hold { slot: u32, from: HoldFrom },
    /// A packet leaves honest mix `m`.
    Depart { m: u16 },
    /// A measured message is delivered: its row, with the entropy still to fill in.
    Measure {
        row: Box<MessageRow>,
        from: ReadFrom,
    },
}

/// The adversary's state.
pub(super) struct Observer {
    tracker: Tracker,
    pools: Vec<Pool>,
    held: Vec<Option<Dist>>,
    rows: Vec<MessageRow>,
}

impl Observer {
    pub fn new(tracker: Tracker, pools: Vec<Pool>) -> Observer {
        Observer {
            tracker,
            pools,
            held: Vec::new(),
            rows: Vec::new(),
        }
    }

    /// Applies every batch until the network hangs up; returns the measured rows in delivery
    /// order.
    pub fn run(mut self, ops: Receiver<Vec<Op>>, empty: Sender<Vec<Op>>) -> Vec<MessageRow> {
        while let Ok(mut batch) = ops.recv() {
            for op in batch.drain(..) {
                self.apply(op);
            }
            // The network reuses it; if it has hung up, it is dropped.
            let _ = empty.send(batch);
        }
        self.rows
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Add { m, d } => self.pools[usize::from(m)].add_dist(&d.dist(), &self.tracker),
            Op::Mix { m, from } => {
                let (to, from) = two_mut(&mut self.pools, usize::from(m), usize::from(from));
                to.add_pool(from);
            }
            Op::AddHeld { m, slot, origin } => {
                let d = self.take(slot).unwrap_or(Dist::Point(origin));
                self.pools[usize::from(m)].add_dist(&d, &self.tracker);
            }
            Op::Hold { slot, from } => {
                let d = match from {
                    HoldFrom::Known(k) => Some(k.dist()),
                    HoldFrom::Pool(m) => self.pools[usize::from(m)].snapshot(),
                    HoldFrom::Kept => self.take(slot),
                };
                let slot = slot as usize;
                if slot >= self.held.len() {
                    self.held.resize(slot + 1, None);
                }
                self.held[slot] = d;
            }
            Op::Depart { m } => self.pools[usize::from(m)].depart(),
            Op::Measure { mut row, from } => {
                let anonymity = match from {
                    ReadFrom::Pool(m) => self.pools[usize::from(m)].anonymity(&self.tracker),
                    ReadFrom::Held(slot) => self.take(slot).and_then(|d| self.tracker.of_dist(&d)),
                };
                row.entropy_bits = anonymity.map(|a| a.entropy_bits);
                row.min_entropy_bits = anonymity.map(|a| a.min_entropy_bits);
                row.anonymity_set = anonymity.map(|a| a.set_size);
                self.rows.push(*row);
            }
        }
    }

    fn take(&mut self, slot: u32) -> Option<Dist> {
        self.held.get_mut(slot as usize).and_then(Option::take)
    }
}

/// Two distinct elements of a slice, mutably and immutably.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &T) {
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &lo[b])
    }
}
