//! Rebuilds the tests when a migration changes: `sqlx::migrate!` embeds the directory at
//! compile time and stable Rust cannot track it on its own.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
