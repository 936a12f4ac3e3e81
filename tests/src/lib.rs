//! Shared helpers of Murmur's end-to-end tests (`tests/tests/*.rs`): the built binaries,
//! child processes that die with the test, free ports, bounded polling, a tiny HTTP server
//! and a Prometheus scraper. Everything stays on 127.0.0.0/8: each relay on a loopback
//! address of its own.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod client_link;
pub mod hop;
pub mod link;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// A built workspace binary, next to the test executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p {name}` (or `cargo test --workspace`, which builds \
         it) first",
        bin.display()
    );
    bin
}

/// A tokio runtime with `workers` threads, for the async parts of a test.
pub fn runtime(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .unwrap()
}

/// Distinct free ports on 127.0.0.1 (held together so they differ, then released).
pub fn free_ports(n: usize) -> Vec<u16> {
    free_ports_on(std::net::Ipv4Addr::LOCALHOST, n)
}

/// Distinct free ports on `ip` (held together so they differ, then released).
pub fn free_ports_on(ip: std::net::Ipv4Addr, n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> = (0..n)
        .map(|_| TcpListener::bind((ip, 0)).unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A loopback address of its own for the next relay of this test process: 127.0.0.2,
/// 127.0.0.3, ... (all of 127.0.0.0/8 is local on Linux), so relays look like separate hosts
/// to the authorities' per-address limit, as they would on a real network.
pub fn next_relay_host() -> std::net::Ipv4Addr {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    // 127.0.0.2 ... 127.0.0.254, then 127.0.1.2 ...
    std::net::Ipv4Addr::new(127, 0, (n / 253) as u8, (2 + n % 253) as u8)
}

/// Polls `f` every `every` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(
    timeout: Duration,
    every: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(every);
    }
}

