//! Talking to the ledger: redeeming winners whose key epoch has retired, and keeping the pot
//! cache fresh. Both work against any [`Settlement`]: the HTTP `LedgerClient` in production,
//! the embedded `Ledger` in tests.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use futures_util::future::join_all;
use murmur_ledger::request::{Redeem, Signed};
use murmur_ledger::{Refusal, Settlement};
use murmur_protocol::directory::{IdentityKey, UnixTime};
use tokio_util::sync::CancellationToken;

use super::store::{PendingRows, TicketId, Winner};
use super::{Payments, PotState};
use crate::error::{Error, Result};
use crate::metrics as m;

/// Winners handed to the settlement at once ([`Settlement::redeem_all`]: a chain pays them in
/// one transaction, a ledger takes them a few at a time).
const REDEEM_BATCH: usize = 50;
/// Pot lookups sent to the ledger at once.
const LOOKUP_CONCURRENCY: usize = 16;
/// A winner the ledger could not be asked about is given up this long after its expiry.
const GIVE_UP_AFTER_EXPIRY_S: u64 = 3600;
/// Settled records are kept this long, then pruned (at most once an hour).
const SETTLED_KEEP_S: u64 = 30 * 24 * 3600;
const PRUNE_EVERY_S: u64 = 3600;

/// What one pass of [`Payments::redeem_due`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedeemRound {
    /// Paid by the ledger now.
    pub paid: usize,
    /// The sum paid.
    pub paid_value: u64,
    /// Refused for good by the ledger (already redeemed, expired, ...) or given up.
    pub settled_unpaid: usize,
    /// The ledger could not be asked (or answered with a passing failure): kept for a retry.
    pub retrying: usize,
    /// Their key epoch is still held: not redeemable yet.
    pub waiting: usize,
    /// Being redeemed by another pass, or waiting for their retry time.
    pub deferred: usize,
}

/// Refusals that will not change on a retry: the winner is settled with the refusal's label.
/// Anything else (transport errors, an answer not signed by the ledger's key, a stale or
/// replayed request, the ledger's storage, a refusal this build does not know) is retried:
/// only the ledger itself can settle a winner unpaid.
fn definitive(r: Refusal) -> bool {
    matches!(
        r,
        Refusal::AlreadyRedeemed
            | Refusal::TicketExpired
            | Refusal::ForgedTicket
            | Refusal::WrongRecipient
            | Refusal::UnknownPot
            | Refusal::RevealMismatch
            | Refusal::NotAWinner
    )
}

/// A winner this pass is redeeming; dropping it (also when the pass is cancelled) lets
/// another pass claim it.
struct Claim<'a> {
    payments: &'a Payments,
    winner: Winner,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Ok(mut attempts) = self.payments.attempts.lock()
            && let Some(a) = attempts.get_mut(&self.winner.id())
        {
            a.in_flight = false;
        }
    }
}

