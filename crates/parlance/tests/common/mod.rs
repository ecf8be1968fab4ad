//! Test harness: starts the real `parlance` binary on a free loopback port with the real default
//! model, and talks to it over HTTP. The server exits when the test process goes away (its
//! standard input closes), so no server outlives the tests.

#![allow(dead_code)]

pub mod mock_upstream;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

/// The default model, pulled by `parlance pull` before the tests (CI and the test script do).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("PARLANCE_TEST_MODEL") {
        return PathBuf::from(p);
    }
    let base = std::env::var_os("PARLANCE_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("parlance")))
        .expect("a cache directory");
    let p = base.join("models").join("SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "the default model is missing at {}: run `cargo run -p parlance -- pull` first",
        p.display()
    );
    p
}

pub const MODEL: &str = "smollm2";

/// A name unique to this process and call.
pub fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{}-{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running server.
pub struct Server {
    pub child: Child,
    pub base: String,
    pub stderr: std::sync::Mutex<mpsc::Receiver<String>>,
}

impl Server {
    /// Starts the server serving the default model as `smollm2`, plus `extra` flags.
    pub fn start(extra: &[&str]) -> Server {
        Self::start_env(extra, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let model = format!("{MODEL}={}", model_path().display());
        let mut args = vec![
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--model",
            &model,
            "--exit-on-stdin-eof",
        ];
        args.extend_from_slice(extra);
        Self::start_with_env(&args, env)
    }

    pub fn start_raw(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    /// [`Server::start_raw`] with extra environment variables.
    #[expect(
        clippy::zombie_processes,
        reason = "Server's Drop kills the child and waits for it"
    )]
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        // Each server gets its own data directory (its own SQLite database) unless the test
        // names a database.
        let data = std::env::temp_dir().join(format!("parlance-test-{}", uuid_like()));
        let mut child = Command::new(env!("CARGO_BIN_EXE_parlance"))
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("PARLANCE_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("PARLANCE_DATA_DIR", &data)
            .env_remove("PARLANCE_DATABASE_URL")
            .env_remove("PARLANCE_REDIS_URL")
            .env_remove("PARLANCE_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .env_remove("PARLANCE_API_KEYS")
            // Several servers share these cores while the tests run: llama.cpp's OpenMP threads
            // then sleep at their barriers instead of spinning against each other (which made a
            // token take over a second and the suite twice as long).
            .env(
                "OMP_WAIT_POLICY",
                std::env::var("OMP_WAIT_POLICY").unwrap_or_else(|_| "PASSIVE".into()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn parlance");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server] {line}");
                if tx.send(line).is_err() {
                    // Keep draining so the server never blocks on a full pipe.
                }
            }
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let line = rx
                .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
                .expect("server did not say where it listens");
            if let Some(i) = line.find("listening on http://") {
                // The address ends where the line (or, in JSON logs, the string) does.
                let addr: String = line[i + "listening on http://".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | ':' | '[' | ']'))
                    .collect();
                return Server {
                    child,
                    base: format!("http://{addr}"),
                    stderr: std::sync::Mutex::new(rx),
                };
            }
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run `kill` (procps)");
        assert!(
            status.success(),
            "kill -TERM {} failed: {status}",
            self.pid()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(300))
        .build()
        .expect("client")
}

/// The status of a GET.
pub async fn get_status(server: &Server, path: &str) -> u16 {
    client()
        .get(server.url(path))
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

/// Every sample of a Prometheus scrape: `name{labels}` → value.
pub async fn scrape(s: &Server) -> (String, std::collections::HashMap<String, f64>) {
    let r = client().get(s.url("/metrics")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse::<f64>().ok()?))
        })
        .collect();
    (text, samples)
}

/// Posts `body` to the chat completions route and returns the response as it starts (for
/// reading a stream as it comes).
pub async fn send(server: &Server, body: &Value) -> reqwest::Response {
    client()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("send")
}

/// A chat request body for the test model.
pub fn chat(content: &str) -> Value {
    json!({"model": MODEL, "messages": [{"role": "user", "content": content}]})
}

pub async fn post(server: &Server, body: &Value) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let v = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, v)
}

/// Posts a streaming request; returns the status, headers and every `data:` payload in order.
pub async fn post_stream(
    server: &Server,
    body: &Value,
) -> (u16, reqwest::header::HeaderMap, Vec<String>) {
    let r = client()
        .post(server.url("/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .expect("send");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    (status, headers, sse_data(&text))
}

/// The string at `pointer` (`/choices/0/delta/content`) in each chunk of a stream that has one.
pub fn delta_strings(data: &[String], pointer: &str) -> Vec<String> {
    data.iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|v| {
            v.pointer(pointer)
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .collect()
}

/// The `data:` payloads of an SSE body, checking the framing on the way.
pub fn sse_data(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for event in text.split("\n\n") {
        if event.trim().is_empty() {
            continue;
        }
        for line in event.lines() {
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            let data = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an SSE data line: {line:?}"));
            out.push(data.to_owned());
        }
    }
    out
}

/// The text of choice 0 of a non-streamed response.
pub fn content(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_else(|| panic!("no content in {v}"))
        .to_owned()
}

/// Validates a JSON or SSE payload against OpenAI's published spec with the shared tool.
pub fn validate_with_spec(payload: &str) {
    let tool =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/tools/validate_schema.py");
    assert!(tool.is_file(), "missing {}", tool.display());
    let mut child = Command::new("python3")
        .arg(&tool)
        .arg("-")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(payload.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("validator");
    assert!(
        out.status.success(),
        "spec validation failed:\n{}\n{}\npayload: {payload}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
