//! Streams between a client and an exit: the messages, and the buffers that make the byte
//! streams reliable and ordered.
//!
//! A client message ([`ClientMessage`]) names the client's session (random per client run,
//! so the exit can keep its streams and SURBs together without learning who it is) and
//! carries items: open a stream, stream data at an offset, end of data, cumulative
//! acknowledgements of the exit's data, resets, and reply blocks for the exit to answer with.
//! Client messages are fragmented into forward packets, each acknowledged by a SURB-ACK and
//! re-sent on a fresh route until it is. Every fragment of a client message starts with the
//! session id ([`split_client_message`]; a one-fragment message is just its encoding, which
//! starts with it), so an exit charges a message in progress to its session
//! ([`session_of_fragment`]) before it is whole.
//!
//! An exit message ([`ExitMessage`]) fits one reply packet. Replies have no packet-level
//! acknowledgement, so the exit keeps what it sent in a [`SendBuffer`] until the client's
//! cumulative `Ack` covers it, and re-sends what is not acknowledged in time. Both ends put
//! data back in order with a [`RecvBuffer`].

use std::collections::{BTreeMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::fragment::{Fragment, split_message};
use crate::surb::{REPLY_BLOCK_BODY_LEN, ReplyBlock};
use crate::time::Instant;
use crate::{Error, Result};

/// What is wrong with a stream message or with the stream data it carries (truncation is
/// [`Error::Truncated`]; data beyond the receive window [`Error::ReassemblyFull`]).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// An item's kind byte is unknown.
    #[error("{message} has an item of unknown kind {kind}")]
    UnknownItem { message: &'static str, kind: u8 },
    /// A refusal or reset names a reason code that is not a SOCKS5 failure code.
    #[error("refusal code {0} is not a SOCKS5 failure code (1 to 6)")]
    UnknownRefusal(u8),
    /// A target's address kind is not IPv4 (1), a host name (3) or IPv6 (4).
    #[error("target address kind {0} is unknown")]
    UnknownAddressKind(u8),
    /// A target host name is not UTF-8.
    #[error("target host name is not UTF-8")]
    HostNotUtf8,
    /// A target host name is empty.
    #[error("target host name is empty")]
    EmptyHost,
    /// Data whose last byte would lie past the largest offset.
    #[error("data of {len} bytes at offset {offset} overflows the stream's offsets")]
    OffsetOverflow { offset: u64, len: usize },
    /// Bytes follow the last item.
    #[error("{message} has {len} bytes after its last item")]
    Trailing { message: &'static str, len: usize },
    /// The stream's end was given at two offsets.
    #[error("the stream's end moved from offset {was} to {now}")]
    EndMoved { was: u64, now: u64 },
    /// The stream's end was given before data already delivered.
    #[error("the stream's end at {end} is before the {delivered} bytes already delivered")]
    EndBeforeDelivered { end: u64, delivered: u64 },
    /// Data reaching past the stream's end.
    #[error("data up to offset {end} lies past the stream's end")]
    DataPastEnd { end: u64 },
}

/// A stream's number within a session.
pub type StreamId = u32;

/// Where a stream goes. Host names are resolved by the exit, never by the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Host(String, u16),
    Addr(SocketAddr),
}

impl Target {
    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            Target::Host(_, p) => *p,
            Target::Addr(a) => a.port(),
        }
    }
}

/// Why an exit refused or ended a stream, as a SOCKS5 reply code (RFC 1928 §6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Refusal {
    General = 1,
    NotAllowed = 2,
    NetworkUnreachable = 3,
    HostUnreachable = 4,
    ConnectionRefused = 5,
    TtlExpired = 6,
}

impl Refusal {
    /// The SOCKS5 reply code.
    pub fn socks_code(self) -> u8 {
        self as u8
    }

    fn from_code(code: u8) -> Result<Self> {
        Ok(match code {
            1 => Refusal::General,
            2 => Refusal::NotAllowed,
            3 => Refusal::NetworkUnreachable,
            4 => Refusal::HostUnreachable,
            5 => Refusal::ConnectionRefused,
            6 => Refusal::TtlExpired,
            other => return Err(StreamError::UnknownRefusal(other).into()),
        })
    }
}

/// Longest host name (DNS).
pub const MAX_HOST_LEN: usize = 255;
/// Most reply blocks in one item.
pub const MAX_SURBS_PER_ITEM: usize = 255;

/// The window a client may use on a stream before the exit has said what it granted, and
/// the least an exit grants (when the client asked for at least this much).
pub const DEFAULT_STREAM_WINDOW: usize = 512 * 1024;

/// Something the client tells the exit.
#[derive(Debug)]
pub enum ClientItem {
    /// Open a stream to `target`; `window` is what the client's receive buffer holds for
    /// it, and the most it wants to send unacknowledged.
    Open {
        stream: StreamId,
        target: Target,
        window: u32,
    },
    Data {
        stream: StreamId,
        offset: u64,
        bytes: Vec<u8>,
    },
    /// The client's data for `stream` ends at `offset`.
    Fin {
        stream: StreamId,
        offset: u64,
    },
    /// The client has every exit byte of `stream` below `offset`.
    Ack {
        stream: StreamId,
        offset: u64,
    },
    Reset {
        stream: StreamId,
    },
    Surbs(Vec<ReplyBlock>),
    /// Beyond its `Ack`, the client also holds these pieces of the exit's data on `stream`,
    /// as (offset, length), lowest first: the exit need not send them again, and a piece
    /// sent well before one of these that is not among them was lost (selective
    /// acknowledgement, as TCP's SACK: replies take independent routes, so one lost reply
    /// would otherwise have every later one re-sent at its timeout).
    Received {
        stream: StreamId,
        ranges: Vec<(u64, u32)>,
    },
}

/// Most ranges in one `Received` item (390 bytes: beside four reply blocks and an ack in a
/// packet without a SURB-ACK). A download keeps hundreds of replies in flight on routes of
/// independent delays, so the data held past a gap is in many pieces; with four ranges the
/// exit heard only of the oldest, could not tell later losses from reordering and waited for
/// its timeout, re-sending what had arrived (a 1 MB download at 1% loss per link, which 501
/// replies carry, took up to 743 in eight runs; with 32, 501 or 502).
pub const MAX_RECEIVED_RANGES: usize = 32;

