//! The authority's TOML configuration: a versioned schema, unknown keys refused.
//!
//! `directory/authority.example.toml` documents every option with its default; a test checks
//! that the example, with every setting uncommented, parses to exactly the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use murmur_protocol::directory::{AuthoritySet, IdentityKey, NetworkParams};
use murmur_service::HttpLimits;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The config schema this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// The whole config file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// Where the HTTP API listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The authority's Ed25519 secret key (`murmur-directory keygen --out FILE`). Relative
    /// paths are relative to the config file's directory.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// Where descriptors and consensus documents are kept across restarts (relative paths as
    /// for `key_file`).
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Clock disagreement tolerated when checking document times.
    #[serde(default = "default_clock_skew", with = "humantime_serde")]
    pub clock_skew: Duration,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub network: Network,
    #[serde(default)]
    pub policy: Policy,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub probe: Probe,
    /// Every authority of the network, this one included.
    #[serde(default, rename = "authority")]
    pub authorities: Vec<AuthorityEntry>,
}

/// One authority of the network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityEntry {
    /// Its Ed25519 identity, 64 hex digits (printed by `keygen`).
    pub identity: String,
    /// Its base URL, e.g. `http://127.0.0.1:7070`.
    pub url: String,
}

/// When authorities vote and compute, relative to the start of the epoch the consensus is for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    /// Epoch length (whole seconds); relays rotate Sphinx keys each epoch.
    #[serde(with = "humantime_serde")]
    pub epoch_length: Duration,
    /// Votes for the next epoch's consensus are sent this long before it starts.
    #[serde(with = "humantime_serde")]
    pub vote_lead: Duration,
    /// The consensus is computed and signed this long before the epoch starts.
    #[serde(with = "humantime_serde")]
    pub compute_lead: Duration,
}

impl Default for Schedule {
    fn default() -> Self {
        // 20-minute epochs: vote at 60%, compute at 75% of the epoch before.
        Schedule {
            epoch_length: Duration::from_secs(20 * 60),
            vote_lead: Duration::from_secs(8 * 60),
            compute_lead: Duration::from_secs(5 * 60),
        }
    }
}

/// The Loopix parameters this authority votes for (the consensus takes the median).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// λ_P: client send rate, packets per second.
    pub lambda_p: f64,
    /// λ_L: client loop-cover rate, per second.
    pub lambda_l: f64,
    /// λ_D: client drop-cover rate, per second.
    pub lambda_d: f64,
    /// λ_M: relay loop-cover rate, per second.
    pub lambda_m: f64,
    /// μ: per-hop delay rate (mean hop delay 1/μ seconds).
    pub mu: f64,
    /// The longest a relay holds a packet.
    #[serde(with = "humantime_serde")]
    pub max_hop_delay: Duration,
    /// The most relays one IPv4 address or IPv6 /64 may have in the consensus.
    pub relays_per_address: u32,
}

impl Default for Network {
    fn default() -> Self {
        let p = NetworkParams::nym_like();
        Network {
            lambda_p: p.lambda_p,
            lambda_l: p.lambda_l,
            lambda_d: p.lambda_d,
            lambda_m: p.lambda_m,
            mu: p.mu,
            max_hop_delay: Duration::from_millis(p.max_hop_delay_ms),
            relays_per_address: p.relays_per_address,
        }
    }
}

/// How this authority tests relays before voting for them (see `crate::prober`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Probe {
    /// Test relays, and vote only for those that pass. Off only for a network whose
    /// authorities cannot reach its relays; every relay is then voted in unmeasured, at
    /// `unmeasured_weight`.
    pub enabled: bool,
    /// Where the prober accepts the links of relays delivering its test packets.
    pub listen: SocketAddr,
    /// The address published for `listen`, if relays must reach it at another one.
    pub advertise: Option<SocketAddr>,
    /// How often each relay is tested.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// Test packets per relay per round.
    pub packets: u32,
    /// How long a round waits for the handshake and for its packets to come back.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Rounds of history kept per relay (the performance score is over these).
    pub history: usize,
    /// A relay is voted for only if at least this share of its recent test packets came
    /// back, and at least half of the latest round's (Nym's network monitor keeps relays
    /// above 50%).
    pub min_performance: f64,
    /// The weight given to relays nobody measured (probing disabled): small, so that a relay's
    /// claim cannot lift it.
    pub unmeasured_weight: u32,
    /// Relays tested at once.
    pub concurrency: usize,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 7170)),
            advertise: None,
            interval: Duration::from_secs(60),
            packets: 16,
            timeout: Duration::from_secs(5),
            history: 8,
            min_performance: 0.5,
            unmeasured_weight: 20,
            concurrency: 32,
        }
    }
}

