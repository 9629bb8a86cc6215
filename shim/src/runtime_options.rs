//! The runtime options containerd passes in `CreateTaskRequest.options`.
//!
//! For a runtime that is not runc, containerd's CRI plugin sends
//! `runtimeoptions.v1.Options` (`ConfigPath`, and since 1.7 `ConfigBody`)
//! from the runtime's `options` table, and `ctr run --runtime-config-path`
//! sends the same message. The message is not among the crate's generated
//! protos, so its three fields are read off the wire here.

use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::CodedInputStream;

/// Type URL suffix of containerd's `runtimeoptions.v1.Options`.
const TYPE: &str = "runtimeoptions.v1.Options";

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RuntimeOptions {
    pub config_path: String,
    pub config_body: Vec<u8>,
}

/// Reads the options; other option types (e.g. runc's) carry nothing for
/// jevm and give the defaults.
pub fn decode(any: Option<&Any>) -> Result<RuntimeOptions, String> {
    let Some(any) = any else {
        return Ok(RuntimeOptions::default());
    };
    if !any.type_url.ends_with(TYPE) {
        if !any.type_url.is_empty() {
            log::debug!("ignoring runtime options of type {}", any.type_url);
        }
        return Ok(RuntimeOptions::default());
    }
    decode_message(&any.value).map_err(|e| format!("runtime options ({}): {e}", any.type_url))
}

fn decode_message(bytes: &[u8]) -> Result<RuntimeOptions, String> {
    let mut out = RuntimeOptions::default();
    let mut input = CodedInputStream::from_bytes(bytes);
    while !input.eof().map_err(|e| e.to_string())? {
        let tag = input.read_raw_varint32().map_err(|e| e.to_string())?;
        let (field, wire) = (tag >> 3, tag & 7);
        match (field, wire) {
            (2, 2) => out.config_path = input.read_string().map_err(|e| e.to_string())?,
            (3, 2) => out.config_body = input.read_bytes().map_err(|e| e.to_string())?,
            _ => skip(&mut input, wire)?,
        }
    }
    Ok(out)
}

fn skip(input: &mut CodedInputStream, wire: u32) -> Result<(), String> {
    let r = match wire {
        0 => input.read_raw_varint64().map(drop),
        1 => input.read_raw_little_endian64().map(drop),
        2 => input.read_bytes().map(drop),
        5 => input.read_raw_little_endian32().map(drop),
        w => return Err(format!("unsupported wire type {w}")),
    };
    r.map_err(|e| e.to_string())
}

/// Hostile runtime options (protobuf from containerd's config, any bytes):
/// decoded or refused with a message, never a panic.
#[cfg(test)]
mod fuzz {
    use jevm_protocol::fuzzing::mutated;
    use proptest::prelude::*;

    use super::*;

    fn seed() -> Vec<u8> {
        let mut v = Vec::new();
        for (n, s) in [
            (1u8, &b"io.containerd.jevm.v1.Config"[..]),
            (2, b"/etc/jevm/pod.toml"),
            (3, b"vcpus = 2"),
        ] {
            v.push((n << 3) | 2);
            v.push(s.len() as u8);
            v.extend_from_slice(s);
        }
        v
    }

    proptest! {
        #[test]
        fn fuzz_runtime_options_are_decoded_or_refused(value in mutated(vec![seed()], 128)) {
            let any = Any {
                type_url: TYPE.into(),
                value,
                ..Default::default()
            };
            if let Err(e) = decode(Some(&any)) {
                prop_assert!(e.starts_with("runtime options ("), "{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u8, s: &[u8]) -> Vec<u8> {
        let mut v = vec![(n << 3) | 2, s.len() as u8];
        v.extend_from_slice(s);
        v
    }

    #[test]
    fn reads_config_path_and_body_and_skips_type_url() {
        let mut value = field(1, b"io.containerd.jevm.v1.Config");
        value.extend(field(2, b"/etc/jevm/pod.toml"));
        value.extend(field(3, b"vcpus = 2"));
        let any = Any {
            type_url: "runtimeoptions.v1.Options".into(),
            value,
            ..Default::default()
        };
        let o = decode(Some(&any)).unwrap();
        assert_eq!(o.config_path, "/etc/jevm/pod.toml");
        assert_eq!(o.config_body, b"vcpus = 2");
    }

    #[test]
    fn other_option_types_and_none_are_empty() {
        assert_eq!(decode(None).unwrap(), RuntimeOptions::default());
        let any = Any {
            type_url: "containerd.runc.v1.Options".into(),
            value: vec![0xff, 0xff],
            ..Default::default()
        };
        assert_eq!(decode(Some(&any)).unwrap(), RuntimeOptions::default());
    }

    #[test]
    fn truncated_message_is_an_error_not_a_panic() {
        let any = Any {
            type_url: "type.googleapis.com/runtimeoptions.v1.Options".into(),
            value: vec![0x12, 0x40, b'/'],
            ..Default::default()
        };
        assert!(decode(Some(&any)).is_err());
    }
}
