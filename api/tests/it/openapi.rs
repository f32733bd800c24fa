//! The OpenAPI description against the router: every route is an operation
//! and every operation a route; roles and security are the access
//! declarations'; the served document is OpenAPI 3.1 that a maintained
//! validator accepts; and what the api answers is what the document says.

use std::collections::{BTreeMap, BTreeSet};

use clinflow_api::access::{self, Access};
use clinflow_api::openapi;
use clinflow_api::users::Role;
use serde_json::{Value, json};

use crate::common::Stack;

const METHODS: &[&str] = &["get", "put", "post", "delete", "options", "head", "patch", "trace", "query"];

fn spec() -> Value {
    serde_json::to_value(openapi::spec()).unwrap()
}

/// (METHOD, path).
type Route = (String, String);

/// (METHOD, path) of every operation of a document.
fn operations(spec: &Value) -> BTreeSet<Route> {
    let mut all = BTreeSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (key, _) in item.as_object().unwrap() {
            if METHODS.contains(&key.as_str()) {
                all.insert((key.to_uppercase(), path.clone()));
            }
        }
        for (method, _) in item.get("additionalOperations").and_then(Value::as_object).into_iter().flatten() {
            all.insert((method.to_uppercase(), path.clone()));
        }
    }
    all
}

fn routes() -> BTreeSet<Route> {
    access::endpoints().iter().map(|e| (e.method.to_string(), e.path.to_owned())).collect()
}

/// Routes the document lacks, and operations that are no route.
fn drift(spec: &Value) -> (Vec<Route>, Vec<Route>) {
    let (routes, operations) = (routes(), operations(spec));
    (routes.difference(&operations).cloned().collect(), operations.difference(&routes).cloned().collect())
}

fn operation<'a>(spec: &'a Value, method: &str, path: &str) -> &'a Value {
    &spec["paths"][path][method.to_lowercase()]
}

#[test]
fn openapi_describes_every_route_and_nothing_else() {
    let spec = spec();
    let (missing, extra) = drift(&spec);
    assert!(missing.is_empty(), "routes missing from the OpenAPI document: {missing:?}");
    assert!(extra.is_empty(), "operations in the OpenAPI document that are no route: {extra:?}");
    assert_eq!(operations(&spec).len(), access::endpoints().len());

    // The check sees a route dropped from the document, and an operation
    // added to it.
    let mut doctored = spec.clone();
    doctored["paths"]["/v1/documents/{id}"].as_object_mut().unwrap().remove("get");
    doctored["paths"]["/v1/documents/{id}"]["delete"] = operation(&spec, "GET", "/v1/documents/{id}").clone();
    let (missing, extra) = drift(&doctored);
    assert_eq!(missing, [("GET".to_owned(), "/v1/documents/{id}".to_owned())]);
    assert_eq!(extra, [("DELETE".to_owned(), "/v1/documents/{id}".to_owned())]);
}

#[test]
fn openapi_roles_and_security_are_the_access_declarations() {
    let spec = spec();
    assert_eq!(spec["components"]["securitySchemes"][openapi::BEARER]["scheme"], "bearer");
    assert!(spec["components"]["securitySchemes"][openapi::BEARER]["description"].as_str().unwrap().contains("cfk_"));
    for e in access::endpoints() {
        let op = operation(&spec, e.method.as_str(), e.path);
        let what = format!("{} {}", e.method, e.path);
        let description = op["description"].as_str().unwrap_or_default();
        match e.access {
            Access::Public => {
                assert_eq!(op["x-roles"], json!(["public"]), "{what}");
                assert!(op.get("security").is_none(), "{what}");
                assert!(description.ends_with("Public: no credentials needed."), "{what}: {description}");
            }
            Access::Roles { roles, .. } => {
                let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
                assert_eq!(op["x-roles"], json!(names), "{what}");
                assert_eq!(op["security"], json!([{ openapi::BEARER: [] }]), "{what}");
                assert!(description.ends_with(&format!("Roles: {}.", names.join(", "))), "{what}: {description}");
                for status in ["401", "403", "503"] {
                    assert!(op["responses"].get(status).is_some(), "{what} lacks {status}");
                }
            }
        }
    }
}

/// `#/components/schemas/X` → X.
fn schema_name(reference: &Value) -> Option<&str> {
    reference.as_str()?.strip_prefix("#/components/schemas/")
}

fn refs(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                if k == "$ref" {
                    found.push(v.as_str().unwrap().to_owned());
                } else {
                    refs(v, found);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, found)),
        _ => {}
    }
}

