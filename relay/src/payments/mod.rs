//! The relay's side of nanopayments (issue 6): accepting the tickets that pay this hop,
//! keeping the winners durably, and redeeming them at the ledger.
//!
//! ```text
//! Sphinx workers ──accept(ticket, key epoch, now)──▶ Payments
//!     recipient, expiry, issue time, value → epoch held, commitment → redeemable in time
//!     → nonce unseen → pot able to pay → signature (last: the expensive one)
//!     → win test with the epoch's reveal: a winner is queued
//! flusher ──flush()──▶ queued winners → payments.redb, one transaction (before the batch's
//!     packets are released: a winning ticket is durable before it is acknowledged)
//! redeemer (async) ──▶ winners whose key epoch has retired → ledger `redeem` → settled
//! pot refresher (async) ──▶ ledger `pot` lookups for the pot cache
//! ```
//!
//! **Why redeem only after the epoch retires.** Redeeming shows the epoch's reveal to the
//! ledger, and so perhaps to payers, who could then sign only tickets that lose. Tickets of
//! key epoch E are therefore accepted only while this relay holds Sphinx key E
//! ([`KeyRing`]), and redeemed only once key E has left the ring. A payer must set expiries
//! that leave room for that (`payments.min_redeem_window` past the key's retirement; sooner
//! is refused as `expires_too_soon`).
//!
//! **What is in memory only.** The nonces of accepted tickets (an exact set per key epoch;
//! winners are also in the store, and reloaded into the set on start) and the pot cache. After
//! a restart a payer could present a losing ticket of a live epoch a second time; winners
//! cannot be paid twice (the ledger redeems each `(pot, nonce)` once).

mod redeem;
mod store;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use murmur_ledger::Pot;
use murmur_protocol::directory::{Epoch, IdentityKey, UnixTime};
use murmur_protocol::ticket::{CoSignature, MAX_CLOCK_SKEW_S, Ticket};

pub use crate::config::UnpaidPolicy;
use crate::config::{Config, PaymentsSection};
use crate::error::Result;
use crate::keys::KeyRing;
use crate::metrics as m;
pub use redeem::{RedeemRound, run_pot_refresher, run_redeemer};
pub use store::{Settled, TicketId, Winner, ticket_id};

/// What [`Payments`] is told by the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentsParams {
    /// This relay's identity: tickets must be made out to it.
    pub me: IdentityKey,
    pub min_expected_value: u64,
    /// The directory's epoch length, and how many epochs past the current one keys are held:
    /// key epoch E retires at `(E + 1 + grace_epochs) · epoch_length_s`.
    pub epoch_length_s: u64,
    pub grace_epochs: u32,
    /// A ticket must stay redeemable this long after its key epoch retires.
    pub min_redeem_window_s: u64,
    pub max_tickets_per_epoch: usize,
    pub max_pots: usize,
    pub max_pot_lookups: usize,
    pub max_pending_winners: usize,
    pub max_face_value: u64,
    pub unverified_tickets_per_pot: u32,
    pub max_unverified_winners: usize,
    pub max_unverified_tickets_per_epoch: usize,
    pub max_pending_winners_per_pot: usize,
    pub max_tickets_per_pot_per_epoch: usize,
    /// Seconds a pot's state is trusted.
    pub pot_refresh_s: u64,
    /// First retry of a redemption after 1 s, doubling up to this.
    pub redeem_backoff_max_s: u64,
    pub unpaid: UnpaidPolicy,
}

impl PaymentsParams {
    /// The parameters of relay `me` under `config`.
    pub fn from_config(config: &Config, me: IdentityKey) -> Self {
        let p: &PaymentsSection = &config.payments;
        PaymentsParams {
            me,
            min_expected_value: p.min_expected_value,
            epoch_length_s: config.directory.epoch_length.as_secs().max(1),
            grace_epochs: config.grace_epochs(),
            min_redeem_window_s: p.min_redeem_window.as_secs(),
            max_tickets_per_epoch: p.max_tickets_per_epoch,
            max_pots: p.max_pots,
            max_pot_lookups: p.max_pot_lookups,
            max_pending_winners: p.max_pending_winners,
            max_face_value: p.max_face_value,
            unverified_tickets_per_pot: p.unverified_tickets_per_pot,
            max_unverified_winners: p.max_unverified_winners,
            max_unverified_tickets_per_epoch: p.max_unverified_tickets_per_epoch,
            max_pending_winners_per_pot: p.max_pending_winners_per_pot,
            max_tickets_per_pot_per_epoch: p.max_tickets_per_pot_per_epoch,
            pot_refresh_s: p.pot_refresh.as_secs().max(1),
            redeem_backoff_max_s: p.redeem_backoff_max.as_secs().max(1),
            unpaid: p.unpaid,
        }
    }

