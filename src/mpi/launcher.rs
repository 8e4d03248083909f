//! Running `mpirun`/`mpiexec`: which family it is and its command line.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_SECRET};
use crate::error::{Error, Result};
use crate::sys;

use super::ENV_MPI;

/// The MPI launcher family, which decides how environment variables reach remote ranks
/// (by name only: the secret never appears on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LauncherKind {
    /// Open MPI's `mpirun` (`-x NAME`).
    OpenMpi,
    /// MPICH / Intel MPI Hydra `mpiexec` (`-genvlist A,B`).
    Mpich,
    /// Anything else: the launcher must pass the environment on by itself.
    Other,
}

/// Finds `mpiexec` or `mpirun` on `PATH`.
pub(crate) fn find_on_path() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    ["mpiexec", "mpirun"].iter().find_map(|name| std::env::split_paths(&path).map(|d| d.join(name)).find(|p| p.is_file()))
}

/// Asks `launcher --version` which family it is.
pub(crate) fn detect_kind(launcher: &Path) -> Result<LauncherKind> {
    let out = sys::retry_busy(|| Command::new(launcher).arg("--version").stdin(Stdio::null()).output()).map_err(|e| {
        Error::io(format!("cannot run the MPI launcher {}: install Open MPI or MPICH, or set MpiManager::launcher", launcher.display()), e)
    })?;
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok(kind_from_version(&text))
}

/// The family named in a `--version` text.
pub(crate) fn kind_from_version(text: &str) -> LauncherKind {
    if text.contains("Open MPI") || text.contains("OpenRTE") {
        LauncherKind::OpenMpi
    } else if text.contains("HYDRA") || text.contains("MPICH") || text.contains("Intel(R) MPI") {
        LauncherKind::Mpich
    } else {
        LauncherKind::Other
    }
}

/// The launcher's arguments: `-np N`, the environment forwarding flags, the user's flags,
/// then the program.
pub(crate) fn command_args(kind: LauncherKind, np: usize, flags: &[String], program: &Path) -> Vec<String> {
    let forward = [ENV_MASTER, ENV_SECRET, ENV_LAUNCH, ENV_MPI];
    let mut args = vec!["-np".to_string(), np.to_string()];
    match kind {
        LauncherKind::OpenMpi => forward.iter().for_each(|v| args.extend(["-x".to_string(), v.to_string()])),
        LauncherKind::Mpich => args.extend(["-genvlist".to_string(), forward.join(",")]),
        LauncherKind::Other => {}
    }
    args.extend(flags.iter().cloned());
    args.push(program.display().to_string());
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_are_told_apart_by_their_version_text() {
        assert_eq!(kind_from_version("mpirun (Open MPI) 4.1.4\n"), LauncherKind::OpenMpi);
        assert_eq!(kind_from_version("HYDRA build details:\n    Version: 4.0.2"), LauncherKind::Mpich);
        assert_eq!(kind_from_version("srun 22.05"), LauncherKind::Other);
    }

    #[test]
    fn the_environment_is_forwarded_by_name_only() {
        let p = Path::new("/bin/prog");
        let flags = vec!["--oversubscribe".to_string()];
        let args = command_args(LauncherKind::OpenMpi, 4, &flags, p);
        assert_eq!(
            args.join(" "),
            "-np 4 -x CLUSTERMAN_MASTER -x CLUSTERMAN_SECRET -x CLUSTERMAN_LAUNCH -x CLUSTERMAN_MPI --oversubscribe /bin/prog"
        );
        let args = command_args(LauncherKind::Mpich, 2, &[], p);
        assert_eq!(args.join(" "), "-np 2 -genvlist CLUSTERMAN_MASTER,CLUSTERMAN_SECRET,CLUSTERMAN_LAUNCH,CLUSTERMAN_MPI /bin/prog");
        assert_eq!(command_args(LauncherKind::Other, 1, &[], p).join(" "), "-np 1 /bin/prog");
    }
}
