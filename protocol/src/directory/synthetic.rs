//! Generated networks: a consensus of relays with fresh keys, for the simulator, benchmarks
//! and tests. Every relay gets its own family and its own /16, so the path rules hold.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ed25519_dalek::SigningKey;
use rand::CryptoRng;
use x25519_dalek::{PublicKey, StaticSecret};

use sha2::{Digest, Sha256};

use crate::link::LinkSecret;
use crate::ticket::{commitment_of, reveal_from_secret};

use super::{
    Consensus, ConsensusRelay, DIRECTORY_SCHEMA, Epoch, EpochKey, ExitPolicy, IdentityKey,
    NetworkParams, RelayAddresses, Roles,
};

/// The shape of a generated network.
#[derive(Clone, Debug)]
pub struct SyntheticNetwork {
    pub mixes_per_layer: usize,
    pub gateways: usize,
    pub exits: usize,
    pub params: NetworkParams,
    pub epoch: Epoch,
}

/// A generated relay's secrets, for tests that process packets.
pub struct SyntheticKeys {
    pub identity: SigningKey,
    pub sphinx: StaticSecret,
    pub link: LinkSecret,
}

/// A generated relay's link key, derived from its identity so that adding it left the RNG's
/// sequence (and so every seeded simulation) as it was.
fn link_secret_of(identity: &SigningKey) -> LinkSecret {
    let mut h = Sha256::new();
    h.update(b"murmur synthetic link key");
    h.update(identity.to_bytes());
    LinkSecret::from_bytes(h.finalize().into())
}

impl SyntheticKeys {
    /// The relay's ticket reveal (derived from its Sphinx secret, as a real relay's is).
    pub fn payment_reveal(&self) -> zeroize::Zeroizing<[u8; 32]> {
        reveal_from_secret(self.sphinx.as_bytes())
    }
}

fn payment_commitment(sphinx: &StaticSecret) -> [u8; 32] {
    commitment_of(&reveal_from_secret(sphinx.as_bytes()))
}

/// Generates the consensus (sorted by identity) and every relay's secrets, in the same order.
pub fn generate<R: CryptoRng + ?Sized>(
    rng: &mut R,
    net: &SyntheticNetwork,
) -> (Consensus, Vec<SyntheticKeys>) {
    let mut relays: Vec<(ConsensusRelay, SyntheticKeys)> = Vec::new();
    let mut add = |rng: &mut R, roles: Roles, layer: Option<u8>| {
        let n = relays.len() as u32;
        let identity = SigningKey::generate(rng);
        let sphinx = StaticSecret::random_from_rng(rng);
        // One /16 per relay (for up to 51,200 relays): the index spread over the first two
        // octets.
        let ip = IpAddr::V4(Ipv4Addr::new(
            1 + (n / 256 % 200) as u8,
            (n % 256) as u8,
            0,
            1,
        ));
        let link = link_secret_of(&identity);
        let relay = ConsensusRelay {
            identity: IdentityKey::of(&identity),
            link_key: link.public(),
            family: format!("family-{n}"),
            addresses: RelayAddresses {
                mix: SocketAddr::new(ip, 1789),
                client: roles.gateway.then_some(SocketAddr::new(ip, 9000)),
            },
            roles,
            layer,
            sphinx_keys: vec![EpochKey {
                epoch: net.epoch,
                key: PublicKey::from(&sphinx).to_bytes(),
                payment_commitment: payment_commitment(&sphinx),
            }],
            exit_policy: if roles.exit {
                ExitPolicy::parse("accept *:*", true).unwrap_or_default()
            } else {
                ExitPolicy::reject_all()
            },
            price_per_packet: 1,
            bandwidth: 1000,
            chain_address: None,
            family_members: Vec::new(),
            weight: 1000,
            performance: super::PERFORMANCE_SCALE,
        };
        relays.push((
            relay,
            SyntheticKeys {
                identity,
                sphinx,
                link,
            },
        ));
    };
    for layer in 1..=3u8 {
        for _ in 0..net.mixes_per_layer {
            add(
                rng,
                Roles {
                    mix: true,
                    ..Roles::default()
                },
                Some(layer),
            );
        }
    }
    for _ in 0..net.gateways {
        add(
            rng,
            Roles {
                gateway: true,
                ..Roles::default()
            },
            None,
        );
    }
    for _ in 0..net.exits {
        add(
            rng,
            Roles {
                exit: true,
                ..Roles::default()
            },
            None,
        );
    }
    relays.sort_by_key(|r| r.0.identity);
    let (relays, keys) = relays.into_iter().unzip();
    let start = u64::from(net.epoch) * net.params.epoch_length_s;
    let consensus = Consensus {
        schema: DIRECTORY_SCHEMA,
        epoch: net.epoch,
        valid_after: start,
        fresh_until: start + net.params.epoch_length_s,
        valid_until: start + 2 * net.params.epoch_length_s,
        params: net.params,
        relays,
    };
    (consensus, keys)
}

/// Descriptors of generated relays, as the relays would upload them: each signed by its own
/// identity key, published at `published`, listing its Sphinx public key under each of
/// `epochs` (a generated relay has one Sphinx secret; tests of the directory need keys for
/// several epochs, not distinct ones).
pub fn signed_descriptors(
    consensus: &Consensus,
    keys: &[SyntheticKeys],
    epochs: &[Epoch],
    published: super::UnixTime,
) -> crate::Result<Vec<super::SignedDescriptor>> {
    consensus
        .relays
        .iter()
        .zip(keys)
        .map(|(r, k)| {
            let key = PublicKey::from(&k.sphinx).to_bytes();
            let payment_commitment = payment_commitment(&k.sphinx);
            let descriptor = super::Descriptor {
                schema: DIRECTORY_SCHEMA,
                identity: r.identity,
                family: r.family.clone(),
                family_members: r.family_members.clone(),
                addresses: r.addresses,
                roles: r.roles,
                link_key: r.link_key,
                sphinx_keys: epochs
                    .iter()
                    .map(|&epoch| EpochKey {
                        epoch,
                        key,
                        payment_commitment,
                    })
                    .collect(),
                exit_policy: r.exit_policy.clone(),
                price_per_packet: r.price_per_packet,
                bandwidth: r.bandwidth,
                chain_address: None,
                published,
            };
            super::SignedDescriptor::sign(&descriptor, &k.identity)
        })
        .collect()
}
