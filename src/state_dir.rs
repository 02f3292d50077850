//! Whose state directory this is.
//!
//! Whoever can write into the state directory or the config decides where
//! Till sends the upstream credentials and the admin token (`listen`,
//! `[upstreams]`, `credential = { file = ... }`), and can plant files Till
//! then writes through. So Till creates the state directory 0700 (its files
//! 0600, [`till_core::files`]) and refuses to use one, or a `till.toml`,
//! that another user could have written:
//!
//! * writable by its group or by others: refused, whoever owns it;
//! * owned by another user than the one running Till, or root: refused,
//!   with one exception for root. The operator runs `sudo till usage` or
//!   `sudo till keygen --rotate` on the directory of a service running as
//!   its own user (systemd's `DynamicUser`: `/var/lib/till` is
//!   `/var/lib/private/till`, owned by the service's user). Root uses it
//!   when the directory holding it belongs to root and only root can write
//!   there, since then that user cannot have put it there: a `.till`
//!   planted in a shared directory such as `/tmp` is still refused.
//!
//! The policy directory gets the same checks ([`check_policies`]): whoever
//! writes a policy decides what every token may do.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;
use till_core::files;

/// Why a state directory or config file is not used.
#[derive(Debug, Error)]
pub enum StateDirError {
    #[error(
        "{path} is writable by {who} (mode {mode:04o}): whoever can write there {stake}; run `chmod {fix} {path}`"
    )]
    Writable {
        path: String,
        who: &'static str,
        mode: u32,
        fix: &'static str,
        stake: &'static str,
    },
    #[error(
        "{path} belongs to uid {owner}, not to the user running till (uid {me}){why}: its owner {stake}. Run till as that user, `chown -R {me} {path}` if it is yours, or {elsewhere}"
    )]
    Foreign {
        path: String,
        owner: u32,
        me: u32,
        why: String,
        stake: &'static str,
        elsewhere: &'static str,
    },
    #[error("cannot check who owns {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("cannot create {path}: {source}")]
    Create { path: String, source: io::Error },
}

/// Creates `dir` (0700, whatever the umask) if it is missing, then checks
/// it ([`check`]).
pub fn create(dir: &Path) -> Result<(), StateDirError> {
    files::create_private_dir(dir).map_err(|source| StateDirError::Create {
        path: dir.display().to_string(),
        source,
    })?;
    check(dir)
}

/// The checks every command reading `home` makes: the directory, and the
/// `till.toml` in it.
pub fn check_home(home: &Path) -> Result<(), StateDirError> {
    check(home)?;
    // The file `till up` writes and the admin commands read the proxy's
    // address from.
    check_file(&home.join("till.toml"))
}

/// What a refused path decides, for the refusal's message.
#[derive(Clone, Copy)]
struct Stake {
    decides: &'static str,
    elsewhere: &'static str,
}

const STATE: Stake = Stake {
    decides: "chooses where Till sends its credentials and admin token",
    elsewhere: "set TILL_HOME (or state_dir) to your own directory",
};

const POLICIES: Stake = Stake {
    decides: "decides what every token may do",
    elsewhere: "set `policies` in till.toml (`--policies` for `till verify`) to a directory of your own",
};

/// Refuses a state directory another user could have written (module
/// doc). One that does not exist passes: whatever creates it makes it
/// private.
pub fn check(dir: &Path) -> Result<(), StateDirError> {
    check_dir(dir, "700", STATE)
}

/// Refuses a config file another user could have written: writable by
/// group or others, or owned by someone else than this user and root
/// (root also takes the owner of a state directory it accepts, the file's
/// own directory). One that does not exist passes.
pub fn check_file(path: &Path) -> Result<(), StateDirError> {
    check_file_as(path, "600", STATE)
}

/// Refuses a policy directory, or a `*.datalog` file in it, that another
/// user could have written, by the rules of [`check`] and [`check_file`].
/// The policies decide what every token may do, and the default
/// `policies` is relative to the working directory: an `allow if true;`
/// planted there by someone else would open every upstream to every
/// token. A directory that does not exist passes (the built-in policy, or
/// the load's own error).
pub fn check_policies(dir: &Path) -> Result<(), StateDirError> {
    check_dir(dir, "go-w", POLICIES)?;
    // Unreadable: the load that follows says so.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "datalog") {
            check_file_as(&p, "go-w", POLICIES)?;
        }
    }
    Ok(())
}

fn check_dir(dir: &Path, fix: &'static str, stake: Stake) -> Result<(), StateDirError> {
    let Some(me) = files::effective_uid() else {
        return Ok(());
    };
    let Some(meta) = metadata(dir)? else {
        return Ok(());
    };
    not_writable(dir, &meta, fix, stake)?;
    let owner = owner_of(&meta);
    if owner == me || owner == 0 {
        return Ok(());
    }
    let why = if me == 0 {
        match root_only_parent(dir)? {
            None => return Ok(()),
            Some(why) => why,
        }
    } else {
        String::new()
    };
    Err(foreign(dir, owner, me, why, stake))
}

