//! Routes llama.cpp's matrix products through the engine's Q8_0 matrix-vector kernel in this
//! package's binaries (see `crates/engine/build.rs` and `crates/engine/csrc/gemv_q8_0.c`): a
//! linker flag applies only to the binaries of the package whose build script prints it.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-link-arg=-Wl,--wrap=llamafile_sgemm");
    }
}
