//! Payments between real processes: a `murmur-ledger`, authorities and relays on 127.0.0.1.
//!
//! - `kill -9`: a mix relay R takes N always-winning tickets (sent by this test over a relay
//!   link, with a fake next hop T); once R forwarded their packets the winners are on disk, R
//!   is killed before their key epoch retires, restarted, and redeems each exactly once.
//! - An impostor on the ledger's address answers every redemption `already_redeemed` (and
//!   every pot `unknown_pot`) with the ledger's error bodies but without its signature: R keeps
//!   its winners pending, counts the failures as `unauthenticated`, and once the real ledger
//!   answers redeems each exactly once.
//! - Income: in a network of relay processes carrying a paying client's traffic, each relay's
//!   redeemed value matches its price × the packets it carried, within a statistical bound.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use murmur_ledger::answer::{self, Exchange, SIGNATURE_HEADER};
use murmur_ledger::client::LedgerClient;
use murmur_ledger::request::{Fund, Signed};
use murmur_ledger::{Settlement, unix_now};
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::envelope::SlotTicket;
use murmur_protocol::ticket::{Ticket, TicketFields};
use murmur_tests::hop::{self, FakeHop, Packets, Route};
use murmur_tests::{
    AuthorityInfo, LedgerProc, Proc, RelayProc, Request, read_request, runtime, start_ledger,
    start_relay, wait_until,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

const WON: &str = "murmur_relay_tickets_won_total";
const REDEEMED: &str = "murmur_relay_tickets_redeemed_total";
const PENDING: &str = "murmur_relay_winners_pending";
const FAILURES: &str = "murmur_relay_redemption_failures_total";
const POT_LOOKUPS: &str = "murmur_relay_pot_lookups_total";
const REFUSED: &str = "murmur_relay_tickets_refused_total";

fn ledger_client(ledger: &LedgerProc) -> LedgerClient {
    ledger.client()
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

/// A mix relay R that takes payments, its authorities, a ledger holding a funded pot, a fake
/// next hop T, and what it takes to send R packets paid with always-winning tickets.
struct WinnerRig {
    dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    rng: ChaCha20Rng,
    pot_key: SigningKey,
    ledger: LedgerProc,
    authorities: Vec<AuthorityInfo>,
    _authority_procs: Vec<Proc>,
    relay: RelayProc,
    hop: Arc<FakeHop>,
    packets: Packets,
    /// The pot's balance once funded.
    pot_before: u64,
}

impl WinnerRig {
    /// Starts it all; `ledger_lines` gives the `ledger` and `ledger_key` lines of R's
    /// `[payments]` from the real ledger (pointing R at it, or at something else). R redeems
    /// and refreshes pots every second, retries within 2 s, and takes tickets redeemable a
    /// minute past its key's retirement (they are given 15 minutes).
    fn start(seed: u64, ledger_lines: impl FnOnce(&LedgerProc) -> String) -> WinnerRig {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let pot_key = SigningKey::generate(&mut rng);
        let pot = IdentityKey::of(&pot_key);
        let ledger = start_ledger(dir.path(), &[(&pot.to_hex(), 1_000_000)]);
        // The test's fake hop forwards nothing: authorities that test relays would leave it out.
        let (authorities, authority_procs) =
            murmur_tests::start_authorities_untesting(dir.path(), 3, KILL_EPOCH_S);
        let payments = format!(
            "[payments]\n{}redeem_interval = \"1s\"\npot_refresh = \"1s\"\n\
             redeem_backoff_max = \"2s\"\nmin_redeem_window = \"1m\"\n\
             unverified_tickets_per_pot = 100\n",
            ledger_lines(&ledger)
        );
        let relay = start_relay(
            dir.path(),
            "relay",
            "[\"mix\"]",
            &authorities,
            KILL_EPOCH_S,
            &payments,
        );
        let rt = runtime(1);
        let hop = Arc::new(FakeHop::start(&mut rng));
        hop.keep_uploading(&rt, &authorities, KILL_EPOCH_S);
        let packets = Packets {
            rng: ChaCha20Rng::seed_from_u64(seed + 1),
            next_id: 1,
        };
        // The pot: usable = min(balance, escrow / 2) covers every ticket's face value at once
        // (R refuses tickets beyond what the pot can pay on top of its pending winners). The
        // burst of winners comes before R has looked the pot up: R's allowance for a pot not
        // yet known is raised above the burst (`unverified_tickets_per_pot`).
        let funded = rt
            .block_on(ledger_client(&ledger).fund(Signed::new(
                Fund {
                    pot,
                    balance: 100 * KILL_FACE,
                    escrow: 200 * KILL_FACE,
                },
                &pot_key,
                unix_now(),
            )))
            .unwrap();
        WinnerRig {
            dir,
            rt,
            rng,
            pot_key,
            ledger,
            authorities,
            _authority_procs: authority_procs,
            relay,
            hop,
            packets,
            pot_before: funded.pot.balance,
        }
    }

    fn logs(&self) -> String {
        format!(
            "---- relay ----\n{}\n---- restarted ----\n{}\n---- ledger ----\n{}",
            self.relay.proc.log_text(),
            std::fs::read_to_string(self.relay.dir.join("relay-restarted.log")).unwrap_or_default(),
            self.ledger.proc.log_text()
        )
    }

    fn find_route(&self, within: Duration) -> Option<Route> {
        wait_until(within, Duration::from_millis(250), || {
            hop::current_route(
                &self.rt,
                &self.authorities,
                &self.relay.identity,
                &self.hop,
                KILL_EPOCH_S,
            )
        })
    }

    /// When R's key for the route's epoch retires (one epoch of grace).
    fn retires_at(r: &Route) -> u64 {
        (u64::from(r.epoch) + 2) * KILL_EPOCH_S
    }

    /// Once R forwards: a route whose key epoch retires at least `margin_s` from now.
    fn fresh_route(&mut self, margin_s: u64) -> Route {
        let first = self
            .find_route(Duration::from_secs(60))
            .unwrap_or_else(|| panic!("no consensus listing R and T\n{}", self.logs()));
        assert!(
            wait_forwarding(&first, &self.hop, &mut self.packets),
            "R forwards nothing\n{}",
            self.logs()
        );
        wait_until(Duration::from_secs(30), Duration::from_millis(250), || {
            self.find_route(Duration::from_secs(5))
                .filter(|r| Self::retires_at(r) >= unix_now() + margin_s)
        })
        .unwrap_or_else(|| panic!("no fresh route\n{}", self.logs()))
    }

    /// Sends `n` packets over `route`, each with a ticket for R worth `KILL_FACE` that
    /// always wins; returns how many reached T (forwarded means released, and R releases a
    /// batch only once its winners are on disk) and how many tickets R counted as won.
    fn send_winners(&mut self, route: &Route, n: u64) -> (u64, Option<f64>) {
        let now = unix_now();
        let frames: Vec<(u64, _)> = (0..n)
            .map(|_| {
                let ticket = Ticket::sign(
                    TicketFields {
                        recipient: route.relay,
                        face_value: KILL_FACE,
                        // always wins
                        win_ratio: u64::MAX,
                        nonce: self.rng.random(),
                        issued: now,
                        expiry: now + 900,
                        commitment: route.commitment,
                    },
                    &self.pot_key,
                );
                let slot = SlotTicket::from_ticket(&ticket).unwrap();
                self.packets.build_paid(route, Duration::ZERO, Some(slot))
            })
            .collect();
        let ids = frames[0].0..frames[frames.len() - 1].0 + 1;
        let mut link = self.hop.dial(route);
        for (_, frame) in &frames {
            link.send(frame);
        }
        let arrived = self.hop.wait_all(ids, Duration::from_secs(10)) as u64;
        let won = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
            let won = metric(&self.relay, WON);
            (won >= n as f64).then_some(won)
        });
        (arrived, won)
    }

    /// R's account at the real ledger.
    fn earned(&self) -> u64 {
        balance(&self.rt, &self.ledger, &self.relay.identity)
    }

    /// The pot's balance at the real ledger.
    fn pot_balance(&self) -> u64 {
        let pot = IdentityKey::of(&self.pot_key);
        self.rt
            .block_on(ledger_client(&self.ledger).pot(pot))
            .unwrap()
            .balance
    }
}

