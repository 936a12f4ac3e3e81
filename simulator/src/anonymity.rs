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
//!
//! **Scalable tracking.** The exact vectors cost O(senders) per hop. A [`Tracker`] in sampled
//! mode keeps only a fixed random sample of K senders (the coordinates of the vectors) and the
//! exact packet count of every pool. Because each pool's total mass is known exactly (it is
//! its packet count), the sampled coordinates are the *exact* posteriors of those K senders;
//! what is estimated is only the sum over the senders left out. The entropy is the ratio
//! estimator `Σ_S −p log₂ p / Σ_S p` (the mass-weighted mean surprisal of the sampled
//! senders: exact when the posterior is uniform, consistent with O(1/K) bias otherwise), the
//! anonymity set is `N/K · #{s ∈ S : p_s ≥ threshold}`, and the min-entropy is that of the
//! largest sampled posterior (an upper bound on the true min-entropy). Cost per hop: O(K),
//! whatever the number of senders.

use rand::{Rng, RngExt};
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
    /// Any distribution (normalised), over the [`Tracker`]'s coordinates.
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

    /// Of a distribution whose dense vectors are over all senders (an exact tracker).
    pub fn of_dist(d: &Dist) -> Anonymity {
        Tracker::exact(0)
            .of_dist(d)
            .unwrap_or_else(|| Anonymity::of_uniform(1))
    }

    /// Estimated from the exact posteriors `p` of a uniform sample of `k` of `senders`
    /// senders (see the module notes); `None` when no sampled sender could have sent it.
    pub fn of_sample(p: impl Iterator<Item = f64>, k: usize, senders: usize) -> Option<Anonymity> {
        let (mut mass, mut surprisal, mut max, mut set) = (0.0f64, 0.0f64, 0.0f64, 0u64);
        for p in p.filter(|&p| p > 0.0) {
            mass += p;
            surprisal -= p * p.log2();
            max = max.max(p);
            set += u64::from(p >= SET_THRESHOLD);
        }
        if mass <= 0.0 || k == 0 {
            return None;
        }
        let set = (set as f64 * senders as f64 / k as f64).round();
        Some(Anonymity {
            entropy_bits: (surprisal / mass).max(0.0),
            min_entropy_bits: -max.min(1.0).log2(),
            set_size: (set as u32).max(1),
        })
    }
}

/// Which senders the distributions cover: all of them, or a fixed uniform sample.
#[derive(Debug, Clone)]
pub struct Tracker {
    senders: usize,
    /// Sampled mode: the sampled senders, ascending (empty when exact).
    ids: Vec<u32>,
    /// Sampled mode: each sender's coordinate, or [`UNTRACKED`] (empty when exact).
    slot: Vec<u32>,
}

/// A sender outside the sample.
const UNTRACKED: u32 = u32::MAX;

impl Tracker {
    /// Every sender is a coordinate.
    pub fn exact(senders: usize) -> Tracker {
        Tracker {
            senders,
            ids: Vec::new(),
            slot: Vec::new(),
        }
    }

    /// A uniform sample of `k` of `senders` senders (exact when `k ≥ senders`).
    pub fn sampled(senders: usize, k: usize, rng: &mut impl Rng) -> Tracker {
        if k >= senders {
            return Tracker::exact(senders);
        }
        // Partial Fisher–Yates: the first k of a random permutation.
        let mut all: Vec<u32> = (0..senders as u32).collect();
        for i in 0..k {
            let j = rng.random_range(i..senders);
            all.swap(i, j);
        }
        all.truncate(k);
        all.sort_unstable();
        let mut slot = vec![UNTRACKED; senders];
        for (i, &s) in all.iter().enumerate() {
            slot[s as usize] = i as u32;
        }
        Tracker {
            senders,
            ids: all,
            slot,
        }
    }

    /// True when every sender is tracked.
    pub fn is_exact(&self) -> bool {
        self.ids.is_empty()
    }

    /// Coordinates of a dense distribution.
    pub fn dim(&self) -> usize {
        if self.is_exact() {
            self.senders
        } else {
            self.ids.len()
        }
    }

    /// The coordinate of sender `s`, if tracked.
    fn slot(&self, s: u32) -> Option<usize> {
        if self.is_exact() {
            return Some(s as usize);
        }
        match self.slot.get(s as usize) {
            Some(&i) if i != UNTRACKED => Some(i as usize),
            _ => None,
        }
    }

