//! Property tests for every codec and state machine in the packet layer and for payments.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_protocol::control::Control;
use murmur_protocol::directory::IdentityKey;
use murmur_protocol::envelope::{
    ENVELOPE_LEN, ENVELOPE_SLOTS, Envelope, EnvelopeKey, SLOT_CONTENT_LEN, SLOT_LEN, SlotSignature,
    SlotTicket, build_envelope, decode_slot_content, encode_slot_content, peel_in_place,
};
use murmur_protocol::fragment::{
    Assembled, Fragment, Reassembler, ReassemblyLimits, split_message,
};
use murmur_protocol::frame::{FRAME_LEN, Frame, MAX_CONTROL_LEN};
use murmur_protocol::hop::{self, Action, HopError, HopKey};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, Packet, PublicKey, ReplayTag, RouteHop, StaticSecret,
    build_packet, build_packet_with_envelope, build_packet_with_tags, recover_plaintext,
};
use murmur_protocol::payer::{PayeeInfo, Payer, PayerConfig};
use murmur_protocol::payload::{Content, FORWARD_FRAGMENT_DATA_LEN};
use murmur_protocol::replay::ReplayFilter;
use murmur_protocol::surb::{ReplyBlock, build_reply_block};
use murmur_protocol::tab::{Tab, TabConfig, Verdict};
use murmur_protocol::ticket::{CoSignature, Ticket, TicketFields, commitment_of};
use murmur_protocol::time::Instant;
use murmur_protocol::{Error, HEADER_SIZE, PACKET_SIZE, PAYLOAD_SIZE, PLAINTEXT_SIZE};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn keyed_route(rng: &mut ChaCha20Rng, hops: usize) -> (Vec<RouteHop>, Vec<StaticSecret>) {
    let secrets: Vec<StaticSecret> = (0..hops)
        .map(|_| StaticSecret::random_from_rng(&mut *rng))
        .collect();
    let mut route = Vec::new();
    for (i, s) in secrets.iter().enumerate() {
        let mut address = [0u8; 32];
        address[0] = i as u8 + 1;
        rand::Rng::fill_bytes(rng, &mut address[1..]);
        route.push(RouteHop {
            address: Address(address),
            sphinx_key: PublicKey::from(s),
        });
    }
    (route, secrets)
}

