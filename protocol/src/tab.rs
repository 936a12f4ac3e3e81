//! The gateway's tab for one client: what the client owes for the frames the gateway forwards
//! and delivers for it, against what it paid with tickets.
//!
//! The gateway charges its `price` per frame ([`Tab::charge`]) and credits each ticket it
//! accepted with the ticket's expected value ([`Tab::credit`]). A session starts with a grace
//! allowance (`initial_credit`) so the client can send before its first ticket arrives, and
//! the client may then run up to `max_arrears` of debt. A delivery the gateway already wrote
//! that leaves the arrears above it returns [`Verdict::Cutoff`], and the gateway tells the
//! client ([`crate::control::Control::Cutoff`]) and stops serving it; one of the client's own
//! frames that would is refused instead ([`Tab::charge_or_refuse`]: its ticket may be on the
//! way), and the client is cut off once the arrears limit's worth were refused. Orchid's
//! relays disconnect a client 128 KiB in arrears; the default here, 64 frames' worth, is
//! about the same.
//!
//! The verdict is a function of the balance alone, not sticky: a client whose payment arrives
//! after a `Cutoff` verdict is served again on its next charge, should the gateway keep the
//! session open. All arithmetic saturates, so no input overflows it.
//!
//! **Against cheaters** ([`TabBook`]). Keys are free, so grace must not be: a tab belongs to
//! the client's key and outlives its sessions for a window (a reconnect resumes it, debts
//! and all), and a new tab starts with grace (initial credit and the arrears allowance) only
//! if its source address (an IPv4 address, an IPv6 /64) has not had `grace_per_address`
//! graced tabs within the window. Other new tabs are *prepaid*: a frame beyond their credit
//! is refused ([`Verdict::Unpaid`]: the gateway drops it) and, once the refused frames pass
//! the arrears limit, the client is cut off. One ticket credits at most the arrears limit's
//! worth, so a huge face value buys no more than an honest ticket could, and a client whose
//! tickets keep being refused is cut off ([`MAX_REFUSED_TICKETS`]).

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use crate::admission::address_group;
use crate::packet::Address;
use crate::time::Instant;
use crate::{Error, Result};

