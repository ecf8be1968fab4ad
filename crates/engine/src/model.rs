//! A GGUF model loaded through llama.cpp: weights, vocabulary, chat template and fingerprint.
//! This and the scheduler are the only modules that touch `llama-cpp-2` (and `convert`, for the
//! C functions it does not wrap).

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::context::params::KvCacheType;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use sha2::{Digest, Sha256};

use crate::grammar::Compiler;
use crate::template::{ChatTemplate, CHATML};
use crate::{EngineConfig, EngineError, ModelInfo, WeightFormat};

/// Context per sequence when the configuration names none (and the model's is longer).
const DEFAULT_CONTEXT: u32 = 2048;
/// The most sequences a KV budget alone gives (more can be asked for explicitly).
const MAX_AUTO_SEQUENCES: u64 = 64;

/// The process-wide llama.cpp backend, started once.
pub(crate) fn backend() -> Result<&'static LlamaBackend, EngineError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            let backend = LlamaBackend::init().map_err(|e| e.to_string());
            tracing::debug!(features = %crate::cpu::features(), "llama.cpp CPU build");
            crate::gemv::install();
            if crate::cpu::amx() {
                tracing::warn!(
                    "llama.cpp was built with its AMX kernels (see .cargo/config.toml): outputs \
                     may depend on the batch, and CPUs that list AMX without supporting it fail"
                );
            }
            backend
        })
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

/// A model file in memory, shared by request threads (tokenizing) and the scheduler thread.
pub(crate) struct LoadedModel {
    pub model: LlamaModel,
    pub template: ChatTemplate,
    pub info: ModelInfo,
    /// End-of-generation tokens (end of turn, end of text...).
    pub eog: Vec<u32>,
    /// Compiles output constraints against this vocabulary.
    pub grammar: Compiler,
    /// Element types of the KV cache's keys and values (see [`kv_types`]).
    pub kv_types: (KvCacheType, KvCacheType),
    /// Element types of the long-prompt context's KV cache (the plain attention's), used when
    /// `info.long_prompts` says there is one (see [`long_prompts_from`]).
    pub long_kv_types: (KvCacheType, KvCacheType),
    add_bos: bool,
    bos_text: String,
}

impl LoadedModel {
    pub fn load(path: &Path, config: &EngineConfig) -> Result<Self, EngineError> {
        let backend = backend()?;
        let load_err = |message: String| EngineError::Load {
            path: path.to_path_buf(),
            message,
        };
        if !path.is_file() {
            return Err(load_err("no such file".into()));
        }
        let key = file_key(path).map_err(|e| load_err(e.to_string()))?;
        let (weights_path, weights) = crate::convert::resolve(path, &key, config)?;
        let model =
            LlamaModel::load_from_file(backend, &weights_path, &LlamaModelParams::default())
                .map_err(|e| load_err(e.to_string()))?;
        let vocab = model.vocab();
        let piece = |t: LlamaToken| {
            String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned()
        };
        let bos_text = piece(vocab.bos());
        let eos_text = piece(vocab.eos());
        let source = model
            .meta_val_str("tokenizer.chat_template")
            .unwrap_or_else(|_| CHATML.to_owned());
        let template = ChatTemplate::new(&source, &bos_text, &eos_text)?;
        let eog = vocab
            .tokens()
            .filter(|t| vocab.is_eog(*t))
            .filter_map(|t| u32::try_from(t.0).ok())
            .collect();
        let add_bos = vocab.should_add_bos();
        let train = model.n_ctx_train();
        let context_length = config
            .context_length
            .unwrap_or_else(|| train.min(DEFAULT_CONTEXT))
            .max(16);
        let head_dim = u64::from(model.n_embd().unsigned_abs()) / u64::from(model.n_head().max(1));
        let kv_types = kv_types(config.flash_attention, head_dim);
        let cell_bytes = |(k, v): (KvCacheType, KvCacheType)| {
            u64::from(model.n_layer())
                * u64::from(model.n_head_kv())
                * (element_bytes(k, head_dim) + element_bytes(v, head_dim))
        };
        let kv_bytes_per_cell = cell_bytes(kv_types);
        let max_sequences = config.max_sequences.unwrap_or_else(|| {
            let per_sequence = (kv_bytes_per_cell * u64::from(context_length)).max(1);
            let fit = u64::from(config.kv_cache_mib) * (1 << 20) / per_sequence;
            u32::try_from(fit.clamp(1, MAX_AUTO_SEQUENCES)).unwrap_or(1)
        });
        let long_kv_types = self::kv_types(false, head_dim);
        let long_prompts =
            long_prompts_from(config, context_length, cfg!(feature = "cuda")).map(|from_tokens| {
                crate::LongPrompts {
                    from_tokens,
                    sequences: (max_sequences / LONG_LANE_SHARE).max(1),
                    kv_bytes_per_cell: cell_bytes(long_kv_types),
                }
            });
        let long = long_prompts.map(|l| (l.from_tokens, long_kv_types));
        let fingerprint = fingerprint(&key, config, kv_types, weights, long);
        let info = ModelInfo {
            path: path.to_path_buf(),
            weights,
            weights_path,
            context_length,
            train_context_length: train,
            vocab_size: u32::try_from(vocab.n_tokens()).unwrap_or(0),
            fingerprint,
            max_sequences,
            kv_bytes_per_cell,
            long_prompts,
        };
        let grammar = Compiler::new(&model)?;
        Ok(Self {
            model,
            template,
            info,
            eog,
            grammar,
            kv_types,
            long_kv_types,
            add_bos,
            bos_text,
        })
    }

    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        // Templates that write the BOS token themselves must not get a second one.
        let writes_bos = !self.bos_text.is_empty() && text.starts_with(&self.bos_text);
        let add_special = self.add_bos && !writes_bos;
        self.model
            .vocab()
            .tokenize(text.as_bytes(), add_special, true)
            .into_iter()
            .filter_map(|t| u32::try_from(t.0).ok())
            .collect()
    }

    /// The bytes a token stands for in generated text (control tokens have none).
    pub fn piece(&self, token: u32, buf: &mut Vec<u8>) {
        buf.clear();
        let t = LlamaToken(i32::try_from(token).unwrap_or(0));
        self.model.vocab().token_to_piece_into(t, buf, false, None);
    }
}

