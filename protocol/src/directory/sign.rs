//! Signatures on directory documents, and the strict-majority rule for the consensus.

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Consensus, Descriptor, Epoch, UnixTime, decode};
use crate::{Error, Result};

/// An Ed25519 public identity key (a relay's or an authority's).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IdentityKey(pub [u8; 32]);

impl IdentityKey {
    /// The identity of a signing key.
    pub fn of(key: &SigningKey) -> Self {
        IdentityKey(key.verifying_key().to_bytes())
    }

    /// Lower-case hex, as operators paste it into configs.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.len() != 64 || !s.is_ascii() {
            return Err(Error::BadKey(format!(
                "an identity key is 64 hex digits; got {} characters",
                s.len()
            )));
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| Error::BadKey("an identity key is 64 hex digits".into()))?;
        }
        Ok(IdentityKey(out))
    }

    /// The Ed25519 public key, if these bytes are one.
    pub fn verifying_key(&self) -> Result<VerifyingKey> {
        VerifyingKey::from_bytes(&self.0)
            .map_err(|_| Error::BadKey(format!("{self:?} is not an Ed25519 public key")))
    }
}

impl fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for IdentityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// What a signature is over; each kind has its own domain-separation label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DocumentKind {
    Descriptor,
    Vote,
    Consensus,
    /// An authority's prober card.
    Prober,
}

impl DocumentKind {
    fn label(self) -> &'static [u8] {
        match self {
            DocumentKind::Descriptor => b"murmur/descriptor/v1\0",
            DocumentKind::Vote => b"murmur/vote/v1\0",
            DocumentKind::Consensus => b"murmur/consensus/v1\0",
            DocumentKind::Prober => b"murmur/prober/v1\0",
        }
    }
}

/// SHA-256 of the domain label and the body: what a signature covers.
pub fn document_digest(kind: DocumentKind, body: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(kind.label());
    h.update(body);
    h.finalize().into()
}

/// One signer's signature over a document's digest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentSignature {
    pub signer: IdentityKey,
    /// The digest the signer signed; compared with the body's before the signature is checked.
    pub digest: [u8; 32],
    /// 64 bytes of Ed25519 signature.
    #[serde(with = "sig_bytes")]
    pub signature: [u8; 64],
}

/// Signs `body` as a document of `kind`.
pub fn sign_document(kind: DocumentKind, body: &[u8], key: &SigningKey) -> DocumentSignature {
    let digest = document_digest(kind, body);
    DocumentSignature {
        signer: IdentityKey::of(key),
        digest,
        signature: key.sign(&digest).to_bytes(),
    }
}

impl DocumentSignature {
    /// Checks this signature over `body`: [`Error::BodyTampered`] if the body is not what was
    /// signed, [`Error::ForgedSignature`] if the signature is not the signer's.
    pub fn verify(&self, kind: DocumentKind, body: &[u8]) -> Result<()> {
        self.verify_digest(&document_digest(kind, body))
    }

    /// Checks this signature over a known `digest` (an authority holding a peer's signature
    /// before its own consensus is computed checks `self.digest`, then compares digests).
    pub fn verify_digest(&self, digest: &[u8; 32]) -> Result<()> {
        if &self.digest != digest {
            return Err(Error::BodyTampered {
                signer: self.signer.to_hex(),
            });
        }
        let forged = || Error::ForgedSignature {
            signer: self.signer.to_hex(),
        };
        let key = self.signer.verifying_key().map_err(|_| forged())?;
        key.verify_strict(digest, &Signature::from_bytes(&self.signature))
            .map_err(|_| forged())
    }
}

mod sig_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(sig: &[u8; 64], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(sig)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 64], D::Error> {
        let bytes = <std::borrow::Cow<'de, [u8]>>::deserialize(d)?;
        bytes
            .as_ref()
            .try_into()
            .map_err(|_| serde::de::Error::invalid_length(bytes.len(), &"64 bytes"))
    }
}

/// A relay's descriptor as uploaded: the encoded body and the relay's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDescriptor {
    pub body: Vec<u8>,
    pub signature: DocumentSignature,
}

impl SignedDescriptor {
    /// Encodes and signs `descriptor` with the relay's identity key.
    pub fn sign(descriptor: &Descriptor, key: &SigningKey) -> Result<Self> {
        if descriptor.identity != IdentityKey::of(key) {
            return Err(Error::BadKey(
                "descriptor identity is not the signing key's".into(),
            ));
        }
        let body = super::encode(descriptor)?;
        let signature = sign_document(DocumentKind::Descriptor, &body, key);
        Ok(SignedDescriptor { body, signature })
    }

    /// Checks the signature is the described relay's own, and returns the descriptor.
    pub fn verify(&self) -> Result<Descriptor> {
        self.signature
            .verify(DocumentKind::Descriptor, &self.body)?;
        let descriptor: Descriptor = decode(&self.body)?;
        if descriptor.identity != self.signature.signer {
            return Err(Error::UnknownSigner {
                signer: self.signature.signer.to_hex(),
            });
        }
        descriptor.validate()?;
        Ok(descriptor)
    }
}

