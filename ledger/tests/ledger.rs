//! The ledger directly, on a temporary redb file: money is conserved over random operation
//! sequences (`sum(accounts) + sum(pot balances + escrows) + burned == genesis`), a refusal
//! changes nothing, and a reopened database holds the same pots, accounts and redeemed set.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_ledger::request::{Fund, Redeem, Signed, Warn, Withdraw};
use murmur_ledger::{Audit, Ledger, Params, Refusal};
use murmur_protocol::directory::{IdentityKey, UnixTime};
use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};
use proptest::prelude::*;

const PARAMS: Params = Params {
    notice_period_s: 100,
    request_window_s: 60,
};
const START: UnixTime = 1_700_000_000;
const REVEAL: [u8; 32] = [5; 32];
/// Payers 0..3 hold genesis money and pots; relays 3..5 are paid.
const PAYERS: u8 = 3;
const GENESIS_EACH: u64 = 10_000;

fn key(i: u8) -> SigningKey {
    SigningKey::from_bytes(&[i + 1; 32])
}

fn id(i: u8) -> IdentityKey {
    IdentityKey::of(&key(i))
}

fn genesis() -> Vec<(IdentityKey, u64)> {
    (0..PAYERS).map(|i| (id(i), GENESIS_EACH)).collect()
}

#[derive(Clone, Debug)]
enum Op {
    Fund {
        from: u8,
        pot: u8,
        balance: u64,
        escrow: u64,
    },
    Warn {
        pot: u8,
        amount: u64,
    },
    /// `None`: exactly the amount warned.
    Withdraw {
        pot: u8,
        amount: Option<u64>,
    },
    Redeem {
        pot: u8,
        relay: u8,
        face: u64,
        nonce: u8,
        wins: bool,
        expired: bool,
    },
    /// The previous signed request again.
    Replay,
    Wait(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..PAYERS, 0..PAYERS, 0..3_000u64, 0..3_000u64).prop_map(
            |(from, pot, balance, escrow)| Op::Fund {
                from,
                pot,
                balance,
                escrow
            }
        ),
        2 => (0..PAYERS, 0..4_000u64).prop_map(|(pot, amount)| Op::Warn { pot, amount }),
        2 => (0..PAYERS, prop::option::of(0..4_000u64))
            .prop_map(|(pot, amount)| Op::Withdraw { pot, amount }),
        3 => (
            0..PAYERS + 1,
            PAYERS..PAYERS + 2,
            0..3_000u64,
            0..3u8,
            prop::bool::weighted(0.8),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(pot, relay, face, nonce, wins, expired)| Op::Redeem {
                pot,
                relay,
                face,
                nonce,
                wins,
                expired,
            }),
        1 => Just(Op::Replay),
        2 => (0..300u64).prop_map(Op::Wait),
    ]
}

/// A request of any kind, kept for replaying.
enum Last {
    Fund(Signed<Fund>),
    Warn(Signed<Warn>),
    Withdraw(Signed<Withdraw>),
    Redeem(Signed<Redeem>),
}

fn ticket(pot: u8, relay: u8, face: u64, nonce: u8, wins: bool, now: UnixTime) -> Ticket {
    Ticket::sign(
        TicketFields {
            recipient: id(relay),
            face_value: face,
            win_ratio: if wins { u64::MAX } else { 0 },
            nonce: [nonce; 16],
            issued: now,
            expiry: now + 30,
            commitment: commitment_of(&REVEAL),
        },
        &key(pot),
    )
}

/// Accounts' balances, pots' (balance, escrow), and the audit.
type Holdings = (Vec<u64>, Vec<Option<(u64, u64)>>, Audit);

/// Every balance the test's keys hold, for "nothing changed".
fn holdings(l: &Ledger) -> Holdings {
    let accounts = (0..PAYERS + 2)
        .map(|i| l.read_account(&id(i)).unwrap().balance)
        .collect();
    let pots = (0..PAYERS + 1)
        .map(|i| l.read_pot(&id(i)).ok().map(|p| (p.balance, p.escrow)))
        .collect();
    (accounts, pots, l.audit().unwrap())
}

