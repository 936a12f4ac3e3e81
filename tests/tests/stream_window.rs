//! One stream window (issue 15): a client configured with a 2 MiB stream window, through a
//! network of real processes (three authorities, a gateway, a mix per layer, an exit),
//! uploads 1.5 MB to a destination that does not read for a while, then downloads 10 MB;
//! both arrive intact.
//!
//! Before the window was negotiated the exit kept 512 KiB per stream whatever the client
//! used: the upload piled up more than that unwritten at the exit (the destination not
//! reading), and the exit killed the stream. Now the client announces 2 MiB, the exit grants
//! it, and nothing is refused.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use murmur_tests::{start_authorities_with, start_client, start_mixes, start_relay, test_bytes};
use sha2::{Digest, Sha256};

const EPOCH_S: u64 = 10;
const NETWORK: &str =
    "lambda_p = 200.0\nlambda_l = 1.0\nlambda_d = 1.0\nlambda_m = 1.0\nmu = 200.0\n";
const WINDOW: usize = 2 << 20;
const UPLOAD: usize = 1_500_000;
const DOWNLOAD: usize = 10_000_000;
/// How long the destination leaves the upload unread.
const STALL: Duration = Duration::from_secs(8);

/// Serves one POST: reads its head, waits [`STALL`], reads the body and answers with
/// `body`, or with 400 if the upload is not `expected`.
fn serve_once(listener: TcpListener, expected: Vec<u8>, body: Vec<u8>) {
    let (mut s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the request ended in its head");
        buf.extend_from_slice(&chunk[..n]);
    };
    std::thread::sleep(STALL);
    while buf.len() < head_end + expected.len() {
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "the upload ended early");
        buf.extend_from_slice(&chunk[..n]);
    }
    let intact = buf[head_end..] == expected[..];
    if intact {
        write!(
            s,
            "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        let _ = s.write_all(&body);
    } else {
        let _ = s.write_all(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    }
}

#[test]
fn a_two_mib_window_uploads_past_a_stalled_destination_and_downloads_10_mb_intact() {
    let dir = tempfile::tempdir().unwrap();
    let upload = test_bytes(UPLOAD, 5);
    let download = test_bytes(DOWNLOAD, 6);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let server_addr: SocketAddr = listener.local_addr().unwrap();
    let server = {
        let (upload, download) = (upload.clone(), download.clone());
        std::thread::spawn(move || serve_once(listener, upload, download))
    };
    let upload_file = dir.path().join("upload.bin");
    std::fs::write(&upload_file, &upload).unwrap();

    let (infos, _authorities) = start_authorities_with(dir.path(), 3, EPOCH_S, NETWORK);
    let loopback = "[mixing]\nworkers = 1\nreplay_capacity = 200000\ndistinct_subnets = false\n";
    let _gateway = start_relay(
        dir.path(),
        "gateway",
        "[\"gateway\"]",
        &infos,
        EPOCH_S,
        loopback,
    );
    let _mixes = start_mixes(dir.path(), 3, &infos, EPOCH_S, loopback);
    let exit_extra = format!(
        "{loopback}[exit]\nallow_private = true\nallow_own_addresses = true\n\
         policy = \"accept *:*\"\n"
    );
    let exit = start_relay(
        dir.path(),
        "exit",
        "[\"exit\"]",
        &infos,
        EPOCH_S,
        &exit_extra,
    );
    let (client, socks) = start_client(dir.path(), &infos, &format!("stream_window = {WINDOW}\n"));

    let t0 = Instant::now();
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "400",
            "--socks5-hostname",
            &socks.to_string(),
            "--data-binary",
            &format!("@{}", upload_file.display()),
            "-H",
            "Content-Type: application/octet-stream",
            "-H",
            "Expect:",
            &format!("http://{server_addr}/"),
        ])
        .output()
        .expect("curl is installed");
    let took = t0.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{err}\nclient:\n{}\nexit:\n{}",
        client.log_text(),
        exit.proc.log_text()
    );
    assert_eq!(out.stdout.len(), DOWNLOAD, "{err}");
    assert_eq!(
        Sha256::digest(&out.stdout),
        Sha256::digest(&download),
        "the download is corrupted"
    );
    server.join().unwrap();
    eprintln!(
        "1.5 MB up past a {STALL:?} stall and 10 MB down with a 2 MiB window: {took:?} \
         ({:.0} KB/s down)",
        DOWNLOAD as f64 / 1000.0 / took.as_secs_f64()
    );
    // Nothing was refused or cut by a bound on the way.
    for reason in [
        "window",
        "session_buffer",
        "buffer",
        "no_progress",
        "lifetime",
    ] {
        let n = exit
            .metric(
                "murmur_relay_exit_refused_total",
                &format!("reason=\"{reason}\""),
            )
            .unwrap_or(0.0);
        assert_eq!(n, 0.0, "the exit refused for {reason}");
    }
    let _ = TcpStream::connect(server_addr);
}
