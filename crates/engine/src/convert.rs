//! Re-expresses a model's weights in Q8_0 when llama.cpp has no tiled matrix kernel for the
//! file's own types, so that batched steps multiply whole blocks of rows at once.
//!
//! On x86 CPUs llama.cpp multiplies Q4_1 and Q5_1 weights one row and one token at a time (a dot
//! product per pair), where Q8_0 weights go through its tiled integer kernel (`tinyBLAS`), which
//! reuses each loaded block of weights across several tokens. For the default model
//! (SmolLM2-135M Q4_1) on two cores that is 1.5-2× the tokens a second for batches of 8 to 512
//! rows (`llama-bench`: 16-row prompts 205-224 against 100-147), for 44 MiB more resident
//! weights (92 → 136 MiB). A single decoding stream's products go through the engine's own
//! kernel (`gemv`), which makes Q8_0 the faster type there too. The tiled kernel computes
//! every output element by the same sequence of operations whatever the tile and batch, so
//! results stay batch-invariant.
//!
//! The conversion is llama.cpp's own quantizer (`llama_model_quantize`, dequantizing each Q4_1
//! block and quantizing it again to Q8_0). A Q4_1 weight is one of 16 levels spaced by a
//! block's `(max - min) / 15`; Q8_0 represents it within `max |w| / 254`, a sixteenth to a
//! thirtieth of that spacing. The converted file is written once into a cache folder, keyed by a
//! hash of the source (its size and its first and last MiB) and the llama.cpp version, through a
//! temporary file renamed into place, so concurrent servers never read a partial file.
//!
//! The GGUF reader and the quantizer are C functions that `llama-cpp-2` does not wrap, called
//! here through `llama-cpp-sys-2`.

#![allow(
    unsafe_code,
    reason = "llama.cpp's GGUF reader and quantizer through llama-cpp-sys-2"
)]

use std::ffi::CString;
use std::path::{Path, PathBuf};

use llama_cpp_sys_2 as sys;

use crate::{EngineConfig, EngineError, WeightFormat};

/// `auto` converts only models whose weights stay this small in Q8_0: there a token's work is
/// arithmetic more than memory reads, and the extra memory is small. Larger models decode one
/// stream at the speed of memory, which reads 1.7× the bytes of Q4_1 in Q8_0.
pub const AUTO_MAX_CONVERTED_BYTES: u64 = 512 << 20;

/// What a GGUF file holds, by tensor type: bytes in types llama.cpp multiplies row by row on
/// CPU (Q4_1, Q5_1), those bytes once in Q8_0, and all tensor bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Census {
    pub row_by_row: u64,
    pub row_by_row_as_q8_0: u64,
    pub total: u64,
}

impl Census {
    /// Reads the tensor directory of a GGUF file (not its data).
    pub(crate) fn read(path: &Path) -> Result<Self, String> {
        let name = c_path(path)?;
        let params = sys::gguf_init_params {
            no_alloc: true,
            ctx: std::ptr::null_mut(),
        };
        // SAFETY: `name` is a NUL-terminated path that outlives the call; with `no_alloc` and no
        // ggml context requested, the reader only parses the header and tensor directory.
        let ctx = unsafe { sys::gguf_init_from_file(name.as_ptr(), params) };
        if ctx.is_null() {
            return Err("not a readable GGUF file".into());
        }
        let mut census = Census::default();
        // SAFETY: `ctx` is a live context from `gguf_init_from_file`; tensor ids are taken
        // below its tensor count; it is freed once, after the last use.
        unsafe {
            for id in 0..sys::gguf_get_n_tensors(ctx) {
                let bytes = sys::gguf_get_tensor_size(ctx, id) as u64;
                census.total += bytes;
                // Q8_0 takes 34 bytes a block of 32 weights: Q4_1 20 and Q5_1 24.
                let per_block = match sys::gguf_get_tensor_type(ctx, id) {
                    sys::GGML_TYPE_Q4_1 => 20,
                    sys::GGML_TYPE_Q5_1 => 24,
                    _ => continue,
                };
                census.row_by_row += bytes;
                census.row_by_row_as_q8_0 += bytes / per_block * 34;
            }
            sys::gguf_free(ctx);
        }
        Ok(census)
    }

    /// Whether `auto` converts: most of the weights are in row-by-row types, the converted
    /// weights are small, and the model runs on the CPU.
    pub(crate) fn auto_converts(&self, on_gpu: bool) -> bool {
        let converted = self.total - self.row_by_row + self.row_by_row_as_q8_0;
        !on_gpu && self.row_by_row * 2 > self.total && converted <= AUTO_MAX_CONVERTED_BYTES
    }
}

