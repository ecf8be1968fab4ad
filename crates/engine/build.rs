//! Compiles the engine's one C file, the Q8_0 matrix-vector kernel (`csrc/gemv_q8_0.c`), for the
//! same instruction sets as llama.cpp's build, and routes llama.cpp's matrix products through it
//! for this package's own test binaries.
//!
//! llama-cpp-sys-2 builds llama.cpp with `-march=native` when the Rust flags say
//! `target-cpu=native` (this repository's `.cargo/config.toml`), and otherwise with the Rust
//! target's features; this does the same. The `--wrap` linker flag only applies to the binaries
//! of the package whose build script prints it, so `crates/parlance/build.rs` prints it for the
//! server too. A binary linked without it runs llama.cpp's own kernel (the same results, more
//! slowly).

use std::env;

/// Rust target features and the GCC/Clang flags that enable them, for the kernel's paths.
const FEATURES: &[(&str, &str)] = &[
    ("avx2", "-mavx2"),
    ("fma", "-mfma"),
    ("f16c", "-mf16c"),
    ("avx512f", "-mavx512f"),
    ("avx512vl", "-mavx512vl"),
    ("avx512bw", "-mavx512bw"),
    ("avx512vnni", "-mavx512vnni"),
    ("avxvnni", "-mavxvnni"),
];

fn main() {
    println!("cargo:rerun-if-changed=csrc/gemv_q8_0.c");
    let mut build = cc::Build::new();
    build
        .file("csrc/gemv_q8_0.c")
        .flag_if_supported("-std=c11")
        .opt_level(3)
        .warnings(true)
        .extra_warnings(true);
    let rustflags = env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    let target_cpu = rustflags
        .split('\x1f')
        .rev()
        .find_map(|f| f.split("target-cpu=").nth(1));
    if let Some(cpu) = target_cpu {
        build.flag(format!("-march={cpu}"));
    }
    if target_cpu != Some("native") {
        let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
        for feature in features.split(',') {
            if let Some((_, flag)) = FEATURES.iter().find(|(name, _)| *name == feature) {
                build.flag(*flag);
            }
        }
    }
    build.compile("parlance_gemv");
    if env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,--wrap=llamafile_sgemm");
    }
}
