//! The weights' format: a Q4_1 model re-expressed in Q8_0 once, into the folder given, reused by
//! later loads, told apart by the fingerprint; `file` keeps the file's types; a folder that
//! cannot be written makes `auto` serve the file's own types and `q8_0` fail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use std::path::{Path, PathBuf};

use common::model_path;
use parlance_engine::{Engine, EngineConfig, Event, Generation, SamplingParams, WeightFormat};

fn config(weights: WeightFormat, dir: &Path) -> EngineConfig {
    EngineConfig {
        max_sequences: Some(1),
        context_length: Some(256),
        weights,
        weights_dir: Some(dir.to_path_buf()),
        ..EngineConfig::default()
    }
}

/// Greedy text for a fixed prompt.
fn answer(engine: &Engine) -> String {
    let prompt = engine
        .apply_chat_template(
            &[serde_json::json!({"role": "user", "content": "Name three colours."})],
            None,
            false,
        )
        .expect("template");
    let mut stream = engine
        .submit(Generation {
            prompt: engine.tokenize(&prompt),
            n: 1,
            max_tokens: Some(12),
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            stop: vec![],
            ignore_eos: false,
            logprobs: None,
            grammar: None,
            think_budget: None,
        })
        .expect("submit");
    let mut text = String::new();
    while let Some(event) = stream.blocking_next() {
        match event {
            Event::Text { text: t, .. } => text.push_str(&t),
            Event::Finished { .. } => return text,
            Event::Failed { message } => panic!("{message}"),
            Event::Admitted { .. } => {}
        }
    }
    panic!("stream ended without finishing");
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn q4_1_weights_are_converted_once_and_reused() {
    let source = model_path();
    let dir = std::env::temp_dir().join(format!("parlance-weights-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    let auto = Engine::load(&source, &config(WeightFormat::Auto, &dir)).expect("load auto");
    let info = auto.info().clone();
    assert_eq!(
        info.weights,
        WeightFormat::Q8_0,
        "the default model is Q4_1"
    );
    assert_eq!(info.path, source);
    assert_eq!(
        files_in(&dir),
        vec![info.weights_path.clone()],
        "one file, no partials left"
    );
    // Q8_0 takes 34 bytes a block of 32 weights where Q4_1 takes 20; the embeddings were Q8_0
    // already and the norms stay F32.
    let (src_len, q8_len) = (
        std::fs::metadata(&source).expect("source").len(),
        std::fs::metadata(&info.weights_path)
            .expect("converted")
            .len(),
    );
    assert!(
        q8_len > src_len * 13 / 10 && q8_len < src_len * 17 / 10,
        "{src_len} bytes became {q8_len}"
    );
    let kernel_rows = parlance_engine::q8_0_gemv_rows();
    let converted_answer = answer(&auto);
    assert!(!converted_answer.trim().is_empty());
    // A lone stream over Q8_0 weights runs the engine's own few-token kernel (linked in by
    // the build script's `--wrap`), whose results the e2e tests compare with batched ones.
    assert!(
        parlance_engine::q8_0_gemv_rows() > kernel_rows,
        "the few-token kernel did not run"
    );
    let written = std::fs::metadata(&info.weights_path)
        .and_then(|m| m.modified())
        .expect("mtime");
    drop(auto);

    // A second load (asked for Q8_0 explicitly) reads the same file without writing it again,
    // and answers the same.
    let again = Engine::load(&source, &config(WeightFormat::Q8_0, &dir)).expect("load q8_0");
    assert_eq!(again.info().weights_path, info.weights_path);
    assert_eq!(again.info().fingerprint, info.fingerprint);
    assert_eq!(
        std::fs::metadata(&info.weights_path)
            .and_then(|m| m.modified())
            .expect("mtime"),
        written
    );
    assert_eq!(answer(&again), converted_answer);
    drop(again);

    // The file's own types: another fingerprint, nothing written.
    let file = Engine::load(&source, &config(WeightFormat::File, &dir)).expect("load file");
    assert_eq!(file.info().weights, WeightFormat::File);
    assert_eq!(file.info().weights_path, source);
    assert_ne!(file.info().fingerprint, info.fingerprint);
    assert!(!answer(&file).trim().is_empty());
    assert_eq!(files_in(&dir).len(), 1);
    drop(file);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_folder_that_cannot_be_written_falls_back_for_auto_and_fails_for_q8_0() {
    let source = model_path();
    // A plain file where the folder should be: nothing can be created under it.
    let blocker =
        std::env::temp_dir().join(format!("parlance-weights-blocker-{}", std::process::id()));
    std::fs::write(&blocker, b"not a folder").expect("blocker");
    let dir = blocker.join("weights");

    let auto = Engine::load(&source, &config(WeightFormat::Auto, &dir)).expect("auto still loads");
    assert_eq!(auto.info().weights, WeightFormat::File);
    assert_eq!(auto.info().weights_path, source);
    drop(auto);

    let err = Engine::load(&source, &config(WeightFormat::Q8_0, &dir))
        .expect_err("q8_0 cannot be written");
    assert!(err.to_string().contains("Q8_0"), "{err}");
    let _ = std::fs::remove_file(&blocker);
}
