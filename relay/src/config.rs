//! The relay's TOML configuration: one file, a schema version, unknown keys refused.
//!
//! Every option has a default except the ones an operator must decide (roles, family,
//! authorities). `relay.example.toml` beside this crate lists every option with its default;
//! a test checks the two agree.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use murmur_ledger::{ChainSection, SettlementChoice};
use murmur_protocol::directory::{ExitPolicy, IdentityKey};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The schema version this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Schema version; must be 1.
    pub version: u32,
    pub relay: RelaySection,
    #[serde(default)]
    pub listen: ListenSection,
    #[serde(default)]
    pub directory: DirectorySection,
    #[serde(default)]
    pub mixing: MixingSection,
    #[serde(default)]
    pub gateway: GatewaySection,
    #[serde(default)]
    pub exit: ExitSection,
    #[serde(default)]
    pub payments: PaymentsSection,
    /// Where the file was read from; relative paths are resolved against its directory.
    #[serde(skip)]
    pub base_dir: PathBuf,
}

/// What the relay is.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RelaySection {
    /// Ed25519 identity key file (`murmur-relay keygen` writes it).
    #[serde(default = "default_identity_key")]
    pub identity_key: PathBuf,
    /// Static X25519 key of the relay's Noise links, published in its descriptor
    /// (`murmur-relay keygen` writes it beside the identity key; created on first run if absent).
    #[serde(default = "default_link_key")]
    pub link_key: PathBuf,
    /// Sphinx keys, replay state and queues live here.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// The operator's name for its relays (shown only: anyone can write any name).
    pub family: String,
    /// The identities (hex) of the operator's other relays. Two relays are one family, and
    /// never share a path, only when each lists the other.
    #[serde(default)]
    pub family_members: Vec<String>,
    /// Any of "gateway", "mix", "exit".
    pub roles: Vec<Role>,
    /// Claimed capacity in packets per second: an upper bound on the path weight, which is
    /// what the authorities measure.
    #[serde(default = "default_bandwidth")]
    pub bandwidth: u32,
    /// Price per packet carried, in the ledger's base unit.
    #[serde(default = "default_price")]
    pub price_per_packet: u64,
}

/// A relay role.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Gateway,
    Mix,
    Exit,
}

/// Where the relay listens.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenSection {
    /// Relay-to-relay TCP.
    pub mix: SocketAddr,
    /// The address other relays are told to connect to (defaults to `mix`).
    pub advertise_mix: Option<SocketAddr>,
    /// Client WebSocket (gateways only).
    pub client: SocketAddr,
    /// The address clients are told to connect to (defaults to `client`), e.g. behind NAT or
    /// a TCP proxy: the link is end to end between client and gateway, so nothing on the way
    /// can read or alter it.
    pub advertise_client: Option<SocketAddr>,
    /// Prometheus `/metrics` (off unless set); loopback only unless you mean it.
    pub metrics: Option<SocketAddr>,
}

/// The directory authorities.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DirectorySection {
    pub authorities: Vec<AuthorityEntry>,
    /// Must match the authorities' epoch length.
    #[serde(with = "humantime_serde")]
    pub epoch_length: Duration,
    /// How long keys of the previous epoch are still accepted.
    #[serde(with = "humantime_serde")]
    pub key_grace: Duration,
    /// Clock disagreement tolerated when checking documents.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
}

/// One authority.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthorityEntry {
    /// Ed25519 identity, 64 hex digits.
    pub identity: String,
    /// Base URL, e.g. `http://127.0.0.1:7000`.
    pub url: String,
}

/// Mixing and queue bounds.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MixingSection {
    /// Longest hold; longer requested delays are clamped.
    #[serde(with = "humantime_serde")]
    pub max_hop_delay: Duration,
    /// Sphinx worker threads; 0 means one per core.
    pub workers: usize,
    /// Frames waiting for a worker; beyond it, frames are dropped and counted.
    pub input_queue: usize,
    /// Packets held for their delay at once; beyond it, dropped and counted.
    pub max_held_packets: usize,
    /// Frames queued per outgoing link; beyond it, dropped and counted.
    pub peer_queue: usize,
    /// Inbound relay links at once that finished their handshake.
    pub max_inbound_connections: usize,
    /// Inbound connections still in their Noise handshake, in all.
    pub max_handshakes: usize,
    /// Inbound connections still in their handshake from one address (an IPv4 address or an
    /// IPv6 /64).
    pub max_handshakes_per_address: usize,
    /// Time a relay link's Noise handshake may take (from accept, or from connect).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// An inbound relay link that brings no frame for this long is closed. Keep it longer than
    /// the 5 minutes after which relays close their own idle outbound links, so that links end
    /// on the side that knows when it next has something to send.
    #[serde(with = "humantime_serde")]
    pub link_idle_timeout: Duration,
    /// Replay tags each Sphinx key's filter is sized for.
    pub replay_capacity: u64,
    /// The replay filter's false-positive rate at capacity.
    pub replay_fp_rate: f64,
    /// Loop cover paths never hold two relays of one IPv4 /16 or IPv6 /32 (turn off only for
    /// a network on one host).
    pub distinct_subnets: bool,
}

