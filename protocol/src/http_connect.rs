//! The HTTP CONNECT proxy request (RFC 9110 §9.3.6, HTTP/1.x message syntax of RFC 9112),
//! sans-IO.
//!
//! Hand-written rather than taken from an HTTP crate: a proxy that only tunnels needs a tiny
//! subset of HTTP (one request line and its headers, no bodies, no keep-alive), read from a
//! bounded buffer fed in arbitrary chunks, with the same target and isolation token as the
//! SOCKS5 handshake ([`crate::socks`]) so both proxies open streams alike.
//!
//! What it reads: `CONNECT host:port HTTP/1.1` (a name, an IPv4 address or a bracketed IPv6
//! address, and a port), then headers, of which only `Proxy-Authorization: Basic …` matters:
//! its user and password become the stream-isolation token, exactly as RFC 1929 credentials
//! do over SOCKS5. Every other request is refused with a status and a short text body: a
//! plain-HTTP request (`GET http://…`, or any method other than CONNECT) with 405, since
//! forwarding it would make this a full HTTP proxy (rewriting requests, keep-alive across
//! destinations, bodies) for traffic the exit could read anyway; the body says to use an
//! `https://` URL or the SOCKS5 port. A malformed request gets 400, a head over
//! [`MAX_HEAD`] bytes or [`MAX_HEADERS`] headers 431.
//!
//! The driver keeps one buffer per connection:
//! ```text
//! loop {
//!     match parser.step(&mut buf) {
//!         Step::NeedMore => read more into buf,
//!         Step::Request(req) => break req,      // buf now holds what followed the head
//!         Step::Refuse { response, error } => { write response; close }
//!     }
//! }
//! ```
//! Bytes after the request head (a client that sends its TLS ClientHello without waiting
//! for the `200`) stay in the buffer, to be forwarded once the tunnel opens.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::socks::reply;
use crate::stream::Target;

/// The longest request head read (request line, headers and the empty line), in bytes.
pub const MAX_HEAD: usize = 8 * 1024;
/// The most header lines read.
pub const MAX_HEADERS: usize = 64;
/// The longest host name (as over SOCKS5, whose length is one byte).
pub const MAX_HOST: usize = 255;

/// An HTTP status: its code and reason phrase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    pub code: u16,
    pub reason: &'static str,
}

impl Status {
    pub const OK: Status = Status {
        code: 200,
        reason: "Connection established",
    };
    pub const BAD_REQUEST: Status = Status {
        code: 400,
        reason: "Bad Request",
    };
    pub const PAYMENT_REQUIRED: Status = Status {
        code: 402,
        reason: "Payment Required",
    };
    pub const FORBIDDEN: Status = Status {
        code: 403,
        reason: "Forbidden",
    };
    pub const METHOD_NOT_ALLOWED: Status = Status {
        code: 405,
        reason: "Method Not Allowed",
    };
    pub const HEADERS_TOO_LARGE: Status = Status {
        code: 431,
        reason: "Request Header Fields Too Large",
    };
    pub const BAD_GATEWAY: Status = Status {
        code: 502,
        reason: "Bad Gateway",
    };
    pub const SERVICE_UNAVAILABLE: Status = Status {
        code: 503,
        reason: "Service Unavailable",
    };
    pub const GATEWAY_TIMEOUT: Status = Status {
        code: 504,
        reason: "Gateway Timeout",
    };
}

/// What the proxy answers a request it does not tunnel.
pub const PLAIN_HTTP_REFUSED: &str = "This is Murmur's HTTP CONNECT proxy: it only tunnels \
    CONNECT requests (https:// URLs). Plain http:// requests are not forwarded; use an \
    https:// URL, or the SOCKS5 port (socks5h://) for plain HTTP.\n";

/// Why a request was refused (each is counted by the driver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HttpConnectError {
    #[error("a plain-HTTP request (method {0}): only CONNECT is tunnelled")]
    NotConnect(String),
    #[error("the request head is over {MAX_HEAD} bytes or {MAX_HEADERS} headers")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

