//! The exit role: the TCP and DNS driver of [`murmur_protocol::exit::ExitSession`].
//!
//! The state machine decides everything — sessions, streams, windows, byte budgets, reply
//! scheduling and retransmission, `SurbsHeld`, the limits and the stream watch; this module
//! only moves bytes and time. It feeds the state machine the packets that end here
//! ([`Exit::on_packet`]) and the clock (one timer task, woken at
//! [`ExitSession::poll_timeout`]), and carries out its [`ExitEvent`]s: a task per stream
//! resolves the destination (every resolved address checked against the exit policy),
//! connects within `exit.connect_timeout`, then writes what the state machine hands over
//! and reads only as much as it grants (so nothing read is ever dropped). Replies go out
//! through the relay's links to each reply block's first hop. The state machine's counts
//! become the metrics: `murmur_relay_exit_refused_total{reason}`,
//! `murmur_relay_exit_streams_total{result}` and `murmur_relay_packets_dropped_total`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant as StdInstant};

use murmur_protocol::directory::{Epoch, ExitPolicy};
use murmur_protocol::envelope::Envelope;
use murmur_protocol::exit::{ExitConfig, ExitEvent, ExitSession, StreamKey};
use murmur_protocol::fragment::Fragment;
use murmur_protocol::frame::Frame;
use murmur_protocol::stream::{Refusal, Target};
use murmur_protocol::surb::{Reply, ReplyBlock};
use murmur_protocol::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ExitSection;
use crate::links::Links;
use crate::metrics as m;

pub use murmur_protocol::exit::FULL_SESSIONS;

/// The exit service.
pub struct Exit {
    inner: Mutex<Inner>,
    /// A copy of the state machine's policy, for resolved addresses (read without the lock).
    policy: ExitPolicy,
    connect_timeout: Duration,
    links: Arc<Links>,
    origin: StdInstant,
    /// The timer looks at `poll_timeout` again.
    timer: Notify,
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

struct Inner {
    session: ExitSession,
    /// Each open stream's task; a number per task, so a task that outlived its stream
    /// (its number reused) cannot act for the new one.
    streams: HashMap<StreamKey, StreamTask>,
    next_task: u64,
}

struct StreamTask {
    id: u64,
    writes: mpsc::UnboundedSender<WriteCmd>,
    reads: mpsc::UnboundedSender<usize>,
    cancel: CancellationToken,
}

enum WriteCmd {
    Data(Vec<u8>),
    Close,
}

/// What a stream's task reports.
enum Report {
    Connected,
    ConnectFailed(Refusal),
    Written(usize),
    Received(Vec<u8>),
    TargetClosed,
    Failed(Refusal),
}

/// The state machine's bounds from the `[exit]` section.
pub fn exit_config(policy: ExitPolicy, section: &ExitSection) -> ExitConfig {
    ExitConfig {
        max_streams: section.max_streams,
        max_streams_per_session: section.max_streams_per_session,
        max_buffered_bytes: section.max_buffered_bytes,
        max_session_buffered_bytes: section.max_session_buffered_bytes,
        max_stream_window: section.max_stream_window,
        idle_timeout: section.idle_timeout,
        idle_progress_bytes: section.idle_progress_bytes as u64,
        stream_lifetime: section.stream_lifetime,
        ..ExitConfig::new(policy)
    }
}

impl Exit {
    /// The exit, with its timer task running (on the current tokio runtime).
    pub fn new(
        policy: ExitPolicy,
        config: ExitSection,
        links: Arc<Links>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) -> Arc<Exit> {
        let exit = Arc::new(Exit {
            inner: Mutex::new(Inner {
                session: ExitSession::new(exit_config(policy.clone(), &config), rand::random()),
                streams: HashMap::new(),
                next_task: 0,
            }),
            policy,
            connect_timeout: config.connect_timeout,
            links,
            origin: StdInstant::now(),
            timer: Notify::new(),
            shutdown,
            tracker: tracker.clone(),
        });
        tracker.spawn(exit.clone().run_timer());
        exit
    }

    fn now(&self) -> Instant {
        Instant::from_elapsed(self.origin.elapsed())
    }