/// Runs `bin keygen --out key` (creating the key's directory); returns the printed identity.
pub fn keygen(bin: &Path, key: &Path) -> String {
    if let Some(dir) = key.parent() {
        std::fs::create_dir_all(dir).unwrap();
    }
    let out = Command::new(bin)
        .args(["keygen", "--out"])
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A child process killed and reaped when dropped; its stderr goes to a log file.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    /// Starts `bin args...` with stderr to `log` and stdout to `<log>.out`.
    pub fn spawn(name: &str, bin: &Path, args: &[&str], log: PathBuf) -> Proc {
        let err = std::fs::File::create(&log).unwrap();
        let out = std::fs::File::create(log.with_extension("out")).unwrap();
        let child = Command::new(bin)
            .args(args)
            // MURMUR_TEST_LOG overrides the children's log filter when debugging a test.
            .env(
                "RUST_LOG",
                std::env::var("MURMUR_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        Proc {
            name: name.to_string(),
            log,
            child: Some(child),
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits up to `timeout` for a clean exit and returns its success.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill").arg(c.id().to_string()).status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Its log so far (for failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits up to `timeout` for its standard output to say `ready` (as the proxy's
    /// programs do when they serve); fails the test, with its log, if it exits or does not.
    pub fn wait_ready(&mut self, timeout: Duration) {
        if let Err(log) = self.try_wait_ready(timeout) {
            panic!("{} exited:\n{log}", self.name);
        }
    }

    /// As [`Proc::wait_ready`], but a process that exits first is the caller's to handle:
    /// `Err` with its log. Still fails the test if it neither exits nor becomes ready.
    pub fn try_wait_ready(&mut self, timeout: Duration) -> Result<(), String> {
        let ready = wait_until(timeout, Duration::from_millis(200), || {
            if !self.is_running() {
                return Some(Err(self.log_text()));
            }
            self.stdout_text().contains("ready").then_some(Ok(()))
        });
        match ready {
            Some(result) => result,
            None => panic!("{} never became ready:\n{}", self.name, self.log_text()),
        }
    }

    /// Its standard output so far.
    pub fn stdout_text(&self) -> String {
        std::fs::read_to_string(self.log.with_extension("out")).unwrap_or_default()
    }

    /// Resident memory in KiB (Linux `/proc`).
    pub fn rss_kib(&self) -> Option<u64> {
        rss_kib_of(self.pid()?)
    }
}

/// Resident memory of process `pid` in KiB (Linux `/proc`), for sampling from another thread.
pub fn rss_kib_of(pid: u32) -> Option<u64> {
    {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// One directory authority of a test network.
pub struct AuthorityInfo {
    pub identity: String,
    pub url: String,
    pub dir: PathBuf,
}

/// The Loopix parameters test authorities vote for unless told otherwise.
pub const TEST_NETWORK: &str =
    "lambda_p = 20.0\nlambda_l = 1.0\nlambda_d = 1.0\nlambda_m = 1.0\nmu = 100.0\n";

/// Writes keys and configs for `n` authorities under `dir` and starts them.
pub fn start_authorities(dir: &Path, n: usize, epoch_s: u64) -> (Vec<AuthorityInfo>, Vec<Proc>) {
    start_authorities_with(dir, n, epoch_s, TEST_NETWORK)
}

/// As [`start_authorities`], with the `[network]` section's body given (λs and μ).
pub fn start_authorities_with(
    dir: &Path,
    n: usize,
    epoch_s: u64,
    network: &str,
) -> (Vec<AuthorityInfo>, Vec<Proc>) {
    start_authorities_limited(dir, n, epoch_s, network, "")
}

/// As [`start_authorities`], for a network with a test's fake hop ([`hop::FakeHop`]) in it:
/// the authorities do not test relays (a fake hop forwards nothing, so it would never pass),
/// and vote every relay in at the unmeasured weight.
pub fn start_authorities_untesting(
    dir: &Path,
    n: usize,
    epoch_s: u64,
) -> (Vec<AuthorityInfo>, Vec<Proc>) {
    start_authorities_config(dir, n, epoch_s, TEST_NETWORK, "", false)
}

/// As [`start_authorities_with`], with `limits` added to the `[limits]` section.
pub fn start_authorities_limited(
    dir: &Path,
    n: usize,
    epoch_s: u64,
    network: &str,
    limits: &str,
) -> (Vec<AuthorityInfo>, Vec<Proc>) {
    start_authorities_config(dir, n, epoch_s, network, limits, true)
}

/// Authorities with the `[network]` body, extra `[limits]` keys, and relay tests on or off.
pub fn start_authorities_config(
    dir: &Path,
    n: usize,
    epoch_s: u64,
    network: &str,
    limits: &str,
    probe: bool,
) -> (Vec<AuthorityInfo>, Vec<Proc>) {
    let bin = binary("murmur-directory");
    let ports = free_ports(n);
    let mut infos = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let adir = dir.join(format!("authority-{i}"));
        infos.push(AuthorityInfo {
            identity: keygen(&bin, &adir.join("authority.key")),
            url: format!("http://127.0.0.1:{port}"),
            dir: adir,
        });
    }
    let vote = (epoch_s * 6 / 10).max(1);
    let compute = (epoch_s * 3 / 10).max(1);
    let mut procs = Vec::new();
    for (i, a) in infos.iter().enumerate() {
        let mut text = format!(
            "version = 1\nlisten = \"127.0.0.1:{}\"\nkey_file = \"authority.key\"\n\
             state_dir = \"state\"\nclock_skew = \"1s\"\n\
             [schedule]\nepoch_length = \"{epoch_s}s\"\nvote_lead = \"{vote}s\"\ncompute_lead = \"{compute}s\"\n\
             [network]\n{network}\
             [policy]\nallow_private_addresses = true\n\
             [limits]\npeer_timeout = \"1s\"\nmax_connections_per_address = 256\n\
             uploads_per_minute_per_address = 100000\n{limits}\
             [probe]\nenabled = {probe}\nlisten = \"127.0.0.1:0\"\ninterval = \"{interval}s\"\ntimeout = \"1s\"\npackets = 8\n",
            ports[i],
            // Several rounds per epoch, so a relay is voted in (or out) by the next vote.
            interval = (epoch_s / 4).max(1),
        );
        for other in &infos {
            text += &format!(
                "[[authority]]\nidentity = \"{}\"\nurl = \"{}\"\n",
                other.identity, other.url
            );
        }
        let config = a.dir.join("authority.toml");
        std::fs::write(&config, text).unwrap();
        procs.push(Proc::spawn(
            &format!("authority-{i}"),
            &bin,
            &["run", "--config", config.to_str().unwrap()],
            a.dir.join("authority.log"),
        ));
    }
    (infos, procs)
}

/// The `[directory]` section for relays and the `authorities` list for clients.
pub fn authorities_toml(authorities: &[AuthorityInfo]) -> String {
    authorities
        .iter()
        .map(|a| format!("{{ identity = \"{}\", url = \"{}\" }}", a.identity, a.url))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The consensus in force at the authorities now, verified against their keys; `None` if
/// there is none yet (or they cannot be reached).
pub async fn fetch_consensus(
    authorities: &[AuthorityInfo],
) -> Option<murmur_protocol::directory::Consensus> {
    use murmur_protocol::directory::{AuthoritySet, ConsensusStore, IdentityKey};
    let set = AuthoritySet::new(
        authorities
            .iter()
            .map(|a| IdentityKey::from_hex(&a.identity).unwrap())
            .collect(),
    )
    .unwrap();
    let urls: Vec<String> = authorities.iter().map(|a| a.url.clone()).collect();
    let client = murmur_directory::client::DirectoryClient::new(Duration::from_secs(2)).ok()?;
    let mut store = ConsensusStore::new(set, 1);
    let now = murmur_directory::unix_now();
    client.refresh(&urls, &mut store, now).await.ok()?;
    Some(store.current(now).ok()?.consensus.clone())
}

/// A `murmur-ledger` process.
pub struct LedgerProc {
    pub proc: Proc,
    pub addr: SocketAddr,
    /// `http://127.0.0.1:PORT`, for relays' and clients' `[payments] ledger`.
    pub url: String,
    /// Its identity key in hex (`murmur-ledger keygen`), for their `[payments] ledger_key`.
    pub identity: String,
}

impl LedgerProc {
    /// The `ledger` and `ledger_key` lines of a relay's or client's `[payments]` section.
    pub fn payments_toml(&self) -> String {
        format!(
            "ledger = \"{}\"\nledger_key = \"{}\"\n",
            self.url, self.identity
        )
    }

    /// A client of it that believes only its signed answers.
    pub fn client(&self) -> murmur_ledger::client::LedgerClient {
        let key = murmur_protocol::directory::IdentityKey::from_hex(&self.identity).unwrap();
        murmur_ledger::client::LedgerClient::new(&self.url, key, Duration::from_secs(5)).unwrap()
    }
}

/// Writes a key (`murmur-ledger keygen`) and a config under `dir/ledger` crediting `genesis`
/// (account hex, amount) and starts the ledger; returns once it answers.
pub fn start_ledger(dir: &Path, genesis: &[(&str, u64)]) -> LedgerProc {
    let ldir = dir.join("ledger");
    std::fs::create_dir_all(&ldir).unwrap();
    let bin = binary("murmur-ledger");
    let identity = keygen(&bin, &ldir.join("ledger.key"));
    let addr = SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0]));
    // Every relay and client of a test network connects from 127.0.0.1.
    let mut text = format!(
        "version = 1\nlisten = \"{addr}\"\nkey_file = \"ledger.key\"\nstate_dir = \"state\"\n\
         [limits]\nmax_connections_per_address = 256\n"
    );
    for (account, amount) in genesis {
        text += &format!("[[genesis]]\naccount = \"{account}\"\namount = {amount}\n");
    }
    let config = ldir.join("ledger.toml");
    std::fs::write(&config, text).unwrap();
    let mut proc = Proc::spawn(
        "ledger",
        &bin,
        &["run", "--config", config.to_str().unwrap()],
        ldir.join("ledger.log"),
    );
    let up = wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
        assert!(proc.is_running(), "ledger exited:\n{}", proc.log_text());
        http_get(addr, "/metrics").ok()
    });
    assert!(up.is_some(), "ledger never answered:\n{}", proc.log_text());
    LedgerProc {
        proc,
        addr,
        url: format!("http://{addr}"),
        identity,
    }
}