/// Walks a packet through `secrets`, checking each hop's routing; returns the final delivery.
fn walk(
    mut packet: Packet,
    route: &[RouteHop],
    secrets: &[StaticSecret],
    delays: &[Duration],
) -> murmur_protocol::packet::FinalDelivery {
    for (i, secret) in secrets.iter().enumerate() {
        let out = OpenedPacket::open(packet.as_bytes(), secret)
            .unwrap()
            .process(Duration::from_secs(3600))
            .unwrap();
        match out {
            HopOutput::Forward {
                next_hop,
                delay,
                packet: next,
                ..
            } => {
                assert!(i + 1 < secrets.len(), "forwarded past the last hop");
                assert_eq!(next_hop, route[i + 1].address);
                assert_eq!(delay.as_nanos(), delays[i].as_nanos());
                packet = next;
            }
            HopOutput::Final(d) => {
                assert_eq!(i + 1, secrets.len(), "delivered before the last hop");
                return d;
            }
        }
    }
    unreachable!("route ended without a final hop")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    #[test]
    fn packets_cross_random_four_hop_routes(
        seed: u64,
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_SIZE),
        delay_ms in proptest::collection::vec(0u64..10_000, 4),
        dest: [u8; 32],
        surb_id: [u8; 16],
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let delays: Vec<Duration> = delay_ms.iter().map(|&m| Duration::from_millis(m)).collect();
        let packet = build_packet(&mut rng, &route, &delays, Address(dest), surb_id, &plaintext).unwrap();
        prop_assert_eq!(packet.as_bytes().len(), PACKET_SIZE);
        let delivery = walk(packet, &route, &secrets, &delays);
        prop_assert_eq!(delivery.destination, Address(dest));
        prop_assert_eq!(delivery.surb_id, surb_id);
        prop_assert_eq!(recover_plaintext(&delivery.payload[..]).unwrap(), plaintext);
    }

    #[test]
    fn a_flipped_header_bit_is_rejected_at_the_hop_it_reaches(
        seed: u64,
        hop in 0usize..4,
        bit in 0usize..HEADER_SIZE * 8,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let delays = [Duration::ZERO; 4];
        let mut packet = build_packet(&mut rng, &route, &delays, Address([1; 32]), [0; 16], b"x").unwrap();
        for secret in &secrets[..hop] {
            match OpenedPacket::open(packet.as_bytes(), secret).unwrap().process(Duration::MAX).unwrap() {
                HopOutput::Forward { packet: next, .. } => packet = next,
                HopOutput::Final(_) => unreachable!(),
            }
        }
        let mut bytes = packet.as_bytes().to_vec();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let err = OpenedPacket::open(&bytes, &secrets[hop]).err();
        prop_assert!(
            matches!(err, Some(Error::HeaderMac | Error::NonCanonicalElement)),
            "bit {} at hop {}: {:?}", bit, hop, err
        );
    }

    #[test]
    fn surb_replies_round_trip(
        seed: u64,
        reply in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_SIZE),
        epoch: u32,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let (route, secrets) = keyed_route(&mut rng, 4);
        let delays = [Duration::from_millis(5); 4];
        let client = Address([0xc1; 32]);
        let (block, key) = build_reply_block(&mut rng, &route, &delays, client, epoch).unwrap();
        // The block travels inside a packet to its holder.
        let block = ReplyBlock::from_bytes(&block.to_bytes()).unwrap();
        prop_assert_eq!(block.first_hop(), route[0].address);
        let sent = block.use_block(&reply).unwrap();
        prop_assert_eq!(sent.key_epoch, epoch);
        prop_assert_eq!(sent.first_hop, route[0].address);
        let delivery = walk(sent.packet, &route, &secrets, &delays);
        prop_assert_eq!(delivery.destination, client);
        prop_assert_eq!(delivery.surb_id, key.surb_id());
        prop_assert_eq!(key.open(&delivery.payload[..]).unwrap(), reply);
    }

    #[test]
    fn fragments_reassemble_despite_loss_duplication_and_reordering(
        message in proptest::collection::vec(any::<u8>(), 0..20_000),
        // At least 20 bytes, so a 20 kB message fits in MAX_FRAGMENTS pieces.
        fragment_len in 20usize..3000,
        // For each fragment: how many copies arrive (0 = lost).
        copies in proptest::collection::vec(0usize..3, 1..=512),
        shuffle_seed: u64,
    ) {
        let fragments = split_message(77, &message, fragment_len).unwrap();
        prop_assume!(fragments.len() <= copies.len());
        let mut arrivals = Vec::new();
        for (f, &n) in fragments.iter().zip(&copies) {
            for _ in 0..n {
                arrivals.push(f.clone());
            }
        }
        let mut rng = ChaCha20Rng::seed_from_u64(shuffle_seed);
        rand::seq::SliceRandom::shuffle(&mut arrivals[..], &mut rng);
        let all_arrive = copies[..fragments.len()].iter().all(|&n| n > 0);
        let any_arrive = !arrivals.is_empty();

        let mut reassembler = Reassembler::new(ReassemblyLimits::default());
        let now = Instant::ZERO;
        let mut completed = Vec::new();
        for f in arrivals {
            // Each fragment survives its own encoding on the way.
            let mut bytes = Vec::new();
            f.encode_into(&mut bytes);
            let f = Fragment::decode(&bytes).unwrap();
            if let Assembled::Complete { message_id, message } = reassembler.insert(f, now).unwrap() {
                prop_assert_eq!(message_id, 77);
                completed.push(message);
            }
        }
        if all_arrive {
            prop_assert_eq!(completed, vec![message]);
            prop_assert_eq!(reassembler.partial_messages(), 0);
        } else {
            prop_assert!(completed.is_empty());
            let later = now + ReassemblyLimits::default().timeout;
            let expected: Vec<u64> = if any_arrive { vec![77] } else { vec![] };
            prop_assert_eq!(reassembler.expire(later), expected);
            prop_assert_eq!(reassembler.buffered_bytes(), 0);
        }
    }

    #[test]
    fn frames_round_trip(
        kind in 0u8..4,
        epoch: u32,
        address: [u8; 32],
        surb_id: [u8; 16],
        body in proptest::collection::vec(any::<u8>(), PAYLOAD_SIZE..=PACKET_SIZE),
        control in proptest::collection::vec(any::<u8>(), 0..=MAX_CONTROL_LEN),
        envelope in proptest::collection::vec(any::<u8>(), ENVELOPE_LEN),
    ) {
        let envelope = Envelope::from_slice(&envelope).unwrap();
        let packet = Packet::from_slice(&{
            let mut p = body.clone();
            p.resize(PACKET_SIZE, 3);
            p
        }).unwrap();
        let frame = match kind {
            0 => Frame::Packet { key_epoch: epoch, packet, envelope },
            1 => Frame::Forward { next_hop: Address(address), key_epoch: epoch, packet, envelope },
            2 => Frame::Deliver { surb_id, payload: Box::new(body[..PAYLOAD_SIZE].try_into().unwrap()) },
            _ => Frame::Control(control),
        };
        let bytes = frame.encode().unwrap();
        prop_assert_eq!(bytes.len(), FRAME_LEN);
        prop_assert_eq!(Frame::decode(&bytes[..]).unwrap(), frame);
    }

    #[test]
    fn frame_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), FRAME_LEN..=FRAME_LEN)) {
        let _ = Frame::decode(&bytes);
    }

    #[test]
    fn content_round_trips(
        seed: u64,
        kind in 0u8..4,
        message_id: u64,
        count in 1u16..=1024,
        index_frac in 0.0f64..1.0,
        data in proptest::collection::vec(any::<u8>(), 0..=FORWARD_FRAGMENT_DATA_LEN),
    ) {
        let index = ((count as f64 * index_frac) as u16).min(count - 1);
        let fragment = Fragment { message_id, index, count, data };
        let content = match kind {
            0 => {
                let mut rng = ChaCha20Rng::seed_from_u64(seed);
                let (route, _) = keyed_route(&mut rng, 4);
                let (ack, _) = build_reply_block(&mut rng, &route, &[Duration::ZERO; 4], Address([2; 32]), 9).unwrap();
                Content::DataWithAck { ack, fragment: fragment.clone() }
            }
            1 => Content::Data { fragment: fragment.clone() },
            2 => Content::Ack,
            _ => Content::Cover,
        };
        let bytes = content.encode().unwrap();
        prop_assert!(bytes.len() <= PLAINTEXT_SIZE);
        let decoded = Content::decode(&bytes).unwrap();
        match (content, decoded) {
            (Content::DataWithAck { ack: a, fragment: f }, Content::DataWithAck { ack: b, fragment: g }) => {
                prop_assert_eq!(a.to_bytes(), b.to_bytes());
                prop_assert_eq!(f, g);
            }
            (Content::Data { fragment: f }, Content::Data { fragment: g }) => prop_assert_eq!(f, g),
            (Content::Ack, Content::Ack) | (Content::Cover, Content::Cover) => {}
            (a, b) => prop_assert!(false, "{:?} decoded as {:?}", a, b),
        }
    }
}

