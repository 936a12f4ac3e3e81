//! The sender's side of Sphinx: headers built from one key derivation per packet.
//!
//! sphinx-packet 0.8 builds headers with the per-hop secrets kept inside
//! (`SphinxHeader::new_versioned` and `BuiltHeader` are crate-private), so a sender that
//! also needs them (the payment envelope's keys come from each hop's replay tag) derived them
//! a second time. And it derives them the textbook way: hop `i`'s shared secret as `i + 1`
//! chained X25519 operations, ten for four hops. This module builds the same headers, in
//! sphinx-packet's wire format at [`CURRENT_VERSION`], from one derivation that serves the
//! header, the payload and the envelope; relays keep processing them with sphinx-packet
//! unchanged (`tests/sphinx_builder.rs` checks every hop's output against packets from
//! sphinx-packet's own builder).
//!
//! # One multiplication per hop
//!
//! With `x` the packet's secret and `b_j` hop `j`'s blinding factor, both clamped as X25519
//! clamps them, and `P_i` hop `i`'s key, hop `i`'s shared secret is the u-coordinate of
//! `x·b_0⋯b_{i-1}·P_i`. The scalars multiply modulo the group order ℓ, so the sender forms
//! the product and makes one variable-base multiplication per hop (the header's α₀ = `x·G` is
//! a fixed-base one).
//!
//! Chained X25519 removes a small-order component of `P_i` at its first step (a clamped
//! scalar is a multiple of 8); a product reduced modulo ℓ would not. So the product is applied
//! as `(c·8⁻¹)·(8·P_i)`, which is the chained result for every point of the curve. A key not on
//! the curve (on its twist) is refused: no consensus should list one, and sphinx-packet's
//! chain over it would give a secret an observer may guess.
//!
//! # The header
//!
//! From the last hop outwards, as sphinx-packet lays it out: the final hop's routing
//! information (flag, version, destination, identifier, random padding) under its stream
//! key, followed by the filler that makes every hop see a full-length header; then for each
//! earlier hop its routing information (flag, version, next hop, delay, the next hop's MAC,
//! the next hop's routing information truncated) under its stream key; each MAC is
//! HMAC-SHA256 of the encrypted routing information, truncated to 16 bytes.

use std::sync::OnceLock;

use aes::Aes128;
use ctr::cipher::{KeyIvInit, StreamCipher};
use curve25519_dalek::montgomery::MontgomeryPoint;
use curve25519_dalek::scalar::{Scalar, clamp_integer};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use rand::CryptoRng;
use sha2::Sha256;
use sphinx_packet::constants::{
    EXPANDED_SHARED_SECRET_HKDF_INFO, EXPANDED_SHARED_SECRET_HKDF_SALT,
    EXPANDED_SHARED_SECRET_LENGTH, FINAL_NODE_META_INFO_LENGTH, HEADER_INTEGRITY_MAC_SIZE,
    MAX_PATH_LENGTH, NODE_META_INFO_SIZE, PAYLOAD_KEY_SEED_SIZE, REPLAY_TAG_SIZE,
    STREAM_CIPHER_OUTPUT_LENGTH,
};
use sphinx_packet::header::delays::Delay;
use sphinx_packet::header::routing::{ENCRYPTED_ROUTING_INFO_SIZE, FINAL_HOP, FORWARD_HOP};
use sphinx_packet::payload::key::PayloadKeySeed;
use sphinx_packet::version::CURRENT_VERSION;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::packet::{Address, ReplayTag, RouteHop};
use crate::{Error, HEADER_SIZE, Result, SURB_ID_LEN};

const STREAM_KEY_LEN: usize = 16;
const MAC_KEY_LEN: usize = 16;
/// The legacy full payload key sits where the seed starts; the blinding factor follows it.
const LEGACY_PAYLOAD_KEY_LEN: usize = 192;
const BLINDING_AT: usize = STREAM_KEY_LEN + MAC_KEY_LEN + LEGACY_PAYLOAD_KEY_LEN;
const REPLAY_TAG_AT: usize = BLINDING_AT + 32;
const _: () = assert!(REPLAY_TAG_AT + REPLAY_TAG_SIZE == EXPANDED_SHARED_SECRET_LENGTH);

