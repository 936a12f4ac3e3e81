//! Packets and reply blocks built on worker threads, ahead of need.
//!
//! Sphinx builds are the session's costliest work (a few hundred microseconds of scalar
//! multiplications each): a reply block for every reply of a download (at λ_P = 400/s, up
//! to 2,000 a second) and a header and envelope for every packet, real or cover (the sum
//! of λ_P, λ_L and λ_D a second). Neither needs the session's state once its choices are made, so the
//! session makes them (routes, delays, identifiers, tickets, content) and a small pool of
//! workers, one per core, does the rest:
//!
//! - a packet ([`SealJob`]) goes to the pacer's stock it was made for, promised there
//!   ([`Pacer::promise`]) while it is built so that the stock is not filled twice;
//! - a reply block ([`BlockJob`]) waits in the session's bounded stock
//!   ([`ClientSession::prebuild_reply_blocks`]) until a packet to an exit, or a SURB-ACK,
//!   takes it.
//!
//! Workers take packets before blocks: a tick may be waiting for a packet, while a block is
//! for a later packet. Whatever the pool cannot take (its queue full, its workers gone) the
//! session thread builds itself, as before.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};
use murmur_protocol::cover::{Pacer, Stock};
use murmur_protocol::frame::Frame;
use murmur_protocol::session::{BlockJob, BuiltBlock, ClientSession, SealJob};

/// Workers at most, whatever the cores.
const MAX_WORKERS: usize = 4;

/// Packets queued for the workers at most: more than the pacer's stocks can promise
/// (three stocks of at most [`murmur_protocol::cover::PACER_MAX_STOCK`]).
const SEAL_QUEUE: usize = 3 * murmur_protocol::cover::PACER_MAX_STOCK + 1;

/// What the pool counts.
#[derive(Default)]
pub struct BuilderStats {
    /// Packets the workers built into the pacer's stocks (the rest the session thread built,
    /// when the pool's queue was full).
    pub packets_built: AtomicU64,
    /// Packets whose build failed (a bug: the session never makes a shape that cannot be
    /// built); the pacer's stock is filled again at its next look.
    pub packets_unbuilt: AtomicU64,
}

/// The workers and the queues to and from them.
pub(crate) struct Builders {
    jobs: Sender<BlockJob>,
    built: Receiver<BuiltBlock>,
    seals: Sender<(Stock, SealJob)>,
    pacer: Arc<Mutex<Pacer<Frame>>>,
    stats: Arc<BuilderStats>,
}

/// One piece of a worker's work.
enum Work {
    Seal(Stock, SealJob),
    Block(BlockJob),
}

