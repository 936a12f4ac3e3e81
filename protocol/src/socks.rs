//! The SOCKS5 server handshake (RFC 1928, with RFC 1929 user/password), sans-IO.
//!
//! Hand-written rather than taken from a crate: the handshake is small, and Murmur needs
//! exactly Tor's behaviour (credentials as a stream-isolation token, domains passed through
//! unresolved, SOCKS4 and unsupported commands refused with the right code) on a state
//! machine that the tests can feed in arbitrary chunks.
//!
//! The driver reads bytes into a buffer and calls [`SocksHandshake::step`] until it says
//! what to do:
//! ```text
//! loop {
//!     match handshake.step(&mut buf) {
//!         Step::NeedMore => read more into buf,
//!         Step::Send(bytes) => write bytes,
//!         Step::Request(req) => break req,          // then reply with req.reply(...)
//!         Step::Refuse { reply, error } => { write reply; close }
//!     }
//! }
//! ```

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::stream::Target;

/// SOCKS5 reply codes (RFC 1928 §6).
pub mod reply {
    pub const SUCCEEDED: u8 = 0;
    pub const GENERAL_FAILURE: u8 = 1;
    pub const NOT_ALLOWED: u8 = 2;
    pub const NETWORK_UNREACHABLE: u8 = 3;
    pub const HOST_UNREACHABLE: u8 = 4;
    pub const CONNECTION_REFUSED: u8 = 5;
    pub const TTL_EXPIRED: u8 = 6;
    pub const COMMAND_NOT_SUPPORTED: u8 = 7;
    pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;
}

/// What went wrong in a handshake (each is counted by the driver).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SocksError {
    #[error("SOCKS4 is not supported; use SOCKS5")]
    Socks4,
    #[error("not a SOCKS request (version byte {0})")]
    BadVersion(u8),
    #[error("no acceptable authentication method offered")]
    NoAcceptableMethod,
    #[error("malformed user/password negotiation")]
    BadAuth,
    #[error("command {0} is not supported (only CONNECT)")]
    Command(u8),
    #[error("address type {0} is not supported")]
    AddressType(u8),
    #[error("malformed request: {0}")]
    Malformed(&'static str),
}

/// A CONNECT request that completed the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocksRequest {
    pub target: Target,
    /// The RFC 1929 user name and password, if given: streams with different credentials
    /// never share a path to an exit (stream isolation, as Tor Browser relies on).
    pub isolation: Option<(Vec<u8>, Vec<u8>)>,
}

impl SocksRequest {
    /// What a client sends for this request once the server chose its method: the RFC 1929
    /// user/password negotiation if the request carries credentials, then the CONNECT
    /// request (an address as its own type, a name as a domain name). The handshake reads
    /// these bytes back as this request; it also accepts a few forms this never writes (a
    /// non-zero reserved byte, an address sent as a name), which read as the same request.
    pub fn encode_client(&self) -> Result<Vec<u8>, SocksError> {
        let mut out = Vec::new();
        if let Some((user, pass)) = &self.isolation {
            let too_long = || SocksError::Malformed("user name or password over 255 bytes");
            out.push(1);
            out.push(u8::try_from(user.len()).map_err(|_| too_long())?);
            out.extend_from_slice(user);
            out.push(u8::try_from(pass.len()).map_err(|_| too_long())?);
            out.extend_from_slice(pass);
        }
        out.extend_from_slice(&[5, 1, 0]);
        match &self.target {
            Target::Addr(SocketAddr::V4(a)) => {
                out.push(1);
                out.extend_from_slice(&a.ip().octets());
            }
            Target::Addr(SocketAddr::V6(a)) => {
                out.push(4);
                out.extend_from_slice(&a.ip().octets());
            }
            Target::Host(host, _) => {
                let len = u8::try_from(host.len()).ok().filter(|&l| l > 0).ok_or(
                    SocksError::Malformed("host name is empty or over 255 bytes"),
                )?;
                out.push(3);
                out.push(len);
                out.extend_from_slice(host.as_bytes());
            }
        }
        out.extend_from_slice(&self.target.port().to_be_bytes());
        Ok(out)
    }

