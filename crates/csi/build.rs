fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc on the build machines: the vendored one, with its well-known types
    // (csi.proto imports google/protobuf/wrappers.proto).
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    let proto = "../../proto/csi/v1/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    tonic_build::configure().compile_protos(&[proto], &["../../proto".into(), include])?;
    Ok(())
}
