fn main() -> Result<(), Box<dyn std::error::Error>> {
    // No protoc on the build machines: the vendored one, with its well-known types
    // (csi.proto imports google/protobuf/wrappers.proto).
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    // The CSI spec, and the kubelet's plugin registration API (`ballast node`
    // registers itself with the kubelet: src/registration.rs).
    let protos = ["../../proto/csi/v1/csi.proto", "../../proto/kubelet/pluginregistration/v1/api.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    tonic_build::configure().compile_protos(&protos, &["../../proto".into(), include])?;
    Ok(())
}
