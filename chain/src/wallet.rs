//! The chain wallet of a Murmur identity: a secp256k1 key derived from its Ed25519 seed, so a
//! relay or client needs no second key file. Its address holds the identity's money on the
//! chain, owns its pot and co-signs its tickets.

use alloy::primitives::B256;
use alloy::signers::local::PrivateKeySigner;
use ed25519_dalek::SigningKey;
use sha2::{Digest, Sha256};

const DOMAIN: &[u8] = b"murmur/chain-wallet/v1\0";

/// `SHA-256("murmur/chain-wallet/v1\0" ‖ seed ‖ counter)` for the first counter that gives a
/// valid secp256k1 scalar (the first one but with probability about 2^-128).
pub fn wallet_of(key: &SigningKey) -> PrivateKeySigner {
    let mut counter: u8 = 0;
    loop {
        let mut h = Sha256::new();
        h.update(DOMAIN);
        h.update(key.to_bytes());
        h.update([counter]);
        let secret: [u8; 32] = h.finalize().into();
        if let Ok(signer) = PrivateKeySigner::from_bytes(&B256::from(secret)) {
            return signer;
        }
        counter = counter.wrapping_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_has_one_wallet_and_two_have_two() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        assert_eq!(wallet_of(&a).address(), wallet_of(&a).address());
        assert_ne!(wallet_of(&a).address(), wallet_of(&b).address());
    }
}