/// Writes `dir/client.toml` (authorities, a free SOCKS port, `extra` appended: more keys or
/// sections such as `[payments]`), starts `murmur-client --config` and waits until it is
/// ready; returns the process and its SOCKS5 address.
pub fn start_client(dir: &Path, authorities: &[AuthorityInfo], extra: &str) -> (Proc, SocketAddr) {
    let c = start_client_proc(dir, authorities, extra);
    (c.proc, c.socks)
}

/// A running `murmur-client`.
pub struct ClientProc {
    pub proc: Proc,
    pub socks: SocketAddr,
    /// Its control endpoint (`murmur-client status --control`).
    pub control: SocketAddr,
}

/// As [`start_client`], with the control address. The client keeps its state (its guard) in
/// `dir/state`, and its control endpoint listens on a free port.
pub fn start_client_proc(dir: &Path, authorities: &[AuthorityInfo], extra: &str) -> ClientProc {
    // The free ports are released before the client binds them, so a test running beside
    // this one may take one first: the client then exits saying so, and gets fresh ports.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let ports = free_ports(2);
        let socks = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let control = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let config = dir.join("client.toml");
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(
            &config,
            format!(
                "version = 1\nsocks = \"{socks}\"\nclock_skew = \"1s\"\nopen_timeout = \"20s\"\n\
                 distinct_subnets = false\nstate_dir = \"state\"\nauthorities = [{}]\n{extra}\n\
                 [control]\nlisten = \"{control}\"\n",
                authorities_toml(authorities)
            ),
        )
        .unwrap();
        let mut client = Proc::spawn(
            "client",
            &binary("murmur-client"),
            &["--config", config.to_str().unwrap()],
            dir.join("client.log"),
        );
        match client.try_wait_ready(Duration::from_secs(90)) {
            Ok(()) => {
                return ClientProc {
                    proc: client,
                    socks,
                    control,
                };
            }
            Err(log) if attempts < 3 && log.contains("Address already in use") => continue,
            Err(log) => panic!("client exited:\n{log}"),
        }
    }
}