/// The configured directory authorities: a consensus needs signatures from a strict majority.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthoritySet {
    keys: Vec<IdentityKey>,
}

impl AuthoritySet {
    /// The set of distinct, valid authority keys.
    pub fn new(mut keys: Vec<IdentityKey>) -> Result<Self> {
        keys.sort();
        keys.dedup();
        if keys.is_empty() {
            return Err(Error::BadKey("at least one authority key is needed".into()));
        }
        for k in &keys {
            k.verifying_key()?;
        }
        Ok(AuthoritySet { keys })
    }

    pub fn keys(&self) -> &[IdentityKey] {
        &self.keys
    }

    /// Signatures needed: more than half.
    pub fn threshold(&self) -> usize {
        self.keys.len() / 2 + 1
    }

    pub fn contains(&self, key: &IdentityKey) -> bool {
        self.keys.binary_search(key).is_ok()
    }
}

/// A consensus as served: the encoded body and the authorities' signatures.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedConsensus {
    pub body: Vec<u8>,
    pub signatures: Vec<DocumentSignature>,
}

/// A consensus that passed [`SignedConsensus::verify`].
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedConsensus {
    pub consensus: Consensus,
    /// The authorities whose signatures verified.
    pub signers: Vec<IdentityKey>,
    /// The digest the authorities signed.
    pub digest: [u8; 32],
}

/// What [`SignedConsensus::verify`] requires besides signatures.
#[derive(Clone, Copy, Debug)]
pub struct Freshness {
    /// The verifier's clock.
    pub now: UnixTime,
    /// The epoch the verifier asked for, if it asked for one.
    pub expected_epoch: Option<Epoch>,
    /// Clock disagreement tolerated at both ends of the validity window.
    pub clock_skew_s: u64,
}

impl SignedConsensus {
    /// A consensus body with no signatures yet.
    pub fn unsigned(consensus: &Consensus) -> Result<Self> {
        Ok(SignedConsensus {
            body: super::encode(consensus)?,
            signatures: Vec::new(),
        })
    }

    /// The digest authorities sign.
    pub fn digest(&self) -> [u8; 32] {
        document_digest(DocumentKind::Consensus, &self.body)
    }

    /// Adds `key`'s signature (replacing an earlier one by the same key).
    pub fn add_signature(&mut self, signature: DocumentSignature) {
        self.signatures.retain(|s| s.signer != signature.signer);
        self.signatures.push(signature);
        self.signatures.sort_by_key(|s| s.signer);
    }

    /// Checks signatures (a strict majority of `authorities`), structure, epoch and validity
    /// window. Each way of failing has its own error.
    pub fn verify(&self, authorities: &AuthoritySet, at: Freshness) -> Result<VerifiedConsensus> {
        let digest = self.digest();
        let mut signers: Vec<IdentityKey> = Vec::new();
        let mut first_failure: Option<(u8, Error)> = None;
        let mut note = |rank: u8, err: Error| {
            // Report the most telling failure: forged > tampered > unknown signer.
            if first_failure.as_ref().is_none_or(|(r, _)| rank > *r) {
                first_failure = Some((rank, err));
            }
        };
        for sig in &self.signatures {
            if !authorities.contains(&sig.signer) {
                note(
                    1,
                    Error::UnknownSigner {
                        signer: sig.signer.to_hex(),
                    },
                );
                continue;
            }
            if signers.contains(&sig.signer) {
                continue; // a second signature by one authority counts once
            }
            match sig.verify_digest(&digest) {
                Ok(()) => signers.push(sig.signer),
                Err(e @ Error::BodyTampered { .. }) => note(2, e),
                Err(e) => note(3, e),
            }
        }
        if signers.len() < authorities.threshold() {
            return Err(match first_failure {
                Some((_, e)) => e,
                None => Error::NotEnoughSignatures {
                    valid: signers.len(),
                    needed: authorities.threshold(),
                },
            });
        }
        let consensus: Consensus = decode(&self.body)?;
        consensus.validate()?;
        if let Some(expected) = at.expected_epoch.filter(|&e| e != consensus.epoch) {
            return Err(Error::WrongEpoch {
                expected,
                got: consensus.epoch,
            });
        }
        if at.now.saturating_add(at.clock_skew_s) < consensus.valid_after {
            return Err(Error::NotYetValid {
                valid_after: consensus.valid_after,
                now: at.now,
            });
        }
        if at.now > consensus.valid_until.saturating_add(at.clock_skew_s) {
            return Err(Error::Expired {
                valid_until: consensus.valid_until,
                now: at.now,
            });
        }
        signers.sort();
        Ok(VerifiedConsensus {
            consensus,
            signers,
            digest,
        })
    }
}
