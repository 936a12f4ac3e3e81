//! The Noise XK handshake of relay links over an async byte stream, shared by the relays'
//! links and the authority's prober (both speak the relay-link protocol of
//! `murmur_protocol::link`). Errors are metric labels.

use murmur_protocol::link::DIALER_FINISH_LEN;
use murmur_protocol::link::{
    DIALER_HELLO_LEN, Dialer, LISTENER_HELLO_LEN, LinkKind, LinkPublic, LinkSecret, Listener,
    Transport,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The dialer's side on `stream`, expecting the listener to hold `remote`.
pub async fn dial_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    local: &LinkSecret,
    remote: &LinkPublic,
) -> Result<Transport, &'static str> {
    let (dialer, hello) = Dialer::start(LinkKind::Relay, local, remote, &mut rand::rng())
        .map_err(|_| "handshake_error")?;
    put(stream, &hello).await?;
    let answer = take::<LISTENER_HELLO_LEN, _>(stream).await?;
    let (transport, last) = dialer.finish(&answer).map_err(|_| "wrong_key")?;
    put(stream, &last).await?;
    Ok(transport)
}

/// The listener's side on `stream`: the transport, whose `remote()` is the dialer's proven
/// key (the caller decides whether that key may use the link).
pub async fn accept_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    local: &LinkSecret,
) -> Result<Transport, &'static str> {
    let hello = take::<DIALER_HELLO_LEN, _>(stream).await?;
    let (listener, answer) = Listener::accept(LinkKind::Relay, local, &hello, &mut rand::rng())
        .map_err(|_| "link_handshake")?;
    put(stream, &answer).await?;
    let last = take::<DIALER_FINISH_LEN, _>(stream).await?;
    listener.finish(&last).map_err(|_| "link_handshake")
}

/// Writes one handshake message; failing, the peer went away.
async fn put<S: AsyncWrite + Unpin>(stream: &mut S, message: &[u8]) -> Result<(), &'static str> {
    stream
        .write_all(message)
        .await
        .map_err(|_| "handshake_closed")
}

/// Reads exactly `N` bytes; failing, the peer went away.
pub async fn take<const N: usize, S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<[u8; N], &'static str> {
    let mut message = [0u8; N];
    stream
        .read_exact(&mut message)
        .await
        .map_err(|_| "handshake_closed")?;
    Ok(message)
}
