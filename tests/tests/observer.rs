//! What an observer of a link sees: every relay and the gateway's client port are reached
//! through a recording tap (each relay advertises the tap's address), a
//! paying client downloads a file through the network, and the recorded bytes of every
//! relay↔relay link and of the client↔gateway link hold no frame in the clear (no frame's
//! zero padding, no next hop), no relay identity and no pot public key.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::TcpListener;
use std::time::Instant;

use murmur_protocol::directory::IdentityKey;
use murmur_protocol::link::{DIALER_FINISH_LEN, DIALER_HELLO_LEN, LISTENER_HELLO_LEN};
use murmur_tests::client_link::{Recorded, Tap, TapMode, ws_messages};
use murmur_tests::{
    HttpServer, RelayProc, binary, curl, keygen, runtime, start_authorities_with, start_client,
    start_ledger, start_relay_listening, test_bytes,
};

const EPOCH_S: u64 = 10;
const NETWORK: &str =
    "lambda_p = 50.0\nlambda_l = 1.0\nlambda_d = 1.0\nlambda_m = 1.0\nmu = 200.0\n";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The longest run of zero bytes: a plaintext frame has long ones (reserved bytes, padding),
/// ciphertext none longer than a few bytes.
fn longest_zero_run(bytes: &[u8]) -> usize {
    let (mut best, mut run) = (0, 0);
    for &b in bytes {
        run = if b == 0 { run + 1 } else { 0 };
        best = best.max(run);
    }
    best
}

/// A tap whose address a relay can advertise before it is started; it forwards once told where.
/// Each on a loopback address of its own, as the relays it stands for would be (the
/// authorities vote in at most two relays per address).
fn tap(rt: &tokio::runtime::Runtime) -> Tap {
    let listener = TcpListener::bind((murmur_tests::next_relay_host(), 0)).unwrap();
    let nowhere = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    Tap::start(rt, listener, TapMode::Forward(nowhere))
}

fn key_bytes(hex: &str) -> [u8; 32] {
    IdentityKey::from_hex(hex.trim()).unwrap().0
}

/// Asserts that no recorded byte stream shows `secrets` or a plaintext frame.
fn assert_opaque(link: &str, recorded: &[Recorded], secrets: &[(&str, [u8; 32])]) {
    for (i, r) in recorded.iter().enumerate() {
        for (direction, bytes) in [
            ("from dialer", &r.from_client),
            ("from listener", &r.from_gateway),
        ] {
            for (what, secret) in secrets {
                assert_eq!(
                    find(bytes, secret),
                    None,
                    "{link} connection {i} ({direction}) shows {what} in the clear"
                );
            }
            // A plaintext frame has at least 32 zero bytes (reserved bytes and padding;
            // a Packet frame ends in 32); ciphertext has no such run.
            let zeros = longest_zero_run(bytes);
            assert!(
                zeros < 24,
                "{link} connection {i} ({direction}) has a run of {zeros} zero bytes: a frame in the clear"
            );
        }
    }
}

