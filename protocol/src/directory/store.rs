//! The last good consensus, as a client or relay holds it.
//!
//! The driver fetches documents and offers them with its clock's `now`; the store installs a
//! document only if it verifies (strict majority of the configured authorities, validity
//! window within the clock-skew allowance) and is newer than the one held. A document that
//! fails leaves the held one in place, so a client keeps using its last good consensus while
//! the authorities are unreachable or serve something bad, until that consensus expires, at
//! which point [`ConsensusStore::current`] says so with [`Error::Expired`].

use super::sign::{AuthoritySet, Freshness, SignedConsensus, VerifiedConsensus};
use super::{Epoch, UnixTime};
use crate::{Error, Result};

/// What became of an offered document that verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// It is now the held consensus.
    Installed { epoch: Epoch },
    /// It verified, but the held one is as new (and as well signed); nothing changed.
    NotNewer { held: Epoch, offered: Epoch },
}

#[derive(Clone, Debug)]
struct Held {
    signed: SignedConsensus,
    verified: VerifiedConsensus,
}

/// Holds the newest consensus that verified.
#[derive(Clone, Debug)]
pub struct ConsensusStore {
    authorities: AuthoritySet,
    clock_skew_s: u64,
    held: Option<Held>,
}

impl ConsensusStore {
    /// An empty store that trusts `authorities`, tolerating `clock_skew_s` seconds of clock
    /// disagreement at both ends of a validity window.
    pub fn new(authorities: AuthoritySet, clock_skew_s: u64) -> Self {
        ConsensusStore {
            authorities,
            clock_skew_s,
            held: None,
        }
    }

    /// The authorities documents must be signed by.
    pub fn authorities(&self) -> &AuthoritySet {
        &self.authorities
    }

    /// Offers a fetched document. It must verify at `now`; it replaces the held one if it is
    /// for a later epoch, or for the same epoch with the same body and more valid signatures.
    /// On error the held document stays.
    pub fn offer(&mut self, doc: SignedConsensus, now: UnixTime) -> Result<Offer> {
        let verified = doc.verify(
            &self.authorities,
            Freshness {
                now,
                expected_epoch: None,
                clock_skew_s: self.clock_skew_s,
            },
        )?;
        let offered = verified.consensus.epoch;
        if let Some(h) = &self.held {
            let held = h.verified.consensus.epoch;
            let better_signed = offered == held
                && verified.digest == h.verified.digest
                && verified.signers.len() > h.verified.signers.len();
            if offered < held || (offered == held && !better_signed) {
                return Ok(Offer::NotNewer { held, offered });
            }
        }
        self.held = Some(Held {
            signed: doc,
            verified,
        });
        Ok(Offer::Installed { epoch: offered })
    }

    /// The held consensus if it may still be used at `now`: [`Error::NoConsensus`] before
    /// any document verified, [`Error::Expired`] once the held one's valid-until (plus the
    /// skew allowance) has passed.
    pub fn current(&self, now: UnixTime) -> Result<&VerifiedConsensus> {
        let h = self.held.as_ref().ok_or(Error::NoConsensus)?;
        let valid_until = h.verified.consensus.valid_until;
        if now > valid_until.saturating_add(self.clock_skew_s) {
            return Err(Error::Expired { valid_until, now });
        }
        Ok(&h.verified)
    }

    /// The held consensus whatever the time (for display and diagnostics).
    pub fn held(&self) -> Option<&VerifiedConsensus> {
        self.held.as_ref().map(|h| &h.verified)
    }

    /// The held document as it was served (to pass on to others).
    pub fn held_signed(&self) -> Option<&SignedConsensus> {
        self.held.as_ref().map(|h| &h.signed)
    }

    /// Whether a newer document should be fetched: none is held, or the held one is past its
    /// fresh-until.
    pub fn needs_refresh(&self, now: UnixTime) -> bool {
        self.held
            .as_ref()
            .is_none_or(|h| now >= h.verified.consensus.fresh_until)
    }
}
