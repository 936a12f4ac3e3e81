//! Token buckets, one per key, in a bounded map: the rate limits of the authority's uploads
//! (keyed by source address) and of the ledger's signed requests (keyed by signer).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// One token bucket.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding `burst` tokens at `now`.
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }

    /// Takes a token if there is one, refilling at `rate` per second up to `burst` first.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        self.refill(rate, burst, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// A bucket per key, at most `max_keys` tracked at once.
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Clone> KeyedBuckets<K> {
    /// `rate` tokens per second per key, at most `burst` at once.
    pub fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        KeyedBuckets {
            rate,
            burst,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Whether `key` may act at `now` (spending a token if so). When the map is full, keys
    /// whose buckets are full again are forgotten first (they carry no history); if every
    /// tracked key is busy, an untracked key is let through: the caller's other bounds must
    /// hold without this one.
    pub fn allow(&mut self, key: &K, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| {
                b.refill(rate, burst, now);
                b.tokens < burst
            });
            if self.buckets.len() >= self.max_keys {
                return true;
            }
        }
        self.buckets
            .entry(key.clone())
            .or_insert_with(|| Bucket::full(burst, now))
            .take(rate, burst, now)
    }

    /// Keys tracked now.
    pub fn tracked(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn each_key_gets_its_burst_then_its_rate_and_the_map_stays_bounded() {
        let mut b = KeyedBuckets::new(10.0, 3.0, 4);
        let t0 = Instant::now();
        assert!((0..3).all(|_| b.allow(&1u32, t0)));
        assert!(!b.allow(&1, t0), "the burst is spent");
        assert!(b.allow(&2, t0), "another key has its own bucket");
        assert!(b.allow(&1, t0 + Duration::from_millis(100)), "refilled");
        for i in 10..1000u32 {
            b.allow(&i, t0 + Duration::from_millis(u64::from(i)));
            assert!(b.tracked() <= 4);
        }
    }
}
