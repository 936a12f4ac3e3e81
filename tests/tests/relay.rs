//! One real `murmur-relay` process R (role mix) among three real authorities, and a fake next
//! hop T played by this test: T publishes a signed descriptor (its own listener, its own Sphinx
//! keys) like any relay, and once a consensus lists both, the test builds packets over the route
//! [R, T], sends them to R as relay-link frames and reads what R forwards on T's listener.
//!
//! - Hold times: ≥ 1,000 packets whose R-hop delays the test drew from Exp(μ) (seeded) are
//!   held by R for times that pass a Kolmogorov–Smirnov test against Exp(μ) at α = 0.01, and
//!   none leaves before its delay.
//! - Replays: one packet sent three times reaches T once (two replay drops counted); packets
//!   with one flipped header bit are not forwarded and are counted as `header_mac`.
//! - `kill -9`: after R forwarded N packets it is killed and restarted on the same state; it
//!   forwards fresh packets again and rejects all N when they are sent once more.
//! - Flood: many connections send R frames (copies of one valid packet, and garbage frames
//!   with a valid frame header) at more than ten times what R gets through; R's memory stays
//!   under a stated bound, the drops are counted, and fresh packets reach T again within 10 s
//!   of the flood's end.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use murmur_protocol::PACKET_SIZE;
use murmur_protocol::delay::ExpDelay;
use murmur_protocol::directory::Epoch;
use murmur_protocol::envelope::{ENVELOPE_LEN, Envelope};
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::packet::Packet;
use murmur_tests::hop::{self, MixRig, Route};
use murmur_tests::wait_until;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use statrs::distribution::Exp;
use statrs::stats_tests::NaNPolicy;
use statrs::stats_tests::ks_test::{KSOneSampleAlternativeMethod, ks_onesample};

const EPOCH_S: u64 = 10;
const DROPPED: &str = "murmur_relay_packets_dropped_total";

/// Mean R-hop delay of the hold-time packets: 1/μ with μ = 10 per second. Loopback, processing
/// and the fsync of replay tags add 1–2 ms to each hold, small against 100 ms.
const MEAN_DELAY: Duration = Duration::from_millis(100);
const KS_PACKETS: usize = 1000;
/// Gap between two hold-time packets: 250 packets/s, a few percent of R's capacity.
const KS_GAP: Duration = Duration::from_millis(4);
/// Packets R forwards before it is killed.
const CRASH_PACKETS: usize = 200;
const FLOOD: Duration = Duration::from_secs(6);
const FLOOD_CONNECTIONS: usize = 4;
/// R's resident memory must stay below this during the flood. Its queues hold at most
/// 8192 (input) + 8192 (processed) + 8192 (released) + 2000 (per peer) packets of ~2.4 KiB,
/// about 65 MiB; the three replay filters (200,000 tags each) take under 3 MiB; the flood
/// holds no packets for a delay (those are bounded separately, 100,000 by default).
const RSS_BOUND_KIB: u64 = 128 * 1024;

fn epoch_now() -> Epoch {
    hop::epoch_now(EPOCH_S)
}

/// The test network ([`MixRig`]: three authorities, R, and T) and the directory it lives in.
struct Net {
    _dir: tempfile::TempDir,
    rig: MixRig,
}

impl Deref for Net {
    type Target = MixRig;
    fn deref(&self) -> &MixRig {
        &self.rig
    }
}

impl DerefMut for Net {
    fn deref_mut(&mut self) -> &mut MixRig {
        &mut self.rig
    }
}

impl Net {
    fn start() -> Net {
        let dir = tempfile::tempdir().unwrap();
        // One Sphinx worker: the test seals every flood frame and R opens it (Noise), both on
        // the same two cores as R's workers, so a flood of ten times what two workers get
        // through would need more CPU than the machine has; ten times what one gets through
        // overwhelms R just the same.
        let rig = MixRig::start(
            dir.path(),
            EPOCH_S,
            "replay_capacity = 200000\nworkers = 1\n",
            ChaCha20Rng::seed_from_u64(4),
        );
        Net { _dir: dir, rig }
    }

