//! Compiles `proto/*.proto` with protox (pure Rust, no protoc) and generates prost code.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/bitswap.proto", "proto/dag_pb.proto", "proto/unixfs.proto", "proto/core.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