    /// Reply blocks for epochs before `epoch` are discarded (their keys are gone).
    pub fn set_oldest_epoch(&self, epoch: Epoch) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.session.set_oldest_epoch(epoch);
        }
    }

    /// Handles a data packet that ended here, with its SURB-ACK if it has one.
    pub fn on_packet(self: &Arc<Self>, ack: Option<ReplyBlock>, fragment: Fragment) {
        metrics::counter!(m::FINAL_DELIVERED, "to" => "exit").increment(1);
        self.step(|inner, now| inner.session.handle_packet(now, ack, fragment));
    }

    /// Runs `f` on the state machine, then carries out what it asks for: events, replies
    /// and metrics; the timer looks again.
    fn step(self: &Arc<Self>, f: impl FnOnce(&mut Inner, Instant)) {
        let now = self.now();
        let replies = {
            let Ok(mut inner) = self.inner.lock() else {
                return;
            };
            f(&mut inner, now);
            self.drive(&mut inner, now)
        };
        for reply in replies {
            self.send_reply(reply);
        }
        self.timer.notify_one();
    }

    /// Takes every event and reply the state machine has, and counts what it counted.
    fn drive(self: &Arc<Self>, inner: &mut Inner, now: Instant) -> Vec<Reply> {
        while let Some(event) = inner.session.poll_event() {
            match event {
                ExitEvent::Connect { key, target } => self.spawn_stream(inner, key, target),
                ExitEvent::Write { key, bytes } => {
                    if let Some(t) = inner.streams.get(&key) {
                        let _ = t.writes.send(WriteCmd::Data(bytes));
                    }
                }
                ExitEvent::CloseWrite { key } => {
                    if let Some(t) = inner.streams.get(&key) {
                        let _ = t.writes.send(WriteCmd::Close);
                    }
                }
                ExitEvent::Read { key, max } => {
                    if let Some(t) = inner.streams.get(&key) {
                        let _ = t.reads.send(max);
                    }
                }
                ExitEvent::Close { key } => {
                    if let Some(t) = inner.streams.remove(&key) {
                        t.cancel.cancel();
                    }
                }
            }
        }
        let mut replies = Vec::new();
        while let Some(reply) = inner.session.poll_transmit(now) {
            replies.push(reply);
        }
        let counts = inner.session.take_counts();
        for (reason, n) in counts.refused {
            metrics::counter!(m::EXIT_REFUSED, "reason" => reason).increment(n);
        }
        for (reason, n) in counts.dropped {
            metrics::counter!(m::PACKETS_DROPPED, "reason" => reason).increment(n);
        }
        for (result, n) in counts.streams {
            metrics::counter!(m::EXIT_STREAMS, "result" => result).increment(n);
        }
        replies
    }

    /// Calls `handle_timeout` whenever the state machine says something falls due.
    async fn run_timer(self: Arc<Self>) {
        loop {
            let next = self
                .inner
                .lock()
                .ok()
                .and_then(|inner| inner.session.poll_timeout());
            let sleep = match next {
                Some(t) => t.saturating_duration_since(self.now()),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.timer.notified() => continue,
                _ = tokio::time::sleep(sleep) => {}
            }
            if next.is_some() {
                self.step(|inner, now| inner.session.handle_timeout(now));
            }
        }
    }

    /// A task for a new stream: it connects, then writes and reads as told.
    fn spawn_stream(self: &Arc<Self>, inner: &mut Inner, key: StreamKey, target: Target) {
        // Unbounded channels, bounded by the state machine: a write carries bytes the exit
        // still counts against the stream's window and the byte budgets until `written`
        // answers it, and a read is granted only once the previous one was answered.
        let (writes, write_rx) = mpsc::unbounded_channel();
        let (reads, read_rx) = mpsc::unbounded_channel();
        let cancel = self.shutdown.child_token();
        let id = inner.next_task;
        inner.next_task += 1;
        inner.streams.insert(
            key,
            StreamTask {
                id,
                writes,
                reads,
                cancel: cancel.clone(),
            },
        );
        let exit = self.clone();
        self.tracker.spawn(async move {
            let task = TaskRef { exit, key, id };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = task.run(target, write_rx, read_rx) => {}
            }
        });
    }

    /// A report of task `id` for `key`, unless the stream is gone (or is another now).
    fn report(self: &Arc<Self>, key: StreamKey, id: u64, report: Report) {
        self.step(|inner, now| {
            if inner.streams.get(&key).map(|t| t.id) != Some(id) {
                return;
            }
            let s = &mut inner.session;
            // An error means the stream ended meanwhile: nothing more to do for it.
            let _ = match report {
                Report::Connected => s.connected(now, key),
                Report::ConnectFailed(reason) => s.connect_failed(key, reason),
                Report::Written(n) => s.written(now, key, n),
                Report::Received(bytes) => s.received_from_target(now, key, &bytes),
                Report::TargetClosed => s.target_closed(now, key),
                Report::Failed(reason) => s.stream_failed(key, reason),
            };
        });
    }

    async fn connect(&self, target: &Target) -> Result<TcpStream, Refusal> {
        let addrs: Vec<SocketAddr> = match target {
            Target::Addr(a) => vec![*a],
            Target::Host(host, port) => {
                match tokio::time::timeout(
                    self.connect_timeout,
                    tokio::net::lookup_host((host.as_str(), *port)),
                )
                .await
                {
                    Ok(Ok(addrs)) => addrs.collect(),
                    Ok(Err(_)) => return Err(Refusal::HostUnreachable),
                    Err(_) => return Err(Refusal::TtlExpired),
                }
            }
        };
        let allowed: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.policy.allows(a.ip(), a.port()))
            .collect();
        if allowed.is_empty() {
            return Err(if addrs.is_empty() {
                Refusal::HostUnreachable
            } else {
                Refusal::NotAllowed
            });
        }
        let mut last = Refusal::HostUnreachable;
        for addr in allowed {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => return Ok(s),
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    last = Refusal::ConnectionRefused
                }
                Ok(Err(_)) => last = Refusal::HostUnreachable,
                Err(_) => last = Refusal::TtlExpired,
            }
        }
        Err(last)
    }

    /// Sends a packet built from a reply block to the block's first hop.
    fn send_reply(&self, reply: Reply) {
        self.links.send(
            reply.first_hop,
            &Frame::Packet {
                key_epoch: reply.key_epoch,
                packet: reply.packet,
                // The exit cannot build an envelope for the reply's hops (it does not know
                // them); the block tells them not to check it.
                envelope: Envelope::random(&mut rand::rng()),
            },
            None,
        );
    }
}