#[test]
fn a_replayed_packet_is_flagged_even_after_the_filter_is_restored_from_disk() {
    let mut rng = ChaCha20Rng::seed_from_u64(11);
    let (route, secrets) = keyed_route(&mut rng, 4);
    let packet = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO; 4],
        Address([1; 32]),
        [0; 16],
        b"once",
    )
    .unwrap();
    let mut filter = ReplayFilter::new(100_000, 1e-6).unwrap();

    let first = OpenedPacket::open(packet.as_bytes(), &secrets[0]).unwrap();
    assert!(
        !filter.check_and_insert(&first.replay_tag()),
        "fresh packet"
    );
    let second = OpenedPacket::open(packet.as_bytes(), &secrets[0]).unwrap();
    assert!(
        filter.check_and_insert(&second.replay_tag()),
        "replay must be flagged"
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("replay.bin");
    std::fs::write(&path, filter.to_bytes()).unwrap();
    let mut restored = ReplayFilter::from_bytes(&std::fs::read(&path).unwrap()).unwrap();
    let third = OpenedPacket::open(packet.as_bytes(), &secrets[0]).unwrap();
    assert!(
        restored.check_and_insert(&third.replay_tag()),
        "restored filter forgot the tag"
    );

    // A different packet through the same hop is not a replay.
    let other = build_packet(
        &mut rng,
        &route,
        &[Duration::ZERO; 4],
        Address([1; 32]),
        [0; 16],
        b"once",
    )
    .unwrap();
    let other = OpenedPacket::open(other.as_bytes(), &secrets[0]).unwrap();
    assert!(!restored.check_and_insert(&other.replay_tag()));
}

#[test]
fn a_sealed_forward_payload_with_a_flipped_bit_fails_at_the_final_hop() {
    // Payloads are not authenticated hop by hop (Sphinx's design), but Lioness garbles the
    // whole block, so the final hop's padding check catches the change.
    let mut rng = ChaCha20Rng::seed_from_u64(12);
    let (route, secrets) = keyed_route(&mut rng, 4);
    let delays = [Duration::ZERO; 4];
    let packet = build_packet(
        &mut rng,
        &route,
        &delays,
        Address([1; 32]),
        [0; 16],
        b"payload",
    )
    .unwrap();
    let mut bytes = packet.as_bytes().to_vec();
    bytes[HEADER_SIZE + 1000] ^= 0x10;
    let delivery = walk(
        Packet::from_slice(&bytes).unwrap(),
        &route,
        &secrets,
        &delays,
    );
    assert!(matches!(
        recover_plaintext(&delivery.payload[..]),
        Err(Error::Payload(_))
    ));
}

// ---- payment: control messages, the payer, the gateway's tab ----

fn any_ticket() -> impl Strategy<Value = Ticket> {
    (
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(seed, recipient, face_value, win_ratio, nonce, issued, expiry, commitment)| {
                Ticket::sign(
                    TicketFields {
                        recipient: IdentityKey(recipient),
                        face_value,
                        win_ratio,
                        nonce,
                        issued,
                        expiry,
                        commitment,
                    },
                    &SigningKey::from_bytes(&seed),
                )
            },
        )
}

fn any_control() -> impl Strategy<Value = Control> {
    prop_oneof![
        any::<[u8; 32]>().prop_map(|a| Control::Hello {
            address: Address(a)
        }),
        any::<u32>().prop_map(|queued| Control::Welcome { queued }),
        any_ticket().prop_map(|ticket| Control::Payment { ticket }),
        (any_ticket(), proptest::collection::vec(any::<u8>(), 64)).prop_map(
            |(ticket, cosignature)| Control::CosignedPayment {
                ticket,
                cosignature: CoSignature(cosignature.try_into().unwrap()),
            }
        ),
        any::<u8>().prop_map(|reason| Control::PaymentRefused { reason }),
        Just(Control::Cutoff),
    ]
}

