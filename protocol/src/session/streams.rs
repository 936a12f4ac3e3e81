//! The application's streams: opening, writing within the window, closing, and how a stream
//! ends (its exit's word, or the session giving up on it).
//!
//! Stream windows live here: the bytes a stream may have unacknowledged by the exit (the
//! window the exit granted, [`Stream::window`]), and the out-of-order bytes it holds from the
//! exit (the client's own `stream_window`, which it announces when it opens the stream).

use std::collections::VecDeque;

use rand::Rng;

use super::exits::ExitRef;
use super::{ClientSession, Event, Isolation, Result, SessionError, StreamFailure};
use crate::directory::path::ExitTarget;
use crate::stream::{DEFAULT_STREAM_WINDOW, RecvBuffer, StreamId, Target};
use crate::time::Instant;

#[derive(Debug, PartialEq, Eq)]
pub(super) enum StreamState {
    Opening,
    Open,
}

/// A gap in a stream's data from the exit: bytes held beyond it, none at it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Gap {
    /// Where it starts: what was delivered in order.
    pub(super) at: u64,
    /// When it opened or a `ClientItem::Received` last announced it: the next announcement
    /// is due a grace after.
    pub(super) waiting_since: Instant,
}

pub(super) struct Stream {
    pub(super) exit_session: ExitRef,
    pub(super) target: Target,
    pub(super) state: StreamState,
    pub(super) open_sent: bool,
    pub(super) open_sent_at: Instant,
    /// Application bytes not yet packed into a message.
    pub(super) outbox: VecDeque<u8>,
    /// Offset of the next byte packed.
    pub(super) sent: u64,
    /// The exit has written every byte below this.
    pub(super) exit_acked: u64,
    pub(super) app_closed: bool,
    pub(super) fin_sent: bool,
    pub(super) recv: RecvBuffer,
    /// The last cumulative ack sent for the exit's data.
    pub(super) acked_sent: u64,
    /// The first gap in the exit's data, if there is one.
    pub(super) gap: Option<Gap>,
    /// Bytes handed to the application in events but not yet consumed by it; acks cover
    /// only what the application took, so the exit's window bounds what waits here.
    pub(super) unconsumed: u64,
    pub(super) eof_reported: bool,
    pub(super) writable_wanted: bool,
    /// Bytes this stream may have unacknowledged by the exit: what the exit granted, and
    /// until it answers the least every exit grants ([`DEFAULT_STREAM_WINDOW`]).
    pub(super) window: usize,
}

impl Stream {
    /// Bytes sent but not acknowledged, plus bytes not yet sent: what counts against the
    /// window.
    fn in_flight(&self) -> usize {
        usize::try_from(self.sent - self.exit_acked).unwrap_or(usize::MAX) + self.outbox.len()
    }

    /// What a message may still carry of this stream's data now.
    pub(super) fn send_room(&self) -> usize {
        self.window
            .saturating_sub(usize::try_from(self.sent - self.exit_acked).unwrap_or(usize::MAX))
    }

    /// Bytes this stream buffers (waiting to be sent, or received out of order).
    pub(super) fn buffered_bytes(&self) -> usize {
        self.outbox.len() + self.recv.pending_bytes()
    }

    /// Finished both ways: our end sent and acknowledged, theirs received, taken by the
    /// application and acknowledged.
    pub(super) fn finished(&self) -> bool {
        self.fin_sent
            && self.eof_reported
            && self.exit_acked == self.sent
            && self.unconsumed == 0
            && self.acked_sent > self.recv.delivered()
    }
}

impl ClientSession {
    /// The client's own stream window: the exit's data it holds out of order, and what it
    /// asks the exit to grant for its own data.
    pub(super) fn stream_window(&self) -> usize {
        self.config.stream_window
    }

    /// The exit granted `granted` bytes of window to `stream`; it never exceeds the client's.
    pub(super) fn window_granted(&mut self, exit: ExitRef, stream: StreamId, granted: u32) {
        let own = self.stream_window();
        if let Some(s) = self.stream_of(exit, stream) {
            s.window = own.min(usize::try_from(granted).unwrap_or(usize::MAX));
        }
    }