    /// When key epoch `epoch` leaves the ring (its tickets become redeemable), by the
    /// directory's clock.
    pub fn retires_at(&self, epoch: Epoch) -> UnixTime {
        (u64::from(epoch) + 1 + u64::from(self.grace_epochs)).saturating_mul(self.epoch_length_s)
    }
}

/// The signatures a ticket came with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TicketSignatures {
    /// The pot's Ed25519 signature only (envelope slot flag 1, `Control::Payment`).
    Ed25519,
    /// The Ed25519 signature and the pot owner's chain co-signature beside it
    /// (`Control::CosignedPayment`).
    WithCoSignature(CoSignature),
    /// The co-signature in the Ed25519 signature's place (envelope slot flag 2).
    CoSignatureOnly(CoSignature),
}

impl TicketSignatures {
    /// What a hop's envelope slot carried.
    pub fn of_slot(slot: &murmur_protocol::envelope::SlotTicket) -> TicketSignatures {
        match slot.cosignature() {
            Some(c) => TicketSignatures::CoSignatureOnly(c),
            None => TicketSignatures::Ed25519,
        }
    }

    fn cosignature(self) -> Option<CoSignature> {
        match self {
            TicketSignatures::Ed25519 => None,
            TicketSignatures::WithCoSignature(c) | TicketSignatures::CoSignatureOnly(c) => Some(c),
        }
    }
}

/// What a co-signature says of the pot's owner ([`CoSignatureCheck::check`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoSigned {
    /// It recovers to the pot's owner.
    ByOwner,
    /// It does not recover, or not to the pot's owner.
    NotByOwner,
    /// It recovers, but the pot's owner is not known yet (the pot is being looked up): the
    /// ticket is accepted within the pot's allowance, and the contract checks the
    /// co-signature again before it pays (refusing a bad one before any gas is spent).
    OwnerUnknown,
}

/// The chain's side of ticket acceptance, for a relay that redeems on a chain
/// (`murmur-chain`'s `ChainSettlement`, with the `chain` feature): checks each ticket's
/// co-signature without a call to the node, and keeps a winner's for its redemption. A trait,
/// so that this crate's payments need no chain library.
pub trait CoSignatureCheck: Send + Sync {
    /// Whose co-signature of `ticket` this is.
    fn check(&self, ticket: &Ticket, cosignature: &CoSignature) -> CoSigned;
    /// Keeps it until `ticket` is redeemed; `false` if no more can be kept now.
    fn keep(&self, ticket: &Ticket, cosignature: CoSignature) -> bool;
}

/// Why a ticket does not pay this hop. Each has its own metrics label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PaymentRefusal {
    #[error("the ticket is made out to another relay")]
    WrongRecipient,
    #[error("the ticket expired at {expiry} (now {now})")]
    Expired { expiry: UnixTime, now: UnixTime },
    #[error("the ticket is issued at {issued}, more than {MAX_CLOCK_SKEW_S} s after now ({now})")]
    NotYetValid { issued: UnixTime, now: UnixTime },
    #[error("the ticket's expected value {expected_value} is below the minimum {min}")]
    TooSmall { expected_value: u64, min: u64 },
    #[error("no Sphinx key is held for epoch {0}")]
    UnknownEpoch(Epoch),
    #[error("the ticket does not name this relay's commitment for epoch {0}")]
    WrongCommitment(Epoch),
    #[error("the ticket expires at {expiry}, before it could be redeemed (from {redeemable_from})")]
    ExpiresTooSoon {
        expiry: UnixTime,
        redeemable_from: UnixTime,
    },
    #[error("a ticket with this pot and nonce was already accepted")]
    NonceReused,
    #[error("epoch {0} has accepted as many tickets as it remembers")]
    TooManyTickets(Epoch),
    #[error("the ledger knows no pot {0}")]
    PotUnknown(IdentityKey),
    #[error("pot can pay {usable}, less than the face value {face_value}")]
    PotInsufficient { usable: u64, face_value: u64 },
    #[error("too many pots being looked up at the ledger")]
    PotLookupsFull,
    #[error("the pot cache is full")]
    PotCacheFull,
    #[error("the ticket's signature is not its pot's")]
    Forged,
    #[error("this relay redeems on a chain and the ticket carries no co-signature")]
    CoSignatureMissing,
    #[error("the ticket's co-signature is not its pot owner's")]
    CoSignatureNotOwner,
    #[error("too many winning tickets wait for redemption")]
    WinnersFull,
    #[error("the ticket's face value {face_value} is above the largest accepted, {max}")]
    FaceValueTooLarge { face_value: u64, max: u64 },
    #[error("the pot is being looked up at the ledger and has used its allowance until then")]
    PotNotYetKnown,
    #[error("too many winning tickets from pots not yet looked up wait for redemption")]
    UnverifiedWinnersFull,
    #[error("too many tickets from pots not yet looked up this epoch")]
    UnverifiedTicketsFull,
    #[error("the pot has as many winning tickets waiting as one pot may")]
    PotWinnersFull,
    #[error("the pot has used as many nonces this epoch as one pot may")]
    PotTicketsFull,
    #[error("unusable ticket: {0}")]
    Malformed(String),
}

