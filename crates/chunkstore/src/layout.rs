//! On-disk formats of the chunk store: the context-file header, the per-block
//! context slots, the epoch file and the store marker. Pure encode/decode, no I/O.
//!
//! All integers are little-endian. Every format starts with an 8-byte magic whose
//! last byte is the format version, so a future layout is a new magic, and an old
//! binary refuses a newer file instead of misreading it.
//!
//! # Context file (`chunks/v{volume:016x}-c{chunk:08x}.ctx`)
//!
//! ```text
//! offset  width  field
//! ------  -----  ----------------------------------------------------------
//!      0      8  magic  "BLSTCTX" 0x01          (version 1)
//!      8      4  block size (4096)
//!     12      4  slot size (32)
//!     16      8  volume id
//!     24      4  chunk index
//!     28      4  reserved, 0
//!     32      8  chunk size in bytes (multiple of 4096)
//!     40      4  crc32 of bytes 0..40            (header crc; the dirty mark below
//!                                                  is NOT covered: it changes alone)
//!     44      4  reserved, 0
//!     48      8  dirty mark: 0 = clean, anything else = dirty (DIRTY_MARK when set),
//!                so a damaged mark errs on the side of "dirty"
//!     56   4040  reserved, 0
//!   4096  64*n   block contexts, block b at 4096 + 64*b: slot 0 then slot 1
//! ```
//!
//! One context slot (32 bytes; two per block, so a block's 64 bytes never straddle
//! a 512-byte sector):
//!
//! ```text
//!      0      8  seq.epoch
//!      8      8  seq.counter
//!     16      4  crc32 (crc32fast) of the block's 4096 data bytes
//!     20      4  generation: per-block write counter, wrapping; the newer slot wins
//!     24      4  crc32 of slot bytes 0..24       (a torn slot store never validates)
//!     28      4  reserved, 0
//! ```
//!
//! An all-zero slot is "empty": never written, it stands for a zero block with
//! `Seq::ZERO` and generation 0 (a fresh, fallocated file is all empty slots). A
//! slot whose own crc fails is "invalid" and ignored; the store writes all-0xff to
//! retract a slot whose data write failed.
//!
//! Why a generation and not "the higher seq wins": resync and reconciliation copy a
//! block with its original seq, which may be lower than the seq already there; the
//! last write must still be the current one. The slot the next write goes to is the
//! inactive one: the older generation (or an invalid one).
//!
//! # Data file (`chunks/v{volume:016x}-c{chunk:08x}.data`)
//!
//! A sparse file of exactly chunk-size bytes; block b at offset 4096*b. No header,
//! so O_DIRECT offsets are the block offsets. Holes read as zeros.
//!
//! # Epoch file (`epochs/v{volume:016x}.epoch`), 32 bytes
//!
//! ```text
//!      0      8  magic "BLSTEPO" 0x01
//!      8      8  volume id
//!     16      8  epoch
//!     24      4  crc32 of bytes 0..24
//!     28      4  reserved, 0
//! ```
//! Replaced crash-safely: write `*.tmp`, fsync, rename, fsync the directory.
//!
//! # Snapshot layers (`chunks/v{volume:016x}-c{chunk:08x}.l{epoch:016x}{counter:016x}.{data,ctx}`)
//!
//! A chunk replica is a stack of layers, each a data file and a context file in
//! the formats above. A layer holds the block versions whose seq is above its
//! *lower bound* (exclusive), written in its name; the base layer (lower bound
//! `Seq::ZERO`) has the plain names above. The top layer is live: writes go to
//! it. A block is *written* in a layer when its current slot is `Valid` (an
//! empty or retracted slot is not); a block not written in a layer is read from
//! the next layer down, and reads as zeros if written in none.
//!
//! A volume's snapshot cuts (below) decide when a layer is frozen: a write with
//! seq `s` to a chunk whose live layer has lower bound `L` first freezes the live
//! layer if some cut `C` has `L < C < s`, and starts a new live layer with lower
//! bound the highest cut below `s`. So a layer never holds versions on both sides
//! of a cut, and the view of a snapshot at cut `C` is the stack without the
//! layers whose lower bound is `C` or more.
//!
//! # Cuts file (`snapshots/v{volume:016x}.cuts`)
//!
//! ```text
//!      0      8  magic "BLSTCUT" 0x01
//!      8      8  volume id
//!     16      4  n: number of cuts (at most MAX_CUTS)
//!     20      4  reserved, 0
//!     24   16*n  cuts, ascending, distinct: seq.epoch u64 | seq.counter u64
//! 24+16n      4  crc32 of bytes 0..24+16n
//! 28+16n      4  reserved, 0
//! ```
//! Replaced crash-safely like the epoch file.
//!
//! # Store marker (`ballast-chunkstore`), 16 bytes
//!
//! ```text
//!      0      8  magic "BLSTORE" 0x01, or 0x02 once the store holds snapshot
//!                layers or cuts (a binary without them refuses it, rather than
//!                removing layer files it does not know)
//!      8      4  block size (4096)
//!     12      4  crc32 of bytes 0..12
//! ```

