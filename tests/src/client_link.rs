//! What a test needs to play a client, an attacker or an observer on a gateway's client link:
//! sessions opened with `murmur_client_link` (the code `murmur-client` dials with), loop
//! packets that come back to a session, sockets from other loopback source addresses, and a
//! tap that sits on the access link (the gateway advertises the tap's address) and records or
//! impersonates.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use murmur_client_link::{ClientLink, LinkFailure};
use murmur_protocol::delivery::GatewayTagKey;
use murmur_protocol::directory::{Consensus, IdentityKey};
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{LinkPublic, LinkSecret, session_address};
use murmur_protocol::packet::build_packet_with_envelope;
use rand_chacha::ChaCha20Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::{Message, WebSocket};

/// A TCP connection to `to` from the loopback address `from` (bound before connecting).
pub async fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// Opens a session at the gateway at `addr` with `key`, as `murmur-client` does.
pub async fn open_session(
    addr: SocketAddr,
    gateway: &LinkPublic,
    key: &LinkSecret,
) -> Result<ClientLink, LinkFailure> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| LinkFailure::Closed)?;
    ClientLink::open(stream, gateway, key).await
}

/// A `Forward` frame carrying a packet over one mix of each layer and back to `gateway`, for
/// the session of the client whose link key is `to`; the gateway delivers it with a SURB id
/// tagged for that client ([`murmur_protocol::delivery`]) whose first 6 bytes are `id`'s low
/// 48 bits, big-endian.
pub fn loop_frame(
    consensus: &Consensus,
    gateway: &IdentityKey,
    to: &LinkPublic,
    id: u64,
    rng: &mut ChaCha20Rng,
) -> Frame {
    let epoch = consensus.epoch;
    let mut hops: Vec<_> = (1..=3)
        .map(|layer| {
            consensus
                .relays
                .iter()
                .find(|r| r.layer == Some(layer))
                .and_then(|r| r.route_hop(epoch).ok())
                .expect("a mix in every layer")
        })
        .collect();
    hops.push(
        consensus
            .relay(gateway)
            .and_then(|g| g.route_hop(epoch).ok())
            .expect("the gateway is in the consensus"),
    );
    let mut nonce = [0u8; 6];
    nonce.copy_from_slice(&id.to_be_bytes()[2..]);
    let surb_id = GatewayTagKey::for_client(to).tagged(nonce);
    let (packet, envelope) = build_packet_with_envelope(
        rng,
        &hops,
        &[Duration::ZERO; 4],
        session_address(to),
        surb_id,
        b"murmur loop",
        &[None, None, None, None],
    )
    .unwrap();
    Frame::Forward {
        next_hop: hops[0].address,
        key_epoch: epoch,
        packet,
        envelope,
    }
}

/// The id [`loop_frame`] put in a delivery, if `frame` is one.
pub fn delivered_id(frame: &Frame) -> Option<u64> {
    match frame {
        Frame::Deliver { surb_id, .. } => {
            let mut id = [0u8; 8];
            id[2..].copy_from_slice(surb_id.get(..6)?);
            Some(u64::from_be_bytes(id))
        }
        _ => None,
    }
}

/// What the tap does with a connection.
#[derive(Clone)]
pub enum TapMode {
    /// Relays it to the gateway's real client port, recording both directions.
    Forward(SocketAddr),
    /// Answers it as a gateway holding this (wrong) key would.
    Impersonate(Arc<LinkSecret>),
}

/// The bytes of one connection through the tap.
#[derive(Clone, Debug, Default)]
pub struct Recorded {
    pub from_client: Vec<u8>,
    pub from_gateway: Vec<u8>,
}

/// A man on the access link: every client connection to the tap's address goes through it.
pub struct Tap {
    pub addr: SocketAddr,
    mode: Arc<Mutex<TapMode>>,
    recorded: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
    /// Handshakes an impersonating tap completed, and those that failed.
    pub impersonated: Arc<Mutex<(u32, u32)>>,
    /// Bumped by [`Tap::cut`]: connections opened under an older value end.
    cut: Arc<AtomicU64>,
}

