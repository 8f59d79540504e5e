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
        .boxed(".casa.node.v1.Envelope.body.command_response")
        .boxed(".casa.node.v1.Envelope.body.response_delivery")
        .boxed(".casa.node.v1.Envelope.body.welcome")
        .boxed(".casa.node.v1.Envelope.body.status_reply")
        .boxed(".casa.node.v1.Envelope.body.submit_request")
        .compile_fds(descriptors)?;
    Ok(())
}
