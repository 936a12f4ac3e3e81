//! Issue 18: a real browser through the proxy. Headless Chromium, with its loopback bypass
//! removed (`--proxy-bypass-list=<-loopback>`, else it would reach 127.0.0.1 directly), loads
//! a page through the devnet's SOCKS5 proxy whose script fetches a second resource; the DOM
//! Chromium dumps shows the fetched text, and the client's status shows the streams it opened.
//!
//! Chromium must be installed (`apt-get install -y chromium`; `.ci/run` installs it).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use murmur_tests::{HttpServer, client_status, start_devnet};

/// The browser: `$CHROMIUM`, else the first of the usual names on the `PATH`.
fn chromium() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        return PathBuf::from(p);
    }
    for name in ["chromium", "chromium-browser", "google-chrome"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {name}")])
            .output()
            .unwrap();
        if found.status.success() {
            return PathBuf::from(String::from_utf8(found.stdout).unwrap().trim());
        }
    }
    panic!(
        "headless Chromium is needed for this test: apt-get install -y chromium (.ci/run \
         installs it), or set CHROMIUM to the browser's path"
    );
}

const PAGE: &str = "<html><body><div id=\"out\">waiting</div><script>\
    fetch('/data.txt').then(r => r.text()).then(t => {\
    document.getElementById('out').textContent = 'fetched:' + t; });\
    </script></body></html>";

#[test]
fn headless_chromium_loads_a_page_and_its_script_fetches_through_the_proxy() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let server = HttpServer::start(vec![
        ("/".into(), PAGE.as_bytes().to_vec()),
        ("/data.txt".into(), b"through-three-mixes".to_vec()),
    ]);
    let mut devnet = start_devnet(dir.path(), &[]);
    let before = client_status(devnet.control).streams.opened;
    let t = Instant::now();
    let (dom_file, err_file) = (dir.path().join("dom.html"), dir.path().join("chromium.err"));
    let mut child = Command::new(&browser)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", dir.path().join("profile").display()),
            &format!("--proxy-server=socks5://{}", devnet.socks),
            "--proxy-bypass-list=<-loopback>",
            // Virtual time waits for the page's fetch (it does not advance while a request is
            // outstanding), up to this much idle time.
            "--virtual-time-budget=60000",
            "--dump-dom",
            &server.url("/"),
        ])
        .stdout(std::fs::File::create(&dom_file).unwrap())
        .stderr(std::fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    // Bounded: a browser that hangs fails the test instead of holding the suite.
    let exited =
        murmur_tests::wait_until(Duration::from_secs(180), Duration::from_millis(200), || {
            child.try_wait().unwrap()
        });
    if exited.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let dom = std::fs::read_to_string(&dom_file).unwrap_or_default();
    let stderr = std::fs::read_to_string(&err_file).unwrap_or_default();
    eprintln!("chromium took {:?}", t.elapsed());
    assert!(exited.is_some(), "chromium did not finish within 180 s");
    assert!(
        dom.contains("fetched:through-three-mixes"),
        "the script's fetch did not arrive:\n{dom}\n{}\n{}",
        stderr
            .lines()
            .filter(|l| !l.contains("dbus"))
            .collect::<Vec<_>>()
            .join("\n"),
        devnet.proc.log_text()
    );
    // The requests crossed the proxy (one stream if Chromium kept its connection; without
    // the bypass removed, none).
    let opened = client_status(devnet.control).streams.opened - before;
    assert!(opened >= 1, "no stream opened through the proxy");
    assert!(
        devnet.proc.terminate(Duration::from_secs(20)),
        "devnet did not stop on SIGTERM"
    );
}
