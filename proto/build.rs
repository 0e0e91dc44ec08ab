//! Compiles `rootscale/v1/*.proto` with protox (a pure-Rust protobuf compiler), so no system `protoc` is needed,
//! and writes the descriptor set that gRPC server reflection serves.

use std::{env, fs, path::PathBuf};

use prost::Message as _;
use prost_types::FileDescriptorSet;

const PROTOS: &[&str] = &["rootscale/v1/window.proto", "rootscale/v1/neighbor.proto", "rootscale/v1/advisor.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let file_descriptors: FileDescriptorSet = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out_dir.join("rootscale_descriptor.bin"), file_descriptors.encode_to_vec())?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(file_descriptors)?;
    Ok(())
}
