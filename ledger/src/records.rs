//! What the ledger's answers carry: accounts, pots, transfers and redemptions. Payers and
//! payees read them (without the `server` feature); the embedded ledger stores them.

use murmur_protocol::directory::{IdentityKey, UnixTime};
use serde::{Deserialize, Serialize};

use crate::request::hex;

/// An account: money that is in no pot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Account {
    #[serde(with = "hex::key")]
    pub key: IdentityKey,
    pub balance: u64,
}

/// A pot: the balance pays winning tickets, the escrow is burned by an overdraft.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pot {
    /// The payer's key: tickets from this pot are signed by it.
    #[serde(with = "hex::key")]
    pub key: IdentityKey,
    pub balance: u64,
    pub escrow: u64,
    /// The amount under warning (0: none).
    pub warned: u64,
    /// When the warned amount may be withdrawn (Unix seconds), if a warning is outstanding.
    pub unlock_at: Option<UnixTime>,
}

impl Pot {
    /// The largest face value a recipient should accept from this pot: Orchid's
    /// `min((escrow − warned)/2, balance)`, made exact for Murmur's withdrawals, which take
    /// the warned amount from the balance first and then from the escrow. After the warned
    /// amount leaves, the pot still holds `balance' = balance − warned` (at least 0) and
    /// `escrow' = escrow − max(0, warned − balance)`; a ticket of face value up to
    /// `min(balance', escrow'/2)` is paid in full, and a payer who overdraws the pot with
    /// more tickets than that loses at least twice what the overdraft gains.
    pub fn usable(&self) -> u64 {
        self.usable_after(0)
    }

    /// The largest face value a recipient should accept from this pot when the pot already
    /// owes it `owed` in winning tickets not yet redeemed: the balance (after a warned
    /// withdrawal) must pay those and the new ticket, while the escrow only has to make one
    /// ticket's overdraft cost the payer twice what it gains, so it is not reduced by `owed`.
    pub fn usable_after(&self, owed: u64) -> u64 {
        let balance = self.balance.saturating_sub(self.warned);
        let from_escrow = self.warned.saturating_sub(self.balance);
        let escrow = self.escrow.saturating_sub(from_escrow);
        balance.saturating_sub(owed).min(escrow / 2)
    }
}

/// What moving money into or out of a pot left behind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transfer {
    pub account: Account,
    pub pot: Pot,
}

/// What redeeming a winning ticket did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Redemption {
    /// Paid to the recipient: the face value, or what the pot's balance held.
    pub paid: u64,
    /// Escrow burned because the face value exceeded the balance (0 otherwise).
    pub burned: u64,
    /// The recipient's account afterwards.
    pub account: Account,
    /// The pot afterwards.
    pub pot: Pot,
}
