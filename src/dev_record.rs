//! Where `ballast dev` records its cluster for `ballastctl`, and the record's
//! layout: $XDG_CONFIG_HOME/ballast/dev.toml (else ~/.config/ballast/dev.toml),
//! holding `meta = "A,B,C"` and `tls_dir = "/abs/DATA/pki/admin-dev"`. Shared by
//! both binaries (src/dev.rs writes it, src/bin/ballastctl reads it).

use std::path::{Path, PathBuf};

/// The record's path, if there is a config directory.
pub fn path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("ballast").join("dev.toml"))
}

/// The record's text for a cluster of `endpoints` whose admin certificate is in `tls_dir`.
#[allow(dead_code)] // ballastctl only reads
pub fn render(endpoints: &[String], tls_dir: &Path) -> String {
    let mut t = toml::Table::new();
    t.insert("meta".into(), toml::Value::String(endpoints.join(",")));
    t.insert("tls_dir".into(), toml::Value::String(tls_dir.display().to_string()));
    t.to_string()
}

/// The recorded (member list, admin certificate directory), if a record reads.
#[allow(dead_code)] // ballast only writes
pub fn read() -> Option<(String, PathBuf)> {
    let record: toml::Table = std::fs::read_to_string(path()?).ok()?.parse().ok()?;
    Some((record.get("meta")?.as_str()?.to_string(), PathBuf::from(record.get("tls_dir")?.as_str()?)))
}
