//! Files and directory trees over a session: the metadata a file region
//! carries, the receiver's sink that writes into a directory (temporary
//! name, digest check, then rename), and the sender's walk.
//!
//! A received path must stay inside the target directory: absolute paths,
//! `..`, empty or NUL-bearing names are refused, and no existing symlink on
//! the way is followed (each directory on the path is checked with
//! `lstat`; the temporary file is created with `O_EXCL | O_NOFOLLOW`).

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::session::{FileSource, RegionInfo, RegionWriter, Sink};
use crate::treehash::PieceDigest;

/// Version byte of [`FileMeta`]'s encoding.
const META_VERSION: u8 = 1;
/// Longest relative path accepted.
pub const MAX_PATH_LEN: usize = 4096;

/// What a file region tells the receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileMeta {
    /// Relative path, `/`-separated.
    pub path: String,
    /// Permission bits (`0o777` at most; set-id and sticky bits are never
    /// carried).
    pub mode: u32,
    /// Modification time, seconds since the epoch.
    pub mtime_s: i64,
    /// Nanoseconds of it.
    pub mtime_ns: u32,
}

impl FileMeta {
    /// The metadata bytes of an `OPEN`.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(19 + self.path.len());
        b.push(META_VERSION);
        b.extend_from_slice(&self.mode.to_le_bytes());
        b.extend_from_slice(&self.mtime_s.to_le_bytes());
        b.extend_from_slice(&self.mtime_ns.to_le_bytes());
        b.extend_from_slice(&(self.path.len() as u16).to_le_bytes());
        b.extend_from_slice(self.path.as_bytes());
        b
    }

    /// Parses and checks metadata bytes.
    pub fn decode(b: &[u8]) -> Result<FileMeta, String> {
        if b.len() < 19 {
            return Err("file metadata is truncated".into());
        }
        if b[0] != META_VERSION {
            return Err(format!("file metadata version {} is unknown", b[0]));
        }
        let mode = u32::from_le_bytes([b[1], b[2], b[3], b[4]]);
        let mtime_s = i64::from_le_bytes(b[5..13].try_into().map_err(|_| "mtime")?);
        let mtime_ns = u32::from_le_bytes([b[13], b[14], b[15], b[16]]);
        let n = u16::from_le_bytes([b[17], b[18]]) as usize;
        if b.len() != 19 + n {
            return Err("file metadata length does not match its path".into());
        }
        if mode & !0o777 != 0 || mtime_ns >= 1_000_000_000 {
            return Err("file metadata has an invalid mode or time".into());
        }
        let path = std::str::from_utf8(&b[19..])
            .map_err(|_| "file path is not UTF-8".to_string())?
            .to_owned();
        safe_relative(&path)?;
        Ok(FileMeta {
            path,
            mode,
            mtime_s,
            mtime_ns,
        })
    }
}

/// Checks that `path` is a relative path that stays inside its root, and
/// returns its components.
pub fn safe_relative(path: &str) -> Result<Vec<&str>, String> {
    if path.is_empty() || path.len() > MAX_PATH_LEN {
        return Err(format!("path of {} bytes", path.len()));
    }
    if path.contains('\0') {
        return Err("path contains a NUL byte".into());
    }
    if path.starts_with('/') {
        return Err(format!("absolute path {path:?} refused"));
    }
    let mut parts = Vec::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(s) => {
                parts.push(s.to_str().ok_or_else(|| "path is not UTF-8".to_string())?)
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(format!("path {path:?} leaves the directory")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!("absolute path {path:?} refused"));
            }
        }
    }
    if parts.is_empty() {
        return Err(format!("path {path:?} names no file"));
    }
    Ok(parts)
}

/// Hears of each finished file: its path and length, or why it failed.
pub type Report = Arc<dyn Fn(&Path, u64, Result<(), &str>) + Send + Sync>;

/// Writes file regions into a directory.
pub struct DirSink {
    root: PathBuf,
    /// Called with each finished file's path and length, or its error.
    report: Option<Report>,
}

impl std::fmt::Debug for DirSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirSink")
            .field("root", &self.root)
            .field("report", &self.report.is_some())
            .finish()
    }
}

impl DirSink {
    /// A sink writing under `root`, which must exist and be a directory.
    pub fn new(root: &Path) -> io::Result<DirSink> {
        let root = fs::canonicalize(root)?;
        if !fs::metadata(&root)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(DirSink { root, report: None })
    }

    /// Reports every finished or failed file to `f`.
    pub fn with_report(mut self, f: Report) -> Self {
        self.report = Some(f);
        self
    }

