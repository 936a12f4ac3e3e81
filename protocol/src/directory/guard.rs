//! The client's guard: the gateway it keeps across restarts.
//!
//! A client that picked a fresh gateway at every start would, over many starts, hand its
//! traffic to every gateway in turn, and an adversary running a few of them would see it soon
//! (Tor keeps its entry guards for months for this reason). So the client keeps its gateway
//! while the consensus lists it, and replaces it only when it leaves the consensus (or the
//! client's preferences no longer allow it) or when its lifetime ends: a time drawn once, when
//! it is chosen, uniformly in [`GUARD_LIFETIME_MIN`, `GUARD_LIFETIME_MAX`], so that clients'
//! rotations do not line up.
//!
//! A guard that cannot be reached is not replaced: the client uses another gateway for the
//! rest of its run and tries its guard again at the next start. An adversary who can knock a
//! guard off the network (or a client off its guard) must not thereby move the client onto a
//! gateway of its choosing for good. The authorities' probers drop a guard that stays
//! unreachable from the consensus, and then it is replaced.

use rand::{Rng, RngExt};
use serde::{Deserialize, Serialize};

use super::path::PathSelector;
use super::{ConsensusRelay, IdentityKey, UnixTime};

const DAY: u64 = 24 * 60 * 60;
/// The shortest a guard is kept.
pub const GUARD_LIFETIME_MIN: u64 = 60 * DAY;
/// The longest a guard is kept.
pub const GUARD_LIFETIME_MAX: u64 = 90 * DAY;

/// A guard as the client stores it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Guard {
    /// The gateway's identity.
    pub identity: IdentityKey,
    /// When it was chosen.
    pub chosen_at: UnixTime,
    /// When it is replaced, listed or not.
    pub rotate_at: UnixTime,
}

impl Guard {
    /// `identity`, chosen at `now`, with a lifetime drawn from the guard lifetime range.
    pub fn new<R: Rng + ?Sized>(identity: IdentityKey, now: UnixTime, rng: &mut R) -> Guard {
        let lifetime = rng.random_range(GUARD_LIFETIME_MIN..=GUARD_LIFETIME_MAX);
        Guard {
            identity,
            chosen_at: now,
            rotate_at: now.saturating_add(lifetime),
        }
    }
}

/// Why the client uses the gateway it uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuardChoice {
    /// The stored guard, still listed and within its lifetime.
    Kept,
    /// No guard was stored: a new one.
    First,
    /// The stored guard's lifetime ended: a new one.
    Rotated,
    /// The stored guard is no longer a usable gateway in the consensus: a new one.
    Left,
    /// The stored guard failed during this run: another gateway for now, the guard kept.
    Fallback,
}

impl GuardChoice {
    /// A short stable label for logs and status.
    pub fn label(self) -> &'static str {
        match self {
            GuardChoice::Kept => "kept",
            GuardChoice::First => "first",
            GuardChoice::Rotated => "rotated",
            GuardChoice::Left => "left_consensus",
            GuardChoice::Fallback => "fallback",
        }
    }

    /// Whether the choice replaces the stored guard (and must be saved).
    pub fn replaces_guard(self) -> bool {
        matches!(
            self,
            GuardChoice::First | GuardChoice::Rotated | GuardChoice::Left
        )
    }
}

