//! The binaries refuse to start on bad configuration with one line that names
//! the variable — and never echoes a secret.

use std::process::Command;

fn run_api(envs: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const GOOD_KEY: &str = "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0wMTIzNDU="; // 32 bytes

/// A configuration that would start (were the database there), over
/// plaintext hops (allowed for these tests of other variables).
const BASE: [(&str, &str); 7] = [
    ("CLINFLOW_ALLOW_PLAINTEXT", "1"),
    ("DATABASE_URL", "postgres://clinflow_app@127.0.0.1:5432/nowhere"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("CLINFLOW_MASTER_KEY", GOOD_KEY),
    ("JWT_SECRET", "tH1s-is-a-l0ng-and-rand0m-JWT-secret!"),
    ("CLINFLOW_INDEX_KEY", "an0ther-l0ng-and-rand0m-INDEX-key!#"),
    ("AUDIT_SIGNING_KEY", SIGNING_KEY),
];

/// An Ed25519 key of these tests only (openssl genpkey -algorithm ed25519).
const SIGNING_KEY: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIHqAoaWtnnAb7uFwEpRhuOJhHy+3HTpqjCEMu9dYbhnU
-----END PRIVATE KEY-----";

#[test]
fn bad_secrets_stop_the_api_with_one_line() {
    let base = BASE;
    let cases: [(&str, Option<&str>, &str); 11] = [
        ("CLINFLOW_INDEX_KEY", Some("too-short-key"), "CLINFLOW_INDEX_KEY: must be at least 32 bytes, got 13"),
        ("JWT_SECRET", Some("short-secret"), "JWT_SECRET: must be at least 32 bytes, got 12"),
        ("JWT_SECRET", None, "JWT_SECRET: is not set"),
        (
            "CLINFLOW_MASTER_KEY",
            Some("bm90LTMyLWJ5dGVz"),
            "CLINFLOW_MASTER_KEY: must decode to exactly 32 bytes, got 12 bytes",
        ),
        ("CLINFLOW_MASTER_KEY", Some("%%%not-base64%%%"), "CLINFLOW_MASTER_KEY: is not valid base64"),
        ("DATABASE_URL", Some("mysql://root:hunter2@db/x"), "DATABASE_URL: must be a URL starting with postgres://"),
        ("API_ADDR", Some("localhost"), "API_ADDR: must be host:port"),
        ("AUDIT_SIGNING_KEY", None, "AUDIT_SIGNING_KEY: is not set"),
        (
            "AUDIT_SIGNING_KEY",
            Some("bm90LWEta2V5LWJ1dC1sb25nLWVub3VnaC10by1ub3QtYmUtc2hvcnQ="),
            "AUDIT_SIGNING_KEY: is not a PEM Ed25519 private key",
        ),
        ("AUDIT_SIGNING_KEY_ID", Some("worker"), "AUDIT_SIGNING_KEY_ID: must be api or api.<"),
        // The api holds no key that can write the audit chain.
        (
            "AUDIT_HMAC_KEY",
            Some("an-old-hmac-key-the-sink-alone-may-hold"),
            "AUDIT_HMAC_KEY: is the audit sink's alone",
        ),
    ];
    for (name, value, expected) in cases {
        let mut envs: Vec<(&str, &str)> = base.iter().copied().filter(|(n, _)| *n != name).collect();
        if let Some(v) = value {
            envs.push((name, v));
        }
        let (ok, stderr) = run_api(&envs);
        assert!(!ok, "{name} should stop the api");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(expected), "{name}: {stderr}");
        if let Some(v) = value.filter(|_| name != "API_ADDR") {
            assert!(!stderr.contains(v), "{name}'s value leaked: {stderr}");
        }
    }
}

#[test]
fn a_signing_key_the_verifiers_do_not_know_stops_the_api_with_one_line() {
    // The tests' public keys know another key as `api`; and none as `api.2`.
    let public = clinflow::testing::audit_keys().public_dir();
    let public = public.to_str().unwrap();
    let cases = [
        (None, "AUDIT_SIGNING_KEY: is not the key AUDIT_PUBLIC_KEYS knows as api"),
        (Some("api.2"), "AUDIT_SIGNING_KEY: AUDIT_PUBLIC_KEYS has no api.2.pem"),
    ];
    for (key_id, expected) in cases {
        let mut envs = BASE.to_vec();
        envs.push(("AUDIT_PUBLIC_KEYS", public));
        envs.extend(key_id.map(|id| ("AUDIT_SIGNING_KEY_ID", id)));
        let (ok, stderr) = run_api(&envs);
        assert!(!ok, "{key_id:?} should stop the api");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(expected), "{key_id:?}: {stderr}");
    }
}