/// Refused tickets after which a tab's client is cut off.
pub const MAX_REFUSED_TICKETS: u64 = 3;

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
    /// A prepaid tab without credit for this frame: do not serve it (drop it, counted).
    Unpaid,
    /// Arrears (or a prepaid tab's refused frames) exceed `max_arrears`, or too many tickets
    /// were refused: send [`crate::control::Control::Cutoff`] and stop.
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
    /// Base units credited (expected values, each capped at the arrears limit).
    pub paid: u64,
    /// Frames a prepaid tab refused for want of credit.
    pub unpaid_frames: u64,
    /// Tickets refused (by the gateway's checks or because their pot did not cover them).
    pub refused_tickets: u64,
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
    /// No grace: frames beyond the credit are refused, never run up as arrears.
    prepaid: bool,
    /// Frames refused since the tab last got back within its limit (prepaid without credit,
    /// or over the arrears limit: a client cut off that reconnects must pay before it is
    /// served again); past the arrears limit's worth, the client is cut off.
    unpaid_streak: u64,
    /// Tickets refused since the last one credited.
    refusal_streak: u64,
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
            prepaid: false,
            unpaid_streak: 0,
            refusal_streak: 0,
            stats: TabStats::default(),
        })
    }

    /// A tab without grace: no initial credit, and no arrears (frames beyond the credit get
    /// [`Verdict::Unpaid`]).
    pub fn prepaid(config: TabConfig) -> Result<Self> {
        let mut tab = Tab::new(config)?;
        tab.credit = 0;
        tab.prepaid = true;
        Ok(tab)
    }

    /// Whether the tab started without grace.
    pub fn is_prepaid(&self) -> bool {
        self.prepaid
    }

    /// The most one ticket credits: the arrears limit's worth (at least one frame), so a
    /// ticket's face value, however large, buys no more than the grace an honest client has.
    pub fn max_credit_per_ticket(&self) -> u64 {
        self.config.max_arrears.max(self.config.price)
    }

    /// Adds a ticket's expected value (capped at [`Tab::max_credit_per_ticket`]), once the
    /// gateway accepted the ticket and its pot is known to cover it.
    pub fn credit(&mut self, expected_value: u64) {
        let expected_value = expected_value.min(self.max_credit_per_ticket());
        self.stats.payments = self.stats.payments.saturating_add(1);
        self.stats.paid = self.stats.paid.saturating_add(expected_value);
        if expected_value <= self.arrears {
            self.arrears -= expected_value;
        } else {
            self.credit = self.credit.saturating_add(expected_value - self.arrears);
            self.arrears = 0;
        }
        self.refusal_streak = 0;
        if self.arrears <= self.config.max_arrears {
            self.unpaid_streak = 0;
        }
    }

    /// Charges `frames` frames the gateway has already served (deliveries it wrote to the
    /// client) at the configured price: [`Verdict::Cutoff`] if the arrears then exceed
    /// `max_arrears`. A tab already past the limit (its client was cut off and came back) or
    /// prepaid without the credit refuses the frames instead ([`Verdict::Unpaid`], not
    /// charged) until a payment brings it back, and cuts the client off once the refused
    /// frames pass the arrears limit's worth.
    pub fn charge(&mut self, frames: u64) -> Verdict {
        let amount = frames.saturating_mul(self.config.price);
        let over = self.arrears > self.config.max_arrears;
        if over || (self.prepaid && amount > self.credit) {
            return self.refuse(frames);
        }
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

    /// Charges `frames` of the client's own frames before they are served: charged if the
    /// tab can take them ([`Tab::can_serve`]), refused otherwise ([`Verdict::Unpaid`]: not
    /// charged, the gateway drops them), and the client cut off once the frames refused
    /// since its last payment pass the arrears limit's worth.
    ///
    /// Refused rather than cut off at the limit: an honest client that pays as it goes can
    /// still reach it, its tickets for the deliveries the gateway wrote to it being on their
    /// way back (under load, a round trip holds more deliveries than the grace), and a
    /// cut-off costs it its session and the deliveries in flight, which the gateway charged
    /// and it never pays for, so it comes back in debt and is cut off again. Refusing costs
    /// the gateway nothing, since it forwards nothing unpaid, and the client pays for the
    /// frames it built all the same, so its next tickets bring the tab back. A client that
    /// does not pay is cut off after the limit's worth of refused frames, as before.
    pub fn charge_or_refuse(&mut self, frames: u64) -> Verdict {
        if self.can_serve(frames) {
            self.charge(frames)
        } else {
            self.refuse(frames)
        }
    }

    /// Refuses `frames`: counted, not charged; [`Verdict::Cutoff`] once the refused frames
    /// since the tab was last within its limit pass the arrears limit's worth.
    fn refuse(&mut self, frames: u64) -> Verdict {
        self.stats.unpaid_frames = self.stats.unpaid_frames.saturating_add(frames);
        self.unpaid_streak = self.unpaid_streak.saturating_add(frames);
        if self.unpaid_streak.saturating_mul(self.config.price) > self.config.max_arrears {
            Verdict::Cutoff
        } else {
            Verdict::Unpaid
        }
    }

    /// Whether `frames` more can be charged now within the tab's terms (neither refused nor
    /// cutting the client off): a gateway holds its deliveries back until it can, so that a
    /// burst of replies waits for the client's next ticket instead of cutting it off.
    pub fn can_serve(&self, frames: u64) -> bool {
        let amount = frames.saturating_mul(self.config.price);
        if self.prepaid {
            return amount <= self.credit;
        }
        self.arrears
            .saturating_add(amount.saturating_sub(self.credit))
            <= self.config.max_arrears
    }

    /// Records a refused ticket: [`Verdict::Cutoff`] once [`MAX_REFUSED_TICKETS`] were.
    ///
    /// The cut-off is the penalty: the count starts again, so a client that comes back is
    /// judged on its next tickets, not cut off again before it can send one.
    pub fn refused_ticket(&mut self) -> Verdict {
        self.stats.refused_tickets = self.stats.refused_tickets.saturating_add(1);
        self.refusal_streak = self.refusal_streak.saturating_add(1);
        if self.refusal_streak >= MAX_REFUSED_TICKETS {
            self.refusal_streak = 0;
            return Verdict::Cutoff;
        }
        self.verdict()
    }

    /// The verdict for the current balance.
    pub fn verdict(&self) -> Verdict {
        let refused_frames = self.unpaid_streak.saturating_mul(self.config.price);
        if self.arrears > self.config.max_arrears || refused_frames > self.config.max_arrears {
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

/// The terms of a gateway's [`TabBook`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TabBookConfig {
    pub tab: TabConfig,
    /// How long a tab outlives its client's last session, and the window of the grace rule.
    pub window: Duration,
    /// Tabs kept at once (live or within their window).
    pub max_tabs: usize,
    /// New tabs with grace per source address group per window; later ones are prepaid.
    pub grace_per_address: usize,
    /// Address groups whose grants are remembered; beyond it new tabs are prepaid.
    pub max_grace_addresses: usize,
}

impl TabBookConfig {
    /// The defaults for `tab`: tabs kept 10 minutes after their last session, at most
    /// 100,000; two graced tabs per address per window (a client restarting its proxy gets
    /// grace again once), 100,000 addresses remembered.
    pub fn for_tab(tab: TabConfig) -> Self {
        TabBookConfig {
            tab,
            window: Duration::from_secs(600),
            max_tabs: 100_000,
            grace_per_address: 2,
            max_grace_addresses: 100_000,
        }
    }
}

/// Why no tab was opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TabRefused {
    /// `max_tabs` tabs are live or within their window.
    Full,
}

/// How a session's tab was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opened {
    /// The key's tab from an earlier session, balance and all.
    Resumed,
    /// A new tab with grace.
    Graced,
    /// A new tab without grace: its address used its grace within the window.
    Prepaid,
}

