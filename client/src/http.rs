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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use murmur_protocol::stream::Target;
    use tokio::net::TcpListener;

    /// Sends `request` to a fresh connection and runs the handshake on it; returns its
    /// result and what the client read back.
    async fn handshake_of(request: &[u8]) -> (Result<Opening, &'static str>, Vec<u8>, SocksStats) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(request).await.unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        let stats = SocksStats::default();
        let result = handshake(&mut server, &stats).await;
        drop(server);
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.unwrap();
        (result, answer, stats)
    }

    #[tokio::test]
    async fn bytes_behind_the_connect_are_kept_for_the_stream() {
        let mut request =
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n".to_vec();
        request.extend(b"\x16\x03\x01 a ClientHello");
        let (result, answer, _) = handshake_of(&request).await;
        let opening = result.unwrap();
        assert_eq!(opening.target, Target::Host("example.com".into(), 443));
        assert_eq!(opening.early_data, b"\x16\x03\x01 a ClientHello");
        assert!(
            answer.is_empty(),
            "nothing is answered before the stream opens"
        );
    }

    #[tokio::test]
    async fn refusals_are_answered_and_counted_by_kind() {
        let (result, answer, stats) =
            handshake_of(b"GET http://example.com/ HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc").await;
        assert!(result.is_err());
        assert!(answer.starts_with(b"HTTP/1.1 405 "));
        assert_eq!(stats.http_refused_not_connect.load(Ordering::Relaxed), 1);
        let (_, answer, stats) = handshake_of(b"CONNECT nowhere HTTP/1.1\r\n\r\n").await;
        assert!(answer.starts_with(b"HTTP/1.1 400 "));
        assert_eq!(stats.http_refused_malformed.load(Ordering::Relaxed), 1);
    }
}
