//! Replica faults with real processes: three `ballast replica` servers, a static
//! volume file, and a `ballast export` front end; replicas killed with SIGKILL while
//! fio verifies, and bit rot on one replica's chunk file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ballast_testkit::{require, run, run_ok, Proc, Result, StaticVolume};

/// Three replica processes and one volume file `vol0` (replicas 3, the given min in-sync).
fn start(tag: &str, size: &str, chunk: &str, min_in_sync: usize) -> Result<StaticVolume> {
    StaticVolume::start(tag, "vol0", size, 3, &["--chunk-size", chunk, "--min-in-sync", &min_in_sync.to_string()])
}

/// `ballast export` of the volume with the given I/O timeout; it and its NBD URI.
fn export(c: &StaticVolume, name: &str, timeout: &str) -> Result<(Proc, String)> {
    c.export(name, &["--io-timeout", timeout])
}

#[test]
fn kill_replica_under_fio_verify() -> Result<()> {
    if !require("kill_replica_under_fio_verify", &["fio"]) {
        return Ok(());
    }
    let mut c = start("kill-one", "256M", "16M", 2)?;
    let (_fe, uri) = export(&c, "export", "3s")?;
    let uri_arg = format!("--uri={uri}");
    // A write-then-verify job long enough to be mid-flight when the replica dies.
    let mut fio = Command::new("fio")
        .args([
            "--name=kill",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--size=192M",
            "--iodepth=16",
            "--verify=crc32c",
            // No local-*-verify.state files in the working tree.
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--fsync=256",
            "--number_ios=30000",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fio");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(fio.try_wait().expect("fio status").is_none(), "fio finished before the kill: make it longer");
    c.replicas[2].kill();
    let out = fio.wait_with_output().expect("fio output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fio failed after a replica kill:\n{stdout}\n{stderr}");
    assert!(stdout.contains("err= 0"), "fio reported errors:\n{stdout}");
    Ok(())
}

#[test]
fn two_of_three_down_fails_cleanly_below_min_in_sync() -> Result<()> {
    if !require("two_of_three_down_fails_cleanly_below_min_in_sync", &["qemu-io"]) {
        return Ok(());
    }
    let mut c = start("kill-two", "64M", "16M", 2)?;
    let (_fe, uri) = export(&c, "export", "2s")?;
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x11 0 4M", "-c", "flush"])?;
    c.replicas[1].kill();
    c.replicas[2].kill();
    // The write cannot reach min in-sync = 2: it must fail, never be acknowledged.
    let out = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x22 0 64k"])?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("error"),
        "write below min-in-sync was acknowledged: {text}"
    );
    assert!(!text.contains("wrote 65536/65536"), "write below min-in-sync was acknowledged: {text}");
    // The acknowledged, flushed data is intact on the surviving replica.
    c.replicas[0].kill();
    let store = ballast_chunkstore::ChunkStore::open(c.zone_dir(1), Default::default()).expect("reopen");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let id = ballast_types::ChunkId::new(ballast_types::VolumeId(1), ballast_types::ChunkIdx(0));
    let epoch = store.epoch(ballast_types::VolumeId(1));
    let got = rt.block_on(store.read(id, 0, 4 << 20, epoch)).expect("read surviving replica");
    // The failed write may have reached the survivor before the front end gave up
    // (a failed NBD write leaves its range undefined): each of its blocks holds
    // the old or the new pattern, whole. Everything outside it is the flushed data.
    for (i, block) in got.chunks(4096).enumerate() {
        let whole = |v: u8| block.iter().all(|&b| b == v);
        if i < 16 {
            assert!(whole(0x11) || whole(0x22), "block {i} of the failed write is torn or foreign");
        } else {
            assert!(whole(0x11), "flushed block {i} lost on the surviving replica");
        }
    }
    Ok(())
}

/// Flips bytes of block `block` of chunk 0 inside one replica's chunk data file.
fn flip_block(zone_dir: &Path, block: u64) -> PathBuf {
    let file = find_chunk_file(zone_dir).expect("chunk data file");
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(&file).expect("open chunk");
    let mut b = [0u8; 16];
    f.read_exact_at(&mut b, block * 4096 + 100).expect("read");
    for x in &mut b {
        *x ^= 0xff;
    }
    f.write_all_at(&b, block * 4096 + 100).expect("write");
    f.sync_all().expect("sync");
    file
}

/// The data file of volume 1, chunk 0 in a replica's store.
fn find_chunk_file(dir: &Path) -> Option<PathBuf> {
    let out = Command::new("find").arg(dir).arg("-type").arg("f").output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().map(PathBuf::from).find(|p| {
        let id = ballast_types::ChunkId::new(ballast_types::VolumeId(1), ballast_types::ChunkIdx(0));
        p.file_name().and_then(|n| n.to_str())
            == Some(format!("{}.data", ballast_chunkstore::layout::chunk_file_stem(id)).as_str())
    })
}

#[test]
fn bit_rot_on_one_replica_is_read_around_and_repaired() -> Result<()> {
    if !require("bit_rot_on_one_replica_is_read_around_and_repaired", &["qemu-io"]) {
        return Ok(());
    }
    let mut c = start("bitrot", "64M", "16M", 2)?;
    {
        let (mut fe, uri) = export(&c, "export-1", "3s")?;
        run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x77 0 1M", "-c", "flush"])?;
        let _ = fe.terminate(Duration::from_secs(20));
    }
    // Rot block 5 on replicas 1 and 2 and leave replica 3 good: whichever copy the
    // front end reads first, it must end on the good one and repair the others.
    c.replicas[0].kill();
    c.replicas[1].kill();
    flip_block(&c.zone_dir(1), 5);
    flip_block(&c.zone_dir(2), 5);
    for z in [1usize, 2] {
        c.restart_replica(z)?;
    }
    let (mut fe, uri) = export(&c, "export-2", "3s")?;
    // Every read returns the good data although two of three copies are rotten.
    for _ in 0..3 {
        run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x77 0 1M"])?;
    }
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "flush"])?;
    let _ = fe.terminate(Duration::from_secs(20));
    // The rotten copies were rewritten: each replica now verifies block 5 by itself.
    for r in &mut c.replicas {
        r.kill();
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    for z in 1..=3 {
        let store = ballast_chunkstore::ChunkStore::open(c.zone_dir(z), Default::default()).expect("reopen");
        let id = ballast_types::ChunkId::new(ballast_types::VolumeId(1), ballast_types::ChunkIdx(0));
        let epoch = store.epoch(ballast_types::VolumeId(1));
        let got = rt
            .block_on(store.read(id, 5 * 4096, 4096, epoch))
            .unwrap_or_else(|e| panic!("zone {z}: block 5 still bad after read repair: {e}"));
        assert!(got.iter().all(|&b| b == 0x77), "zone {z}: wrong data after repair");
    }
    Ok(())
}

