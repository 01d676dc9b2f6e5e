//! argon2id verification with reusable working memory.
//!
//! Each verification needs `m_cost` KiB (19 MiB at the crate's default cost). Allocated per
//! call, those blocks end up cached by the allocator in per-thread arenas, so a few hundred
//! logins spread over the blocking pool's threads left hundreds of MiB resident. Here at most
//! `verify_concurrency` buffers exist and are reused, and the comparison of the result is
//! constant-time (`password_hash::Output`).

use std::sync::{Arc, Mutex};

use argon2::password_hash::{Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Reusable argon2 block buffers.
#[derive(Debug, Default, Clone)]
pub struct BlockPool {
    free: Arc<Mutex<Vec<Vec<Block>>>>,
}

impl BlockPool {
    /// Checks `password` against a PHC string; false for a mismatch or a hash it cannot read.
    /// Blocking: call it on the blocking pool.
    pub fn verify(&self, password: &str, phc: &str) -> bool {
        let Ok(hash) = PasswordHash::new(phc) else {
            return false;
        };
        let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else {
            return false;
        };
        let Ok(algorithm) = Algorithm::try_from(hash.algorithm) else {
            return false;
        };
        let version = match hash.version.map(Version::try_from) {
            None => Version::default(),
            Some(Ok(v)) => v,
            Some(Err(_)) => return false,
        };
        let Ok(params) = Params::try_from(&hash) else {
            return false;
        };
        let mut salt_buf = [0u8; 64];
        let Ok(salt) = salt.decode_b64(&mut salt_buf) else {
            return false;
        };

        let mut blocks = self.take(params.block_count());
        let mut out = vec![0u8; expected.len()];
        let argon = Argon2::new(algorithm, version, params);
        let computed =
            argon.hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks);
        self.give_back(blocks);
        computed.is_ok() && Output::new(&out).is_ok_and(|o| o == expected)
    }

    fn take(&self, count: usize) -> Vec<Block> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut blocks = reused.unwrap_or_default();
        // Every block is overwritten by the hash function, so old contents do not matter.
        blocks.resize(count, Block::default());
        blocks
    }

    fn give_back(&self, blocks: Vec<Block>) {
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_like_the_crate_and_reuses_memory() {
        let pool = BlockPool::default();
        let phc = crate::auth::hash_password("correct horse").unwrap();
        assert!(pool.verify("correct horse", &phc));
        assert!(!pool.verify("wrong horse", &phc));
        assert!(!pool.verify("correct horse", "$argon2id$v=19$garbage"));
        assert!(!pool.verify("correct horse", "not a phc string"));
        assert_eq!(pool.free.lock().unwrap().len(), 1, "one buffer, reused");
        // Hashes with other costs still verify (the buffer is resized).
        let cheap = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(1024, 1, 1, None).unwrap(),
        );
        use argon2::password_hash::{PasswordHasher, SaltString};
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let phc = cheap.hash_password(b"pw", &salt).unwrap().to_string();
        assert!(pool.verify("pw", &phc));
        assert!(!pool.verify("px", &phc));
    }
}