/// The gateway role.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewaySection {
    /// Client sessions at once (connections that finished their handshake).
    pub max_clients: usize,
    /// Client sessions at once from one IP address.
    pub max_clients_per_address: usize,
    /// Connections still in their handshake (WebSocket upgrade, Noise, hello) at once; a
    /// connection takes a client slot only once its handshake is done.
    pub max_handshakes: usize,
    /// Connections in their handshake at once from one IP address.
    pub max_handshakes_per_address: usize,
    /// How long a connection has, from accept, to finish its handshake.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// A session that sends nothing for this long is closed (clients send at λ_P, so a live
    /// client is never this quiet).
    #[serde(with = "humantime_serde")]
    pub client_idle_timeout: Duration,
    /// Deliveries kept for a briefly disconnected client (only an address whose session is
    /// up or ended within `inbox_ttl` has an inbox).
    pub inbox_packets: usize,
    /// Bytes of deliveries kept for one client.
    pub inbox_bytes: usize,
    /// Bytes of deliveries kept for all clients together.
    pub inbox_total_bytes: usize,
    /// How long a disconnected client's inbox is kept.
    #[serde(with = "humantime_serde")]
    pub inbox_ttl: Duration,
    /// Frames queued towards one connected client.
    pub client_queue: usize,
    /// How long a client's tab outlives its last session (a reconnect within it resumes the
    /// tab, debts and all); also the window of `grace_per_address`.
    #[serde(with = "humantime_serde")]
    pub tab_window: Duration,
    /// New tabs with grace (initial credit and arrears) per source address (an IPv4 address
    /// or an IPv6 /64) per `tab_window`; later new tabs must pay before they are served.
    pub grace_per_address: usize,
}

/// The exit role.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExitSection {
    /// Tor syntax: `accept *:443, reject 10.0.0.0/8:*`; first match wins; no match rejects.
    pub policy: String,
    /// Allow loopback and private destinations (for local test networks only).
    pub allow_private: bool,
    /// Allow the relay's own addresses as destinations (refused by default, like Tor's
    /// `ExitPolicyRejectMyAddresses`; the local test network, all on 127.0.0.1, allows them).
    pub allow_own_addresses: bool,
    /// Open TCP streams at once.
    pub max_streams: usize,
    /// Open TCP streams of one client session; at most `max_streams / 16`, so sixteen
    /// sessions at their limit still fit.
    pub max_streams_per_session: usize,
    /// Stream bytes held (unacknowledged replies, client data not yet written) across all
    /// sessions.
    pub max_buffered_bytes: usize,
    /// Stream bytes held for one session; at most `max_buffered_bytes / 16`.
    pub max_session_buffered_bytes: usize,
    /// A stream that moved fewer than `idle_progress_bytes` (written to the destination or
    /// acknowledged by the client) in this long is closed: a trickle is not progress.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// See `idle_timeout`.
    pub idle_progress_bytes: usize,
    /// Every stream is closed this long after it opened, however busy.
    #[serde(with = "humantime_serde")]
    pub stream_lifetime: Duration,
    /// Time allowed to connect to a destination.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The largest window a stream is granted, each way (a client asks for its own; at
    /// least 512 KiB, which a client may use before the answer comes).
    pub max_stream_window: usize,
}

