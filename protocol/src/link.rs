//! Authenticated, encrypted links: Noise XK over every relay↔relay TCP link and inside every
//! client↔gateway WebSocket.
//!
//! Why XK and not IK: in both the dialer knows the listener's static key from the consensus,
//! but IK sends the dialer's static key in the first message under a key derived only from the
//! listener's static key, so whoever later steals a gateway's link key can decrypt recorded
//! first messages and learn which client keys connected (and a first message can be replayed
//! to make the listener spend a DH). XK sends the dialer's key in the third message, after an
//! ephemeral-ephemeral DH: the dialer's identity has forward secrecy, the listener commits
//! no state to an unauthenticated dialer beyond one ephemeral, and the cost is half a round
//! trip once per link, on links that live for minutes. Nym's mix links use XK too.
//!
//! The cipher is AES-256-GCM (`AESGCM`), not ChaCha20-Poly1305: relays seal and open every
//! 3 KB frame, and on the x86 servers relays run on (AES-NI, carry-less multiply) snow's
//! AES-GCM costs about 2.5 µs per frame against ChaCha20-Poly1305's 3.6–4.5 µs (both RustCrypto,
//! release build, measured on the 2-core test machine), which kept a relay's forwarding rate
//! within 15% of raw Sphinx processing (~120 µs a packet). Without AES instructions the `aes`
//! crate falls back to a constant-time software AES: slower, still safe.
//!
//! Every handshake message has one fixed length (`e, es` 48 bytes; `e, ee` 48; `s, se` 64), and
//! every transport message on a relay link carries exactly one frame, so every message on a link
//! has one length, cover and real alike, and no length field is needed or sent.
//!
//! The two kinds of link have different prologues, so a handshake meant for one can never be
//! completed on the other. Sans-IO: the caller passes the RNG (snow's ephemeral keys come from
//! it, so the simulator can reproduce handshakes) and moves the bytes.

use std::fmt;

use rand::Rng;
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver, FallbackResolver};
use snow::types::{Cipher, Dh, Hash, Random};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use crate::frame::FRAME_LEN;
use crate::packet::Address;
use crate::{Error, Result};

/// The Noise protocol every Murmur link runs.
pub const NOISE_PARAMS: &str = "Noise_XK_25519_AESGCM_BLAKE2s";

/// Bytes of a link key (X25519).
pub const KEY_LEN: usize = 32;

/// Bytes the AEAD adds to every transport message.
pub const TAG_LEN: usize = 16;

/// The dialer's first message: `-> e, es` (an ephemeral key and an empty, authenticated payload).
pub const DIALER_HELLO_LEN: usize = KEY_LEN + TAG_LEN;

/// The listener's answer: `<- e, ee`.
pub const LISTENER_HELLO_LEN: usize = KEY_LEN + TAG_LEN;

/// The dialer's last message: `-> s, se` (its encrypted static key and an empty payload).
pub const DIALER_FINISH_LEN: usize = KEY_LEN + TAG_LEN + TAG_LEN;

/// Bytes of one frame sealed in a transport message: what every message on a relay link is.
pub const SEALED_FRAME_LEN: usize = FRAME_LEN + TAG_LEN;

/// Which link a handshake is for; each has its own prologue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkKind {
    /// Relay to relay, over TCP.
    Relay,
    /// Client to its gateway, inside WebSocket binary messages.
    Client,
}

impl LinkKind {
    fn prologue(self) -> &'static [u8] {
        match self {
            LinkKind::Relay => b"murmur link v1: relay-relay",
            LinkKind::Client => b"murmur link v1: client-gateway",
        }
    }
}

/// A public link key, as descriptors and the consensus publish it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct LinkPublic(pub [u8; KEY_LEN]);

impl fmt::Debug for LinkPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkPublic(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

impl fmt::Display for LinkPublic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// A static link key's secret half. Zeroized on drop; its `Debug` prints nothing secret.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct LinkSecret([u8; KEY_LEN]);

impl fmt::Debug for LinkSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "LinkSecret(public {:?})", self.public())
    }
}

