//! The client session against an in-process network: real Sphinx processing at every hop,
//! a tiny exit that answers from the reply blocks it is given, packet loss, virtual time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use murmur_protocol::directory::path::PathRules;
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate};
use murmur_protocol::directory::{Consensus, IdentityKey, NetworkParams};
use murmur_protocol::fragment::Fragment;
use murmur_protocol::frame::Frame;
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, Packet, StaticSecret, recover_plaintext,
};
use murmur_protocol::payload::Content;
use murmur_protocol::session::{ClientSession, Event, SessionConfig};
use murmur_protocol::stream::{ClientItem, ClientMessage, ExitItem, ExitMessage, Refusal, Target};
use murmur_protocol::surb::ReplyBlock;
use murmur_protocol::time::Instant;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha20Rng;

struct Net {
    consensus: Arc<Consensus>,
    secrets: HashMap<Address, StaticSecret>,
    gateway: IdentityKey,
    exit: Address,
    client: Address,
    /// Reply blocks the exit holds, per session.
    surbs: HashMap<u64, Vec<ReplyBlock>>,
    /// What the exit answers to an open.
    answer: Vec<u8>,
    refuse_port: u16,
    loss: f64,
    rng: ChaCha20Rng,
    /// Deliveries for the client: (surb id, payload).
    inbox: Vec<([u8; 16], Vec<u8>)>,
    received_by_exit: Vec<u8>,
}

impl Net {
    fn new(seed: u64, loss: f64) -> Net {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let params = NetworkParams {
            lambda_p: 200.0,
            lambda_l: 2.0,
            lambda_d: 2.0,
            lambda_m: 0.0,
            mu: 1000.0,
            max_hop_delay_ms: 1000,
            epoch_length_s: 600,
        };
        let (consensus, keys) = generate(
            &mut rng,
            &SyntheticNetwork {
                mixes_per_layer: 3,
                gateways: 1,
                exits: 1,
                params,
                epoch: 9,
            },
        );
        let secrets = consensus
            .relays
            .iter()
            .zip(keys)
            .map(|(r, k)| (r.address(), k.sphinx))
            .collect();
        let gateway = consensus
            .relays
            .iter()
            .find(|r| r.roles.gateway)
            .unwrap()
            .identity;
        let exit = consensus
            .relays
            .iter()
            .find(|r| r.roles.exit)
            .unwrap()
            .address();
        Net {
            consensus: Arc::new(consensus),
            secrets,
            gateway,
            exit,
            client: Address([0xc1; 32]),
            surbs: HashMap::new(),
            answer: b"HTTP/1.0 200 OK\r\n\r\nhello from the exit".to_vec(),
            refuse_port: 22,
            loss,
            rng,
            inbox: Vec::new(),
            received_by_exit: Vec::new(),
        }
    }

    /// Carries a packet from `first` hop to its final hop, dropping it with the loss rate.
    fn carry(&mut self, mut at: Address, mut packet: Packet) {
        if self.rng.random::<f64>() < self.loss {
            return;
        }
        loop {
            let secret = &self.secrets[&at];
            match OpenedPacket::open(packet.as_bytes(), secret)
                .unwrap()
                .process(Duration::MAX)
                .unwrap()
            {
                HopOutput::Forward {
                    next_hop,
                    packet: p,
                    ..
                } => {
                    at = next_hop;
                    packet = p;
                }
                HopOutput::Final(d) => {
                    if d.destination == self.client {
                        self.inbox.push((d.surb_id, d.payload.to_vec()));
                    } else if at == self.exit && d.destination == self.exit {
                        self.exit_receives(&d.payload[..]);
                    }
                    return;
                }
            }
        }
    }

    fn send_reply(&mut self, session: u64, message: ExitMessage) {
        let block = self.surbs.get_mut(&session).and_then(|v| v.pop());
        let Some(block) = block else { return };
        let content = Content::Data {
            fragment: Fragment {
                message_id: self.rng.random(),
                index: 0,
                count: 1,
                data: message.encode().unwrap(),
            },
        };
        let reply = block.use_block(&content.encode().unwrap()).unwrap();
        self.carry(reply.first_hop, reply.packet);
    }

    fn exit_receives(&mut self, payload: &[u8]) {
        let content = Content::decode(&recover_plaintext(payload).unwrap()).unwrap();
        let Content::DataWithAck { ack, fragment } = content else {
            return; // cover
        };
        let reply = ack.use_block(&Content::Ack.encode().unwrap()).unwrap();
        self.carry(reply.first_hop, reply.packet);
        let msg = ClientMessage::decode(&fragment.data).unwrap();
        let mut answers = Vec::new();
        for item in msg.items {
            match item {
                ClientItem::Surbs(blocks) => {
                    self.surbs.entry(msg.session).or_default().extend(blocks)
                }
                ClientItem::Open { stream, target } => {
                    // A re-sent open (its answer was lost) gets the same answer again.
                    if target.port() == self.refuse_port {
                        answers.push(ExitItem::Refused {
                            stream,
                            reason: Refusal::NotAllowed,
                        });
                    } else {
                        answers.push(ExitItem::Opened { stream });
                        answers.push(ExitItem::Data {
                            stream,
                            offset: 0,
                            bytes: self.answer.clone(),
                        });
                        answers.push(ExitItem::Fin {
                            stream,
                            offset: self.answer.len() as u64,
                        });
                    }
                }
                ClientItem::Data {
                    bytes,
                    stream,
                    offset,
                } => {
                    self.received_by_exit.extend(bytes.iter());
                    answers.push(ExitItem::Ack {
                        stream,
                        offset: offset + bytes.len() as u64,
                    });
                }
                _ => {}
            }
        }
        if !answers.is_empty() {
            // Surbs arrive in the same message as the open, so answer after taking them.
            self.send_reply(msg.session, ExitMessage { items: answers });
        }
    }
}

