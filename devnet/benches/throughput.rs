//! The client's throughput through the local network, against the ceilings it could reach.
//!
//! ```sh
//! cargo bench -p murmur-devnet --bench throughput -- [--send-rate 400] [--hop-delay 0ms]
//!     [--download-mb 8] [--upload-mb 2] [--fetches 5]
//! ```
//!
//! In one run, on this machine:
//! 1. the CPU cost of each step a downloaded byte needs (building a reply block, the exit
//!    sealing a reply, a mix hop, a final hop, the client opening a reply; and for the
//!    upstream packet that carried the blocks, building it, which an upload's packets do
//!    with a SURB-ACK and a download's without), timed on one
//!    core while nothing else runs; from them, the **CPU ceiling**: what the machine's cores
//!    could carry if they did nothing but that work;
//! 2. the devnet, started exactly as `murmur-devnet` starts it with the same flags, in this
//!    process, and a target server on loopback;
//! 3. through the SOCKS5 proxy: time to first byte of small fetches, one bulk download and
//!    one bulk upload, each checked byte for byte;
//! 4. the client's own check of its send schedule (`/v1/status`, `send_timing`): a KS test of
//!    its inter-send gaps against the exponential distribution of the published rates.
//!
//! It prints each rate as a ratio of its CPU ceiling and of its λ_P bound (download: λ_P × the
//! reply blocks one upstream packet carries × a reply's data; upload: λ_P × a forward
//! packet's data).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use murmur_devnet::cli::Cli;
use murmur_protocol::exit::REPLY_DATA_LEN;
use murmur_protocol::frame::Frame;
use murmur_protocol::hop::{self, Action, HopKey};
use murmur_protocol::packet::{
    Address, HopOutput, OpenedPacket, PublicKey, ReplayTag, RouteHop, StaticSecret,
    build_packet_with_envelope,
};
use murmur_protocol::payload::{Content, FORWARD_FRAGMENT_DATA_LEN};
use murmur_protocol::session::reply_blocks::BLOCKS_PER_UNACKNOWLEDGED;
use murmur_protocol::stream::{CLIENT_MESSAGE_OVERHEAD, DATA_ITEM_OVERHEAD};
use murmur_protocol::surb::build_reply_block_with_id;
use murmur_protocol::{PAYLOAD_SIZE, fragment::Fragment};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser, Debug)]
struct Args {
    /// λ_P, the client's packets per second.
    #[arg(long, default_value_t = 100.0)]
    send_rate: f64,
    /// Mean per-hop delay (as `murmur-devnet --hop-delay`).
    #[arg(long, default_value = "15ms", value_parser = humantime::parse_duration)]
    hop_delay: Duration,
    #[arg(long, default_value_t = 8)]
    download_mb: u64,
    #[arg(long, default_value_t = 2)]
    upload_mb: u64,
    /// Small fetches timed for the time to first byte.
    #[arg(long, default_value_t = 5)]
    fetches: usize,
    /// Passed by `cargo bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cost = measure_costs();
    let ceiling = Ceiling::from(&cost, cores);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let through = runtime.block_on(through_the_network(&args))?;
    report(&args, cores, &cost, &ceiling, &through);
    Ok(())
}

/// CPU per step, in seconds, each timed on one core.
struct Costs {
    /// The client builds a reply block (three mixes and the gateway).
    reply_block: f64,
    /// The client builds a forward packet with its payment envelope, its SURB-ACK not included.
    forward_packet: f64,
    /// A mix's hop: open, replay check, process, peel the envelope, frame decode and encode.
    mix_hop: f64,
    /// A last hop: open, process, recover the plaintext (the exit, and the gateway for replies).
    final_hop: f64,
    /// The exit seals a reply into a block.
    use_block: f64,
    /// The client opens a reply.
    open_reply: f64,
}

/// Runs `f` for about `budget`; the mean seconds per call.
fn time_per_call(budget: Duration, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut calls = 0u32;
    while start.elapsed() < budget {
        f();
        calls += 1;
    }
    start.elapsed().as_secs_f64() / f64::from(calls.max(1))
}