/// One step of a client's traffic: relay `relay` carried `packets` packets, then the client
/// asks for its ticket (as it does for each hop of each packet it builds).
#[derive(Clone, Debug)]
struct Carried {
    relay: usize,
    packets: u64,
}

fn carried_steps(relays: usize) -> impl Strategy<Value = Vec<Carried>> {
    proptest::collection::vec(
        (0..relays, 0u64..50).prop_map(|(relay, packets)| Carried { relay, packets }),
        0..120,
    )
}

fn payee(i: usize, price: u64) -> PayeeInfo {
    PayeeInfo {
        identity: IdentityKey([i as u8 + 1; 32]),
        price_per_packet: price,
        commitment: commitment_of(&[i as u8; 32]),
    }
}

#[derive(Clone, Debug)]
enum TabStep {
    Charge(u64),
    Credit(u64),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    #[test]
    fn control_messages_round_trip(c in any_control()) {
        let bytes = c.encode();
        prop_assert!(bytes.len() <= MAX_CONTROL_LEN);
        prop_assert_eq!(Control::decode(&bytes).unwrap(), c.clone());
        // And inside a frame, as they travel.
        let frame = Frame::Control(bytes).encode().unwrap();
        match Frame::decode(&frame[..]).unwrap() {
            Frame::Control(inner) => prop_assert_eq!(Control::decode(&inner).unwrap(), c),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn control_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..=MAX_CONTROL_LEN)) {
        if let Ok(c) = Control::decode(&bytes) {
            prop_assert_eq!(c.encode(), bytes, "control encoding is not canonical");
        }
    }

    /// Each relay's tickets are worth, in expectation, exactly `price × packets` it carried,
    /// less the remainder still owed; the remainder is below the threshold, and rounding the
    /// win ratio up overpays by at most one unit in all (the overpayment is credited to the
    /// next ticket, so it does not grow with the number of tickets).
    #[test]
    fn each_relay_is_paid_its_price_for_what_it_carried(
        seed: u64,
        prices in proptest::collection::vec(0u64..1_000, 1..6),
        packets_per_ticket in 1u64..200,
        gateway_frames_per_ticket in 1u64..50,
        // Above the largest debt a ticket can be asked for, so the face value never caps one.
        face_value in 250_000u64..1_000_000_000_000,
        steps in carried_steps(6),
        gateway_is_first: bool,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let config = PayerConfig {
            packets_per_ticket,
            gateway_frames_per_ticket,
            face_value,
            ..PayerConfig::default()
        };
        let mut payer = Payer::new(SigningKey::from_bytes(&[3; 32]), config, u64::MAX).unwrap();
        let relays: Vec<PayeeInfo> = prices.iter().enumerate().map(|(i, &p)| payee(i, p)).collect();
        // Relay 0 is the gateway when asked: paid in-band on its own threshold.
        let per_ticket = |i: usize| if gateway_is_first && i == 0 { gateway_frames_per_ticket } else { packets_per_ticket };
        let mut carried = vec![0u64; relays.len()];
        let mut paid = vec![0u128; relays.len()];
        let mut tickets = vec![0u64; relays.len()];
        let mut now = 1_000;
        for step in steps.iter().filter(|s| s.relay < relays.len()) {
            let relay = &relays[step.relay];
            payer.carried(relay.identity, step.packets);
            carried[step.relay] += step.packets;
            now += 1;
            let ticket = if gateway_is_first && step.relay == 0 {
                payer.gateway_payment(relay, now, &mut rng)
            } else {
                payer.ticket_for(relay, now, &mut rng)
            };
            if let Some(t) = ticket {
                prop_assert_eq!(t.recipient, relay.identity);
                prop_assert_eq!(t.commitment, relay.commitment);
                prop_assert_eq!(t.pot, payer.pot());
                prop_assert_eq!((t.issued, t.expiry), (now, now + config.ticket_lifetime_s));
                prop_assert!(t.face_value <= face_value);
                prop_assert_eq!(t.verify_signature(), Ok(()));
                paid[step.relay] += u128::from(t.expected_value());
                tickets[step.relay] += 1;
            }
        }
        for (i, relay) in relays.iter().enumerate() {
            let Some(account) = payer.account(&relay.identity) else {
                prop_assert_eq!(carried[i], 0);
                continue;
            };
            let accrued = u128::from(relay.price_per_packet) * u128::from(carried[i]);
            let owed = u128::from(account.owed());
            prop_assert_eq!((account.packets, account.unpriced), (carried[i], 0));
            prop_assert_eq!(account.accrued, accrued);
            prop_assert_eq!(account.issued, paid[i]);
            prop_assert_eq!(account.tickets, tickets[i]);
            if paid[i] <= accrued {
                prop_assert_eq!(paid[i], accrued - owed);
            } else {
                prop_assert_eq!(owed, 0);
                prop_assert!(paid[i] - accrued <= 1, "overpaid {} by more than a unit", relay.identity);
            }
            let threshold = u128::from(per_ticket(i)) * u128::from(relay.price_per_packet);
            prop_assert!(owed < threshold.max(1), "owes {} ≥ threshold {}", owed, threshold);
        }
        let stats = payer.stats();
        prop_assert_eq!(
            u128::from(stats.expected_value_issued),
            paid.iter().sum::<u128>()
        );
        prop_assert_eq!(
            stats.tickets_issued + stats.gateway_tickets_issued,
            tickets.iter().sum::<u64>()
        );
    }

