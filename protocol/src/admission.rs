//! Connection admission: a total cap and a per-address cap, held by RAII slots.
//!
//! Every listener keeps two of these: one for connections still in their handshake (cheap for
//! anyone to open, so capped per address and in total, and bounded in time by the caller) and
//! one for connections that finished it. A connection takes an established slot only after its
//! handshake, so idle or half-open sockets can fill at most the handshake pool, never the slots
//! of clients and relays that proved their keys.
//!
//! Addresses are grouped the way one party usually holds them: an IPv4 address alone, an IPv6
//! address by its /64 (one host gets a whole /64), and IPv4-mapped IPv6 as the IPv4 address.
//! Sans-IO: no sockets, no clock; the caller times out handshakes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};

/// How many connections may be held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// In all.
    pub total: usize,
    /// From one address (an IPv4 address or an IPv6 /64).
    pub per_address: usize,
}

/// Why a connection was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Every slot is taken.
    Total,
    /// The address holds its share already.
    PerAddress,
}

impl Refused {
    /// A stable metric label.
    pub fn label(self) -> &'static str {
        match self {
            Refused::Total => "total_limit",
            Refused::PerAddress => "per_address_limit",
        }
    }
}

#[derive(Debug, Default)]
struct Held {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
}

/// A pool of connection slots. Cloning shares the pool.
#[derive(Clone, Debug)]
pub struct Admission {
    limits: Limits,
    held: Arc<Mutex<Held>>,
}

/// One admitted connection; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    held: Arc<Mutex<Held>>,
    group: IpAddr,
}

/// The group an address counts against.
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

fn lock(m: &Mutex<Held>) -> MutexGuard<'_, Held> {
    // A panic while holding this lock leaves counts that are still consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            held: Arc::new(Mutex::new(Held::default())),
        }
    }

    /// The limits this pool enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Takes a slot for a connection from `ip`, or says why not.
    pub fn try_admit(&self, ip: IpAddr) -> Result<Slot, Refused> {
        let group = address_group(ip);
        let mut held = lock(&self.held);
        if held.total >= self.limits.total {
            return Err(Refused::Total);
        }
        let from = held.by_address.get(&group).copied().unwrap_or(0);
        if from >= self.limits.per_address {
            return Err(Refused::PerAddress);
        }
        held.total += 1;
        held.by_address.insert(group, from + 1);
        Ok(Slot {
            held: self.held.clone(),
            group,
        })
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        lock(&self.held).total
    }

    /// Slots in use by `ip`'s group.
    pub fn in_use_by(&self, ip: IpAddr) -> usize {
        lock(&self.held)
            .by_address
            .get(&address_group(ip))
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        held.total = held.total.saturating_sub(1);
        if let Some(n) = held.by_address.get_mut(&self.group) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.by_address.remove(&self.group);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn caps_hold_per_address_and_in_total_and_slots_come_back() {
        let a = Admission::new(Limits {
            total: 3,
            per_address: 2,
        });
        let s1 = a.try_admit(ip("127.0.0.2")).unwrap();
        let _s2 = a.try_admit(ip("127.0.0.2")).unwrap();
        assert_eq!(
            a.try_admit(ip("127.0.0.2")).unwrap_err(),
            Refused::PerAddress
        );
        let _s3 = a.try_admit(ip("127.0.0.3")).unwrap();
        assert_eq!(a.try_admit(ip("127.0.0.4")).unwrap_err(), Refused::Total);
        drop(s1);
        assert_eq!(a.in_use(), 2);
        assert!(a.try_admit(ip("127.0.0.2")).is_ok());
    }

    #[test]
    fn an_ipv6_slash_64_is_one_address_and_mapped_ipv4_is_ipv4() {
        let a = Admission::new(Limits {
            total: 10,
            per_address: 1,
        });
        let _s = a.try_admit(ip("2001:db8:1:2::1")).unwrap();
        assert_eq!(
            a.try_admit(ip("2001:db8:1:2:ffff::9")).unwrap_err(),
            Refused::PerAddress
        );
        assert!(a.try_admit(ip("2001:db8:1:3::1")).is_ok());
        let _v4 = a.try_admit(ip("192.0.2.1")).unwrap();
        assert_eq!(
            a.try_admit(ip("::ffff:192.0.2.1")).unwrap_err(),
            Refused::PerAddress
        );
    }

    proptest! {
        /// Under any sequence of admissions and releases the counts match the slots alive,
        /// and neither cap is ever exceeded.
        #[test]
        fn counts_match_live_slots(ops in proptest::collection::vec((0u8..4, any::<bool>()), 0..200)) {
            let limits = Limits { total: 5, per_address: 2 };
            let a = Admission::new(limits);
            let mut live: Vec<(u8, Slot)> = Vec::new();
            for (who, release) in ops {
                if release && !live.is_empty() {
                    live.remove(usize::from(who) % live.len());
                } else if let Ok(s) = a.try_admit(IpAddr::from([127, 0, 0, who])) {
                    live.push((who, s));
                }
                prop_assert_eq!(a.in_use(), live.len());
                prop_assert!(live.len() <= limits.total);
                for w in 0..4u8 {
                    let n = live.iter().filter(|(x, _)| *x == w).count();
                    prop_assert!(n <= limits.per_address);
                    prop_assert_eq!(a.in_use_by(IpAddr::from([127, 0, 0, w])), n);
                }
            }
        }
    }
}
