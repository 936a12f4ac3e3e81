//! Where the proxy's parts leave what the status view shows: the listeners, the consensus in
//! use, the current session and its gateway, the pot. [`Board::status`] reads them into a
//! [`Status`].

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use murmur_protocol::directory::guard::{Guard, GuardChoice};
use murmur_protocol::directory::{Consensus, IdentityKey};
use tokio::sync::watch;

use crate::driver::SessionHandle;
use crate::status::{
    ConsensusStatus, GatewayStatus, Listeners, PaymentStatus, RelayPayment, Status, StreamStatus,
    TrafficStatus,
};
use crate::stream::SocksStats;

/// The pot as the ledger last reported it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PotReport {
    /// The balance tickets may draw on (less what is warned for withdrawal).
    pub balance: u64,
    /// The largest face value it covers.
    pub face_cap: u64,
}

/// The gateway in use, and why.
#[derive(Clone, Debug)]
pub struct GatewayInUse {
    pub identity: IdentityKey,
    pub address: std::net::SocketAddr,
    pub choice: GuardChoice,
    /// The stored guard (`None` without a state directory... or before one was chosen).
    pub guard: Option<Guard>,
    pub connected: watch::Receiver<bool>,
}

/// The status view's sources.
pub struct Board {
    started: Instant,
    pub listeners: RwLock<Listeners>,
    pub socks: Arc<SocksStats>,
    pub consensus: RwLock<Option<Arc<Consensus>>>,
    pub session: RwLock<Option<SessionHandle>>,
    pub gateway: RwLock<Option<GatewayInUse>>,
    /// `None` until the ledger answered (or when the client does not pay).
    pub pot: RwLock<Option<PotReport>>,
    /// The pot's key, when the client pays.
    pub pot_key: Option<IdentityKey>,
    pub max_spend: Option<u64>,
}

impl Board {
    pub fn new(
        socks: Arc<SocksStats>,
        pot_key: Option<IdentityKey>,
        max_spend: Option<u64>,
    ) -> Self {
        Board {
            started: Instant::now(),
            listeners: RwLock::default(),
            socks,
            consensus: RwLock::default(),
            session: RwLock::default(),
            gateway: RwLock::default(),
            pot: RwLock::default(),
            pot_key,
            max_spend,
        }
    }

    /// The current session, if one runs.
    pub fn session(&self) -> Option<SessionHandle> {
        self.session.read().ok().and_then(|s| s.clone())
    }

