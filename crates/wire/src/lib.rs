//! Ballast's data-path wire protocol: the frames a volume front end and a replica
//! server exchange over TCP, and their codec. No sockets, no async: this crate turns
//! typed [`Frame`]s into bytes and bytes into frames, and nothing else. It must not
//! depend on tokio, tonic, openraft or redb; only `bytes`, `crc32fast`,
//! `thiserror` and `ballast-types`.
//!
//! ```text
//!  front end                                   replica server
//!  ReplicaClient ── Frame{op, req id, ...} ──► Decoder ─► ChunkStore
//!        ▲                                                   │
//!        └── Decoder ◄── Frame{RESPONSE, status, same id} ◄──┘
//!   (pipelined: many requests in flight per connection, answered in any order,
//!    matched by request id)
//! ```
//!
//! # Frame format (version 1)
//!
//! Every frame is a fixed 64-byte header, then `payload length` bytes of payload,
//! then — only when the payload is non-empty — a 4-byte trailer holding the
//! crc32 (crc32fast, IEEE) of the payload bytes. All integers are little-endian.
//!
//! ```text
//! off len field
//!  0   4  magic          b"BLST"
//!  4   1  version        1
//!  5   1  op             Op (1..=17)
//!  6   1  flags          bit0 RESPONSE, bit1 FUA; every other bit must be 0
//!  7   1  status         responses: Status code; requests: always 0
//!  8   8  request id     chosen by the client, echoed in the response
//! 16   8  volume id
//! 24   4  chunk index    0xFFFF_FFFF = all chunks of the volume (Flush, ListDirty)
//! 28   4  length         bytes of the data range (write payload, read length,
//!                        trim/zeroes length, ResyncWrite range); ContextTable:
//!                        block count
//! 32   8  offset         byte offset within the chunk; ContextTable: first block;
//!                        ChunkCreate: the chunk size
//! 40   8  epoch          the request's attach epoch (responses to AnnounceEpoch:
//!                        the replica's current epoch)
//! 48   8  seq counter    write-like ops; with epoch forms the Seq. ResyncWrite:
//!                        the protect-from counter (see below)
//! 56   4  payload length bytes of payload, NOT counting the crc trailer
//! 60   4  header crc     crc32 of bytes 0..60
//! 64   n  payload        Write: data; Read response: data; ContextTable response:
//!                        count x 20-byte entries (see [`encode_contexts`]);
//!                        ListDirty response: u32 chunk indices; ResyncWrite: see
//!                        below; error responses: a UTF-8 message
//! 64+n 4  payload crc    crc32 of the payload; present iff n > 0
//! ```
//!
//! Why this shape: the header is fixed-size so a reader knows after 64 bytes how
//! much more to wait for, and it carries its own crc so a corrupted length can
//! never make a reader wait for (or allocate) a bogus amount. The payload crc is a
//! trailer, not a header field, so a sender can stream a payload it already holds
//! as `Bytes` with a vectored write and no copy. The header crc is checked before
//! anything else in the header is believed (magic aside, to name garbage as such),
//! so any single flipped bit anywhere in a frame is detected: in the header by the
//! header crc, in the payload or the trailer by the payload crc.
//!
//! # ResyncWrite (op 12)
//!
//! Copies blocks from an in-sync source replica to a resyncing or rebuilding
//! target, each block with the source's ORIGINAL seq, conditionally: the target
//! applies a block only where it cannot undo a newer write (the rule is the chunk
//! store's `resync_write`). One request covers `length / 4096` consecutive blocks
//! from `offset` (at most [`MAX_RESYNC_BLOCKS`]); `epoch` is the fence epoch (the
//! per-block seqs may be older); the FUA flag flushes the chunk after applying.
//! Target blocks whose seq is at least `Seq{epoch, seq counter}` are protected
//! (replaced only by a newer seq); older ones are replaced by the source's.
//!
//! Request payload: a table of one 24-byte entry per block of the range, then the
//! 4096 data bytes of every `Data` entry, in entry order (nothing for `Keep` and
//! `Zero` entries):
//!
//! ```text
//! off len field (entry i at 24*i)
//!  0   8  seq epoch      the source block's seq (0 for Keep)
//!  8   8  seq counter
//! 16   1  kind           0 Keep (leave alone), 1 Data, 2 Zero (punch)
//! 17   7  reserved       0
//! ```
//!
//! So the payload length is `24 * blocks + 4096 * data entries`; the table comes
//! first so the receiver knows each block's fate before it looks at any data.
//! Response payload (Ok), 12 bytes: `written u32 | zeroed u32 | skipped u32`, the
//! blocks the target wrote, punched, and left alone because its copy was newer.
//!
//! # SetCuts (op 13) and ReadSnapshot (op 14)
//!
//! A volume's snapshot cuts (the chunk store's snapshot layers). SetCuts
//! replaces the volume's list of cuts on the replica: chunk index
//! [`ALL_CHUNKS`], `length` = the number of cuts (at most [`MAX_CUTS`]),
//! payload = the cuts, ascending, 16 bytes each (`seq.epoch u64 | seq.counter
//! u64`, [`encode_cuts`]); `epoch` is the fence epoch; `offset` is 0, or
//! [`SET_CUTS_IF_NONE`] to apply them only if the replica keeps no cuts for
//! the volume yet (a copy job's, never replacing a front end's). ReadSnapshot is a Read
//! of the chunk's view at one cut: `offset` and `length` as for Read, payload =
//! that one cut (16 bytes); the response payload is the data.
//!
//! # ContextTableAt (op 15), ResyncWriteAt (op 16), ListCuts (op 17)
//!
//! What a copy job needs to carry snapshot views to a resyncing or rebuilding
//! replica (the chunk store's `resync_write`, "Views"). ContextTableAt is a
//! ContextTable of the chunk's view at one cut: payload = that cut. ResyncWriteAt
//! is a ResyncWrite of blocks of the source's view at one cut: payload = that
//! cut, then exactly a ResyncWrite payload; the target makes its own view at the
//! cut hold the same versions. ListCuts (chunk index [`ALL_CHUNKS`], no
//! payload) answers with the volume's cuts on the replica, encoded as for
//! SetCuts.
//!
//! Version changelog: 1 — the initial format above; op 12 (ResyncWrite), then
//! ops 13 and 14 (SetCuts, ReadSnapshot), then ops 15 to 17 (ContextTableAt,
//! ResyncWriteAt, ListCuts) added within version 1: they are
//! additive (a replica that predates them answers nothing and closes the
//! connection with `UnknownOp`, so a request against it fails loudly, never
//! silently).