/// The gateway to use now: the stored guard while it is listed, within its lifetime and not
/// in `failed` (gateways that failed during this run), else a new one by the consensus'
/// weights among those not failed. Returns the gateway, the guard to store afterwards (the
/// old one on a fallback) and why. `None` when no gateway is left.
pub fn choose<'a, R: Rng + ?Sized>(
    selector: &PathSelector<'a>,
    stored: Option<Guard>,
    failed: &[IdentityKey],
    now: UnixTime,
    rng: &mut R,
) -> Option<(&'a ConsensusRelay, Option<Guard>, GuardChoice)> {
    let why_new = match stored {
        None => GuardChoice::First,
        Some(g) if now >= g.rotate_at => GuardChoice::Rotated,
        Some(g) => match selector.gateway(&g.identity) {
            None => GuardChoice::Left,
            Some(_) if failed.contains(&g.identity) => GuardChoice::Fallback,
            Some(relay) => return Some((relay, Some(g), GuardChoice::Kept)),
        },
    };
    let fresh = selector.clone().without_gateways(failed);
    let relay = fresh.choose_gateway(rng).ok()?;
    let guard = if why_new.replaces_guard() {
        Some(Guard::new(relay.identity, now, rng))
    } else {
        stored
    };
    Some((relay, guard, why_new))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::directory::path::PathRules;
    use crate::directory::synthetic;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const NOW: UnixTime = 1_800_000_000;

    fn consensus() -> crate::directory::Consensus {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let net = synthetic::SyntheticNetwork {
            mixes_per_layer: 2,
            gateways: 4,
            exits: 1,
            params: crate::directory::NetworkParams::nym_like(),
            epoch: 1,
        };
        synthetic::generate(&mut rng, &net).0
    }

    fn gateways(c: &crate::directory::Consensus) -> Vec<IdentityKey> {
        c.relays
            .iter()
            .filter(|r| r.roles.gateway)
            .map(|r| r.identity)
            .collect()
    }

    #[test]
    fn a_listed_guard_is_kept_for_its_lifetime_and_then_replaced() {
        let c = consensus();
        let s = PathSelector::new(&c, PathRules::default());
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let (first, guard, why) = choose(&s, None, &[], NOW, &mut rng).unwrap();
        assert_eq!(why, GuardChoice::First);
        let guard = guard.unwrap();
        assert_eq!(guard.identity, first.identity);
        let life = guard.rotate_at - guard.chosen_at;
        assert!((GUARD_LIFETIME_MIN..=GUARD_LIFETIME_MAX).contains(&life));
        // A thousand restarts within its lifetime keep it (a fresh pick would move among
        // four gateways).
        for i in 0..1000 {
            let (g, kept, why) = choose(&s, Some(guard), &[], NOW + i * 3600, &mut rng).unwrap();
            assert_eq!(
                (g.identity, kept, why),
                (guard.identity, Some(guard), GuardChoice::Kept)
            );
        }
        let (_, next, why) = choose(&s, Some(guard), &[], guard.rotate_at, &mut rng).unwrap();
        assert_eq!(why, GuardChoice::Rotated);
        assert_eq!(next.unwrap().chosen_at, guard.rotate_at);
    }

    #[test]
    fn a_guard_that_leaves_the_consensus_is_replaced_and_a_failed_one_only_for_the_run() {
        let c = consensus();
        let all = gateways(&c);
        assert!(all.len() >= 2);
        let s = PathSelector::new(&c, PathRules::default());
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let gone = Guard::new(IdentityKey([0xee; 32]), NOW, &mut rng);
        let (g, stored, why) = choose(&s, Some(gone), &[], NOW + 1, &mut rng).unwrap();
        assert_eq!(why, GuardChoice::Left);
        assert_eq!(stored.unwrap().identity, g.identity);

        let guard = Guard::new(all[0], NOW, &mut rng);
        for _ in 0..100 {
            let (g, stored, why) = choose(&s, Some(guard), &[all[0]], NOW + 1, &mut rng).unwrap();
            assert_eq!(why, GuardChoice::Fallback);
            assert_ne!(
                g.identity, all[0],
                "a failed guard is not used again this run"
            );
            assert_eq!(stored, Some(guard), "nor replaced");
        }
        assert!(choose(&s, Some(guard), &all, NOW + 1, &mut rng).is_none());
    }

    #[test]
    fn a_guard_the_preferences_no_longer_allow_is_replaced() {
        let mut c = consensus();
        let all = gateways(&c);
        for r in &mut c.relays {
            r.price_per_packet = if r.identity == all[0] { 100 } else { 1 };
        }
        let rules = PathRules {
            max_price_per_hop: Some(10),
            ..PathRules::default()
        };
        let s = PathSelector::new(&c, rules);
        let mut rng = ChaCha20Rng::seed_from_u64(4);
        let guard = Guard::new(all[0], NOW, &mut rng);
        let (g, _, why) = choose(&s, Some(guard), &[], NOW + 1, &mut rng).unwrap();
        assert_eq!(why, GuardChoice::Left);
        assert_ne!(g.identity, all[0]);
    }
}
