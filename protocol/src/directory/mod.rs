//! The signed directory: relay descriptors, the consensus, and their verification.
//!
//! Documents have a canonical binary encoding (postcard of the structs below; decoding
//! re-encodes and refuses anything that is not byte-identical, so every document has exactly
//! one encoding). Signatures follow Tor's shape: each covers the SHA-256 digest of the
//! domain-separated body, and carries that digest, so a verifier can tell "this body is not
//! what the authority signed" (tampered) from "this is not the authority's signature" (forged).
//!
//! Nothing here reads a clock: verification takes `now` as Unix seconds.

pub mod consensus;
pub mod exit_policy;
pub mod guard;
pub mod path;
pub mod prober;
pub mod sign;
pub mod store;
pub mod synthetic;
pub mod vote;

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

pub use exit_policy::ExitPolicy;
pub use sign::{
    AuthoritySet, DocumentKind, DocumentSignature, IdentityKey, SignedConsensus, SignedDescriptor,
    VerifiedConsensus, document_digest, sign_document,
};
pub use store::{ConsensusStore, Offer};
pub use vote::{Measurement, SignedVote, VerifiedVote, Vote};

use crate::link::LinkPublic;
use crate::{Error, Result};

/// Seconds since the Unix epoch, as the caller's clock tells it.
pub type UnixTime = u64;

/// An epoch number: `unix_time / epoch_length`.
pub type Epoch = u32;

/// The schema version of every directory document this build writes and reads.
/// Version 2 added each relay's link key; version 3 the authorities' measurements (each
/// relay's measured weight and performance), mutual families and the per-address limit;
/// version 4 each relay's chain address.
pub const DIRECTORY_SCHEMA: u16 = 4;

/// The most relays a consensus may list (bounds memory when decoding untrusted bytes).
pub const MAX_RELAYS: usize = 10_000;

/// Longest family name, in bytes.
pub const MAX_FAMILY_LEN: usize = 64;

/// The most other relays a descriptor may name as its family.
pub const MAX_FAMILY_MEMBERS: usize = 32;

/// The highest price per packet any document may carry (base units; authorities' own caps
/// are usually far lower). Bounds the arithmetic of every payer.
pub const MAX_PRICE_PER_PACKET: u64 = 1_000_000_000_000;

/// A performance score's scale: per mille of test packets that came back.
pub const PERFORMANCE_SCALE: u16 = 1000;

/// A mix layer, 1 to 3.
pub type Layer = u8;

/// The number of mix layers.
pub const LAYERS: usize = 3;

/// What a relay offers to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Roles {
    /// Accepts client WebSockets and delivers replies to them.
    pub gateway: bool,
    /// Mixes in one of the three layers.
    pub mix: bool,
    /// Final hop: opens TCP connections for clients' streams.
    pub exit: bool,
}

/// A Sphinx public key for one epoch, and the relay's ticket commitment for that epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochKey {
    pub epoch: Epoch,
    pub key: [u8; 32],
    /// [`commitment_of`](crate::ticket::commitment_of) the relay's secret reveal for this
    /// epoch: tickets paying the relay for packets under `key` name it.
    pub payment_commitment: [u8; 32],
}

/// Where a relay listens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayAddresses {
    /// Relay-to-relay TCP (fixed-size frames).
    pub mix: SocketAddr,
    /// Client WebSocket, for gateways.
    pub client: Option<SocketAddr>,
}

/// What a relay says about itself; signed by its identity key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Descriptor {
    pub schema: u16,
    pub identity: IdentityKey,
    /// The operator's name for its relays (shown, never used by path rules: anyone can
    /// write any name).
    pub family: String,
    /// The other relays this relay's operator runs, by identity, sorted, without itself. Two
    /// relays are one family only when each names the other (Tor's rule), so nobody can join
    /// or split another operator's family.
    pub family_members: Vec<IdentityKey>,
    pub addresses: RelayAddresses,
    pub roles: Roles,
    /// The static X25519 key of the relay's Noise links (relay links and, for gateways, the
    /// client link): dialers refuse a listener that cannot prove it.
    pub link_key: LinkPublic,
    /// Sphinx keys for the current and next epochs.
    pub sphinx_keys: Vec<EpochKey>,
    pub exit_policy: ExitPolicy,
    /// Price per packet carried, in the ledger's base unit.
    pub price_per_packet: u64,
    /// Claimed capacity in packets per second. Only an upper bound: the path weight is what
    /// the authorities measured, never more than this claim.
    pub bandwidth: u32,
    /// The Ethereum address a relay that redeems on a chain is paid at (its chain wallet's):
    /// a payer's co-signature names it, and the relay's identity signature over this
    /// descriptor is what binds it to the relay. `None` for a relay that redeems at a ledger.
    pub chain_address: Option<ChainAddress>,
    pub published: UnixTime,
}

