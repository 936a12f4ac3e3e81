//! The client↔gateway link against an observer, a hijacker, a man in the middle and a flood of
//! idle sockets, on a network of real processes (three authorities, a gateway, a mix in each
//! layer, an exit) with real `murmur-client`s and curl.
//!
//! - Access link: the gateway advertises a tap's address, so a victim client's link runs
//!   through it. The tap sees fixed-length WebSocket messages (48, 48, 64, then sealed frames)
//!   and no control message, frame header or next hop; replaying the recorded bytes on a new
//!   connection gets nothing; a second client key saying hello for a live session's address is
//!   refused while that session keeps receiving; the victim's download completes throughout.
//! - Man in the middle: when the tap answers as a gateway holding another key, the client
//!   refuses it (counted, logged) and serves again once the real gateway is back.
//! - Flood: 2,000 idle or half-open sockets from 127.0.0.2–9, reopened as the gateway closes
//!   them at its 2 s handshake deadline; a fresh client still gets through, the gateway's memory
//!   stays bounded, and every socket is closed by the deadline (counted).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur_protocol::control::Control;
use murmur_protocol::directory::{Consensus, IdentityKey};
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::link::{
    DIALER_FINISH_LEN, DIALER_HELLO_LEN, LISTENER_HELLO_LEN, LinkPublic, LinkSecret,
    SEALED_FRAME_LEN, session_address,
};
use murmur_protocol::packet::Address;
use murmur_tests::client_link::{
    ClientLink, LinkFailure, Tap, TapMode, connect_from, delivered_id, loop_frame, open_session,
    ws_messages,
};
use murmur_tests::{
    AuthorityInfo, HttpServer, Proc, RelayProc, curl, fetch_consensus, rss_kib_of, runtime,
    start_authorities, start_client, start_relay, start_relay_listening, test_bytes, wait_until,
};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const EPOCH_S: u64 = 10;
const REFUSED: &str = "murmur_relay_connections_refused_total";

/// The two networks would share two cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

struct Network {
    authorities: Vec<AuthorityInfo>,
    _authority_procs: Vec<Proc>,
    gateway: RelayProc,
    _relays: Vec<RelayProc>,
    consensus: Consensus,
}

impl Network {
    /// Starts the network (`listen` and `gateway` go into the gateway's config) and waits for a
    /// consensus that carries traffic.
    fn start(dir: &Path, rt: &tokio::runtime::Runtime, listen: &str, gateway: &str) -> Network {
        let (authorities, procs) = start_authorities(dir, 3, EPOCH_S);
        let loopback =
            "[mixing]\nworkers = 1\nreplay_capacity = 200000\ndistinct_subnets = false\n";
        let gateway = start_relay_listening(
            dir,
            "gateway",
            "[\"gateway\"]",
            &authorities,
            EPOCH_S,
            listen,
            &format!("{loopback}{gateway}"),
        );
        let mut relays: Vec<RelayProc> = (0..3)
            .map(|i| {
                let name = format!("mix-{i}");
                start_relay(dir, &name, "[\"mix\"]", &authorities, EPOCH_S, loopback)
            })
            .collect();
        let exit = format!(
            "{loopback}[exit]\nallow_private = true\nallow_own_addresses = true\npolicy = \"accept *:*\"\n"
        );
        relays.push(start_relay(
            dir,
            "exit",
            "[\"exit\"]",
            &authorities,
            EPOCH_S,
            &exit,
        ));
        let gateway_id = IdentityKey::from_hex(&gateway.identity).unwrap();
        let consensus = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
            let c = rt.block_on(fetch_consensus(&authorities))?;
            let layers = (1..=3).all(|l| c.relays.iter().any(|r| r.layer == Some(l)));
            let exit = c.relays.iter().any(|r| r.roles.exit);
            let gw = c.relay(&gateway_id)?.route_hop(c.epoch).is_ok();
            (layers && exit && gw).then_some(c)
        })
        .expect("no usable consensus within 60 s");
        Network {
            authorities,
            _authority_procs: procs,
            gateway,
            _relays: relays,
            consensus,
        }
    }

    fn gateway_id(&self) -> IdentityKey {
        IdentityKey::from_hex(&self.gateway.identity).unwrap()
    }

    fn refused(&self, reason: &str) -> f64 {
        self.gateway
            .metric(REFUSED, &format!("reason=\"{reason}\""))
            .unwrap_or(0.0)
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Replays `bytes` (a recorded client stream) on a new connection to `to`, as a WebSocket
/// client would send it (the upgrade request, then, once it is answered, the rest); returns
/// how many bytes come back after the upgrade's answer before the gateway closes (or 2 s pass).
async fn replay(to: SocketAddr, bytes: &[u8]) -> usize {
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.write_all(&bytes[..split]).await.unwrap();
    let mut back = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut upgraded = None;
    while let Ok(Ok(n)) = tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        back.extend_from_slice(&buf[..n]);
        if upgraded.is_none()
            && let Some(end) = back.windows(4).position(|w| w == b"\r\n\r\n")
        {
            upgraded = Some(end + 4);
            let _ = s.write_all(&bytes[split..]).await;
        }
    }
    back.len() - upgraded.expect("the upgrade is answered")
}

