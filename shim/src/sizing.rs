//! How big a pod's VM is, and whether a container fits in it.
//!
//! The runtime config gives every pod's VM its size (`vcpus`,
//! `memory_mib`); a pod may ask for another with annotations on its
//! sandbox, which containerd's CRI plugin passes on only when the runtime's
//! `pod_annotations` lists them (`hack/install` lists `io.jevm.vm.*`). The
//! size is part of the template key, so each size has its own template,
//! built the first time a pod asks for it.
//!
//! A VM's size is fixed for its life (no hotplug): a container whose memory
//! limit is above the VM's memory, or whose CPU limit is above its vCPUs,
//! could never get what it asks for, so it is refused at create with the
//! annotation that would make it fit.

use serde_json::Value;

use crate::config::JevmConfig;

/// Pod annotation: the VM's vCPU count.
pub const VCPUS: &str = "io.jevm.vm.vcpus";
/// Pod annotation: the VM's memory in MiB.
pub const MEMORY_MIB: &str = "io.jevm.vm.memory_mib";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmSize {
    pub vcpus: u8,
    pub memory_mib: u32,
}

impl std::fmt::Display for VmSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} vCPU, {} MiB", self.vcpus, self.memory_mib)
    }
}

fn annotation<'a>(spec: &'a Value, key: &str) -> Option<&'a str> {
    spec.get("annotations")?.get(key)?.as_str()
}

/// The size of the VM a pod's first container starts: the config's, with
/// the pod's annotations, checked against the config's limits.
pub fn vm_size(cfg: &JevmConfig, spec: &Value, pod: &str) -> Result<VmSize, String> {
    let mut size = VmSize {
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
    };
    let max_vcpus = cfg.max_vcpus();
    if let Some(v) = annotation(spec, VCPUS) {
        size.vcpus = v
            .trim()
            .parse::<u8>()
            .ok()
            .filter(|n| (1..=max_vcpus).contains(n))
            .ok_or_else(|| {
                format!(
                    "pod {pod:?}: annotation {VCPUS}={v:?} is not a vCPU count in 1..={max_vcpus} \
                     (max_vcpus of the jevm config)"
                )
            })?;
    }
    let (min_mib, max_mib) = (crate::config::MIN_MEMORY_MIB, cfg.max_memory_mib());
    if let Some(v) = annotation(spec, MEMORY_MIB) {
        size.memory_mib = v
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (min_mib..=max_mib).contains(n))
            .ok_or_else(|| {
                format!(
                    "pod {pod:?}: annotation {MEMORY_MIB}={v:?} is not a size in \
                     {min_mib}..={max_mib} MiB (max_memory_mib of the jevm config)"
                )
            })?;
    }
    Ok(size)
}