/// A 20-byte Ethereum address.
pub type ChainAddress = [u8; 20];

/// Loopix parameters and limits every client and relay obeys; published so all look alike.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetworkParams {
    /// λ_P: the client's Poisson send rate (real or cover), packets per second.
    pub lambda_p: f64,
    /// λ_L: the client's loop-cover rate, per second.
    pub lambda_l: f64,
    /// λ_D: the client's drop-cover rate, per second.
    pub lambda_d: f64,
    /// λ_M: each relay's loop-cover rate, per second.
    pub lambda_m: f64,
    /// μ: per-hop delay rate; the mean hop delay is 1/μ seconds.
    pub mu: f64,
    /// The most a relay holds a packet, in milliseconds (longer requested delays are clamped).
    pub max_hop_delay_ms: u64,
    /// Epoch length in seconds.
    pub epoch_length_s: u64,
    /// The most relays one IPv4 address (or IPv6 /64) may have in the consensus (Tor: 2).
    pub relays_per_address: u32,
}

/// The range every published parameter must lie in, checked when an authority votes, when
/// the consensus is computed and when a client verifies it. Bounds keep one authority (or a
/// bad config) from turning cover traffic off, holding packets for an hour, or publishing
/// values no client can run with.
pub mod bounds {
    /// λ_P (packets per second): cover is always on, so never 0.
    pub const LAMBDA_P: (f64, f64) = (0.01, 10_000.0);
    /// λ_L and λ_D: client loop and drop cover, never 0.
    pub const LAMBDA_COVER: (f64, f64) = (0.001, 1_000.0);
    /// λ_M: relay loop cover; 0 allowed (a network may rely on client cover alone).
    pub const LAMBDA_M: (f64, f64) = (0.0, 1_000.0);
    /// μ: mean hop delays from 10 µs to 10 s.
    pub const MU: (f64, f64) = (0.1, 100_000.0);
    /// The hop-delay cap: 1 ms to 60 s.
    pub const MAX_HOP_DELAY_MS: (u64, u64) = (1, 60_000);
    /// Epochs from 1 s (tests) to a day.
    pub const EPOCH_LENGTH_S: (u64, u64) = (1, 86_400);
    /// Relays per address: 1 to 16.
    pub const RELAYS_PER_ADDRESS: (u32, u32) = (1, 16);
}

impl NetworkParams {
    /// Nym's defaults (REFERENCE.md): 20 ms send gap, 200 ms loop gap, 15 ms per hop.
    pub fn nym_like() -> Self {
        NetworkParams {
            lambda_p: 50.0,
            lambda_l: 5.0,
            lambda_d: 5.0,
            lambda_m: 5.0,
            mu: 1000.0 / 15.0,
            max_hop_delay_ms: 10_000,
            epoch_length_s: 20 * 60,
            relays_per_address: 2,
        }
    }

    /// The mean per-hop delay.
    pub fn mean_hop_delay(&self) -> std::time::Duration {
        if self.mu.is_finite() && self.mu > 0.0 {
            std::time::Duration::try_from_secs_f64(1.0 / self.mu).unwrap_or_default()
        } else {
            std::time::Duration::ZERO
        }
    }

    /// Refuses any parameter outside [`bounds`] (and NaN).
    pub fn validate(&self) -> Result<()> {
        for (name, v, (lo, hi)) in [
            ("lambda_p", self.lambda_p, bounds::LAMBDA_P),
            ("lambda_l", self.lambda_l, bounds::LAMBDA_COVER),
            ("lambda_d", self.lambda_d, bounds::LAMBDA_COVER),
            ("lambda_m", self.lambda_m, bounds::LAMBDA_M),
            ("mu", self.mu, bounds::MU),
        ] {
            if !(v.is_finite() && (lo..=hi).contains(&v)) {
                return Err(Error::Document(format!(
                    "{name} must lie in [{lo}, {hi}], got {v}"
                )));
            }
        }
        for (name, v, (lo, hi)) in [
            (
                "max_hop_delay_ms",
                self.max_hop_delay_ms,
                bounds::MAX_HOP_DELAY_MS,
            ),
            (
                "epoch_length_s",
                self.epoch_length_s,
                bounds::EPOCH_LENGTH_S,
            ),
            (
                "relays_per_address",
                u64::from(self.relays_per_address),
                (
                    u64::from(bounds::RELAYS_PER_ADDRESS.0),
                    u64::from(bounds::RELAYS_PER_ADDRESS.1),
                ),
            ),
        ] {
            if !(lo..=hi).contains(&v) {
                return Err(Error::Document(format!(
                    "{name} must lie in [{lo}, {hi}], got {v}"
                )));
            }
        }
        Ok(())
    }