struct Kept {
    tab: Tab,
    /// Sessions using it now.
    sessions: u32,
    last_seen: Instant,
}

/// Every client's tab at a gateway, by the client's key (its session [`Address`]).
pub struct TabBook {
    config: TabBookConfig,
    tabs: HashMap<Address, Kept>,
    /// Per address group, when graced tabs were opened within the window.
    grants: HashMap<IpAddr, VecDeque<Instant>>,
}

impl TabBook {
    pub fn new(config: TabBookConfig) -> Result<Self> {
        config.tab.validate()?;
        Ok(TabBook {
            config,
            tabs: HashMap::new(),
            grants: HashMap::new(),
        })
    }

    /// The terms in force.
    pub fn config(&self) -> &TabBookConfig {
        &self.config
    }

    /// A session of `address` from `ip` starts at `now`: resumes the key's tab, or opens
    /// one (graced if the address group has grace left in the window, else prepaid).
    pub fn open(
        &mut self,
        address: Address,
        ip: IpAddr,
        now: Instant,
    ) -> std::result::Result<Opened, TabRefused> {
        let window = self.config.window;
        if let Some(kept) = self.tabs.get_mut(&address) {
            kept.sessions = kept.sessions.saturating_add(1);
            kept.last_seen = now;
            return Ok(Opened::Resumed);
        }
        if self.tabs.len() >= self.config.max_tabs {
            self.tabs
                .retain(|_, k| k.sessions > 0 || k.last_seen + window > now);
        }
        if self.tabs.len() >= self.config.max_tabs {
            return Err(TabRefused::Full);
        }
        let graced = self.grant(address_group(ip), now);
        let tab = if graced {
            Tab::new(self.config.tab)
        } else {
            Tab::prepaid(self.config.tab)
        };
        // `config.tab` was validated in `new`.
        let Ok(tab) = tab else {
            return Err(TabRefused::Full);
        };
        self.tabs.insert(
            address,
            Kept {
                tab,
                sessions: 1,
                last_seen: now,
            },
        );
        Ok(if graced {
            Opened::Graced
        } else {
            Opened::Prepaid
        })
    }