impl PaymentRefusal {
    /// The `reason` label of `murmur_relay_tickets_refused_total`.
    pub fn label(&self) -> &'static str {
        match self {
            PaymentRefusal::WrongRecipient => "wrong_recipient",
            PaymentRefusal::Expired { .. } => "expired",
            PaymentRefusal::NotYetValid { .. } => "not_yet_valid",
            PaymentRefusal::TooSmall { .. } => "too_small",
            PaymentRefusal::UnknownEpoch(_) => "unknown_epoch",
            PaymentRefusal::WrongCommitment(_) => "wrong_commitment",
            PaymentRefusal::ExpiresTooSoon { .. } => "expires_too_soon",
            PaymentRefusal::NonceReused => "nonce_reused",
            PaymentRefusal::TooManyTickets(_) => "nonce_set_full",
            PaymentRefusal::PotUnknown(_) => "pot_unknown",
            PaymentRefusal::PotInsufficient { .. } => "pot_insufficient",
            PaymentRefusal::PotLookupsFull => "pot_lookups_full",
            PaymentRefusal::PotCacheFull => "pot_cache_full",
            PaymentRefusal::Forged => "forged",
            PaymentRefusal::CoSignatureMissing => "cosignature_missing",
            PaymentRefusal::CoSignatureNotOwner => "cosignature_not_owner",
            PaymentRefusal::WinnersFull => "winners_full",
            PaymentRefusal::FaceValueTooLarge { .. } => "face_value_too_large",
            PaymentRefusal::PotNotYetKnown => "pot_not_yet_known",
            PaymentRefusal::UnverifiedWinnersFull => "unverified_winners_full",
            PaymentRefusal::UnverifiedTicketsFull => "unverified_tickets_full",
            PaymentRefusal::PotWinnersFull => "pot_winners_full",
            PaymentRefusal::PotTicketsFull => "pot_tickets_full",
            PaymentRefusal::Malformed(_) => "malformed",
        }
    }

    fn from_ticket_error(e: murmur_protocol::Error) -> Self {
        use murmur_protocol::Error as P;
        match e {
            P::TicketWrongRecipient { .. } => PaymentRefusal::WrongRecipient,
            P::TicketExpired { expiry, now } => PaymentRefusal::Expired { expiry, now },
            P::TicketNotYetValid { issued, now } => PaymentRefusal::NotYetValid { issued, now },
            P::TicketValue {
                expected_value,
                min,
            } => PaymentRefusal::TooSmall {
                expected_value,
                min,
            },
            P::TicketForged => PaymentRefusal::Forged,
            other => PaymentRefusal::Malformed(other.to_string()),
        }
    }
}

/// A ticket that pays this hop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// What the ticket is worth in expectation (base units).
    pub expected_value: u64,
    /// It won: it is queued for the store and will be redeemed.
    pub winner: bool,
    /// The ledger vouched for its pot (known, and able to cover it after this relay's
    /// pending winners). `false`: accepted within the allowance of a pot still being looked
    /// up; a gateway holds the credit until [`Payments::pot_standing`] says more.
    pub pot_verified: bool,
}

/// What the relay knows, now, of whether a pot pays.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PotStanding {
    /// The ledger knows it and it covers this relay's pending winners plus `face_value`.
    Covers,
    /// Being looked up.
    Pending,
    /// Unknown to the ledger, or too poor for `face_value` after this relay's pending
    /// winners.
    Refused,
}

