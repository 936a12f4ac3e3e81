//! Serving HTTP within bounds: the loop the directory authority, the ledger and the relay's
//! metrics endpoint share.
//!
//! - At most `max_connections` connections are open at once; more wait in the kernel's
//!   backlog until one closes.
//! - At most `max_connections_per_address` of them come from one address (an IPv4 address or
//!   an IPv6 /64, [`murmur_protocol::admission`]); a connection over its address's share is
//!   closed as soon as it is accepted, so one host cannot take every slot.
//! - A request head (the first, and each later one on a kept-alive connection) must arrive
//!   whole within `header_timeout`: a socket that sends nothing, or a head a byte at a time,
//!   is closed (hyper's header-read timer; the idle deadline alone would let a byte every
//!   `idle_timeout` keep a slot for ever).
//! - A connection on which nothing moves, in either direction, for `idle_timeout` is closed
//!   (a slow body, or a client that stops reading its answer).
//!
//! Refusals are counted by reason through the caller's counter: `per_address_limit`,
//! `header_timeout` (a connection closed before it sent one whole request head) and
//! `idle_timeout`. A kept-alive connection closed by the header timer after it was served is
//! the normal end of an idle connection, and is not counted.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use murmur_protocol::admission::{Admission, Limits, Slot};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A request head did not arrive whole in time, on a connection not yet served.
pub const HEADER_TIMEOUT: &str = "header_timeout";
/// Nothing moved on a connection for the idle time.
pub const IDLE_TIMEOUT: &str = "idle_timeout";
/// The address already held its share of connections.
pub const PER_ADDRESS_LIMIT: &str = "per_address_limit";

/// The bounds of one HTTP listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Connections open at once from one IPv4 address or IPv6 /64; more are closed.
    pub max_connections_per_address: usize,
    /// A request head must arrive whole within this time.
    pub header_timeout: Duration,
    /// A connection on which nothing moves for this long is closed.
    pub idle_timeout: Duration,
}

impl HttpLimits {
    /// Checks the values; `section` names the config section in the message.
    pub fn check(&self, section: &str) -> std::result::Result<(), String> {
        if self.max_connections == 0 || self.max_connections_per_address == 0 {
            return Err(format!(
                "{section}.max_connections and {section}.max_connections_per_address must be \
                 positive"
            ));
        }
        if self.header_timeout.is_zero() || self.idle_timeout.is_zero() {
            return Err(format!(
                "{section}.header_timeout and {section}.idle_timeout must be positive"
            ));
        }
        Ok(())
    }
}

/// How long an HTTP client of these servers keeps an idle connection for reuse: under the
/// servers' default header timeout (5 s), which also closes a kept-alive connection idle that
/// long, so a request never goes out on a connection as it closes.
pub const IDLE_CONNECTION: Duration = Duration::from_secs(3);

/// The address a request came from, in its extensions, for per-address rate limits (never
/// logged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectedPeer(pub SocketAddr);

/// Counts one refused or timed-out connection under its reason.
pub type RefusalCounter = Arc<dyn Fn(&'static str) + Send + Sync>;

/// Serves `router` on `listener` within `limits` (refusals counted through `refused`) until
/// `shutdown` completes; then cancels `token` (background tasks watch it), stops accepting,
/// lets open requests finish, waits for the tasks in `tracker`, and returns.
pub async fn serve_until(
    listener: TcpListener,
    limits: HttpLimits,
    router: Router,
    refused: RefusalCounter,
    shutdown: impl Future<Output = ()> + Send + 'static,
    token: CancellationToken,
    tracker: TaskTracker,
) -> io::Result<()> {
    let stop = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    let mut listener = CappedListener::new(listener, limits, refused.clone());
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let connections = TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = token.cancelled() => break,
            stream = listener.accept() => stream,
        };
        connections.spawn(serve_connection(
            http.clone(),
            stream,
            router.clone(),
            refused.clone(),
            token.clone(),
        ));
    }
    drop(listener);
    connections.close();
    connections.wait().await;
    tracker.close();
    tracker.wait().await;
    tracing::info!("stopped");
    Ok(())
}

/// Serves one connection until it closes; on shutdown, finishes the request under way.
async fn serve_connection(
    http: http1::Builder,
    stream: CappedStream,
    router: Router,
    refused: RefusalCounter,
    token: CancellationToken,
) {
    let served = Arc::new(AtomicBool::new(false));
    let flag = served.clone();
    let tower = TowerToHyperService::new(router);
    let peer = ConnectedPeer(stream.peer());
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        flag.store(true, Ordering::Relaxed);
        req.extensions_mut().insert(peer);
        hyper::service::Service::call(&tower, req)
    });
    let mut conn = std::pin::pin!(http.serve_connection(TokioIo::new(stream), service));
    let mut cancelled = std::pin::pin!(token.cancelled());
    let mut closing = false;
    let result = loop {
        tokio::select! {
            result = conn.as_mut() => break result,
            () = &mut cancelled, if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    };
    if let Err(e) = result {
        match close_reason(&e, served.load(Ordering::Relaxed)) {
            Some(reason) => refused(reason),
            None => tracing::trace!("connection ended: {e}"),
        }
    }
}