#[test]
fn an_observer_of_any_link_sees_no_frame_header_identity_or_pot_key() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let pot_key = d.join("client").join("pot.key");
    let payer = keygen(&binary("murmur-relay"), &pot_key);
    let ledger = start_ledger(d, &[(&payer, 100_000_000)]);
    let (infos, _authorities) = start_authorities_with(d, 3, EPOCH_S, NETWORK);
    let common = format!(
        "[mixing]\nworkers = 1\nreplay_capacity = 200000\ndistinct_subnets = false\n\
         [payments]\n{}redeem_interval = \"1s\"\npot_refresh = \"2s\"\n",
        ledger.payments_toml()
    );
    let exit_extra = format!(
        "{common}[exit]\nallow_private = true\nallow_own_addresses = true\nconnect_timeout = \"3s\"\npolicy = \"accept *:*\"\n"
    );
    let rt = runtime(2);
    let client_proxy = tap(&rt);
    let mut relays: Vec<(RelayProc, Tap)> = Vec::new();
    let roles = [
        ("gateway", "[\"gateway\"]"),
        ("mix-0", "[\"mix\"]"),
        ("mix-1", "[\"mix\"]"),
        ("mix-2", "[\"mix\"]"),
        ("exit", "[\"exit\"]"),
    ];
    for (name, role) in roles {
        let proxy = tap(&rt);
        let mut listen = format!("advertise_mix = \"{}\"\n", proxy.addr);
        if name == "gateway" {
            listen += &format!("advertise_client = \"{}\"\n", client_proxy.addr);
        }
        let extra = if name == "exit" { &exit_extra } else { &common };
        let relay = start_relay_listening(d, name, role, &infos, EPOCH_S, &listen, extra);
        proxy.set_mode(TapMode::Forward(relay.mix));
        if let Some(client) = relay.client {
            client_proxy.set_mode(TapMode::Forward(client));
        }
        relays.push((relay, proxy));
    }
    let (_client, socks) = start_client(
        d,
        &infos,
        &format!(
            "[payments]\n{}key_file = \"{}\"\nface_value = 64\n\
             packets_per_ticket = 16\ngateway_frames_per_ticket = 16\n\
             target_balance = 1000000\nlow_water = 100000\n",
            ledger.payments_toml(),
            pot_key.display()
        ),
    );
    eprintln!("network ready after {:?}", started.elapsed());

    let file = test_bytes(300_000, 9);
    let server = HttpServer::start(vec![("/file".into(), file.clone())]);
    let (code, body, err) = curl(socks, &server.url("/file"), 60);
    assert_eq!(code, 0, "download failed: {err}");
    assert!(body == file, "downloaded bytes differ");

    let mut secrets: Vec<(&str, [u8; 32])> = vec![("the pot public key", key_bytes(&payer))];
    for (relay, _) in &relays {
        secrets.push(("a relay identity", key_bytes(&relay.identity)));
    }

    let access = client_proxy.recorded();
    let access_bytes: usize = access
        .iter()
        .map(|r| r.from_client.len() + r.from_gateway.len())
        .sum();
    assert!(
        access_bytes > 300_000,
        "the client link carried only {access_bytes} bytes: the download did not cross the proxy"
    );
    // The same bytes as an observer reads them once it strips the WebSocket framing.
    let unframed: Vec<Recorded> = access
        .iter()
        .map(|r| Recorded {
            from_client: ws_messages(&r.from_client, true).concat(),
            from_gateway: ws_messages(&r.from_gateway, false).concat(),
        })
        .collect();
    assert!(unframed.iter().any(|r| r.from_client.len() > 100_000));
    assert_opaque("client↔gateway (WebSocket payloads)", &unframed, &secrets);
    assert_opaque("client↔gateway", &access, &secrets);

    let mut relay_bytes = 0;
    let mut relay_connections = 0;
    for (relay, proxy) in &relays {
        let recorded = proxy.recorded();
        for r in &recorded {
            // The listener only ever sends its handshake answer; the dialer its two handshake
            // messages, then frames.
            assert_eq!(
                r.from_gateway.len(),
                LISTENER_HELLO_LEN,
                "a link into {} carried more than the listener's handshake answer back",
                relay.proc.name
            );
            // After the handshake, whole sealed frames (the last may be in flight).
            assert!(r.from_client.len() >= DIALER_HELLO_LEN + DIALER_FINISH_LEN);
            relay_bytes += r.from_client.len() + r.from_gateway.len();
        }
        relay_connections += recorded.len();
        assert_opaque(
            &format!("link into {}", relay.proc.name),
            &recorded,
            &secrets,
        );
    }
    assert!(
        relay_bytes > 600_000,
        "relay links carried only {relay_bytes} bytes"
    );
    eprintln!(
        "recorded: client link {access_bytes} bytes over {} connections; relay links \
         {relay_bytes} bytes over {relay_connections} connections; no frame, identity or pot \
         key in the clear ({:?})",
        access.len(),
        started.elapsed()
    );
}
