//! Issue 18, between real processes: what a user of `murmur-client` sees and keeps.
//!
//! - `murmur-client status --json` while downloads run shows the counters growing, tickets
//!   signed, and the pot at the ledger falling as relays redeem the winners;
//! - restarting the client keeps its gateway (the guard in its state directory), among three
//!   gateways;
//! - with `max_spend` reached, the next stream is refused (SOCKS code 2) and the status says
//!   why;
//! - the client's log, written to a file, carries no colour codes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{Duration, Instant};

use murmur_tests::{
    ClientProc, client_status, curl, keygen, start_authorities_config, start_client_proc,
    start_ledger, start_relay, wait_until,
};

const EPOCH_S: u64 = 10;
const NETWORK: &str =
    "lambda_p = 30.0\nlambda_l = 1.0\nlambda_d = 1.0\nlambda_m = 0.0\nmu = 200.0\n";
const GATEWAYS: usize = 3;
const RESTARTS: usize = 4;

#[test]
fn status_shows_traffic_and_spend_the_guard_survives_restarts_and_max_spend_refuses() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client_dir = d.join("client");
    let client_key = client_dir.join("pot.key");
    let payer = keygen(&murmur_tests::binary("murmur-relay"), &client_key);
    let ledger = start_ledger(d, &[(&payer, 100_000_000)]);
    let (infos, _authorities) = start_authorities_config(d, 3, EPOCH_S, NETWORK, "", false);
    let common = format!(
        "[mixing]\nworkers = 1\ndistinct_subnets = false\n\
         [payments]\n{}redeem_interval = \"1s\"\npot_refresh = \"2s\"\n",
        ledger.payments_toml()
    );
    let mut relays = Vec::new();
    for i in 0..GATEWAYS {
        let name = format!("gateway-{i}");
        relays.push(start_relay(
            d,
            &name,
            "[\"gateway\"]",
            &infos,
            EPOCH_S,
            &common,
        ));
    }
    for i in 0..3 {
        let name = format!("mix-{i}");
        relays.push(start_relay(d, &name, "[\"mix\"]", &infos, EPOCH_S, &common));
    }
    let exit = format!(
        "{common}[exit]\nallow_private = true\nallow_own_addresses = true\n\
         connect_timeout = \"3s\"\npolicy = \"accept *:*\"\n"
    );
    relays.push(start_relay(d, "exit", "[\"exit\"]", &infos, EPOCH_S, &exit));
    // Tickets win often (face 32 for 16 packets' worth), so the relays' redemptions move the
    // pot within the test; the target balance is never topped up again (low water 1).
    let payments = |extra: &str| {
        format!(
            "[payments]\n{}key_file = \"pot.key\"\nface_value = 32\npackets_per_ticket = 16\n\
             gateway_frames_per_ticket = 16\ntarget_balance = 1000000\nlow_water = 1\n{extra}",
            ledger.payments_toml()
        )
    };
    let mut client = start_client_proc(&client_dir, &infos, &payments(""));
    eprintln!("network ready after {:?}", started.elapsed());

    // Downloads for 40 s, the status read every 2 s.
    let file = murmur_tests::test_bytes(100_000, 3);
    let server = murmur_tests::HttpServer::start(vec![("/file".into(), file.clone())]);
    let first = client_status(client.control);
    let gateway = first.gateway.clone().expect("a gateway in use").identity;
    let mut seen = vec![first];
    let t = Instant::now();
    let mut polled = Instant::now();
    while t.elapsed() < Duration::from_secs(40) {
        let (code, body, err) = curl(client.socks, &server.url("/file"), 30);
        assert_eq!(code, 0, "{err}\n{}", client.proc.log_text());
        assert_eq!(body, file);
        if polled.elapsed() >= Duration::from_secs(2) {
            seen.push(client_status(client.control));
            polled = Instant::now();
        }
    }
    // The winners of the last epochs are redeemed once their key epoch retires.
    let last = wait_until(Duration::from_secs(60), Duration::from_secs(2), || {
        let s = client_status(client.control);
        let before = seen[0].payments.as_ref()?.pot_balance?;
        (s.payments.as_ref()?.pot_balance? < before).then_some(s)
    });
    let last = last.unwrap_or_else(|| {
        panic!(
            "the pot never fell at the ledger: {:?}",
            client_status(client.control).payments
        )
    });
    for s in &seen {
        let p = s.payments.as_ref().unwrap();
        eprintln!(
            "t={:>3}s real {:>6} cover {:>6} streams opened {:>3} spent {:>7} pot {:?}",
            s.uptime_s,
            s.traffic.real_sent,
            s.traffic.cover_sent,
            s.streams.opened,
            p.spent,
            p.pot_balance
        );
    }
    let (a, b) = (&seen[0], &last);
    assert!(b.traffic.real_sent > a.traffic.real_sent);
    assert!(b.traffic.cover_sent > a.traffic.cover_sent);
    assert!(b.streams.opened > a.streams.opened);
    let (pa, pb) = (a.payments.as_ref().unwrap(), b.payments.as_ref().unwrap());
    assert!(pb.spent > pa.spent, "spent {} then {}", pa.spent, pb.spent);
    assert!(pb.tickets > pa.tickets);
    assert!(
        pb.relays.len() >= 5,
        "the gateway, three mixes and the exit were paid: {:?}",
        pb.relays
    );
    assert!(
        pb.relays
            .iter()
            .any(|r| r.identity == gateway && r.paid > 0)
    );
    for w in seen.windows(2) {
        assert!(
            w[1].traffic.real_sent >= w[0].traffic.real_sent,
            "a counter went back"
        );
        let (p0, p1) = (
            w[0].payments.as_ref().unwrap(),
            w[1].payments.as_ref().unwrap(),
        );
        assert!(p1.spent >= p0.spent, "spent went back");
    }
    let c = b.consensus.as_ref().expect("a consensus");
    assert!(c.valid && c.relays == GATEWAYS + 4, "{c:?}");
    assert!(b.refusing_new_streams.is_none());
    // The human view says the same, and the log has no colour codes.
    let text = std::process::Command::new(murmur_tests::binary("murmur-client"))
        .args(["status", "--control", &client.control.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8(text.stdout).unwrap();
    assert!(text.contains(&gateway) && text.contains("spent"), "{text}");
    assert!(
        !client.proc.log_text().contains('\x1b'),
        "colour codes in the log file"
    );

    // Restarts keep the gateway (a fresh choice would move among three).
    for i in 0..RESTARTS {
        assert!(client.proc.terminate(Duration::from_secs(15)));
        client = start_client_proc(&client_dir, &infos, &payments(""));
        let g = client_status(client.control).gateway.unwrap();
        eprintln!("restart {i}: gateway {} ({})", g.identity, g.choice);
        assert_eq!(g.identity, gateway, "restart {i} moved to another gateway");
        assert_eq!(g.choice, "kept");
        assert!(g.guard_rotates_at.is_some());
    }

    // A spending cap: streams open until the client's tickets are worth it, then not.
    assert!(client.proc.terminate(Duration::from_secs(15)));
    let ClientProc {
        proc: capped,
        socks,
        control,
    } = start_client_proc(&client_dir, &infos, &payments("max_spend = 200\n"));
    let (code, _, err) = curl(socks, &server.url("/file"), 30);
    assert_eq!(code, 0, "below the cap: {err}");
    let reached = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let s = client_status(control);
        s.refusing_new_streams.clone().map(|why| (s, why))
    });
    let (s, why) = reached.expect("the cap of 200 was never reached");
    assert!(why.contains("max_spend"), "{why}");
    assert!(s.payments.unwrap().spent >= 200);
    let (code, _, err) = curl(socks, &server.url("/file"), 30);
    assert_ne!(code, 0, "a stream opened past the cap");
    assert!(err.contains("(2)") || err.contains("not allowed"), "{err}");
    let s = client_status(control);
    assert_eq!(s.streams.refused_spend, 1);
    assert!(
        capped.log_text().contains("spending cap"),
        "{}",
        capped.log_text()
    );
    eprintln!("done after {:?}", started.elapsed());
}
