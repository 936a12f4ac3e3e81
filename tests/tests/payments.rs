//! Payments between real processes: a `murmur-ledger`, authorities and relays on 127.0.0.1.
//!
//! - `kill -9`: a mix relay R takes N always-winning tickets (sent by this test over a relay
//!   link, with a fake next hop T); once R forwarded their packets the winners are on disk, R
//!   is killed before their key epoch retires, restarted, and redeems each exactly once.
//! - Income: in a network of relay processes carrying a paying client's traffic, each relay's
//!   redeemed value matches its price × the packets it carried, within a statistical bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use murmur_ledger::client::LedgerClient;
use murmur_ledger::request::{Fund, Signed};
use murmur_ledger::{Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::envelope::SlotTicket;
use murmur_protocol::ticket::{Ticket, TicketFields};
use murmur_tests::hop::{self, FakeHop, Packets, Route};
use murmur_tests::{
    LedgerProc, RelayProc, start_authorities, start_ledger, start_relay, wait_until,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

const WON: &str = "murmur_relay_tickets_won_total";
const REDEEMED: &str = "murmur_relay_tickets_redeemed_total";
const PENDING: &str = "murmur_relay_winners_pending";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap()
}

fn ledger_client(ledger: &LedgerProc) -> LedgerClient {
    LedgerClient::new(&ledger.url, Duration::from_secs(5)).unwrap()
}

/// An account's balance at the ledger (0 for an account it never credited).
fn balance(rt: &tokio::runtime::Runtime, ledger: &LedgerProc, who: &str) -> u64 {
    let key = IdentityKey::from_hex(who).unwrap();
    rt.block_on(ledger_client(ledger).account(key))
        .unwrap()
        .balance
}

/// A metric of `relay`, 0 while it does not answer.
fn metric(relay: &RelayProc, name: &str) -> f64 {
    relay.metric(name, "").unwrap_or(0.0)
}

/// Short epochs so that a ticket's key epoch retires (one epoch of grace, as `start_relay`
/// sets `key_grace`) within about 2 × 6 s of its packet.
const KILL_EPOCH_S: u64 = 6;
const KILL_TICKETS: u64 = 40;
const KILL_FACE: u64 = 1_000;

/// Sends a fresh unpaid packet every 200 ms over a link proving T's key until one reaches T
/// (R holds a consensus listing T and forwards); `false` if none did within 30 s.
fn wait_forwarding(route: &Route, hop: &FakeHop, p: &mut Packets) -> bool {
    hop::probe(
        hop,
        route,
        p,
        Duration::from_millis(200),
        Duration::from_secs(30),
    )
    .is_some()
}

#[test]
fn winning_tickets_survive_kill_9_and_are_redeemed_once() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(61);
    let pot_key = SigningKey::generate(&mut rng);
    let pot = IdentityKey::of(&pot_key);
    let ledger = start_ledger(dir.path(), &[(&pot.to_hex(), 1_000_000)]);
    let (authorities, _authority_procs) = start_authorities(dir.path(), 3, KILL_EPOCH_S);
    // Redeem and refresh pots every second; a ticket must stay redeemable a minute past its
    // key's retirement (it is given 15 minutes).
    let payments = format!(
        "[payments]\nledger = \"{}\"\nredeem_interval = \"1s\"\npot_refresh = \"1s\"\n\
         min_redeem_window = \"1m\"\n",
        ledger.url
    );
    let mut relay = start_relay(
        dir.path(),
        "relay",
        "[\"mix\"]",
        &authorities,
        KILL_EPOCH_S,
        &payments,
    );
    let rt = runtime();
    let hop = Arc::new(FakeHop::start(&mut rng));
    hop.keep_uploading(&rt, &authorities, KILL_EPOCH_S);
    let mut packets = Packets {
        rng: ChaCha20Rng::seed_from_u64(62),
        next_id: 1,
    };

    // The pot: usable = min(balance, escrow / 2) covers every ticket's face value.
    let funded = rt
        .block_on(ledger_client(&ledger).fund(Signed::new(
            Fund {
                pot,
                balance: 100 * KILL_FACE,
                escrow: 4 * KILL_FACE,
            },
            &pot_key,
            unix_now(),
        )))
        .unwrap();
    let pot_before = funded.pot.balance;

    let logs = |relay: &RelayProc| {
        format!(
            "---- relay ----\n{}\n---- restarted ----\n{}\n---- ledger ----\n{}",
            relay.proc.log_text(),
            std::fs::read_to_string(relay.dir.join("relay-restarted.log")).unwrap_or_default(),
            ledger.proc.log_text()
        )
    };
    let find_route = |within: Duration| {
        wait_until(within, Duration::from_millis(250), || {
            hop::current_route(&rt, &authorities, &relay.identity, &hop, KILL_EPOCH_S)
        })
    };
    let first = find_route(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("no consensus listing R and T\n{}", logs(&relay)));
    assert!(
        wait_forwarding(&first, &hop, &mut packets),
        "R forwards nothing\n{}",
        logs(&relay)
    );

    // A route whose key epoch retires at least 8 s from now, so that sending, forwarding and
    // the kill all happen while R still holds the key (and so cannot have redeemed).
    let retires_at = |r: &Route| (u64::from(r.epoch) + 2) * KILL_EPOCH_S;
    let route = wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
        find_route(Duration::from_secs(5)).filter(|r| retires_at(r) >= unix_now() + 8)
    })
    .unwrap_or_else(|| panic!("no fresh route\n{}", logs(&relay)));

    let now = unix_now();
    let frames: Vec<(u64, _)> = (0..KILL_TICKETS)
        .map(|_| {
            let ticket = Ticket::sign(
                TicketFields {
                    recipient: route.relay,
                    face_value: KILL_FACE,
                    // always wins
                    win_ratio: u64::MAX,
                    nonce: rng.random(),
                    issued: now,
                    expiry: now + 900,
                    commitment: route.commitment,
                },
                &pot_key,
            );
            let slot = SlotTicket::from_ticket(&ticket).unwrap();
            packets.build_paid(&route, Duration::ZERO, Some(slot))
        })
        .collect();
    let ids = frames[0].0..frames[frames.len() - 1].0 + 1;
    let mut link = hop.dial(&route);
    for (_, frame) in &frames {
        link.send(frame);
    }
    // Forwarded means released, and a batch is released only after its winners are on disk.
    let arrived = hop.wait_all(ids, Duration::from_secs(10));
    let won = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let won = metric(&relay, WON);
        (won >= KILL_TICKETS as f64).then_some(won)
    });
    let redeemed_before_kill = metric(&relay, REDEEMED);
    let account_before_kill = balance(&rt, &ledger, &relay.identity);
    let kill_at = unix_now();
    relay.proc.kill9();
    drop(link);
    eprintln!(
        "{arrived}/{KILL_TICKETS} packets through R, tickets won {won:?}; killed at {kill_at}, \
         key epoch {} retires at {} (redeemed before the kill: {redeemed_before_kill}, R's \
         account {account_before_kill})",
        route.epoch,
        retires_at(&route)
    );
    assert_eq!(
        arrived as u64,
        KILL_TICKETS,
        "packets lost\n{}",
        logs(&relay)
    );
    assert_eq!(won, Some(KILL_TICKETS as f64), "winners\n{}", logs(&relay));
    assert!(
        kill_at < retires_at(&route),
        "the test was too slow: the key epoch retired before the kill"
    );
    assert_eq!(
        redeemed_before_kill, 0.0,
        "R redeemed before its key retired"
    );
    assert_eq!(account_before_kill, 0, "R was paid before its key retired");

    // Restarted on the same state, R redeems every winner once its key epoch retires.
    relay.restart();
    let expected = KILL_TICKETS * KILL_FACE;
    let paid = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let paid = balance(&rt, &ledger, &relay.identity);
        (paid >= expected && metric(&relay, PENDING) == 0.0).then_some(paid)
    });
    let redeemed = metric(&relay, REDEEMED);
    let pot_after = rt
        .block_on(ledger_client(&ledger).pot(pot))
        .unwrap()
        .balance;
    eprintln!(
        "after the restart: R redeemed {redeemed} tickets, its account holds {paid:?} \
         (expected {expected}), the pot went from {pot_before} to {pot_after} ({:?} in all)",
        started.elapsed()
    );
    assert_eq!(paid, Some(expected), "R's account\n{}", logs(&relay));
    assert_eq!(redeemed, KILL_TICKETS as f64, "redeemed by the restarted R");
    assert_eq!(
        pot_before - pot_after,
        expected,
        "the pot paid exactly the winners"
    );

    // Once more: nothing left to redeem, nothing paid twice.
    relay.proc.kill9();
    relay.restart();
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        relay.metric(PENDING, "")
    });
    assert!(up.is_some(), "R did not come back\n{}", logs(&relay));
    // A few redeem intervals (1 s) on the restarted relay.
    std::thread::sleep(Duration::from_secs(4));
    let again = balance(&rt, &ledger, &relay.identity);
    let redeemed_again = metric(&relay, REDEEMED);
    let pending_again = metric(&relay, PENDING);
    eprintln!(
        "second restart: R's account {again}, redeemed {redeemed_again}, pending \
         {pending_again}; test took {:?}",
        started.elapsed()
    );
    assert_eq!(again, expected, "a winner was paid twice");
    assert_eq!(redeemed_again, 0.0, "settled winners were redeemed again");
    assert_eq!(pending_again, 0.0, "settled winners still pending");
    assert!(relay.proc.is_running(), "R died");
}