impl HttpConnectError {
    /// The status it is answered with.
    pub fn status(&self) -> Status {
        match self {
            HttpConnectError::NotConnect(_) => Status::METHOD_NOT_ALLOWED,
            HttpConnectError::TooLarge => Status::HEADERS_TOO_LARGE,
            HttpConnectError::Malformed(_) => Status::BAD_REQUEST,
        }
    }

    /// The whole response: the status and a body that says what to do instead.
    pub fn response(&self) -> Vec<u8> {
        match self {
            HttpConnectError::NotConnect(_) => {
                response_with(self.status(), &[("Allow", "CONNECT")], PLAIN_HTTP_REFUSED)
            }
            other => response(other.status(), &format!("{other}\n")),
        }
    }
}

/// A response that ends the connection: `status`, then `body` as plain text.
pub fn response(status: Status, body: &str) -> Vec<u8> {
    response_with(status, &[], body)
}

fn response_with(status: Status, headers: &[(&str, &str)], body: &str) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {} {}\r\n", status.code, status.reason);
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    out.into_bytes()
}

/// The answer once the tunnel is open; the tunnelled bytes follow it.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// The status and body for a stream refused with SOCKS5 reply `code` (the codes the session
/// and the exit give, [`crate::socks::reply`]).
pub fn refusal_status(code: u8) -> (Status, &'static str) {
    match code {
        reply::NOT_ALLOWED => (
            Status::FORBIDDEN,
            "not allowed: no exit's policy allows this destination\n",
        ),
        reply::NETWORK_UNREACHABLE => (
            Status::BAD_GATEWAY,
            "network unreachable: the mixnet has no route to an exit for this destination\n",
        ),
        reply::HOST_UNREACHABLE => (
            Status::BAD_GATEWAY,
            "host unreachable: the exit could not resolve or reach the host\n",
        ),
        reply::CONNECTION_REFUSED => (
            Status::BAD_GATEWAY,
            "connection refused: the destination refused the exit's connection\n",
        ),
        reply::TTL_EXPIRED => (
            Status::GATEWAY_TIMEOUT,
            "timed out: the exit did not answer in time\n",
        ),
        _ => (
            Status::BAD_GATEWAY,
            "general failure: the stream could not be opened through the mixnet\n",
        ),
    }
}

/// A CONNECT request the proxy tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectRequest {
    pub target: Target,
    /// The `Proxy-Authorization: Basic` user and password, if given: a stream-isolation
    /// token, as RFC 1929 credentials are over SOCKS5 (the same pair isolates alike).
    pub isolation: Option<(Vec<u8>, Vec<u8>)>,
}

