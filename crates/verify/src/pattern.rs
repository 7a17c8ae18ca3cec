//! Verifiable block contents. Every written block carries a header naming the
//! volume block it was written to and its version, and a body derived from
//! both, so a read can tell which write it sees, and a foreign (misplaced),
//! torn or corrupt block is detected.
//!
//! Layout of one 4096-byte block (little endian):
//!
//! ```text
//!   0..8    magic  "BALSIMv1"
//!   8..16   block index in the volume
//!   16..24  version (1.. per block; 0 is never written: the block reads as zeros)
//!   24..4096 SplitMix64 stream seeded by (block, version)
//! ```

use ballast_types::BLOCK_SIZE;

use crate::rng::SimRng;

pub const MAGIC: &[u8; 8] = b"BALSIMv1";
const BS: usize = BLOCK_SIZE as usize;

/// The content of `block` at `version` (`version >= 1`).
pub fn block(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BS];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&block.to_le_bytes());
    b[16..24].copy_from_slice(&version.to_le_bytes());
    let mut r = SimRng::derive(block.wrapping_mul(0x1_0000_0001), version);
    for w in b[24..].chunks_mut(8) {
        let x = r.next_u64().to_le_bytes();
        w.copy_from_slice(&x[..w.len()]);
    }
    b
}

/// What a block read back holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Version 0: all zeros (never written).
    Zeros,
    /// A complete, intact write of this block at this version.
    Version(u64),
    /// An intact write, but of another block (misplaced data).
    Foreign { block: u64, version: u64 },
    /// Neither zeros nor an intact write: torn or corrupt.
    Garbage,
}

impl Seen {
    /// The version, if this is this block's own data (zeros are version 0).
    pub fn version(&self) -> Option<u64> {
        match self {
            Seen::Zeros => Some(0),
            Seen::Version(v) => Some(*v),
            _ => None,
        }
    }
}

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Seen::Zeros => write!(f, "zeros (never written)"),
            Seen::Version(v) => write!(f, "version {v}"),
            Seen::Foreign { block, version } => write!(f, "foreign data: block {block} version {version}"),
            Seen::Garbage => write!(f, "garbage (torn or corrupt)"),
        }
    }
}

/// Decodes one block read from volume block `at`.
pub fn decode(at: u64, data: &[u8]) -> Seen {
    if data.iter().all(|&b| b == 0) {
        return Seen::Zeros;
    }
    if data.len() != BS || &data[..8] != MAGIC {
        return Seen::Garbage;
    }
    let blk = u64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8]));
    let version = u64::from_le_bytes(data[16..24].try_into().unwrap_or([0; 8]));
    if version == 0 || block(blk, version) != data {
        return Seen::Garbage;
    }
    if blk != at {
        return Seen::Foreign { block: blk, version };
    }
    Seen::Version(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_header_bytes() {
        let b = block(3, 258);
        assert_eq!(&b[..24], b"BALSIMv1\x03\0\0\0\0\0\0\0\x02\x01\0\0\0\0\0\0");
        assert_eq!(b.len(), 4096);
    }

    #[test]
    fn decode_tells_versions_foreign_and_torn_apart() {
        assert_eq!(decode(5, &[0u8; 4096]), Seen::Zeros);
        assert_eq!(decode(5, &block(5, 9)), Seen::Version(9));
        assert_eq!(decode(4, &block(5, 9)), Seen::Foreign { block: 5, version: 9 });
        let mut torn = block(5, 9);
        torn[2048..].copy_from_slice(&block(5, 10)[2048..]);
        assert_eq!(decode(5, &torn), Seen::Garbage);
        assert_ne!(block(5, 9)[24..], block(5, 10)[24..]);
    }
}
