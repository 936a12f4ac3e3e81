//! Replay protection: the set of replay tags a hop has seen under one Sphinx key.
//!
//! A Bloom filter with a fixed bit array, so memory is bounded whatever arrives: a filter
//! sized for `capacity` tags at false-positive rate `p` takes `-capacity·ln p / ln²2` bits
//! (28.8 bits per tag at p = 10⁻⁶: 10 million tags in 36 MB). A false positive drops one
//! honest packet, which the sender's ARQ re-sends on a fresh route; a replay is never
//! admitted. Past `capacity` the false-positive rate climbs ([`ReplayFilter::false_positive_rate`]);
//! the relay watches [`ReplayFilter::is_saturated`] and keys rotate each epoch, which starts a
//! fresh filter.
//!
//! Tags are HKDF outputs of a secret Diffie–Hellman value, so they are uniform and an
//! attacker cannot aim them at chosen bits: the filter uses the tag's own bytes as its hashes.
//!
//! Persistence is bytes in, bytes out ([`ReplayFilter::to_bytes`], [`ReplayFilter::from_bytes`])
//! with a SHA-256 checksum; the relay decides when and where to write them.

use sha2::{Digest, Sha256};

use crate::packet::ReplayTag;
use crate::{Error, Result};

const MAGIC: &[u8; 8] = b"MRMRPLY1";
const HEADER_LEN: usize = 8 + 8 + 8 + 4 + 8 + 8; // magic, bits, capacity, hashes, inserted, fp (f64 bits)
const CHECKSUM_LEN: usize = 32;
/// Refuse to allocate absurd filters from a config typo or a corrupt file (4 GiB of bits).
const MAX_BITS: u64 = 1 << 35;

/// A bounded-memory set of replay tags with a stated false-positive rate.
#[derive(Clone, PartialEq)]
pub struct ReplayFilter {
    words: Vec<u64>,
    num_bits: u64,
    hashes: u32,
    capacity: u64,
    target_fp_rate: f64,
    inserted: u64,
}

impl std::fmt::Debug for ReplayFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayFilter")
            .field("bits", &self.num_bits)
            .field("hashes", &self.hashes)
            .field("capacity", &self.capacity)
            .field("inserted", &self.inserted)
            .finish()
    }
}

impl ReplayFilter {
    /// A filter holding `capacity` tags at false-positive rate `fp_rate`.
    pub fn new(capacity: u64, fp_rate: f64) -> Result<Self> {
        if capacity == 0 {
            return Err(Error::ReplayParams("capacity must be at least 1".into()));
        }
        if !(fp_rate > 0.0 && fp_rate < 0.5) {
            return Err(Error::ReplayParams(format!(
                "false-positive rate must lie in (0, 0.5); got {fp_rate}"
            )));
        }
        let ln2 = std::f64::consts::LN_2;
        let bits = (-(capacity as f64) * fp_rate.ln() / (ln2 * ln2)).ceil();
        if !(bits.is_finite() && bits <= MAX_BITS as f64) {
            return Err(Error::ReplayParams(format!(
                "{capacity} tags at rate {fp_rate} need more than {MAX_BITS} bits"
            )));
        }
        // Round up to whole words; at least one word.
        let num_bits = ((bits as u64).max(64)).div_ceil(64) * 64;
        let hashes = ((num_bits as f64 / capacity as f64) * ln2)
            .round()
            .clamp(1.0, 32.0) as u32;
        Ok(ReplayFilter {
            words: vec![0; (num_bits / 64) as usize],
            num_bits,
            hashes,
            capacity,
            target_fp_rate: fp_rate,
            inserted: 0,
        })
    }

    fn bit_positions(&self, tag: &ReplayTag) -> impl Iterator<Item = u64> + use<> {
        // Kirsch–Mitzenmacher double hashing from the tag's own (uniform) bytes.
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        a.copy_from_slice(&tag.0[0..8]);
        b.copy_from_slice(&tag.0[8..16]);
        let h1 = u64::from_le_bytes(a);
        let h2 = u64::from_le_bytes(b) | 1;
        let m = self.num_bits;
        (0..u64::from(self.hashes)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % m)
    }

    /// Whether `tag` may have been seen (false positives at the stated rate; no false negatives).
    pub fn contains(&self, tag: &ReplayTag) -> bool {
        self.bit_positions(tag)
            .all(|bit| self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0)
    }

    /// Records `tag`; returns `true` if it was (probably) seen before, i.e. a replay.
    pub fn check_and_insert(&mut self, tag: &ReplayTag) -> bool {
        let mut seen = true;
        for bit in self.bit_positions(tag) {
            let word = &mut self.words[(bit / 64) as usize];
            let mask = 1 << (bit % 64);
            if *word & mask == 0 {
                seen = false;
                *word |= mask;
            }
        }
        if !seen {
            self.inserted = self.inserted.saturating_add(1);
        }
        seen
    }

    /// Tags recorded so far.
    pub fn len(&self) -> u64 {
        self.inserted
    }

    /// Whether no tag has been recorded.
    pub fn is_empty(&self) -> bool {
        self.inserted == 0
    }

    /// The number of tags the filter was sized for.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether more tags than `capacity` were recorded, so the rate is above target.
    pub fn is_saturated(&self) -> bool {
        self.inserted > self.capacity
    }

