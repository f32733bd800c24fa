//! `sqlx::migrate!` embeds migrations/ into the crate when it is compiled,
//! and cargo does not watch that folder by itself: a migration added after
//! the last build was missing from the rebuilt binaries (./dev/up then
//! refused a database that a newer build had migrated). This makes a new or
//! changed migration rebuild the crate.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