#[test]
fn winning_tickets_survive_kill_9_and_are_redeemed_once() {
    let started = Instant::now();
    let mut rig = WinnerRig::start(61, LedgerProc::payments_toml);

    // A route whose key epoch retires at least 8 s from now, so that sending, forwarding and
    // the kill all happen while R still holds the key (and so cannot have redeemed).
    let route = rig.fresh_route(8);
    let (arrived, won) = rig.send_winners(&route, KILL_TICKETS);
    let redeemed_before_kill = metric(&rig.relay, REDEEMED);
    let account_before_kill = rig.earned();
    let kill_at = unix_now();
    rig.relay.proc.kill9();
    eprintln!(
        "{arrived}/{KILL_TICKETS} packets through R, tickets won {won:?}; killed at {kill_at}, \
         key epoch {} retires at {} (redeemed before the kill: {redeemed_before_kill}, R's \
         account {account_before_kill})",
        route.epoch,
        WinnerRig::retires_at(&route)
    );
    assert_eq!(arrived, KILL_TICKETS, "packets lost\n{}", rig.logs());
    assert_eq!(won, Some(KILL_TICKETS as f64), "winners\n{}", rig.logs());
    assert!(
        kill_at < WinnerRig::retires_at(&route),
        "the test was too slow: the key epoch retired before the kill"
    );
    assert_eq!(
        redeemed_before_kill, 0.0,
        "R redeemed before its key retired"
    );
    assert_eq!(account_before_kill, 0, "R was paid before its key retired");

    // Restarted on the same state, R redeems every winner once its key epoch retires.
    rig.relay.restart();
    let expected = KILL_TICKETS * KILL_FACE;
    let paid = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        let paid = rig.earned();
        (paid >= expected && metric(&rig.relay, PENDING) == 0.0).then_some(paid)
    });
    let redeemed = metric(&rig.relay, REDEEMED);
    let pot_after = rig.pot_balance();
    eprintln!(
        "after the restart: R redeemed {redeemed} tickets, its account holds {paid:?} \
         (expected {expected}), the pot went from {} to {pot_after} ({:?} in all)",
        rig.pot_before,
        started.elapsed()
    );
    assert_eq!(paid, Some(expected), "R's account\n{}", rig.logs());
    assert_eq!(redeemed, KILL_TICKETS as f64, "redeemed by the restarted R");
    assert_eq!(
        rig.pot_before - pot_after,
        expected,
        "the pot paid exactly the winners"
    );

    // Once more: nothing left to redeem, nothing paid twice.
    rig.relay.proc.kill9();
    rig.relay.restart();
    let up = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        rig.relay.metric(PENDING, "")
    });
    assert!(up.is_some(), "R did not come back\n{}", rig.logs());
    // A few redeem intervals (1 s) on the restarted relay.
    std::thread::sleep(Duration::from_secs(4));
    let again = rig.earned();
    let redeemed_again = metric(&rig.relay, REDEEMED);
    let pending_again = metric(&rig.relay, PENDING);
    eprintln!(
        "second restart: R's account {again}, redeemed {redeemed_again}, pending \
         {pending_again}; test took {:?}",
        started.elapsed()
    );
    assert_eq!(again, expected, "a winner was paid twice");
    assert_eq!(redeemed_again, 0.0, "settled winners were redeemed again");
    assert_eq!(pending_again, 0.0, "settled winners still pending");
    assert!(rig.relay.proc.is_running(), "R died");
    drop(rig.dir);
}

