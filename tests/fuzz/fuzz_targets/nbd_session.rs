//! The NBD server's whole session as a client drives it: the newstyle
//! handshake (client flags, option haggling: LIST, INFO, GO, EXPORT_NAME,
//! STRUCTURED_REPLY, ABORT, unknown options), then transmission (READ, WRITE,
//! TRIM, WRITE_ZEROES, FLUSH, DISC, unknown commands), from arbitrary client
//! bytes, against an in-memory export (and a read-only one). The server must
//! end the session with an error or cleanly, never panic or hang.
#![no_main]

#[path = "nbd_common.rs"]
mod nbd_common;

use ballast_nbd::{Export, NbdOptions, NbdServer};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dev = nbd_common::device();
    let exports = vec![Export::new("disk", dev.clone()), Export::new("ro", dev).read_only(true)];
    let server = NbdServer::new(exports, NbdOptions::default()).expect("server");
    nbd_common::drive(data, |conn| async move {
        let _ = server.serve_stream(conn, "fuzz").await;
    });
});
