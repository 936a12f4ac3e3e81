//! An authority's vote: the descriptors it accepted, what it measured of each relay, and the
//! parameters it is configured with, for the consensus of one epoch, signed with the
//! authority's identity key.
//!
//! Votes carry whole signed descriptors, so every authority computes the consensus from the
//! relays' own signed words, and a vote can be relayed by anyone: a peer that missed an
//! authority's vote fetches it from another peer and checks the author's signature itself.

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::sign::{AuthoritySet, DocumentKind, DocumentSignature, IdentityKey, sign_document};
use super::{
    DIRECTORY_SCHEMA, Descriptor, Epoch, MAX_RELAYS, NetworkParams, PERFORMANCE_SCALE,
    SignedDescriptor, UnixTime, decode, encode,
};

/// What an authority measured of one relay it votes for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    /// The weight the authority gives the relay: what its test traffic measured, never more
    /// than the relay's claim (packets per second).
    pub weight: u32,
    /// Per mille of the authority's recent test packets through the relay that came back.
    pub performance: u16,
}
use crate::{Error, Result};

/// What one authority proposes for the consensus of `epoch`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vote {
    pub schema: u16,
    /// The authority that votes; must be the signer.
    pub authority: IdentityKey,
    /// The epoch of the consensus this vote is for.
    pub epoch: Epoch,
    /// When the authority made the vote.
    pub published: UnixTime,
    /// The authority's configured network parameters (the consensus takes the median).
    pub params: NetworkParams,
    /// The descriptors the authority accepted, sorted by relay identity, one per relay.
    pub descriptors: Vec<SignedDescriptor>,
    /// What the authority measured of each relay, in the order of `descriptors`.
    pub measurements: Vec<Measurement>,
}

/// A vote as sent between authorities: the encoded body and the author's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedVote {
    pub body: Vec<u8>,
    pub signature: DocumentSignature,
}

/// A vote whose signature, structure and descriptors all checked out.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifiedVote {
    pub vote: Vote,
    /// The descriptors of `vote.descriptors`, decoded, in the same order.
    pub descriptors: Vec<Descriptor>,
    /// The digest of each descriptor's body (`document_digest(Descriptor, body)`), same order.
    pub descriptor_digests: Vec<[u8; 32]>,
}

impl Vote {
    /// A vote over `descriptors` with their measurements (any order; sorted here). Refuses
    /// two descriptors of one relay and more than [`MAX_RELAYS`].
    pub fn new(
        authority: IdentityKey,
        epoch: Epoch,
        published: UnixTime,
        params: NetworkParams,
        mut relays: Vec<(SignedDescriptor, Measurement)>,
    ) -> Result<Self> {
        relays.sort_by_key(|(d, _)| d.signature.signer);
        let (descriptors, measurements) = relays.into_iter().unzip();
        let vote = Vote {
            schema: DIRECTORY_SCHEMA,
            authority,
            epoch,
            published,
            params,
            descriptors,
            measurements,
        };
        vote.validate()?;
        Ok(vote)
    }

    /// Checks the structure (not the signatures): schema, parameters, descriptors bounded,
    /// sorted and unique by relay.
    pub fn validate(&self) -> Result<()> {
        if self.schema != DIRECTORY_SCHEMA {
            return Err(Error::Document(format!(
                "vote schema {} is not supported (expected {DIRECTORY_SCHEMA})",
                self.schema
            )));
        }
        self.params.validate()?;
        if self.descriptors.len() > MAX_RELAYS {
            return Err(Error::Document(format!(
                "a vote lists at most {MAX_RELAYS} descriptors"
            )));
        }
        for pair in self.descriptors.windows(2) {
            if pair[0].signature.signer >= pair[1].signature.signer {
                return Err(Error::Document(
                    "vote descriptors must be sorted by relay identity, one per relay".into(),
                ));
            }
        }
        if self.measurements.len() != self.descriptors.len() {
            return Err(Error::Document(
                "a vote carries one measurement per descriptor".into(),
            ));
        }
        if self
            .measurements
            .iter()
            .any(|m| m.performance > PERFORMANCE_SCALE)
        {
            return Err(Error::Document(format!(
                "performance scores are at most {PERFORMANCE_SCALE}"
            )));
        }
        Ok(())
    }
}

impl SignedVote {
    /// Encodes and signs `vote` with the authority's key.
    pub fn sign(vote: &Vote, key: &SigningKey) -> Result<Self> {
        if vote.authority != IdentityKey::of(key) {
            return Err(Error::BadKey(
                "vote authority is not the signing key's".into(),
            ));
        }
        let body = encode(vote)?;
        let signature = sign_document(DocumentKind::Vote, &body, key);
        Ok(SignedVote { body, signature })
    }

    /// The authority that signed (unchecked until [`SignedVote::verify`]).
    pub fn signer(&self) -> IdentityKey {
        self.signature.signer
    }

    /// Checks that a configured authority signed this vote, for `expected_epoch` if given,
    /// and that every descriptor in it is validly signed by its relay. Each failure has its
    /// own error: [`Error::UnknownSigner`], [`Error::BodyTampered`],
    /// [`Error::ForgedSignature`], [`Error::WrongEpoch`], or a malformed document.
    pub fn verify(
        &self,
        authorities: &AuthoritySet,
        expected_epoch: Option<Epoch>,
    ) -> Result<VerifiedVote> {
        if !authorities.contains(&self.signature.signer) {
            return Err(Error::UnknownSigner {
                signer: self.signature.signer.to_hex(),
            });
        }
        self.signature.verify(DocumentKind::Vote, &self.body)?;
        let vote: Vote = decode(&self.body)?;
        if vote.authority != self.signature.signer {
            return Err(Error::Document(format!(
                "vote names authority {} but is signed by {}",
                vote.authority.to_hex(),
                self.signature.signer.to_hex()
            )));
        }
        vote.validate()?;
        if let Some(expected) = expected_epoch.filter(|&e| e != vote.epoch) {
            return Err(Error::WrongEpoch {
                expected,
                got: vote.epoch,
            });
        }
        let mut descriptors = Vec::with_capacity(vote.descriptors.len());
        let mut descriptor_digests = Vec::with_capacity(vote.descriptors.len());
        for signed in &vote.descriptors {
            descriptors.push(signed.verify()?);
            descriptor_digests.push(signed.signature.digest);
        }
        Ok(VerifiedVote {
            vote,
            descriptors,
            descriptor_digests,
        })
    }
}
