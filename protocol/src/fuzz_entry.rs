//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the stable test that replays
//! their corpora (`tests/fuzz_corpus.rs`), so both exercise the same code.
//!
//! Each takes arbitrary bytes and must never panic except on a broken invariant, which the
//! asserts here state (they are the fuzzers' oracles).
#![allow(clippy::panic, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use rand::SeedableRng;

use crate::directory::sign::Freshness;
use crate::directory::{
    AuthoritySet, ExitPolicy, IdentityKey, SignedConsensus, SignedDescriptor, SignedVote, Vote,
    decode, encode,
};
use crate::envelope::{
    ENVELOPE_LEN, ENVELOPE_SLOTS, Envelope, EnvelopeKey, SLOT_CONTENT_LEN, build_envelope,
    decode_slot_content, encode_slot_content, peel_in_place,
};
use crate::fragment::{Fragment, Reassembler, ReassemblyLimits};
use crate::frame::Frame;
use crate::http_connect::{HttpConnect, MAX_HEAD, Step as HttpStep};
use crate::packet::{HopOutput, OpenedPacket, ReplayTag, StaticSecret, recover_plaintext};
use crate::payload::Content;
use crate::replay::ReplayFilter;
use crate::socks::{SocksHandshake, Step};
use crate::stream::{ClientMessage, ExitMessage, session_of_fragment, split_client_message};
use crate::surb::ReplyBlock;
use crate::time::Instant;

/// The names of the fuzz targets, one per function below.
pub const TARGETS: &[&str] = &[
    "frame",
    "packet",
    "content",
    "reply_block",
    "replay_filter",
    "reassembly",
    "consensus",
    "descriptor",
    "exit_policy",
    "ticket",
    "control",
    "envelope_peel",
    "link",
    "socks",
    "http_connect",
    "stream",
    "vote",
    "session",
];

