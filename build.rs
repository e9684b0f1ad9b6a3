//! Generates the binary client protocol types from `schemas/wsbridge/v1/client.proto`.
//! The .proto file is compiled in pure Rust (protox), so no `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=schemas/wsbridge/v1/client.proto");
    let descriptors = protox::compile(["wsbridge/v1/client.proto"], ["schemas"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
