//! The Kubernetes deployment in csi/: every manifest against the Kubernetes API
//! schemas (strict: an unknown or misspelt field is an error), and the
//! cross-references between manifests that no schema can see: the driver name in
//! the CSIDriver, the StorageClasses and the node plugin's kubelet registration
//! (socket paths, plugins_registry); the health endpoints the probes call; the
//! StorageClass parameters against what the CSI controller accepts; the meta
//! member list in the meta StatefulSet and in every client; the kustomization
//! against the files; pinned images, the sidecar versions we build.
//!
//! The schema check runs `kubernetes-validate` (PyPI; it bundles the schemas and
//! works offline). It is required, here as in CI:
//! `python3 -m pip install kubernetes-validate==1.37.0`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use ballast_types::units::parse_size;
use serde::Deserialize;
use serde_norway::Value;

/// The CSI driver name: the CSIDriver object, every StorageClass's provisioner,
/// the kubelet plugin directory.
const DRIVER: &str = "csi.ballast.io";
const NAMESPACE: &str = "ballast-system";
/// Kubernetes versions the manifests must be valid for: the oldest supported
/// (1.35: the node plugin reads its zone from the pod labels that
/// PodTopologyLabelsAdmission copies from the node, beta and on by default
/// since 1.35), the one the cluster tests run, and the newest the pinned
/// kubernetes-validate ships (catches fields removed from the API).
const KUBERNETES_VERSIONS: &[&str] = &["1.35.0", "1.36.0", "1.37.0"];
/// The zone label Kubernetes puts on nodes (and, from 1.35, on their pods).
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The upstream sidecars and the versions the manifests run: the ones built
/// for the cluster tests (from Go modules; v2.2.1 of the resizer is not served
/// by the module proxy, v2.2.0 is).
const SIDECARS: &[(&str, &str)] = &[
    ("csi-provisioner", "registry.k8s.io/sig-storage/csi-provisioner:v6.3.0"),
    ("csi-attacher", "registry.k8s.io/sig-storage/csi-attacher:v4.12.0"),
    ("csi-resizer", "registry.k8s.io/sig-storage/csi-resizer:v2.2.0"),
    ("csi-snapshotter", "registry.k8s.io/sig-storage/csi-snapshotter:v8.6.0"),
];
/// external-snapshotter's controller (csi/snapshots/), built from the same module.
const SNAPSHOT_CONTROLLER: &str = "registry.k8s.io/sig-storage/snapshot-controller:v8.6.0";
/// Kinds of the snapshot CRDs (csi/snapshots/): not in the Kubernetes API
/// schemas kubernetes-validate ships, checked by
/// `the_volume_snapshot_class_names_the_driver` instead.
const CRD_KINDS: &[&str] = &["VolumeSnapshotClass"];
const INSTALL: &str = "python3 -m pip install kubernetes-validate==1.37.0";

fn csi_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("csi")
}

/// The YAML files under `dir`, sorted; with `recursive`, also in subdirectories
/// (csi/examples/) except csi/monitoring/.
fn yaml_files(dir: &Path, recursive: bool) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.unwrap_or_else(|e| panic!("read {}: {e}", dir.display())).path();
        if path.is_dir() {
            // csi/monitoring/ holds prometheus-operator objects, which the Kubernetes
            // API schemas do not know, and a Prometheus rule file: tests/monitoring.rs.
            if recursive && path.file_name().is_none_or(|n| n != "monitoring") {
                out.extend(yaml_files(&path, true));
            }
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            out.push(path);
        }
    }
    out.sort();
    out
}

fn is_kustomization(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "kustomization.yaml")
}

/// Every non-empty YAML document of a file (a `---` separated stream).
fn documents(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    serde_norway::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: invalid YAML: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

/// A Kubernetes object with where it came from, for messages.
struct Object {
    file: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value.get("kind").and_then(Value::as_str).unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("")
    }
    fn at(&self, path: &[&str]) -> &Value {
        at(&self.value, path)
            .unwrap_or_else(|| panic!("{} {}/{}: no {}", self.file, self.kind(), self.name(), path.join(".")))
    }
}

fn at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, key| v.get(*key))
}

/// Every Kubernetes object in csi/ (examples included, the kustomization not).
fn objects() -> Vec<Object> {
    let root = csi_dir();
    yaml_files(&root, true)
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .flat_map(|p| {
            let file = p.strip_prefix(&root).unwrap_or(&p).display().to_string();
            documents(&p).into_iter().map(move |value| Object { file: file.clone(), value })
        })
        .collect()
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Object {
    let found: Vec<&Object> = objects.iter().filter(|o| o.kind() == kind && o.name() == name).collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind} {name} in csi/");
    found[0]
}

fn seq<'a>(v: &'a Value, what: &str) -> &'a [Value] {
    v.as_sequence().map(Vec::as_slice).unwrap_or_else(|| panic!("{what}: expected a list, got {v:?}"))
}

fn string<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str().unwrap_or_else(|| panic!("{what}: expected a string, got {v:?}"))
}

/// A pod template's container (or init container) by name.
fn container<'a>(obj: &'a Object, name: &str) -> &'a Value {
    let spec = obj.at(&["spec", "template", "spec"]);
    ["containers", "initContainers"]
        .iter()
        .filter_map(|list| spec.get(*list).and_then(Value::as_sequence))
        .flatten()
        .find(|c| c.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("{} {}/{}: no container {name}", obj.file, obj.kind(), obj.name()))
}

