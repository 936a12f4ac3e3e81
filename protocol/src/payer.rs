//! The client's side of payment: it owns the pot's key and issues tickets so that each relay's
//! expected income matches its advertised price for the traffic the client makes it carry.
//!
//! The driver reports traffic with [`Payer::carried`]: one call per hop of every packet the
//! client sends (real and cover, forward and SURB-ACK routes alike: each hop carries the
//! packet once) and, when a reply arrives on a reply block, one per hop of that block, so
//! replies are paid too. Frames the gateway forwards or delivers count for the gateway the
//! same way.
//!
//! When it builds a packet, the driver asks [`Payer::ticket_for`] each hop, and before a frame
//! to its gateway [`Payer::gateway_payment`]. Once what the client owes a relay reaches the
//! threshold (`packets_per_ticket × price`, or `gateway_frames_per_ticket × price` for the
//! gateway), the payer signs one ticket whose expected value is all of it and keeps only what
//! rounding leaves. Fewer, larger tickets leak less: a relay can link the packets that carry
//! tickets from one pot, so `packets_per_ticket` is the privacy knob (DESIGN.md §5), and the
//! gateway, which knows its client anyway, is paid more often.
//!
//! # Prices
//!
//! `carried` takes only the relay's identity, because a reply names its hops but not their
//! prices. The packets are counted and priced at the next [`PayeeInfo`] the payer sees for
//! that relay (the price in the consensus the client builds packets with), so money owed is
//! `price × packets` exactly while a relay's price stays the same.
//!
//! # Face value and the pot
//!
//! A ticket pays the configured `face_value` when it wins (Orchid sets it near half of what
//! the pot can cover, so few tickets win and each win is worth its redemption), clamped to
//! what the pot can cover. The driver reports the pot with [`Payer::set_pot`]: the balance
//! tickets may draw on, from which the payer subtracts the expected value of each ticket it
//! issues (what the pot pays on average) until the next report, and the largest face value
//! the pot covers (the ledger's `usable`: half the escrow at most), which issuing tickets does
//! not use up. A pot that can cover nothing gets no tickets signed; a debt larger than the
//! clamped face value is paid by a sure-win ticket of that face value, and the rest by later
//! tickets.
//!
//! # Bounds
//!
//! One account per relay the client used since the last [`Payer::retain`] or
//! [`Payer::prune_to_consensus`]; at most `max_payees` of them (packets for further relays
//! are not recorded and are counted in [`PayerStats::accruals_dropped`]).

use std::collections::HashMap;

use ed25519_dalek::SigningKey;
use rand::CryptoRng;

use crate::directory::{
    ChainAddress, Consensus, ConsensusRelay, IdentityKey, MAX_RELAYS, UnixTime,
};
use crate::ticket::{CoSignature, Terms, Ticket, TicketFields};
use crate::{Error, Result};

/// What the payer needs to know about a relay to pay it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayeeInfo {
    /// The relay's identity: the ticket's recipient.
    pub identity: IdentityKey,
    /// Its advertised price per packet, in base units.
    pub price_per_packet: u64,
    /// Its ticket commitment for the key epoch of the packet the ticket travels with.
    pub commitment: [u8; 32],
}

impl PayeeInfo {
    /// A consensus relay with the commitment it published for the packet's key epoch.
    pub fn of(relay: &ConsensusRelay, commitment: [u8; 32]) -> Self {
        PayeeInfo {
            identity: relay.identity,
            price_per_packet: relay.price_per_packet,
            commitment,
        }
    }
}

/// The payer's knobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PayerConfig {
    /// Packets a ticket to a mix or exit pays for. A relay links the packets that carry
    /// tickets from one pot, so it links 1 in this many of the client's packets it carries.
    pub packets_per_ticket: u64,
    /// Frames a ticket to the gateway pays for. The gateway knows its client, so frequent
    /// tickets leak nothing and keep the client well inside the gateway's arrears limit.
    pub gateway_frames_per_ticket: u64,
    /// What a winning ticket pays, in base units, before the pot's clamp.
    pub face_value: u64,
    /// Seconds from a ticket's issue to its expiry.
    pub ticket_lifetime_s: u64,
    /// The most relays with an account at once.
    pub max_payees: usize,
}

