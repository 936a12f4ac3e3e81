//! The ledger's TOML configuration: a versioned schema, unknown keys refused.
//!
//! `ledger/ledger.example.toml` documents every option with its default; a test checks that
//! the example, with every setting uncommented, parses to exactly the defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use murmur_protocol::directory::IdentityKey;
use murmur_service::HttpLimits;
use serde::{Deserialize, Serialize};

use crate::guard::RateLimits;
use crate::ledger::Params;
use crate::{Error, Result};

/// The config schema this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// The database's file name inside the state directory.
pub const DATABASE_FILE: &str = "ledger.redb";

/// The whole config file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// Where the HTTP API (and `/metrics`) listens.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The ledger's Ed25519 identity key, which signs every answer
    /// (`murmur-ledger keygen --out FILE`); relays and clients are given its public half.
    /// Relative paths are relative to the config file's directory.
    #[serde(default = "default_key_file")]
    pub key_file: PathBuf,
    /// Where the database (`ledger.redb`) lives. Relative paths are relative to the config
    /// file's directory.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Time between warning and withdrawing (whole seconds; Orchid uses a day); at least
    /// `redeem_window`.
    #[serde(default = "default_notice_period", with = "humantime_serde")]
    pub notice_period: Duration,
    /// The longest a relay may hold a winning ticket before redeeming it: relays redeem a
    /// ticket only once the Sphinx key of its epoch retires (one epoch plus their
    /// `key_grace`), at their next `redeem_interval`, and retry until its expiry, which they
    /// require to be `min_redeem_window` past that. A payer who warns must not be able to
    /// withdraw before then, so `notice_period` may not be shorter. The default is the relays'
    /// defaults: 20 min + 20 min + 1 min + 30 min.
    #[serde(default = "default_redeem_window", with = "humantime_serde")]
    pub redeem_window: Duration,
    /// How far a request's timestamp may be from the ledger's clock (whole seconds, ≥ 1s);
    /// request nonces are remembered this long.
    #[serde(default = "default_request_window", with = "humantime_serde")]
    pub request_window: Duration,
    /// How often expired redeemed-ticket records and old request nonces are removed.
    #[serde(default = "default_prune_interval", with = "humantime_serde")]
    pub prune_interval: Duration,
    #[serde(default)]
    pub limits: Limits,
    /// The accounts credited when the database is created: all the money there will be.
    #[serde(default)]
    pub genesis: Vec<GenesisEntry>,
}

/// One account credited at creation (a local network's faucet).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenesisEntry {
    /// The account's Ed25519 key, 64 hex digits.
    pub account: String,
    /// Base units credited.
    pub amount: u64,
}

/// Bounds on what the server may use.
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
    /// Signed requests per second one key may send, on average (checked once its signature
    /// is), and at once.
    pub requests_per_key_per_second: u32,
    pub request_burst_per_key: u32,
    /// Write transactions per second in all, on average, and at once.
    pub writes_per_second: u32,
    pub write_burst: u32,
    /// Keys whose request rates are tracked at once.
    pub tracked_keys: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 256,
            // A relay holds up to 24 at once (8 redemptions, 16 pot lookups).
            max_connections_per_address: 32,
            header_timeout: Duration::from_secs(5),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            requests_per_key_per_second: 20,
            request_burst_per_key: 40,
            writes_per_second: 500,
            write_burst: 1000,
            tracked_keys: 65_536,
        }
    }
}

impl Limits {
    /// The request rate limits.
    pub fn rate(&self) -> RateLimits {
        RateLimits {
            per_key_per_second: self.requests_per_key_per_second,
            per_key_burst: self.request_burst_per_key,
            writes_per_second: self.writes_per_second,
            write_burst: self.write_burst,
            max_tracked_keys: self.tracked_keys,
        }
    }

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
    SocketAddr::from(([127, 0, 0, 1], 7080))
}

fn default_key_file() -> PathBuf {
    PathBuf::from("ledger.key")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}

fn default_notice_period() -> Duration {
    Duration::from_secs(24 * 60 * 60)
}

/// [`Config::redeem_window`]'s default: the relays' defaults (epoch 20 min, key grace
/// 20 min, redeem interval 1 min, redeem window 30 min).
pub const DEFAULT_REDEEM_WINDOW: Duration = Duration::from_secs(71 * 60);

fn default_redeem_window() -> Duration {
    DEFAULT_REDEEM_WINDOW
}

fn default_request_window() -> Duration {
    Duration::from_secs(5 * 60)
}

fn default_prune_interval() -> Duration {
    Duration::from_secs(10 * 60)
}

impl Config {
    /// The defaults, with no genesis entries.
    pub fn with_defaults() -> Self {
        Config {
            version: CONFIG_VERSION,
            listen: default_listen(),
            key_file: default_key_file(),
            state_dir: default_state_dir(),
            notice_period: default_notice_period(),
            redeem_window: default_redeem_window(),
            request_window: default_request_window(),
            prune_interval: default_prune_interval(),
            limits: Limits::default(),
            genesis: Vec::new(),
        }
    }