/// Which descriptors this authority accepts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Descriptors asking a higher price per packet are refused.
    pub max_price_per_packet: u64,
    /// A descriptor older than this is dropped; relays re-upload each epoch.
    #[serde(with = "humantime_serde")]
    pub descriptor_lifetime: Duration,
    /// Accept relays on loopback and private addresses (only for a local test network).
    pub allow_private_addresses: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_price_per_packet: 1_000_000,
            descriptor_lifetime: Duration::from_secs(3 * 60 * 60),
            allow_private_addresses: false,
        }
    }
}

/// Bounds on what the server and its peer traffic may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Simultaneous HTTP connections; more wait in the kernel's backlog.
    pub max_connections: usize,
    /// Simultaneous HTTP connections from one IPv4 address or IPv6 /64; more are closed.
    pub max_connections_per_address: usize,
    /// A request head must arrive whole within this time.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A request body must arrive within this time.
    #[serde(with = "humantime_serde")]
    pub body_timeout: Duration,
    /// A connection on which nothing moves for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Timeout of each request to a peer authority.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
    /// Descriptor uploads taken per minute from one IPv4 address or IPv6 /64 (a relay uploads
    /// about once an epoch); more are refused with 429.
    pub uploads_per_minute_per_address: u32,
    /// Descriptors held at most; when full, one that never passed a test makes room.
    pub max_descriptors: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            max_connections_per_address: 32,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            peer_timeout: Duration::from_secs(5),
            uploads_per_minute_per_address: 20,
            max_descriptors: 20_000,
        }
    }
}

