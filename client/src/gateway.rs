//! The client's WebSocket to its gateway: sends the session's frames, hands deliveries back,
//! reconnects with backoff. After repeated failures it gives up so the client can move to
//! another gateway.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use murmur_protocol::control::Control;
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::packet::Address;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::sync::CancellationToken;

use crate::driver::{Cmd, SessionHandle};

/// Consecutive failed connection attempts before the gateway is declared dead.
pub const MAX_FAILURES: u32 = 6;

/// The longest any one step with the gateway (connect, hello, welcome, a frame's send) may
/// take. A gateway that stops reading (hung, not dead) would otherwise stall the link forever:
/// a send into a full TCP buffer never returns.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the link stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum LinkEnd {
    Shutdown,
    GatewayDead,
}

/// Keeps the WebSocket to `gateway` up until shutdown; `connected` says whether it is up.
pub async fn run(
    gateway: SocketAddr,
    address: Address,
    mut frames: mpsc::Receiver<Frame>,
    session: SessionHandle,
    connected: watch::Sender<bool>,
    shutdown: CancellationToken,
) -> LinkEnd {
    let mut failures = 0u32;
    let mut backoff = Duration::from_millis(100);
    loop {
        if shutdown.is_cancelled() {
            return LinkEnd::Shutdown;
        }
        match session_once(
            gateway,
            address,
            &mut frames,
            &session,
            &connected,
            &shutdown,
        )
        .await
        {
            Ok(()) => return LinkEnd::Shutdown,
            Err(Progress::Connected(reason)) => {
                tracing::info!(reason, "gateway link dropped; reconnecting");
                failures = 0;
                backoff = Duration::from_millis(100);
            }
            Err(Progress::NotConnected(reason)) => {
                failures += 1;
                tracing::info!(reason, failures, "cannot reach the gateway");
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

enum Progress {
    /// The session had been up (the failure count starts again).
    Connected(&'static str),
    NotConnected(&'static str),
}

async fn session_once(
    gateway: SocketAddr,
    address: Address,
    frames: &mut mpsc::Receiver<Frame>,
    session: &SessionHandle,
    connected: &watch::Sender<bool>,
    shutdown: &CancellationToken,
) -> Result<(), Progress> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(FRAME_LEN))
        .max_frame_size(Some(FRAME_LEN));
    let url = format!("ws://{gateway}/");
    let connect = tokio_tungstenite::connect_async_with_config(url, Some(config), true);
    let (mut ws, _) = tokio::time::timeout(STEP_TIMEOUT, connect)
        .await
        .map_err(|_| Progress::NotConnected("connect timed out"))?
        .map_err(|_| Progress::NotConnected("connect failed"))?;
    let hello = Frame::Control(Control::Hello { address }.encode())
        .encode()
        .map_err(|_| Progress::NotConnected("hello encode"))?;
    tokio::time::timeout(
        STEP_TIMEOUT,
        ws.send(Message::Binary(hello.to_vec().into())),
    )
    .await
    .map_err(|_| Progress::NotConnected("hello send timed out"))?
    .map_err(|_| Progress::NotConnected("hello send failed"))?;
    // The gateway answers hello with Welcome before anything else.
    match tokio::time::timeout(STEP_TIMEOUT, ws.next()).await {
        Ok(Some(Ok(Message::Binary(b)))) => match Frame::decode(&b) {
            Ok(Frame::Control(c)) if matches!(Control::decode(&c), Ok(Control::Welcome { .. })) => {
            }
            _ => return Err(Progress::NotConnected("no welcome")),
        },
        _ => return Err(Progress::NotConnected("no welcome")),
    }
    let _ = connected.send(true);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = tokio::time::timeout(STEP_TIMEOUT, ws.close(None)).await;
                return Ok(());
            }
            frame = frames.recv() => {
                let Some(frame) = frame else { return Ok(()) };
                let bytes = frame.encode().map_err(|_| Progress::Connected("frame encode"))?;
                tokio::time::timeout(STEP_TIMEOUT, ws.send(Message::Binary(bytes.to_vec().into())))
                    .await
                    .map_err(|_| Progress::Connected("send timed out"))?
                    .map_err(|_| Progress::Connected("send failed"))?;
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Binary(b))) => match Frame::decode(&b) {
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
                    _ => tracing::debug!("unexpected frame from the gateway"),
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(_)) | None => return Err(Progress::Connected("gateway closed")),
                Some(Err(_)) => return Err(Progress::Connected("websocket error")),
            },
        }
    }
}