fn run(l: &Ledger, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut now = START;
    let mut last: Option<Last> = None;
    let mut stamp = 0u64;
    // The model of the redeemed set: a ticket (its digest) is paid once, whatever other
    // tickets share its pot and nonce.
    let mut redeemed = std::collections::HashSet::new();
    for op in ops {
        let before = holdings(l);
        // Each request gets a distinct nonce; Replay re-sends the previous one as it was.
        stamp += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&stamp.to_be_bytes());
        let result: Result<(), murmur_ledger::Error> = match op.clone() {
            Op::Fund {
                from,
                pot,
                balance,
                escrow,
            } => {
                let req = Signed::with_nonce(
                    Fund {
                        pot: id(pot),
                        balance,
                        escrow,
                    },
                    &key(from),
                    now,
                    nonce,
                );
                let r = l.fund_at(&req, now).map(drop);
                last = Some(Last::Fund(req));
                r
            }
            Op::Warn { pot, amount } => {
                let req = Signed::with_nonce(Warn { amount }, &key(pot), now, nonce);
                let r = l.warn_at(&req, now).map(drop);
                last = Some(Last::Warn(req));
                r
            }
            Op::Withdraw { pot, amount } => {
                let warned = l.read_pot(&id(pot)).map_or(0, |p| p.warned);
                let amount = amount.unwrap_or(warned);
                let req = Signed::with_nonce(Withdraw { amount }, &key(pot), now, nonce);
                let r = l.withdraw_at(&req, now).map(drop);
                last = Some(Last::Withdraw(req));
                r
            }
            Op::Redeem {
                pot,
                relay,
                face,
                nonce: ticket_nonce,
                wins,
                expired,
            } => {
                let issued = if expired { now - 31 } else { now };
                let t = ticket(pot, relay, face, ticket_nonce, wins, issued);
                let req = Signed::with_nonce(
                    Redeem {
                        ticket: t,
                        reveal: REVEAL,
                    },
                    &key(relay),
                    now,
                    nonce,
                );
                let pot_before = l.read_pot(&id(pot)).ok();
                let r = l.redeem_at(&req, now);
                if pot_before.is_some() && wins && !expired {
                    let fresh = !redeemed.contains(&t.digest());
                    match &r {
                        Ok(_) => prop_assert!(fresh, "a ticket was redeemed twice"),
                        Err(e) => prop_assert_eq!(
                            e.refusal(),
                            (!fresh).then_some(Refusal::AlreadyRedeemed),
                            "a fresh ticket of a known pot was refused: {}",
                            e
                        ),
                    }
                    redeemed.insert(t.digest());
                }
                if let (Ok(redemption), Some(p)) = (&r, pot_before) {
                    // Pays min(face, balance); an overdraft burns the whole escrow.
                    prop_assert_eq!(redemption.paid, face.min(p.balance));
                    let burned = if face > p.balance { p.escrow } else { 0 };
                    prop_assert_eq!(redemption.burned, burned);
                }
                last = Some(Last::Redeem(req));
                r.map(drop)
            }
            Op::Replay => match &last {
                None => continue,
                Some(Last::Fund(req)) => l.fund_at(req, now).map(drop),
                Some(Last::Warn(req)) => l.warn_at(req, now).map(drop),
                Some(Last::Withdraw(req)) => l.withdraw_at(req, now).map(drop),
                Some(Last::Redeem(req)) => l.redeem_at(req, now).map(drop),
            },
            Op::Wait(s) => {
                now += s;
                continue;
            }
        };
        let after = holdings(l);
        prop_assert!(
            after.2.conserved(),
            "not conserved after {:?}: {:?}",
            op,
            after.2
        );
        match result {
            Ok(()) => prop_assert!(!matches!(op, Op::Replay), "a replay was accepted"),
            Err(e) => {
                prop_assert!(e.refusal().is_some(), "{:?} failed: {}", op, e);
                prop_assert_eq!(&after.0, &before.0, "a refused {:?} moved money", op);
                prop_assert_eq!(&after.1, &before.1, "a refused {:?} moved money", op);
                prop_assert_eq!(after.2.burned, before.2.burned);
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn money_is_conserved_and_refusals_move_nothing(ops in prop::collection::vec(op(), 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.redb"), PARAMS, &genesis()).unwrap();
        let a = l.audit().unwrap();
        prop_assert_eq!(a.genesis, GENESIS_EACH * u64::from(PAYERS));
        prop_assert!(a.conserved());
        run(&l, &ops)?;
    }
}

#[test]
fn a_reopened_ledger_holds_pots_accounts_and_the_redeemed_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("l.redb");
    let l = Ledger::open(&path, PARAMS, &genesis()).unwrap();
    let fund = Fund {
        pot: id(0),
        balance: 1_000,
        escrow: 2_000,
    };
    l.fund_at(&Signed::new(fund, &key(0), START), START)
        .unwrap();
    l.warn_at(&Signed::new(Warn { amount: 500 }, &key(0), START), START)
        .unwrap();
    let t = ticket(0, PAYERS, 300, 1, true, START);
    let redeem = |now| {
        Signed::new(
            Redeem {
                ticket: t,
                reveal: REVEAL,
            },
            &key(PAYERS),
            now,
        )
    };
    l.redeem_at(&redeem(START), START).unwrap();
    // Refused (the notice is not over), and remembered as decided.
    let early = Signed::new(Withdraw { amount: 100 }, &key(0), START);
    assert_eq!(
        l.withdraw_at(&early, START).unwrap_err().refusal(),
        Some(Refusal::NoticeNotOver)
    );
    let before = (holdings(&l), l.read_pot(&id(0)).unwrap());
    drop(l);

    let l = Ledger::open(&path, PARAMS, &genesis()).unwrap();
    assert_eq!((holdings(&l), l.read_pot(&id(0)).unwrap()), before);
    let pot = l.read_pot(&id(0)).unwrap();
    assert_eq!((pot.balance, pot.escrow, pot.warned), (700, 2_000, 500));
    assert_eq!(pot.unlock_at, Some(START + 100));
    let audit = l.audit().unwrap();
    assert!(audit.conserved());
    assert_eq!(audit.redeemed_tickets, 1);
    assert_eq!(
        l.redeem_at(&redeem(START + 1), START + 1)
            .unwrap_err()
            .refusal(),
        Some(Refusal::AlreadyRedeemed)
    );
    // A refused request left no trace (refusals write nothing), so sent again it is decided
    // again, and refused again while the notice runs.
    assert_eq!(
        l.withdraw_at(&early, START + 1).unwrap_err().refusal(),
        Some(Refusal::NoticeNotOver)
    );
}
