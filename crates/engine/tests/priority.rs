//! The engine's compute threads (the scheduler's own and llama.cpp's workers, which inherit its
//! priority) run at a higher nice value than the rest of the process, so that the server's
//! threads are preferred whenever both want the CPU.

#![cfg(target_os = "linux")]
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

mod common;

use common::model_path;
use parlance_engine::{Engine, EngineConfig, WeightFormat};

/// Name and nice value of every thread of this process (Linux's `/proc`).
fn threads() -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue; // the thread ended meanwhile
        };
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        // `pid (comm) state ...`: the nice value is the 19th field, the 17th after the name.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let nice = after.split(' ').nth(16).unwrap().parse().unwrap();
        out.push((comm.trim().to_string(), nice));
    }
    out
}

#[test]
fn compute_threads_run_below_the_rest_of_the_process() {
    let before = threads();
    let base = before.iter().map(|(_, n)| *n).max().unwrap();
    let engine = Engine::load(
        &model_path(),
        &EngineConfig {
            max_sequences: Some(1),
            context_length: Some(256),
            threads: Some(2),
            weights: WeightFormat::File,
            ..EngineConfig::default()
        },
    )
    .expect("load");
    // The engine timed two passes before `load` returned: its workers exist.
    let after = threads();
    let engine_threads: Vec<i64> = after
        .iter()
        .filter(|(name, _)| name == "parlance-engine")
        .map(|(_, n)| *n)
        .collect();
    assert!(
        engine_threads.len() >= 2,
        "the scheduler thread and a worker: {after:?}"
    );
    let by = i64::from(EngineConfig::default().compute_nice);
    assert!(by > 0, "lowered by default");
    let lowered = (base + by).min(19);
    assert!(
        engine_threads.iter().all(|&n| n == lowered),
        "engine threads at nice {lowered}: {after:?}"
    );
    // Everything else keeps its priority, this thread included.
    assert!(
        after
            .iter()
            .filter(|(name, _)| name != "parlance-engine")
            .all(|&(_, n)| n <= base),
        "{after:?}"
    );
    drop(engine);
}