/// Nanopayments: tickets that pay this relay for the packets it carries.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PaymentsSection {
    /// Where winners are redeemed: `"ledger"` (the default; `ledger` and `ledger_key` below)
    /// or `"chain"` (the `[payments.chain]` section; needs a build with the `chain` feature).
    pub settlement: SettlementChoice,
    /// The node and contract, for `settlement = "chain"`.
    pub chain: Option<ChainSection>,
    /// The ledger's base URL (`http://host:port`). Unset (and no chain): payments are off,
    /// tickets are ignored and every packet is forwarded as if unpaid traffic were allowed.
    pub ledger: Option<String>,
    /// The ledger's identity key, 64 hex digits (what `murmur-ledger keygen` printed);
    /// required with `ledger`. Only answers signed by it are believed.
    pub ledger_key: Option<String>,
    /// What to do with a packet that carries no acceptable ticket for this hop.
    pub unpaid: UnpaidPolicy,
    /// The least expected value (in the ledger's base unit) a ticket must carry.
    pub min_expected_value: u64,
    /// A ticket must stay redeemable for at least this long after the Sphinx key of its
    /// epoch retires (tickets are redeemed only then); one expiring sooner is refused.
    #[serde(with = "humantime_serde")]
    pub min_redeem_window: Duration,
    /// How often retired epochs' winning tickets are redeemed (also right after start).
    #[serde(with = "humantime_serde")]
    pub redeem_interval: Duration,
    /// Longest wait between retries of a redemption the ledger could not answer.
    #[serde(with = "humantime_serde")]
    pub redeem_backoff_max: Duration,
    /// How long a pot's state from the ledger is trusted before it is fetched again.
    #[serde(with = "humantime_serde")]
    pub pot_refresh: Duration,
    /// Time allowed for one request to the ledger.
    #[serde(with = "humantime_serde")]
    pub ledger_timeout: Duration,
    /// Tickets remembered per key epoch (their nonces, so none is counted twice); beyond
    /// it, tickets are refused and counted.
    pub max_tickets_per_epoch: usize,
    /// Pots whose state is cached; beyond it, tickets from new pots are refused and counted.
    pub max_pots: usize,
    /// Pots looked up at the ledger at once (tickets from a pot being looked up are accepted
    /// meanwhile); also the most lookups per refresh round.
    pub max_pot_lookups: usize,
    /// Winning tickets stored but not yet redeemed; beyond it, winners are refused.
    pub max_pending_winners: usize,
    /// The largest face value a ticket may carry (base units); larger ones are refused. It
    /// bounds what one ticket from a pot not yet looked up can claim.
    pub max_face_value: u64,
    /// Tickets accepted from one pot while the ledger is asked about it; more are refused
    /// until it answers. Junk from fresh keys gets at most this many per key.
    pub unverified_tickets_per_pot: u32,
    /// Winning tickets from pots not yet looked up, pending at once (a pool apart from
    /// `max_pending_winners`' others, so junk winners cannot take genuine winners' room).
    pub max_unverified_winners: usize,
    /// Nonces per key epoch from pots not yet looked up (a share of
    /// `max_tickets_per_epoch`, for the same reason).
    pub max_unverified_tickets_per_epoch: usize,
    /// Winning tickets of one pot pending at once.
    pub max_pending_winners_per_pot: usize,
    /// Nonces of one pot remembered per key epoch.
    pub max_tickets_per_pot_per_epoch: usize,
}

impl PaymentsSection {
    /// The ledger's identity key: `None` when payments are off; an error when `ledger` is
    /// set without a valid `ledger_key`, or `ledger_key` without `ledger`.
    pub fn ledger_identity(&self) -> std::result::Result<Option<IdentityKey>, String> {
        match (&self.ledger, &self.ledger_key) {
            (None, None) => Ok(None),
            (None, Some(_)) => Err("payments.ledger_key is set but payments.ledger is not".into()),
            (Some(_), None) => Err(
                "payments.ledger_key is required with payments.ledger: the ledger's identity, \
                 64 hex digits, as `murmur-ledger keygen` printed it"
                    .into(),
            ),
            (Some(_), Some(hex)) => IdentityKey::from_hex(hex)
                .and_then(|k| k.verifying_key().map(|_| k))
                .map(Some)
                .map_err(|e| format!("payments.ledger_key {hex}: {e}")),
        }
    }
}

/// What a relay does with a packet that carries no acceptable ticket for it.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UnpaidPolicy {
    /// Forward it anyway (counted).
    #[default]
    Forward,
    /// Drop a packet whose ticket is refused (forged, expired, spent, for another relay or
    /// epoch, from an unknown or empty pot), counted. A packet with no ticket is forwarded
    /// either way: a client pays each relay one ticket per `packets_per_ticket` packets,
    /// worth all of them, and a mix cannot tell whose the others are; the per-client limit
    /// is the gateway's tab, which cuts off a client that falls behind.
    Drop,
}

fn default_identity_key() -> PathBuf {
    PathBuf::from("identity.key")
}
fn default_link_key() -> PathBuf {
    PathBuf::from("link.key")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("state")
}
fn default_bandwidth() -> u32 {
    1000
}
fn default_price() -> u64 {
    1
}