    /// Whatever the debt, no ticket's face value exceeds what the payer believes the pot can
    /// cover, and the tickets' total expected value never exceeds the pot's usable amount.
    #[test]
    fn tickets_stay_within_the_pot(
        seed: u64,
        usable in 0u64..100_000,
        face_value in 1u64..1_000_000,
        prices in proptest::collection::vec(0u64..1_000, 1..4),
        steps in carried_steps(4),
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let config = PayerConfig { packets_per_ticket: 8, face_value, ..PayerConfig::default() };
        let mut payer = Payer::new(SigningKey::from_bytes(&[4; 32]), config, usable).unwrap();
        let relays: Vec<PayeeInfo> = prices.iter().enumerate().map(|(i, &p)| payee(i, p)).collect();
        let mut total = 0u64;
        for step in steps.iter().filter(|s| s.relay < relays.len()) {
            payer.carried(relays[step.relay].identity, step.packets);
            let before = payer.pot_usable();
            if let Some(t) = payer.ticket_for(&relays[step.relay], 0, &mut rng) {
                prop_assert!(t.face_value <= before.min(face_value));
                prop_assert!(t.expected_value() >= 1);
                total += t.expected_value();
                prop_assert_eq!(payer.pot_usable(), before - t.expected_value());
            }
        }
        prop_assert!(total <= usable);
    }

    /// The tab against a model in exact arithmetic: each credit is capped at the arrears
    /// limit's worth, the arrears are the model's debt, and the verdict is a cut-off exactly
    /// when they exceed `max_arrears`. A prepaid tab never runs into debt: a frame beyond its
    /// credit is refused, and the refused frames' worth past `max_arrears` cuts it off.
    #[test]
    fn the_tab_cuts_off_exactly_past_max_arrears(
        price in 0u64..1_000,
        max_arrears in 0u64..100_000,
        initial_credit in 0u64..100_000,
        prepaid: bool,
        steps in proptest::collection::vec(
            prop_oneof![
                (0u64..200).prop_map(TabStep::Charge),
                (0u64..100_000).prop_map(TabStep::Credit),
            ],
            0..200,
        ),
    ) {
        let config = TabConfig { price, max_arrears, initial_credit };
        let tab = if prepaid { Tab::prepaid(config) } else { Tab::new(config) };
        let Ok(mut tab) = tab else {
            prop_assert!(price > 0 && initial_credit + max_arrears < price);
            return Ok(());
        };
        let cap = i128::from(max_arrears.max(price));
        let max = i128::from(max_arrears);
        let mut balance = if prepaid { 0 } else { i128::from(initial_credit) };
        // Frames' worth refused since the tab was last within its limit.
        let mut streak = 0i128;
        for step in steps {
            let verdict = match step {
                TabStep::Charge(frames) => {
                    let amount = i128::from(frames) * i128::from(price);
                    let over = -balance > max;
                    let v = tab.charge(frames);
                    if over || (prepaid && amount > balance.max(0)) {
                        streak += amount;
                        prop_assert_eq!(
                            v,
                            if streak > max { Verdict::Cutoff } else { Verdict::Unpaid }
                        );
                    } else {
                        balance -= amount;
                        let cutoff = -balance > max || streak > max;
                        prop_assert_eq!(v, if cutoff { Verdict::Cutoff } else { Verdict::Serve });
                    }
                    v
                }
                TabStep::Credit(value) => {
                    balance += i128::from(value).min(cap);
                    tab.credit(value);
                    if -balance <= max {
                        streak = 0;
                    }
                    tab.verdict()
                }
            };
            let arrears = (-balance).max(0);
            prop_assert_eq!(i128::from(tab.arrears()), arrears);
            prop_assert_eq!(i128::from(tab.credit_left()), balance.max(0));
            let cutoff = arrears > max || streak > max;
            if let TabStep::Credit(_) = step {
                prop_assert_eq!(verdict, if cutoff { Verdict::Cutoff } else { Verdict::Serve });
            }
        }
    }