use ballast_types::{le_u32, le_u64, ChunkId, ChunkIdx, Epoch, Seq, VolumeId, BLOCK_SIZE};

pub const CTX_MAGIC: [u8; 8] = *b"BLSTCTX\x01";
pub const EPOCH_MAGIC: [u8; 8] = *b"BLSTEPO\x01";
pub const STORE_MAGIC: [u8; 8] = *b"BLSTORE\x01";
/// The marker of a store with snapshot layers or cuts.
pub const STORE_MAGIC_V2: [u8; 8] = *b"BLSTORE\x02";
pub const CUTS_MAGIC: [u8; 8] = *b"BLSTCUT\x01";
/// Snapshot cuts a volume may have (Longhorn allows 250 snapshots per volume).
pub const MAX_CUTS: usize = 256;

/// Bytes before the first block context: one page, so the slot area is page aligned.
pub const CTX_HEADER_LEN: usize = 4096;
pub const SLOT_LEN: usize = 32;
pub const BLOCK_CTX_LEN: usize = 2 * SLOT_LEN;
pub const DIRTY_OFFSET: usize = 48;
/// The value written to the dirty mark ("DIRTY" in ASCII, little-endian).
pub const DIRTY_MARK: u64 = 0x0000_0059_5452_4944;
pub const EPOCH_FILE_LEN: usize = 32;
pub const STORE_MARKER_LEN: usize = 16;

/// The crc32 of a 4096-byte block of zeros: the context of trimmed and never
/// written blocks.
pub fn zero_block_crc() -> u32 {
    static ZERO: [u8; BLOCK_SIZE as usize] = [0; BLOCK_SIZE as usize];
    crc32fast::hash(&ZERO)
}

/// Total length of a context file for a chunk of `chunk_size` bytes.
pub fn ctx_file_len(chunk_size: u64) -> u64 {
    CTX_HEADER_LEN as u64 + (chunk_size / BLOCK_SIZE as u64) * BLOCK_CTX_LEN as u64
}

/// Offset of slot `slot` (0 or 1) of block `block` in the context file.
pub fn slot_offset(block: u32, slot: usize) -> usize {
    CTX_HEADER_LEN + block as usize * BLOCK_CTX_LEN + slot * SLOT_LEN
}

/// The identity fields of a context file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtxHeader {
    pub id: ChunkId,
    pub chunk_size: u64,
}

impl CtxHeader {
    /// The first 48 bytes (magic through reserved); the dirty mark is separate.
    pub fn encode(&self) -> [u8; 48] {
        let mut b = [0u8; 48];
        b[0..8].copy_from_slice(&CTX_MAGIC);
        b[8..12].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
        b[12..16].copy_from_slice(&(SLOT_LEN as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.id.volume.0.to_le_bytes());
        b[24..28].copy_from_slice(&self.id.chunk.0.to_le_bytes());
        b[32..40].copy_from_slice(&self.chunk_size.to_le_bytes());
        let crc = crc32fast::hash(&b[0..40]);
        b[40..44].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<CtxHeader, &'static str> {
        if b.len() < 48 {
            return Err("header too short");
        }
        if b[0..8] != CTX_MAGIC {
            return Err("bad magic or unsupported version");
        }
        if crc32fast::hash(&b[0..40]) != le_u32(&b[40..44]) {
            return Err("header crc mismatch");
        }
        if le_u32(&b[8..12]) != BLOCK_SIZE {
            return Err("block size differs");
        }
        if le_u32(&b[12..16]) as usize != SLOT_LEN {
            return Err("slot size differs");
        }
        let chunk_size = le_u64(&b[32..40]);
        if !chunk_size.is_multiple_of(BLOCK_SIZE as u64) {
            return Err("chunk size not block aligned");
        }
        Ok(CtxHeader { id: ChunkId::new(VolumeId(le_u64(&b[16..24])), ChunkIdx(le_u32(&b[24..28]))), chunk_size })
    }
}

/// A decoded block-context slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// All zeros: never written; stands for a zero block at `Seq::ZERO`, generation 0.
    Empty,
    Valid {
        seq: Seq,
        crc: u32,
        gen: u32,
    },
    /// Own crc fails (torn, retracted or damaged): ignored.
    Invalid,
}