/// The nonces accepted under one key epoch, per pot.
#[derive(Default)]
struct SeenNonces {
    by_pot: HashMap<IdentityKey, HashSet<[u8; 16]>>,
    len: usize,
    /// Of `len`, nonces from pots that were not yet looked up.
    unverified: usize,
}

impl SeenNonces {
    fn contains(&self, pot: &IdentityKey, nonce: &[u8; 16]) -> bool {
        self.by_pot.get(pot).is_some_and(|s| s.contains(nonce))
    }

    fn of_pot(&self, pot: &IdentityKey) -> usize {
        self.by_pot.get(pot).map_or(0, HashSet::len)
    }

    fn insert(&mut self, pot: IdentityKey, nonce: [u8; 16], unverified: bool) -> bool {
        let fresh = self.by_pot.entry(pot).or_default().insert(nonce);
        self.len += usize::from(fresh);
        self.unverified += usize::from(fresh && unverified);
        fresh
    }
}

/// What the relay knows of a pot.
#[derive(Clone, Copy, Debug)]
enum PotState {
    /// Asked for; at most `unverified_tickets_per_pot` tickets are accepted meanwhile.
    LookingUp,
    Known(Pot),
    /// The ledger has no such pot.
    Unknown,
}

struct PotEntry {
    state: PotState,
    /// When the ledger last answered for it (0: never).
    fetched_at: UnixTime,
    /// A ticket named it since the last refresh (unused entries are dropped, not refreshed).
    used: bool,
    /// Tickets accepted while it was being looked up.
    unverified_accepted: u32,
    /// This relay's winners from the pot not yet settled, and their face values: what the
    /// pot already owes this relay, so a ticket is accepted only if the pot covers it on top.
    pending_winners: usize,
    pending_face: u64,
    /// Of `pending_winners`, those accepted while it was being looked up (they hold slots of
    /// the unverified pool until the ledger answers).
    unverified_winners: usize,
}

impl PotEntry {
    fn looking_up() -> PotEntry {
        PotEntry {
            state: PotState::LookingUp,
            fetched_at: 0,
            used: true,
            unverified_accepted: 0,
            pending_winners: 0,
            pending_face: 0,
            unverified_winners: 0,
        }
    }

    /// Whether the pot, as known, can pay `face_value` after the pending winners.
    fn covers(&self, face_value: u64) -> std::result::Result<(), PaymentRefusal> {
        match self.state {
            PotState::Known(pot) => {
                let usable = pot.usable_after(self.pending_face);
                if usable >= face_value {
                    Ok(())
                } else {
                    Err(PaymentRefusal::PotInsufficient { usable, face_value })
                }
            }
            PotState::LookingUp | PotState::Unknown => Err(PaymentRefusal::PotNotYetKnown),
        }
    }
}

#[derive(Default)]
struct PotCache {
    entries: HashMap<IdentityKey, PotEntry>,
    looking_up: usize,
    /// Winners pending from pots still being looked up (bounded by `max_unverified_winners`).
    unverified_winners: usize,
}

/// Redemption attempts of one pending winner.
#[derive(Clone, Copy, Debug, Default)]
struct Attempts {
    failures: u32,
    /// Not before this (Unix seconds).
    next_at: UnixTime,
    /// A redemption of it is under way.
    in_flight: bool,
}

/// Ticket acceptance, the winners' store and their redemption state. Shared by the Sphinx
/// workers (`accept`), the flusher (`flush`) and the redeemer and pot refresher tasks.
///
/// Locks are taken in the order `pots`, then `seen`.
pub struct Payments {
    params: PaymentsParams,
    keys: Arc<KeyRing>,
    store: store::Store,
    seen: Mutex<BTreeMap<Epoch, SeenNonces>>,
    pots: Mutex<PotCache>,
    /// Wakes the pot refresher when a new pot needs a lookup.
    lookups_wanted: tokio::sync::Notify,
    /// Winners accepted since the last flush.
    queued: Mutex<Vec<Winner>>,
    /// Winners queued or stored and not yet settled (bounded by `max_pending_winners`).
    pending: AtomicUsize,
    attempts: Mutex<HashMap<TicketId, Attempts>>,
    /// When settled records were last pruned.
    last_prune: Mutex<UnixTime>,
    /// Set when the relay redeems on a chain: every ticket must carry its pot owner's
    /// co-signature.
    chain: Option<Arc<dyn CoSignatureCheck>>,
}

