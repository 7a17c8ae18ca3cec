//! The NBD transmission phase as the kernel client enters it (no handshake:
//! `serve_transmission`), from arbitrary request bytes: request headers with
//! any magic, flags, command, cookie, offset and length, and any payload.
//! The server must answer or end the session, never panic or hang.
#![no_main]

#[path = "nbd_common.rs"]
mod nbd_common;

use ballast_nbd::{Export, NbdOptions, NbdServer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let server =
        NbdServer::new(vec![Export::new("disk", nbd_common::device())], NbdOptions::default()).expect("server");
    nbd_common::drive(data, |conn| async move {
        let _ = server.serve_transmission("disk", conn).await;
    });
});
