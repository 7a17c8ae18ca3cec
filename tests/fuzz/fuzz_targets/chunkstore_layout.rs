//! The chunk store's on-disk decoders (crates/chunkstore/src/layout.rs):
//! context-file header, context slots, epoch files, snapshot cut files and
//! the store marker, from arbitrary bytes (a torn, rotten or foreign file).
//! Decoding never panics, and what decodes re-encodes to bytes that decode
//! to the same values (reserved bytes are not compared: decoders ignore them).
#![no_main]

use ballast_chunkstore::layout::{
    self, check_store_marker, decode_cuts_file, decode_epoch_file, encode_cuts_file, encode_epoch_file,
    encode_store_marker, CtxHeader, Slot,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = CtxHeader::decode(data);
    if data.len() >= layout::SLOT_LEN {
        match Slot::decode(&data[..layout::SLOT_LEN]) {
            v @ Slot::Valid { seq, crc, gen } => {
                assert_eq!(Slot::decode(&Slot::encode(seq, crc, gen)), v, "a valid slot re-encodes");
            }
            Slot::Empty | Slot::Invalid => {}
        }
    }
    if let Ok((volume, epoch)) = decode_epoch_file(data) {
        assert_eq!(
            decode_epoch_file(&encode_epoch_file(volume, epoch)),
            Ok((volume, epoch)),
            "an epoch file re-encodes"
        );
    }
    if let Ok((volume, cuts)) = decode_cuts_file(data) {
        layout::check_cuts(&cuts).expect("decoded cuts are well-formed");
        assert_eq!(decode_cuts_file(&encode_cuts_file(volume, &cuts)), Ok((volume, cuts)), "a cuts file re-encodes");
    }
    if let Ok(version) = check_store_marker(data) {
        assert_eq!(check_store_marker(&encode_store_marker(version)), Ok(version), "a store marker re-encodes");
    }
});
