//! Keys, the mutual challenge-response, and the per-connection tags.
//!
//! Both sides hold a 32-byte pre-shared key (PSK). The client sends a fresh
//! nonce in `HELLO`; the server answers with its own fresh nonce and a proof
//! `keyed_blake3(PSK, "server" || transcript)`; the client checks it and
//! answers `keyed_blake3(PSK, "client" || transcript)`, where the transcript
//! is BLAKE3 of both messages' bodies (both nonces, versions, session id,
//! capabilities, policy). A recorded handshake replayed later fails: the
//! other side's nonce is new. Proofs are compared in constant time
//! (`blake3::Hash` equality).
//!
//! The session key is derived from the PSK and the transcript; every
//! connection (the control stream, each data stream) then derives its own key
//! from the session key and nonces of both ends, and tags each message with a
//! per-direction counter. Without a key (`--insecure-no-auth` on both sides)
//! the same construction runs under an all-zero PSK: messages are checked
//! for integrity but nothing is authenticated.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{TransportError, WireError};
use crate::wire::{Header, TAG_LEN};

/// A 32-byte pre-shared key.
#[derive(Clone)]
pub struct Key(pub(crate) [u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// A fresh random key.
    pub fn generate() -> io::Result<Key> {
        Ok(Key(random()?))
    }

    /// A key from its bytes.
    pub fn from_bytes(b: [u8; 32]) -> Key {
        Key(b)
    }

    /// The key's bytes (for handing to another process or API).
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The key as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(s: &str) -> Result<Key, String> {
        let s = s.trim();
        if s.len() != 64 {
            return Err(format!(
                "a key is 64 hex digits, found {} characters",
                s.len()
            ));
        }
        let mut k = [0u8; 32];
        for (i, out) in k.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| format!("not a hex digit pair at position {}", 2 * i))?;
        }
        Ok(Key(k))
    }

    /// Reads a key file written by [`Key::write_new`]: 64 hex digits. Refuses
    /// a file that others can read (like ssh does).
    pub fn load(path: &Path) -> Result<Key, TransportError> {
        let what = || format!("key file {}", path.display());
        let meta = fs::metadata(path).map_err(|e| TransportError::io(what(), e))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(TransportError::Config(format!(
                "key file {} is readable by others (mode {:o}); run chmod 600 on it",
                path.display(),
                meta.permissions().mode() & 0o777
            )));
        }
        if meta.len() > 1024 {
            return Err(TransportError::Config(format!(
                "key file {} is {} bytes; a key file holds 64 hex digits",
                path.display(),
                meta.len()
            )));
        }
        let text = fs::read_to_string(path).map_err(|e| TransportError::io(what(), e))?;
        Key::from_hex(&text)
            .map_err(|e| TransportError::Config(format!("key file {}: {e}", path.display())))
    }

    /// Writes a fresh key to a new file with mode 0600; refuses to
    /// overwrite.
    pub fn write_new(path: &Path) -> Result<Key, TransportError> {
        let key = Key::generate().map_err(|e| TransportError::io("reading random bytes", e))?;
        let what = || format!("creating key file {}", path.display());
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| TransportError::io(what(), e))?;
        writeln!(f, "{}", key.to_hex()).map_err(|e| TransportError::io(what(), e))?;
        f.sync_all().map_err(|e| TransportError::io(what(), e))?;
        Ok(key)
    }
}

/// `n` random bytes from the kernel.
pub(crate) fn random<const N: usize>() -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: the pointer and length describe the unfilled tail of `b`.
        let r = unsafe { libc::getrandom(b[got..].as_mut_ptr().cast(), N - got, 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        got += r as usize;
    }
    Ok(b)
}

/// The PSK in use: the key, or all zero without authentication.
pub(crate) fn psk(key: Option<&Key>) -> [u8; 32] {
    key.map_or([0; 32], |k| k.0)
}

/// BLAKE3 of the handshake so far.
pub(crate) fn transcript(hello: &[u8], challenge_unproven: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dwcp amst v1 transcript");
    h.update(&(hello.len() as u64).to_le_bytes());
    h.update(hello);
    h.update(challenge_unproven);
    *h.finalize().as_bytes()
}

/// A proof by `role` (`b"server"` or `b"client"`) over the transcript.
pub(crate) fn proof(psk: &[u8; 32], role: &[u8], transcript: &[u8; 32]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(psk);
    h.update(role);
    h.update(transcript);
    h.finalize()
}

/// Checks a proof in constant time.
pub(crate) fn check_proof(expected: blake3::Hash, got: &[u8; 32]) -> bool {
    expected == blake3::Hash::from_bytes(*got)
}

/// The session key.
pub(crate) fn session_key(psk: &[u8; 32], transcript: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dwcp amst v1 session key");
    h.update(psk);
    h.update(transcript);
    *h.finalize().as_bytes()
}

