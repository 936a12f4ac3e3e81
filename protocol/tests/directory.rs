//! The signed directory: encodings round-trip, every way a consensus can be bad is refused
//! with its own error, and path selection never breaks a rule.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use ed25519_dalek::SigningKey;
use murmur_protocol::Error;
use murmur_protocol::directory::path::{ExitTarget, PathRules, PathSelector, subnet};
use murmur_protocol::directory::sign::Freshness;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
use murmur_protocol::directory::{
    AuthoritySet, Consensus, ConsensusRelay, DIRECTORY_SCHEMA, Descriptor, DocumentKind, EpochKey,
    ExitPolicy, IdentityKey, NetworkParams, RelayAddresses, Roles, SignedConsensus,
    SignedDescriptor, decode, encode, sign_document,
};
use murmur_protocol::link::LinkPublic;
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

struct Fixture {
    consensus: Consensus,
    authorities: Vec<SigningKey>,
    set: AuthoritySet,
    at: Freshness,
}

fn fixture(seed: u64) -> Fixture {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let net = SyntheticNetwork {
        mixes_per_layer: 3,
        gateways: 1,
        exits: 1,
        params: NetworkParams::nym_like(),
        epoch: 100,
    };
    let (consensus, _) = generate(&mut rng, &net);
    let authorities: Vec<SigningKey> = (0..3).map(|_| SigningKey::generate(&mut rng)).collect();
    let set = AuthoritySet::new(authorities.iter().map(IdentityKey::of).collect()).unwrap();
    let at = Freshness {
        now: consensus.valid_after + 10,
        expected_epoch: Some(100),
        clock_skew_s: 30,
    };
    Fixture {
        consensus,
        authorities,
        set,
        at,
    }
}

fn signed_by(consensus: &Consensus, keys: &[&SigningKey]) -> SignedConsensus {
    let mut doc = SignedConsensus::unsigned(consensus).unwrap();
    for k in keys {
        doc.add_signature(sign_document(DocumentKind::Consensus, &doc.body, k));
    }
    doc
}

#[test]
fn a_majority_signed_consensus_verifies() {
    let f = fixture(1);
    let all: Vec<&SigningKey> = f.authorities.iter().collect();
    let verified = signed_by(&f.consensus, &all).verify(&f.set, f.at).unwrap();
    assert_eq!(verified.consensus, f.consensus);
    assert_eq!(verified.signers.len(), 3);
    // Two of three is a strict majority.
    let two = signed_by(&f.consensus, &all[..2]);
    assert_eq!(two.verify(&f.set, f.at).unwrap().signers.len(), 2);
    // Transport encoding round-trips.
    let bytes = encode(&two).unwrap();
    assert_eq!(decode::<SignedConsensus>(&bytes).unwrap(), two);
}

