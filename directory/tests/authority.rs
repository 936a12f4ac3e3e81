//! One authority in-process on 127.0.0.1:0 with two-second epochs: it refuses bad uploads
//! with clear, counted 4xx answers, produces a consensus on its own (a set of one), stops on
//! its shutdown future, and after a restart still holds its descriptors and consensus.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::{Duration, Instant};

use murmur_directory::client::DirectoryClient;
use murmur_directory::config::AuthorityEntry;
use murmur_directory::{Config, Error, keys, unix_now};
use murmur_protocol::directory::synthetic::{SyntheticNetwork, generate, signed_descriptors};
use murmur_protocol::directory::{ConsensusStore, NetworkParams, SignedDescriptor, encode};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const EPOCH_S: u64 = 2;

fn config(dir: &Path, identity: String, port: u16) -> Config {
    let mut c = Config::with_defaults();
    c.key_file = dir.join("authority.key");
    c.state_dir = dir.join("state");
    c.clock_skew = Duration::from_secs(1);
    c.schedule.epoch_length = Duration::from_secs(EPOCH_S);
    c.schedule.vote_lead = Duration::from_millis(1000);
    c.schedule.compute_lead = Duration::from_millis(500);
    c.limits.peer_timeout = Duration::from_secs(1);
    // The relays here are generated descriptors with no process behind them: nothing to
    // test, so every one is voted in unmeasured (the process tests cover the prober).
    c.probe.enabled = false;
    c.authorities = vec![AuthorityEntry {
        identity,
        url: format!("http://127.0.0.1:{port}"),
    }];
    c.validate().unwrap();
    c
}

struct Running {
    url: String,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<murmur_directory::Result<()>>,
}

async fn start(dir: &Path, identity: &str) -> Running {
    start_with(dir, identity, |_| {}).await
}

async fn start_with(dir: &Path, identity: &str, tweak: impl FnOnce(&mut Config)) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    let mut config = config(dir, identity.to_owned(), port);
    tweak(&mut config);
    let task = tokio::spawn(murmur_directory::serve(config, listener, async move {
        let _ = stopped.await;
    }));
    Running {
        url: format!("http://127.0.0.1:{port}"),
        stop,
        task,
    }
}

async fn stop(r: Running) {
    r.stop.send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), r.task)
        .await
        .expect("the authority stops within 10 s of its shutdown future");
    result.unwrap().unwrap();
}

