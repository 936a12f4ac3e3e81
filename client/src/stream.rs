//! What both local proxies (SOCKS5 in `socks`, HTTP CONNECT in `http`) do once their
//! handshake named a target: open the stream through the session, wait for the exit, answer
//! in the proxy's own words, then move bytes both ways with flow control. Also the accept
//! loop they share (connection cap, handshake timeout).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use murmur_protocol::http_connect::{self, Status};
use murmur_protocol::session::{Event, SessionError};
use murmur_protocol::socks::{connect_reply, reply};
use murmur_protocol::stream::{StreamId, Target};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::{Cmd, SessionHandle};
use crate::proxy::SwitchableSession;

/// Bounds and timeouts of the proxies.
#[derive(Clone, Debug)]
pub struct SocksLimits {
    /// Connections open at once, over both proxies.
    pub max_connections: usize,
    /// Time allowed for the SOCKS handshake or the HTTP request head.
    pub handshake_timeout: Duration,
    /// Time allowed for the exit to answer an open.
    pub open_timeout: Duration,
}

/// What to do with a target that is an IP address (Tor's `SafeSocks`): the application
/// resolved the name itself, outside the mixnet, so the lookup leaked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SafeSocks {
    /// Log a warning (without the address) and open the stream.
    #[default]
    Warn,
    /// Refuse it: SOCKS5 reply 2 (not allowed), HTTP 403.
    Refuse,
    /// Open it without a word.
    Off,
}

/// The warning logged for each IP-address target under [`SafeSocks::Warn`]; it names no
/// address, since logs never carry destinations.
pub const IP_LITERAL_WARNING: &str = "an application sent an IP address, not a name: it \
     resolved the name itself, which leaks the lookup outside the mixnet (use socks5h:// or \
     curl --socks5-hostname; safe = \"refuse\" under [socks] refuses such requests)";

/// Counters of the proxies (refusals by reason, streams). `accepted` and
/// `refused_handshake` are the SOCKS5 proxy's; the `http_` ones the HTTP proxy's; the rest
/// count both.
#[derive(Default, Debug)]
pub struct SocksStats {
    pub accepted: AtomicU64,
    pub refused_handshake: AtomicU64,
    pub refused_by_exit: AtomicU64,
    pub opened: AtomicU64,
    pub over_limit: AtomicU64,
    pub http_accepted: AtomicU64,
    /// Plain-HTTP requests (any method but CONNECT), answered 405.
    pub http_refused_not_connect: AtomicU64,
    /// Malformed requests, answered 400.
    pub http_refused_malformed: AtomicU64,
    /// Request heads over the size or header bound, answered 431.
    pub http_refused_too_large: AtomicU64,
    /// Targets given as an IP address (warned about or refused under `safe`).
    pub ip_literal_targets: AtomicU64,
    /// Of those, the ones refused (`safe = "refuse"`).
    pub ip_literal_refused: AtomicU64,
}

/// Which proxy a connection came to: how it is greeted and how it is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    Socks,
    Http,
}

/// Why a stream was not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The session or the exit refused it, with this SOCKS5 reply code.
    Code(u8),
    /// The session is busy or at its cap of streams or exit sessions.
    Busy,
    /// The target is an IP address and `safe = "refuse"`.
    IpLiteral,
    /// The client has spent its `max_spend`: SOCKS5 reply 2, HTTP 402.
    SpendCap,
}

impl Proxy {
    /// What the application is told when the stream is open.
    pub fn success(self) -> Vec<u8> {
        match self {
            Proxy::Socks => connect_reply(reply::SUCCEEDED),
            Proxy::Http => http_connect::CONNECT_ESTABLISHED.to_vec(),
        }
    }