/// Refuses a container whose memory or CPU limit its pod's VM can never
/// give it.
pub fn check_fits(size: VmSize, spec: &Value, cid: &str) -> Result<(), String> {
    let resources = spec.get("linux").and_then(|l| l.get("resources"));
    let memory = resources
        .and_then(|r| r.get("memory"))
        .and_then(|m| m.get("limit"))
        .and_then(Value::as_i64)
        .filter(|l| *l > 0);
    let vm_bytes = i64::from(size.memory_mib) << 20;
    if let Some(limit) = memory.filter(|l| *l > vm_bytes) {
        return Err(format!(
            "container {cid:?}: memory limit {} MiB exceeds its pod's VM ({size}); \
             give the pod a bigger VM with the annotation {MEMORY_MIB}, or raise memory_mib \
             in the jevm config",
            (limit as u64).div_ceil(1 << 20)
        ));
    }
    let cpu = resources.and_then(|r| r.get("cpu"));
    let quota = cpu
        .and_then(|c| c.get("quota"))
        .and_then(Value::as_i64)
        .filter(|q| *q > 0);
    let period = cpu
        .and_then(|c| c.get("period"))
        .and_then(Value::as_u64)
        .filter(|p| *p > 0)
        .unwrap_or(100_000);
    if let Some(quota) = quota {
        // Whole CPUs, rounded up: a 1.5-CPU limit needs 2 vCPUs.
        let cpus = (quota as u64).div_ceil(period);
        if cpus > u64::from(size.vcpus) {
            return Err(format!(
                "container {cid:?}: CPU limit {:.2} CPUs exceeds its pod's VM ({size}); give \
                 the pod more vCPUs with the annotation {VCPUS}, or raise vcpus in the jevm config",
                quota as f64 / period as f64
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg() -> JevmConfig {
        JevmConfig {
            vcpus: 1,
            memory_mib: 256,
            max_vcpus: Some(4),
            max_memory_mib: Some(2048),
            ..JevmConfig::default()
        }
    }

    fn annotated(vcpus: Option<&str>, mem: Option<&str>) -> Value {
        let mut a = serde_json::Map::new();
        if let Some(v) = vcpus {
            a.insert(VCPUS.into(), v.into());
        }
        if let Some(m) = mem {
            a.insert(MEMORY_MIB.into(), m.into());
        }
        json!({ "annotations": a })
    }

    #[test]
    fn the_config_size_is_used_unless_the_pod_asks_for_another() {
        let c = cfg();
        assert_eq!(
            vm_size(&c, &json!({}), "p").unwrap(),
            VmSize {
                vcpus: 1,
                memory_mib: 256
            }
        );
        assert_eq!(
            vm_size(&c, &annotated(Some("2"), Some("1024")), "p").unwrap(),
            VmSize {
                vcpus: 2,
                memory_mib: 1024
            }
        );
    }

    #[test]
    fn sizes_outside_the_configured_limits_are_refused_naming_the_annotation() {
        let c = cfg();
        for (v, m, key) in [
            (Some("0"), None, VCPUS),
            (Some("5"), None, VCPUS),
            (Some("two"), None, VCPUS),
            (None, Some("4096"), MEMORY_MIB),
            (None, Some("16"), MEMORY_MIB),
            (None, Some("-1"), MEMORY_MIB),
        ] {
            let e = vm_size(&c, &annotated(v, m), "p").unwrap_err();
            assert!(e.contains(key) && e.contains("pod \"p\""), "{e}");
        }
    }

    #[test]
    fn a_memory_limit_above_the_vm_is_refused_and_one_that_fits_passes() {
        let size = VmSize {
            vcpus: 1,
            memory_mib: 256,
        };
        let spec = |limit: i64| json!({"linux": {"resources": {"memory": {"limit": limit}}}});
        assert_eq!(check_fits(size, &spec(256 << 20), "c"), Ok(()));
        let e = check_fits(size, &spec(512 << 20), "c").unwrap_err();
        assert!(
            e.starts_with(
                "container \"c\": memory limit 512 MiB exceeds its pod's VM (1 vCPU, 256 MiB)"
            ),
            "{e}"
        );
        assert!(e.contains(MEMORY_MIB), "{e}");
        // No limit at all is fine.
        assert_eq!(check_fits(size, &json!({}), "c"), Ok(()));
    }

    #[test]
    fn a_cpu_limit_above_the_vcpus_is_refused_rounding_up() {
        let size = VmSize {
            vcpus: 2,
            memory_mib: 256,
        };
        let spec = |quota: i64| json!({"linux": {"resources": {"cpu": {"quota": quota, "period": 100000}}}});
        assert_eq!(check_fits(size, &spec(200_000), "c"), Ok(()));
        let e = check_fits(size, &spec(250_000), "c").unwrap_err();
        assert!(
            e.contains("CPU limit 2.50 CPUs") && e.contains(VCPUS),
            "{e}"
        );
        // -1 is "no limit".
        assert_eq!(check_fits(size, &spec(-1), "c"), Ok(()));
    }
}
