//! A volume without the metadata service: `ballast replica` servers, one per
//! zone, and a static volume file naming them (`ballast volume create
//! --config`), exported with `ballast export --config`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ballast_tls::Identity;

use crate::{bin, data_dir, run_cmd_ok, utf8, Error, Proc, ProcOptions, Result};

/// The replicas and the volume file; every process is killed on drop.
pub struct StaticVolume {
    /// Replica `z` (1-based zone `zone-z`) is `replicas[z - 1]`.
    pub replicas: Vec<Proc>,
    pub addrs: Vec<String>,
    /// The volume file.
    pub config: PathBuf,
    root: PathBuf,
    procs: ProcOptions,
    /// `--insecure` instead of certificates (the plaintext rows of a benchmark).
    insecure: bool,
    // Last: the processes are killed before their directory is removed.
    _tmp: Option<tempfile::TempDir>,
}

impl StaticVolume {
    /// `replicas` replica processes in a fresh `target/test-data/TAG-*`, and the
    /// volume file of `NAME --size SIZE CREATE_ARGS` (e.g. `--chunk-size 16M
    /// --min-in-sync 2`) on them.
    pub fn start(tag: &str, name: &str, size: &str, replicas: usize, create_args: &[&str]) -> Result<StaticVolume> {
        let tmp = data_dir(tag)?;
        let root = tmp.path().to_path_buf();
        let mut v = StaticVolume::start_in(&root, name, size, replicas, create_args, ProcOptions::default())?;
        v._tmp = Some(tmp);
        Ok(v)
    }

    /// Like [`StaticVolume::start`] in an existing directory (kept), processes started with `procs`.
    pub fn start_in(
        root: &Path,
        name: &str,
        size: &str,
        replicas: usize,
        create_args: &[&str],
        procs: ProcOptions,
    ) -> Result<StaticVolume> {
        Self::start_secured(root, name, size, replicas, create_args, procs, false)
    }

    /// [`StaticVolume::start_in`] with every process `--insecure` (plaintext):
    /// the baseline TLS is measured against.
    pub fn start_in_insecure(
        root: &Path,
        name: &str,
        size: &str,
        replicas: usize,
        create_args: &[&str],
        procs: ProcOptions,
    ) -> Result<StaticVolume> {
        Self::start_secured(root, name, size, replicas, create_args, procs, true)
    }

    fn start_secured(
        root: &Path,
        name: &str,
        size: &str,
        replicas: usize,
        create_args: &[&str],
        procs: ProcOptions,
        insecure: bool,
    ) -> Result<StaticVolume> {
        let mut v = StaticVolume {
            replicas: Vec::new(),
            addrs: Vec::new(),
            config: root.join(format!("{name}.toml")),
            root: root.to_path_buf(),
            procs,
            insecure,
            _tmp: None,
        };
        for z in 1..=replicas {
            let data = v.zone_dir(z);
            let tls = v.tls_args(&Identity::Node(z as u64))?;
            let mut args = vec!["replica", "--data", utf8(&data)?, "--listen", "127.0.0.1:0"];
            args.extend(tls.iter().map(String::as_str));
            let mut p = Proc::spawn_with(&format!("replica-{z}"), &args, &v.procs)?;
            v.addrs.push(p.wait_value("ready replica", "addr")?);
            v.replicas.push(p);
        }
        let mut create = Command::new(bin::ballast()?);
        create.args(["volume", "create", "--config", utf8(&v.config)?, "--name", name, "--size", size]);
        create.args(create_args);
        for (i, a) in v.addrs.iter().enumerate() {
            create.arg("--node").arg(format!("{}=zone-{}={a}", i + 1, i + 1));
        }
        run_cmd_ok(&mut create)?;
        Ok(v)
    }

    /// The `--tls-dir` of `identity`, from the CA in DIR/pki.
    pub fn tls(&self, identity: &Identity) -> Result<PathBuf> {
        crate::tls::issue(&crate::tls::pki(&self.root)?, identity)
    }

    /// `--tls-dir DIR` of `identity`, or `--insecure`.
    fn tls_args(&self, identity: &Identity) -> Result<Vec<String>> {
        if self.insecure {
            return Ok(vec!["--insecure".into()]);
        }
        Ok(vec!["--tls-dir".into(), utf8(&self.tls(identity)?)?.to_string()])
    }

    /// Replica `z`'s data directory.
    pub fn zone_dir(&self, z: usize) -> PathBuf {
        self.root.join(format!("zone-{z}"))
    }

    /// Starts replica `z` again on its data and address (after a kill).
    pub fn restart_replica(&mut self, z: usize) -> Result<()> {
        let i = z.checked_sub(1).filter(|i| *i < self.addrs.len());
        let i = i.ok_or_else(|| Error::harness(format!("no replica {z} (zones 1..={})", self.addrs.len())))?;
        let data = self.zone_dir(z);
        let addr = self.addrs[i].clone();
        let tls = self.tls_args(&Identity::Node(z as u64))?;
        let mut args = vec!["replica", "--data", utf8(&data)?, "--listen", &addr];
        args.extend(tls.iter().map(String::as_str));
        let mut p = Proc::spawn_with(&format!("replica-{z}b"), &args, &self.procs)?;
        p.wait_for("ready replica", Duration::from_secs(30))?;
        self.replicas[i] = p;
        Ok(())
    }

    /// `ballast export --config VOLUME --nbd 127.0.0.1:0 EXTRA`; returns it and its NBD URI.
    pub fn export(&self, name: &str, extra: &[&str]) -> Result<(Proc, String)> {
        // The front end of the first replica's host.
        let tls = self.tls(&Identity::Frontend(1))?;
        let mut args =
            vec!["export", "--config", utf8(&self.config)?, "--nbd", "127.0.0.1:0", "--tls-dir", utf8(&tls)?];
        args.extend_from_slice(extra);
        let mut p = Proc::spawn_with(name, &args, &self.procs)?;
        let uri = p.wait_value("ready nbd", "uri")?;
        Ok((p, uri))
    }
}
