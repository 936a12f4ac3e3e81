//! The client as a whole: follow the directory, keep a session through a gateway, serve
//! SOCKS5 and, if asked, HTTP CONNECT. Moves to another gateway when its gateway stays unreachable.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_directory::client::DirectoryClient;
use murmur_ledger::client::LedgerClient;
use murmur_protocol::delivery::DeliveryTags;
use murmur_protocol::directory::guard::{self, Guard, GuardChoice};
use murmur_protocol::directory::path::{PathRules, PathSelector};
use murmur_protocol::directory::{AuthoritySet, Consensus, ConsensusStore, IdentityKey, Offer};
use murmur_protocol::link::{LinkSecret, session_address};
use murmur_protocol::payer::{Payer, PayerConfig};
use murmur_protocol::session::{ClientSession, SessionConfig};
use murmur_protocol::time::Instant;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::board::{Board, GatewayInUse, PotReport};
use crate::control::{self, ControlStats};
use crate::driver::{self, Cmd, SessionHandle};
use crate::gateway::{self, LinkEnd};
use crate::guard_file::GuardFile;
use crate::status::Listeners;
use crate::stream::{self, Listener, Proxy, ProxyShared, SafeSocks, SocksLimits, SocksStats};
use crate::wallet::{self, FundingPolicy};

/// Everything the proxy needs to know.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    pub socks: Listener,
    /// The HTTP CONNECT proxy, if any.
    pub http: Option<Listener>,
    /// What to do with targets given as IP addresses, on both proxies.
    pub safe_socks: SafeSocks,
    /// (identity, base URL) of each authority.
    pub authorities: Vec<(IdentityKey, String)>,
    pub clock_skew: Duration,
    pub path_rules: PathRules,
    pub socks_limits: SocksLimits,
    /// Each stream's window (see `SessionConfig::stream_window`).
    pub stream_window: usize,
    /// How often the directory is asked for a newer consensus.
    pub refresh_every: Duration,
    /// Paying relays, if the network charges.
    pub payment: Option<PaymentOptions>,
    /// Where the control endpoint (status and metrics) listens; `None`: nowhere.
    pub control: Option<SocketAddr>,
    /// Where the client keeps its guard; `None`: a new gateway at every start.
    pub state_dir: Option<PathBuf>,
}

/// How the client pays.
#[derive(Clone)]
pub struct PaymentOptions {
    /// The ledger's base URL.
    pub ledger: String,
    /// The ledger's identity key, which must sign every answer the client acts on.
    pub ledger_key: IdentityKey,
    /// The pot's key (and the account that funds it).
    pub key: SigningKey,
    pub payer: PayerConfig,
    pub funding: FundingPolicy,
    /// How often the pot is checked and topped up.
    pub check_every: Duration,
    /// No new stream opens once tickets worth this much have been signed (base units, in
    /// expected value, since the client started); `None`: no cap.
    pub max_spend: Option<u64>,
    /// Set when the pot is on a chain (`settlement = "chain"`): then `ledger` and
    /// `ledger_key` are not used, and every ticket is co-signed.
    pub chain: Option<ChainPayment>,
}

/// A pot on a chain. The relays' chain addresses, which co-signatures name, come from their
/// descriptors (a relay that publishes none redeems at a ledger, and its tickets go plain).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainPayment {
    pub section: murmur_ledger::ChainSection,
}

/// Co-signs a ticket for the chain (shared by the client's successive payers).
type SharedCosign = Arc<
    dyn Fn(
            &murmur_protocol::ticket::Ticket,
            &murmur_protocol::directory::ChainAddress,
        ) -> Option<murmur_protocol::ticket::CoSignature>
        + Send
        + Sync,
>;

