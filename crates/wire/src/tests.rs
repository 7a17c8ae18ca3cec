use super::*;
use proptest::prelude::*;

fn sample_write() -> Frame {
    let mut h = Header::request(Op::Write, 0x0102_0304_0506_0708, VolumeId(7), ChunkIdx(3), Epoch(5));
    h.flags.fua = true;
    h.length = 4;
    h.offset = 8192;
    h.seq_counter = 9;
    Frame::new(h, Bytes::from_static(b"abcd"))
}

fn encoded(frame: &Frame) -> BytesMut {
    let mut b = BytesMut::new();
    encode(frame, &mut b).expect("encode");
    b
}

/// The exact bytes of a FUA write of "abcd": if this changes, the protocol changed
/// and VERSION must be bumped.
#[test]
fn golden_bytes_write_frame() {
    #[rustfmt::skip]
    let expected: [u8; 72] = [
        b'B', b'L', b'S', b'T', // magic
        1,                      // version
        1,                      // op Write
        0b10,                   // flags FUA
        0,                      // status
        0x08, 0x07, 0x06, 0x05, 0x04, 0x03, 0x02, 0x01, // request id
        7, 0, 0, 0, 0, 0, 0, 0, // volume
        3, 0, 0, 0,             // chunk
        4, 0, 0, 0,             // length
        0x00, 0x20, 0, 0, 0, 0, 0, 0, // offset 8192
        5, 0, 0, 0, 0, 0, 0, 0, // epoch
        9, 0, 0, 0, 0, 0, 0, 0, // seq counter
        4, 0, 0, 0,             // payload length
        GOLDEN_HEADER_CRC[0], GOLDEN_HEADER_CRC[1], GOLDEN_HEADER_CRC[2], GOLDEN_HEADER_CRC[3],
        b'a', b'b', b'c', b'd', // payload
        GOLDEN_PAYLOAD_CRC[0], GOLDEN_PAYLOAD_CRC[1], GOLDEN_PAYLOAD_CRC[2], GOLDEN_PAYLOAD_CRC[3],
    ];
    let frame = sample_write();
    let bytes = encoded(&frame);
    assert_eq!(&bytes[..], &expected[..]);
    // crc32("abcd") is a published test vector: 0xed82cd11.
    assert_eq!(u32::from_le_bytes(GOLDEN_PAYLOAD_CRC), 0xed82_cd11);

    let mut buf = BytesMut::from(&expected[..]);
    let decoded = Decoder::new().decode(&mut buf).expect("valid").expect("whole frame");
    assert_eq!(decoded, frame);
    assert!(buf.is_empty());
}

const GOLDEN_HEADER_CRC: [u8; 4] = GOLDEN_HEADER_CRC_VALUE.to_le_bytes();
const GOLDEN_HEADER_CRC_VALUE: u32 = 0xd5d1_1a51;
const GOLDEN_PAYLOAD_CRC: [u8; 4] = 0xed82_cd11u32.to_le_bytes();

#[test]
fn golden_bytes_ping_response_without_payload() {
    let req = Header::request(Op::Ping, 1, VolumeId(0), ChunkIdx(0), Epoch(0));
    let frame = Frame::new(req.response(Status::Ok), Bytes::new());
    let bytes = encoded(&frame);
    assert_eq!(bytes.len(), HEADER_LEN, "no trailer without payload");
    assert_eq!(&bytes[0..8], &[b'B', b'L', b'S', b'T', 1, 9, 0b01, 0]);
    assert_eq!(&bytes[56..60], &[0, 0, 0, 0]);
    assert_eq!(le_u32(&bytes[60..64]), crc32fast::hash(&bytes[0..60]));
}

#[test]
fn golden_bytes_context_entries_and_chunk_list() {
    let ctx = [BlockContext { crc: 0x1122_3344, seq: Seq::new(Epoch(2), 0x0a0b) }];
    let b = encode_contexts(&ctx);
    #[rustfmt::skip]
    assert_eq!(&b[..], &[
        0x44, 0x33, 0x22, 0x11,
        2, 0, 0, 0, 0, 0, 0, 0,
        0x0b, 0x0a, 0, 0, 0, 0, 0, 0,
    ]);
    assert_eq!(decode_contexts(&b).expect("whole entries"), ctx.to_vec());
    assert!(matches!(decode_contexts(&b[..19]), Err(WireError::BadPayloadLength { .. })));

    let list = encode_chunk_list(&[ChunkIdx(1), ChunkIdx(0x0100)]);
    assert_eq!(&list[..], &[1, 0, 0, 0, 0, 1, 0, 0]);
    assert_eq!(decode_chunk_list(&list).expect("whole"), vec![ChunkIdx(1), ChunkIdx(0x100)]);
    assert!(decode_chunk_list(&list[..5]).is_err());
}