    /// Everything at once, as of now.
    pub fn status(&self, now_unix: u64) -> Status {
        let session = self.session();
        let report = session.as_ref().map(|h| h.report()).unwrap_or_default();
        let driver = session.as_ref().map(|h| h.stats.clone());
        let load =
            |c: Option<&std::sync::atomic::AtomicU64>| c.map_or(0, |c| c.load(Ordering::Relaxed));
        let s = &report.stats;
        let gateway = self.gateway.read().ok().and_then(|g| {
            g.as_ref().map(|g| GatewayStatus {
                identity: g.identity.to_hex(),
                address: g.address.to_string(),
                connected: *g.connected.borrow(),
                choice: g.choice.label().to_owned(),
                guard_chosen_at: g.guard.map(|g| g.chosen_at),
                guard_rotates_at: g.guard.map(|g| g.rotate_at),
            })
        });
        let consensus = self.consensus.read().ok().and_then(|c| {
            c.as_ref().map(|c| ConsensusStatus {
                epoch: u64::from(c.epoch),
                valid_after: c.valid_after,
                fresh_until: c.fresh_until,
                valid_until: c.valid_until,
                valid: (c.valid_after..c.valid_until).contains(&now_unix),
                relays: c.relays.len(),
            })
        });
        let pot = self.pot.read().ok().and_then(|p| *p);
        let payments = self.pot_key.map(|key| {
            let payer = report.payer.clone().unwrap_or_default();
            PaymentStatus {
                pot: key.to_hex(),
                pot_balance: pot.map(|p| p.balance),
                pot_face_cap: pot.map(|p| p.face_cap),
                pot_estimate: if report.payer.is_some() {
                    payer.pot_usable
                } else {
                    pot.map_or(0, |p| p.balance)
                },
                spent: payer.stats.expected_value_issued,
                max_spend: self.max_spend,
                tickets: payer.stats.tickets_issued,
                gateway_tickets: payer.stats.gateway_tickets_issued,
                unpayable: payer.stats.unpayable,
                relays: payer
                    .accounts
                    .iter()
                    .map(|(identity, a)| RelayPayment {
                        identity: identity.to_hex(),
                        packets: a.packets,
                        paid: u64::try_from(a.issued).unwrap_or(u64::MAX),
                        owed: a.owed(),
                        tickets: a.tickets,
                    })
                    .collect(),
            }
        });
        let refusing_new_streams = match (&payments, self.max_spend) {
            (Some(p), Some(cap)) if p.spent >= cap => Some(format!(
                "the spending cap is reached: tickets worth {} have been signed, the cap is \
                 {cap} (max_spend)",
                p.spent
            )),
            _ => None,
        };
        let listeners = self.listeners.read().map(|l| l.clone()).unwrap_or_default();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.started.elapsed().as_secs(),
            listeners,
            gateway,
            consensus,
            streams: StreamStatus {
                open: report.size.streams,
                accepted: self.socks.accepted.load(Ordering::Relaxed),
                opened: self.socks.opened.load(Ordering::Relaxed),
                refused_handshake: self.socks.refused_handshake.load(Ordering::Relaxed),
                refused_by_exit: self.socks.refused_by_exit.load(Ordering::Relaxed),
                over_limit: self.socks.over_limit.load(Ordering::Relaxed),
                refused_spend: s.opens_refused_spend,
                failed: s.streams_unacknowledged
                    + s.streams_no_path
                    + s.streams_exit_left
                    + s.streams_bug,
                http_accepted: self.socks.http_accepted.load(Ordering::Relaxed),
                http_refused: self.socks.http_refused_not_connect.load(Ordering::Relaxed)
                    + self.socks.http_refused_malformed.load(Ordering::Relaxed)
                    + self.socks.http_refused_too_large.load(Ordering::Relaxed),
                ip_literal_targets: self.socks.ip_literal_targets.load(Ordering::Relaxed),
                ip_literal_refused: self.socks.ip_literal_refused.load(Ordering::Relaxed),
            },
            traffic: TrafficStatus {
                real_sent: s.real_sent,
                cover_sent: s.cover_sent,
                cover_unbuilt: s.cover_unbuilt,
                loops_sent: s.loops_sent,
                loops_returned: s.loops_returned,
                loops_missing: s.loops_missing,
                retransmits: s.retransmits,
                unacknowledged_sent: s.unacknowledged_sent,
                replies: s.replies,
                acks: s.acks,
                frames_dropped: load(driver.as_ref().map(|d| &d.frames_dropped)),
                gateway_connect_failures: load(
                    driver.as_ref().map(|d| &d.gateway_connect_failures),
                ),
                ticks_missed: report.pacer.map_or(0, |p| p.missed),
                loops_as_drops: report.pacer.map_or(0, |p| p.loops_as_drops),
                reply_blocks_sent: s.reply_blocks_sent,
                reply_blocks_prebuilt: s.reply_blocks_prebuilt,
                prebuilt_blocks_discarded: s.prebuilt_blocks_discarded,
                packets_built_by_workers: load(driver.as_ref().map(|d| &d.builders.packets_built)),
                packets_unbuilt: load(driver.as_ref().map(|d| &d.builders.packets_unbuilt)),
                deliveries_dropped: load(driver.as_ref().map(|d| &d.deliveries_dropped)),
                dropped_deliveries_paid: s.dropped_deliveries_paid,
                deliveries_dropped_unpaid: load(
                    driver.as_ref().map(|d| &d.deliveries_dropped_unpaid),
                ),
            },
            payments,
            refusing_new_streams,
            send_timing: report.send_timing,
        }
    }
}