/// Checks the pot now and keeps it funded from then on, reporting it to the board and the
/// live session.
async fn fund_and_follow<S: murmur_ledger::Settlement + 'static>(
    settlement: S,
    payment: &PaymentOptions,
    pot_state: &Arc<PotState>,
    board: &Arc<Board>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) {
    match wallet::ensure_funded(&settlement, &payment.key, &payment.funding).await {
        Ok(pot) => pot_state.store(&pot, board),
        Err(e) => tracing::warn!(error = %e, "cannot fund the pot yet; retrying"),
    }
    let (state, board) = (pot_state.clone(), board.clone());
    tracker.spawn(wallet::keep_funded(
        settlement,
        payment.key.clone(),
        payment.funding,
        payment.check_every,
        move |pot| {
            state.store(&pot, &board);
            if let Some(h) = board.session() {
                let (balance, face_cap) = state.load();
                h.send(Cmd::Pot { balance, face_cap });
            }
        },
        shutdown.clone(),
    ));
}

/// The chain settlement for the client's pot and its tickets' co-signer.
#[cfg(feature = "chain")]
async fn connect_chain(
    chain: &ChainPayment,
    key: &SigningKey,
) -> anyhow::Result<(Arc<murmur_chain::ChainSettlement>, SharedCosign)> {
    use murmur_chain::{ChainConfig, ChainSettlement};
    let config = ChainConfig::from_section(&chain.section)?;
    let settlement = ChainSettlement::connect(config, std::slice::from_ref(key))
        .await
        .map_err(|e| anyhow::anyhow!("chain {}: {e}", chain.section.rpc_url))?;
    let cosigner = settlement.ticket_cosigner(key);
    tracing::info!(
        rpc_url = %chain.section.rpc_url,
        contract = %chain.section.contract,
        owner = %cosigner.owner(),
        "the pot is on the chain; tickets are co-signed"
    );
    let cosign: SharedCosign = Arc::new(move |t, recipient| cosigner.cosign(t, recipient));
    Ok((Arc::new(settlement), cosign))
}

impl std::fmt::Debug for PaymentOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PaymentOptions")
            .field("ledger", &self.ledger)
            .field("ledger_key", &self.ledger_key)
            .field("pot", &IdentityKey::of(&self.key))
            .field("payer", &self.payer)
            .field("funding", &self.funding)
            .field("max_spend", &self.max_spend)
            .finish()
    }
}

/// The pot as last reported by the ledger, for the next session's payer.
#[derive(Default)]
struct PotState {
    /// The balance tickets may draw on (less what is warned for withdrawal).
    balance: AtomicU64,
    /// The largest face value the pot covers.
    face_cap: AtomicU64,
}

impl PotState {
    fn store(&self, pot: &murmur_ledger::Pot, board: &Board) {
        let balance = pot.balance.saturating_sub(pot.warned);
        self.balance.store(balance, Ordering::Relaxed);
        self.face_cap.store(pot.usable(), Ordering::Relaxed);
        if let Ok(mut slot) = board.pot.write() {
            *slot = Some(PotReport {
                balance,
                face_cap: pot.usable(),
            });
        }
    }

    fn load(&self) -> (u64, u64) {
        (
            self.balance.load(Ordering::Relaxed),
            self.face_cap.load(Ordering::Relaxed),
        )
    }
}

/// A live session: its handle and the gateway it uses.
struct Live {
    handle: SessionHandle,
    gateway: IdentityKey,
}

