//! The gateway's tab for one client: what the client owes for the frames the gateway forwards
//! and delivers for it, against what it paid with tickets.
//!
//! The gateway charges its `price` per frame ([`Tab::charge`]) and credits each ticket it
//! accepted with the ticket's expected value ([`Tab::credit`]). A session starts with a grace
//! allowance (`initial_credit`) so the client can send before its first ticket arrives, and
//! the client may then run up to `max_arrears` of debt: a charge that leaves the arrears above
//! it returns [`Verdict::Cutoff`], and the gateway tells the client
//! ([`crate::control::Control::Cutoff`]) and stops serving it. Orchid's relays disconnect a
//! client 128 KiB in arrears; the default here, 64 frames' worth, is about the same.
//!
//! The verdict is a function of the balance alone, not sticky: a client whose payment arrives
//! after a `Cutoff` verdict is served again on its next charge, should the gateway keep the
//! session open. All arithmetic saturates, so no input overflows it.

use crate::{Error, Result};

/// A tab's terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TabConfig {
    /// What the gateway charges per frame it forwards or delivers, in base units (its
    /// advertised `price_per_packet`).
    pub price: u64,
    /// The most debt, in base units, a client may run before it is cut off.
    pub max_arrears: u64,
    /// Credit the session starts with, in base units.
    pub initial_credit: u64,
}

/// Frames' worth of arrears and of initial credit in [`TabConfig::for_price`].
pub const DEFAULT_GRACE_FRAMES: u64 = 64;

impl TabConfig {
    /// The defaults for a gateway charging `price` per frame: [`DEFAULT_GRACE_FRAMES`] (64)
    /// frames of initial credit and as many of arrears. 64 frames carry 128 KiB of payload,
    /// Orchid's disconnect threshold; a client that pays every 16 frames (the payer's default)
    /// stays far inside it even with a few round trips of tickets in flight.
    pub fn for_price(price: u64) -> Self {
        TabConfig {
            price,
            max_arrears: price.saturating_mul(DEFAULT_GRACE_FRAMES),
            initial_credit: price.saturating_mul(DEFAULT_GRACE_FRAMES),
        }
    }

    /// Refuses a tab that would cut a client off before it can pay for one frame: with a
    /// positive price, `initial_credit + max_arrears` must cover at least one frame.
    pub fn validate(&self) -> Result<()> {
        if self.price > 0 && self.initial_credit.saturating_add(self.max_arrears) < self.price {
            return Err(Error::PaymentConfig(format!(
                "a tab with initial credit {} and max arrears {} cuts a client off at its first \
                 frame (price {})",
                self.initial_credit, self.max_arrears, self.price
            )));
        }
        Ok(())
    }
}

/// What the gateway should do after a charge.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep serving the client.
    Serve,
    /// Arrears exceed `max_arrears`: send [`crate::control::Control::Cutoff`] and stop.
    Cutoff,
}

/// Running totals of a tab, for logs and metrics (saturating).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TabStats {
    /// Frames charged.
    pub frames: u64,
    /// Base units charged.
    pub charged: u64,
    /// Tickets credited.
    pub payments: u64,
    /// Base units credited (expected values).
    pub paid: u64,
}

/// One client's tab at its gateway.
///
/// The balance is kept as credit or arrears, never both, each a `u64`: a balance is thus
/// exact between −(2⁶⁴−1) and 2⁶⁴−1 base units and saturates beyond.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tab {
    config: TabConfig,
    credit: u64,
    arrears: u64,
    stats: TabStats,
}

impl Tab {
    /// A new session's tab, starting with `config.initial_credit`.
    pub fn new(config: TabConfig) -> Result<Self> {
        config.validate()?;
        Ok(Tab {
            config,
            credit: config.initial_credit,
            arrears: 0,
            stats: TabStats::default(),
        })
    }

    /// Adds a ticket's expected value, once the gateway accepted the ticket.
    pub fn credit(&mut self, expected_value: u64) {
        self.stats.payments = self.stats.payments.saturating_add(1);
        self.stats.paid = self.stats.paid.saturating_add(expected_value);
        if expected_value <= self.arrears {
            self.arrears -= expected_value;
        } else {
            self.credit = self.credit.saturating_add(expected_value - self.arrears);
            self.arrears = 0;
        }
    }