#[test]
fn openapi_errors_bodies_and_parameters_are_complete() {
    let spec = spec();
    let schemas = spec["components"]["schemas"].as_object().unwrap();
    let mut found = Vec::new();
    refs(&spec, &mut found);
    for r in &found {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("a $ref outside the schemas: {r}"));
        assert!(schemas.contains_key(name), "{r} names no schema");
    }
    let mut operation_ids = BTreeSet::new();
    for (method, path) in operations(&spec) {
        let op = operation(&spec, &method, &path);
        let what = format!("{method} {path}");
        assert!(operation_ids.insert(op["operationId"].as_str().unwrap().to_owned()), "{what}: operationId reused");
        assert!(op["summary"].as_str().is_some_and(|s| !s.is_empty()), "{what} has no summary");
        assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{what} has no tag");
        let responses = op["responses"].as_object().unwrap();
        assert!(responses.keys().any(|s| s.starts_with('2')), "{what} has no success answer");
        for (status, response) in responses {
            let health = path == "/healthz" || path == "/readyz";
            if status.as_str() >= "400" && !health {
                let schema = &response["content"]["application/json"]["schema"]["$ref"];
                assert_eq!(schema_name(schema), Some("ErrorBody"), "{what} {status}");
                assert!(response["description"].as_str().unwrap().contains("- `"), "{what} {status}: no codes");
                if status == "429" || status == "503" {
                    assert!(response["headers"].get("Retry-After").is_some(), "{what} {status}: no Retry-After");
                }
            }
        }
        // Every {param} of the path is declared, and no other path parameter.
        let in_path: BTreeSet<&str> =
            path.split('/').filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(in_path, declared, "{what}");
    }
}

/// The validator `./dev/test` installs (dev/lib.sh: ensure_openapi_validator).
fn validator() -> std::path::PathBuf {
    let installed =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.dev/openapi-validator/bin/openapi-spec-validator");
    let path = std::env::var_os("CLINFLOW_TEST_OPENAPI_VALIDATOR").map_or(installed, Into::into);
    assert!(
        path.exists(),
        "openapi-spec-validator is not at {} (./dev/test installs it; or `source dev/lib.sh; ensure_openapi_validator`)",
        path.display()
    );
    path
}

#[tokio::test]
async fn openapi_is_served_as_3_1_valid_and_documents_what_the_api_answers() {
    let stack = Stack::start().await;

    // Served without credentials, as OpenAPI 3.1, the same document.
    let response = stack.http.get(format!("{}/openapi.json", stack.base)).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
    let served: Value = response.json().await.unwrap();
    assert!(served["openapi"].as_str().unwrap().starts_with("3.1."), "{}", served["openapi"]);
    assert_eq!(served, spec());

    let page = stack.http.get(format!("{}/docs", stack.base)).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"id="api-reference""#) && html.contains("/v1/documents/{id}/status"), "{html}");

    // A maintained validator accepts it as 3.1.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(&served).unwrap()).unwrap();
    let out = tokio::process::Command::new(validator())
        .args(["--schema", "3.1", "--validation-errors", "all"])
        .arg(&file)
        .output()
        .await
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim_end().ends_with("OK"), "openapi-spec-validator: {said}");

    // Every route called once, anonymously and as a role allowed: each
    // answer is one its operation lists, and an error answer has the error
    // body.
    let mut tokens = BTreeMap::new();
    for role in [Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer] {
        stack.user(role.as_str(), role).await;
        tokens.insert(role.as_str(), stack.login(role.as_str()).await);
    }
    for e in access::endpoints() {
        let method = e.method.as_str();
        let path = e.path.replace("{id}", &uuid::Uuid::now_v7().to_string());
        let path = path.replace("{user_id}", &uuid::Uuid::now_v7().to_string());
        let body = (method != "GET" && method != "DELETE").then(|| json!({}));
        let role = match e.access {
            Access::Public => None,
            Access::Roles { roles, .. } => Some(roles[0].as_str()),
        };
        let mut calls = vec![(None, path.clone())];
        calls.extend(role.map(|r| (Some(r), path)));
        // A path parameter that is no id, and a query parameter of the wrong
        // type: JSON errors too, documented, without the value.
        if e.path.contains('{') {
            let bad: Vec<&str> = e.path.split('/').map(|s| if s.starts_with('{') { "no-such-id" } else { s }).collect();
            calls.push((role, bad.join("/")));
        }
        if e.path == "/v1/audit/events" {
            calls.push((role, format!("{}?limit=no-such-number", e.path)));
        }
        for (caller, path) in calls {
            let token = caller.map(|r| tokens[r].clone());
            let (status, answer) = stack.call(method, &path, token.as_deref(), body.as_ref()).await;
            assert!(
                !answer.to_string().contains("no-such"),
                "{method} {path}: the answer quotes the request: {answer}"
            );
            let documented = &served["paths"][e.path][method.to_lowercase()]["responses"];
            let what = format!("{method} {path} as {}", caller.unwrap_or("anonymous"));
            assert!(documented.get(status.to_string()).is_some(), "{what}: {status} is not documented: {answer}");
            if status >= 400 && e.path != "/healthz" && e.path != "/readyz" {
                assert!(answer["error"]["code"].is_string() && answer["error"]["message"].is_string(), "{what}");
            }
            if e.path == "/v1/auth/logout" && status == 204 {
                tokens.insert(role.unwrap(), stack.login(role.unwrap()).await);
            }
        }
    }
    stack.stop().await;
}