fn check_file_as(path: &Path, fix: &'static str, stake: Stake) -> Result<(), StateDirError> {
    let Some(me) = files::effective_uid() else {
        return Ok(());
    };
    let Some(meta) = metadata(path)? else {
        return Ok(());
    };
    not_writable(path, &meta, fix, stake)?;
    let owner = owner_of(&meta);
    if owner == me || owner == 0 {
        return Ok(());
    }
    if me == 0 {
        let dir = parent(path)?;
        if metadata(&dir)?.is_some_and(|m| owner_of(&m) == owner)
            && check_dir(&dir, fix, stake).is_ok()
        {
            return Ok(());
        }
    }
    Err(foreign(path, owner, me, String::new(), stake))
}

fn metadata(path: &Path) -> Result<Option<std::fs::Metadata>, StateDirError> {
    match std::fs::metadata(path) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(StateDirError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

#[cfg(unix)]
fn owner_of(m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    m.uid()
}

#[cfg(not(unix))]
fn owner_of(_: &std::fs::Metadata) -> u32 {
    0
}

#[cfg(unix)]
fn mode_of(m: &std::fs::Metadata) -> u32 {
    use std::os::unix::fs::MetadataExt;
    m.mode() & 0o7777
}

#[cfg(not(unix))]
fn mode_of(_: &std::fs::Metadata) -> u32 {
    0
}

fn not_writable(
    path: &Path,
    meta: &std::fs::Metadata,
    fix: &'static str,
    stake: Stake,
) -> Result<(), StateDirError> {
    let mode = mode_of(meta);
    let who = match (mode & 0o020 != 0, mode & 0o002 != 0) {
        (false, false) => return Ok(()),
        (true, false) => "its group",
        (false, true) => "every user",
        (true, true) => "its group and every user",
    };
    Err(StateDirError::Writable {
        path: path.display().to_string(),
        who,
        mode,
        fix,
        stake: stake.decides,
    })
}

/// The directory `path` is in, symlinks resolved (`/var/lib/till` is
/// `/var/lib/private/till` under `DynamicUser`).
fn parent(path: &Path) -> Result<PathBuf, StateDirError> {
    let real = std::fs::canonicalize(path).map_err(|source| StateDirError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(real
        .parent()
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf))
}

/// For root using `dir` owned by another user: `None` when the directory
/// holding it belongs to root and only root writes there, else why not.
fn root_only_parent(dir: &Path) -> Result<Option<String>, StateDirError> {
    let p = parent(dir)?;
    let Some(meta) = metadata(&p)? else {
        return Ok(Some(format!(" and {} cannot be checked", p.display())));
    };
    let (owner, mode) = (owner_of(&meta), mode_of(&meta));
    if owner == 0 && mode & 0o022 == 0 {
        return Ok(None);
    }
    let how = if owner != 0 {
        format!("belongs to uid {owner}")
    } else {
        format!("is writable by others (mode {mode:04o})")
    };
    Ok(Some(format!(
        ", and the directory holding it, {}, {how}, so anyone could have put it there (root uses another user's state directory only inside a directory only root can write to, such as /var/lib/private for systemd's DynamicUser)",
        p.display()
    )))
}

fn foreign(path: &Path, owner: u32, me: u32, why: String, stake: Stake) -> StateDirError {
    StateDirError::Foreign {
        path: path.display().to_string(),
        owner,
        me,
        why,
        stake: stake.decides,
        elsewhere: stake.elsewhere,
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_directory_or_file_others_can_write_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        check(dir.path()).unwrap();
        check(&dir.path().join("missing")).unwrap();
        chmod(dir.path(), 0o770);
        let e = check(dir.path()).unwrap_err().to_string();
        assert!(e.contains("writable by its group (mode 0770)"), "{e}");
        assert!(e.contains("chmod 700"), "{e}");
        chmod(dir.path(), 0o755);
        check(dir.path()).unwrap();
        let f = dir.path().join("till.toml");
        std::fs::write(&f, "").unwrap();
        chmod(&f, 0o602);
        let e = check_file(&f).unwrap_err().to_string();
        assert!(e.contains("writable by every user (mode 0602)"), "{e}");
        assert!(e.contains("chmod 600"), "{e}");
        chmod(&f, 0o644);
        check_home(dir.path()).unwrap();
    }

    #[test]
    fn create_makes_a_0700_directory_and_checks_an_existing_one() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().join("a").join("home");
        create(&home).unwrap();
        let mode = std::fs::metadata(&home).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        // An existing one is left as it is, then checked.
        chmod(&home, 0o777);
        assert!(matches!(create(&home), Err(StateDirError::Writable { .. })));
    }
}