/// Runs the target called `name` on `data`.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "frame" => frame(data),
        "packet" => packet(data),
        "content" => content(data),
        "reply_block" => reply_block(data),
        "replay_filter" => replay_filter(data),
        "reassembly" => reassembly(data),
        "consensus" => consensus(data),
        "descriptor" => descriptor(data),
        "exit_policy" => exit_policy(data),
        "ticket" => ticket(data),
        "control" => control(data),
        "envelope_peel" => envelope_peel(data),
        "link" => link(data),
        "socks" => socks(data),
        "http_connect" => http_connect(data),
        "stream" => stream(data),
        "vote" => vote(data),
        "session" => session(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// A frame that decodes re-encodes to the same bytes (one encoding per frame).
pub fn frame(data: &[u8]) {
    if let Ok(f) = Frame::decode(data) {
        let again = f.encode().expect("a decoded frame encodes");
        assert_eq!(&again[..], data, "frame encoding is not canonical");
    }
}

/// The fixed key the packet target opens packets with.
pub fn packet_key() -> StaticSecret {
    StaticSecret::from([7u8; 32])
}

/// Opening and processing arbitrary packet bytes returns errors, never panics.
pub fn packet(data: &[u8]) {
    let _ = recover_plaintext(data);
    if let Ok(opened) = OpenedPacket::open(data, &packet_key()) {
        let _ = opened.replay_tag();
        if let Ok(HopOutput::Final(d)) = opened.process(Duration::from_secs(10)) {
            let _ = recover_plaintext(&d.payload[..]);
        }
    }
}

/// Packet plaintext decodes or errors; what decodes, of every kind, re-encodes to the same
/// bytes.
pub fn content(data: &[u8]) {
    if let Ok(c) = Content::decode(data) {
        let again = c.encode().expect("a decoded content encodes");
        assert_eq!(again, data, "content encoding is not canonical");
    }
}

/// Reply blocks decode or error; a decoded block re-encodes identically and can be used.
pub fn reply_block(data: &[u8]) {
    if let Ok(b) = ReplyBlock::from_bytes(data) {
        assert_eq!(&b.to_bytes()[..], data);
        let _ = b.use_block(b"fuzz");
    }
}

/// Stored replay filters restore or error.
pub fn replay_filter(data: &[u8]) {
    if let Ok(f) = ReplayFilter::from_bytes(data) {
        assert_eq!(f.to_bytes(), data);
    }
}

/// A stream of `[gap_ms:u8][len:u8][fragment bytes]` records fed to a small reassembler:
/// its bounds hold whatever arrives.
pub fn reassembly(data: &[u8]) {
    let limits = ReassemblyLimits {
        max_partial_messages: 8,
        max_buffered_bytes: 512,
        max_partial_messages_per_owner: 8,
        max_buffered_bytes_per_owner: 512,
        timeout: Duration::from_millis(100),
        remember_completed: 8,
    };
    let mut r = Reassembler::new(limits.clone());
    let mut now = Instant::ZERO;
    let mut rest = data;
    while let [gap, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (record, tail) = tail.split_at(len);
        rest = tail;
        now = now + Duration::from_millis(u64::from(*gap));
        r.expire(now);
        if let Ok(f) = Fragment::decode(record) {
            let _ = r.insert(f, now);
        }
        assert!(r.partial_messages() <= limits.max_partial_messages);
        assert!(r.buffered_bytes() <= limits.max_buffered_bytes);
    }
}

/// The authority keys the consensus target verifies against: the Ed25519 keys of seeds 1–3.
pub fn authority_keys() -> Vec<ed25519_dalek::SigningKey> {
    (1..=3u8)
        .map(|i| ed25519_dalek::SigningKey::from_bytes(&[i; 32]))
        .collect()
}

/// The authority set of [`authority_keys`].
pub fn authority_set() -> AuthoritySet {
    AuthoritySet::new(authority_keys().iter().map(IdentityKey::of).collect())
        .expect("valid authority keys")
}

/// A served consensus decodes and verifies, or errors; what decodes re-encodes identically.
pub fn consensus(data: &[u8]) {
    if let Ok(doc) = decode::<SignedConsensus>(data) {
        assert_eq!(encode(&doc).expect("encodes"), data);
        let set = authority_set();
        let at = Freshness {
            now: 1_000,
            expected_epoch: None,
            clock_skew_s: 60,
        };
        let _ = doc.verify(&set, at);
    }
}

/// An uploaded descriptor decodes and verifies, or errors.
pub fn descriptor(data: &[u8]) {
    if let Ok(doc) = decode::<SignedDescriptor>(data) {
        let _ = doc.verify();
    }
}

/// An exit policy either fails to parse or prints to a form that parses to itself.
pub fn exit_policy(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(policy) = ExitPolicy::parse(text, false) {
        let again = ExitPolicy::parse(&policy.to_string(), false).expect("printed policy parses");
        assert_eq!(again, policy);
    }
}

/// A ticket that decodes re-encodes to the same bytes; checking it never panics.
pub fn ticket(data: &[u8]) {
    if let Ok(t) = crate::ticket::Ticket::decode(data) {
        assert_eq!(&t.encode()[..], data, "ticket encoding is not canonical");
        let _ = t.check_for_recipient(&t.recipient, t.issued, 1);
        let _ = t.check_win(&[0; 32]);
    }
}

/// A control message that decodes re-encodes to the same bytes (one encoding per message).
pub fn control(data: &[u8]) {
    if let Ok(c) = crate::control::Control::decode(data) {
        assert_eq!(c.encode(), data, "control encoding is not canonical");
    }
}

/// `[replay tag (32)][bytes]`. Slot content that decodes re-encodes to the same bytes and
/// survives a built envelope of every route length; envelope bytes peel without the MAC
/// always, with it to the same next envelope or to an envelope error, and in place alike.
pub fn envelope_peel(data: &[u8]) {
    let Some((tag, rest)) = data.split_first_chunk::<32>() else {
        return;
    };
    let key = EnvelopeKey::from_replay_tag(&ReplayTag(*tag));
    if let Some(content) = rest.first_chunk::<SLOT_CONTENT_LEN>()
        && let Ok(slot) = decode_slot_content(content)
    {
        assert_eq!(
            &encode_slot_content(slot.as_ref()),
            content,
            "slot content encoding is not canonical"
        );
        let mut rng = rand::rngs::StdRng::from_seed(*tag);
        for hops in 1..=ENVELOPE_SLOTS {
            let keys: Vec<EnvelopeKey> = (0..hops)
                .map(|i| {
                    let mut t = *tag;
                    t[0] ^= i as u8;
                    EnvelopeKey::from_replay_tag(&ReplayTag(t))
                })
                .collect();
            let slots = vec![slot; hops];
            let mut envelope = build_envelope(&mut rng, &keys, &slots).expect("valid shape");
            for k in &keys {
                let peeled = envelope.peel(k, true).expect("a built envelope peels");
                assert_eq!(peeled.ticket, slot);
                envelope = peeled.next;
            }
        }
    }
    if let Ok(envelope) = Envelope::from_slice(rest) {
        let loose = envelope
            .peel(&key, false)
            .expect("unauthenticated peeling never fails");
        assert_eq!(loose.ticket, None);
        let strict = envelope.peel(&key, true);
        match &strict {
            Ok(p) => assert_eq!(p.next, loose.next),
            Err(e) => assert!(
                matches!(
                    e,
                    crate::Error::EnvelopeMac
                        | crate::Error::EnvelopeFlag(_)
                        | crate::Error::EnvelopePadding
                ),
                "{e:?}"
            ),
        }
        let mut bytes: [u8; ENVELOPE_LEN] = *envelope.as_bytes();
        let in_place = peel_in_place(&mut bytes, &key, true);
        assert_eq!(&bytes, loose.next.as_bytes());
        assert_eq!(in_place, strict.map(|p| p.ticket));
    }
}

/// `[seed][which][position: u16][xor][bytes…]`: a Noise link between two in-memory parties
/// (handshake, then three frames each way) with the message numbered `which` (0–2 the
/// handshake, 3–8 the frames) altered at `position` by `xor`. An unaltered run completes and
/// every frame arrives as sent; an altered message is refused where it arrives, and nothing
/// after it is accepted. `bytes` are fed raw to both handshake sides and as a sealed frame,
/// which must fail cleanly.
pub fn link(data: &[u8]) {
    use crate::frame::FRAME_LEN;
    use crate::link::{Dialer, LinkKind, LinkSecret, Listener};

    let [seed, which, hi, lo, xor, raw @ ..] = data else {
        return;
    };
    let (which, position, xor) = (
        *which % 9,
        usize::from(u16::from_be_bytes([*hi, *lo])),
        *xor,
    );
    let bend = |index: u8, message: &mut [u8]| {
        if index == which && xor != 0 && !message.is_empty() {
            let at = position % message.len();
            message[at] ^= xor;
            true
        } else {
            false
        }
    };
    let mut rng = rand::rngs::StdRng::from_seed([*seed; 32]);
    let (dialer_key, listener_key) = (
        LinkSecret::from_bytes([1; 32]),
        LinkSecret::from_bytes([2; 32]),
    );

    // Raw bytes where each kind of message is expected.
    let _ = Listener::accept(LinkKind::Relay, &listener_key, raw, &mut rng);
    if let Ok((d, _)) = Dialer::start(
        LinkKind::Relay,
        &dialer_key,
        &listener_key.public(),
        &mut rng,
    ) {
        let _ = d.finish(raw);
    }

    let (d, mut hello) = Dialer::start(
        LinkKind::Relay,
        &dialer_key,
        &listener_key.public(),
        &mut rng,
    )
    .expect("starts");
    let bent = bend(0, &mut hello);
    let Ok((l, mut answer)) = Listener::accept(LinkKind::Relay, &listener_key, &hello, &mut rng)
    else {
        assert!(bent, "an unaltered first message is accepted");
        return;
    };
    let bent = bend(1, &mut answer) || bent;
    let Ok((mut dt, mut last)) = d.finish(&answer) else {
        assert!(bent, "an unaltered answer is accepted");
        return;
    };
    let bent = bend(2, &mut last) || bent;
    let Ok(mut lt) = l.finish(&last) else {
        assert!(bent, "an unaltered last message is accepted");
        return;
    };
    assert!(!bent, "an altered handshake completed");
    assert_eq!(lt.remote(), dialer_key.public());
    assert_eq!(dt.remote(), listener_key.public());
    // Frames alternate: dialer to listener (3, 5, 7), listener to dialer (4, 6, 8). Once a
    // direction refused a message, nothing later in that direction is accepted.
    let mut broken = [false; 2];
    for index in 3..9u8 {
        let direction = usize::from(index % 2 == 0);
        let (sender, receiver) = if direction == 0 {
            (&mut dt, &mut lt)
        } else {
            (&mut lt, &mut dt)
        };
        let frame = [index; FRAME_LEN];
        let mut sealed = sender.seal_frame(&frame).expect("seals");
        let bent = bend(index, &mut sealed[..]);
        match receiver.open_frame(&sealed[..]) {
            Ok(opened) => {
                assert!(
                    !bent && !broken[direction],
                    "an altered or later frame was accepted"
                );
                assert_eq!(*opened, frame);
            }
            Err(_) => {
                assert!(bent || broken[direction], "an unaltered frame was refused");
                broken[direction] = true;
            }
        }
    }
    // Raw bytes as a sealed frame on a fresh link.
    let (_, mut fresh) =
        crate::link::handshake_in_memory(LinkKind::Relay, &dialer_key, &listener_key, &mut rng)
            .expect("handshake");
    assert!(
        fresh.open_frame(raw).is_err(),
        "raw bytes opened as a frame"
    );
}

pub use crate::session::fuzz::session;

/// What a SOCKS5 handshake did with some input: what it sent, how it ended (`None`: it wants
/// more), and the bytes it consumed.
#[derive(Debug, PartialEq, Eq)]
struct SocksRun {
    sent: Vec<u8>,
    outcome: Option<Step>,
    consumed: Vec<u8>,
}

/// Feeds `input` to a fresh handshake `chunk` bytes at a time, as a driver reads a socket.
fn socks_run(input: &[u8], chunk: usize) -> SocksRun {
    let mut hs = SocksHandshake::new();
    let (mut buf, mut sent, mut fed) = (Vec::new(), Vec::new(), 0);
    let mut chunks = input.chunks(chunk.max(1));
    let outcome = loop {
        match hs.step(&mut buf) {
            Step::NeedMore => match chunks.next() {
                Some(c) => {
                    buf.extend_from_slice(c);
                    fed += c.len();
                }
                None => break None,
            },
            Step::Send(bytes) => sent.extend(bytes),
            done => break Some(done),
        }
    };
    SocksRun {
        sent,
        outcome,
        consumed: input[..fed - buf.len()].to_vec(),
    }
}

/// `[chunk][bytes…]`: the SOCKS5 handshake fed `bytes` in chunks of `chunk % 16 + 1` bytes
/// never panics and ends exactly as when fed them at once. A request it accepts re-encodes
/// ([`crate::socks::SocksRequest::encode_client`]) to bytes it reads back as the same
/// request, and to the very bytes it read after the greeting, unless those used a form the
/// encoder does not write (a non-zero reserved byte, an address sent as a name).
pub fn socks(data: &[u8]) {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunked = socks_run(input, usize::from(chunk % 16) + 1);
    assert_eq!(
        chunked,
        socks_run(input, input.len()),
        "the outcome depends on how the input was cut"
    );
    let Some(Step::Request(request)) = &chunked.outcome else {
        return;
    };
    let encoded = request
        .encode_client()
        .expect("an accepted request encodes");
    let mut again = request.client_greeting().to_vec();
    again.extend_from_slice(&encoded);
    let back = socks_run(&again, 1);
    assert_eq!(back.outcome.as_ref(), Some(&Step::Request(request.clone())));
    assert_eq!(
        back.consumed, again,
        "the re-encoded request was not read whole"
    );
    // The greeting's method list is the client's choice; what follows it is not.
    let read = &chunked.consumed[2 + usize::from(chunked.consumed[1])..];
    let auth = request
        .isolation
        .as_ref()
        .map_or(0, |(user, pass)| 3 + user.len() + pass.len());
    let connect = &read[auth..];
    let canonical = connect[2] == 0
        && (connect[3] != 3 || matches!(request.target, crate::stream::Target::Host(..)));
    if canonical {
        assert_eq!(
            read,
            &encoded[..],
            "an accepted request re-encodes differently"
        );
    }
}

/// Feeds `input` to a fresh HTTP CONNECT parser `chunk` bytes at a time, as the proxy reads
/// a socket; returns how it ended (`None`: it wants more) and what was left in its buffer
/// with the unread input after it.
pub(crate) fn http_connect_run(input: &[u8], chunk: usize) -> (Option<HttpStep>, Vec<u8>) {
    let mut parser = HttpConnect::new();
    let mut buf = Vec::new();
    let mut chunks = input.chunks(chunk.max(1));
    loop {
        match parser.step(&mut buf) {
            HttpStep::NeedMore => match chunks.next() {
                Some(c) => {
                    buf.extend_from_slice(c);
                    assert!(
                        buf.len() <= MAX_HEAD + chunk,
                        "the head buffer grew past its bound"
                    );
                }
                None => return (None, buf),
            },
            done => {
                buf.extend(chunks.flatten());
                return (Some(done), buf);
            }
        }
    }
}

/// `[chunk][bytes…]`: the HTTP CONNECT parser fed `bytes` in chunks of `chunk % 32 + 1`
/// bytes never panics, ends exactly as when fed them at once, and keeps every byte after
/// an accepted head. A request it accepts re-encodes
/// ([`crate::http_connect::ConnectRequest::encode`]) to a head it reads back as the same
/// request, with nothing left over.
pub fn http_connect(data: &[u8]) {
    let Some((&chunk, input)) = data.split_first() else {
        return;
    };
    let chunked = http_connect_run(input, usize::from(chunk % 32) + 1);
    assert_eq!(
        chunked,
        http_connect_run(input, input.len()),
        "the outcome depends on how the input was cut"
    );
    let (Some(HttpStep::Request(request)), rest) = &chunked else {
        return;
    };
    assert!(
        input.ends_with(rest),
        "the bytes after the head were not kept"
    );
    // The user name of a request that re-encodes has no colon; one that cannot re-encode
    // would not have been accepted.
    let again = request.encode().expect("an accepted request encodes");
    assert_eq!(
        http_connect_run(&again, 1),
        (Some(HttpStep::Request(request.clone())), Vec::new())
    );
}

/// The stream messages, bare and inside packet content as clients and exits send them: a
/// client or exit message that decodes re-encodes to the same bytes (its `encoded_len`
/// too); a client message cut into fragments names its session in each, and its
/// fragments put back together give it again.
pub fn stream(data: &[u8]) {
    fn messages(bytes: &[u8]) {
        if let Ok(m) = ClientMessage::decode(bytes) {
            assert_eq!(m.encode().expect("a decoded client message encodes"), bytes);
            assert_eq!(m.encoded_len(), bytes.len());
            let fragments = split_client_message(7, bytes, 64).expect("splits");
            let mut body = Vec::new();
            for f in fragments {
                let (session, rest) = session_of_fragment(f).expect("names its session");
                assert_eq!(session, m.session);
                body.extend(rest.data);
            }
            assert_eq!(
                crate::stream::join_client_message(m.session, &body),
                bytes,
                "a client message's fragments do not join to it"
            );
        }
        if let Ok(m) = ExitMessage::decode(bytes) {
            assert_eq!(m.encode().expect("a decoded exit message encodes"), bytes);
            assert_eq!(m.encoded_len(), bytes.len());
        }
    }
    messages(data);
    if let Ok(Content::DataWithAck { fragment, .. } | Content::Data { fragment }) =
        Content::decode(data)
    {
        messages(&fragment.data);
    }
}

/// An authority's vote decodes, re-encodes identically, and verifies against the authority
/// set of [`authority_keys`] or errors; a vote that verifies names every descriptor it
/// carries, each verified.
pub fn vote(data: &[u8]) {
    if let Ok(vote) = decode::<Vote>(data) {
        let _ = vote.validate();
    }
    let Ok(signed) = decode::<SignedVote>(data) else {
        return;
    };
    assert_eq!(encode(&signed).expect("encodes"), data);
    let set = authority_set();
    if let Ok(verified) = signed.verify(&set, None) {
        assert_eq!(verified.descriptors.len(), verified.vote.descriptors.len());
        assert_eq!(
            verified.descriptor_digests.len(),
            verified.descriptors.len()
        );
        assert_eq!(encode(&verified.vote).expect("encodes"), signed.body);
        assert!(set.contains(&signed.signer()));
        let other = verified.vote.epoch.wrapping_add(1);
        assert!(signed.verify(&set, Some(other)).is_err());
    }
}

/// The fuzz crate's directory (`fuzz/` beside this crate).
pub fn fuzz_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// Replays `target`'s corpus (`fuzz/corpus/<target>/`, every failure the fuzzers found and
/// what they kept) and `seeds` through `run`, each input also cut in half and with a byte
/// flipped at its start, a third in and its end. Returns how many inputs it read. The corpus
/// replay test of every crate with fuzz targets calls it.
///
/// With `FUZZ_WRITE_SEEDS` set, the seeds are also written to `fuzz/work/<target>/`, the
/// scratch corpus `fuzz/run-all` starts each fuzzer from.
pub fn replay(target: &str, seeds: Vec<Vec<u8>>, run: impl Fn(&[u8])) -> usize {
    if std::env::var_os("FUZZ_WRITE_SEEDS").is_some() {
        let dir = fuzz_dir().join("work").join(target);
        std::fs::create_dir_all(&dir).expect("fuzz/work/<target>");
        for (i, seed) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), seed).expect("a seed file");
        }
    }
    let mut inputs = seeds;
    if let Ok(dir) = std::fs::read_dir(fuzz_dir().join("corpus").join(target)) {
        let mut paths: Vec<_> = dir.map(|e| e.expect("corpus entry").path()).collect();
        paths.sort();
        for path in paths {
            inputs.push(std::fs::read(&path).expect("corpus file"));
        }
    }
    for input in &inputs {
        run(input);
        run(&input[..input.len() / 2]);
        for at in [0, input.len() / 3, input.len().saturating_sub(1)] {
            let mut flipped = input.clone();
            if let Some(b) = flipped.get_mut(at) {
                *b ^= 0x41;
            }
            run(&flipped);
        }
    }
    inputs.len()
}

