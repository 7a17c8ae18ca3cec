//! ResyncWrite through a real replica server and client on 127.0.0.1:0.

mod common;

use ballast_replica::{ClientError, ResyncEntry, ResyncKind, ResyncResult, Status};
use ballast_types::{BlockIdx, Seq, BLOCK_SIZE};
use ballast_wire::{encode_resync_write, Frame, Header, Op};
use bytes::Bytes;
use common::*;
use tokio::net::TcpStream;

const BS: usize = BLOCK_SIZE as usize;

fn data(seq: Seq) -> ResyncEntry {
    ResyncEntry { kind: ResyncKind::Data, seq }
}

fn zero(seq: Seq) -> ResyncEntry {
    ResyncEntry { kind: ResyncKind::Zero, seq }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resync_write_applies_only_where_no_newer_write_is_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);
    c.announce_epoch(VOL, E2).await.expect("announce");
    c.create_chunk(CHUNK, CHUNK_SIZE, E2).await.expect("create");

    // Block 1: a front-end write of this epoch (protected); block 3: one from an
    // earlier epoch that the source never had (replaced); block 4: data to trim.
    let front = pattern(1, BS);
    c.write(CHUNK, BS as u64, front.clone(), Seq::new(E2, 10), false).await.expect("write");
    c.write(CHUNK, 4 * BS as u64, pattern(9, BS), Seq::new(E2, 1), false).await.expect("write");
    // Writes of an older epoch cannot be sent any more (fenced): bring block 3 to
    // an E1 seq by resync itself, with nothing protected.
    let stale = pattern(2, BS);
    let r = c.resync_write(CHUNK, 3 * BS as u64, &[data(Seq::new(E1, 50))], &[&stale], E2, 0, false).await;
    assert_eq!(r.expect("resync"), ResyncResult { written: 1, zeroed: 0, skipped: 0 });

    // Now copy five blocks from a "source": 0 and 1 with data at E2.5 (older
    // than block 1's E2.10), 2 kept, 3 with E1.20 data (older than E1.50 but
    // below the protect-from boundary E2.0), 4 zero at E2.3.
    let src0 = pattern(3, BS);
    let src1 = pattern(4, BS);
    let src3 = pattern(5, BS);
    let entries = [
        data(Seq::new(E2, 5)),
        data(Seq::new(E2, 5)),
        ResyncEntry::KEEP,
        data(Seq::new(E1, 20)),
        zero(Seq::new(E2, 3)),
    ];
    let pieces: [&[u8]; 3] = [&src0, &src1, &src3];
    let r = c.resync_write(CHUNK, 0, &entries, &pieces, E2, 0, true).await.expect("resync");
    assert_eq!(r, ResyncResult { written: 2, zeroed: 1, skipped: 1 });

    let got = c.read(CHUNK, 0, 5 * BS as u32, E2).await.expect("read");
    assert_eq!(&got[..BS], &src0[..]);
    assert_eq!(&got[BS..2 * BS], &front[..], "the newer front-end write survives");
    assert!(got[2 * BS..3 * BS].iter().all(|&b| b == 0), "kept block untouched");
    assert_eq!(&got[3 * BS..4 * BS], &src3[..], "the source replaces a stale write of an older epoch");
    assert!(got[4 * BS..].iter().all(|&b| b == 0), "trimmed");
    let t = c.context_table(CHUNK, BlockIdx(0), 5, E2).await.expect("contexts");
    let seqs: Vec<Seq> = t.iter().map(|x| x.seq).collect();
    assert_eq!(seqs, vec![Seq::new(E2, 5), Seq::new(E2, 10), Seq::ZERO, Seq::new(E1, 20), Seq::new(E2, 3)]);
    // FUA flushed: the chunk is clean again.
    assert!(c.list_dirty(VOL, E2).await.expect("list dirty").is_empty());

    // The protect-from boundary: block 0 at E2.5 is protected from E2.5 on, so
    // an older copy is refused; with the boundary above it, the source wins.
    let r = c.resync_write(CHUNK, 0, &[data(Seq::new(E1, 1))], &[&src1], E2, 5, false).await.expect("resync");
    assert_eq!(r, ResyncResult { written: 0, zeroed: 0, skipped: 1 });
    let r = c.resync_write(CHUNK, 0, &[data(Seq::new(E1, 1))], &[&src1], E2, 6, false).await.expect("resync");
    assert_eq!(r, ResyncResult { written: 1, zeroed: 0, skipped: 0 });
    assert_eq!(c.read(CHUNK, 0, BS as u32, E2).await.expect("read"), src1);

    // Fenced by the request epoch.
    c.announce_epoch(VOL, E3).await.expect("announce");
    let r = c.resync_write(CHUNK, 0, &[data(Seq::new(E1, 99))], &[&src1], E2, 0, false).await;
    assert!(matches!(r, Err(ref e) if e.is_fenced()), "{r:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resync_writes_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server = Running::start(dir.path()).await;
    let c = client(server.addr);
    c.announce_epoch(VOL, E1).await.expect("announce");
    c.create_chunk(CHUNK, CHUNK_SIZE, E1).await.expect("create");
    let mut s = TcpStream::connect(server.addr).await.expect("connect");
    let seq = Seq::new(E1, 1);
    let good = encode_resync_write(&[data(seq)], &[&pattern(7, BS)]).expect("payload");
    let frame = |req: u64, length: u32, payload: Bytes| {
        let mut h = Header::request(Op::ResyncWrite, req, VOL, CHUNK.chunk, E1);
        h.length = length;
        Frame::new(h, payload)
    };
    let status = |f: Frame| {
        assert!(f.header.flags.response);
        f.header.status
    };
    // Range of two blocks, table of one.
    assert_eq!(status(round_trip(&mut s, &frame(1, 2 * BS as u32, good.clone())).await), Status::BadRequest);
    // Range not whole blocks.
    assert_eq!(status(round_trip(&mut s, &frame(2, 100, good.clone())).await), Status::Misaligned);
    // Unknown kind.
    let mut bad = good.to_vec();
    bad[16] = 9;
    assert_eq!(status(round_trip(&mut s, &frame(3, BS as u32, Bytes::from(bad))).await), Status::BadRequest);
    // Over the block limit.
    let huge = (ballast_replica::MAX_RESYNC_BLOCKS + 1) * BLOCK_SIZE;
    assert_eq!(status(round_trip(&mut s, &frame(4, huge, Bytes::new())).await), Status::BadRequest);
    // The connection is still fine, and nothing was written.
    assert_eq!(status(round_trip(&mut s, &frame(5, BS as u32, good)).await), Status::Ok);
    let t = c.context_table(CHUNK, BlockIdx(0), 2, E1).await.expect("contexts");
    assert_eq!(t[0].seq, seq);
    assert_eq!(t[1].seq, Seq::ZERO);

    // The client refuses data that does not match its entries before sending.
    let r = c.resync_write(CHUNK, 0, &[data(seq)], &[], E1, 0, false).await;
    assert!(matches!(r, Err(ClientError::Protocol(_))), "{r:?}");
    // No chunk: the store's verdict.
    let other = ballast_types::ChunkId::new(VOL, ballast_types::ChunkIdx(9));
    let r = c.resync_write(other, 0, &[zero(seq)], &[], E1, 0, false).await;
    assert!(matches!(r, Err(ClientError::Remote { status: Status::NoSuchChunk, .. })), "{r:?}");
    server.stop().await;
}
