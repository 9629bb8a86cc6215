//! Turning the bundle's OCI spec (host view) into the spec the agent gets
//! (guest view), and reading the pod a container belongs to.
//!
//! The spec is handled as JSON, not as typed `oci-spec` structs, so every
//! field the shim does not rewrite reaches the agent exactly as containerd
//! wrote it.

use std::path::{Path, PathBuf};

use jevm_runtime::vmm::devices::fs::{DeviceKind, DeviceRule};
use serde_json::Value;

use crate::layout::{guest_mount, guest_rootfs};

/// CRI annotation naming the pod sandbox a container belongs to.
pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
/// CRI annotation: `sandbox` for the pod's sandbox (pause) container,
/// `container` for the others.
pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?
        .get(key)?
        .as_str()
        .filter(|s| !s.is_empty())
}

/// The pod a container belongs to: its CRI sandbox, or itself (`ctr run`).
pub fn pod_id(spec: &Value, cid: &str) -> String {
    annotation(spec, SANDBOX_ID).unwrap_or(cid).to_string()
}

/// Whether the container starts its pod (a CRI sandbox or a plain
/// container), as opposed to joining its sandbox's namespaces.
pub fn starts_pod(spec: &Value, cid: &str) -> bool {
    match annotation(spec, CONTAINER_TYPE) {
        Some("sandbox") => true,
        Some(_) => pod_id(spec, cid) == cid,
        None => true,
    }
}

/// The namespaces a CRI pod may take from the node (hostNetwork, hostPID,
/// hostIPC): the sandbox spec then has no entry of that type.
const NODE_SHAREABLE: [(&str, &str); 3] = [
    ("network", "hostNetwork"),
    ("pid", "hostPID"),
    ("ipc", "hostIPC"),
];

fn namespace<'a>(spec: &'a Value, kind: &str) -> Option<&'a Value> {
    spec.get("linux")?
        .get("namespaces")?
        .as_array()?
        .iter()
        .find(|n| n.get("type").and_then(Value::as_str) == Some(kind))
}

/// A CRI sandbox asking for one of the node's namespaces cannot run in a
/// VM: its processes would be in the guest's, not the node's. Refused, the
/// way Kata Containers refuses it, with the pod field named.
pub fn refuse_node_namespaces(spec: &Value, cid: &str) -> Result<(), String> {
    if annotation(spec, CONTAINER_TYPE) != Some("sandbox") {
        return Ok(());
    }
    let shared: Vec<&str> = NODE_SHAREABLE
        .iter()
        .filter(|(kind, _)| namespace(spec, kind).is_none())
        .map(|(_, field)| *field)
        .collect();
    if shared.is_empty() {
        return Ok(());
    }
    Err(format!(
        "pod sandbox {cid:?}: {} {} not supported by jevm: the pod runs in its own VM and \
         cannot share the node's {} namespace{}",
        shared.join(", "),
        if shared.len() > 1 { "are" } else { "is" },
        NODE_SHAREABLE
            .iter()
            .filter(|(_, f)| shared.contains(f))
            .map(|(k, _)| *k)
            .collect::<Vec<_>>()
            .join(", "),
        if shared.len() > 1 { "s" } else { "" }
    ))
}

/// The host network namespace a container's spec joins by path: for a CRI
/// sandbox, the one containerd made and ran the CNI plugins in.
pub fn network_namespace_path(spec: &Value) -> Option<PathBuf> {
    namespace(spec, "network")?
        .get("path")?
        .as_str()
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
}

/// For the first container of a pod whose VM carries the pod's network:
/// no network namespace of its own in the guest, so it (and every
/// container that joins it) runs where the guest interface is.
pub fn use_vm_network(spec: &mut Value) {
    if let Some(list) = spec
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        list.retain(|n| n.get("type").and_then(Value::as_str) != Some("network"));
    }
}

