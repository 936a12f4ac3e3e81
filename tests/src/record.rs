//! A recording pass-through TCP proxy: what an observer (or a man in the middle) of one link
//! sees. A relay advertises the proxy's address (`listen.advertise_mix` or
//! `listen.advertise_client`), so every peer that dials the relay goes through it; the proxy
//! relays the bytes unchanged and keeps a copy of each connection's two directions.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The most bytes kept per direction of one connection (what follows is relayed, not kept).
const KEEP_PER_DIRECTION: usize = 32 << 20;

/// One proxied connection's bytes: dialer to listener, and back.
#[derive(Default, Clone, Debug)]
pub struct Recorded {
    pub to_listener: Vec<u8>,
    pub to_dialer: Vec<u8>,
}

/// A proxy on 127.0.0.1 that forwards to a target set once the real listener is known.
pub struct RecordingProxy {
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    connections: Arc<Mutex<Vec<Arc<Mutex<Recorded>>>>>,
    refused: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl RecordingProxy {
    pub fn start() -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let proxy = RecordingProxy {
            addr,
            target: Arc::default(),
            connections: Arc::default(),
            refused: Arc::default(),
            stop: Arc::default(),
        };
        let (target, connections, refused, stop) = (
            proxy.target.clone(),
            proxy.connections.clone(),
            proxy.refused.clone(),
            proxy.stop.clone(),
        );
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((inbound, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                let Some(to) = *target.lock().unwrap() else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let Ok(outbound) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
                    refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                let _ = inbound.set_nonblocking(false);
                let record = Arc::new(Mutex::new(Recorded::default()));
                connections.lock().unwrap().push(record.clone());
                let (a, b) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                let r = record.clone();
                std::thread::spawn(move || pump(a, b, &r, true));
                std::thread::spawn(move || pump(outbound, inbound, &record, false));
            }
        });
        proxy
    }

    /// Where connections go from now on.
    pub fn set_target(&self, to: SocketAddr) {
        *self.target.lock().unwrap() = Some(to);
    }

    /// A copy of every connection's bytes so far.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.connections
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.lock().unwrap().clone())
            .collect()
    }

    /// Bytes relayed so far, both directions of every connection.
    pub fn bytes(&self) -> usize {
        self.recorded()
            .iter()
            .map(|r| r.to_listener.len() + r.to_dialer.len())
            .sum()
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to`, keeping a copy, until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream, record: &Mutex<Recorded>, to_listener: bool) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        {
            let mut r = record.lock().unwrap();
            let side = if to_listener {
                &mut r.to_listener
            } else {
                &mut r.to_dialer
            };
            let keep = n.min(KEEP_PER_DIRECTION.saturating_sub(side.len()));
            side.extend_from_slice(&buf[..keep]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}

/// Where `needle` first occurs in `haystack`.
pub fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return None;
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The longest run of zero bytes in `bytes`. A plaintext frame has long zero runs (reserved
/// bytes, padding); ciphertext has none longer than a few bytes.
pub fn longest_zero_run(bytes: &[u8]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &b in bytes {
        run = if b == 0 { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

/// The payloads of the WebSocket frames in one direction of a recorded connection, unmasked
/// and concatenated (after the HTTP upgrade), as any observer can read them: a client's
/// masking hides nothing, its key travels in each frame header. Stops at a truncated frame.
pub fn websocket_payloads(bytes: &[u8]) -> Vec<u8> {
    let Some(head_end) = find(bytes, b"\r\n\r\n") else {
        return Vec::new();
    };
    let mut rest = &bytes[head_end + 4..];
    let mut out = Vec::new();
    while let [_, b1, tail @ ..] = rest {
        let masked = b1 & 0x80 != 0;
        let (len, tail) = match b1 & 0x7f {
            126 => match tail.split_first_chunk::<2>() {
                Some((l, t)) => (usize::from(u16::from_be_bytes(*l)), t),
                None => break,
            },
            127 => match tail.split_first_chunk::<8>() {
                Some((l, t)) => (
                    usize::try_from(u64::from_be_bytes(*l)).unwrap_or(usize::MAX),
                    t,
                ),
                None => break,
            },
            n => (usize::from(n), tail),
        };
        let (mask, tail) = if masked {
            match tail.split_first_chunk::<4>() {
                Some((m, t)) => (Some(*m), t),
                None => break,
            }
        } else {
            (None, tail)
        };
        if tail.len() < len {
            break;
        }
        let (payload, tail) = tail.split_at(len);
        out.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, b)| mask.map_or(*b, |m| b ^ m[i % 4])),
        );
        rest = tail;
    }
    out
}