impl Default for ListenSection {
    fn default() -> Self {
        ListenSection {
            mix: SocketAddr::from(([127, 0, 0, 1], 1789)),
            advertise_mix: None,
            advertise_client: None,
            client: SocketAddr::from(([127, 0, 0, 1], 9000)),
            metrics: None,
        }
    }
}

impl Default for DirectorySection {
    fn default() -> Self {
        DirectorySection {
            authorities: Vec::new(),
            epoch_length: Duration::from_secs(20 * 60),
            key_grace: Duration::from_secs(20 * 60),
            clock_skew: Duration::from_secs(60),
        }
    }
}

impl Default for MixingSection {
    fn default() -> Self {
        MixingSection {
            max_hop_delay: Duration::from_secs(10),
            workers: 0,
            input_queue: 8192,
            max_held_packets: 100_000,
            peer_queue: 2000,
            max_inbound_connections: 512,
            max_handshakes: 256,
            max_handshakes_per_address: 32,
            handshake_timeout: Duration::from_secs(5),
            link_idle_timeout: Duration::from_secs(600),
            replay_capacity: 10_000_000,
            replay_fp_rate: 1e-6,
            distinct_subnets: true,
        }
    }
}

impl Default for GatewaySection {
    fn default() -> Self {
        GatewaySection {
            max_clients: 1024,
            max_clients_per_address: 64,
            max_handshakes: 512,
            max_handshakes_per_address: 16,
            handshake_timeout: Duration::from_secs(5),
            client_idle_timeout: Duration::from_secs(60),
            inbox_packets: 2000,
            inbox_bytes: 4 << 20,
            inbox_total_bytes: 128 << 20,
            inbox_ttl: Duration::from_secs(60),
            client_queue: 4096,
            tab_window: Duration::from_secs(600),
            grace_per_address: 2,
        }
    }
}

impl Default for ExitSection {
    fn default() -> Self {
        ExitSection {
            policy: "accept *:80, accept *:443".into(),
            allow_private: false,
            allow_own_addresses: false,
            max_streams: 1024,
            max_streams_per_session: 64,
            max_buffered_bytes: 256 << 20,
            max_session_buffered_bytes: 16 << 20,
            idle_timeout: Duration::from_secs(300),
            idle_progress_bytes: 2048,
            stream_lifetime: Duration::from_secs(3600),
            connect_timeout: Duration::from_secs(10),
            max_stream_window: 4 << 20,
        }
    }
}

impl Default for PaymentsSection {
    fn default() -> Self {
        PaymentsSection {
            settlement: SettlementChoice::Ledger,
            chain: None,
            ledger: None,
            ledger_key: None,
            unpaid: UnpaidPolicy::Forward,
            min_expected_value: 1,
            min_redeem_window: Duration::from_secs(30 * 60),
            redeem_interval: Duration::from_secs(60),
            redeem_backoff_max: Duration::from_secs(10 * 60),
            pot_refresh: Duration::from_secs(60),
            ledger_timeout: Duration::from_secs(10),
            max_tickets_per_epoch: 1_000_000,
            max_pots: 10_000,
            max_pot_lookups: 256,
            max_pending_winners: 100_000,
            max_face_value: 1_000_000_000,
            unverified_tickets_per_pot: 8,
            max_unverified_winners: 1_024,
            max_unverified_tickets_per_epoch: 100_000,
            max_pending_winners_per_pot: 10_000,
            max_tickets_per_pot_per_epoch: 200_000,
        }
    }
}