/// The device cgroup rules of `linux.resources.devices`, which also say
/// what device nodes the container may create in the share. A rule the
/// device cgroup could not read either (a type other than `a`, `c`, `b`; a
/// negative or out-of-range number other than -1) is refused, naming it.
pub fn device_rules(spec: &Value) -> Result<Vec<DeviceRule>, String> {
    let Some(list) = spec
        .get("linux")
        .and_then(|l| l.get("resources"))
        .and_then(|r| r.get("devices"))
    else {
        return Ok(Vec::new());
    };
    let list = list
        .as_array()
        .ok_or("linux.resources.devices is not a list")?;
    list.iter()
        .enumerate()
        .map(|(i, d)| {
            let bad = |what: &str| format!("linux.resources.devices[{i}]: {what}: {d}");
            let kind = match d.get("type").and_then(Value::as_str).unwrap_or("a") {
                "a" => DeviceKind::All,
                "c" => DeviceKind::Char,
                "b" => DeviceKind::Block,
                _ => return Err(bad("type is not a, c or b")),
            };
            let number = |key: &str| -> Result<Option<u32>, String> {
                match d.get(key) {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => match v.as_i64() {
                        Some(-1) => Ok(None),
                        Some(n) => u32::try_from(n)
                            .map(Some)
                            .map_err(|_| bad(&format!("{key} out of range"))),
                        None => Err(bad(&format!("{key} is not a number"))),
                    },
                }
            };
            Ok(DeviceRule {
                allow: d.get("allow").and_then(Value::as_bool).unwrap_or(false),
                kind,
                major: number("major")?,
                minor: number("minor")?,
                // Without an access string a denial covers mknod and a grant
                // does not: the share is the host's to protect.
                mknod: match d.get("access").and_then(Value::as_str) {
                    Some(a) => a.contains('m'),
                    None => !d.get("allow").and_then(Value::as_bool).unwrap_or(false),
                },
            })
        })
        .collect()
}

/// An OCI bind mount whose host source the shim binds into the share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBind {
    /// Index in the container's `mounts/` directory.
    pub index: usize,
    pub source: PathBuf,
    pub readonly: bool,
    pub recursive: bool,
}

/// How a container's namespaces relate to its pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Namespaces {
    /// New namespaces in the guest: host paths are dropped.
    Own,
    /// Join the sandbox container, guest PID `pid`, for the namespaces the
    /// host spec joins by path (user, network, ipc, uts, pid). The agent
    /// orders the joins (user namespace included) as runc does.
    JoinSandbox { pid: u32 },
}

/// The `/proc/<pid>/ns/` file of an OCI namespace type.
fn ns_file(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "user" => "user",
        "network" => "net",
        "ipc" => "ipc",
        "uts" => "uts",
        "pid" => "pid",
        _ => return None,
    })
}

fn is_bind(mount: &Value) -> bool {
    mount.get("type").and_then(Value::as_str) == Some("bind")
        || options(mount).any(|o| o == "bind" || o == "rbind")
}

fn options(mount: &Value) -> impl Iterator<Item = &str> {
    mount
        .get("options")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
}