impl Slot {
    pub fn encode(seq: Seq, crc: u32, gen: u32) -> [u8; SLOT_LEN] {
        let mut b = [0u8; SLOT_LEN];
        b[0..8].copy_from_slice(&seq.epoch.0.to_le_bytes());
        b[8..16].copy_from_slice(&seq.counter.to_le_bytes());
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b[20..24].copy_from_slice(&gen.to_le_bytes());
        let scrc = crc32fast::hash(&b[0..24]);
        b[24..28].copy_from_slice(&scrc.to_le_bytes());
        b
    }

    /// The bytes that retract a slot: their own crc can never match.
    pub const RETRACTED: [u8; SLOT_LEN] = [0xff; SLOT_LEN];

    pub fn decode(b: &[u8]) -> Slot {
        if b.iter().all(|&x| x == 0) {
            return Slot::Empty;
        }
        if crc32fast::hash(&b[0..24]) != le_u32(&b[24..28]) {
            return Slot::Invalid;
        }
        Slot::Valid {
            seq: Seq::new(Epoch(le_u64(&b[0..8])), le_u64(&b[8..16])),
            crc: le_u32(&b[16..20]),
            gen: le_u32(&b[20..24]),
        }
    }

    /// (seq, data crc, generation) if the slot can vouch for data.
    pub fn context(&self) -> Option<(Seq, u32, u32)> {
        match *self {
            Slot::Empty => Some((Seq::ZERO, zero_block_crc(), 0)),
            Slot::Valid { seq, crc, gen } => Some((seq, crc, gen)),
            Slot::Invalid => None,
        }
    }
}

/// True if generation `a` is newer than `b` (wrapping, like TCP sequence numbers).
pub fn gen_newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// Of a block's two slots: the index of the current one (the slot the data should
/// match), or None when neither is usable.
pub fn current_slot(s0: &Slot, s1: &Slot) -> Option<usize> {
    match (s0.context(), s1.context()) {
        (Some((_, _, g0)), Some((_, _, g1))) => Some(if gen_newer(g1, g0) { 1 } else { 0 }),
        (Some(_), None) => Some(0),
        (None, Some(_)) => Some(1),
        (None, None) => None,
    }
}

pub fn encode_epoch_file(volume: VolumeId, epoch: Epoch) -> [u8; EPOCH_FILE_LEN] {
    let mut b = [0u8; EPOCH_FILE_LEN];
    b[0..8].copy_from_slice(&EPOCH_MAGIC);
    b[8..16].copy_from_slice(&volume.0.to_le_bytes());
    b[16..24].copy_from_slice(&epoch.0.to_le_bytes());
    let crc = crc32fast::hash(&b[0..24]);
    b[24..28].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_epoch_file(b: &[u8]) -> Result<(VolumeId, Epoch), &'static str> {
    if b.len() != EPOCH_FILE_LEN {
        return Err("epoch file has the wrong length");
    }
    if b[0..8] != EPOCH_MAGIC {
        return Err("bad magic or unsupported version");
    }
    if crc32fast::hash(&b[0..24]) != le_u32(&b[24..28]) {
        return Err("epoch file crc mismatch");
    }
    Ok((VolumeId(le_u64(&b[8..16])), Epoch(le_u64(&b[16..24]))))
}

/// The store marker, version 1 or 2 (see the module docs).
pub fn encode_store_marker(version: u8) -> [u8; STORE_MARKER_LEN] {
    let mut b = [0u8; STORE_MARKER_LEN];
    b[0..8].copy_from_slice(if version >= 2 { &STORE_MAGIC_V2 } else { &STORE_MAGIC });
    b[8..12].copy_from_slice(&BLOCK_SIZE.to_le_bytes());
    let crc = crc32fast::hash(&b[0..12]);
    b[12..16].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Checks a store marker; its version (1, or 2 with snapshot layers).
pub fn check_store_marker(b: &[u8]) -> Result<u8, &'static str> {
    if b.len() != STORE_MARKER_LEN || (b[0..8] != STORE_MAGIC && b[0..8] != STORE_MAGIC_V2) {
        return Err("not a ballast chunk store of a supported version");
    }
    if crc32fast::hash(&b[0..12]) != le_u32(&b[12..16]) {
        return Err("store marker crc mismatch");
    }
    if le_u32(&b[8..12]) != BLOCK_SIZE {
        return Err("store block size differs");
    }
    Ok(b[7])
}