async fn metrics(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn status(e: Error) -> u16 {
    match e {
        Error::Status { status, .. } => status,
        other => panic!("expected an HTTP status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_authority_end_to_end_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let identity = keys::keygen(&dir.path().join("authority.key")).unwrap();
    let running = start(dir.path(), &identity.to_hex()).await;
    let urls = vec![running.url.clone()];
    let client = DirectoryClient::new(Duration::from_secs(2)).unwrap();

    let now = unix_now();
    let epoch = u32::try_from(now / EPOCH_S).unwrap();
    let net = SyntheticNetwork {
        mixes_per_layer: 2,
        gateways: 1,
        exits: 1,
        params: NetworkParams::nym_like(),
        epoch,
    };
    let (generated, relay_keys) = generate(&mut ChaCha20Rng::seed_from_u64(1), &net);
    let epochs: Vec<u32> = (epoch..epoch + 4).collect();
    let descriptors = signed_descriptors(&generated, &relay_keys, &epochs, now).unwrap();
    for d in &descriptors {
        for r in client.upload_descriptor(&urls, d).await {
            r.unwrap();
        }
    }
    // The same again is fine; an older one is stale.
    client.upload_descriptor(&urls, &descriptors[0]).await[0]
        .as_ref()
        .unwrap();
    let older = signed_descriptors(&generated, &relay_keys, &epochs, now - 1).unwrap();
    let e = client.upload_descriptor(&urls, &older[0]).await.remove(0);
    assert_eq!(status(e.unwrap_err()), 409);

    // Garbage, a tampered body, and an oversized body: each a clear 4xx, each counted.
    let http = reqwest::Client::new();
    let post = |body: Vec<u8>| {
        http.post(format!("{}/v1/descriptor", running.url))
            .body(body)
            .send()
    };
    let garbage = post(b"not a descriptor".to_vec()).await.unwrap();
    assert_eq!(garbage.status(), 400);
    assert!(garbage.text().await.unwrap().contains("invalid"));
    let mut tampered: SignedDescriptor = descriptors[1].clone();
    tampered.body[5] ^= 1;
    let tampered = post(encode(&tampered).unwrap()).await.unwrap();
    assert_eq!(tampered.status(), 400);
    assert!(tampered.text().await.unwrap().contains("tampered"));
    let huge = post(vec![0; murmur_directory::MAX_DESCRIPTOR_BYTES + 1])
        .await
        .unwrap();
    assert_eq!(huge.status(), 413);
    let bad_epoch = http
        .get(format!("{}/v1/consensus/soon", running.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_epoch.status(), 400);

    let m = metrics(&running.url).await;
    for line in [
        "murmur_directory_descriptors_accepted_total 8",
        "murmur_directory_descriptors_rejected_total{reason=\"stale\"} 1",
        "murmur_directory_descriptors_rejected_total{reason=\"document_malformed\"} 1",
        "murmur_directory_descriptors_rejected_total{reason=\"body_tampered\"} 1",
        "murmur_directory_requests_refused_total{reason=\"too_large\"} 1",
        "murmur_directory_descriptors_held 8",
    ] {
        assert!(m.contains(line), "missing {line:?} in\n{m}");
    }

    // A set of one authority signs alone. Wait (bounded) for a consensus with every relay.
    let mut store = ConsensusStore::new(
        murmur_protocol::directory::AuthoritySet::new(vec![identity]).unwrap(),
        1,
    );
    let deadline = Instant::now() + Duration::from_secs(4 * EPOCH_S + 4);
    loop {
        let _ = client.refresh(&urls, &mut store, unix_now()).await;
        if store
            .held()
            .is_some_and(|v| v.consensus.relays.len() == descriptors.len())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no consensus with every relay in time"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let held = store.current(unix_now()).unwrap().consensus.clone();
    let mixes = held.relays.iter().filter(|r| r.layer.is_some()).count();
    assert_eq!(mixes, 6);
    let text = reqwest::get(format!("{}/v1/consensus/latest.json", running.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(json["epoch"].as_u64().unwrap() >= u64::from(held.epoch));
    assert_eq!(json["signers"][0], identity.to_hex());
    assert!(
        metrics(&running.url)
            .await
            .contains("murmur_directory_consensus_computed_total")
    );

    // Stop; restart on the same state directory: descriptors and the consensus survive.
    stop(running).await;
    let again = start(dir.path(), &identity.to_hex()).await;
    let m = metrics(&again.url).await;
    assert!(m.contains("murmur_directory_descriptors_held 8"), "{m}");
    let doc = client.fetch_consensus(&again.url).await.unwrap();
    assert!(store.offer(doc, unix_now()).is_ok());
    stop(again).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_capped_and_idle_ones_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let identity = keys::keygen(&dir.path().join("authority.key")).unwrap();
    let running = start_with(dir.path(), &identity.to_hex(), |c| {
        c.limits.max_connections = 1;
        c.limits.idle_timeout = Duration::from_millis(400);
    })
    .await;
    let addr = running.url.trim_start_matches("http://").to_owned();
    // One idle connection takes the only place: a second is not served meanwhile.
    let mut idle = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    second
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let early = tokio::time::timeout(Duration::from_millis(200), second.read_to_end(&mut answer));
    assert!(early.await.is_err(), "served beyond the connection cap");
    // The idle one is closed after 400 ms, and then the second is served.
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    tokio::time::timeout(Duration::from_secs(3), second.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"));
    stop(running).await;
}

/// POSTs `body` to `path` from `source` over a fresh connection; the answer's status code.
async fn post_from(source: [u8; 4], to: &str, path: &str, body: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(std::net::SocketAddr::from((source, 0)))
        .unwrap();
    let mut s = socket.connect(to.parse().unwrap()).await.unwrap();
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).await.unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn descriptor_uploads_are_rate_limited_per_source_address() {
    let dir = tempfile::tempdir().unwrap();
    let identity = keys::keygen(&dir.path().join("authority.key")).unwrap();
    let running = start_with(dir.path(), &identity.to_hex(), |c| {
        c.limits.uploads_per_minute_per_address = 5;
    })
    .await;
    let addr = running.url.trim_start_matches("http://").to_owned();
    let now = unix_now();
    let epoch = u32::try_from(now / EPOCH_S).unwrap();
    let net = SyntheticNetwork {
        mixes_per_layer: 2,
        gateways: 1,
        exits: 1,
        params: NetworkParams::nym_like(),
        epoch,
    };
    let (generated, relay_keys) = generate(&mut ChaCha20Rng::seed_from_u64(3), &net);
    let descriptors =
        signed_descriptors(&generated, &relay_keys, &[epoch, epoch + 1], now).unwrap();
    let bodies: Vec<Vec<u8>> = descriptors.iter().map(|d| encode(d).unwrap()).collect();
    // One address gets its burst of 5 a minute, then 429 (counted); another is not slowed.
    for body in &bodies[..5] {
        assert_eq!(
            post_from([127, 0, 0, 1], &addr, "/v1/descriptor", body).await,
            200
        );
    }
    assert_eq!(
        post_from([127, 0, 0, 1], &addr, "/v1/descriptor", &bodies[5]).await,
        429
    );
    assert_eq!(
        post_from([127, 0, 0, 2], &addr, "/v1/descriptor", &bodies[5]).await,
        200
    );
    let m = metrics(&running.url).await;
    assert!(
        m.contains("murmur_directory_descriptors_rejected_total{reason=\"rate_limited\"} 1"),
        "{m}"
    );
    stop(running).await;
}
