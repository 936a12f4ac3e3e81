//! The client's wallet against the embedded ledger, the pair the devnet runs in one process:
//! a new pot is funded, then topped up only when low; an account that cannot pay is a clear
//! refusal. (`murmur-client` itself builds no ledger.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use ed25519_dalek::SigningKey;
use murmur_client::wallet::{FundingPolicy, ensure_funded};
use murmur_ledger::{Ledger, Params, Settlement};
use murmur_protocol::directory::IdentityKey;

fn ledger(dir: &std::path::Path, key: &SigningKey, amount: u64) -> Ledger {
    let params = Params {
        notice_period_s: 60,
        request_window_s: 300,
    };
    Ledger::open(
        &dir.join("l.redb"),
        params,
        &[(IdentityKey::of(key), amount)],
    )
    .unwrap()
}

#[tokio::test]
async fn a_new_pot_is_funded_then_only_topped_up_when_low() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[7; 32]);
    let ledger = ledger(dir.path(), &key, 10_000);
    let policy = FundingPolicy {
        low_water: 1_000,
        target_balance: 3_000,
        escrow: 2_000,
    };
    let pot = ensure_funded(&ledger, &key, &policy).await.unwrap();
    assert_eq!((pot.balance, pot.escrow), (3_000, 2_000));
    // Nothing to add: the same pot, no money moved.
    let again = ensure_funded(&ledger, &key, &policy).await.unwrap();
    assert_eq!(again, pot);
    let account = ledger.account(IdentityKey::of(&key)).await.unwrap();
    assert_eq!(account.balance, 5_000);
}

#[tokio::test]
async fn an_empty_account_is_a_clear_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::from_bytes(&[8; 32]);
    let ledger = ledger(dir.path(), &key, 10);
    let policy = FundingPolicy {
        low_water: 1_000,
        target_balance: 3_000,
        escrow: 2_000,
    };
    let err = ensure_funded(&ledger, &key, &policy).await.unwrap_err();
    assert!(err.refusal().is_some(), "{err}");
}