    /// Bytes of memory the bit array takes.
    pub fn memory_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// The false-positive rate at the current fill: (1 − e^(−k·n/m))^k.
    pub fn false_positive_rate(&self) -> f64 {
        let k = f64::from(self.hashes);
        let n = self.inserted as f64;
        let m = self.num_bits as f64;
        (1.0 - (-k * n / m).exp()).powf(k)
    }

    /// The rate the filter was sized for.
    pub fn target_false_positive_rate(&self) -> f64 {
        self.target_fp_rate
    }

    /// Serialises the filter with a checksum.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.words.len() * 8 + CHECKSUM_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.num_bits.to_le_bytes());
        out.extend_from_slice(&self.capacity.to_le_bytes());
        out.extend_from_slice(&self.hashes.to_le_bytes());
        out.extend_from_slice(&self.inserted.to_le_bytes());
        out.extend_from_slice(&self.target_fp_rate.to_bits().to_le_bytes());
        for word in &self.words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        let checksum = Sha256::digest(&out);
        out.extend_from_slice(&checksum);
        out
    }

    /// Restores a filter written by [`Self::to_bytes`], refusing any corruption.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let store = |msg: &str| Error::ReplayStore(msg.to_string());
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(store("shorter than its header"));
        }
        let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != checksum {
            return Err(store("checksum mismatch (truncated or corrupted)"));
        }
        if &body[..8] != MAGIC {
            return Err(store("not a Murmur replay filter (bad magic)"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let num_bits = u64_at(8);
        let capacity = u64_at(16);
        let mut h = [0u8; 4];
        h.copy_from_slice(&body[24..28]);
        let hashes = u32::from_le_bytes(h);
        let inserted = u64_at(28);
        let target_fp_rate = f64::from_bits(u64_at(36));
        let words_bytes = &body[HEADER_LEN..];
        if num_bits == 0 || num_bits % 64 != 0 || num_bits > MAX_BITS {
            return Err(store("bit count out of range"));
        }
        if words_bytes.len() as u64 != num_bits / 8 {
            return Err(store("bit array length disagrees with header"));
        }
        if !(1..=32).contains(&hashes) || capacity == 0 {
            return Err(store("parameters out of range"));
        }
        let words = words_bytes
            .chunks_exact(8)
            .map(|c| {
                let mut b = [0u8; 8];
                b.copy_from_slice(c);
                u64::from_le_bytes(b)
            })
            .collect();
        Ok(ReplayFilter {
            words,
            num_bits,
            hashes,
            capacity,
            target_fp_rate,
            inserted,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    fn random_tag(rng: &mut ChaCha20Rng) -> ReplayTag {
        let mut t = [0u8; 32];
        rng.fill_bytes(&mut t);
        ReplayTag(t)
    }

    #[test]
    fn sizing_follows_the_formula() {
        let f = ReplayFilter::new(1_000_000, 1e-6).unwrap();
        // 28.76 bits per tag, 20 hashes.
        assert!(
            (f.memory_bytes() as f64 - 3_594_000.0).abs() < 10_000.0,
            "{f:?}"
        );
        assert_eq!(f.hashes, 20);
    }

    #[test]
    fn refuses_bad_parameters() {
        assert!(ReplayFilter::new(0, 1e-6).is_err());
        assert!(ReplayFilter::new(10, 0.0).is_err());
        assert!(ReplayFilter::new(10, 0.7).is_err());
        assert!(ReplayFilter::new(u64::MAX, 1e-9).is_err());
    }

    #[test]
    fn no_false_negatives_and_measured_fp_rate_is_near_target() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut f = ReplayFilter::new(20_000, 1e-2).unwrap();
        let tags: Vec<_> = (0..20_000).map(|_| random_tag(&mut rng)).collect();
        let mut fresh_flagged = 0;
        for t in &tags {
            if f.check_and_insert(t) {
                fresh_flagged += 1;
            }
        }
        assert!(fresh_flagged < 100, "{fresh_flagged}");
        assert!(tags.iter().all(|t| f.contains(t)));
        assert!(tags.iter().all(|t| f.check_and_insert(t)));
        let probes = 100_000;
        let fp = (0..probes)
            .filter(|_| f.contains(&random_tag(&mut rng)))
            .count() as f64
            / probes as f64;
        assert!(fp < 0.015, "measured fp {fp}");
        assert!((f.false_positive_rate() - 0.01).abs() < 0.003);
        assert!(!f.is_saturated());
    }

    #[test]
    fn round_trips_and_refuses_corruption() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut f = ReplayFilter::new(1000, 1e-6).unwrap();
        let tags: Vec<_> = (0..500).map(|_| random_tag(&mut rng)).collect();
        for t in &tags {
            f.check_and_insert(t);
        }
        let bytes = f.to_bytes();
        let g = ReplayFilter::from_bytes(&bytes).unwrap();
        assert_eq!(f, g);
        assert!(tags.iter().all(|t| g.contains(t)));
        for i in [0, 9, 40, bytes.len() / 2, bytes.len() - 1] {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(ReplayFilter::from_bytes(&bad).is_err(), "flip at {i}");
        }
        assert!(ReplayFilter::from_bytes(&bytes[..bytes.len() - 1]).is_err());
        assert!(ReplayFilter::from_bytes(&[]).is_err());
    }
}