use ballast_types::{le_u32, le_u64, BlockContext, ChunkIdx, Epoch, Seq, VolumeId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"BLST";
/// The only protocol version this crate speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_LEN: usize = 64;
/// Size of the payload crc trailer (present only after a non-empty payload).
pub const TRAILER_LEN: usize = 4;
/// The largest payload a peer may send by default: a 32 MiB data range plus room
/// for small metadata payloads. Larger frames are rejected as oversized before any
/// of their payload is buffered.
pub const MAX_PAYLOAD: u32 = (32 << 20) + (64 << 10);
/// The chunk index meaning "every chunk of the volume" (Flush, ListDirty).
pub const ALL_CHUNKS: ChunkIdx = ChunkIdx(u32::MAX);
/// Size of one encoded [`BlockContext`] in a ContextTable response.
pub const CONTEXT_ENTRY_LEN: usize = 20;
/// Size of one per-block entry in a ResyncWrite request's table.
pub const RESYNC_ENTRY_LEN: usize = 24;
/// The most blocks one ResyncWrite may cover: 16 MiB of data plus a 96 KiB table
/// stays below [`MAX_PAYLOAD`].
pub const MAX_RESYNC_BLOCKS: u32 = 4096;
/// Size of a ResyncWrite response payload.
pub const RESYNC_RESULT_LEN: usize = 12;
/// Size of one snapshot cut in a SetCuts or ReadSnapshot payload.
pub const CUT_LEN: usize = 16;
/// SetCuts `offset`: apply the cuts only if the replica keeps none for the
/// volume (0: replace them).
pub const SET_CUTS_IF_NONE: u64 = 1;
/// The most cuts a SetCuts may carry (the chunk store's limit too).
pub const MAX_CUTS: u32 = 256;

/// Everything that can be wrong with bytes on the wire, or with a frame's shape.
/// Any of these on a connection means the peer cannot be trusted to stay in step:
/// the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("bad magic {0:02x?}, expected \"BLST\"")]
    BadMagic([u8; 4]),
    #[error("unsupported protocol version {0}, this side speaks {VERSION}")]
    BadVersion(u8),
    #[error("header crc mismatch: header says {expected:#010x}, bytes give {actual:#010x}")]
    HeaderCrc { expected: u32, actual: u32 },
    #[error("unknown op code {0}")]
    UnknownOp(u8),
    #[error("reserved flag bits set: {0:#04x}")]
    BadFlags(u8),
    #[error("unknown status code {0}")]
    UnknownStatus(u8),
    #[error("request carries a non-zero status {0}")]
    StatusOnRequest(u8),
    #[error("frame payload of {len} bytes exceeds the maximum of {max}")]
    Oversized { len: u64, max: u32 },
    #[error("payload crc mismatch: trailer says {expected:#010x}, bytes give {actual:#010x}")]
    PayloadCrc { expected: u32, actual: u32 },
    #[error("{op:?} payload of {actual} bytes, expected {expected}")]
    BadPayloadLength { op: Op, expected: u64, actual: u64 },
    #[error("resync entry {index}: {reason}")]
    BadResyncEntry { index: u32, reason: &'static str },
    #[error("response {request_id} answers no request in flight with that op")]
    UnexpectedResponse { request_id: u64 },
}

/// The operation a frame asks for (or answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Op {
    /// Write `payload` at `offset` of the chunk with `Seq{epoch, seq counter}`.
    Write = 1,
    /// Read `length` bytes at `offset`; the response payload is the data.
    Read = 2,
    /// Make prior writes durable: one chunk, or the volume with [`ALL_CHUNKS`].
    Flush = 3,
    /// Discard `length` bytes at `offset` (reads zeros afterwards).
    Trim = 4,
    /// Make `length` bytes at `offset` read as zeros.
    WriteZeroes = 5,
    /// Read `length` block contexts starting at block `offset`.
    ContextTable = 6,
    /// Create the chunk with size `offset`.
    ChunkCreate = 7,
    /// Delete the chunk.
    ChunkDelete = 8,
    /// Liveness check; no state is touched.
    Ping = 9,
    /// Raise the volume's epoch to `epoch`; the response's epoch is the current one.
    AnnounceEpoch = 10,
    /// List the volume's chunks that are dirty since their last flush.
    ListDirty = 11,
    /// Conditionally apply a source replica's blocks with their original seqs
    /// (resync / rebuild); see the module docs for the payload.
    ResyncWrite = 12,
    /// Replace the volume's snapshot cuts (payload: the cuts).
    SetCuts = 13,
    /// Read `length` bytes at `offset` as they were at a cut (payload: the cut).
    ReadSnapshot = 14,
    /// ContextTable of the chunk's view at a cut (payload: the cut).
    ContextTableAt = 15,
    /// ResyncWrite of blocks of the source's view at a cut (payload: the cut,
    /// then a ResyncWrite payload).
    ResyncWriteAt = 16,
    /// The volume's snapshot cuts on this replica (response payload: the cuts).
    ListCuts = 17,
}