    /// The greeting a client sends for this request: the one method it needs.
    pub fn client_greeting(&self) -> [u8; 3] {
        [5, 1, if self.isolation.is_some() { 2 } else { 0 }]
    }
}

/// The SOCKS5 reply to a CONNECT: `code` from [`reply`]; the bound address is reported as
/// 0.0.0.0:0 because the real one is the exit's and must not be revealed.
pub fn connect_reply(code: u8) -> Vec<u8> {
    vec![5, code, 0, 1, 0, 0, 0, 0, 0, 0]
}

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Read more bytes and call again.
    NeedMore,
    /// Write these bytes, then call again.
    Send(Vec<u8>),
    /// The handshake is done; answer with [`connect_reply`] once the stream opens or fails.
    Request(SocksRequest),
    /// Write `reply` (possibly empty) and close the connection.
    Refuse { reply: Vec<u8>, error: SocksError },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Greeting,
    Auth,
    Request,
    Done,
}

/// The server side of one SOCKS5 handshake.
#[derive(Debug)]
pub struct SocksHandshake {
    state: State,
    isolation: Option<(Vec<u8>, Vec<u8>)>,
}

impl Default for SocksHandshake {
    fn default() -> Self {
        Self::new()
    }
}

impl SocksHandshake {
    pub fn new() -> Self {
        SocksHandshake {
            state: State::Greeting,
            isolation: None,
        }
    }