/// Something the exit tells the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitItem {
    /// The stream is connected; both directions use `window` (at most what the client
    /// announced).
    Opened {
        stream: StreamId,
        window: u32,
    },
    Refused {
        stream: StreamId,
        reason: Refusal,
    },
    Data {
        stream: StreamId,
        offset: u64,
        bytes: Vec<u8>,
    },
    Fin {
        stream: StreamId,
        offset: u64,
    },
    /// The exit has every client byte of `stream` below `offset`.
    Ack {
        stream: StreamId,
        offset: u64,
    },
    Reset {
        stream: StreamId,
        reason: Refusal,
    },
    /// The exit holds `have` reply blocks for this session, besides the one this came on
    /// (said with every message: the client sizes its stock of blocks at the exit by it).
    SurbsHeld {
        have: u16,
    },
}

/// One message from a client to an exit.
#[derive(Debug)]
pub struct ClientMessage {
    pub session: u64,
    pub items: Vec<ClientItem>,
}

/// One message from an exit to a client (fits one reply packet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitMessage {
    pub items: Vec<ExitItem>,
}

const OPEN: u8 = 1;
const DATA: u8 = 2;
const FIN: u8 = 3;
const ACK: u8 = 4;
const RESET: u8 = 5;
const SURBS: u8 = 6;
const OPENED: u8 = 7;
const REFUSED: u8 = 8;
const SURBS_HELD: u8 = 9;
const RECEIVED: u8 = 10;

/// Bytes an exit `Data` item adds to its payload.
pub const DATA_ITEM_OVERHEAD: usize = 1 + 4 + 8 + 2;
/// Bytes of a message's header (item count; plus the session for client messages).
pub const EXIT_MESSAGE_OVERHEAD: usize = 2;
pub const CLIENT_MESSAGE_OVERHEAD: usize = 8 + 2;

impl ClientItem {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        match self {
            ClientItem::Open { target, .. } => 1 + 4 + target_len(target) + 4,
            ClientItem::Data { bytes, .. } => DATA_ITEM_OVERHEAD + bytes.len(),
            ClientItem::Fin { .. } | ClientItem::Ack { .. } => 1 + 4 + 8,
            ClientItem::Reset { .. } => 1 + 4,
            ClientItem::Surbs(blocks) => surbs_item_len(blocks.len()),
            ClientItem::Received { ranges, .. } => received_item_len(ranges.len()),
        }
    }
}

impl ExitItem {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        match self {
            ExitItem::Opened { .. } => 1 + 4 + 4,
            ExitItem::Refused { .. } | ExitItem::Reset { .. } => 1 + 4 + 1,
            ExitItem::Data { bytes, .. } => DATA_ITEM_OVERHEAD + bytes.len(),
            ExitItem::Fin { .. } | ExitItem::Ack { .. } => 1 + 4 + 8,
            ExitItem::SurbsHeld { .. } => 1 + 2,
        }
    }
}

/// Encoded length of a `Surbs` item of `n` blocks: kind, count, their key epoch once, then
/// each block without it (so four blocks and a stream ack fit one packet).
pub fn surbs_item_len(n: usize) -> usize {
    1 + 1 + 4 + n * REPLY_BLOCK_BODY_LEN
}

/// Encoded length of a `Received` item of `n` ranges: kind, stream, count, then each range.
pub fn received_item_len(n: usize) -> usize {
    1 + 4 + 1 + n * (8 + 4)
}

fn target_len(t: &Target) -> usize {
    match t {
        Target::Host(h, _) => 1 + 1 + h.len() + 2,
        Target::Addr(SocketAddr::V4(_)) => 1 + 4 + 2,
        Target::Addr(SocketAddr::V6(_)) => 1 + 16 + 2,
    }
}