    /// The epoch `now` falls in.
    pub fn epoch_at(&self, now: UnixTime) -> Epoch {
        let e = now / self.epoch_length_s.max(1);
        Epoch::try_from(e).unwrap_or(Epoch::MAX)
    }
}

/// A relay as the consensus lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConsensusRelay {
    pub identity: IdentityKey,
    pub family: String,
    pub addresses: RelayAddresses,
    pub roles: Roles,
    /// The mix layer (1–3) the authorities assigned, if the relay mixes.
    pub layer: Option<Layer>,
    /// The relay's link key, from its descriptor.
    pub link_key: LinkPublic,
    pub sphinx_keys: Vec<EpochKey>,
    pub exit_policy: ExitPolicy,
    pub price_per_packet: u64,
    /// The relay's claimed capacity (packets per second), from its descriptor.
    pub bandwidth: u32,
    /// The relays of its family that name it back (mutual), sorted.
    pub family_members: Vec<IdentityKey>,
    /// Where the relay is paid on a chain, from its descriptor.
    pub chain_address: Option<ChainAddress>,
    /// The path weight: the median of the authorities' measurements, never above the claim.
    pub weight: u32,
    /// The median of the authorities' performance scores, per mille of test packets that
    /// came back ([`PERFORMANCE_SCALE`]).
    pub performance: u16,
}

impl ConsensusRelay {
    /// The relay's Sphinx key for `epoch`, if it published one.
    pub fn sphinx_key(&self, epoch: Epoch) -> Option<x25519_dalek::PublicKey> {
        self.sphinx_keys
            .iter()
            .find(|k| k.epoch == epoch)
            .map(|k| x25519_dalek::PublicKey::from(k.key))
    }

    /// The relay's ticket commitment for `epoch`, if it published a key for it.
    pub fn payment_commitment(&self, epoch: Epoch) -> Option<[u8; 32]> {
        self.sphinx_keys
            .iter()
            .find(|k| k.epoch == epoch)
            .map(|k| k.payment_commitment)
    }

    /// The relay's Sphinx address (its identity key bytes).
    pub fn address(&self) -> crate::packet::Address {
        crate::packet::Address(self.identity.0)
    }

    /// This relay as a hop of a Sphinx route for `epoch`.
    pub fn route_hop(&self, epoch: Epoch) -> Result<crate::packet::RouteHop> {
        // Lazily: every hop of every packet comes through here, and the message formats
        // the identity byte by byte.
        let sphinx_key = self.sphinx_key(epoch).ok_or_else(|| {
            Error::Path(format!(
                "relay {:?} has no Sphinx key for epoch {epoch}",
                self.identity
            ))
        })?;
        Ok(crate::packet::RouteHop {
            address: self.address(),
            sphinx_key,
        })
    }
}

/// The network's view for one epoch, agreed and signed by the authorities.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Consensus {
    pub schema: u16,
    pub epoch: Epoch,
    /// The document may be used from this time...
    pub valid_after: UnixTime,
    /// ...a newer one should be fetched from this time...
    pub fresh_until: UnixTime,
    /// ...and it must not be used after this time.
    pub valid_until: UnixTime,
    pub params: NetworkParams,
    /// Sorted by identity; identities are unique.
    pub relays: Vec<ConsensusRelay>,
}

impl Consensus {
    /// The relay with this identity.
    pub fn relay(&self, identity: &IdentityKey) -> Option<&ConsensusRelay> {
        self.relays
            .binary_search_by(|r| r.identity.cmp(identity))
            .ok()
            .and_then(|i| self.relays.get(i))
    }

