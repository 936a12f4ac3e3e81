//! A fake next hop T played by a test, and what a test needs to send packets to a real relay R
//! over a relay link: T publishes a signed descriptor (its own listener, its own Sphinx keys)
//! like any relay; once a consensus lists R and T, the test builds packets over [R, T], sends
//! them to R as relay-link frames and reads what R forwards on T's listener.

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ed25519_dalek::SigningKey;
use murmur_directory::client::DirectoryClient;
use murmur_directory::unix_now;
use murmur_protocol::directory::{
    DIRECTORY_SCHEMA, Descriptor, Epoch, EpochKey, ExitPolicy, IdentityKey, RelayAddresses, Roles,
    SignedDescriptor,
};
use murmur_protocol::envelope::SlotTicket;
use murmur_protocol::frame::{FRAME_LEN, Frame};
use murmur_protocol::link::LinkSecret;
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, PublicKey, RouteHop, StaticSecret, build_packet_with_envelope,
};
use rand_chacha::ChaCha20Rng;

use crate::{AuthorityInfo, wait_until};

/// The directory epoch `now` falls in.
pub fn epoch_now(epoch_s: u64) -> Epoch {
    Epoch::try_from(unix_now() / epoch_s).unwrap()
}

/// The fake next hop: an identity, one Sphinx secret published for every epoch, and a listener
/// that unwraps what arrives (T is the packets' last hop) and notes when each packet came.
pub struct FakeHop {
    pub identity: SigningKey,
    pub sphinx: StaticSecret,
    /// T's link key, published in its descriptor.
    pub link: LinkSecret,
    pub addr: SocketAddr,
    /// Packet id (from the final hop's SURB id field) → arrival times.
    arrivals: Arc<Mutex<HashMap<u64, Vec<Instant>>>>,
}

impl FakeHop {
    pub fn start(rng: &mut ChaCha20Rng) -> FakeHop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let hop = FakeHop {
            identity: SigningKey::generate(rng),
            sphinx: StaticSecret::random_from_rng(rng),
            link: LinkSecret::generate(rng),
            addr: listener.local_addr().unwrap(),
            arrivals: Arc::default(),
        };
        let (secret, arrivals) = (hop.sphinx.clone(), hop.arrivals.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (secret, arrivals) = (secret.clone(), arrivals.clone());
                std::thread::spawn(move || read_link(stream, &secret, &arrivals));
            }
        });
        hop
    }

    pub fn address(&self) -> Address {
        Address(self.identity.verifying_key().to_bytes())
    }

    /// T's descriptor as a relay uploads it: Sphinx keys for this and the next three epochs.
    pub fn descriptor(&self, epoch_s: u64) -> SignedDescriptor {
        let key = PublicKey::from(&self.sphinx).to_bytes();
        let e = epoch_now(epoch_s);
        let descriptor = Descriptor {
            schema: DIRECTORY_SCHEMA,
            identity: IdentityKey::of(&self.identity),
            family: "test-fake-next-hop".into(),
            addresses: RelayAddresses {
                mix: self.addr,
                client: None,
            },
            roles: Roles {
                mix: true,
                ..Roles::default()
            },
            link_key: self.link.public(),
            sphinx_keys: (e..e + 4)
                .map(|epoch| EpochKey {
                    epoch,
                    key,
                    payment_commitment: [0; 32],
                })
                .collect(),
            exit_policy: ExitPolicy::reject_all(),
            price_per_packet: 1,
            bandwidth: 1000,
            published: unix_now(),
        };
        SignedDescriptor::sign(&descriptor, &self.identity).unwrap()
    }

    /// Uploads T's descriptor on `rt` every quarter epoch, as a relay does.
    pub fn keep_uploading(
        self: &Arc<Self>,
        rt: &tokio::runtime::Runtime,
        authorities: &[AuthorityInfo],
        epoch_s: u64,
    ) {
        let urls: Vec<String> = authorities.iter().map(|a| a.url.clone()).collect();
        let uploader = self.clone();
        rt.spawn(async move {
            let client = DirectoryClient::new(Duration::from_secs(2)).unwrap();
            loop {
                let _ = client
                    .upload_descriptor(&urls, &uploader.descriptor(epoch_s))
                    .await;
                tokio::time::sleep(Duration::from_secs((epoch_s / 4).max(1))).await;
            }
        });
    }

    pub fn count(&self, id: u64) -> usize {
        self.arrivals.lock().unwrap().get(&id).map_or(0, Vec::len)
    }

    pub fn first_arrival(&self, id: u64) -> Option<Instant> {
        self.arrivals
            .lock()
            .unwrap()
            .get(&id)
            .and_then(|v| v.first().copied())
    }

    /// Waits until every id in `ids` arrived; returns how many did.
    pub fn wait_all(&self, ids: std::ops::Range<u64>, timeout: Duration) -> usize {
        let n = ids.end - ids.start;
        let arrived = || ids.clone().filter(|&id| self.count(id) > 0).count();
        wait_until(timeout, Duration::from_millis(20), || {
            (arrived() as u64 == n).then_some(())
        });
        arrived()
    }
}

