//! Releases from the provisioning stick, for offices whose box reaches nothing but DingTalk.
//!
//! A bundle in the stick's `update/` folder (`zhuli provision write --update DIR` puts it there)
//! is taken at the stick's insertion, after the configuration: its signed sums and manifest are
//! checked first (signature, product, a version newer than the running one), then each file the
//! sums list is copied into `/var/lib/zhuli-provisioning/update/<version>/`, its sha256 compared
//! as it is copied. Only a bundle copied whole and matching is left there, with a request beside
//! it that starts `zhuli-update.service` (root), which checks the folder again in full, waits for
//! the agent's snapshot of the store and installs it like any other release. Nothing is written
//! to the disk's slots or the ESP here.

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use super::{BundleError, MANIFEST, SIGNATURE, SUMS, Version};
use crate::provision::stick::{self, StickError, UPDATE_DIR};

/// The folder under the provisioning root that holds a staged release and its request.
pub const STAGED: &str = "update";
/// The request file in it: the staged version.
pub const REQUEST: &str = "request";

#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Stick(#[from] StickError),
    #[error("{what}: {source}")]
    Io { what: String, source: std::io::Error },
    #[error(
        "the release needs {need_mib} MiB on the box, but only {free_mib} MiB are free; free space on the box, then plug the stick in again"
    )]
    Space { need_mib: u64, free_mib: u64 },
}

impl StageError {
    /// The reason as a code the admin chat says in the box's language (see [`super::news`]).
    pub fn code(&self) -> &'static str {
        match self {
            StageError::Bundle(b) => b.code(),
            StageError::Space { .. } => "space",
            StageError::Stick(_) | StageError::Io { .. } => "stick",
        }
    }
}

