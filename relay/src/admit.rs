//! Admission for the relay's listeners (relay links and the gateway's client port).
//!
//! A fresh TCP connection first takes a *handshake* slot (capped per address and in total)
//! and must finish its handshake within a deadline; only then does it take an *established*
//! slot. Idle or half-open sockets therefore fill at most the handshake pool, for at most the
//! deadline, and never the slots of relays and clients that proved their keys. Every refusal is
//! counted under `murmur_relay_connections_refused_total{listener, reason}`.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use murmur_protocol::admission::{Admission, Limits, Slot};

use crate::metrics as m;

/// The limits of one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateLimits {
    /// Connections still in their handshake.
    pub handshake: Limits,
    /// Connections that finished it.
    pub established: Limits,
    /// How long a handshake may take, from accept to the last handshake message.
    pub handshake_timeout: Duration,
}

/// One listener's two pools.
#[derive(Clone, Debug)]
pub struct Gate {
    listener: &'static str,
    handshake: Admission,
    established: Admission,
    handshake_timeout: Duration,
}

/// Counts a refused or failed connection on `listener`.
pub fn refuse(listener: &'static str, reason: &'static str) {
    metrics::counter!(m::CONNECTIONS_REFUSED, "listener" => listener, "reason" => reason)
        .increment(1);
}

impl Gate {
    /// A gate for the listener named `listener` in metrics (`mix`, `client`).
    pub fn new(listener: &'static str, limits: GateLimits) -> Gate {
        Gate {
            listener,
            handshake: Admission::new(limits.handshake),
            established: Admission::new(limits.established),
            handshake_timeout: limits.handshake_timeout,
        }
    }

    /// Takes a handshake slot for a connection just accepted from `peer`, or counts why not
    /// (the caller then drops the socket, which closes it).
    pub fn admit(&self, peer: SocketAddr) -> Option<Slot> {
        match self.handshake.try_admit(peer.ip()) {
            Ok(slot) => Some(slot),
            Err(r) => {
                refuse(
                    self.listener,
                    match r {
                        murmur_protocol::admission::Refused::Total => "handshake_total_limit",
                        murmur_protocol::admission::Refused::PerAddress => {
                            "handshake_per_address_limit"
                        }
                    },
                );
                None
            }
        }
    }

    /// Runs `handshake` for the connection holding `pending` under the deadline. On success the
    /// handshake slot is given back and an established slot taken; a failure, a timeout or a
    /// full established pool is counted (the failure under the reason the handshake returned).
    pub async fn handshake<T>(
        &self,
        peer: SocketAddr,
        pending: Slot,
        handshake: impl Future<Output = Result<T, &'static str>>,
    ) -> Option<(T, Slot)> {
        let result = tokio::time::timeout(self.handshake_timeout, handshake).await;
        drop(pending);
        let done = match result {
            Ok(Ok(done)) => done,
            Ok(Err(reason)) => {
                refuse(self.listener, reason);
                return None;
            }
            Err(_) => {
                refuse(self.listener, "handshake_timeout");
                return None;
            }
        };
        match self.established.try_admit(peer.ip()) {
            Ok(slot) => {
                metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => self.listener)
                    .set(self.established.in_use() as f64);
                Some((done, slot))
            }
            Err(r) => {
                refuse(
                    self.listener,
                    match r {
                        murmur_protocol::admission::Refused::Total => "established_total_limit",
                        murmur_protocol::admission::Refused::PerAddress => {
                            "established_per_address_limit"
                        }
                    },
                );
                None
            }
        }
    }

    /// Gives back the established slot of a connection that ended, and updates the gauge.
    pub fn closed(&self, established: Slot) {
        drop(established);
        metrics::gauge!(m::CONNECTIONS_OPEN, "listener" => self.listener)
            .set(self.established.in_use() as f64);
    }

    /// Established connections now.
    pub fn established(&self) -> usize {
        self.established.in_use()
    }

    /// Connections in their handshake now.
    pub fn handshaking(&self) -> usize {
        self.handshake.in_use()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(handshake_timeout: Duration) -> Gate {
        Gate::new(
            "test",
            GateLimits {
                handshake: Limits {
                    total: 4,
                    per_address: 2,
                },
                established: Limits {
                    total: 1,
                    per_address: 1,
                },
                handshake_timeout,
            },
        )
    }

    fn peer(last: u8) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], 4000))
    }

    #[tokio::test]
    async fn a_slow_handshake_times_out_and_frees_its_slot() {
        let g = gate(Duration::from_millis(20));
        let slot = g.admit(peer(2)).unwrap();
        assert_eq!(g.handshaking(), 1);
        let r = g
            .handshake(peer(2), slot, std::future::pending::<Result<(), &str>>())
            .await;
        assert!(r.is_none());
        assert_eq!(g.handshaking(), 0);
        assert_eq!(g.established(), 0);
    }

    #[tokio::test]
    async fn slots_move_from_handshake_to_established_and_both_caps_hold() {
        let g = gate(Duration::from_secs(1));
        let a = g.admit(peer(2)).unwrap();
        let _b = g.admit(peer(2)).unwrap();
        assert!(g.admit(peer(2)).is_none(), "per-address handshake cap");
        let (_, est) = g.handshake(peer(2), a, async { Ok(()) }).await.unwrap();
        assert_eq!((g.handshaking(), g.established()), (1, 1));
        let c = g.admit(peer(3)).unwrap();
        assert!(
            g.handshake(peer(3), c, async { Ok(()) }).await.is_none(),
            "established cap"
        );
        drop(est);
        let d = g.admit(peer(3)).unwrap();
        assert!(g.handshake(peer(3), d, async { Ok(()) }).await.is_some());
    }
}
