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
