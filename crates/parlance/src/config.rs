//! Server configuration: a TOML file, overridden by environment variables and flags (flags win).
//! Strict: an unknown key is an error that names it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use parlance_engine::EngineConfig;
use serde::Deserialize;

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Address to listen on.
    pub addr: Option<SocketAddr>,
    /// Static API keys (Bearer).
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Serve without keys on a non-loopback address.
    pub allow_unauthenticated: Option<bool>,
    /// Status for invalid parameter values: 400 (OpenAI) or 422.
    pub invalid_value_status: Option<u16>,
    /// Seconds in-flight requests get to finish after a shutdown signal.
    pub shutdown_grace_seconds: Option<u64>,
    /// `pretty` or `json`.
    pub log_format: Option<String>,
    /// OpenTelemetry collector to export traces to (OTLP over HTTP).
    pub otlp_endpoint: Option<String>,
    /// `http/protobuf` or `http/json`.
    pub otlp_protocol: Option<String>,
    /// Largest request body, in bytes.
    pub body_limit_bytes: Option<usize>,
    /// `sqlite://PATH` or `postgres://…` (default: SQLite in the data directory).
    pub database_url: Option<String>,
    /// `redis://…`: shared rate-limit counters for several replicas.
    pub redis_url: Option<String>,
    /// Token of the admin API (absent: the admin API is closed).
    pub admin_token: Option<String>,
    /// Defaults for every local model.
    #[serde(default)]
    pub engine: EngineSection,
    /// Models to serve (local, echo, or deployments on upstream providers).
    #[serde(default)]
    pub models: Vec<ModelSection>,
    /// Upstream providers that models' deployments name.
    #[serde(default)]
    pub providers: Vec<ProviderSection>,
    /// Content filters applied to every request and answer (`[[filters]]`).
    #[serde(default)]
    pub filters: Vec<parlance_platform::FilterSpec>,
}

/// An upstream provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSection {
    /// The name deployments refer to.
    pub name: String,
    /// `openai` (any OpenAI-compatible server) or `anthropic` (the Messages API).
    pub kind: String,
    /// Base URL, up to and including `/v1`.
    pub base_url: String,
    /// The key (a secret; prefer `api_key_env`).
    pub api_key: Option<String>,
    /// The environment variable holding the key.
    pub api_key_env: Option<String>,
    /// Request fields unknown to parlance sent to this provider untouched (`["*"]`: all).
    #[serde(default)]
    pub pass_through: Vec<String>,
}

/// One deployment of a model on a provider.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSection {
    /// Provider name.
    pub provider: String,
    /// The provider's name for the model.
    pub model: String,
    /// Weight of the first choice (absent: 1 for the first deployment, 0 for the rest, i.e.
    /// ordered fall-backs).
    pub weight: Option<u32>,
}

/// Engine settings; every field optional so that files, flags and defaults layer.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineSection {
    /// Sequences decoded together (default: as many as `kv_cache_mib` holds).
    pub max_sequences: Option<u32>,
    /// KV-cache address space in MiB that sets the number of sequences (default 1536).
    pub kv_cache_mib: Option<u32>,
    /// Longest context of one request (each sequence holds this many KV cells).
    pub context_length: Option<u32>,
    /// Tokens per forward step.
    pub batch_size: Option<u32>,
    /// CPU threads.
    pub threads: Option<u32>,
    /// Requests that may wait before 503.
    pub max_queue: Option<usize>,
    /// Longest expected wait in seconds before 503 (0: no limit but `max_queue`).
    pub max_queue_wait_seconds: Option<f64>,
    /// Reuse the KV state of earlier prompts (default: on).
    pub prefix_cache: Option<bool>,
    /// Flash attention (default: on; off is faster for long contexts, see the engine's docs).
    pub flash_attention: Option<bool>,
    /// With flash attention, prompts of at least this many tokens run in a second context with
    /// the plain attention, much faster over long contexts (default 512; 0: one context).
    pub long_prompt_tokens: Option<u32>,
    /// Longest a step's prompt chunks hold decoding streams, in milliseconds (default 250;
    /// 0: prompt chunks up to `batch_size` tokens).
    pub max_prompt_stall_ms: Option<u64>,
    /// The types the weights are multiplied in: `auto` (default: Q8_0 for small Q4_1/Q5_1
    /// models on CPU), `file`, or `q8_0`.
    pub weights: Option<String>,
    /// How much lower than the server's own threads the compute threads run (their nice value
    /// above the process's, 0 to 19; default 10; 0: the same priority).
    pub compute_nice: Option<u8>,
}

impl EngineSection {
    /// `self` where set, otherwise `other`.
    pub fn or(&self, other: &EngineSection) -> EngineSection {
        EngineSection {
            max_sequences: self.max_sequences.or(other.max_sequences),
            kv_cache_mib: self.kv_cache_mib.or(other.kv_cache_mib),
            context_length: self.context_length.or(other.context_length),
            batch_size: self.batch_size.or(other.batch_size),
            threads: self.threads.or(other.threads),
            max_queue: self.max_queue.or(other.max_queue),
            max_queue_wait_seconds: self.max_queue_wait_seconds.or(other.max_queue_wait_seconds),
            prefix_cache: self.prefix_cache.or(other.prefix_cache),
            flash_attention: self.flash_attention.or(other.flash_attention),
            long_prompt_tokens: self.long_prompt_tokens.or(other.long_prompt_tokens),
            max_prompt_stall_ms: self.max_prompt_stall_ms.or(other.max_prompt_stall_ms),
            weights: self.weights.clone().or_else(|| other.weights.clone()),
            compute_nice: self.compute_nice.or(other.compute_nice),
        }
    }