impl Builders {
    /// Starts one worker per core (at most [`MAX_WORKERS`]) for a stock of `stock` blocks
    /// (neither block queue holds more than that, so a worker never waits to hand a block
    /// back) and for `pacer`'s stocks of packets. They end when the pool is dropped.
    pub(crate) fn spawn(
        stock: usize,
        pacer: Arc<Mutex<Pacer<Frame>>>,
        stats: Arc<BuilderStats>,
    ) -> std::io::Result<Builders> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS);
        let (jobs, job_rx) = crossbeam_channel::bounded::<BlockJob>(stock.max(1));
        let (built_tx, built) = crossbeam_channel::bounded(stock.max(1));
        let (seals, seal_rx) = crossbeam_channel::bounded::<(Stock, SealJob)>(SEAL_QUEUE);
        for i in 0..workers {
            let job_rx = job_rx.clone();
            let seal_rx = seal_rx.clone();
            let built_tx = built_tx.clone();
            let pacer = pacer.clone();
            let stats = stats.clone();
            std::thread::Builder::new()
                .name(format!("murmur-builder-{i}"))
                .spawn(move || {
                    let mut rng = rand::rng();
                    while let Some(work) = next_work(&seal_rx, &job_rx) {
                        match work {
                            Work::Seal(stock, job) => {
                                if seal_into(&pacer, &stats, stock, job, &mut rng) {
                                    stats.packets_built.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Work::Block(job) => {
                                if built_tx.send(job.build(&mut rng)).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                })?;
        }
        Ok(Builders {
            jobs,
            built,
            seals,
            pacer,
            stats,
        })
    }

    /// Gives the session what the workers built, then hands them the jobs it wants done.
    /// Called at the top of each round of the session thread, not woken for each block: a
    /// download wakes it for its deliveries thousands of times a second anyway, and an idle
    /// session's stock can wait the round's 100 ms (waking for every block cost wake-ups and
    /// gained nothing measurable at λ_P = 400).
    pub(crate) fn exchange<R: rand::CryptoRng + ?Sized>(
        &self,
        session: &mut ClientSession,
        rng: &mut R,
    ) {
        for block in self.built.try_iter() {
            session.handle_built_block(block);
        }
        while let Some(job) = session.poll_block_job(rng) {
            // The queue holds the whole stock, so it is full only if every worker is gone:
            // the session then builds its blocks itself.
            if self.jobs.try_send(job).is_err() {
                session.block_job_lost();
                return;
            }
        }
    }

    /// Builds `job` into the pacer's `stock`: on a worker, promised to the stock meanwhile,
    /// or here if the pool cannot take it.
    pub(crate) fn seal<R: rand::CryptoRng + ?Sized>(
        &self,
        stock: Stock,
        job: SealJob,
        rng: &mut R,
    ) {
        // Promised before it is queued: a worker may build it before this returns.
        if let Ok(mut p) = self.pacer.lock() {
            p.promise(stock);
        }
        if let Err(e) = self.seals.try_send((stock, job)) {
            let (stock, job) = e.into_inner();
            seal_into(&self.pacer, &self.stats, stock, job, rng);
        }
    }
}

/// The next piece of work: a packet if one waits, else whichever comes first. `None` once the
/// pool is dropped.
fn next_work(seals: &Receiver<(Stock, SealJob)>, blocks: &Receiver<BlockJob>) -> Option<Work> {
    if let Ok((stock, job)) = seals.try_recv() {
        return Some(Work::Seal(stock, job));
    }
    crossbeam_channel::select! {
        recv(seals) -> m => m.ok().map(|(stock, job)| Work::Seal(stock, job)),
        recv(blocks) -> m => m.ok().map(Work::Block),
    }
}

/// Builds `job`, promised to `pacer`'s `stock`, and keeps the promise: into the stock, or,
/// if the build fails, counted and the promise broken. Whether it was built.
fn seal_into<R: rand::CryptoRng + ?Sized>(
    pacer: &Mutex<Pacer<Frame>>,
    stats: &BuilderStats,
    stock: Stock,
    job: SealJob,
    rng: &mut R,
) -> bool {
    let built = job.build(rng);
    let Ok(mut p) = pacer.lock() else {
        return false;
    };
    match built {
        Ok(frame) => {
            p.fulfil(stock, frame);
            true
        }
        Err(e) => {
            p.break_promise(stock);
            stats.packets_unbuilt.fetch_add(1, Ordering::Relaxed);
            tracing::error!(error = %e, "a packet could not be built (a bug)");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A session over a synthetic network of three mixes a layer, one gateway and one exit.
    fn session(
        rng: &mut rand_chacha::ChaCha20Rng,
    ) -> (
        ClientSession,
        std::sync::Arc<murmur_protocol::directory::Consensus>,
    ) {
        use murmur_protocol::directory::NetworkParams;
        use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
        use murmur_protocol::session::SessionConfig;
        use murmur_protocol::time::Instant;
        let shape = SyntheticNetwork {
            mixes_per_layer: 3,
            gateways: 1,
            exits: 1,
            params: NetworkParams::nym_like(),
            epoch: 7,
        };
        let (consensus, _) = generate(rng, &shape);
        let gateway = consensus
            .relays
            .iter()
            .find(|r| r.roles.gateway)
            .unwrap()
            .identity;
        let consensus = std::sync::Arc::new(consensus);
        let session = ClientSession::new(
            SessionConfig::new(murmur_protocol::packet::Address(
                [7; murmur_protocol::ADDRESS_LEN],
            )),
            consensus.clone(),
            gateway,
            Instant::ZERO,
            rng,
        )
        .unwrap();
        (session, consensus)
    }

    fn pacer_for(session: &ClientSession) -> Arc<Mutex<Pacer<Frame>>> {
        let pacer = Pacer::new(
            session.send_rates(),
            murmur_protocol::time::Instant::ZERO,
            &mut rand::rng(),
        )
        .unwrap();
        Arc::new(Mutex::new(pacer))
    }

    /// The pool fills the session's stock and the session's packets take from it. Driven
    /// with a real session over a synthetic network: what the workers build are real blocks
    /// with their keys.
    #[test]
    fn workers_fill_the_stock_of_reply_blocks() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let (mut session, _) = session(&mut rng);
        session.prebuild_reply_blocks(8);
        let builders =
            Builders::spawn(8, pacer_for(&session), Arc::new(BuilderStats::default())).unwrap();
        for _ in 0..200 {
            builders.exchange(&mut session, &mut rng);
            if session.state_size().prebuilt_blocks == 8 {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(session.state_size().prebuilt_blocks, 8);
        assert_eq!(session.stats().reply_blocks_prebuilt, 8);
        assert_eq!(session.stats().bugs, 0);
    }

    /// The workers build the packets the session makes for the pacer's stocks, and the
    /// stocks count them as there while they are built: one round of filling fills them
    /// exactly once, and every packet lands, as a forward frame for a layer-1 mix.
    #[test]
    fn workers_build_the_pacers_packets_once() {
        use murmur_protocol::cover::StockFill;
        use murmur_protocol::time::Instant;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(2);
        let (mut session, consensus) = session(&mut rng);
        let pacer = pacer_for(&session);
        let stats = Arc::new(BuilderStats::default());
        let builders = Builders::spawn(0, pacer.clone(), stats.clone()).unwrap();
        let capacity = pacer.lock().unwrap().capacity();
        let mut fill = StockFill::new(&pacer.lock().unwrap());
        let mut made = 0;
        loop {
            let wants = pacer.lock().unwrap().wants();
            let Some(stock) = fill.next(wants) else { break };
            match session.build_ahead_job(stock, Instant::ZERO, &mut rng) {
                Some(job) => {
                    builders.seal(stock, job, &mut rng);
                    made += 1;
                }
                // No message waits: no real packet.
                None => assert!(fill.nothing_built(stock)),
            }
        }
        assert!(made > 0 && made < capacity, "{made} of {capacity}");
        for _ in 0..500 {
            if pacer.lock().unwrap().promised() == 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let p = pacer.lock().unwrap();
        assert_eq!(p.promised(), 0);
        let wants = p.wants();
        assert_eq!(
            (wants.drops, wants.loops),
            (0, 0),
            "the cover stocks are full"
        );
        assert_eq!(stats.packets_built.load(Ordering::Relaxed), made as u64);
        assert_eq!(stats.packets_unbuilt.load(Ordering::Relaxed), 0);
        drop(p);
        // What a tick takes is a built frame for the first layer.
        let mut p = pacer.lock().unwrap();
        let tick = p.poll_timeout().unwrap();
        let frame = p.poll_transmit(tick, &mut rng).unwrap();
        let Frame::Forward { next_hop, .. } = frame else {
            panic!("not a forward frame: {frame:?}")
        };
        let first = consensus.relays.iter().find(|r| r.address() == next_hop);
        assert_eq!(first.and_then(|r| r.layer), Some(1));
    }
}
