//! Who is in the simulated network, who is corrupt, and which path a packet takes.
//!
//! Sender ids: clients are `0..clients`, then mix `m` is `clients + m` (mixes send loops).
//! Mix ids: layer `l`, index `i` is `l · mixes_per_layer + i`. Gateways own contiguous blocks
//! of clients, so "any client of gateway g" is a range.

use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::directory::synthetic::{self, SyntheticNetwork};
use murmur_protocol::directory::{Consensus, ConsensusRelay, LAYERS, NetworkParams};
use rand::seq::SliceRandom;
use rand::{CryptoRng, Rng};

use crate::scenario::{MAX_LAYERS, Scenario};
use crate::{Error, Result};

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
}

/// The relays of the simulated network as the directory lists them: a synthetic consensus
/// with real keys, generated from the seed, carrying the scenario's rates.
#[derive(Debug, Clone)]
pub struct Directory {
    pub consensus: Consensus,
}

impl Directory {
    /// One gateway per scenario gateway, `mixes_per_layer` mixes in each of the three layers
    /// (a scenario with fewer layers uses the first hops of each path), one exit.
    pub fn generate<R: CryptoRng + ?Sized>(s: &Scenario, rng: &mut R) -> Directory {
        Directory {
            consensus: Directory::generate_with_keys(s, rng).0,
        }
    }

    /// [`Directory::generate`]'s consensus and every relay's secrets, in the consensus's
    /// order (the fidelity mode's relays process real packets).
    pub fn generate_with_keys<R: CryptoRng + ?Sized>(
        s: &Scenario,
        rng: &mut R,
    ) -> (Consensus, Vec<synthetic::SyntheticKeys>) {
        let r = &s.rates;
        let net = SyntheticNetwork {
            mixes_per_layer: s.network.mixes_per_layer as usize,
            gateways: s.network.gateways as usize,
            exits: 1,
            params: NetworkParams {
                lambda_p: r.lambda_p,
                lambda_l: r.lambda_l,
                lambda_d: r.lambda_d,
                lambda_m: r.lambda_m,
                mu: r.mu,
                // Relays clamp longer delays; the simulator does not model the clamp, so the
                // published cap is set where it never binds.
                max_hop_delay_ms: u64::MAX,
                ..NetworkParams::nym_like()
            },
            epoch: 0,
        };
        synthetic::generate(rng, &net)
    }
}

/// Path selection: the directory's own selector, with its relays mapped to simulator mix ids.
#[derive(Debug)]
pub struct Paths<'a> {
    selector: PathSelector<'a>,
    mixes_per_layer: usize,
    gateways: Vec<&'a ConsensusRelay>,
    layers: usize,
}

impl<'a> Paths<'a> {
    /// Mix `i` of layer `l` (from 0) gets id `l · mixes_per_layer + i`, in the selector's
    /// order; gateway `g` is the directory's `g`-th gateway.
    pub fn new(directory: &'a Directory, topo: &Topology) -> Result<Paths<'a>> {
        let selector = PathSelector::new(&directory.consensus, PathRules::default());
        let mixes_per_layer = topo.mixes_per_layer as usize;
        let gateways: Vec<_> = directory
            .consensus
            .relays
            .iter()
            .filter(|r| r.roles.gateway)
            .collect();
        if (1..=LAYERS).any(|l| selector.layer(l).len() != mixes_per_layer)
            || gateways.len() != topo.gateways as usize
        {
            return Err(Error::Input(
                "the generated directory does not match the scenario's network".into(),
            ));
        }
        Ok(Paths {
            selector,
            mixes_per_layer,
            gateways,
            layers: topo.layers,
        })
    }

    /// The path of one packet sent through `gateway` (`None` for a mix's own loop): the
    /// directory's bandwidth-weighted draw of one mix per layer under its family and subnet
    /// rules, avoiding the gateway.
    pub fn choose<R: Rng + ?Sized>(&self, rng: &mut R, gateway: Option<u32>) -> Result<Path> {
        let avoid: &[&ConsensusRelay] = match gateway.and_then(|g| self.gateways.get(g as usize)) {
            Some(g) => std::slice::from_ref(g),
            None => &[],
        };
        let relays = self.selector.mix_path(rng, avoid)?;
        let mut path = [0u16; MAX_LAYERS];
        for (hop, (id, relay)) in path.iter_mut().zip(&relays).take(self.layers).enumerate() {
            // The relay's place in its layer (a few pointer comparisons; the selector hands
            // out references into the consensus it holds).
            let at = self
                .selector
                .layer(hop + 1)
                .iter()
                .position(|r| std::ptr::eq(*r, *relay))
                .ok_or_else(|| {
                    Error::Input("the path selector chose a relay outside the network".into())
                })?;
            *id = (hop * self.mixes_per_layer + at) as u16;
        }
        Ok(path)
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
        Scenario::parse::<&str>(&text, &[]).unwrap()
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
    fn directory_paths_cross_one_mix_per_layer_and_corrupt_count_is_exact() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let s = scenario(10, 2, 0.25);
        let t = Topology::new(&s, &mut rng);
        assert_eq!(t.corrupt_mix.iter().filter(|&&c| c).count(), 3);
        let directory = Directory::generate(&s, &mut rng);
        let paths = Paths::new(&directory, &t).unwrap();
        let mut seen = vec![0u32; t.mixes()];
        for i in 0..1200 {
            let p = paths
                .choose(&mut rng, (i % 3 < 2).then_some(i % 2))
                .unwrap();
            for (l, &m) in p.iter().enumerate() {
                assert_eq!(t.layer_of(m as usize), l);
                seen[m as usize] += 1;
            }
        }
        // Equal bandwidths: every mix of a layer is drawn about equally (300 ± 5 sd of 15).
        assert!(seen.iter().all(|&n| (225..375).contains(&n)), "{seen:?}");
    }
}
