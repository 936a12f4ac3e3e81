//! The client's pot at the ledger: funded before the first ticket, topped up as winning
//! tickets drain it.
//!
//! The pot's key is the client's payer key; the money comes from the account of the same key
//! (on the local network a genesis account, elsewhere whatever the user deposited). The
//! escrow is kept at twice the largest face value the client signs, as Orchid requires of a
//! pot whose tickets relays accept ([`Pot::usable`]).

use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_ledger::request::{Fund, Signed};
use murmur_ledger::{Pot, Refusal, Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use tokio_util::sync::CancellationToken;

/// How much the pot should hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FundingPolicy {
    /// Top up when the pot's balance falls below this.
    pub low_water: u64,
    /// The balance a top-up restores.
    pub target_balance: u64,
    /// The escrow kept in the pot (≥ 2 × the face value of the client's tickets).
    pub escrow: u64,
}

impl FundingPolicy {
    /// What to add to `pot` (or to a pot that does not exist yet), if anything.
    pub fn top_up(&self, pot: Option<&Pot>) -> Option<Fund> {
        let (balance, escrow, key) = match pot {
            Some(p) => (p.balance, p.escrow, p.key),
            None => (0, 0, IdentityKey([0; 32])),
        };
        let add_balance = if balance < self.low_water || pot.is_none() {
            self.target_balance.saturating_sub(balance)
        } else {
            0
        };
        let add_escrow = self.escrow.saturating_sub(escrow);
        (add_balance > 0 || add_escrow > 0).then_some(Fund {
            pot: key,
            balance: add_balance,
            escrow: add_escrow,
        })
    }
}

/// What the payer may spend from `pot` until the next look at it ([`Payer::set_pot_usable`]),
/// for tickets of at most `face_value`.
///
/// The ledger's `usable` (`min(balance', escrow'/2)`) is the largest face value relays accept,
/// not a budget: issued tickets drain the balance (by their expected value, on average), never
/// the escrow. With the escrow at twice the face value, `usable` is just the face value, and
/// the payer, which subtracts each ticket's expected value from what it is told, ran dry after
/// one or two tickets per check (every 10 s) and stopped paying. So while the escrow covers
/// `face_value`, the budget is the balance left after a warned withdrawal; the payer's face
/// value (`min(face_value, budget)`) then stays within what relays accept. Otherwise the
/// smaller `usable` is the budget and clamps the face value.
///
/// [`Payer::set_pot_usable`]: murmur_protocol::payer::Payer::set_pot_usable
pub fn payer_budget(pot: &Pot, face_value: u64) -> u64 {
    let usable = pot.usable();
    if usable >= face_value {
        pot.balance.saturating_sub(pot.warned)
    } else {
        usable
    }
}

/// The pot as the ledger has it now, topped up first if it runs low.
pub async fn ensure_funded<S: Settlement>(
    ledger: &S,
    key: &SigningKey,
    policy: &FundingPolicy,
) -> murmur_ledger::Result<Pot> {
    let me = IdentityKey::of(key);
    let pot = match ledger.pot(me).await {
        Ok(p) => Some(p),
        Err(e) if e.refusal() == Some(Refusal::UnknownPot) => None,
        Err(e) => return Err(e),
    };
    let Some(mut fund) = policy.top_up(pot.as_ref()) else {
        return pot.ok_or_else(|| Refusal::UnknownPot.because("the funding policy adds nothing"));
    };
    fund.pot = me;
    let transfer = ledger.fund(Signed::new(fund, key, unix_now())).await?;
    tracing::info!(
        balance = transfer.pot.balance,
        escrow = transfer.pot.escrow,
        account_left = transfer.account.balance,
        "pot funded"
    );
    Ok(transfer.pot)
}

/// Keeps the pot funded until `shutdown`, reporting each state seen to `on_pot`.
pub async fn keep_funded<S: Settlement>(
    ledger: S,
    key: SigningKey,
    policy: FundingPolicy,
    every: Duration,
    on_pot: impl Fn(Pot) + Send,
    shutdown: CancellationToken,
) {
    loop {
        match ensure_funded(&ledger, &key, &policy).await {
            Ok(pot) => on_pot(pot),
            Err(e) => tracing::warn!(error = %e, "cannot check or top up the pot"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use murmur_ledger::{Ledger, Params};

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

    #[test]
    fn the_budget_is_the_balance_while_the_escrow_covers_the_face_value() {
        let pot = |balance, escrow, warned| Pot {
            key: IdentityKey([1; 32]),
            balance,
            escrow,
            warned,
            unlock_at: None,
        };
        // usable is 32 (escrow / 2), but tickets of face 32 may drain the whole balance.
        assert_eq!(payer_budget(&pot(1_000, 64, 0), 32), 1_000);
        assert_eq!(payer_budget(&pot(1_000, 64, 400), 32), 600);
        // An escrow too small for the face value: usable clamps it.
        assert_eq!(payer_budget(&pot(1_000, 40, 0), 32), 20);
        assert_eq!(payer_budget(&pot(10, 64, 0), 32), 10);
    }

    #[test]
    fn top_up_restores_the_target_and_the_escrow() {
        let policy = FundingPolicy {
            low_water: 100,
            target_balance: 500,
            escrow: 300,
        };
        let pot = |balance, escrow| Pot {
            key: IdentityKey([1; 32]),
            balance,
            escrow,
            warned: 0,
            unlock_at: None,
        };
        assert_eq!(policy.top_up(Some(&pot(200, 300))), None);
        let f = policy.top_up(Some(&pot(50, 100))).unwrap();
        assert_eq!((f.balance, f.escrow), (450, 200));
        let f = policy.top_up(None).unwrap();
        assert_eq!((f.balance, f.escrow), (500, 300));
    }
}
