//! Rebuilds the service when a migration is added or changed: `sqlx::migrate!` embeds the
//! directory at compile time and stable Rust cannot track it on its own.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}
