//! A fast hasher for the maps looked up on every request: the client's
//! server table (keyed by address) and the router's table (keyed by packet
//! code).
//!
//! SipHash, the standard library's default, resists hash flooding by
//! peers who choose the keys; here only the application inserts keys (the
//! servers it calls, the codes it routes), and a peer's packet code is only
//! looked up, so a flood would cost at most the probe length of the
//! application's own keys. What matters is the cost per lookup: SipHash
//! took about a tenth of a client IO thread's user time in the callback
//! benchmark. This is the multiply-rotate scheme of Firefox's and rustc's
//! "FxHash": one rotate, xor and multiply per word.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// The multiplier: 2^64 divided by the golden ratio, made odd.
const SEED: u64 = 0x517c_c1b7_2722_0a95;

/// A non-cryptographic hasher: fast for small keys chosen by the
/// application (see the module docs).
#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u8(&mut self, n: u8) {
        self.add(u64::from(n));
    }

    fn write_u16(&mut self, n: u16) {
        self.add(u64::from(n));
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` with [`FastHasher`].
pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::{BuildHasher, Hash};
    use std::net::SocketAddr;

    fn hash_of<T: Hash>(value: &T) -> u64 {
        BuildHasherDefault::<FastHasher>::default().hash_one(value)
    }

    #[test]
    fn equal_keys_hash_alike_and_nearby_keys_differ() {
        let a: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:7001".parse().unwrap();
        let c: SocketAddr = "[::1]:7000".parse().unwrap();
        assert_eq!(hash_of(&a), hash_of(&a.clone()));
        assert_ne!(hash_of(&a), hash_of(&b));
        assert_ne!(hash_of(&a), hash_of(&c));
        // Byte strings of every length up to two words, including partial
        // words: no two of them collide.
        let bytes: Vec<u8> = (1..=16).collect();
        let hashes: std::collections::HashSet<u64> =
            (0..=16).map(|n| hash_of(&&bytes[..n])).collect();
        assert_eq!(hashes.len(), 17);
    }

    #[test]
    fn a_map_finds_what_it_holds() {
        let mut map: FastMap<i32, usize> = FastMap::default();
        for code in -500..500 {
            map.insert(code * 64, code as usize);
        }
        for code in -500..500 {
            assert_eq!(map.get(&(code * 64)), Some(&(code as usize)));
        }
        assert_eq!(map.get(&1), None);
    }
}