/// What a session that sends itself loops saw: when each came back, and how its link ended.
#[derive(Default)]
struct Loops {
    returned: Vec<Instant>,
    ended: Option<LinkFailure>,
}

/// Sends a loop every 50 ms over `link` and notes each one delivered back, until `stop`.
async fn keep_looping(
    mut link: ClientLink,
    consensus: Consensus,
    gateway: IdentityKey,
    client: LinkPublic,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Loops>>,
) {
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    let mut id = 0;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = tick.tick() => {
                id += 1;
                let frame = loop_frame(&consensus, &gateway, &client, id, &mut rng);
                if let Err(e) = link.send(&frame).await {
                    seen.lock().unwrap().ended = Some(e);
                    return;
                }
            }
            frame = link.recv() => match frame {
                Ok(f) => if delivered_id(&f).is_some() {
                    seen.lock().unwrap().returned.push(Instant::now());
                },
                Err(e) => {
                    seen.lock().unwrap().ended = Some(e);
                    return;
                }
            },
        }
    }
}

#[test]
fn the_access_link_shows_nothing_and_no_other_key_can_claim_a_session() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(2);
    let tap_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tap_addr = tap_listener.local_addr().unwrap();
    let net = Network::start(
        dir.path(),
        &rt,
        &format!("advertise_client = \"{tap_addr}\"\n"),
        "",
    );
    let gateway = net.gateway.client.unwrap();
    let gateway_key = net.consensus.relay(&net.gateway_id()).unwrap().link_key;
    let tap = Tap::start(&rt, tap_listener, TapMode::Forward(gateway));
    let file = test_bytes(1_000_000, 5);
    let server = HttpServer::start(vec![
        ("/file".into(), file.clone()),
        ("/".into(), b"ok".to_vec()),
    ]);
    let (mut client, socks) = start_client(dir.path(), &net.authorities, "");
    assert_eq!(
        tap.recorded().len(),
        1,
        "the client's link runs through the tap"
    );

    // The victim downloads while the attacks below run.
    let url = server.url("/file");
    let download = std::thread::spawn(move || {
        let t = Instant::now();
        (curl(socks, &url, 120), t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(1500));

    // Replaying the start of what the tap recorded of the victim's link (upgrade, handshake,
    // hello and a few frames) on fresh connections: the gateway answers the replayed first
    // message, cannot verify the last, and closes. No welcome and no delivery (each would be
    // longer than a frame) ever comes back.
    for _ in 0..3 {
        let mut recorded = tap.recorded().remove(0).from_client;
        recorded.truncate(16 * 1024);
        let back = rt.block_on(replay(gateway, &recorded));
        eprintln!(
            "replayed {} recorded bytes: {back} bytes came back",
            recorded.len()
        );
        assert!(back < FRAME_LEN, "a replayed session got {back} bytes");
    }

    // A second victim whose key the test holds, so an attacker can name its address: each
    // hello for it from another key is refused, and the victim's loops keep coming back.
    let victim_key = LinkSecret::generate(&mut rand::rng());
    let victim_address = session_address(&victim_key.public());
    let attacker_key = LinkSecret::generate(&mut rand::rng());
    let stop = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Loops::default()));
    let victim = rt
        .block_on(open_session(gateway, &gateway_key, &victim_key))
        .unwrap();
    let looping = rt.spawn(keep_looping(
        victim,
        net.consensus.clone(),
        net.gateway_id(),
        victim_key.public(),
        stop.clone(),
        seen.clone(),
    ));
    std::thread::sleep(Duration::from_secs(1));
    let before = seen.lock().unwrap().returned.len();
    rt.block_on(async {
        for _ in 0..5 {
            let stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
            let mut link = ClientLink::dial(stream, &gateway_key, &attacker_key)
                .await
                .unwrap();
            let hello = Control::Hello {
                address: victim_address,
            };
            link.send(&Frame::Control(hello.encode())).await.unwrap();
            assert_eq!(
                link.recv().await,
                Err(LinkFailure::Closed),
                "a hello for another key's address was answered"
            );
        }
        send_plaintext_hello(gateway, victim_address).await;
    });
    let attacked = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    rt.block_on(looping).unwrap();
    let seen = seen.lock().unwrap();
    let after = seen.returned.iter().filter(|t| **t > attacked).count();
    eprintln!(
        "victim's loops: {before} back before the attacks, {after} in the 2 s after; link ended: {:?}",
        seen.ended
    );
    for reason in [
        "hello_address_mismatch",
        "noise_handshake_failed",
        "message_malformed",
        "closed_in_handshake",
        "websocket_upgrade_failed",
    ] {
        eprintln!("gateway refused {reason}: {}", net.refused(reason));
    }
    assert!(
        before > 0 && after > 0,
        "the victim's loops stopped coming back"
    );
    assert_eq!(seen.ended, None, "the victim's session was ended");
    assert!(net.refused("hello_address_mismatch") >= 5.0);
    assert!(net.refused("noise_handshake_failed") >= 3.0);
    assert!(net.refused("message_malformed") >= 1.0);

    let ((code, body, err), took) = download.join().unwrap();
    assert_eq!(code, 0, "{err}\n{}", client.log_text());
    assert_eq!(
        Sha256::digest(&body),
        Sha256::digest(&file),
        "file corrupted"
    );
    eprintln!("1 MB through the tapped link, under attack: {took:?}");

    // What the observer of the access link saw: the handshake's fixed lengths, then sealed
    // frames only; no control message (whose magic starts every hello, welcome and payment),
    // and no next hop (every forward frame names a layer-1 mix in the clear).
    let recorded = tap.recorded().remove(0);
    let up = ws_messages(&recorded.from_client, true);
    let down = ws_messages(&recorded.from_gateway, false);
    assert_eq!(up[0].len(), DIALER_HELLO_LEN);
    assert_eq!(up[1].len(), DIALER_FINISH_LEN);
    assert_eq!(down[0].len(), LISTENER_HELLO_LEN);
    assert!(
        up.len() > 100 && down.len() > 100,
        "{} up, {} down",
        up.len(),
        down.len()
    );
    assert!(
        up[2..]
            .iter()
            .chain(&down[1..])
            .all(|m| m.len() == SEALED_FRAME_LEN)
    );
    let layer1: Vec<Address> = net
        .consensus
        .relays
        .iter()
        .filter(|r| r.layer == Some(1))
        .map(|r| r.address())
        .collect();
    for m in up.iter().chain(&down) {
        assert!(!contains(m, b"MMC1"), "a control message in the clear");
        for a in &layer1 {
            assert!(!contains(m, &a.0), "a next hop in the clear");
        }
    }
    eprintln!(
        "observer: {} messages up, {} down, all {SEALED_FRAME_LEN} bytes after the handshake",
        up.len(),
        down.len()
    );

    // A man in the middle holding another key: the client refuses it, and serves again once
    // the link reaches the real gateway.
    let impostor = Arc::new(LinkSecret::generate(&mut rand::rng()));
    tap.set_mode(TapMode::Impersonate(impostor));
    tap.cut();
    let refusals = wait_until(Duration::from_secs(30), Duration::from_millis(200), || {
        let n = client
            .log_text()
            .matches("did not prove the link key")
            .count();
        (n >= 2).then_some(n)
    });
    let (completed, failed) = *tap.impersonated.lock().unwrap();
    eprintln!("man in the middle: {failed} handshakes refused, {completed} completed");
    assert!(
        refusals.is_some(),
        "the client did not refuse:\n{}",
        client.log_text()
    );
    assert_eq!(completed, 0);
    assert!(failed >= 2);
    tap.set_mode(TapMode::Forward(gateway));
    let t = Instant::now();
    let served = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let (code, body, _) = curl(socks, &server.url("/"), 10);
        (code == 0 && body == b"ok").then_some(())
    });
    assert!(
        served.is_some(),
        "no service after the impostor left:\n{}",
        client.log_text()
    );
    eprintln!("served again {:?} after the impostor left", t.elapsed());
    assert!(client.terminate(Duration::from_secs(15)));
}