#[test]
fn edge_malformed_http_edge_settings_stop_the_api_with_one_line() {
    let cases = [
        ("TRUSTED_PROXIES", "10.0.0.0/8, 10.0.0.0/33", "TRUSTED_PROXIES: `10.0.0.0/33` is not a CIDR"),
        ("TRUSTED_PROXIES", "10.0.0.0/8;192.168.0.0/16", "TRUSTED_PROXIES: `10.0.0.0/8;192.168.0.0/16` is not a CIDR"),
        ("TRUSTED_PROXIES", "load-balancer", "TRUSTED_PROXIES: `load-balancer` is not a CIDR"),
        ("API_DOCS", "maybe", "API_DOCS: must be on or off"),
        ("API_REQUEST_TIMEOUT_SECONDS", "30s", "API_REQUEST_TIMEOUT_SECONDS: must be a whole number"),
        ("API_BATCH_TIMEOUT_SECONDS", "-1", "API_BATCH_TIMEOUT_SECONDS: must be a whole number"),
        ("API_MAX_CONNECTIONS", "lots", "API_MAX_CONNECTIONS: must be a whole number"),
        ("API_HEADER_TIMEOUT_SECONDS", "10s", "API_HEADER_TIMEOUT_SECONDS: must be a whole number"),
        ("API_IDLE_TIMEOUT_SECONDS", "1.5", "API_IDLE_TIMEOUT_SECONDS: must be a whole number"),
        ("API_BODY_STALL_SECONDS", "-20", "API_BODY_STALL_SECONDS: must be a whole number"),
    ];
    for (name, value, expected) in cases {
        let mut envs = BASE.to_vec();
        envs.push((name, value));
        let (ok, stderr) = run_api(&envs);
        assert!(!ok, "{name}={value} should stop the api");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(expected), "{name}={value}: {stderr}");
    }
    // Well-formed, they pass the configuration (and the api stops later,
    // at the database that is not there).
    let mut envs = BASE.to_vec();
    envs.extend([
        ("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.10, fd00::/8"),
        ("API_DOCS", "off"),
        ("API_MAX_CONNECTIONS", "4000"),
        ("API_HEADER_TIMEOUT_SECONDS", "5"),
        ("API_IDLE_TIMEOUT_SECONDS", "90"),
        ("API_BODY_STALL_SECONDS", "30"),
    ]);
    let (ok, stderr) = run_api(&envs);
    assert!(!ok && stderr.contains("PostgreSQL"), "{stderr}");
}