    /// The route [R, T] of the consensus in force for the current epoch (R holds its keys
    /// until two epochs on).
    fn current_route(&self, within: Duration) -> Route {
        self.route_to(&self.hop, within)
    }

    fn dropped(&self, reason: &str) -> f64 {
        self.metric(DROPPED, &format!("reason=\"{reason}\""))
    }

    /// Waits until R has counted at least `n` drops for `reason`; returns the count.
    fn wait_dropped(&self, reason: &str, n: f64, within: Duration) -> f64 {
        wait_until(within, Duration::from_millis(100), || {
            let v = self.dropped(reason);
            (v >= n).then_some(v)
        })
        .unwrap_or_else(|| self.dropped(reason))
    }
}

#[test]
fn relay_holds_replays_crashes_and_floods() {
    let started = Instant::now();
    let mut net = Net::start();
    let route = net.current_route(Duration::from_secs(45));
    let first = net.wait_forwarding(&route, Duration::from_secs(15));
    eprintln!(
        "consensus for epoch {} lists R and T; R forwards ({:?} after the consensus, {:?} in all)",
        route.epoch,
        first,
        started.elapsed()
    );

    hold_times_follow_exp(&mut net);
    replays_and_flipped_bits_are_dropped(&mut net);
    replays_stay_rejected_after_kill_9(&mut net);
    flood_is_bounded_and_survived(&mut net);
    eprintln!("relay test done in {:?}", started.elapsed());
}

/// KS test of R's hold times against the Exp(μ) the delays were drawn from.
fn hold_times_follow_exp(net: &mut Net) {
    let route = net.current_route(Duration::from_secs(15));
    let mut rng = ChaCha20Rng::seed_from_u64(1);
    let delays = ExpDelay::with_mean(MEAN_DELAY)
        .unwrap()
        .sample_n(&mut rng, KS_PACKETS);
    let frames: Vec<(u64, Frame)> = delays
        .iter()
        .map(|&d| net.packets.build(&route, d))
        .collect();
    let mut link = net.hop.dial(&route);
    let t0 = Instant::now();
    let mut sent = Vec::with_capacity(KS_PACKETS);
    for (i, (_, frame)) in frames.iter().enumerate() {
        let due = t0 + KS_GAP * u32::try_from(i).unwrap();
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        sent.push(link.send(frame));
    }
    let ids = frames[0].0..frames[KS_PACKETS - 1].0 + 1;
    let arrived = net.hop.wait_all(ids, Duration::from_secs(15));
    assert_eq!(arrived, KS_PACKETS, "packets lost\n{}", net.logs());

    let mut holds = Vec::with_capacity(KS_PACKETS);
    let mut early = Vec::new();
    let mut excess = Vec::with_capacity(KS_PACKETS);
    for (((id, _), at), delay) in frames.iter().zip(&sent).zip(&delays) {
        let hold = net.hop.first_arrival(*id).unwrap() - *at;
        holds.push(hold.as_secs_f64());
        // R must never release a packet before its delay (1 ms for timer rounding).
        if hold + Duration::from_millis(1) < *delay {
            early.push((id, hold, *delay));
        }
        excess.push(hold.as_secs_f64() - delay.as_secs_f64());
    }
    excess.sort_by(f64::total_cmp);
    let exp = Exp::new(1.0 / MEAN_DELAY.as_secs_f64()).unwrap();
    let drawn: Vec<f64> = delays.iter().map(Duration::as_secs_f64).collect();
    let (d_drawn, _) = ks_onesample(
        drawn,
        &exp,
        KSOneSampleAlternativeMethod::TwoSidedAsymptotic,
        NaNPolicy::Error,
    )
    .unwrap();
    let n = holds.len();
    let mean_hold = holds.iter().sum::<f64>() / n as f64;
    let (d, p) = ks_onesample(
        holds,
        &exp,
        KSOneSampleAlternativeMethod::TwoSidedAsymptotic,
        NaNPolicy::Error,
    )
    .unwrap();
    let critical = 1.628 / (n as f64).sqrt();
    eprintln!(
        "hold times: n = {n}, μ = {:.1}/s, KS D = {d:.4} (p = {p:.3}; critical {critical:.4} at \
         α = 0.01; the drawn delays themselves: D = {d_drawn:.4}), mean hold {:.1} ms; \
         hold − drawn delay: median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        1.0 / MEAN_DELAY.as_secs_f64(),
        mean_hold * 1e3,
        excess[n / 2] * 1e3,
        excess[n * 99 / 100] * 1e3,
        excess[n - 1] * 1e3,
    );
    assert!(early.is_empty(), "released before their delay: {early:?}");
    assert!(
        d < critical,
        "hold times do not follow Exp(μ): D = {d:.4} ≥ {critical:.4}"
    );
}