impl Payments {
    /// Opens `<state_dir>/payments.redb` and reloads the pending winners: their nonces, and
    /// what their pots owe (the pots are looked up again).
    pub fn open(state_dir: &Path, params: PaymentsParams, keys: Arc<KeyRing>) -> Result<Payments> {
        let store = store::Store::open(&state_dir.join("payments.redb"))?;
        let rows = store.pending()?;
        let mut seen: BTreeMap<Epoch, SeenNonces> = BTreeMap::new();
        let mut pots = PotCache::default();
        for w in &rows.winners {
            if keys.get(w.epoch).is_some() {
                seen.entry(w.epoch)
                    .or_default()
                    .insert(w.ticket.pot, w.ticket.nonce, false);
            }
            let entry = pots.entries.entry(w.ticket.pot).or_insert_with(|| {
                pots.looking_up += 1;
                PotEntry::looking_up()
            });
            entry.pending_winners += 1;
            entry.pending_face = entry.pending_face.saturating_add(w.ticket.face_value);
        }
        let pending = rows.winners.len() + rows.corrupt.len();
        metrics::gauge!(m::WINNERS_PENDING).set(pending as f64);
        Ok(Payments {
            params,
            keys,
            store,
            seen: Mutex::new(seen),
            pots: Mutex::new(pots),
            lookups_wanted: tokio::sync::Notify::new(),
            queued: Mutex::new(Vec::new()),
            pending: AtomicUsize::new(pending),
            attempts: Mutex::new(HashMap::new()),
            last_prune: Mutex::new(0),
            chain: None,
        })
    }

    /// Redeems on a chain: from now on a ticket is accepted only with a co-signature that
    /// `check` finds is its pot owner's (or, while the pot is looked up, within the pot's
    /// allowance), and a winner's co-signature is stored with it and handed to `check` before
    /// each redemption.
    pub fn with_cosignatures(mut self, check: Arc<dyn CoSignatureCheck>) -> Payments {
        self.chain = Some(check);
        self
    }

    /// Whether tickets must carry a co-signature.
    pub fn on_chain(&self) -> bool {
        self.chain.is_some()
    }

    /// The parameters in force.
    pub fn params(&self) -> &PaymentsParams {
        &self.params
    }

    /// What to do with a packet that carries no acceptable ticket.
    pub fn unpaid_policy(&self) -> UnpaidPolicy {
        self.params.unpaid
    }

    /// Decides whether `ticket` pays for a packet that arrived under Sphinx key `key_epoch`.
    /// Checks, cheapest first: recipient, expiry, issue time, expected value, face value;
    /// the key epoch is held and the ticket names its commitment, and expires late enough to
    /// be redeemed after the key retires; the nonce is fresh; the pot can pay after what it
    /// already owes this relay (a pot not yet known is looked up in the background, and up
    /// to `unverified_tickets_per_pot` of its tickets are accepted meanwhile); and last the
    /// signature. Then the win test: a winner is queued for the next [`Payments::flush`].
    /// Every outcome is counted.
    pub fn accept(
        &self,
        ticket: &Ticket,
        key_epoch: Epoch,
        now_unix: UnixTime,
    ) -> std::result::Result<Accepted, PaymentRefusal> {
        self.accept_signed(ticket, TicketSignatures::Ed25519, key_epoch, now_unix)
    }

    /// [`Payments::accept`] for a ticket that came with `signatures`. A relay that redeems
    /// on a chain refuses one without a co-signature (`cosignature_missing`) or whose
    /// co-signature is not the pot owner's (`cosignature_not_owner`), and checks the Ed25519
    /// signature where there is one; a relay that redeems at the ledger needs the Ed25519
    /// signature and ignores a co-signature.
    pub fn accept_signed(
        &self,
        ticket: &Ticket,
        signatures: TicketSignatures,
        key_epoch: Epoch,
        now_unix: UnixTime,
    ) -> std::result::Result<Accepted, PaymentRefusal> {
        let result = self.decide(ticket, signatures, key_epoch, now_unix);
        match &result {
            Ok(a) => {
                metrics::counter!(m::TICKETS_ACCEPTED).increment(1);
                metrics::counter!(m::TICKET_VALUE_EARNED).increment(a.expected_value);
                if a.winner {
                    metrics::counter!(m::TICKETS_WON).increment(1);
                }
            }
            Err(r) => metrics::counter!(m::TICKETS_REFUSED, "reason" => r.label()).increment(1),
        }
        result
    }