fn measure_costs() -> Costs {
    let mut rng = rand::rng();
    let budget = Duration::from_millis(700);
    let secrets: Vec<StaticSecret> = (0..4)
        .map(|_| StaticSecret::random_from_rng(&mut rng))
        .collect();
    let hops: Vec<RouteHop> = secrets
        .iter()
        .enumerate()
        .map(|(i, s)| RouteHop {
            address: Address([i as u8 + 1; 32]),
            sphinx_key: PublicKey::from(s),
        })
        .collect();
    let delays = [Duration::from_millis(15); 4];
    let client = Address([9; 32]);
    let reply_block = time_per_call(budget, || {
        std::hint::black_box(
            build_reply_block_with_id(&mut rand::rng(), &hops, &delays, client, 1, [7; 16])
                .unwrap(),
        );
    });
    let (ack, _) = build_reply_block_with_id(&mut rng, &hops, &delays, client, 1, [7; 16]).unwrap();
    let content = Content::DataWithAck {
        ack,
        fragment: Fragment {
            message_id: 1,
            index: 0,
            count: 1,
            data: vec![0x5a; FORWARD_FRAGMENT_DATA_LEN],
        },
    }
    .encode()
    .unwrap();
    let forward_packet = time_per_call(budget, || {
        std::hint::black_box(
            build_packet_with_envelope(
                &mut rand::rng(),
                &hops,
                &delays,
                client,
                [0; 16],
                &content,
                &[None; 4],
            )
            .unwrap(),
        );
    });
    let (packet, envelope) = build_packet_with_envelope(
        &mut rng, &hops, &delays, client, [0; 16], &content, &[None; 4],
    )
    .unwrap();
    let frame = Frame::Packet {
        key_epoch: 1,
        packet: packet.clone(),
        envelope,
    }
    .encode()
    .unwrap();
    let mix_hop = time_per_call(budget, || {
        let Frame::Packet {
            key_epoch,
            packet,
            envelope,
        } = Frame::decode(&frame[..]).unwrap()
        else {
            unreachable!()
        };
        // The replay filter's lookup is a fraction of a microsecond (`--bench packet`).
        let mut fresh = |_: &ReplayTag| false;
        let key = HopKey {
            sphinx: &secrets[0],
            max_delay: Duration::MAX,
        };
        let Action::Forward {
            packet, envelope, ..
        } = hop::process(key, &packet, envelope, &mut fresh)
            .unwrap()
            .action
        else {
            unreachable!()
        };
        std::hint::black_box(
            Frame::Packet {
                key_epoch,
                packet,
                envelope,
            }
            .encode()
            .unwrap(),
        );
    });
    let mut last = packet;
    for s in &secrets[..3] {
        match OpenedPacket::open(last.as_bytes(), s)
            .unwrap()
            .process(Duration::MAX)
            .unwrap()
        {
            HopOutput::Forward { packet, .. } => last = packet,
            HopOutput::Final(_) => unreachable!(),
        }
    }
    let final_hop = time_per_call(budget, || {
        let opened = OpenedPacket::open(last.as_bytes(), &secrets[3]).unwrap();
        let HopOutput::Final(d) = opened.process(Duration::MAX).unwrap() else {
            unreachable!()
        };
        std::hint::black_box(
            murmur_protocol::packet::recover_plaintext(&d.payload[..PAYLOAD_SIZE]).unwrap(),
        );
    });
    let reply_plaintext = vec![0x33; murmur_protocol::PLAINTEXT_SIZE];
    let blocks: Vec<_> = (0..64)
        .map(|_| build_reply_block_with_id(&mut rng, &hops, &delays, client, 1, [7; 16]).unwrap())
        .collect();
    let start = Instant::now();
    let n = blocks.len();
    let mut replies: Vec<_> = blocks
        .into_iter()
        .map(|(block, key)| (block.use_block(&reply_plaintext).unwrap().packet, key))
        .collect();
    let use_block = start.elapsed().as_secs_f64() / n as f64;
    // The client opens a reply as the gateway delivers it: walk one through its four hops.
    let (mut reply, key) = replies.pop().unwrap();
    let mut delivered = None;
    for s in &secrets {
        match OpenedPacket::open(reply.as_bytes(), s)
            .unwrap()
            .process(Duration::MAX)
            .unwrap()
        {
            HopOutput::Forward { packet, .. } => reply = packet,
            HopOutput::Final(d) => delivered = Some(d),
        }
    }
    let delivered = delivered.unwrap();
    let open_reply = time_per_call(budget, || {
        std::hint::black_box(key.open(&delivered.payload[..PAYLOAD_SIZE]).unwrap());
    });
    Costs {
        reply_block,
        forward_packet,
        mix_hop,
        final_hop,
        use_block,
        open_reply,
    }
}