impl Op {
    pub const ALL: [Op; 17] = [
        Op::Write,
        Op::Read,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::ContextTable,
        Op::ChunkCreate,
        Op::ChunkDelete,
        Op::Ping,
        Op::AnnounceEpoch,
        Op::ListDirty,
        Op::ResyncWrite,
        Op::SetCuts,
        Op::ReadSnapshot,
        Op::ContextTableAt,
        Op::ResyncWriteAt,
        Op::ListCuts,
    ];

    pub fn from_u8(v: u8) -> Result<Op, WireError> {
        Ok(match v {
            1 => Op::Write,
            2 => Op::Read,
            3 => Op::Flush,
            4 => Op::Trim,
            5 => Op::WriteZeroes,
            6 => Op::ContextTable,
            7 => Op::ChunkCreate,
            8 => Op::ChunkDelete,
            9 => Op::Ping,
            10 => Op::AnnounceEpoch,
            11 => Op::ListDirty,
            12 => Op::ResyncWrite,
            13 => Op::SetCuts,
            14 => Op::ReadSnapshot,
            15 => Op::ContextTableAt,
            16 => Op::ResyncWriteAt,
            17 => Op::ListCuts,
            other => return Err(WireError::UnknownOp(other)),
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// Short lower-case name, for logs and span fields.
    pub fn name(self) -> &'static str {
        match self {
            Op::Write => "write",
            Op::Read => "read",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::ContextTable => "context_table",
            Op::ChunkCreate => "chunk_create",
            Op::ChunkDelete => "chunk_delete",
            Op::Ping => "ping",
            Op::AnnounceEpoch => "announce_epoch",
            Op::ListDirty => "list_dirty",
            Op::ResyncWrite => "resync_write",
            Op::SetCuts => "set_cuts",
            Op::ReadSnapshot => "read_snapshot",
            Op::ContextTableAt => "context_table_at",
            Op::ResyncWriteAt => "resync_write_at",
            Op::ListCuts => "list_cuts",
        }
    }
}

/// A response's outcome. Numeric on the wire; error responses also carry a
/// human-readable UTF-8 message as payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Status {
    Ok = 0,
    /// The request's epoch is older than the volume's announced epoch. Never retry.
    Fenced = 1,
    /// The request's epoch is newer than announced: announce first.
    UnannouncedEpoch = 2,
    NoSuchChunk = 3,
    ChunkExists = 4,
    OutOfRange = 5,
    Misaligned = 6,
    /// Stored data failed its checksum: read another replica and repair.
    ChecksumMismatch = 7,
    NoSpace = 8,
    Io = 9,
    /// The request decoded but makes no sense (e.g. payload length vs op).
    BadRequest = 10,
    /// The replica is shutting down.
    Shutdown = 11,
}

impl Status {
    pub const ALL: [Status; 12] = [
        Status::Ok,
        Status::Fenced,
        Status::UnannouncedEpoch,
        Status::NoSuchChunk,
        Status::ChunkExists,
        Status::OutOfRange,
        Status::Misaligned,
        Status::ChecksumMismatch,
        Status::NoSpace,
        Status::Io,
        Status::BadRequest,
        Status::Shutdown,
    ];