impl ConnectRequest {
    /// The request head a client sends for this request, which [`HttpConnect`] reads back as
    /// it. Fails for what no request can carry: a host name the parser would refuse, or a
    /// user name with a colon (RFC 7617 splits user and password at the first one).
    pub fn encode(&self) -> Result<Vec<u8>, HttpConnectError> {
        let authority = match &self.target {
            Target::Addr(a) => a.to_string(),
            Target::Host(host, port) => {
                if !valid_host_name(host.as_bytes()) || host.parse::<IpAddr>().is_ok() {
                    return Err(HttpConnectError::Malformed("host name cannot be sent"));
                }
                format!("{host}:{port}")
            }
        };
        let mut out = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
        if let Some((user, pass)) = &self.isolation {
            if user.contains(&b':') {
                return Err(HttpConnectError::Malformed("user name contains a colon"));
            }
            let mut credentials = user.clone();
            credentials.push(b':');
            credentials.extend_from_slice(pass);
            out.extend_from_slice(b"Proxy-Authorization: Basic ");
            out.extend_from_slice(base64_encode(&credentials).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        Ok(out)
    }
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read more bytes and call again.
    NeedMore,
    /// The head is read (and removed from the buffer, which keeps what followed it); answer
    /// with [`CONNECT_ESTABLISHED`] once the stream opens, or with [`refusal_status`].
    Request(ConnectRequest),
    /// Write `response` and close the connection.
    Refuse {
        response: Vec<u8>,
        error: HttpConnectError,
    },
}

/// Reads one CONNECT request head.
#[derive(Debug, Default)]
pub struct HttpConnect {
    /// How far the buffer was searched for the end of the head (so a head fed byte by byte
    /// is not searched again from the start each time).
    searched: usize,
    done: bool,
}

impl HttpConnect {
    pub fn new() -> Self {
        Self::default()
    }

    /// Looks for a complete head at the front of `buf` and says what to do.
    pub fn step(&mut self, buf: &mut Vec<u8>) -> Step {
        if self.done {
            return Step::NeedMore;
        }
        let window = buf.len().min(MAX_HEAD);
        let from = self.searched.saturating_sub(3);
        let end = buf
            .get(from..window)
            .and_then(|w| w.windows(4).position(|w| w == b"\r\n\r\n"))
            .map(|i| from + i + 4);
        let Some(end) = end else {
            if buf.len() >= MAX_HEAD {
                return self.refuse(HttpConnectError::TooLarge);
            }
            self.searched = buf.len();
            return Step::NeedMore;
        };
        self.done = true;
        // The head without its empty last line, so every line ends in CRLF.
        match parse_head(&buf[..end - 2]) {
            Ok(request) => {
                buf.drain(..end);
                Step::Request(request)
            }
            Err(error) => self.refuse(error),
        }
    }

    fn refuse(&mut self, error: HttpConnectError) -> Step {
        self.done = true;
        Step::Refuse {
            response: error.response(),
            error,
        }
    }
}

/// Parses the head's lines, each ending in CRLF (the empty line that ends it removed).
fn parse_head(head: &[u8]) -> Result<ConnectRequest, HttpConnectError> {
    let head = head.strip_suffix(b"\n").unwrap_or(head);
    let mut lines = head.split(|&b| b == b'\n').map(|l| {
        l.strip_suffix(b"\r")
            .ok_or(HttpConnectError::Malformed("a line does not end in CRLF"))
    });
    let request_line = lines
        .next()
        .ok_or(HttpConnectError::Malformed("no request line"))??;
    let mut parts = request_line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpConnectError::Malformed(
            "the request line is not `METHOD target HTTP/1.1`",
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_token(b)) {
        return Err(HttpConnectError::Malformed("the method is not a token"));
    }
    if version != b"HTTP/1.1" && version != b"HTTP/1.0" {
        return Err(HttpConnectError::Malformed("not HTTP/1.0 or HTTP/1.1"));
    }
    if method != b"CONNECT" {
        // Every method is a token, so this is ASCII.
        return Err(HttpConnectError::NotConnect(
            String::from_utf8_lossy(method).into_owned(),
        ));
    }
    let target = parse_authority(target)?;
    let mut isolation = None;
    let mut headers = 0;
    for line in lines {
        let line = line?;
        headers += 1;
        if headers > MAX_HEADERS {
            return Err(HttpConnectError::TooLarge);
        }
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HttpConnectError::Malformed("a header line has no colon"))?;
        let (name, value) = (&line[..colon], trim_ows(&line[colon + 1..]));
        if name.is_empty() || !name.iter().all(|&b| is_token(b)) {
            // Also catches obsolete line folding (a line that starts with white space).
            return Err(HttpConnectError::Malformed("a header name is not a token"));
        }
        if name.eq_ignore_ascii_case(b"proxy-authorization") {
            if isolation.is_some() {
                return Err(HttpConnectError::Malformed(
                    "Proxy-Authorization given twice",
                ));
            }
            isolation = Some(parse_basic(value)?);
        }
    }
    Ok(ConnectRequest { target, isolation })
}

/// `host:port`, `a.b.c.d:port` or `[v6]:port`; an address written as a name is an address.
fn parse_authority(authority: &[u8]) -> Result<Target, HttpConnectError> {
    let malformed = HttpConnectError::Malformed;
    let colon = authority
        .iter()
        .rposition(|&b| b == b':')
        .ok_or_else(|| malformed("the CONNECT target has no port"))?;
    let (host, port) = (&authority[..colon], &authority[colon + 1..]);
    let port = parse_port(port).ok_or_else(|| malformed("the CONNECT port is not 1 to 65535"))?;
    if let Some(v6) = host.strip_prefix(b"[").and_then(|h| h.strip_suffix(b"]")) {
        let ip = std::str::from_utf8(v6)
            .ok()
            .and_then(|s| s.parse::<Ipv6Addr>().ok())
            .ok_or_else(|| malformed("the bracketed CONNECT host is not an IPv6 address"))?;
        return Ok(Target::Addr(SocketAddr::new(IpAddr::V6(ip), port)));
    }
    if !valid_host_name(host) {
        return Err(malformed("the CONNECT host is not a host name or address"));
    }
    // ASCII by the check above.
    let host = String::from_utf8_lossy(host).into_owned();
    // (An unbracketed IPv6 address has colons, which no host name has.)
    Ok(match host.parse::<Ipv4Addr>() {
        Ok(ip) => Target::Addr(SocketAddr::new(IpAddr::V4(ip), port)),
        Err(_) => Target::Host(host, port),
    })
}

/// A port in decimal, 1 to 65535, without sign or leading zeros beyond five digits.
fn parse_port(digits: &[u8]) -> Option<u16> {
    if digits.is_empty() || digits.len() > 5 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let port = digits
        .iter()
        .fold(0u32, |n, &d| n * 10 + u32::from(d - b'0'));
    u16::try_from(port).ok().filter(|&p| p != 0)
}

/// A DNS name (letters, digits, `-`, `_`, `.`), 1 to [`MAX_HOST`] bytes.
fn valid_host_name(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `Basic <base64 of user:password>` (the scheme in any case).
fn parse_basic(value: &[u8]) -> Result<(Vec<u8>, Vec<u8>), HttpConnectError> {
    let malformed = HttpConnectError::Malformed;
    let space = value
        .iter()
        .position(|&b| b == b' ')
        .ok_or_else(|| malformed("Proxy-Authorization is not `Basic <credentials>`"))?;
    if !value[..space].eq_ignore_ascii_case(b"basic") {
        return Err(malformed("only Basic proxy authorization is understood"));
    }
    let decoded = base64_decode(trim_ows(&value[space + 1..]))
        .ok_or_else(|| malformed("the Basic proxy credentials are not base64"))?;
    let colon = decoded
        .iter()
        .position(|&b| b == b':')
        .ok_or_else(|| malformed("the Basic proxy credentials have no colon"))?;
    Ok((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A `tchar` of RFC 9110 §5.6.2.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding (RFC 4648 §4), as Basic credentials are written.
fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= group.len() {
                out.push(char::from(BASE64[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard padded base64; `None` if it is not that.
fn base64_decode(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let groups = text.len() / 4;
    for (g, group) in text.chunks(4).enumerate() {
        let pad = group.iter().rev().take_while(|&&b| b == b'=').count();
        if pad > 2 || (pad > 0 && g + 1 != groups) {
            return None;
        }
        let mut n = 0u32;
        for (i, &c) in group[..4 - pad].iter().enumerate() {
            let v = BASE64.iter().position(|&a| a == c)?;
            n |= (v as u32) << (18 - 6 * i);
        }
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `input` in chunks; returns the outcome and what is left in the buffer with
    /// the unread input after it.
    fn run(input: &[u8], chunk: usize) -> (Option<Step>, Vec<u8>) {
        crate::fuzz_entry::http_connect_run(input, chunk)
    }

    fn request(input: &[u8]) -> ConnectRequest {
        match run(input, input.len()).0 {
            Some(Step::Request(r)) => r,
            other => panic!("not accepted: {other:?}"),
        }
    }

    fn refusal(input: &[u8]) -> HttpConnectError {
        match run(input, input.len()).0 {
            Some(Step::Refuse { error, response }) => {
                let text = String::from_utf8(response).unwrap();
                assert!(text.starts_with(&format!("HTTP/1.1 {} ", error.status().code)));
                error
            }
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn connect_to_names_and_addresses() {
        let r = request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n");
        assert_eq!(r.target, Target::Host("example.com".into(), 443));
        assert_eq!(r.isolation, None);
        let r = request(b"CONNECT 10.0.0.1:8443 HTTP/1.0\r\n\r\n");
        assert_eq!(r.target, Target::Addr("10.0.0.1:8443".parse().unwrap()));
        let r = request(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nUser-Agent: curl\r\n\r\n");
        assert_eq!(r.target, Target::Addr("[2001:db8::1]:443".parse().unwrap()));
    }

    #[test]
    fn basic_credentials_are_the_isolation_token() {
        // "bob:pw:x" — the password may hold colons.
        let r = request(
            b"CONNECT a.example:443 HTTP/1.1\r\nproxy-authorization:  basic Ym9iOnB3Ong= \r\n\r\n",
        );
        assert_eq!(r.isolation, Some((b"bob".to_vec(), b"pw:x".to_vec())));
        for bad in [
            &b"Proxy-Authorization: Bearer abc\r\n"[..],
            b"Proxy-Authorization: Basic Ym9i\r\n", // no colon
            b"Proxy-Authorization: Basic ***=\r\n",
            b"Proxy-Authorization: Basic Og==\r\nProxy-Authorization: Basic Og==\r\n",
        ] {
            let mut input = b"CONNECT a.example:443 HTTP/1.1\r\n".to_vec();
            input.extend(bad);
            input.extend(b"\r\n");
            assert!(matches!(refusal(&input), HttpConnectError::Malformed(_)));
        }
    }

    #[test]
    fn plain_http_is_refused_with_405_and_says_what_to_use() {
        for input in [
            &b"GET http://example.com/ HTTP/1.1\r\nHost: example.com\r\n\r\n"[..],
            b"POST http://example.com/x HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ] {
            let (step, _) = run(input, 7);
            let Some(Step::Refuse { response, error }) = step else {
                panic!("accepted {input:?}");
            };
            assert!(matches!(error, HttpConnectError::NotConnect(_)));
            let text = String::from_utf8(response).unwrap();
            assert!(
                text.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
                "{text}"
            );
            assert!(text.contains("\r\nAllow: CONNECT\r\n"));
            assert!(text.ends_with(PLAIN_HTTP_REFUSED));
            assert!(text.contains(&format!("Content-Length: {}\r\n", PLAIN_HTTP_REFUSED.len())));
        }
    }

    #[test]
    fn malformed_requests_get_400() {
        for input in [
            &b"CONNECT example.com HTTP/1.1\r\n\r\n"[..], // no port
            b"CONNECT example.com:0 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:65536 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:+80 HTTP/1.1\r\n\r\n",
            b"CONNECT ex%41mple.com:80 HTTP/1.1\r\n\r\n",
            b"CONNECT 2001:db8::1:443 HTTP/1.1\r\n\r\n",
            b"CONNECT [zz::1]:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/2.0\r\n\r\n",
            b"CONNECT  example.com:443 HTTP/1.1\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nno colon here\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\nHost: a\r\n\r\n",
            b"CONNECT example.com:443 HTTP/1.1\r\n\nHost: a\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        ] {
            assert!(
                matches!(refusal(input), HttpConnectError::Malformed(_)),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        let long_host = format!("CONNECT {}:443 HTTP/1.1\r\n\r\n", "a".repeat(256));
        assert!(matches!(
            refusal(long_host.as_bytes()),
            HttpConnectError::Malformed(_)
        ));
    }

    #[test]
    fn too_long_heads_get_431() {
        // No end of head within MAX_HEAD bytes: refused without waiting for more.
        let mut input = b"CONNECT example.com:443 HTTP/1.1\r\nX: ".to_vec();
        input.resize(MAX_HEAD, b'a');
        let (step, _) = run(&input, 1000);
        assert!(matches!(
            step,
            Some(Step::Refuse {
                error: HttpConnectError::TooLarge,
                ..
            })
        ));
        let mut many = b"CONNECT example.com:443 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(refusal(&many), HttpConnectError::TooLarge);
    }

    #[test]
    fn bytes_after_the_head_stay_in_the_buffer() {
        // A client that sends its TLS ClientHello right behind the CONNECT.
        let hello = b"\x16\x03\x01\x00\x05hello";
        let mut input = b"CONNECT example.com:443 HTTP/1.1\r\n\r\n".to_vec();
        input.extend(hello);
        for chunk in [1, 5, input.len()] {
            let (step, rest) = run(&input, chunk);
            assert!(matches!(step, Some(Step::Request(_))));
            assert_eq!(rest, hello, "chunk {chunk}");
        }
    }

    #[test]
    fn refusals_of_streams_map_to_statuses() {
        assert_eq!(refusal_status(reply::NOT_ALLOWED).0.code, 403);
        assert_eq!(refusal_status(reply::NETWORK_UNREACHABLE).0.code, 502);
        assert_eq!(refusal_status(reply::HOST_UNREACHABLE).0.code, 502);
        assert_eq!(refusal_status(reply::CONNECTION_REFUSED).0.code, 502);
        assert_eq!(refusal_status(reply::TTL_EXPIRED).0.code, 504);
        assert_eq!(refusal_status(reply::GENERAL_FAILURE).0.code, 502);
        let (status, body) = refusal_status(reply::CONNECTION_REFUSED);
        let text = String::from_utf8(response(status, body)).unwrap();
        assert!(text.starts_with("HTTP/1.1 502 Bad Gateway\r\n"));
        assert!(text.ends_with(
            "\r\n\r\nconnection refused: the destination refused the exit's connection\n"
        ));
    }

    #[test]
    fn base64_round_trips() {
        for (plain, coded) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64_encode(plain), coded);
            assert_eq!(base64_decode(coded.as_bytes()).unwrap(), plain);
        }
        for bad in [&b"Zg="[..], b"Z===", b"Zg==Zg==", b"Zm9*"] {
            assert_eq!(base64_decode(bad), None);
        }
    }

    fn targets() -> impl Strategy<Value = Target> {
        prop_oneof![
            ("[a-z][a-z0-9-]{0,20}(\\.[a-z]{2,6}){0,2}", 1u16..)
                .prop_map(|(h, p)| Target::Host(h, p)),
            (any::<[u8; 4]>(), 1u16..).prop_map(|(ip, p)| Target::Addr(SocketAddr::from((ip, p)))),
            (any::<[u8; 16]>(), 1u16..).prop_map(|(ip, p)| Target::Addr(SocketAddr::from((ip, p)))),
        ]
    }

    fn requests() -> impl Strategy<Value = ConnectRequest> {
        let user =
            proptest::collection::vec(any::<u8>().prop_filter("no colon", |&b| b != b':'), 0..20);
        let pass = proptest::collection::vec(any::<u8>(), 0..20);
        (targets(), proptest::option::of((user, pass)))
            .prop_map(|(target, isolation)| ConnectRequest { target, isolation })
    }

    proptest! {
        #[test]
        fn an_encoded_request_reads_back_as_itself(req in requests(), chunk in 1usize..40, after in proptest::collection::vec(any::<u8>(), 0..50)) {
            let mut input = req.encode().unwrap();
            input.extend(&after);
            let (step, rest) = run(&input, chunk);
            prop_assert_eq!(step, Some(Step::Request(req)));
            prop_assert_eq!(rest, after);
        }

        #[test]
        fn any_chunking_gives_the_same_result(input in proptest::collection::vec(any::<u8>(), 0..400), chunk in 1usize..50) {
            prop_assert_eq!(run(&input, chunk), run(&input, input.len()));
        }

        #[test]
        fn arbitrary_heads_never_panic_and_accepted_ones_re_encode(
            line in "[A-Z]{1,8} [a-z0-9.:\\[\\]%]{0,30} HTTP/1\\.[01]",
            headers in proptest::collection::vec("[A-Za-z-]{0,20}: ?[ -~]{0,40}", 0..5),
            chunk in 1usize..30,
        ) {
            let mut input = format!("{line}\r\n");
            for h in headers {
                input.push_str(&h);
                input.push_str("\r\n");
            }
            input.push_str("\r\n");
            let (step, _) = run(input.as_bytes(), chunk);
            if let Some(Step::Request(req)) = step
                && let Ok(again) = req.encode()
            {
                prop_assert_eq!(run(&again, 1).0, Some(Step::Request(req)));
            }
        }
    }
}
