//! The durable record of winning tickets: a redb database at `<state_dir>/payments.redb`
//! (mode 0600: it holds reveals of epochs that may still be live).
//!
//! | table | key | value |
//! |---|---|---|
//! | `pending` | pot ‖ nonce (48 bytes) | version 1 ‖ ticket (209) ‖ reveal (32) ‖ key epoch (4, BE), or version 2 ‖ the same ‖ the pot owner's co-signature (64), for a relay that settles on a chain |
//! | `settled` | pot ‖ nonce | (paid, outcome label, settled at Unix seconds) |
//!
//! Every write is one redb transaction committed with redb's default durability (fsync before
//! `commit` returns), so a winner that [`Store::put_pending`] stored survives `kill -9`, and
//! moving it from `pending` to `settled` is all or nothing.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};

use murmur_protocol::directory::{Epoch, IdentityKey, UnixTime};
use murmur_protocol::ticket::{COSIGNATURE_LEN, CoSignature, TICKET_LEN, Ticket};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use zeroize::Zeroizing;

use crate::error::{Error, Result};

const PENDING: TableDefinition<&[u8; 48], &[u8]> = TableDefinition::new("pending");
const SETTLED: TableDefinition<&[u8; 48], (u64, &str, u64)> = TableDefinition::new("settled");

const RECORD_VERSION: u8 = 1;
const RECORD_LEN: usize = 1 + TICKET_LEN + 32 + 4;
/// A record with the co-signature its chain redemption needs.
const COSIGNED_RECORD_VERSION: u8 = 2;
const COSIGNED_RECORD_LEN: usize = RECORD_LEN + COSIGNATURE_LEN;

/// A ticket's identity at the ledger, which redeems each `(pot, nonce)` once.
pub type TicketId = [u8; 48];

/// `pot ‖ nonce`.
pub fn ticket_id(t: &Ticket) -> TicketId {
    let mut id = [0u8; 48];
    id[..32].copy_from_slice(&t.pot.0);
    id[32..].copy_from_slice(&t.nonce);
    id
}

/// A winning ticket with what it takes to redeem it.
#[derive(Clone)]
pub struct Winner {
    pub ticket: Ticket,
    /// The reveal of the ticket's key epoch.
    pub reveal: Zeroizing<[u8; 32]>,
    /// The Sphinx key epoch the ticket paid for; it is redeemed once that key has retired.
    pub epoch: Epoch,
    /// The pot owner's co-signature, for a relay that redeems on a chain.
    pub cosignature: Option<CoSignature>,
}

impl std::fmt::Debug for Winner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Winner")
            .field("pot", &self.ticket.pot)
            .field("nonce", &self.ticket.nonce)
            .field("face_value", &self.ticket.face_value)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Winner {
    /// Its `(pot, nonce)`.
    pub fn id(&self) -> TicketId {
        ticket_id(&self.ticket)
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(COSIGNED_RECORD_LEN));
        out.push(match self.cosignature {
            Some(_) => COSIGNED_RECORD_VERSION,
            None => RECORD_VERSION,
        });
        out.extend_from_slice(&self.ticket.encode());
        out.extend_from_slice(&self.reveal[..]);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        if let Some(c) = &self.cosignature {
            out.extend_from_slice(&c.0);
        }
        out
    }

    fn decode(bytes: &[u8]) -> Option<Winner> {
        let cosignature = match (bytes.first(), bytes.len()) {
            (Some(&RECORD_VERSION), RECORD_LEN) => None,
            (Some(&COSIGNED_RECORD_VERSION), COSIGNED_RECORD_LEN) => {
                Some(CoSignature(bytes.get(RECORD_LEN..)?.try_into().ok()?))
            }
            _ => return None,
        };
        let bytes = bytes.get(..RECORD_LEN)?;
        let ticket = Ticket::decode(bytes.get(1..1 + TICKET_LEN)?).ok()?;
        let mut reveal = Zeroizing::new([0u8; 32]);
        reveal.copy_from_slice(bytes.get(1 + TICKET_LEN..1 + TICKET_LEN + 32)?);
        let epoch = Epoch::from_be_bytes(bytes.get(1 + TICKET_LEN + 32..)?.try_into().ok()?);
        Some(Winner {
            ticket,
            reveal,
            epoch,
            cosignature,
        })
    }
}

