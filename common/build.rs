//! Generates the wire contract from `proto/` with protox, so no system `protoc` is needed.
//! The encoded descriptor set is also written to OUT_DIR for gRPC server reflection.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto_root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto");
    let files = [proto_root.join("flare/common/v1/common.proto"), proto_root.join("flare/storage/v1/storage.proto")];
    println!("cargo:rerun-if-changed={}", proto_root.display());
    // The migrations are embedded by `sqlx::migrate!`; rebuild when one is added.
    println!("cargo:rerun-if-changed=../migrations");

    let descriptors = protox::compile(&files, [&proto_root])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("flare_descriptor.bin"), descriptors.encode_to_vec())?;

    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