/// Length of a cuts file with `n` cuts.
pub fn cuts_file_len(n: usize) -> usize {
    32 + 16 * n
}

/// The cuts file of `volume` (see the module docs). `cuts` ascending, distinct,
/// at most [`MAX_CUTS`] (checked by the caller: [`check_cuts`]).
pub fn encode_cuts_file(volume: VolumeId, cuts: &[Seq]) -> Vec<u8> {
    let mut b = vec![0u8; cuts_file_len(cuts.len())];
    b[0..8].copy_from_slice(&CUTS_MAGIC);
    b[8..16].copy_from_slice(&volume.0.to_le_bytes());
    b[16..20].copy_from_slice(&(cuts.len() as u32).to_le_bytes());
    for (i, c) in cuts.iter().enumerate() {
        let o = 24 + 16 * i;
        b[o..o + 8].copy_from_slice(&c.epoch.0.to_le_bytes());
        b[o + 8..o + 16].copy_from_slice(&c.counter.to_le_bytes());
    }
    let end = 24 + 16 * cuts.len();
    let crc = crc32fast::hash(&b[0..end]);
    b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Cuts must be ascending, distinct, above `Seq::ZERO` and at most [`MAX_CUTS`].
pub fn check_cuts(cuts: &[Seq]) -> Result<(), &'static str> {
    if cuts.len() > MAX_CUTS {
        return Err("too many snapshot cuts");
    }
    if cuts.first().is_some_and(|c| *c == Seq::ZERO) {
        return Err("a snapshot cut must be above seq 0");
    }
    if cuts.windows(2).any(|w| w[0] >= w[1]) {
        return Err("snapshot cuts must be ascending and distinct");
    }
    Ok(())
}

pub fn decode_cuts_file(b: &[u8]) -> Result<(VolumeId, Vec<Seq>), &'static str> {
    if b.len() < cuts_file_len(0) || b[0..8] != CUTS_MAGIC {
        return Err("bad magic or unsupported version");
    }
    let n = le_u32(&b[16..20]) as usize;
    if n > MAX_CUTS || b.len() != cuts_file_len(n) {
        return Err("cuts file length does not match its count");
    }
    let end = 24 + 16 * n;
    if crc32fast::hash(&b[0..end]) != le_u32(&b[end..end + 4]) {
        return Err("cuts file crc mismatch");
    }
    let cuts: Vec<Seq> = (0..n)
        .map(|i| {
            let o = 24 + 16 * i;
            Seq::new(Epoch(le_u64(&b[o..o + 8])), le_u64(&b[o + 8..o + 16]))
        })
        .collect();
    check_cuts(&cuts)?;
    Ok((VolumeId(le_u64(&b[8..16])), cuts))
}

/// The cuts file's name for `volume`.
pub fn cuts_file_name(volume: VolumeId) -> String {
    format!("v{:016x}.cuts", volume.0)
}

pub fn parse_cuts_file_name(name: &str) -> Option<VolumeId> {
    let v = name.strip_prefix('v')?.strip_suffix(".cuts")?;
    if v.len() != 16 {
        return None;
    }
    u64::from_str_radix(v, 16).ok().map(VolumeId)
}

/// The file stem of chunk `id`'s layer with lower bound `lower`: the chunk's
/// stem for the base layer (`Seq::ZERO`), `{stem}.l{epoch:016x}{counter:016x}`
/// for the others.
pub fn layer_file_stem(id: ChunkId, lower: Seq) -> String {
    if lower == Seq::ZERO {
        chunk_file_stem(id)
    } else {
        format!("{}.l{:016x}{:016x}", chunk_file_stem(id), lower.epoch.0, lower.counter)
    }
}

/// The chunk and lower bound a layer's file stem names.
pub fn parse_layer_file_stem(stem: &str) -> Option<(ChunkId, Seq)> {
    let Some((chunk, lower)) = stem.split_once(".l") else {
        return parse_chunk_file_stem(stem).map(|id| (id, Seq::ZERO));
    };
    if lower.len() != 32 || !lower.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let seq = Seq::new(Epoch(u64::from_str_radix(&lower[..16], 16).ok()?), u64::from_str_radix(&lower[16..], 16).ok()?);
    if seq == Seq::ZERO {
        return None;
    }
    Some((parse_chunk_file_stem(chunk)?, seq))
}