/// What the stick's `update/` folder came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Staged {
    /// No `update/` folder (or an empty one).
    Nothing,
    /// The release is the running one already.
    UpToDate(Version),
    /// Copied whole and checked; the request for root is written.
    Ready { version: Version, dir: PathBuf },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StageError {
    let what = what.into();
    move |source| StageError::Io { what, source }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    digest: ring::digest::Context,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.digest.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Take the bundle in the stick `dev`'s `update/` folder into `root/update/<version>/` (module
/// docs). `vendor_key` is the public key baked into the image (hex); `running` the release
/// running now.
pub fn stage(dev: &Path, root: &Path, vendor_key: &str, running: &Version) -> Result<Staged, StageError> {
    let files = stick::list_folder(dev, UPDATE_DIR)?;
    if files.is_empty() {
        return Ok(Staged::Nothing);
    }
    let small = |name: &str| -> Result<Vec<u8>, StageError> {
        if !files.iter().any(|(n, _)| n == name) {
            return Err(match name {
                SIGNATURE => BundleError::Unsigned,
                _ => BundleError::Missing(name.to_owned()),
            }
            .into());
        }
        let mut out = Vec::new();
        stick::copy_from_folder(dev, UPDATE_DIR, name, &mut out, 1 << 20)?;
        Ok(out)
    };
    let sums = small(SUMS)?;
    let signature = small(SIGNATURE)?;
    let (_, listed) = super::signed_sums(&sums, &signature, vendor_key)?;
    let manifest_bytes = small(MANIFEST)?;
    let manifest = super::signed_manifest(&listed, &manifest_bytes)?;
    if manifest.product != super::PRODUCT {
        return Err(BundleError::Product { found: manifest.product }.into());
    }
    match manifest.version.cmp(running) {
        std::cmp::Ordering::Equal => return Ok(Staged::UpToDate(manifest.version)),
        std::cmp::Ordering::Less => {
            return Err(BundleError::Downgrade { offered: manifest.version, running: running.clone() }.into());
        }
        std::cmp::Ordering::Greater => {}
    }
    // Every listed file on the stick, none larger than the manifest allows, and room for all.
    let mut need = super::pull::RESERVE;
    for (_, name) in &listed {
        let size = files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| BundleError::Missing(format!("{UPDATE_DIR}/{name}")))?;
        let most = super::pull::most(&manifest, name);
        if size > most {
            return Err(StickError::TooLarge { file: format!("{UPDATE_DIR}/{name}"), size }.into());
        }
        need += size;
    }
    let staged = root.join(STAGED);
    std::fs::create_dir_all(&staged).map_err(io(format!("cannot create {}", staged.display())))?;
    // One stick at a time (two plugged in at once start two imports).
    let lock = std::fs::File::open(&staged).and_then(|f| f.lock().map(|()| f));
    let _lock = lock.map_err(io(format!("cannot lock {}", staged.display())))?;
    if let Ok(s) = nix::sys::statvfs::statvfs(&staged) {
        let free = s.blocks_available() * s.fragment_size();
        if need > free {
            return Err(StageError::Space { need_mib: need.div_ceil(1 << 20), free_mib: free >> 20 });
        }
    }
    // Copied under a temporary name, then renamed: a folder named after a version is whole.
    let version = manifest.version.to_string();
    let part = staged.join(format!(".{version}.part"));
    let _ = std::fs::remove_dir_all(&part);
    std::fs::create_dir_all(&part).map_err(io(format!("cannot create {}", part.display())))?;
    let copied = (|| -> Result<(), StageError> {
        for (name, bytes) in [(SUMS, &sums), (SIGNATURE, &signature), (MANIFEST, &manifest_bytes)] {
            std::fs::write(part.join(name), bytes).map_err(io(format!("cannot write {name}")))?;
        }
        for (digest, name) in listed.iter().filter(|(_, n)| n != MANIFEST) {
            let path = part.join(name);
            let file = std::fs::File::create(&path).map_err(io(format!("cannot create {}", path.display())))?;
            let mut out = Hashing {
                inner: std::io::BufWriter::new(file),
                digest: ring::digest::Context::new(&ring::digest::SHA256),
            };
            stick::copy_from_folder(dev, UPDATE_DIR, name, &mut out, super::pull::most(&manifest, name))?;
            out.flush().map_err(io(format!("cannot write {}", path.display())))?;
            let found = crate::tools::hex(out.digest.finish().as_ref());
            if &found != digest {
                return Err(BundleError::Digest { file: name.clone() }.into());
            }
            let file = out.inner.into_inner().map_err(|e| StageError::Io {
                what: format!("cannot write {}", path.display()),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io(format!("cannot flush {}", path.display())))?;
        }
        Ok(())
    })();
    if let Err(e) = copied {
        let _ = std::fs::remove_dir_all(&part);
        return Err(e);
    }
    // One staged release at a time.
    if let Ok(list) = std::fs::read_dir(&staged) {
        for other in list.filter_map(Result::ok).filter(|e| e.path() != part && e.path().is_dir()) {
            let _ = std::fs::remove_dir_all(other.path());
        }
    }
    let dir = staged.join(&version);
    std::fs::rename(&part, &dir).map_err(io(format!("cannot rename {}", part.display())))?;
    let request = staged.join(REQUEST);
    let tmp = staged.join(format!("{REQUEST}.tmp"));
    std::fs::write(&tmp, format!("{version}\n"))
        .and_then(|()| std::fs::rename(&tmp, &request))
        .map_err(io(format!("cannot write {}", request.display())))?;
    Ok(Staged::Ready { version: manifest.version, dir })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::sign::{self, Role};

    struct Fixture {
        dir: PathBuf,
        stick: PathBuf,
        vendor: String,
        key: String,
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A signed bundle of `version` in `dir`.
    fn bundle(dir: &Path, key: &str, version: &str) {
        std::fs::create_dir_all(dir).expect("dir");
        let root: Vec<u8> = (0..3_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let verity = vec![5u8; 65536];
        let hash = "c".repeat(64);
        std::fs::write(dir.join(format!("zhuli_{version}.root.raw")), &root).expect("root");
        std::fs::write(dir.join(format!("zhuli_{version}.verity.raw")), &verity).expect("verity");
        std::fs::write(dir.join(format!("zhuli_{version}.efi")), super::super::tests::fake_uki(version, &hash))
            .expect("uki");
        std::fs::write(
            dir.join(MANIFEST),
            format!(
                "product = \"zhuli\"\nversion = \"{version}\"\narchitecture = \"x86-64\"\nuki = \"zhuli_{version}.efi\"\n\
                 root_hash = \"{hash}\"\n[root]\nfile = \"zhuli_{version}.root.raw\"\nbytes = {}\nsha256 = \"{}\"\n\
                 [verity]\nfile = \"zhuli_{version}.verity.raw\"\nbytes = 65536\nsha256 = \"{}\"\n",
                root.len(),
                crate::tools::sha256_hex(&root),
                crate::tools::sha256_hex(&verity)
            ),
        )
        .expect("manifest");
        super::super::seal_bundle(dir, key).expect("sign");
    }

    /// A stick as a shop sells it (FAT32, a gigabyte, sparse here) with `version`'s bundle in
    /// its update/ folder.
    fn fixture(version: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("zhuli-stage-{}-{:x}", std::process::id(), rand::random::<u32>()));
        let (key, public) = sign::keygen_for(Role::Vendor);
        let vendor = sign::public_key_for(Role::Vendor, &public, "vendor.pub").expect("pub");
        bundle(&dir.join("bundle"), &key, version);
        let stick = dir.join("stick.img");
        stick::create_image(&stick, 1 << 30, &[(stick::CONFIG, b"serial = 1\n")]).expect("stick");
        put(&stick, &dir.join("bundle"));
        Fixture { dir, stick, vendor, key }
    }

    fn put(stick: &Path, bundle: &Path) {
        let mut files: Vec<(String, PathBuf)> = std::fs::read_dir(bundle)
            .expect("ls")
            .flatten()
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
            .collect();
        files.sort();
        stick::write_folder(stick, UPDATE_DIR, &files).expect("update folder");
    }

    fn v(s: &str) -> Version {
        s.parse().expect("version")
    }

    fn staged_files(root: &Path) -> Vec<String> {
        let mut all = Vec::new();
        for e in std::fs::read_dir(root.join(STAGED)).into_iter().flatten().flatten() {
            all.push(e.file_name().to_string_lossy().into_owned());
            if e.path().is_dir() {
                for f in std::fs::read_dir(e.path()).expect("ls").flatten() {
                    all.push(format!("{}/{}", e.file_name().to_string_lossy(), f.file_name().to_string_lossy()));
                }
            }
        }
        all.sort();
        all
    }

    #[test]
    fn a_signed_release_on_the_stick_is_copied_whole_and_checked() {
        let f = fixture("1.2.0");
        assert!(stick::list(&f.stick).is_ok(), "FAT32 stick with its label");
        let root = f.dir.join("provisioning");
        let staged = stage(&f.stick, &root, &f.vendor, &v("1.1.0")).expect("staged");
        let Staged::Ready { version, dir } = staged else { panic!("{staged:?}") };
        assert_eq!(version, v("1.2.0"));
        // Byte for byte what was signed, and the request beside it names the version.
        for name in ["zhuli_1.2.0.root.raw", "zhuli_1.2.0.verity.raw", "zhuli_1.2.0.efi", MANIFEST, SUMS, SIGNATURE] {
            assert!(
                std::fs::read(dir.join(name)).expect("staged")
                    == std::fs::read(f.dir.join("bundle").join(name)).expect("bundle"),
                "{name} differs"
            );
        }
        assert_eq!(std::fs::read_to_string(root.join(STAGED).join(REQUEST)).expect("request"), "1.2.0\n");
        let room = super::super::Room { root_slot: 1 << 30, verity_slot: 1 << 20, esp_free: 1 << 30 };
        super::super::check(&dir, &f.vendor, &v("1.1.0"), room).expect("the box's own check passes");
        // The same release running: nothing to do; an older running one than the stick's is
        // the only case that copies.
        assert_eq!(
            stage(&f.stick, &f.dir.join("p2"), &f.vendor, &v("1.2.0")).expect("same"),
            Staged::UpToDate(v("1.2.0"))
        );
        let e = stage(&f.stick, &f.dir.join("p3"), &f.vendor, &v("1.3.0")).expect_err("older");
        assert!(matches!(e, StageError::Bundle(BundleError::Downgrade { .. })), "{e}");
        assert!(staged_files(&f.dir.join("p3")).is_empty(), "{:?}", staged_files(&f.dir.join("p3")));
    }

    #[test]
    fn a_bad_release_on_the_stick_leaves_nothing_behind() {
        let f = fixture("1.2.0");
        let root = f.dir.join("provisioning");
        // One byte of the root image changed after signing: found while copying, nothing kept.
        let mut bytes = std::fs::read(f.dir.join("bundle/zhuli_1.2.0.root.raw")).expect("root");
        bytes[2_000_000] ^= 0x40;
        std::fs::write(f.dir.join("bundle/zhuli_1.2.0.root.raw"), &bytes).expect("tamper");
        put(&f.stick, &f.dir.join("bundle"));
        let e = stage(&f.stick, &root, &f.vendor, &v("1.1.0")).expect_err("tampered");
        assert!(
            matches!(&e, StageError::Bundle(BundleError::Digest { file }) if file == "zhuli_1.2.0.root.raw"),
            "{e}"
        );
        assert_eq!(e.code(), "digest");
        assert!(staged_files(&root).is_empty(), "{:?}", staged_files(&root));
        // Signed by another vendor.
        let (other, _) = sign::keygen_for(Role::Vendor);
        bundle(&f.dir.join("bundle"), &other, "1.2.0");
        put(&f.stick, &f.dir.join("bundle"));
        let e = stage(&f.stick, &root, &f.vendor, &v("1.1.0")).expect_err("foreign");
        assert!(matches!(e, StageError::Bundle(BundleError::Untrusted { .. })), "{e}");
        // No signature at all (removed from the stick's folder by writing a fresh stick).
        bundle(&f.dir.join("bundle"), &f.key, "1.2.0");
        std::fs::remove_file(f.dir.join("bundle").join(SIGNATURE)).expect("unsign");
        stick::create_image(&f.stick, 1 << 30, &[(stick::CONFIG, b"serial = 1\n")]).expect("stick");
        put(&f.stick, &f.dir.join("bundle"));
        let e = stage(&f.stick, &root, &f.vendor, &v("1.1.0")).expect_err("unsigned");
        assert!(matches!(e, StageError::Bundle(BundleError::Unsigned)), "{e}");
        assert!(staged_files(&root).is_empty(), "{:?}", staged_files(&root));
        // A stick without an update folder: nothing.
        stick::create_image(&f.stick, 1 << 30, &[(stick::CONFIG, b"serial = 1\n")]).expect("stick");
        assert_eq!(stage(&f.stick, &root, &f.vendor, &v("1.1.0")).expect("nothing"), Staged::Nothing);
    }
}
