//! The parsers of operator input: StorageClass parameters (CSI CreateVolume:
//! `key=value` per line) and the size and duration arguments of the CLIs.
//! Never a panic: a value is accepted or refused with a message.
#![no_main]

use std::collections::HashMap;

use ballast_csi::params::VolumeParams;
use ballast_types::units::{parse_duration, parse_size};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut params = HashMap::new();
    for line in text.lines() {
        let _ = parse_size(line);
        let _ = parse_duration(line);
        if let Some((k, v)) = line.split_once('=') {
            params.insert(k.to_string(), v.to_string());
        }
    }
    if let Ok(p) = VolumeParams::parse(&params) {
        assert!(p.min_in_sync >= 1 && p.min_in_sync <= p.replicas, "{p:?}");
    }
});