/// A running `murmur-devnet`.
pub struct DevnetProc {
    pub proc: Proc,
    pub socks: SocketAddr,
    pub control: SocketAddr,
}

/// Starts `murmur-devnet` with its SOCKS5 proxy and control endpoint on free ports and
/// `args` added, and waits until it is ready.
pub fn start_devnet(dir: &Path, args: &[&str]) -> DevnetProc {
    // The ports are free when picked but released before the devnet binds them, and the
    // devnet binds a dozen listeners of its own on port 0 first, any of which the kernel may
    // give one of them: a start that fails on an address in use is tried again with fresh
    // ports.
    const ATTEMPTS: usize = 3;
    for attempt in 1..=ATTEMPTS {
        let ports = free_ports(2);
        let socks = SocketAddr::from(([127, 0, 0, 1], ports[0]));
        let control = SocketAddr::from(([127, 0, 0, 1], ports[1]));
        let (socks_arg, control_arg) = (socks.to_string(), control.to_string());
        let mut all = vec!["--socks", &socks_arg, "--control", &control_arg];
        all.extend_from_slice(args);
        let mut proc = Proc::spawn(
            "devnet",
            &binary("murmur-devnet"),
            &all,
            dir.join("devnet.log"),
        );
        match proc.try_wait_ready(Duration::from_secs(120)) {
            Ok(()) => {
                return DevnetProc {
                    proc,
                    socks,
                    control,
                };
            }
            Err(log) if attempt < ATTEMPTS && log.contains("already in use") => {
                eprintln!("devnet start {attempt}: a port it was given was taken; again");
            }
            Err(log) => panic!("devnet exited:\n{log}"),
        }
    }
    unreachable!("the last attempt returns or panics")
}

