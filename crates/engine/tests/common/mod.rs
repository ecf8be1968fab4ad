//! What the engine's integration tests share: where the default model is.

use std::path::PathBuf;

/// The default model: `$PARLANCE_TEST_MODEL`, else where `parlance pull` caches it
/// (`$PARLANCE_CACHE_DIR`, else `~/.cache/parlance`). Panics, naming the fix, when it is missing.
pub fn model_path() -> PathBuf {
    let path = std::env::var_os("PARLANCE_TEST_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let base = std::env::var_os("PARLANCE_CACHE_DIR")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/parlance"))
                })
                .expect("a cache directory");
            base.join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    assert!(
        path.is_file(),
        "default model missing at {}: run `parlance pull`",
        path.display()
    );
    path
}