impl Config {
    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        Config::parse(&text, base).map_err(|reason| Error::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and checks configuration text; relative paths resolve against `base_dir`.
    pub fn parse(text: &str, base_dir: PathBuf) -> std::result::Result<Config, String> {
        let mut config: Config = toml::from_str(text).map_err(|e| e.to_string())?;
        config.base_dir = base_dir;
        config.check()?;
        Ok(config)
    }

    /// Applies `-o KEY=VALUE` overrides by re-parsing the text with the values set.
    pub fn parse_with_overrides(
        text: &str,
        base_dir: PathBuf,
        overrides: &[String],
    ) -> std::result::Result<Config, String> {
        let mut doc: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for o in overrides {
            let (key, value) = o
                .split_once('=')
                .ok_or_else(|| format!("override `{o}` is not KEY=VALUE"))?;
            let value: toml::Value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            set_path(&mut doc, key.trim(), value)?;
        }
        let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
        Config::parse(&text, base_dir)
    }

    fn check(&self) -> std::result::Result<(), String> {
        if self.version != CONFIG_VERSION {
            return Err(format!(
                "config version {} is not supported (this build reads version {CONFIG_VERSION})",
                self.version
            ));
        }
        if self.relay.roles.is_empty() {
            return Err("relay.roles must name at least one of gateway, mix, exit".into());
        }
        if self.relay.family.trim().is_empty() || self.relay.family.len() > 64 {
            return Err("relay.family must be 1 to 64 bytes".into());
        }
        self.family_members()?;
        for a in &self.directory.authorities {
            IdentityKey::from_hex(&a.identity)
                .map_err(|e| format!("directory.authorities identity {}: {e}", a.identity))?;
            if !a.url.starts_with("http://") && !a.url.starts_with("https://") {
                return Err(format!("authority url {} must start with http://", a.url));
            }
        }
        if self.directory.epoch_length < Duration::from_secs(1) {
            return Err("directory.epoch_length must be at least 1s".into());
        }
        let m = &self.mixing;
        if m.input_queue == 0
            || m.max_held_packets == 0
            || m.peer_queue == 0
            || m.max_inbound_connections == 0
        {
            return Err("mixing queue bounds must be positive".into());
        }
        if m.max_handshakes == 0 || m.max_handshakes_per_address == 0 {
            return Err(
                "mixing.max_handshakes and max_handshakes_per_address must be positive".into(),
            );
        }
        for (name, d) in [
            ("handshake_timeout", m.handshake_timeout),
            ("link_idle_timeout", m.link_idle_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("mixing.{name} must be positive"));
            }
        }
        if m.replay_capacity == 0 || !(m.replay_fp_rate > 0.0 && m.replay_fp_rate < 0.5) {
            return Err("mixing.replay_capacity must be > 0 and replay_fp_rate in (0, 0.5)".into());
        }
        let g = &self.gateway;
        if g.max_clients == 0
            || g.max_clients_per_address == 0
            || g.max_handshakes == 0
            || g.max_handshakes_per_address == 0
            || g.inbox_packets == 0
            || g.inbox_bytes == 0
            || g.inbox_total_bytes < g.inbox_bytes
            || g.client_queue == 0
        {
            return Err("gateway bounds must be positive".into());
        }
        if g.handshake_timeout.is_zero() || g.client_idle_timeout.is_zero() {
            return Err(
                "gateway.handshake_timeout and client_idle_timeout must be positive".into(),
            );
        }
        if self.has(Role::Exit) {
            self.exit_policy()
                .map_err(|e| format!("exit.policy: {e}"))?;
            self.exit.check()?;
        }
        let p = &self.payments;
        if let Some(url) = &p.ledger
            && !url.starts_with("http://")
            && !url.starts_with("https://")
        {
            return Err(format!("payments.ledger {url} must start with http://"));
        }
        p.ledger_identity()?;
        murmur_ledger::choice::check_choice("payments", p.settlement, p.chain.as_ref())?;
        if p.settlement == SettlementChoice::Chain && p.ledger.is_some() {
            return Err(
                "payments.ledger is set but payments.settlement is \"chain\": a relay redeems at \
                 one of them; remove ledger and ledger_key"
                    .into(),
            );
        }
        if p.min_expected_value == 0 {
            return Err("payments.min_expected_value must be at least 1".into());
        }
        for (name, d) in [
            ("redeem_interval", p.redeem_interval),
            ("redeem_backoff_max", p.redeem_backoff_max),
            ("pot_refresh", p.pot_refresh),
            ("ledger_timeout", p.ledger_timeout),
        ] {
            if d < Duration::from_secs(1) {
                return Err(format!("payments.{name} must be at least 1s"));
            }
        }
        if p.max_tickets_per_epoch == 0
            || p.max_pots == 0
            || p.max_pot_lookups == 0
            || p.max_pending_winners == 0
            || p.max_face_value == 0
            || p.max_pending_winners_per_pot == 0
            || p.max_tickets_per_pot_per_epoch == 0
        {
            return Err("payments bounds must be positive".into());
        }
        // Room kept for pots the ledger vouched for: the pools of pots not yet looked up
        // must be smaller than the totals they are part of.
        if p.max_unverified_winners >= p.max_pending_winners
            || p.max_unverified_tickets_per_epoch >= p.max_tickets_per_epoch
        {
            return Err(
                "payments.max_unverified_winners and max_unverified_tickets_per_epoch must be \
                 below max_pending_winners and max_tickets_per_epoch, so junk from unknown pots \
                 cannot take all the room"
                    .into(),
            );
        }
        Ok(())
    }