fn replays_and_flipped_bits_are_dropped(net: &mut Net) {
    let route = net.current_route(Duration::from_secs(15));
    let replays_before = net.dropped("replay");
    let mac_before = net.dropped("header_mac");
    let mut link = net.hop.dial(&route);

    let (id, frame) = net.packets.build(&route, Duration::ZERO);
    for _ in 0..3 {
        link.send(&frame);
    }
    let replays = net.wait_dropped("replay", replays_before + 2.0, Duration::from_secs(10));

    // One bit of the header flipped: in the group element (low and top bit), the MAC and the
    // encrypted routing information.
    let flips = [(0usize, 0u8), (31, 7), (40, 2), (200, 5)];
    let mut flipped_ids = Vec::new();
    for (byte, bit) in flips {
        let (id, frame) = net.packets.build(&route, Duration::ZERO);
        link.send(&flip_bit(frame, Part::Packet, byte * 8 + usize::from(bit)));
        flipped_ids.push(id);
    }
    // One bit of the payment envelope flipped, as a dishonest hop before R would: R's layer
    // no longer verifies and R drops the packet.
    let envelope_before = net.dropped("envelope_mac");
    let mut tampered_ids = Vec::new();
    for bit in [0usize, 8 * 200 + 3, 8 * ENVELOPE_LEN - 1] {
        let (id, frame) = net.packets.build(&route, Duration::ZERO);
        link.send(&flip_bit(frame, Part::Envelope, bit));
        tampered_ids.push(id);
    }
    let envelope_drops = net.wait_dropped(
        "envelope_mac",
        envelope_before + 3.0,
        Duration::from_secs(10),
    );
    let macs = net.wait_dropped(
        "header_mac",
        mac_before + flips.len() as f64,
        Duration::from_secs(10),
    );
    // A fresh packet behind them on the same link: once it is through, so are they.
    let (last, frame) = net.packets.build(&route, Duration::ZERO);
    link.send(&frame);
    assert_eq!(net.hop.wait_all(last..last + 1, Duration::from_secs(10)), 1);
    std::thread::sleep(Duration::from_millis(300));
    eprintln!(
        "replay: a packet sent 3× reached T {} time(s), replay drops +{}; {} flipped-bit \
         packets: header_mac drops +{}, reached T: {}",
        net.hop.count(id),
        replays - replays_before,
        flips.len(),
        macs - mac_before,
        flipped_ids.iter().map(|&i| net.hop.count(i)).sum::<usize>()
    );
    assert_eq!(net.hop.count(id), 1, "a replayed packet is forwarded once");
    assert!(replays - replays_before >= 2.0, "replays counted");
    assert!(
        flipped_ids.iter().all(|&i| net.hop.count(i) == 0),
        "a packet with a flipped header bit was forwarded"
    );
    assert!(
        tampered_ids.iter().all(|&i| net.hop.count(i) == 0),
        "a packet with a tampered payment envelope was forwarded"
    );
    assert!(
        envelope_drops - envelope_before >= 3.0,
        "tampered envelopes counted as envelope_mac drops"
    );
    assert!(
        macs - mac_before >= flips.len() as f64,
        "flipped bits counted as header_mac"
    );
}