/// How a winner left the `pending` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settled {
    pub pot: IdentityKey,
    pub nonce: [u8; 16],
    /// What the ledger paid (0 unless `outcome` is `"paid"`).
    pub paid: u64,
    /// `"paid"`, or the ledger's refusal label (`"already_redeemed"`, `"ticket_expired"`, …),
    /// or the relay's reason for giving up (`"expired_unredeemed"`, `"corrupt_record"`).
    pub outcome: String,
    pub at: UnixTime,
}

/// What the `pending` table holds.
pub(crate) struct PendingRows {
    pub winners: Vec<Winner>,
    /// Rows that do not decode (never expected; settled as `corrupt_record`).
    pub corrupt: Vec<TicketId>,
}

pub(crate) struct Store {
    db: Database,
    path: PathBuf,
}

impl Store {
    fn err(&self) -> impl Fn(redb::Error) -> Error + '_ {
        |e| Error::PaymentStore {
            path: self.path.clone(),
            reason: e.to_string(),
        }
    }

    /// Opens (or creates) the database at `path`.
    pub fn open(path: &Path) -> Result<Store> {
        let fail = |reason: String| Error::PaymentStore {
            path: path.to_path_buf(),
            reason,
        };
        // Create it private before redb initialises it (redb opens an existing empty file).
        let mut opts = OpenOptions::new();
        opts.create(true).append(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        opts.open(path).map_err(|e| fail(e.to_string()))?;
        let db = Database::create(path).map_err(|e| fail(e.to_string()))?;
        let store = Store {
            db,
            path: path.to_path_buf(),
        };
        let txn = store.db.begin_write().map_err(|e| fail(e.to_string()))?;
        txn.open_table(PENDING).map_err(|e| fail(e.to_string()))?;
        txn.open_table(SETTLED).map_err(|e| fail(e.to_string()))?;
        txn.commit().map_err(|e| fail(e.to_string()))?;
        Ok(store)
    }

    /// Where the database is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stores `winners` in one durable transaction. Returns, for each, whether it was not
    /// stored (nor settled) before.
    pub fn put_pending(&self, winners: &[Winner]) -> Result<Vec<bool>> {
        let err = self.err();
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        let mut new = Vec::with_capacity(winners.len());
        {
            let mut pending = txn.open_table(PENDING).map_err(|e| err(e.into()))?;
            let settled = txn.open_table(SETTLED).map_err(|e| err(e.into()))?;
            for w in winners {
                let id = w.id();
                if settled.get(&id).map_err(|e| err(e.into()))?.is_some() {
                    new.push(false);
                    continue;
                }
                let old = pending
                    .insert(&id, w.encode().as_slice())
                    .map_err(|e| err(e.into()))?;
                new.push(old.is_none());
            }
        }
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(new)
    }

    /// Every pending winner.
    pub fn pending(&self) -> Result<PendingRows> {
        let err = self.err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(PENDING).map_err(|e| err(e.into()))?;
        let mut rows = PendingRows {
            winners: Vec::new(),
            corrupt: Vec::new(),
        };
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (id, value) = entry.map_err(|e| err(e.into()))?;
            match Winner::decode(value.value()) {
                Some(w) if w.id() == *id.value() => rows.winners.push(w),
                _ => rows.corrupt.push(*id.value()),
            }
        }
        Ok(rows)
    }

    /// The pending winners of `pot` (a range of the table: keys start with the pot).
    pub fn pending_of(&self, pot: &IdentityKey) -> Result<Vec<Winner>> {
        let err = self.err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(PENDING).map_err(|e| err(e.into()))?;
        let mut low = [0u8; 48];
        low[..32].copy_from_slice(&pot.0);
        let mut high = [0xffu8; 48];
        high[..32].copy_from_slice(&pot.0);
        let mut out = Vec::new();
        for entry in table
            .range::<&[u8; 48]>(&low..=&high)
            .map_err(|e| err(e.into()))?
        {
            let (_, value) = entry.map_err(|e| err(e.into()))?;
            if let Some(w) = Winner::decode(value.value()) {
                out.push(w);
            }
        }
        Ok(out)
    }

    /// Which of `ids` are still pending.
    pub fn still_pending(&self, ids: &[TicketId]) -> Result<Vec<bool>> {
        let err = self.err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(PENDING).map_err(|e| err(e.into()))?;
        ids.iter()
            .map(|id| Ok(table.get(id).map_err(|e| err(e.into()))?.is_some()))
            .collect()
    }

    /// Moves a winner from `pending` to `settled` in one durable transaction. Returns false
    /// (and writes nothing) if it was not pending.
    pub fn settle(&self, id: &TicketId, paid: u64, outcome: &str, at: UnixTime) -> Result<bool> {
        Ok(self
            .settle_many(&[*id], paid, outcome, at)?
            .first()
            .copied()
            .unwrap_or(false))
    }

    /// Moves winners from `pending` to `settled`, each with `paid` and `outcome`, in one
    /// durable transaction. Returns, for each, whether it was pending (the others are left
    /// alone); nothing is written if none was.
    pub fn settle_many(
        &self,
        ids: &[TicketId],
        paid: u64,
        outcome: &str,
        at: UnixTime,
    ) -> Result<Vec<bool>> {
        let err = self.err();
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        let was_pending = {
            let mut pending = txn.open_table(PENDING).map_err(|e| err(e.into()))?;
            let mut settled = txn.open_table(SETTLED).map_err(|e| err(e.into()))?;
            let mut was = Vec::with_capacity(ids.len());
            for id in ids {
                let removed = pending.remove(id).map_err(|e| err(e.into()))?.is_some();
                if removed {
                    settled
                        .insert(id, (paid, outcome, at))
                        .map_err(|e| err(e.into()))?;
                }
                was.push(removed);
            }
            was
        };
        if was_pending.contains(&true) {
            txn.commit().map_err(|e| err(e.into()))?;
        } else {
            let _ = txn.abort();
        }
        Ok(was_pending)
    }

    /// Every settled winner.
    pub fn settled(&self) -> Result<Vec<Settled>> {
        let err = self.err();
        let txn = self.db.begin_read().map_err(|e| err(e.into()))?;
        let table = txn.open_table(SETTLED).map_err(|e| err(e.into()))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| err(e.into()))? {
            let (id, value) = entry.map_err(|e| err(e.into()))?;
            let id = id.value();
            let (paid, outcome, at) = value.value();
            let mut pot = [0u8; 32];
            pot.copy_from_slice(&id[..32]);
            let mut nonce = [0u8; 16];
            nonce.copy_from_slice(&id[32..]);
            out.push(Settled {
                pot: IdentityKey(pot),
                nonce,
                paid,
                outcome: outcome.to_owned(),
                at,
            });
        }
        Ok(out)
    }

    /// Forgets settled records older than `before`. Returns how many.
    pub fn prune_settled(&self, before: UnixTime) -> Result<u64> {
        let err = self.err();
        let txn = self.db.begin_write().map_err(|e| err(e.into()))?;
        let removed = {
            let mut settled = txn.open_table(SETTLED).map_err(|e| err(e.into()))?;
            let mut removed = 0u64;
            settled
                .retain(|_, (_, _, at)| {
                    let keep = at >= before;
                    removed += u64::from(!keep);
                    keep
                })
                .map_err(|e| err(e.into()))?;
            removed
        };
        txn.commit().map_err(|e| err(e.into()))?;
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use murmur_protocol::ticket::{TicketFields, commitment_of};

    fn winner(cosignature: Option<CoSignature>) -> Winner {
        let ticket = Ticket::sign(
            TicketFields {
                recipient: IdentityKey([2; 32]),
                face_value: 700,
                win_ratio: u64::MAX,
                nonce: [3; 16],
                issued: 1_800_000_000,
                expiry: 1_800_090_000,
                commitment: commitment_of(&[4; 32]),
            },
            &SigningKey::from_bytes(&[1; 32]),
        );
        Winner {
            ticket,
            reveal: Zeroizing::new([4; 32]),
            epoch: 77,
            cosignature,
        }
    }

    #[test]
    fn records_with_and_without_a_cosignature_round_trip_and_bad_ones_are_refused() {
        for cosignature in [None, Some(CoSignature([9; COSIGNATURE_LEN]))] {
            let w = winner(cosignature);
            let bytes = w.encode();
            assert_eq!(bytes.len(), if cosignature.is_some() { 310 } else { 246 });
            let back = Winner::decode(&bytes).unwrap();
            assert_eq!(back.ticket, w.ticket);
            assert_eq!(*back.reveal, *w.reveal);
            assert_eq!(back.epoch, 77);
            assert_eq!(back.cosignature, cosignature);
            // A version byte that does not match the length, or a cut record: refused.
            let mut other = bytes.to_vec();
            other[0] = if cosignature.is_some() { 1 } else { 2 };
            assert!(Winner::decode(&other).is_none());
            assert!(Winner::decode(&bytes[..bytes.len() - 1]).is_none());
            other[0] = 3;
            assert!(Winner::decode(&other).is_none());
        }
    }
}
