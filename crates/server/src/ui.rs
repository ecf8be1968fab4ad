//! The web pages served by the binary itself: the chat playground (`/ui/`) and the operator
//! dashboard (`/ui/dashboard`). Their files are embedded at build time, so they work offline;
//! `PARLANCE_UI_DIR` serves them from a folder instead, for working on them without rebuilding.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

use crate::error::Failure;
use parlance_api::ApiError;

/// The embedded files: name, bytes.
const FILES: &[(&str, &str)] = &[
    ("index.html", include_str!("../ui/index.html")),
    ("dashboard.html", include_str!("../ui/dashboard.html")),
    ("style.css", include_str!("../ui/style.css")),
    ("common.js", include_str!("../ui/common.js")),
    ("playground.js", include_str!("../ui/playground.js")),
    ("dashboard.js", include_str!("../ui/dashboard.js")),
    ("favicon.svg", include_str!("../ui/favicon.svg")),
];

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("svg") => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

/// One file's body: from `PARLANCE_UI_DIR` when set, else the embedded copy.
fn body(name: &str) -> Option<String> {
    let embedded = FILES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)?;
    match std::env::var_os("PARLANCE_UI_DIR") {
        Some(dir) => std::fs::read_to_string(std::path::Path::new(&dir).join(name)).ok(),
        None => Some(embedded.to_owned()),
    }
}

fn serve(name: &str) -> Response {
    let Some(text) = body(name) else {
        return Failure(ApiError::RouteNotFound {
            method: "GET".into(),
            path: format!("/ui/{name}"),
        })
        .into_response();
    };
    let mut resp = (StatusCode::OK, text).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(name)),
    );
    // Pages change with the binary: revalidate rather than cache blindly.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    resp
}

/// `GET /`: to the playground.
pub(crate) async fn root() -> Redirect {
    Redirect::temporary("/ui/")
}

/// `GET /ui/`: the playground.
pub(crate) async fn playground() -> Response {
    serve("index.html")
}

/// `GET /ui/dashboard`: the operator dashboard.
pub(crate) async fn dashboard() -> Response {
    serve("dashboard.html")
}

/// `GET /ui/{file}`: a page's asset.
pub(crate) async fn asset(Path(name): Path<String>) -> Response {
    serve(&name)
}