impl LinkSecret {
    /// A fresh key from `rng` (a CSPRNG).
    pub fn generate<R: Rng + ?Sized>(rng: &mut R) -> Self {
        let mut bytes = [0u8; KEY_LEN];
        rng.fill_bytes(&mut bytes);
        LinkSecret(bytes)
    }

    /// The key whose secret bytes are `bytes` (X25519 clamps them when used).
    pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
        LinkSecret(bytes)
    }

    /// The secret bytes, for writing the key file.
    pub fn to_bytes(&self) -> Zeroizing<[u8; KEY_LEN]> {
        Zeroizing::new(self.0)
    }

    /// The public key to publish.
    pub fn public(&self) -> LinkPublic {
        let secret = x25519_dalek::StaticSecret::from(self.0);
        LinkPublic(x25519_dalek::PublicKey::from(&secret).to_bytes())
    }
}

/// The address a client's session has at its gateway: a hash of the client's link key, so only
/// the key's owner can claim it, and knowing (or sniffing) an address gives nothing.
pub fn session_address(client: &LinkPublic) -> Address {
    let mut h = Sha256::new();
    h.update(b"murmur session address v1");
    h.update(client.0);
    Address(h.finalize().into())
}

/// Supplies snow with the caller's randomness; everything else comes from snow's own resolver.
struct SeededRandom(ChaCha20Rng);

impl Random for SeededRandom {
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), snow::Error> {
        rand_chacha::rand_core::Rng::fill_bytes(&mut self.0, dest);
        Ok(())
    }
}

struct SeededResolver(Zeroizing<[u8; 32]>);

impl CryptoResolver for SeededResolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Some(Box::new(SeededRandom(ChaCha20Rng::from_seed(*self.0))))
    }
    fn resolve_dh(&self, _: &DHChoice) -> Option<Box<dyn Dh>> {
        None
    }
    fn resolve_hash(&self, _: &HashChoice) -> Option<Box<dyn Hash>> {
        None
    }
    fn resolve_cipher(&self, _: &CipherChoice) -> Option<Box<dyn Cipher>> {
        None
    }
}

fn builder<R: Rng + ?Sized>(rng: &mut R) -> Result<snow::Builder<'static>> {
    let params = NOISE_PARAMS
        .parse()
        .map_err(|_| Error::LinkHandshake("noise parameters"))?;
    let mut seed = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(seed.as_mut());
    let resolver = FallbackResolver::new(Box::new(SeededResolver(seed)), Box::new(DefaultResolver));
    Ok(snow::Builder::with_resolver(params, Box::new(resolver)))
}

fn expect_len(what: &'static str, got: usize, expected: usize) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::LinkLength {
            what,
            got,
            expected,
        })
    }
}

/// The dialer's side of a handshake, between its first message and the listener's answer.
pub struct Dialer {
    state: snow::HandshakeState,
    remote: LinkPublic,
}

impl Dialer {
    /// Starts a handshake to the listener whose static key is `remote` (from the consensus);
    /// returns the first message to send.
    pub fn start<R: Rng + ?Sized>(
        kind: LinkKind,
        local: &LinkSecret,
        remote: &LinkPublic,
        rng: &mut R,
    ) -> Result<(Dialer, [u8; DIALER_HELLO_LEN])> {
        let mut state = builder(rng)?
            .local_private_key(&local.0)
            .and_then(|b| b.remote_public_key(&remote.0))
            .and_then(|b| b.prologue(kind.prologue()))
            .and_then(|b| b.build_initiator())
            .map_err(|_| Error::LinkHandshake("cannot start"))?;
        let mut hello = [0u8; DIALER_HELLO_LEN];
        let n = state
            .write_message(&[], &mut hello)
            .map_err(|_| Error::LinkHandshake("cannot write the first message"))?;
        expect_len("dialer hello", n, DIALER_HELLO_LEN)?;
        Ok((
            Dialer {
                state,
                remote: *remote,
            },
            hello,
        ))
    }

