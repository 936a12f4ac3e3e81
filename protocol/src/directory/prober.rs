//! An authority's prober card: where the authority's measurement endpoint listens, so that
//! relays let its test links in and forward its test packets back to it.
//!
//! Each authority tests every relay before voting for it: it dials the relay's mix address,
//! runs the Noise XK handshake against the link key the descriptor claims (a relay that
//! cannot prove it fails), and sends Sphinx packets routed through the relay and back to the
//! prober's own Sphinx address. A relay learns the prober from this card, signed by the
//! authority's identity key and checked against the authorities the relay is configured
//! with, and treats the prober like a relay of the consensus: it accepts the prober's link
//! key on inbound links and dials the prober to deliver its packets.

use std::net::SocketAddr;

use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};

use super::sign::{AuthoritySet, DocumentKind, DocumentSignature, IdentityKey, sign_document};
use super::{DIRECTORY_SCHEMA, UnixTime, decode, encode};
use crate::link::LinkPublic;
use crate::packet::Address;
use crate::{Error, Result};

/// What an authority publishes about its prober.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProberCard {
    pub schema: u16,
    /// The authority that runs the prober; must be the signer.
    pub authority: IdentityKey,
    /// The prober's Sphinx address: test packets name it as their last hop.
    pub address: [u8; 32],
    /// Its Sphinx public key.
    pub sphinx_key: [u8; 32],
    /// Where it accepts relay links.
    pub listen: SocketAddr,
    /// The static key of its Noise links.
    pub link_key: LinkPublic,
    pub published: UnixTime,
}

impl ProberCard {
    /// The prober's Sphinx address.
    pub fn sphinx_address(&self) -> Address {
        Address(self.address)
    }
}

/// A card as served at `GET /v1/prober`: the encoded card and the authority's signature.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedProberCard {
    pub body: Vec<u8>,
    pub signature: DocumentSignature,
}

impl SignedProberCard {
    /// Encodes and signs `card` with the authority's key.
    pub fn sign(card: &ProberCard, key: &SigningKey) -> Result<Self> {
        if card.authority != IdentityKey::of(key) {
            return Err(Error::BadKey(
                "prober card authority is not the signing key's".into(),
            ));
        }
        let body = encode(card)?;
        let signature = sign_document(DocumentKind::Prober, &body, key);
        Ok(SignedProberCard { body, signature })
    }

    /// The card, if one of `authorities` signed it and it names its signer.
    pub fn verify(&self, authorities: &AuthoritySet) -> Result<ProberCard> {
        if !authorities.contains(&self.signature.signer) {
            return Err(Error::UnknownSigner {
                signer: self.signature.signer.to_hex(),
            });
        }
        self.signature.verify(DocumentKind::Prober, &self.body)?;
        let card: ProberCard = decode(&self.body)?;
        if card.schema != DIRECTORY_SCHEMA {
            return Err(Error::Document(format!(
                "prober card schema {} is not supported (expected {DIRECTORY_SCHEMA})",
                card.schema
            )));
        }
        if card.authority != self.signature.signer {
            return Err(Error::Document(
                "prober card names another authority than its signer".into(),
            ));
        }
        Ok(card)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(key: &SigningKey) -> ProberCard {
        ProberCard {
            schema: DIRECTORY_SCHEMA,
            authority: IdentityKey::of(key),
            address: [7; 32],
            sphinx_key: [8; 32],
            listen: "127.0.0.1:9".parse().unwrap(),
            link_key: LinkPublic([9; 32]),
            published: 1,
        }
    }

    #[test]
    fn only_a_configured_authority_vouches_for_a_prober() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let set = AuthoritySet::new(vec![IdentityKey::of(&a)]).unwrap();
        let signed = SignedProberCard::sign(&card(&a), &a).unwrap();
        assert_eq!(signed.verify(&set).unwrap(), card(&a));
        let foreign = SignedProberCard::sign(&card(&b), &b).unwrap();
        assert!(matches!(
            foreign.verify(&set),
            Err(Error::UnknownSigner { .. })
        ));
        let mut tampered = signed.clone();
        tampered.body[3] ^= 1;
        assert!(tampered.verify(&set).is_err());
        // A card signed by one authority naming another is refused.
        assert!(SignedProberCard::sign(&card(&b), &a).is_err());
    }
}