/// The refusal a failed connection counts as, if any (the idle deadline counts itself).
fn close_reason(e: &hyper::Error, served: bool) -> Option<&'static str> {
    // Between requests the header timer is the end of an idle kept-alive connection.
    (e.is_timeout() && !served).then_some(HEADER_TIMEOUT)
}

/// A TCP listener that holds at most `max_connections` connections open at once (further
/// connections wait in the kernel's backlog until one closes) and at most
/// `max_connections_per_address` from one address (further ones are closed and counted).
pub struct CappedListener {
    inner: TcpListener,
    permits: Arc<Semaphore>,
    addresses: Admission,
    idle: Duration,
    refused: RefusalCounter,
}

impl CappedListener {
    pub fn new(inner: TcpListener, limits: HttpLimits, refused: RefusalCounter) -> Self {
        let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
        CappedListener {
            inner,
            permits: Arc::new(Semaphore::new(max)),
            // The semaphore bounds the total; the pool only bounds each address's share.
            addresses: Admission::new(Limits {
                total: max,
                per_address: limits.max_connections_per_address,
            }),
            idle: limits.idle_timeout,
            refused,
        }
    }

    /// The next connection within the limits.
    pub async fn accept(&mut self) -> CappedStream {
        loop {
            let permit = match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                // The semaphore is never closed; should it be, wait and try again.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (io, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            };
            match self.addresses.try_admit(addr.ip()) {
                Ok(slot) => {
                    return CappedStream {
                        io,
                        peer: addr,
                        idle: self.idle,
                        deadline: Box::pin(tokio::time::sleep(self.idle)),
                        refused: self.refused.clone(),
                        timed_out: false,
                        _slot: slot,
                        _permit: permit,
                    };
                }
                // Dropping the socket closes it; nothing was read from it.
                Err(refused) => (self.refused)(match refused {
                    murmur_protocol::admission::Refused::PerAddress => PER_ADDRESS_LIMIT,
                    murmur_protocol::admission::Refused::Total => refused.label(),
                }),
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accept error: a connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors, ...) is logged and waited out, as axum's listener does.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept failed: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// A connection holding a permit and its address's slot until it is dropped, and failing
/// once nothing has moved on it for the idle time.
pub struct CappedStream {
    io: TcpStream,
    peer: SocketAddr,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    refused: RefusalCounter,
    timed_out: bool,
    _slot: Slot,
    _permit: OwnedSemaphorePermit,
}

impl CappedStream {
    /// The address it came from.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Called when a read or write made no progress: the error once the deadline passed
    /// (counted once).
    fn stalled(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if self.deadline.as_mut().poll(cx).is_pending() {
            return None;
        }
        if !self.timed_out {
            self.timed_out = true;
            (self.refused)(IDLE_TIMEOUT);
        }
        Some(io::Error::new(io::ErrorKind::TimedOut, "connection idle"))
    }

    /// Passes on what a read or write returned: progress pushes the deadline back; no
    /// progress past the deadline is an error.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        if polled.is_pending() {
            return match self.stalled(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            };
        }
        let next = tokio::time::Instant::now() + self.idle;
        self.deadline.as_mut().reset(next);
        polled
    }
}

impl AsyncRead for CappedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        this.watch(cx, polled)
    }
}