impl Tap {
    /// Binds `listener` (already bound, so its port could be written into the gateway's config)
    /// and serves on `rt`.
    pub fn start(
        rt: &tokio::runtime::Runtime,
        listener: std::net::TcpListener,
        mode: TapMode,
    ) -> Tap {
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let tap = Tap {
            addr,
            mode: Arc::new(Mutex::new(mode)),
            recorded: Arc::default(),
            impersonated: Arc::default(),
            cut: Arc::default(),
        };
        let (mode, recorded, impersonated, cut) = (
            tap.mode.clone(),
            tap.recorded.clone(),
            tap.impersonated.clone(),
            tap.cut.clone(),
        );
        rt.spawn(async move {
            let listener = TcpListener::from_std(listener).unwrap();
            while let Ok((client, _)) = listener.accept().await {
                let mode = mode.lock().unwrap().clone();
                let generation = cut.load(Ordering::Relaxed);
                match mode {
                    TapMode::Forward(to) => {
                        let record = Arc::new(Mutex::new(Recorded::default()));
                        recorded.lock().unwrap().push(record.clone());
                        tokio::spawn(relay(client, to, record, cut.clone(), generation));
                    }
                    TapMode::Impersonate(key) => {
                        let counts = impersonated.clone();
                        tokio::spawn(async move {
                            let ok = ClientLink::accept(client, &key).await.is_ok();
                            let mut c = counts.lock().unwrap();
                            if ok { c.0 += 1 } else { c.1 += 1 }
                        });
                    }
                }
            }
        });
        tap
    }

    /// What new connections get from now on.
    pub fn set_mode(&self, mode: TapMode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Ends every connection open through the tap now (their clients reconnect).
    pub fn cut(&self) {
        self.cut.fetch_add(1, Ordering::Relaxed);
    }

    /// Every forwarded connection's bytes so far, oldest first.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.recorded
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }
}

async fn relay(
    client: TcpStream,
    to: SocketAddr,
    record: Arc<Mutex<Recorded>>,
    cut: Arc<AtomicU64>,
    generation: u64,
) {
    let Ok(gateway) = TcpStream::connect(to).await else {
        return;
    };
    let (cr, cw) = client.into_split();
    let (gr, gw) = gateway.into_split();
    let up = copy(cr, gw, record.clone(), |r| &mut r.from_client);
    let down = copy(gr, cw, record, |r| &mut r.from_gateway);
    let cut_off = async move {
        while cut.load(Ordering::Relaxed) == generation {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        _ = up => {}
        _ = down => {}
        _ = cut_off => {}
    }
}

/// Copies `from` to `to` until either side closes, recording what passed in `side` of `record`.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    record: Arc<Mutex<Recorded>>,
    side: fn(&mut Recorded) -> &mut Vec<u8>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        side(&mut record.lock().unwrap()).extend_from_slice(&buf[..n]);
    }
}

/// The WebSocket messages' payloads in one direction of a recorded connection (the HTTP
/// upgrade skipped; a client's masked frames unmasked), as an observer who strips the
/// WebSocket framing sees them.
pub fn ws_messages(bytes: &[u8], from_client: bool) -> Vec<Vec<u8>> {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Vec::new();
    };
    let role = if from_client {
        Role::Server
    } else {
        Role::Client
    };
    let stream = Replay(std::io::Cursor::new(bytes[end + 4..].to_vec()));
    let mut ws = WebSocket::from_raw_socket(stream, role, None);
    let mut out = Vec::new();
    while let Ok(m) = ws.read() {
        if let Message::Binary(b) = m {
            out.push(b.to_vec());
        }
    }
    out
}

/// Recorded bytes to read; whatever tungstenite would answer (a close) goes nowhere.
struct Replay(std::io::Cursor<Vec<u8>>);

impl std::io::Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::io::Read::read(&mut self.0, buf)
    }
}

impl std::io::Write for Replay {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