/// A container's command and args as one word list.
fn argv(c: &Value) -> Vec<String> {
    ["command", "args"]
        .iter()
        .filter_map(|k| c.get(*k).and_then(Value::as_sequence))
        .flatten()
        .map(|a| string(a, "container argument").to_string())
        .collect()
}

/// The value of `--flag=value` or `--flag value` in an argument list.
fn flag(args: &[String], name: &str) -> Option<String> {
    let prefix = format!("{name}=");
    args.iter().enumerate().find_map(|(i, a)| {
        if let Some(v) = a.strip_prefix(&prefix) {
            Some(v.to_string())
        } else if a == name {
            args.get(i + 1).cloned()
        } else {
            None
        }
    })
}

/// A volume of a pod template by name.
fn volume<'a>(obj: &'a Object, name: &str) -> &'a Value {
    seq(obj.at(&["spec", "template", "spec", "volumes"]), "volumes")
        .iter()
        .find(|v| v.get("name").and_then(Value::as_str) == Some(name))
        .unwrap_or_else(|| panic!("{} {}/{}: no volume {name}", obj.file, obj.kind(), obj.name()))
}

/// Where a container mounts a volume, with the mount entry.
fn mount<'a>(c: &'a Value, volume: &str) -> Option<&'a Value> {
    c.get("volumeMounts")
        .and_then(Value::as_sequence)?
        .iter()
        .find(|m| m.get("name").and_then(Value::as_str) == Some(volume))
}

/// Runs the validator with `args`, if it is installed as `program`.
fn try_validator(program: &[&str], args: &[String]) -> Option<std::process::Output> {
    let (bin, pre) = program.split_first()?;
    Command::new(bin).args(pre).args(args).output().ok()
}

/// The way to run kubernetes-validate here: $KUBERNETES_VALIDATE, the script on
/// PATH, or the module of the python3 on PATH (pip's scripts directory is not
/// always on PATH).
fn validator() -> Vec<String> {
    let candidates: Vec<Vec<String>> = match std::env::var("KUBERNETES_VALIDATE") {
        Ok(cmd) => vec![cmd.split_whitespace().map(String::from).collect()],
        Err(_) => {
            vec![vec!["kubernetes-validate".into()], vec!["python3".into(), "-m".into(), "kubernetes_validate".into()]]
        }
    };
    for candidate in &candidates {
        let program: Vec<&str> = candidate.iter().map(String::as_str).collect();
        if let Some(out) = try_validator(&program, &["--version".to_string()]) {
            if out.status.success() {
                return candidate.clone();
            }
        }
    }
    panic!(
        "kubernetes-validate is not installed (tried {candidates:?}); the manifests in csi/ cannot be checked \
         against the Kubernetes API schemas without it. Install it with: {INSTALL}"
    );
}