/// `murmur-client status --control ADDR --json`, parsed.
pub fn client_status(control: SocketAddr) -> murmur_client::status::Status {
    let out = Command::new(binary("murmur-client"))
        .args(["status", "--json", "--control", &control.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "murmur-client status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A relay process of a test network.
pub struct RelayProc {
    pub proc: Proc,
    pub dir: PathBuf,
    pub identity: String,
    pub mix: SocketAddr,
    pub client: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub config: PathBuf,
}

/// Writes a key and config for a relay under `dir/name` and starts it. `roles` is TOML
/// (`["mix"]`); `extra` is appended to the config (more sections).
pub fn start_relay(
    dir: &Path,
    name: &str,
    roles: &str,
    authorities: &[AuthorityInfo],
    epoch_s: u64,
    extra: &str,
) -> RelayProc {
    start_relay_listening(dir, name, roles, authorities, epoch_s, "", extra)
}

/// `n` mixes `mix-0`…, spread over the layers by the authorities, each with `extra`.
pub fn start_mixes(
    dir: &Path,
    n: usize,
    authorities: &[AuthorityInfo],
    epoch_s: u64,
    extra: &str,
) -> Vec<RelayProc> {
    (0..n)
        .map(|i| {
            start_relay(
                dir,
                &format!("mix-{i}"),
                "[\"mix\"]",
                authorities,
                epoch_s,
                extra,
            )
        })
        .collect()
}

/// As [`start_relay`], with `listen` added to the `[listen]` section (`advertise_client`).
pub fn start_relay_listening(
    dir: &Path,
    name: &str,
    roles: &str,
    authorities: &[AuthorityInfo],
    epoch_s: u64,
    listen: &str,
    extra: &str,
) -> RelayProc {
    start_relay_with(dir, name, roles, authorities, epoch_s, "", listen, extra)
}

/// As [`start_relay_listening`], with `relay` added to the `[relay]` section (`bandwidth`,
/// `price_per_packet`, `family_members`).
#[allow(clippy::too_many_arguments)]
pub fn start_relay_with(
    dir: &Path,
    name: &str,
    roles: &str,
    authorities: &[AuthorityInfo],
    epoch_s: u64,
    relay: &str,
    listen: &str,
    extra: &str,
) -> RelayProc {
    let bin = binary("murmur-relay");
    let rdir = dir.join(name);
    let identity = keygen(&bin, &rdir.join("identity.key"));
    let host = next_relay_host();
    let ports = free_ports_on(host, 2);
    let (mix, client, metrics) = (
        SocketAddr::from((host, ports[0])),
        SocketAddr::from((host, ports[1])),
        SocketAddr::from(([127, 0, 0, 1], free_ports(1)[0])),
    );
    let text = format!(
        "version = 1\n[relay]\nfamily = \"test-{name}\"\nroles = {roles}\n{relay}\
         [listen]\nmix = \"{mix}\"\nclient = \"{client}\"\nmetrics = \"{metrics}\"\n{listen}\
         [directory]\nauthorities = [{}]\nepoch_length = \"{epoch_s}s\"\nkey_grace = \"{epoch_s}s\"\nclock_skew = \"1s\"\n\
         {extra}\n",
        authorities_toml(authorities)
    );
    let config = rdir.join("relay.toml");
    std::fs::write(&config, text).unwrap();
    let proc = Proc::spawn(
        name,
        &bin,
        &["run", "--config", config.to_str().unwrap()],
        rdir.join("relay.log"),
    );
    RelayProc {
        proc,
        dir: rdir,
        identity,
        mix,
        client: roles.contains("gateway").then_some(client),
        metrics,
        config,
    }
}

impl RelayProc {
    /// Starts the relay again from the same config and state (after a kill).
    pub fn restart(&mut self) {
        let bin = binary("murmur-relay");
        let log = self.dir.join("relay-restarted.log");
        self.proc = Proc::spawn(
            &self.proc.name.clone(),
            &bin,
            &["run", "--config", self.config.to_str().unwrap()],
            log,
        );
    }

    /// A Prometheus sample: the sum of every series of `name` whose labels contain `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> Option<f64> {
        scrape(self.metrics, name, labels)
    }
}

/// GETs `/metrics` at `addr` and sums the samples of `name` whose label set contains `labels`
/// (e.g. `reason="replay"`); `None` if unreachable.
pub fn scrape(addr: SocketAddr, name: &str, labels: &str) -> Option<f64> {
    let body = http_get(addr, "/metrics").ok()?;
    let text = String::from_utf8_lossy(&body);
    let mut sum = 0.0;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let series_name = series.split('{').next().unwrap_or(series);
        if series_name == name && series.contains(labels) {
            sum += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    Some(sum)
}

/// A minimal HTTP/1.0 GET; returns the body of a 200 answer.
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    Ok(buf[split + 4..].to_vec())
}

/// A tiny HTTP/1.0 file server on 127.0.0.1 serving `files` (path → body) until dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl HttpServer {
    pub fn start(files: Vec<(String, Vec<u8>)>) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let files = Arc::new(files);
        let flag = stop.clone();
        std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let files = files.clone();
                        std::thread::spawn(move || serve_one(stream, &files));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        HttpServer { addr, stop }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One HTTP/1.x request: its method, target and body.
pub struct Request {
    pub method: String,
    pub target: String,
    pub body: Vec<u8>,
}

/// Reads one request from `s` (the body by its content-length, at most 64 KiB); `None` if
/// the connection ends or fails first, or the head passes 16 KiB.
pub fn read_request(s: &mut TcpStream) -> Option<Request> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > 16 * 1024 {
            return None;
        }
        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut words = head.split_whitespace();
    let (method, target) = (words.next()?.to_owned(), words.next()?.to_owned());
    let len: usize = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
        .min(64 * 1024);
    while buf.len() < end + len {
        let n = s.read(&mut chunk).ok().filter(|&n| n > 0)?;
        buf.extend_from_slice(&chunk[..n]);
    }
    Some(Request {
        method,
        target,
        body: buf[end..end + len].to_vec(),
    })
}

fn serve_one(mut stream: TcpStream, files: &[(String, Vec<u8>)]) {
    let _ = stream.set_nonblocking(false);
    // Long: through the mixnet, on a loaded 2-core machine, the request can take a while to
    // follow the exit's connect.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let Some(req) = read_request(&mut stream) else {
        return;
    };
    let path = req.target.as_str();
    match files.iter().find(|(p, _)| p == path) {
        Some((_, body)) => {
            // A browser renders only what is typed as a page (it downloads the rest).
            let kind = if path.ends_with('/') || path.ends_with(".html") {
                "text/html"
            } else if path.ends_with(".txt") {
                "text/plain"
            } else {
                "application/octet-stream"
            };
            let _ = write!(
                stream,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nContent-Type: {kind}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(body);
        }
        None => {
            let _ = stream.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
    }
}

/// Deterministic pseudo-random bytes (a xorshift stream), for test files.
pub fn test_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Runs curl through the SOCKS5 proxy at `socks`; returns (exit status code, stdout bytes,
/// stderr text).
pub fn curl(socks: SocketAddr, url: &str, max_time_s: u64) -> (i32, Vec<u8>, String) {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            &max_time_s.to_string(),
            "--socks5-hostname",
            &socks.to_string(),
            url,
        ])
        .output()
        .expect("curl is installed (apt-get install -y curl)");
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}