/// One hop's routing information and MAC.
const STEP: usize = NODE_META_INFO_SIZE + HEADER_INTEGRITY_MAC_SIZE;
const TRUNCATED_LEN: usize = ENCRYPTED_ROUTING_INFO_SIZE - STEP;
const _: () = assert!(HEADER_SIZE == 32 + HEADER_INTEGRITY_MAC_SIZE + ENCRYPTED_ROUTING_INFO_SIZE);

/// What the sender and hop `i` share: sphinx-packet's expanded secret, byte for byte.
#[derive(Zeroize, ZeroizeOnDrop)]
pub(crate) struct HopSecret([u8; EXPANDED_SHARED_SECRET_LENGTH]);

impl HopSecret {
    fn expand(shared: &[u8; 32]) -> Result<HopSecret> {
        let mut out = [0u8; EXPANDED_SHARED_SECRET_LENGTH];
        Hkdf::<Sha256>::new(Some(EXPANDED_SHARED_SECRET_HKDF_SALT), shared)
            .expand(EXPANDED_SHARED_SECRET_HKDF_INFO, &mut out)
            .map_err(|_| Error::Build("HKDF output length".into()))?;
        Ok(HopSecret(out))
    }

    fn stream_key(&self) -> &[u8] {
        &self.0[..STREAM_KEY_LEN]
    }

    fn mac_key(&self) -> &[u8] {
        &self.0[STREAM_KEY_LEN..STREAM_KEY_LEN + MAC_KEY_LEN]
    }

    pub(crate) fn payload_seed(&self) -> PayloadKeySeed {
        let at = STREAM_KEY_LEN + MAC_KEY_LEN;
        let mut s = [0u8; PAYLOAD_KEY_SEED_SIZE];
        s.copy_from_slice(&self.0[at..at + PAYLOAD_KEY_SEED_SIZE]);
        s
    }

    fn blinding(&self) -> Scalar {
        let mut b = Zeroizing::new([0u8; 32]);
        b.copy_from_slice(&self.0[BLINDING_AT..REPLAY_TAG_AT]);
        Scalar::from_bytes_mod_order(clamp_integer(*b))
    }

    pub(crate) fn replay_tag(&self) -> ReplayTag {
        let mut t = [0u8; REPLAY_TAG_SIZE];
        t.copy_from_slice(&self.0[REPLAY_TAG_AT..]);
        ReplayTag(t)
    }
}

/// A packet's group element and every hop's secret, in route order.
pub(crate) struct SenderKeys {
    pub alpha: [u8; 32],
    pub hops: Vec<HopSecret>,
}

fn inverse_of_eight() -> &'static Scalar {
    static INV8: OnceLock<Scalar> = OnceLock::new();
    INV8.get_or_init(|| Scalar::from(8u8).invert())
}

/// A header over `route`, each hop holding the packet for `delays[i]`, delivered at the last
/// hop to `destination` under `surb_id`; with the secrets it was built from, which also key
/// the payload and the envelope. Its secret, then the final hop's padding, come from `rng`.
pub(crate) fn build<R: CryptoRng + ?Sized>(
    rng: &mut R,
    route: &[RouteHop],
    delays: &[Delay],
    destination: Address,
    surb_id: [u8; SURB_ID_LEN],
) -> Result<(SenderKeys, [u8; HEADER_SIZE])> {
    let initial = StaticSecret::random_from_rng(&mut *rng);
    let keys = derive(route, &initial)?;
    let header = build_header(rng, &keys, route, delays, destination, surb_id)?;
    Ok((keys, header))
}

/// Derives every hop's secret for a packet whose secret is `initial` over `route`: one
/// fixed-base and `route.len()` variable-base multiplications.
fn derive(route: &[RouteHop], initial: &StaticSecret) -> Result<SenderKeys> {
    let alpha = PublicKey::from(initial).to_bytes();
    // c = x·b_0⋯b_{i-1}, carried as c·8⁻¹ (see the module documentation).
    let mut c = Zeroizing::new(
        Scalar::from_bytes_mod_order(clamp_integer(initial.to_bytes())) * inverse_of_eight(),
    );
    let mut hops = Vec::with_capacity(route.len());
    for (i, hop) in route.iter().enumerate() {
        let point = MontgomeryPoint(hop.sphinx_key.to_bytes())
            .to_edwards(0)
            .ok_or_else(|| Error::Build(format!("hop {i}'s key is not on the curve")))?;
        let shared = Zeroizing::new((point.mul_by_cofactor() * *c).to_montgomery().to_bytes());
        if *shared == [0u8; 32] {
            // A key of small order: every sender would share the same, public secret with it.
            return Err(Error::Build(format!("hop {i}'s key has small order")));
        }
        let secret = HopSecret::expand(&shared)?;
        if i + 1 < route.len() {
            *c *= secret.blinding();
        }
        hops.push(secret);
    }
    Ok(SenderKeys { alpha, hops })
}