/// Reads frames off one link into T, noting each test packet's arrival (anything else, such
/// as relay loop cover, is ignored).
fn read_link(
    stream: TcpStream,
    secret: &StaticSecret,
    arrivals: &Mutex<HashMap<u64, Vec<Instant>>>,
) {
    let mut reader = BufReader::with_capacity(64 * FRAME_LEN, stream);
    let mut buf = vec![0u8; FRAME_LEN];
    while reader.read_exact(&mut buf).is_ok() {
        let at = Instant::now();
        let id = match Frame::decode(&buf) {
            Ok(Frame::Packet { packet, .. }) => OpenedPacket::open(packet.as_bytes(), secret)
                .and_then(|o| o.process(Duration::MAX))
                .ok()
                .and_then(|out| match out {
                    HopOutput::Final(d) => {
                        Some(u64::from_be_bytes(d.surb_id[..8].try_into().ok()?))
                    }
                    HopOutput::Forward { .. } => None,
                }),
            _ => None,
        };
        if let Some(id) = id {
            arrivals.lock().unwrap().entry(id).or_default().push(at);
        }
    }
}

/// The route [R, T] for the epoch of the consensus in force.
#[derive(Clone)]
pub struct Route {
    pub epoch: Epoch,
    pub hops: [RouteHop; 2],
    pub destination: Address,
    /// R's identity and the payment commitment it published for `epoch`.
    pub relay: IdentityKey,
    pub commitment: [u8; 32],
}

/// One look at the directory: the route [R, T] if the consensus in force is for the current
/// epoch and lists both with Sphinx keys for it (R holds them until `key_grace` past it).
pub fn current_route(
    rt: &tokio::runtime::Runtime,
    authorities: &[AuthorityInfo],
    relay: &str,
    hop: &FakeHop,
    epoch_s: u64,
) -> Option<Route> {
    let r_id = IdentityKey::from_hex(relay).unwrap();
    let t_id = IdentityKey::of(&hop.identity);
    rt.block_on(async {
        let c = crate::fetch_consensus(authorities).await?;
        if c.epoch != epoch_now(epoch_s) {
            return None;
        }
        let r = c.relay(&r_id)?;
        let t = c.relay(&t_id)?.route_hop(c.epoch).ok()?;
        Some(Route {
            epoch: c.epoch,
            hops: [r.route_hop(c.epoch).ok()?, t],
            destination: hop.address(),
            relay: r_id,
            commitment: r.payment_commitment(c.epoch)?,
        })
    })
}

/// Builds packets with increasing ids (the final hop reads the id in the SURB-id field).
pub struct Packets {
    pub rng: ChaCha20Rng,
    pub next_id: u64,
}

impl Packets {
    /// A packet over `route` held `delay` by R, without tickets.
    pub fn build(&mut self, route: &Route, delay: Duration) -> (u64, Frame) {
        self.build_paid(route, delay, None)
    }

    /// As [`Packets::build`], with `ticket` (if any) in R's slot of the payment envelope.
    pub fn build_paid(
        &mut self,
        route: &Route,
        delay: Duration,
        ticket: Option<SlotTicket>,
    ) -> (u64, Frame) {
        let id = self.next_id;
        self.next_id += 1;
        let mut surb_id = [0u8; 16];
        surb_id[..8].copy_from_slice(&id.to_be_bytes());
        let (packet, envelope) = build_packet_with_envelope(
            &mut self.rng,
            &route.hops,
            &[delay, Duration::ZERO],
            route.destination,
            surb_id,
            b"murmur relay test",
            &[ticket, None],
        )
        .unwrap();
        let frame = Frame::Packet {
            key_epoch: route.epoch,
            packet,
            envelope,
        };
        (id, frame)
    }
}

/// A relay link to R.
pub struct Link(pub TcpStream);

impl Link {
    pub fn try_connect(to: SocketAddr) -> Option<Link> {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok()?;
        s.set_nodelay(true).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(Link(s))
    }

    pub fn connect(to: SocketAddr) -> Link {
        Link::try_connect(to).expect("R accepts relay links")
    }

    /// Sends one frame; returns when it was handed to the socket.
    pub fn send(&mut self, frame: &Frame) -> Instant {
        let bytes = frame.encode().unwrap();
        let at = Instant::now();
        self.0.write_all(&bytes[..]).unwrap();
        at
    }
}
