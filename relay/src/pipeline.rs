//! Sphinx processing off the async reactor.
//!
//! ```text
//! links ──try_send──▶ [input: bounded] ──▶ workers (one thread per core)
//!     murmur_protocol::hop::process: open (DH + MAC) → replay check-and-insert
//!     → process (blind + Lioness) → peel the payment envelope (keyed by the replay tag)
//!     → accept this hop's ticket
//!   ──▶ [processed: bounded] ──▶ flusher thread: replay tags to disk (one fsync per batch),
//!       then winning tickets to the payments store (one transaction per batch)
//!   ──▶ [released: bounded] ──▶ router (async): hold for the delay, forward or deliver
//! ```
//! Every queue is bounded; a full queue drops the packet and counts the reason.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use murmur_protocol::directory::Epoch;
use murmur_protocol::envelope::Envelope;
use murmur_protocol::hop::{self, Action, HopKey, Payee};
use murmur_protocol::packet::{Address, FinalDelivery, Packet, ReplayTag};
use murmur_protocol::ticket::Ticket;

use crate::config::UnpaidPolicy;
use crate::keys::KeyRing;
use crate::metrics::{self as m, drop_packet};
use crate::payments::{Payments, TicketSignatures};

/// A packet read off a relay link, waiting for a worker.
pub struct Inbound {
    pub key_epoch: Epoch,
    pub packet: Packet,
    pub envelope: Envelope,
    pub received: Instant,
}

/// What a worker made of a packet.
pub enum Processed {
    /// Hold until `release_at`, then send to `next_hop`.
    Forward {
        next_hop: Address,
        key_epoch: Epoch,
        packet: Packet,
        /// The payment envelope with this hop's layer peeled.
        envelope: Envelope,
        received: Instant,
        release_at: Instant,
    },
    /// This relay is the packet's last hop.
    Final {
        key_epoch: Epoch,
        delivery: FinalDelivery,
        received: Instant,
    },
}

/// Pipeline bounds.
#[derive(Clone, Copy, Debug)]
pub struct PipelineConfig {
    pub workers: usize,
    pub input_queue: usize,
    pub max_hop_delay: Duration,
}

/// The running worker pool and flusher.
pub struct Pipeline {
    input: Sender<Inbound>,
    threads: Vec<JoinHandle<()>>,
}

impl Pipeline {
    /// Starts the workers and the flusher; released packets go to `release`. With
    /// `payments`, the flusher makes winning tickets durable before it releases a batch.
    pub fn start(
        config: PipelineConfig,
        keys: Arc<KeyRing>,
        payments: Option<Arc<Payments>>,
        release: tokio::sync::mpsc::Sender<Processed>,
    ) -> std::io::Result<Pipeline> {
        let (input, input_rx) = crossbeam_channel::bounded::<Inbound>(config.input_queue);
        let (processed_tx, processed_rx) =
            crossbeam_channel::bounded::<Processed>(config.input_queue);
        let workers = if config.workers == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.workers
        };
        let mut threads = Vec::new();
        for i in 0..workers {
            let rx = input_rx.clone();
            let tx = processed_tx.clone();
            let keys = keys.clone();
            let payments = payments.clone();
            let max_delay = config.max_hop_delay;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("sphinx-{i}"))
                    .spawn(move || worker(rx, tx, keys, payments, max_delay))?,
            );
        }
        drop(processed_tx);
        // The flusher only looks at the input queue's length (to tell a saturated relay).
        let backlog = input_rx;
        threads.push(
            std::thread::Builder::new()
                .name("replay-flusher".into())
                .spawn(move || flusher(processed_rx, backlog, keys, payments, release))?,
        );
        Ok(Pipeline { input, threads })
    }

    /// A handle for link readers to submit packets.
    pub fn submitter(&self) -> Submitter {
        Submitter {
            input: self.input.clone(),
        }
    }

    /// Stops accepting packets and waits for the threads to finish what they hold.
    pub fn shutdown(self) {
        drop(self.input);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Submits packets to the pipeline without blocking.
#[derive(Clone)]
pub struct Submitter {
    input: Sender<Inbound>,
}

#[cfg(test)]
impl Submitter {
    /// A submitter whose packets go to the returned receiver (link tests).
    pub(crate) fn for_test(capacity: usize) -> (Submitter, Receiver<Inbound>) {
        let (input, rx) = crossbeam_channel::bounded(capacity);
        (Submitter { input }, rx)
    }
}

impl Submitter {
    /// If the queue is full, counts a packet that arrived and was dropped for it, and says so:
    /// a link reader then skips decoding a frame that would only be dropped.
    pub fn drop_if_full(&self) -> bool {
        if !self.input.is_full() {
            return false;
        }
        metrics::counter!(m::PACKETS_IN).increment(1);
        drop_packet("input_queue_full");
        true
    }

    /// Queues a packet; a full queue drops it (counted).
    pub fn submit(&self, inbound: Inbound) {
        metrics::counter!(m::PACKETS_IN).increment(1);
        match self.input.try_send(inbound) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => drop_packet("input_queue_full"),
            Err(TrySendError::Disconnected(_)) => drop_packet("shutting_down"),
        }
        metrics::gauge!(m::QUEUE_DEPTH, "queue" => "input").set(self.input.len() as f64);
    }
}