/// What the machine could carry doing nothing but the work of carrying it.
struct Ceiling {
    /// Reply blocks one upstream packet carries while a download runs.
    blocks_per_packet: usize,
    /// Download bytes in one reply, and upload bytes in one forward packet.
    reply_data: usize,
    forward_data: usize,
    /// CPU seconds per reply (its block, sealing it, three mixes, the gateway, opening it),
    /// per upstream packet of a download (reply blocks alone, without a SURB-ACK: building
    /// it, three mixes, the exit), and per upstream packet of an upload (building it and its
    /// SURB-ACK, three mixes, the exit, and its acknowledgement's way back).
    per_reply: f64,
    per_blocks_packet: f64,
    per_upstream: f64,
    download: f64,
    upload: f64,
}

impl Ceiling {
    fn from(c: &Costs, cores: usize) -> Ceiling {
        let blocks_per_packet = BLOCKS_PER_UNACKNOWLEDGED;
        // One stream: an exit message carries one data item; a client message one.
        let reply_data = REPLY_DATA_LEN;
        let forward_data = FORWARD_FRAGMENT_DATA_LEN - CLIENT_MESSAGE_OVERHEAD - DATA_ITEM_OVERHEAD;
        let way_back = c.use_block + 3.0 * c.mix_hop + c.final_hop + c.open_reply;
        let per_reply = c.reply_block + way_back;
        let per_blocks_packet = c.forward_packet + 3.0 * c.mix_hop + c.final_hop;
        let per_upstream = c.reply_block + per_blocks_packet + way_back;
        let cores = cores as f64;
        let k = blocks_per_packet as f64;
        Ceiling {
            blocks_per_packet,
            reply_data,
            forward_data,
            per_reply,
            per_blocks_packet,
            per_upstream,
            download: cores * k * reply_data as f64 / (k * per_reply + per_blocks_packet),
            upload: cores * forward_data as f64 / per_upstream,
        }
    }
}

/// What came through the proxy.
struct Through {
    ttfb: Vec<f64>,
    download_s: f64,
    download_ttfb_s: f64,
    upload_s: f64,
    /// The process's CPU seconds (all threads) during the download and the upload.
    download_cpu_s: f64,
    upload_cpu_s: f64,
    send_timing: Option<serde_json::Value>,
}

/// The process's user + system CPU seconds so far (Linux).
fn process_cpu_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return f64::NAN;
    };
    // Fields after the command name, which is in parentheses and may hold spaces.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return f64::NAN;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    match (ticks(11), ticks(12)) {
        (Some(u), Some(s)) => (u + s) / 100.0,
        _ => f64::NAN,
    }
}

/// The target server: a request is one byte, `D` or `U`, and a length (8 bytes, big
/// endian). `D`: it sends that many bytes of [`pattern`] and closes; `U`: it reads that many,
/// checks them, and answers one byte, `K` (or `X` if they differ).
async fn serve_target(listener: TcpListener) {
    while let Ok((mut socket, _)) = listener.accept().await {
        tokio::spawn(async move {
            let mut head = [0u8; 9];
            if socket.read_exact(&mut head).await.is_err() {
                return;
            }
            let n = u64::from_be_bytes(head[1..].try_into().unwrap_or_default());
            let mut buf = vec![0u8; 64 * 1024];
            let mut at = 0u64;
            match head[0] {
                b'D' => {
                    while at < n {
                        let take = (n - at).min(buf.len() as u64) as usize;
                        fill_pattern(at, &mut buf[..take]);
                        if socket.write_all(&buf[..take]).await.is_err() {
                            return;
                        }
                        at += take as u64;
                    }
                    let _ = socket.shutdown().await;
                }
                b'U' => {
                    let mut good = true;
                    let mut want = vec![0u8; buf.len()];
                    while at < n {
                        let Ok(got) = socket.read(&mut buf).await else {
                            return;
                        };
                        if got == 0 {
                            return;
                        }
                        fill_pattern(at, &mut want[..got]);
                        good &= buf[..got] == want[..got];
                        at += got as u64;
                    }
                    let _ = socket.write_all(if good { b"K" } else { b"X" }).await;
                }
                _ => {}
            }
        });
    }
}