    /// The engine configuration, defaults filled in and checked.
    pub fn build(&self) -> anyhow::Result<EngineConfig> {
        let d = EngineConfig::default();
        let c = EngineConfig {
            max_sequences: self.max_sequences.or(d.max_sequences),
            kv_cache_mib: self.kv_cache_mib.unwrap_or(d.kv_cache_mib),
            context_length: self.context_length.or(d.context_length),
            batch_size: self.batch_size.unwrap_or(d.batch_size),
            threads: self.threads.or(d.threads),
            max_queue: self.max_queue.unwrap_or(d.max_queue),
            max_queue_wait: match self.max_queue_wait_seconds {
                None => d.max_queue_wait,
                Some(0.0) => None,
                Some(s) => Some(
                    std::time::Duration::try_from_secs_f64(s)
                        .map_err(|_| anyhow::anyhow!("max_queue_wait_seconds must be 0 or more"))?,
                ),
            },
            prefix_cache: self.prefix_cache.unwrap_or(d.prefix_cache),
            flash_attention: self.flash_attention.unwrap_or(d.flash_attention),
            long_prompt_tokens: match self.long_prompt_tokens {
                None => d.long_prompt_tokens,
                Some(0) => None,
                Some(n) => Some(n),
            },
            max_prompt_stall: match self.max_prompt_stall_ms {
                None => d.max_prompt_stall,
                Some(0) => None,
                Some(ms) => Some(std::time::Duration::from_millis(ms)),
            },
            weights: match &self.weights {
                None => d.weights,
                Some(w) => w.parse().map_err(|e: String| anyhow::anyhow!(e))?,
            },
            // Converted weights are a cache: under the cache directory, wherever the model is.
            weights_dir: crate::pull::cache_dir().ok().map(|d| d.join("weights")),
            compute_nice: self.compute_nice.unwrap_or(d.compute_nice),
        };
        if c.compute_nice > 19 {
            bail!("compute_nice must be between 0 and 19");
        }
        if c.max_sequences.is_some_and(|n| n == 0 || n > 256) {
            bail!("max_sequences must be between 1 and 256");
        }
        if c.kv_cache_mib < 16 {
            bail!("kv_cache_mib must be at least 16");
        }
        if c.context_length.is_some_and(|n| n < 64) {
            bail!("context_length must be at least 64");
        }
        if c.batch_size == 0 {
            bail!("batch_size must be at least 1");
        }
        if c.threads == Some(0) {
            bail!("threads must be at least 1");
        }
        Ok(c)
    }
}

/// One local model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Public name.
    pub name: String,
    /// `local` (the default: a GGUF model in the embedded engine) or `echo` (answers at once
    /// with the user's words; for smoke and load tests of the platform).
    pub provider: Option<String>,
    /// GGUF file; `default` or absent: the default model (fetched on first use).
    pub path: Option<String>,
    /// Micro-units per million tokens (`{ prompt, cached_prompt, completion }`); free when
    /// absent.
    #[serde(default)]
    pub price: parlance_platform::Price,
    /// Deployments on upstream providers, in fall-back order (instead of `path`).
    #[serde(default)]
    pub deployments: Vec<DeploymentSection>,
    /// Default `max_ttft_ms` of the model's requests.
    pub max_ttft_ms: Option<u64>,
    /// Retries of a failing deployment before falling back [default: 1].
    pub retries: Option<u32>,
    /// Overrides of the engine defaults.
    #[serde(flatten)]
    pub engine: EngineSection,
}

/// Where parlance keeps its database by default: `$PARLANCE_DATA_DIR`, else the user's data
/// directory.
pub fn data_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("PARLANCE_DATA_DIR") {
        return Ok(PathBuf::from(d));
    }
    Ok(dirs::data_dir()
        .context("no data directory for this user; set PARLANCE_DATA_DIR or --database-url")?
        .join("parlance"))
}

/// The database URL: the given one, else SQLite in the data directory (created if missing).
pub fn database_url(given: Option<&str>) -> anyhow::Result<String> {
    if let Some(u) = given.filter(|u| !u.trim().is_empty()) {
        return Ok(u.to_owned());
    }
    let dir = data_dir()?;
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    Ok(format!("sqlite://{}", dir.join("parlance.db").display()))
}

/// Reads a configuration file.
pub fn load(path: &Path) -> anyhow::Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
}

