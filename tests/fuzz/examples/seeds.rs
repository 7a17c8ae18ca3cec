//! Writes the seed corpora under corpus/<target>/ (committed): valid inputs
//! of each format, made with the project's own encoders where it has them
//! (data-path frames, chunk store files, Raft commands) and from the NBD
//! protocol document for NBD, so the fuzzer starts from the paths real peers
//! take. Run from tests/fuzz: `cargo run --example seeds`.

use std::path::Path;

use ballast_chunkstore::layout::{encode_cuts_file, encode_epoch_file, encode_store_marker, Slot};
use ballast_meta::state::NodeState;
use ballast_meta::Command;
use ballast_types::{ChunkIdx, Epoch, NodeId, Seq, VolumeId};
use ballast_wire::{encode, encode_contexts, encode_cuts, encode_resync_write, Frame, Header, Op, ResyncEntry};
use bytes::{Bytes, BytesMut};

fn put(target: &str, name: &str, data: &[u8]) {
    let dir = Path::new("corpus").join(target);
    std::fs::create_dir_all(&dir).expect("corpus directory");
    std::fs::write(dir.join(name), data).expect("seed file");
}

// NBD, from the protocol document (doc/proto.md of NetworkBlockDevice/nbd).
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const REQUEST_MAGIC: u32 = 0x2560_9513;

fn opt(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(option.to_be_bytes());
    v.extend((payload.len() as u32).to_be_bytes());
    v.extend(payload);
    v
}

fn go(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut p = (name.len() as u32).to_be_bytes().to_vec();
    p.extend(name.as_bytes());
    p.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend(i.to_be_bytes());
    }
    opt(7, &p)
}

