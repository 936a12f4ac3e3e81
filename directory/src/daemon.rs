//! The authority process: state, HTTP server and the epoch schedule, with graceful shutdown.
//!
//! Schedule for the consensus of epoch `T` (epochs of length `L` starting at `T·L`):
//!
//! ```text
//! T·L − vote_lead      make a vote from the descriptors held; send it to every peer
//!                      (retried with backoff until compute time)
//! T·L − compute_lead   fetch votes still missing from peers; compute the consensus if votes
//!                      from a strict majority of the configured authorities are held; sign it
//!                      and send the signature to every peer (retried until T·L + L)
//! T·L                  valid-after: served as /v1/consensus/latest once a strict majority
//!                      signed it; fresh-until (T+1)·L; valid-until (T+2)·L
//! ```
//!
//! An authority that starts after a round's vote time but before its compute time votes at
//! once; one that starts later joins the next round.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use murmur_protocol::directory::{
    AuthoritySet, Epoch, IdentityKey, SignedVote, consensus::VALID_EPOCHS, decode, encode,
};
use murmur_service::rate::KeyedBuckets;
use murmur_service::{RefusalCounter, serve_until};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::authority::{Accepted, Authority, AuthorityPolicy, Refusal};
use crate::client::{DirectoryClient, MAX_DOCUMENT_BYTES};
use crate::config::Config;
use crate::metrics::{
    CONSENSUS_FAILED, CONSENSUS_PRODUCED, Metrics, PEER_REQUESTS_FAILED, REQUESTS_REFUSED,
};
use crate::prober::ProberKeys;
use crate::server::{count_vote, router};
use crate::storage::Storage;
use crate::{Error, Result, SignatureUpload, keys, unix_now, unix_now_ms};

/// What the server handlers and the schedule share.
pub(crate) struct Ctx {
    state: Mutex<Authority>,
    pub set: AuthoritySet,
    pub metrics: Metrics,
    pub storage: Storage,
    pub config: Config,
    /// The other authorities' base URLs.
    pub peers: Vec<String>,
    pub client: DirectoryClient,
    /// Woken when a relay not held before uploads a descriptor (the prober tests it at once).
    pub new_relay: tokio::sync::Notify,
    /// Descriptor uploads per source address (IPv4, or IPv6 /64).
    pub uploads: Mutex<KeyedBuckets<(u8, u128)>>,
    /// This authority's prober card, served at `/v1/prober` (none when probing is off).
    pub prober_card: Option<murmur_protocol::directory::prober::SignedProberCard>,
}

impl Ctx {
    /// The authority state. Held only for quick, synchronous work.
    pub fn lock(&self) -> MutexGuard<'_, Authority> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Verifies and holds a decoded vote, counted under its result. Verification (1,000
    /// descriptor signatures take about 75 ms) runs on the blocking pool, without the lock.
    pub async fn take_vote(
        self: &Arc<Self>,
        decoded: murmur_protocol::Result<SignedVote>,
    ) -> std::result::Result<Accepted, Refusal> {
        let ctx = self.clone();
        tokio::task::spawn_blocking(move || ctx.take_vote_blocking(decoded))
            .await
            .unwrap_or_else(|e| {
                Err(Refusal::new(
                    "internal",
                    500,
                    format!("vote check failed: {e}"),
                ))
            })
    }

    fn take_vote_blocking(
        &self,
        decoded: murmur_protocol::Result<SignedVote>,
    ) -> std::result::Result<Accepted, Refusal> {
        let result = decoded
            .and_then(|signed| {
                let verified = signed.verify(&self.set, None)?;
                Ok((signed, verified))
            })
            .map_err(Refusal::from)
            .and_then(|(signed, verified)| self.lock().accept_vote(signed, verified, unix_now()));
        count_vote(self, &result);
        if let Err(r) = &result {
            tracing::warn!(reason = r.reason, "vote refused: {}", r.message);
        }
        result
    }
}

/// Binds `config.listen` and runs the authority until `shutdown` completes.
pub async fn run(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    serve(config, listener, shutdown).await
}

