//! The Q8_0 matrix product for one to eight tokens (`csrc/gemv_q8_0.c`): checked against
//! llama.cpp's own kernel and switched on when the backend starts.
//!
//! A decoding step of up to eight streams multiplies a few tokens by every weight, and
//! llama.cpp does it for Q8_0 weights with a dot product per row (one token) or its tiled
//! kernel (two or more), both streaming the weights at about half the memory's speed or less.
//! The C kernel computes every output by the same operations in the same order as llama.cpp's
//! dot product, loads each block of weights once for all the tokens, prefetches, and takes
//! llama.cpp's Q8_0 products of up to eight tokens through the linker's
//! `--wrap=llamafile_sgemm` (see `build.rs`). [`install`] switches it on only where it was
//! compiled, linked in, and found bit-identical to `ggml_vec_dot_q8_0_q8_0` on probe matrices
//! for every token count, so outputs never depend on whether it runs.

#![allow(
    unsafe_code,
    reason = "the C kernel and llama.cpp's reference kernel are foreign functions"
)]

use std::sync::OnceLock;

use rand::{Rng, SeedableRng};

extern "C" {
    fn parlance_gemv_q8_0_compiled() -> i32;
    fn parlance_gemv_q8_0_linked() -> i32;
    fn parlance_gemv_q8_0_both(
        a: *const u8,
        y: *const u8,
        count: i64,
        blocks: i64,
        columns: i64,
        ours: *mut f32,
        llama: *mut f32,
    );
    fn parlance_gemv_q8_0_enable(on: i32);
    fn parlance_gemv_q8_0_rows() -> u64;
}

/// Bytes of a Q8_0 block: an FP16 scale and 32 signed bytes.
const BLOCK: usize = 34;
/// The most tokens the kernel takes in one product (`MAX_COLUMNS` in the C file).
const MAX_COLUMNS: usize = 8;

/// Whether the kernel runs, and if not, why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    On,
    /// This build's CPU features lack AVX2, FMA or F16C (or it is not x86-64).
    NotCompiled,
    /// The binary was linked without `--wrap=llamafile_sgemm`.
    NotLinked,
    /// Its results differed from llama.cpp's on the probe: llama.cpp's own kernel runs.
    Differs,
    /// `PARLANCE_Q8_0_GEMV=0` in the environment (for comparing the two kernels' speed).
    Off,
}

/// Checks the kernel against llama.cpp's and switches it on if it matches; once a process.
pub(crate) fn install() -> Status {
    static STATUS: OnceLock<Status> = OnceLock::new();
    *STATUS.get_or_init(|| {
        let status = check();
        if status == Status::On {
            // SAFETY: stores a flag the C side reads atomically.
            unsafe { parlance_gemv_q8_0_enable(1) };
        }
        tracing::debug!(?status, "Q8_0 few-token kernel");
        status
    })
}

fn check() -> Status {
    // SAFETY: both take no arguments and read link- or compile-time facts.
    let (compiled, linked) = unsafe {
        (
            parlance_gemv_q8_0_compiled() != 0,
            parlance_gemv_q8_0_linked() != 0,
        )
    };
    if std::env::var_os("PARLANCE_Q8_0_GEMV").is_some_and(|v| v == "0") {
        Status::Off
    } else if !compiled {
        Status::NotCompiled
    } else if !linked {
        Status::NotLinked
    } else if (1..=MAX_COLUMNS).all(|columns| probe(0x5eed + columns as u64, 64, 48, columns)) {
        Status::On
    } else {
        Status::Differs
    }
}

/// Outputs (weight rows times tokens) the kernel has computed in this process.
pub(crate) fn rows_computed() -> u64 {
    // SAFETY: reads an atomic counter.
    unsafe { parlance_gemv_q8_0_rows() }
}

/// Random Q8_0 blocks: scales of either sign between 2^-10 and 2^5, quants in [-127, 127] as
/// llama.cpp's quantizer writes them.
fn random_blocks(rng: &mut impl Rng, count: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; count * BLOCK];
    for block in bytes.chunks_exact_mut(BLOCK) {
        let sign = u16::from(rng.random::<bool>()) << 15;
        let exponent = rng.random_range(5u16..=20) << 10;
        let scale = sign | exponent | rng.random_range(0u16..1024);
        block[..2].copy_from_slice(&scale.to_le_bytes());
        for q in &mut block[2..] {
            *q = rng.random_range(-127i8..=127) as u8;
        }
    }
    bytes
}

/// Whether the kernel's outputs equal `ggml_vec_dot_q8_0_q8_0`'s bit for bit on `rows` random
/// rows of `blocks` blocks against `columns` random tokens.
fn probe(seed: u64, rows: usize, blocks: usize, columns: usize) -> bool {
    let (ours, llama) = compare(seed, rows, blocks, columns);
    ours.iter()
        .zip(&llama)
        .all(|(a, b)| a.to_bits() == b.to_bits())
}

/// The kernel's outputs and llama.cpp's, column after column.
fn compare(seed: u64, rows: usize, blocks: usize, columns: usize) -> (Vec<f32>, Vec<f32>) {
    assert!((1..=MAX_COLUMNS).contains(&columns));
    // SAFETY: idempotent; fills the FP16 table llama.cpp's kernel reads its scales through.
    unsafe { llama_cpp_sys_2::ggml_cpu_init() };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let a = random_blocks(&mut rng, rows * blocks);
    let y = random_blocks(&mut rng, blocks * columns);
    let mut ours = vec![f32::NAN; rows * columns];
    let mut llama = vec![f32::NAN; rows * columns];
    // SAFETY: `a` holds `rows * blocks` blocks and `y` `blocks * columns`; each output has
    // `rows * columns` floats; `columns` is within the kernel's bound; the C side reads and
    // writes nothing else.
    unsafe {
        parlance_gemv_q8_0_both(
            a.as_ptr(),
            y.as_ptr(),
            rows as i64,
            blocks as i64,
            columns as i64,
            ours.as_mut_ptr(),
            llama.as_mut_ptr(),
        );
    }
    (ours, llama)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_ids_match_the_bindings() {
        // The C file names ggml's types by number.
        assert_eq!(llama_cpp_sys_2::GGML_TYPE_F32, 0);
        assert_eq!(llama_cpp_sys_2::GGML_TYPE_Q8_0, 8);
    }

    #[test]
    fn the_kernel_is_on_in_this_build_and_matches_llama_cpp_bit_for_bit() {
        // The machines this project builds on are x86-64 with AVX2, FMA and F16C, and the
        // engine's build script links its tests with the wrap: anything else is a broken build.
        assert_eq!(check(), Status::On);
        for (seed, rows, blocks) in [(1, 576, 18), (2, 192, 48), (3, 7, 1), (4, 33, 5)] {
            for columns in 1..=MAX_COLUMNS {
                let (ours, llama) = compare(seed, rows, blocks, columns);
                for (i, (a, b)) in ours.iter().zip(&llama).enumerate() {
                    let (column, row) = (i / rows, i % rows);
                    assert!(a.is_finite(), "row {row} column {column}: {a}");
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "row {row} column {column} of {columns}: {a} against {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_probe_compares_real_values() {
        // A comparison of two unset buffers would pass vacuously: the outputs differ between
        // rows and are not all zero.
        let (ours, _) = compare(9, 16, 18, 2);
        assert!(ours.iter().any(|v| *v != 0.0));
        assert!(ours.windows(2).any(|w| w[0] != w[1]));
        // The two tokens give different outputs for the same row.
        assert!((0..16).any(|r| ours[r] != ours[16 + r]));
    }
}
