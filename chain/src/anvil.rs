//! A local Anvil node for tests and the local network: the binary `contract/build.sh --tools`
//! installs from npm (pinned), started on a free 127.0.0.1 port and killed when dropped.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a starting node may take to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A running Anvil node.
#[derive(Debug)]
pub struct Anvil {
    child: Child,
    addr: SocketAddr,
}

/// Where the Anvil binary is: `MURMUR_ANVIL` if set, else the one `contract/build.sh --tools`
/// installs under `contract/node_modules`.
pub fn binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("MURMUR_ANVIL") {
        return Some(PathBuf::from(path));
    }
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        _ => return None,
    };
    let os = match std::env::consts::OS {
        "linux" => "linux",
        "macos" => "darwin",
        _ => return None,
    };
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("contract/node_modules/@foundry-rs")
        .join(format!("anvil-{os}-{arch}"))
        .join("bin/anvil");
    path.is_file().then_some(path)
}

impl Anvil {
    /// Starts a node on a free loopback port, mining each transaction at once, with no fees
    /// (base fee and priority fee 0), so that tests can count every gwei.
    pub fn start() -> std::io::Result<Anvil> {
        Anvil::start_with_base_fee(0)
    }

    /// [`Anvil::start`] with a base fee per gas of `base_fee_wei` (the local network's
    /// chain runs at 1 gwei, so that redemptions cost what they would at a low price).
    pub fn start_with_base_fee(base_fee_wei: u64) -> std::io::Result<Anvil> {
        let bin = binary().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no anvil: run chain/contract/build.sh --tools (or set MURMUR_ANVIL)",
            )
        })?;
        let mut last = None;
        for _ in 0..3 {
            let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let child = Command::new(&bin)
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .args(["--accounts", "1", "--silent"])
                .args([
                    "--base-fee",
                    &base_fee_wei.to_string(),
                    "--gas-price",
                    &base_fee_wei.to_string(),
                    "--disable-min-priority-fee",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let mut node = Anvil { child, addr };
            match node.wait_ready() {
                Ok(()) => return Ok(node),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("anvil did not start")))
    }

    fn wait_ready(&mut self) -> std::io::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                return Err(std::io::Error::other(format!("anvil exited: {status}")));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                // listening, and still ours: a node that lost the port to another exits
                std::thread::sleep(Duration::from_millis(50));
                if let Some(status) = self.child.try_wait()? {
                    return Err(std::io::Error::other(format!("anvil exited: {status}")));
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "anvil did not listen in time",
        ))
    }

    /// Its JSON-RPC endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Kills the node at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Anvil's first development account (its well-known key), which deploys the contract.
pub const DEV_KEY: &str = "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80";

/// A local chain for tests and the local network: an Anvil node with `MurmurLottery`
/// deployed by [`DEV_KEY`].
#[derive(Debug)]
pub struct LocalChain {
    pub node: Anvil,
    pub contract: alloy::primitives::Address,
}

impl LocalChain {
    /// Starts Anvil (base fee `base_fee_wei`), deploys the contract with a notice period of
    /// `notice_s` and gives each address its balance in base units (gwei).
    pub async fn start(
        base_fee_wei: u64,
        notice_s: u64,
        balances: &[(alloy::primitives::Address, u64)],
    ) -> murmur_ledger::Result<LocalChain> {
        let node = Anvil::start_with_base_fee(base_fee_wei)
            .map_err(|e| murmur_ledger::Error::Config(format!("anvil: {e}")))?;
        let deployer = DEV_KEY
            .parse()
            .map_err(|e| murmur_ledger::Error::Config(format!("anvil's dev key: {e}")))?;
        let contract = crate::ChainSettlement::deploy(&node.url(), deployer, notice_s).await?;
        let chain = LocalChain { node, contract };
        for (address, units) in balances {
            chain.set_balance(*address, *units).await?;
        }
        Ok(chain)
    }

    /// Sets an address's balance to `units` base units (gwei), as a faucet would.
    pub async fn set_balance(
        &self,
        address: alloy::primitives::Address,
        units: u64,
    ) -> murmur_ledger::Result<()> {
        use alloy::primitives::U256;
        use alloy::providers::{Provider, ProviderBuilder};
        let url = self
            .node
            .url()
            .parse()
            .map_err(|e| murmur_ledger::Error::Config(format!("anvil url: {e}")))?;
        let provider = ProviderBuilder::new().connect_http(url);
        let wei = U256::from(units) * U256::from(1_000_000_000u64);
        provider
            .raw_request::<_, ()>("anvil_setBalance".into(), (address, wei))
            .await
            .map_err(|e| murmur_ledger::Error::Http {
                url: self.node.url(),
                message: e.to_string(),
            })
    }
}

/// Whether Anvil can be had: installs it with `contract/build.sh --tools` if it is missing.
/// `false` (with the reason on stderr) only if it still cannot be found.
pub fn ensure_installed() -> bool {
    if binary().is_none() {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/contract/build.sh");
        let status = Command::new("bash").args([script, "--tools"]).status();
        eprintln!("anvil missing: ran {script} --tools: {status:?}");
    }
    binary().is_some()
}
