//! Redeeming on an Ethereum chain (`settlement = "chain"`, the `chain` feature): the relay's
//! [`ChainSettlement`] redeems its winners and reads pots, and checks each ticket's
//! co-signature ([`CoSignatureCheck`]) without a call to the node.

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use murmur_chain::{ChainConfig, ChainSettlement, CoSigner};
use murmur_ledger::ChainSection;
use murmur_protocol::ticket::{CoSignature, Ticket};

use crate::error::{Error, Result};
use crate::payments::{CoSignatureCheck, CoSigned};

impl CoSignatureCheck for ChainSettlement {
    fn check(&self, ticket: &Ticket, cosignature: &CoSignature) -> CoSigned {
        match self.cosigner_of(ticket, cosignature) {
            CoSigner::Owner => CoSigned::ByOwner,
            CoSigner::NotOwner => CoSigned::NotByOwner,
            CoSigner::OwnerUnknown => CoSigned::OwnerUnknown,
        }
    }

    fn keep(&self, ticket: &Ticket, cosignature: CoSignature) -> bool {
        self.hold_cosignature(ticket, cosignature).is_ok()
    }
}

/// The address `identity`'s chain wallet is paid at, for the relay's descriptor.
pub fn address_of(identity: &SigningKey) -> murmur_protocol::directory::ChainAddress {
    murmur_chain::wallet_of(identity).address().0.0
}

/// Connects to the chain of `section` as `identity` (its chain wallet redeems and pays the
/// gas).
pub async fn connect(
    section: &ChainSection,
    identity: &SigningKey,
) -> Result<Arc<ChainSettlement>> {
    let config = ChainConfig::from_section(section).map_err(|e| Error::Ledger(e.to_string()))?;
    let chain = ChainSettlement::connect(config, std::slice::from_ref(identity))
        .await
        .map_err(|e| Error::Ledger(format!("chain {}: {e}", section.rpc_url)))?;
    Ok(Arc::new(chain))
}
