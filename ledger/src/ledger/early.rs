//! Refusing before writing: checks on a read snapshot that let most refusals (a replayed
//! request, a warning or withdrawal for a pot that does not exist, funding beyond the
//! account's balance) be answered without taking the single writer at all. The plan inside
//! the write transaction checks everything again; a refusal there aborts the transaction, so
//! no refused request writes anything.

use redb::ReadOnlyTable;

use super::*;

/// The tables of one read transaction, for the early checks.
pub(crate) struct Snapshot {
    accounts: ReadOnlyTable<&'static [u8; 32], u64>,
    pots: ReadOnlyTable<&'static [u8; 32], PotState>,
    requests: ReadOnlyTable<&'static [u8; 48], u64>,
}

impl Snapshot {
    pub(super) fn of(db: &Database) -> Result<Snapshot> {
        let txn = db.begin_read().db()?;
        Ok(Snapshot {
            accounts: txn.open_table(ACCOUNTS).db()?,
            pots: txn.open_table(POTS).db()?,
            requests: txn.open_table(REQUESTS).db()?,
        })
    }

    /// An account's balance (0 for a key never seen).
    pub(crate) fn balance(&self, key: &IdentityKey) -> Result<u64> {
        Ok(self.accounts.get(&key.0).db()?.map_or(0, |v| v.value()))
    }

    /// Whether a pot has this key.
    pub(crate) fn has_pot(&self, key: &IdentityKey) -> Result<bool> {
        Ok(self.pots.get(&key.0).db()?.is_some())
    }

    /// Refuses a request whose (signer, nonce) was already decided.
    pub(super) fn check_fresh<T: Operation>(&self, req: &Signed<T>) -> Result<()> {
        let id = concat(&req.signer.0, &req.nonce);
        if self.requests.get(&id).db()?.is_some() {
            return Err(replayed::<T>(&req.signer));
        }
        Ok(())
    }
}

/// The refusal of a request decided before.
pub(super) fn replayed<T: Operation>(signer: &IdentityKey) -> Error {
    Refusal::ReplayedRequest.because(format!(
        "this {} request by {signer} was already decided",
        T::NAME
    ))
}

/// The refusal of a request naming a pot that does not exist.
pub(crate) fn no_pot(key: &IdentityKey) -> Error {
    Refusal::UnknownPot.because(format!("no pot has the key {key}"))
}
