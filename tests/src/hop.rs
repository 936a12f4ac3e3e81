//! A fake next hop T played by a test, and what a test needs to send packets to a real relay R
//! over a relay link: T publishes a signed descriptor (its own listener, its own Sphinx and
//! link keys) like any relay; once a consensus lists R and T, the test builds packets over
//! [R, T], sends them to R over a Noise link proving T's link key (R serves only relays of the
//! consensus) and reads what R forwards on T's listener, which runs the listener's side of the
//! handshake with T's key as a relay does.

use std::collections::HashMap;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
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
use murmur_protocol::frame::Frame;
use murmur_protocol::link::{DIALER_HELLO_LEN, LinkPublic, LinkSecret};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, PublicKey, RouteHop, StaticSecret, build_packet_with_envelope,
};
use rand_chacha::ChaCha20Rng;

pub use crate::link::Link;
use crate::link::{FrameReader, accept_on, forged_answer};
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
    /// T's link key, published in its descriptor (and proven by its listener, unless T is an
    /// impostor).
    pub link: LinkSecret,
    pub addr: SocketAddr,
    /// Packet id (from the final hop's SURB id field) → arrival times.
    arrivals: Arc<Mutex<HashMap<u64, Vec<Instant>>>>,
    /// An impostor's record: handshakes dialers began, and bytes they sent after their first
    /// handshake message.
    impostor: Arc<(AtomicUsize, AtomicUsize)>,
}

impl FakeHop {
    pub fn start(rng: &mut ChaCha20Rng) -> FakeHop {
        FakeHop::listen(rng, false)
    }

    /// A man in the middle: it publishes one link key but its listener holds another, so it
    /// can never finish a dialer's handshake. It answers each dialer with a well-formed but
    /// forged answer and records what the dialer sends after its first message (a dialer that
    /// checks the key sends nothing).
    pub fn impostor(rng: &mut ChaCha20Rng) -> FakeHop {
        FakeHop::listen(rng, true)
    }

    fn listen(rng: &mut ChaCha20Rng, impostor: bool) -> FakeHop {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let hop = FakeHop {
            identity: SigningKey::generate(rng),
            sphinx: StaticSecret::random_from_rng(rng),
            link: LinkSecret::generate(rng),
            addr: listener.local_addr().unwrap(),
            arrivals: Arc::default(),
            impostor: Arc::default(),
        };
        let key = if impostor {
            LinkSecret::generate(rng)
        } else {
            hop.link.clone()
        };
        let (secret, arrivals, record) = (
            hop.sphinx.clone(),
            hop.arrivals.clone(),
            hop.impostor.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (secret, arrivals, record, key) = (
                    secret.clone(),
                    arrivals.clone(),
                    record.clone(),
                    key.clone(),
                );
                std::thread::spawn(move || {
                    if impostor {
                        play_impostor(stream, &key, &record);
                    } else {
                        read_link(stream, &key, &secret, &arrivals);
                    }
                });
            }
        });
        hop
    }

    /// For an impostor: handshakes begun, and bytes received after the dialers' first messages.
    pub fn impostor_record(&self) -> (usize, usize) {
        (
            self.impostor.0.load(Ordering::Relaxed),
            self.impostor.1.load(Ordering::Relaxed),
        )
    }

    /// A link to R (route's first hop) proving T's link key, a key in the consensus.
    pub fn try_dial(&self, route: &Route) -> Option<Link> {
        Link::try_connect(route.relay_mix, &self.link, &route.relay_link).ok()
    }

    pub fn dial(&self, route: &Route) -> Link {
        self.try_dial(route).expect("R accepts T's link")
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
            family_members: Vec::new(),
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
            chain_address: None,
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

/// Runs the listener's side of the handshake with T's key, then reads frames off the link into
/// T, noting each test packet's arrival (anything else, such as relay loop cover, is ignored).
fn read_link(
    mut stream: TcpStream,
    key: &LinkSecret,
    secret: &StaticSecret,
    arrivals: &Mutex<HashMap<u64, Vec<Instant>>>,
) {
    let Ok(transport) = accept_on(&mut stream, key) else {
        return;
    };
    let mut reader = FrameReader::new(stream, transport);
    while let Some(frame) = reader.next_frame() {
        let at = Instant::now();
        let id = match Frame::decode(&frame[..]) {
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

/// The impostor's side of one connection: read the dialer's first message, answer with a
/// forged one, count whatever the dialer sends after that until it closes.
fn play_impostor(mut stream: TcpStream, key: &LinkSecret, record: &(AtomicUsize, AtomicUsize)) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut hello = [0u8; DIALER_HELLO_LEN];
    if stream.read_exact(&mut hello).is_err() {
        return;
    }
    record.0.fetch_add(1, Ordering::Relaxed);
    if std::io::Write::write_all(&mut stream, &forged_answer(key)).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        record.1.fetch_add(n, Ordering::Relaxed);
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
    /// Where R listens for relay links and the link key it proves, from the consensus.
    pub relay_mix: SocketAddr,
    pub relay_link: LinkPublic,
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
            relay_mix: r.addresses.mix,
            relay_link: r.link_key,
        })
    })
}