#[test]
fn each_bad_consensus_is_refused_with_its_own_error() {
    let f = fixture(2);
    let all: Vec<&SigningKey> = f.authorities.iter().collect();

    // One of three signatures.
    let one = signed_by(&f.consensus, &all[..1]);
    assert_eq!(
        one.verify(&f.set, f.at).unwrap_err(),
        Error::NotEnoughSignatures {
            valid: 1,
            needed: 2
        }
    );

    // A forged signature: the attacker claims authority 2 and 3 signed, with garbage.
    let mut forged = signed_by(&f.consensus, &all[..1]);
    for a in &f.authorities[1..] {
        let mut sig = sign_document(DocumentKind::Consensus, &forged.body, a);
        sig.signature[7] ^= 1;
        forged.add_signature(sig);
    }
    assert!(matches!(
        forged.verify(&f.set, f.at),
        Err(Error::ForgedSignature { .. })
    ));

    // A tampered body: signed, then changed.
    let mut tampered = signed_by(&f.consensus, &all);
    let mut changed = f.consensus.clone();
    changed.relays[0].bandwidth += 1;
    tampered.body = encode(&changed).unwrap();
    assert!(matches!(
        tampered.verify(&f.set, f.at),
        Err(Error::BodyTampered { .. })
    ));

    // Signatures by keys that are not authorities.
    let mut rng = ChaCha20Rng::seed_from_u64(99);
    let strangers: Vec<SigningKey> = (0..2).map(|_| SigningKey::generate(&mut rng)).collect();
    let mut unknown = signed_by(&f.consensus, &all[..1]);
    for s in &strangers {
        unknown.add_signature(sign_document(DocumentKind::Consensus, &unknown.body, s));
    }
    assert!(matches!(
        unknown.verify(&f.set, f.at),
        Err(Error::UnknownSigner { .. })
    ));

    // Expired (beyond the skew allowance) and not yet valid.
    let good = signed_by(&f.consensus, &all);
    let late = Freshness {
        now: f.consensus.valid_until + 31,
        ..f.at
    };
    assert!(matches!(
        good.verify(&f.set, late),
        Err(Error::Expired { .. })
    ));
    let within_skew = Freshness {
        now: f.consensus.valid_until + 30,
        ..f.at
    };
    assert!(good.verify(&f.set, within_skew).is_ok());
    let early = Freshness {
        now: f.consensus.valid_after - 31,
        ..f.at
    };
    assert!(matches!(
        good.verify(&f.set, early),
        Err(Error::NotYetValid { .. })
    ));

    // Another epoch.
    let other_epoch = Freshness {
        expected_epoch: Some(101),
        ..f.at
    };
    assert_eq!(
        good.verify(&f.set, other_epoch).unwrap_err(),
        Error::WrongEpoch {
            expected: 101,
            got: 100
        }
    );

    // The errors are distinct as metric labels too.
    let labels = [
        one.verify(&f.set, f.at).unwrap_err().label(),
        forged.verify(&f.set, f.at).unwrap_err().label(),
        tampered.verify(&f.set, f.at).unwrap_err().label(),
        unknown.verify(&f.set, f.at).unwrap_err().label(),
        good.verify(&f.set, late).unwrap_err().label(),
        good.verify(&f.set, other_epoch).unwrap_err().label(),
    ];
    let mut unique = labels.to_vec();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), labels.len(), "{labels:?}");
}

#[test]
fn non_canonical_and_trailing_bytes_are_refused() {
    let f = fixture(3);
    let mut bytes = encode(&f.consensus).unwrap();
    bytes.push(0);
    assert!(matches!(
        decode::<Consensus>(&bytes),
        Err(Error::Document(_))
    ));
    // postcard varints: the schema (2) re-encoded with a redundant continuation byte.
    let canonical = encode(&f.consensus).unwrap();
    assert_eq!(u16::from(canonical[0]), DIRECTORY_SCHEMA);
    let mut overlong = vec![0x80 | canonical[0], 0x00];
    overlong.extend_from_slice(&canonical[1..]);
    assert!(decode::<Consensus>(&overlong).is_err());
}

#[test]
fn descriptors_are_signed_by_their_relay() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let key = SigningKey::generate(&mut rng);
    let descriptor = Descriptor {
        schema: DIRECTORY_SCHEMA,
        identity: IdentityKey::of(&key),
        family: "op-a".into(),
        family_members: vec![IdentityKey([1; 32])],
        addresses: RelayAddresses {
            mix: "127.0.0.1:1789".parse().unwrap(),
            client: Some("127.0.0.1:9000".parse().unwrap()),
        },
        roles: Roles {
            gateway: true,
            mix: false,
            exit: false,
        },
        link_key: LinkPublic([3; 32]),
        sphinx_keys: vec![EpochKey {
            epoch: 5,
            key: [9; 32],
            payment_commitment: [8; 32],
        }],
        exit_policy: ExitPolicy::reject_all(),
        price_per_packet: 10,
        bandwidth: 500,
        chain_address: None,
        published: 1_700_000_000,
    };
    let signed = SignedDescriptor::sign(&descriptor, &key).unwrap();
    assert_eq!(signed.verify().unwrap(), descriptor);
    // Another key cannot sign for this relay.
    let other = SigningKey::generate(&mut rng);
    assert!(SignedDescriptor::sign(&descriptor, &other).is_err());
    let mut stolen = signed.clone();
    stolen.signature = sign_document(DocumentKind::Descriptor, &signed.body, &other);
    assert!(matches!(stolen.verify(), Err(Error::UnknownSigner { .. })));
    let mut tampered = signed;
    tampered.body[10] ^= 1;
    assert!(matches!(tampered.verify(), Err(Error::BodyTampered { .. })));
}