fn put_target(out: &mut Vec<u8>, t: &Target) -> Result<()> {
    match t {
        Target::Host(h, port) => {
            if h.is_empty() || h.len() > MAX_HOST_LEN {
                return Err(Error::TooLong {
                    what: "host name",
                    len: h.len(),
                    max: MAX_HOST_LEN,
                });
            }
            out.push(3);
            out.push(h.len() as u8);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(&port.to_be_bytes());
        }
        Target::Addr(SocketAddr::V4(a)) => {
            out.push(1);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Addr(SocketAddr::V6(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
    Ok(())
}

/// Bytes of the session id that starts every fragment of a client message.
pub const SESSION_ID_LEN: usize = 8;

/// An exit forgets a session with no streams after this long without a message from its
/// client, and the reply blocks it held with it; the client forgets its side (and the keys of
/// those blocks) no later (see `crate::session::exits`).
pub const SESSION_IDLE: std::time::Duration = std::time::Duration::from_secs(600);

/// Cuts an encoded [`ClientMessage`] into fragments of at most `fragment_data_len` data bytes
/// that each start with its session id (the encoding's first 8 bytes); a message that fits
/// one fragment is that fragment, unchanged.
pub fn split_client_message(
    message_id: u64,
    encoded: &[u8],
    fragment_data_len: usize,
) -> Result<Vec<Fragment>> {
    if encoded.len() <= fragment_data_len {
        return Ok(vec![Fragment {
            message_id,
            index: 0,
            count: 1,
            data: encoded.to_vec(),
        }]);
    }
    let session = encoded.get(..SESSION_ID_LEN).ok_or(Error::Truncated {
        what: "client message",
        needed: SESSION_ID_LEN,
        got: encoded.len(),
    })?;
    let body_len = fragment_data_len.saturating_sub(SESSION_ID_LEN);
    let mut fragments = split_message(message_id, &encoded[SESSION_ID_LEN..], body_len)?;
    for f in &mut fragments {
        let mut data = Vec::with_capacity(SESSION_ID_LEN + f.data.len());
        data.extend_from_slice(session);
        data.append(&mut f.data);
        f.data = data;
    }
    Ok(fragments)
}

/// The session a fragment of a client message names, and the fragment without it (what
/// [`join_client_message`] puts back together).
pub fn session_of_fragment(mut fragment: Fragment) -> Result<(u64, Fragment)> {
    let Some(id) = fragment.data.get(..SESSION_ID_LEN) else {
        return Err(Error::Truncated {
            what: "client message fragment",
            needed: SESSION_ID_LEN,
            got: fragment.data.len(),
        });
    };
    let mut session = [0u8; SESSION_ID_LEN];
    session.copy_from_slice(id);
    fragment.data.drain(..SESSION_ID_LEN);
    Ok((u64::from_be_bytes(session), fragment))
}

/// The encoded client message of `session` whose fragments, without their session ids,
/// reassembled to `body`.
pub fn join_client_message(session: u64, body: &[u8]) -> Vec<u8> {
    let mut encoded = Vec::with_capacity(SESSION_ID_LEN + body.len());
    encoded.extend_from_slice(&session.to_be_bytes());
    encoded.extend_from_slice(body);
    encoded
}

impl ClientMessage {
    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let count = u16::try_from(self.items.len()).map_err(|_| Error::TooLong {
            what: "item list",
            len: self.items.len(),
            max: u16::MAX as usize,
        })?;
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&count.to_be_bytes());
        for item in &self.items {
            match item {
                ClientItem::Open {
                    stream,
                    target,
                    window,
                } => {
                    out.push(OPEN);
                    out.extend_from_slice(&stream.to_be_bytes());
                    put_target(&mut out, target)?;
                    out.extend_from_slice(&window.to_be_bytes());
                }
                ClientItem::Data {
                    stream,
                    offset,
                    bytes,
                } => put_data(&mut out, *stream, *offset, bytes)?,
                ClientItem::Fin { stream, offset } => put_offset(&mut out, FIN, *stream, *offset),
                ClientItem::Ack { stream, offset } => put_offset(&mut out, ACK, *stream, *offset),
                ClientItem::Reset { stream } => {
                    out.push(RESET);
                    out.extend_from_slice(&stream.to_be_bytes());
                }
                ClientItem::Surbs(blocks) => {
                    if blocks.len() > MAX_SURBS_PER_ITEM {
                        return Err(Error::TooLong {
                            what: "reply block list",
                            len: blocks.len(),
                            max: MAX_SURBS_PER_ITEM,
                        });
                    }
                    let epoch = blocks.first().map_or(0, ReplyBlock::key_epoch);
                    if blocks.iter().any(|b| b.key_epoch() != epoch) {
                        return Err(Error::ReplyBlock(
                            "the blocks of one item must share their key epoch".into(),
                        ));
                    }
                    out.push(SURBS);
                    out.push(blocks.len() as u8);
                    out.extend_from_slice(&epoch.to_be_bytes());
                    for b in blocks {
                        out.extend_from_slice(&b.body_bytes());
                    }
                }
                ClientItem::Received { stream, ranges } => {
                    if ranges.len() > MAX_RECEIVED_RANGES {
                        return Err(Error::TooLong {
                            what: "received range list",
                            len: ranges.len(),
                            max: MAX_RECEIVED_RANGES,
                        });
                    }
                    out.push(RECEIVED);
                    out.extend_from_slice(&stream.to_be_bytes());
                    out.push(ranges.len() as u8);
                    for (offset, len) in ranges {
                        out.extend_from_slice(&offset.to_be_bytes());
                        out.extend_from_slice(&len.to_be_bytes());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        CLIENT_MESSAGE_OVERHEAD
            + self
                .items
                .iter()
                .map(ClientItem::encoded_len)
                .sum::<usize>()
    }

    /// Decodes a message.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "client message");
        let session = r.u64()?;
        let count = r.u16()?;
        let mut items = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let item = match r.u8()? {
                OPEN => ClientItem::Open {
                    stream: r.u32()?,
                    target: r.target()?,
                    window: r.u32()?,
                },
                DATA => {
                    let (stream, offset, bytes) = r.data()?;
                    ClientItem::Data {
                        stream,
                        offset,
                        bytes,
                    }
                }
                FIN => ClientItem::Fin {
                    stream: r.u32()?,
                    offset: r.u64()?,
                },
                ACK => ClientItem::Ack {
                    stream: r.u32()?,
                    offset: r.u64()?,
                },
                RESET => ClientItem::Reset { stream: r.u32()? },
                SURBS => {
                    let n = r.u8()?;
                    let epoch = r.u32()?;
                    // One encoding per list: an empty one names epoch 0.
                    if n == 0 && epoch != 0 {
                        return Err(Error::ReplyBlock(
                            "an empty reply block list names a key epoch".into(),
                        ));
                    }
                    let mut blocks = Vec::with_capacity(usize::from(n));
                    for _ in 0..n {
                        blocks.push(ReplyBlock::from_body(epoch, r.take(REPLY_BLOCK_BODY_LEN)?)?);
                    }
                    ClientItem::Surbs(blocks)
                }
                RECEIVED => {
                    let stream = r.u32()?;
                    let n = usize::from(r.u8()?);
                    if n > MAX_RECEIVED_RANGES {
                        return Err(Error::TooLong {
                            what: "received range list",
                            len: n,
                            max: MAX_RECEIVED_RANGES,
                        });
                    }
                    let mut ranges = Vec::with_capacity(n);
                    for _ in 0..n {
                        ranges.push((r.u64()?, r.u32()?));
                    }
                    ClientItem::Received { stream, ranges }
                }
                other => {
                    return Err(StreamError::UnknownItem {
                        message: r.what,
                        kind: other,
                    }
                    .into());
                }
            };
            items.push(item);
        }
        r.finish()?;
        Ok(ClientMessage { session, items })
    }
}

impl ExitMessage {
    /// Encoded length.
    pub fn encoded_len(&self) -> usize {
        EXIT_MESSAGE_OVERHEAD + self.items.iter().map(ExitItem::encoded_len).sum::<usize>()
    }

    /// Encodes the message.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let count = u16::try_from(self.items.len()).map_err(|_| Error::TooLong {
            what: "item list",
            len: self.items.len(),
            max: u16::MAX as usize,
        })?;
        let mut out = Vec::with_capacity(self.encoded_len());
        out.extend_from_slice(&count.to_be_bytes());
        for item in &self.items {
            match item {
                ExitItem::Opened { stream, window } => {
                    out.push(OPENED);
                    out.extend_from_slice(&stream.to_be_bytes());
                    out.extend_from_slice(&window.to_be_bytes());
                }
                ExitItem::Refused { stream, reason } | ExitItem::Reset { stream, reason } => {
                    out.push(if matches!(item, ExitItem::Refused { .. }) {
                        REFUSED
                    } else {
                        RESET
                    });
                    out.extend_from_slice(&stream.to_be_bytes());
                    out.push(reason.socks_code());
                }
                ExitItem::Data {
                    stream,
                    offset,
                    bytes,
                } => put_data(&mut out, *stream, *offset, bytes)?,
                ExitItem::Fin { stream, offset } => put_offset(&mut out, FIN, *stream, *offset),
                ExitItem::Ack { stream, offset } => put_offset(&mut out, ACK, *stream, *offset),
                ExitItem::SurbsHeld { have } => {
                    out.push(SURBS_HELD);
                    out.extend_from_slice(&have.to_be_bytes());
                }
            }
        }
        Ok(out)
    }

    /// Decodes a message.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let mut r = Reader::new(bytes, "exit message");
        let count = r.u16()?;
        let mut items = Vec::with_capacity(usize::from(count).min(64));
        for _ in 0..count {
            let item = match r.u8()? {
                OPENED => ExitItem::Opened {
                    stream: r.u32()?,
                    window: r.u32()?,
                },
                REFUSED => ExitItem::Refused {
                    stream: r.u32()?,
                    reason: Refusal::from_code(r.u8()?)?,
                },
                RESET => ExitItem::Reset {
                    stream: r.u32()?,
                    reason: Refusal::from_code(r.u8()?)?,
                },
                DATA => {
                    let (stream, offset, bytes) = r.data()?;
                    ExitItem::Data {
                        stream,
                        offset,
                        bytes,
                    }
                }
                FIN => ExitItem::Fin {
                    stream: r.u32()?,
                    offset: r.u64()?,
                },
                ACK => ExitItem::Ack {
                    stream: r.u32()?,
                    offset: r.u64()?,
                },
                SURBS_HELD => ExitItem::SurbsHeld { have: r.u16()? },
                other => {
                    return Err(StreamError::UnknownItem {
                        message: r.what,
                        kind: other,
                    }
                    .into());
                }
            };
            items.push(item);
        }
        r.finish()?;
        Ok(ExitMessage { items })
    }
}