    /// Takes one grace grant of `group` if it has one left in the window.
    fn grant(&mut self, group: IpAddr, now: Instant) -> bool {
        let window = self.config.window;
        let live = |t: &Instant| *t + window > now;
        if !self.grants.contains_key(&group) && self.grants.len() >= self.config.max_grace_addresses
        {
            self.grants.retain(|_, g| g.back().is_some_and(live));
            if self.grants.len() >= self.config.max_grace_addresses {
                return false;
            }
        }
        let grants = self.grants.entry(group).or_default();
        while grants.front().is_some_and(|t| !live(t)) {
            grants.pop_front();
        }
        if grants.len() >= self.config.grace_per_address {
            return false;
        }
        grants.push_back(now);
        true
    }

    /// A session of `address` ended at `now`; its tab stays for the window.
    pub fn close(&mut self, address: &Address, now: Instant) {
        if let Some(kept) = self.tabs.get_mut(address) {
            kept.sessions = kept.sessions.saturating_sub(1);
            kept.last_seen = now;
        }
    }

    /// The tab of `address`, if it has one.
    pub fn tab(&self, address: &Address) -> Option<&Tab> {
        self.tabs.get(address).map(|k| &k.tab)
    }

    /// The tab of `address`, to charge or credit; `None` if it has none (its client must
    /// not be served).
    pub fn tab_mut(&mut self, address: &Address) -> Option<&mut Tab> {
        self.tabs.get_mut(address).map(|k| &mut k.tab)
    }

    /// [`Tab::charge`] to `address`'s tab ([`Verdict::Cutoff`] if it has none).
    pub fn charge(&mut self, address: &Address, frames: u64) -> Verdict {
        self.tab_mut(address)
            .map_or(Verdict::Cutoff, |t| t.charge(frames))
    }

    /// [`Tab::can_serve`] for `address`'s tab (false if it has none).
    pub fn can_serve(&self, address: &Address, frames: u64) -> bool {
        self.tab(address).is_some_and(|t| t.can_serve(frames))
    }

    /// Tabs kept (live or within their window).
    pub fn len(&self) -> usize {
        self.tabs.len()
    }

    /// Whether no tab is kept.
    pub fn is_empty(&self) -> bool {
        self.tabs.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn can_serve_says_whether_a_charge_stays_within_the_terms() {
        let config = TabConfig {
            price: 2,
            max_arrears: 10,
            initial_credit: 4,
        };
        let mut tab = Tab::new(config).unwrap();
        // 4 of credit and 10 of arrears: 7 frames at 2.
        assert!(tab.can_serve(7));
        assert!(!tab.can_serve(8));
        assert_eq!(tab.charge(7), Verdict::Serve);
        assert!(
            !tab.can_serve(1),
            "at the limit, one more would cut the client off"
        );
        assert_eq!(tab.charge(1), Verdict::Cutoff);
        tab.credit(10);
        assert!(tab.can_serve(4));
        let mut prepaid = Tab::prepaid(config).unwrap();
        assert!(!prepaid.can_serve(1), "no grace without payment");
        prepaid.credit(4);
        assert!(prepaid.can_serve(2) && !prepaid.can_serve(3));
    }

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
        // One ticket credits at most the arrears limit (50), whatever it is worth.
        tab.credit(100);
        assert_eq!((tab.credit_left(), tab.arrears()), (5, 0));
        assert_eq!(
            tab.stats(),
            TabStats {
                frames: 9,
                charged: 90,
                payments: 2,
                paid: 65,
                unpaid_frames: 0,
                refused_tickets: 0,
            }
        );
    }