/// The exact payload of a ResyncWrite over three blocks (Data, Keep, Zero) and of
/// its response: if this changes, the layout documented in the crate docs changed.
#[test]
fn golden_bytes_resync_write() {
    let entries = [
        ResyncEntry { kind: ResyncKind::Data, seq: Seq::new(Epoch(2), 0x0102) },
        ResyncEntry::KEEP,
        ResyncEntry { kind: ResyncKind::Zero, seq: Seq::new(Epoch(1), 7) },
    ];
    let data = vec![0xabu8; 4096];
    let payload = encode_resync_write(&entries, &[&data[..1000], &data[1000..]]).expect("matching data");
    #[rustfmt::skip]
    let table: [u8; 72] = [
        2, 0, 0, 0, 0, 0, 0, 0,    0x02, 0x01, 0, 0, 0, 0, 0, 0,   1,   0, 0, 0, 0, 0, 0, 0, // Data 2.258
        0, 0, 0, 0, 0, 0, 0, 0,    0, 0, 0, 0, 0, 0, 0, 0,         0,   0, 0, 0, 0, 0, 0, 0, // Keep
        1, 0, 0, 0, 0, 0, 0, 0,    7, 0, 0, 0, 0, 0, 0, 0,         2,   0, 0, 0, 0, 0, 0, 0, // Zero 1.7
    ];
    assert_eq!(payload.len(), 72 + 4096);
    assert_eq!(&payload[..72], &table[..]);
    assert!(payload[72..].iter().all(|&b| b == 0xab));
    let decoded = decode_resync_write(&payload, 3).expect("valid");
    assert_eq!(decoded.entries, entries.to_vec());
    assert_eq!(&decoded.data[..], &data[..]);

    // The whole frame: op 12, the range in length, the protect-from counter in seq.
    let mut h = Header::request(Op::ResyncWrite, 5, VolumeId(1), ChunkIdx(0), Epoch(3));
    h.offset = 3 * 4096;
    h.length = 3 * 4096;
    h.seq_counter = 9;
    let bytes = encoded(&Frame::new(h, payload.clone()));
    assert_eq!(bytes[5], 12);
    assert_eq!(&bytes[28..32], &(3u32 * 4096).to_le_bytes());
    assert_eq!(&bytes[48..56], &9u64.to_le_bytes());
    assert_eq!(&bytes[56..60], &(72u32 + 4096).to_le_bytes());

    let r = ResyncResult { written: 1, zeroed: 0x0200, skipped: 3 };
    let rb = encode_resync_result(&r);
    assert_eq!(&rb[..], &[1, 0, 0, 0, 0, 2, 0, 0, 3, 0, 0, 0]);
    assert_eq!(decode_resync_result(&rb), Ok(r));
    assert!(decode_resync_result(&rb[..11]).is_err());
}

#[test]
fn resync_write_payload_errors_are_named() {
    let entries = [ResyncEntry { kind: ResyncKind::Data, seq: Seq::new(Epoch(1), 1) }];
    // Data that does not match the entries is refused on both sides.
    assert!(matches!(encode_resync_write(&entries, &[&[0u8; 100]]), Err(WireError::BadPayloadLength { .. })));
    let good = encode_resync_write(&entries, &[&[7u8; 4096]]).expect("valid");
    assert!(matches!(decode_resync_write(&good.slice(..4096), 1), Err(WireError::BadPayloadLength { .. })));
    assert!(matches!(decode_resync_write(&good, 200), Err(WireError::BadPayloadLength { .. })));
    let mut bad = BytesMut::from(&good[..]);
    bad[16] = 3;
    assert_eq!(
        decode_resync_write(&bad.clone().freeze(), 1),
        Err(WireError::BadResyncEntry { index: 0, reason: "unknown block kind" })
    );
    bad[16] = 1;
    bad[20] = 1;
    assert_eq!(
        decode_resync_write(&bad.freeze(), 1),
        Err(WireError::BadResyncEntry { index: 0, reason: "reserved bytes are not zero" })
    );
    // No blocks, no payload: valid and empty.
    let empty = decode_resync_write(&Bytes::new(), 0).expect("empty");
    assert!(empty.entries.is_empty() && empty.data.is_empty());
}

