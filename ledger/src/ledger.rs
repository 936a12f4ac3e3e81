//! The ledger over redb: accounts, pots, the redeemed-ticket set, and one ACID write
//! transaction per operation.
//!
//! Before any write transaction a request passes the cheap checks: its timestamp, its
//! signature, its signer's rate limit ([`crate::guard`]), checks that need no state, and
//! checks on a read snapshot ([`early`]); most refusals end there and write nothing. Then
//! every operation is decided in two steps inside one write transaction (if the total write
//! rate allows one): a *plan* that only reads (and so cannot leave money half-moved when it
//! refuses; a refusal aborts the transaction, so a refused request writes nothing), then the
//! plan's effects and the request's `(signer, nonce)` are written and committed together.
//! A refused request leaves no trace, so the same signed request may be tried again within
//! its window: it then succeeds only where it would as a fresh one (its signer asked for it).
//! The money totals `/metrics` shows are kept in memory ([`totals`]). redb admits one writer
//! at a time, so the check "this ticket was not redeemed" and the insertion of its record
//! cannot interleave with another redemption of the same ticket. Commits are durable (fsync)
//! when they return.
//!
//! The methods here block on disk: from async code use the [`Settlement`](crate::Settlement)
//! implementation, which runs them on tokio's blocking pool.

mod early;
mod totals;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use murmur_protocol::directory::{IdentityKey, UnixTime};
use redb::{
    Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table, TableDefinition,
    WriteTransaction,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::guard::{Guard, RateLimits};
use crate::records::{Account, Pot, Redemption, Transfer};
use crate::request::{Fund, Operation, Redeem, Signed, Warn, Withdraw, hex};
use crate::{Error, Refusal, Result};
pub(crate) use early::Snapshot;
use totals::TotalsDelta;

/// Account key → balance.
const ACCOUNTS: TableDefinition<&[u8; 32], u64> = TableDefinition::new("accounts");
/// Pot key → (balance, escrow, warned, unlock_at).
const POTS: TableDefinition<&[u8; 32], (u64, u64, u64, u64)> = TableDefinition::new("pots");
/// Pot key ‖ ticket digest ([`Ticket::digest`]: every signed field, the recipient included)
/// → ticket expiry. Keyed by the whole ticket, not `(pot, nonce)`: a payer who gives one nonce
/// to several relays has signed several tickets, and each recipient is paid (or the escrow
/// burns), instead of the first redeemer taking it and the others getting nothing.
///
/// [`Ticket::digest`]: murmur_protocol::ticket::Ticket::digest
const REDEEMED: TableDefinition<&[u8; 64], u64> = TableDefinition::new("redeemed_tickets");
/// Signer ‖ request nonce → request timestamp.
const REQUESTS: TableDefinition<&[u8; 48], u64> = TableDefinition::new("requests");
/// Schema version, genesis digest and total, burned total.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The database layout this build reads and writes. Schema 2 keys redeemed tickets by their
/// digest (schema 1 by `(pot, nonce)`); a schema-1 database is refused, not converted: its
/// records cannot be turned into digests.
pub const SCHEMA: u64 = 2;

/// The rules a ledger applies (from the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Seconds between a warning and the withdrawal it allows.
    pub notice_period_s: u64,
    /// A request's timestamp may differ from the ledger's clock by this many seconds; its
    /// nonce is remembered this long after its timestamp.
    pub request_window_s: u64,
}

/// How the store holds a pot.
impl Pot {
    fn state(&self) -> PotState {
        (
            self.balance,
            self.escrow,
            self.warned,
            self.unlock_at.unwrap_or(0),
        )
    }

    fn from_state(key: IdentityKey, (balance, escrow, warned, unlock_at): PotState) -> Pot {
        Pot {
            key,
            balance,
            escrow,
            warned,
            unlock_at: (warned > 0).then_some(unlock_at),
        }
    }

    fn total(&self) -> u64 {
        self.balance.saturating_add(self.escrow)
    }
}

type PotState = (u64, u64, u64, u64);

/// Totals over the whole ledger, read in one snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// Money created by the genesis entries; nothing else creates money.
    pub genesis: u64,
    pub accounts: u128,
    pub pot_balances: u128,
    pub pot_escrows: u128,
    pub burned: u64,
    pub pots: u64,
    pub redeemed_tickets: u64,
    pub remembered_requests: u64,
}

impl Audit {
    /// The invariant: `accounts + pot balances + pot escrows + burned == genesis`.
    pub fn conserved(&self) -> bool {
        self.accounts + self.pot_balances + self.pot_escrows + u128::from(self.burned)
            == u128::from(self.genesis)
    }
}

/// What [`Ledger::prune`] removed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub redeemed_tickets: u64,
    pub requests: u64,
}

