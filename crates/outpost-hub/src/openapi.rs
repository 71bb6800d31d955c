//! The hub's API described for machines: `docs/openapi.yaml`, served at `GET /v1/openapi.yaml`
//! so users can generate clients and the test suite can fuzz the hub against it (schemathesis).

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;

/// The OpenAPI 3 description of docs/protocol.md.
pub const OPENAPI_YAML: &str = include_str!("../../../docs/openapi.yaml");

pub async fn spec() -> impl IntoResponse {
    ([(CONTENT_TYPE, "application/yaml")], OPENAPI_YAML)
}
