//! Delivery tags: SURB identifiers that let a gateway drop junk addressed to its client, and
//! let the client pay only for deliveries that are its own.
//!
//! Anyone can build a Sphinx packet whose final hop is a gateway and whose destination is a
//! client's address (the address is in every reply block the client hands out). Without a
//! check, the gateway delivers such junk and charges the client's tab for it, and the client
//! pays for it: anyone could drain a client's pot or get it cut off. So every SURB identifier
//! the client mints carries two MACs over a random nonce:
//!
//! | bytes | field |
//! |---:|---|
//! | 6 | `nonce`, random |
//! | 5 | `gateway_tag` = HMAC-SHA256(gateway key, domain ‖ nonce)[..5] |
//! | 5 | `client_tag` = HMAC-SHA256(client key, domain ‖ nonce)[..5] |
//!
//! The **gateway key** is derived from the client's link public key
//! (`SHA-256("murmur/delivery-gateway/v1\0" ‖ key)`): only the client and its gateway know that
//! key (Noise XK sends the initiator's static key encrypted, and the client makes a fresh one
//! per gateway), so no new message is needed and a reconnect with the same key keeps it. The
//! gateway delivers and charges only frames whose `gateway_tag` verifies; junk from anyone
//! else passes with probability 2⁻⁴⁰ per packet.
//!
//! The **client key** is the client's alone. The client pays its gateway for a delivery only
//! if its `client_tag` verifies (and it was not delivered before, as far as it remembers), so a
//! cheating gateway that forges deliveries, knowing the gateway key, gains nothing: it would
//! have to guess a 40-bit tag. The nonce is 48 bits: identifiers outstanding at once (a few
//! thousand) collide with negligible probability, and a collision only makes two SURBs share a
//! lookup key at the client.

use hmac::{Hmac, KeyInit, Mac};
use rand::CryptoRng;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::link::LinkPublic;
use crate::packet::SurbId;

const GATEWAY_KEY_DOMAIN: &[u8] = b"murmur/delivery-gateway/v1\0";
const TAG_DOMAIN: &[u8] = b"murmur/delivery-tag/v1\0";
const NONCE_LEN: usize = 6;
const TAG_LEN: usize = 5;

fn mac(key: &[u8; 32], nonce: &[u8]) -> Option<Hmac<Sha256>> {
    // HMAC takes a key of any length: this cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).ok()?;
    mac.update(TAG_DOMAIN);
    mac.update(nonce);
    Some(mac)
}

fn tag(key: &[u8; 32], nonce: &[u8]) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    if let Some(mac) = mac(key, nonce) {
        out.copy_from_slice(&mac.finalize().into_bytes()[..TAG_LEN]);
    }
    out
}

/// Whether `tag` is `key`'s tag of `nonce`, compared in constant time (as the envelope's
/// MACs are, `Mac::verify_truncated_left`).
fn verify(key: &[u8; 32], nonce: &[u8], tag: &[u8]) -> bool {
    mac(key, nonce).is_some_and(|m| m.verify_truncated_left(tag).is_ok())
}

/// The key a gateway checks its client's delivery tags with.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct GatewayTagKey([u8; 32]);

impl std::fmt::Debug for GatewayTagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GatewayTagKey(..)")
    }
}

impl GatewayTagKey {
    /// The key for the client whose link key is `client`.
    pub fn for_client(client: &LinkPublic) -> Self {
        let mut h = Sha256::new();
        h.update(GATEWAY_KEY_DOMAIN);
        h.update(client.0);
        GatewayTagKey(h.finalize().into())
    }

    /// Whether `id` carries this key's tag: a delivery the client asked for.
    pub fn admits(&self, id: &SurbId) -> bool {
        let (nonce, rest) = id.split_at(NONCE_LEN);
        verify(&self.0, nonce, &rest[..TAG_LEN])
    }

    /// An identifier with `nonce` (its first 6 bytes are used) that this key admits and no
    /// client key does, except by chance: for tests and tools that play a client.
    pub fn tagged(&self, nonce: [u8; NONCE_LEN]) -> SurbId {
        let mut id = [0u8; crate::SURB_ID_LEN];
        id[..NONCE_LEN].copy_from_slice(&nonce);
        id[NONCE_LEN..NONCE_LEN + TAG_LEN].copy_from_slice(&tag(&self.0, &nonce));
        id
    }
}

/// A client's delivery-tag keys: mints its SURB identifiers and recognises them.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DeliveryTags {
    gateway: [u8; 32],
    client: [u8; 32],
}

impl std::fmt::Debug for DeliveryTags {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeliveryTags(..)")
    }
}

impl DeliveryTags {
    /// Keys for a client whose link key (at its gateway) is `link`.
    pub fn new<R: CryptoRng + ?Sized>(link: &LinkPublic, rng: &mut R) -> Self {
        let mut client = [0u8; 32];
        rng.fill_bytes(&mut client);
        DeliveryTags {
            gateway: GatewayTagKey::for_client(link).0,
            client,
        }
    }

    /// A fresh identifier carrying both tags (never all zero, which means "no SURB").
    pub fn mint<R: CryptoRng + ?Sized>(&self, rng: &mut R) -> SurbId {
        loop {
            let mut nonce = [0u8; NONCE_LEN];
            rng.fill_bytes(&mut nonce);
            let mut id = [0u8; crate::SURB_ID_LEN];
            id[..NONCE_LEN].copy_from_slice(&nonce);
            id[NONCE_LEN..NONCE_LEN + TAG_LEN].copy_from_slice(&tag(&self.gateway, &nonce));
            id[NONCE_LEN + TAG_LEN..].copy_from_slice(&tag(&self.client, &nonce));
            if id != [0; crate::SURB_ID_LEN] {
                return id;
            }
        }
    }

    /// Whether this client minted `id` (its own tag verifies).
    pub fn is_mine(&self, id: &SurbId) -> bool {
        let (nonce, rest) = id.split_at(NONCE_LEN);
        verify(&self.client, nonce, &rest[TAG_LEN..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    #[test]
    fn the_gateway_admits_its_clients_ids_and_only_the_client_owns_them() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let link = LinkPublic([7; 32]);
        let tags = DeliveryTags::new(&link, &mut rng);
        let gateway = GatewayTagKey::for_client(&link);
        let other = GatewayTagKey::for_client(&LinkPublic([8; 32]));
        for _ in 0..1000 {
            let id = tags.mint(&mut rng);
            assert!(gateway.admits(&id) && tags.is_mine(&id));
            assert!(!other.admits(&id));
        }
        // What the gateway can make passes its own check, not the client's.
        let forged = gateway.tagged([1, 2, 3, 4, 5, 6]);
        assert!(gateway.admits(&forged) && !tags.is_mine(&forged));
        // Random identifiers (junk) pass neither, except with probability 2^-40.
        fn fill<R: CryptoRng>(rng: &mut R, bytes: &mut [u8]) {
            rng.fill_bytes(bytes);
        }
        let mut junk_admitted = 0;
        for _ in 0..100_000 {
            let mut id = [0u8; 16];
            fill(&mut rng, &mut id);
            junk_admitted += usize::from(gateway.admits(&id) || tags.is_mine(&id));
        }
        assert_eq!(junk_admitted, 0);
    }
}
