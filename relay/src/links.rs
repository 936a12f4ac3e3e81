//! Relay-to-relay links: TCP carrying fixed-size frames.
//!
//! Outbound, one connection per peer with a bounded queue, reconnecting with exponential
//! backoff; a peer idle for a while is closed. Inbound, a bounded number of connections,
//! each read frame by frame into the pipeline. A malformed frame closes its connection (the
//! stream can no longer be trusted to be aligned) and is counted.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::packet::Address;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{self as m, drop_packet};
use crate::pipeline::{Inbound, Submitter};

/// Where relays are, from the current consensus.
#[derive(Default, Debug)]
pub struct Routes {
    pub mix_addrs: HashMap<Address, SocketAddr>,
    /// Layer-1 mixes: the only relays a gateway forwards client packets to.
    pub layer1: HashSet<Address>,
}

/// A frame on its way out, with when its packet arrived (for the hold-time histogram).
struct Outgoing {
    frame: Box<[u8; FRAME_LEN]>,
    received: Option<Instant>,
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IDLE_CLOSE: Duration = Duration::from_secs(300);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Bytes read from an inbound link at once: 13 frames (at most 16 MiB over 512 connections).
const READ_BUFFER: usize = 32 * 1024;

/// Outbound links to other relays.
pub struct Links {
    routes: Arc<RwLock<Routes>>,
    /// Each peer task has a generation, so a task that ends removes only its own entry.
    peers: Mutex<HashMap<Address, (u64, mpsc::Sender<Outgoing>)>>,
    next_generation: AtomicU64,
    peer_queue: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Links {
    pub fn new(
        routes: Arc<RwLock<Routes>>,
        peer_queue: usize,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Links> {
        Arc::new(Links {
            routes,
            peers: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            peer_queue,
            shutdown,
            tracker,
        })
    }

    /// The current routes.
    pub fn routes(&self) -> &Arc<RwLock<Routes>> {
        &self.routes
    }

    /// Queues `frame` for `to`. Drops (counted) if `to` is unknown or its queue is full.
    pub fn send(self: &Arc<Self>, to: Address, frame: &Frame, received: Option<Instant>) -> bool {
        let addr = match self.routes.read() {
            Ok(r) => r.mix_addrs.get(&to).copied(),
            Err(_) => None,
        };
        let Some(addr) = addr else {
            drop_packet("unknown_next_hop");
            return false;
        };
        let Ok(bytes) = frame.encode() else {
            drop_packet("encode_failed");
            return false;
        };
        let tx = {
            let Ok(mut peers) = self.peers.lock() else {
                return false;
            };
            match peers.get(&to) {
                Some((_, tx)) if !tx.is_closed() => tx.clone(),
                _ => {
                    let (tx, rx) = mpsc::channel(self.peer_queue);
                    let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
                    peers.insert(to, (generation, tx.clone()));
                    let links = self.clone();
                    self.tracker
                        .spawn(async move { links.peer_task(to, addr, generation, rx).await });
                    tx
                }
            }
        };
        match tx.try_send(Outgoing {
            frame: bytes,
            received,
        }) {
            Ok(()) => true,
            Err(_) => {
                drop_packet("peer_queue_full");
                false
            }
        }
    }

    async fn peer_task(
        self: Arc<Self>,
        to: Address,
        mut addr: SocketAddr,
        generation: u64,
        mut rx: mpsc::Receiver<Outgoing>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut pending: Option<Outgoing> = None;
        'connect: loop {
            if self.shutdown.is_cancelled() {
                break;
            }
            // The relay may have moved in a newer consensus.
            if let Some(a) = self
                .routes
                .read()
                .ok()
                .and_then(|r| r.mix_addrs.get(&to).copied())
            {
                addr = a;
            }
            let stream = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                r = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)) => r,
            };
            let stream = match stream {
                Ok(Ok(s)) => s,
                _ => {
                    tracing::debug!(peer = ?to, "link connect failed; backing off {backoff:?}");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    // Frames that waited through the backoff are stale only if the queue filled.
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            metrics::counter!(m::LINK_CONNECTS).increment(1);
            backoff = Duration::from_millis(100);
            let mut writer = BufWriter::with_capacity(64 * FRAME_LEN, stream);
            loop {
                let next = match pending.take() {
                    Some(o) => Some(o),
                    None => tokio::select! {
                        _ = self.shutdown.cancelled() => break 'connect,
                        r = tokio::time::timeout(IDLE_CLOSE, rx.recv()) => match r {
                            Ok(Some(o)) => Some(o),
                            Ok(None) => break 'connect,
                            Err(_) => None, // idle
                        },
                    },
                };
                let Some(out) = next else {
                    break 'connect;
                };
                if writer.write_all(&out.frame[..]).await.is_err() {
                    pending = Some(out);
                    continue 'connect;
                }
                let mut sent = vec![out.received];
                // Write what is already queued, then flush once.
                while let Ok(more) = rx.try_recv() {
                    if writer.write_all(&more.frame[..]).await.is_err() {
                        pending = Some(more);
                        continue 'connect;
                    }
                    sent.push(more.received);
                    if sent.len() >= 64 {
                        break;
                    }
                }
                if writer.flush().await.is_err() {
                    continue 'connect;
                }
                let now = Instant::now();
                metrics::counter!(m::PACKETS_FORWARDED).increment(sent.len() as u64);
                for received in sent.into_iter().flatten() {
                    metrics::histogram!(m::HOLD_SECONDS)
                        .record(now.saturating_duration_since(received).as_secs_f64());
                }
            }
        }
        if let Ok(mut peers) = self.peers.lock()
            && peers.get(&to).is_some_and(|(g, _)| *g == generation)
        {
            peers.remove(&to);
        }
    }
}

/// Accepts relay links and feeds their packets to the pipeline.
pub async fn serve_inbound(
    listener: TcpListener,
    max_connections: usize,
    submit: Submitter,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => "connection_limit").increment(1);
            continue; // dropping the stream closes it
        };
        let submit = submit.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _permit = permit;
            read_frames(stream, submit, shutdown).await;
        });
    }
}

async fn read_frames(stream: TcpStream, submit: Submitter, shutdown: CancellationToken) {
    // Buffered: one read system call brings in many frames, not one call per frame.
    let mut stream = BufReader::with_capacity(READ_BUFFER, stream);
    let mut buf = vec![0u8; FRAME_LEN];
    loop {
        let read = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = stream.read_exact(&mut buf) => r,
        };
        if read.is_err() {
            return;
        }
        match Frame::decode(&buf) {
            Ok(Frame::Packet {
                key_epoch,
                packet,
                envelope,
            }) => submit.submit(Inbound {
                key_epoch,
                packet,
                envelope,
                received: Instant::now(),
            }),
            Ok(_) => drop_packet("unexpected_frame"),
            Err(e) => {
                drop_packet(e.label());
                return;
            }
        }
    }
}