    /// What the application is told when it is not.
    pub fn refusal(self, why: Refusal) -> Vec<u8> {
        match (self, why) {
            (Proxy::Socks, Refusal::Code(code)) => connect_reply(code),
            (Proxy::Socks, Refusal::Busy) => connect_reply(reply::GENERAL_FAILURE),
            (Proxy::Socks, Refusal::IpLiteral | Refusal::SpendCap) => {
                connect_reply(reply::NOT_ALLOWED)
            }
            (Proxy::Http, Refusal::Code(code)) => {
                let (status, body) = http_connect::refusal_status(code);
                http_connect::response(status, body)
            }
            (Proxy::Http, Refusal::Busy) => http_connect::response(
                Status::SERVICE_UNAVAILABLE,
                "busy: the session is at its cap of streams; try again shortly\n",
            ),
            (Proxy::Http, Refusal::SpendCap) => http_connect::response(
                Status::PAYMENT_REQUIRED,
                "the spending cap is reached (max_spend): no new stream opens; \
                 murmur-client status says what was spent\n",
            ),
            (Proxy::Http, Refusal::IpLiteral) => http_connect::response(
                Status::FORBIDDEN,
                "not allowed: the application sent an IP address, not a name (it resolved \
                 the name itself, outside the mixnet), and this proxy refuses that \
                 (safe = \"refuse\")\n",
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Proxy::Socks => "SOCKS",
            Proxy::Http => "HTTP",
        }
    }
}

/// What a handshake produced: the stream to open and the bytes the application already
/// sent behind its request (to be forwarded first, not lost).
pub struct Opening {
    pub target: Target,
    pub isolation: Option<(Vec<u8>, Vec<u8>)>,
    pub early_data: Vec<u8>,
}

/// What every connection of both proxies shares.
pub struct ProxyShared {
    pub limits: SocksLimits,
    pub stats: Arc<SocksStats>,
    pub safe: SafeSocks,
    /// Connections open at once, over both proxies.
    pub slots: Arc<Semaphore>,
}

/// Serves `proxy` on `listener` until shutdown: each connection on its own task, within the
/// connection cap, its handshake within the timeout.
pub async fn serve(
    proxy: Proxy,
    listener: TcpListener,
    sessions: SwitchableSession,
    shared: Arc<ProxyShared>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    loop {
        let socket = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, proxy = proxy.name(), "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = shared.slots.clone().try_acquire_owned() else {
            shared.stats.over_limit.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let accepted = match proxy {
            Proxy::Socks => &shared.stats.accepted,
            Proxy::Http => &shared.stats.http_accepted,
        };
        accepted.fetch_add(1, Ordering::Relaxed);
        let (session, shared, shutdown) = (sessions.current(), shared.clone(), shutdown.clone());
        tracker.spawn(async move {
            let _permit = permit;
            let _ = socket.set_nodelay(true);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(proxy, socket, session, &shared) => {
                    if let Err(reason) = r {
                        tracing::debug!(reason, proxy = proxy.name(), "connection ended");
                    }
                }
            }
        });
    }
}

async fn connection(
    proxy: Proxy,
    mut socket: TcpStream,
    session: SessionHandle,
    shared: &ProxyShared,
) -> Result<(), &'static str> {
    let handshake = async {
        match proxy {
            Proxy::Socks => crate::socks::handshake(&mut socket, &shared.stats).await,
            Proxy::Http => crate::http::handshake(&mut socket, &shared.stats).await,
        }
    };
    let opening = tokio::time::timeout(shared.limits.handshake_timeout, handshake)
        .await
        .map_err(|_| "handshake timed out")??;
    open_and_relay(proxy, socket, opening, session, shared).await
}

