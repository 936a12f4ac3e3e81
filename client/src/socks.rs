//! The SOCKS5 proxy on localhost: the sans-IO handshake from `murmur_protocol::socks` over a
//! connection's socket; what follows it is `stream`'s, shared with the HTTP proxy.

use std::sync::atomic::Ordering;

use murmur_protocol::socks::{SocksHandshake, Step};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::stream::{Opening, SocksStats, read_more};

/// The most handshake bytes buffered at once (each message is taken out as it is read; the
/// longest, a user/password negotiation, is 513 bytes).
const MAX_HANDSHAKE_BUFFER: usize = 1024;

/// Runs the SOCKS5 handshake on `socket` up to its CONNECT request; refusals are answered
/// and counted here.
pub async fn handshake(
    socket: &mut TcpStream,
    stats: &SocksStats,
) -> Result<Opening, &'static str> {
    let mut handshake = SocksHandshake::new();
    let mut buf = Vec::with_capacity(512);
    loop {
        match handshake.step(&mut buf) {
            Step::NeedMore => {
                if buf.len() >= MAX_HANDSHAKE_BUFFER {
                    return Err("handshake too long");
                }
                read_more(socket, &mut buf, MAX_HANDSHAKE_BUFFER).await?;
            }
            Step::Send(bytes) => socket.write_all(&bytes).await.map_err(|_| "write failed")?,
            Step::Request(req) => {
                return Ok(Opening {
                    target: req.target,
                    isolation: req.isolation,
                    // A client that did not wait for the reply before sending.
                    early_data: buf,
                });
            }
            Step::Refuse { reply, error } => {
                stats.refused_handshake.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "SOCKS request refused");
                let _ = socket.write_all(&reply).await;
                return Err("refused");
            }
        }
    }
}