    /// Hostile amounts: nothing overflows, credit and arrears are never both positive, and
    /// the verdict still follows the arrears.
    #[test]
    fn the_tab_survives_hostile_amounts(
        price: u64,
        max_arrears: u64,
        initial_credit: u64,
        steps in proptest::collection::vec(
            prop_oneof![any::<u64>().prop_map(TabStep::Charge), any::<u64>().prop_map(TabStep::Credit)],
            0..64,
        ),
    ) {
        let Ok(mut tab) = Tab::new(TabConfig { price, max_arrears, initial_credit }) else {
            return Ok(());
        };
        for step in steps {
            let verdict = match step {
                TabStep::Charge(frames) => tab.charge(frames),
                TabStep::Credit(value) => {
                    tab.credit(value);
                    tab.verdict()
                }
            };
            prop_assert!(tab.arrears() == 0 || tab.credit_left() == 0);
            // Served only within the limit; past it, refused or cut off.
            if verdict == Verdict::Serve {
                prop_assert!(tab.arrears() <= max_arrears);
            }
        }
    }
}

// ---- payment envelopes ----

fn any_slot_ticket() -> impl Strategy<Value = SlotTicket> {
    (
        any::<[u8; 32]>(),
        any::<u64>(),
        any::<u64>(),
        any::<[u8; 16]>(),
        any::<u32>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 64),
        any::<bool>(),
    )
        .prop_map(
            |(pot, face_value, win_ratio, nonce, issued, expiry, signature, cosigned)| SlotTicket {
                pot: IdentityKey(pot),
                face_value,
                win_ratio,
                nonce,
                issued,
                expiry,
                signature: signature.try_into().unwrap(),
                signed_by: if cosigned {
                    SlotSignature::CoSignature
                } else {
                    SlotSignature::Ed25519
                },
            },
        )
}

/// One to four hops' slots, each a ticket or empty.
fn any_slots() -> impl Strategy<Value = Vec<Option<SlotTicket>>> {
    proptest::collection::vec(proptest::option::of(any_slot_ticket()), 1..=ENVELOPE_SLOTS)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// `hop::process` over random routes of 1 to 4 hops, delays, slots, payloads and
    /// destinations: each hop's outputs are what the packet's builder put in for it (the
    /// next hop; the delay, clamped to the hop's maximum, its lowest bit being the envelope
    /// flag; the ticket), the last hop delivers the destination, identifier and plaintext,
    /// and the same packet again at any hop is a replay.
    #[test]
    fn each_hop_step_returns_what_the_builder_put_in(
        seed: u64,
        slots in any_slots(),
        delay_nanos in proptest::collection::vec(0..20_000_000_000u64, ENVELOPE_SLOTS),
        plaintext in proptest::collection::vec(any::<u8>(), 0..=PLAINTEXT_SIZE),
        destination: [u8; 32],
        surb_id: [u8; 16],
        max_delay_ms in 1..30_000u64,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let hops = slots.len();
        let (route, secrets) = keyed_route(&mut rng, hops);
        let delays: Vec<Duration> =
            delay_nanos[..hops].iter().map(|&n| Duration::from_nanos(n)).collect();
        let (mut packet, mut envelope) = build_packet_with_envelope(
            &mut rng, &route, &delays, Address(destination), surb_id, &plaintext, &slots,
        ).unwrap();
        let max_delay = Duration::from_millis(max_delay_ms);
        for (i, secret) in secrets.iter().enumerate() {
            let key = HopKey { sphinx: secret, max_delay };
            let mut filter = ReplayFilter::new(16, 1e-6).unwrap();
            let out = hop::process(key, &packet, envelope.clone(), &mut filter).unwrap();
            prop_assert_eq!(out.slot, slots[i]);
            prop_assert_eq!(
                hop::process(key, &packet, envelope.clone(), &mut filter).err(),
                Some(HopError::Replay)
            );
            match out.action {
                Action::Forward { next_hop, delay, delay_clamped, packet: p, envelope: e } => {
                    prop_assert!(i + 1 < hops, "hop {} of {} forwarded", i, hops);
                    prop_assert_eq!(next_hop, route[i + 1].address);
                    let written = Duration::from_nanos(delay_nanos[i] & !1);
                    prop_assert_eq!(delay, written.min(max_delay));
                    prop_assert_eq!(delay_clamped, written > max_delay);
                    (packet, envelope) = (p, e);
                }
                Action::Deliver(d) => {
                    prop_assert_eq!(i + 1, hops);
                    prop_assert_eq!(d.destination, Address(destination));
                    prop_assert_eq!(d.surb_id, surb_id);
                    prop_assert_eq!(recover_plaintext(&d.payload[..]).unwrap(), plaintext.clone());
                }
            }
        }
    }
}