    /// Opens a stream to `target`. Streams with different `isolation` tokens never share
    /// an exit session. Fails at once if no exit's policy allows the target, if no route
    /// can be built, if the session is at its stream or exit-session cap, or if its payer has
    /// spent [`super::SessionConfig::max_spend`].
    pub fn open_stream<R: Rng + ?Sized>(
        &mut self,
        target: Target,
        isolation: Isolation,
        rng: &mut R,
    ) -> Result<StreamId> {
        if let (Some(cap), Some(payer)) = (self.config.max_spend, self.payer()) {
            let spent = payer.stats().expected_value_issued;
            if spent >= cap {
                self.stats.opens_refused_spend += 1;
                return Err(SessionError::SpendLimit { spent, cap });
            }
        }
        if self.streams.len() >= self.config.max_streams {
            self.stats.opens_refused_full += 1;
            return Err(SessionError::TooManyStreams {
                cap: self.config.max_streams,
            });
        }
        let exit_target = match &target {
            Target::Addr(a) => ExitTarget::Ip(a.ip(), a.port()),
            Target::Host(_, port) => ExitTarget::HostPort(*port),
        };
        let exit = self
            .selector()
            .choose_exit(rng, exit_target, &[&self.gateway])
            .map_err(SessionError::from_path)?
            .identity;
        let index = self.exit_session_for(exit, isolation, rng)?;
        let id = self.next_stream;
        self.next_stream = self.next_stream.wrapping_add(1).max(1);
        if let Some(e) = self.exits.get_mut(&index) {
            e.streams.push(id);
            e.last_active = self.now;
        }
        let window = self.stream_window();
        self.streams.insert(
            id,
            Stream {
                exit_session: index,
                target,
                state: StreamState::Opening,
                open_sent: false,
                open_sent_at: Instant::ZERO,
                outbox: VecDeque::new(),
                sent: 0,
                exit_acked: 0,
                app_closed: false,
                fin_sent: false,
                recv: RecvBuffer::new(window),
                acked_sent: 0,
                gap: None,
                unconsumed: 0,
                eof_reported: false,
                writable_wanted: false,
                window: window.min(DEFAULT_STREAM_WINDOW),
            },
        );
        Ok(id)
    }

    /// Takes up to the stream's free window of `bytes`; returns how many were taken. When
    /// fewer than all, an [`Event::Writable`] follows once there is room.
    pub fn write(&mut self, stream: StreamId, bytes: &[u8]) -> usize {
        let Some(s) = self.streams.get_mut(&stream) else {
            return 0;
        };
        if s.app_closed {
            return 0;
        }
        let n = bytes.len().min(s.window.saturating_sub(s.in_flight()));
        s.outbox.extend(&bytes[..n]);
        if n < bytes.len() {
            s.writable_wanted = true;
        }
        n
    }

    /// The application took `n` bytes of the stream's data; they may now be acknowledged.
    pub fn consumed(&mut self, stream: StreamId, n: usize) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.unconsumed = s.unconsumed.saturating_sub(n as u64);
        }
    }

    /// The application closed its sending side.
    pub fn close_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.get_mut(&stream) {
            s.app_closed = true;
        }
    }

    /// The application went away: reset the stream at the exit.
    pub fn abort_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.remove(&stream) {
            if let Some(exit) = self.exits.get_mut(&s.exit_session) {
                exit.streams.retain(|&x| x != stream);
            }
            // Tell the exit on the next message to it (a reset for an unknown stream is
            // harmless). Bounded like the streams: past that, the oldest is dropped (the exit
            // ends an abandoned stream on its own timeout).
            if self.aborted.len() >= self.config.max_streams && self.aborted.pop_front().is_some() {
                self.stats.resets_dropped += 1;
            }
            self.aborted.push_back((s.exit_session, stream));
        }
    }

    /// The exit acknowledged the stream's bytes below `offset`.
    pub(super) fn exit_acked(&mut self, exit: ExitRef, stream: StreamId, offset: u64) {
        if let Some(s) = self.stream_of(exit, stream) {
            s.exit_acked = s.exit_acked.max(offset.min(s.sent));
            if s.writable_wanted && s.in_flight() < s.window {
                s.writable_wanted = false;
                self.events.push_back(Event::Writable(stream));
            }
        }
    }

    pub(super) fn stream_of(&mut self, exit: ExitRef, stream: StreamId) -> Option<&mut Stream> {
        self.streams
            .get_mut(&stream)
            .filter(|s| s.exit_session == exit)
    }

    pub(super) fn maybe_eof(&mut self, stream: StreamId) {
        let Some(s) = self.streams.get_mut(&stream) else {
            return;
        };
        if s.recv.is_finished() && !s.eof_reported {
            s.eof_reported = true;
            self.events.push_back(Event::Eof(stream));
        }
    }

    pub(super) fn end_stream(&mut self, stream: StreamId) {
        if let Some(s) = self.streams.remove(&stream)
            && let Some(e) = self.exits.get_mut(&s.exit_session)
        {
            e.streams.retain(|&x| x != stream);
        }
    }

    /// The session gives up on `streams` (those still open): each ends with
    /// [`Event::Failed`], counted by reason.
    pub(super) fn fail_streams(&mut self, streams: &[StreamId], why: StreamFailure) {
        for &s in streams {
            if !self.streams.contains_key(&s) {
                continue;
            }
            self.end_stream(s);
            self.events.push_back(Event::Failed(s, why));
            let counter = match why {
                StreamFailure::NotAcknowledged => &mut self.stats.streams_unacknowledged,
                StreamFailure::NoPath => &mut self.stats.streams_no_path,
                StreamFailure::ExitLeftConsensus => &mut self.stats.streams_exit_left,
                StreamFailure::Bug => &mut self.stats.streams_bug,
            };
            *counter += 1;
        }
    }
}
