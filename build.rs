//! Rebuild whenever a migration in `sql/` changes, so the embedded migrations stay current.
fn main() {
    println!("cargo:rerun-if-changed=sql");
}