fn replays_stay_rejected_after_kill_9(net: &mut Net) {
    let route = net.current_route(Duration::from_secs(15));
    let frames: Vec<(u64, Frame)> = (0..CRASH_PACKETS)
        .map(|_| net.packets.build(&route, Duration::ZERO))
        .collect();
    let ids = frames[0].0..frames[CRASH_PACKETS - 1].0 + 1;
    let mut link = net.hop.dial(&route);
    for (_, f) in &frames {
        link.send(f);
    }
    // Forwarded means released, and a packet is released only once its tag is on disk.
    assert_eq!(
        net.hop.wait_all(ids.clone(), Duration::from_secs(15)),
        CRASH_PACKETS,
        "packets lost before the crash\n{}",
        net.logs()
    );
    drop(link);

    let killed = Instant::now();
    net.relay.proc.kill9();
    net.relay.restart();
    let back = net.wait_forwarding(&route, Duration::from_secs(20));
    assert!(
        route.epoch + 1 >= epoch_now(),
        "the test took too long: R no longer holds the key for epoch {}",
        route.epoch
    );
    let mut link = net.hop.dial(&route);
    for (_, f) in &frames {
        link.send(f);
    }
    let replays = net.wait_dropped("replay", CRASH_PACKETS as f64, Duration::from_secs(15));
    let (last, frame) = net.packets.build(&route, Duration::ZERO);
    link.send(&frame);
    assert_eq!(net.hop.wait_all(last..last + 1, Duration::from_secs(10)), 1);
    std::thread::sleep(Duration::from_millis(300));
    let again: Vec<u64> = ids.filter(|&id| net.hop.count(id) != 1).collect();
    eprintln!(
        "kill -9: {CRASH_PACKETS} packets forwarded, killed, restarted and forwarding again in \
         {back:?} ({:?} after the kill); resent: {} forwarded again, replay drops on the \
         restarted relay {replays}",
        killed.elapsed(),
        again.len()
    );
    assert!(again.is_empty(), "forwarded again after restart: {again:?}");
    assert!(replays >= CRASH_PACKETS as f64, "replays counted");
}

enum Part {
    Packet,
    Envelope,
}

/// `frame` (a relay-link packet) with bit `bit` of its Sphinx packet or its envelope flipped.
fn flip_bit(frame: Frame, part: Part, bit: usize) -> Frame {
    let Frame::Packet {
        key_epoch,
        mut packet,
        mut envelope,
    } = frame
    else {
        unreachable!()
    };
    match part {
        Part::Packet => {
            let mut bytes = packet.as_bytes().to_vec();
            bytes[bit / 8] ^= 1 << (bit % 8);
            packet = Packet::from_slice(&bytes).unwrap();
        }
        Part::Envelope => {
            let mut bytes = *envelope.as_bytes();
            bytes[bit / 8] ^= 1 << (bit % 8);
            envelope = Envelope::from_bytes(bytes);
        }
    }
    Frame::Packet {
        key_epoch,
        packet,
        envelope,
    }
}

