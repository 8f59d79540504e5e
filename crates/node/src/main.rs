//! The `casa-node` command.

fn main() {
    println!("casa-node {}", env!("CARGO_PKG_VERSION"));
}
