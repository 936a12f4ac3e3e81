#![doc = include_str!("../README.md")]

pub mod anvil;
pub mod cli;
mod settlement;
mod wallet;

pub use settlement::{
    ChainConfig, ChainSettlement, CoSignature, CoSigner, GasUsed, RedeemedOnChain, TicketCoSigner,
};
pub use wallet::wallet_of;

alloy::sol!(
    #[sol(rpc)]
    #[derive(Debug)]
    MurmurLottery,
    "contract/out/MurmurLottery_sol_MurmurLottery.abi"
);

/// The contract's creation code, as `contract/build.sh` compiled it.
pub const BYTECODE_HEX: &str = include_str!("../contract/out/MurmurLottery_sol_MurmurLottery.bin");