    /// Reads the listener's answer. It decrypts only if the listener holds the secret of the key
    /// the dialer expected (a man in the middle with another key fails here). Returns the
    /// transport and the last message to send.
    pub fn finish(mut self, answer: &[u8]) -> Result<(Transport, [u8; DIALER_FINISH_LEN])> {
        expect_len("listener hello", answer.len(), LISTENER_HELLO_LEN)?;
        self.state
            .read_message(answer, &mut [])
            .map_err(|_| Error::LinkHandshake("the listener does not hold the expected key"))?;
        let mut last = [0u8; DIALER_FINISH_LEN];
        let n = self
            .state
            .write_message(&[], &mut last)
            .map_err(|_| Error::LinkHandshake("cannot write the last message"))?;
        expect_len("dialer finish", n, DIALER_FINISH_LEN)?;
        let state = self
            .state
            .into_transport_mode()
            .map_err(|_| Error::LinkHandshake("handshake incomplete"))?;
        Ok((
            Transport {
                state,
                remote: self.remote,
            },
            last,
        ))
    }
}

/// The listener's side of a handshake, between its answer and the dialer's last message.
pub struct Listener {
    state: snow::HandshakeState,
}

impl Listener {
    /// Reads a dialer's first message; returns the answer to send.
    pub fn accept<R: Rng + ?Sized>(
        kind: LinkKind,
        local: &LinkSecret,
        hello: &[u8],
        rng: &mut R,
    ) -> Result<(Listener, [u8; LISTENER_HELLO_LEN])> {
        expect_len("dialer hello", hello.len(), DIALER_HELLO_LEN)?;
        let mut state = builder(rng)?
            .local_private_key(&local.0)
            .and_then(|b| b.prologue(kind.prologue()))
            .and_then(|b| b.build_responder())
            .map_err(|_| Error::LinkHandshake("cannot start"))?;
        state
            .read_message(hello, &mut [])
            .map_err(|_| Error::LinkHandshake("first message not for this key or link kind"))?;
        let mut answer = [0u8; LISTENER_HELLO_LEN];
        let n = state
            .write_message(&[], &mut answer)
            .map_err(|_| Error::LinkHandshake("cannot write the answer"))?;
        expect_len("listener hello", n, LISTENER_HELLO_LEN)?;
        Ok((Listener { state }, answer))
    }

    /// Reads the dialer's last message: the transport, and the dialer's proven static key (the
    /// caller decides whether that key may use this link).
    pub fn finish(mut self, last: &[u8]) -> Result<Transport> {
        expect_len("dialer finish", last.len(), DIALER_FINISH_LEN)?;
        self.state
            .read_message(last, &mut [])
            .map_err(|_| Error::LinkHandshake("last message does not verify"))?;
        let remote = self
            .state
            .get_remote_static()
            .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
            .map(LinkPublic)
            .ok_or(Error::LinkHandshake("no static key from the dialer"))?;
        let state = self
            .state
            .into_transport_mode()
            .map_err(|_| Error::LinkHandshake("handshake incomplete"))?;
        Ok(Transport { state, remote })
    }
}

/// An established link: seals what this side sends, opens what the other side sent.
pub struct Transport {
    state: snow::TransportState,
    remote: LinkPublic,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Transport(remote {:?})", self.remote)
    }
}

impl Transport {
    /// The other side's static key, proven by the handshake.
    pub fn remote(&self) -> LinkPublic {
        self.remote
    }