    fn decide(
        &self,
        t: &Ticket,
        signatures: TicketSignatures,
        key_epoch: Epoch,
        now: UnixTime,
    ) -> std::result::Result<Accepted, PaymentRefusal> {
        let p = &self.params;
        t.check_terms_for_recipient(&p.me, now, p.min_expected_value)
            .map_err(PaymentRefusal::from_ticket_error)?;
        if t.face_value > p.max_face_value {
            return Err(PaymentRefusal::FaceValueTooLarge {
                face_value: t.face_value,
                max: p.max_face_value,
            });
        }
        let key = self
            .keys
            .get(key_epoch)
            .ok_or(PaymentRefusal::UnknownEpoch(key_epoch))?;
        if t.commitment != key.payment_commitment() {
            return Err(PaymentRefusal::WrongCommitment(key_epoch));
        }
        let redeemable_from = p.retires_at(key_epoch);
        if t.expiry < redeemable_from.saturating_add(p.min_redeem_window_s) {
            return Err(PaymentRefusal::ExpiresTooSoon {
                expiry: t.expiry,
                redeemable_from,
            });
        }
        // Cheap refusals before the signature; `record` decides again under the locks.
        self.check_nonce(t, key_epoch)?;
        self.check_pot(t)?;
        let cosignature = self.check_signatures(t, signatures)?;

        // The ticket is genuine: record it.
        let winner = t.is_winner(key.payment_reveal());
        let verified = self.record(t, key_epoch, winner)?;
        if winner {
            let w = Winner {
                ticket: *t,
                reveal: key.payment_reveal().clone(),
                epoch: key_epoch,
                cosignature,
            };
            if let Ok(mut q) = self.queued.lock() {
                q.push(w);
            }
            metrics::gauge!(m::WINNERS_PENDING).set(self.pending.load(Ordering::Relaxed) as f64);
        }
        Ok(Accepted {
            expected_value: t.expected_value(),
            winner,
            pot_verified: verified,
        })
    }

    /// The signatures this relay needs (see [`Payments::accept_signed`]); the co-signature
    /// to keep with a winner, on a chain.
    fn check_signatures(
        &self,
        t: &Ticket,
        signatures: TicketSignatures,
    ) -> std::result::Result<Option<CoSignature>, PaymentRefusal> {
        if !matches!(signatures, TicketSignatures::CoSignatureOnly(_)) {
            t.verify_signature()
                .map_err(PaymentRefusal::from_ticket_error)?;
        }
        let Some(chain) = &self.chain else {
            // The ledger pays on the Ed25519 signature, which a co-signed slot does not hold.
            return match signatures {
                TicketSignatures::CoSignatureOnly(_) => Err(PaymentRefusal::Forged),
                _ => Ok(None),
            };
        };
        let cosignature = signatures
            .cosignature()
            .ok_or(PaymentRefusal::CoSignatureMissing)?;
        match chain.check(t, &cosignature) {
            CoSigned::ByOwner | CoSigned::OwnerUnknown => Ok(Some(cosignature)),
            CoSigned::NotByOwner => Err(PaymentRefusal::CoSignatureNotOwner),
        }
    }

    /// Hands a winner's co-signature to the chain before its redemption (after a restart
    /// the chain's settlement holds none). `false` if the chain can keep no more now.
    fn keep_cosignature(&self, w: &Winner) -> bool {
        match (&self.chain, w.cosignature) {
            (Some(chain), Some(c)) => chain.keep(&w.ticket, c),
            _ => true,
        }
    }

    fn check_nonce(&self, t: &Ticket, epoch: Epoch) -> std::result::Result<(), PaymentRefusal> {
        let seen = self.seen.lock().map_err(|_| PaymentRefusal::NonceReused)?;
        let Some(s) = seen.get(&epoch) else {
            return Ok(());
        };
        if s.contains(&t.pot, &t.nonce) {
            return Err(PaymentRefusal::NonceReused);
        }
        if s.len >= self.params.max_tickets_per_epoch {
            return Err(PaymentRefusal::TooManyTickets(epoch));
        }
        if s.of_pot(&t.pot) >= self.params.max_tickets_per_pot_per_epoch {
            return Err(PaymentRefusal::PotTicketsFull);
        }
        Ok(())
    }