    /// Parses TOML text (no path resolution, no validation).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        toml::from_str(text).map_err(|e| Error::ConfigParse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads, parses and validates a config file; a relative `key_file` or `state_dir` is
    /// resolved against the file's directory.
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
        for (name, d, min) in [
            ("notice_period", self.notice_period, 0),
            ("request_window", self.request_window, 1),
        ] {
            if d.subsec_nanos() != 0 || d.as_secs() < min {
                return Err(Error::Config(format!(
                    "{name} must be whole seconds, at least {min}s"
                )));
            }
        }
        if self.notice_period < self.redeem_window {
            return Err(Error::Config(format!(
                "notice_period ({:?}) is shorter than redeem_window ({:?}): a payer could warn \
                 and withdraw a pot before relays redeem the tickets it paid them with",
                self.notice_period, self.redeem_window
            )));
        }
        self.limits.rate().check().map_err(Error::Config)?;
        if self.prune_interval < Duration::from_secs(1) {
            return Err(Error::Config("prune_interval must be at least 1s".into()));
        }
        self.limits.http().check("limits").map_err(Error::Config)?;
        let genesis = self.genesis()?;
        let mut keys: Vec<_> = genesis.iter().map(|(k, _)| *k).collect();
        keys.sort();
        keys.dedup();
        if keys.len() != genesis.len() {
            return Err(Error::Config("a genesis account is listed twice".into()));
        }
        genesis
            .iter()
            .try_fold(0u64, |sum, (_, amount)| sum.checked_add(*amount))
            .ok_or_else(|| Error::Config("genesis amounts add up to more than 2^64 − 1".into()))?;
        Ok(())
    }

    /// The genesis entries as keys and amounts.
    pub fn genesis(&self) -> Result<Vec<(IdentityKey, u64)>> {
        self.genesis
            .iter()
            .map(|g| {
                let key = IdentityKey::from_hex(&g.account)
                    .and_then(|k| k.verifying_key().map(|_| k))
                    .map_err(|e| Error::Config(format!("genesis account {:?}: {e}", g.account)))?;
                Ok((key, g.amount))
            })
            .collect()
    }

    /// The ledger's rules.
    pub fn params(&self) -> Params {
        Params {
            notice_period_s: self.notice_period.as_secs(),
            request_window_s: self.request_window.as_secs(),
        }
    }

    /// The database file.
    pub fn database_path(&self) -> PathBuf {
        self.state_dir.join(DATABASE_FILE)
    }

    /// The ledger's signing key, read from `key_file`.
    pub fn signing_key(&self) -> Result<SigningKey> {
        let path = &self.key_file;
        if !path.exists() {
            return Err(Error::Key {
                path: path.clone(),
                message: format!(
                    "does not exist; create it with `murmur-ledger keygen --out {}` and give \
                     the identity it prints to every relay and client as `ledger_key`",
                    path.display()
                ),
            });
        }
        murmur_service::keys::load(path).map_err(|e| Error::Key {
            path: path.clone(),
            message: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use murmur_service::uncomment_example;

    use super::*;

    const EXAMPLE: &str = include_str!("../ledger.example.toml");

    #[test]
    fn the_example_config_is_the_defaults() {
        let path = Path::new("ledger.example.toml");
        let as_shipped = Config::parse(EXAMPLE, path).unwrap();
        let uncommented = Config::parse(&uncomment_example(EXAMPLE), path).unwrap();
        let mut expected = Config::with_defaults();
        expected.genesis = as_shipped.genesis.clone();
        assert_eq!(as_shipped, expected);
        assert_eq!(
            uncommented, expected,
            "a commented value differs from the default"
        );
        assert_eq!(as_shipped.genesis.len(), 2);
        as_shipped.validate().unwrap();
    }

    #[test]
    fn unknown_keys_other_versions_and_bad_genesis_are_refused() {
        let path = Path::new("x.toml");
        assert!(Config::parse("version = 1\n", path).is_ok());
        let err = Config::parse("version = 1\ncolour = 1\n", path).unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        assert!(Config::parse("version = 1\n[limits]\nmax_conns = 1\n", path).is_err());
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.limits.max_connections_per_address = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("per_address")
        );
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.limits.header_timeout = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("header_timeout")
        );
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.notice_period = Duration::ZERO;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("redeem_window"),
            "a notice period shorter than the relays' redeem window"
        );
        c.redeem_window = Duration::ZERO;
        c.validate().unwrap();
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.limits.writes_per_second = 0;
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("writes_per_second")
        );
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.version = 2;
        assert!(c.validate().unwrap_err().to_string().contains("version"));
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.request_window = Duration::from_millis(1500);
        assert!(c.validate().is_err());
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.genesis.push(c.genesis[0].clone());
        assert!(c.validate().unwrap_err().to_string().contains("twice"));
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.genesis[0].amount = u64::MAX;
        assert!(c.validate().unwrap_err().to_string().contains("2^64"));
        let mut c = Config::parse(EXAMPLE, path).unwrap();
        c.genesis[0].account = "00".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("genesis account")
        );
    }
}
