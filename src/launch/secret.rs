//! How the secret reaches workers whose job scripts or environments other users may read:
//! a file only its owner can read, named in the job, removed when the launch ends (and by the
//! job's cancel guard if the master dies).

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::protocol::Secret;
use crate::sys;

/// A file holding the cluster secret (mode 0600, in a directory only its owner can enter);
/// deleted when dropped.
#[derive(Debug)]
pub struct SecretFile {
    path: PathBuf,
}

impl SecretFile {
    /// Writes the secret of the launch `ctx` describes into a new file under `dir`
    /// (`<dir>/.clusterman/`, mode 0600 in a directory of mode 0700) that its workers read.
    pub fn for_launch(ctx: &crate::cluster::launcher::LaunchContext, dir: &Path) -> Result<SecretFile> {
        SecretFile::write(dir, &format!("{:016x}", ctx.id()), ctx.secret())
    }

    /// Writes `secret` into a new file `<dir>/.clusterman/secret-<tag>`.
    pub(crate) fn write(dir: &Path, tag: &str, secret: Secret) -> Result<SecretFile> {
        SecretFile::private(dir, &format!("secret-{tag}"), &format!("{}\n", secret.to_hex()))
    }

    /// Writes `contents` into a new file `<dir>/.clusterman/<name>` that only this user can
    /// read, deleted with the value.
    pub(crate) fn private(dir: &Path, name: &str, contents: &str) -> Result<SecretFile> {
        // absolute: the job reads it from its own working directory
        let private = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf()).join(".clusterman");
        let context = |what: &str| format!("{what} {} for the workers' secret (it must be on a filesystem the workers see, usually the job's working directory)", private.display());
        match std::fs::DirBuilder::new().mode(0o700).create(&private) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(Error::io(context("cannot create"), e)),
        }
        let meta = std::fs::symlink_metadata(&private).map_err(|e| Error::io(context("cannot inspect"), e))?;
        if !meta.is_dir() || meta.uid() != sys::uid() {
            return Err(Error::Launch(format!("{} is not a directory of this user; remove it, or choose another JobOptions::workdir", private.display())));
        }
        if meta.mode() & 0o077 != 0 {
            std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).map_err(|e| Error::io(context("cannot make private"), e))?;
        }
        let path = private.join(name);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io(context("cannot write into"), e))?;
        file.write_all(contents.as_bytes()).map_err(|e| Error::io(context("cannot write into"), e))?;
        Ok(SecretFile { path })
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_owner_can_read_it_and_it_goes_away() {
        let dir = std::env::temp_dir().join(format!("cman-secret-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = Secret::random();
        let file = SecretFile::write(&dir, "t1", secret).unwrap();
        let meta = std::fs::metadata(file.path()).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(dir.join(".clusterman")).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::read_to_string(file.path()).unwrap().trim(), secret.to_hex());
        assert!(SecretFile::write(&dir, "t1", secret).is_err(), "never overwrites a file that exists");
        let path = file.path().to_path_buf();
        drop(file);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
