//! Replays this crate's fuzz targets' corpora (`fuzz/corpus/<target>/`) and seeds built
//! here on stable (`murmur_protocol::fuzz_entry::replay`).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_ledger::fuzz_entry::{self, TARGETS};
use murmur_ledger::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::fuzz_entry::replay_targets;
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use murmur_service::uncomment_example;

const EXAMPLE: &str = include_str!("../ledger.example.toml");

/// `[operation][JSON]` of a request signed by `key`.
fn request<T: Operation>(which: u8, op: T, key: &SigningKey) -> Vec<u8> {
    let mut out = vec![which];
    out.extend(serde_json::to_vec(&Signed::with_nonce(op, key, 1_000, [7; 16])).unwrap());
    out
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let key = SigningKey::from_bytes(&[5; 32]);
    match target {
        "ledger_request" => {
            let ticket = Ticket::sign(
                TicketFields {
                    recipient: IdentityKey::of(&key),
                    face_value: 1_000,
                    win_ratio: u64::MAX,
                    nonce: [1; 16],
                    issued: 1_000,
                    expiry: 2_000,
                    commitment: commitment_of(&[2; 32]),
                },
                &SigningKey::from_bytes(&[6; 32]),
            );
            let fund = Fund {
                pot: IdentityKey::of(&key),
                balance: 10,
                escrow: 20,
            };
            let mut forged = request(0, fund, &key);
            let at = forged.len() - 10;
            forged[at] = if forged[at] == b'0' { b'1' } else { b'0' };
            vec![
                request(0, fund, &key),
                request(1, Warn { amount: 5 }, &key),
                request(2, Withdraw { amount: 5 }, &key),
                request(
                    3,
                    Redeem {
                        ticket,
                        reveal: [2; 32],
                    },
                    &key,
                ),
                forged,
            ]
        }
        "ledger_config" => vec![
            EXAMPLE.as_bytes().to_vec(),
            uncomment_example(EXAMPLE).into_bytes(),
        ],
        other => panic!("no seeds for {other}"),
    }
}

#[test]
fn every_target_replays_its_corpus_and_seeds() {
    replay_targets("murmur_ledger", TARGETS, seeds, fuzz_entry::run);
}