/// The ledger: cheap to clone (the database is shared).
#[derive(Clone)]
pub struct Ledger {
    db: Arc<Database>,
    params: Params,
    guard: Arc<Guard>,
    /// The money totals, kept as operations commit.
    totals: Arc<Mutex<Audit>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// redb's errors as [`Error::Storage`].
trait Db<T> {
    fn db(self) -> Result<T>;
}

impl<T, E: Into<redb::Error>> Db<T> for std::result::Result<T, E> {
    fn db(self) -> Result<T> {
        self.map_err(|e| Error::Storage(e.into().to_string()))
    }
}

fn overflow() -> Error {
    Error::Storage("an amount overflowed (the ledger's totals are inconsistent)".into())
}

fn genesis_digest(genesis: &[(IdentityKey, u64)]) -> [u8; 32] {
    let mut entries = genesis.to_vec();
    entries.sort();
    let mut h = Sha256::new();
    h.update(b"murmur/ledger-genesis/v1\0");
    for (key, amount) in entries {
        h.update(key.0);
        h.update(amount.to_be_bytes());
    }
    h.finalize().into()
}

/// A redeemed ticket's key: pot ‖ [`Ticket::digest`](murmur_protocol::ticket::Ticket::digest).
fn redemption_id(t: &murmur_protocol::ticket::Ticket) -> [u8; 64] {
    let mut out = [0u8; 64];
    out[..32].copy_from_slice(&t.pot.0);
    out[32..].copy_from_slice(&t.digest());
    out
}

fn concat(a: &[u8; 32], b: &[u8; 16]) -> [u8; 48] {
    let mut out = [0u8; 48];
    out[..32].copy_from_slice(a);
    out[32..].copy_from_slice(b);
    out
}

fn get_u64(meta: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<u64> {
    let value = meta.get(name).db()?;
    let bytes: [u8; 8] = value
        .and_then(|v| v.value().try_into().ok())
        .ok_or_else(|| Error::Storage(format!("the database has no valid {name:?} entry")))?;
    Ok(u64::from_be_bytes(bytes))
}

/// The tables of one write transaction.
pub(crate) struct Tables<'t> {
    accounts: Table<'t, &'static [u8; 32], u64>,
    pots: Table<'t, &'static [u8; 32], PotState>,
    redeemed: Table<'t, &'static [u8; 64], u64>,
    requests: Table<'t, &'static [u8; 48], u64>,
    meta: Table<'t, &'static str, &'static [u8]>,
}

impl<'t> Tables<'t> {
    fn open(txn: &'t WriteTransaction) -> Result<Self> {
        Ok(Tables {
            accounts: txn.open_table(ACCOUNTS).db()?,
            pots: txn.open_table(POTS).db()?,
            redeemed: txn.open_table(REDEEMED).db()?,
            requests: txn.open_table(REQUESTS).db()?,
            meta: txn.open_table(META).db()?,
        })
    }

    fn account(&self, key: &IdentityKey) -> Result<Account> {
        let balance = self.accounts.get(&key.0).db()?.map_or(0, |v| v.value());
        Ok(Account { key: *key, balance })
    }

    fn pot(&self, key: &IdentityKey) -> Result<Option<Pot>> {
        Ok(self
            .pots
            .get(&key.0)
            .db()?
            .map(|v| Pot::from_state(*key, v.value())))
    }

    fn existing_pot(&self, key: &IdentityKey) -> Result<Pot> {
        self.pot(key)?
            .ok_or_else(|| Refusal::UnknownPot.because(format!("no pot has the key {key}")))
    }

    fn write(&mut self, effects: &Effects) -> Result<()> {
        for a in &effects.accounts {
            self.accounts.insert(&a.key.0, a.balance).db()?;
        }
        if let Some(pot) = &effects.pot {
            self.pots.insert(&pot.key.0, pot.state()).db()?;
        }
        if effects.burn > 0 {
            let burned = get_u64(&self.meta, "burned")?
                .checked_add(effects.burn)
                .ok_or_else(overflow)?;
            self.meta
                .insert("burned", burned.to_be_bytes().as_slice())
                .db()?;
        }
        if let Some((id, expiry)) = &effects.redeemed {
            self.redeemed.insert(id, expiry).db()?;
        }
        Ok(())
    }
}

/// What a planned operation writes.
#[derive(Debug, Default)]
pub(crate) struct Effects {
    /// Accounts' new balances.
    accounts: Vec<Account>,
    /// A pot's new state.
    pot: Option<Pot>,
    /// Added to the burned total.
    burn: u64,
    /// A redeemed ticket's record: (pot ‖ digest, expiry).
    redeemed: Option<([u8; 64], UnixTime)>,
}

/// How the ledger carries out an operation: checks that need no state (before the write
/// transaction), then a plan that reads the state and says what to write.
pub(crate) trait Apply: Operation {
    fn precheck(&self, _signer: &IdentityKey, _now: UnixTime) -> Result<()> {
        Ok(())
    }