#[test]
fn every_manifest_validates_against_the_kubernetes_api_schemas() {
    let crd_objects_only = |p: &PathBuf| {
        documents(p).iter().all(|d| d.get("kind").and_then(Value::as_str).is_some_and(|k| CRD_KINDS.contains(&k)))
    };
    let files: Vec<PathBuf> = yaml_files(&csi_dir(), true)
        .into_iter()
        .filter(|p| !is_kustomization(p))
        .filter(|p| !crd_objects_only(p))
        .collect();
    assert!(files.len() >= 7, "expected the manifests in csi/, found {files:?}");
    let docs: usize = files.iter().map(|f| documents(f).len()).sum();

    let program = validator();
    let mut args: Vec<String> = vec!["--strict".into()];
    for v in KUBERNETES_VERSIONS {
        args.extend(["-k".to_string(), v.to_string()]);
    }
    args.extend(files.iter().map(|f| f.display().to_string()));
    let program_ref: Vec<&str> = program.iter().map(String::as_str).collect();
    let out = try_validator(&program_ref, &args).unwrap_or_else(|| panic!("cannot run {program:?}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);

    // It only warns (exit 0) for a kind or apiVersion it has no schema for, which
    // is exactly what a misspelt apiVersion looks like: treat any WARN as failure,
    // and require one pass per document and version.
    let problems: Vec<&str> =
        stdout.lines().filter(|l| !l.starts_with("INFO ")).filter(|l| !l.trim().is_empty()).collect();
    let passed = stdout.lines().filter(|l| l.starts_with("INFO ") && l.contains(" passed ")).count();
    assert!(
        out.status.success() && problems.is_empty() && stderr.trim().is_empty(),
        "kubernetes-validate --strict failed ({}):\n{}\n{stderr}",
        out.status,
        problems.join("\n")
    );
    assert_eq!(
        passed,
        docs * KUBERNETES_VERSIONS.len(),
        "expected every one of {docs} documents to pass for each of {KUBERNETES_VERSIONS:?}:\n{stdout}"
    );
}

#[test]
fn kustomization_lists_every_manifest() {
    let root = csi_dir();
    let docs = documents(&root.join("kustomization.yaml"));
    assert_eq!(docs.len(), 1, "kustomization.yaml: one document");
    let k = &docs[0];
    assert_eq!(at(k, &["apiVersion"]).and_then(Value::as_str), Some("kustomize.config.k8s.io/v1beta1"));
    assert_eq!(at(k, &["kind"]).and_then(Value::as_str), Some("Kustomization"));
    assert!(
        k.get("namespace").is_none(),
        "kustomization.yaml: a namespace override would not rewrite the meta members' DNS names"
    );

    let listed: Vec<&str> = seq(at(k, &["resources"]).expect("kustomization.yaml: resources"), "resources")
        .iter()
        .map(|r| string(r, "resource"))
        .collect();
    let unique: BTreeSet<&str> = listed.iter().copied().collect();
    assert_eq!(unique.len(), listed.len(), "kustomization.yaml lists a resource twice: {listed:?}");
    let on_disk: BTreeSet<String> = yaml_files(&root, false)
        .iter()
        .filter(|p| !is_kustomization(p))
        .map(|p| p.file_name().and_then(|n| n.to_str()).expect("file name").to_string())
        .collect();
    let listed_set: BTreeSet<String> = unique.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed_set, on_disk, "kustomization.yaml resources vs the YAML files in csi/ (examples/ excluded)");
    // The namespace before anything that lives in it.
    assert_eq!(listed.first().copied(), Some("namespace.yaml"), "the Namespace must come first");
    let ns = documents(&root.join("namespace.yaml"));
    assert_eq!(ns.len(), 1);
    assert_eq!(at(&ns[0], &["kind"]).and_then(Value::as_str), Some("Namespace"));
    assert_eq!(at(&ns[0], &["metadata", "name"]).and_then(Value::as_str), Some(NAMESPACE));

    // The ballast image can be overridden, and is overridden with a pinned tag.
    let images = seq(at(k, &["images"]).expect("kustomization.yaml: images"), "images");
    let ballast = images
        .iter()
        .find(|i| i.get("name").and_then(Value::as_str) == Some("ghcr.io/ballast-io/ballast"))
        .expect("kustomization.yaml: images entry for ghcr.io/ballast-io/ballast");
    let tag = ballast.get("newTag").and_then(Value::as_str).expect("images: newTag");
    assert!(!tag.is_empty() && tag != "latest", "kustomization.yaml: ballast newTag {tag:?} is not pinned");
}

#[test]
fn namespaced_objects_are_in_the_ballast_namespace() {
    const CLUSTER_SCOPED: &[&str] =
        &["Namespace", "CSIDriver", "StorageClass", "ClusterRole", "ClusterRoleBinding", "VolumeSnapshotClass"];
    for o in objects().iter().filter(|o| !o.file.starts_with("examples")) {
        if CLUSTER_SCOPED.contains(&o.kind()) {
            assert!(
                at(&o.value, &["metadata", "namespace"]).is_none(),
                "{}: cluster-scoped {} {} has a namespace",
                o.file,
                o.kind(),
                o.name()
            );
        } else {
            assert_eq!(
                at(&o.value, &["metadata", "namespace"]).and_then(Value::as_str),
                Some(NAMESPACE),
                "{}: {} {} must be in {NAMESPACE}",
                o.file,
                o.kind(),
                o.name()
            );
        }
    }
}

/// csi/snapshots/: the VolumeSnapshotClass (a CRD kind, outside the schema
/// check) and its kustomization listing every file there.
#[test]
fn the_volume_snapshot_class_names_the_driver() {
    let dir = csi_dir().join("snapshots");
    let class = documents(&dir.join("volumesnapshotclass.yaml"));
    assert_eq!(class.len(), 1);
    let c = &class[0];
    assert_eq!(at(c, &["apiVersion"]).and_then(Value::as_str), Some("snapshot.storage.k8s.io/v1"));
    assert_eq!(at(c, &["kind"]).and_then(Value::as_str), Some("VolumeSnapshotClass"));
    assert_eq!(at(c, &["driver"]).and_then(Value::as_str), Some(DRIVER));
    assert_eq!(at(c, &["deletionPolicy"]).and_then(Value::as_str), Some("Delete"));
    assert!(c.get("parameters").is_none(), "Ballast's CreateSnapshot takes no parameters");
    let k = &documents(&dir.join("kustomization.yaml"))[0];
    let listed: BTreeSet<String> = seq(at(k, &["resources"]).expect("resources"), "resources")
        .iter()
        .map(|r| string(r, "resource").to_string())
        .collect();
    let on_disk: BTreeSet<String> = yaml_files(&dir, false)
        .iter()
        .filter(|p| !is_kustomization(p))
        .map(|p| p.file_name().and_then(|n| n.to_str()).expect("file name").to_string())
        .collect();
    assert_eq!(listed, on_disk, "csi/snapshots/kustomization.yaml lists every file there");
    let objects = objects();
    let d = find(&objects, "Deployment", "ballast-snapshot-controller");
    assert_eq!(container(d, "snapshot-controller").get("image").and_then(Value::as_str), Some(SNAPSHOT_CONTROLLER));
}

#[test]
fn driver_name_matches_every_storage_class() {
    let objects = objects();
    let drivers: Vec<&Object> = objects.iter().filter(|o| o.kind() == "CSIDriver").collect();
    assert_eq!(drivers.len(), 1, "exactly one CSIDriver");
    let d = drivers[0];
    assert_eq!(d.name(), DRIVER);
    assert_eq!(d.at(&["spec", "attachRequired"]).as_bool(), Some(true), "attach leases need ControllerPublish");
    assert_eq!(d.at(&["spec", "fsGroupPolicy"]).as_str(), Some("File"));
    let modes: Vec<&str> =
        seq(d.at(&["spec", "volumeLifecycleModes"]), "modes").iter().map(|m| string(m, "mode")).collect();
    assert_eq!(modes, ["Persistent"]);

    let classes: Vec<&Object> = objects.iter().filter(|o| o.kind() == "StorageClass").collect();
    assert!(classes.len() >= 2, "expected the example StorageClasses");
    for sc in &classes {
        assert_eq!(
            sc.at(&["provisioner"]).as_str(),
            Some(DRIVER),
            "{}: StorageClass {} provisioner",
            sc.file,
            sc.name()
        );
    }
    // Every class a claim in csi/ names exists there.
    let class_names: BTreeSet<&str> = classes.iter().map(|c| c.name()).collect();
    for o in objects.iter().filter(|o| o.kind() == "StatefulSet") {
        for t in o
            .value
            .get("spec")
            .and_then(|s| s.get("volumeClaimTemplates"))
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            if let Some(class) = at(t, &["spec", "storageClassName"]).and_then(Value::as_str) {
                if o.file.starts_with("examples") {
                    assert!(class_names.contains(class), "{}: unknown StorageClass {class}", o.file);
                }
            }
        }
    }
}