#[test]
fn partial_frames_wait_for_more_bytes() {
    let bytes = encoded(&sample_write());
    let mut dec = Decoder::new();
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(dec.decode(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed from a partial frame");
        assert!(dec.bytes_wanted(&buf) > 0);
    }
}

#[test]
fn named_errors() {
    let good = encoded(&sample_write());

    let mut b = good.clone();
    b[0] = b'X';
    assert!(matches!(Decoder::new().decode(&mut b), Err(WireError::BadMagic(_))));

    // Garbage is named after 4 bytes, without waiting for a whole header.
    let mut b = BytesMut::from(&b"GET / HTTP/1.1"[..]);
    assert!(matches!(Decoder::new().decode(&mut b), Err(WireError::BadMagic(_))));

    let mut b = good.clone();
    b[20] ^= 1;
    assert!(matches!(Decoder::new().decode(&mut b), Err(WireError::HeaderCrc { .. })));

    let reseal = |mut b: BytesMut| {
        let crc = crc32fast::hash(&b[0..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    };
    let mut b = good.clone();
    b[4] = 2;
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::BadVersion(2)));

    let mut b = good.clone();
    b[5] = 200;
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::UnknownOp(200)));

    let mut b = good.clone();
    b[6] = 0x80;
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::BadFlags(0x80)));

    let mut b = good.clone();
    b[7] = 3;
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::StatusOnRequest(3)));

    let mut b = good.clone();
    b[6] = 1;
    b[7] = 99;
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::UnknownStatus(99)));

    let mut b = good.clone();
    b[56..60].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut b = reseal(b);
    assert_eq!(Decoder::new().decode(&mut b), Err(WireError::Oversized { len: u64::from(u32::MAX), max: MAX_PAYLOAD }));

    let mut b = good.clone();
    b[HEADER_LEN] ^= 0x20;
    assert!(matches!(Decoder::new().decode(&mut b), Err(WireError::PayloadCrc { .. })));
}

#[test]
fn status_and_op_codes_round_trip() {
    for s in Status::ALL {
        assert_eq!(Status::from_u8(s.as_u8()), Ok(s));
        assert!(!s.message().is_empty());
    }
    assert_eq!(Status::from_u8(12), Err(WireError::UnknownStatus(12)));
    for op in Op::ALL {
        assert_eq!(Op::from_u8(op.as_u8()), Ok(op));
    }
    assert_eq!(Op::from_u8(0), Err(WireError::UnknownOp(0)));
    assert_eq!(Op::from_u8(13), Ok(Op::SetCuts));
    assert_eq!(Op::from_u8(14), Ok(Op::ReadSnapshot));
    assert_eq!(Op::from_u8(15), Ok(Op::ContextTableAt));
    assert_eq!(Op::from_u8(16), Ok(Op::ResyncWriteAt));
    assert_eq!(Op::from_u8(17), Ok(Op::ListCuts));
    assert_eq!(Op::from_u8(18), Err(WireError::UnknownOp(18)));
}

/// The exact payload of a SetCuts with two cuts.
#[test]
fn golden_bytes_cuts() {
    let cuts = [Seq::new(Epoch(2), 0x10), Seq::new(Epoch(3), 0x0102)];
    let b = encode_cuts(&cuts);
    #[rustfmt::skip]
    let expected: [u8; 32] = [
        2, 0, 0, 0, 0, 0, 0, 0,  0x10, 0, 0, 0, 0, 0, 0, 0,
        3, 0, 0, 0, 0, 0, 0, 0,  0x02, 0x01, 0, 0, 0, 0, 0, 0,
    ];
    assert_eq!(&b[..], &expected[..]);
    assert_eq!(decode_cuts(Op::SetCuts, &b), Ok(cuts.to_vec()));
    assert_eq!(decode_cuts(Op::SetCuts, &[]), Ok(vec![]));
    assert_eq!(
        decode_cuts(Op::ReadSnapshot, &b[..20]),
        Err(WireError::BadPayloadLength { op: Op::ReadSnapshot, expected: 16, actual: 20 })
    );
    let mut h = Header::request(Op::SetCuts, 1, VolumeId(4), ALL_CHUNKS, Epoch(3));
    h.length = 2;
    let f = Frame::new(h, b);
    let mut wire = encoded(&f);
    let back = Decoder::new().decode(&mut wire).expect("decode").expect("whole frame");
    assert_eq!(back.header.op, Op::SetCuts);
    assert_eq!(decode_cuts(Op::SetCuts, &back.payload), Ok(cuts.to_vec()));
}

#[test]
fn wire_parts_match_encode() {
    let f = sample_write();
    let (h, p, t) = f.wire_parts().expect("fits");
    let mut joined = h.to_vec();
    joined.extend_from_slice(&p);
    joined.extend_from_slice(t.as_slice());
    assert_eq!(&joined[..], &encoded(&f)[..]);
    assert_eq!(joined.len(), f.wire_len());
}

