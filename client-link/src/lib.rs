#![doc = include_str!("../README.md")]

//! The client↔gateway link: a WebSocket whose binary messages carry a Noise XK handshake
//! ([`murmur_protocol::link`], [`LinkKind::Client`]) and then one sealed frame each.
//!
//! Both ends live here, the gateway's [`ClientLink::accept`] (`murmur-relay`) and the client's
//! [`ClientLink::dial`] (`murmur-client` and the tests), so they cannot drift apart; in a crate
//! of their own so that the client links no relay code.
//!
//! On the wire, after the WebSocket upgrade: the client's 48-byte `e, es`; the gateway's 48-byte
//! `e, ee`; the client's 64-byte `s, se`; from then on every message, both ways, is one frame
//! sealed to [`SEALED_FRAME_LEN`] bytes. A message of any other kind or length, or one that does
//! not open, ends the link. Nothing here panics on what the peer sends, and the WebSocket refuses
//! any message longer than a sealed frame before buffering it.

use futures_util::{SinkExt, StreamExt};
use murmur_protocol::control::Control;
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{
    DIALER_FINISH_LEN, DIALER_HELLO_LEN, Dialer, LISTENER_HELLO_LEN, LinkKind, LinkPublic,
    LinkSecret, Listener, SEALED_FRAME_LEN, Transport, session_address,
};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

/// Why a link failed or ended; [`LinkFailure::label`] names it in metrics and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkFailure {
    /// The WebSocket upgrade failed.
    WebSocket,
    /// The peer closed the link or the socket failed.
    Closed,
    /// A message of the wrong kind or length.
    Malformed,
    /// The gateway did not prove the key the client expected: it could not read the client's
    /// first message (and closed), or its answer does not verify. A man in the middle, or a
    /// gateway whose key is not the one the consensus lists.
    GatewayKey,
    /// The client's handshake messages do not verify at the gateway (made for another key or
    /// link kind, replayed, or altered).
    Handshake,
    /// A sealed message did not open: altered, replayed, reordered or truncated.
    Decrypt,
    /// A frame that does not decode.
    Frame,
}

impl LinkFailure {
    /// A short stable label (the `reason` of `murmur_relay_connections_refused_total`).
    pub fn label(self) -> &'static str {
        match self {
            LinkFailure::WebSocket => "websocket_upgrade_failed",
            LinkFailure::Closed => "closed_in_handshake",
            LinkFailure::Malformed => "message_malformed",
            LinkFailure::GatewayKey => "gateway_key_not_proven",
            LinkFailure::Handshake => "noise_handshake_failed",
            LinkFailure::Decrypt => "link_decrypt",
            LinkFailure::Frame => "frame_malformed",
        }
    }
}

/// The WebSocket limits of both ends: no message or frame longer than a sealed frame (a longer
/// one is refused as its header arrives), and buffers of a few frames rather than tungstenite's
/// 128 KiB defaults, so a held connection costs little memory.
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .max_message_size(Some(SEALED_FRAME_LEN))
        .max_frame_size(Some(SEALED_FRAME_LEN))
        .read_buffer_size(4 * SEALED_FRAME_LEN)
        .write_buffer_size(0)
        .max_write_buffer_size(4 * SEALED_FRAME_LEN)
}

/// An established link: frames go out sealed and come in opened.
pub struct ClientLink {
    ws: WebSocketStream<TcpStream>,
    transport: Transport,
}

impl std::fmt::Debug for ClientLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientLink")
            .field("transport", &self.transport)
            .finish()
    }
}

impl ClientLink {
    /// The client's side: upgrades `stream` (already connected to the gateway) and runs the
    /// handshake with `key`, expecting the gateway to hold `gateway` (its `link_key` in the
    /// consensus). Fails with [`LinkFailure::GatewayKey`] if it does not.
    pub async fn dial(
        stream: TcpStream,
        gateway: &LinkPublic,
        key: &LinkSecret,
    ) -> Result<ClientLink, LinkFailure> {
        let _ = stream.set_nodelay(true);
        let host = stream.peer_addr().map_err(|_| LinkFailure::Closed)?;
        let (mut ws, _) = tokio_tungstenite::client_async_with_config(
            format!("ws://{host}/"),
            stream,
            Some(ws_config()),
        )
        .await
        .map_err(|_| LinkFailure::WebSocket)?;
        let (dialer, hello) = Dialer::start(LinkKind::Client, key, gateway, &mut rand::rng())
            .map_err(|_| LinkFailure::Handshake)?;
        send_bytes(&mut ws, &hello).await?;
        // A gateway without the expected key cannot read the first message and closes.
        let answer = recv_bytes(&mut ws, LISTENER_HELLO_LEN)
            .await
            .map_err(|e| match e {
                LinkFailure::Closed => LinkFailure::GatewayKey,
                e => e,
            })?;
        let (transport, last) = dialer
            .finish(&answer)
            .map_err(|_| LinkFailure::GatewayKey)?;
        send_bytes(&mut ws, &last).await?;
        Ok(ClientLink { ws, transport })
    }

    /// The client's whole opening of a session: [`ClientLink::dial`], then `Hello` with the
    /// address `key` owns ([`session_address`]), then the gateway's `Welcome`.
    pub async fn open(
        stream: TcpStream,
        gateway: &LinkPublic,
        key: &LinkSecret,
    ) -> Result<ClientLink, LinkFailure> {
        let mut link = ClientLink::dial(stream, gateway, key).await?;
        let address = session_address(&key.public());
        link.send(&Frame::Control(Control::Hello { address }.encode()))
            .await?;
        // The gateway answers hello with Welcome before anything else.
        match link.recv().await? {
            Frame::Control(c) if matches!(Control::decode(&c), Ok(Control::Welcome { .. })) => {
                Ok(link)
            }
            _ => Err(LinkFailure::Malformed),
        }
    }