impl Default for PayerConfig {
    /// `packets_per_ticket` 64: 64 packets carry 128 KiB, the debt at which an Orchid relay
    /// disconnects its client, so a relay never carries more than that unpaid, and links 1
    /// in 64 of the client's packets it sees. `gateway_frames_per_ticket` 16, a quarter of
    /// the gateway's default arrears limit ([`crate::tab::DEFAULT_GRACE_FRAMES`]), leaving
    /// room for tickets in flight. `face_value` 1,000,000 base units: at a price of 1 a
    /// winning ticket pays for a million packets, so a network carrying a million packet-hops
    /// a second asks the ledger for about one redemption a second (it manages about 1,200).
    /// `ticket_lifetime_s` 7,200: a relay commits per 20-minute key epoch, holds the key one
    /// epoch longer (`key_grace`), redeems only after the key retires, and wants 30 minutes
    /// left to redeem in (`min_redeem_window`): a ticket issued as its epoch begins must live
    /// 20 + 20 + 30 = 70 minutes. Two hours leaves room for clock skew; the ledger remembers
    /// redeemed nonces until they expire, so not much longer. `max_payees` twice [`MAX_RELAYS`]: two consensuses' worth.
    fn default() -> Self {
        PayerConfig {
            packets_per_ticket: 64,
            gateway_frames_per_ticket: 16,
            face_value: 1_000_000,
            ticket_lifetime_s: 7_200,
            max_payees: 2 * MAX_RELAYS,
        }
    }
}

impl PayerConfig {
    /// Refuses zero for any knob: tickets for no packets, worth nothing when they win, or
    /// expired when issued, and a payer that records no relay.
    pub fn validate(&self) -> Result<()> {
        for (name, value) in [
            ("packets_per_ticket", self.packets_per_ticket),
            ("gateway_frames_per_ticket", self.gateway_frames_per_ticket),
            ("face_value", self.face_value),
            ("ticket_lifetime_s", self.ticket_lifetime_s),
            ("max_payees", self.max_payees as u64),
        ] {
            if value == 0 {
                return Err(Error::PaymentConfig(format!("{name} must be positive")));
            }
        }
        Ok(())
    }
}

/// What the client owes one relay and has paid it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayeeAccount {
    /// Packets carried in all (saturating).
    pub packets: u64,
    /// Packets carried and not yet priced (see the module documentation).
    pub unpriced: u64,
    /// `price × packets` over the packets priced so far, in base units.
    pub accrued: u128,
    /// The sum of the expected values of the tickets issued to the relay.
    pub issued: u128,
    /// Tickets issued to the relay.
    pub tickets: u64,
}

impl PayeeAccount {
    /// Money owed: accrued and not yet paid (0 while the last ticket's rounding overpaid by
    /// a unit).
    pub fn owed(&self) -> u64 {
        u64::try_from(self.accrued.saturating_sub(self.issued)).unwrap_or(u64::MAX)
    }
}

/// Running totals over all relays, for metrics (saturating).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PayerStats {
    /// Tickets issued to mixes and exits.
    pub tickets_issued: u64,
    /// Tickets issued to gateways.
    pub gateway_tickets_issued: u64,
    /// The expected value of all tickets issued.
    pub expected_value_issued: u64,
    /// Tickets whose face value the pot's usable amount lowered below `face_value`.
    pub face_value_clamped: u64,
    /// Tickets due but not signed because the pot could cover nothing.
    pub unpayable: u64,
    /// Packets not recorded because `max_payees` relays already had accounts.
    pub accruals_dropped: u64,
}

/// Co-signs a ticket for settlement on a chain, naming the recipient's chain address (from
/// its descriptor); set by a client that pays relays which redeem on a chain
/// ([`Payer::set_cosigner`]). A closure, so this crate needs no secp256k1 or chain library.
pub type Cosign = Box<dyn Fn(&Ticket, &ChainAddress) -> Option<CoSignature> + Send + Sync>;