/// Rewrites `spec` for the guest and returns the bind mounts the host must
/// make: `root.path` becomes the guest rootfs, each bind mount's source the
/// guest path of its `mounts/<n>`, namespace paths are dropped or pointed
/// at the sandbox, and hooks (host binaries) are removed. Relative bind
/// sources are relative to `bundle`, as in runc.
pub fn rewrite(
    spec: &mut Value,
    cid: &str,
    bundle: &Path,
    ns: Namespaces,
) -> Result<Vec<HostBind>, String> {
    let obj = spec
        .as_object_mut()
        .ok_or("the OCI spec is not a JSON object")?;

    let root = obj
        .entry("root")
        .or_insert_with(|| Value::Object(Default::default()));
    let root = root.as_object_mut().ok_or("spec root is not an object")?;
    root.insert("path".into(), Value::String(guest_rootfs(cid)));

    let mut binds = Vec::new();
    if let Some(mounts) = obj.get_mut("mounts") {
        let mounts = mounts.as_array_mut().ok_or("spec mounts is not an array")?;
        for m in mounts.iter_mut() {
            if !is_bind(m) {
                continue;
            }
            let dest = m.get("destination").and_then(Value::as_str).unwrap_or("?");
            let source = m
                .get("source")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("bind mount on {dest:?} has no source"))?;
            let source = if Path::new(source).is_absolute() {
                PathBuf::from(source)
            } else {
                bundle.join(source)
            };
            let bind = HostBind {
                index: binds.len(),
                source,
                readonly: options(m).any(|o| o == "ro"),
                recursive: options(m).any(|o| o == "rbind"),
            };
            m["source"] = Value::String(guest_mount(cid, bind.index));
            binds.push(bind);
        }
    }

    if let Some(list) = obj
        .get_mut("linux")
        .and_then(|l| l.get_mut("namespaces"))
        .and_then(Value::as_array_mut)
    {
        for n in list.iter_mut() {
            let Some(n) = n.as_object_mut() else { continue };
            if !n.contains_key("path") {
                continue;
            }
            let kind = n.get("type").and_then(Value::as_str).unwrap_or("");
            match (ns, ns_file(kind)) {
                (Namespaces::JoinSandbox { pid }, Some(file)) => {
                    n.insert(
                        "path".into(),
                        Value::String(format!("/proc/{pid}/ns/{file}")),
                    );
                }
                _ => {
                    log::debug!(
                        "container {cid}: {kind} namespace path dropped (a new one in the guest)"
                    );
                    n.remove("path");
                }
            }
        }
    }

    if obj.remove("hooks").is_some() {
        log::warn!("container {cid}: OCI hooks name host binaries and are not run in the guest");
    }
    Ok(binds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_rules_read_as_the_device_cgroup_reads_them() {
        let spec = serde_json::json!({"linux": {"resources": {"devices": [
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
            {"allow": true, "type": "c", "major": 136, "access": "rw"},
            {"allow": true, "type": "b", "major": -1, "minor": null, "access": "m"},
            {"allow": true, "type": "b"},
        ]}}});
        let rules = device_rules(&spec).unwrap();
        let r = |allow, kind, major, minor, mknod| DeviceRule {
            allow,
            kind,
            major,
            minor,
            mknod,
        };
        assert_eq!(
            rules,
            vec![
                r(false, DeviceKind::All, None, None, true),
                r(true, DeviceKind::Char, Some(1), Some(3), true),
                r(true, DeviceKind::Char, Some(136), None, false),
                r(true, DeviceKind::Block, None, None, true),
                r(true, DeviceKind::Block, None, None, false),
            ]
        );
        assert_eq!(device_rules(&serde_json::json!({})).unwrap(), vec![]);
    }

    #[test]
    fn a_device_rule_the_cgroup_could_not_read_is_refused_naming_it() {
        for bad in [
            serde_json::json!({"type": "x", "allow": true}),
            serde_json::json!({"type": "c", "major": -2}),
            serde_json::json!({"type": "c", "minor": "3"}),
            serde_json::json!({"type": "c", "major": 5_000_000_000_i64}),
        ] {
            let spec = serde_json::json!({"linux": {"resources": {"devices": [bad]}}});
            let e = device_rules(&spec).unwrap_err();
            assert!(e.contains("linux.resources.devices[0]"), "{e}");
        }
        let spec = serde_json::json!({"linux": {"resources": {"devices": {}}}});
        assert!(device_rules(&spec).is_err());
    }
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "ociVersion": "1.0.2",
            "process": {"args": ["sh"], "cwd": "/"},
            "root": {"path": "rootfs", "readonly": true},
            "hostname": "h",
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/data", "type": "bind", "source": "/srv/data",
                 "options": ["rbind", "ro"]},
                {"destination": "/etc/hosts", "source": "/var/lib/x/hosts",
                 "options": ["bind", "rw"]},
                {"destination": "/cfg", "type": "none", "source": "cfg", "options": ["bind"]}
            ],
            "hooks": {"prestart": [{"path": "/usr/bin/nvidia-hook"}]},
            "linux": {"namespaces": [
                {"type": "pid"},
                {"type": "network", "path": "/var/run/netns/cni-1234"},
                {"type": "ipc", "path": "/proc/4242/ns/ipc"},
                {"type": "uts", "path": "/proc/4242/ns/uts"},
                {"type": "user", "path": "/proc/4242/ns/user"},
                {"type": "mount"}
            ],
            "uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
            "gidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}]},
            "annotations": {"x": "y"},
            "futureField": {"kept": true}
        })
    }

    #[test]
    fn root_and_bind_sources_become_guest_paths() {
        let mut s = sample();
        let binds = rewrite(&mut s, "c1", Path::new("/b"), Namespaces::Own).unwrap();
        assert_eq!(
            s["root"],
            json!({"path": "/run/jevm/shared/c1/rootfs", "readonly": true})
        );
        assert_eq!(s["mounts"][0]["source"], "proc");
        assert_eq!(s["mounts"][1]["source"], "/run/jevm/shared/c1/mounts/0");
        assert_eq!(s["mounts"][2]["source"], "/run/jevm/shared/c1/mounts/1");
        assert_eq!(s["mounts"][3]["source"], "/run/jevm/shared/c1/mounts/2");
        // Options stay, so the guest applies ro too.
        assert_eq!(s["mounts"][1]["options"], json!(["rbind", "ro"]));
        assert_eq!(
            binds,
            vec![
                HostBind {
                    index: 0,
                    source: "/srv/data".into(),
                    readonly: true,
                    recursive: true
                },
                HostBind {
                    index: 1,
                    source: "/var/lib/x/hosts".into(),
                    readonly: false,
                    recursive: false
                },
                HostBind {
                    index: 2,
                    source: "/b/cfg".into(),
                    readonly: false,
                    recursive: false
                },
            ]
        );
    }

    #[test]
    fn untouched_fields_survive_and_hooks_go() {
        let mut s = sample();
        rewrite(&mut s, "c1", Path::new("/b"), Namespaces::Own).unwrap();
        assert_eq!(s["futureField"], json!({"kept": true}));
        assert_eq!(s["process"], sample()["process"]);
        assert_eq!(s["annotations"], json!({"x": "y"}));
        assert!(s.get("hooks").is_none());
    }

    #[test]
    fn own_pod_drops_namespace_paths() {
        let mut s = sample();
        rewrite(&mut s, "c1", Path::new("/b"), Namespaces::Own).unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                   {"type": "uts"}, {"type": "user"}, {"type": "mount"}])
        );
        // A new user namespace in the guest needs the mappings: kept.
        assert_eq!(s["linux"]["uidMappings"], sample()["linux"]["uidMappings"]);
        assert_eq!(s["linux"]["gidMappings"], sample()["linux"]["gidMappings"]);
    }

    #[test]
    fn pod_member_joins_the_sandbox_namespaces_in_the_guest() {
        let mut s = sample();
        rewrite(
            &mut s,
            "c2",
            Path::new("/b"),
            Namespaces::JoinSandbox { pid: 7 },
        )
        .unwrap();
        assert_eq!(
            s["linux"]["namespaces"],
            json!([{"type": "pid"},
                   {"type": "network", "path": "/proc/7/ns/net"},
                   {"type": "ipc", "path": "/proc/7/ns/ipc"},
                   {"type": "uts", "path": "/proc/7/ns/uts"},
                   {"type": "user", "path": "/proc/7/ns/user"},
                   {"type": "mount"}])
        );
    }

    #[test]
    fn missing_root_is_added_and_bad_shapes_are_errors() {
        let mut s = json!({"process": {}});
        rewrite(&mut s, "c", Path::new("/b"), Namespaces::Own).unwrap();
        assert_eq!(s["root"]["path"], "/run/jevm/shared/c/rootfs");
        assert!(rewrite(&mut json!([]), "c", Path::new("/b"), Namespaces::Own).is_err());
        let mut s = json!({"mounts": {"a": 1}});
        assert!(rewrite(&mut s, "c", Path::new("/b"), Namespaces::Own).is_err());
        let mut s = json!({"mounts": [{"destination": "/x", "type": "bind"}]});
        let e = rewrite(&mut s, "c", Path::new("/b"), Namespaces::Own).unwrap_err();
        assert!(e.contains("/x") && e.contains("no source"), "{e}");
    }

    #[test]
    fn pod_membership_follows_the_cri_annotations() {
        let plain = json!({});
        assert_eq!(pod_id(&plain, "c1"), "c1");
        assert!(starts_pod(&plain, "c1"));
        let sandbox = json!({"annotations": {SANDBOX_ID: "s1", CONTAINER_TYPE: "sandbox"}});
        assert_eq!(pod_id(&sandbox, "s1"), "s1");
        assert!(starts_pod(&sandbox, "s1"));
        let member = json!({"annotations": {SANDBOX_ID: "s1", CONTAINER_TYPE: "container"}});
        assert_eq!(pod_id(&member, "c2"), "s1");
        assert!(!starts_pod(&member, "c2"));
    }

    fn sandbox_with(namespaces: &[&str]) -> Value {
        let ns: Vec<Value> = namespaces
            .iter()
            .map(|t| json!({"type": t, "path": format!("/var/run/netns/{t}")}))
            .collect();
        json!({
            "annotations": {SANDBOX_ID: "s1", CONTAINER_TYPE: "sandbox"},
            "linux": {"namespaces": ns},
        })
    }

    #[test]
    fn a_sandbox_on_the_nodes_network_is_refused_naming_host_network() {
        let s = sandbox_with(&["pid", "ipc", "uts", "mount"]);
        let e = refuse_node_namespaces(&s, "s1").unwrap_err();
        assert!(e.contains("hostNetwork"), "{e}");
        assert!(e.contains("own VM"), "{e}");
        assert!(e.contains("network namespace"), "{e}");
        assert!(!e.contains("hostPID"), "{e}");
    }

    #[test]
    fn host_pid_and_ipc_are_refused_together() {
        let s = sandbox_with(&["network", "uts", "mount"]);
        let e = refuse_node_namespaces(&s, "s1").unwrap_err();
        assert!(e.contains("hostPID, hostIPC"), "{e}");
        assert!(e.contains("pid, ipc namespaces"), "{e}");
    }

    #[test]
    fn a_pod_sandbox_with_its_own_namespaces_and_plain_containers_pass() {
        let s = sandbox_with(&["network", "pid", "ipc", "uts", "mount"]);
        assert_eq!(refuse_node_namespaces(&s, "s1"), Ok(()));
        // `ctr run --net-host` is not a pod: nothing to refuse here.
        let plain = json!({"linux": {"namespaces": [{"type": "mount"}]}});
        assert_eq!(refuse_node_namespaces(&plain, "c1"), Ok(()));
    }

    #[test]
    fn the_network_namespace_path_is_read_and_dropped_for_the_vm_network() {
        let mut s = sandbox_with(&["network", "pid"]);
        assert_eq!(
            network_namespace_path(&s),
            Some(PathBuf::from("/var/run/netns/network"))
        );
        use_vm_network(&mut s);
        assert_eq!(network_namespace_path(&s), None);
        assert_eq!(s["linux"]["namespaces"].as_array().unwrap().len(), 1);
        let no_path = json!({"linux": {"namespaces": [{"type": "network"}]}});
        assert_eq!(network_namespace_path(&no_path), None);
    }
}
