//! `cargo bench -p murmur-ledger --bench ledger`: ticket signing, a relay's ticket checks,
//! the win test, and redemptions at the ledger (each one durable write transaction).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ed25519_dalek::SigningKey;
use murmur_ledger::request::{Fund, Redeem, Signed};
use murmur_ledger::{Ledger, Params};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::ticket::{Terms, Ticket, TicketFields, commitment_of};

const NOW: u64 = 1_700_000_000;
const REVEAL: [u8; 32] = [7; 32];

fn fields(recipient: IdentityKey, win_ratio: u64, n: u64) -> TicketFields {
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&n.to_be_bytes());
    TicketFields {
        recipient,
        face_value: 1,
        win_ratio,
        nonce,
        issued: NOW,
        expiry: NOW + 3600,
        commitment: commitment_of(&REVEAL),
    }
}

fn benches(c: &mut Criterion) {
    let (payer, relay) = (
        SigningKey::from_bytes(&[1; 32]),
        SigningKey::from_bytes(&[2; 32]),
    );
    let relay_id = IdentityKey::of(&relay);
    let terms = Terms::for_expected_value(1_000, 1_000_000).unwrap();
    let ticket = Ticket::sign(
        TicketFields {
            face_value: terms.face_value,
            ..fields(relay_id, terms.win_ratio, 0)
        },
        &payer,
    );

    c.bench_function("ticket: sign", |b| {
        b.iter(|| Ticket::sign(black_box(ticket.fields()), &payer))
    });
    c.bench_function(
        "ticket: relay checks (recipient, times, value, signature)",
        |b| {
            b.iter(|| {
                black_box(ticket)
                    .check_for_recipient(&relay_id, NOW, 1_000)
                    .unwrap()
            })
        },
    );
    c.bench_function("ticket: win test (commitment + win hash)", |b| {
        b.iter(|| black_box(ticket).is_winner(&REVEAL))
    });
    c.bench_function("ticket: encode + decode", |b| {
        b.iter(|| Ticket::decode(&black_box(ticket).encode()).unwrap())
    });

    let dir = tempfile::tempdir().unwrap();
    let params = Params {
        notice_period_s: 60,
        request_window_s: 60,
    };
    let ledger = Ledger::open(
        &dir.path().join("bench.redb"),
        params,
        &[(IdentityKey::of(&payer), u64::MAX / 2)],
    )
    .unwrap();
    let fund = Fund {
        pot: IdentityKey::of(&payer),
        balance: u64::MAX / 4,
        escrow: u64::MAX / 8,
    };
    ledger
        .fund_at(&Signed::new(fund, &payer, NOW), NOW)
        .unwrap();
    let mut n = 0u64;
    let mut group = c.benchmark_group("ledger");
    group.sample_size(30);
    group.bench_function(
        "redeem (2 signature checks + 1 fsync'd write transaction)",
        |b| {
            b.iter_batched(
                || {
                    n += 1;
                    let t = Ticket::sign(fields(relay_id, u64::MAX, n), &payer);
                    Signed::new(
                        Redeem {
                            ticket: t,
                            reveal: REVEAL,
                        },
                        &relay,
                        NOW,
                    )
                },
                |req| ledger.redeem_at(&req, NOW).unwrap(),
                BatchSize::SmallInput,
            )
        },
    );
    group.finish();
    println!("audit after the run: {:?}", ledger.audit().unwrap());
}

criterion_group! {
    name = ledger;
    config = Criterion::default().measurement_time(Duration::from_secs(4)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(ledger);
