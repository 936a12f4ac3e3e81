//! The HTTP CONNECT proxy and the `safe` setting, as a person uses them: start
//! `murmur-devnet --socks A --http B`, wait for `ready`, then point curl and git at it.
//!
//! - `curl -x http://…` fetches from a local HTTPS server with a test certificate, and
//!   `git clone` over `https_proxy` clones a repository it serves;
//! - the tunnel forwards what a client sends behind its CONNECT without waiting;
//! - a plain-HTTP request gets the documented 405, a port the exit refuses (25) gets 403, and
//!   the proxy keeps serving after;
//! - under `--safe-socks refuse` an IP-address target is refused (SOCKS reply 2, HTTP 403);
//!   under the default (`warn`) each one logs one warning that names no address.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use murmur_tests::{HttpServer, Proc, binary, free_ports, test_bytes, wait_until};
use sha2::{Digest, Sha256};

/// One devnet at a time: two at once on a 2-core machine slow each past curl's patience.
static ONE_DEVNET: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The warning `safe = "warn"` logs (client/src/stream.rs).
const IP_WARNING: &str = "an application sent an IP address, not a name";

/// Starts the devnet with both proxies and `extra` flags; waits for `ready`.
fn start_devnet(dir: &Path, name: &str, extra: &[&str]) -> (Proc, SocketAddr, SocketAddr) {
    let ports = free_ports(3);
    let socks = SocketAddr::from(([127, 0, 0, 1], ports[0]));
    let http = SocketAddr::from(([127, 0, 0, 1], ports[1]));
    let control = SocketAddr::from(([127, 0, 0, 1], ports[2]));
    let (socks_s, http_s, control_s) = (socks.to_string(), http.to_string(), control.to_string());
    // The shortest hop delay: these tests are about the proxies, not the mixing.
    let mut args = vec![
        "--socks",
        &socks_s,
        "--http",
        &http_s,
        "--control",
        &control_s,
        "--hop-delay",
        "0ms",
    ];
    args.extend(extra);
    let mut proc = Proc::spawn(
        name,
        &binary("murmur-devnet"),
        &args,
        dir.join(format!("{name}.log")),
    );
    proc.wait_ready(Duration::from_secs(120));
    let line = proc.stdout_text();
    assert!(
        line.contains(&format!("HTTP CONNECT proxy on {http}")),
        "the ready line names the HTTP proxy: {line}"
    );
    (proc, socks, http)
}

/// A static HTTPS server (python3's http.server in TLS) over `root`, with a certificate for
/// 127.0.0.1 and localhost made here by openssl; returns it, its port and the certificate.
fn start_https(dir: &Path, root: &Path) -> (Proc, u16, PathBuf) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=127.0.0.1"])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let script = dir.join("https_server.py");
    std::fs::write(
        &script,
        "import functools, http.server, os, ssl, sys\n\
         port_file, root, cert, key = sys.argv[1:5]\n\
         handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=root)\n\
         httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)\n\
         ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)\n\
         ctx.load_cert_chain(cert, key)\n\
         httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)\n\
         open(port_file + '.tmp', 'w').write(str(httpd.server_address[1]))\n\
         os.rename(port_file + '.tmp', port_file)\n\
         httpd.serve_forever()\n",
    )
    .unwrap();
    let port_file = dir.join("https.port");
    let args =
        [&script, &port_file, &root.to_path_buf(), &cert, &key].map(|p| p.display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = Proc::spawn("https", Path::new("python3"), &args, dir.join("https.log"));
    let port = wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
        assert!(
            server.is_running(),
            "https server exited:\n{}",
            server.log_text()
        );
        std::fs::read_to_string(&port_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .expect("the https server starts");
    (server, port, cert)
}

/// A bare repository holding `hello.txt`, served by dumb HTTP from `root/repo.git`.
fn make_repo(dir: &Path, root: &Path, content: &str) {
    let work = dir.join("repo-work");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("hello.txt"), content).unwrap();
    let git = |args: &[&str], cwd: &Path| {
        let out = git_command().args(args).current_dir(cwd).output().unwrap();
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    git(&["init", "-q", "-b", "main"], &work);
    git(&["add", "hello.txt"], &work);
    git(
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "hello",
        ],
        &work,
    );
    let bare = root.join("repo.git");
    git(
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
        dir,
    );
    git(&["update-server-info"], &bare);
}