/// Runs the authority on an already bound listener (tests bind `127.0.0.1:0`) until
/// `shutdown` completes; then stops accepting, finishes open requests and peer sends, and
/// returns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    // A config built in code (the devnet, tests) gets the checks a file gets: one this
    // authority could never vote with must not start a daemon that fails every epoch.
    config.validate()?;
    let key = keys::load(&config.key_file)?;
    let set = config.authority_set()?;
    let prober = if config.probe.enabled {
        let listener = TcpListener::bind(config.probe.listen)
            .await
            .map_err(|source| Error::Listen {
                addr: config.probe.listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| Error::Listen {
            addr: config.probe.listen,
            source,
        })?;
        let keys = Arc::new(ProberKeys::generate());
        let card = keys.card(&key, config.probe.advertise.unwrap_or(bound))?;
        Some((keys, listener, card, bound))
    } else {
        None
    };
    let mut authority = Authority::new(
        key,
        set.clone(),
        config.params(),
        AuthorityPolicy::from_config(&config),
    )
    .map_err(|r| Error::Config(r.message))?;
    let storage = Storage::open(&config.state_dir)?;
    let now = unix_now();
    let (mut restored, mut documents) = (0, 0);
    for d in storage.load_descriptors() {
        restored += usize::from(authority.accept_descriptor(d, now).is_ok());
    }
    for c in storage.load_consensus() {
        documents += usize::from(authority.restore_consensus(c, now).is_ok());
    }
    let me = authority.identity();
    let peers = config
        .authorities
        .iter()
        .filter_map(|a| {
            let identity = IdentityKey::from_hex(&a.identity).ok()?;
            (identity != me).then(|| a.url.trim_end_matches('/').to_owned())
        })
        .collect();
    let ctx = Arc::new(Ctx {
        state: Mutex::new(authority),
        set,
        metrics: Metrics::default(),
        storage,
        client: DirectoryClient::new(config.limits.peer_timeout)?,
        peers,
        new_relay: tokio::sync::Notify::new(),
        uploads: Mutex::new(KeyedBuckets::new(
            f64::from(config.limits.uploads_per_minute_per_address) / 60.0,
            f64::from(config.limits.uploads_per_minute_per_address),
            65_536,
        )),
        prober_card: prober.as_ref().map(|(_, _, card, _)| card.clone()),
        config,
    });
    let addr = listener.local_addr().map_err(|source| Error::Listen {
        addr: ctx.config.listen,
        source,
    })?;
    tracing::info!(
        %addr,
        identity = %me,
        authorities = ctx.set.keys().len(),
        descriptors = restored,
        consensus_documents = documents,
        "directory authority listening"
    );

    let token = CancellationToken::new();
    let tracker = TaskTracker::new();
    if let Some((keys, listener, _, bound)) = prober {
        tracing::info!(addr = %bound, "prober listening");
        crate::prober::start(ctx.clone(), keys, listener, token.clone(), &tracker);
    }
    tracker.spawn(schedule(ctx.clone(), token.clone(), tracker.clone()));
    let counter = ctx.clone();
    let refused: RefusalCounter =
        Arc::new(move |reason| counter.metrics.inc(REQUESTS_REFUSED, reason));
    serve_until(
        listener,
        ctx.config.limits.http(),
        router(ctx.clone()),
        refused,
        shutdown,
        token,
        tracker,
    )
    .await
    .map_err(Error::Serve)
}

/// Sleeps until `at_ms` (Unix milliseconds); false if shut down first.
async fn sleep_until(at_ms: u64, token: &CancellationToken) -> bool {
    let wait = Duration::from_millis(at_ms.saturating_sub(unix_now_ms()));
    tokio::select! {
        () = tokio::time::sleep(wait) => true,
        () = token.cancelled() => false,
    }
}

/// The times of one round, in Unix milliseconds.
struct Round {
    epoch: Epoch,
    vote_at: u64,
    compute_at: u64,
    start: u64,
    length: u64,
}

impl Round {
    /// The next round whose compute time is still ahead at `now_ms`.
    fn next(config: &Config, now_ms: u64) -> Self {
        let length = config.schedule.epoch_length.as_secs().max(1) * 1000;
        let lead = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let (vote_lead, compute_lead) = (
            lead(config.schedule.vote_lead),
            lead(config.schedule.compute_lead),
        );
        let mut epoch = now_ms / length + 1;
        if now_ms >= (epoch * length).saturating_sub(compute_lead) {
            epoch += 1;
        }
        let start = epoch * length;
        Round {
            epoch: Epoch::try_from(epoch).unwrap_or(Epoch::MAX),
            vote_at: start.saturating_sub(vote_lead),
            compute_at: start.saturating_sub(compute_lead),
            start,
            length,
        }
    }
}