/// What the CSI controller accepts in StorageClass parameters: Ballast's own
/// keys, and the csi.storage.k8s.io/ keys the sidecars interpret.
fn check_parameters(sc: &Object) {
    const OWN: &[&str] = &["replicas", "minInSync", "chunkSize", "zoneSpread"];
    const CSI: &[&str] = &[
        "fstype",
        "provisioner-secret-name",
        "provisioner-secret-namespace",
        "controller-publish-secret-name",
        "controller-publish-secret-namespace",
        "node-stage-secret-name",
        "node-stage-secret-namespace",
        "node-publish-secret-name",
        "node-publish-secret-namespace",
        "controller-expand-secret-name",
        "controller-expand-secret-namespace",
        "node-expand-secret-name",
        "node-expand-secret-namespace",
    ];
    let what = format!("{}: StorageClass {}", sc.file, sc.name());
    let mut params = BTreeMap::new();
    if let Some(map) = sc.value.get("parameters") {
        for (k, v) in map.as_mapping().unwrap_or_else(|| panic!("{what}: parameters must be a map")) {
            let k = string(k, &what);
            // Kubernetes wants strings; YAML's unquoted 3 is a number.
            let v = v.as_str().unwrap_or_else(|| panic!("{what}: parameter {k} must be a quoted string, got {v:?}"));
            let known =
                OWN.contains(&k) || k.strip_prefix("csi.storage.k8s.io/").is_some_and(|rest| CSI.contains(&rest));
            assert!(known, "{what}: unknown parameter {k:?} (known: {OWN:?} and csi.storage.k8s.io/{CSI:?})");
            params.insert(k, v);
        }
    }
    let replicas: u8 = match params.get("replicas") {
        Some(r) => r.parse().unwrap_or_else(|_| panic!("{what}: replicas {r:?} is not a number")),
        None => 3,
    };
    assert!((1..=5).contains(&replicas), "{what}: replicas {replicas} outside 1-5");
    if let Some(m) = params.get("minInSync") {
        let m: u8 = m.parse().unwrap_or_else(|_| panic!("{what}: minInSync {m:?} is not a number"));
        assert!((1..=replicas).contains(&m), "{what}: minInSync {m} outside 1..={replicas}");
    }
    if let Some(c) = params.get("chunkSize") {
        let bytes = parse_size(c).unwrap_or_else(|e| panic!("{what}: chunkSize: {e}"));
        assert!(bytes > 0 && bytes.is_multiple_of(4096), "{what}: chunkSize {c} is not a positive multiple of 4 KiB");
    }
    if let Some(z) = params.get("zoneSpread") {
        assert!(matches!(*z, "required" | "preferred"), "{what}: zoneSpread {z:?}: required or preferred");
    }
    if let Some(f) = params.get("csi.storage.k8s.io/fstype") {
        assert!(matches!(*f, "ext4" | "xfs"), "{what}: fstype {f:?}: ext4 or xfs");
    }
}

#[test]
fn storage_class_parameters_are_known_and_valid() {
    let objects = objects();
    let classes: Vec<&Object> = objects.iter().filter(|o| o.kind() == "StorageClass").collect();
    assert!(!classes.is_empty());
    for sc in classes {
        check_parameters(sc);
    }
}

