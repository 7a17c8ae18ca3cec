//! Ids and units shared by every Ballast crate. No I/O, no async, no dependencies
//! beyond serde: everything else builds on this vocabulary.
//!
//! Newtypes keep a chunk index from being passed where a block index is meant.
//! The wire widths are fixed here too (`VolumeId` is 64 bits on the wire, `ChunkIdx`
//! 32 bits), so the codec and the on-disk formats agree by construction.

pub mod units;

use std::fmt;

use serde::{Deserialize, Serialize};

/// The unit of I/O, checksums and block contexts. Every data-path offset and
/// length is a multiple of it.
pub const BLOCK_SIZE: u32 = 4096;
/// `BLOCK_SIZE` as u64, for offset arithmetic.
pub const BLOCK_SIZE_U64: u64 = BLOCK_SIZE as u64;
/// Default chunk size: 64 MiB. 1 TiB is then 16,384 chunks.
pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 20;

/// A volume's id, unique in a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VolumeId(pub u64);

/// A chunk's index within its volume (offset / chunk size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ChunkIdx(pub u32);

/// A block's index within its chunk (offset in chunk / BLOCK_SIZE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct BlockIdx(pub u32);

/// A storage node's id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct NodeId(pub u64);

/// A failure zone's name (a Kubernetes `topology.kubernetes.io/zone` value).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Zone(pub String);

/// A volume's attach generation. Every attach bumps it; replicas refuse requests
/// that carry an epoch older than the highest they have been told (fencing).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Epoch(pub u64);

/// A write's sequence number: the attach epoch it was issued under and a counter
/// that the front end increments per write within that epoch. Ordered by epoch,
/// then counter, so a later attach's writes always sort after an earlier one's.
/// `Seq::ZERO` means "never written".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Seq {
    pub epoch: Epoch,
    pub counter: u64,
}

impl Seq {
    pub const ZERO: Seq = Seq { epoch: Epoch(0), counter: 0 };

    pub fn new(epoch: Epoch, counter: u64) -> Self {
        Seq { epoch, counter }
    }
}

/// One chunk replica's identity on a node: which volume, which chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkId {
    pub volume: VolumeId,
    pub chunk: ChunkIdx,
}

impl ChunkId {
    pub fn new(volume: VolumeId, chunk: ChunkIdx) -> Self {
        ChunkId { volume, chunk }
    }
}

/// What a replica knows about one block: the checksum of its current content
/// and the sequence of the write that produced it. Rebuild and resync compare
/// these tables and copy only the blocks whose contexts differ.
/// `seq == Seq::ZERO` means the block was never written (reads as zeros).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct BlockContext {
    pub crc: u32,
    pub seq: Seq,
}

impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vol-{}", self.0)
    }
}
impl fmt::Display for ChunkIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for BlockIdx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node-{}", self.0)
    }
}
impl fmt::Display for Zone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}
impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch.0, self.counter)
    }
}
impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/chunk-{}", self.volume, self.chunk.0)
    }
}

/// True when `v` is a whole number of blocks.
pub fn is_block_aligned(v: u64) -> bool {
    v.is_multiple_of(BLOCK_SIZE_U64)
}

/// The little-endian `u32` at the start of `b` (the byte order of every on-disk
/// and on-wire record). Panics if `b` is shorter than 4 bytes: callers read
/// fixed-size records whose length they have already checked.
pub fn le_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// The little-endian `u64` at the start of `b`; see [`le_u32`].
pub fn le_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seq_orders_by_epoch_first() {
        let a = Seq::new(Epoch(1), 1_000_000);
        let b = Seq::new(Epoch(2), 0);
        assert!(a < b);
        assert!(Seq::ZERO < a);
    }

    #[test]
    fn alignment() {
        assert!(is_block_aligned(0));
        assert!(is_block_aligned(8192));
        assert!(!is_block_aligned(4095));
    }
}