/// Byte `i` of every transfer: not constant, so a misplaced chunk is caught.
fn fill_pattern(offset: u64, out: &mut [u8]) {
    for (i, b) in out.iter_mut().enumerate() {
        let x = offset + i as u64;
        *b = (x ^ (x >> 8) ^ (x >> 16)) as u8;
    }
}

/// A SOCKS5 CONNECT to `target` through `socks` (no authentication, an IPv4 address).
async fn socks_connect(socks: SocketAddr, target: SocketAddr) -> anyhow::Result<TcpStream> {
    let SocketAddr::V4(v4) = target else {
        bail!("the target must be IPv4");
    };
    let mut s = TcpStream::connect(socks).await?;
    s.set_nodelay(true)?;
    s.write_all(&[5, 1, 0]).await?;
    let mut choice = [0u8; 2];
    s.read_exact(&mut choice).await?;
    if choice != [5, 0] {
        bail!("the proxy chose method {choice:?}");
    }
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&v4.ip().octets());
    req.extend_from_slice(&v4.port().to_be_bytes());
    s.write_all(&req).await?;
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        bail!("SOCKS reply code {}", reply[1]);
    }
    Ok(s)
}

/// Downloads `n` bytes through `socks`, checking each; (seconds to the first byte, seconds
/// in all), both from before the SOCKS connection.
async fn download(socks: SocketAddr, target: SocketAddr, n: u64) -> anyhow::Result<(f64, f64)> {
    let start = Instant::now();
    let mut s = socks_connect(socks, target).await?;
    let mut head = vec![b'D'];
    head.extend_from_slice(&n.to_be_bytes());
    s.write_all(&head).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; buf.len()];
    let mut at = 0u64;
    let mut first = None;
    while at < n {
        let got = s.read(&mut buf).await?;
        if got == 0 {
            bail!("the download ended after {at} of {n} bytes");
        }
        first.get_or_insert_with(|| start.elapsed().as_secs_f64());
        fill_pattern(at, &mut want[..got]);
        if buf[..got] != want[..got] {
            bail!("the download differs near byte {at}");
        }
        at += got as u64;
    }
    Ok((first.unwrap_or_default(), start.elapsed().as_secs_f64()))
}

/// Uploads `n` bytes through `socks` and waits for the target's check; seconds in all.
async fn upload(socks: SocketAddr, target: SocketAddr, n: u64) -> anyhow::Result<f64> {
    let start = Instant::now();
    let mut s = socks_connect(socks, target).await?;
    let mut head = vec![b'U'];
    head.extend_from_slice(&n.to_be_bytes());
    s.write_all(&head).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0u64;
    while at < n {
        let take = (n - at).min(buf.len() as u64) as usize;
        fill_pattern(at, &mut buf[..take]);
        s.write_all(&buf[..take]).await?;
        at += take as u64;
    }
    let mut verdict = [0u8; 1];
    s.read_exact(&mut verdict).await?;
    if &verdict != b"K" {
        bail!("the target received different bytes");
    }
    Ok(start.elapsed().as_secs_f64())
}

/// A port free on loopback now (for the control endpoint, whose address the devnet does not
/// report).
fn free_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