/// A data stream's proof in `JOIN` (`role` `b"join"`) or `JOIN_OK`
/// (`b"join-ok"`, with the server's nonce).
pub(crate) fn join_proof(
    session_key: &[u8; 32],
    role: &[u8],
    session: &[u8; 16],
    stream: u16,
    client_nonce: &[u8; 32],
    server_nonce: Option<&[u8; 32]>,
) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(session_key);
    h.update(role);
    h.update(session);
    h.update(&stream.to_le_bytes());
    h.update(client_nonce);
    if let Some(n) = server_nonce {
        h.update(n);
    }
    h.finalize()
}

/// A connection's key: from the session key, the stream (`u16::MAX` for
/// the control stream) and both nonces.
pub(crate) fn conn_key(
    session_key: &[u8; 32],
    stream: u16,
    client_nonce: &[u8; 32],
    server_nonce: &[u8; 32],
) -> [u8; 32] {
    let mut h = blake3::Hasher::new_derive_key("dwcp amst v1 connection key");
    h.update(session_key);
    h.update(&stream.to_le_bytes());
    h.update(client_nonce);
    h.update(server_nonce);
    *h.finalize().as_bytes()
}

/// Direction bytes of the tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Client (sender of data) to server.
    ToServer = 1,
    /// Server to client.
    ToClient = 2,
}

/// Tags and checks the messages of one connection: a key, and a counter in
/// each direction.
#[derive(Clone)]
pub struct Tagger {
    key: [u8; 32],
    out_dir: Direction,
    sent: u64,
    received: u64,
}

impl std::fmt::Debug for Tagger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tagger")
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish()
    }
}

impl Tagger {
    /// A tagger for the side that sends in `out_dir`.
    pub(crate) fn new(key: [u8; 32], out_dir: Direction) -> Self {
        Tagger {
            key,
            out_dir,
            sent: 0,
            received: 0,
        }
    }

    fn tag(&self, dir: Direction, counter: u64, header: &[u8], parts: &[&[u8]]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&[dir as u8]);
        h.update(&counter.to_le_bytes());
        h.update(header);
        for p in parts {
            h.update(&(p.len() as u64).to_le_bytes());
            h.update(p);
        }
        h.finalize()
    }

    /// The tag of the next outgoing message, whose header is `header` and
    /// whose authenticated content is `parts`.
    pub(crate) fn seal(&mut self, header: &Header, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        let t = self.tag(self.out_dir, self.sent, &header.write(), parts);
        self.sent += 1;
        *t.as_bytes()
    }

    /// Checks the tag of the next incoming message.
    pub(crate) fn open(
        &mut self,
        header: &Header,
        parts: &[&[u8]],
        tag: &[u8],
    ) -> Result<(), WireError> {
        let dir = match self.out_dir {
            Direction::ToServer => Direction::ToClient,
            Direction::ToClient => Direction::ToServer,
        };
        let mut t = [0u8; TAG_LEN];
        if tag.len() != TAG_LEN {
            return Err(WireError::BadTag(header.kind));
        }
        t.copy_from_slice(tag);
        if self.tag(dir, self.received, &header.write(), parts) != blake3::Hash::from_bytes(t) {
            return Err(WireError::BadTag(header.kind));
        }
        self.received += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;

    #[test]
    fn hex_round_trip_and_errors() {
        let k = Key::generate().unwrap();
        assert_eq!(Key::from_hex(&k.to_hex()).unwrap().0, k.0);
        assert_eq!(
            Key::from_hex(&format!("  {}\n", k.to_hex())).unwrap().0,
            k.0
        );
        assert!(Key::from_hex("abc").is_err());
        assert!(Key::from_hex(&"zz".repeat(32)).is_err());
        assert_ne!(Key::generate().unwrap().0, k.0, "keys are random");
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("dwcp-key-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("k");
        let k = Key::write_new(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Key::load(&p).unwrap().0, k.0);
        assert!(Key::write_new(&p).is_err(), "refuses to overwrite");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Key::load(&p).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tags_reject_modification_replay_and_wrong_direction() {
        let key = [3u8; 32];
        let mut a = Tagger::new(key, Direction::ToServer);
        let mut b = Tagger::new(key, Direction::ToClient);
        let h = Header {
            kind: Kind::Ack,
            len: 40,
        };
        let t0 = a.seal(&h, &[b"one"]);
        let t1 = a.seal(&h, &[b"two"]);
        // Modified content.
        assert!(b.clone().open(&h, &[b"onE"], &t0).is_err());
        // Out of order (a replay of a later or earlier message).
        assert!(b.clone().open(&h, &[b"two"], &t1).is_err());
        b.open(&h, &[b"one"], &t0).unwrap();
        // Replayed.
        assert!(b.clone().open(&h, &[b"one"], &t0).is_err());
        b.open(&h, &[b"two"], &t1).unwrap();
        // A message reflected back to its sender fails.
        let t = b.seal(&h, &[b"x"]);
        assert!(
            Tagger::new(key, Direction::ToClient)
                .open(&h, &[b"x"], &t)
                .is_err()
        );
        a.open(&h, &[b"x"], &t).unwrap();
        // Another connection's key fails.
        let mut c = Tagger::new([4; 32], Direction::ToClient);
        assert!(c.open(&h, &[b"one"], &t0).is_err());
    }
}