    /// Creates the directories of `parts[..len-1]` under the root, refusing
    /// to pass through anything but real directories.
    fn parent_dir(&self, parts: &[&str]) -> Result<PathBuf, String> {
        let mut dir = self.root.clone();
        for p in &parts[..parts.len() - 1] {
            dir.push(p);
            match fs::symlink_metadata(&dir) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => {
                    return Err(format!(
                        "{} exists and is not a directory (symlinks are never followed)",
                        dir.display()
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    fs::create_dir(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                Err(e) => return Err(format!("{}: {e}", dir.display())),
            }
        }
        Ok(dir)
    }
}

impl Sink for DirSink {
    fn open(&self, info: &RegionInfo) -> Result<Arc<dyn RegionWriter>, String> {
        let meta = FileMeta::decode(&info.meta)?;
        let parts = safe_relative(&meta.path)?;
        let dir = self.parent_dir(&parts)?;
        let name = parts[parts.len() - 1];
        let target = dir.join(name);
        if let Ok(m) = fs::symlink_metadata(&target)
            && m.is_dir()
        {
            return Err(format!("{} is a directory", target.display()));
        }
        let nonce: [u8; 8] = crate::auth::random().map_err(|e| e.to_string())?;
        let tmp = dir.join(format!(
            ".{name}.dwcp-{}.tmp",
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        // An ordered region (a byte stream) grows as it is written.
        if let Some(len) = info.len
            && let Err(e) = file.set_len(len)
        {
            let _ = fs::remove_file(&tmp);
            return Err(format!("sizing {} to {len} bytes: {e}", tmp.display()));
        }
        Ok(Arc::new(FileRegion {
            file,
            tmp,
            target,
            digest: PieceDigest::new(info.len),
            meta,
            report: self.report.clone(),
        }))
    }
}

struct FileRegion {
    file: File,
    tmp: PathBuf,
    target: PathBuf,
    /// The BLAKE3 of what was written, assembled as it is written.
    digest: PieceDigest,
    meta: FileMeta,
    report: Option<Report>,
}

impl FileRegion {
    fn finish_inner(&self, len: u64, digest: &[u8; 32]) -> Result<(), String> {
        let what = |e: io::Error| format!("{}: {e}", self.tmp.display());
        // An ordered region's file is exactly what was written (a region's
        // was sized at OPEN and is checked against `len` by the digest).
        self.file.set_len(len).map_err(what)?;
        // Pieces hashed as they were written; the rest is read back.
        let got = self.digest.finish(len, |off, buf| {
            self.file
                .read_exact_at(buf, off)
                .map_err(|e| format!("{}: {e}", self.tmp.display()))
        })?;
        if got != blake3::Hash::from_bytes(*digest) {
            return Err(format!(
                "{}: BLAKE3 digest does not match the sender's; discarded",
                self.meta.path
            ));
        }
        self.file
            .set_permissions(fs::Permissions::from_mode(self.meta.mode & 0o777))
            .map_err(what)?;
        let mtime = if self.meta.mtime_s >= 0 {
            UNIX_EPOCH + Duration::new(self.meta.mtime_s as u64, self.meta.mtime_ns)
        } else {
            UNIX_EPOCH - Duration::from_secs(self.meta.mtime_s.unsigned_abs())
                + Duration::from_nanos(u64::from(self.meta.mtime_ns))
        };
        self.file.set_modified(mtime).map_err(what)?;
        self.file.sync_all().map_err(what)?;
        // rename(2) replaces a symlink at the target itself, never what it
        // points to.
        fs::rename(&self.tmp, &self.target)
            .map_err(|e| format!("renaming to {}: {e}", self.target.display()))
    }
}

impl RegionWriter for FileRegion {
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| format!("writing {}: {e}", self.tmp.display()))?;
        self.digest.record(offset, data);
        Ok(())
    }

    fn write_digested(
        &self,
        offset: u64,
        data: &[u8],
        digest: &dwcp_codec::ChunkDigest,
    ) -> Result<(), String> {
        self.file
            .write_all_at(data, offset)
            .map_err(|e| format!("writing {}: {e}", self.tmp.display()))?;
        crate::memory::record_digested(&self.digest, offset, data, digest);
        Ok(())
    }

    fn finish(&self, len: u64, digest: &[u8; 32]) -> Result<(), String> {
        let r = self.finish_inner(len, digest);
        if let Some(f) = &self.report {
            f(
                &self.target,
                len,
                r.as_ref().map(|_| ()).map_err(String::as_str),
            );
        }
        r
    }

    fn abort(&self) {
        let _ = fs::remove_file(&self.tmp);
    }
}

/// A file to send: its source, and its metadata.
#[derive(Debug)]
pub struct FileToSend {
    /// Where it is read.
    pub path: PathBuf,
    /// What the receiver is told.
    pub meta: FileMeta,
    /// Its length.
    pub len: u64,
}

impl FileToSend {
    /// Opens it for sending.
    pub fn source(&self) -> io::Result<FileSource> {
        Ok(FileSource::new(File::open(&self.path)?, self.len))
    }
}

/// Every regular file under each of `paths` (a file, or a directory walked
/// recursively), named relative to the path's parent: sending `a/b` (a
/// directory) yields `b/...`. Symlinks are skipped and listed in the second
/// result, as are other special files.
pub fn walk(paths: &[PathBuf]) -> io::Result<(Vec<FileToSend>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    for p in paths {
        let base = p.file_name().map(PathBuf::from).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} names no file or directory", p.display()),
            )
        })?;
        walk_one(p, &base, &mut files, &mut skipped)?;
    }
    Ok((files, skipped))
}

