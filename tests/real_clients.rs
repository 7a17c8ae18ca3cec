//! Real NBD clients (qemu-io, qemu-img, nbdinfo, fio) against `ballast dev`: a
//! three-zone, replicas-3 volume in one process, exported on loopback TCP and a
//! unix socket.

use std::time::Duration;

use ballast_testkit::{data_dir, random_file, require, run_ok, Proc, Result};

fn start_dev(tag: &str, extra: &[&str]) -> Result<(tempfile::TempDir, Proc, String, String)> {
    let dir = data_dir(tag)?;
    let data = dir.path().join("data");
    let sock = dir.path().join("nbd.sock");
    let mut args = vec![
        "dev",
        "--data",
        data.to_str().expect("utf8 path"),
        "--nbd",
        "127.0.0.1:0",
        "--meta-port",
        "0",
        "--socket",
        sock.to_str().expect("utf8 path"),
        "--size",
        "256M",
        "--chunk-size",
        "16M",
    ];
    args.extend_from_slice(extra);
    let mut dev = Proc::spawn("dev", &args)?;
    let uri = dev.wait_value("ready nbd", "uri")?;
    let unix_uri = format!("nbd+unix:///vol0?socket={}", sock.display());
    Ok((dir, dev, uri, unix_uri))
}

#[test]
fn qemu_io_patterns_over_tcp_and_unix() -> Result<()> {
    if !require("qemu_io_patterns_over_tcp_and_unix", &["qemu-io"]) {
        return Ok(());
    }
    let (_dir, _dev, uri, unix_uri) = start_dev("qemu-io", &[])?;
    run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &uri,
            "-c",
            "write -P 0xab 0 1M",
            "-c",
            "write -P 0xcd 17M 2M", // spans the chunk boundary at 16M
            "-c",
            "write -f -P 0xef 100M 64k", // FUA
            "-c",
            "write -z 200M 1M", // write-zeroes
            "-c",
            "discard 201M 1M", // trim
            "-c",
            "flush",
        ],
    )?;
    // Read back through the other transport (multi-connection consistency).
    let out = run_ok(
        "qemu-io",
        &[
            "-f",
            "raw",
            &unix_uri,
            "-c",
            "read -P 0xab 0 1M",
            "-c",
            "read -P 0xcd 17M 2M",
            "-c",
            "read -P 0xef 100M 64k",
            "-c",
            "read -P 0 200M 2M",
            "-c",
            "read -P 0 255M 1M", // never written
        ],
    )?;
    assert!(!out.contains("Pattern verification failed"), "{out}");
    Ok(())
}

#[test]
fn qemu_img_convert_round_trip() -> Result<()> {
    if !require("qemu_img_convert_round_trip", &["qemu-img"]) {
        return Ok(());
    }
    let (dir, _dev, uri, _) = start_dev("qemu-img", &[])?;
    let input = dir.path().join("in.raw");
    let output = dir.path().join("out.raw");
    random_file(&input, 256 << 20, 7)?;
    run_ok("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", input.to_str().unwrap(), &uri])?;
    run_ok("qemu-img", &["convert", "-f", "raw", "-O", "raw", &uri, output.to_str().unwrap()])?;
    let a = std::fs::read(&input).expect("read input");
    let b = std::fs::read(&output).expect("read output");
    assert_eq!(a.len(), b.len());
    assert!(a == b, "round-tripped image differs");
    Ok(())
}

#[test]
fn nbdinfo_shows_size_and_flags() -> Result<()> {
    if !require("nbdinfo_shows_size_and_flags", &["nbdinfo"]) {
        return Ok(());
    }
    let (_dir, _dev, uri, _) = start_dev("nbdinfo", &[])?;
    let json = run_ok("nbdinfo", &["--json", &uri])?;
    let v: serde_json::Value = serde_json::from_str(&json).expect("nbdinfo json");
    let e = &v["exports"][0];
    assert_eq!(e["export-size"].as_u64(), Some(256 << 20), "{json}");
    for flag in ["can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn"] {
        assert_eq!(e[flag].as_bool(), Some(true), "{flag} in {json}");
    }
    assert_eq!(e["is_read_only"].as_bool(), Some(false), "{json}");
    assert_eq!(e["block_size_minimum"].as_u64(), Some(4096), "{json}");
    Ok(())
}

#[test]
fn fio_randwrite_verify_multi_conn() -> Result<()> {
    if !require("fio_randwrite_verify_multi_conn", &["fio"]) {
        return Ok(());
    }
    let (_dir, _dev, uri, _) = start_dev("fio", &[])?;
    let uri_arg = format!("--uri={uri}");
    run_ok(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &uri_arg,
            "--rw=randwrite",
            "--bs=4k",
            "--size=32M",
            "--iodepth=16",
            "--numjobs=4",
            "--offset_increment=48M",
            "--verify=crc32c",
            // No local-*-verify.state files in the working tree.
            "--verify_state_save=0",
            "--do_verify=1",
            "--verify_fatal=1",
            "--fsync=64",
        ],
    )?;
    Ok(())
}

#[test]
fn dev_restart_keeps_data_and_stops_cleanly() -> Result<()> {
    if !require("dev_restart_keeps_data_and_stops_cleanly", &["qemu-io"]) {
        return Ok(());
    }
    let dir = data_dir("dev-restart")?;
    let data = dir.path().join("data");
    let data = data.to_str().expect("utf8");
    let args = ["dev", "--data", data, "--nbd", "127.0.0.1:0", "--meta-port", "0", "--size", "128M"];
    let mut dev = Proc::spawn("dev-1", args)?;
    let uri = dev.wait_value("ready nbd", "uri")?;
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "write -P 0x5a 3M 5M", "-c", "flush"])?;
    let st = dev.terminate(Duration::from_secs(30)).expect("dev stops on SIGTERM");
    assert!(st.success(), "dev exit status {st}");

    let mut dev = Proc::spawn("dev-2", args)?;
    let uri = dev.wait_value("ready nbd", "uri")?;
    run_ok("qemu-io", &["-f", "raw", &uri, "-c", "read -P 0x5a 3M 5M", "-c", "read -P 0 0 3M"])?;
    dev.signal(libc::SIGINT)?;
    let st = dev.terminate(Duration::from_secs(30)).expect("dev stops on SIGINT");
    assert!(st.success(), "dev exit status {st}");
    Ok(())
}
