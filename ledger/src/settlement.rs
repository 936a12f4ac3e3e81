//! The settlement interface relays and clients program against.
//!
//! It is async because every implementation but the embedded one is remote: the
//! [`LedgerClient`](crate::client::LedgerClient) speaks HTTP to a `murmur-ledger`, and a
//! blockchain contract would submit transactions and wait for them. The embedded `Ledger`
//! (the `server` feature) is synchronous (redb blocks on disk) and runs each call on tokio's blocking pool, so a
//! relay's event loop never waits on an fsync.
//!
//! Operations that move money take a [`Signed`] request: the implementation checks the
//! signature (a contract would check the transaction's signer instead) and refuses with a
//! [`Refusal`](crate::Refusal) that leaves every balance as it was.

use std::future::Future;

use murmur_protocol::directory::IdentityKey;

use crate::Result;
#[cfg(feature = "server")]
use crate::ledger::{Apply, Ledger};
use crate::records::{Account, Pot, Redemption, Transfer};
use crate::request::{Fund, Redeem, Signed, Warn, Withdraw};
#[cfg(feature = "server")]
use crate::{Error, unix_now};

/// Redemptions [`Settlement::redeem_all`] has in flight at once by default.
pub const REDEEM_CONCURRENCY: usize = 8;

/// Pots, accounts and the redemption of winning tickets.
pub trait Settlement: Send + Sync {
    /// Moves `balance + escrow` from the signer's account into a pot.
    fn fund(&self, req: Signed<Fund>) -> impl Future<Output = Result<Transfer>> + Send;
    /// Starts the notice period for withdrawing an amount from the signer's pot.
    fn warn(&self, req: Signed<Warn>) -> impl Future<Output = Result<Pot>> + Send;
    /// After the notice, moves warned money from the signer's pot to the signer's account.
    fn withdraw(&self, req: Signed<Withdraw>) -> impl Future<Output = Result<Transfer>> + Send;
    /// Pays a winning ticket to its recipient (the signer), at most once.
    fn redeem(&self, req: Signed<Redeem>) -> impl Future<Output = Result<Redemption>> + Send;
    /// Pays several winning tickets, each as [`Settlement::redeem`] would: one result per
    /// request, in order. A settlement that can pay them together overrides it (the chain's
    /// `redeemBatch`: one transaction and one transfer for a batch, about half the gas of
    /// one by one); the default sends them [`REDEEM_CONCURRENCY`] at a time.
    fn redeem_all(
        &self,
        reqs: Vec<Signed<Redeem>>,
    ) -> impl Future<Output = Vec<Result<Redemption>>> + Send {
        async move {
            let mut results = Vec::with_capacity(reqs.len());
            let mut reqs = reqs.into_iter().peekable();
            while reqs.peek().is_some() {
                let chunk = reqs
                    .by_ref()
                    .take(REDEEM_CONCURRENCY)
                    .map(|r| self.redeem(r));
                results.extend(futures_util::future::join_all(chunk).await);
            }
            results
        }
    }
    /// A pot's state ([`Refusal::UnknownPot`](crate::Refusal::UnknownPot) if none).
    fn pot(&self, key: IdentityKey) -> impl Future<Output = Result<Pot>> + Send;
    /// An account's balance (0 for a key never seen).
    fn account(&self, key: IdentityKey) -> impl Future<Output = Result<Account>> + Send;
}

/// A shared settlement settles as the one it shares (a relay's redeemer and pot refresher
/// hold one chain connection between them).
impl<S: Settlement> Settlement for std::sync::Arc<S> {
    fn fund(&self, req: Signed<Fund>) -> impl Future<Output = Result<Transfer>> + Send {
        S::fund(self, req)
    }
    fn warn(&self, req: Signed<Warn>) -> impl Future<Output = Result<Pot>> + Send {
        S::warn(self, req)
    }
    fn withdraw(&self, req: Signed<Withdraw>) -> impl Future<Output = Result<Transfer>> + Send {
        S::withdraw(self, req)
    }
    fn redeem(&self, req: Signed<Redeem>) -> impl Future<Output = Result<Redemption>> + Send {
        S::redeem(self, req)
    }
    fn redeem_all(
        &self,
        reqs: Vec<Signed<Redeem>>,
    ) -> impl Future<Output = Vec<Result<Redemption>>> + Send {
        S::redeem_all(self, reqs)
    }
    fn pot(&self, key: IdentityKey) -> impl Future<Output = Result<Pot>> + Send {
        S::pot(self, key)
    }
    fn account(&self, key: IdentityKey) -> impl Future<Output = Result<Account>> + Send {
        S::account(self, key)
    }
}

#[cfg(feature = "server")]
impl Ledger {
    /// Runs `f` on the blocking pool.
    pub(crate) async fn blocking<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Ledger) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let ledger = self.clone();
        tokio::task::spawn_blocking(move || f(&ledger))
            .await
            .map_err(|e| Error::Storage(format!("ledger task failed: {e}")))?
    }

    /// Applies a signed operation at the current time, on the blocking pool.
    pub(crate) async fn apply_now<T: Apply>(&self, req: Signed<T>) -> Result<T::Output> {
        self.blocking(move |l| l.apply(&req, unix_now())).await
    }
}

#[cfg(feature = "server")]
impl Settlement for Ledger {
    async fn fund(&self, req: Signed<Fund>) -> Result<Transfer> {
        self.apply_now(req).await
    }

    async fn warn(&self, req: Signed<Warn>) -> Result<Pot> {
        self.apply_now(req).await
    }

    async fn withdraw(&self, req: Signed<Withdraw>) -> Result<Transfer> {
        self.apply_now(req).await
    }

    async fn redeem(&self, req: Signed<Redeem>) -> Result<Redemption> {
        self.apply_now(req).await
    }

    async fn pot(&self, key: IdentityKey) -> Result<Pot> {
        self.blocking(move |l| l.read_pot(&key)).await
    }

    async fn account(&self, key: IdentityKey) -> Result<Account> {
        self.blocking(move |l| l.read_account(&key)).await
    }
}