fn walk_one(
    p: &Path,
    rel: &Path,
    files: &mut Vec<FileToSend>,
    skipped: &mut Vec<PathBuf>,
) -> io::Result<()> {
    let m = fs::symlink_metadata(p)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
    if m.is_dir() {
        let mut entries: Vec<_> = fs::read_dir(p)?.collect::<Result<_, _>>()?;
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            walk_one(&e.path(), &rel.join(e.file_name()), files, skipped)?;
        }
    } else if m.is_file() {
        let path = rel
            .to_str()
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} is not UTF-8", p.display()),
                )
            })?
            .to_owned();
        let mtime = m.modified()?;
        let (s, ns) = match mtime.duration_since(SystemTime::UNIX_EPOCH) {
            Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                // Before the epoch: whole seconds back, nanoseconds forward.
                let s = -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0);
                let ns = if d.subsec_nanos() > 0 {
                    1_000_000_000 - d.subsec_nanos()
                } else {
                    0
                };
                (s, ns)
            }
        };
        files.push(FileToSend {
            path: p.to_path_buf(),
            meta: FileMeta {
                path,
                mode: m.permissions().mode() & 0o777,
                mtime_s: s,
                mtime_ns: ns,
            },
            len: m.len(),
        });
    } else {
        skipped.push(p.to_path_buf());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_paths_are_refused() {
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/..", ".", "a\0b"] {
            assert!(safe_relative(bad).is_err(), "{bad:?}");
        }
        assert_eq!(safe_relative("a/./b/c").unwrap(), vec!["a", "b", "c"]);
    }

    #[test]
    fn meta_round_trips_and_rejects_bad_input() {
        let m = FileMeta {
            path: "dir/file.txt".into(),
            mode: 0o640,
            mtime_s: -5,
            mtime_ns: 7,
        };
        assert_eq!(FileMeta::decode(&m.encode()).unwrap(), m);
        let mut bad = m.clone();
        bad.path = "../x".into();
        assert!(FileMeta::decode(&bad.encode()).is_err());
        let mut suid = m.encode();
        suid[1..5].copy_from_slice(&0o4755u32.to_le_bytes());
        assert!(FileMeta::decode(&suid).is_err());
        for n in 0..m.encode().len() {
            let _ = FileMeta::decode(&m.encode()[..n]);
        }
    }

    #[test]
    fn the_sink_never_writes_through_a_symlink() {
        let root = std::env::temp_dir().join(format!("dwcp-sink-{}", std::process::id()));
        let outside = root.with_extension("outside");
        let _ = fs::remove_dir_all(&root);
        let _ = fs::remove_dir_all(&outside);
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(&outside).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("link")).unwrap();
        let sink = DirSink::new(&root).unwrap();
        let meta = FileMeta {
            path: "link/evil".into(),
            mode: 0o644,
            mtime_s: 0,
            mtime_ns: 0,
        };
        let e = sink
            .open(&RegionInfo {
                region: 0,
                len: Some(3),
                meta: meta.encode(),
            })
            .err()
            .expect("refused");
        assert!(e.contains("symlinks are never followed"), "{e}");
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        // A good file: written, checked, renamed, mode and time set.
        let meta = FileMeta {
            path: "sub/ok".into(),
            mode: 0o640,
            mtime_s: 1_000_000_000,
            mtime_ns: 5,
        };
        let w = sink
            .open(&RegionInfo {
                region: 1,
                len: Some(3),
                meta: meta.encode(),
            })
            .unwrap();
        w.write_at(0, b"abc").unwrap();
        assert!(w.finish(3, &[0; 32]).is_err(), "wrong digest refused");
        assert!(!root.join("sub/ok").exists());
        w.finish(3, blake3::hash(b"abc").as_bytes()).unwrap();
        let m = fs::metadata(root.join("sub/ok")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o640);
        assert_eq!(
            m.modified().unwrap(),
            UNIX_EPOCH + Duration::new(1_000_000_000, 5)
        );
        assert_eq!(fs::read(root.join("sub/ok")).unwrap(), b"abc");
        fs::remove_dir_all(&root).unwrap();
        fs::remove_dir_all(&outside).unwrap();
    }
}
