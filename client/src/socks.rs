//! The SOCKS5 server on localhost: one task per connection, speaking the sans-IO handshake
//! from `murmur_protocol::socks` and then moving bytes between the socket and the session.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use murmur_protocol::session::{Event, SessionError};
use murmur_protocol::socks::{SocksHandshake, Step, connect_reply, reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::driver::{Cmd, SessionHandle};

/// Bounds and timeouts of the proxy.
#[derive(Clone, Debug)]
pub struct SocksLimits {
    pub max_connections: usize,
    /// Time allowed for the SOCKS handshake.
    pub handshake_timeout: Duration,
    /// Time allowed for the exit to answer an open.
    pub open_timeout: Duration,
}

/// Counters of the proxy (SOCKS refusals by reason, streams).
#[derive(Default, Debug)]
pub struct SocksStats {
    pub accepted: AtomicU64,
    pub refused_handshake: AtomicU64,
    pub refused_by_exit: AtomicU64,
    pub opened: AtomicU64,
    pub over_limit: AtomicU64,
}

/// Serves SOCKS5 on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    sessions: crate::proxy::SwitchableSession,
    limits: SocksLimits,
    stats: Arc<SocksStats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "SOCKS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            stats.over_limit.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let (session, limits, stats, shutdown) = (
            sessions.current(),
            limits.clone(),
            stats.clone(),
            shutdown.clone(),
        );
        tracker.spawn(async move {
            let _permit = permit;
            let _ = stream.set_nodelay(true);
            tokio::select! {
                _ = shutdown.cancelled() => {}
                r = connection(stream, session, limits, stats) => {
                    if let Err(reason) = r {
                        tracing::debug!(reason, "SOCKS connection ended");
                    }
                }
            }
        });
    }
}

async fn connection(
    mut socket: TcpStream,
    session: SessionHandle,
    limits: SocksLimits,
    stats: Arc<SocksStats>,
) -> Result<(), &'static str> {
    // The handshake.
    let mut handshake = SocksHandshake::new();
    let mut buf = Vec::with_capacity(512);
    let request = tokio::time::timeout(limits.handshake_timeout, async {
        let mut chunk = [0u8; 512];
        loop {
            match handshake.step(&mut buf) {
                Step::NeedMore => {
                    let n = socket.read(&mut chunk).await.map_err(|_| "read failed")?;
                    if n == 0 {
                        return Err("client closed during handshake");
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    if buf.len() > 1024 {
                        return Err("handshake too long");
                    }
                }
                Step::Send(bytes) => socket.write_all(&bytes).await.map_err(|_| "write failed")?,
                Step::Request(req) => return Ok(req),
                Step::Refuse { reply, error } => {
                    stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(%error, "SOCKS request refused");
                    let _ = socket.write_all(&reply).await;
                    return Err("refused");
                }
            }
        }
    })
    .await
    .map_err(|_| "handshake timed out")??;

    // Open the stream through the mixnet.
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (reply_tx, reply_rx) = oneshot::channel();
    if !session.send(Cmd::Open {
        target: request.target,
        isolation: request.isolation,
        events: events_tx,
        reply: reply_tx,
    }) {
        let _ = socket
            .write_all(&connect_reply(reply::GENERAL_FAILURE))
            .await;
        return Err("session busy");
    }
    let stream = match reply_rx.await {
        Ok(Ok(id)) => id,
        Ok(Err(e)) => {
            // No exit allows it, no path, or the session is full: say so at once.
            stats.refused_by_exit.fetch_add(1, Ordering::Relaxed);
            let _ = socket.write_all(&connect_reply(e.socks_code())).await;
            return Err(match e {
                SessionError::NoExit => "no exit allows the destination",
                SessionError::TooManyExitSessions { .. } | SessionError::TooManyStreams { .. } => {
                    "the session is at its cap"
                }
                _ => "the session cannot open the stream",
            });
        }
        Err(_) => return Err("session stopped"),
    };
    let opened = tokio::time::timeout(limits.open_timeout, events.recv()).await;
    match opened {
        Ok(Some(Event::Opened(_))) => {}
        Ok(Some(Event::Refused(_, code) | Event::Reset(_, code))) => {
            stats.refused_by_exit.fetch_add(1, Ordering::Relaxed);
            let _ = socket.write_all(&connect_reply(code)).await;
            return Err("exit refused the stream");
        }
        Ok(Some(Event::Failed(_, why))) => {
            // The session gave up (no route, the exit left, nothing acknowledged).
            let _ = socket.write_all(&connect_reply(why.socks_code())).await;
            return Err("the session could not reach the exit");
        }
        Ok(_) => {
            let _ = socket
                .write_all(&connect_reply(reply::GENERAL_FAILURE))
                .await;
            session.send(Cmd::Abort { stream });
            return Err("unexpected event before open");
        }
        Err(_) => {
            let _ = socket.write_all(&connect_reply(reply::TTL_EXPIRED)).await;
            session.send(Cmd::Abort { stream });
            return Err("exit did not answer in time");
        }
    }
    stats.opened.fetch_add(1, Ordering::Relaxed);
    socket
        .write_all(&connect_reply(reply::SUCCEEDED))
        .await
        .map_err(|_| "write failed")?;

    // Relay bytes both ways.
    let (mut rd, mut wr) = socket.into_split();
    let mut chunk = vec![0u8; 16 * 1024];
    let mut unsent: Vec<u8> = Vec::new();
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
    stream: murmur_protocol::stream::StreamId,
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