/// The keystream of AES-128-CTR under `key` from a zero IV: sphinx-packet's PRG.
fn keystream(key: &[u8]) -> Result<Zeroizing<[u8; STREAM_CIPHER_OUTPUT_LENGTH]>> {
    let mut out = Zeroizing::new([0u8; STREAM_CIPHER_OUTPUT_LENGTH]);
    let mut cipher = ctr::Ctr64BE::<Aes128>::new_from_slices(key, &[0u8; 16])
        .map_err(|_| Error::Build("stream cipher key length".into()))?;
    cipher.apply_keystream(&mut out[..]);
    Ok(out)
}

fn mac(key: &[u8], data: &[u8]) -> Result<[u8; HEADER_INTEGRITY_MAC_SIZE]> {
    let mut h = <Hmac<Sha256> as KeyInit>::new_from_slice(key)
        .map_err(|_| Error::Build("HMAC key length".into()))?;
    h.update(data);
    let full = h.finalize().into_bytes();
    let mut out = [0u8; HEADER_INTEGRITY_MAC_SIZE];
    out.copy_from_slice(&full[..HEADER_INTEGRITY_MAC_SIZE]);
    Ok(out)
}

fn xor(into: &mut [u8], with: &[u8]) {
    for (a, b) in into.iter_mut().zip(with) {
        *a ^= b;
    }
}