// ---- path selection ----

fn relay(
    n: u8,
    family: u8,
    subnet_octet: u8,
    roles: Roles,
    layer: Option<u8>,
    bandwidth: u32,
) -> ConsensusRelay {
    let mut identity = [0u8; 32];
    identity[0] = n;
    ConsensusRelay {
        identity: IdentityKey(identity),
        family: format!("f{family}"),
        addresses: RelayAddresses {
            mix: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(20, subnet_octet, n, 1)), 1789),
            client: roles.gateway.then(|| "127.0.0.1:9000".parse().unwrap()),
        },
        roles,
        layer,
        link_key: LinkPublic([n; 32]),
        sphinx_keys: vec![EpochKey {
            epoch: 7,
            key: [1; 32],
            payment_commitment: [2; 32],
        }],
        exit_policy: ExitPolicy::parse("accept *:443", false).unwrap(),
        price_per_packet: 1,
        bandwidth,
        chain_address: None,
        family_members: Vec::new(),
        weight: bandwidth,
        performance: 1000,
    }
}

/// Relays of one family name list each other (mutually), as their operators would.
fn mutual_families(relays: &mut [ConsensusRelay]) {
    let all: Vec<(IdentityKey, String)> = relays
        .iter()
        .map(|r| (r.identity, r.family.clone()))
        .collect();
    for r in relays.iter_mut() {
        r.family_members = all
            .iter()
            .filter(|(id, f)| *f == r.family && *id != r.identity)
            .map(|(id, _)| *id)
            .collect();
        r.family_members.sort();
    }
}

fn arb_directory() -> impl Strategy<Value = Consensus> {
    // (family, subnet, layer, bandwidth) for up to 12 mixes, over few families/subnets so
    // conflicts are common.
    // Prices and performance scores vary too, for the preference properties.
    proptest::collection::vec(
        (0u8..5, 0u8..4, 1u8..=3, 0u32..100, 1u64..10, 0u16..=1000),
        3..12,
    )
    .prop_flat_map(|specs| (Just(specs), (1u64..10, 0u16..=1000, 0u16..=1000)))
    .prop_map(|(specs, (gw_price, gw_perf, exit_perf))| {
        let mut relays: Vec<ConsensusRelay> = specs
            .iter()
            .enumerate()
            .map(|(i, &(family, sub, layer, bw, price, performance))| {
                let roles = Roles {
                    mix: true,
                    ..Roles::default()
                };
                let mut r = relay(i as u8 + 1, family, sub, roles, Some(layer), bw);
                r.price_per_packet = price;
                r.performance = performance;
                r
            })
            .collect();
        let mut gateway = relay(
            200,
            9,
            200,
            Roles {
                gateway: true,
                ..Roles::default()
            },
            None,
            10,
        );
        gateway.price_per_packet = gw_price;
        gateway.performance = gw_perf;
        relays.push(gateway);
        let mut exit = relay(
            201,
            10,
            201,
            Roles {
                exit: true,
                ..Roles::default()
            },
            None,
            10,
        );
        exit.price_per_packet = 1;
        exit.performance = exit_perf;
        relays.push(exit);
        mutual_families(&mut relays);
        relays.sort_by_key(|r| r.identity);
        Consensus {
            schema: DIRECTORY_SCHEMA,
            epoch: 7,
            valid_after: 0,
            fresh_until: 10,
            valid_until: 20,
            params: NetworkParams::nym_like(),
            relays,
        }
    })
}