/// The fuzz targets (`fuzz/fuzz_targets/<name>.rs`) whose entry point is in `krate`'s
/// `fuzz_entry` (`krate` as Rust spells it: `murmur_protocol`), sorted; each must call the
/// entry point of its own name.
pub fn targets_of(krate: &str) -> Vec<String> {
    let mut names = Vec::new();
    let dir = std::fs::read_dir(fuzz_dir().join("fuzz_targets")).expect("fuzz/fuzz_targets");
    for entry in dir {
        let path = entry.expect("fuzz target").path();
        let text = std::fs::read_to_string(&path).expect("fuzz target source");
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a target's file name")
            .to_string();
        if text.contains(&format!("{krate}::")) {
            assert!(
                text.contains(&format!("{krate}::fuzz_entry::{name}(")),
                "fuzz target {name} does not call {krate}::fuzz_entry::{name}"
            );
            names.push(name);
        }
    }
    names.sort();
    names
}

/// The corpus replay test of a crate with fuzz targets: `targets` are exactly the fuzz
/// targets calling into `krate`, and each replays its corpus and `seeds` through `run`.
pub fn replay_targets(
    krate: &str,
    targets: &[&str],
    seeds: impl Fn(&str) -> Vec<Vec<u8>>,
    run: impl Fn(&str, &[u8]),
) {
    assert_targets_registered(krate, targets);
    for target in targets {
        replay(target, seeds(target), |input| run(target, input));
    }
}

/// Asserts that `targets` are exactly the fuzz targets calling into `krate`.
pub fn assert_targets_registered(krate: &str, targets: &[&str]) {
    let mut ours: Vec<String> = targets.iter().map(|t| t.to_string()).collect();
    ours.sort();
    assert_eq!(
        targets_of(krate),
        ours,
        "the fuzz targets calling {krate} and its TARGETS differ"
    );
}

/// `n` fixed inputs of pseudo-random bytes, 64 bytes and then 96 more each: seeds for the
/// structure-aware targets, which read any bytes as steps.
pub fn pseudo_random_inputs(n: u64) -> Vec<Vec<u8>> {
    use rand::Rng;
    (0..n)
        .map(|i| {
            let mut bytes = vec![0u8; 64 + 96 * i as usize];
            rand::rngs::StdRng::seed_from_u64(i).fill_bytes(&mut bytes);
            bytes
        })
        .collect()
}