/// Something on a ledger's address that is not the ledger. Until told to pass connections
/// through to the real ledger, it answers every redemption itself with the ledger's own
/// error body (`already_redeemed`), alternately without a signature and with a well-formed
/// one by another key; so too every pot lookup (`unknown_pot`) if `forge_pots`, which it
/// passes to the real ledger otherwise.
struct Impostor {
    url: String,
    forward: Arc<AtomicBool>,
    forged: Arc<AtomicUsize>,
}

impl Impostor {
    fn start(ledger: SocketAddr, forge_pots: bool) -> Impostor {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let imp = Impostor {
            url: format!("http://{}", listener.local_addr().unwrap()),
            forward: Arc::default(),
            forged: Arc::default(),
        };
        let (forward, forged) = (imp.forward.clone(), imp.forged.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if forward.load(Ordering::Relaxed) {
                    std::thread::spawn(move || pipe(stream, ledger));
                } else {
                    let forged = forged.clone();
                    std::thread::spawn(move || forge(stream, ledger, forge_pots, &forged));
                }
            }
        });
        imp
    }

    /// From now on, new connections reach the real ledger.
    fn step_aside(&self) {
        self.forward.store(true, Ordering::Relaxed);
    }
}

/// Answers one request as the impostor, or passes it to the real ledger at `to` (either way
/// the connection is closed after it, so the relay's next request comes on a new one).
fn forge(mut s: TcpStream, to: SocketAddr, forge_pots: bool, forged: &AtomicUsize) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let Some(Request {
        method,
        target,
        body: request,
    }) = read_request(&mut s)
    else {
        return;
    };
    if method == "GET" && !forge_pots {
        // One request with `connection: close`, so the ledger ends the exchange.
        let Ok(mut ledger) = TcpStream::connect(to) else {
            return;
        };
        let head = format!("GET {target} HTTP/1.1\r\nhost: ledger\r\nconnection: close\r\n\r\n");
        if ledger.write_all(head.as_bytes()).is_ok() {
            let _ = std::io::copy(&mut ledger, &mut s);
        }
        return;
    }
    let n = forged.fetch_add(1, Ordering::Relaxed);
    let (status, reason) = if method == "GET" {
        (404, "unknown_pot")
    } else {
        (409, "already_redeemed")
    };
    // The ledger's own error body (`murmur_ledger::ErrorBody`).
    let body = format!(r#"{{"reason":"{reason}","message":"not the ledger"}}"#).into_bytes();
    let mut head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        body.len()
    );
    if n % 2 == 1 {
        let signature = Exchange {
            method: &method,
            target: &target,
            request_digest: answer::digest(&request),
            status,
            answer_digest: answer::digest(&body),
        }
        .sign(&SigningKey::from_bytes(&[77; 32]));
        head += &format!("{SIGNATURE_HEADER}: {signature}\r\n");
    }
    head += "\r\n";
    let _ = s.write_all(head.as_bytes());
    let _ = s.write_all(&body);
}

