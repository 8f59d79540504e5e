//! Generates the message types from `proto/` with protox, so that building
//! needs no system `protoc`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        "casa/node/v1/value.proto",
        "casa/node/v1/node.proto",
        "casa/node/v1/driver.proto",
        "casa/node/v1/envelope.proto",
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let descriptors = protox::compile(files, [&root])?;
    prost_build::Config::new()
        .bytes([".casa.node.v1.NdArray.data"])
        .compile_fds(descriptors)?;
    Ok(())
}
