//! The tests' mock upstream as a program, for the gateway benchmark
//! (`scripts/bench-gateway.sh`): `cargo run --release --example mock_upstream -- 127.0.0.1:9100`.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::print_stdout,
    reason = "a test tool"
)]

#[path = "../tests/common/mock_upstream.rs"]
mod mock_upstream;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:9100".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (base, _) = mock_upstream::mock_upstream_at(&addr).await;
        println!("mock upstream at {base}");
        std::future::pending::<()>().await;
    });
}