#[test]
fn storage_class_parameter_check_rejects_bad_values() {
    let bad = [
        ("replicas: \"6\"", "outside 1-5"),
        ("replicas: 3", "quoted string"),
        ("replicas: \"2\"\n  minInSync: \"3\"", "minInSync 3"),
        ("chunkSize: \"64 bananas\"", "chunkSize"),
        ("chunkSize: \"1000\"", "multiple of 4 KiB"),
        ("zoneSpread: always", "zoneSpread"),
        ("csi.storage.k8s.io/fstype: btrfs", "fstype"),
        ("replica: \"3\"", "unknown parameter"),
    ];
    for (params, expected) in bad {
        let yaml =
            format!("kind: StorageClass\nmetadata:\n  name: t\nprovisioner: {DRIVER}\nparameters:\n  {params}\n");
        let sc = Object { file: "test".into(), value: serde_norway::from_str(&yaml).expect("test YAML") };
        let err = std::panic::catch_unwind(|| check_parameters(&sc)).expect_err(params);
        let msg = err
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| err.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(msg.contains(expected), "{params}: {msg:?} should mention {expected:?}");
    }
}

#[test]
fn node_plugin_socket_is_where_kubelet_expects_and_registered() {
    let objects = objects();
    let ds = find(&objects, "DaemonSet", "ballast-node");
    let plugin_dir = format!("/var/lib/kubelet/plugins/{DRIVER}");

    let ballast = container(ds, "ballast");
    let args = argv(ballast);
    assert_eq!(
        args.get(..2).map(|a| a.join(" ")).as_deref(),
        Some("ballast node"),
        "node container runs `ballast node`"
    );
    let endpoint = flag(&args, "--csi-endpoint").expect("ballast node: --csi-endpoint");
    let socket =
        endpoint.strip_prefix("unix://").unwrap_or_else(|| panic!("--csi-endpoint {endpoint}: unix:// socket"));
    for f in ["--data", "--listen", "--advertise", "--zone-file", "--meta", "--csi-state", "--csi-node-name"] {
        assert!(flag(&args, f).is_some(), "ballast node: missing {f}");
    }

    // The socket's directory is the host's plugin directory for this driver.
    let socket_dir = volume(ds, "socket-dir");
    assert_eq!(at(socket_dir, &["hostPath", "path"]).and_then(Value::as_str), Some(plugin_dir.as_str()));
    let mount_path = |c: &Value| {
        mount(c, "socket-dir")
            .and_then(|m| m.get("mountPath"))
            .and_then(Value::as_str)
            .map(|p| p.trim_end_matches('/').to_string())
    };
    let in_container = mount_path(ballast).expect("ballast mounts socket-dir");
    let file = socket
        .strip_prefix(&format!("{in_container}/"))
        .unwrap_or_else(|| panic!("--csi-endpoint {socket} is not in the socket-dir mount {in_container}"));
    let on_host = format!("{plugin_dir}/{file}");
    assert_eq!(on_host, format!("{plugin_dir}/csi.sock"));

    // `ballast node` registers itself with the kubelet: the registration
    // socket goes into the kubelet's plugins_registry (mounted where
    // --registration-dir says), and tells the kubelet the CSI socket's host path.
    assert_eq!(
        flag(&args, "--kubelet-registration-path").as_deref(),
        Some(on_host.as_str()),
        "--kubelet-registration-path must be the socket-dir hostPath + /{file}"
    );
    let reg_dir = flag(&args, "--registration-dir").expect("ballast node: --registration-dir");
    let reg = mount(ballast, "registration-dir").expect("ballast mounts registration-dir");
    assert_eq!(reg.get("mountPath").and_then(Value::as_str), Some(reg_dir.as_str()), "--registration-dir vs its mount");
    assert_ne!(reg.get("readOnly").and_then(Value::as_bool), Some(true), "the registration socket is created there");
    assert_eq!(
        at(volume(ds, "registration-dir"), &["hostPath", "path"]).and_then(Value::as_str),
        Some("/var/lib/kubelet/plugins_registry"),
        "the kubelet's plugin watcher looks in plugins_registry"
    );
    // No sidecars: nothing else registers the plugin or answers its probes.
    let names: Vec<&str> = seq(ds.at(&["spec", "template", "spec", "containers"]), "containers")
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    assert_eq!(names, ["ballast"], "the node plugin pod runs only ballast");

    // Liveness (and startup) on /healthz of --health-listen, which does not
    // depend on meta; the port is the host's (hostNetwork).
    let health = health_port(ballast, &args);
    for probe in ["livenessProbe", "startupProbe"] {
        assert_eq!(http_probe(ballast, probe, health), "/healthz", "node {probe}");
    }
    // The startup probe covers the recovery of staged volumes (up to 120 s)
    // before the CSI socket is served.
    let startup = |k: &str| at(ballast, &["startupProbe", k]).and_then(Value::as_u64);
    let (period, failures) = (startup("periodSeconds").unwrap_or(10), startup("failureThreshold").unwrap_or(3));
    assert!(period * failures >= 150, "startupProbe allows {}s, recovery may take 120s", period * failures);

    // Mounts made for kubelet must reach the host.
    let kubelet = mount(ballast, "kubelet-dir").expect("ballast mounts /var/lib/kubelet");
    assert_eq!(kubelet.get("mountPath").and_then(Value::as_str), Some("/var/lib/kubelet"));
    assert_eq!(kubelet.get("mountPropagation").and_then(Value::as_str), Some("Bidirectional"));
    assert_eq!(at(volume(ds, "kubelet-dir"), &["hostPath", "path"]).and_then(Value::as_str), Some("/var/lib/kubelet"));
    assert_eq!(at(ballast, &["securityContext", "privileged"]).and_then(Value::as_bool), Some(true));
    assert_eq!(ds.at(&["spec", "template", "spec", "hostNetwork"]).as_bool(), Some(true));
    assert_eq!(ds.at(&["spec", "template", "spec", "dnsPolicy"]).as_str(), Some("ClusterFirstWithHostNet"));

    // The zone file the init container writes is the one `ballast node` reads.
    let zone_file = flag(&args, "--zone-file").expect("--zone-file");
    let zone_dir = mount(ballast, "zone").and_then(|m| m.get("mountPath")).and_then(Value::as_str).expect("zone mount");
    assert_eq!(zone_file, format!("{zone_dir}/zone"));
    let init = container(ds, "zone-file");
    let script = argv(init).join(" ");
    assert!(script.contains(&format!("mv {zone_dir}/zone.tmp {zone_file}")), "zone-file writes {zone_file}");
    let init_dir = mount(init, "zone").and_then(|m| m.get("mountPath")).and_then(Value::as_str);
    assert_eq!(init_dir, Some(zone_dir), "zone-file mounts the zone volume where ballast reads it");
}