fn req(cmd: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(cmd.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(length.to_be_bytes());
    v.extend(payload);
    v
}

fn nbd() {
    let client_flags = 3u32.to_be_bytes(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut io = req(1, 0, 1, 0, 8192, &[0x5a; 8192]);
    io.extend(req(0, 0, 2, 0, 4096, &[]));
    io.extend(req(4, 0, 3, 4096, 4096, &[]));
    io.extend(req(6, 0, 4, 8192, 4096, &[]));
    io.extend(req(3, 0, 5, 0, 0, &[]));
    io.extend(req(1, 1, 6, 1 << 20, 4096, &[0x33; 4096])); // past the end, with FUA
    io.extend(req(2, 0, 7, 0, 0, &[]));
    let session = |parts: &[&[u8]]| parts.concat();
    put("nbd_session", "go-then-io", &session(&[&client_flags, &opt(8, &[]), &go("disk", &[0, 1, 2, 3]), &io]));
    let info = [2u32.to_be_bytes().as_slice(), b"ro", &0u16.to_be_bytes()].concat();
    put("nbd_session", "list-info-abort", &session(&[&client_flags, &opt(3, &[]), &opt(6, &info), &opt(2, &[])]));
    put("nbd_session", "export-name", &session(&[&client_flags, &opt(1, b"disk"), &io]));
    let ro = [req(1, 0, 1, 0, 4096, &[0; 4096]), req(2, 0, 2, 0, 0, &[])].concat();
    put("nbd_session", "readonly-write", &session(&[&client_flags, &go("ro", &[]), &ro]));
    put("nbd_transmission", "io", &io);
    let fua = [req(1, 1, 1, 0, 4096, &[0x79; 4096]), req(6, 2, 2, 0, 8192, &[]), req(2, 0, 3, 0, 0, &[])].concat();
    put("nbd_transmission", "fua-zeroes", &fua);
}

fn frames(list: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in list {
        encode(f, &mut out).expect("encode a seed frame");
    }
    out.to_vec()
}

fn wire() {
    let (v, e) = (VolumeId(7), Epoch(1));
    let h = |op: Op, length: u32| Header { length, ..Header::request(op, 1, v, ChunkIdx(0), e) };
    let cuts = [Seq::new(e, 10), Seq::new(e, 20)];
    let zero_crc = crc32(&[0; 4096]);
    let ctx: Vec<_> = (0..4).map(|i| ballast_types::BlockContext { crc: zero_crc, seq: Seq::new(e, i) }).collect();
    let data = [0x7au8; 4096];
    let entries = [ResyncEntry { kind: ballast_wire::ResyncKind::Data, seq: Seq::new(e, 5) }, ResyncEntry::KEEP];
    let resync = encode_resync_write(&entries, &[&data]).expect("resync payload");
    let requests = [
        Frame::new(Header { seq_counter: 3, ..h(Op::Write, 4096) }, Bytes::from_static(&[0x64; 4096])),
        Frame::new(h(Op::Read, 4096), Bytes::new()),
        Frame::new(h(Op::Flush, 0), Bytes::new()),
        Frame::new(h(Op::ContextTable, 4), Bytes::new()),
        Frame::new(h(Op::AnnounceEpoch, 0), Bytes::new()),
        Frame::new(h(Op::Ping, 0), Bytes::new()),
    ];
    put("wire_frames", "requests", &frames(&requests));
    let ok = |op: Op, len: u32| h(op, len).response(ballast_wire::Status::Ok);
    let responses = [
        Frame::new(ok(Op::ContextTable, 4), encode_contexts(&ctx)),
        Frame::new(ok(Op::ListCuts, 0), encode_cuts(&cuts)),
    ];
    put("wire_frames", "responses", &frames(&responses));
    let mut at = encode_cuts(&cuts[..1]).to_vec();
    at.extend_from_slice(&resync);
    let snapshots = [
        Frame::new(h(Op::SetCuts, 0), encode_cuts(&cuts)),
        Frame::new(h(Op::ResyncWrite, 8192), resync.clone()),
        Frame::new(h(Op::ResyncWriteAt, 8192), Bytes::from(at)),
    ];
    put("wire_frames", "snapshots", &frames(&snapshots));
}

fn crc32(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

fn chunkstore() {
    let e = Epoch(1);
    put("chunkstore_layout", "slot", &Slot::encode(Seq::new(e, 2), crc32(&[0; 4096]), 3));
    put("chunkstore_layout", "epoch", &encode_epoch_file(VolumeId(7), Epoch(3)));
    put("chunkstore_layout", "cuts", &encode_cuts_file(VolumeId(7), &[Seq::new(e, 10), Seq::new(e, 20)]));
    put("chunkstore_layout", "marker-v1", &encode_store_marker(1));
    put("chunkstore_layout", "marker-v2", &encode_store_marker(2));
}

fn meta() {
    let (v, c) = (VolumeId(1), VolumeId(2));
    let cmds = [
        Command::Attach { volume: c, node: NodeId(3) },
        Command::AttachToFill { volume: c, node: NodeId(2) },
        Command::FillChunks { volume: c, epoch: Epoch(1), chunks: vec![0, 1] },
        Command::Eject { volume: v, chunk: ChunkIdx(0), version: 1, node: NodeId(1) },
        Command::CreateSnapshot { volume: v, name: "t".into(), now_ms: 5 },
        Command::DeleteSnapshot { id: 1 },
        Command::GrowVolume { volume: v, size: 16 << 20 },
        Command::Detach { volume: v, epoch: Epoch(1) },
        Command::DeleteVolume { volume: c },
        Command::SetNodeState { id: NodeId(4), state: NodeState::Down },
        Command::SetOverProvisioning { pct: 300 },
    ];
    let lines: Vec<String> = cmds.iter().map(|c| serde_json::to_string(c).expect("json")).collect();
    put("meta_log", "commands", lines.join("\n").as_bytes());
    // The sequence the command-sequence property test found (a clone of the
    // snapshot made for a clone of a volume, then that clone deleted).
    let spread = ballast_meta::state::ZoneSpread::Preferred;
    let found = [
        Command::CreateVolumeClone {
            name: "w".into(),
            source: v,
            size: 3 * CHUNK,
            chunk_size: CHUNK,
            replicas: 3,
            min_in_sync: 2,
            zones: vec![],
            zone_spread: spread,
            now_ms: 9,
        },
        Command::CreateClone {
            name: "x".into(),
            snapshot: 2,
            size: 3 * CHUNK,
            chunk_size: CHUNK,
            replicas: 3,
            min_in_sync: 2,
            zones: vec![],
            zone_spread: spread,
        },
        Command::DeleteVolume { volume: VolumeId(3) },
    ];
    let lines: Vec<String> = found.iter().map(|c| serde_json::to_string(c).expect("json")).collect();
    put("meta_log", "clone-of-a-clones-snapshot", lines.join("\n").as_bytes());
}

const CHUNK: u64 = 4 << 20;

fn parameters() {
    let sc =
        "replicas=3\nminInSync=2\nchunkSize=64Mi\nzoneSpread=required\nzones=z1,z2,z3\ncsi.storage.k8s.io/fstype=xfs\n";
    put("parameters", "storageclass", sc.as_bytes());
    put("parameters", "sizes", b"64M\n1Gi\n4096\n2s\n250ms\n1h\n");
}

fn main() {
    nbd();
    wire();
    chunkstore();
    meta();
    parameters();
    println!("seed corpora written under corpus/");
}
