//! Compiles `proto/*.proto` with protox (pure Rust, no protoc) and generates prost code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/bitswap.proto", "proto/dag_pb.proto", "proto/unixfs.proto", "proto/core.proto", "proto/msg.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        // msg.proto names core.proto's OwnerStatement: one Rust type for both.
        .extern_path(".kubelt.core.v1", "crate::core")
        .compile_fds(descriptors)?;
    Ok(())
}
