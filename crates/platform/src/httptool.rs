//! Calling a project's HTTP tool: `POST` the call's arguments as JSON, read the answer as the
//! tool's result; failures and timeouts become results the model can read, never panics.

use std::time::Duration;

use crate::projects::HttpTool;

/// The most of a tool's answer the model is shown.
const MAX_RESULT: usize = 16 * 1024;

/// Runs one call and returns the text of the tool message.
pub(crate) async fn call(
    client: &reqwest::Client,
    tool: &HttpTool,
    name: &str,
    call_id: &str,
    arguments: &str,
) -> String {
    let args: serde_json::Value = match serde_json::from_str(if arguments.trim().is_empty() {
        "{}"
    } else {
        arguments
    }) {
        Ok(v) => v,
        Err(e) => {
            return error(&format!(
                "the arguments are not valid JSON ({e}); the tool was not called"
            ))
        }
    };
    let mut req = client
        .post(&tool.url)
        .timeout(Duration::from_millis(tool.timeout_ms))
        .header("x-parlance-tool", name)
        .header("x-parlance-tool-call-id", call_id)
        .json(&args);
    for (k, v) in &tool.headers {
        req = req.header(k, v);
    }
    let started = std::time::Instant::now();
    let result = async {
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    }
    .await;
    match result {
        Ok((status, body)) if status.is_success() => {
            tracing::debug!(
                tool = name,
                ms = started.elapsed().as_millis() as u64,
                "tool answered"
            );
            truncate(body)
        }
        Ok((status, body)) => {
            tracing::warn!(tool = name, %status, "tool failed");
            error(&format!(
                "the tool answered HTTP {}: {}",
                status.as_u16(),
                truncate(body)
            ))
        }
        Err(e) if e.is_timeout() => {
            tracing::warn!(tool = name, "tool timed out");
            error(&format!(
                "the tool did not answer within {} ms",
                tool.timeout_ms
            ))
        }
        Err(e) => {
            tracing::warn!(tool = name, error = %e.without_url(), "tool unreachable");
            error("the tool could not be reached")
        }
    }
}

fn error(message: &str) -> String {
    serde_json::json!({ "error": message }).to_string()
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_RESULT {
        let mut cut = MAX_RESULT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}