/// The client's ticket issuer. Owns the pot's signing key (zeroized when the payer drops).
pub struct Payer {
    key: SigningKey,
    cosign: Option<Cosign>,
    pot: IdentityKey,
    config: PayerConfig,
    /// What the pot's balance can still pay, by the payer's estimate.
    pot_usable: u64,
    /// The largest face value the pot covers (half its escrow: the ledger's `usable` bound),
    /// which issuing tickets does not use up.
    face_cap: u64,
    accounts: HashMap<IdentityKey, PayeeAccount>,
    stats: PayerStats,
}

impl std::fmt::Debug for Payer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Payer")
            .field("pot", &self.pot)
            .field("config", &self.config)
            .field("pot_usable", &self.pot_usable)
            .field("accounts", &self.accounts.len())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Payer {
    /// A payer for the pot of `key`, which can cover `pot_usable` base units (the ledger's
    /// usable amount for the pot).
    pub fn new(key: SigningKey, config: PayerConfig, pot_usable: u64) -> Result<Self> {
        config.validate()?;
        Ok(Payer {
            pot: IdentityKey::of(&key),
            key,
            cosign: None,
            config,
            pot_usable,
            face_cap: pot_usable,
            accounts: HashMap::new(),
            stats: PayerStats::default(),
        })
    }

    /// Co-signs every ticket from now on with `cosign`: the session sends a gateway's
    /// tickets as `Control::CosignedPayment` and puts a hop's co-signature in its envelope
    /// slot in the signature's place (slot flag 2).
    pub fn set_cosigner(&mut self, cosign: Cosign) {
        self.cosign = Some(cosign);
    }

    /// The co-signature of `ticket` for a recipient paid at `recipient` on the chain, if the
    /// payer co-signs and the recipient published an address (a relay that redeems at a
    /// ledger publishes none, and its tickets go without).
    pub fn cosign(&self, ticket: &Ticket, recipient: Option<&ChainAddress>) -> Option<CoSignature> {
        self.cosign
            .as_ref()
            .zip(recipient)
            .and_then(|(c, a)| c(ticket, a))
    }

    /// The pot's id at the ledger (its public key).
    pub fn pot(&self) -> IdentityKey {
        self.pot
    }

    /// The knobs.
    pub fn config(&self) -> &PayerConfig {
        &self.config
    }

    /// The payer's estimate of what the pot can cover.
    pub fn pot_usable(&self) -> u64 {
        self.pot_usable
    }

    /// What the ledger says the pot can cover now (its usable amount), as both the balance
    /// left and the face-value cap.
    pub fn set_pot_usable(&mut self, usable: u64) {
        self.set_pot(usable, usable);
    }

    /// What the ledger says of the pot now: the balance tickets may draw on (`balance` less
    /// what is warned for withdrawal) and the largest face value it covers (`usable`, which
    /// half the escrow bounds). The payer subtracts each ticket's expected value from the
    /// first only: issuing tickets drains the balance, not the escrow.
    pub fn set_pot(&mut self, balance: u64, face_cap: u64) {
        self.pot_usable = balance;
        self.face_cap = face_cap;
    }

    /// `relay` carried `packets` packets (or frames) for the client.
    pub fn carried(&mut self, relay: IdentityKey, packets: u64) {
        if packets == 0 {
            return;
        }
        let full = self.accounts.len() >= self.config.max_payees;
        let account = match self.accounts.get_mut(&relay) {
            Some(account) => account,
            None if full => {
                self.stats.accruals_dropped = self.stats.accruals_dropped.saturating_add(packets);
                return;
            }
            None => self.accounts.entry(relay).or_default(),
        };
        account.packets = account.packets.saturating_add(packets);
        account.unpriced = account.unpriced.saturating_add(packets);
    }

    /// A ticket for a mix or exit hop, if what the client owes `relay` reached
    /// `packets_per_ticket × price`; its expected value is everything owed (up to the
    /// clamped face value).
    pub fn ticket_for<R: CryptoRng + ?Sized>(
        &mut self,
        relay: &PayeeInfo,
        now: UnixTime,
        rng: &mut R,
    ) -> Option<Ticket> {
        let ticket = self.pay(relay, self.config.packets_per_ticket, now, rng)?;
        self.stats.tickets_issued = self.stats.tickets_issued.saturating_add(1);
        Some(ticket)
    }

    /// A ticket for the gateway, for a [`crate::control::Control::Payment`], if what the
    /// client owes it reached `gateway_frames_per_ticket × price`.
    pub fn gateway_payment<R: CryptoRng + ?Sized>(
        &mut self,
        gateway: &PayeeInfo,
        now: UnixTime,
        rng: &mut R,
    ) -> Option<Ticket> {
        let ticket = self.pay(gateway, self.config.gateway_frames_per_ticket, now, rng)?;
        self.stats.gateway_tickets_issued = self.stats.gateway_tickets_issued.saturating_add(1);
        Some(ticket)
    }

    fn pay<R: CryptoRng + ?Sized>(
        &mut self,
        payee: &PayeeInfo,
        packets_per_ticket: u64,
        now: UnixTime,
        rng: &mut R,
    ) -> Option<Ticket> {
        let account = self.accounts.get_mut(&payee.identity)?;
        let price = payee.price_per_packet;
        let priced = u128::from(account.unpriced) * u128::from(price);
        account.accrued = account.accrued.saturating_add(priced);
        account.unpriced = 0;
        let owed = account.owed();
        if owed == 0 || owed < packets_per_ticket.saturating_mul(price) {
            return None;
        }
        let face = self
            .config
            .face_value
            .min(self.pot_usable)
            .min(self.face_cap);
        if face == 0 {
            self.stats.unpayable = self.stats.unpayable.saturating_add(1);
            return None;
        }
        let terms = Terms::for_expected_value(owed.min(face), face).ok()?;
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let ticket = Ticket::sign(
            TicketFields {
                recipient: payee.identity,
                face_value: terms.face_value,
                win_ratio: terms.win_ratio,
                nonce,
                issued: now,
                expiry: now.saturating_add(self.config.ticket_lifetime_s),
                commitment: payee.commitment,
            },
            &self.key,
        );
        let value = ticket.expected_value();
        account.issued = account.issued.saturating_add(u128::from(value));
        account.tickets = account.tickets.saturating_add(1);
        self.pot_usable = self.pot_usable.saturating_sub(value);
        self.stats.expected_value_issued = self.stats.expected_value_issued.saturating_add(value);
        if face < self.config.face_value {
            self.stats.face_value_clamped = self.stats.face_value_clamped.saturating_add(1);
        }
        Some(ticket)
    }

    /// What the client owes `relay` and has paid it, if it has an account.
    pub fn account(&self, relay: &IdentityKey) -> Option<&PayeeAccount> {
        self.accounts.get(relay)
    }

    /// Every account.
    pub fn accounts(&self) -> impl Iterator<Item = (&IdentityKey, &PayeeAccount)> {
        self.accounts.iter()
    }

    /// Drops `relay`'s account (it left the consensus); returns it.
    pub fn forget(&mut self, relay: &IdentityKey) -> Option<PayeeAccount> {
        self.accounts.remove(relay)
    }

    /// Keeps only the accounts of relays for which `keep` holds.
    pub fn retain(&mut self, mut keep: impl FnMut(&IdentityKey) -> bool) {
        self.accounts.retain(|relay, _| keep(relay));
    }

    /// Keeps only the accounts of relays `consensus` lists.
    pub fn prune_to_consensus(&mut self, consensus: &Consensus) {
        self.retain(|relay| consensus.relay(relay).is_some());
    }

    /// Running totals.
    pub fn stats(&self) -> PayerStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::commitment_of;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const REVEAL: [u8; 32] = [9; 32];

    fn payee(id: u8, price: u64) -> PayeeInfo {
        PayeeInfo {
            identity: IdentityKey([id; 32]),
            price_per_packet: price,
            commitment: commitment_of(&REVEAL),
        }
    }

    fn payer(config: PayerConfig, usable: u64) -> Payer {
        Payer::new(SigningKey::from_bytes(&[1; 32]), config, usable).unwrap()
    }

    fn config() -> PayerConfig {
        PayerConfig {
            packets_per_ticket: 10,
            gateway_frames_per_ticket: 4,
            face_value: 1_000,
            ticket_lifetime_s: 600,
            max_payees: 8,
        }
    }

    #[test]
    fn a_ticket_comes_when_the_debt_reaches_the_threshold() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let mut p = payer(config(), 1_000_000);
        let relay = payee(2, 3);
        assert_eq!(p.ticket_for(&relay, 100, &mut rng), None, "no account yet");
        p.carried(relay.identity, 9);
        assert_eq!(p.ticket_for(&relay, 100, &mut rng), None);
        assert_eq!(p.account(&relay.identity).unwrap().owed(), 27);
        p.carried(relay.identity, 2);
        let t = p.ticket_for(&relay, 100, &mut rng).unwrap();
        t.check_for_recipient(&relay.identity, 100, 33).unwrap();
        assert_eq!(t.pot, p.pot());
        assert_eq!((t.issued, t.expiry), (100, 700));
        assert_eq!(t.face_value, 1_000);
        assert_eq!(t.commitment, relay.commitment);
        // 11 packets at 3: worth 33, or 34 after rounding the win ratio up.
        let ev = t.expected_value();
        assert!((33..=34).contains(&ev), "{ev}");
        let a = *p.account(&relay.identity).unwrap();
        assert_eq!(
            (a.packets, a.unpriced, a.accrued, a.tickets),
            (11, 0, 33, 1)
        );
        assert_eq!(a.issued, u128::from(ev));
        assert_eq!(a.owed(), 0);
        assert_eq!(p.ticket_for(&relay, 101, &mut rng), None);
        assert_eq!(p.pot_usable(), 1_000_000 - ev);
        let s = p.stats();
        assert_eq!((s.tickets_issued, s.expected_value_issued), (1, ev));
    }

    #[test]
    fn the_gateway_is_paid_on_its_own_threshold() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let mut p = payer(config(), 1_000_000);
        let gateway = payee(3, 5);
        p.carried(gateway.identity, 4);
        assert_eq!(
            p.ticket_for(&gateway, 0, &mut rng),
            None,
            "below 10 packets"
        );
        let t = p.gateway_payment(&gateway, 0, &mut rng).unwrap();
        assert!((20..=21).contains(&t.expected_value()));
        assert_eq!(p.stats().gateway_tickets_issued, 1);
        assert_eq!(p.stats().tickets_issued, 0);
    }

    #[test]
    fn free_relays_are_owed_nothing() {
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut p = payer(config(), 1_000_000);
        let free = payee(4, 0);
        p.carried(free.identity, u64::MAX);
        p.carried(free.identity, u64::MAX);
        assert_eq!(p.ticket_for(&free, 0, &mut rng), None);
        assert_eq!(p.gateway_payment(&free, 0, &mut rng), None);
        assert_eq!(p.account(&free.identity).unwrap().owed(), 0);
        assert_eq!(p.account(&free.identity).unwrap().packets, u64::MAX);
    }

    /// The escrow bounds each ticket's face value, not how many tickets the pot pays: a
    /// small escrow over a large balance keeps paying at the capped face value.
    #[test]
    fn the_escrow_caps_the_face_value_and_the_balance_pays() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let mut p = payer(config(), 0);
        p.set_pot(1_000_000, 128);
        let relay = payee(5, 1);
        for _ in 0..100 {
            p.carried(relay.identity, 64);
            let t = p.ticket_for(&relay, 0, &mut rng).unwrap();
            assert_eq!(t.face_value, 128);
        }
        assert!(p.pot_usable() < 1_000_000 - 100 * 60);
        assert_eq!(p.stats().unpayable, 0);
    }

    #[test]
    fn the_face_value_never_exceeds_what_the_pot_covers() {
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let mut p = payer(config(), 100);
        let relay = payee(5, 1);
        p.carried(relay.identity, 30);
        let t = p.ticket_for(&relay, 0, &mut rng).unwrap();
        assert_eq!(t.face_value, 100);
        assert!((30..=31).contains(&t.expected_value()));
        assert_eq!(p.stats().face_value_clamped, 1);
        // A debt beyond the pot: a sure win for what is left, then nothing.
        p.carried(relay.identity, 500);
        let left = p.pot_usable();
        let t = p.ticket_for(&relay, 0, &mut rng).unwrap();
        assert_eq!((t.face_value, t.win_ratio), (left, u64::MAX));
        assert_eq!(p.pot_usable(), 0);
        assert_eq!(p.ticket_for(&relay, 0, &mut rng), None);
        assert_eq!(p.stats().unpayable, 1);
        // The ledger reports more money: payment resumes.
        p.set_pot_usable(10_000);
        let t = p.ticket_for(&relay, 0, &mut rng).unwrap();
        assert_eq!(t.face_value, 1_000);
        assert_eq!(p.account(&relay.identity).unwrap().owed(), 0);
    }

    #[test]
    fn packets_are_priced_at_the_price_the_payer_sees_next() {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let mut p = payer(config(), 1_000_000);
        p.carried(IdentityKey([6; 32]), 5);
        assert_eq!(p.ticket_for(&payee(6, 2), 0, &mut rng), None);
        p.carried(IdentityKey([6; 32]), 10);
        let t = p.ticket_for(&payee(6, 4), 0, &mut rng).unwrap();
        assert!((50..=51).contains(&t.expected_value()), "5 × 2 + 10 × 4");
    }

    #[test]
    fn accounts_are_bounded_and_prunable() {
        let mut p = payer(config(), 1_000_000);
        for id in 0..10u8 {
            p.carried(IdentityKey([id; 32]), 2);
        }
        assert_eq!(p.accounts().count(), 8);
        assert_eq!(p.stats().accruals_dropped, 4);
        // Known relays still accrue when the map is full.
        p.carried(IdentityKey([0; 32]), 1);
        assert_eq!(p.account(&IdentityKey([0; 32])).unwrap().packets, 3);
        assert_eq!(p.forget(&IdentityKey([0; 32])).unwrap().packets, 3);
        assert_eq!(p.forget(&IdentityKey([0; 32])), None);
        p.retain(|id| id.0[0] % 2 == 1);
        assert_eq!(p.accounts().count(), 4);
        p.carried(IdentityKey([42; 32]), 1);
        assert_eq!(p.accounts().count(), 5);
    }

    #[test]
    fn pruning_to_a_consensus_keeps_its_relays() {
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let net = crate::directory::synthetic::SyntheticNetwork {
            mixes_per_layer: 2,
            gateways: 1,
            exits: 1,
            params: crate::directory::NetworkParams::nym_like(),
            epoch: 0,
        };
        let (consensus, _) = crate::directory::synthetic::generate(&mut rng, &net);
        let mut p = payer(config(), 1_000_000);
        for r in &consensus.relays {
            p.carried(r.identity, 1);
        }
        p.carried(IdentityKey([0xee; 32]), 1);
        p.prune_to_consensus(&consensus);
        assert_eq!(p.accounts().count(), consensus.relays.len());
        assert_eq!(p.account(&IdentityKey([0xee; 32])), None);
        let r = &consensus.relays[0];
        let info = PayeeInfo::of(r, [1; 32]);
        assert_eq!(info.price_per_packet, r.price_per_packet);
        assert_eq!(info.identity, r.identity);
    }

    #[test]
    fn nonsensical_config_is_refused() {
        let key = || SigningKey::from_bytes(&[1; 32]);
        for broken in [
            PayerConfig {
                face_value: 0,
                ..config()
            },
            PayerConfig {
                packets_per_ticket: 0,
                ..config()
            },
            PayerConfig {
                gateway_frames_per_ticket: 0,
                ..config()
            },
            PayerConfig {
                ticket_lifetime_s: 0,
                ..config()
            },
            PayerConfig {
                max_payees: 0,
                ..config()
            },
        ] {
            let e = Payer::new(key(), broken, 1).unwrap_err();
            assert!(matches!(e, Error::PaymentConfig(_)), "{e:?}");
            assert_eq!(e.label(), "config");
        }
        PayerConfig::default().validate().unwrap();
        // The key stays out of debug output.
        let p = Payer::new(key(), config(), 1).unwrap();
        let shown = format!("{p:?}");
        assert!(shown.contains("pot"), "{shown}");
        let secret_hex: String = key()
            .to_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!shown.contains(&secret_hex[..16]), "{shown}");
    }

    #[test]
    fn nonces_are_fresh_and_hostile_counts_do_not_overflow() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let mut p = payer(
            PayerConfig {
                face_value: u64::MAX,
                ..config()
            },
            u64::MAX,
        );
        let relay = payee(8, u64::MAX);
        let mut nonces = std::collections::HashSet::new();
        for _ in 0..20 {
            p.set_pot_usable(u64::MAX);
            p.carried(relay.identity, u64::MAX);
            let t = p.ticket_for(&relay, u64::MAX, &mut rng).unwrap();
            assert_eq!(t.expiry, u64::MAX);
            assert!(nonces.insert(t.nonce));
        }
        let a = p.account(&relay.identity).unwrap();
        assert_eq!(a.owed(), u64::MAX, "far more is owed than a u64 holds");
        assert_eq!(p.pot_usable(), 0);
    }

    /// A relay's income from the payer's tickets matches its price. 20,000 tickets, each
    /// paying for 64 packets at price 1 with a face value of 640 (p = 0.1): the number of
    /// winners lies inside the binomial 99.9% interval (exact quantiles, statrs), so the
    /// relay's income `wins × 640` is `64 × tickets` within it. The seed is fixed, so the test
    /// is deterministic. The win test itself is checked over 100,000 tickets at four
    /// probabilities in `ticket::tests::win_frequency_matches_the_probability`.
    #[test]
    fn winners_pay_the_price_within_the_binomial_interval() {
        use statrs::distribution::{Binomial, DiscreteCDF};
        const N: u64 = 20_000;
        let mut rng = ChaCha20Rng::seed_from_u64(8);
        let mut p = payer(
            PayerConfig {
                packets_per_ticket: 64,
                face_value: 640,
                ..config()
            },
            u64::MAX,
        );
        let relay = payee(10, 1);
        let mut wins = 0u64;
        let mut win_ratio = None;
        let mut nonces = std::collections::HashSet::new();
        for i in 0..N {
            p.carried(relay.identity, 64);
            let t = p.ticket_for(&relay, 1_000 + i, &mut rng).unwrap();
            assert_eq!(t.expected_value(), 64);
            assert_eq!(*win_ratio.get_or_insert(t.win_ratio), t.win_ratio);
            assert!(nonces.insert(t.nonce), "nonce reused");
            wins += u64::from(t.is_winner(&REVEAL));
        }
        let a = p.account(&relay.identity).unwrap();
        assert_eq!((a.tickets, a.issued, a.owed()), (N, u128::from(64 * N), 0));
        let prob = (win_ratio.unwrap() as f64 + 1.0) / 2f64.powi(64);
        assert!((prob - 0.1).abs() < 1e-12, "{prob}");
        let binomial = Binomial::new(prob, N).unwrap();
        let (lo, hi) = (binomial.inverse_cdf(0.0005), binomial.inverse_cdf(0.9995));
        assert!(
            (lo..=hi).contains(&wins),
            "{wins} winners of {N}; the 99.9% interval is {lo}..={hi}"
        );
    }
}