fn breaks_rules(path: &[&ConsensusRelay]) -> bool {
    for (i, a) in path.iter().enumerate() {
        for b in &path[i + 1..] {
            if a.identity == b.identity
                || a.family_members.contains(&b.identity)
                || subnet(a.addresses.mix.ip()) == subnet(b.addresses.mix.ip())
            {
                return true;
            }
        }
    }
    false
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn consensus_encoding_round_trips(dir in arb_directory()) {
        let bytes = encode(&dir).unwrap();
        prop_assert_eq!(decode::<Consensus>(&bytes).unwrap(), dir);
    }

    #[test]
    fn exit_policies_print_and_parse_back(
        rules in proptest::collection::vec(
            (any::<bool>(), 0u8..6, any::<[u8; 4]>(), 0u8..=32, 1u16..1000, 0u16..1000), 0..8)
    ) {
        let text: Vec<String> = rules.iter().map(|(accept, kind, ip, bits, lo, span)| {
            let action = if *accept { "accept" } else { "reject" };
            let addr = match kind {
                0 => "*".to_string(),
                1 => "*4".to_string(),
                2 => "*6".to_string(),
                3 => "private".to_string(),
                4 => format!("{}.{}.{}.{}/{}", ip[0], ip[1], ip[2], ip[3], bits),
                _ => format!("[2001:db8::{:x}]/{}", ip[0], 32 + bits),
            };
            format!("{action} {addr}:{}-{}", lo, lo + span)
        }).collect();
        let policy = ExitPolicy::parse(&text.join(", "), true).unwrap();
        let again = ExitPolicy::parse(&policy.to_string(), true).unwrap();
        prop_assert_eq!(&again, &policy);
        prop_assert_eq!(again.to_string(), policy.to_string());
    }

    /// A client with a price cap and a performance floor never gets a relay outside them,
    /// and when nothing fits it gets an error that names the preferences.
    #[test]
    fn paths_honour_the_price_cap_and_performance_floor(
        dir in arb_directory(),
        cap in 1u64..10,
        floor in 0u16..=1000,
        seed: u64,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let rules = PathRules {
            max_price_per_hop: Some(cap),
            min_performance: floor,
            ..PathRules::default()
        };
        let fits = |r: &ConsensusRelay| r.price_per_packet <= cap && r.performance >= floor;
        let selector = PathSelector::new(&dir, rules);
        let gateway = match selector.choose_gateway(&mut rng) {
            Ok(g) => g,
            Err(e) => {
                prop_assert!(!dir.relays.iter().any(|r| r.roles.gateway && fits(r)));
                prop_assert!(e.to_string().contains("path preferences"), "{}", e);
                return Ok(());
            }
        };
        prop_assert!(fits(gateway));
        match selector.choose_exit(&mut rng, ExitTarget::HostPort(443), &[gateway]) {
            Ok(exit) => prop_assert!(fits(exit)),
            Err(e) => {
                prop_assert!(!dir.relays.iter().any(|r| r.roles.exit && fits(r)));
                prop_assert!(e.to_string().contains("path preferences"), "{}", e);
            }
        }
        for _ in 0..8 {
            match selector.mix_path(&mut rng, &[gateway]) {
                Ok(path) => prop_assert!(path.iter().all(|r| fits(r)), "{:?}", path),
                Err(e) => {
                    // A layer the consensus leaves empty is reported as such; otherwise an
                    // error for a layer the preferences emptied names the preferences.
                    let listed = |l: u8| dir.relays.iter().any(|r| r.layer == Some(l));
                    let emptied = (1..=3u8)
                        .any(|l| listed(l) && !dir.relays.iter().any(|r| r.layer == Some(l) && fits(r)));
                    if emptied && (1..=3u8).all(listed) {
                        prop_assert!(e.to_string().contains("path preferences"), "{}", e);
                    }
                    break;
                }
            }
        }
    }

    #[test]
    fn paths_never_break_a_rule(dir in arb_directory(), seed: u64) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let selector = PathSelector::new(&dir, PathRules::default());
        let gateway = selector.choose_gateway(&mut rng).unwrap();
        match selector.mix_path(&mut rng, &[gateway]) {
            Ok(path) => {
                for (i, r) in path.iter().enumerate() {
                    prop_assert_eq!(r.layer, Some(i as u8 + 1));
                }
                let mut all = path.to_vec();
                all.push(gateway);
                prop_assert!(!breaks_rules(&all), "{:?}", all);
            }
            Err(e) => {
                // An error must mean no valid path exists.
                let mut exists = false;
                for a in selector.layer(1) { for b in selector.layer(2) { for c in selector.layer(3) {
                    if !breaks_rules(&[*a, *b, *c, gateway]) { exists = true; }
                }}}
                prop_assert!(!exists, "selector failed ({}) though a valid path exists", e);
            }
        }
    }

    /// A selector narrowed with `excluding` (a client avoiding relays it saw fail) draws from
    /// what is left, under the same rules: its per-layer index is rebuilt, not left stale.
    #[test]
    fn excluded_relays_stay_out_of_paths(dir in arb_directory(), pick in any::<usize>(), seed: u64) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let mixes: Vec<_> = dir.relays.iter().filter(|r| r.roles.mix).collect();
        prop_assume!(!mixes.is_empty());
        let excluded = mixes[pick % mixes.len()].identity;
        let full = PathSelector::new(&dir, PathRules::default());
        let gateway = full.choose_gateway(&mut rng).unwrap();
        let selector = full.clone().excluding(&[excluded]);
        let alone = |l: usize| full.layer(l).len() == 1 && full.layer(l)[0].identity == excluded;
        for _ in 0..16 {
            let Ok(path) = selector.mix_path(&mut rng, &[gateway]) else { break };
            let mut all = path.to_vec();
            all.push(gateway);
            prop_assert!(!breaks_rules(&all), "{:?}", all);
            for (i, r) in path.iter().enumerate() {
                // A layer whose only relay is excluded keeps it (better than no path at all).
                prop_assert!(r.identity != excluded || alone(i + 1), "{:?}", path);
            }
        }
    }
}

