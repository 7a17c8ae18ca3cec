//! The data-path frame decoder over an arbitrary byte stream, and every
//! payload decoder a replica server or client applies to a frame's payload
//! (block contexts, cuts, chunk lists, resync writes and results). Decoding
//! never panics; a frame that decodes re-encodes to bytes that decode to the
//! same frame.
#![no_main]

use ballast_wire::{
    decode_chunk_list, decode_contexts, decode_cuts, decode_resync_result, decode_resync_write, encode, Decoder, Op,
    MAX_RESYNC_BLOCKS,
};
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    let mut dec = Decoder::new();
    while let Ok(Some(frame)) = dec.decode(&mut buf) {
        let p = &frame.payload;
        let _ = decode_contexts(p);
        let _ = decode_chunk_list(p);
        let _ = decode_resync_result(p);
        for op in [Op::SetCuts, Op::ListCuts, frame.header.op] {
            let _ = decode_cuts(op, p);
        }
        let blocks = frame.header.length / 4096;
        if blocks <= MAX_RESYNC_BLOCKS {
            let _ = decode_resync_write(p, blocks);
        }
        let mut out = BytesMut::new();
        encode(&frame, &mut out).expect("a decoded frame encodes");
        let again = Decoder::new().decode(&mut out).expect("re-encoded frame decodes").expect("a whole frame");
        assert_eq!(again.header, frame.header);
        assert_eq!(again.payload, frame.payload);
        assert!(out.is_empty(), "nothing left over");
    }
});