/// A stream's task: which exit, which stream, which task.
struct TaskRef {
    exit: Arc<Exit>,
    key: StreamKey,
    id: u64,
}

impl TaskRef {
    fn report(&self, report: Report) {
        self.exit.report(self.key, self.id, report);
    }

    async fn run(
        &self,
        target: Target,
        writes: mpsc::UnboundedReceiver<WriteCmd>,
        reads: mpsc::UnboundedReceiver<usize>,
    ) {
        let tcp = match self.exit.connect(&target).await {
            Ok(s) => s,
            Err(reason) => return self.report(Report::ConnectFailed(reason)),
        };
        let _ = tcp.set_nodelay(true);
        self.report(Report::Connected);
        let (rd, wr) = tcp.into_split();
        // Each direction ends on its own; the state machine ends the stream (and this task,
        // through its cancel token) once both are done and acknowledged.
        tokio::join!(self.write(wr, writes), self.read(rd, reads));
    }

    async fn write(&self, mut wr: OwnedWriteHalf, mut writes: mpsc::UnboundedReceiver<WriteCmd>) {
        while let Some(cmd) = writes.recv().await {
            match cmd {
                WriteCmd::Data(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        return self.report(Report::Failed(Refusal::ConnectionRefused));
                    }
                    self.report(Report::Written(bytes.len()));
                }
                WriteCmd::Close => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
    }

    async fn read(&self, mut rd: OwnedReadHalf, mut reads: mpsc::UnboundedReceiver<usize>) {
        let mut buf = Vec::new();
        while let Some(max) = reads.recv().await {
            // Never more than granted: the state machine has room for exactly that.
            buf.resize(max, 0);
            match rd.read(&mut buf).await {
                Ok(0) => return self.report(Report::TargetClosed),
                Ok(n) => self.report(Report::Received(buf[..n].to_vec())),
                Err(_) => return self.report(Report::Failed(Refusal::ConnectionRefused)),
            }
        }
    }
}