/// Reads from `socket` into `buf` once, keeping `buf` within `max` bytes.
pub async fn read_more(
    socket: &mut TcpStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> Result<(), &'static str> {
    let mut chunk = [0u8; 1024];
    let room = max.saturating_sub(buf.len()).clamp(1, chunk.len());
    let n = socket
        .read(&mut chunk[..room])
        .await
        .map_err(|_| "read failed")?;
    if n == 0 {
        return Err("client closed during handshake");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// Applies the `safe` policy to a target; `Err` if it must be refused.
fn check_target(target: &Target, shared: &ProxyShared) -> Result<(), Refusal> {
    if !matches!(target, Target::Addr(_)) || shared.safe == SafeSocks::Off {
        return Ok(());
    }
    shared
        .stats
        .ip_literal_targets
        .fetch_add(1, Ordering::Relaxed);
    if shared.safe == SafeSocks::Refuse {
        shared
            .stats
            .ip_literal_refused
            .fetch_add(1, Ordering::Relaxed);
        return Err(Refusal::IpLiteral);
    }
    tracing::warn!("{IP_LITERAL_WARNING}");
    Ok(())
}

/// Opens `opening` through the session, answers the application (success or why not), then
/// relays bytes both ways until both sides are done.
pub async fn open_and_relay(
    proxy: Proxy,
    mut socket: TcpStream,
    opening: Opening,
    session: SessionHandle,
    shared: &ProxyShared,
) -> Result<(), &'static str> {
    let stats = &shared.stats;
    if let Err(why) = check_target(&opening.target, shared) {
        let _ = socket.write_all(&proxy.refusal(why)).await;
        return Err("an IP address target was refused (safe = refuse)");
    }
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    if !session.send(Cmd::Open {
        target: opening.target,
        isolation: opening.isolation,
        events: events_tx,
        reply: reply_tx,
    }) {
        let _ = socket.write_all(&proxy.refusal(Refusal::Busy)).await;
        return Err("session busy");
    }
    let stream = match reply_rx.await {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => {
            // No exit allows it, no path, or the session is full: say so at once.
            stats.refused_by_exit.fetch_add(1, Ordering::Relaxed);
            let (why, reason) = match e {
                SessionError::NoExit => (
                    Refusal::Code(e.socks_code()),
                    "no exit allows the destination",
                ),
                SessionError::TooManyExitSessions { .. } | SessionError::TooManyStreams { .. } => {
                    (Refusal::Busy, "the session is at its cap")
                }
                SessionError::SpendLimit { .. } => {
                    (Refusal::SpendCap, "the spending cap is reached")
                }
                _ => (
                    Refusal::Code(e.socks_code()),
                    "the session cannot open the stream",
                ),
            };
            let _ = socket.write_all(&proxy.refusal(why)).await;
            return Err(reason);
        }
        Err(_) => return Err("session stopped"),
    };
    let opened = tokio::time::timeout(shared.limits.open_timeout, events.recv()).await;
    let refused = |code| proxy.refusal(Refusal::Code(code));
    match opened {
        Ok(Some(Event::Opened(_))) => {}
        Ok(Some(Event::Refused(_, code) | Event::Reset(_, code))) => {
            stats.refused_by_exit.fetch_add(1, Ordering::Relaxed);
            let _ = socket.write_all(&refused(code)).await;
            return Err("exit refused the stream");
        }
        Ok(Some(Event::Failed(_, why))) => {
            // The session gave up (no route, the exit left, nothing acknowledged).
            let _ = socket.write_all(&refused(why.socks_code())).await;
            return Err("the session could not reach the exit");
        }
        Ok(_) => {
            let _ = socket.write_all(&refused(reply::GENERAL_FAILURE)).await;
            session.send(Cmd::Abort { stream });
            return Err("unexpected event before open");
        }
        Err(_) => {
            let _ = socket.write_all(&refused(reply::TTL_EXPIRED)).await;
            session.send(Cmd::Abort { stream });
            return Err("exit did not answer in time");
        }
    }
    stats.opened.fetch_add(1, Ordering::Relaxed);
    socket
        .write_all(&proxy.success())
        .await
        .map_err(|_| "write failed")?;

    // Relay bytes both ways; what the application sent behind its request goes first.
    let (mut rd, mut wr) = socket.into_split();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut unsent = opening.early_data;
    write_to_session(&session, stream, &mut unsent).await?;
    let mut app_eof = false;
    let mut peer_eof = false;
    loop {
        if app_eof && peer_eof {
            return Ok(());
        }
        tokio::select! {
            // Read from the application only while the session has room for it.
            r = rd.read(&mut chunk), if !app_eof && unsent.is_empty() => match r {
                Ok(0) | Err(_) => {
                    app_eof = true;
                    session.send(Cmd::Close { stream });
                }
                Ok(n) => {
                    unsent.extend_from_slice(&chunk[..n]);
                    write_to_session(&session, stream, &mut unsent).await?;
                }
            },
            ev = events.recv() => match ev {
                Some(Event::Data(_, bytes)) => {
                    wr.write_all(&bytes).await.map_err(|_| "application write failed")?;
                    session.send(Cmd::Consumed { stream, n: bytes.len() });
                }
                Some(Event::Eof(_)) => {
                    peer_eof = true;
                    let _ = wr.shutdown().await;
                }
                Some(Event::Writable(_)) => write_to_session(&session, stream, &mut unsent).await?,
                Some(Event::Reset(..) | Event::Refused(..) | Event::Failed(..)) | None => {
                    return Err("stream reset");
                }
                Some(Event::Opened(_)) => {}
            },
        }
    }
}

/// Hands `unsent` to the session; what it cannot take yet stays for the next `Writable`.
async fn write_to_session(
    session: &SessionHandle,
    stream: StreamId,
    unsent: &mut Vec<u8>,
) -> Result<(), &'static str> {
    if unsent.is_empty() {
        return Ok(());
    }
    let (tx, rx) = oneshot::channel();
    if !session.send(Cmd::Write {
        stream,
        bytes: unsent.clone(),
        reply: tx,
    }) {
        return Err("session busy");
    }
    let taken = rx.await.map_err(|_| "session stopped")?;
    unsent.drain(..taken.min(unsent.len()));
    Ok(())
}