/// The header for `keys` (from [`derive`]) over `route`; the last hop's delay is not
/// carried. The final hop's padding comes from `rng`.
fn build_header<R: CryptoRng + ?Sized>(
    rng: &mut R,
    keys: &SenderKeys,
    route: &[RouteHop],
    delays: &[Delay],
    destination: Address,
    surb_id: [u8; SURB_ID_LEN],
) -> Result<[u8; HEADER_SIZE]> {
    let n = keys.hops.len();
    if n == 0 || n > MAX_PATH_LENGTH || route.len() != n || delays.len() != n {
        return Err(Error::RouteShape {
            hops: route.len(),
            delays: delays.len(),
            max: MAX_PATH_LENGTH,
        });
    }
    let streams = keys
        .hops
        .iter()
        .map(|h| keystream(h.stream_key()))
        .collect::<Result<Vec<_>>>()?;

    // The filler: what hops 1..n see appended as they shift the header, from the keystreams
    // of every hop but the last.
    let mut filler = Vec::with_capacity(STEP * (n - 1));
    for (i, stream) in streams.iter().take(n - 1).enumerate() {
        filler.extend_from_slice(&[0u8; STEP]);
        let take = (i + 1) * STEP;
        xor(&mut filler, &stream[STREAM_CIPHER_OUTPUT_LENGTH - take..]);
    }

    // The final hop's routing information, padded to leave room for the filler.
    let final_len = ENCRYPTED_ROUTING_INFO_SIZE - STEP * (n - 1);
    let mut routing = [0u8; ENCRYPTED_ROUTING_INFO_SIZE];
    routing[0] = FINAL_HOP;
    routing[1..4].copy_from_slice(&CURRENT_VERSION.to_bytes());
    routing[4..36].copy_from_slice(&destination.0);
    routing[36..FINAL_NODE_META_INFO_LENGTH].copy_from_slice(&surb_id);
    rng.fill_bytes(&mut routing[FINAL_NODE_META_INFO_LENGTH..final_len]);
    xor(&mut routing[..final_len], &streams[n - 1][..final_len]);
    routing[final_len..].copy_from_slice(&filler);
    let mut next_mac = mac(keys.hops[n - 1].mac_key(), &routing)?;

    // Each earlier hop wraps the next one's.
    for i in (0..n - 1).rev() {
        let mut layer = [0u8; ENCRYPTED_ROUTING_INFO_SIZE];
        layer[0] = FORWARD_HOP;
        layer[1..4].copy_from_slice(&CURRENT_VERSION.to_bytes());
        layer[4..36].copy_from_slice(&route[i + 1].address.0);
        layer[36..NODE_META_INFO_SIZE].copy_from_slice(&delays[i].to_bytes());
        layer[NODE_META_INFO_SIZE..STEP].copy_from_slice(&next_mac);
        layer[STEP..].copy_from_slice(&routing[..TRUNCATED_LEN]);
        xor(&mut layer, &streams[i][..ENCRYPTED_ROUTING_INFO_SIZE]);
        next_mac = mac(keys.hops[i].mac_key(), &layer)?;
        routing = layer;
    }

    let mut header = [0u8; HEADER_SIZE];
    header[..32].copy_from_slice(&keys.alpha);
    header[32..32 + HEADER_INTEGRITY_MAC_SIZE].copy_from_slice(&next_mac);
    header[32 + HEADER_INTEGRITY_MAC_SIZE..].copy_from_slice(&routing);
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;
    use sphinx_packet::header::keys::KeyMaterial;
    use sphinx_packet::route::{Node, NodeAddressBytes};

    fn route_of(keys: &[PublicKey]) -> Vec<RouteHop> {
        keys.iter()
            .map(|k| RouteHop {
                address: Address([1; 32]),
                sphinx_key: *k,
            })
            .collect()
    }

    #[test]
    fn one_multiplication_per_hop_gives_sphinx_packets_chained_secrets() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for hops in 1..=MAX_PATH_LENGTH {
            let keys: Vec<PublicKey> = (0..hops)
                .map(|_| PublicKey::from(&StaticSecret::random_from_rng(&mut rng)))
                .collect();
            let initial = StaticSecret::random_from_rng(&mut rng);
            let ours = derive(&route_of(&keys), &initial).unwrap();
            let nodes: Vec<Node> = keys
                .iter()
                .map(|k| Node::new(NodeAddressBytes::from_bytes([1; 32]), *k))
                .collect();
            let theirs = KeyMaterial::derive(&nodes, &initial);
            assert_eq!(ours.alpha, theirs.initial_shared_secret.to_bytes());
            for (a, b) in ours.hops.iter().zip(&theirs.expanded_shared_secrets) {
                assert_eq!(a.replay_tag().0, *b.replay_tag());
                assert_eq!(a.payload_seed(), *b.payload_key_seed());
            }
        }
    }

    #[test]
    fn a_key_with_a_small_order_component_gives_the_chained_secret_too() {
        // A low-order point added to an honest key: chained X25519 drops it at the first
        // clamped multiplication, and so must the product.
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let honest = StaticSecret::random_from_rng(&mut rng);
        // u = 0 is the point of order 2.
        let torsion = MontgomeryPoint([0u8; 32]).to_edwards(0).unwrap();
        let point = curve25519_dalek::EdwardsPoint::mul_base_clamped(honest.to_bytes()) + torsion;
        let key = PublicKey::from(point.to_montgomery().to_bytes());
        let other = PublicKey::from(&StaticSecret::random_from_rng(&mut rng));
        let initial = StaticSecret::random_from_rng(&mut rng);
        let ours = derive(&route_of(&[other, key]), &initial).unwrap();
        let nodes: Vec<Node> = [other, key]
            .iter()
            .map(|k| Node::new(NodeAddressBytes::from_bytes([1; 32]), *k))
            .collect();
        let theirs = KeyMaterial::derive(&nodes, &initial);
        for (a, b) in ours.hops.iter().zip(&theirs.expanded_shared_secrets) {
            assert_eq!(a.replay_tag().0, *b.replay_tag());
        }
    }

    #[test]
    fn a_key_off_the_curve_is_refused() {
        // About half of all u-coordinates lie on the twist; find one.
        let twist = (2u8..=255)
            .map(|u| {
                let mut b = [0u8; 32];
                b[0] = u;
                b
            })
            .find(|b| MontgomeryPoint(*b).to_edwards(0).is_none())
            .unwrap();
        let initial = StaticSecret::random_from_rng(&mut ChaCha20Rng::seed_from_u64(9));
        assert!(derive(&route_of(&[PublicKey::from(twist)]), &initial).is_err());
        // And a key of small order (u = 0, of order 2): refused rather than sharing a
        // public secret.
        assert!(derive(&route_of(&[PublicKey::from([0u8; 32])]), &initial).is_err());
    }
}