fn put_offset(out: &mut Vec<u8>, kind: u8, stream: StreamId, offset: u64) {
    out.push(kind);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
}

fn put_data(out: &mut Vec<u8>, stream: StreamId, offset: u64, bytes: &[u8]) -> Result<()> {
    let len = u16::try_from(bytes.len()).map_err(|_| Error::TooLong {
        what: "data item",
        len: bytes.len(),
        max: u16::MAX as usize,
    })?;
    out.push(DATA);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Self {
        Reader { bytes, at: 0, what }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len());
        let Some(end) = end else {
            return Err(Error::Truncated {
                what: self.what,
                needed: self.at.saturating_add(n),
                got: self.bytes.len(),
            });
        };
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn data(&mut self) -> Result<(StreamId, u64, Vec<u8>)> {
        let stream = self.u32()?;
        let offset = self.u64()?;
        let len = usize::from(self.u16()?);
        let bytes = self.take(len)?.to_vec();
        if offset.checked_add(len as u64).is_none() {
            return Err(StreamError::OffsetOverflow { offset, len }.into());
        }
        Ok((stream, offset, bytes))
    }

    fn target(&mut self) -> Result<Target> {
        match self.u8()? {
            1 => {
                let ip = Ipv4Addr::from(self.array::<4>()?);
                Ok(Target::Addr(SocketAddr::new(IpAddr::V4(ip), self.u16()?)))
            }
            4 => {
                let ip = Ipv6Addr::from(self.array::<16>()?);
                Ok(Target::Addr(SocketAddr::new(IpAddr::V6(ip), self.u16()?)))
            }
            3 => {
                let len = usize::from(self.u8()?);
                let host = std::str::from_utf8(self.take(len)?)
                    .map_err(|_| StreamError::HostNotUtf8)?
                    .to_string();
                if host.is_empty() {
                    return Err(StreamError::EmptyHost.into());
                }
                Ok(Target::Host(host, self.u16()?))
            }
            other => Err(StreamError::UnknownAddressKind(other).into()),
        }
    }

    fn finish(&self) -> Result<()> {
        if self.at == self.bytes.len() {
            Ok(())
        } else {
            Err(StreamError::Trailing {
                message: self.what,
                len: self.bytes.len() - self.at,
            }
            .into())
        }
    }
}

/// Puts a byte stream back in order from pieces arriving at any offset, at most once each.
#[derive(Debug)]
pub struct RecvBuffer {
    /// Every byte below this has been handed over.
    delivered: u64,
    /// Pieces beyond `delivered`, keyed by offset, not overlapping.
    pending: BTreeMap<u64, Vec<u8>>,
    pending_bytes: usize,
    /// The most bytes held out of order; pieces beyond `delivered + window` are refused.
    window: usize,
    /// Where the stream ends, once known.
    fin: Option<u64>,
}

impl RecvBuffer {
    pub fn new(window: usize) -> Self {
        RecvBuffer {
            delivered: 0,
            pending: BTreeMap::new(),
            pending_bytes: 0,
            window,
            fin: None,
        }
    }

    /// Every byte below this offset has been delivered (a cumulative ack).
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Whether every byte up to the end of the stream has been delivered.
    pub fn is_finished(&self) -> bool {
        self.fin == Some(self.delivered)
    }

    /// Notes that the stream ends at `offset`.
    pub fn finish_at(&mut self, offset: u64) -> Result<()> {
        match self.fin {
            Some(f) if f != offset => Err(StreamError::EndMoved {
                was: f,
                now: offset,
            }
            .into()),
            _ if offset < self.delivered => Err(StreamError::EndBeforeDelivered {
                end: offset,
                delivered: self.delivered,
            }
            .into()),
            _ => {
                self.fin = Some(offset);
                Ok(())
            }
        }
    }

