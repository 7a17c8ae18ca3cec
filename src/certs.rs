//! `ballast certs init | issue`: the cluster CA and the certificates it issues
//! (crates/tls/src/certs.rs has the files and their layout).

use std::time::Duration;

use anyhow::Context;
use ballast_tls::certs::Ca;
use ballast_tls::{Identity, Validity};

use crate::cli::{CertsCommand, CertsInitArgs, CertsIssueArgs};

fn days(n: u32) -> anyhow::Result<Duration> {
    anyhow::ensure!(n >= 1, "--days must be 1 or more");
    Ok(Duration::from_secs(u64::from(n) * 86_400))
}

pub fn run(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init(a) => init(a),
        CertsCommand::Issue(a) => issue(a),
    }
}

fn init(a: CertsInitArgs) -> anyhow::Result<()> {
    let name = a.name.unwrap_or_else(Ca::default_name);
    let ca = Ca::generate(&name, Validity::starting_now(days(a.days)?))?;
    ca.write(&a.ca_dir)?;
    println!("created CA {name:?} in {} (ca.crt, ca.key: keep ca.key secret)", a.ca_dir.display());
    Ok(())
}

fn issue(a: CertsIssueArgs) -> anyhow::Result<()> {
    let role = a.role.parse()?;
    let id = match (&a.id, &a.node_data) {
        (Some(id), _) => Some(id.clone()),
        (None, Some(data)) => {
            anyhow::ensure!(
                matches!(role, ballast_tls::Role::Node | ballast_tls::Role::Frontend),
                "--node-data is for a node or frontend certificate"
            );
            Some(crate::node::node_id(None, data)?.to_string())
        }
        (None, None) => None,
    };
    let identity = Identity::new(role, id.as_deref())?;
    let lifetime = days(a.days)?;
    let Some(every) = a.renew_every else {
        let ca = Ca::load(&a.ca_dir).with_context(|| format!("the CA in {}", a.ca_dir.display()))?;
        ca.issue(&identity, Validity::starting_now(lifetime))?.write(&a.out)?;
        println!("issued {} ({} days) in {}", identity.uri(), a.days, a.out.display());
        return Ok(());
    };
    anyhow::ensure!(every >= Duration::from_secs(1), "--renew-every must be 1s or more");
    loop {
        // The CA is read each time: a rotated CA Secret is picked up too.
        match Ca::load(&a.ca_dir) {
            Ok(ca) => match ballast_tls::certs::renew_if_due(&ca, &identity, lifetime, &a.out) {
                Ok(true) => println!("issued {} ({} days) in {}", identity.uri(), a.days, a.out.display()),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, out = %a.out.display(), "certificate renewal failed; retrying"),
            },
            Err(e) => tracing::warn!(error = %e, "the CA is unreadable; retrying"),
        }
        std::thread::sleep(every);
    }
}
