//! `rsdn install-cni`: the DaemonSet's init-container step, which puts the `rsdn-cni` binary
//! where the kubelet's container runtime looks for CNI plugins.
//!
//! The runtime may execute the plugin at any moment (a pod starting on a node that is already
//! in service, while the DaemonSet rolls out a new version), so the binary is written to a
//! temporary file in the destination directory and renamed over the old one: a reader sees the
//! old file or the new one, never a half-written one. An identical binary is left alone.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The plugin's file name: the `type` in the conflist the daemon writes.
pub const PLUGIN: &str = "rsdn-cni";

/// What [`install`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The destination did not exist or differed; it is now the source's content.
    Installed(PathBuf),
    /// The destination already had the source's content (and mode); nothing was written.
    Unchanged(PathBuf),
}

/// Copies `source` to `bin_dir/rsdn-cni` atomically, creating `bin_dir` if needed.
pub fn install(source: &Path, bin_dir: &Path) -> Result<Outcome> {
    let content = fs::read(source)
        .with_context(|| format!("cannot read the plugin binary {}", source.display()))?;
    let dest = bin_dir.join(PLUGIN);
    if let (Ok(old), Ok(meta)) = (fs::read(&dest), fs::metadata(&dest)) {
        if old == content && meta.permissions().mode() & 0o777 == 0o755 {
            return Ok(Outcome::Unchanged(dest));
        }
    }
    fs::create_dir_all(bin_dir).with_context(|| {
        format!(
            "cannot create the CNI binary directory {}",
            bin_dir.display()
        )
    })?;
    // Same directory, so the rename stays on one filesystem and is atomic; the pid keeps two
    // installers (an init container restarted while the old one is still being killed) apart.
    let tmp = bin_dir.join(format!(".{PLUGIN}.tmp.{}", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o755)
            .open(&tmp)?;
        f.write_all(&content)?;
        // mode() only applies to a file that did not exist, and is masked by the umask.
        f.set_permissions(fs::Permissions::from_mode(0o755))?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &dest)?;
        // The rename itself is durable once the directory is synced.
        fs::File::open(bin_dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("cannot install {}", dest.display()));
    }
    Ok(Outcome::Installed(dest))
}

/// The default source: `rsdn-cni` next to the running `rsdn` binary (both are in the image's
/// `/usr/local/bin`).
pub fn default_source() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the rsdn binary's path")?;
    Ok(exe.with_file_name(PLUGIN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn scratch() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src-plugin");
        fs::write(&src, b"\x7fELF version 1").unwrap();
        let bin = dir.path().join("opt/cni/bin");
        (dir, src, bin)
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn installs_executable_then_leaves_an_identical_binary_alone() {
        let (_d, src, bin) = scratch();
        let dest = bin.join(PLUGIN);
        assert_eq!(
            install(&src, &bin).unwrap(),
            Outcome::Installed(dest.clone())
        );
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF version 1");
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
        let inode = fs::metadata(&dest).unwrap().ino();

        assert_eq!(
            install(&src, &bin).unwrap(),
            Outcome::Unchanged(dest.clone())
        );
        assert_eq!(
            fs::metadata(&dest).unwrap().ino(),
            inode,
            "rewritten although identical"
        );
        assert_eq!(
            entries(&bin),
            vec![PLUGIN.to_string()],
            "no temporary file left"
        );
    }

    #[test]
    fn a_new_version_replaces_the_old_by_rename() {
        let (_d, src, bin) = scratch();
        install(&src, &bin).unwrap();
        let dest = bin.join(PLUGIN);
        // A process that opened the old binary keeps reading the old content: the new file is a
        // new inode, never the old one rewritten in place.
        let old_inode = fs::metadata(&dest).unwrap().ino();
        let old_reader = fs::File::open(&dest).unwrap();

        fs::write(&src, b"\x7fELF version 2, longer").unwrap();
        assert_eq!(
            install(&src, &bin).unwrap(),
            Outcome::Installed(dest.clone())
        );
        assert_eq!(fs::read(&dest).unwrap(), b"\x7fELF version 2, longer");
        assert_ne!(fs::metadata(&dest).unwrap().ino(), old_inode);
        let mut old = Vec::new();
        std::io::Read::read_to_end(&mut &old_reader, &mut old).unwrap();
        assert_eq!(old, b"\x7fELF version 1");
        assert_eq!(entries(&bin), vec![PLUGIN.to_string()]);
    }

    #[test]
    fn a_wrong_mode_is_repaired() {
        let (_d, src, bin) = scratch();
        install(&src, &bin).unwrap();
        let dest = bin.join(PLUGIN);
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(
            install(&src, &bin).unwrap(),
            Outcome::Installed(dest.clone())
        );
        assert_eq!(
            fs::metadata(&dest).unwrap().permissions().mode() & 0o777,
            0o755
        );
    }

    #[test]
    fn a_missing_source_is_a_clear_error_and_touches_nothing() {
        let (_d, src, bin) = scratch();
        let err = install(&src.with_file_name("nope"), &bin).unwrap_err();
        assert!(
            format!("{err:#}").contains("cannot read the plugin binary"),
            "{err:#}"
        );
        assert!(!bin.exists());
    }
}
