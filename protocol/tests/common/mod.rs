//! The small network the session tests, the bounds test and the pair harness share: one
//! gateway, three mixes per layer, one exit, over a synthetic consensus.
#![allow(dead_code, clippy::unwrap_used)]

use murmur_protocol::directory::synthetic::{SyntheticKeys, SyntheticNetwork, generate};
use murmur_protocol::directory::{Consensus, NetworkParams};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// λ_P = 200/s, loop and drop cover at `cover` each, 1 ms mean per hop (at most 1 s).
pub fn params(cover: f64) -> NetworkParams {
    NetworkParams {
        lambda_p: 200.0,
        lambda_l: cover,
        lambda_d: cover,
        lambda_m: 0.0,
        mu: 1000.0,
        max_hop_delay_ms: 1000,
        epoch_length_s: 600,
        relays_per_address: 2,
    }
}

/// The network for `seed` (and the RNG it was drawn from, for what the test draws next).
pub fn network(seed: u64, cover: f64) -> (Consensus, Vec<SyntheticKeys>, ChaCha20Rng) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let (consensus, keys) = generate(
        &mut rng,
        &SyntheticNetwork {
            mixes_per_layer: 3,
            gateways: 1,
            exits: 1,
            params: params(cover),
            epoch: 9,
        },
    );
    (consensus, keys, rng)
}
