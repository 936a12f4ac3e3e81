//! The simulated links: latency (a base, a fixed share of a spread per directed link, and
//! per-packet jitter) and loss, drawn from the network's own random stream.

use rand::RngExt;
use rand_chacha::ChaCha20Rng;

use crate::scenario::Links;

/// Nanoseconds in a millisecond.
const MS: f64 = 1e6;

/// The links' model, in nanoseconds.
#[derive(Debug, Clone, Copy)]
pub struct LinkModel {
    base: f64,
    spread: f64,
    jitter: f64,
    loss: f64,
    access_base: f64,
    access_loss: f64,
}

/// A link's endpoints: relays by index, clients after them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Relay(u16),
    Client(u32),
}

impl End {
    fn id(self, relays: u64) -> u64 {
        match self {
            End::Relay(r) => u64::from(r),
            End::Client(c) => relays + u64::from(c),
        }
    }
}

/// A fixed value in [0, 1) for a directed link: its share of the spread.
fn share(from: u64, to: u64) -> f64 {
    // SplitMix64 of the pair.
    let mut z = from
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(to)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

impl LinkModel {
    pub fn new(l: &Links) -> LinkModel {
        LinkModel {
            base: l.latency_ms * MS,
            spread: l.latency_spread_ms * MS,
            jitter: l.jitter_ms * MS,
            loss: l.loss,
            access_base: l.access_latency_ms * MS,
            access_loss: l.access_loss,
        }
    }

    /// How long a packet from `from` to `to` takes, or `None` if the link loses it. `relays`
    /// numbers the client ends after the relays.
    pub fn cross(&self, from: End, to: End, relays: u64, rng: &mut ChaCha20Rng) -> Option<u64> {
        let access = matches!(from, End::Client(_)) || matches!(to, End::Client(_));
        let loss = if access { self.access_loss } else { self.loss };
        if loss > 0.0 && rng.random::<f64>() < loss {
            return None;
        }
        let mut ns = if access {
            self.access_base
        } else {
            self.base + self.spread * share(from.id(relays), to.id(relays))
        };
        if self.jitter > 0.0 {
            ns += self.jitter * rng.random::<f64>();
        }
        Some(ns.round() as u64)
    }

    /// The largest one-way latency a link can take (for sizing the event queue).
    pub fn max_ns(&self) -> f64 {
        (self.base + self.spread).max(self.access_base) + self.jitter
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn links_keep_their_share_and_lose_at_the_rate() {
        let links = Links {
            latency_ms: 10.0,
            latency_spread_ms: 20.0,
            loss: 0.1,
            ..Links::default()
        };
        let m = LinkModel::new(&links);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let a = (End::Relay(1), End::Relay(2));
        let first = (0..100)
            .find_map(|_| m.cross(a.0, a.1, 10, &mut rng))
            .unwrap();
        assert!((10_000_000..30_000_000).contains(&first), "{first}");
        let mut lost = 0;
        for _ in 0..10_000 {
            match m.cross(a.0, a.1, 10, &mut rng) {
                Some(ns) => assert_eq!(ns, first),
                None => lost += 1,
            }
        }
        assert!((900..1100).contains(&lost), "{lost}");
        // Access links take the access latency and never lose here.
        assert_eq!(
            m.cross(End::Client(0), End::Relay(1), 10, &mut rng),
            Some(0)
        );
    }
}
