//! `ballast`: the server binary. Subcommands are filled in as the crates land.
fn main() {
    eprintln!("ballast: not yet assembled");
    std::process::exit(2);
}
