//! The protocol crate's error. Subsystems with errors of their own
//! ([`crate::session::SessionError`], [`crate::stream::StreamError`]) convert into it, so
//! callers that want one type keep it; a variant names one failure, never a stand-in for
//! another.

/// Everything that can go wrong in the protocol layer. Each variant names what was wrong
/// with the input, so a driver can log it, count it under a stable label and carry on.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    // ---- packets ----
    /// A packet buffer has the wrong size.
    #[error("packet has {got} bytes; every Murmur packet has exactly {expected}")]
    PacketLength { got: usize, expected: usize },
    /// The header's group element is not a canonical X25519 encoding (a flipped high bit).
    #[error("packet header carries a non-canonical group element")]
    NonCanonicalElement,
    /// The header MAC does not verify: the header was altered, or sealed for another key.
    #[error("packet header MAC does not verify (tampered, or built for another key)")]
    HeaderMac,
    /// The header verified but its routing information cannot be used.
    #[error("packet routing information is malformed: {0}")]
    Routing(String),
    /// The payload could not be decrypted or its padding is wrong.
    #[error("packet payload is malformed: {0}")]
    Payload(String),
    /// A route has a length Sphinx cannot carry.
    #[error("a route needs 1 to {max} hops and as many delays; got {hops} hops, {delays} delays")]
    RouteShape {
        hops: usize,
        delays: usize,
        max: usize,
    },
    /// A message is too long to fit where it was put.
    #[error("{what} of {len} bytes does not fit in {max} bytes")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// Building a packet or SURB failed inside Sphinx.
    #[error("could not build Sphinx packet: {0}")]
    Build(String),

    // ---- SURBs ----
    /// A reply block's bytes are malformed.
    #[error("reply block is malformed: {0}")]
    ReplyBlock(String),
    /// A reply did not decrypt under the keys kept for its SURB: forged or corrupted.
    #[error("reply does not decrypt under its SURB keys (forged or corrupted)")]
    ReplyNotAuthentic,

    // ---- frames ----
    /// A frame buffer has the wrong size.
    #[error("frame has {got} bytes; every frame on a link has exactly {expected}")]
    FrameLength { got: usize, expected: usize },
    /// A frame names a wire version this build does not speak.
    #[error("frame version {0} is not supported (this build speaks version {1})")]
    FrameVersion(u8, u8),
    /// A frame's kind byte is unknown.
    #[error("frame kind {0} is unknown")]
    FrameKind(u8),
    /// A frame's reserved or padding bytes are not zero.
    #[error("frame has non-zero bytes in its {0}")]
    FramePadding(&'static str),

    // ---- payload plaintext ----
    /// The decrypted payload's content kind is unknown.
    #[error("payload content kind {0} is unknown")]
    ContentKind(u8),
    /// A decoded structure ended before its fields did.
    #[error("{what} is truncated: needs {needed} bytes, has {got}")]
    Truncated {
        what: &'static str,
        needed: usize,
        got: usize,
    },

    /// A packet's plaintext is longer than any packet carries.
    #[error("packet content has {len} bytes; a packet carries at most {max}")]
    ContentLength { len: usize, max: usize },
    /// Bytes follow a content that carries nothing after its kind byte.
    #[error("{what} content carries nothing after its kind byte; got {len} more bytes")]
    ContentTrailing { what: &'static str, len: usize },

    // ---- fragments ----
    /// A fragment's index/count fields are inconsistent.
    #[error("fragment {index} of {count} is invalid: {reason}")]
    FragmentInvalid {
        index: u16,
        count: u16,
        reason: &'static str,
    },
    /// A fragment disagrees with earlier fragments of the same message.
    #[error("fragment of message {message_id:016x} contradicts earlier fragments: {reason}")]
    FragmentConflict {
        message_id: u64,
        reason: &'static str,
    },
    /// The reassembly buffer is at its bound; the fragment was not stored.
    #[error("reassembly buffer is full ({0}); fragment dropped")]
    ReassemblyFull(&'static str),

    // ---- replay filter ----
    /// Replay filter parameters are out of range.
    #[error("replay filter parameters are invalid: {0}")]
    ReplayParams(String),
    /// A stored replay filter could not be restored.
    #[error("stored replay filter is unusable: {0}")]
    ReplayStore(String),

    // ---- directory ----
    /// A directory document is malformed or violates its rules.
    #[error("directory document is invalid: {0}")]
    Document(String),
    /// A document decodes but is not in its one canonical encoding.
    #[error("directory document is not canonically encoded")]
    NonCanonical,
    /// A key is malformed.
    #[error("bad key: {0}")]
    BadKey(String),
    /// A signature's digest is not the body's: the body was changed after signing.
    #[error("document body is not what {signer} signed (tampered)")]
    BodyTampered { signer: String },
    /// A signature does not verify under the key it names.
    #[error("signature claiming to be by {signer} does not verify (forged)")]
    ForgedSignature { signer: String },
    /// A signature by a key that is not a configured authority (or, on a descriptor, not
    /// the described relay).
    #[error("signature by {signer}, which is not a configured authority")]
    UnknownSigner { signer: String },
    /// Fewer valid authority signatures than a strict majority.
    #[error("consensus has {valid} valid authority signatures; a strict majority needs {needed}")]
    NotEnoughSignatures { valid: usize, needed: usize },
    /// The document's validity window has passed.
    #[error("document expired at {valid_until} (now {now})")]
    Expired { valid_until: u64, now: u64 },
    /// The document's validity window has not started.
    #[error("document is not valid before {valid_after} (now {now})")]
    NotYetValid { valid_after: u64, now: u64 },
    /// Fewer authorities voted than a strict majority of the configured ones.
    #[error("{votes} authorities voted; a consensus needs votes from a strict majority ({needed})")]
    NotEnoughVotes { votes: usize, needed: usize },
    /// No consensus has verified yet.
    #[error("no consensus has been verified yet")]
    NoConsensus,
    /// The document is for another epoch than the one asked for.
    #[error("document is for epoch {got}, expected epoch {expected}")]
    WrongEpoch { expected: u32, got: u32 },
    /// An exit policy does not parse.
    #[error("exit policy: {0}")]
    ExitPolicy(String),
    /// No path satisfies the rules.
    #[error("cannot build a path: {0}")]
    Path(String),
    /// No exit's policy allows the destination.
    #[error("no exit relay's policy allows this destination")]
    NoExit,
    // ---- cover traffic ----
    /// A cover-traffic rate is unusable (the rate, as given).
    #[error("cover-traffic rate must be finite and non-negative (per second); got {0}")]
    CoverRate(String),

    // ---- delays ----
    /// A delay distribution's mean is unusable.
    #[error("mean delay must be finite and non-negative; got {0:?}")]
    DelayMean(std::time::Duration),

    // ---- tickets ----
    /// An encoded ticket has the wrong size.
    #[error("ticket has {got} bytes; a ticket has exactly {expected}")]
    TicketLength { got: usize, expected: usize },
    /// An encoded ticket names a format version this build does not read.
    #[error("ticket version {0} is not supported (this build reads version {1})")]
    TicketVersion(u8, u8),
    /// The ticket is made out to another recipient.
    #[error("ticket is made out to {recipient}, not to this relay")]
    TicketWrongRecipient { recipient: String },
    /// The ticket's expiry has passed.
    #[error("ticket expired at {expiry} (now {now})")]
    TicketExpired { expiry: u64, now: u64 },
    /// The ticket's issue time is further in the future than clock skew explains.
    #[error("ticket is issued at {issued}, in the future (now {now})")]
    TicketNotYetValid { issued: u64, now: u64 },
    /// The ticket's signature does not verify under its pot's key.
    #[error("ticket signature does not verify under its pot's key (forged or altered)")]
    TicketForged,
    /// The ticket is worth less than asked for.
    #[error("ticket is worth {expected_value} in expectation; at least {min} is required")]
    TicketValue { expected_value: u64, min: u64 },
    /// The reveal does not open the ticket's commitment.
    #[error("reveal does not match the ticket's commitment")]
    TicketRevealMismatch,
    /// The ticket lost its lottery.
    #[error("ticket is not a winner")]
    TicketNotWinner,
    /// Ticket terms cannot be chosen as asked.
    #[error("ticket terms: {0}")]
    TicketTerms(String),
    /// A payer's or a gateway tab's configuration is unusable.
    #[error("payment configuration: {0}")]
    PaymentConfig(String),

    // ---- control messages ----
    /// A control message does not start with the control magic.
    #[error("control message does not start with the control magic")]
    ControlMagic,
    /// A control message's kind byte is unknown.
    #[error("control message kind {0} is unknown")]
    ControlKind(u8),
    /// A control message's body has the wrong length for its kind.
    #[error("control message {kind} has a {got}-byte body; a {kind} body has exactly {expected}")]
    ControlLength {
        kind: &'static str,
        got: usize,
        expected: usize,
    },
    /// A ticket's time does not fit the payment envelope's 32-bit seconds.
    #[error("ticket {field} {value} does not fit in a payment envelope's 32-bit seconds")]
    TicketTimeRange { field: &'static str, value: u64 },

    // ---- payment envelopes ----
    /// An envelope buffer has the wrong size.
    #[error("payment envelope has {got} bytes; every envelope has exactly {expected}")]
    EnvelopeLength { got: usize, expected: usize },
    /// An envelope was asked for with a route it cannot carry.
    #[error(
        "an envelope needs 1 to {max} hops and a slot for each; got {keys} keys, {slots} slots"
    )]
    EnvelopeShape {
        keys: usize,
        slots: usize,
        max: usize,
    },
    /// This hop's envelope MAC does not verify: the envelope was altered on the way, belongs
    /// to another packet, or was never built for this route.
    #[error("payment envelope MAC does not verify (tampered, or not this packet's)")]
    EnvelopeMac,
    /// The MAC verified but the slot's flag byte is neither "empty" nor "ticket".
    #[error("payment envelope slot has unknown flag {0}")]
    EnvelopeFlag(u8),
    /// The MAC verified but the slot's padding is not zero.
    #[error("payment envelope slot has non-zero padding")]
    EnvelopePadding,

    // ---- links ----
    /// A Noise handshake failed (the step that failed; never secret material).
    #[error("link handshake failed: {0}")]
    LinkHandshake(&'static str),
    /// A link message has the wrong length for its place in the protocol.
    #[error("link {what} has {got} bytes; expected {expected}")]
    LinkLength {
        what: &'static str,
        got: usize,
        expected: usize,
    },
    /// A transport message does not decrypt: altered, replayed, reordered or not this link's.
    #[error("link message does not decrypt (altered, replayed or reordered)")]
    LinkDecrypt,

    // ---- subsystems with their own errors ----
    /// A stream message or stream data is malformed ([`crate::stream::StreamError`]).
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    /// The client session's error ([`crate::session::SessionError`]).
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}

/// Result with the protocol error.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A short stable label for metrics (`dropped{reason="..."}`).
    pub fn label(&self) -> &'static str {
        match self {
            Error::PacketLength { .. } | Error::FrameLength { .. } => "length",
            Error::NonCanonicalElement | Error::HeaderMac => "header_mac",
            Error::Routing(_) => "routing",
            Error::Payload(_) => "payload",
            Error::RouteShape { .. } | Error::TooLong { .. } | Error::Build(_) => "build",
            Error::ReplyBlock(_) | Error::ReplyNotAuthentic => "reply",
            Error::FrameVersion(..) => "frame_version",
            Error::FrameKind(_) | Error::FramePadding(_) => "frame_malformed",
            Error::ContentKind(_)
            | Error::Truncated { .. }
            | Error::ContentLength { .. }
            | Error::ContentTrailing { .. } => "content_malformed",
            Error::FragmentInvalid { .. } | Error::FragmentConflict { .. } => "fragment",
            Error::ReassemblyFull(_) => "reassembly_full",
            Error::ReplayParams(_) | Error::ReplayStore(_) => "replay_store",
            Error::DelayMean(_) | Error::ExitPolicy(_) | Error::BadKey(_) => "config",
            Error::Document(_) | Error::NonCanonical => "document_malformed",
            Error::BodyTampered { .. } => "body_tampered",
            Error::ForgedSignature { .. } => "forged_signature",
            Error::UnknownSigner { .. } => "unknown_signer",
            Error::NotEnoughSignatures { .. } => "not_enough_signatures",
            Error::NotEnoughVotes { .. } => "not_enough_votes",
            Error::NoConsensus => "no_consensus",
            Error::Expired { .. } => "expired",
            Error::NotYetValid { .. } => "not_yet_valid",
            Error::WrongEpoch { .. } => "wrong_epoch",
            Error::Path(_) => "no_path",
            Error::NoExit => "no_exit",
            Error::CoverRate(_) | Error::TicketTerms(_) | Error::PaymentConfig(_) => "config",
            Error::TicketLength { .. } | Error::TicketVersion(..) => "ticket_malformed",
            Error::TicketWrongRecipient { .. } => "ticket_wrong_recipient",
            Error::TicketExpired { .. } => "ticket_expired",
            Error::TicketNotYetValid { .. } => "ticket_not_yet_valid",
            Error::TicketForged => "ticket_forged",
            Error::TicketValue { .. } => "ticket_value",
            Error::TicketRevealMismatch => "ticket_reveal_mismatch",
            Error::TicketNotWinner => "ticket_not_winner",
            Error::ControlMagic | Error::ControlKind(_) | Error::ControlLength { .. } => {
                "control_malformed"
            }
            Error::TicketTimeRange { .. } | Error::EnvelopeShape { .. } => "build",
            Error::EnvelopeLength { .. } => "length",
            Error::EnvelopeMac => "envelope_mac",
            Error::EnvelopeFlag(_) | Error::EnvelopePadding => "envelope_malformed",
            Error::LinkHandshake(_) => "link_handshake",
            Error::LinkLength { .. } => "link_length",
            Error::LinkDecrypt => "link_decrypt",
            Error::Stream(_) => "stream_malformed",
            Error::Session(crate::session::SessionError::Bug(_)) => "bug",
            Error::Session(_) => "session",
        }
    }
}
