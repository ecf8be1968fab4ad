//! What the llama.cpp build does on this CPU: the instruction sets it was compiled for (logged
//! when a model loads) and the check that its AMX kernels were left out.
//!
//! The build targets the machine it runs on (`-C target-cpu=native`, which llama.cpp's build
//! turns into `-march=native`), except AMX: `.cargo/config.toml` passes `-mno-amx-*` to the C
//! and C++ compilers. AMX kernels would be another code path for the matrix products than the
//! ones whose results the engine keeps independent of the batch, and virtual machines that list
//! AMX among the CPU's features without supporting it stop the process at the first tile
//! instruction (seen on this project's build machines: SIGILL in the first forward pass).

#![allow(unsafe_code, reason = "queries of the llama.cpp build")]

use std::ffi::CStr;

/// llama.cpp's summary of its CPU build, as `NAME = 1 | NAME = 1 | ...`.
pub(crate) fn features() -> String {
    // SAFETY: takes no arguments and returns a pointer to a NUL-terminated static buffer (or
    // null), which is copied out at once.
    unsafe {
        let p = llama_cpp_sys_2::llama_print_system_info();
        if p.is_null() {
            return String::new();
        }
        CStr::from_ptr(p).to_string_lossy().trim().to_owned()
    }
}

/// Whether llama.cpp was compiled with its AMX (int8 tile) kernels.
pub(crate) fn amx() -> bool {
    // SAFETY: takes no arguments and reads a compile-time constant.
    unsafe { llama_cpp_sys_2::ggml_cpu_has_amx_int8() != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amx_kernels_are_compiled_out() {
        // On a CPU that lists AMX, `-march=native` alone enables these kernels: this fails if
        // the flags in `.cargo/config.toml` stop reaching llama.cpp's build.
        assert!(!amx(), "llama.cpp was built with AMX: {}", features());
        // The summary is read at all (the CPU backend always reports something).
        assert!(!features().is_empty());
    }
}