    /// A client's own frame that would take the arrears past the limit is refused, not a
    /// cut-off (the old charge cut it off here), and its next payment brings the tab back;
    /// a client that never pays is cut off once the refused frames pass the limit's worth,
    /// having run up no more than the limit.
    #[test]
    fn own_frames_past_the_limit_are_refused_until_a_payment_then_cut_off() {
        let config = TabConfig {
            price: 10,
            max_arrears: 50,
            initial_credit: 30,
        };
        let mut tab = Tab::new(config).unwrap();
        assert_eq!(tab.charge_or_refuse(8), Verdict::Serve);
        assert_eq!(tab.arrears(), 50);
        assert_eq!(tab.charge_or_refuse(1), Verdict::Unpaid);
        assert_eq!(tab.arrears(), 50, "a refused frame is not charged");
        tab.credit(20);
        assert_eq!(tab.charge_or_refuse(1), Verdict::Serve);
        assert_eq!(tab.arrears(), 40);
        assert_eq!(tab.charge_or_refuse(1), Verdict::Serve);
        // Never paying again: refused five times (the limit's worth), then cut off.
        for _ in 0..5 {
            assert_eq!(tab.charge_or_refuse(1), Verdict::Unpaid);
        }
        assert_eq!(tab.charge_or_refuse(1), Verdict::Cutoff);
        assert_eq!(tab.arrears(), 50);
        assert_eq!(tab.stats().unpaid_frames, 7);
        // A delivery the gateway already wrote is charged as before: past the limit, cut off.
        let mut tab = Tab::new(config).unwrap();
        assert_eq!(tab.charge(8), Verdict::Serve);
        assert_eq!(tab.charge(1), Verdict::Cutoff);
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

    fn book(grace_per_address: usize) -> TabBook {
        TabBook::new(TabBookConfig {
            grace_per_address,
            ..TabBookConfig::for_tab(TabConfig::for_price(10))
        })
        .unwrap()
    }

    fn address(i: u32) -> Address {
        let mut a = [0u8; 32];
        a[..4].copy_from_slice(&i.to_be_bytes());
        Address(a)
    }

    const IP: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    /// Frames a tab serves before its client is cut off, paying nothing.
    fn free_frames(book: &mut TabBook, a: &Address) -> u64 {
        let mut served = 0;
        for _ in 0..10_000 {
            match book.charge(a, 1) {
                Verdict::Serve => served += 1,
                Verdict::Unpaid => {}
                Verdict::Cutoff => break,
            }
        }
        served
    }

    /// The attack of issue 13: a client reconnecting 100 times with its key gets one grace in
    /// all, and one with 100 fresh keys from one address gets `grace_per_address` graces.
    #[test]
    fn reconnects_and_fresh_keys_get_no_more_grace() {
        let grace = TabConfig::for_price(10);
        let one = (grace.initial_credit + grace.max_arrears) / grace.price;
        let mut b = book(2);
        let mut t = Instant::ZERO;
        let a = address(1);
        let mut same_key = 0;
        for i in 0..100 {
            let opened = b.open(a, IP, t).unwrap();
            assert_eq!(
                opened,
                if i == 0 {
                    Opened::Graced
                } else {
                    Opened::Resumed
                }
            );
            same_key += free_frames(&mut b, &a);
            b.close(&a, t);
            t = t + Duration::from_secs(1);
        }
        let mut fresh = 0;
        for i in 0..100 {
            let a = address(1000 + i);
            b.open(a, IP, t).unwrap();
            fresh += free_frames(&mut b, &a);
            b.close(&a, t);
        }
        println!(
            "100 reconnects with one key: {same_key} free frames; 100 fresh keys from one \
             address: {fresh} (one grace = {one} frames)"
        );
        assert_eq!(same_key, one);
        // The first key took one of the address's two grants.
        assert_eq!(fresh, one);
        // Another address has its own grace; after the window the address has it again.
        assert_eq!(
            b.open(address(5000), "198.51.100.1".parse().unwrap(), t),
            Ok(Opened::Graced)
        );
        let later = t + Duration::from_secs(601);
        assert_eq!(b.open(address(5001), IP, later), Ok(Opened::Graced));
    }

    #[test]
    fn a_prepaid_tab_refuses_frames_beyond_its_credit_then_cuts_off() {
        let mut b = book(0);
        let a = address(1);
        assert_eq!(b.open(a, IP, Instant::ZERO), Ok(Opened::Prepaid));
        assert_eq!(b.charge(&a, 1), Verdict::Unpaid);
        b.tab_mut(&a).unwrap().credit(25);
        assert_eq!(b.charge(&a, 2), Verdict::Serve);
        assert_eq!(b.charge(&a, 1), Verdict::Unpaid);
        let tab = b.tab(&a).unwrap();
        assert_eq!((tab.credit_left(), tab.arrears()), (5, 0));
        // 64 frames' worth refused since the credit (the arrears limit), then cut off.
        let mut n = 1;
        while b.charge(&a, 1) == Verdict::Unpaid {
            n += 1;
        }
        assert_eq!(n, 64);
        assert_eq!(b.charge(&a, 1), Verdict::Cutoff);
    }

    #[test]
    fn refused_tickets_cut_off_and_one_ticket_credits_at_most_the_arrears_limit() {
        let mut tab = Tab::new(TabConfig::for_price(10)).unwrap();
        tab.credit(u64::MAX);
        assert_eq!(tab.credit_left(), 640 + 640);
        assert_eq!(tab.refused_ticket(), Verdict::Serve);
        assert_eq!(tab.refused_ticket(), Verdict::Serve);
        assert_eq!(tab.refused_ticket(), Verdict::Cutoff);
    }

    #[test]
    fn the_book_is_bounded_and_keeps_live_tabs() {
        let mut b = TabBook::new(TabBookConfig {
            max_tabs: 3,
            max_grace_addresses: 2,
            ..TabBookConfig::for_tab(TabConfig::for_price(1))
        })
        .unwrap();
        let t0 = Instant::ZERO;
        let ip = |i: u8| IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, i));
        for i in 0..3 {
            b.open(address(i), ip(i as u8), t0).unwrap();
        }
        // Full: every tab is live.
        assert_eq!(b.open(address(9), ip(9), t0), Err(TabRefused::Full));
        b.close(&address(0), t0);
        let soon = t0 + Duration::from_secs(599);
        assert_eq!(b.open(address(9), ip(9), soon), Err(TabRefused::Full));
        // Its window over, the closed tab makes room; two addresses' grants are remembered
        // at most, so a third address gets no grace until they expire.
        let later = t0 + Duration::from_secs(601);
        assert_eq!(b.open(address(9), ip(9), later), Ok(Opened::Graced));
        assert_eq!(b.len(), 3);
    }

    proptest::proptest! {
        /// Whatever sessions come and go, from however many keys on one address, the frames
        /// served without payment (the client's own, charged before, or deliveries, charged
        /// after) stay within `grace_per_address` graces per window.
        #[test]
        fn free_service_per_address_is_bounded(
            ops in proptest::collection::vec(
                (0u32..20, 0u64..200, 0u64..30, proptest::bool::ANY),
                1..200,
            ),
        ) {
            let grace_per_address = 2;
            let mut b = book(grace_per_address);
            let cfg = TabConfig::for_price(10);
            let one = (cfg.initial_credit + cfg.max_arrears) / cfg.price;
            let mut t = Instant::ZERO;
            let mut served = 0u64;
            let mut windows = 1u64;
            let mut window_start = t;
            for (key, frames, wait, own) in ops {
                t = t + Duration::from_secs(wait);
                if t.saturating_duration_since(window_start) >= Duration::from_secs(600) {
                    windows += 1;
                    window_start = t;
                }
                let a = address(key);
                if b.open(a, IP, t).is_err() {
                    continue;
                }
                for _ in 0..frames {
                    let verdict = if own {
                        b.tab_mut(&a).map_or(Verdict::Cutoff, |t| t.charge_or_refuse(1))
                    } else {
                        b.charge(&a, 1)
                    };
                    if verdict == Verdict::Serve {
                        served += 1;
                    }
                }
                b.close(&a, t);
            }
            // A window boundary can straddle grants of two windows: count one extra window.
            let bound = one * grace_per_address as u64 * (windows + 1);
            proptest::prop_assert!(served <= bound, "{} served > {}", served, bound);
        }
    }
}