/// `fp_` plus 10 hex digits of a hash of the build, the model file (see [`file_key`]) and the
/// settings that change outputs.
fn fingerprint(
    file_key: &str,
    config: &EngineConfig,
    kv_types: (KvCacheType, KvCacheType),
    weights: WeightFormat,
    long: Option<(u32, (KvCacheType, KvCacheType))>,
) -> String {
    let mut h = Sha256::new();
    h.update(env!("CARGO_PKG_VERSION").as_bytes());
    h.update(file_key.as_bytes());
    h.update(config.batch_size.to_le_bytes());
    // The attention kernels, the KV cache's types and the weights' types change the last bits.
    h.update([u8::from(config.flash_attention)]);
    h.update(format!("{kv_types:?}").as_bytes());
    h.update(format!("{weights:?}").as_bytes());
    // Which prompts take the plain attention (deterministic per request: see
    // `long_prompts_from`), and its KV types.
    if let Some((from_tokens, kv_types)) = long {
        h.update(from_tokens.to_le_bytes());
        h.update(format!("{kv_types:?}").as_bytes());
    }
    let digest = hex::encode(h.finalize());
    format!("fp_{}", &digest[..10])
}

/// 64 hex digits of a hash of the llama.cpp version and a file's size and first and last MiB:
/// enough to tell model files apart without reading gigabytes.
pub(crate) fn file_key(path: &Path) -> std::io::Result<String> {
    const SPAN: u64 = 1 << 20;
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut h = Sha256::new();
    h.update(llama_cpp_version().as_bytes());
    h.update(len.to_le_bytes());
    let mut buf = vec![0u8; SPAN.min(len) as usize];
    f.read_exact(&mut buf)?;
    h.update(&buf);
    f.seek(SeekFrom::Start(len.saturating_sub(SPAN)))?;
    f.read_exact(&mut buf)?;
    h.update(&buf);
    Ok(hex::encode(h.finalize()))
}

/// Sequences of the long-prompt lane: this fraction of the flash attention's.
const LONG_LANE_SHARE: u32 = 4;

/// From how many prompt tokens a request takes the long-prompt lane, if there is one: only
/// beside flash attention, on CPU (the per-row flash path it works around is llama.cpp's CPU
/// kernel), and for prompts that leave room in the context to answer.
///
/// llama.cpp's CPU flash attention, in the per-row path that keeps results batch-invariant
/// (see [`kv_types`]), computes every query row against every cell one at a time: the quicker
/// while contexts are short, but past a few hundred cells the plain attention, which multiplies
/// all of a pass's queries against the cells as matrices, is much quicker (`llama-bench`, Q8_0
/// weights, AVX-512, tokens a second, plain against flash: 20-token prompts after 512 cells 380
/// against 277, after 1,024 cells 320 against ~200; decoding there 72 against 64; at depth 0
/// flash is 13% (prompts) and 8% (decoding) the quicker). A context has one attention, so long
/// prompts get a context of their own. Which one a request takes depends only on its prompt's
/// length, never on the load, so every request is still computed the same way alone and under
/// load; both attentions are batch-invariant.
fn long_prompts_from(config: &EngineConfig, context_length: u32, on_gpu: bool) -> Option<u32> {
    config
        .long_prompt_tokens
        .filter(|&from| !on_gpu && config.flash_attention && from > 0 && from < context_length)
}