    /// Seals `plaintext` into `out`, which needs `plaintext.len() + TAG_LEN` bytes; returns the
    /// sealed length.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut [u8]) -> Result<usize> {
        let n = self
            .state
            .write_message(plaintext, out)
            .map_err(|_| Error::LinkHandshake("cannot seal (message too long for its buffer)"))?;
        expect_len("sealed message", n, plaintext.len() + TAG_LEN)?;
        Ok(n)
    }

    /// Opens a sealed message into `out`; returns the plaintext length. Fails on any
    /// alteration, reordering, replay or truncation: the link must then be closed.
    pub fn open(&mut self, sealed: &[u8], out: &mut [u8]) -> Result<usize> {
        if sealed.len() < TAG_LEN || out.len() < sealed.len() - TAG_LEN {
            return Err(Error::LinkLength {
                what: "sealed message",
                got: sealed.len(),
                expected: out.len() + TAG_LEN,
            });
        }
        self.state
            .read_message(sealed, out)
            .map_err(|_| Error::LinkDecrypt)
    }

    /// Seals one frame: every message on a relay link is this long.
    pub fn seal_frame(&mut self, frame: &[u8; FRAME_LEN]) -> Result<Box<[u8; SEALED_FRAME_LEN]>> {
        let mut out = Box::new([0u8; SEALED_FRAME_LEN]);
        let n = self.seal(frame, &mut out[..])?;
        expect_len("sealed frame", n, SEALED_FRAME_LEN)?;
        Ok(out)
    }

    /// Opens one sealed frame, which must be exactly [`SEALED_FRAME_LEN`] bytes.
    pub fn open_frame(&mut self, sealed: &[u8]) -> Result<Box<[u8; FRAME_LEN]>> {
        expect_len("sealed frame", sealed.len(), SEALED_FRAME_LEN)?;
        let mut out = Box::new([0u8; FRAME_LEN]);
        let n = self.open(sealed, &mut out[..])?;
        expect_len("frame", n, FRAME_LEN)?;
        Ok(out)
    }
}

