//! Inputs for the property-based fuzz tests of every crate: valid seeds
//! with bytes replaced, inserted and cut, and plain noise. A parser meets
//! both what is almost right (deep paths) and what is nothing like it.

use proptest::prelude::*;

/// One of `seeds`, with up to 8 edits, or up to `noise` random bytes.
pub fn mutated(seeds: Vec<Vec<u8>>, noise: usize) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    let edited = (
        0..n.max(1),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut f = seeds.get(i).cloned().unwrap_or_default();
            for (at, byte, op) in edits {
                let at = at % (f.len() + 1);
                match op {
                    0 if at < f.len() => f[at] = byte,
                    1 => f.insert(at, byte),
                    _ => f.truncate(at),
                }
            }
            f
        });
    prop_oneof![3 => edited, 1 => proptest::collection::vec(any::<u8>(), 0..noise)]
}
