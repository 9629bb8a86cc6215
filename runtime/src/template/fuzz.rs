//! Hostile template files: a manifest or key that was edited, truncated or
//! replaced parses to a typed error naming the file, never a panic; what
//! parses carries this jevm's versions (anything else is `Foreign`).

use std::path::Path;

use jevm_protocol::fuzzing::mutated;
use proptest::prelude::*;

use super::store::parse_manifest;
use super::*;

fn manifest_seed() -> Vec<u8> {
    let spec = TemplateSpec {
        kernel: "/usr/share/jevm/vmlinux".into(),
        initrd: "/usr/share/jevm/initramfs.cpio.gz".into(),
        cmdline: "console=ttyS0".into(),
        vcpus: 1,
        mem_mib: 256,
    };
    let m = Manifest {
        format_version: TEMPLATE_FORMAT_VERSION,
        jevm_version: JEVM_VERSION.into(),
        key: TemplateKey::parse(&"ab".repeat(KEY_HEX_LEN / 2)).unwrap(),
        spec,
        kernel_sha256: "00".repeat(32),
        initrd_sha256: "11".repeat(32),
        created_unix_secs: 1,
        memory_len: 256 << 20,
        memory_sha256: "22".repeat(32),
        state_len: 10,
        state_sha256: "33".repeat(32),
    };
    serde_json::to_vec_pretty(&m).unwrap()
}

proptest! {
    #[test]
    fn fuzz_template_manifest_is_parsed_or_refused_naming_the_file(
        bytes in mutated(vec![manifest_seed()], 512),
    ) {
        let path = Path::new("/templates/k/manifest.json");
        match parse_manifest(path, &bytes) {
            Ok(m) => {
                prop_assert_eq!(m.format_version, TEMPLATE_FORMAT_VERSION);
                prop_assert_eq!(m.jevm_version.as_str(), JEVM_VERSION);
            }
            Err(e) => {
                prop_assert!(e.is_invalid_template(), "{e}");
                prop_assert!(e.to_string().contains("manifest.json"), "{e}");
            }
        }
    }

    #[test]
    fn fuzz_template_key_parse(s in "\\PC{0,80}|[0-9a-f]{30,34}") {
        if let Ok(k) = TemplateKey::parse(&s) {
            prop_assert_eq!(k.as_str(), s.as_str());
        }
    }
}