/// Runs a whole handshake in memory (tests, benches and the simulator): the dialer's and the
/// listener's transports.
pub fn handshake_in_memory<R: Rng + ?Sized>(
    kind: LinkKind,
    dialer: &LinkSecret,
    listener: &LinkSecret,
    rng: &mut R,
) -> Result<(Transport, Transport)> {
    let (d, hello) = Dialer::start(kind, dialer, &listener.public(), rng)?;
    let (l, answer) = Listener::accept(kind, listener, &hello, rng)?;
    let (dt, last) = d.finish(&answer)?;
    let lt = l.finish(&last)?;
    Ok((dt, lt))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    #[test]
    fn both_sides_learn_each_others_keys_and_frames_round_trip() {
        let mut r = rng(1);
        let (a, b) = (LinkSecret::generate(&mut r), LinkSecret::generate(&mut r));
        let (mut da, mut lb) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut r).unwrap();
        assert_eq!(da.remote(), b.public());
        assert_eq!(lb.remote(), a.public());
        for i in 0..3u8 {
            let frame = [i; FRAME_LEN];
            let sealed = da.seal_frame(&frame).unwrap();
            assert_eq!(sealed.len(), SEALED_FRAME_LEN);
            assert_ne!(&sealed[..FRAME_LEN], &frame[..]);
            assert_eq!(*lb.open_frame(&sealed[..]).unwrap(), frame);
            let back = lb.seal_frame(&frame).unwrap();
            assert_eq!(*da.open_frame(&back[..]).unwrap(), frame);
        }
    }

    #[test]
    fn a_listener_with_another_key_is_refused_by_the_dialer() {
        let mut r = rng(2);
        let (a, b, mallory) = (
            LinkSecret::generate(&mut r),
            LinkSecret::generate(&mut r),
            LinkSecret::generate(&mut r),
        );
        // The dialer expects b; mallory answers.
        let (d, hello) = Dialer::start(LinkKind::Relay, &a, &b.public(), &mut r).unwrap();
        // Mallory cannot even read the first message (es is under b's key)...
        assert!(Listener::accept(LinkKind::Relay, &mallory, &hello, &mut r).is_err());
        // ...and an answer made for another dialer does not verify.
        let (_, hello2) = Dialer::start(LinkKind::Relay, &a, &mallory.public(), &mut r).unwrap();
        let (_, answer) = Listener::accept(LinkKind::Relay, &mallory, &hello2, &mut r).unwrap();
        assert!(matches!(d.finish(&answer), Err(Error::LinkHandshake(_))));
    }

    #[test]
    fn the_kinds_do_not_mix() {
        let mut r = rng(3);
        let (a, b) = (LinkSecret::generate(&mut r), LinkSecret::generate(&mut r));
        let (_, hello) = Dialer::start(LinkKind::Client, &a, &b.public(), &mut r).unwrap();
        assert!(Listener::accept(LinkKind::Relay, &b, &hello, &mut r).is_err());
    }

    #[test]
    fn altered_replayed_or_reordered_messages_fail() {
        let mut r = rng(4);
        let (a, b) = (LinkSecret::generate(&mut r), LinkSecret::generate(&mut r));
        let (mut d, mut l) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut r).unwrap();
        let one = d.seal_frame(&[1; FRAME_LEN]).unwrap();
        let mut bent = one.clone();
        bent[100] ^= 1;
        assert!(matches!(l.open_frame(&bent[..]), Err(Error::LinkDecrypt)));
        // Replayed: the same message twice.
        let (mut d, mut l) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut r).unwrap();
        let one = d.seal_frame(&[1; FRAME_LEN]).unwrap();
        assert!(l.open_frame(&one[..]).is_ok());
        assert!(l.open_frame(&one[..]).is_err());
        // Out of order: the second before the first.
        let (mut d, mut l) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut r).unwrap();
        let _first = d.seal_frame(&[1; FRAME_LEN]).unwrap();
        let second = d.seal_frame(&[2; FRAME_LEN]).unwrap();
        assert!(l.open_frame(&second[..]).is_err());
    }

    #[test]
    fn wrong_lengths_are_refused_not_panicked_on() {
        let mut r = rng(5);
        let b = LinkSecret::generate(&mut r);
        for len in [0, 1, DIALER_HELLO_LEN - 1, DIALER_HELLO_LEN + 1, 5000] {
            assert!(matches!(
                Listener::accept(LinkKind::Relay, &b, &vec![0; len], &mut r),
                Err(Error::LinkLength { .. })
            ));
        }
        let a = LinkSecret::generate(&mut r);
        let (_, mut l) = handshake_in_memory(LinkKind::Relay, &a, &b, &mut r).unwrap();
        for len in [0, 15, 16, SEALED_FRAME_LEN - 1, SEALED_FRAME_LEN + 1] {
            assert!(l.open_frame(&vec![0; len]).is_err());
        }
    }

    #[test]
    fn handshakes_are_reproducible_from_the_seed() {
        let (a, b) = (
            LinkSecret::from_bytes([7; 32]),
            LinkSecret::from_bytes([8; 32]),
        );
        let first = |seed| {
            Dialer::start(LinkKind::Relay, &a, &b.public(), &mut rng(seed))
                .unwrap()
                .1
        };
        assert_eq!(first(9), first(9));
        assert_ne!(first(9), first(10));
    }

    #[test]
    fn session_addresses_are_bound_to_keys() {
        let a = LinkSecret::from_bytes([1; 32]).public();
        let b = LinkSecret::from_bytes([2; 32]).public();
        assert_ne!(session_address(&a), session_address(&b));
        assert_eq!(session_address(&a), session_address(&a));
        assert_ne!(session_address(&a).0, a.0);
    }

    #[test]
    fn the_secret_is_not_in_its_debug_output() {
        let s = LinkSecret::from_bytes([0xab; 32]);
        assert!(!format!("{s:?}").contains("abab"));
    }
}
