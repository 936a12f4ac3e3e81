//! Who is in the simulated network, who is corrupt, and which path a packet takes.
//!
//! Sender ids: clients are `0..clients`, then mix `m` is `clients + m` (mixes send loops).
//! Mix ids: layer `l`, index `i` is `l · mixes_per_layer + i`. Gateways own contiguous blocks
//! of clients, so "any client of gateway g" is a range.

use rand::seq::SliceRandom;
use rand::{Rng, RngExt};

use crate::scenario::{MAX_LAYERS, Scenario};

/// Mix ids along a path, one per layer (unused layers are 0).
pub type Path = [u16; MAX_LAYERS];

/// The simulated network.
#[derive(Debug, Clone)]
pub struct Topology {
    pub clients: u32,
    pub gateways: u32,
    pub layers: usize,
    pub mixes_per_layer: u32,
    /// Per mix: run by the adversary.
    pub corrupt_mix: Vec<bool>,
    /// Per gateway: run by the adversary.
    pub corrupt_gateway: Vec<bool>,
}

impl Topology {
    /// Lays out the scenario's network; `rng` picks which relays are corrupt.
    pub fn new<R: Rng + ?Sized>(s: &Scenario, rng: &mut R) -> Topology {
        let n = &s.network;
        let mixes = (n.layers * n.mixes_per_layer) as usize;
        let corrupt = (s.adversary.corrupt_mix_fraction * mixes as f64).round() as usize;
        Topology {
            clients: n.clients,
            gateways: n.gateways,
            layers: n.layers as usize,
            mixes_per_layer: n.mixes_per_layer,
            corrupt_mix: choose_corrupt(mixes, corrupt, rng),
            corrupt_gateway: choose_corrupt(
                n.gateways as usize,
                s.adversary.corrupt_gateways as usize,
                rng,
            ),
        }
    }

    /// Number of mixes.
    pub fn mixes(&self) -> usize {
        self.corrupt_mix.len()
    }

    /// Number of possible senders (clients and mixes).
    pub fn senders(&self) -> usize {
        self.clients as usize + self.mixes()
    }

    /// The sender id of mix `m`'s own loops.
    pub fn mix_sender(&self, m: usize) -> u32 {
        self.clients + m as u32
    }

    /// The layer of mix `m`.
    pub fn layer_of(&self, m: usize) -> usize {
        m / self.mixes_per_layer as usize
    }

    /// The gateway of client `c`.
    pub fn gateway_of(&self, c: u32) -> u32 {
        (u64::from(c) * u64::from(self.gateways) / u64::from(self.clients)) as u32
    }

    /// The clients of gateway `g`, as a range of sender ids.
    pub fn clients_of(&self, g: u32) -> (u32, u32) {
        let first = |g: u32| {
            // The smallest c with c·G/N ≥ g.
            (u64::from(g) * u64::from(self.clients)).div_ceil(u64::from(self.gateways)) as u32
        };
        (first(g), first(g + 1))
    }

    /// PATH SELECTION: the one place a path is chosen. One mix per layer, uniformly.
    ///
    /// TODO(directory): switch to `murmur_protocol::directory`'s path selector over a synthetic
    /// consensus once it lands on main. With equal bandwidths and no shared families the two
    /// choose the same distribution, so results do not change.
    pub fn choose_path<R: Rng + ?Sized>(&self, rng: &mut R) -> Path {
        let mut path = [0u16; MAX_LAYERS];
        for (layer, hop) in path.iter_mut().enumerate().take(self.layers) {
            let i = rng.random_range(0..self.mixes_per_layer);
            *hop = (layer as u32 * self.mixes_per_layer + i) as u16;
        }
        path
    }
}

/// `count` of `n` items, chosen uniformly.
fn choose_corrupt<R: Rng + ?Sized>(n: usize, count: usize, rng: &mut R) -> Vec<bool> {
    let mut flags: Vec<bool> = (0..n).map(|i| i < count).collect();
    flags.shuffle(rng);
    flags
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Scenario;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn scenario(clients: u32, gateways: u32, fraction: f64) -> Scenario {
        let text = format!(
            "version = 1\nduration_s = 1\n[network]\nclients = {clients}\ngateways = {gateways}\n\
             layers = 3\nmixes_per_layer = 4\n[rates]\nlambda_p = 1\nlambda_l = 0\nlambda_d = 0\n\
             lambda_m = 0\nmu = 1\n[traffic]\nmodel = \"poisson\"\nmessages_per_s = 0.1\n\
             [adversary]\ncorrupt_mix_fraction = {fraction}\ncorrupt_gateways = 1\n"
        );
        Scenario::parse(&text, &[]).unwrap()
    }

    #[test]
    fn gateways_own_contiguous_blocks() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for (clients, gateways) in [(10, 3), (7, 7), (1000, 6), (5, 1)] {
            let t = Topology::new(&scenario(clients, gateways, 0.0), &mut rng);
            for g in 0..gateways {
                let (lo, hi) = t.clients_of(g);
                assert!(lo < hi);
                assert!(
                    (lo..hi).all(|c| t.gateway_of(c) == g),
                    "{clients} {gateways} {g}"
                );
            }
            assert_eq!(t.clients_of(gateways - 1).1, clients);
            assert_eq!(t.corrupt_gateway.iter().filter(|&&c| c).count(), 1);
        }
    }

    #[test]
    fn paths_cross_one_mix_per_layer_and_corrupt_count_is_exact() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let t = Topology::new(&scenario(10, 1, 0.25), &mut rng);
        assert_eq!(t.corrupt_mix.iter().filter(|&&c| c).count(), 3);
        for _ in 0..100 {
            let p = t.choose_path(&mut rng);
            for (l, &m) in p.iter().enumerate() {
                assert_eq!(t.layer_of(m as usize), l);
            }
        }
    }
}
