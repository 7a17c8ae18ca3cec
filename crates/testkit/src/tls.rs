//! Certificates for the processes a test starts: one CA per cluster directory
//! (DIR/pki), one `--tls-dir` per identity, as an operator would issue them.

use std::path::{Path, PathBuf};

use ballast_tls::certs::Pki;
use ballast_tls::Identity;

use crate::{Error, Result};

/// The CA of the cluster whose data is in `root` (made on first use).
pub fn pki(root: &Path) -> Result<Pki> {
    Pki::open_or_create(&root.join("pki"))
        .map_err(|e| Error::harness(format!("the test CA in {}: {e}", root.display())))
}

/// The `--tls-dir` of `identity`.
pub fn issue(pki: &Pki, identity: &Identity) -> Result<PathBuf> {
    pki.issue(identity).map_err(|e| Error::harness(format!("issue a certificate for {identity}: {e}")))
}