    /// Refuses a ticket its pot is known not to cover, or one more from a pot being looked up
    /// that used its allowance.
    fn check_pot(&self, t: &Ticket) -> std::result::Result<(), PaymentRefusal> {
        let cache = self.pots.lock().map_err(|_| PaymentRefusal::PotCacheFull)?;
        match cache.entries.get(&t.pot) {
            None => Ok(()),
            Some(e) => self.pot_admits(e, t).map(drop),
        }
    }

    /// Whether `entry` admits `t`: `Ok(true)` vouched for by the ledger, `Ok(false)` within
    /// the allowance of a pot being looked up.
    fn pot_admits(
        &self,
        entry: &PotEntry,
        t: &Ticket,
    ) -> std::result::Result<bool, PaymentRefusal> {
        match entry.state {
            PotState::Known(_) => entry.covers(t.face_value).map(|()| true),
            PotState::Unknown => Err(PaymentRefusal::PotUnknown(t.pot)),
            PotState::LookingUp => {
                if entry.unverified_accepted >= self.params.unverified_tickets_per_pot {
                    Err(PaymentRefusal::PotNotYetKnown)
                } else {
                    Ok(false)
                }
            }
        }
    }

    /// Records a genuine ticket under the locks: the pot's entry (a new pot is added and
    /// looked up), its standing checked again, a winner's slots reserved (in the pot, in all,
    /// and in the unverified pool for a pot being looked up), its nonce inserted. Nothing
    /// changes if it is refused. Whether the ledger vouched for the pot.
    fn record(
        &self,
        t: &Ticket,
        epoch: Epoch,
        winner: bool,
    ) -> std::result::Result<bool, PaymentRefusal> {
        let p = &self.params;
        let mut cache = self.pots.lock().map_err(|_| PaymentRefusal::PotCacheFull)?;
        let new_pot = !cache.entries.contains_key(&t.pot);
        if new_pot {
            self.make_room(&mut cache)?;
        }
        let verified = match cache.entries.get(&t.pot) {
            Some(e) => self.pot_admits(e, t)?,
            None => false,
        };
        if winner {
            let (pot_winners, pool) = (
                cache.entries.get(&t.pot).map_or(0, |e| e.pending_winners),
                cache.unverified_winners,
            );
            if pot_winners >= p.max_pending_winners_per_pot {
                return Err(PaymentRefusal::PotWinnersFull);
            }
            if !verified && pool >= p.max_unverified_winners {
                return Err(PaymentRefusal::UnverifiedWinnersFull);
            }
            if !self.reserve_winner_slot() {
                return Err(PaymentRefusal::WinnersFull);
            }
        }
        let inserted = self.insert_nonce(t, epoch, verified);
        if let Err(r) = inserted {
            if winner {
                self.pending.fetch_sub(1, Ordering::Relaxed);
            }
            return Err(r);
        }
        if new_pot {
            cache.entries.insert(t.pot, PotEntry::looking_up());
            cache.looking_up += 1;
            self.lookups_wanted.notify_one();
        }
        let mut pool = cache.unverified_winners;
        if let Some(e) = cache.entries.get_mut(&t.pot) {
            e.used = true;
            if !verified {
                e.unverified_accepted = e.unverified_accepted.saturating_add(1);
            }
            if winner {
                e.pending_winners += 1;
                e.pending_face = e.pending_face.saturating_add(t.face_value);
                if !verified {
                    e.unverified_winners += 1;
                    pool += 1;
                }
            }
        }
        cache.unverified_winners = pool;
        Ok(verified)
    }

    /// Room for one more pot: the cache and the lookups have their bounds. Pots the ledger
    /// does not know are dropped first (unless winners of theirs are pending), so junk from
    /// fresh keys cannot fill the cache for good.
    fn make_room(&self, cache: &mut PotCache) -> std::result::Result<(), PaymentRefusal> {
        if cache.entries.len() >= self.params.max_pots {
            cache
                .entries
                .retain(|_, e| !matches!(e.state, PotState::Unknown) || e.pending_winners > 0);
        }
        if cache.entries.len() >= self.params.max_pots {
            return Err(PaymentRefusal::PotCacheFull);
        }
        if cache.looking_up >= self.params.max_pot_lookups {
            return Err(PaymentRefusal::PotLookupsFull);
        }
        Ok(())
    }

