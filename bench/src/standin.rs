//! STAND-IN for MedCAT, used by the benchmark's ceiling and backlog runs
//! only: it speaks the medcat-service HTTP contract (the one
//! dev/medcat/check_contract.py checks) and answers at once with a fixed,
//! plausible set of annotations, so what is measured is clinflow's own cost
//! (upload, queues, encryption, database, audit) with the NLP stage taken
//! out. It finds nothing in the text.

use std::path::Path;

use axum::routing::{get, post};
use axum::{Json, Router};
use axum_server::tls_rustls::RustlsConfig;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

pub const MODEL: &str = "bench-standin-1";

/// Concepts the stand-in reports, cycling over the text.
const CONCEPTS: [(&str, &str, &str); 4] = [
    ("38341003", "Hypertension", "T047"),
    ("372567009", "Metformin", "T121"),
    ("29857009", "Chest pain", "T184"),
    ("49436004", "Atrial fibrillation", "T047"),
];
const ANNOTATIONS_PER_DOC: usize = 8;

/// Serves the stand-in on an ephemeral port, over HTTPS with `tls` (the
/// certificate and key files), else plain HTTP; returns its base URL.
pub async fn start(tls: Option<(&Path, &Path)>) -> anyhow::Result<String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let app = Router::new()
        .route("/api/info", get(|| async { Json(info()) }))
        .route("/api/health/live", get(|| async { Json(json!({"status": "UP", "checks": []})) }))
        .route(
            "/api/health/ready",
            get(|| async { Json(json!({"status": "UP", "checks": [{"name": "MedCAT", "status": "UP"}]})) }),
        )
        .route("/api/process", post(process))
        .route("/api/process_bulk", post(process_bulk));
    if let Some((cert, key)) = tls {
        clinflow::tls::install_crypto_provider();
        let config = RustlsConfig::from_pem_file(cert, key).await?;
        let server = axum_server::from_tcp_rustls(listener, config)?;
        tokio::spawn(server.serve(app.into_make_service()));
        return Ok(format!("https://{addr}"));
    }
    let listener = TcpListener::from_std(listener)?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(format!("http://{addr}"))
}

fn info() -> Value {
    json!({"service_app_name": "clinflow-bench STAND-IN (not MedCAT)", "service_language": "en",
           "service_version": "0", "service_model": MODEL,
           "model_card_info": {"ontologies": ["SNOMED-CT"], "meta_cat_model_names": [], "model_last_modified_on": null}})
}

#[derive(Deserialize)]
struct Content {
    text: String,
    #[serde(default)]
    footer: Option<Value>,
}

#[derive(Deserialize)]
struct One {
    content: Content,
}

#[derive(Deserialize)]
struct Bulk {
    content: Vec<Content>,
}

async fn process(Json(req): Json<One>) -> Json<Value> {
    Json(json!({"medcat_info": info(), "result": result(&req.content)}))
}

async fn process_bulk(Json(req): Json<Bulk>) -> Json<Value> {
    let results: Vec<Value> = req.content.iter().map(result).collect();
    Json(json!({"medcat_info": info(), "result": results}))
}

fn result(content: &Content) -> Value {
    let chars = content.text.chars().count();
    let mut entities = serde_json::Map::new();
    for i in 0..ANNOTATIONS_PER_DOC {
        let start = i * 120;
        if start + 10 > chars {
            break;
        }
        let (cui, name, type_id) = CONCEPTS[i % CONCEPTS.len()];
        entities.insert(
            i.to_string(),
            json!({"pretty_name": name, "cui": cui, "type_ids": [type_id], "source_value": name,
                   "detected_name": name, "acc": 1, "context_similarity": 1, "start": start, "end": start + 10,
                   "id": i, "meta_anns": {}}),
        );
    }
    json!({"text": content.text, "annotations": [entities], "success": true,
           "timestamp": "1970-01-01T00:00:00+00:00", "elapsed_time": 0, "footer": content.footer})
}