async fn through_the_network(args: &Args) -> anyhow::Result<Through> {
    let target_listener = TcpListener::bind("127.0.0.1:0").await?;
    let target = target_listener.local_addr()?;
    tokio::spawn(serve_target(target_listener));
    let control = free_port()?;
    let relay_metrics = free_port()?;
    let cli = Cli::try_parse_from([
        "murmur-devnet".to_string(),
        "--socks".into(),
        "127.0.0.1:0".into(),
        "--control".into(),
        control.to_string(),
        "--relay-metrics".into(),
        relay_metrics.to_string(),
        "--send-rate".into(),
        args.send_rate.to_string(),
        "--hop-delay".into(),
        humantime::format_duration(args.hop_delay).to_string(),
    ])?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // Driven beside the measurement, not spawned: the devnet's future is not `Send`.
    let devnet = murmur_devnet::cli::run(
        cli,
        move |socks, _| {
            let _ = ready_tx.send(socks);
        },
        shutdown.clone(),
    );
    let measure = async {
        let measured = measure(args, target, control, relay_metrics, ready_rx).await;
        shutdown.cancel();
        measured
    };
    let (ran, measured) = tokio::join!(devnet, measure);
    if let Err(e) = ran {
        eprintln!("throughput: the devnet ended with an error: {e:#}");
    }
    measured
}

async fn measure(
    args: &Args,
    target: SocketAddr,
    control: SocketAddr,
    relay_metrics: SocketAddr,
    ready: tokio::sync::oneshot::Receiver<SocketAddr>,
) -> anyhow::Result<Through> {
    let socks = tokio::time::timeout(Duration::from_secs(180), ready)
        .await
        .context("the devnet was not ready within 180 s")??;
    eprintln!("throughput: devnet ready, SOCKS5 on {socks}");
    // The first stream also waits for routes and the pot: retried, not timed.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        match download(socks, target, 1000).await {
            Ok(_) => break,
            Err(e) if Instant::now() < deadline => {
                eprintln!("throughput: first fetch: {e}; again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e.context("no fetch succeeded within 120 s")),
        }
    }
    let mut ttfb = Vec::new();
    for _ in 0..args.fetches {
        ttfb.push(download(socks, target, 1000).await?.0);
    }
    let cpu = process_cpu_seconds();
    // The client's counters on stderr while the download runs, to see what limits it.
    let watch = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tick.tick().await;
            if let Ok(s) = status(control).await {
                eprintln!("throughput: client traffic {}", s["traffic"]);
                eprintln!("throughput: relays' drops {}", drops(relay_metrics).await);
            }
        }
    });
    let downloaded = download(socks, target, args.download_mb * 1_000_000).await;
    watch.abort();
    let (download_ttfb_s, download_s) = downloaded?;
    let download_cpu_s = process_cpu_seconds() - cpu;
    let cpu = process_cpu_seconds();
    let upload_s = upload(socks, target, args.upload_mb * 1_000_000).await?;
    let upload_cpu_s = process_cpu_seconds() - cpu;
    let status = status(control).await.ok();
    if let Some(s) = &status {
        // The whole status, for reading what limited the run.
        let path = std::env::temp_dir().join("murmur-throughput-status.json");
        if std::fs::write(&path, s.to_string()).is_ok() {
            eprintln!("throughput: the client's status is in {}", path.display());
        }
    }
    for (whose, addr) in [("client", control), ("relays", relay_metrics)] {
        if let Ok(text) = control_get(addr, "/metrics").await {
            let path = std::env::temp_dir().join(format!("murmur-throughput-{whose}.prom"));
            if std::fs::write(&path, text).is_ok() {
                eprintln!("throughput: {whose} metrics in {}", path.display());
            }
        }
    }
    let send_timing = status.and_then(|s| {
        let mut timing = s.get("send_timing").cloned()?;
        // Ticks that found no packet built leave gaps of their own in the schedule.
        if let (Some(t), Some(missed)) = (
            timing.as_object_mut(),
            s.pointer("/traffic/ticks_missed").cloned(),
        ) {
            t.insert("ticks_missed".into(), missed);
        }
        Some(timing)
    });
    Ok(Through {
        ttfb,
        download_s,
        download_ttfb_s,
        upload_s,
        download_cpu_s,
        upload_cpu_s,
        send_timing,
    })
}

/// The client's `/v1/status`, as JSON.
async fn status(control: SocketAddr) -> anyhow::Result<serde_json::Value> {
    Ok(serde_json::from_str(
        &control_get(control, "/v1/status").await?,
    )?)
}

