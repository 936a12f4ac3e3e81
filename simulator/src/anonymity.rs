//! The adversary's view: a distribution over senders for every packet it watches.
//!
//! A mix with exponential delays is memoryless: to an observer who sees every packet enter
//! and leave, a packet leaving the mix is equally likely to be any packet in its pool
//! (Serjantov–Danezis, Loopix). So the outgoing packet's sender distribution is the mixture of
//! the distributions of the packets in the pool, and the pool after it left is, to the
//! observer, the same mixture with one packet's worth less mass.
//!
//! Each honest mix therefore keeps *one* dense vector over all senders (clients, then mixes,
//! which send loops): `mass = scale · v`, summing to the number of packets in the pool.
//! - a packet arrives with distribution `d`: `v += d / scale` (O(support of d));
//! - a packet leaves: its distribution is `scale · v / n`, handed on to the next mix as one
//!   vector addition (O(senders)); then `scale *= (n − 1)/n`, O(1).
//!
//! Cost: one pass over the sender vector per hop after the first. The distributions are exact
//! under this model (up to f32 rounding, ~1e-7 relative); no weight is pruned. Correlations
//! between successive departures (the observer could in principle solve for a consistent
//! matching) are ignored, as in Loopix's and Serjantov–Danezis's analysis.
//!
//! A corrupt mix reveals which outgoing packet is which incoming one, so a packet crossing it
//! keeps its own distribution instead of taking the pool's.

use serde::Serialize;

/// Below this scale, a pool folds the scale into its vector so f32 does not overflow.
const RESCALE_BELOW: f64 = 1e-18;

/// Posterior probability at or above which a sender counts in the anonymity set.
pub const SET_THRESHOLD: f64 = 1e-6;

/// A packet's sender distribution as the adversary sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum Dist {
    /// Known sender.
    Point(u32),
    /// Uniform over senders `lo..hi` (the clients of one gateway, to an observer who does not
    /// see access links).
    Uniform { lo: u32, hi: u32 },
    /// Any distribution (normalised).
    Dense(Box<[f32]>),
}

/// The anonymity of one packet: Shannon entropy, min-entropy (bits) and anonymity-set size.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Anonymity {
    pub entropy_bits: f64,
    pub min_entropy_bits: f64,
    /// Senders with posterior probability ≥ [`SET_THRESHOLD`].
    pub set_size: u32,
}

impl Anonymity {
    /// Of a distribution given as unnormalised weights.
    pub fn of_weights(weights: impl Iterator<Item = f64> + Clone) -> Anonymity {
        let total: f64 = weights.clone().sum();
        if total <= 0.0 {
            return Anonymity::of_uniform(1);
        }
        let (mut h, mut max, mut set) = (0.0f64, 0.0f64, 0u32);
        for w in weights {
            if w > 0.0 {
                let p = w / total;
                h -= p * p.log2();
                max = max.max(p);
                set += u32::from(p >= SET_THRESHOLD);
            }
        }
        Anonymity {
            entropy_bits: h,
            min_entropy_bits: -max.log2(),
            set_size: set,
        }
    }

    /// Of a uniform distribution over `k` senders.
    pub fn of_uniform(k: u32) -> Anonymity {
        let bits = f64::from(k.max(1)).log2();
        Anonymity {
            entropy_bits: bits,
            min_entropy_bits: bits,
            set_size: k.max(1),
        }
    }

    /// Of a distribution.
    pub fn of_dist(d: &Dist) -> Anonymity {
        match d {
            Dist::Point(_) => Anonymity::of_uniform(1),
            Dist::Uniform { lo, hi } => Anonymity::of_uniform(hi - lo),
            Dist::Dense(v) => Anonymity::of_weights(v.iter().map(|&x| f64::from(x))),
        }
    }
}

/// One mix's pool as the adversary sees it.
#[derive(Debug, Clone)]
pub struct Pool {
    /// Packets in the pool.
    n: u32,
    /// `mass = scale · v`.
    scale: f64,
    /// Empty when anonymity is not tracked (or for a corrupt mix).
    v: Vec<f32>,
}

impl Pool {
    /// A pool over `senders` senders; `track = false` keeps only the count.
    pub fn new(senders: usize, track: bool) -> Pool {
        Pool {
            n: 0,
            scale: 1.0,
            v: if track {
                vec![0.0; senders]
            } else {
                Vec::new()
            },
        }
    }

    /// Packets in the pool.
    pub fn len(&self) -> u32 {
        self.n
    }

    /// True when the pool holds no packet.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// True if this pool tracks distributions.
    pub fn tracks(&self) -> bool {
        !self.v.is_empty()
    }

    /// A packet whose distribution the caller adds with [`Pool::add_dist`] or [`Pool::add_pool`]
    /// (or none, when not tracking) has arrived.
    fn arrive(&mut self) {
        self.n += 1;
    }