/// The weights `config` asks for: the file to load and the format it is in. `key` is the
/// source's [`file_key`](crate::model::file_key).
pub(crate) fn resolve(
    path: &Path,
    key: &str,
    config: &EngineConfig,
) -> Result<(PathBuf, WeightFormat), EngineError> {
    let format = config.weights;
    let load_err = |message: String| EngineError::Load {
        path: path.to_path_buf(),
        message,
    };
    let convert = match format {
        WeightFormat::File => false,
        WeightFormat::Q8_0 => true,
        WeightFormat::Auto => Census::read(path)
            .map_err(load_err)?
            .auto_converts(cfg!(feature = "cuda")),
    };
    if !convert {
        return Ok((path.to_path_buf(), WeightFormat::File));
    }
    let dir = match &config.weights_dir {
        Some(d) => d.clone(),
        None => path.parent().unwrap_or(Path::new(".")).to_path_buf(),
    };
    match to_q8_0(path, key, &dir, config.thread_count()) {
        Ok(converted) => Ok((converted, WeightFormat::Q8_0)),
        // `auto` is an optimisation: a read-only or full disk serves the file as it is.
        Err(message) if format == WeightFormat::Auto => {
            tracing::warn!(
                model = %path.display(),
                dir = %dir.display(),
                "weights not converted to Q8_0, serving the file's own: {message}"
            );
            Ok((path.to_path_buf(), WeightFormat::File))
        }
        Err(message) => Err(load_err(format!(
            "converting the weights to Q8_0: {message}"
        ))),
    }
}

/// The Q8_0 copy of `source` (whose file key is `key`) in `dir`, written there first if it is
/// not yet.
fn to_q8_0(source: &Path, key: &str, dir: &Path, threads: u32) -> Result<PathBuf, String> {
    let stem = source
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let target = dir.join(format!("{stem}.{}.q8_0.gguf", &key[..12]));
    if target.is_file() {
        tracing::info!(weights = %target.display(), "weights in Q8_0, converted before");
        return Ok(target);
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let partial = dir.join(format!(
        ".{stem}.{}.{}.{nanos}.partial",
        &key[..12],
        std::process::id()
    ));
    let started = std::time::Instant::now();
    let result = quantize(source, &partial, threads)
        .and_then(|()| std::fs::rename(&partial, &target).map_err(|e| e.to_string()));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&partial);
        return Err(e);
    }
    tracing::info!(
        source = %source.display(),
        weights = %target.display(),
        seconds = started.elapsed().as_secs_f64(),
        "weights converted to Q8_0 for the tiled matrix kernels"
    );
    Ok(target)
}

/// llama.cpp's quantizer: every quantized matrix of `source` in Q8_0 (those already in Q8_0
/// copied), into `dest`.
fn quantize(source: &Path, dest: &Path, threads: u32) -> Result<(), String> {
    crate::model::backend().map_err(|e| e.to_string())?;
    let input = c_path(source)?;
    let output = c_path(dest)?;
    // SAFETY: the default parameters are plain values and null pointers (no imatrix, overrides
    // or pruning), changed below only in plain fields.
    let mut params = unsafe { sys::llama_model_quantize_default_params() };
    params.nthread = i32::try_from(threads).unwrap_or(1).max(1);
    params.ftype = sys::LLAMA_FTYPE_MOSTLY_Q8_0;
    params.allow_requantize = true;
    // The quantizer logs two lines a tensor at INFO, past the tracing filter's level check:
    // only its warnings and errors are kept while it runs. Models load one at a time, before
    // the server serves, so nothing else logs through llama.cpp meanwhile.
    // SAFETY: `warnings_only` is a plain function that reads the C string it is given.
    unsafe {
        sys::llama_log_set(Some(warnings_only), std::ptr::null_mut());
        sys::ggml_log_set(Some(warnings_only), std::ptr::null_mut());
    }
    // SAFETY: both paths are NUL-terminated and outlive the call; `params` is a valid struct
    // whose pointers are null. The quantizer catches its own C++ exceptions and returns nonzero.
    let failed = unsafe { sys::llama_model_quantize(input.as_ptr(), output.as_ptr(), &params) };
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    if failed != 0 {
        return Err("llama.cpp's quantizer failed (see the warnings above)".into());
    }
    Ok(())
}

/// A llama.cpp log callback that passes on warnings and errors only.
unsafe extern "C" fn warnings_only(
    level: sys::ggml_log_level,
    text: *const std::ffi::c_char,
    _: *mut std::ffi::c_void,
) {
    if (level == sys::GGML_LOG_LEVEL_WARN || level == sys::GGML_LOG_LEVEL_ERROR) && !text.is_null()
    {
        // SAFETY: llama.cpp passes a NUL-terminated message that lives for the call.
        let text = unsafe { std::ffi::CStr::from_ptr(text) }.to_string_lossy();
        tracing::warn!(target: "llama.cpp", "{}", text.trim_end());
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("path {} holds a NUL byte", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census(row_by_row: u64, total: u64) -> Census {
        Census {
            row_by_row,
            row_by_row_as_q8_0: row_by_row / 20 * 34,
            total,
        }
    }

    #[test]
    fn auto_converts_small_models_held_mostly_in_row_by_row_types() {
        // The default model: 210 Q4_1 matrices, its embeddings Q8_0, norms F32.
        let default_model = census(69 << 20, 92 << 20);
        assert!(default_model.auto_converts(false));
        // Offloaded to a GPU, the file's types have their own kernels there.
        assert!(!default_model.auto_converts(true));
        // Mostly in types with tiled kernels already (Q4_0, Q8_0, K-quants).
        assert!(!census(10 << 20, 92 << 20).auto_converts(false));
        assert!(!census(0, 92 << 20).auto_converts(false));
        // A 1.5B-parameter Q4_1 model: 0.9 GiB, 1.6 GiB in Q8_0, read once a token.
        assert!(!census(900 << 20, 950 << 20).auto_converts(false));
    }
}
