//! Files of a state directory, written and read so that another local user
//! gets no hold on them.
//!
//! * Created private whatever the umask: directories 0700, files 0600
//!   (`umask 000` used to leave the state directory 0777 and every file in
//!   it writable by anyone).
//! * Replaced through a temporary file that is always created fresh
//!   (`O_EXCL`), a leftover one (a crash, or a symlink someone planted to
//!   have Till overwrite another file) removed first, then renamed over the
//!   target: a crash leaves the old file or the new one.
//! * Written by root into a directory another user owns (the service's
//!   state directory under systemd's `DynamicUser`, with the operator
//!   running `sudo till keygen --rotate`), given that directory's owner, so
//!   the service can still read what the operator wrote.
//! * Read only when they are regular files, and only up to a bound (a
//!   credential file pointed at `/dev/zero` or a FIFO made a reload read
//!   until memory ran out, or hang).

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Whether a replaced file is synced to disk (with its directory) before
/// the call returns: keys and tokens are; files rewritten every second are
/// not (a crash forgets at most that second).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    Durable,
    Lazy,
}

/// The effective user id of this process (`None` where there are none).
pub fn effective_uid() -> Option<u32> {
    #[cfg(unix)]
    {
        Some(rustix::process::geteuid().as_raw())
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The directory holding `path` (`.` for a bare file name).
fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Run as root, gives `path` the owner and group of the directory it is in
/// when that directory belongs to another user: what root writes into a
/// service's state directory must stay readable by the service. That user
/// could replace the file anyway (it owns the directory), so this gives it
/// nothing it did not have. A no-op for any other user, who cannot chown.
pub fn inherit_owner(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if effective_uid() != Some(0) {
            return Ok(());
        }
        let dir = fs::metadata(parent_of(path))?;
        if dir.uid() != 0 {
            std::os::unix::fs::chown(path, Some(dir.uid()), Some(dir.gid()))?;
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

/// Creates directory `dir` with mode 0700 (its missing parents 0755), or
/// leaves an existing one as it is. For the state directory itself: it
/// keeps the owner of whoever creates it.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    create_dir(dir, false)
}

/// [`create_private_dir`] for a directory inside the state directory
/// (`keys/`): created as root, it gets the state directory's owner
/// ([`inherit_owner`]).
pub fn create_private_subdir(dir: &Path) -> io::Result<()> {
    create_dir(dir, true)
}

fn create_dir(dir: &Path, inherit: bool) -> io::Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let mut b = fs::DirBuilder::new();
        b.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            b.mode(0o755);
        }
        b.create(parent)?;
    }
    let mut b = fs::DirBuilder::new();
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    match b.create(dir) {
        Ok(()) if inherit => inherit_owner(dir),
        Ok(()) => Ok(()),
        // Made meanwhile by another till: whoever made it, it is checked
        // like any existing one.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(()),
        Err(e) => Err(e),
    }
}

/// Opens `path` for appending, creating it 0600 (with [`inherit_owner`])
/// if it does not exist: the audit log, which says who an agent works for.
pub fn open_append_private(path: &Path) -> io::Result<fs::File> {
    match private_options(fs::OpenOptions::new().append(true).create_new(true)).open(path) {
        Ok(f) => {
            inherit_owner(path)?;
            Ok(f)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::OpenOptions::new().append(true).open(path)
        }
        Err(e) => Err(e),
    }
}

/// Creates `path` empty with mode 0600 (with [`inherit_owner`]) unless it
/// exists: for files another library then opens with its own (umask-bound)
/// mode, such as the counter store.
pub fn create_private_if_missing(path: &Path) -> io::Result<()> {
    match private_options(fs::OpenOptions::new().write(true).create_new(true)).open(path) {
        Ok(_) => inherit_owner(path),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn private_options(o: &mut fs::OpenOptions) -> &mut fs::OpenOptions {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    o
}

/// `<path>.tmp`: where [`write_private`] stages `path`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Writes `bytes` to `path` through a fresh temporary file (mode 0600,
/// created with `O_EXCL` so a symlink planted at its name is never
/// followed), renamed over `path`: a crash leaves the old file or the new
/// one, never half of one.
pub fn write_private(path: &Path, bytes: &[u8], sync: Durability) -> io::Result<()> {
    let tmp = temp_path(path);
    // A leftover temporary file (from a crash) keeps its old mode, and may
    // be a symlink planted to have this write land elsewhere: remove it,
    // then insist on creating a fresh one.
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut f = private_options(fs::OpenOptions::new().write(true).create_new(true)).open(&tmp)?;
    let written = f
        .write_all(bytes)
        .and_then(|()| match sync {
            Durability::Durable => f.sync_all(),
            Durability::Lazy => Ok(()),
        })
        .and_then(|()| inherit_owner(&tmp))
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself is durable only once the directory is synced.
    if sync == Durability::Durable
        && let Ok(d) = fs::File::open(parent_of(path))
    {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Why a file could not be read by [`read_regular`].
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("is not a regular file (a {0}); give the path of a file")]
    NotRegular(&'static str),
    #[error("is larger than {max} bytes; is it the right file?")]
    TooLarge { max: u64 },
}

/// Reads `path` whole if it is a regular file (after following symlinks)
/// of at most `max` bytes. Opened without blocking, so a FIFO is refused
/// rather than waited on, and checked on the open file, so swapping the
/// path meanwhile changes nothing.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let mut o = fs::OpenOptions::new();
    o.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        o.custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32);
    }
    let f = o.open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular(kind_of(&meta.file_type())));
    }
    if meta.len() > max {
        return Err(ReadError::TooLarge { max });
    }
    // The length can change after the check: read one byte past the bound
    // to tell.
    let mut out = Vec::with_capacity(meta.len() as usize);
    f.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(ReadError::TooLarge { max });
    }
    Ok(out)
}

fn kind_of(t: &fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_char_device() {
            return "character device";
        }
        if t.is_block_device() {
            return "block device";
        }
        if t.is_socket() {
            return "socket";
        }
    }
    if t.is_dir() {
        "directory"
    } else {
        "special file"
    }
}

/// An exclusive lock on a directory, held until dropped (advisory, `flock`:
/// every Till command changing the key set takes it, so two of them run one
/// after the other instead of each overwriting the other's change).
#[derive(Debug)]
pub struct DirLock {
    _dir: fs::File,
}

/// Waits for, then takes, the exclusive lock on directory `dir`.
pub fn lock_dir(dir: &Path) -> io::Result<DirLock> {
    let f = fs::File::open(dir)?;
    #[cfg(unix)]
    rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
    Ok(DirLock { _dir: f })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    fn mode(p: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_temporary_symlink_is_replaced_not_followed() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        let target = dir.path().join("clock");
        symlink(&victim, temp_path(&target)).unwrap();
        write_private(&target, b"1\n", Durability::Lazy).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert_eq!(fs::read_to_string(&target).unwrap(), "1\n");
        assert_eq!(mode(&target), 0o600);
        assert!(!temp_path(&target).exists());
    }

    #[cfg(unix)]
    #[test]
    fn special_and_oversized_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            read_regular(Path::new("/dev/zero"), 64),
            Err(ReadError::NotRegular("character device"))
        ));
        assert!(matches!(
            read_regular(dir.path(), 64),
            Err(ReadError::NotRegular("directory"))
        ));
        let big = dir.path().join("big");
        fs::write(&big, vec![b'x'; 65]).unwrap();
        assert!(matches!(
            read_regular(&big, 64),
            Err(ReadError::TooLarge { max: 64 })
        ));
        assert_eq!(read_regular(&big, 65).unwrap().len(), 65);
    }
}
