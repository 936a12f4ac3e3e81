//! Reply blocks built on worker threads, ahead of need.
//!
//! A reply block is the session's costliest build (a few hundred microseconds of scalar
//! multiplications), and a download spends one per reply: at λ_P = 400/s, up to 2,000 a
//! second, more than the session thread can build while it also opens the replies. So the
//! session chooses each block's route, delays and identifier (what needs its state) and
//! hands the rest to a small pool of workers, one per core; what they build waits in the
//! session's bounded stock ([`ClientSession::prebuild_reply_blocks`]) until a packet to an
//! exit takes it. A packet that finds the stock empty builds its blocks itself, as before.

use crossbeam_channel::{Receiver, Sender};
use murmur_protocol::session::{BlockJob, BuiltBlock, ClientSession};

/// Workers at most, whatever the cores.
const MAX_WORKERS: usize = 4;

/// The workers and the two queues to and from them.
pub(crate) struct Builders {
    jobs: Sender<BlockJob>,
    built: Receiver<BuiltBlock>,
}

impl Builders {
    /// Starts one worker per core (at most [`MAX_WORKERS`]) for a stock of `stock` blocks:
    /// neither queue holds more than that, so a worker never waits to hand a block back.
    /// They end when the pool is dropped.
    pub(crate) fn spawn(stock: usize) -> std::io::Result<Builders> {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS);
        let (jobs, job_rx) = crossbeam_channel::bounded::<BlockJob>(stock.max(1));
        let (built_tx, built) = crossbeam_channel::bounded(stock.max(1));
        for i in 0..workers {
            let job_rx = job_rx.clone();
            let built_tx = built_tx.clone();
            std::thread::Builder::new()
                .name(format!("murmur-builder-{i}"))
                .spawn(move || {
                    let mut rng = rand::rng();
                    for job in job_rx {
                        if built_tx.send(job.build(&mut rng)).is_err() {
                            return;
                        }
                    }
                })?;
        }
        Ok(Builders { jobs, built })
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The pool fills the session's stock and the session's packets take from it. Driven
    /// with a real session over a synthetic network: what the workers build are real blocks
    /// with their keys.
    #[test]
    fn workers_fill_the_stock_of_reply_blocks() {
        use murmur_protocol::directory::NetworkParams;
        use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
        use murmur_protocol::session::SessionConfig;
        use murmur_protocol::time::Instant;
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let shape = SyntheticNetwork {
            mixes_per_layer: 3,
            gateways: 1,
            exits: 1,
            params: NetworkParams::nym_like(),
            epoch: 7,
        };
        let (consensus, _) = generate(&mut rng, &shape);
        let gateway = consensus
            .relays
            .iter()
            .find(|r| r.roles.gateway)
            .unwrap()
            .identity;
        let mut session = ClientSession::new(
            SessionConfig::new(murmur_protocol::packet::Address(
                [7; murmur_protocol::ADDRESS_LEN],
            )),
            std::sync::Arc::new(consensus),
            gateway,
            Instant::ZERO,
            &mut rng,
        )
        .unwrap();
        session.prebuild_reply_blocks(8);
        let builders = Builders::spawn(8).unwrap();
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
}
