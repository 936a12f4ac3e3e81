//! The money totals `/metrics` shows, kept in memory: counted once from the tables when the
//! ledger opens, then moved by each committed operation's effects, so that answering a scrape
//! never scans a table. [`Ledger::check_totals`] compares them with a full scan now and then.

use super::*;

/// How one operation changes the totals.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct TotalsDelta {
    accounts: i128,
    pot_balances: i128,
    pot_escrows: i128,
    burned: u64,
    new_pots: u64,
    redeemed_tickets: u64,
}

impl TotalsDelta {
    /// What writing `effects` over the state in `t` changes (read before the write).
    pub(super) fn of(t: &Tables<'_>, effects: &Effects) -> Result<TotalsDelta> {
        let mut d = TotalsDelta {
            burned: effects.burn,
            redeemed_tickets: u64::from(effects.redeemed.is_some()),
            ..TotalsDelta::default()
        };
        for a in &effects.accounts {
            let old = t.account(&a.key)?.balance;
            d.accounts += i128::from(a.balance) - i128::from(old);
        }
        if let Some(pot) = &effects.pot {
            let old = t.pot(&pot.key)?;
            d.new_pots = u64::from(old.is_none());
            let (balance, escrow) = old.map_or((0, 0), |p| (p.balance, p.escrow));
            d.pot_balances = i128::from(pot.balance) - i128::from(balance);
            d.pot_escrows = i128::from(pot.escrow) - i128::from(escrow);
        }
        Ok(d)
    }
}

fn moved(total: u128, by: i128) -> u128 {
    total.saturating_add_signed(by)
}

impl Audit {
    /// The totals after an operation (one more remembered request) with `d`.
    pub(super) fn add(&mut self, d: &TotalsDelta) {
        self.accounts = moved(self.accounts, d.accounts);
        self.pot_balances = moved(self.pot_balances, d.pot_balances);
        self.pot_escrows = moved(self.pot_escrows, d.pot_escrows);
        self.burned = self.burned.saturating_add(d.burned);
        self.pots = self.pots.saturating_add(d.new_pots);
        self.redeemed_tickets = self.redeemed_tickets.saturating_add(d.redeemed_tickets);
        self.remembered_requests = self.remembered_requests.saturating_add(1);
    }

    /// The totals after pruning.
    pub(super) fn pruned(&mut self, p: &Pruned) {
        self.redeemed_tickets = self.redeemed_tickets.saturating_sub(p.redeemed_tickets);
        self.remembered_requests = self.remembered_requests.saturating_sub(p.requests);
    }
}
