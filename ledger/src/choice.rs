//! Where a relay or client settles its tickets, as its config says: `settlement = "ledger"`
//! (the default: the embedded ledger over HTTP) or `settlement = "chain"` with a `[chain]`
//! section (`murmur-chain`, built into the daemons with their `chain` feature). The section
//! is plain data here, so a config is read and checked the same by every build; only a
//! build with the `chain` feature can act on it.

use serde::Deserialize;

/// `settlement` under `[payments]`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SettlementChoice {
    /// The embedded ledger, over its HTTP API.
    #[default]
    Ledger,
    /// The `MurmurLottery` contract on an Ethereum chain.
    Chain,
}

/// `[payments.chain]`: the node and contract a relay or client settles with.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ChainSection {
    /// The node's JSON-RPC endpoint (`http://…` or `https://…`).
    pub rpc_url: String,
    /// The deployed contract's address, `0x` and 40 hex digits.
    pub contract: String,
    /// Blocks a transaction must be under (1: its own) before it counts.
    #[serde(default = "default_confirmations")]
    pub confirmations: u64,
    /// A fixed fee per gas in wei (max and priority fee both); unset: the node's estimate.
    #[serde(default)]
    pub gas_price_wei: Option<u64>,
    /// How long to wait for a transaction's confirmations, seconds.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Retries of a read or a redemption after the node could not be reached.
    #[serde(default = "default_retries")]
    pub retries: u32,
}

fn default_confirmations() -> u64 {
    1
}
fn default_timeout_s() -> u64 {
    120
}
fn default_retries() -> u32 {
    3
}

impl ChainSection {
    /// Checks the fields; the error names the one at fault, under `at` (`"payments.chain"`).
    pub fn check(&self, at: &str) -> Result<(), String> {
        if !self.rpc_url.starts_with("http://") && !self.rpc_url.starts_with("https://") {
            return Err(format!(
                "{at}.rpc_url {:?} must start with http:// or https://",
                self.rpc_url
            ));
        }
        let hex = self.contract.strip_prefix("0x").unwrap_or("");
        if hex.len() != 40 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!(
                "{at}.contract {:?} must be 0x and 40 hex digits (what `murmur-chain deploy` \
                 printed)",
                self.contract
            ));
        }
        if self.confirmations == 0 {
            return Err(format!("{at}.confirmations must be at least 1"));
        }
        if self.timeout_s == 0 {
            return Err(format!("{at}.timeout_s must be at least 1"));
        }
        Ok(())
    }
}

/// Checks that `settlement` and the chain section agree: `chain` needs the section, and a
/// section under `ledger` is a mistake (it would be ignored).
pub fn check_choice(
    at: &str,
    settlement: SettlementChoice,
    chain: Option<&ChainSection>,
) -> Result<(), String> {
    match (settlement, chain) {
        (SettlementChoice::Chain, None) => Err(format!(
            "{at}.settlement = \"chain\" needs a [{at}.chain] section (rpc_url, contract)"
        )),
        (SettlementChoice::Ledger, Some(_)) => Err(format!(
            "[{at}.chain] is set but {at}.settlement is \"ledger\" (the default): set \
             settlement = \"chain\" to use it, or remove the section"
        )),
        (_, Some(c)) => c.check(&format!("{at}.chain")),
        (SettlementChoice::Ledger, None) => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn section() -> ChainSection {
        ChainSection {
            rpc_url: "http://127.0.0.1:8545".into(),
            contract: format!("0x{}", "ab".repeat(20)),
            confirmations: 1,
            gas_price_wei: None,
            timeout_s: 120,
            retries: 3,
        }
    }

    #[test]
    fn the_choice_and_the_section_must_agree_and_the_section_be_sound() {
        let s = section();
        assert_eq!(
            check_choice("payments", SettlementChoice::Ledger, None),
            Ok(())
        );
        assert_eq!(
            check_choice("payments", SettlementChoice::Chain, Some(&s)),
            Ok(())
        );
        let err = check_choice("payments", SettlementChoice::Chain, None).unwrap_err();
        assert!(err.contains("[payments.chain]"), "{err}");
        let err = check_choice("payments", SettlementChoice::Ledger, Some(&s)).unwrap_err();
        assert!(err.contains("settlement = \"chain\""), "{err}");
        for (bad, field) in [
            (
                ChainSection {
                    rpc_url: "ws://x".into(),
                    ..section()
                },
                "rpc_url",
            ),
            (
                ChainSection {
                    contract: "0x1234".into(),
                    ..section()
                },
                "contract",
            ),
            (
                ChainSection {
                    contract: "ab".repeat(21),
                    ..section()
                },
                "contract",
            ),
            (
                ChainSection {
                    confirmations: 0,
                    ..section()
                },
                "confirmations",
            ),
            (
                ChainSection {
                    timeout_s: 0,
                    ..section()
                },
                "timeout_s",
            ),
        ] {
            let err = check_choice("payments", SettlementChoice::Chain, Some(&bad)).unwrap_err();
            assert!(err.contains(&format!("payments.chain.{field}")), "{err}");
        }
    }
}