    /// Consumes what it can from the front of `buf` and says what to do.
    pub fn step(&mut self, buf: &mut Vec<u8>) -> Step {
        let refuse = |reply: Vec<u8>, error| Step::Refuse { reply, error };
        match self.state {
            State::Done => Step::NeedMore,
            State::Greeting => {
                let Some(&version) = buf.first() else {
                    return Step::NeedMore;
                };
                if version == 4 {
                    // SOCKS4 reply: VN=0, CD=91 (rejected).
                    self.state = State::Done;
                    return refuse(vec![0, 91, 0, 0, 0, 0, 0, 0], SocksError::Socks4);
                }
                if version != 5 {
                    self.state = State::Done;
                    return refuse(Vec::new(), SocksError::BadVersion(version));
                }
                let Some(&n) = buf.get(1) else {
                    return Step::NeedMore;
                };
                let n = usize::from(n);
                if buf.len() < 2 + n {
                    return Step::NeedMore;
                }
                let methods: Vec<u8> = buf.drain(..2 + n).skip(2).collect();
                if methods.contains(&2) {
                    self.state = State::Auth;
                    Step::Send(vec![5, 2])
                } else if methods.contains(&0) {
                    self.state = State::Request;
                    Step::Send(vec![5, 0])
                } else {
                    self.state = State::Done;
                    refuse(vec![5, 0xff], SocksError::NoAcceptableMethod)
                }
            }
            State::Auth => {
                // VER(1) ULEN UNAME PLEN PASSWD
                if buf.len() < 2 {
                    return Step::NeedMore;
                }
                if buf[0] != 1 {
                    self.state = State::Done;
                    return refuse(vec![1, 1], SocksError::BadAuth);
                }
                let ulen = usize::from(buf[1]);
                let Some(&plen) = buf.get(2 + ulen) else {
                    return Step::NeedMore;
                };
                let plen = usize::from(plen);
                if buf.len() < 3 + ulen + plen {
                    return Step::NeedMore;
                }
                let bytes: Vec<u8> = buf.drain(..3 + ulen + plen).collect();
                let user = bytes[2..2 + ulen].to_vec();
                let pass = bytes[3 + ulen..].to_vec();
                self.isolation = Some((user, pass));
                self.state = State::Request;
                Step::Send(vec![1, 0])
            }
            State::Request => {
                // VER CMD RSV ATYP ADDR PORT
                if buf.len() < 4 {
                    return Step::NeedMore;
                }
                if buf[0] != 5 {
                    self.state = State::Done;
                    return refuse(
                        connect_reply(reply::GENERAL_FAILURE),
                        SocksError::Malformed("request version is not 5"),
                    );
                }
                let (cmd, atyp) = (buf[1], buf[3]);
                let addr_len = match atyp {
                    1 => 4,
                    4 => 16,
                    3 => match buf.get(4) {
                        Some(&l) => 1 + usize::from(l),
                        None => return Step::NeedMore,
                    },
                    other => {
                        self.state = State::Done;
                        return refuse(
                            connect_reply(reply::ADDRESS_TYPE_NOT_SUPPORTED),
                            SocksError::AddressType(other),
                        );
                    }
                };
                let total = 4 + addr_len + 2;
                if buf.len() < total {
                    return Step::NeedMore;
                }
                let req: Vec<u8> = buf.drain(..total).collect();
                self.state = State::Done;
                if cmd != 1 {
                    return refuse(
                        connect_reply(reply::COMMAND_NOT_SUPPORTED),
                        SocksError::Command(cmd),
                    );
                }
                let port = u16::from_be_bytes([req[total - 2], req[total - 1]]);
                let addr = &req[4..4 + addr_len];
                let target = match atyp {
                    1 => {
                        let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
                        Target::Addr(SocketAddr::new(IpAddr::V4(ip), port))
                    }
                    4 => {
                        let mut a = [0u8; 16];
                        a.copy_from_slice(addr);
                        Target::Addr(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), port))
                    }
                    _ => {
                        let host = &addr[1..];
                        match std::str::from_utf8(host) {
                            Ok(h) if !h.is_empty() => match h.parse::<IpAddr>() {
                                // A literal address sent as a name is an address.
                                Ok(ip) => Target::Addr(SocketAddr::new(ip, port)),
                                Err(_) => Target::Host(h.to_string(), port),
                            },
                            _ => {
                                return refuse(
                                    connect_reply(reply::GENERAL_FAILURE),
                                    SocksError::Malformed("host name is empty or not UTF-8"),
                                );
                            }
                        }
                    }
                };
                Step::Request(SocksRequest {
                    target,
                    isolation: self.isolation.take(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Runs a handshake over `input` fed in chunks; returns what was sent and the outcome.
    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, Option<Step>) {
        let mut hs = SocksHandshake::new();
        let mut buf = Vec::new();
        let mut sent = Vec::new();
        let mut chunks = input.chunks(chunk.max(1));
        loop {
            match hs.step(&mut buf) {
                Step::NeedMore => match chunks.next() {
                    Some(c) => buf.extend_from_slice(c),
                    None => return (sent, None),
                },
                Step::Send(b) => sent.extend(b),
                done => return (sent, Some(done)),
            }
        }
    }

    #[test]
    fn connect_with_domain_and_credentials() {
        let mut input = vec![5, 2, 0, 2, 1, 3, b'b', b'o', b'b', 2, b'p', b'w'];
        input.extend([5, 1, 0, 3, 11]);
        input.extend(b"example.com");
        input.extend(443u16.to_be_bytes());
        let (sent, step) = run(&input, 3);
        assert_eq!(sent, vec![5, 2, 1, 0]);
        assert_eq!(
            step,
            Some(Step::Request(SocksRequest {
                target: Target::Host("example.com".into(), 443),
                isolation: Some((b"bob".to_vec(), b"pw".to_vec())),
            }))
        );
    }

    #[test]
    fn ipv4_ipv6_and_literal_names() {
        let (_, step) = run(&[5, 1, 0, 5, 1, 0, 1, 10, 0, 0, 1, 0, 80], 100);
        assert!(
            matches!(step, Some(Step::Request(SocksRequest { target: Target::Addr(a), .. })) if a == "10.0.0.1:80".parse().unwrap())
        );
        let mut v6 = vec![5, 1, 0, 5, 1, 0, 4];
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend(8080u16.to_be_bytes());
        let (_, step) = run(&v6, 1);
        assert!(
            matches!(step, Some(Step::Request(SocksRequest { target: Target::Addr(a), .. })) if a == "[::1]:8080".parse().unwrap())
        );
        let mut lit = vec![5, 1, 0, 5, 1, 0, 3, 9];
        lit.extend(b"127.0.0.1");
        lit.extend(80u16.to_be_bytes());
        let (_, step) = run(&lit, 2);
        assert!(matches!(
            step,
            Some(Step::Request(SocksRequest {
                target: Target::Addr(_),
                ..
            }))
        ));
    }

    #[test]
    fn refusals_carry_the_right_codes() {
        // SOCKS4 CONNECT.
        let (_, step) = run(&[4, 1, 0, 80, 1, 2, 3, 4, 0], 9);
        assert_eq!(
            step,
            Some(Step::Refuse {
                reply: vec![0, 91, 0, 0, 0, 0, 0, 0],
                error: SocksError::Socks4
            })
        );
        // BIND and UDP ASSOCIATE.
        for cmd in [2, 3] {
            let (_, step) = run(&[5, 1, 0, 5, cmd, 0, 1, 1, 2, 3, 4, 0, 80], 13);
            assert_eq!(
                step,
                Some(Step::Refuse {
                    reply: connect_reply(reply::COMMAND_NOT_SUPPORTED),
                    error: SocksError::Command(cmd)
                })
            );
        }
        // Unknown address type; no acceptable method; garbage.
        let (_, step) = run(&[5, 1, 0, 5, 1, 0, 9], 7);
        assert!(matches!(
            step,
            Some(Step::Refuse {
                error: SocksError::AddressType(9),
                ..
            })
        ));
        let (_, step) = run(&[5, 1, 0x80], 3);
        assert_eq!(
            step,
            Some(Step::Refuse {
                reply: vec![5, 0xff],
                error: SocksError::NoAcceptableMethod
            })
        );
        let (_, step) = run(b"GET / HTTP/1.1\r\n", 16);
        assert!(matches!(
            step,
            Some(Step::Refuse {
                error: SocksError::BadVersion(b'G'),
                ..
            })
        ));
    }

    #[test]
    fn a_request_encodes_to_what_the_handshake_reads_back() {
        let requests = [
            SocksRequest {
                target: Target::Host("example.com".into(), 443),
                isolation: Some((b"bob".to_vec(), Vec::new())),
            },
            SocksRequest {
                target: Target::Addr("10.0.0.1:80".parse().unwrap()),
                isolation: None,
            },
            SocksRequest {
                target: Target::Addr("[2001:db8::1]:8080".parse().unwrap()),
                isolation: None,
            },
        ];
        for req in requests {
            let mut input = req.client_greeting().to_vec();
            input.extend(req.encode_client().unwrap());
            assert_eq!(run(&input, 1).1, Some(Step::Request(req)));
        }
        let long = SocksRequest {
            target: Target::Host("a".repeat(256), 1),
            isolation: None,
        };
        assert!(long.encode_client().is_err());
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_result(
            host in "[a-z]{1,30}\\.[a-z]{2,5}",
            port: u16,
            user in proptest::collection::vec(any::<u8>(), 0..20),
            chunk in 1usize..40,
        ) {
            let mut input = vec![5, 2, 0, 2, 1, user.len() as u8];
            input.extend(&user);
            input.extend([0]);
            input.extend([5, 1, 0, 3, host.len() as u8]);
            input.extend(host.as_bytes());
            input.extend(port.to_be_bytes());
            let whole = run(&input, input.len());
            prop_assert_eq!(run(&input, chunk), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(input in proptest::collection::vec(any::<u8>(), 0..300), chunk in 1usize..50) {
            let _ = run(&input, chunk);
        }
    }
}
