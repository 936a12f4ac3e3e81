//! Request rate limits: one token bucket per signer key (checked once the request's signature
//! is verified, so nobody can spend another key's budget) and one for all write transactions
//! together (the single writer, and its fsync, are what a flood would stall).
//!
//! A fresh key's first requests are as cheap for it as for the ledger, so the per-key bound
//! alone does not stop a flood of fresh keys; what does is that their requests are refused
//! before any write transaction (see [`crate::ledger`]) and, once they would write, the
//! total bucket.

use std::sync::Mutex;
use std::time::Instant;

use murmur_protocol::directory::IdentityKey;
use murmur_service::rate::{Bucket, KeyedBuckets};

/// The bounds (from the config's `[limits]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    /// Signed requests per second from one key, on average.
    pub per_key_per_second: u32,
    /// Signed requests one key may send at once.
    pub per_key_burst: u32,
    /// Write transactions per second in all, on average.
    pub writes_per_second: u32,
    /// Write transactions at once.
    pub write_burst: u32,
    /// Keys whose buckets are tracked at once; a key whose bucket is full again is forgotten
    /// first.
    pub max_tracked_keys: usize,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            per_key_per_second: 20,
            per_key_burst: 40,
            writes_per_second: 500,
            write_burst: 1000,
            max_tracked_keys: 65_536,
        }
    }
}

impl RateLimits {
    /// Problems with the values, named.
    pub fn check(&self) -> Result<(), String> {
        for (name, v) in [
            ("per_key_per_second", self.per_key_per_second),
            ("per_key_burst", self.per_key_burst),
            ("writes_per_second", self.writes_per_second),
            ("write_burst", self.write_burst),
        ] {
            if v == 0 {
                return Err(format!("limits.{name} must be positive"));
            }
        }
        if self.max_tracked_keys == 0 {
            return Err("limits.max_tracked_keys must be positive".into());
        }
        Ok(())
    }
}

struct State {
    keys: KeyedBuckets<IdentityKey>,
    writes: Bucket,
}

/// The ledger's rate limiter.
pub(crate) struct Guard {
    limits: RateLimits,
    state: Mutex<State>,
}

impl std::fmt::Debug for Guard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guard")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl Guard {
    pub(crate) fn new(limits: RateLimits) -> Guard {
        Guard {
            limits,
            state: Mutex::new(State {
                keys: KeyedBuckets::new(
                    f64::from(limits.per_key_per_second),
                    f64::from(limits.per_key_burst),
                    limits.max_tracked_keys,
                ),
                writes: Bucket::full(f64::from(limits.write_burst), Instant::now()),
            }),
        }
    }

    /// Whether `key` may make another request at `now` (it spends a token if so). When
    /// every tracked key is busy a fresh key is let through untracked: the write bucket still
    /// bounds what it can do.
    pub(crate) fn allow_key(&self, key: &IdentityKey, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.keys.allow(key, now)
    }

    /// Whether another write transaction may start at `now` (it spends a token if so).
    pub(crate) fn allow_write(&self, now: Instant) -> bool {
        let l = self.limits;
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.writes.take(
            f64::from(l.writes_per_second),
            f64::from(l.write_burst),
            now,
        )
    }

    /// Keys tracked now.
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys
            .tracked()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn key(i: u32) -> IdentityKey {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        IdentityKey(k)
    }

    #[test]
    fn buckets_refill_at_their_rate_and_stay_bounded() {
        let guard = Guard::new(RateLimits {
            per_key_per_second: 10,
            per_key_burst: 3,
            writes_per_second: 100,
            write_burst: 5,
            max_tracked_keys: 4,
        });
        let t0 = Instant::now();
        let a = key(1);
        assert!((0..3).all(|_| guard.allow_key(&a, t0)));
        assert!(!guard.allow_key(&a, t0), "the burst is spent");
        assert!(
            guard.allow_key(&key(2), t0),
            "another key has its own bucket"
        );
        assert!(
            guard.allow_key(&a, t0 + Duration::from_millis(100)),
            "refilled"
        );
        assert!((0..5).all(|_| guard.allow_write(t0)));
        assert!(!guard.allow_write(t0));
        assert!(guard.allow_write(t0 + Duration::from_millis(10)));
        // A flood of fresh keys: tracked keys never pass the bound; full buckets are
        // forgotten to make room.
        for i in 10..1000 {
            guard.allow_key(&key(i), t0 + Duration::from_millis(u64::from(i)));
            assert!(guard.tracked() <= 4);
        }
    }
}
