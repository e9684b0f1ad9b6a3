//! Generates the binary client protocol types from `schemas/wsbridge/v1/client.proto`.
//! The .proto file is compiled in pure Rust (protox), so no `protoc` is needed.
//! It also makes Cargo rebuild when the embedded console (`console/`) or the JavaScript client's
//! build (`clients/js/dist/`) changes, since the macro that embeds them cannot say so itself.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=schemas/wsbridge/v1/client.proto");
    println!("cargo:rerun-if-changed=console");
    println!("cargo:rerun-if-changed=clients/js/dist");
    let descriptors = protox::compile(["wsbridge/v1/client.proto"], ["schemas"])?;
    prost_build::Config::new()
        .bytes(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