impl AsyncWrite for CappedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.watch(cx, polled)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Instant;

    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    use super::*;

    type Counts = Arc<Mutex<BTreeMap<&'static str, u64>>>;

    struct Server {
        addr: SocketAddr,
        counts: Counts,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<io::Result<()>>,
    }

    /// A server of `/ok` and `/echo` within 64 connections, `per_address` from one address.
    async fn server(per_address: usize, header: Duration, idle: Duration) -> Server {
        let limits = HttpLimits {
            max_connections: 64,
            max_connections_per_address: per_address,
            header_timeout: header,
            idle_timeout: idle,
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counts: Counts = Arc::default();
        let c = counts.clone();
        let refused: RefusalCounter = Arc::new(move |reason| {
            *c.lock().unwrap().entry(reason).or_insert(0) += 1;
        });
        let router = Router::new().route("/ok", get(|| async { "ok" })).route(
            "/echo",
            axum::routing::post(|body: String| async move { body }),
        );
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve_until(
            listener,
            limits,
            router,
            refused,
            stop.clone().cancelled_owned(),
            CancellationToken::new(),
            TaskTracker::new(),
        ));
        Server {
            addr,
            counts,
            stop,
            task,
        }
    }

    impl Server {
        fn count(&self, reason: &str) -> u64 {
            self.counts
                .lock()
                .unwrap()
                .get(reason)
                .copied()
                .unwrap_or(0)
        }

        async fn stop(self) {
            self.stop.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("stops within 5 s")
                .unwrap()
                .unwrap();
        }
    }

    async fn connect_from(source: [u8; 4], to: SocketAddr) -> TcpStream {
        let socket = TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(to).await.unwrap()
    }

    /// Reads until the server closes; how long that took (or `None` if it did not within
    /// `within`).
    async fn closed_within(s: &mut TcpStream, within: Duration) -> Option<Duration> {
        let t = Instant::now();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(within, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .map(|()| t.elapsed())
    }

    async fn get_ok(s: &mut TcpStream) -> String {
        s.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn a_head_sent_a_byte_at_a_time_is_cut_off_by_the_header_timeout() {
        // The idle deadline (10 s) is reset by every byte; only the header timer stops it.
        let s = server(8, Duration::from_millis(400), Duration::from_secs(10)).await;
        let mut c = connect_from([127, 0, 0, 1], s.addr).await;
        let t = Instant::now();
        let mut closed = false;
        for b in b"GET /ok HTTP/1.1\r\nHost: slow".iter().cycle().take(40) {
            if c.write_all(&[*b]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 256];
            if let Ok(Ok(0) | Err(_)) =
                tokio::time::timeout(Duration::from_millis(100), c.read(&mut buf)).await
            {
                closed = true;
                break;
            }
        }
        let took = t.elapsed();
        eprintln!("slow head closed after {took:?}");
        assert!(closed, "a 4 s trickle of a head was not cut off");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(s.count(HEADER_TIMEOUT), 1);
        // A whole request is still served.
        let mut c = connect_from([127, 0, 0, 1], s.addr).await;
        assert!(get_ok(&mut c).await.ends_with("ok"));
        s.stop().await;
    }

    #[tokio::test]
    async fn an_address_over_its_share_is_closed_and_another_is_served() {
        let s = server(4, Duration::from_millis(2500), Duration::from_secs(30)).await;
        let mut held = Vec::new();
        for _ in 0..20 {
            held.push(connect_from([127, 0, 0, 1], s.addr).await);
        }
        let mut refused = 0;
        for c in &mut held {
            // Refused connections are closed at once; admitted ones stay open until the
            // header timeout.
            if closed_within(c, Duration::from_millis(100)).await.is_some() {
                refused += 1;
            }
        }
        assert_eq!(refused, 16);
        assert_eq!(s.count(PER_ADDRESS_LIMIT), 16);
        let mut other = connect_from([127, 0, 0, 2], s.addr).await;
        assert!(get_ok(&mut other).await.ends_with("ok"));
        // The four idle ones are closed by the header timeout, and their slots come back.
        for c in &mut held {
            assert!(closed_within(c, Duration::from_secs(5)).await.is_some());
        }
        assert_eq!(s.count(HEADER_TIMEOUT), 4);
        let mut again = connect_from([127, 0, 0, 1], s.addr).await;
        assert!(get_ok(&mut again).await.ends_with("ok"));
        s.stop().await;
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_when_idle_and_not_counted() {
        let s = server(4, Duration::from_millis(300), Duration::from_secs(30)).await;
        let mut c = connect_from([127, 0, 0, 1], s.addr).await;
        c.write_all(b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("ok"));
        let took = closed_within(&mut c, Duration::from_secs(3)).await;
        assert!(took.is_some(), "an idle kept-alive connection stays open");
        assert_eq!(s.count(HEADER_TIMEOUT), 0);
        s.stop().await;
    }

    #[tokio::test]
    async fn a_stalled_body_is_closed_by_the_idle_timeout() {
        let s = server(4, Duration::from_secs(10), Duration::from_millis(300)).await;
        let mut c = connect_from([127, 0, 0, 1], s.addr).await;
        c.write_all(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
            .await
            .unwrap();
        let took = closed_within(&mut c, Duration::from_secs(5)).await;
        eprintln!("stalled body closed after {took:?}");
        assert!(took.is_some_and(|t| t < Duration::from_secs(2)), "{took:?}");
        assert_eq!(s.count(IDLE_TIMEOUT), 1);
        s.stop().await;
    }
}
