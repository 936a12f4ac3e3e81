//! `cargo bench -p murmur-protocol --bench payer`: the client's cost of paying relays (one
//! ticket issued, and the per-hop bookkeeping when no ticket is due) and the gateway's cost
//! of its tab and of the payment control message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_protocol::control::Control;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::payer::{PayeeInfo, Payer, PayerConfig};
use murmur_protocol::tab::{Tab, TabConfig};
use murmur_protocol::ticket::commitment_of;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// 1,000 relays with accounts, as in a client that has used a 1,000-relay consensus.
fn payer_and_relays(rng: &mut ChaCha20Rng, config: PayerConfig) -> (Payer, Vec<PayeeInfo>) {
    let mut payer = Payer::new(SigningKey::generate(rng), config, u64::MAX).unwrap();
    let relays: Vec<PayeeInfo> = (0..1_000u32)
        .map(|i| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            PayeeInfo {
                identity: IdentityKey(id),
                price_per_packet: 1,
                commitment: commitment_of(&[7; 32]),
            }
        })
        .collect();
    for r in &relays {
        payer.carried(r.identity, 1);
    }
    (payer, relays)
}

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let (mut payer, relays) = payer_and_relays(&mut rng, PayerConfig::default());
    let per_ticket = payer.config().packets_per_ticket;
    let mut g = c.benchmark_group("payer");

    // A ticket is due at every call: account lookup, terms, nonce, Ed25519 signature.
    let mut i = 0usize;
    g.bench_function("issue_ticket", |b| {
        b.iter(|| {
            let relay = &relays[i % relays.len()];
            i += 1;
            payer.carried(relay.identity, per_ticket);
            black_box(payer.ticket_for(relay, 1_000, &mut rng).unwrap())
        })
    });

    // What the client pays per hop when no ticket is due (63 calls in 64 by default): a
    // threshold never reached keeps signatures out of the measurement.
    let never = PayerConfig {
        packets_per_ticket: u64::MAX,
        ..PayerConfig::default()
    };
    let (mut payer, _) = payer_and_relays(&mut rng, never);
    let mut i = 0usize;
    g.bench_function("carried_no_ticket", |b| {
        b.iter(|| {
            let relay = &relays[i % relays.len()];
            i += 1;
            payer.carried(relay.identity, 1);
            black_box(payer.ticket_for(black_box(relay), 1_000, &mut rng))
        })
    });
    g.finish();

    let mut g = c.benchmark_group("gateway");
    let mut tab = Tab::new(TabConfig::for_price(1)).unwrap();
    g.bench_function("tab_charge_and_credit", |b| {
        b.iter(|| {
            black_box(tab.charge(black_box(1)));
            tab.credit(black_box(1));
        })
    });
    let (mut payer, relays) = payer_and_relays(&mut rng, PayerConfig::default());
    payer.carried(relays[0].identity, 1_000);
    let ticket = payer.gateway_payment(&relays[0], 1_000, &mut rng).unwrap();
    g.bench_function("payment_encode_decode", |b| {
        b.iter(|| {
            let bytes = Control::Payment {
                ticket: black_box(ticket),
            }
            .encode();
            black_box(Control::decode(&bytes).unwrap())
        })
    });
    g.finish();
}

criterion_group!(benches_group, benches);
criterion_main!(benches_group);