    pub fn from_u8(v: u8) -> Result<Status, WireError> {
        Ok(match v {
            0 => Status::Ok,
            1 => Status::Fenced,
            2 => Status::UnannouncedEpoch,
            3 => Status::NoSuchChunk,
            4 => Status::ChunkExists,
            5 => Status::OutOfRange,
            6 => Status::Misaligned,
            7 => Status::ChecksumMismatch,
            8 => Status::NoSpace,
            9 => Status::Io,
            10 => Status::BadRequest,
            11 => Status::Shutdown,
            other => return Err(WireError::UnknownStatus(other)),
        })
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }

    /// A short description of the code, used when an error response has no message.
    pub fn message(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Fenced => "fenced: request epoch is older than the announced epoch",
            Status::UnannouncedEpoch => "request epoch is newer than the announced epoch",
            Status::NoSuchChunk => "no such chunk",
            Status::ChunkExists => "chunk exists with a different size",
            Status::OutOfRange => "range is outside the chunk",
            Status::Misaligned => "offset or length is not block aligned",
            Status::ChecksumMismatch => "stored data failed its checksum",
            Status::NoSpace => "no space left on the replica's disk",
            Status::Io => "I/O error on the replica",
            Status::BadRequest => "malformed request",
            Status::Shutdown => "replica is shutting down",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// The flag byte. Only two bits are defined; the decoder rejects the others.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Flags {
    /// This frame answers a request (bit 0).
    pub response: bool,
    /// Write with force-unit-access: durable before the response (bit 1).
    pub fua: bool,
}

impl Flags {
    const RESPONSE: u8 = 1 << 0;
    const FUA: u8 = 1 << 1;

    pub fn from_u8(v: u8) -> Result<Flags, WireError> {
        if v & !(Self::RESPONSE | Self::FUA) != 0 {
            return Err(WireError::BadFlags(v));
        }
        Ok(Flags { response: v & Self::RESPONSE != 0, fua: v & Self::FUA != 0 })
    }

    pub fn as_u8(self) -> u8 {
        (if self.response { Self::RESPONSE } else { 0 }) | (if self.fua { Self::FUA } else { 0 })
    }
}

/// The typed 64-byte header. The payload length is not stored here: it is the
/// length of the [`Frame`]'s payload, so the two can never disagree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    pub op: Op,
    pub flags: Flags,
    /// `Status::Ok` on every request.
    pub status: Status,
    pub request_id: u64,
    pub volume: VolumeId,
    pub chunk: ChunkIdx,
    pub length: u32,
    pub offset: u64,
    pub epoch: Epoch,
    pub seq_counter: u64,
}

impl Header {
    /// A request header with every range field zero; set the ones the op uses.
    pub fn request(op: Op, request_id: u64, volume: VolumeId, chunk: ChunkIdx, epoch: Epoch) -> Header {
        Header {
            op,
            flags: Flags::default(),
            status: Status::Ok,
            request_id,
            volume,
            chunk,
            length: 0,
            offset: 0,
            epoch,
            seq_counter: 0,
        }
    }

