// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// Murmur's pots on an Ethereum chain: the rules of the embedded ledger (ledger/src/ledger.rs),
/// with the chain's own accounts (addresses holding ETH) in place of the ledger's.
///
/// Amounts are in the ledger's base unit, 1 gwei: `fund` takes exactly that many gwei in ETH,
/// `withdraw` and `redeem` pay ETH out. A pot is named by its payer's Ed25519 key (the key that
/// signs its tickets) and is controlled by the address its first funding names, its owner:
/// the owner warns, withdraws and co-signs tickets (secp256k1, checked with ecrecover). Ed25519
/// is checked off-chain by the relay, where it is cheap; the contract pays only tickets the
/// owner co-signed for the redeeming address (chain/README.md says why).
///
/// Every refusal reverts with the embedded ledger's refusal label as its reason string.
contract MurmurLottery {
    uint256 private constant UNIT = 1 gwei;
    uint256 private constant TICKET_LEN = 209;
    uint256 private constant SIGNED_LEN = 145;

    struct Pot {
        address owner;
        uint64 balance;
        uint64 escrow;
        uint64 warned;
        uint64 unlockAt;
    }

    /// Seconds between a warning and the withdrawal it allows.
    uint64 public immutable noticePeriod;
    /// Pots by their Ed25519 key.
    mapping(bytes32 => Pot) public pots;
    /// Redeemed tickets by `Ticket::digest` (every signed field, recipient included).
    mapping(bytes32 => bool) public redeemed;
    /// Escrow burned by overdrafts (base units); it stays in the contract for good.
    uint256 public burned;

    event Funded(bytes32 indexed pot, address indexed from, uint64 balance, uint64 escrow);
    event Warned(bytes32 indexed pot, uint64 amount, uint64 unlockAt);
    event Withdrawn(bytes32 indexed pot, uint64 amount);
    event Refused(uint256 indexed index, string reason);
    event Redeemed(
        bytes32 indexed pot, bytes32 indexed digest, address indexed recipient, uint64 paid, uint64 burned
    );

    constructor(uint64 notice) {
        noticePeriod = notice;
    }

    /// Adds `balance` and `escrow` to a pot, paid with exactly `(balance + escrow)` gwei. A new
    /// pot is owned by `owner`; an existing one must be named with its owner.
    function fund(bytes32 pot, address owner, uint64 balance, uint64 escrow) external payable {
        uint256 total = uint256(balance) + uint256(escrow);
        require(total > 0 && total <= type(uint64).max, "malformed");
        require(msg.value == total * UNIT, "malformed");
        Pot storage p = pots[pot];
        if (p.owner == address(0)) {
            require(owner != address(0), "malformed");
            p.owner = owner;
        } else {
            require(p.owner == owner, "malformed");
        }
        require(uint256(p.balance) + balance <= type(uint64).max, "malformed");
        require(uint256(p.escrow) + escrow <= type(uint64).max, "malformed");
        p.balance += balance;
        p.escrow += escrow;
        emit Funded(pot, msg.sender, balance, escrow);
    }

    /// Starts the notice for withdrawing `amount` (replacing any earlier warning; 0 cancels).
    function warn(bytes32 pot, uint64 amount) external {
        Pot storage p = owned(pot);
        require(amount <= uint256(p.balance) + p.escrow, "insufficient_funds");
        p.warned = amount;
        p.unlockAt = amount > 0 ? uint64(block.timestamp) + noticePeriod : 0;
        emit Warned(pot, amount, p.unlockAt);
    }

    /// After the notice, pays `amount` of what was warned to the owner, balance first.
    function withdraw(bytes32 pot, uint64 amount) external {
        Pot storage p = owned(pot);
        require(amount > 0, "malformed");
        require(p.unlockAt != 0, "not_warned");
        require(block.timestamp >= p.unlockAt, "notice_not_over");
        require(amount <= p.warned, "exceeds_warned");
        require(amount <= uint256(p.balance) + p.escrow, "insufficient_funds");
        uint64 fromBalance = amount < p.balance ? amount : p.balance;
        p.balance -= fromBalance;
        p.escrow -= amount - fromBalance;
        p.warned -= amount;
        if (p.warned == 0) {
            p.unlockAt = 0;
        }
        emit Withdrawn(pot, amount);
        pay(msg.sender, amount);
    }

    /// A ticket to redeem in a batch: its encoding, the reveal and the owner's co-signature.
    struct Claim {
        bytes ticket;
        bytes32 reveal;
        bytes32 r;
        bytes32 vs;
    }

    /// Pays a winning ticket to `recipient` (the sender), once: `min(face value, balance)`,
    /// burning the whole escrow if the face value is larger than the balance. `ticket` is the
    /// 209-byte encoding; `(r, vs)` the owner's EIP-2098 signature of `cosignedHash`.
    function redeem(bytes calldata ticket, bytes32 reveal, address recipient, bytes32 r, bytes32 vs)
        external
        returns (uint64 paid, uint64 burnt)
    {
        require(recipient == msg.sender, "wrong_recipient");
        string memory refusal;
        (refusal, paid, burnt) = settle(ticket, reveal, recipient, r, vs);
        require(bytes(refusal).length == 0, refusal);
        pay(recipient, paid);
    }

    /// Redeems several tickets for the sender in one transaction, paid in one transfer. A
    /// ticket the contract refuses is skipped and logged (`Refused`, with its index in
    /// `claims`); the others are paid.
    function redeemBatch(Claim[] calldata claims) external returns (uint256 paidTotal) {
        for (uint256 i = 0; i < claims.length; i++) {
            Claim calldata c = claims[i];
            (string memory refusal, uint64 paid,) = settle(c.ticket, c.reveal, msg.sender, c.r, c.vs);
            if (bytes(refusal).length == 0) {
                paidTotal += paid;
            } else {
                emit Refused(i, refusal);
            }
        }
        pay(msg.sender, paidTotal);
    }

    /// One redemption's checks and effects, but for the payment: the refusal's label, or ""
    /// with what is paid and burned.
    function settle(bytes calldata ticket, bytes32 reveal, address recipient, bytes32 r, bytes32 vs)
        private
        returns (string memory, uint64 paid, uint64 burnt)
    {
        (string memory refusal, bytes32 digest, bytes32 potKey) = check(ticket, reveal, recipient, r, vs);
        if (bytes(refusal).length != 0) return (refusal, 0, 0);
        redeemed[digest] = true;
        Pot storage p = pots[potKey];
        uint64 face = uint64(bytes8(ticket[65:73]));
        paid = face < p.balance ? face : p.balance;
        burnt = face > p.balance ? p.escrow : 0;
        p.balance -= paid;
        p.escrow -= burnt;
        burned += burnt;
        emit Redeemed(potKey, digest, recipient, paid, burnt);
        return ("", paid, burnt);
    }

    /// The checks of a redemption, in the embedded ledger's order where the chain allows.
    function check(bytes calldata ticket, bytes32 reveal, address recipient, bytes32 r, bytes32 vs)
        private
        view
        returns (string memory, bytes32 digest, bytes32 potKey)
    {
        if (ticket.length != TICKET_LEN || ticket[0] != 0x01) return ("malformed", 0, 0);
        if (block.timestamp > uint64(bytes8(ticket[105:113]))) return ("ticket_expired", 0, 0);
        digest = sha256(abi.encodePacked("murmur/ticket-id/v1\x00", ticket[:SIGNED_LEN]));
        if (redeemed[digest]) return ("already_redeemed", digest, 0);
        potKey = bytes32(ticket[1:33]);
        address owner = pots[potKey].owner;
        if (owner == address(0)) return ("unknown_pot", digest, potKey);
        if (ecrecover2098(cosignedHash(digest, recipient), r, vs) != owner) {
            return ("forged_ticket", digest, potKey);
        }
        return (wins(ticket, reveal), digest, potKey);
    }

    /// The recipient's commitment opened by `reveal`, and the win test: "" if the ticket wins.
    function wins(bytes calldata ticket, bytes32 reveal) private pure returns (string memory) {
        if (sha256(abi.encodePacked("murmur/ticket-commit/v1\x00", reveal)) != bytes32(ticket[113:145])) {
            return "reveal_mismatch";
        }
        bytes32 win = sha256(abi.encodePacked("murmur/ticket-win/v1\x00", reveal, ticket[97:105], ticket[81:97]));
        if (uint64(bytes8(win)) > uint64(bytes8(ticket[73:81]))) return "not_a_winner";
        return "";
    }

    /// What a pot's owner signs to let `recipient` redeem the ticket with this digest here.
    function cosignedHash(bytes32 digest, address recipient) public view returns (bytes32) {
        return keccak256(abi.encodePacked("murmur/chain-ticket/v1\x00", block.chainid, address(this), digest, recipient));
    }

    function owned(bytes32 pot) private view returns (Pot storage p) {
        p = pots[pot];
        require(p.owner != address(0), "unknown_pot");
        require(p.owner == msg.sender, "bad_signature");
    }

    function pay(address to, uint256 amount) private {
        if (amount > 0) {
            (bool ok,) = to.call{value: amount * UNIT}("");
            require(ok, "payment_failed");
        }
    }

    /// ecrecover of an EIP-2098 compact signature; address(0) for a malformed one.
    function ecrecover2098(bytes32 hash, bytes32 r, bytes32 vs) private pure returns (address) {
        bytes32 s = vs & bytes32(0x7fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff);
        uint8 v = uint8((uint256(vs) >> 255) + 27);
        // the lower half only, as secp256k1 signers produce (no malleable twin)
        if (uint256(s) > 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0) {
            return address(0);
        }
        return ecrecover(hash, v, r, s);
    }
}