/// Passes a connection through to the ledger at `to`, both ways.
fn pipe(client: TcpStream, to: SocketAddr) {
    let Ok(server) = TcpStream::connect(to) else {
        return;
    };
    let (Ok(mut c2), Ok(mut s2)) = (client.try_clone(), server.try_clone()) else {
        return;
    };
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut s2);
        let _ = s2.shutdown(std::net::Shutdown::Write);
    });
    let (mut client, mut server) = (client, server);
    let _ = std::io::copy(&mut server, &mut client);
    let _ = client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
}

const IMPOSTOR_TICKETS: u64 = 10;

#[test]
fn an_impostor_ledger_does_not_make_a_relay_drop_its_winners() {
    let started = Instant::now();
    let mut impostor = None;
    // R is told the real ledger's key, but the address answers as the impostor.
    let mut rig = WinnerRig::start(71, |ledger| {
        let imp = Impostor::start(ledger.addr, true);
        let lines = format!(
            "ledger = \"{}\"\nledger_key = \"{}\"\n",
            imp.url, ledger.identity
        );
        impostor = Some(imp);
        lines
    });
    let impostor = impostor.unwrap();
    let route = rig.fresh_route(4);
    let (arrived, won) = rig.send_winners(&route, IMPOSTOR_TICKETS);
    assert_eq!(arrived, IMPOSTOR_TICKETS, "packets lost\n{}", rig.logs());
    assert_eq!(
        won,
        Some(IMPOSTOR_TICKETS as f64),
        "winners\n{}",
        rig.logs()
    );

    // Once the key retires R redeems, and every answer is "already redeemed", unsigned or
    // signed by the wrong key: each winner fails, as unauthenticated, and stays pending.
    let failed = wait_until(Duration::from_secs(60), Duration::from_millis(500), || {
        (metric(&rig.relay, FAILURES) >= IMPOSTOR_TICKETS as f64).then_some(())
    });
    assert!(failed.is_some(), "R never tried to redeem\n{}", rig.logs());
    // A few more redeem passes (1 s, retries within 2 s) against the impostor.
    std::thread::sleep(Duration::from_secs(3));
    let m = |name: &str, labels: &str| rig.relay.metric(name, labels).unwrap_or(0.0);
    let (failures, pending, redeemed, already) = (
        m(FAILURES, "reason=\"unauthenticated\""),
        m(PENDING, ""),
        m(REDEEMED, ""),
        m(FAILURES, "reason=\"already_redeemed\""),
    );
    let (lookups_unauthenticated, lookups_unknown, refused_unknown) = (
        m(POT_LOOKUPS, "result=\"unauthenticated\""),
        m(POT_LOOKUPS, "result=\"unknown\""),
        m(REFUSED, "reason=\"pot_unknown\""),
    );
    let forged = impostor.forged.load(Ordering::Relaxed);
    eprintln!(
        "against the impostor ({forged} answers forged): {failures} unauthenticated \
         redemption failures, {already} already_redeemed, {pending} winners pending, {redeemed} \
         redeemed; pot lookups {lookups_unauthenticated} unauthenticated, {lookups_unknown} \
         unknown; tickets refused pot_unknown {refused_unknown}; R's account {}",
        rig.earned()
    );
    assert_eq!(already, 0.0, "an unsigned refusal was believed");
    assert_eq!(
        pending,
        IMPOSTOR_TICKETS as f64,
        "a winner was dropped\n{}",
        rig.logs()
    );
    assert!(
        failures >= 2.0 * IMPOSTOR_TICKETS as f64,
        "each winner failed, twice or more"
    );
    assert_eq!(
        failures,
        metric(&rig.relay, FAILURES),
        "every failure is unauthenticated"
    );
    assert_eq!(redeemed, 0.0);
    assert!(
        lookups_unauthenticated > 0.0,
        "R looked the pot up at the impostor"
    );
    assert_eq!(lookups_unknown, 0.0, "an unsigned unknown_pot was believed");
    assert_eq!(refused_unknown, 0.0);
    assert_eq!(rig.earned(), 0);

    // The real ledger answers from now on: every winner is paid, once.
    impostor.step_aside();
    let expected = IMPOSTOR_TICKETS * KILL_FACE;
    let paid = wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        let paid = rig.earned();
        (paid >= expected && metric(&rig.relay, PENDING) == 0.0).then_some(paid)
    });
    // A few more passes: nothing is paid twice.
    std::thread::sleep(Duration::from_secs(3));
    let (earned, redeemed, pot_after) = (
        rig.earned(),
        metric(&rig.relay, REDEEMED),
        rig.pot_balance(),
    );
    eprintln!(
        "after the impostor stepped aside: R redeemed {redeemed}, its account holds {earned} \
         (expected {expected}, reached {paid:?}), the pot went from {} to {pot_after}; test \
         took {:?}",
        rig.pot_before,
        started.elapsed()
    );
    assert_eq!(paid, Some(expected), "R's account\n{}", rig.logs());
    assert_eq!(earned, expected, "a winner was paid twice");
    assert_eq!(redeemed, IMPOSTOR_TICKETS as f64);
    assert_eq!(rig.pot_before - pot_after, expected);
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
    /// Packets it dropped (every reason).
    dropped: f64,
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
        dropped: m("murmur_relay_packets_dropped_total", ""),
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
        // The authorities' test packets are carried unpaid, and this test compares what each
        // relay carried with what it was paid: the authorities do not test relays here.
        murmur_tests::start_authorities_config(d, 3, NET_EPOCH_S, NET_NETWORK, "", false);
    let common = format!(
        "[mixing]\nworkers = 1\nreplay_capacity = 200000\ndistinct_subnets = false\n\
         [payments]\n{}redeem_interval = \"1s\"\npot_refresh = \"2s\"\n",
        ledger.payments_toml()
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
        "{common}[exit]\nallow_private = true\nallow_own_addresses = true\nconnect_timeout = \"3s\"\npolicy = \"accept *:*\"\n"
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
            "[payments]\n{}key_file = \"{}\"\nface_value = {FACE}\n\
             packets_per_ticket = {PACKETS_PER_TICKET}\n\
             gateway_frames_per_ticket = {PACKETS_PER_TICKET}\n\
             target_balance = 1000000\nlow_water = 100000\n",
            ledger.payments_toml(),
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
    let rt = runtime(1);
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

    let incomes: Vec<Income> = relays.iter().map(|r| income(&rt, &ledger, r)).collect();
    let dropped_in_all: f64 = incomes.iter().map(|i| i.dropped).sum();
    let mut failures = Vec::new();
    for i in incomes {
        let expected = PRICE as f64 * i.carried;
        // Redeemed = FACE × wins, wins ~ Binomial(tickets, p) with p the mean win probability
        // (expected value / face value) of the tickets it took.
        let p = if i.tickets > 0.0 {
            (i.expected_value / (i.tickets * FACE as f64)).min(1.0)
        } else {
            0.0
        };
        let sigma = FACE as f64 * (i.tickets * p * (1.0 - p)).sqrt();
        // Besides chance, what the relay carried and was never paid, in tickets' worth
        // (PRICE × PACKETS_PER_TICKET): what the client owed below one ticket when it stopped;
        // a ticket in the packets it had built ahead and never sent (its pacer's stocks, a
        // few packets: at most one ticket among them); a ticket in each packet another relay
        // dropped on the way. And 2% for acknowledgements and replies still in flight when
        // the client stopped (it pays for those only when they come back).
        let ticket = (PRICE * PACKETS_PER_TICKET) as f64;
        let lost_elsewhere = dropped_in_all - i.dropped;
        let slack = ticket * (2.0 + lost_elsewhere) + 0.02 * expected;
        let bound = 4.0 * sigma + slack;
        let diff = i.redeemed as f64 - expected;
        eprintln!(
            "{}: carried {}, expected {expected}, redeemed {} (relay's metric {}), tickets {} \
             (expected value {}, refused {}), wins {}, dropped {}, |diff| {:.0} ≤ bound \
             {bound:.0} (4σ = {:.0})",
            i.name,
            i.carried,
            i.redeemed,
            i.redeemed_metric,
            i.tickets,
            i.expected_value,
            i.refused,
            i.wins,
            i.dropped,
            diff.abs(),
            4.0 * sigma,
        );
        // Before chance: what the relay's accepted tickets are worth on average must match
        // its price × carried within the same slack (no σ), so mispricing cannot hide in
        // the binomial bound.
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