    /// The response header answering `self`: same op, ids and range, the given status.
    pub fn response(&self, status: Status) -> Header {
        Header { flags: Flags { response: true, fua: self.flags.fua }, status, ..*self }
    }

    /// The write sequence this header carries (`epoch`, `seq counter`).
    pub fn seq(&self) -> Seq {
        Seq::new(self.epoch, self.seq_counter)
    }

    /// The header's 64 bytes for a payload of `payload_len` bytes, crc included.
    pub fn to_bytes(&self, payload_len: u32) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = VERSION;
        b[5] = self.op.as_u8();
        b[6] = self.flags.as_u8();
        b[7] = self.status.as_u8();
        b[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        b[16..24].copy_from_slice(&self.volume.0.to_le_bytes());
        b[24..28].copy_from_slice(&self.chunk.0.to_le_bytes());
        b[28..32].copy_from_slice(&self.length.to_le_bytes());
        b[32..40].copy_from_slice(&self.offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.epoch.0.to_le_bytes());
        b[48..56].copy_from_slice(&self.seq_counter.to_le_bytes());
        b[56..60].copy_from_slice(&payload_len.to_le_bytes());
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Parses and validates a header; returns it with its payload length.
    /// Order of checks: magic (to name garbage), header crc (before believing any
    /// other field), then version, op, flags, status.
    pub fn parse(b: &[u8; HEADER_LEN]) -> Result<(Header, u32), WireError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if magic != MAGIC {
            return Err(WireError::BadMagic(magic));
        }
        let expected = le_u32(&b[60..64]);
        let actual = crc32fast::hash(&b[0..60]);
        if expected != actual {
            return Err(WireError::HeaderCrc { expected, actual });
        }
        if b[4] != VERSION {
            return Err(WireError::BadVersion(b[4]));
        }
        let op = Op::from_u8(b[5])?;
        let flags = Flags::from_u8(b[6])?;
        let status = Status::from_u8(b[7])?;
        if !flags.response && status != Status::Ok {
            return Err(WireError::StatusOnRequest(b[7]));
        }
        let header = Header {
            op,
            flags,
            status,
            request_id: le_u64(&b[8..16]),
            volume: VolumeId(le_u64(&b[16..24])),
            chunk: ChunkIdx(le_u32(&b[24..28])),
            length: le_u32(&b[28..32]),
            offset: le_u64(&b[32..40]),
            epoch: Epoch(le_u64(&b[40..48])),
            seq_counter: le_u64(&b[48..56]),
        };
        Ok((header, le_u32(&b[56..60])))
    }
}

/// One message: header plus payload. The payload is shared `Bytes`: decoding
/// slices it out of the read buffer, encoding can pass it to a vectored write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub header: Header,
    pub payload: Bytes,
}

impl Frame {
    pub fn new(header: Header, payload: Bytes) -> Frame {
        Frame { header, payload }
    }

    /// An error response to `request` carrying `message` as its payload.
    pub fn error_response(request: &Header, status: Status, message: &str) -> Frame {
        Frame { header: request.response(status), payload: Bytes::copy_from_slice(message.as_bytes()) }
    }

    /// The message of an error response (lossy UTF-8), or the status's own text.
    pub fn error_message(&self) -> String {
        if self.payload.is_empty() {
            self.header.status.message().to_string()
        } else {
            String::from_utf8_lossy(&self.payload).into_owned()
        }
    }

    /// The number of bytes this frame occupies on the wire.
    pub fn wire_len(&self) -> usize {
        HEADER_LEN + self.payload.len() + if self.payload.is_empty() { 0 } else { TRAILER_LEN }
    }

    /// The frame as three parts for a vectored write without copying the payload:
    /// header bytes, the payload itself, and the trailer (empty for no payload).
    pub fn wire_parts(&self) -> Result<([u8; HEADER_LEN], Bytes, TrailerBytes), WireError> {
        let len = payload_len_u32(self.payload.len())?;
        let header = self.header.to_bytes(len);
        Ok((header, self.payload.clone(), trailer(&self.payload)))
    }
}