/// Sends a fresh zero-delay packet over `route` every `gap`, on a link to R proving T's key
/// (dialed again whenever it is down, e.g. while R restarts), until one of them reaches T;
/// when the first did, or `None` after `within`.
pub fn probe(
    hop: &FakeHop,
    route: &Route,
    packets: &mut Packets,
    gap: Duration,
    within: Duration,
) -> Option<Instant> {
    let mut link: Option<Link> = None;
    let mut sent = Vec::new();
    wait_until(within, gap, || {
        if link.is_none() {
            link = hop.try_dial(route);
        }
        let (id, frame) = packets.build(route, Duration::ZERO);
        match link.as_mut().map(|l| l.try_send(&frame)) {
            Some(Ok(())) => sent.push(id),
            _ => link = None,
        }
        sent.iter().filter_map(|&id| hop.first_arrival(id)).min()
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

/// What the relay-link tests start from: three real authorities, one real mix R (its
/// `[mixing]` section given by the test), and a fake next hop T whose descriptor T uploads on
/// `rt` every quarter epoch, with packets to send over [R, T].
pub struct MixRig {
    pub rt: tokio::runtime::Runtime,
    pub authorities: Vec<AuthorityInfo>,
    pub authority_procs: Vec<crate::Proc>,
    pub relay: crate::RelayProc,
    pub hop: Arc<FakeHop>,
    pub packets: Packets,
    pub epoch_s: u64,
}

impl MixRig {
    /// Starts everything under `dir`; `mixing` holds the lines of R's `[mixing]` section. T is
    /// made from `rng`, which then draws the packets.
    pub fn start(
        dir: &std::path::Path,
        epoch_s: u64,
        mixing: &str,
        mut rng: ChaCha20Rng,
    ) -> MixRig {
        let (authorities, authority_procs) = crate::start_authorities_untesting(dir, 3, epoch_s);
        let relay = crate::start_relay(
            dir,
            "relay",
            "[\"mix\"]",
            &authorities,
            epoch_s,
            &format!("[mixing]\n{mixing}"),
        );
        let hop = Arc::new(FakeHop::start(&mut rng));
        let rt = crate::runtime(1);
        hop.keep_uploading(&rt, &authorities, epoch_s);
        MixRig {
            rt,
            authorities,
            authority_procs,
            relay,
            hop,
            packets: Packets { rng, next_id: 1 },
            epoch_s,
        }
    }

    /// R's logs (the restarted process's too) and the first authority's, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "---- relay ----\n{}\n---- restarted ----\n{}\n---- authority-0 ----\n{}",
            self.relay.proc.log_text(),
            std::fs::read_to_string(self.relay.dir.join("relay-restarted.log")).unwrap_or_default(),
            std::fs::read_to_string(self.authorities[0].dir.join("authority.log"))
                .unwrap_or_default()
        )
    }

    /// Waits for a consensus for the current epoch that lists R and `to` with Sphinx keys for
    /// it; the route [R, to] under that epoch's keys.
    pub fn route_to(&self, to: &FakeHop, within: Duration) -> Route {
        wait_until(within, Duration::from_millis(250), || {
            current_route(
                &self.rt,
                &self.authorities,
                &self.relay.identity,
                to,
                self.epoch_s,
            )
        })
        .unwrap_or_else(|| panic!("no consensus listing R within {within:?}\n{}", self.logs()))
    }

    /// Sends a fresh zero-delay packet every `gap` until one reaches T; when the first did, or
    /// `None` after `within`.
    pub fn probe(&mut self, route: &Route, gap: Duration, within: Duration) -> Option<Instant> {
        probe(&self.hop, route, &mut self.packets, gap, within)
    }

    /// Waits until R forwards over `route` (it holds a consensus listing T); how long it took.
    pub fn wait_forwarding(&mut self, route: &Route, within: Duration) -> Duration {
        let started = Instant::now();
        let ok = self.probe(route, Duration::from_millis(100), within);
        assert!(
            ok.is_some(),
            "R forwarded nothing within {within:?}\n{}",
            self.logs()
        );
        started.elapsed()
    }

    /// A sample of R's metrics (0 if absent).
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        self.relay.metric(name, labels).unwrap_or(0.0)
    }
}