#[test]
fn malformed_nbd_traffic_does_not_disturb_other_clients() -> Result<()> {
    if !require("malformed_nbd_traffic_does_not_disturb_other_clients", &["qemu-io"]) {
        return Ok(());
    }
    use std::io::{Read, Write};
    let c = start("malformed", "64M", "16M", 2)?;
    let (_fe, uri) = export(&c, "export", "3s")?;
    let hostport = uri.trim_start_matches("nbd://").split('/').next().unwrap().to_string();
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x42 0 64k", "-c", "flush"])?;
    let garbage: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0xff; 4096],
        vec![0, 0, 0, 3], // client flags then a truncated option header
        [0u8, 0, 0, 3]
            .iter()
            .chain(b"IHAVEOPT".iter())
            .chain([0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff].iter())
            .copied()
            .collect(), // huge option length
    ];
    for g in &garbage {
        if let Ok(mut s) = std::net::TcpStream::connect(&hostport) {
            s.set_read_timeout(Some(Duration::from_secs(2))).ok();
            let mut hello = [0u8; 18];
            let _ = s.read(&mut hello);
            let _ = s.write_all(g);
            let mut sink = [0u8; 256];
            let _ = s.read(&mut sink);
        }
    }
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x42 0 64k", "-c", "read -P 0 64k 64k"])?;
    Ok(())
}