    /// Takes data at `offset`; returns the bytes now deliverable in order (maybe none).
    /// Data already delivered or held is ignored; data beyond the window is refused.
    pub fn insert(&mut self, offset: u64, bytes: &[u8]) -> Result<Vec<u8>> {
        let end = offset.saturating_add(bytes.len() as u64);
        if self.fin.is_some_and(|f| end > f) {
            return Err(StreamError::DataPastEnd { end }.into());
        }
        if end > self.delivered.saturating_add(self.window as u64) {
            return Err(Error::ReassemblyFull("stream receive window"));
        }
        // Trim what was already delivered.
        let (mut offset, mut bytes) = (offset, bytes);
        if offset < self.delivered {
            let skip = (self.delivered - offset).min(bytes.len() as u64) as usize;
            bytes = &bytes[skip..];
            offset = self.delivered;
        }
        if bytes.is_empty() {
            return Ok(Vec::new());
        }
        // Keep only the parts not already held (pieces never overlap).
        let mut pieces = vec![(offset, bytes.to_vec())];
        for (&o, held) in self
            .pending
            .range(..offset.saturating_add(bytes.len() as u64))
        {
            let held_end = o + held.len() as u64;
            pieces = pieces
                .into_iter()
                .flat_map(|(po, pb)| cut(po, pb, o, held_end))
                .collect();
        }
        for (po, pb) in pieces {
            self.pending_bytes += pb.len();
            self.pending.insert(po, pb);
        }
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() != self.delivered {
                break;
            }
            let piece = entry.remove();
            self.pending_bytes -= piece.len();
            self.delivered += piece.len() as u64;
            out.extend_from_slice(&piece);
        }
        Ok(out)
    }

    /// Up to `max` ranges held beyond `from` (an ack at or below what was delivered), as
    /// (offset, length), lowest first: what was delivered above `from`, then the pieces
    /// held out of order, adjacent ones joined.
    pub fn held_ranges(&self, from: u64, max: usize) -> Vec<(u64, u32)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let delivered = (from < self.delivered).then_some((from, self.delivered));
        let pieces = self.pending.iter().map(|(&o, b)| (o, o + b.len() as u64));
        for (start, end) in delivered.into_iter().chain(pieces) {
            if let Some(last) = out.last_mut()
                && last.1 == start
            {
                last.1 = end;
            } else if out.len() == max {
                break;
            } else {
                out.push((start, end));
            }
        }
        out.into_iter()
            .map(|(start, end)| (start, u32::try_from(end - start).unwrap_or(u32::MAX)))
            .collect()
    }

    /// Bytes held out of order.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }
}

/// The parts of `[po, po+pb.len())` outside `[o, end)`.
fn cut(po: u64, pb: Vec<u8>, o: u64, end: u64) -> Vec<(u64, Vec<u8>)> {
    let pend = po + pb.len() as u64;
    if end <= po || o >= pend {
        return vec![(po, pb)];
    }
    let mut out = Vec::new();
    if po < o {
        out.push((po, pb[..(o - po) as usize].to_vec()));
    }
    if end < pend {
        out.push((end, pb[(end - po) as usize..].to_vec()));
    }
    out
}

/// A smoothed round trip and its variation, as TCP keeps them (RFC 6298), once measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct RttEstimate(Option<(Duration, Duration)>);

impl RttEstimate {
    /// Takes one round-trip measurement.
    pub fn sample(&mut self, rtt: Duration) {
        self.0 = Some(match self.0 {
            None => (rtt, rtt / 2),
            Some((srtt, var)) => ((srtt * 7 + rtt) / 8, (var * 3 + srtt.abs_diff(rtt)) / 4),
        });
    }

    /// SRTT + 4·RTTVAR: a timeout a round trip rarely exceeds.
    pub fn timeout(&self) -> Option<Duration> {
        self.0.map(|(srtt, var)| srtt + var * 4)
    }

    /// How much later a packet may arrive than the first of those sent after it: a whole
    /// round trip. Packets cross a mixnet on routes of independent exponential delays, and
    /// of the many sent after it the fastest overtakes it by nearly the spread of one-way
    /// delays; half a round trip flagged about a third of a devnet download's replies lost
    /// that were not.
    pub fn reorder_window(&self) -> Option<Duration> {
        self.0.map(|(srtt, _)| srtt)
    }
}

/// The sending side of a stream whose receiver acknowledges cumulatively: holds data until
/// acknowledged, hands out new segments, and re-sends segments not acknowledged within the
/// retransmission timeout. The timeout adapts to the measured round trip as TCP's does
/// (RFC 6298: SRTT + 4·RTTVAR, samples only from segments sent once — Karn's rule), within
/// `[min_rto, max_rto]`; it starts at the `initial` timeout given to [`SendBuffer::new`].
#[derive(Debug)]
pub struct SendBuffer {
    /// Offset of `unacked[0]`: everything below is acknowledged.
    acked: u64,
    unacked: VecDeque<u8>,
    /// Offset of the first byte never sent.
    next_new: u64,
    /// Sent segments not yet acknowledged: offset → (length, when last sent, sent only once).
    in_flight: BTreeMap<u64, (usize, Instant, bool)>,
    window: usize,
    rto: Duration,
    min_rto: Duration,
    max_rto: Duration,
    /// Smoothed round trip and its variation, once measured.
    rtt: RttEstimate,
    /// When the newest segment known to have arrived was sent: a segment sent well before it
    /// and not known to have arrived was lost ([`Self::received`]).
    newest_arrived: Option<Instant>,
    /// Where the data ends, once the writer closed.
    fin: Option<u64>,
}

impl SendBuffer {
    /// A buffer holding at most `window` unacknowledged bytes, retransmitting after `initial`
    /// until round trips are measured (then between a tenth of it and ten seconds).
    pub fn new(window: usize, initial: Duration) -> Self {
        SendBuffer {
            acked: 0,
            unacked: VecDeque::new(),
            next_new: 0,
            in_flight: BTreeMap::new(),
            window,
            rto: initial,
            min_rto: initial / 10,
            max_rto: initial.max(Duration::from_secs(10)),
            rtt: RttEstimate::default(),
            newest_arrived: None,
            fin: None,
        }
    }

