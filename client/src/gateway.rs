//! The client's link to its gateway (a WebSocket carrying Noise, see
//! [`murmur_client_link`]): sends the session's frames, hands deliveries back,
//! reconnects with backoff. After repeated failures it gives up so the client can move to
//! another gateway.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use murmur_client_link::{ClientLink, LinkFailure};
use murmur_protocol::control::Control;
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkPublic, LinkSecret};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::driver::{Cmd, SessionHandle};

/// Consecutive failed connection attempts before the gateway is declared dead.
pub const MAX_FAILURES: u32 = 6;

/// The longest any one step with the gateway (connect, handshake, hello, welcome, a frame's send) may
/// take. A gateway that stops reading (hung, not dead) would otherwise stall the link forever:
/// a send into a full TCP buffer never returns.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the link stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEnd {
    Shutdown,
    GatewayDead,
}

/// Keeps the link to `gateway` up until shutdown; `connected` says whether it is up.
///
/// `gateway_key` is the gateway's link key from the consensus: a gateway that cannot prove it
/// is refused (a man in the middle, or a stale consensus) and counted as a failed connect.
/// `key` is this session's own link key: its hash is the session's address, and every
/// reconnect proves it again, so only this client can resume the session.
pub async fn run(
    gateway: SocketAddr,
    gateway_key: LinkPublic,
    key: LinkSecret,
    mut frames: mpsc::Receiver<Frame>,
    session: SessionHandle,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> LinkEnd {
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(100);
    let target = Gateway {
        addr: gateway,
        key: gateway_key,
    };
    loop {
        if shutdown.is_cancelled() {
            return LinkEnd::Shutdown;
        }
        match session_once(&target, &key, &mut frames, &session, &connected, &shutdown).await {
            Ok(()) => return LinkEnd::Shutdown,
            Err(Progress::Connected(reason)) => {
                tracing::info!(reason, "gateway link dropped; reconnecting");
                failures = 0;
                backoff = Duration::from_millis(100);
            }
            Err(Progress::NotConnected(reason)) => {
                failures += 1;
                session
                    .stats
                    .gateway_connect_failures
                    .fetch_add(1, Ordering::Relaxed);
                if reason == KEY_NOT_PROVEN {
                    session
                        .stats
                        .gateway_key_refused
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        failures,
                        "the gateway did not prove the link key the consensus lists for it \
                         (a man in the middle, or a stale consensus): refused"
                    );
                } else {
                    tracing::info!(reason, failures, "cannot reach the gateway");
                }
                if failures >= MAX_FAILURES {
                    return LinkEnd::GatewayDead;
                }
            }
        }
        let _ = connected.send(false);
        tokio::select! {
            _ = shutdown.cancelled() => return LinkEnd::Shutdown,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// The failure reason of a gateway that did not prove its key.
const KEY_NOT_PROVEN: &str = "gateway key not proven";

/// Where the gateway is and the key it must prove.
struct Gateway {
    addr: SocketAddr,
    key: LinkPublic,
}

enum Progress {
    /// The session had been up (the failure count starts again).
    Connected(&'static str),
    NotConnected(&'static str),
}

/// Connects, runs the handshake, says hello and waits for the welcome: an open session.
async fn open(gateway: &Gateway, key: &LinkSecret) -> Result<ClientLink, &'static str> {
    let stream = tokio::time::timeout(STEP_TIMEOUT, TcpStream::connect(gateway.addr))
        .await
        .map_err(|_| "connect timed out")?
        .map_err(|_| "connect failed")?;
    tokio::time::timeout(STEP_TIMEOUT, ClientLink::open(stream, &gateway.key, key))
        .await
        .map_err(|_| "handshake timed out")?
        .map_err(|e| match e {
            LinkFailure::GatewayKey => KEY_NOT_PROVEN,
            _ => "handshake or hello failed",
        })
}

async fn session_once(
    gateway: &Gateway,
    key: &LinkSecret,
    frames: &mut mpsc::Receiver<Frame>,
    session: &SessionHandle,
    connected: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) -> Result<(), Progress> {
    let mut link = open(gateway, key).await.map_err(Progress::NotConnected)?;
    let _ = connected.send(true);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(STEP_TIMEOUT, link.close()).await;
                return Ok(());
            }
            frame = frames.recv() => {
                let Some(frame) = frame else { return Ok(()) };
                tokio::time::timeout(STEP_TIMEOUT, link.send(&frame))
                    .await
                    .map_err(|_| Progress::Connected("send timed out"))?
                    .map_err(|_| Progress::Connected("send failed"))?;
            }
            msg = link.recv() => match msg {
                Ok(Frame::Deliver { surb_id, payload }) => {
                    session.send(Cmd::Delivery { surb_id, payload });
                }
                Ok(Frame::Control(c)) => match Control::decode(&c) {
                    Ok(Control::PaymentRefused { reason }) => tracing::warn!(
                        reason = murmur_protocol::control::refusal::label(reason),
                        "the gateway refused a payment"
                    ),
                    Ok(Control::Cutoff) => tracing::warn!(
                        "the gateway cut this client off for falling behind in payment"
                    ),
                    _ => tracing::debug!("unexpected control message from the gateway"),
                },
                Ok(_) => tracing::debug!("unexpected frame from the gateway"),
                Err(LinkFailure::Closed) => return Err(Progress::Connected("gateway closed")),
                Err(e) => return Err(Progress::Connected(e.label())),
            },
        }
    }
}