    /// The coordinates of senders `lo..hi`.
    fn slots(&self, lo: u32, hi: u32) -> std::ops::Range<usize> {
        if self.is_exact() {
            return lo as usize..hi as usize;
        }
        self.ids.partition_point(|&s| s < lo)..self.ids.partition_point(|&s| s < hi)
    }

    /// Adds `w` times distribution `d` to `v`.
    fn add(&self, v: &mut [f32], d: &Dist, w: f64) {
        match d {
            Dist::Point(s) => {
                if let Some(x) = self.slot(*s).and_then(|i| v.get_mut(i)) {
                    *x += w as f32;
                }
            }
            Dist::Uniform { lo, hi } => {
                let each = (w / f64::from(hi - lo)) as f32;
                if let Some(xs) = v.get_mut(self.slots(*lo, *hi)) {
                    xs.iter_mut().for_each(|x| *x += each);
                }
            }
            Dist::Dense(d) => axpy(v, d, w as f32),
        }
    }

    /// The anonymity of weights `v` over the coordinates whose posteriors are `k · v` (an exact
    /// tracker normalises `v` itself).
    fn of_coordinates(&self, v: &[f32], k: f64) -> Option<Anonymity> {
        if self.is_exact() {
            Some(Anonymity::of_weights(v.iter().map(|&x| f64::from(x))))
        } else {
            let p = v.iter().map(move |&x| f64::from(x) * k);
            Anonymity::of_sample(p, self.ids.len(), self.senders)
        }
    }

    /// `d` given that sender `s` did not send the packet: its coordinate removed and the rest
    /// renormalised (unchanged when `s` is not tracked, or `d` has no mass on it).
    pub fn excluding(&self, d: &Dist, s: u32) -> Dist {
        let Dist::Dense(v) = d else {
            return d.clone();
        };
        let Some(i) = self.slot(s) else {
            return d.clone();
        };
        let p = v.get(i).map_or(0.0, |&x| f64::from(x));
        if p <= 0.0 || p >= 1.0 {
            return d.clone();
        }
        let k = (1.0 / (1.0 - p)) as f32;
        let mut out: Box<[f32]> = v.iter().map(|&x| x * k).collect();
        if let Some(x) = out.get_mut(i) {
            *x = 0.0;
        }
        Dist::Dense(out)
    }