/// Runs the proxy until `shutdown`. Calls `ready` once with the SOCKS address (and the HTTP
/// proxy's, if there is one) when the first request can be served.
pub async fn run(
    options: ProxyOptions,
    ready: impl FnOnce(SocketAddr, Option<SocketAddr>) + Send,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    stream::check_listeners(&options.socks, options.http.as_ref())?;
    let listener = TcpListener::bind(options.socks.addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for SOCKS on {}: {e}", options.socks.addr))?;
    let socks_addr = listener.local_addr()?;
    let http_listener = match &options.http {
        Some(http) => Some(TcpListener::bind(http.addr).await.map_err(|e| {
            anyhow::anyhow!("cannot listen for HTTP CONNECT on {}: {e}", http.addr)
        })?),
        None => None,
    };
    let http_addr = match &http_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let urls: Vec<String> = options.authorities.iter().map(|(_, u)| u.clone()).collect();
    let set = AuthoritySet::new(options.authorities.iter().map(|(k, _)| *k).collect())?;
    let client = DirectoryClient::new(Duration::from_secs(5))?;
    let mut store = ConsensusStore::new(set, options.clock_skew.as_secs());
    let tracker = TaskTracker::new();
    let guard_file = options
        .state_dir
        .as_deref()
        .map(GuardFile::in_dir)
        .transpose()?;
    let stats = Arc::new(SocksStats::default());

    // The status view, served from the start so it can say what the client waits for.
    let board = Arc::new(Board::new(
        stats.clone(),
        options.payment.as_ref().map(|p| IdentityKey::of(&p.key)),
        options.payment.as_ref().and_then(|p| p.max_spend),
    ));
    let control_addr = match options.control {
        Some(addr) => {
            let source: control::StatusSource = {
                let board = board.clone();
                Arc::new(move || board.status(murmur_directory::unix_now()))
            };
            let bound = control::start(
                addr,
                source,
                Arc::new(ControlStats::default()),
                shutdown.clone(),
                &tracker,
            )
            .await?;
            tracing::info!(%bound, "control endpoint (murmur-client status, /metrics)");
            Some(bound)
        }
        None => None,
    };
    if let Ok(mut l) = board.listeners.write() {
        *l = Listeners {
            socks: socks_addr.to_string(),
            http: http_addr.map(|a| a.to_string()),
            control: control_addr.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        };
    }

    // The first consensus with a usable gateway.
    let mut unusable_reported = String::new();
    let consensus = loop {
        let now = murmur_directory::unix_now();
        if let Err(e) = client.refresh(&urls, &mut store, now).await {
            tracing::debug!(error = %e, "no consensus yet");
        }
        if let Ok(v) = store.current(now) {
            let c = Arc::new(v.consensus.clone());
            match usable(&c, &options.path_rules) {
                Ok(()) => break c,
                Err(e) => {
                    // Said once per reason: with a price cap or performance floor no relay
                    // meets, waiting is all the client can do, and the user must know why.
                    let reason = e.to_string();
                    if reason != unusable_reported {
                        tracing::warn!(
                            epoch = c.epoch,
                            "the consensus offers no usable path yet: {reason}"
                        );
                        unusable_reported = reason;
                    }
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    };
    if let Ok(mut slot) = board.consensus.write() {
        *slot = Some(consensus.clone());
    }
    let consensus_now = Arc::new(RwLock::new(consensus));
    let mut dead_gateways: Vec<IdentityKey> = Vec::new();
    let mut previous_payer: Option<Payer> = None;
    let mut ready = Some(ready);
    // The guard: from the state directory, else chosen afresh (and then kept for this run).
    let mut stored_guard: Option<Guard> = match &guard_file {
        Some(f) => f.load().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "the stored guard cannot be read; choosing a new one");
            None
        }),
        None => None,
    };

    // Keep the pot funded, and tell the session what it can pay. The first check happens
    // before any session exists, so a session starts with what the pot holds.
    let pot_state = Arc::new(PotState::default());
    // Set only by a chain pot (the `chain` feature).
    #[allow(unused_mut)]
    let mut cosign: Option<SharedCosign> = None;
    match options.payment.as_ref().map(|p| (p, &p.chain)) {
        None => {}
        Some((payment, None)) => {
            let ledger =
                LedgerClient::new(&payment.ledger, payment.ledger_key, Duration::from_secs(10))
                    .map_err(|e| anyhow::anyhow!("ledger {}: {e}", payment.ledger))?;
            fund_and_follow(ledger, payment, &pot_state, &board, &tracker, &shutdown).await;
        }
        #[cfg(feature = "chain")]
        Some((payment, Some(chain))) => {
            let (settlement, c) = connect_chain(chain, &payment.key).await?;
            cosign = Some(c);
            fund_and_follow(settlement, payment, &pot_state, &board, &tracker, &shutdown).await;
        }
        #[cfg(not(feature = "chain"))]
        Some((_, Some(_))) => anyhow::bail!(
            "payments.settlement = \"chain\" needs a murmur-client built with the `chain` \
             feature (cargo build --release -p murmur-client --features chain)"
        ),
    }

    // Follow the directory.
    {
        let (consensus_now, shutdown, board) =
            (consensus_now.clone(), shutdown.clone(), board.clone());
        let every = options.refresh_every;
        tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                let now = murmur_directory::unix_now();
                if !store.needs_refresh(now) {
                    continue;
                }
                match client.refresh(&urls, &mut store, now).await {
                    Ok(Offer::Installed { epoch }) => {
                        if let Ok(v) = store.current(now) {
                            tracing::info!(epoch, relays = v.consensus.relays.len(), "new consensus");
                            let c = Arc::new(v.consensus.clone());
                            if let Ok(mut slot) = consensus_now.write() {
                                *slot = c.clone();
                            }
                            if let Ok(mut slot) = board.consensus.write() {
                                *slot = Some(c.clone());
                            }
                            if let Some(h) = board.session() {
                                h.send(Cmd::Consensus(c));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "refresh failed; keeping the last good consensus"),
                }
            }
        });
    }

    // Connections to either proxy use whichever session is current when they arrive.
    let (session_tx, session_rx) = watch::channel::<Option<SessionHandle>>(None);
    let shared = Arc::new(ProxyShared {
        limits: options.socks_limits.clone(),
        stats: stats.clone(),
        safe: options.safe_socks,
        slots: Arc::new(Semaphore::new(options.socks_limits.max_connections)),
    });
    let listeners =
        std::iter::once((Proxy::Socks, listener)).chain(http_listener.map(|l| (Proxy::Http, l)));
    for (proxy, listener) in listeners {
        let (shared, shutdown, tracker2) = (shared.clone(), shutdown.clone(), tracker.clone());
        let mut session_rx = session_rx.clone();
        tracker.spawn(async move {
            // Serve only once a session exists.
            let handle = loop {
                if let Some(h) = session_rx.borrow().clone() {
                    break h;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = session_rx.changed() => if r.is_err() { return },
                }
            };
            stream::serve(
                proxy,
                listener,
                SwitchableSession {
                    rx: session_rx,
                    first: handle,
                },
                shared,
                shutdown,
                tracker2,
            )
            .await;
        });
    }

    // Sessions: one gateway at a time; a dead gateway is replaced.
    loop {
        let consensus = consensus_now
            .read()
            .map(|c| c.clone())
            .map_err(|_| anyhow::anyhow!("consensus lock poisoned"))?;
        let mut rng = rand::rng();
        let selector = PathSelector::new(&consensus, options.path_rules);
        let unix_now = murmur_directory::unix_now();
        let Some((gateway, guard, choice)) =
            guard::choose(&selector, stored_guard, &dead_gateways, unix_now, &mut rng)
        else {
            if dead_gateways.is_empty() {
                anyhow::bail!("the consensus lists no gateway");
            }
            tracing::warn!("every gateway failed; trying them all again");
            dead_gateways.clear();
            // Not a busy loop: every gateway took MAX_FAILURES attempts with backoff to fail.
            continue;
        };
        if choice.replaces_guard() {
            if let (Some(f), Some(g)) = (&guard_file, &guard)
                && let Err(e) = f.save(g)
            {
                tracing::warn!(error = %e, "the guard is used but not saved");
            }
            if choice != GuardChoice::First {
                tracing::info!(
                    reason = choice.label(),
                    "a new guard replaces the stored one"
                );
            }
        }
        stored_guard = guard;
        let Some(gateway_addr) = gateway.addresses.client else {
            dead_gateways.push(gateway.identity);
            continue;
        };
        tracing::info!(gateway = %gateway.identity, guard = choice.label(), "using gateway");
        // A fresh link key per session: no long-term client identity, so a session at another
        // gateway cannot be linked to this one. The session's address is bound to the key.
        let link_key = LinkSecret::generate(&mut rng);
        let address = session_address(&link_key.public());
        let mut config = SessionConfig::new(address);
        config.path_rules = options.path_rules;
        config.max_spend = options.payment.as_ref().and_then(|p| p.max_spend);
        config.stream_window = options.stream_window;
        // Tagged SURB identifiers: the gateway drops junk addressed to this session, and the
        // session pays only for its own deliveries.
        config.delivery_tags = Some(DeliveryTags::new(&link_key.public(), &mut rng));
        let mut session = ClientSession::new(
            config,
            consensus.clone(),
            gateway.identity,
            Instant::ZERO,
            &mut rng,
        )?;
        if let Some(payment) = &options.payment {
            // The last session's payer, if there was one: what it still owes relays (below a
            // ticket's worth each) is paid by this session.
            let (balance, face_cap) = pot_state.load();
            let mut payer = match previous_payer.take() {
                Some(p) => p,
                None => {
                    let mut payer = Payer::new(payment.key.clone(), payment.payer, face_cap)?;
                    if let Some(c) = &cosign {
                        let c = c.clone();
                        payer.set_cosigner(Box::new(move |t, recipient| c(t, recipient)));
                    }
                    payer
                }
            };
            payer.set_pot(balance, face_cap);
            session.set_payer(payer, Instant::ZERO, murmur_directory::unix_now());
        }
        let (frames_tx, frames_rx) = mpsc::channel(1024);
        let (handle, thread) = driver::spawn(session, frames_tx)?;
        if let Ok(mut s) = board.session.write() {
            *s = Some(handle.clone());
        }
        let live = Live {
            handle: handle.clone(),
            gateway: gateway.identity,
        };
        let (connected_tx, mut connected_rx) = watch::channel(false);
        if let Ok(mut g) = board.gateway.write() {
            *g = Some(GatewayInUse {
                identity: gateway.identity,
                address: gateway_addr,
                choice,
                guard: guard_file.as_ref().and(stored_guard),
                connected: connected_rx.clone(),
            });
        }
        let link = tokio::spawn(gateway::run(
            gateway_addr,
            gateway.link_key,
            link_key,
            frames_rx,
            handle.clone(),
            connected_tx,
            shutdown.clone(),
        ));
        // Ready once the gateway has welcomed us.
        if ready.is_some() {
            let up =
                tokio::time::timeout(Duration::from_secs(10), connected_rx.wait_for(|c| *c)).await;
            if matches!(up, Ok(Ok(_))) {
                let _ = session_tx.send(Some(handle.clone()));
                if let Some(f) = ready.take() {
                    f(socks_addr, http_addr);
                }
            }
        } else {
            let _ = session_tx.send(Some(handle.clone()));
        }
        let reporter = tokio::spawn(report_stats(handle.clone(), shutdown.clone()));
        let end = link.await.unwrap_or(LinkEnd::Shutdown);
        if matches!(end, LinkEnd::Shutdown) {
            // Its last report: the session's totals.
            let _ = reporter.await;
        } else {
            reporter.abort();
        }
        live.handle.stop();
        match end {
            LinkEnd::Shutdown => {
                tracker.spawn_blocking(move || thread.join());
                break;
            }
            LinkEnd::GatewayDead => {
                // The old session's thread ends within its next loop (100 ms at most); its
                // payer moves to the next session.
                let old = tokio::task::spawn_blocking(move || thread.join()).await;
                if let Ok(Ok(mut old)) = old {
                    previous_payer = old.take_payer();
                }
                tracing::warn!(gateway = %live.gateway, "gateway unreachable; moving to another");
                dead_gateways.push(live.gateway);
            }
        }
    }
    tracker.close();
    tracker.wait().await;
    Ok(())
}