const NET_EPOCH_S: u64 = 10;
/// λ_M = 0: relays send no loop cover, so every packet a relay carries is the client's (and
/// paid for by it).
const NET_NETWORK: &str =
    "lambda_p = 30.0\nlambda_l = 1.0\nlambda_d = 1.0\nlambda_m = 0.0\nmu = 200.0\n";
/// Every relay's default price (`price_per_packet = 1`).
const PRICE: u64 = 1;
/// A ticket per 16 packets (or gateway frames) worth 16 in expectation, paying 32 when it
/// wins: half the tickets win, so a minute of traffic makes hundreds of winners per relay.
const PACKETS_PER_TICKET: u64 = 16;
const FACE: u64 = 32;
const TRAFFIC: Duration = Duration::from_secs(30);

/// What one relay counted and earned.
struct Income {
    name: String,
    carried: f64,
    tickets: f64,
    expected_value: f64,
    wins: f64,
    refused: f64,
    redeemed_metric: f64,
    redeemed: u64,
}

fn income(rt: &tokio::runtime::Runtime, ledger: &LedgerProc, relay: &RelayProc) -> Income {
    let m = |name: &str, labels: &str| relay.metric(name, labels).unwrap();
    let carried = if relay.client.is_some() {
        // A gateway carries the frames it forwards for its client and those it delivers to it
        // (the client pays for exactly those); the Sphinx packets it receives for the client
        // are the deliveries.
        m("murmur_relay_packets_received_total", "from=\"client\"")
            + m("murmur_relay_final_delivered_total", "to=\"client\"")
    } else {
        m("murmur_relay_packets_received_total", "") - m("murmur_relay_packets_dropped_total", "")
    };
    Income {
        name: relay.proc.name.clone(),
        carried,
        tickets: m("murmur_relay_tickets_accepted_total", ""),
        expected_value: m("murmur_relay_ticket_expected_value_total", ""),
        wins: m(WON, ""),
        refused: m("murmur_relay_tickets_refused_total", ""),
        redeemed_metric: m("murmur_relay_redeemed_value_total", ""),
        redeemed: balance(rt, ledger, &relay.identity),
    }
}