/// A URL that does not ask for a verified TLS connection stops the api with
/// one line naming the variable (never echoing the URL's password), unless
/// `CLINFLOW_ALLOW_PLAINTEXT=1`; so does an amqps:// URL without its CA or a
/// CA file that is not there.
#[test]
fn a_hop_without_verified_tls_stops_the_api_with_one_line_unless_plaintext_is_allowed() {
    let verified_db = "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere?sslmode=verify-full";
    let verified_amqp = "amqps://guest:hunter2@127.0.0.1:5671/%2f?cacertfile=/etc/ssl/certs/ca-certificates.crt";
    let refused = "is not a verified TLS connection";
    let cases: [(&str, &str, &str); 7] = [
        ("DATABASE_URL", "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere", refused),
        ("DATABASE_URL", "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere?sslmode=require", refused),
        ("DATABASE_URL", "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere?sslmode=verify-ca", refused),
        ("AMQP_URL", "amqp://guest:hunter2@127.0.0.1:5672/%2f", refused),
        ("AMQP_URL", "amqps://guest:hunter2@127.0.0.1:5671/%2f", "amqps:// needs ?cacertfile=PATH"),
        (
            "AMQP_URL",
            "amqps://guest:hunter2@127.0.0.1:5671/%2f?cacertfile=/nonexistent/ca.pem",
            "cacertfile \"/nonexistent/ca.pem\"",
        ),
        (
            "DATABASE_URL",
            "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
            "sslrootcert \"/nonexistent/ca.pem\"",
        ),
    ];
    let keys =
        BASE.iter().copied().filter(|(n, _)| !["CLINFLOW_ALLOW_PLAINTEXT", "DATABASE_URL", "AMQP_URL"].contains(n));
    for (name, value, expected) in cases {
        let mut envs: Vec<(&str, &str)> = keys.clone().collect();
        envs.extend(
            [("DATABASE_URL", verified_db), ("AMQP_URL", verified_amqp)].into_iter().filter(|(n, _)| *n != name),
        );
        envs.push((name, value));
        let (ok, stderr) = run_api(&envs);
        assert!(!ok, "{name}={value} should stop the api");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(&format!("{name}: ")) && lines[0].contains(expected), "{name}={value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "{name}'s password leaked: {stderr}");
    }
    // With the flag, a plaintext URL passes the check (and the api goes on to
    // connect, which fails here for another reason: no such database).
    let mut envs: Vec<(&str, &str)> = BASE.to_vec();
    envs.retain(|(n, _)| *n != "DATABASE_URL");
    envs.push(("DATABASE_URL", "postgres://clinflow_app:hunter2@127.0.0.1:5432/nowhere"));
    let (ok, stderr) = run_api(&envs);
    assert!(!ok);
    assert!(!stderr.contains(refused) && stderr.contains("connecting to PostgreSQL (DATABASE_URL)"), "{stderr}");
    assert!(stderr.contains("CLINFLOW_ALLOW_PLAINTEXT=1"), "the api warns that plaintext is allowed: {stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
}

/// PostgreSQL's hop from the wrong side: a server whose certificate comes
/// from another CA, or from the trusted CA for another name (an IMPOSTOR,
/// clinflow::testing::tls), stops the api with one line naming the hop.
#[tokio::test]
async fn a_database_it_cannot_verify_stops_the_api_with_one_line_naming_the_hop() {
    use clinflow::testing::tls::{Preamble, TestCa, impostor};
    let trusted = TestCa::new("the database's CA");
    let other = TestCa::new("another CA");
    for ((cert, key), why) in
        [(other.leaf(&["127.0.0.1"]), "unknownissuer"), (trusted.leaf(&["db.example"]), "not valid for name")]
    {
        let port = impostor(cert, key, Preamble::Postgres).await;
        let url = format!(
            "postgres://clinflow_api@127.0.0.1:{port}/clinflow?sslmode=verify-full&sslrootcert={}",
            trusted.pem_path().display()
        );
        let mut envs: Vec<(String, String)> = BASE
            .iter()
            .filter(|(n, _)| *n != "DATABASE_URL")
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect();
        envs.push(("DATABASE_URL".into(), url));
        let (ok, stderr) = tokio::task::spawn_blocking(move || {
            let envs: Vec<(&str, &str)> = envs.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
            run_api(&envs)
        })
        .await
        .unwrap();
        assert!(!ok, "the api must not start");
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.contains("CLINFLOW_ALLOW_PLAINTEXT")).collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains("connecting to PostgreSQL (DATABASE_URL)"), "{stderr}");
        assert!(lines[0].to_lowercase().contains(why), "{stderr}");
    }
}

/// Secrets as deployments hand them over: from a file (`NAME_FILE`), never
/// from both places at once; and two keys that must differ may not be the
/// same. Each refusal is one line naming the variable, never the value.
#[test]
fn secrets_come_from_files_and_two_keys_that_must_differ_are_refused_when_equal() {
    let dir = tempfile::tempdir().unwrap();
    let jwt = BASE.iter().find(|(n, _)| *n == "JWT_SECRET").unwrap().1;
    let file = dir.path().join("jwt_secret");
    std::fs::write(&file, format!("{jwt}\n")).unwrap();
    let file = file.to_str().unwrap();
    let without_jwt = || BASE.iter().copied().filter(|(n, _)| *n != "JWT_SECRET").collect::<Vec<_>>();

    let mut envs = without_jwt();
    envs.push(("JWT_SECRET_FILE", file));
    let (ok, stderr) = run_api(&envs);
    assert!(!ok && stderr.contains("connecting to PostgreSQL"), "read from the file, the api goes on: {stderr}");

    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        ([BASE.to_vec(), vec![("JWT_SECRET_FILE", file)]].concat(), "JWT_SECRET: is set and so is JWT_SECRET_FILE"),
        (
            [without_jwt(), vec![("JWT_SECRET_FILE", "/nonexistent/jwt")]].concat(),
            "JWT_SECRET: JWT_SECRET_FILE \"/nonexistent/jwt\"",
        ),
        (
            [
                BASE.iter().copied().filter(|(n, _)| *n != "CLINFLOW_INDEX_KEY").collect(),
                vec![("CLINFLOW_INDEX_KEY", jwt)],
            ]
            .concat(),
            "JWT_SECRET: is the same as CLINFLOW_INDEX_KEY",
        ),
    ];
    for (envs, expected) in cases {
        let (ok, stderr) = run_api(&envs);
        assert!(!ok);
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(expected), "{stderr}");
        assert!(!stderr.contains(jwt), "a secret leaked: {stderr}");
    }
}