    /// Checks on a read snapshot that refuse before any write transaction (the plan checks
    /// again inside it).
    fn refuse_early(&self, _signer: &IdentityKey, _state: &Snapshot) -> Result<()> {
        Ok(())
    }

    fn plan(
        &self,
        signer: &IdentityKey,
        state: &Tables<'_>,
        now: UnixTime,
        params: &Params,
    ) -> Result<(Effects, Self::Output)>;
}

impl Apply for Fund {
    fn precheck(&self, _signer: &IdentityKey, _now: UnixTime) -> Result<()> {
        self.pot.verifying_key().map_err(|_| {
            Refusal::Malformed.because(format!("{} is not an Ed25519 public key", self.pot))
        })?;
        match self.balance.checked_add(self.escrow) {
            None | Some(0) => {
                Err(Refusal::Malformed
                    .because("balance + escrow must be positive and fit in 64 bits"))
            }
            Some(_) => Ok(()),
        }
    }

    fn refuse_early(&self, signer: &IdentityKey, state: &Snapshot) -> Result<()> {
        let total = self.balance.saturating_add(self.escrow);
        let balance = state.balance(signer)?;
        if balance < total {
            return Err(Refusal::InsufficientFunds.because(format!(
                "account {signer} holds {balance}; funding needs {total}"
            )));
        }
        Ok(())
    }

    fn plan(
        &self,
        signer: &IdentityKey,
        state: &Tables<'_>,
        _now: UnixTime,
        _params: &Params,
    ) -> Result<(Effects, Transfer)> {
        let total = self.balance.saturating_add(self.escrow);
        let mut account = state.account(signer)?;
        account.balance = account.balance.checked_sub(total).ok_or_else(|| {
            Refusal::InsufficientFunds.because(format!(
                "account {signer} holds {}; funding needs {total}",
                account.balance
            ))
        })?;
        let mut pot = state.pot(&self.pot)?.unwrap_or(Pot {
            key: self.pot,
            balance: 0,
            escrow: 0,
            warned: 0,
            unlock_at: None,
        });
        pot.balance = pot.balance.checked_add(self.balance).ok_or_else(overflow)?;
        pot.escrow = pot.escrow.checked_add(self.escrow).ok_or_else(overflow)?;
        let effects = Effects {
            accounts: vec![account],
            pot: Some(pot),
            ..Effects::default()
        };
        Ok((effects, Transfer { account, pot }))
    }
}

impl Apply for Warn {
    fn refuse_early(&self, signer: &IdentityKey, state: &Snapshot) -> Result<()> {
        if !state.has_pot(signer)? {
            return Err(early::no_pot(signer));
        }
        Ok(())
    }

    fn plan(
        &self,
        signer: &IdentityKey,
        state: &Tables<'_>,
        now: UnixTime,
        params: &Params,
    ) -> Result<(Effects, Pot)> {
        let mut pot = state.existing_pot(signer)?;
        if self.amount > pot.total() {
            return Err(Refusal::InsufficientFunds.because(format!(
                "the pot holds {}; cannot warn {}",
                pot.total(),
                self.amount
            )));
        }
        pot.warned = self.amount;
        pot.unlock_at = (self.amount > 0).then(|| now.saturating_add(params.notice_period_s));
        let effects = Effects {
            pot: Some(pot),
            ..Effects::default()
        };
        Ok((effects, pot))
    }
}

impl Apply for Withdraw {
    fn refuse_early(&self, signer: &IdentityKey, state: &Snapshot) -> Result<()> {
        if !state.has_pot(signer)? {
            return Err(early::no_pot(signer));
        }
        Ok(())
    }

    fn precheck(&self, _signer: &IdentityKey, _now: UnixTime) -> Result<()> {
        if self.amount == 0 {
            return Err(Refusal::Malformed.because("nothing to withdraw"));
        }
        Ok(())
    }

