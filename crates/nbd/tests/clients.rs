//! Real NBD clients against the server: qemu-io, qemu-img, nbdinfo, fio. Each
//! test prints a SKIP line and passes when its client is not installed.

mod common;

use std::time::Duration;

use common::{contents, have, random_bytes, run_ok, strings, Spec, TestServer, MIB};

const LIMIT: Duration = Duration::from_secs(300);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_fua_discard_and_zeroes() {
    if !have("qemu-io", "qemu_io_patterns_fua_discard_and_zeroes") {
        return;
    }
    let srv = TestServer::start(&[Spec("vol", 16 * MIB, false)]).await;
    for (i, uri) in [srv.tcp_uri("vol"), srv.unix_uri("vol")].into_iter().enumerate() {
        let base = i as u64 * 8 * MIB;
        let at = |off: u64| (base + off).to_string();
        let cmds = [
            format!("write -P 0xab {} 1M", at(0)),
            format!("read -P 0xab {} 1M", at(0)),
            // -f: FUA
            format!("write -f -P 0xcd {} 64k", at(MIB)),
            format!("read -P 0xcd {} 64k", at(MIB)),
            format!("discard {} 64k", at(0)),
            format!("read -P 0 {} 64k", at(0)),
            format!("write -P 0xee {} 256k", at(2 * MIB)),
            // -z: write zeroes (qemu-io sends NBD_CMD_WRITE_ZEROES)
            format!("write -z {} 256k", at(2 * MIB)),
            format!("read -P 0 {} 256k", at(2 * MIB)),
            format!("write -z -u -f {} 64k", at(MIB)),
            format!("read -P 0 {} 64k", at(MIB)),
            "flush".to_string(),
        ];
        let mut args = strings(&["-f", "raw", &uri]);
        for c in &cmds {
            args.push("-c".into());
            args.push(c.clone());
        }
        let out = run_ok("qemu-io", &args, LIMIT).await;
        assert!(!out.contains("fail"), "qemu-io reported a failure on {uri}:\n{out}");

        // The device itself, independently of the client.
        let data = contents(&srv.devs[0]).await;
        let b = base as usize;
        let m = MIB as usize;
        assert!(data[b..b + 64 * 1024].iter().all(|&x| x == 0), "discarded range reads zeroes");
        assert!(data[b + 64 * 1024..b + m].iter().all(|&x| x == 0xab), "pattern 0xab kept");
        assert!(data[b + m..b + m + 64 * 1024].iter().all(|&x| x == 0), "zeroed FUA range");
        assert!(data[b + 2 * m..b + 2 * m + 256 * 1024].iter().all(|&x| x == 0), "write -z range");
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_round_trip_is_byte_exact() {
    if !have("qemu-img", "qemu_img_convert_round_trip_is_byte_exact") {
        return;
    }
    let size = 16 * MIB as usize;
    let srv = TestServer::start(&[Spec("img", size as u64, false)]).await;
    // Random data with zero holes, so qemu-img also sends write-zeroes.
    let mut input = random_bytes(size, 7);
    for hole in [1usize, 5, 6, 11] {
        input[hole * MIB as usize..(hole + 1) * MIB as usize].fill(0);
    }
    let inp = srv.dir().join("in.raw");
    let outp = srv.dir().join("out.raw");
    std::fs::write(&inp, &input).expect("write input");
    let (i, o) = (inp.display().to_string(), outp.display().to_string());
    run_ok("qemu-img", &strings(&["convert", "-n", "-f", "raw", "-O", "raw", &i, &srv.tcp_uri("img")]), LIMIT).await;
    assert!(contents(&srv.devs[0]).await == input, "export content equals the input file");
    run_ok("qemu-img", &strings(&["convert", "-f", "raw", "-O", "raw", &srv.unix_uri("img"), &o]), LIMIT).await;
    let output = std::fs::read(&outp).expect("read output");
    assert_eq!(output.len(), input.len());
    assert!(output == input, "round trip through the export is byte-for-byte equal");
    srv.stop().await;
}

/// `"key": value` present in nbdinfo's JSON (whitespace-insensitive).
fn json_has(json: &str, key: &str, value: &str) -> bool {
    let compact: String = json.chars().filter(|c| !c.is_whitespace()).collect();
    compact.contains(&format!("\"{key}\":{value}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_block_sizes_and_lists_exports() {
    if !have("nbdinfo", "nbdinfo_reports_size_flags_block_sizes_and_lists_exports") {
        return;
    }
    let srv = TestServer::start(&[Spec("alpha", 64 * MIB, false), Spec("beta", 8 * MIB, true)]).await;
    for uri in [srv.tcp_uri("alpha"), srv.unix_uri("alpha")] {
        let json = run_ok("nbdinfo", &strings(&["--json", &uri]), LIMIT).await;
        for (k, v) in [
            ("export-size", "67108864"),
            ("can_fua", "true"),
            ("can_trim", "true"),
            ("can_zero", "true"),
            ("can_flush", "true"),
            ("can_multi_conn", "true"),
            ("is_read_only", "false"),
            ("block_size_minimum", "4096"),
            ("block_size_preferred", "4096"),
            ("block_size_maximum", "33554432"),
        ] {
            assert!(json_has(&json, k, v), "nbdinfo --json {uri}: expected {k} = {v} in\n{json}");
        }
    }
    let json = run_ok("nbdinfo", &strings(&["--json", &srv.tcp_uri("beta")]), LIMIT).await;
    assert!(json_has(&json, "is_read_only", "true"), "read-only export:\n{json}");
    assert!(json_has(&json, "export-size", "8388608"), "beta size:\n{json}");
    // The empty name is the default (first) export.
    let json = run_ok("nbdinfo", &strings(&["--json", &format!("nbd://{}", srv.tcp)]), LIMIT).await;
    assert!(json_has(&json, "export-size", "67108864"), "default export:\n{json}");

    let list = run_ok("nbdinfo", &strings(&["--list", &format!("nbd://{}", srv.tcp)]), LIMIT).await;
    for needle in ["alpha", "beta", "test export alpha", "test export beta"] {
        assert!(list.contains(needle), "nbdinfo --list lacks {needle:?}:\n{list}");
    }
    srv.stop().await;
}

/// The "iops=" figure of fio's summary line, for the log.
fn fio_iops(out: &str) -> String {
    out.lines().filter(|l| l.contains("IOPS=")).map(|l| l.trim().to_string()).collect::<Vec<_>>().join(" | ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_with_crc32c_verify() {
    if !have("fio", "fio_randwrite_with_crc32c_verify") {
        return;
    }
    let srv = TestServer::start(&[Spec("fio", 64 * MIB, false)]).await;
    for uri in [srv.tcp_uri("fio"), srv.unix_uri("fio")] {
        let out = run_ok(
            "fio",
            &strings(&[
                "--name=verify",
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--rw=randwrite",
                "--bs=4k",
                "--size=32M",
                "--iodepth=16",
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--fsync=256",
            ]),
            LIMIT,
        )
        .await;
        assert!(out.contains("err= 0"), "fio reported an error on {uri}:\n{out}");
        println!("fio randwrite+verify {uri}: {}", fio_iops(&out));
    }
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_four_jobs_on_four_connections() {
    if !have("fio", "fio_four_jobs_on_four_connections") {
        return;
    }
    let srv = TestServer::start(&[Spec("mc", 64 * MIB, false)]).await;
    let out = run_ok(
        "fio",
        &strings(&[
            "--name=multiconn",
            "--ioengine=nbd",
            &format!("--uri={}", srv.tcp_uri("mc")),
            "--rw=randwrite",
            "--bs=4k",
            "--size=16M",
            "--numjobs=4",
            "--offset_increment=16M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            "--group_reporting",
        ]),
        LIMIT,
    )
    .await;
    assert!(out.contains("err= 0"), "fio reported an error:\n{out}");
    println!("fio 4 jobs x 4 connections: {}", fio_iops(&out));
    // Every job wrote its own 16 MiB slice: no 4 KiB block of the device is still zero
    // (fio's verify headers make every written block non-zero).
    let data = contents(&srv.devs[0]).await;
    let zero_blocks = data.chunks(4096).filter(|b| b.iter().all(|&x| x == 0)).count();
    assert_eq!(zero_blocks, 0, "every block written by one of the four connections");
    srv.stop().await;
}