    /// The anonymity of a distribution (`None`: no sampled sender could have sent it).
    pub fn of_dist(&self, d: &Dist) -> Option<Anonymity> {
        match d {
            Dist::Point(_) => Some(Anonymity::of_uniform(1)),
            Dist::Uniform { lo, hi } => Some(Anonymity::of_uniform(hi - lo)),
            Dist::Dense(v) => self.of_coordinates(v, 1.0),
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
    /// A pool over a tracker's `dim` coordinates; `track = false` keeps only the count.
    pub fn new(dim: usize, track: bool) -> Pool {
        Pool {
            n: 0,
            scale: 1.0,
            v: if track { vec![0.0; dim] } else { Vec::new() },
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

    /// A packet arrives with distribution `d` (over `tracker`'s coordinates).
    pub fn add_dist(&mut self, d: &Dist, tracker: &Tracker) {
        self.arrive();
        if self.tracks() {
            tracker.add(&mut self.v, d, 1.0 / self.scale);
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
    pub fn anonymity(&self, tracker: &Tracker) -> Option<Anonymity> {
        if !self.tracks() || self.n == 0 {
            return None;
        }
        tracker.of_coordinates(&self.v, self.scale / f64::from(self.n))
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

    #[test]
    fn excluding_a_sender_renormalises_the_rest() {
        let t = Tracker::exact(3);
        let d = Dist::Dense(vec![0.5, 0.25, 0.25].into_boxed_slice());
        assert_eq!(
            t.excluding(&d, 0),
            Dist::Dense(vec![0.0, 0.5, 0.5].into_boxed_slice())
        );
        assert_eq!(t.excluding(&Dist::Point(1), 0), Dist::Point(1));
    }

    fn weights(p: &Pool) -> Vec<f64> {
        match p.snapshot() {
            Some(Dist::Dense(v)) => v.iter().map(|&x| f64::from(x)).collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pool_is_the_mixture_and_departures_keep_it() {
        let t = Tracker::exact(3);
        let mut p = Pool::new(3, true);
        p.add_dist(&Dist::Point(0), &t);
        p.add_dist(&Dist::Point(1), &t);
        let w = weights(&p);
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
        p.depart();
        // One packet left, nobody knows which: still half and half.
        let w = weights(&p);
        assert!((w[0] - 0.5).abs() < 1e-6 && (w[1] - 0.5).abs() < 1e-6);
        p.add_dist(&Dist::Point(2), &t);
        let w = weights(&p);
        assert!(
            (w[0] - 0.25).abs() < 1e-6 && (w[2] - 0.5).abs() < 1e-6,
            "{w:?}"
        );
        let a = p.anonymity(&t).unwrap();
        assert!((a.entropy_bits - 1.5).abs() < 1e-6);
        assert!((a.min_entropy_bits - 1.0).abs() < 1e-6);
        assert_eq!(a.set_size, 3);
    }

    #[test]
    fn pools_feed_pools_and_empty_pools_reset() {
        let t = Tracker::exact(4);
        let mut a = Pool::new(4, true);
        let mut b = Pool::new(4, true);
        a.add_dist(&Dist::Uniform { lo: 0, hi: 2 }, &t);
        a.add_dist(&Dist::Point(3), &t);
        b.add_dist(&Dist::Point(2), &t);
        b.add_pool(&a);
        a.depart();
        let w = weights(&b);
        let expect = [0.125, 0.125, 0.5, 0.25];
        for (x, e) in w.iter().zip(expect) {
            assert!((x - e).abs() < 1e-6, "{w:?}");
        }
        a.depart();
        assert!(a.is_empty() && a.snapshot().is_none());
        a.add_dist(&Dist::Point(1), &t);
        assert_eq!(weights(&a), vec![0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn long_runs_rescale_without_losing_the_mixture() {
        let t = Tracker::exact(2);
        let mut p = Pool::new(2, true);
        for _ in 0..10 {
            p.add_dist(&Dist::Point(0), &t);
        }
        // Thousands of arrivals and departures drive the scale far below RESCALE_BELOW.
        for i in 0..20_000 {
            p.add_dist(&Dist::Point((i % 2) as u32), &t);
            p.depart();
        }
        let w = weights(&p);
        assert!(
            (w[0] + w[1] - 1.0).abs() < 1e-4 && w[0] > 0.4 && w[1] > 0.4,
            "{w:?}"
        );
    }

    #[test]
    fn a_sample_maps_points_and_blocks_to_its_coordinates() {
        let mut rng = <rand_chacha::ChaCha20Rng as rand::SeedableRng>::seed_from_u64(3);
        let t = Tracker::sampled(100, 10, &mut rng);
        assert_eq!(t.dim(), 10);
        assert!(t.ids.windows(2).all(|w| w[0] < w[1]));
        let mut p = Pool::new(t.dim(), true);
        // A block of 50 senders holds about 5 sampled ones, each with posterior 1/50.
        p.add_dist(&Dist::Uniform { lo: 0, hi: 50 }, &t);
        let in_block = t.ids.iter().filter(|&&s| s < 50).count();
        let Some(Dist::Dense(v)) = p.snapshot() else {
            panic!("no snapshot")
        };
        let sum: f32 = v.iter().sum();
        assert!((sum - in_block as f32 / 50.0).abs() < 1e-6, "{v:?}");
        // A uniform posterior is estimated exactly: log2 50 bits, a set of about 50.
        let a = p.anonymity(&t).unwrap();
        assert!((a.entropy_bits - 50f64.log2()).abs() < 1e-5, "{a:?}");
        // A point at an unsampled sender adds mass nowhere; at a sampled one, to its slot.
        let outside = (0..100).find(|s| !t.ids.contains(s)).unwrap();
        let mut q = Pool::new(t.dim(), true);
        q.add_dist(&Dist::Point(outside), &t);
        assert!(
            q.anonymity(&t).is_none(),
            "nothing sampled could have sent it"
        );
        q.add_dist(&Dist::Point(t.ids[3]), &t);
        let Some(Dist::Dense(v)) = q.snapshot() else {
            panic!("no snapshot")
        };
        assert_eq!(v[3], 0.5);
        // Half the mass on one sampled sender, half unseen: the mass-weighted surprisal is
        // −log2 ½ = 1 bit, the true entropy of two senders at ½.
        assert_eq!(q.anonymity(&t).unwrap().entropy_bits, 1.0);
        // A sample as large as the population is the exact tracker.
        assert!(Tracker::sampled(5, 5, &mut rng).is_exact());
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