/// Runs the session for `steps` ticks of 5 ms; returns the events.
fn drive(
    net: &mut Net,
    session: &mut ClientSession,
    rng: &mut ChaCha20Rng,
    mut now: Instant,
    steps: usize,
) -> (Vec<Event>, Instant) {
    let mut events = Vec::new();
    for _ in 0..steps {
        now = now + Duration::from_millis(5);
        while let Some(frame) = session.poll_transmit(now, rng) {
            let Frame::Forward {
                next_hop, packet, ..
            } = frame
            else {
                panic!("the client only sends Forward frames");
            };
            net.carry(next_hop, packet);
        }
        for (id, payload) in std::mem::take(&mut net.inbox) {
            session.handle_delivery(id, &payload, now, rng);
        }
        while let Some(e) = session.poll_event() {
            if let Event::Data(s, b) = &e {
                session.consumed(*s, b.len());
            }
            events.push(e);
        }
    }
    (events, now)
}

fn session_for(net: &Net, rng: &mut ChaCha20Rng) -> ClientSession {
    let mut config = SessionConfig::new(net.client);
    // At 40% loss per crossing a packet and its ack both arrive with probability 0.36, so
    // eight attempts fail 2.8% of the time; allow enough that the test never does.
    config.max_attempts = 40;
    config.ack_slack = Duration::from_millis(100);
    config.path_rules = PathRules::default();
    ClientSession::new(
        config,
        net.consensus.clone(),
        net.gateway,
        Instant::ZERO,
        rng,
    )
    .unwrap()
}

#[test]
fn a_stream_opens_carries_data_both_ways_and_ends() {
    let mut net = Net::new(1, 0.0);
    let mut rng = ChaCha20Rng::seed_from_u64(2);
    let mut session = session_for(&net, &mut rng);
    let id = session
        .open_stream(Target::Host("example.com".into(), 80), None, &mut rng)
        .unwrap();
    assert_eq!(session.write(id, b"GET / HTTP/1.0\r\n\r\n"), 18);
    session.close_stream(id);
    let (events, _) = drive(&mut net, &mut session, &mut rng, Instant::ZERO, 400);
    let data: Vec<u8> = events
        .iter()
        .filter_map(|e| match e {
            Event::Data(s, b) if *s == id => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(events.contains(&Event::Opened(id)), "{events:?}");
    assert_eq!(data, net.answer);
    assert!(events.contains(&Event::Eof(id)), "{events:?}");
    assert_eq!(net.received_by_exit, b"GET / HTTP/1.0\r\n\r\n");
    let stats = session.stats();
    assert!(stats.acks >= 1, "{stats:?}");
    assert!(stats.cover_sent > 0 && stats.loops_sent > 0, "{stats:?}");
    assert_eq!(stats.bad_replies, 0);
}

#[test]
fn refusals_reach_the_application() {
    let mut net = Net::new(3, 0.0);
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let mut session = session_for(&net, &mut rng);
    let id = session
        .open_stream(Target::Host("example.com".into(), 22), None, &mut rng)
        .unwrap();
    let (events, _) = drive(&mut net, &mut session, &mut rng, Instant::ZERO, 200);
    assert!(
        events.contains(&Event::Refused(id, Refusal::NotAllowed.socks_code())),
        "{events:?}"
    );
}

#[test]
fn lost_packets_are_resent_until_acknowledged() {
    let mut net = Net::new(5, 0.4);
    let mut rng = ChaCha20Rng::seed_from_u64(6);
    let mut session = session_for(&net, &mut rng);
    let id = session
        .open_stream(Target::Host("example.com".into(), 80), None, &mut rng)
        .unwrap();
    let upload: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    assert_eq!(session.write(id, &upload), upload.len());
    let (events, _) = drive(&mut net, &mut session, &mut rng, Instant::ZERO, 2000);
    assert!(session.stats().retransmits > 0);
    assert!(events.contains(&Event::Opened(id)), "{events:?}");
    // Every data byte reached the exit, in order (the test exit appends as items arrive, so
    // compare as a multiset of offsets: the stream layer reorders at the real exit).
    assert!(
        net.received_by_exit.len() >= upload.len(),
        "{} of {}",
        net.received_by_exit.len(),
        upload.len()
    );
}