    /// Epochs past the current one whose Sphinx keys are still held (`key_grace` in whole
    /// epochs, rounded up).
    pub fn grace_epochs(&self) -> u32 {
        let grace = self
            .directory
            .key_grace
            .as_secs()
            .div_ceil(self.directory.epoch_length.as_secs().max(1));
        u32::try_from(grace).unwrap_or(u32::MAX)
    }

    /// Whether the relay has `role`.
    pub fn has(&self, role: Role) -> bool {
        self.relay.roles.contains(&role)
    }

    /// `relay.family_members`, parsed, sorted and deduplicated (the relay itself is left out
    /// when the descriptor is built).
    pub fn family_members(&self) -> std::result::Result<Vec<IdentityKey>, String> {
        let mut members = self
            .relay
            .family_members
            .iter()
            .map(|h| {
                IdentityKey::from_hex(h).map_err(|e| format!("relay.family_members {h:?}: {e}"))
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        members.sort();
        members.dedup();
        if members.len() > murmur_protocol::directory::MAX_FAMILY_MEMBERS {
            return Err(format!(
                "relay.family_members lists more than {} relays",
                murmur_protocol::directory::MAX_FAMILY_MEMBERS
            ));
        }
        Ok(members)
    }

    /// The parsed exit policy: `reject private:*` first unless private is allowed, and before
    /// it the relay's own addresses unless they are allowed.
    pub fn exit_policy(&self) -> std::result::Result<ExitPolicy, murmur_protocol::Error> {
        if !self.has(Role::Exit) {
            return Ok(ExitPolicy::reject_all());
        }
        let policy = ExitPolicy::parse(&self.exit.policy, self.exit.allow_private)?;
        if self.exit.allow_own_addresses {
            return Ok(policy);
        }
        policy.reject_first(self.own_addresses())
    }

    /// The addresses this relay can be reached at: its listen and advertised addresses; a
    /// wildcard listen address stands for the host's outbound addresses.
    pub fn own_addresses(&self) -> Vec<IpAddr> {
        let l = &self.listen;
        let mut listening = vec![l.mix];
        if self.has(Role::Gateway) {
            listening.push(l.client);
        }
        let mut own: Vec<IpAddr> = listening
            .iter()
            .chain(l.advertise_mix.iter())
            .chain(l.advertise_client.iter())
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .collect();
        if listening.iter().any(|a| a.ip().is_unspecified()) {
            own.extend(outbound_addresses());
        }
        own.sort_unstable();
        own.dedup();
        own
    }

    /// A path from the config, resolved against the config file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }
}

/// The addresses the host sends from towards the Internet (IPv4 and IPv6), found as Tor
/// does: a UDP socket "connected" to a public address sends nothing but learns its source.
fn outbound_addresses() -> Vec<IpAddr> {
    let probes: [(&str, &str); 2] = [("0.0.0.0:0", "192.0.2.1:9"), ("[::]:0", "[2001:db8::1]:9")];
    probes
        .iter()
        .filter_map(|(bind, to)| {
            let socket = std::net::UdpSocket::bind(bind).ok()?;
            socket.connect(to).ok()?;
            let ip = socket.local_addr().ok()?.ip();
            (!ip.is_unspecified()).then_some(ip)
        })
        .collect()
}

impl ExitSection {
    /// The bounds hold together (see [`murmur_protocol::exit::ExitConfig::check`]).
    fn check(&self) -> std::result::Result<(), String> {
        crate::exit::exit_config(ExitPolicy::reject_all(), self)
            .check()
            .map_err(|e| format!("[exit]: {e}"))?;
        if self.connect_timeout.is_zero() {
            return Err("exit.connect_timeout must be positive".into());
        }
        Ok(())
    }
}

fn set_path(
    doc: &mut toml::Table,
    key: &str,
    value: toml::Value,
) -> std::result::Result<(), String> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().ok_or("empty override key")?;
    let mut table = doc;
    for part in parts {
        table = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| format!("override {key}: {part} is not a table"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"mix\"]\n";
    const EXIT: &str = "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"exit\"]\n[exit]\n";
    /// A valid Ed25519 public key, in hex.
    fn ledger_key() -> String {
        IdentityKey::of(&ed25519_dalek::SigningKey::from_bytes(&[1; 32])).to_hex()
    }

    const CHAIN: &str = "[payments]\nsettlement = \"chain\"\n[payments.chain]\n\
        rpc_url = \"http://127.0.0.1:8545\"\n\
        contract = \"0x5FbDB2315678afecb367f032d93F642f64180aa3\"\n";

    #[test]
    fn a_relay_settles_at_the_ledger_by_default_or_on_a_chain() {
        let c = Config::parse(MINIMAL, PathBuf::from("/etc/murmur")).unwrap();
        assert_eq!(c.payments.settlement, SettlementChoice::Ledger);
        assert_eq!(c.payments.chain, None);
        let text = format!("{MINIMAL}{CHAIN}confirmations = 3\ngas_price_wei = 1000000000\n");
        let c = Config::parse(&text, PathBuf::from("/etc/murmur")).unwrap();
        assert_eq!(c.payments.settlement, SettlementChoice::Chain);
        let chain = c.payments.chain.unwrap();
        assert_eq!(chain.rpc_url, "http://127.0.0.1:8545");
        assert_eq!(chain.confirmations, 3);
        assert_eq!(chain.gas_price_wei, Some(1_000_000_000));
        assert_eq!(chain.retries, 3);
        // Both a ledger and a chain: refused.
        let both = format!("{MINIMAL}{CHAIN}",).replace(
            "[payments]\n",
            &format!(
                "[payments]\nledger = \"http://l\"\nledger_key = \"{}\"\n",
                ledger_key()
            ),
        );
        let err = Config::parse(&both, PathBuf::from("/etc/murmur")).unwrap_err();
        assert!(err.contains("remove ledger and ledger_key"), "{err}");
    }

    #[test]
    fn minimal_config_takes_defaults() {
        let c = Config::parse(MINIMAL, PathBuf::from("/etc/murmur")).unwrap();
        assert_eq!(c.mixing, MixingSection::default());
        assert_eq!(
            c.resolve(&c.relay.identity_key),
            PathBuf::from("/etc/murmur/identity.key")
        );
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        for (text, needle) in [
            (
                "version = 2\n[relay]\nfamily = \"op\"\nroles = [\"mix\"]\n",
                "version 2",
            ),
            (&format!("{MINIMAL}bogus = 1\n"), "unknown field"),
            (
                "version = 1\n[relay]\nfamily = \"op\"\nroles = []\n",
                "roles",
            ),
            (
                "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"boss\"]\n",
                "unknown variant",
            ),
            (
                "version = 1\n[relay]\nfamily = \"op\"\nroles = [\"exit\"]\n[exit]\npolicy = \"allow all\"\n",
                "exit.policy",
            ),
            (
                &format!("{MINIMAL}[payments]\nledger = \"ftp://x\"\n"),
                "payments.ledger",
            ),
            (
                &format!("{MINIMAL}[payments]\nunpaid = \"maybe\"\n"),
                "unknown variant",
            ),
            (
                &format!("{MINIMAL}[payments]\nledger = \"http://127.0.0.1:7080\"\n"),
                "ledger_key is required",
            ),
            (
                &format!(
                    "{MINIMAL}[payments]\nledger = \"http://127.0.0.1:7080\"\nledger_key = \"00\"\n"
                ),
                "payments.ledger_key 00",
            ),
            (
                &format!("{MINIMAL}[payments]\nledger_key = \"{}\"\n", ledger_key()),
                "payments.ledger is not",
            ),
            (
                &format!("{MINIMAL}[payments]\nmin_expected_value = 0\n"),
                "min_expected_value",
            ),
            (
                &format!("{MINIMAL}[payments]\nmax_pots = 0\n"),
                "payments bounds",
            ),
            (
                &format!("{MINIMAL}[payments]\nredeem_interval = \"10ms\"\n"),
                "redeem_interval",
            ),
            (
                &format!("{MINIMAL}[payments]\nredeem_interval_s = 5\n"),
                "unknown field",
            ),
            (
                &format!("{MINIMAL}[gateway]\nmax_handshakes_per_address = 0\n"),
                "gateway bounds",
            ),
            (
                &format!("{MINIMAL}[gateway]\nhandshake_timeout = \"0s\"\n"),
                "handshake_timeout",
            ),
            (
                &format!("{MINIMAL}[gateway]\nclient_idle_timeout = \"0s\"\n"),
                "client_idle_timeout",
            ),
            (
                &format!("{EXIT}max_streams = 64\nmax_streams_per_session = 5\n"),
                "max_streams_per_session",
            ),
            (
                &format!("{EXIT}max_session_buffered_bytes = 268435456\n"),
                "max_session_buffered_bytes",
            ),
            (
                &format!("{EXIT}stream_lifetime = \"0s\"\n"),
                "stream_lifetime",
            ),
            (
                &format!("{MINIMAL}[payments]\nsettlement = \"chain\"\n"),
                "needs a [payments.chain] section",
            ),
            (
                &format!("{MINIMAL}[payments]\nsettlement = \"bank\"\n"),
                "unknown variant",
            ),
            (
                &format!("{MINIMAL}{CHAIN}rpc = \"http://x\"\n"),
                "unknown field",
            ),
            (
                &format!("{MINIMAL}{CHAIN}").replace("settlement = \"chain\"\n", ""),
                "settlement is \"ledger\"",
            ),
            (
                &format!("{MINIMAL}{CHAIN}").replace("0x", "0y"),
                "payments.chain.contract",
            ),
            (
                &format!("{MINIMAL}{CHAIN}")
                    .replace("[payments]\n", "[payments]\nledger = \"http://l\"\n"),
                "ledger_key is required",
            ),
            (
                &format!("{MINIMAL}[gateway]\ninbox_total_bytes = 1\n"),
                "gateway bounds",
            ),
            (
                &format!("{MINIMAL}[mixing]\nmax_handshakes = 0\n"),
                "max_handshakes",
            ),
            (
                &format!("{MINIMAL}[mixing]\nmax_handshakes_per_address = 0\n"),
                "max_handshakes",
            ),
            (
                &format!("{MINIMAL}[mixing]\nhandshake_timeout = \"0s\"\n"),
                "handshake_timeout",
            ),
            (
                &format!("{MINIMAL}[mixing]\nlink_idle_timeout = \"0s\"\n"),
                "link_idle_timeout",
            ),
        ] {
            let err = Config::parse(text, PathBuf::new()).unwrap_err();
            assert!(err.contains(needle), "{err} should mention {needle}");
        }
    }

    #[test]
    fn inbound_links_outlive_the_other_sides_idle_close() {
        // A link is closed by the dialer, which knows when it next has a frame to send; a
        // listener closing first would lose the frame written into the closed socket.
        assert!(MixingSection::default().link_idle_timeout > crate::links::IDLE_CLOSE);
    }

    #[test]
    fn overrides_set_nested_keys() {
        let c = Config::parse_with_overrides(
            MINIMAL,
            PathBuf::new(),
            &[
                "mixing.workers=3".into(),
                "listen.mix=\"127.0.0.1:5000\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.mixing.workers, 3);
        assert_eq!(c.listen.mix, SocketAddr::from(([127, 0, 0, 1], 5000)));
        assert!(Config::parse_with_overrides(MINIMAL, PathBuf::new(), &["nokey".into()]).is_err());
        let c = Config::parse_with_overrides(
            MINIMAL,
            PathBuf::new(),
            &[
                "payments.ledger=\"http://127.0.0.1:7080\"".into(),
                format!("payments.ledger_key=\"{}\"", ledger_key()),
                "payments.unpaid=\"drop\"".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.payments.ledger.as_deref(), Some("http://127.0.0.1:7080"));
        assert_eq!(
            c.payments.ledger_identity().unwrap().map(|k| k.to_hex()),
            Some(ledger_key())
        );
        assert_eq!(c.payments.unpaid, UnpaidPolicy::Drop);
    }
}

#[cfg(test)]
mod example {
    use super::*;

    /// The example lists every option with its default: as shipped it parses to the
    /// defaults, and with every option uncommented it parses to the same thing.
    #[test]
    fn example_config_matches_the_defaults() {
        let text = include_str!("../relay.example.toml");
        let shipped = Config::parse(text, PathBuf::new()).unwrap();
        assert_eq!(shipped.listen, ListenSection::default());
        assert_eq!(shipped.directory, DirectorySection::default());
        assert_eq!(shipped.mixing, MixingSection::default());
        assert_eq!(shipped.gateway, GatewaySection::default());
        assert_eq!(shipped.exit, ExitSection::default());
        assert_eq!(shipped.payments, PaymentsSection::default());
        assert_eq!(shipped.payments.ledger, None, "payments are off unless set");
        let uncommented: String = text
            .lines()
            .map(|l| match l.strip_prefix('#') {
                // `#key = value` is an option; `# text` is prose.
                Some(rest) if !rest.starts_with(' ') && rest.contains(" = ") => rest,
                _ => l,
            })
            // Options that are off by default show an example value instead.
            .filter(|l| {
                !l.starts_with("advertise_mix =")
                    && !l.starts_with("advertise_client =")
                    && !l.starts_with("metrics =")
                    && !l.starts_with("ledger =")
                    && !l.starts_with("ledger_key =")
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full = Config::parse(&uncommented, PathBuf::new()).unwrap();
        assert_eq!(full, shipped, "a commented value differs from its default");
    }
}