/// git without the user's or the system's configuration (a proxy set there, say).
fn git_command() -> Command {
    let mut c = Command::new("git");
    c.env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_TERMINAL_PROMPT", "0");
    for var in [
        "no_proxy",
        "NO_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "all_proxy",
    ] {
        c.env_remove(var);
    }
    c
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        // Generous: on a loaded 2-core machine a first byte can take tens of seconds.
        .args(["-sS", "--max-time", "120"])
        .args(args)
        .env_remove("no_proxy")
        .env_remove("NO_PROXY")
        .output()
        .expect("curl is installed")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Lines of the devnet's log that are the IP-address warning.
fn ip_warnings(devnet: &Proc) -> Vec<String> {
    devnet
        .log_text()
        .lines()
        .filter(|l| l.contains(IP_WARNING))
        .map(str::to_string)
        .collect()
}

#[test]
fn https_and_git_through_the_http_connect_proxy() {
    let _one = ONE_DEVNET.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    let page = test_bytes(300_000, 11);
    std::fs::write(root.join("page.bin"), &page).unwrap();
    make_repo(dir.path(), &root, "cloned through three mixes\n");
    let (_https, port, cert) = start_https(dir.path(), &root);
    let plain = HttpServer::start(vec![("/".into(), b"plain page".to_vec())]);
    let (mut devnet, socks, http) =
        start_devnet(dir.path(), "devnet-refuse", &["--safe-socks", "refuse"]);
    let proxy = format!("http://{http}");
    let cert_s = cert.display().to_string();
    // Names, not addresses: this devnet refuses IP-address targets.
    let page_url = format!("https://localhost:{port}/page.bin");

    // Fetched through `proxy_url`, it arrives whole; the second time with credentials,
    // which are an isolation token as over SOCKS5.
    let fetch = |proxy_url: &str| {
        let out = curl(&["-x", proxy_url, "--cacert", &cert_s, &page_url]);
        assert!(
            out.status.success(),
            "{}\n{}",
            text(&out.stderr),
            devnet.log_text()
        );
        assert_eq!(
            Sha256::digest(&out.stdout),
            Sha256::digest(&page),
            "page corrupted"
        );
    };
    fetch(&proxy);
    fetch(&format!("http://alice:secret@{http}"));

    // git over https_proxy, the way most tools find an HTTP proxy.
    let clone = dir.path().join("clone");
    let out = git_command()
        .args(["clone", "-q", &format!("https://localhost:{port}/repo.git")])
        .arg(&clone)
        .env("https_proxy", &proxy)
        .env("GIT_SSL_CAINFO", &cert)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git clone: {}\n{}",
        text(&out.stderr),
        devnet.log_text()
    );
    assert_eq!(
        std::fs::read_to_string(clone.join("hello.txt")).unwrap(),
        "cloned through three mixes\n"
    );

    // What a client sends right behind its CONNECT reaches the destination.
    let mut s = TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let request = format!(
        "CONNECT localhost:{} HTTP/1.1\r\n\r\nGET / HTTP/1.0\r\n\r\n",
        plain.addr.port()
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = text(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200 Connection established\r\n\r\nHTTP/1.0 200"),
        "{answer}"
    );
    assert!(answer.ends_with("plain page"), "{answer}");

    // Plain HTTP is refused, saying what to use instead.
    let out = curl(&[
        "-x",
        &proxy,
        "-w",
        "\n%{http_code}",
        &format!("http://localhost:{}/", plain.addr.port()),
    ]);
    let body = text(&out.stdout);
    assert!(body.ends_with("\n405"), "{body}");
    assert!(body.contains("only tunnels CONNECT"), "{body}");

    // A port no exit allows: 403 at once.
    let out = curl(&["-x", &proxy, "https://localhost:25/"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));

    // IP addresses are refused under `refuse`: HTTP 403, and SOCKS reply 2 for curl
    // --socks5 (which resolves the name itself).
    let out = curl(&[
        "-x",
        &proxy,
        "--cacert",
        &cert_s,
        &format!("https://127.0.0.1:{port}/page.bin"),
    ]);
    assert!(text(&out.stderr).contains("403"), "{}", text(&out.stderr));
    let out = curl(&[
        "--socks5",
        &socks.to_string(),
        &format!("http://localhost:{}/", plain.addr.port()),
    ]);
    assert_eq!(out.status.code(), Some(97), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("(2)"),
        "expected SOCKS reply 2: {}",
        text(&out.stderr)
    );
    assert!(ip_warnings(&devnet).is_empty(), "refused, not warned");

    // And it still serves.
    fetch(&proxy);
    assert!(
        devnet.terminate(Duration::from_secs(20)),
        "devnet did not stop cleanly on SIGTERM:\n{}",
        devnet.log_text()
    );
}

#[test]
fn ip_address_targets_are_warned_about_once_each_without_the_address() {
    let _one = ONE_DEVNET.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    // The HTTPS server, not HttpServer, whose 10-second read timeout a loaded machine can
    // pass between the exit's connect and the request that follows the open.
    let root = dir.path().join("www");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("page.txt"), "plain page").unwrap();
    let (_https, port, cert) = start_https(dir.path(), &root);
    let cert_s = cert.display().to_string();
    let (mut devnet, socks, http) = start_devnet(dir.path(), "devnet-warn", &[]);
    let port = port.to_string();

    // A name: no warning.
    let out = curl(&[
        "--cacert",
        &cert_s,
        "--socks5-hostname",
        &socks.to_string(),
        &format!("https://localhost:{port}/page.txt"),
    ]);
    assert_eq!(out.stdout, b"plain page", "{}", text(&out.stderr));
    assert!(ip_warnings(&devnet).is_empty());

    // curl --socks5 sends the address it was given (or resolved); through a CONNECT tunnel
    // an address too. Each is served, and logs one warning.
    let out = curl(&[
        "--cacert",
        &cert_s,
        "--socks5",
        &socks.to_string(),
        &format!("https://127.0.0.1:{port}/page.txt"),
    ]);
    assert_eq!(
        out.stdout,
        b"plain page",
        "{}\n{}",
        text(&out.stderr),
        devnet.log_text()
    );
    let one = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        (ip_warnings(&devnet).len() == 1).then_some(())
    });
    assert!(one.is_some(), "{:?}", ip_warnings(&devnet));
    let out = curl(&[
        "--cacert",
        &cert_s,
        "-x",
        &format!("http://{http}"),
        &format!("https://127.0.0.1:{port}/page.txt"),
    ]);
    assert_eq!(out.stdout, b"plain page", "{}", text(&out.stderr));
    let warnings = wait_until(Duration::from_secs(5), Duration::from_millis(50), || {
        let w = ip_warnings(&devnet);
        (w.len() == 2).then_some(w)
    });
    let warnings = warnings.unwrap_or_else(|| panic!("{:?}", ip_warnings(&devnet)));
    for w in warnings {
        assert!(
            !w.contains("127.0.0.1") && !w.contains(&format!(":{port}")),
            "{w}"
        );
    }
    assert!(
        devnet.terminate(Duration::from_secs(20)),
        "{}",
        devnet.log_text()
    );
}