    /// The gateway's side: upgrades `stream` and runs the handshake with the gateway's `key`.
    /// The caller bounds the time this takes; [`ClientLink::remote`] is then the client's
    /// proven key.
    pub async fn accept(stream: TcpStream, key: &LinkSecret) -> Result<ClientLink, LinkFailure> {
        let _ = stream.set_nodelay(true);
        let mut ws = tokio_tungstenite::accept_async_with_config(stream, Some(ws_config()))
            .await
            .map_err(|_| LinkFailure::WebSocket)?;
        let hello = recv_bytes(&mut ws, DIALER_HELLO_LEN).await?;
        let (listener, answer) = Listener::accept(LinkKind::Client, key, &hello, &mut rand::rng())
            .map_err(|_| LinkFailure::Handshake)?;
        send_bytes(&mut ws, &answer).await?;
        let last = recv_bytes(&mut ws, DIALER_FINISH_LEN).await?;
        let transport = listener.finish(&last).map_err(|_| LinkFailure::Handshake)?;
        Ok(ClientLink { ws, transport })
    }

    /// The other end's static key, proven by the handshake.
    pub fn remote(&self) -> LinkPublic {
        self.transport.remote()
    }

    /// Seals and sends one frame.
    pub async fn send(&mut self, frame: &Frame) -> Result<(), LinkFailure> {
        let plain = frame.encode().map_err(|_| LinkFailure::Frame)?;
        let sealed = self
            .transport
            .seal_frame(&plain)
            .map_err(|_| LinkFailure::Frame)?;
        send_bytes(&mut self.ws, &sealed[..]).await
    }

    /// The next frame from the other end (pings and pongs are skipped). Cancel-safe: the only
    /// await is the WebSocket's next message, so it can sit in a `select!`.
    pub async fn recv(&mut self) -> Result<Frame, LinkFailure> {
        let sealed = recv_bytes(&mut self.ws, SEALED_FRAME_LEN).await?;
        let plain = self
            .transport
            .open_frame(&sealed)
            .map_err(|_| LinkFailure::Decrypt)?;
        Frame::decode(&plain[..]).map_err(|_| LinkFailure::Frame)
    }

    /// Closes the WebSocket (best effort).
    pub async fn close(&mut self) {
        let _ = self.ws.close(None).await;
    }
}

async fn send_bytes(ws: &mut WebSocketStream<TcpStream>, bytes: &[u8]) -> Result<(), LinkFailure> {
    ws.send(Message::Binary(bytes.to_vec().into()))
        .await
        .map_err(|_| LinkFailure::Closed)
}

/// The next binary message, which must be exactly `len` bytes.
async fn recv_bytes(
    ws: &mut WebSocketStream<TcpStream>,
    len: usize,
) -> Result<Vec<u8>, LinkFailure> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == len => return Ok(b.to_vec()),
            Some(Ok(Message::Binary(_) | Message::Text(_) | Message::Frame(_))) => {
                return Err(LinkFailure::Malformed);
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Err(LinkFailure::Closed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A gateway end on loopback holding `key`: accepts one link and echoes one frame back.
    async fn echo_gateway(
        key: LinkSecret,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<Result<LinkPublic, LinkFailure>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut link = ClientLink::accept(stream, &key).await?;
            let frame = link.recv().await?;
            link.send(&frame).await?;
            Ok(link.remote())
        });
        (addr, task)
    }

    #[tokio::test]
    async fn frames_round_trip_and_the_gateway_learns_the_clients_key() {
        let (gateway, client) = (
            LinkSecret::generate(&mut rand::rng()),
            LinkSecret::generate(&mut rand::rng()),
        );
        let gateway_public = gateway.public();
        let (addr, task) = echo_gateway(gateway).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut link = ClientLink::dial(stream, &gateway_public, &client)
            .await
            .unwrap();
        assert_eq!(link.remote(), gateway_public);
        let hello = Frame::Control(Control::Welcome { queued: 7 }.encode());
        link.send(&hello).await.unwrap();
        assert_eq!(link.recv().await.unwrap(), hello);
        assert_eq!(task.await.unwrap().unwrap(), client.public());
    }

    /// The client expects K; the listener holds K': the client refuses it, and the listener
    /// learns nothing (it cannot even read the first message).
    #[tokio::test]
    async fn a_gateway_holding_another_key_is_refused() {
        let (expected, impostor, client) = (
            LinkSecret::generate(&mut rand::rng()),
            LinkSecret::generate(&mut rand::rng()),
            LinkSecret::generate(&mut rand::rng()),
        );
        let (addr, task) = echo_gateway(impostor).await;
        let stream = TcpStream::connect(addr).await.unwrap();
        let r = ClientLink::dial(stream, &expected.public(), &client).await;
        assert_eq!(r.unwrap_err(), LinkFailure::GatewayKey);
        assert_eq!(task.await.unwrap().unwrap_err(), LinkFailure::Handshake);
    }

    /// A client speaking the old protocol (a plaintext frame as its first message) is refused
    /// before any frame is read.
    #[tokio::test]
    async fn a_plaintext_first_message_is_refused() {
        let (addr, task) = echo_gateway(LinkSecret::generate(&mut rand::rng())).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/"))
            .await
            .unwrap();
        let hello = Frame::Control(
            Control::Hello {
                address: murmur_protocol::packet::Address([7; 32]),
            }
            .encode(),
        );
        ws.send(Message::Binary(hello.encode().unwrap().to_vec().into()))
            .await
            .unwrap();
        assert_eq!(task.await.unwrap().unwrap_err(), LinkFailure::Malformed);
    }
}