    fn plan(
        &self,
        signer: &IdentityKey,
        state: &Tables<'_>,
        now: UnixTime,
        _params: &Params,
    ) -> Result<(Effects, Transfer)> {
        let mut pot = state.existing_pot(signer)?;
        let unlock_at = pot.unlock_at.ok_or_else(|| {
            Refusal::NotWarned.because("warn first; the amount may be withdrawn after the notice")
        })?;
        if now < unlock_at {
            return Err(Refusal::NoticeNotOver.because(format!(
                "the notice period ends at {unlock_at} (now {now}); {} s to go",
                unlock_at - now
            )));
        }
        if self.amount > pot.warned {
            return Err(Refusal::ExceedsWarned.because(format!(
                "{} was warned; cannot withdraw {}",
                pot.warned, self.amount
            )));
        }
        if self.amount > pot.total() {
            return Err(Refusal::InsufficientFunds.because(format!(
                "the pot holds {}; cannot withdraw {}",
                pot.total(),
                self.amount
            )));
        }
        let from_balance = self.amount.min(pot.balance);
        pot.balance -= from_balance;
        pot.escrow -= self.amount - from_balance;
        pot.warned -= self.amount;
        if pot.warned == 0 {
            pot.unlock_at = None;
        }
        let mut account = state.account(signer)?;
        account.balance = account
            .balance
            .checked_add(self.amount)
            .ok_or_else(overflow)?;
        let effects = Effects {
            accounts: vec![account],
            pot: Some(pot),
            ..Effects::default()
        };
        Ok((effects, Transfer { account, pot }))
    }
}

/// A ticket check's failure as the ledger's refusal.
fn ticket_refusal(e: murmur_protocol::Error) -> Error {
    use murmur_protocol::Error as P;
    let refusal = match &e {
        P::TicketWrongRecipient { .. } => Refusal::WrongRecipient,
        P::TicketExpired { .. } => Refusal::TicketExpired,
        P::TicketForged => Refusal::ForgedTicket,
        P::TicketRevealMismatch => Refusal::RevealMismatch,
        P::TicketNotWinner => Refusal::NotAWinner,
        _ => Refusal::Malformed,
    };
    refusal.because(e.to_string())
}

impl Apply for Redeem {
    /// The ledger's checks, cheapest first: the redeemer is the recipient, the ticket has not
    /// expired by the ledger's clock, the pot signed it, the reveal opens its commitment and
    /// it wins. (The issue time is the relay's to check: a ticket a relay accepted is paid
    /// even if the payer's clock ran fast.)
    fn precheck(&self, signer: &IdentityKey, now: UnixTime) -> Result<()> {
        let t = &self.ticket;
        t.check_recipient(signer)
            .and_then(|()| t.check_expiry(now))
            .and_then(|()| t.verify_signature())
            .and_then(|()| t.check_win(&self.reveal))
            .map_err(ticket_refusal)
    }

    fn plan(
        &self,
        signer: &IdentityKey,
        state: &Tables<'_>,
        _now: UnixTime,
        _params: &Params,
    ) -> Result<(Effects, Redemption)> {
        let t = &self.ticket;
        let mut pot = state.existing_pot(&t.pot)?;
        let id = redemption_id(t);
        if state.redeemed.get(&id).db()?.is_some() {
            return Err(Refusal::AlreadyRedeemed.because(format!(
                "ticket {} (nonce {}) of pot {} was already redeemed by its recipient",
                hex::encode(&t.digest()),
                hex::encode(&t.nonce),
                t.pot
            )));
        }
        let paid = t.face_value.min(pot.balance);
        let burned = if t.face_value > pot.balance {
            pot.escrow
        } else {
            0
        };
        pot.balance -= paid;
        pot.escrow -= burned;
        let mut account = state.account(signer)?;
        account.balance = account.balance.checked_add(paid).ok_or_else(overflow)?;
        let effects = Effects {
            accounts: vec![account],
            pot: Some(pot),
            burn: burned,
            redeemed: Some((id, t.expiry)),
        };
        Ok((
            effects,
            Redemption {
                paid,
                burned,
                account,
                pot,
            },
        ))
    }
}

impl Ledger {
    /// Opens (or creates) the database at `path`. A new database credits the `genesis`
    /// accounts, the only way money comes into being; an existing one must have been created
    /// with the same genesis entries.
    pub fn open(path: &Path, params: Params, genesis: &[(IdentityKey, u64)]) -> Result<Ledger> {
        let db = Database::create(path).db()?;
        let digest = genesis_digest(genesis);
        let txn = db.begin_write().db()?;
        let init = Self::init(&txn, genesis, &digest);
        match init {
            Ok(()) => txn.commit().db()?,
            Err(e) => {
                let _ = txn.abort();
                return Err(e);
            }
        }
        let mut ledger = Ledger {
            db: Arc::new(db),
            params,
            guard: Arc::new(Guard::new(RateLimits::default())),
            totals: Arc::default(),
        };
        let counted = ledger.audit()?;
        ledger.totals = Arc::new(Mutex::new(counted));
        Ok(ledger)
    }

    /// The same ledger with these request rate limits (the defaults until then).
    pub fn with_rate_limits(mut self, limits: RateLimits) -> Ledger {
        self.guard = Arc::new(Guard::new(limits));
        self
    }