impl Payments {
    async fn blocking<R: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Payments) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(&this))
            .await
            .map_err(|e| Error::PaymentStore {
                path: self.store.path().to_path_buf(),
                reason: format!("store task failed: {e}"),
            })?
    }

    /// One redemption pass at `now`: every stored winner whose key epoch has left the
    /// [`KeyRing`](crate::keys::KeyRing) (so its reveal can no longer be used against this
    /// relay) and whose retry time has come is redeemed, signed by `identity`; a paid or
    /// definitively refused winner is moved to `settled`, one the ledger could not decide is
    /// retried later with exponential backoff (1 s, doubling, up to `redeem_backoff_max`).
    /// Concurrent passes never redeem one winner at the same time. `Err` only if the store
    /// cannot be read.
    pub async fn redeem_due<S: Settlement>(
        self: &Arc<Self>,
        ledger: &S,
        identity: &SigningKey,
        now: UnixTime,
    ) -> Result<RedeemRound> {
        let PendingRows { winners, corrupt } = self.blocking(|p| p.store.pending()).await?;
        let mut round = RedeemRound::default();
        for id in corrupt {
            tracing::error!("a stored winning ticket does not decode; giving it up");
            self.settle(id, None, 0, "corrupt_record", now).await;
            round.settled_unpaid += 1;
        }
        let held = self.keys.epochs();
        let mut claims = Vec::new();
        if let Ok(mut attempts) = self.attempts.lock() {
            for winner in winners {
                if held.contains(&winner.epoch) {
                    round.waiting += 1;
                    continue;
                }
                let a = attempts.entry(winner.id()).or_default();
                if a.in_flight || a.next_at > now {
                    round.deferred += 1;
                    continue;
                }
                a.in_flight = true;
                claims.push(Claim {
                    payments: self,
                    winner,
                });
            }
        }
        // Another pass may have settled some between our read and our claims.
        let ids: Vec<TicketId> = claims.iter().map(|c| c.winner.id()).collect();
        let still = self.blocking(move |p| p.store.still_pending(&ids)).await?;
        let claims: Vec<Claim<'_>> = claims
            .into_iter()
            .zip(still)
            .filter_map(|(c, pending)| pending.then_some(c))
            .collect();
        // On a chain, each winner's co-signature goes to the settlement first; one it cannot
        // keep now waits for a later pass rather than being refused for the want of it.
        let (claims, full): (Vec<Claim<'_>>, Vec<Claim<'_>>) = claims
            .into_iter()
            .partition(|c| self.keep_cosignature(&c.winner));
        round.deferred += full.len();
        drop(full);
        for chunk in claims.chunks(REDEEM_BATCH) {
            let reqs = chunk
                .iter()
                .map(|c| {
                    // The reveal leaves the relay here: the epoch has retired.
                    let op = Redeem {
                        ticket: c.winner.ticket,
                        reveal: *c.winner.reveal,
                    };
                    Signed::new(op, identity, now)
                })
                .collect();
            let results = ledger.redeem_all(reqs).await;
            for (claim, result) in chunk.iter().zip(results) {
                self.conclude(&claim.winner, result, now, &mut round).await;
            }
        }
        drop(claims);
        self.prune_settled(now).await;
        Ok(round)
    }

    async fn conclude(
        self: &Arc<Self>,
        w: &Winner,
        result: murmur_ledger::Result<murmur_ledger::Redemption>,
        now: UnixTime,
        round: &mut RedeemRound,
    ) {
        let id = w.id();
        let of = Some((w.ticket.pot, w.ticket.face_value));
        let e = match result {
            Ok(r) => {
                metrics::counter!(m::TICKETS_REDEEMED).increment(1);
                metrics::counter!(m::REDEEMED_VALUE).increment(r.paid);
                metrics::gauge!(m::LEDGER_BALANCE).set(r.account.balance as f64);
                tracing::info!(
                    paid = r.paid,
                    face_value = w.ticket.face_value,
                    balance = r.account.balance,
                    "winning ticket redeemed"
                );
                round.paid += 1;
                round.paid_value = round.paid_value.saturating_add(r.paid);
                self.settle(id, of, r.paid, "paid", now).await;
                return;
            }
            Err(e) => e,
        };
        metrics::counter!(m::REDEMPTION_FAILURES, "reason" => e.label()).increment(1);
        match e.refusal() {
            Some(r) if definitive(r) => {
                // The ledger keys redemptions by the whole ticket (recipient included), so
                // `already_redeemed` means this relay's own earlier redemption (a crash
                // between the ledger's payment and our record), never another relay's.
                tracing::warn!(
                    pot = %w.ticket.pot,
                    face_value = w.ticket.face_value,
                    reason = r.label(),
                    error = %e,
                    "ledger refused a winning ticket; settled unpaid"
                );
                round.settled_unpaid += 1;
                self.settle(id, of, 0, r.label(), now).await;
            }
            _ if now > w.ticket.expiry.saturating_add(GIVE_UP_AFTER_EXPIRY_S) => {
                tracing::warn!(
                    pot = %w.ticket.pot,
                    error = %e,
                    "winning ticket expired before the ledger could redeem it; giving up"
                );
                round.settled_unpaid += 1;
                self.settle(id, of, 0, "expired_unredeemed", now).await;
            }
            _ => {
                round.retrying += 1;
                let wait = self.back_off(&id, now);
                tracing::warn!(error = %e, retry_in_s = wait, "cannot redeem a winning ticket yet");
            }
        }
    }

    /// Schedules the next attempt: 1 s after the first failure, doubling, capped.
    fn back_off(&self, id: &TicketId, now: UnixTime) -> u64 {
        let Ok(mut attempts) = self.attempts.lock() else {
            return 0;
        };
        let a = attempts.entry(*id).or_default();
        let wait = 1u64
            .checked_shl(a.failures)
            .unwrap_or(u64::MAX)
            .min(self.params.redeem_backoff_max_s);
        a.failures = a.failures.saturating_add(1);
        a.next_at = now.saturating_add(wait);
        wait
    }

    /// Moves a winner (of pot `of.0`, face value `of.1`, if it decoded) to `settled`,
    /// counted by outcome; if the store fails, the winner stays pending and is retried (the
    /// ledger then answers `already_redeemed` if it had paid).
    async fn settle(
        self: &Arc<Self>,
        id: TicketId,
        of: Option<(IdentityKey, u64)>,
        paid: u64,
        outcome: &'static str,
        now: u64,
    ) {
        match self
            .blocking(move |p| p.store.settle(&id, paid, outcome, now))
            .await
        {
            Ok(was_pending) => {
                if was_pending {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    metrics::counter!(m::WINNERS_SETTLED, "outcome" => outcome).increment(1);
                    if let Some((pot, face_value)) = of {
                        self.release_winner(&pot, face_value);
                    }
                }
                if let Ok(mut attempts) = self.attempts.lock() {
                    attempts.remove(&id);
                }
                metrics::gauge!(m::WINNERS_PENDING)
                    .set(self.pending.load(Ordering::Relaxed) as f64);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record a settled winning ticket");
                self.back_off(&id, now);
            }
        }
    }

    async fn prune_settled(self: &Arc<Self>, now: UnixTime) {
        let due = match self.last_prune.lock() {
            Ok(mut last) if now >= last.saturating_add(PRUNE_EVERY_S) => {
                *last = now;
                true
            }
            _ => false,
        };
        if due {
            let before = now.saturating_sub(SETTLED_KEEP_S);
            if let Err(e) = self.blocking(move |p| p.store.prune_settled(before)).await {
                tracing::error!(error = %e, "cannot prune settled winning tickets");
            }
        }
    }

    /// Seconds until the earliest scheduled retry, if any.
    fn next_retry_in(&self, now: UnixTime) -> Option<u64> {
        let attempts = self.attempts.lock().ok()?;
        attempts
            .values()
            .filter(|a| !a.in_flight && a.failures > 0)
            .map(|a| a.next_at.saturating_sub(now))
            .min()
    }

    /// One refresh of the pot cache at `now`: pots being looked up first, then pots whose
    /// state is older than `pot_refresh` and that a ticket named since (unused ones are
    /// dropped, unless winners of theirs are pending); at most `max_pot_lookups` lookups.
    /// Then the pending winners of pots the ledger does not know are settled unpaid
    /// ([`Payments::settle_unknown_pots`]). Returns how many lookups were made.
    pub async fn refresh_pots<S: Settlement>(self: &Arc<Self>, ledger: &S, now: UnixTime) -> usize {
        let budget = self.params.max_pot_lookups;
        let ttl = self.params.pot_refresh_s;
        let wanted: Vec<IdentityKey> = {
            let Ok(mut cache) = self.pots.lock() else {
                return 0;
            };
            let mut wanted: Vec<IdentityKey> = cache
                .entries
                .iter()
                .filter(|(_, e)| matches!(e.state, PotState::LookingUp))
                .map(|(k, _)| *k)
                .take(budget)
                .collect();
            let mut unused = Vec::new();
            for (k, e) in &cache.entries {
                if matches!(e.state, PotState::LookingUp) || e.fetched_at.saturating_add(ttl) > now
                {
                    continue;
                }
                if !e.used {
                    if e.pending_winners == 0 {
                        unused.push(*k);
                    }
                } else if wanted.len() < budget {
                    wanted.push(*k);
                }
            }
            for k in unused {
                cache.entries.remove(&k);
            }
            wanted
        };
        for chunk in wanted.chunks(LOOKUP_CONCURRENCY) {
            let results = join_all(chunk.iter().map(|k| ledger.pot(*k))).await;
            let Ok(mut cache) = self.pots.lock() else {
                return 0;
            };
            for (key, result) in chunk.iter().zip(results) {
                let state = match result {
                    Ok(pot) => PotState::Known(pot),
                    // Only the ledger's signed refusal makes a pot unknown; an answer not
                    // signed by it is a failed lookup (`Error::Unauthenticated`, below).
                    Err(e) if e.refusal() == Some(Refusal::UnknownPot) => PotState::Unknown,
                    Err(e) => {
                        let label = match e {
                            murmur_ledger::Error::Unauthenticated { .. } => {
                                tracing::warn!(error = %e, "pot lookup answered without the ledger's signature");
                                "unauthenticated"
                            }
                            _ => {
                                tracing::debug!(error = %e, "pot lookup failed");
                                "failed"
                            }
                        };
                        metrics::counter!(m::POT_LOOKUPS, "result" => label).increment(1);
                        continue;
                    }
                };
                let label = match state {
                    PotState::Known(_) => "known",
                    _ => "unknown",
                };
                metrics::counter!(m::POT_LOOKUPS, "result" => label).increment(1);
                let (was_looking_up, freed) = match cache.entries.get_mut(key) {
                    Some(entry) => {
                        let was = matches!(entry.state, PotState::LookingUp);
                        entry.state = state;
                        entry.fetched_at = now;
                        entry.used = false;
                        // The ledger answered: the pot's winners leave the unverified pool
                        // (a known pot's count as vouched for; an unknown pot's are settled).
                        let freed = std::mem::take(&mut entry.unverified_winners);
                        entry.unverified_accepted = 0;
                        (was, freed)
                    }
                    None => (false, 0),
                };
                if was_looking_up {
                    cache.looking_up = cache.looking_up.saturating_sub(1);
                }
                cache.unverified_winners = cache.unverified_winners.saturating_sub(freed);
            }
        }
        self.settle_unknown_pots(now).await;
        wanted.len()
    }

    /// Settles unpaid, as `pot_unknown`, the stored winners of pots the ledger says do not
    /// exist: they cannot be paid, and they would otherwise hold pending slots until their
    /// epoch retires (junk from fresh keys could fill them). Each is logged and counted.
    pub(crate) async fn settle_unknown_pots(self: &Arc<Self>, now: UnixTime) {
        let gone: Vec<IdentityKey> = match self.pots.lock() {
            Ok(cache) => cache
                .entries
                .iter()
                .filter(|(_, e)| matches!(e.state, PotState::Unknown) && e.pending_winners > 0)
                .map(|(k, _)| *k)
                .collect(),
            Err(_) => return,
        };
        if gone.is_empty() {
            return;
        }
        // One transaction for them all: a flood of junk pots costs one fsync per refresh.
        let settled = self
            .blocking(move |p| {
                let mut winners = Vec::new();
                for pot in &gone {
                    winners.extend(p.store.pending_of(pot)?);
                }
                let ids: Vec<TicketId> = winners.iter().map(Winner::id).collect();
                let was = p.store.settle_many(&ids, 0, "pot_unknown", now)?;
                Ok(winners
                    .into_iter()
                    .zip(was)
                    .filter_map(|(w, was)| was.then_some(w))
                    .collect::<Vec<_>>())
            })
            .await;
        match settled {
            Ok(winners) => {
                let mut by_pot: HashMap<IdentityKey, usize> = HashMap::new();
                for w in &winners {
                    self.pending.fetch_sub(1, Ordering::Relaxed);
                    self.release_winner(&w.ticket.pot, w.ticket.face_value);
                    *by_pot.entry(w.ticket.pot).or_default() += 1;
                }
                if let Ok(mut attempts) = self.attempts.lock() {
                    for w in &winners {
                        attempts.remove(&w.id());
                    }
                }
                if !winners.is_empty() {
                    metrics::counter!(m::WINNERS_SETTLED, "outcome" => "pot_unknown")
                        .increment(winners.len() as u64);
                    tracing::warn!(
                        pots = by_pot.len(),
                        winners = winners.len(),
                        "the ledger knows no such pots: their winning tickets are settled unpaid"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot settle the winners of unknown pots"),
        }
        metrics::gauge!(m::WINNERS_PENDING).set(self.pending.load(Ordering::Relaxed) as f64);
    }
}

/// Redeems due winners right away and then every `interval` (sooner when a retry is due)
/// until `shutdown`. A redemption cut short by shutdown is redone after a restart (the ledger
/// answers `already_redeemed` if it had paid).
pub async fn run_redeemer<S: Settlement + 'static>(
    payments: Arc<Payments>,
    ledger: S,
    identity: SigningKey,
    interval: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let now = murmur_ledger::unix_now();
        let pass = payments.redeem_due(&ledger, &identity, now);
        let round = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = pass => r,
        };
        match round {
            Ok(r) if r.paid + r.settled_unpaid + r.retrying > 0 => {
                tracing::debug!(?r, "redemption pass")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the winning tickets' store"),
        }
        let wait = payments
            .next_retry_in(now)
            .map_or(interval, |s| interval.min(Duration::from_secs(s)))
            .max(Duration::from_millis(500));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Looks up new pots as tickets name them, refreshes known ones every half `pot_refresh`,
/// and forgets the nonces of retired key epochs, until `shutdown`.
pub async fn run_pot_refresher<S: Settlement + 'static>(
    payments: Arc<Payments>,
    ledger: S,
    shutdown: CancellationToken,
) {
    let tick = Duration::from_secs((payments.params.pot_refresh_s / 2).max(1));
    loop {
        let round = payments.refresh_pots(&ledger, murmur_ledger::unix_now());
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = round => {}
        }
        payments.forget_retired_epochs();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = payments.lookups_wanted.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
    }
}