/// The KV cache's key and value types for an attention setting and head size.
///
/// Flash attention: keys and values in Q8_0. llama.cpp's CPU flash attention has two fast paths
/// that make a row's result depend on the batch: a tiled one for many queries of one stream
/// (prompt chunks of 64 or more) and one that splits the keys of a lone query among the
/// threads (one sequence decoding past 512 cells). Both need keys and values of one F16 or F32
/// type; with any other types every query row is computed on its own, its cells in order,
/// whatever else is in the batch, and a decoding row exactly as a prompt row. Of those, Q8_0
/// for both is the quickest and the smallest: its values are widened to F32 and summed in F32,
/// where F16 values are summed into an F16 accumulator, converted both ways for every cell.
/// Measured with `llama-bench` on an AVX-512 machine (tokens a second, Q8_0 values against
/// F16): 48-token prompts after 256 cells 406 against 259, 32 after 1,024 cells 197 against 99,
/// decoding there 73 against 50, equal at depth 0; on AVX2 machines the two were within the
/// runs' spread. 12 KiB a cell for the default model (12,240 bytes; 17,640 with F16 values).
/// Heads whose size Q8_0's 32-element blocks do not divide keep F16 keys with BF16 values.
///
/// The plain attention: Q8_0 keys as well (llama.cpp quantizes the queries to multiply them, by
/// the same kernel as the Q8_0 weights, batch-invariant like them), F16 values (it keeps values
/// transposed, which only a float type allows). As fast as F16 keys at every depth measured
/// (`llama-bench`, 48-token prompts and decoding at 0, 512 and 1,024 cells, twice) and a quarter
/// smaller. F16 keys where Q8_0's blocks do not divide the head.
pub(crate) fn kv_types(flash_attention: bool, head_dim: u64) -> (KvCacheType, KvCacheType) {
    match (flash_attention, head_dim.is_multiple_of(32)) {
        (true, true) => (KvCacheType::Q8_0, KvCacheType::Q8_0),
        (false, true) => (KvCacheType::Q8_0, KvCacheType::F16),
        (true, false) => (KvCacheType::F16, KvCacheType::BF16),
        (false, false) => (KvCacheType::F16, KvCacheType::F16),
    }
}

/// Bytes one head's `head_dim` elements take in a KV cache type.
fn element_bytes(kind: KvCacheType, head_dim: u64) -> u64 {
    match kind {
        // 32 elements: an F16 scale and 32 bytes.
        KvCacheType::Q8_0 => head_dim.div_ceil(32) * 34,
        KvCacheType::F32 => head_dim * 4,
        _ => head_dim * 2,
    }
}

/// The version of the llama.cpp bindings this engine is built on.
pub(crate) fn llama_cpp_version() -> &'static str {
    "llama-cpp-2=0.1.160"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_prompts_get_their_lane_only_beside_flash_attention_on_cpu() {
        let config = EngineConfig::default();
        assert_eq!(long_prompts_from(&config, 2048, false), Some(512));
        // On a GPU the flash attention has its own kernels; prompts that leave no room to
        // answer never reach the lane; the plain attention everywhere needs no second context.
        assert_eq!(long_prompts_from(&config, 2048, true), None);
        assert_eq!(long_prompts_from(&config, 512, false), None);
        let plain = EngineConfig {
            flash_attention: false,
            ..EngineConfig::default()
        };
        assert_eq!(long_prompts_from(&plain, 2048, false), None);
        let off = EngineConfig {
            long_prompt_tokens: None,
            ..EngineConfig::default()
        };
        assert_eq!(long_prompts_from(&off, 2048, false), None);
    }

    #[test]
    fn kv_cells_are_counted_in_the_types_the_cache_holds() {
        // SmolLM2-135M: 30 layers, 3 KV heads of 64.
        let cell = |flash| {
            let (k, v) = kv_types(flash, 64);
            30 * 3 * (element_bytes(k, 64) + element_bytes(v, 64))
        };
        // Flash attention: Q8_0 keys and values, 2 blocks of 34 bytes a head each.
        assert_eq!(cell(true), 12_240);
        // The plain attention: the same Q8_0 keys, F16 values (they must be of a float type).
        assert_eq!(cell(false), 17_640);
        // Flash attention never gets keys and values of one F16 or F32 type, the condition of
        // llama.cpp's tiled and split-key paths (results that depend on the batch), also where
        // Q8_0's blocks do not fit the head.
        for head in [64, 80, 96, 128, 256] {
            let (k, v) = kv_types(true, head);
            let float = |t| matches!(t, KvCacheType::F16 | KvCacheType::F32);
            assert!(!(k == v && float(k)), "head {head}: {k:?}/{v:?}");
        }
        assert_eq!(kv_types(true, 80), (KvCacheType::F16, KvCacheType::BF16));
        // Where they do not, the plain attention keeps F16 for both.
        assert_eq!(kv_types(false, 80), (KvCacheType::F16, KvCacheType::F16));
    }
}
