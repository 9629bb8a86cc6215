//! Hostile frames, both ways: the host parses what a guest sends (replies,
//! events, READY), the agent parses what arrives on its port (requests).
//! Whatever the bytes, `read_frame` returns a value or a typed error, never
//! panics and never allocates past [`MAX_FRAME`]; a value it accepts
//! survives being written and read again unchanged.
//!
//! Cases per property: proptest's `PROPTEST_CASES` (`make test` runs a few
//! hundred; `hack/fuzz` millions).

use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;

/// Valid frames to start mutating from: every shape a parser meets.
fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut push = |v: &dyn erased::Encode| out.push(v.frame());
    push(&Response::Version {
        agent_version: "1".into(),
        protocol_version: PROTOCOL_VERSION,
    });
    push(&Response::Error {
        message: "container \"c\": no such file".into(),
        kind: ErrorKind::NotFound,
    });
    push(&Response::Created {
        pid: 7,
        times: None,
    });
    push(&Response::Created {
        pid: 8,
        times: Some(CreateTimes {
            cgroup_us: 1,
            total_us: 9,
            ..Default::default()
        }),
    });
    push(&Response::Bytes(vec![0, 255, 10]));
    push(&Event::Exited {
        container_id: "c".into(),
        exec_id: Some("e".into()),
        pid: 1,
        exit_status: 137,
        exited_at_ns: 1,
    });
    push(&Event::Oom {
        container_id: "c".into(),
    });
    push(&Request::Ping { nonce: 3 });
    push(&Request::Events);
    out
}

mod erased {
    pub trait Encode {
        fn frame(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Encode for T {
        fn frame(&self) -> Vec<u8> {
            let mut b = Vec::new();
            super::write_frame(&mut b, self).unwrap();
            b
        }
    }
}

/// A seed with some bytes replaced, inserted or cut, or plain noise, or a
/// plausible length prefix in front of noise (it reaches the JSON parser).
fn hostile_frame() -> impl Strategy<Value = Vec<u8>> {
    let framed_noise = proptest::collection::vec(any::<u8>(), 0..256).prop_map(|body| {
        let mut f = (body.len() as u32).to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        f
    });
    prop_oneof![crate::fuzzing::mutated(seeds(), 256), framed_noise]
}

/// Parses `bytes` as a `T` frame; what it accepts must round-trip.
fn parse<T>(bytes: &[u8]) -> Result<(), TestCaseError>
where
    T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut r = bytes;
    if let Ok(v) = read_frame::<_, T>(&mut r) {
        let mut again = Vec::new();
        write_frame(&mut again, &v).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let back: T = read_frame(&mut again.as_slice())
            .map_err(|e| TestCaseError::fail(format!("re-read: {e}")))?;
        prop_assert_eq!(back, v);
    }
    Ok(())
}

proptest! {
    #[test]
    fn fuzz_host_parses_hostile_replies_events_and_ready(bytes in hostile_frame()) {
        parse::<Response>(&bytes)?;
        parse::<Event>(&bytes)?;
        parse::<Ready>(&bytes)?;
    }

    #[test]
    fn fuzz_agent_parses_hostile_requests(bytes in hostile_frame()) {
        parse::<Request>(&bytes)?;
    }

    /// A length prefix up to 4 GiB with a short body: refused or cut short,
    /// never a giant allocation (the limit is checked first).
    #[test]
    fn fuzz_length_prefix_is_checked_before_reading(len in any::<u32>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut f = len.to_be_bytes().to_vec();
        f.extend_from_slice(&body);
        let r = read_frame::<_, Response>(&mut f.as_slice());
        if len > MAX_FRAME {
            prop_assert!(matches!(r, Err(FrameError::TooLarge(n)) if n == len));
        } else if len as usize > body.len() {
            prop_assert!(matches!(r, Err(FrameError::Io(_))));
        }
    }
}