/// Where a proxy listens, and whether it may listen beyond loopback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listener {
    pub addr: SocketAddr,
    /// Set only by the config (`allow_non_loopback = true` under `[socks]` or `[http]`).
    pub allow_non_loopback: bool,
}

impl Listener {
    /// On loopback only: a proxy anyone can reach is an open proxy that spends the user's
    /// pot. Elsewhere only when the config allows it, with a warning.
    pub fn check(&self, table: &str) -> anyhow::Result<()> {
        if self.addr.ip().is_loopback() {
            return Ok(());
        }
        if !self.allow_non_loopback {
            anyhow::bail!(
                "the {table} proxy would listen on {}, which is not loopback: it would be an \
                 open proxy that spends your pot; set allow_non_loopback = true under [{table}] \
                 in the client config to listen there anyway (a flag alone cannot)",
                self.addr
            );
        }
        tracing::warn!(
            listen = %self.addr,
            "the {table} proxy listens beyond loopback (allow_non_loopback = true): anyone who \
             can reach it spends your pot"
        );
        Ok(())
    }
}

/// Checks both proxies' listeners ([`Listener::check`]).
pub fn check_listeners(socks: &Listener, http: Option<&Listener>) -> anyhow::Result<()> {
    socks.check("socks")?;
    http.map_or(Ok(()), |h| h.check("http"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn refusals_are_answered_in_each_proxys_words() {
        assert_eq!(Proxy::Socks.refusal(Refusal::IpLiteral), connect_reply(2));
        assert_eq!(Proxy::Socks.refusal(Refusal::Busy), connect_reply(1));
        assert_eq!(Proxy::Socks.refusal(Refusal::Code(5)), connect_reply(5));
        let status = |r| {
            let text = String::from_utf8(Proxy::Http.refusal(r)).unwrap();
            text.split(' ').nth(1).unwrap().parse::<u16>().unwrap()
        };
        assert_eq!(status(Refusal::IpLiteral), 403);
        assert_eq!(status(Refusal::Busy), 503);
        assert_eq!(status(Refusal::SpendCap), 402);
        assert_eq!(status(Refusal::Code(2)), 403);
        assert_eq!(status(Refusal::Code(4)), 502);
        assert_eq!(status(Refusal::Code(6)), 504);
        assert!(Proxy::Http.success().starts_with(b"HTTP/1.1 200 "));
    }

    #[test]
    fn ip_literal_targets_follow_the_safe_setting() {
        let shared = |safe| ProxyShared {
            limits: SocksLimits {
                max_connections: 1,
                handshake_timeout: Duration::from_secs(1),
                open_timeout: Duration::from_secs(1),
            },
            stats: Arc::default(),
            safe,
            slots: Arc::new(Semaphore::new(1)),
        };
        let ip = Target::Addr("127.0.0.1:80".parse().unwrap());
        let name = Target::Host("localhost".into(), 80);
        let warn = shared(SafeSocks::Warn);
        assert_eq!(check_target(&ip, &warn), Ok(()));
        assert_eq!(check_target(&name, &warn), Ok(()));
        assert_eq!(warn.stats.ip_literal_targets.load(Ordering::Relaxed), 1);
        let refuse = shared(SafeSocks::Refuse);
        assert_eq!(check_target(&ip, &refuse), Err(Refusal::IpLiteral));
        assert_eq!(check_target(&name, &refuse), Ok(()));
        assert_eq!(refuse.stats.ip_literal_refused.load(Ordering::Relaxed), 1);
        let off = shared(SafeSocks::Off);
        assert_eq!(check_target(&ip, &off), Ok(()));
        assert_eq!(off.stats.ip_literal_targets.load(Ordering::Relaxed), 0);
        assert!(!IP_LITERAL_WARNING.contains("127.0.0.1"));
    }

    /// Both proxies share one accept loop: a socket that never finishes its handshake holds
    /// a slot only until the handshake timeout, and past the connection cap a new socket is
    /// closed at once and counted.
    #[tokio::test]
    async fn a_stalled_handshake_holds_its_slot_only_until_the_timeout() {
        let shared = Arc::new(ProxyShared {
            limits: SocksLimits {
                max_connections: 1,
                handshake_timeout: Duration::from_millis(1500),
                open_timeout: Duration::from_secs(1),
            },
            stats: Arc::default(),
            safe: SafeSocks::Warn,
            slots: Arc::new(Semaphore::new(1)),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, tracker) = (CancellationToken::new(), TaskTracker::new());
        let sessions = SwitchableSession::fixed(SessionHandle::detached());
        tokio::spawn(serve(
            Proxy::Http,
            listener,
            sessions,
            shared.clone(),
            shutdown.clone(),
            tracker.clone(),
        ));
        let ended_within = |mut s: TcpStream, within: Duration| async move {
            let mut byte = [0u8; 1];
            matches!(
                tokio::time::timeout(within, s.read(&mut byte)).await,
                Ok(Ok(0) | Err(_))
            )
        };
        // The first socket says nothing and holds the only slot...
        let stalled = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // ...so the second is closed at once, and counted.
        let second = TcpStream::connect(addr).await.unwrap();
        // (Within less than the handshake timeout, which would also end it.)
        assert!(ended_within(second, Duration::from_millis(1000)).await);
        assert_eq!(shared.stats.over_limit.load(Ordering::Relaxed), 1);
        // The stalled one ends at the handshake timeout, and its slot is free again.
        assert!(ended_within(stalled, Duration::from_secs(5)).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(shared.slots.available_permits(), 1);
        shutdown.cancel();
    }

    #[test]
    fn listeners_beyond_loopback_need_the_config_to_say_so() {
        let at = |addr: &str, allow_non_loopback| Listener {
            addr: addr.parse().unwrap(),
            allow_non_loopback,
        };
        assert!(at("127.0.0.1:1080", false).check("socks").is_ok());
        assert!(at("[::1]:1080", false).check("socks").is_ok());
        let err = at("0.0.0.0:8118", false)
            .check("http")
            .unwrap_err()
            .to_string();
        assert!(err.contains("open proxy that spends your pot"), "{err}");
        assert!(
            err.contains("allow_non_loopback = true under [http]"),
            "{err}"
        );
        assert!(at("0.0.0.0:8118", true).check("http").is_ok());
    }
}