/// The payload crc trailer: 4 bytes after a non-empty payload, nothing otherwise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrailerBytes {
    bytes: [u8; TRAILER_LEN],
    len: usize,
}

impl TrailerBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

fn trailer(payload: &[u8]) -> TrailerBytes {
    if payload.is_empty() {
        TrailerBytes { bytes: [0; TRAILER_LEN], len: 0 }
    } else {
        TrailerBytes { bytes: crc32fast::hash(payload).to_le_bytes(), len: TRAILER_LEN }
    }
}

fn payload_len_u32(len: usize) -> Result<u32, WireError> {
    match u32::try_from(len) {
        Ok(l) => Ok(l),
        Err(_) => Err(WireError::Oversized { len: len as u64, max: u32::MAX }),
    }
}

/// Appends `frame`'s wire bytes to `dst` (copying the payload). For large
/// payloads prefer [`Frame::wire_parts`] and a vectored write.
pub fn encode(frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
    let len = payload_len_u32(frame.payload.len())?;
    dst.reserve(frame.wire_len());
    dst.put_slice(&frame.header.to_bytes(len));
    if !frame.payload.is_empty() {
        dst.put_slice(&frame.payload);
        dst.put_slice(trailer(&frame.payload).as_slice());
    }
    Ok(())
}

/// An incremental frame decoder over a read buffer. Feed it the connection's
/// `BytesMut`; it consumes whole frames and leaves partial ones in place.
#[derive(Clone, Debug)]
pub struct Decoder {
    max_payload: u32,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder { max_payload: MAX_PAYLOAD }
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder::default()
    }

    /// A decoder accepting payloads up to `max_payload` bytes.
    pub fn with_max_payload(max_payload: u32) -> Decoder {
        Decoder { max_payload }
    }

    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// How many more bytes `buf` needs before the next call can make progress
    /// (a hint for `reserve`); 0 when a frame could be decoded now.
    pub fn bytes_wanted(&self, buf: &[u8]) -> usize {
        if buf.len() < HEADER_LEN {
            return HEADER_LEN - buf.len();
        }
        let len = le_u32(&buf[56..60]) as usize;
        let total = HEADER_LEN + len + if len == 0 { 0 } else { TRAILER_LEN };
        total.saturating_sub(buf.len())
    }

    /// Decodes the next whole frame from the front of `buf`.
    /// `Ok(None)`: not enough bytes yet (nothing consumed). `Err`: the stream is
    /// corrupt and must be abandoned. Never panics, whatever the input. The
    /// payload is a slice of `buf`'s allocation, not a copy.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if buf.len() < HEADER_LEN {
            // A wrong magic can be named as soon as 4 bytes are in.
            if buf.len() >= 4 && buf[0..4] != MAGIC {
                return Err(WireError::BadMagic([buf[0], buf[1], buf[2], buf[3]]));
            }
            return Ok(None);
        }
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&buf[..HEADER_LEN]);
        let (header, payload_len) = Header::parse(&raw)?;
        if payload_len > self.max_payload {
            return Err(WireError::Oversized { len: u64::from(payload_len), max: self.max_payload });
        }
        let payload_len = payload_len as usize;
        let total = HEADER_LEN + payload_len + if payload_len == 0 { 0 } else { TRAILER_LEN };
        if buf.len() < total {
            return Ok(None);
        }
        if payload_len > 0 {
            let payload = &buf[HEADER_LEN..HEADER_LEN + payload_len];
            let actual = crc32fast::hash(payload);
            let expected = le_u32(&buf[HEADER_LEN + payload_len..total]);
            if expected != actual {
                return Err(WireError::PayloadCrc { expected, actual });
            }
        }
        buf.advance(HEADER_LEN);
        let payload = buf.split_to(payload_len).freeze();
        if payload_len > 0 {
            buf.advance(TRAILER_LEN);
        }
        Ok(Some(Frame { header, payload }))
    }
}

/// Encodes block contexts for a ContextTable response: per entry 20 bytes,
/// `crc u32 | seq.epoch u64 | seq.counter u64`, little-endian, in block order.
pub fn encode_contexts(contexts: &[BlockContext]) -> Bytes {
    let mut b = BytesMut::with_capacity(contexts.len() * CONTEXT_ENTRY_LEN);
    for c in contexts {
        b.put_u32_le(c.crc);
        b.put_u64_le(c.seq.epoch.0);
        b.put_u64_le(c.seq.counter);
    }
    b.freeze()
}