/// File names, so the loader and the writer agree.
pub fn chunk_file_stem(id: ChunkId) -> String {
    format!("v{:016x}-c{:08x}", id.volume.0, id.chunk.0)
}

pub fn parse_chunk_file_stem(stem: &str) -> Option<ChunkId> {
    let rest = stem.strip_prefix('v')?;
    let (v, c) = rest.split_once("-c")?;
    if v.len() != 16 || c.len() != 8 {
        return None;
    }
    Some(ChunkId::new(VolumeId(u64::from_str_radix(v, 16).ok()?), ChunkIdx(u32::from_str_radix(c, 16).ok()?)))
}

pub fn epoch_file_name(volume: VolumeId) -> String {
    format!("v{:016x}.epoch", volume.0)
}

pub fn parse_epoch_file_name(name: &str) -> Option<VolumeId> {
    let v = name.strip_prefix('v')?.strip_suffix(".epoch")?;
    if v.len() != 16 {
        return None;
    }
    Some(VolumeId(u64::from_str_radix(v, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn ctx_header_golden_bytes() {
        let h = CtxHeader {
            id: ChunkId::new(VolumeId(0x0102_0304_0506_0708), ChunkIdx(0x0a0b_0c0d)),
            chunk_size: 64 << 20,
        };
        let b = h.encode();
        let crc = crc32fast::hash(&b[0..40]);
        let expect = format!(
            "{}{}{}{}{}{}{}{}{}",
            "424c535443545801", // magic "BLSTCTX" v1
            "00100000",         // block size 4096
            "20000000",         // slot size 32
            "0807060504030201", // volume
            "0d0c0b0a",         // chunk
            "00000000",         // reserved
            "0000000400000000", // chunk size 64 MiB
            hex(&crc.to_le_bytes()),
            "00000000",
        );
        assert_eq!(hex(&b), expect);
        assert_eq!(crc, 0x0de5_81de, "header crc changed: the layout changed");
        assert_eq!(CtxHeader::decode(&b), Ok(h));
        let mut bad = b;
        bad[20] ^= 1;
        assert_eq!(CtxHeader::decode(&bad), Err("header crc mismatch"));
    }

    #[test]
    fn slot_golden_bytes() {
        let b = Slot::encode(Seq::new(Epoch(3), 0x1122), 0xdead_beef, 7);
        assert_eq!(
            hex(&b[0..24]),
            "0300000000000000\
             2211000000000000\
             efbeadde\
             07000000"
        );
        assert_eq!(&b[24..28], &crc32fast::hash(&b[0..24]).to_le_bytes());
        assert_eq!(&b[28..32], &[0, 0, 0, 0]);
        assert_eq!(Slot::decode(&b), Slot::Valid { seq: Seq::new(Epoch(3), 0x1122), crc: 0xdead_beef, gen: 7 });
        assert_eq!(Slot::decode(&[0u8; 32]), Slot::Empty);
        assert_eq!(Slot::decode(&Slot::RETRACTED), Slot::Invalid);
        let mut torn = b;
        torn[8] ^= 0x40;
        assert_eq!(Slot::decode(&torn), Slot::Invalid);
    }

    #[test]
    fn epoch_and_marker_golden_bytes() {
        let b = encode_epoch_file(VolumeId(9), Epoch(0x42));
        assert_eq!(hex(&b[0..24]), "424c535445504f0109000000000000004200000000000000");
        assert_eq!(decode_epoch_file(&b), Ok((VolumeId(9), Epoch(0x42))));
        let m = encode_store_marker(1);
        assert_eq!(hex(&m[0..12]), "424c53544f52450100100000");
        assert_eq!(check_store_marker(&m), Ok(1));
        let m2 = encode_store_marker(2);
        assert_eq!(hex(&m2[0..12]), "424c53544f52450200100000");
        assert_eq!(check_store_marker(&m2), Ok(2));
        let mut bad = m2;
        bad[7] = 3;
        assert!(check_store_marker(&bad).is_err());
    }

    #[test]
    fn cuts_file_golden_bytes() {
        let cuts = [Seq::new(Epoch(2), 0x10), Seq::new(Epoch(3), 1)];
        let b = encode_cuts_file(VolumeId(7), &cuts);
        assert_eq!(b.len(), 64);
        assert_eq!(
            hex(&b[0..56]),
            concat!(
                "424c53544355540107000000000000000200000000000000",
                "02000000000000001000000000000000",
                "03000000000000000100000000000000"
            )
        );
        assert_eq!(&b[60..64], &[0, 0, 0, 0]);
        assert_eq!(decode_cuts_file(&b), Ok((VolumeId(7), cuts.to_vec())));
        assert_eq!(decode_cuts_file(&encode_cuts_file(VolumeId(7), &[])), Ok((VolumeId(7), vec![])));
        let mut torn = b.clone();
        torn[30] ^= 1;
        assert_eq!(decode_cuts_file(&torn), Err("cuts file crc mismatch"));
        assert!(decode_cuts_file(&b[..48]).is_err());
        let unordered = encode_cuts_file(VolumeId(7), &[cuts[1], cuts[0]]);
        assert_eq!(decode_cuts_file(&unordered), Err("snapshot cuts must be ascending and distinct"));
        assert!(check_cuts(&[Seq::ZERO]).is_err());
        assert!(check_cuts(&vec![Seq::new(Epoch(1), 1); 1][..]).is_ok());
        let many: Vec<Seq> = (1..=MAX_CUTS as u64 + 1).map(|i| Seq::new(Epoch(1), i)).collect();
        assert_eq!(check_cuts(&many), Err("too many snapshot cuts"));
        assert_eq!(parse_cuts_file_name(&cuts_file_name(VolumeId(0xfe))), Some(VolumeId(0xfe)));
        assert_eq!(cuts_file_name(VolumeId(0xfe)), "v00000000000000fe.cuts");
    }

    #[test]
    fn layer_file_names() {
        let id = ChunkId::new(VolumeId(0xabc), ChunkIdx(5));
        assert_eq!(layer_file_stem(id, Seq::ZERO), "v0000000000000abc-c00000005");
        let lower = Seq::new(Epoch(3), 0x2a);
        let stem = layer_file_stem(id, lower);
        assert_eq!(stem, "v0000000000000abc-c00000005.l0000000000000003000000000000002a");
        assert_eq!(parse_layer_file_stem(&stem), Some((id, lower)));
        assert_eq!(parse_layer_file_stem(&chunk_file_stem(id)), Some((id, Seq::ZERO)));
        for bad in [
            "v0000000000000abc-c00000005.l00000000000000030000000000002a",
            "v0000000000000abc-c00000005.l0000000000000000000000000000000",
            "v0000000000000abc-c00000005.l00000000000000000000000000000000",
            "v0000000000000abc-c00000005.lzz00000000000003000000000000002a",
            "v0000000000000abc.l0000000000000003000000000000002a",
        ] {
            assert_eq!(parse_layer_file_stem(bad), None, "{bad}");
        }
    }

    #[test]
    fn offsets_and_names() {
        assert_eq!(slot_offset(0, 0), 4096);
        assert_eq!(slot_offset(0, 1), 4096 + 32);
        assert_eq!(slot_offset(2, 1), 4096 + 128 + 32);
        assert_eq!(ctx_file_len(64 << 20), 4096 + 16384 * 64);
        let id = ChunkId::new(VolumeId(0xabc), ChunkIdx(5));
        assert_eq!(chunk_file_stem(id), "v0000000000000abc-c00000005");
        assert_eq!(parse_chunk_file_stem(&chunk_file_stem(id)), Some(id));
        assert_eq!(parse_epoch_file_name(&epoch_file_name(VolumeId(7))), Some(VolumeId(7)));
        assert_eq!(DIRTY_MARK.to_le_bytes()[..5], *b"DIRTY");
    }

    #[test]
    fn generation_order_wraps() {
        assert!(gen_newer(1, 0));
        assert!(gen_newer(0, u32::MAX));
        assert!(!gen_newer(5, 5));
        let a = Slot::decode(&Slot::encode(Seq::new(Epoch(1), 1), 1, 1));
        let b = Slot::decode(&Slot::encode(Seq::new(Epoch(1), 0), 2, 2));
        assert_eq!(current_slot(&a, &b), Some(1), "newer generation wins even with a lower seq");
        assert_eq!(current_slot(&Slot::Invalid, &Slot::Empty), Some(1));
        assert_eq!(current_slot(&Slot::Invalid, &Slot::Invalid), None);
    }
}