    /// Charges `frames` frames at the configured price: [`Verdict::Cutoff`] if the arrears
    /// then exceed `max_arrears`.
    pub fn charge(&mut self, frames: u64) -> Verdict {
        let amount = frames.saturating_mul(self.config.price);
        self.stats.frames = self.stats.frames.saturating_add(frames);
        self.stats.charged = self.stats.charged.saturating_add(amount);
        if amount <= self.credit {
            self.credit -= amount;
        } else {
            self.arrears = self.arrears.saturating_add(amount - self.credit);
            self.credit = 0;
        }
        self.verdict()
    }

    /// The verdict for the current balance.
    pub fn verdict(&self) -> Verdict {
        if self.arrears > self.config.max_arrears {
            Verdict::Cutoff
        } else {
            Verdict::Serve
        }
    }

    /// Debt beyond the credit, in base units (0 while in credit).
    pub fn arrears(&self) -> u64 {
        self.arrears
    }

    /// Credit not yet used, in base units (0 while in arrears).
    pub fn credit_left(&self) -> u64 {
        self.credit
    }

    /// The tab's terms.
    pub fn config(&self) -> TabConfig {
        self.config
    }

    /// Running totals.
    pub fn stats(&self) -> TabStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_then_arrears_then_cutoff_then_payment() {
        let mut tab = Tab::new(TabConfig {
            price: 10,
            max_arrears: 50,
            initial_credit: 30,
        })
        .unwrap();
        assert_eq!(tab.charge(3), Verdict::Serve);
        assert_eq!((tab.credit_left(), tab.arrears()), (0, 0));
        assert_eq!(tab.charge(5), Verdict::Serve);
        assert_eq!(tab.arrears(), 50);
        assert_eq!(tab.charge(0), Verdict::Serve);
        assert_eq!(tab.charge(1), Verdict::Cutoff);
        assert_eq!(tab.arrears(), 60);
        tab.credit(15);
        assert_eq!(tab.verdict(), Verdict::Serve);
        assert_eq!(tab.arrears(), 45);
        tab.credit(100);
        assert_eq!((tab.credit_left(), tab.arrears()), (55, 0));
        assert_eq!(
            tab.stats(),
            TabStats {
                frames: 9,
                charged: 90,
                payments: 2,
                paid: 115
            }
        );
    }

    #[test]
    fn a_free_gateway_never_cuts_off() {
        let mut tab = Tab::new(TabConfig::for_price(0)).unwrap();
        assert_eq!(tab.charge(u64::MAX), Verdict::Serve);
        assert_eq!(tab.arrears(), 0);
    }

    #[test]
    fn hostile_amounts_saturate() {
        let mut tab = Tab::new(TabConfig::for_price(u64::MAX)).unwrap();
        assert_eq!(tab.config().max_arrears, u64::MAX);
        assert_eq!(tab.charge(u64::MAX), Verdict::Serve);
        assert_eq!(tab.charge(u64::MAX), Verdict::Serve);
        assert_eq!(tab.arrears(), u64::MAX);
        tab.credit(u64::MAX);
        tab.credit(u64::MAX);
        tab.credit(u64::MAX);
        assert_eq!((tab.credit_left(), tab.arrears()), (u64::MAX, 0));
        assert_eq!(tab.stats().paid, u64::MAX);
        let mut tab = Tab::new(TabConfig {
            price: 1,
            max_arrears: u64::MAX - 1,
            initial_credit: 0,
        })
        .unwrap();
        assert_eq!(tab.charge(u64::MAX), Verdict::Cutoff);
    }

    #[test]
    fn a_tab_that_cannot_serve_one_frame_is_refused() {
        let e = Tab::new(TabConfig {
            price: 10,
            max_arrears: 4,
            initial_credit: 5,
        });
        assert!(matches!(e, Err(Error::PaymentConfig(_))), "{e:?}");
        assert_eq!(e.unwrap_err().label(), "config");
        Tab::new(TabConfig {
            price: 10,
            max_arrears: 5,
            initial_credit: 5,
        })
        .unwrap();
        assert_eq!(
            TabConfig::for_price(3),
            TabConfig {
                price: 3,
                max_arrears: 192,
                initial_credit: 192
            }
        );
    }
}