#[test]
fn node_zone_comes_from_the_pod_topology_label() {
    let objects = objects();
    let ds = find(&objects, "DaemonSet", "ballast-node");
    // Only the zone-file init container: nothing that needs the API (kubectl).
    let init: Vec<&str> = seq(ds.at(&["spec", "template", "spec", "initContainers"]), "initContainers")
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    assert_eq!(init, ["zone-file"]);
    let c = container(ds, "zone-file");
    let env = seq(c.get("env").expect("zone-file env"), "env");
    let zone = env.iter().find(|e| e.get("name").and_then(Value::as_str) == Some("ZONE")).expect("zone-file: env ZONE");
    assert_eq!(
        at(zone, &["valueFrom", "fieldRef", "fieldPath"]).and_then(Value::as_str),
        Some(format!("metadata.labels['{ZONE_LABEL}']").as_str()),
        "ZONE from the pod's copy of the node's zone label (downward API)"
    );
    // It refuses an empty or odd zone, and says what to do.
    let script = argv(c).join(" ");
    assert!(script.contains(r#"case "$ZONE" in"#) && script.contains(r#"""|"#), "zone-file checks $ZONE");
    assert!(script.contains("exit 1"), "zone-file fails without a zone");
    for needle in [ZONE_LABEL, "Kubernetes 1.35", "kubectl label node", "delete pod"] {
        assert!(script.contains(needle), "zone-file's error must mention {needle:?}");
    }
    for var in ["NODE_NAME", "POD_NAME", "POD_NAMESPACE"] {
        assert!(
            env.iter().any(|e| e.get("name").and_then(Value::as_str) == Some(var)),
            "zone-file's message names ${var}: set it"
        );
    }

    // So the node plugin needs no API access: no role bound to its account,
    // and no token mounted.
    let sa = find(&objects, "ServiceAccount", "ballast-node");
    assert_eq!(sa.at(&["automountServiceAccountToken"]).as_bool(), Some(false));
    for b in objects.iter().filter(|o| matches!(o.kind(), "RoleBinding" | "ClusterRoleBinding")) {
        for s in b.value.get("subjects").and_then(Value::as_sequence).into_iter().flatten() {
            assert_ne!(
                s.get("name").and_then(Value::as_str),
                Some("ballast-node"),
                "{} {}: ballast-node needs no API access",
                b.kind(),
                b.name()
            );
        }
    }
}

/// The port `--health-listen` binds, checked against the container's `healthz` port.
fn health_port(c: &Value, args: &[String]) -> u64 {
    let listen = flag(args, "--health-listen").expect("--health-listen");
    let (_, port) = listen.rsplit_once(':').unwrap_or_else(|| panic!("--health-listen {listen}: HOST:PORT"));
    let port: u64 = port.parse().unwrap_or_else(|_| panic!("--health-listen {listen}: bad port"));
    let declared = seq(c.get("ports").expect("ports"), "ports")
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("healthz"))
        .and_then(|p| p.get("containerPort"))
        .and_then(Value::as_u64);
    assert_eq!(declared, Some(port), "the healthz containerPort is the --health-listen port");
    assert!(listen.starts_with("0.0.0.0:"), "--health-listen {listen}: the kubelet probes the pod IP");
    port
}

/// The HTTP path of a container's probe, which must target `port` (by name or number).
fn http_probe<'a>(c: &'a Value, probe: &str, port: u64) -> &'a str {
    let get = at(c, &[probe, "httpGet"]).unwrap_or_else(|| panic!("{probe}: httpGet"));
    match get.get("port") {
        Some(Value::String(name)) => assert_eq!(name, "healthz", "{probe} port"),
        Some(p) => assert_eq!(p.as_u64(), Some(port), "{probe} port"),
        None => panic!("{probe}: no port"),
    }
    get.get("path").and_then(Value::as_str).unwrap_or_else(|| panic!("{probe}: path"))
}

