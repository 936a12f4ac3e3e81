//! The HTTP CONNECT proxy on localhost: the sans-IO request parser from
//! `murmur_protocol::http_connect` over a connection's socket; what follows it is
//! `stream`'s, shared with the SOCKS5 proxy (the same session, isolation and refusals,
//! answered as HTTP statuses).

use std::sync::atomic::Ordering;

use murmur_protocol::http_connect::{HttpConnect, HttpConnectError, MAX_HEAD, Step};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::stream::{Opening, SocksStats, read_more};

/// Reads the CONNECT request head from `socket`; refusals are answered and counted here.
/// What the client sent behind the head (its TLS ClientHello, often) is kept for the stream.
pub async fn handshake(
    socket: &mut TcpStream,
    stats: &SocksStats,
) -> Result<Opening, &'static str> {
    let mut parser = HttpConnect::new();
    let mut buf = Vec::with_capacity(1024);
    loop {
        match parser.step(&mut buf) {
            // The parser refuses a buffer of MAX_HEAD bytes without a head, so this stays
            // within it.
            Step::NeedMore => read_more(socket, &mut buf, MAX_HEAD).await?,
            Step::Request(req) => {
                return Ok(Opening {
                    target: req.target,
                    isolation: req.isolation,
                    early_data: buf,
                });
            }
            Step::Refuse { response, error } => {
                let counter = match error {
                    HttpConnectError::NotConnect(_) => &stats.http_refused_not_connect,
                    HttpConnectError::TooLarge => &stats.http_refused_too_large,
                    _ => &stats.http_refused_malformed,
                };
                counter.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%error, "HTTP request refused");
                let _ = socket.write_all(&response).await;
                let _ = socket.shutdown().await;
                drain_briefly(socket).await;
                return Err("refused");
            }
        }
    }
}

/// Reads and drops what the client still sends (a request body, say), at most 64 KiB for
/// at most a second: closing a socket with unread bytes resets it, and the client may then
/// lose the refusal it was just sent.
async fn drain_briefly(socket: &mut TcpStream) {
    let drain = async {
        let mut chunk = [0u8; 4096];
        for _ in 0..16 {
            if !matches!(socket.read(&mut chunk).await, Ok(n) if n > 0) {
                return;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
}