/// Parses `NAME=PATH` (or a bare path, named after its file).
pub fn parse_model_flag(s: &str) -> anyhow::Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => {
            Ok((name.to_owned(), PathBuf::from(path)))
        }
        Some(_) => bail!("--model takes NAME=PATH or PATH, got {s:?}"),
        None => {
            let p = PathBuf::from(s);
            let name = p
                .file_stem()
                .and_then(|x| x.to_str())
                .map(str::to_owned)
                .with_context(|| format!("cannot name model from path {s:?}"))?;
            Ok((name, p))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parlance_engine::WeightFormat;

    #[test]
    fn unknown_keys_are_errors() {
        let r: Result<FileConfig, _> = toml::from_str("adr = \"x\"");
        assert!(r.is_err());
        let r: Result<FileConfig, _> = toml::from_str("[[models]]\nname = \"a\"\nthreads = 2\n");
        assert_eq!(r.ok().map(|c| c.models[0].engine.threads), Some(Some(2)));
        let r: Result<FileConfig, _> = toml::from_str(
            "[[models]]\nname = \"a\"\nprice = { prompt = 150000, completion = 600000 }\n",
        );
        assert_eq!(
            r.ok()
                .map(|c| (c.models[0].price.prompt, c.models[0].price.cached_prompt)),
            Some((150_000, 0))
        );
        let r: Result<FileConfig, _> =
            toml::from_str("[[models]]\nname = \"a\"\nprice = { prompt = 1.5 }\n");
        assert!(r.is_err(), "money is an integer");
    }

    #[test]
    fn model_flags() {
        assert_eq!(
            parse_model_flag("a=/x/y.gguf").ok(),
            Some(("a".to_owned(), PathBuf::from("/x/y.gguf")))
        );
        assert_eq!(
            parse_model_flag("/x/y.gguf").ok().map(|x| x.0),
            Some("y".to_owned())
        );
        assert!(parse_model_flag("=x").is_err());
    }

    #[test]
    fn layering() {
        let a = EngineSection {
            threads: Some(1),
            ..Default::default()
        };
        let b = EngineSection {
            threads: Some(4),
            max_queue: Some(9),
            max_queue_wait_seconds: Some(2.5),
            max_prompt_stall_ms: Some(40),
            ..Default::default()
        };
        let c = a.or(&b).build().ok();
        assert_eq!(
            c.as_ref()
                .map(|c| (c.threads, c.max_queue, c.max_queue_wait, c.max_prompt_stall)),
            Some((
                Some(1),
                9,
                Some(std::time::Duration::from_millis(2500)),
                Some(std::time::Duration::from_millis(40))
            ))
        );
        // 0 lets prompt chunks take the whole batch.
        let whole = EngineSection {
            max_prompt_stall_ms: Some(0),
            ..Default::default()
        };
        assert_eq!(whole.build().ok().map(|c| c.max_prompt_stall), Some(None));
        // 0 turns the bound off; a negative wait is an error.
        let off = EngineSection {
            max_queue_wait_seconds: Some(0.0),
            ..Default::default()
        };
        assert_eq!(off.build().ok().map(|c| c.max_queue_wait), Some(None));
        assert!(EngineSection {
            max_queue_wait_seconds: Some(-1.0),
            ..Default::default()
        }
        .build()
        .is_err());
        // Long prompts take the plain attention from 512 tokens unless told otherwise; 0: never.
        let long = |n: Option<u32>| {
            EngineSection {
                long_prompt_tokens: n,
                ..Default::default()
            }
            .build()
            .ok()
            .map(|c| c.long_prompt_tokens)
        };
        assert_eq!(
            (long(None), long(Some(0)), long(Some(300))),
            (Some(Some(512)), Some(None), Some(Some(300)))
        );
        // The compute threads' priority: lowered by 10 unless told otherwise, within nice's range.
        let nice = |n: Option<u8>| {
            EngineSection {
                compute_nice: n,
                ..Default::default()
            }
            .build()
            .ok()
            .map(|c| c.compute_nice)
        };
        assert_eq!(
            (nice(None), nice(Some(0)), nice(Some(19))),
            (Some(10), Some(0), Some(19))
        );
        assert_eq!(nice(Some(20)), None);
        assert_eq!(
            EngineSection::default()
                .build()
                .ok()
                .map(|c| (c.max_queue_wait, c.max_prompt_stall)),
            Some((
                Some(std::time::Duration::from_secs(30)),
                Some(std::time::Duration::from_millis(250))
            ))
        );
        assert!(EngineSection {
            max_sequences: Some(0),
            ..Default::default()
        }
        .build()
        .is_err());
        // Weights: auto unless set; a flag over the file; a misspelt format is an error.
        let weights = |w: &str| EngineSection {
            weights: Some(w.to_owned()),
            ..Default::default()
        };
        assert_eq!(
            EngineSection::default().build().ok().map(|c| c.weights),
            Some(WeightFormat::Auto)
        );
        assert_eq!(
            weights("Q8_0")
                .or(&weights("file"))
                .build()
                .ok()
                .map(|c| c.weights),
            Some(WeightFormat::Q8_0)
        );
        assert_eq!(
            EngineSection::default()
                .or(&weights("file"))
                .build()
                .ok()
                .map(|c| c.weights),
            Some(WeightFormat::File)
        );
        assert!(weights("q4").build().is_err());
    }
}