fn flood_is_bounded_and_survived(net: &mut Net) {
    let route = net.current_route(Duration::from_secs(15));
    let (flood_id, valid) = net.packets.build(&route, Duration::ZERO);
    let valid = valid.encode().unwrap();
    // Garbage with a valid frame header and a canonical group element: R pays a
    // Diffie–Hellman for each before the MAC fails.
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    let mut buf = Vec::with_capacity(64 * FRAME_LEN);
    for i in 0..64 {
        if i % 2 == 0 {
            buf.extend_from_slice(&valid[..]);
        } else {
            let mut bytes = vec![0u8; PACKET_SIZE];
            rng.fill_bytes(&mut bytes);
            bytes[31] &= 0x7f;
            let garbage = Frame::Packet {
                key_epoch: route.epoch,
                packet: Packet::from_slice(&bytes).unwrap(),
                envelope: Envelope::random(&mut rng),
            };
            buf.extend_from_slice(&garbage.encode().unwrap()[..]);
        }
    }
    let buf = Arc::new(buf);
    let reasons = ["input_queue_full", "replay", "header_mac"];
    let before: Vec<f64> = reasons.iter().map(|r| net.dropped(r)).collect();
    let received_before = net.metric("murmur_relay_packets_received_total", "");
    let rss_before = net.relay.proc.rss_kib().unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let flooders: Vec<_> = (0..FLOOD_CONNECTIONS)
        .map(|_| {
            let (buf, stop, sent) = (buf.clone(), stop.clone(), sent.clone());
            let mut link = net.hop.dial(&route);
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if link.send_encoded(&buf).is_err() {
                        break;
                    }
                    sent.fetch_add(64, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let flood_start = Instant::now();
    let mut peak = rss_before;
    while flood_start.elapsed() < FLOOD {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(net.relay.proc.rss_kib().unwrap_or(0));
    }
    // What R's workers got through during the flood (every flood frame ends as a drop).
    let during: Vec<f64> = reasons.iter().map(|r| net.dropped(r)).collect();
    let flood_secs = flood_start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.join().unwrap();
    }
    let stopped = Instant::now();
    let offered = sent.load(Ordering::Relaxed) as f64 / flood_secs;
    let processed = (during[1] - before[1] + during[2] - before[2]) / flood_secs;

    // Fresh packets, one every 20 ms, until one gets through; then 100 more must all arrive.
    let recovered = net
        .probe(&route, Duration::from_millis(20), Duration::from_secs(10))
        .map(|at| at - stopped);
    let mut link = net.hop.dial(&route);
    let batch: Vec<(u64, Frame)> = (0..100)
        .map(|_| net.packets.build(&route, Duration::ZERO))
        .collect();
    for (_, f) in &batch {
        link.send(f);
    }
    let batch_ids = batch[0].0..batch[99].0 + 1;
    let batch_arrived = net.hop.wait_all(
        batch_ids,
        (stopped + Duration::from_secs(10)).saturating_duration_since(Instant::now()),
    );
    let all_by = stopped.elapsed();
    peak = peak.max(net.relay.proc.rss_kib().unwrap_or(0));
    let after: Vec<f64> = reasons.iter().map(|r| net.dropped(r)).collect();
    let received = net.metric("murmur_relay_packets_received_total", "") - received_before;
    eprintln!(
        "flood: {FLOOD_CONNECTIONS} connections for {flood_secs:.1} s offered {offered:.0} \
         frames/s; R's workers got through {processed:.0} frames/s (ratio {:.1}); R read \
         {received:.0} frames; drops: input_queue_full +{:.0}, replay +{:.0}, header_mac +{:.0}; \
         RSS {} MiB before, peak {} MiB (bound {} MiB); the flood's valid packet reached T {} \
         time(s); fresh packets through {:?} after the flood, 100 more all through ({}/100) \
         {all_by:?} after it",
        offered / processed.max(1.0),
        after[0] - before[0],
        after[1] - before[1],
        after[2] - before[2],
        rss_before / 1024,
        peak / 1024,
        RSS_BOUND_KIB / 1024,
        net.hop.count(flood_id),
        recovered,
        batch_arrived,
    );
    assert!(
        offered >= 10.0 * processed,
        "the flood was not 10× what R processes"
    );
    assert!(peak < RSS_BOUND_KIB, "R's memory grew to {peak} KiB");
    assert!(after[0] - before[0] > 0.0, "full-queue drops counted");
    assert!(
        after[1] - before[1] > 0.0 && after[2] - before[2] > 0.0,
        "replay and MAC drops counted"
    );
    assert_eq!(
        net.hop.count(flood_id),
        1,
        "the flooded packet went out once"
    );
    assert!(
        recovered.is_some_and(|d| d < Duration::from_secs(10)),
        "R did not forward within 10 s of the flood's end\n{}",
        net.logs()
    );
    assert_eq!(batch_arrived, 100, "R lost fresh packets after the flood");
    assert!(net.relay.proc.is_running(), "R died in the flood");
}