/// Decodes a ContextTable response payload; its length must be a whole number of entries.
pub fn decode_contexts(mut payload: &[u8]) -> Result<Vec<BlockContext>, WireError> {
    if !payload.len().is_multiple_of(CONTEXT_ENTRY_LEN) {
        let whole = (payload.len() / CONTEXT_ENTRY_LEN * CONTEXT_ENTRY_LEN) as u64;
        return Err(WireError::BadPayloadLength {
            op: Op::ContextTable,
            expected: whole,
            actual: payload.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(payload.len() / CONTEXT_ENTRY_LEN);
    while payload.has_remaining() {
        let crc = payload.get_u32_le();
        let epoch = payload.get_u64_le();
        let counter = payload.get_u64_le();
        out.push(BlockContext { crc, seq: Seq::new(Epoch(epoch), counter) });
    }
    Ok(out)
}

/// Encodes snapshot cuts for a SetCuts or ReadSnapshot payload: per cut 16
/// bytes, `seq.epoch u64 | seq.counter u64`, little-endian.
pub fn encode_cuts(cuts: &[Seq]) -> Bytes {
    let mut b = BytesMut::with_capacity(cuts.len() * CUT_LEN);
    for c in cuts {
        b.put_u64_le(c.epoch.0);
        b.put_u64_le(c.counter);
    }
    b.freeze()
}

/// Decodes the cuts of a SetCuts (`op`) or ReadSnapshot payload; its length
/// must be a whole number of cuts.
pub fn decode_cuts(op: Op, mut payload: &[u8]) -> Result<Vec<Seq>, WireError> {
    if !payload.len().is_multiple_of(CUT_LEN) {
        return Err(WireError::BadPayloadLength {
            op,
            expected: (payload.len() / CUT_LEN * CUT_LEN) as u64,
            actual: payload.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(payload.len() / CUT_LEN);
    while payload.has_remaining() {
        let epoch = payload.get_u64_le();
        let counter = payload.get_u64_le();
        out.push(Seq::new(Epoch(epoch), counter));
    }
    Ok(out)
}

/// Encodes a ListDirty response payload: each chunk index as a u32, little-endian.
pub fn encode_chunk_list(chunks: &[ChunkIdx]) -> Bytes {
    let mut b = BytesMut::with_capacity(chunks.len() * 4);
    for c in chunks {
        b.put_u32_le(c.0);
    }
    b.freeze()
}

/// Decodes a ListDirty response payload.
pub fn decode_chunk_list(mut payload: &[u8]) -> Result<Vec<ChunkIdx>, WireError> {
    if !payload.len().is_multiple_of(4) {
        return Err(WireError::BadPayloadLength {
            op: Op::ListDirty,
            expected: (payload.len() / 4 * 4) as u64,
            actual: payload.len() as u64,
        });
    }
    let mut out = Vec::with_capacity(payload.len() / 4);
    while payload.has_remaining() {
        out.push(ChunkIdx(payload.get_u32_le()));
    }
    Ok(out)
}

/// What a ResyncWrite asks the target to do with one block.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum ResyncKind {
    /// Leave the block alone.
    Keep = 0,
    /// Write the block's data (next in the payload's data section).
    Data = 1,
    /// Punch the block: it reads as zeros on the source.
    Zero = 2,
}

impl ResyncKind {
    pub fn from_u8(v: u8) -> Option<ResyncKind> {
        match v {
            0 => Some(ResyncKind::Keep),
            1 => Some(ResyncKind::Data),
            2 => Some(ResyncKind::Zero),
            _ => None,
        }
    }
}

/// One block's entry in a ResyncWrite table: what to do and the source's seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResyncEntry {
    pub kind: ResyncKind,
    pub seq: Seq,
}

impl ResyncEntry {
    pub const KEEP: ResyncEntry = ResyncEntry { kind: ResyncKind::Keep, seq: Seq::ZERO };
}

/// A decoded ResyncWrite request payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResyncWrite {
    /// One per block of the request's range.
    pub entries: Vec<ResyncEntry>,
    /// The data of the `Data` entries, 4096 bytes each, in entry order (a slice
    /// of the frame's payload, not a copy).
    pub data: Bytes,
}

/// The counts a ResyncWrite response carries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ResyncResult {
    pub written: u32,
    pub zeroed: u32,
    pub skipped: u32,
}

/// Encodes a ResyncWrite request payload: the entry table, then the data. The
/// concatenation of the `data` pieces must be exactly the 4096-byte blocks of the
/// `Data` entries, in order (pieces may be any length; they are copied once).
/// `BadPayloadLength` when the data does not match the entries.
pub fn encode_resync_write(entries: &[ResyncEntry], data: &[&[u8]]) -> Result<Bytes, WireError> {
    let bs = ballast_types::BLOCK_SIZE as usize;
    let data_blocks = entries.iter().filter(|e| e.kind == ResyncKind::Data).count();
    let data_len: usize = data.iter().map(|d| d.len()).sum();
    if data_len != data_blocks * bs {
        return Err(WireError::BadPayloadLength {
            op: Op::ResyncWrite,
            expected: (data_blocks * bs) as u64,
            actual: data_len as u64,
        });
    }
    let mut b = BytesMut::with_capacity(entries.len() * RESYNC_ENTRY_LEN + data_len);
    for e in entries {
        b.put_u64_le(e.seq.epoch.0);
        b.put_u64_le(e.seq.counter);
        b.put_u8(e.kind as u8);
        b.put_bytes(0, 7);
    }
    for d in data {
        b.put_slice(d);
    }
    Ok(b.freeze())
}

/// Decodes a ResyncWrite request payload covering `blocks` blocks. The payload
/// must be exactly the table plus one 4096-byte block per `Data` entry; unknown
/// kinds and non-zero reserved bytes are refused. Never panics.
pub fn decode_resync_write(payload: &Bytes, blocks: u32) -> Result<ResyncWrite, WireError> {
    let bs = ballast_types::BLOCK_SIZE as u64;
    let table = u64::from(blocks) * RESYNC_ENTRY_LEN as u64;
    if (payload.len() as u64) < table {
        return Err(WireError::BadPayloadLength { op: Op::ResyncWrite, expected: table, actual: payload.len() as u64 });
    }
    let table = table as usize;
    let mut entries = Vec::with_capacity(blocks as usize);
    for (i, raw) in payload[..table].chunks_exact(RESYNC_ENTRY_LEN).enumerate() {
        let index = i as u32;
        let kind =
            ResyncKind::from_u8(raw[16]).ok_or(WireError::BadResyncEntry { index, reason: "unknown block kind" })?;
        if raw[17..].iter().any(|&x| x != 0) {
            return Err(WireError::BadResyncEntry { index, reason: "reserved bytes are not zero" });
        }
        let seq = Seq::new(Epoch(le_u64(&raw[0..8])), le_u64(&raw[8..16]));
        entries.push(ResyncEntry { kind, seq });
    }
    let data_blocks = entries.iter().filter(|e| e.kind == ResyncKind::Data).count() as u64;
    let expected = table as u64 + data_blocks * bs;
    if payload.len() as u64 != expected {
        return Err(WireError::BadPayloadLength { op: Op::ResyncWrite, expected, actual: payload.len() as u64 });
    }
    Ok(ResyncWrite { entries, data: payload.slice(table..) })
}

/// Encodes a ResyncWrite response payload: `written | zeroed | skipped`, u32 each.
pub fn encode_resync_result(r: &ResyncResult) -> Bytes {
    let mut b = BytesMut::with_capacity(RESYNC_RESULT_LEN);
    b.put_u32_le(r.written);
    b.put_u32_le(r.zeroed);
    b.put_u32_le(r.skipped);
    b.freeze()
}

/// Decodes a ResyncWrite response payload.
pub fn decode_resync_result(payload: &[u8]) -> Result<ResyncResult, WireError> {
    if payload.len() != RESYNC_RESULT_LEN {
        return Err(WireError::BadPayloadLength {
            op: Op::ResyncWrite,
            expected: RESYNC_RESULT_LEN as u64,
            actual: payload.len() as u64,
        });
    }
    Ok(ResyncResult {
        written: le_u32(&payload[0..4]),
        zeroed: le_u32(&payload[4..8]),
        skipped: le_u32(&payload[8..12]),
    })
}

#[cfg(test)]
mod tests;