/// One worker: the hop's step ([`hop::process`]: Sphinx, the replay check, the payment
/// envelope), then this hop's ticket.
fn worker(
    rx: Receiver<Inbound>,
    tx: Sender<Processed>,
    keys: Arc<KeyRing>,
    payments: Option<Arc<Payments>>,
    max_delay: Duration,
) {
    for inbound in rx.iter() {
        let Some(key) = keys.get(inbound.key_epoch) else {
            drop_packet("unknown_epoch");
            continue;
        };
        let hop_key = HopKey {
            sphinx: key.secret(),
            max_delay,
        };
        // The key's tag set is shared by the workers (behind its lock) and made durable by
        // the flusher before the packet leaves.
        let mut seen = |tag: &ReplayTag| key.check_and_insert(tag);
        let processed = match hop::process(hop_key, &inbound.packet, inbound.envelope, &mut seen) {
            Ok(p) => p,
            Err(e) => {
                drop_packet(e.label());
                continue;
            }
        };
        let ticket = payments.as_ref().and_then(|p| {
            let signatures = processed.slot.as_ref().map(TicketSignatures::of_slot)?;
            let ticket = processed.ticket(&Payee {
                identity: p.params().me,
                commitment: key.payment_commitment(),
            })?;
            Some((ticket, signatures))
        });
        let out = match processed.action {
            Action::Forward {
                next_hop,
                delay,
                delay_clamped,
                packet,
                envelope,
            } => {
                if delay_clamped {
                    metrics::counter!(m::DELAY_CLAMPED).increment(1);
                }
                Processed::Forward {
                    next_hop,
                    key_epoch: inbound.key_epoch,
                    packet,
                    envelope,
                    received: inbound.received,
                    release_at: inbound.received + delay,
                }
            }
            Action::Deliver(delivery) => Processed::Final {
                key_epoch: inbound.key_epoch,
                delivery,
                received: inbound.received,
            },
        };
        if let Some(payments) = &payments
            && !pays(payments, inbound.key_epoch, ticket)
        {
            continue;
        }
        // Blocking here is bounded by the flusher's pace; it never waits on the network.
        if tx.send(out).is_err() {
            return;
        }
    }
}

/// Checks this hop's ticket, if the packet carries one; whether the packet may go on.
///
/// A packet without a ticket always may: a client pays each relay with one ticket per
/// `packets_per_ticket` packets, worth all of them, and a mix cannot tell whose packets the
/// others are (the per-client limit is the gateway's tab). Under [`UnpaidPolicy::Drop`] a
/// packet whose ticket is refused (forged, expired, spent, from an empty pot...) is dropped.
fn pays(payments: &Payments, epoch: Epoch, ticket: Option<(Ticket, TicketSignatures)>) -> bool {
    let Some((ticket, signatures)) = ticket else {
        metrics::counter!(m::PACKETS_UNPAID, "reason" => "no_ticket").increment(1);
        return true;
    };
    match payments.accept_signed(&ticket, signatures, epoch, murmur_ledger::unix_now()) {
        Ok(_) => true,
        Err(_) => {
            metrics::counter!(m::PACKETS_UNPAID, "reason" => "ticket_refused").increment(1);
            if payments.unpaid_policy() == UnpaidPolicy::Drop {
                drop_packet("ticket_refused");
                false
            } else {
                true
            }
        }
    }
}

/// Group commit when saturated: while at least `SATURATED` packets wait for a worker, the
/// flusher lets a batch grow to `BATCH_TARGET` packets for at most `BATCH_LINGER` before it
/// syncs. Those packets already wait longer than that in the input queue, and one fsync (and
/// one wake-up of the router and links downstream) then serves many packets instead of a few.
/// A relay that is not saturated syncs at once and adds no latency.
const SATURATED: usize = 64;
const BATCH_TARGET: usize = 64;
const BATCH_LINGER: Duration = Duration::from_millis(5);
const BATCH_LINGER_STEP: Duration = Duration::from_millis(1);
const MAX_BATCH: usize = 1024;