impl Limits {
    /// The HTTP listener's bounds.
    pub fn http(&self) -> HttpLimits {
        HttpLimits {
            max_connections: self.max_connections,
            max_connections_per_address: self.max_connections_per_address,
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

fn default_key_file() -> PathBuf {
    PathBuf::from("authority.key")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

fn default_clock_skew() -> Duration {
    Duration::from_secs(30)
}

impl Config {
    /// The defaults, with no authorities listed (a usable config must list them).
    pub fn with_defaults() -> Self {
        Config {
            version: CONFIG_VERSION,
            listen: default_listen(),
            key_file: default_key_file(),
            state_dir: default_state_dir(),
            clock_skew: default_clock_skew(),
            schedule: Schedule::default(),
            network: Network::default(),
            policy: Policy::default(),
            limits: Limits::default(),
            probe: Probe::default(),
            authorities: Vec::new(),
        }
    }

    /// Parses TOML text (no path resolution, no validation).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ConfigParse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a config file; relative paths in it are resolved against
    /// the file's directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        config.key_file = base.join(&config.key_file);
        config.state_dir = base.join(&config.state_dir);
        config.validate()?;
        Ok(config)
    }

    /// Checks every value; each problem is named.
    pub fn validate(&self) -> Result<()> {
        if self.version != CONFIG_VERSION {
            return Err(Error::Config(format!(
                "version = {} is not supported; this build reads version {CONFIG_VERSION}",
                self.version
            )));
        }
        let s = &self.schedule;
        if s.epoch_length.subsec_nanos() != 0 || s.epoch_length < Duration::from_secs(2) {
            return Err(Error::Config(
                "schedule.epoch_length must be whole seconds, at least 2s".into(),
            ));
        }
        if !(Duration::ZERO < s.compute_lead
            && s.compute_lead < s.vote_lead
            && s.vote_lead < s.epoch_length)
        {
            return Err(Error::Config(
                "schedule needs 0 < compute_lead < vote_lead < epoch_length".into(),
            ));
        }
        self.params()
            .validate()
            .map_err(|e| Error::Config(format!("network: {e}")))?;
        self.limits.http().check("limits").map_err(Error::Config)?;
        if self.limits.uploads_per_minute_per_address == 0 || self.limits.max_descriptors == 0 {
            return Err(Error::Config(
                "limits.uploads_per_minute_per_address and limits.max_descriptors must be \
                 positive"
                    .into(),
            ));
        }
        let p = &self.probe;
        if p.packets == 0 || p.packets > 1024 {
            return Err(Error::Config("probe.packets must be 1 to 1024".into()));
        }
        if p.history == 0 || p.history > 1024 || p.concurrency == 0 || p.concurrency > 4096 {
            return Err(Error::Config(
                "probe.history must be 1 to 1024 and probe.concurrency 1 to 4096".into(),
            ));
        }
        if !(0.0..=1.0).contains(&p.min_performance) {
            return Err(Error::Config(
                "probe.min_performance must lie in [0, 1]".into(),
            ));
        }
        if p.interval.is_zero() || p.timeout.is_zero() || p.timeout > p.interval * 4 {
            return Err(Error::Config(
                "probe.interval and probe.timeout must be positive, the timeout at most four \
                 intervals"
                    .into(),
            ));
        }
        if self.authorities.is_empty() {
            return Err(Error::Config(
                "list every authority of the network, this one included, as [[authority]] \
                 tables with identity and url"
                    .into(),
            ));
        }
        for a in &self.authorities {
            IdentityKey::from_hex(&a.identity)
                .map_err(|e| Error::Config(format!("authority {:?}: {e}", a.identity)))?;
            if !(a.url.starts_with("http://") || a.url.starts_with("https://")) {
                return Err(Error::Config(format!(
                    "authority url {:?} must start with http:// or https://",
                    a.url
                )));
            }
        }
        let set = self.authority_set()?;
        if set.keys().len() != self.authorities.len() {
            return Err(Error::Config("an authority is listed twice".into()));
        }
        Ok(())
    }

    /// The configured authorities' keys.
    pub fn authority_set(&self) -> Result<AuthoritySet> {
        let keys = self
            .authorities
            .iter()
            .map(|a| IdentityKey::from_hex(&a.identity))
            .collect::<murmur_protocol::Result<Vec<_>>>()?;
        Ok(AuthoritySet::new(keys)?)
    }

    /// The network parameters this authority votes for.
    pub fn params(&self) -> NetworkParams {
        let n = &self.network;
        NetworkParams {
            lambda_p: n.lambda_p,
            lambda_l: n.lambda_l,
            lambda_d: n.lambda_d,
            lambda_m: n.lambda_m,
            mu: n.mu,
            max_hop_delay_ms: u64::try_from(n.max_hop_delay.as_millis()).unwrap_or(u64::MAX),
            epoch_length_s: self.schedule.epoch_length.as_secs(),
            relays_per_address: n.relays_per_address,
        }
    }
}

#[cfg(test)]
mod tests {
    use murmur_service::uncomment_example;

    use super::*;

    const EXAMPLE: &str = include_str!("../authority.example.toml");

    #[test]
    fn the_example_config_is_the_defaults() {
        let path = Path::new("authority.example.toml");
        let as_shipped = Config::parse(EXAMPLE, path).unwrap();
        let uncommented = Config::parse(&uncomment_example(EXAMPLE), path).unwrap();
        let mut expected = Config::with_defaults();
        expected.authorities = as_shipped.authorities.clone();
        assert_eq!(as_shipped, expected);
        assert_eq!(
            uncommented, expected,
            "a commented value differs from the default"
        );
        assert_eq!(as_shipped.authorities.len(), 3);
        as_shipped.validate().unwrap();
    }

    #[test]
    fn unknown_keys_and_other_versions_are_refused() {
        let path = Path::new("x.toml");
        let base = "version = 1\n[[authority]]\nidentity = \"00\"\nurl = \"http://a\"\n";
        assert!(Config::parse(base, path).is_ok());
        let err = Config::parse(&format!("colour = 1\n{base}"), path).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        let err = Config::parse(&format!("{base}\n[schedule]\nepoch = \"1s\"\n"), path);
        assert!(err.is_err());
        let mut c = Config::parse(&uncomment_example(EXAMPLE), path).unwrap();
        c.version = 2;
        assert!(c.validate().unwrap_err().to_string().contains("version"));
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.schedule.compute_lead = c.schedule.vote_lead;
        assert!(c.validate().is_err());
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.authorities.push(c.authorities[0].clone());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
    }
}
