//! Blocking (std::net) relay links for tests and benches: the Noise XK dialer and listener over
//! a `TcpStream`, and sealed frames, exactly as relays put them on the wire (48, 48 and 64
//! handshake bytes, then one `SEALED_FRAME_LEN` message per frame).

use std::io::{self, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::link::{
    DIALER_FINISH_LEN, DIALER_HELLO_LEN, Dialer, LISTENER_HELLO_LEN, LinkKind, LinkPublic,
    LinkSecret, Listener, SEALED_FRAME_LEN, Transport,
};

fn noise(e: murmur_protocol::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// The dialer's side of the handshake on `stream`, expecting the listener to hold `remote`.
pub fn dial_on(
    stream: &mut TcpStream,
    local: &LinkSecret,
    remote: &LinkPublic,
) -> io::Result<Transport> {
    let (dialer, hello) =
        Dialer::start(LinkKind::Relay, local, remote, &mut rand::rng()).map_err(noise)?;
    stream.write_all(&hello)?;
    let mut answer = [0u8; LISTENER_HELLO_LEN];
    stream.read_exact(&mut answer)?;
    let (transport, last) = dialer.finish(&answer).map_err(noise)?;
    stream.write_all(&last)?;
    Ok(transport)
}

/// The listener's side of the handshake on `stream`; the transport's `remote()` is the
/// dialer's proven key (a fake hop serves any).
pub fn accept_on(stream: &mut TcpStream, local: &LinkSecret) -> io::Result<Transport> {
    let mut hello = [0u8; DIALER_HELLO_LEN];
    stream.read_exact(&mut hello)?;
    let (listener, answer) =
        Listener::accept(LinkKind::Relay, local, &hello, &mut rand::rng()).map_err(noise)?;
    stream.write_all(&answer)?;
    let mut last = [0u8; DIALER_FINISH_LEN];
    stream.read_exact(&mut last)?;
    listener.finish(&last).map_err(noise)
}

/// What an impostor holding `key` can answer a dialer who expects another key: a well-formed
/// listener answer, from a handshake of its own (it cannot read the dialer's first message).
pub fn forged_answer(key: &LinkSecret) -> [u8; LISTENER_HELLO_LEN] {
    let (_, hello) = Dialer::start(LinkKind::Relay, key, &key.public(), &mut rand::rng()).unwrap();
    Listener::accept(LinkKind::Relay, key, &hello, &mut rand::rng())
        .unwrap()
        .1
}

/// A relay link: the TCP stream and its Noise transport, as the dialer holds them.
pub struct Link {
    pub stream: TcpStream,
    pub transport: Transport,
    /// Reused for every write: frames are sealed in place.
    sealed: Vec<u8>,
}

impl Link {
    /// Connects to `to` and runs the handshake proving `local`, expecting `remote`.
    pub fn try_connect(
        to: SocketAddr,
        local: &LinkSecret,
        remote: &LinkPublic,
    ) -> io::Result<Link> {
        let stream = TcpStream::connect_timeout(&to, Duration::from_secs(1))?;
        Link::over(stream, local, remote)
    }

    /// As [`Link::try_connect`], over a connected `stream` (e.g. from a chosen source address).
    pub fn over(
        mut stream: TcpStream,
        local: &LinkSecret,
        remote: &LinkPublic,
    ) -> io::Result<Link> {
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let transport = dial_on(&mut stream, local, remote)?;
        stream.set_read_timeout(None)?;
        Ok(Link {
            stream,
            transport,
            sealed: Vec::new(),
        })
    }

    pub fn connect(to: SocketAddr, local: &LinkSecret, remote: &LinkPublic) -> Link {
        Link::try_connect(to, local, remote).expect("the relay accepts the link")
    }

    /// Sends one frame; returns when it was handed to the socket.
    pub fn send(&mut self, frame: &Frame) -> Instant {
        let at = Instant::now();
        self.try_send(frame).unwrap();
        at
    }

    pub fn try_send(&mut self, frame: &Frame) -> io::Result<()> {
        self.send_encoded(&frame.encode().map_err(noise)?[..])
    }

    /// Seals each frame of `frames` (encoded frames back to back) and writes them in one go.
    pub fn send_encoded(&mut self, frames: &[u8]) -> io::Result<()> {
        let mut sealed = std::mem::take(&mut self.sealed);
        self.seal_into(frames, &mut sealed)?;
        let written = self.stream.write_all(&sealed);
        self.sealed = sealed;
        written
    }

    /// Seals each frame of `frames` into `out` (replacing its contents), in the order they
    /// must then be written: a bench seals ahead, outside what it times.
    pub fn seal_into(&mut self, frames: &[u8], out: &mut Vec<u8>) -> io::Result<()> {
        let n = frames.len() / FRAME_LEN;
        out.resize(n * SEALED_FRAME_LEN, 0);
        for (frame, sealed) in frames
            .chunks_exact(FRAME_LEN)
            .zip(out.chunks_exact_mut(SEALED_FRAME_LEN))
        {
            self.transport.seal(frame, sealed).map_err(noise)?;
        }
        Ok(())
    }

    /// Whether the other side closed the link (EOF or reset) within `within`.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        closed_within(&mut self.stream, within)
    }
}

/// Whether the other side of `stream` closes it (EOF or reset) within `within`; bytes it
/// sends meanwhile are skipped.
pub fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(_) => return true,
        }
    }
}

/// Reads and opens sealed frames off a link, as a listener does.
pub struct FrameReader {
    reader: BufReader<TcpStream>,
    transport: Transport,
    sealed: Box<[u8; SEALED_FRAME_LEN]>,
    frame: Box<[u8; FRAME_LEN]>,
}

impl FrameReader {
    pub fn new(stream: TcpStream, transport: Transport) -> FrameReader {
        FrameReader {
            reader: BufReader::with_capacity(64 * SEALED_FRAME_LEN, stream),
            transport,
            sealed: Box::new([0; SEALED_FRAME_LEN]),
            frame: Box::new([0; FRAME_LEN]),
        }
    }

    /// The dialer's key.
    pub fn remote(&self) -> LinkPublic {
        self.transport.remote()
    }

    /// The next frame's bytes; `None` at the end of the link or at a frame that does not open.
    pub fn next_frame(&mut self) -> Option<&[u8; FRAME_LEN]> {
        self.reader.read_exact(&mut self.sealed[..]).ok()?;
        self.transport
            .open(&self.sealed[..], &mut self.frame[..])
            .ok()?;
        Some(&self.frame)
    }
}

/// A TCP connection to `to` from the loopback address `from` (127.0.0.2 and up), so one test
/// can stand for many hosts. Blocking once connected.
pub fn connect_from(
    rt: &tokio::runtime::Runtime,
    from: IpAddr,
    to: SocketAddr,
) -> io::Result<TcpStream> {
    let stream = rt
        .block_on(crate::client_link::connect_from(from, to))?
        .into_std()?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}