    /// The retransmission timeout now in force.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    fn sample(&mut self, rtt: Duration) {
        self.rtt.sample(rtt);
        if let Some(timeout) = self.rtt.timeout() {
            self.rto = timeout.clamp(self.min_rto, self.max_rto);
        }
    }

    /// How many more bytes [`Self::push`] accepts now.
    pub fn space(&self) -> usize {
        if self.fin.is_some() {
            return 0;
        }
        self.window.saturating_sub(self.unacked.len())
    }

    /// Appends data (at most [`Self::space`] bytes are taken); returns how many were taken.
    pub fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.space());
        self.unacked.extend(&bytes[..n]);
        n
    }

    /// Marks the end of the data.
    pub fn close(&mut self) {
        if self.fin.is_none() {
            self.fin = Some(self.acked + self.unacked.len() as u64);
        }
    }

    /// Where the data ends, if closed.
    pub fn fin_offset(&self) -> Option<u64> {
        self.fin
    }

    /// The peer has every byte below `offset` (as learnt at `now`). Returns whether anything
    /// new was acknowledged.
    pub fn ack(&mut self, offset: u64, now: Instant) -> bool {
        let end = self.acked + self.unacked.len() as u64;
        let offset = offset.min(end).min(self.next_new);
        if offset <= self.acked {
            return false;
        }
        self.unacked.drain(..(offset - self.acked) as usize);
        self.acked = offset;
        // Drop segments wholly acknowledged; a partly acknowledged one shrinks.
        let covered: Vec<u64> = self.in_flight.range(..offset).map(|(&o, _)| o).collect();
        let mut newest_clean: Option<Instant> = None;
        let mut resent_covered = false;
        for o in covered {
            let Some(&(len, at, once)) = self.in_flight.get(&o) else {
                continue;
            };
            let end = o + len as u64;
            if end > offset {
                self.in_flight.remove(&o);
                self.in_flight
                    .insert(offset, ((end - offset) as usize, at, once));
            } else if let Some((at, once)) = self.arrived(o) {
                if once {
                    newest_clean = newest_clean.max(Some(at));
                } else {
                    resent_covered = true;
                }
            }
        }
        // An ack that fills a re-sent hole was held back by the hole, not by the round trip:
        // the segments it covers waited for the re-send, and a sample from them would be
        // about one RTO long, so each loss would lengthen the next stall (Karn's rule, for
        // every segment the ack covers).
        if let Some(at) = newest_clean.filter(|_| !resent_covered) {
            self.sample(now.saturating_duration_since(at));
        }
        true
    }

    /// The peer also holds `ranges` (offset, length) beyond its cumulative ack, as learnt
    /// at `now`: segments wholly inside them are not sent again, and those sent well before
    /// the newest of them ([`RttEstimate::reorder_window`]) are lost, and due at once.
    pub fn received(&mut self, ranges: &[(u64, u32)], now: Instant) {
        let arrived: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|&(&o, &(len, _, _))| {
                let end = o + len as u64;
                ranges
                    .iter()
                    .any(|&(ro, rl)| ro <= o && end <= ro.saturating_add(u64::from(rl)))
            })
            .map(|(&o, _)| o)
            .collect();
        let mut newest_clean: Option<Instant> = None;
        for o in arrived {
            if let Some((at, true)) = self.arrived(o) {
                newest_clean = newest_clean.max(Some(at));
            }
        }
        if let Some(at) = newest_clean {
            self.sample(now.saturating_duration_since(at));
        }
    }

    /// Forgets in-flight segment `o`, which arrived (acked or held by the peer): when it was
    /// last sent, and whether it was sent only once.
    fn arrived(&mut self, o: u64) -> Option<(Instant, bool)> {
        let (_, at, once) = self.in_flight.remove(&o)?;
        self.newest_arrived = self.newest_arrived.max(Some(at));
        Some((at, once))
    }

    /// Whether a segment last sent `at` was lost: one sent well after it arrived. (Strictly
    /// after: a segment re-sent now is never lost by a segment sent with it or before.)
    fn lost(&self, at: Instant) -> bool {
        let reorder = self.rtt.reorder_window().unwrap_or(self.rto / 4);
        self.newest_arrived.is_some_and(|n| at + reorder < n)
    }

    /// Everything sent is acknowledged, and the data is closed.
    pub fn is_done(&self) -> bool {
        self.fin.is_some() && self.unacked.is_empty()
    }

    /// The peer has every byte below this offset.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Bytes held (sent or not) until acknowledged.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked.len()
    }

    /// The next segment to send at `now`, at most `max_len` bytes: a timed-out one first,
    /// then new data. Returns `(offset, bytes)`.
    pub fn poll_segment(&mut self, now: Instant, max_len: usize) -> Option<(u64, Vec<u8>)> {
        if max_len == 0 {
            return None;
        }
        let due = self
            .in_flight
            .iter()
            .find(|(_, (_, at, _))| {
                now.saturating_duration_since(*at) >= self.rto || self.lost(*at)
            })
            .map(|(&o, &(len, _, _))| (o, len));
        let (offset, len) = match due {
            Some((o, len)) => {
                let take = len.min(max_len);
                self.in_flight.remove(&o);
                self.in_flight.insert(o, (take, now, false));
                if take < len {
                    self.in_flight
                        .insert(o + take as u64, (len - take, Instant::ZERO, false));
                }
                (o, take)
            }
            None => {
                let end = self.acked + self.unacked.len() as u64;
                if self.next_new >= end {
                    return None;
                }
                let take = ((end - self.next_new) as usize).min(max_len);
                let o = self.next_new;
                self.in_flight.insert(o, (take, now, true));
                self.next_new += take as u64;
                (o, take)
            }
        };
        let start = (offset - self.acked) as usize;
        let bytes = self.unacked.range(start..start + len).copied().collect();
        Some((offset, bytes))
    }

    /// When the earliest in-flight segment times out.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.in_flight
            .values()
            .map(|&(_, at, _)| if self.lost(at) { at } else { at + self.rto })
            .min()
    }

    /// Bytes in segments sent and neither acknowledged nor said held by the peer.
    pub fn in_flight_bytes(&self) -> usize {
        self.in_flight.values().map(|&(len, _, _)| len).sum()
    }

    /// Whether new (never sent) data is waiting.
    pub fn has_new(&self) -> bool {
        self.next_new < self.acked + self.unacked.len() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Each malformation is named for what it is (not a stand-in variant).
    #[test]
    fn malformed_stream_messages_say_what_is_wrong() {
        let open = |host: &str| ClientMessage {
            session: 7,
            items: vec![ClientItem::Open {
                stream: 1,
                target: Target::Host(host.into(), 80),
                window: 1 << 20,
            }],
        };
        let bytes = open("x").encode().unwrap();
        let at = bytes.len() - 3 - 4; // the host's one byte, before the port and the window
        assert_eq!(bytes[at], b'x');
        let mut not_utf8 = bytes.clone();
        not_utf8[at] = 0xff;
        assert_eq!(
            ClientMessage::decode(&not_utf8).err(),
            Some(Error::Stream(StreamError::HostNotUtf8))
        );
        let mut address_kind = bytes.clone();
        address_kind[at - 2] = 9;
        assert_eq!(
            ClientMessage::decode(&address_kind).err(),
            Some(Error::Stream(StreamError::UnknownAddressKind(9)))
        );
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(matches!(
            ClientMessage::decode(&trailing),
            Err(Error::Stream(StreamError::Trailing { len: 1, .. }))
        ));
        let overflow = ExitMessage {
            items: vec![ExitItem::Data {
                stream: 1,
                offset: u64::MAX - 1,
                bytes: vec![0; 4],
            }],
        };
        assert_eq!(
            ExitMessage::decode(&overflow.encode().unwrap()),
            Err(Error::Stream(StreamError::OffsetOverflow {
                offset: u64::MAX - 1,
                len: 4
            }))
        );
        let mut r = RecvBuffer::new(64);
        r.finish_at(10).unwrap();
        assert_eq!(
            r.finish_at(12),
            Err(Error::Stream(StreamError::EndMoved { was: 10, now: 12 }))
        );
    }

    #[test]
    fn exit_messages_round_trip_and_bad_bytes_error() {
        let m = ExitMessage {
            items: vec![
                ExitItem::Opened {
                    stream: 1,
                    window: 1 << 21,
                },
                ExitItem::Refused {
                    stream: 2,
                    reason: Refusal::NotAllowed,
                },
                ExitItem::Data {
                    stream: 1,
                    offset: 5,
                    bytes: b"hello".to_vec(),
                },
                ExitItem::Fin {
                    stream: 1,
                    offset: 10,
                },
                ExitItem::Ack {
                    stream: 1,
                    offset: 3,
                },
                ExitItem::Reset {
                    stream: 3,
                    reason: Refusal::HostUnreachable,
                },
                ExitItem::SurbsHeld { have: 4 },
            ],
        };
        let bytes = m.encode().unwrap();
        assert_eq!(bytes.len(), m.encoded_len());
        assert_eq!(ExitMessage::decode(&bytes).unwrap(), m);
        assert!(ExitMessage::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(ExitMessage::decode(&extra).is_err());
    }

    #[test]
    fn recv_buffer_orders_trims_and_bounds() {
        let mut r = RecvBuffer::new(10);
        assert_eq!(r.insert(3, b"def").unwrap(), b"");
        assert_eq!(r.insert(0, b"abcd").unwrap(), b"abcdef");
        assert_eq!(r.insert(2, b"cdefg").unwrap(), b"g");
        assert_eq!(r.delivered(), 7);
        assert!(r.insert(7, &[0; 11]).is_err(), "beyond the window");
        r.finish_at(8).unwrap();
        assert!(r.insert(7, b"hi").is_err(), "past the end");
        assert!(!r.is_finished());
        assert_eq!(r.insert(7, b"h").unwrap(), b"h");
        assert!(r.is_finished());
    }

    #[test]
    fn recv_buffer_says_what_it_holds_past_the_ack() {
        let mut r = RecvBuffer::new(100);
        assert_eq!(r.insert(0, &[1; 10]).unwrap().len(), 10);
        r.insert(20, &[2; 10]).unwrap();
        r.insert(30, &[3; 10]).unwrap();
        r.insert(50, &[4; 10]).unwrap();
        r.insert(70, &[5; 1]).unwrap();
        // Acked up to 5: 5..10 was delivered but not consumed, and adjacent pieces join.
        assert_eq!(
            r.held_ranges(5, 8),
            vec![(5, 5), (20, 20), (50, 10), (70, 1)]
        );
        assert_eq!(r.held_ranges(10, 2), vec![(20, 20), (50, 10)]);
        assert_eq!(RecvBuffer::new(10).held_ranges(0, 4), Vec::new());
    }

    #[test]
    fn send_buffer_resends_at_once_what_later_arrivals_show_lost_and_never_what_arrived() {
        let rto = Duration::from_secs(1);
        let mut s = SendBuffer::new(100, rto);
        s.push(&[7; 30]);
        let t0 = Instant::ZERO;
        assert_eq!(s.poll_segment(t0, 10).map(|x| x.0), Some(0));
        let t1 = t0 + Duration::from_millis(400);
        assert_eq!(s.poll_segment(t1, 10).map(|x| x.0), Some(10));
        assert_eq!(s.poll_segment(t1, 10).map(|x| x.0), Some(20));
        // 10..30 arrived (sent 400 ms after 0..10, more than a quarter of the initial RTO):
        // 0..10 is due now, long before its timeout, and only it.
        let t2 = t1 + Duration::from_millis(100);
        s.received(&[(10, 20)], t2);
        assert_eq!(s.poll_timeout(), Some(t0));
        assert_eq!(s.poll_segment(t2, 10), Some((0, vec![7; 10])));
        assert_eq!(s.poll_segment(t2 + rto * 5, 10).map(|x| x.0), Some(0));
        assert_eq!(s.poll_segment(t2 + rto * 5, 10), None, "10..30 arrived");
        assert!(s.ack(30, t2 + rto * 5));
        assert_eq!(s.unacked_bytes(), 0);
    }

    #[test]
    fn an_ack_that_fills_a_resent_hole_gives_no_round_trip_sample() {
        let rto = Duration::from_secs(1);
        let mut s = SendBuffer::new(100, rto);
        s.push(&[7; 20]);
        let t0 = Instant::ZERO;
        s.poll_segment(t0, 10);
        s.poll_segment(t0, 10);
        // 0..10 is lost and re-sent at its timeout; the ack covering both comes just after:
        // 10..20 waited a whole RTO for the hole, which is no round trip.
        let t1 = t0 + rto;
        assert_eq!(s.poll_segment(t1, 10).map(|x| x.0), Some(0));
        assert!(s.ack(20, t1 + Duration::from_millis(50)));
        assert_eq!(s.rto(), rto, "no sample taken");
    }

    #[test]
    fn send_buffer_retransmits_after_rto_and_frees_on_ack() {
        let rto = Duration::from_secs(1);
        let mut s = SendBuffer::new(8, rto);
        assert_eq!(s.push(b"abcdefghij"), 8);
        let t0 = Instant::ZERO;
        assert_eq!(s.poll_segment(t0, 3), Some((0, b"abc".to_vec())));
        assert_eq!(s.poll_segment(t0, 3), Some((3, b"def".to_vec())));
        assert_eq!(s.poll_segment(t0, 3), Some((6, b"gh".to_vec())));
        assert_eq!(s.poll_segment(t0, 3), None);
        assert!(s.ack(3, t0));
        assert_eq!(s.space(), 3);
        let t1 = t0 + rto;
        assert_eq!(s.poll_segment(t1, 2), Some((3, b"de".to_vec())));
        assert_eq!(
            s.poll_segment(t1, 8),
            Some((5, b"f".to_vec())),
            "rest of the split segment"
        );
        assert_eq!(s.poll_segment(t1, 8), Some((6, b"gh".to_vec())));
        s.close();
        assert!(s.ack(8, t1));
        assert!(s.is_done());
        assert_eq!(s.poll_timeout(), None);
    }

    proptest! {
        #[test]
        fn client_messages_split_by_session_reassemble(
            session: u64,
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            fragment_len in 16usize..600,
            reverse: bool,
        ) {
            use crate::fragment::{Assembled, Reassembler, ReassemblyLimits};
            let encoded = join_client_message(session, &body);
            let mut fragments = split_client_message(5, &encoded, fragment_len).unwrap();
            if reverse {
                fragments.reverse();
            }
            let mut r = Reassembler::new(ReassemblyLimits::default());
            let mut whole = None;
            for f in fragments {
                prop_assert!(f.data.len() <= fragment_len);
                let (owner, piece) = session_of_fragment(f).unwrap();
                prop_assert_eq!(owner, session);
                if let Assembled::Complete { message, .. } =
                    r.insert_owned(owner, piece, Instant::ZERO).unwrap()
                {
                    whole = Some(join_client_message(owner, &message));
                }
            }
            prop_assert_eq!(whole, Some(encoded));
        }

        #[test]
        fn any_delivery_order_reassembles_the_stream(
            data in proptest::collection::vec(any::<u8>(), 1..3000),
            cuts in proptest::collection::vec(1usize..400, 1..40),
            order_seed: u64,
            dup in 0usize..4,
        ) {
            let mut pieces = Vec::new();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= data.len() { break; }
                let end = (at + c).min(data.len());
                pieces.push((at as u64, data[at..end].to_vec()));
                at = end;
            }
            for i in 0..dup.min(pieces.len()) {
                pieces.push(pieces[i].clone());
            }
            // Deterministic shuffle.
            let mut x = order_seed | 1;
            for i in (1..pieces.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                pieces.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut r = RecvBuffer::new(data.len());
            let mut out = Vec::new();
            for (o, b) in pieces {
                out.extend(r.insert(o, &b).unwrap());
            }
            prop_assert_eq!(out, data);
            prop_assert_eq!(r.pending_bytes(), 0);
        }

        #[test]
        fn send_then_lossy_delivery_with_retransmission_arrives_whole(
            data in proptest::collection::vec(any::<u8>(), 1..5000),
            seg in 1usize..700,
            loss_pattern in proptest::collection::vec(any::<bool>(), 1..50),
        ) {
            let rto = Duration::from_secs(1);
            let mut s = SendBuffer::new(1 << 20, rto);
            prop_assert_eq!(s.push(&data), data.len());
            s.close();
            let mut r = RecvBuffer::new(1 << 20);
            let mut out = Vec::new();
            let mut now = Instant::ZERO;
            let mut i = 0;
            for _round in 0..200 {
                while let Some((o, b)) = s.poll_segment(now, seg) {
                    let lost = loss_pattern[i % loss_pattern.len()] && i < 10_000 && _round < 100;
                    i += 1;
                    if !lost {
                        out.extend(r.insert(o, &b).unwrap());
                    }
                }
                s.ack(r.delivered(), now);
                if s.is_done() { break; }
                now = now + rto;
            }
            prop_assert!(s.is_done());
            prop_assert_eq!(out, data);
        }

        /// The same with selective acks: what the receiver said it holds is never sent again,
        /// and the stream still arrives whole.
        #[test]
        fn selective_acks_keep_the_stream_whole_and_resend_only_holes(
            data in proptest::collection::vec(any::<u8>(), 1..5000),
            seg in 1usize..700,
            loss_pattern in proptest::collection::vec(any::<bool>(), 1..50),
        ) {
            let rto = Duration::from_secs(1);
            let mut s = SendBuffer::new(1 << 20, rto);
            prop_assert_eq!(s.push(&data), data.len());
            s.close();
            let mut r = RecvBuffer::new(1 << 20);
            let mut out = Vec::new();
            let mut now = Instant::ZERO;
            let mut i = 0;
            // Every range the receiver said it held.
            let mut told: Vec<(u64, u32)> = Vec::new();
            for _round in 0..400 {
                while let Some((o, b)) = s.poll_segment(now, seg) {
                    let end = o + b.len() as u64;
                    prop_assert!(
                        !told.iter().any(|&(ho, hl)| ho <= o && end <= ho + u64::from(hl)),
                        "{}..{} re-sent though the receiver said it held it", o, end
                    );
                    let lost = loss_pattern[i % loss_pattern.len()] && i % 3 != 0;
                    i += 1;
                    if !lost {
                        out.extend(r.insert(o, &b).unwrap());
                    }
                }
                s.ack(r.delivered(), now);
                let held = r.held_ranges(r.delivered(), MAX_RECEIVED_RANGES);
                s.received(&held, now);
                told.extend(held);
                if s.is_done() { break; }
                now = now + Duration::from_millis(300);
            }
            prop_assert!(s.is_done());
            prop_assert_eq!(out, data);
        }

        #[test]
        fn client_messages_round_trip(
            session: u64,
            stream: u32,
            offset in 0u64..1 << 40,
            bytes in proptest::collection::vec(any::<u8>(), 0..1500),
            host in "[a-z0-9.-]{1,60}",
            port: u16,
            v4: [u8; 4],
            v6: [u8; 16],
        ) {
            let msg = ClientMessage {
                session,
                items: vec![
                    ClientItem::Open { stream, target: Target::Host(host.clone(), port), window: stream },
                    ClientItem::Open { stream, target: Target::Addr(SocketAddr::from((v4, port))), window: 0 },
                    ClientItem::Open { stream, target: Target::Addr(SocketAddr::from((v6, port))), window: u32::MAX },
                    ClientItem::Data { stream, offset, bytes: bytes.clone() },
                    ClientItem::Fin { stream, offset },
                    ClientItem::Ack { stream, offset },
                    ClientItem::Reset { stream },
                    ClientItem::Surbs(Vec::new()),
                    ClientItem::Received { stream, ranges: vec![(offset, stream), (offset ^ 1, 7)] },
                    ClientItem::Received { stream, ranges: Vec::new() },
                ],
            };
            let enc = msg.encode().unwrap();
            prop_assert_eq!(enc.len(), msg.encoded_len());
            let dec = ClientMessage::decode(&enc).unwrap();
            prop_assert_eq!(dec.session, session);
            prop_assert_eq!(dec.encode().unwrap(), enc);
        }

        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ClientMessage::decode(&bytes);
            let _ = ExitMessage::decode(&bytes);
        }
    }
}
