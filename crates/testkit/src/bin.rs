//! Where the `ballast` and `ballastctl` binaries are.
//!
//! `CARGO_BIN_EXE_<name>` exists only while compiling the root package's
//! integration tests and benches, not in this crate, so the kit finds the
//! binaries next to the running test executable instead: cargo puts a test or
//! bench executable in `<target>/<profile>/deps/` (examples in
//! `<target>/<profile>/examples/`) and the package's binaries in
//! `<target>/<profile>/`, and builds those binaries before it runs the root
//! package's integration tests and benches. So `cargo test --release --test X`
//! runs `target/release/ballast`, `cargo test --test X` runs `target/debug/ballast`,
//! and a `CARGO_TARGET_DIR` or `--target` is followed without configuration.
//!
//! `BALLAST_BIN_DIR=DIR` overrides the search (a test executable run by hand
//! from elsewhere). Tests of other crates get no binaries built by cargo: they
//! must `cargo build --bins` first (the kit says so in its error).

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Overrides the directory the binaries are taken from.
pub const BIN_DIR_ENV: &str = "BALLAST_BIN_DIR";

const HINT: &str =
    "the kit runs the binaries next to the test executable (target/<profile>/); cargo builds them for the \
                    root package's integration tests and benches, otherwise run `cargo build [--release] --bins` or \
                    set BALLAST_BIN_DIR";

/// The directory holding the binaries: `$BALLAST_BIN_DIR`, else the profile
/// directory of the running executable.
pub fn dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os(BIN_DIR_ENV) {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(Error::io("locate the running test executable"))?;
    profile_dir(&exe).ok_or_else(|| Error::harness(format!("{} has no parent directory", exe.display())))
}

/// `<target>/<profile>` for an executable in it or in its `deps/` or `examples/`.
fn profile_dir(exe: &Path) -> Option<PathBuf> {
    let parent = exe.parent()?;
    match parent.file_name().and_then(|n| n.to_str()) {
        Some("deps" | "examples") => parent.parent().map(Path::to_path_buf),
        _ => Some(parent.to_path_buf()),
    }
}

/// The binary `name` of the root package, checked to exist.
pub fn find(name: &str) -> Result<PathBuf> {
    let path = dir()?.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::BinaryMissing { path, hint: HINT })
    }
}

/// The `ballast` server binary.
pub fn ballast() -> Result<PathBuf> {
    find("ballast")
}

/// The `ballastctl` operator CLI.
pub fn ballastctl() -> Result<PathBuf> {
    find("ballastctl")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_dir_is_above_deps_and_examples() {
        let p = |s: &str| profile_dir(Path::new(s)).map(|d| d.display().to_string());
        assert_eq!(p("/w/target/release/deps/faults-0123abcd").as_deref(), Some("/w/target/release"));
        assert_eq!(p("/w/target/debug/examples/demo").as_deref(), Some("/w/target/debug"));
        assert_eq!(
            p("/w/target/x86_64-unknown-linux-gnu/release/deps/t").as_deref(),
            Some("/w/target/x86_64-unknown-linux-gnu/release")
        );
        assert_eq!(p("/w/target/release/ballast").as_deref(), Some("/w/target/release"));
    }
}