fn arb_header() -> impl Strategy<Value = Header> {
    (
        (0usize..Op::ALL.len(), any::<bool>(), any::<bool>(), 0usize..Status::ALL.len()),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u32>()),
        (any::<u64>(), any::<u64>(), any::<u64>()),
    )
        .prop_map(|((op, response, fua, status), (req, vol, chunk, length), (offset, epoch, ctr))| {
            Header {
                op: Op::ALL[op],
                flags: Flags { response, fua },
                // Requests always carry Ok.
                status: if response { Status::ALL[status] } else { Status::Ok },
                request_id: req,
                volume: VolumeId(vol),
                chunk: ChunkIdx(chunk),
                length,
                offset,
                epoch: Epoch(epoch),
                seq_counter: ctr,
            }
        })
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (arb_header(), proptest::collection::vec(any::<u8>(), 0..300))
        .prop_map(|(header, payload)| Frame::new(header, Bytes::from(payload)))
}

proptest! {
    #[test]
    fn round_trip_streams(frames in proptest::collection::vec(arb_frame(), 1..6), split in 1usize..97) {
        let mut wire = BytesMut::new();
        for f in &frames {
            encode(f, &mut wire).expect("encode");
        }
        // Feed the stream in pieces of `split` bytes, as a socket would.
        let mut dec = Decoder::new();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        for piece in wire.chunks(split) {
            buf.extend_from_slice(piece);
            while let Some(f) = dec.decode(&mut buf).expect("valid stream") {
                out.push(f);
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(out, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512), magic in any::<bool>()) {
        let mut buf = BytesMut::from(&bytes[..]);
        if magic && buf.len() >= 4 {
            buf[0..4].copy_from_slice(&MAGIC);
        }
        let mut dec = Decoder::with_max_payload(256);
        // Loop until the decoder wants more bytes or reports an error.
        while let Ok(Some(_)) = dec.decode(&mut buf) {}
        let _ = dec.bytes_wanted(&buf);
    }

    #[test]
    fn any_single_bit_flip_is_detected(frame in arb_frame(), bit in any::<prop::sample::Index>()) {
        let mut wire = encoded(&frame);
        let bit = bit.index(wire.len() * 8);
        wire[bit / 8] ^= 1 << (bit % 8);
        let mut dec = Decoder::new();
        match dec.decode(&mut wire) {
            Err(_) => {}
            // A flip can only ever look like a partial frame if it grew the payload
            // length; the header crc must have caught that, so this is a failure too.
            Ok(other) => prop_assert!(false, "flip of bit {} undetected: {:?}", bit, other),
        }
    }

    #[test]
    fn resync_write_round_trips(raw in proptest::collection::vec((0u8..3, any::<u64>(), any::<u64>(), any::<u8>()), 0..24)) {
        let entries: Vec<ResyncEntry> = raw.iter()
            .map(|&(k, e, c, _)| ResyncEntry { kind: ResyncKind::from_u8(k).expect("0..3"), seq: Seq::new(Epoch(e), c) })
            .collect();
        let mut data = Vec::new();
        for (e, &(_, _, _, fill)) in entries.iter().zip(&raw) {
            if e.kind == ResyncKind::Data {
                data.extend(std::iter::repeat_n(fill, 4096));
            }
        }
        let payload = encode_resync_write(&entries, &[&data]).expect("matching data");
        let decoded = decode_resync_write(&payload, entries.len() as u32).expect("valid");
        prop_assert_eq!(decoded.entries, entries);
        prop_assert_eq!(&decoded.data[..], &data[..]);
    }

    #[test]
    fn resync_write_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..9000), blocks in any::<u32>()) {
        let payload = Bytes::from(bytes);
        if let Ok(w) = decode_resync_write(&payload, blocks % 8) {
            // Whatever decodes is consistent with itself.
            let data_blocks = w.entries.iter().filter(|e| e.kind == ResyncKind::Data).count();
            prop_assert_eq!(w.data.len(), data_blocks * 4096);
            prop_assert_eq!(w.entries.len() as u32, blocks % 8);
        }
        let _ = decode_resync_write(&payload, blocks);
        let _ = decode_resync_result(&payload);
    }

    #[test]
    fn contexts_round_trip(raw in proptest::collection::vec((any::<u32>(), any::<u64>(), any::<u64>()), 0..50)) {
        let ctx: Vec<BlockContext> = raw.iter()
            .map(|&(crc, e, c)| BlockContext { crc, seq: Seq::new(Epoch(e), c) })
            .collect();
        prop_assert_eq!(decode_contexts(&encode_contexts(&ctx)).expect("whole"), ctx);
    }
}