#[test]
fn each_relays_redeemed_value_matches_price_times_packets_carried() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let client_key = d.join("client").join("pot.key");
    let payer = murmur_tests::keygen(&murmur_tests::binary("murmur-relay"), &client_key);
    let ledger = start_ledger(d, &[(&payer, 100_000_000)]);
    let (infos, _authorities) =
        murmur_tests::start_authorities_with(d, 3, NET_EPOCH_S, NET_NETWORK);
    let common = format!(
        "[mixing]\nworkers = 1\nreplay_capacity = 200000\ndistinct_subnets = false\n\
         [payments]\nledger = \"{}\"\nredeem_interval = \"1s\"\npot_refresh = \"2s\"\n",
        ledger.url
    );
    // One gateway, one mix per layer, one exit: every packet of the client crosses each.
    let mut relays = vec![start_relay(
        d,
        "gateway",
        "[\"gateway\"]",
        &infos,
        NET_EPOCH_S,
        &common,
    )];
    for i in 0..3 {
        relays.push(start_relay(
            d,
            &format!("mix-{i}"),
            "[\"mix\"]",
            &infos,
            NET_EPOCH_S,
            &common,
        ));
    }
    let exit = format!(
        "{common}[exit]\nallow_private = true\nconnect_timeout = \"3s\"\npolicy = \"accept *:*\"\n"
    );
    relays.push(start_relay(
        d,
        "exit",
        "[\"exit\"]",
        &infos,
        NET_EPOCH_S,
        &exit,
    ));
    let (mut client, socks) = murmur_tests::start_client(
        d,
        &infos,
        &format!(
            "[payments]\nledger = \"{}\"\nkey_file = \"{}\"\nface_value = {FACE}\n\
             packets_per_ticket = {PACKETS_PER_TICKET}\n\
             gateway_frames_per_ticket = {PACKETS_PER_TICKET}\n\
             target_balance = 1000000\nlow_water = 100000\n",
            ledger.url,
            client_key.display()
        ),
    );
    eprintln!("network ready after {:?}", started.elapsed());

    // Traffic: downloads through the proxy for TRAFFIC, on top of the client's cover.
    let file = murmur_tests::test_bytes(100_000, 5);
    let server = murmur_tests::HttpServer::start(vec![("/file".into(), file.clone())]);
    let t = Instant::now();
    let mut downloads = 0;
    while t.elapsed() < TRAFFIC {
        let (code, body, err) = murmur_tests::curl(socks, &server.url("/file"), 30);
        assert_eq!(code, 0, "{err}\n{}", client.log_text());
        assert_eq!(body, file, "download corrupted");
        downloads += 1;
    }
    assert!(
        client.terminate(Duration::from_secs(15)),
        "client did not stop on SIGTERM"
    );
    let stopped_epoch = unix_now() / NET_EPOCH_S;
    eprintln!(
        "{downloads} downloads of 100 kB in {:?}; client stopped",
        t.elapsed()
    );
    for line in client.log_text().lines().filter(|l| l.contains("session")) {
        eprintln!("client: {line}");
    }

    // Every ticket's key epoch retires (one epoch of grace) and every winner is redeemed.
    let rt = runtime();
    let retired = (stopped_epoch + 2) * NET_EPOCH_S;
    let settled = wait_until(Duration::from_secs(90), Duration::from_millis(500), || {
        (unix_now() > retired + 2 && relays.iter().all(|r| r.metric(PENDING, "") == Some(0.0)))
            .then_some(())
    });
    assert!(
        settled.is_some(),
        "winners still pending: {:?}",
        relays
            .iter()
            .map(|r| r.metric(PENDING, ""))
            .collect::<Vec<_>>()
    );

    let mut failures = Vec::new();
    for relay in &relays {
        let i = income(&rt, &ledger, relay);
        let expected = PRICE as f64 * i.carried;
        // Redeemed = FACE × wins, wins ~ Binomial(tickets, p) with p the mean win probability
        // (expected value / face value) of the tickets it took.
        let p = if i.tickets > 0.0 {
            (i.expected_value / (i.tickets * FACE as f64)).min(1.0)
        } else {
            0.0
        };
        let sigma = FACE as f64 * (i.tickets * p * (1.0 - p)).sqrt();
        // Besides chance: what the client owed below one ticket's worth when it stopped
        // (PRICE × PACKETS_PER_TICKET), and 2% for packets the relay carried that the client
        // never paid: acknowledgements and replies still in flight when it stopped (it pays
        // for those only when they come back) and tickets in packets lost on the way.
        let bound = 4.0 * sigma + (PRICE * PACKETS_PER_TICKET) as f64 + 0.02 * expected;
        let diff = i.redeemed as f64 - expected;
        eprintln!(
            "{}: carried {}, expected {expected}, redeemed {} (relay's metric {}), tickets {} \
             (expected value {}, refused {}), wins {}, |diff| {:.0} ≤ bound {bound:.0} \
             (4σ = {:.0})",
            i.name,
            i.carried,
            i.redeemed,
            i.redeemed_metric,
            i.tickets,
            i.expected_value,
            i.refused,
            i.wins,
            diff.abs(),
            4.0 * sigma,
        );
        // Before chance: what the relay's accepted tickets are worth on average must match
        // its price × carried within the same slack (no σ), so mispricing cannot hide in
        // the binomial bound.
        let slack = (PRICE * PACKETS_PER_TICKET) as f64 + 0.02 * expected;
        let priced = (i.expected_value - expected).abs() <= slack;
        if diff.abs() > bound
            || !priced
            || i.refused > 0.0
            || i.redeemed as f64 != i.redeemed_metric
            || i.tickets == 0.0
        {
            failures.push(i.name);
        }
    }
    eprintln!("income test took {:?}", started.elapsed());
    assert!(failures.is_empty(), "out of bounds: {failures:?}");
}