fn envelope_keys(rng: &mut ChaCha20Rng, hops: usize) -> Vec<EnvelopeKey> {
    (0..hops)
        .map(|_| {
            let mut tag = [0u8; 32];
            rand::Rng::fill_bytes(rng, &mut tag);
            EnvelopeKey::from_replay_tag(&ReplayTag(tag))
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Through real Sphinx processing: each hop derives its key from the replay tag it
    /// opens, peels as the delay flag says (the final hop always enforces) and reads exactly
    /// its slot.
    #[test]
    fn every_hop_of_a_real_packet_reads_exactly_its_slot(seed: u64, slots in any_slots()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let hops = slots.len();
        let (route, secrets) = keyed_route(&mut rng, hops);
        let delays = vec![Duration::from_millis(3); hops];
        let (mut packet, mut envelope) = build_packet_with_envelope(
            &mut rng, &route, &delays, Address([1; 32]), [0; 16], b"paid", &slots,
        ).unwrap();
        for (i, secret) in secrets.iter().enumerate() {
            let opened = OpenedPacket::open(packet.as_bytes(), secret).unwrap();
            let key = EnvelopeKey::from_replay_tag(&opened.replay_tag());
            match opened.process(Duration::MAX).unwrap() {
                HopOutput::Forward { envelope_authenticated, packet: next, .. } => {
                    prop_assert!(envelope_authenticated);
                    let peeled = envelope.peel(&key, envelope_authenticated).unwrap();
                    prop_assert_eq!(&peeled.ticket, &slots[i]);
                    envelope = peeled.next;
                    packet = next;
                }
                HopOutput::Final(_) => {
                    prop_assert_eq!(i + 1, hops);
                    prop_assert_eq!(&envelope.peel(&key, true).unwrap().ticket, &slots[i]);
                }
            }
        }
    }

    /// The same with keys alone, many more routes: by value and in place.
    #[test]
    fn envelopes_round_trip(seed: u64, slots in any_slots()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let keys = envelope_keys(&mut rng, slots.len());
        let mut envelope = build_envelope(&mut rng, &keys, &slots).unwrap();
        for (key, slot) in keys.iter().zip(&slots) {
            let mut bytes = *envelope.as_bytes();
            prop_assert_eq!(&peel_in_place(&mut bytes, key, true).unwrap(), slot);
            let peeled = envelope.peel(key, true).unwrap();
            prop_assert_eq!(&peeled.ticket, slot);
            prop_assert_eq!(&bytes, peeled.next.as_bytes());
            envelope = peeled.next;
        }
    }

    /// A hop that flips any bit of the envelope it forwards (its own output: later hops'
    /// slots, their MACs, the filler) is caught by the next hop; so is a flip on the link
    /// into the first hop.
    #[test]
    fn a_bit_flipped_after_any_hop_is_caught_by_the_next(
        seed: u64,
        slots in proptest::collection::vec(proptest::option::of(any_slot_ticket()), 2..=ENVELOPE_SLOTS),
        tamperer_frac in 0.0f64..1.0,
        bit in 0usize..ENVELOPE_LEN * 8,
    ) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let hops = slots.len();
        let keys = envelope_keys(&mut rng, hops);
        let mut envelope = build_envelope(&mut rng, &keys, &slots).unwrap();
        // The hop whose input is altered: 0 means the link into the first hop.
        let victim = ((tamperer_frac * hops as f64) as usize).min(hops - 1);
        for key in &keys[..victim] {
            envelope = envelope.peel(key, true).unwrap().next;
        }
        let mut bytes = *envelope.as_bytes();
        bytes[bit / 8] ^= 1 << (bit % 8);
        let tampered = Envelope::from_slice(&bytes).unwrap();
        prop_assert_eq!(tampered.peel(&keys[victim], true), Err(Error::EnvelopeMac));
        // A hop told not to enforce passes it on, reading nothing.
        prop_assert_eq!(tampered.peel(&keys[victim], false).unwrap().ticket, None);
    }

    #[test]
    fn slot_tickets_and_slot_content_round_trip(ticket in any_slot_ticket(), empty: bool) {
        // The 136 bytes do not say what the signature is: the slot's flag does.
        let decoded = SlotTicket::decode(&ticket.encode());
        prop_assert_eq!(SlotTicket { signed_by: ticket.signed_by, ..decoded }, ticket);
        let slot = (!empty).then_some(ticket);
        let content = encode_slot_content(slot.as_ref());
        prop_assert_eq!(decode_slot_content(&content), Ok(slot));
    }

    #[test]
    fn slot_content_that_decodes_is_canonical(
        bytes in proptest::collection::vec(any::<u8>(), SLOT_CONTENT_LEN),
        flag in 0u8..4,
        zero_tail: bool,
    ) {
        let mut content: [u8; SLOT_CONTENT_LEN] = bytes.try_into().unwrap();
        content[0] = flag;
        if zero_tail {
            // Most random contents fail on padding; make the padding valid half the time.
            let from = if flag == 0 { 1 } else { 137 };
            content[from..].fill(0);
        }
        match decode_slot_content(&content) {
            Ok(slot) => prop_assert_eq!(encode_slot_content(slot.as_ref()), content),
            Err(e) => prop_assert!(matches!(e, Error::EnvelopeFlag(_) | Error::EnvelopePadding), "{:?}", e),
        }
    }

    #[test]
    fn unauthenticated_peeling_never_fails(
        bytes in proptest::collection::vec(any::<u8>(), ENVELOPE_LEN),
        tag: [u8; 32],
    ) {
        let envelope = Envelope::from_slice(&bytes).unwrap();
        let key = EnvelopeKey::from_replay_tag(&ReplayTag(tag));
        let peeled = envelope.peel(&key, false).unwrap();
        prop_assert_eq!(peeled.ticket, None);
        // The bytes are transformed all the same: a hop's input and output do not match.
        prop_assert_ne!(&peeled.next.as_bytes()[..SLOT_LEN], &bytes[SLOT_LEN..2 * SLOT_LEN]);
        // Random bytes do not pass the MAC (2^-128).
        prop_assert_eq!(envelope.peel(&key, true), Err(Error::EnvelopeMac));
    }

    /// An envelope is bound to its packet: moved to another packet over the same route, the
    /// first hop refuses it.
    #[test]
    fn an_envelope_moved_to_another_packet_fails(seed: u64, slots in any_slots()) {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let hops = slots.len();
        let (route, secrets) = keyed_route(&mut rng, hops);
        let delays = vec![Duration::ZERO; hops];
        let build = |rng: &mut ChaCha20Rng| build_packet_with_envelope(
            rng, &route, &delays, Address([1; 32]), [0; 16], b"x", &slots,
        ).unwrap();
        let (_, envelope_a) = build(&mut rng);
        let (packet_b, envelope_b) = build(&mut rng);
        let opened = OpenedPacket::open(packet_b.as_bytes(), &secrets[0]).unwrap();
        let key = EnvelopeKey::from_replay_tag(&opened.replay_tag());
        prop_assert_eq!(envelope_a.peel(&key, true), Err(Error::EnvelopeMac));
        prop_assert_eq!(&envelope_b.peel(&key, true).unwrap().ticket, &slots[0]);
    }
}

#[test]
fn the_senders_hop_tags_are_the_tags_each_hop_opens() {
    let mut rng = ChaCha20Rng::seed_from_u64(21);
    for hops in 1..=5 {
        let (route, secrets) = keyed_route(&mut rng, hops);
        let built = build_packet_with_tags(
            &mut rng,
            &route,
            &vec![Duration::from_millis(1); hops],
            Address([1; 32]),
            [0; 16],
            b"tags",
        )
        .unwrap();
        assert_eq!(built.hop_tags.len(), hops);
        let mut packet = built.packet;
        for (i, secret) in secrets.iter().enumerate() {
            let opened = OpenedPacket::open(packet.as_bytes(), secret).unwrap();
            assert_eq!(opened.replay_tag(), built.hop_tags[i], "hop {i} of {hops}");
            if let HopOutput::Forward { packet: next, .. } = opened.process(Duration::MAX).unwrap()
            {
                packet = next;
            }
        }
    }
}

#[test]
fn the_envelope_flag_rides_in_the_delay_field() {
    let mut rng = ChaCha20Rng::seed_from_u64(22);
    let (route, secrets) = keyed_route(&mut rng, 4);
    // Odd nanoseconds: the flag bit must not depend on the delay's own lowest bit.
    let delays = [1, 2, 3, 4].map(|n| Duration::from_nanos(1_000_000 * n + n % 2));

    // A forward packet: every mix is told to enforce the envelope, and sees the delay with
    // the flag bit cleared.
    let mut packet =
        build_packet(&mut rng, &route, &delays, Address([1; 32]), [0; 16], b"f").unwrap();
    let mut mixes = 0;
    for (i, secret) in secrets.iter().enumerate() {
        match OpenedPacket::open(packet.as_bytes(), secret)
            .unwrap()
            .process(Duration::MAX)
            .unwrap()
        {
            HopOutput::Forward {
                envelope_authenticated,
                delay,
                packet: next,
                ..
            } => {
                assert!(envelope_authenticated, "forward packet, hop {i}");
                assert_eq!(delay.as_nanos(), delays[i].as_nanos() & !1);
                mixes += 1;
                packet = next;
            }
            HopOutput::Final(_) => assert_eq!(i, 3),
        }
    }
    assert_eq!(mixes, 3);

    // A SURB reply, with the random envelope its sender can only send: no mix enforces it,
    // each passes it on, and the final hop (which always enforces) finds it unpaid.
    let (block, _) = build_reply_block(&mut rng, &route, &delays, Address([2; 32]), 1).unwrap();
    let mut packet = block.use_block(b"reply").unwrap().packet;
    let mut envelope = Envelope::random(&mut rng);
    let mut mixes = 0;
    for (i, secret) in secrets.iter().enumerate() {
        let opened = OpenedPacket::open(packet.as_bytes(), secret).unwrap();
        let key = EnvelopeKey::from_replay_tag(&opened.replay_tag());
        match opened.process(Duration::MAX).unwrap() {
            HopOutput::Forward {
                envelope_authenticated,
                delay,
                packet: next,
                ..
            } => {
                assert!(!envelope_authenticated, "SURB reply, hop {i}");
                assert_eq!(delay.as_nanos(), delays[i].as_nanos() & !1);
                let peeled = envelope.peel(&key, envelope_authenticated).unwrap();
                assert_eq!(peeled.ticket, None);
                envelope = peeled.next;
                mixes += 1;
                packet = next;
            }
            HopOutput::Final(_) => {
                assert_eq!(i, 3);
                assert_eq!(envelope.peel(&key, true), Err(Error::EnvelopeMac));
            }
        }
    }
    assert_eq!(mixes, 3);
}