    /// A packet arrives with distribution `d`.
    pub fn add_dist(&mut self, d: &Dist) {
        self.arrive();
        if !self.tracks() {
            return;
        }
        let w = 1.0 / self.scale;
        match d {
            Dist::Point(s) => {
                if let Some(x) = self.v.get_mut(*s as usize) {
                    *x += w as f32;
                }
            }
            Dist::Uniform { lo, hi } => {
                let each = (w / f64::from(hi - lo)) as f32;
                if let Some(xs) = self.v.get_mut(*lo as usize..*hi as usize) {
                    xs.iter_mut().for_each(|x| *x += each);
                }
            }
            Dist::Dense(d) => axpy(&mut self.v, d, w as f32),
        }
    }

    /// A packet arrives that just left `from` (whose departure the caller then records with
    /// [`Pool::depart`]): its distribution is `from`'s mixture.
    pub fn add_pool(&mut self, from: &Pool) {
        self.arrive();
        if !self.tracks() || !from.tracks() || from.n == 0 {
            return;
        }
        let w = from.scale / f64::from(from.n) / self.scale;
        axpy(&mut self.v, &from.v, w as f32);
    }

    /// The distribution of a packet leaving now (before [`Pool::depart`]), normalised.
    pub fn snapshot(&self) -> Option<Dist> {
        if !self.tracks() || self.n == 0 {
            return None;
        }
        let k = (self.scale / f64::from(self.n)) as f32;
        Some(Dist::Dense(self.v.iter().map(|&x| x * k).collect()))
    }

    /// The anonymity of a packet leaving now (before [`Pool::depart`]).
    pub fn anonymity(&self) -> Option<Anonymity> {
        (self.tracks() && self.n > 0)
            .then(|| Anonymity::of_weights(self.v.iter().map(|&x| f64::from(x))))
    }

    /// A packet left: the pool keeps its mixture with one packet's mass less.
    pub fn depart(&mut self) {
        self.n = self.n.saturating_sub(1);
        if !self.tracks() {
            return;
        }
        if self.n == 0 {
            self.v.fill(0.0);
            self.scale = 1.0;
            return;
        }
        self.scale *= f64::from(self.n) / f64::from(self.n + 1);
        if self.scale < RESCALE_BELOW {
            let k = self.scale as f32;
            self.v.iter_mut().for_each(|x| *x *= k);
            self.scale = 1.0;
        }
    }
}

/// `y += a·x` over the common length.
fn axpy(y: &mut [f32], x: &[f32], a: f32) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weights(p: &Pool) -> Vec<f64> {
        match p.snapshot() {
            Some(Dist::Dense(v)) => v.iter().map(|&x| f64::from(x)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pool_is_the_mixture_and_departures_keep_it() {
        let mut p = Pool::new(3, true);
        p.add_dist(&Dist::Point(0));
        p.add_dist(&Dist::Point(1));
        let w = weights(&p);
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
        p.depart();
        // One packet left, nobody knows which: still half and half.
        let w = weights(&p);
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
        p.add_dist(&Dist::Point(2));
        let w = weights(&p);
        assert!(
            (w[0] - 0.25).abs() < 1e-6 && (w[2] - 0.5).abs() < 1e-6,
            "{w:?}"
        );
        let a = p.anonymity().unwrap();
        assert!((a.entropy_bits - 1.5).abs() < 1e-6);
        assert!((a.min_entropy_bits - 1.0).abs() < 1e-6);
        assert_eq!(a.set_size, 3);
    }

    #[test]
    fn pools_feed_pools_and_empty_pools_reset() {
        let mut a = Pool::new(4, true);
        let mut b = Pool::new(4, true);
        a.add_dist(&Dist::Uniform { lo: 0, hi: 2 });
        a.add_dist(&Dist::Point(3));
        b.add_dist(&Dist::Point(2));
        b.add_pool(&a);
        a.depart();
        let w = weights(&b);
        let expect = [0.125, 0.125, 0.5, 0.25];
        for (x, e) in w.iter().zip(expect) {
            assert!((x - e).abs() < 1e-6, "{w:?}");
        }
        a.depart();
        assert!(a.is_empty() && a.snapshot().is_none());
        a.add_dist(&Dist::Point(1));
        assert_eq!(weights(&a), vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn long_runs_rescale_without_losing_the_mixture() {
        let mut p = Pool::new(2, true);
        for _ in 0..10 {
            p.add_dist(&Dist::Point(0));
        }
        // Thousands of arrivals and departures drive the scale far below RESCALE_BELOW.
        for i in 0..20_000 {
            p.add_dist(&Dist::Point((i % 2) as u32));
            p.depart();
        }
        let w = weights(&p);
        assert!(
            (w[0] + w[1] - 1.0).abs() < 1e-4 && w[0] > 0.4 && w[1] > 0.4,
            "{w:?}"
        );
    }

    #[test]
    fn anonymity_of_simple_distributions() {
        assert_eq!(Anonymity::of_dist(&Dist::Point(7)).entropy_bits, 0.0);
        let u = Anonymity::of_dist(&Dist::Uniform { lo: 0, hi: 8 });
        assert_eq!(
            (u.entropy_bits, u.min_entropy_bits, u.set_size),
            (3.0, 3.0, 8)
        );
    }
}