#[test]
fn controller_sidecars_share_the_driver_socket() {
    let objects = objects();
    let d = find(&objects, "Deployment", "ballast-csi-controller");
    let ballast = container(d, "ballast");
    let args = argv(ballast);
    assert_eq!(args.get(..2).map(|a| a.join(" ")).as_deref(), Some("ballast csi-controller"));
    let endpoint = flag(&args, "--endpoint").expect("csi-controller --endpoint");
    let socket = endpoint.strip_prefix("unix://").expect("unix:// endpoint");
    assert!(volume(d, "socket-dir").get("emptyDir").is_some(), "controller socket on an emptyDir");
    let names: Vec<&str> = seq(d.at(&["spec", "template", "spec", "containers"]), "containers")
        .iter()
        .map(|c| c.get("name").and_then(Value::as_str).unwrap_or(""))
        .collect();
    let mut expected = vec!["ballast"];
    expected.extend(SIDECARS.iter().map(|(name, _)| *name));
    assert_eq!(names, expected, "ballast and the sidecars we build, nothing else");
    for (name, _) in SIDECARS {
        let c = container(d, name);
        let sidecar = argv(c);
        assert_eq!(flag(&sidecar, "--csi-address").as_deref(), Some(socket), "{name} --csi-address");
        assert_eq!(
            mount(c, "socket-dir").and_then(|m| m.get("mountPath")),
            mount(ballast, "socket-dir").and_then(|m| m.get("mountPath")),
            "{name} mounts the socket where ballast creates it"
        );
        assert!(sidecar.iter().any(|a| a == "--leader-election"), "{name}: --leader-election (2 replicas)");
    }
    // ballast answers the kubelet's probes itself: alive while its CSI socket
    // answers, ready while meta answers too.
    let port = health_port(ballast, &args);
    assert_eq!(http_probe(ballast, "livenessProbe", port), "/healthz");
    assert_eq!(http_probe(ballast, "readinessProbe", port), "/readyz");
    let provisioner = argv(container(d, "csi-provisioner"));
    for a in ["--feature-gates=Topology=true", "--extra-create-metadata", "--default-fstype=ext4"] {
        assert!(provisioner.iter().any(|x| x == a), "csi-provisioner: {a}");
    }
}

#[test]
fn meta_members_agree_everywhere() {
    let objects = objects();
    let sts = find(&objects, "StatefulSet", "ballast-meta");
    let replicas = sts.at(&["spec", "replicas"]).as_u64().expect("meta replicas");
    assert!(replicas % 2 == 1 && replicas >= 3, "meta needs an odd number of members, 3 or more");
    let service = sts.at(&["spec", "serviceName"]).as_str().expect("serviceName");
    let meta = container(sts, "meta");
    let port = seq(meta.get("ports").expect("meta ports"), "ports")
        .iter()
        .find(|p| p.get("name").and_then(Value::as_str) == Some("grpc"))
        .and_then(|p| p.get("containerPort"))
        .and_then(Value::as_u64)
        .expect("meta grpc port");
    let members: Vec<String> =
        (0..replicas).map(|i| format!("{}-{i}.{service}.{NAMESPACE}.svc:{port}", sts.name())).collect();

    // The member command is one shell line: its words are the flags.
    let words: Vec<String> = argv(meta).iter().flat_map(|a| a.split_whitespace().map(String::from)).collect::<Vec<_>>();
    assert_eq!(flag(&words, "--listen").as_deref(), Some(format!("0.0.0.0:{port}").as_str()));
    assert!(words.join(" ").contains("--id \"$(( ${HOSTNAME##*-} + 1 ))\""), "member id from the pod ordinal");
    let initial = flag(&words, "--initial-members").expect("meta --initial-members");
    let expected: Vec<String> = members.iter().enumerate().map(|(i, m)| format!("{}={m}", i + 1)).collect();
    assert_eq!(initial, expected.join(","), "--initial-members vs the StatefulSet");

    // Every client lists every member.
    let list = members.join(",");
    let node = find(&objects, "DaemonSet", "ballast-node");
    assert_eq!(flag(&argv(container(node, "ballast")), "--meta").as_deref(), Some(list.as_str()));
    let ctl = find(&objects, "Deployment", "ballast-csi-controller");
    assert_eq!(flag(&argv(container(ctl, "ballast")), "--meta").as_deref(), Some(list.as_str()));

    // Peers find each other before they are ready.
    let headless = find(&objects, "Service", service);
    assert_eq!(headless.at(&["spec", "clusterIP"]).as_str(), Some("None"));
    assert_eq!(headless.at(&["spec", "publishNotReadyAddresses"]).as_bool(), Some(true));
    assert_eq!(sts.at(&["spec", "podManagementPolicy"]).as_str(), Some("Parallel"));

    // Voluntary disruptions leave a quorum.
    let labels = sts.at(&["spec", "template", "metadata", "labels"]);
    let pdb = objects.iter().find(|o| o.kind() == "PodDisruptionBudget" && o.name() == sts.name()).expect("meta PDB");
    let max = pdb.at(&["spec", "maxUnavailable"]).as_u64().expect("PDB maxUnavailable");
    assert!(max <= (replicas - 1) / 2, "PDB maxUnavailable {max} would let drains take the quorum of {replicas}");
    let selector = pdb.at(&["spec", "selector", "matchLabels"]).as_mapping().expect("PDB matchLabels");
    for (k, v) in selector {
        assert_eq!(labels.get(k), Some(v), "PDB selector {k:?} does not match the meta pods");
    }

    // Meta's own volumes never come from Ballast (it could not start after an outage).
    let ballast_classes: BTreeSet<&str> = objects
        .iter()
        .filter(|o| o.kind() == "StorageClass" && o.value.get("provisioner").and_then(Value::as_str) == Some(DRIVER))
        .map(|o| o.name())
        .collect();
    for t in seq(sts.at(&["spec", "volumeClaimTemplates"]), "volumeClaimTemplates") {
        if let Some(class) = at(t, &["spec", "storageClassName"]).and_then(Value::as_str) {
            assert!(!ballast_classes.contains(class), "meta's volume must not use the Ballast class {class}");
        }
    }
}