#[test]
fn exits_are_chosen_by_policy_and_bandwidth_weights_choices() {
    let mut relays = vec![
        relay(
            1,
            1,
            1,
            Roles {
                mix: true,
                ..Roles::default()
            },
            Some(1),
            1,
        ),
        relay(
            2,
            2,
            2,
            Roles {
                mix: true,
                ..Roles::default()
            },
            Some(1),
            99,
        ),
        relay(
            3,
            3,
            3,
            Roles {
                mix: true,
                ..Roles::default()
            },
            Some(2),
            1,
        ),
        relay(
            4,
            4,
            4,
            Roles {
                mix: true,
                ..Roles::default()
            },
            Some(3),
            1,
        ),
        relay(
            5,
            5,
            5,
            Roles {
                exit: true,
                ..Roles::default()
            },
            None,
            1,
        ),
    ];
    relays.sort_by_key(|r| r.identity);
    let dir = Consensus {
        schema: DIRECTORY_SCHEMA,
        epoch: 7,
        valid_after: 0,
        fresh_until: 10,
        valid_until: 20,
        params: NetworkParams::nym_like(),
        relays,
    };
    let selector = PathSelector::new(&dir, PathRules::default());
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let exit = selector
        .choose_exit(&mut rng, ExitTarget::HostPort(443), &[])
        .unwrap();
    assert_eq!(exit.identity.0[0], 5);
    assert_eq!(
        selector.choose_exit(&mut rng, ExitTarget::HostPort(22), &[]),
        Err(Error::NoExit)
    );
    assert_eq!(
        selector.choose_exit(
            &mut rng,
            ExitTarget::Ip("127.0.0.1".parse().unwrap(), 443),
            &[]
        ),
        Err(Error::NoExit)
    );
    let heavy = (0..2000)
        .filter(|_| selector.mix_path(&mut rng, &[exit]).unwrap()[0].identity.0[0] == 2)
        .count();
    // Weight 99 of 100: expect ~1980.
    assert!(heavy > 1940, "{heavy}");
}

#[test]
fn generated_networks_support_paths() {
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let net = SyntheticNetwork {
        mixes_per_layer: 10,
        gateways: 2,
        exits: 2,
        params: NetworkParams::nym_like(),
        epoch: 3,
    };
    let (consensus, keys) = generate(&mut rng, &net);
    consensus.validate().unwrap();
    assert_eq!(keys.len(), 34);
    let selector = PathSelector::new(&consensus, PathRules::default());
    let gateway = selector.choose_gateway(&mut rng).unwrap();
    let exit = selector
        .choose_exit(&mut rng, ExitTarget::HostPort(80), &[gateway])
        .unwrap();
    let path = selector.mix_path(&mut rng, &[gateway, exit]).unwrap();
    for (i, r) in path.iter().enumerate() {
        assert!(r.route_hop(3).is_ok());
        assert_eq!(r.layer, Some(i as u8 + 1));
    }
    assert!(path[0].route_hop(4).is_err(), "no key for another epoch");
}