/// Logs the session's counters every half minute, and warns when loops go missing: loop
/// cover that does not come back means relays drop packets, or someone is attacking.
async fn report_stats(handle: SessionHandle, shutdown: CancellationToken) {
    let mut missing = 0;
    loop {
        let last = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = tokio::time::sleep(Duration::from_secs(30)) => false,
        };
        let s = handle.session_stats();
        tracing::info!(
            last,
            real = s.real_sent,
            cover = s.cover_sent,
            loops_sent = s.loops_sent,
            loops_returned = s.loops_returned,
            loops_missing = s.loops_missing,
            retransmits = s.retransmits,
            unacknowledged_sent = s.unacknowledged_sent,
            replies = s.replies,
            acks = s.acks,
            unknown_deliveries = s.unknown_deliveries,
            duplicate_deliveries = s.duplicate_deliveries,
            foreign_deliveries = s.foreign_deliveries,
            bad_replies = s.bad_replies,
            reply_keys_expired = s.reply_keys_expired,
            reply_blocks_sent = s.reply_blocks_sent,
            reply_blocks_prebuilt = s.reply_blocks_prebuilt,
            prebuilt_blocks_discarded = s.prebuilt_blocks_discarded,
            packets_built_by_workers = handle.stats.builders.packets_built.load(Ordering::Relaxed),
            packets_unbuilt = handle
                .stats
                .builders
                .packets_unbuilt
                .load(Ordering::Relaxed),
            hop_tickets = s.hop_tickets,
            gateway_tickets = s.gateway_tickets,
            gateway_frames = s.gateway_frames,
            frames_dropped = handle.stats.frames_dropped.load(Ordering::Relaxed),
            gateway_connect_failures = handle
                .stats
                .gateway_connect_failures
                .load(Ordering::Relaxed),
            gateway_key_refused = handle.stats.gateway_key_refused.load(Ordering::Relaxed),
            deliveries_dropped = handle.stats.deliveries_dropped.load(Ordering::Relaxed),
            dropped_deliveries_paid = s.dropped_deliveries_paid,
            deliveries_dropped_unpaid = handle
                .stats
                .deliveries_dropped_unpaid
                .load(Ordering::Relaxed),
            "session"
        );
        if last {
            return;
        }
        if s.loops_missing > missing {
            tracing::warn!(
                newly_missing = s.loops_missing - missing,
                "loop cover did not come back: relays are dropping packets, or the network is under attack"
            );
            missing = s.loops_missing;
        }
    }
}

/// Whether a consensus can carry traffic: a gateway, an exit, and a mix in each layer.
/// Whether `c` offers this client a gateway, a mix path and an exit under its path rules
/// (its price cap and performance floor included); the path error says what is missing.
fn usable(c: &Consensus, rules: &PathRules) -> murmur_protocol::Result<()> {
    let s = PathSelector::new(c, *rules);
    let mut rng = rand::rng();
    s.choose_gateway(&mut rng)?;
    s.any_exit()?;
    s.mix_path(&mut rng, &[])?;
    Ok(())
}

/// The session a new proxy connection should use (the latest one).
#[derive(Clone)]
pub struct SwitchableSession {
    rx: watch::Receiver<Option<SessionHandle>>,
    first: SessionHandle,
}

impl SwitchableSession {
    /// Always `session` (for tests).
    #[cfg(test)]
    pub(crate) fn fixed(session: SessionHandle) -> SwitchableSession {
        let (_, rx) = watch::channel(None);
        SwitchableSession { rx, first: session }
    }

    /// The current session.
    pub fn current(&self) -> SessionHandle {
        self.rx
            .borrow()
            .clone()
            .unwrap_or_else(|| self.first.clone())
    }
}