/// The old protocol's opening, as an attacker who sniffed an address would send it: a
/// plaintext hello as the first message. Refused before any frame is read.
async fn send_plaintext_hello(gateway: SocketAddr, address: Address) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{gateway}/"))
        .await
        .unwrap();
    let hello = Frame::Control(Control::Hello { address }.encode());
    let bytes = hello.encode().unwrap().to_vec();
    ws.send(Message::Binary(bytes.into())).await.unwrap();
    let answer = ws.next().await;
    assert!(
        !matches!(answer, Some(Ok(Message::Binary(_)))),
        "the plaintext hello was answered"
    );
}

/// Connections the flood holds at once, from 127.0.0.2–9.
const FLOOD: usize = 2000;
const FLOOD_SOURCES: usize = 8;
/// The gateway's handshake deadline in this test.
const DEADLINE: Duration = Duration::from_secs(2);

/// What one flood connection sends before falling silent: nothing, half an HTTP request, or a
/// whole WebSocket upgrade (then no handshake).
fn opening(kind: usize) -> &'static [u8] {
    match kind % 3 {
        0 => b"",
        1 => b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        _ => {
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        }
    }
}

/// One flood connection, reopened each time the gateway closes it, until `stop`; returns how
/// long the socket it held when the flood stopped lived before the gateway closed it (`None`
/// if it held none: a reconnect still waiting in the listener's backlog then).
async fn hold(
    from: IpAddr,
    to: SocketAddr,
    kind: usize,
    opened: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> Option<Duration> {
    let mut first = true;
    loop {
        // A burst of reconnects can overflow the listen backlog (SYNs retried after 1 s, 3 s).
        let connect = tokio::time::timeout(Duration::from_millis(500), connect_from(from, to));
        let Ok(Ok(mut s)) = connect.await else {
            if stop.load(Ordering::Relaxed) {
                return None;
            }
            continue;
        };
        let t = Instant::now();
        let _ = s.write_all(opening(kind)).await;
        if first {
            opened.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let held_at_stop = stop.load(Ordering::Relaxed);
        let mut buf = [0u8; 1024];
        // Anything the gateway says (the upgrade's answer) is read; EOF or a reset is the close.
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
        if stop.load(Ordering::Relaxed) {
            return (!held_at_stop).then(|| t.elapsed());
        }
    }
}

/// Waits for every flood task until `within` passes; the held times of those that ended.
async fn join_all(
    flood: Vec<tokio::task::JoinHandle<Option<Duration>>>,
    within: Duration,
) -> Vec<Option<Duration>> {
    let deadline = tokio::time::Instant::now() + within;
    let mut out = Vec::new();
    for h in flood {
        let abort = h.abort_handle();
        match tokio::time::timeout_at(deadline, h).await {
            Ok(r) => out.push(r.ok().flatten()),
            Err(_) => {
                abort.abort();
                out.push(None);
            }
        }
    }
    out
}

#[test]
fn two_thousand_idle_sockets_keep_no_fresh_client_out() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime(2);
    // The handshake pool takes the whole flood, so this measures what 2,000 held sockets cost
    // and that the deadline frees them (the caps' refusals are tested in the relay's unit tests).
    let mut net = Network::start(
        dir.path(),
        &rt,
        "",
        &format!(
            "[gateway]\nhandshake_timeout = \"{}s\"\nmax_handshakes = 4096\n\
             max_handshakes_per_address = 256\n",
            DEADLINE.as_secs()
        ),
    );
    let gateway = net.gateway.client.unwrap();
    let server = HttpServer::start(vec![("/".into(), b"fresh".to_vec())]);
    let at_rest = net.gateway.proc.rss_kib().unwrap();

    let opened = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let flood: Vec<_> = (0..FLOOD)
        .map(|i| {
            let from = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % FLOOD_SOURCES) as u8));
            rt.spawn(hold(
                from,
                gateway,
                i / FLOOD_SOURCES,
                opened.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let t = Instant::now();
    let all = wait_until(Duration::from_secs(10), Duration::from_millis(50), || {
        (opened.load(Ordering::Relaxed) == FLOOD).then_some(())
    });
    assert!(
        all.is_some(),
        "only {} flood sockets opened",
        opened.load(Ordering::Relaxed)
    );
    eprintln!("{FLOOD} idle sockets open after {:?}", t.elapsed());

    // The gateway's memory, sampled while the flood lasts.
    let peak = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (peak, stop, pid) = (peak.clone(), stop.clone(), net.gateway.proc.pid().unwrap());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(kib) = rss_kib_of(pid) {
                    peak.fetch_max(kib as usize, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // A fresh client, started while the flood is held, gets through.
    let t = Instant::now();
    let (mut client, socks) = start_client(dir.path(), &net.authorities, "");
    let ready = t.elapsed();
    let (code, body, err) = curl(socks, &server.url("/"), 20);
    let traffic = t.elapsed();
    assert_eq!(code, 0, "{err}\n{}", client.log_text());
    assert_eq!(body, b"fresh");
    eprintln!("fresh client under the flood: ready after {ready:?}, its page after {traffic:?}");
    assert!(
        traffic < Duration::from_secs(5),
        "a fresh client took {traffic:?} to get a page through"
    );

    // Let each socket live its last deadline, then stop reopening: every one sees the gateway
    // close it at the deadline.
    std::thread::sleep(DEADLINE);
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    let ended = rt.block_on(join_all(flood, DEADLINE * 3));
    let held: Vec<Duration> = ended.iter().flatten().copied().collect();
    eprintln!(
        "{} of {FLOOD} flood sockets closed by the gateway",
        held.len()
    );
    assert!(held.len() >= FLOOD * 95 / 100, "only {} closed", held.len());
    let (shortest, longest) = (
        held.iter().min().copied().unwrap(),
        held.iter().max().copied().unwrap(),
    );
    eprintln!("last flood sockets held {shortest:?}..{longest:?} before the gateway closed them");
    assert!(
        shortest >= DEADLINE - Duration::from_millis(100),
        "closed early: {shortest:?}"
    );
    assert!(longest < DEADLINE * 2, "closed late: {longest:?}");
    let timeouts = net.refused("handshake_timeout");
    let peak = peak.load(Ordering::Relaxed) as u64;
    eprintln!(
        "gateway RSS: {} MiB at rest, {} MiB at the flood's peak; {timeouts} handshakes timed out",
        at_rest / 1024,
        peak / 1024
    );
    assert!(
        timeouts >= FLOOD as f64,
        "{timeouts} handshake timeouts counted"
    );
    // A held handshake costs the gateway a task, tungstenite's 8 KiB of upgrade buffers and,
    // once upgraded, a WebSocket whose buffers hold a few frames (`client_link::ws_config`):
    // measured about 18 KiB each (13 MiB at rest, 48 MiB under this flood), so 32 KiB each
    // bounds it with room, and a gateway at its default 512 handshakes stays within 16 MiB more.
    assert!(
        peak < at_rest + FLOOD as u64 * RSS_PER_HANDSHAKE_KIB,
        "gateway RSS {peak} KiB under the flood (at rest {at_rest} KiB)"
    );
    assert!(client.terminate(Duration::from_secs(15)));
    assert!(
        net.gateway.proc.is_running(),
        "the gateway died under the flood"
    );
}

/// The most resident memory the test allows per held handshake, in KiB (see its use).
const RSS_PER_HANDSHAKE_KIB: u64 = 32;