async fn schedule(ctx: Arc<Ctx>, token: CancellationToken, tracker: TaskTracker) {
    loop {
        let round = Round::next(&ctx.config, unix_now_ms());
        if !sleep_until(round.vote_at, &token).await {
            return;
        }
        match ctx.lock().make_vote(round.epoch, unix_now()) {
            Ok(vote) => {
                let relays = decode::<murmur_protocol::directory::Vote>(&vote.body)
                    .map_or(0, |v| v.descriptors.len());
                tracing::info!(epoch = round.epoch, relays, "voting");
                send_to_peers(&ctx, &tracker, &token, "vote", &vote, round.compute_at);
            }
            Err(e) => tracing::error!(epoch = round.epoch, error = %e, "cannot make a vote"),
        }
        if !sleep_until(round.compute_at, &token).await {
            return;
        }
        fetch_missing_votes(&ctx, round.epoch).await;
        let computed = ctx.lock().compute(round.epoch);
        match computed {
            Ok(signature) => {
                ctx.metrics.inc(CONSENSUS_PRODUCED, "");
                let doc = ctx.lock().signed(round.epoch).cloned();
                if let Some(doc) = &doc {
                    tracing::info!(
                        epoch = round.epoch,
                        signatures = doc.signatures.len(),
                        digest = %crate::hex(&doc.digest()),
                        "consensus computed and signed"
                    );
                    if let Err(e) = ctx.storage.save_consensus(round.epoch, doc).await {
                        tracing::error!(error = %e, "cannot store consensus");
                    }
                }
                let upload = SignatureUpload {
                    epoch: round.epoch,
                    signature,
                };
                send_to_peers(
                    &ctx,
                    &tracker,
                    &token,
                    "signature",
                    &upload,
                    round.start + round.length,
                );
            }
            Err(e) => {
                ctx.metrics.inc(CONSENSUS_FAILED, e.label());
                tracing::warn!(epoch = round.epoch, "no consensus this epoch: {e}");
            }
        }
        prune(&ctx).await;
    }
}

async fn prune(ctx: &Ctx) {
    let now = unix_now();
    let (gone, keep_from) = {
        let mut state = ctx.lock();
        let keep_from = state
            .epoch_at(now)
            .saturating_sub(u32::try_from(VALID_EPOCHS).unwrap_or(u32::MAX));
        (state.prune(now), keep_from)
    };
    for id in gone {
        if let Err(e) = ctx.storage.remove_descriptor(&id).await {
            tracing::warn!(error = %e, "cannot remove an expired descriptor");
        }
    }
    if let Err(e) = ctx
        .storage
        .prune_consensus(keep_from.saturating_sub(1))
        .await
    {
        tracing::warn!(error = %e, "cannot remove old consensus documents");
    }
}

/// Sends `doc` to every peer in its own task, each retried with backoff until `deadline_ms`
/// or shutdown; a dead peer delays no one.
fn send_to_peers<T: serde::Serialize>(
    ctx: &Arc<Ctx>,
    tracker: &TaskTracker,
    token: &CancellationToken,
    kind: &'static str,
    doc: &T,
    deadline_ms: u64,
) {
    let body = match encode(doc) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode {kind}");
            return;
        }
    };
    for peer in &ctx.peers {
        let url = format!("{peer}/v1/{kind}");
        tracker.spawn(send_with_retry(
            ctx.clone(),
            token.clone(),
            url,
            kind,
            body.clone(),
            deadline_ms,
        ));
    }
}

async fn send_with_retry(
    ctx: Arc<Ctx>,
    token: CancellationToken,
    url: String,
    kind: &'static str,
    body: Vec<u8>,
    deadline_ms: u64,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let attempt = tokio::select! {
            r = ctx.client.post(&url, body.clone()) => r,
            () = token.cancelled() => return,
        };
        match attempt {
            Ok(_) => return,
            Err(Error::Status {
                status, message, ..
            }) if (400..500).contains(&status) => {
                tracing::warn!(%url, status, "peer refused our {kind}: {message}");
                return;
            }
            Err(e) => {
                ctx.metrics.inc(PEER_REQUESTS_FAILED, kind);
                tracing::debug!(error = %e, "sending {kind} failed; will retry");
            }
        }
        let wait_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX);
        if unix_now_ms().saturating_add(wait_ms) >= deadline_ms {
            tracing::warn!(%url, "giving up sending our {kind}: the peer did not answer in time");
            return;
        }
        if !sleep_until(unix_now_ms() + wait_ms, &token).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Before computing, asks every peer for the votes it holds, so that authorities compute
/// from the same votes even when a vote reached only some of them. Bounded by half the time
/// between compute time and the epoch start, and by the peer timeout.
async fn fetch_missing_votes(ctx: &Arc<Ctx>, epoch: Epoch) {
    let missing = {
        let state = ctx.lock();
        ctx.set
            .keys()
            .iter()
            .filter(|k| !state.has_vote(epoch, k))
            .count()
    };
    if missing == 0 {
        return;
    }
    let budget = (ctx.config.schedule.compute_lead / 2).min(ctx.config.limits.peer_timeout);
    let mut tasks = tokio::task::JoinSet::new();
    for peer in &ctx.peers {
        let (client, url) = (ctx.client.clone(), format!("{peer}/v1/votes/{epoch}"));
        tasks.spawn(async move {
            tokio::time::timeout(budget, client.get(&url, MAX_DOCUMENT_BYTES)).await
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok(Ok(Ok(bytes))) = joined else {
            ctx.metrics.inc(PEER_REQUESTS_FAILED, "fetch_votes");
            continue;
        };
        let Ok(votes) = decode::<Vec<SignedVote>>(&bytes) else {
            continue;
        };
        for vote in votes {
            if !ctx.lock().has_vote(epoch, &vote.signer()) {
                let _ = ctx.take_vote(Ok(vote)).await;
            }
        }
    }
}
