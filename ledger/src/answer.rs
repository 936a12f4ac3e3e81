//! Answers authenticated by the ledger's identity key.
//!
//! Relays and clients act on what the ledger answers: a redemption refused `already_redeemed`
//! is settled unpaid for good, a pot's state decides which tickets are taken. Requests are
//! signed by their senders, so only the answers need the ledger's signature. Every answer to
//! `/v1/*`, success or refusal, carries the header
//!
//! ```text
//! murmur-ledger-signature: <128 hex digits: an Ed25519 signature by the ledger's key>
//! ```
//!
//! over a canonical, domain-separated message that binds the request to the answer:
//!
//! ```text
//! "murmur/ledger/answer/v1\0" ‖ method ‖ 0x00 ‖ path and query ‖ 0x00
//!     ‖ SHA-256(request body) (32) ‖ status (2, big-endian) ‖ SHA-256(answer body) (32)
//! ```
//!
//! `method` is the request's (`GET`, `POST`) and `path and query` its target as the ledger
//! received it (`/v1/pot/<key>?challenge=<32 hex>`); neither can hold a 0 byte. A request
//! without a body hashes the empty string. An answer cannot be moved to another request: a
//! GET carries a fresh random `challenge` in its query (the ledger ignores it, the signature
//! covers it), so an old answer cannot be played back as a new one; a POST is a signed
//! request with its own nonce, and its body is bound. `/metrics` is not signed.

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::request::hex;

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "murmur-ledger-signature";

const DOMAIN: &[u8] = b"murmur/ledger/answer/v1\0";

/// One request and the answer to it, as far as the signature covers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exchange<'a> {
    pub method: &'a str,
    /// The path and query (`/v1/pot/<key>?challenge=…`).
    pub target: &'a str,
    pub request_digest: [u8; 32],
    pub status: u16,
    pub answer_digest: [u8; 32],
}

/// SHA-256 of a body.
pub fn digest(body: &[u8]) -> [u8; 32] {
    Sha256::digest(body).into()
}

/// A fresh random challenge for a GET's query: 16 bytes as 32 hex digits.
pub fn challenge() -> String {
    hex::encode(&rand::random::<[u8; 16]>())
}

impl Exchange<'_> {
    /// The message the signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(DOMAIN.len() + self.method.len() + self.target.len() + 68);
        out.extend_from_slice(DOMAIN);
        out.extend_from_slice(self.method.as_bytes());
        out.push(0);
        out.extend_from_slice(self.target.as_bytes());
        out.push(0);
        out.extend_from_slice(&self.request_digest);
        out.extend_from_slice(&self.status.to_be_bytes());
        out.extend_from_slice(&self.answer_digest);
        out
    }

    /// The header value: the ledger's signature, in hex.
    pub fn sign(&self, key: &SigningKey) -> String {
        hex::encode(&key.sign(&self.message()).to_bytes())
    }

    /// Checks the header value (`None`: the header was missing) against the ledger's key
    /// (strict Ed25519); says what is wrong otherwise.
    pub fn verify(
        &self,
        ledger: &VerifyingKey,
        header: Option<&[u8]>,
    ) -> std::result::Result<(), &'static str> {
        let header = header.ok_or("the answer carries no ledger signature")?;
        let text = std::str::from_utf8(header).map_err(|_| "the ledger signature is not hex")?;
        let bytes: [u8; 64] =
            hex::decode(text.trim()).ok_or("the ledger signature is not 128 hex digits")?;
        let signature = Signature::from_bytes(&bytes);
        // `verify_strict` refuses the malleable and small-order forms `verify` lets through.
        ledger
            .verify_strict(&self.message(), &signature)
            .map_err(|_| "the answer is not signed by the ledger's key")?;
        Ok(())
    }
}

/// The JSON body of every refusal or failure.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A refusal's label, or `storage` / `internal`.
    pub reason: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(target: &str) -> Exchange<'_> {
        Exchange {
            method: "GET",
            target,
            request_digest: digest(b""),
            status: 200,
            answer_digest: digest(b"{\"balance\":5}"),
        }
    }

    #[test]
    fn a_signature_covers_every_part_of_the_exchange() {
        let key = SigningKey::from_bytes(&[4; 32]);
        let ledger = key.verifying_key();
        let e = exchange("/v1/pot/ab?challenge=00");
        let sig = e.sign(&key);
        assert_eq!(sig.len(), 128);
        assert_eq!(e.verify(&ledger, Some(sig.as_bytes())), Ok(()));
        let changed = [
            Exchange {
                method: "POST",
                ..e
            },
            Exchange {
                target: "/v1/pot/ab?challenge=01",
                ..e
            },
            Exchange {
                request_digest: digest(b"x"),
                ..e
            },
            Exchange { status: 404, ..e },
            Exchange {
                answer_digest: digest(b"{\"balance\":6}"),
                ..e
            },
        ];
        for other in changed {
            assert!(
                other.verify(&ledger, Some(sig.as_bytes())).is_err(),
                "{other:?}"
            );
        }
        let stranger = SigningKey::from_bytes(&[5; 32]).verifying_key();
        assert!(e.verify(&stranger, Some(sig.as_bytes())).is_err());
        assert!(e.verify(&ledger, None).is_err());
        assert!(e.verify(&ledger, Some(b"zz")).is_err());
        assert!(e.verify(&ledger, Some(&sig.as_bytes()[2..])).is_err());
        assert_eq!(challenge().len(), 32);
        assert_ne!(challenge(), challenge());
    }
}