/// `registry/name:tag` or `name@sha256:...`: a tag that is not `latest`, or a digest.
fn pinned(image: &str) -> bool {
    if let Some((_, digest)) = image.split_once('@') {
        return digest.starts_with("sha256:") && digest.len() == 7 + 64;
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    matches!(last.split_once(':'), Some((name, tag)) if !name.is_empty() && !tag.is_empty() && tag != "latest")
}

/// Every `image` of a container, init container or ephemeral container.
fn images(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Mapping(map) => {
            for (k, child) in map {
                let key = k.as_str().unwrap_or("");
                if matches!(key, "containers" | "initContainers" | "ephemeralContainers") {
                    for c in child.as_sequence().into_iter().flatten() {
                        out.push(c.get("image").and_then(Value::as_str).unwrap_or("").to_string());
                    }
                }
                images(child, out);
            }
        }
        Value::Sequence(items) => items.iter().for_each(|i| images(i, out)),
        _ => {}
    }
}

#[test]
fn every_image_is_pinned() {
    assert!(pinned("registry.k8s.io/sig-storage/csi-resizer:v2.2.0"));
    assert!(pinned("localhost:5000/ballast:0.1.0"));
    assert!(!pinned("localhost:5000/ballast"));
    assert!(!pinned("postgres:latest"));
    assert!(!pinned("postgres"));

    let mut all = Vec::new();
    for o in objects() {
        let mut found = Vec::new();
        images(&o.value, &mut found);
        for image in found {
            assert!(pinned(&image), "{} {}/{}: image {image:?} is not pinned to a tag", o.file, o.kind(), o.name());
            all.push(image);
        }
    }
    assert!(all.iter().any(|i| i.starts_with("ghcr.io/ballast-io/ballast:")), "the ballast image is used");
    // Outside the examples, ballast and the sidecars we build, at those versions.
    let objects = objects();
    let d = find(&objects, "Deployment", "ballast-csi-controller");
    for (name, image) in SIDECARS {
        assert_eq!(container(d, name).get("image").and_then(Value::as_str), Some(*image), "{name} image");
    }
    let mut deployed = Vec::new();
    for o in objects.iter().filter(|o| !o.file.starts_with("examples")) {
        images(&o.value, &mut deployed);
    }
    for image in deployed {
        assert!(
            image.starts_with("ghcr.io/ballast-io/ballast:")
                || SIDECARS.iter().any(|(_, i)| *i == image)
                || image == SNAPSHOT_CONTROLLER,
            "image {image:?} is neither ballast nor a sidecar we build (node-driver-registrar, livenessprobe and \
             kubectl cannot be built here: ballast does their jobs)"
        );
    }
}

/// The long flags `ballast SUBCOMMAND --help` documents; None without such a subcommand.
fn documented_flags(subcommand: &str) -> Option<BTreeSet<String>> {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast"))
        .args([subcommand, "--help"])
        .output()
        .unwrap_or_else(|e| panic!("run ballast {subcommand} --help: {e}"));
    if !out.status.success() {
        return None;
    }
    let flags = String::from_utf8_lossy(&out.stdout)
        .split(|c: char| c.is_whitespace() || matches!(c, ',' | '=' | '<' | '[' | '(' | ')'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .map(String::from)
        .collect();
    Some(flags)
}

#[test]
fn manifests_use_only_flags_the_binary_has() {
    let objects = objects();
    let node = argv(container(find(&objects, "DaemonSet", "ballast-node"), "ballast"));
    let controller = argv(container(find(&objects, "Deployment", "ballast-csi-controller"), "ballast"));
    // The meta member runs `exec ballast meta ...` in a shell.
    let meta: Vec<String> = argv(container(find(&objects, "StatefulSet", "ballast-meta"), "meta"))
        .iter()
        .flat_map(|a| a.split_whitespace().map(String::from))
        .skip_while(|w| w != "ballast")
        .collect();
    let mut missing = Vec::new();
    for args in [node, controller, meta] {
        assert_eq!(args.first().map(String::as_str), Some("ballast"), "{args:?}");
        let subcommand = args.get(1).expect("a subcommand");
        let Some(known) = documented_flags(subcommand) else {
            missing.push(format!("ballast {subcommand} (no such subcommand)"));
            continue;
        };
        for a in args.iter().skip(2).filter(|a| a.starts_with("--")) {
            let name = a.split('=').next().unwrap_or(a);
            if !known.contains(name) {
                missing.push(format!("ballast {subcommand} {name}"));
            }
        }
    }
    assert!(missing.is_empty(), "the manifests pass flags the binary does not have: {missing:?}");
}