/// The body of `path` at the client's control endpoint.
async fn control_get(control: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(control).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await?;
    let text = String::from_utf8_lossy(&answer);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("no HTTP body")?;
    Ok(body.to_string())
}

/// The relays' drop counters that are not zero, from their `/metrics` at `addr`.
async fn drops(addr: SocketAddr) -> String {
    let Ok(text) = control_get(addr, "/metrics").await else {
        return String::new();
    };
    text.lines()
        .filter(|l| !l.starts_with('#') && l.contains("drop") && !l.ends_with(" 0"))
        .collect::<Vec<_>>()
        .join("; ")
}

fn report(args: &Args, cores: usize, c: &Costs, ceiling: &Ceiling, t: &Through) {
    let us = |s: f64| s * 1e6;
    let mb = |bytes: f64| bytes / 1e6;
    println!(
        "# murmur throughput: λ_P = {}/s, hop delay {:?}, {cores} cores",
        args.send_rate, args.hop_delay
    );
    println!();
    println!(
        "CPU per step (one core, this run): reply block {:.0} µs, forward packet with envelope {:.0} µs, \
              mix hop {:.0} µs, final hop {:.0} µs, exit seals a reply {:.0} µs, client opens a reply {:.0} µs",
        us(c.reply_block),
        us(c.forward_packet),
        us(c.mix_hop),
        us(c.final_hop),
        us(c.use_block),
        us(c.open_reply)
    );
    println!(
        "per reply {:.0} µs, per upstream packet {:.0} µs of reply blocks and {:.0} µs of data; {} blocks per upstream packet, {} B per reply, {} B per forward packet",
        us(ceiling.per_reply),
        us(ceiling.per_blocks_packet),
        us(ceiling.per_upstream),
        ceiling.blocks_per_packet,
        ceiling.reply_data,
        ceiling.forward_data
    );
    let lambda = args.send_rate;
    let download_bound = lambda * (ceiling.blocks_per_packet * ceiling.reply_data) as f64;
    let upload_bound = lambda * ceiling.forward_data as f64;
    let down_bytes = (args.download_mb * 1_000_000) as f64;
    let up_bytes = (args.upload_mb * 1_000_000) as f64;
    let down = down_bytes / t.download_s;
    let up = up_bytes / t.upload_s;
    let mut ttfb = t.ttfb.clone();
    ttfb.sort_by(f64::total_cmp);
    let median = ttfb.get(ttfb.len() / 2).copied().unwrap_or(f64::NAN);
    println!();
    println!("| figure | measured | CPU ceiling | ratio | λ_P bound | ratio |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| download ({} MB) | {:.3} MB/s | {:.3} MB/s | {:.2} | {:.3} MB/s | {:.2} |",
        args.download_mb,
        mb(down),
        mb(ceiling.download),
        down / ceiling.download,
        mb(download_bound),
        down / download_bound
    );
    println!(
        "| upload ({} MB) | {:.3} MB/s | {:.3} MB/s | {:.2} | {:.3} MB/s | {:.2} |",
        args.upload_mb,
        mb(up),
        mb(ceiling.upload),
        up / ceiling.upload,
        mb(upload_bound),
        up / upload_bound
    );
    println!(
        "| time to first byte ({} fetches) | median {:.3} s (min {:.3}, max {:.3}); the download's {:.3} s | | | | |",
        ttfb.len(),
        median,
        ttfb.first().copied().unwrap_or(f64::NAN),
        ttfb.last().copied().unwrap_or(f64::NAN),
        t.download_ttfb_s
    );
    println!();
    println!(
        "process CPU: {:.1} s in the {:.1} s download ({:.2} of {cores} cores), {:.1} s in the {:.1} s upload ({:.2})",
        t.download_cpu_s,
        t.download_s,
        t.download_cpu_s / t.download_s,
        t.upload_cpu_s,
        t.upload_s,
        t.upload_cpu_s / t.upload_s
    );
    match &t.send_timing {
        Some(v) => println!("client send timing: {v}"),
        None => println!("client send timing: not reported"),
    }
}