/// Collects processed packets, makes their replay tags and winning tickets durable, then
/// releases them.
fn flusher(
    rx: Receiver<Processed>,
    backlog: Receiver<Inbound>,
    keys: Arc<KeyRing>,
    payments: Option<Arc<Payments>>,
    release: tokio::sync::mpsc::Sender<Processed>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let drain = |batch: &mut Vec<Processed>| {
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
    };
    loop {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(p) => batch.push(p),
            Err(RecvTimeoutError::Timeout) => {
                // Winners accepted outside the pipeline (a gateway's clients' tickets) are
                // made durable here too, not only when the next packet comes.
                if let Some(Err(e)) = payments.as_ref().map(|p| p.flush()) {
                    tracing::error!(error = %e, "cannot store winning tickets; will retry");
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
        drain(&mut batch);
        let deadline = Instant::now() + BATCH_LINGER;
        while batch.len() < BATCH_TARGET && backlog.len() >= SATURATED && Instant::now() < deadline
        {
            std::thread::sleep(BATCH_LINGER_STEP);
            drain(&mut batch);
        }
        if let Err(e) = keys.flush() {
            // Without durable tags we may not release: a restart could re-admit them.
            tracing::error!(error = %e, "cannot persist replay tags; dropping the batch");
            for _ in batch.drain(..) {
                drop_packet("replay_store_failed");
            }
            continue;
        }
        if let Some(Err(e)) = payments.as_ref().map(|p| p.flush()) {
            // A winning ticket is written durably before it is acknowledged: the packets it
            // paid for may not leave. The winners stay queued for the next batch.
            tracing::error!(error = %e, "cannot store winning tickets; dropping the batch");
            for _ in batch.drain(..) {
                drop_packet("payment_store_failed");
            }
            continue;
        }
        for p in batch.drain(..) {
            match release.try_send(p) {
                Ok(()) => {}
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    drop_packet("release_queue_full")
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::ReplaySizing;
    use murmur_protocol::packet::{
        OpenedPacket, PublicKey, RouteHop, StaticSecret, build_packet_with_envelope,
    };
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// A saturated pipeline batches its fsyncs, yet every packet is released exactly once and
    /// only after its replay tag is in the log on disk.
    #[test]
    fn every_packet_is_released_once_after_its_tag_is_on_disk() {
        const N: usize = 400;
        let dir = tempfile::tempdir().unwrap();
        let sizing = ReplaySizing {
            capacity: 10_000,
            fp_rate: 1e-6,
        };
        let keys = Arc::new(KeyRing::open(dir.path(), sizing).unwrap());
        let mut rng = ChaCha20Rng::seed_from_u64(9);
        keys.rotate(&mut rng, 1, 1).unwrap();
        let key = keys.get(1).unwrap();
        let next = StaticSecret::random_from_rng(&mut rng);
        let route = [
            RouteHop {
                address: Address([1; 32]),
                sphinx_key: key.public,
            },
            RouteHop {
                address: Address([2; 32]),
                sphinx_key: PublicKey::from(&next),
            },
        ];
        let packets: Vec<(Packet, Envelope)> = (0..N)
            .map(|_| {
                let zero = [Duration::ZERO; 2];
                let (to, slots) = (Address([2; 32]), [None, None]);
                build_packet_with_envelope(&mut rng, &route, &zero, to, [0; 16], b"x", &slots)
                    .unwrap()
            })
            .collect();
        let (release, mut released) = tokio::sync::mpsc::channel(N);
        let config = PipelineConfig {
            workers: 2,
            input_queue: N + 10,
            max_hop_delay: Duration::from_secs(1),
        };
        let pipeline = Pipeline::start(config, keys.clone(), None, release).unwrap();
        let submit = pipeline.submitter();
        // All at once (the input queue holds them all), so the flusher sees a backlog.
        for (packet, envelope) in packets.iter().chain(&packets[..10]) {
            submit.submit(Inbound {
                key_epoch: 1,
                packet: packet.clone(),
                envelope: envelope.clone(),
                received: Instant::now(),
            });
        }
        let log = dir.path().join("sphinx/1.log");
        for k in 1..=N {
            let p = released.blocking_recv().unwrap();
            assert!(
                matches!(p, Processed::Forward { next_hop, .. } if next_hop == Address([2; 32]))
            );
            let on_disk = std::fs::metadata(&log).unwrap().len() / 32;
            assert!(
                on_disk >= k as u64,
                "packet {k} released with {on_disk} tags on disk"
            );
        }
        drop(submit);
        pipeline.shutdown();
        assert!(
            released.try_recv().is_err(),
            "the ten replays were not released"
        );
        let reopened = KeyRing::open(dir.path(), sizing).unwrap();
        let key = reopened.get(1).unwrap();
        for (p, _) in &packets {
            let tag = OpenedPacket::open(p.as_bytes(), key.secret())
                .unwrap()
                .replay_tag();
            assert!(
                key.check_and_insert(&tag),
                "a released packet's tag was lost"
            );
        }
    }
}