    /// The money totals as of the last committed operation, from memory.
    pub fn totals(&self) -> Audit {
        *self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the totals again from the tables; if the kept ones differ (they never should),
    /// says so and takes the counted ones. Returns whether they agreed.
    pub fn check_totals(&self) -> Result<bool> {
        let counted = self.audit()?;
        let mut kept = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let agreed = *kept == counted;
        if !agreed {
            tracing::error!(?counted, kept = ?*kept, "the ledger's kept totals differ from its tables");
            *kept = counted;
        }
        Ok(agreed)
    }

    fn init(
        txn: &WriteTransaction,
        genesis: &[(IdentityKey, u64)],
        digest: &[u8; 32],
    ) -> Result<()> {
        let mut t = Tables::open(txn)?;
        if t.meta.get("schema").db()?.is_some() {
            let schema = get_u64(&t.meta, "schema")?;
            if schema != SCHEMA {
                return Err(Error::Config(format!(
                    "the database has schema {schema}; this build reads schema {SCHEMA}"
                )));
            }
            let stored = t.meta.get("genesis").db()?.map(|v| v.value().to_vec());
            if stored.as_deref() != Some(digest.as_slice()) {
                return Err(Error::Config(
                    "the genesis entries differ from those the database was created with \
                     (genesis is fixed when a ledger starts; restore the original entries)"
                        .into(),
                ));
            }
            return Ok(());
        }
        let mut total: u64 = 0;
        for (key, amount) in genesis {
            total = total.checked_add(*amount).ok_or_else(|| {
                Error::Config("the genesis amounts add up to more than 2^64 − 1".into())
            })?;
            let balance = t.account(key)?.balance.saturating_add(*amount);
            t.accounts.insert(&key.0, balance).db()?;
        }
        for (name, value) in [("schema", SCHEMA), ("genesis_total", total), ("burned", 0)] {
            t.meta.insert(name, value.to_be_bytes().as_slice()).db()?;
        }
        t.meta.insert("genesis", digest.as_slice()).db()?;
        Ok(())
    }

    /// The rules in force.
    pub fn params(&self) -> Params {
        self.params
    }

    /// Moves money from the signer's account into a pot.
    pub fn fund_at(&self, req: &Signed<Fund>, now: UnixTime) -> Result<Transfer> {
        self.apply(req, now)
    }

    /// Starts (or replaces, or with 0 cancels) the notice for a withdrawal from the signer's
    /// pot.
    pub fn warn_at(&self, req: &Signed<Warn>, now: UnixTime) -> Result<Pot> {
        self.apply(req, now)
    }

    /// Moves warned money from the signer's pot back to the signer's account, once the
    /// notice is over.
    pub fn withdraw_at(&self, req: &Signed<Withdraw>, now: UnixTime) -> Result<Transfer> {
        self.apply(req, now)
    }

    /// Pays a winning ticket to its recipient, once.
    pub fn redeem_at(&self, req: &Signed<Redeem>, now: UnixTime) -> Result<Redemption> {
        self.apply(req, now)
    }

    /// Carries out a signed operation at `now`: every refusal leaves the money where it was.
    pub(crate) fn apply<T: Apply>(&self, req: &Signed<T>, now: UnixTime) -> Result<T::Output> {
        let window = self.params.request_window_s;
        if req.timestamp.abs_diff(now) > window {
            return Err(Refusal::StaleRequest.because(format!(
                "the request is stamped {}, the ledger's clock says {now}; at most {window} s \
                 apart are accepted",
                req.timestamp
            )));
        }
        req.verify()?;
        if !self.guard.allow_key(&req.signer, Instant::now()) {
            return Err(Refusal::RateLimited.because(format!(
                "{} sends requests faster than this ledger takes from one key",
                req.signer
            )));
        }
        req.op.precheck(&req.signer, now)?;
        self.refuse_early(req)?;
        if !self.guard.allow_write(Instant::now()) {
            return Err(Refusal::RateLimited
                .because("the ledger is taking as many writes as it can; try again shortly"));
        }
        let txn = self.db.begin_write().db()?;
        match self.decide(&txn, req, now) {
            Ok((output, delta)) => {
                txn.commit().db()?;
                self.totals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .add(&delta);
                Ok(output)
            }
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }

    /// The checks on a read snapshot, before any write transaction.
    fn refuse_early<T: Apply>(&self, req: &Signed<T>) -> Result<()> {
        let snapshot = Snapshot::of(&self.db)?;
        snapshot.check_fresh(req)?;
        req.op.refuse_early(&req.signer, &snapshot)
    }

    /// Inside the write transaction: an `Err` (a refusal too) aborts it, so nothing is
    /// written; `Ok` is committed: the effects and the request's nonce, so the same signed
    /// request is never carried out twice.
    fn decide<T: Apply>(
        &self,
        txn: &WriteTransaction,
        req: &Signed<T>,
        now: UnixTime,
    ) -> Result<(T::Output, TotalsDelta)> {
        let mut t = Tables::open(txn)?;
        let id = concat(&req.signer.0, &req.nonce);
        if t.requests.get(&id).db()?.is_some() {
            return Err(early::replayed::<T>(&req.signer));
        }
        let (effects, output) = req.op.plan(&req.signer, &t, now, &self.params)?;
        let delta = TotalsDelta::of(&t, &effects)?;
        t.write(&effects)?;
        t.requests.insert(&id, req.timestamp).db()?;
        Ok((output, delta))
    }

    /// A pot ([`Refusal::UnknownPot`] if none has this key).
    pub fn read_pot(&self, key: &IdentityKey) -> Result<Pot> {
        let txn = self.db.begin_read().db()?;
        let pots = txn.open_table(POTS).db()?;
        let state = pots.get(&key.0).db()?;
        state
            .map(|v| Pot::from_state(*key, v.value()))
            .ok_or_else(|| Refusal::UnknownPot.because(format!("no pot has the key {key}")))
    }

    /// An account (a key the ledger never saw holds 0).
    pub fn read_account(&self, key: &IdentityKey) -> Result<Account> {
        let txn = self.db.begin_read().db()?;
        let accounts = txn.open_table(ACCOUNTS).db()?;
        let balance = accounts.get(&key.0).db()?.map_or(0, |v| v.value());
        Ok(Account { key: *key, balance })
    }

    /// Totals over every account and pot, from one snapshot (a full scan).
    pub fn audit(&self) -> Result<Audit> {
        let txn = self.db.begin_read().db()?;
        let meta = txn.open_table(META).db()?;
        let mut audit = Audit {
            genesis: get_u64(&meta, "genesis_total")?,
            accounts: 0,
            pot_balances: 0,
            pot_escrows: 0,
            burned: get_u64(&meta, "burned")?,
            pots: 0,
            redeemed_tickets: txn.open_table(REDEEMED).db()?.len().db()?,
            remembered_requests: txn.open_table(REQUESTS).db()?.len().db()?,
        };
        for entry in txn.open_table(ACCOUNTS).db()?.iter().db()? {
            audit.accounts += u128::from(entry.db()?.1.value());
        }
        for entry in txn.open_table(POTS).db()?.iter().db()? {
            let (balance, escrow, _, _) = entry.db()?.1.value();
            audit.pot_balances += u128::from(balance);
            audit.pot_escrows += u128::from(escrow);
            audit.pots += 1;
        }
        Ok(audit)
    }

    /// Forgets redeemed tickets that expired more than the request window ago (they are
    /// refused as expired anyway; the window covers a clock set back a little) and request
    /// nonces whose timestamps fell out of the window (refused as stale anyway).
    pub fn prune(&self, now: UnixTime) -> Result<Pruned> {
        let window = self.params.request_window_s;
        let keep = |t: u64| t.saturating_add(window) >= now;
        let txn = self.db.begin_write().db()?;
        let pruned = (|| {
            let mut t = Tables::open(&txn)?;
            let before = (t.redeemed.len().db()?, t.requests.len().db()?);
            t.redeemed.retain(|_, expiry| keep(expiry)).db()?;
            t.requests.retain(|_, timestamp| keep(timestamp)).db()?;
            Ok::<_, Error>(Pruned {
                redeemed_tickets: before.0 - t.redeemed.len().db()?,
                requests: before.1 - t.requests.len().db()?,
            })
        })();
        match pruned {
            Ok(p) => {
                txn.commit().db()?;
                self.totals
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .pruned(&p);
                Ok(p)
            }
            Err(e) => {
                let _ = txn.abort();
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::SigningKey;
    use murmur_protocol::ticket::{Ticket, TicketFields, commitment_of};

    use super::*;

    const PARAMS: Params = Params {
        notice_period_s: 100,
        request_window_s: 60,
    };
    const NOW: UnixTime = 1_000_000;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn id(seed: u8) -> IdentityKey {
        IdentityKey::of(&key(seed))
    }

    fn open(dir: &tempfile::TempDir) -> Ledger {
        Ledger::open(&dir.path().join("l.redb"), PARAMS, &[(id(1), 1_000)]).unwrap()
    }

    fn refusal<T: std::fmt::Debug>(r: Result<T>) -> Refusal {
        r.unwrap_err().refusal().expect("a refusal")
    }

    fn ticket(face: u64, nonce: u8) -> Ticket {
        Ticket::sign(
            TicketFields {
                recipient: id(2),
                face_value: face,
                win_ratio: u64::MAX,
                nonce: [nonce; 16],
                issued: NOW,
                expiry: NOW + 10,
                commitment: commitment_of(&[7; 32]),
            },
            &key(1),
        )
    }

    /// Key 1 funds its own pot.
    fn fund(balance: u64, escrow: u64) -> Signed<Fund> {
        let pot = id(1);
        Signed::new(
            Fund {
                pot,
                balance,
                escrow,
            },
            &key(1),
            NOW,
        )
    }

    fn redeem(t: Ticket, now: UnixTime) -> Signed<Redeem> {
        Signed::new(
            Redeem {
                ticket: t,
                reveal: [7; 32],
            },
            &key(2),
            now,
        )
    }

    /// One nonce given to five relays is five tickets: each recipient is paid once, the
    /// ones the balance cannot cover get what is left and burn the escrow, and a second
    /// redemption by the same recipient is refused.
    #[test]
    fn one_nonce_for_five_recipients_pays_each_once_and_an_overdraft_burns_the_escrow() {
        let dir = tempfile::tempdir().unwrap();
        let l = Ledger::open(&dir.path().join("l.redb"), PARAMS, &[(id(1), 1_000)]).unwrap();
        l.fund_at(&fund(250, 300), NOW).unwrap();
        let mut paid = Vec::new();
        for relay in 10..15u8 {
            let t = Ticket::sign(
                TicketFields {
                    recipient: id(relay),
                    ..ticket(100, 9).fields()
                },
                &key(1),
            );
            let req = Signed::new(
                Redeem {
                    ticket: t,
                    reveal: [7; 32],
                },
                &key(relay),
                NOW,
            );
            let r = l.redeem_at(&req, NOW).unwrap();
            paid.push((r.paid, r.burned));
            let again = Signed::new(req.op, &key(relay), NOW);
            assert_eq!(refusal(l.redeem_at(&again, NOW)), Refusal::AlreadyRedeemed);
        }
        println!("one nonce, five recipients: (paid, burned) = {paid:?}");
        assert_eq!(paid, [(100, 0), (100, 0), (50, 300), (0, 0), (0, 0)]);
        let a = l.audit().unwrap();
        assert!(a.conserved(), "{a:?}");
        assert_eq!((a.burned, a.redeemed_tickets), (300, 5));
    }

    #[test]
    fn fund_redeem_overdraft_warn_withdraw() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let t = l.fund_at(&fund(300, 400), NOW).unwrap();
        assert_eq!(
            (t.account.balance, t.pot.balance, t.pot.escrow),
            (300, 300, 400)
        );
        assert_eq!(t.pot.usable(), 200);
        assert_eq!(
            refusal(l.fund_at(&fund(300, 1), NOW)),
            Refusal::InsufficientFunds
        );

        let r = l.redeem_at(&redeem(ticket(100, 1), NOW), NOW).unwrap();
        assert_eq!((r.paid, r.burned, r.account.balance), (100, 0, 100));
        // Overdraft: 250 asked, 200 held: the balance is paid, the escrow burned.
        let r = l.redeem_at(&redeem(ticket(250, 2), NOW), NOW).unwrap();
        assert_eq!(
            (r.paid, r.burned, r.pot.balance, r.pot.escrow),
            (200, 400, 0, 0)
        );
        let a = l.audit().unwrap();
        assert!(a.conserved(), "{a:?}");
        assert_eq!((a.burned, a.accounts, a.redeemed_tickets), (400, 600, 2));

        l.fund_at(&fund(100, 100), NOW).unwrap();
        let withdraw = |amount, now| Signed::new(Withdraw { amount }, &key(1), now);
        assert_eq!(
            refusal(l.withdraw_at(&withdraw(50, NOW), NOW)),
            Refusal::NotWarned
        );
        assert_eq!(
            refusal(l.warn_at(&Signed::new(Warn { amount: 201 }, &key(1), NOW), NOW)),
            Refusal::InsufficientFunds
        );
        let pot = l
            .warn_at(&Signed::new(Warn { amount: 150 }, &key(1), NOW), NOW)
            .unwrap();
        assert_eq!((pot.warned, pot.unlock_at), (150, Some(NOW + 100)));
        assert_eq!(pot.usable(), 0);
        let early = NOW + 99;
        assert_eq!(
            refusal(l.withdraw_at(&withdraw(150, early), early)),
            Refusal::NoticeNotOver
        );
        let later = NOW + 100;
        assert_eq!(
            refusal(l.withdraw_at(&withdraw(151, later), later)),
            Refusal::ExceedsWarned
        );
        let t = l.withdraw_at(&withdraw(150, later), later).unwrap();
        assert_eq!((t.pot.balance, t.pot.escrow, t.pot.warned), (0, 50, 0));
        assert_eq!(t.pot.unlock_at, None);
        assert_eq!(t.account.balance, 1_000 - 700 - 200 + 150);
        assert!(l.audit().unwrap().conserved());
        // The totals kept in memory are what a full count finds, refusals and all.
        assert_eq!(l.totals(), l.audit().unwrap());
        assert!(l.check_totals().unwrap());
        l.prune(NOW + 10_000).unwrap();
        assert_eq!(l.totals(), l.audit().unwrap());
    }

    #[test]
    fn refusals_move_no_money_and_replays_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let fund = fund(500, 500);
        l.fund_at(&fund, NOW).unwrap();
        assert_eq!(refusal(l.fund_at(&fund, NOW)), Refusal::ReplayedRequest);
        let before = l.audit().unwrap();
        let good = ticket(10, 1);
        l.redeem_at(&redeem(good, NOW), NOW).unwrap();
        assert_eq!(
            refusal(l.redeem_at(&redeem(good, NOW), NOW)),
            Refusal::AlreadyRedeemed
        );
        let after_one = l.audit().unwrap();
        assert_eq!(after_one.accounts, before.accounts + 10);

        // Relay 3 redeems a ticket made out to relay 2.
        let wrong = Signed::new(redeem(ticket(10, 2), NOW).op, &key(3), NOW);
        assert_eq!(refusal(l.redeem_at(&wrong, NOW)), Refusal::WrongRecipient);
        let late = NOW + 11;
        assert_eq!(
            refusal(l.redeem_at(&redeem(ticket(10, 3), late), late)),
            Refusal::TicketExpired
        );
        let mut forged = ticket(10, 4);
        forged.face_value = 400;
        assert_eq!(
            refusal(l.redeem_at(&redeem(forged, NOW), NOW)),
            Refusal::ForgedTicket
        );
        let mut wrong_reveal = redeem(ticket(10, 5), NOW);
        wrong_reveal.op.reveal = [8; 32];
        let wrong_reveal = Signed::new(wrong_reveal.op, &key(2), NOW);
        assert_eq!(
            refusal(l.redeem_at(&wrong_reveal, NOW)),
            Refusal::RevealMismatch
        );
        let loser = Ticket::sign(
            TicketFields {
                win_ratio: 0,
                ..ticket(10, 6).fields()
            },
            &key(1),
        );
        assert_eq!(
            refusal(l.redeem_at(&redeem(loser, NOW), NOW)),
            Refusal::NotAWinner
        );
        let orphan = Ticket::sign(ticket(10, 7).fields(), &key(9));
        assert_eq!(
            refusal(l.redeem_at(&redeem(orphan, NOW), NOW)),
            Refusal::UnknownPot
        );
        let stale = redeem(ticket(10, 8), NOW - 61);
        assert_eq!(refusal(l.redeem_at(&stale, NOW)), Refusal::StaleRequest);
        let mut bad_sig = redeem(ticket(10, 9), NOW);
        bad_sig.signature[0] ^= 1;
        assert_eq!(refusal(l.redeem_at(&bad_sig, NOW)), Refusal::BadSignature);
        assert_eq!(l.audit().unwrap().accounts, after_one.accounts);
        assert_eq!(l.read_pot(&id(1)).unwrap().balance, 490);
        assert!(l.audit().unwrap().conserved());
    }

    #[test]
    fn prune_keeps_records_until_expiry_and_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let l = open(&dir);
        let fund = fund(500, 500);
        l.fund_at(&fund, NOW).unwrap();
        l.redeem_at(&redeem(ticket(10, 1), NOW), NOW).unwrap();
        // Request nonces (stamped NOW, window 60) are kept through NOW + 60, the redeemed
        // ticket (expiry NOW + 10) through NOW + 70.
        assert_eq!(l.prune(NOW + 60).unwrap(), Pruned::default());
        let requests_only = Pruned {
            redeemed_tickets: 0,
            requests: 2,
        };
        assert_eq!(l.prune(NOW + 61).unwrap(), requests_only);
        assert_eq!(l.prune(NOW + 70).unwrap(), Pruned::default());
        let ticket_too = Pruned {
            redeemed_tickets: 1,
            requests: 0,
        };
        assert_eq!(l.prune(NOW + 71).unwrap(), ticket_too);
        let a = l.audit().unwrap();
        assert_eq!((a.redeemed_tickets, a.remembered_requests), (0, 0));
    }

    #[test]
    fn reopening_with_other_genesis_entries_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.redb");
        drop(Ledger::open(&path, PARAMS, &[(id(1), 1_000)]).unwrap());
        let err = Ledger::open(&path, PARAMS, &[(id(1), 1_001)]).unwrap_err();
        assert!(err.to_string().contains("genesis"), "{err}");
        let l = Ledger::open(&path, PARAMS, &[(id(1), 1_000)]).unwrap();
        assert_eq!(l.read_account(&id(1)).unwrap().balance, 1_000);
        assert_eq!(l.read_account(&id(2)).unwrap().balance, 0);
        assert_eq!(refusal(l.read_pot(&id(1))), Refusal::UnknownPot);
    }

    #[test]
    fn usable_follows_the_withdrawal_order() {
        let pot = |balance, escrow, warned| Pot {
            key: id(1),
            balance,
            escrow,
            warned,
            unlock_at: None,
        };
        assert_eq!(pot(100, 400, 0).usable(), 100);
        assert_eq!(pot(300, 400, 0).usable(), 200);
        assert_eq!(pot(300, 400, 50).usable(), 200);
        assert_eq!(pot(300, 400, 250).usable(), 50);
        // 350 warned: all 300 of the balance and 50 of the escrow may leave.
        assert_eq!(pot(300, 400, 350).usable(), 0);
        assert_eq!(pot(0, 0, 0).usable(), 0);
    }
}