/// HTTPS settings the api cannot serve with stop it at start with one line
/// naming the variable, and never echo a key: one of the two files without
/// the other, a file it cannot read or that holds no certificate or key, a
/// key that is not the certificate's, a TLS version it does not offer.
#[test]
fn https_settings_it_cannot_serve_with_stop_the_api_with_one_line_naming_the_variable() {
    let good = crate::https::ApiCert::new();
    let other = crate::https::ApiCert::new();
    let (cert, key, other_key) = (good.cert.to_str().unwrap(), good.key.to_str().unwrap(), other.key.to_str().unwrap());
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (vec![("API_TLS_CERT", cert)], "API_TLS_KEY: is not set, but API_TLS_CERT is"),
        (vec![("API_TLS_KEY", key)], "API_TLS_CERT: is not set, but API_TLS_KEY is"),
        (vec![("API_TLS_MIN_VERSION", "1.2")], "API_TLS_MIN_VERSION: is set, but the api serves plain HTTP"),
        (
            vec![("API_TLS_CERT", "/nonexistent/api.pem"), ("API_TLS_KEY", key)],
            "API_TLS_CERT: \"/nonexistent/api.pem\": ",
        ),
        (
            vec![("API_TLS_CERT", cert), ("API_TLS_KEY", "/nonexistent/api.key")],
            "API_TLS_KEY: \"/nonexistent/api.key\": ",
        ),
        (vec![("API_TLS_CERT", "/tmp"), ("API_TLS_KEY", key)], "API_TLS_CERT: \"/tmp\": "),
        (vec![("API_TLS_CERT", key), ("API_TLS_KEY", key)], "API_TLS_CERT: "),
        (vec![("API_TLS_CERT", cert), ("API_TLS_KEY", cert)], "API_TLS_KEY: "),
        (
            vec![("API_TLS_CERT", cert), ("API_TLS_KEY", other_key)],
            "API_TLS_KEY: is not the key of the certificate in API_TLS_CERT",
        ),
        (
            vec![("API_TLS_CERT", cert), ("API_TLS_KEY", key), ("API_TLS_MIN_VERSION", "1.1")],
            "API_TLS_MIN_VERSION: must be 1.3 (the default) or 1.2",
        ),
    ];
    let secret = |path: &std::path::Path| std::fs::read_to_string(path).unwrap().lines().nth(1).unwrap().to_owned();
    let (key_line, other_key_line) = (secret(&good.key), secret(&other.key));
    for (tls, expected) in cases {
        let envs = [BASE.to_vec(), tls.clone()].concat();
        let (ok, stderr) = run_api(&envs);
        assert!(!ok, "{tls:?} should stop the api");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
        assert!(lines[0].contains(expected), "{tls:?}: {stderr}");
        assert!(!stderr.contains(&key_line) && !stderr.contains(&other_key_line), "a key leaked: {stderr}");
    }
    // Both files, and they match: the api goes on (to stop at the database
    // that is not there).
    let envs =
        [BASE.to_vec(), vec![("API_TLS_CERT", cert), ("API_TLS_KEY", key), ("API_TLS_MIN_VERSION", "1.2")]].concat();
    let (ok, stderr) = run_api(&envs);
    assert!(!ok && stderr.contains("connecting to PostgreSQL"), "{stderr}");
}