    /// Inserts the nonce if it is still fresh and there is room (another worker may have
    /// accepted the same ticket since [`Payments::check_nonce`]).
    fn insert_nonce(
        &self,
        t: &Ticket,
        epoch: Epoch,
        verified: bool,
    ) -> std::result::Result<(), PaymentRefusal> {
        let p = &self.params;
        let mut seen = self.seen.lock().map_err(|_| PaymentRefusal::NonceReused)?;
        let set = seen.entry(epoch).or_default();
        if set.contains(&t.pot, &t.nonce) {
            return Err(PaymentRefusal::NonceReused);
        }
        if set.len >= p.max_tickets_per_epoch {
            return Err(PaymentRefusal::TooManyTickets(epoch));
        }
        if set.of_pot(&t.pot) >= p.max_tickets_per_pot_per_epoch {
            return Err(PaymentRefusal::PotTicketsFull);
        }
        if !verified && set.unverified >= p.max_unverified_tickets_per_epoch {
            return Err(PaymentRefusal::UnverifiedTicketsFull);
        }
        set.insert(t.pot, t.nonce, !verified);
        Ok(())
    }

    /// Whether `pot`, as this relay knows it now, pays a ticket of `face_value` on top of
    /// the winners it already owes this relay (a gateway's test before it credits a ticket
    /// it accepted from a pot still being looked up).
    pub fn pot_standing(&self, pot: &IdentityKey, face_value: u64) -> PotStanding {
        let Ok(cache) = self.pots.lock() else {
            return PotStanding::Pending;
        };
        match cache.entries.get(pot) {
            None => PotStanding::Pending,
            Some(e) => match e.state {
                PotState::LookingUp => PotStanding::Pending,
                PotState::Unknown => PotStanding::Refused,
                // Conservative for a winner, whose face value is among the pending already.
                PotState::Known(p) => {
                    if p.usable_after(e.pending_face) >= face_value {
                        PotStanding::Covers
                    } else {
                        PotStanding::Refused
                    }
                }
            },
        }
    }

    fn reserve_winner_slot(&self) -> bool {
        let max = self.params.max_pending_winners;
        self.pending
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// A winner of `pot` worth `face_value` left the pending set: the pot owes this relay
    /// that much less.
    fn release_winner(&self, pot: &IdentityKey, face_value: u64) {
        let Ok(mut cache) = self.pots.lock() else {
            return;
        };
        let mut freed_unverified = false;
        if let Some(e) = cache.entries.get_mut(pot) {
            e.pending_winners = e.pending_winners.saturating_sub(1);
            e.pending_face = e.pending_face.saturating_sub(face_value);
            if e.unverified_winners > 0 {
                e.unverified_winners -= 1;
                freed_unverified = true;
            }
        }
        if freed_unverified {
            cache.unverified_winners = cache.unverified_winners.saturating_sub(1);
        }
    }

    /// Makes every winner accepted since the last call durable, in one transaction. Call it
    /// before releasing the packets whose tickets were accepted since the last call. On error
    /// the winners stay queued for the next call.
    pub fn flush(&self) -> Result<usize> {
        let batch = match self.queued.lock() {
            Ok(mut q) => std::mem::take(&mut *q),
            Err(_) => return Ok(0),
        };
        if batch.is_empty() {
            return Ok(0);
        }
        match self.store.put_pending(&batch) {
            Ok(new) => {
                // A ticket stored (or settled) before and accepted again after a restart
                // holds one slot, not two.
                for (w, _) in batch.iter().zip(new).filter(|(_, new)| !new) {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    self.release_winner(&w.ticket.pot, w.ticket.face_value);
                }
                metrics::gauge!(m::WINNERS_PENDING)
                    .set(self.pending.load(Ordering::Relaxed) as f64);
                Ok(batch.len())
            }
            Err(e) => {
                if let Ok(mut q) = self.queued.lock() {
                    q.splice(0..0, batch);
                }
                Err(e)
            }
        }
    }

    /// Winners stored and not yet settled.
    pub fn pending_winners(&self) -> Result<Vec<Winner>> {
        Ok(self.store.pending()?.winners)
    }

    /// Winners settled (paid or refused for good), kept for 30 days.
    pub fn settled(&self) -> Result<Vec<Settled>> {
        self.store.settled()
    }

    /// Forgets the nonces of key epochs no longer held (their tickets are refused anyway).
    pub fn forget_retired_epochs(&self) {
        let held = self.keys.epochs();
        if let Ok(mut seen) = self.seen.lock() {
            seen.retain(|e, _| held.contains(e));
        }
    }
}