    /// Checks the structure: schema, times in order, parameters, relays sorted and unique,
    /// layers in range.
    pub fn validate(&self) -> Result<()> {
        if self.schema != DIRECTORY_SCHEMA {
            return Err(Error::Document(format!(
                "consensus schema {} is not supported (expected {DIRECTORY_SCHEMA})",
                self.schema
            )));
        }
        if !(self.valid_after <= self.fresh_until && self.fresh_until <= self.valid_until) {
            return Err(Error::Document(
                "validity times out of order (valid-after ≤ fresh-until ≤ valid-until)".into(),
            ));
        }
        self.params.validate()?;
        if self.relays.len() > MAX_RELAYS {
            return Err(Error::Document(format!("more than {MAX_RELAYS} relays")));
        }
        for pair in self.relays.windows(2) {
            if pair[0].identity >= pair[1].identity {
                return Err(Error::Document(
                    "relays must be sorted by identity without duplicates".into(),
                ));
            }
        }
        for r in &self.relays {
            if let Some(layer) = r
                .layer
                .filter(|&l| !(1..=LAYERS as u8).contains(&l) || !r.roles.mix)
            {
                return Err(Error::Document(format!(
                    "relay {:?} has layer {layer} but is not a mix in 1..=3",
                    r.identity
                )));
            }
            if r.family.len() > MAX_FAMILY_LEN {
                return Err(Error::Document("family name too long".into()));
            }
            if r.family_members.len() > MAX_FAMILY_MEMBERS {
                return Err(Error::Document("family lists too many members".into()));
            }
            if r.performance > PERFORMANCE_SCALE {
                return Err(Error::Document(format!(
                    "relay {:?} has performance {} above {PERFORMANCE_SCALE}",
                    r.identity, r.performance
                )));
            }
            if r.weight > r.bandwidth.max(1) {
                return Err(Error::Document(format!(
                    "relay {:?} has weight {} above its claimed {}",
                    r.identity, r.weight, r.bandwidth
                )));
            }
            if r.price_per_packet > MAX_PRICE_PER_PACKET {
                return Err(Error::Document(format!(
                    "relay {:?} has a price above {MAX_PRICE_PER_PACKET}",
                    r.identity
                )));
            }
        }
        Ok(())
    }
}

impl Descriptor {
    /// Checks the structure of a descriptor.
    pub fn validate(&self) -> Result<()> {
        if self.schema != DIRECTORY_SCHEMA {
            return Err(Error::Document(format!(
                "descriptor schema {} is not supported (expected {DIRECTORY_SCHEMA})",
                self.schema
            )));
        }
        if self.family.is_empty() || self.family.len() > MAX_FAMILY_LEN {
            return Err(Error::Document(format!(
                "family must be 1 to {MAX_FAMILY_LEN} bytes"
            )));
        }
        if self.sphinx_keys.is_empty() || self.sphinx_keys.len() > 4 {
            return Err(Error::Document(
                "a descriptor carries 1 to 4 Sphinx keys".into(),
            ));
        }
        if self.roles.gateway && self.addresses.client.is_none() {
            return Err(Error::Document(
                "a gateway must publish a client address".into(),
            ));
        }
        if !(self.roles.gateway || self.roles.mix || self.roles.exit) {
            return Err(Error::Document(
                "a relay must have at least one role".into(),
            ));
        }
        if self.family_members.len() > MAX_FAMILY_MEMBERS {
            return Err(Error::Document(format!(
                "a descriptor names at most {MAX_FAMILY_MEMBERS} family members"
            )));
        }
        if self.family_members.windows(2).any(|w| w[0] >= w[1])
            || self.family_members.contains(&self.identity)
        {
            return Err(Error::Document(
                "family members must be sorted, unique, and not the relay itself".into(),
            ));
        }
        if self.price_per_packet > MAX_PRICE_PER_PACKET {
            return Err(Error::Document(format!(
                "price {} per packet is above {MAX_PRICE_PER_PACKET}",
                self.price_per_packet
            )));
        }
        Ok(())
    }
}

/// The address a relay counts against for the per-address limit: its IPv4 address, or its
/// IPv6 /64 (one host is usually given a whole /64).
pub fn address_key(ip: std::net::IpAddr) -> (u8, u128) {
    match ip {
        std::net::IpAddr::V4(v4) => (4, u128::from(u32::from(v4))),
        std::net::IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => (4, u128::from(u32::from(v4))),
            None => (6, u128::from(v6) >> 64),
        },
    }
}

/// Encodes a document canonically.
pub fn encode<T: Serialize>(doc: &T) -> Result<Vec<u8>> {
    postcard::to_allocvec(doc).map_err(|e| Error::Document(format!("cannot encode: {e}")))
}

/// Decodes a document, refusing trailing bytes and any non-canonical encoding.
pub fn decode<T: Serialize + for<'de> Deserialize<'de>>(bytes: &[u8]) -> Result<T> {
    let (doc, rest) = postcard::take_from_bytes::<T>(bytes)
        .map_err(|e| Error::Document(format!("cannot decode: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Document(format!("{} trailing bytes", rest.len())));
    }
    if encode(&doc)? != bytes {
        return Err(Error::NonCanonical);
    }
    Ok(doc)
}
