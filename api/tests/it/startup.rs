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

/// A configuration that would start (were the database there).
const BASE: [(&str, &str); 5] = [
    ("DATABASE_URL", "postgres://clinflow_app@127.0.0.1:5432/nowhere"),
    ("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ("CLINFLOW_MASTER_KEY", GOOD_KEY),
    ("JWT_SECRET", "tH1s-is-a-l0ng-and-rand0m-JWT-secret!"),
    ("CLINFLOW_INDEX_KEY", "an0ther-l0ng-and-rand0m-INDEX-key!#"),
];

#[test]
fn bad_secrets_stop_the_api_with_one_line() {
    let base = BASE;
    let cases: [(&str, Option<&str>, &str); 7] = [
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
fn edge_malformed_http_edge_settings_stop_the_api_with_one_line() {
    let cases = [
        ("TRUSTED_PROXIES", "10.0.0.0/8, 10.0.0.0/33", "TRUSTED_PROXIES: `10.0.0.0/33` is not a CIDR"),
        ("TRUSTED_PROXIES", "10.0.0.0/8;192.168.0.0/16", "TRUSTED_PROXIES: `10.0.0.0/8;192.168.0.0/16` is not a CIDR"),
        ("TRUSTED_PROXIES", "load-balancer", "TRUSTED_PROXIES: `load-balancer` is not a CIDR"),
        ("API_DOCS", "maybe", "API_DOCS: must be on or off"),
        ("API_REQUEST_TIMEOUT_SECONDS", "30s", "API_REQUEST_TIMEOUT_SECONDS: must be a whole number"),
        ("API_BATCH_TIMEOUT_SECONDS", "-1", "API_BATCH_TIMEOUT_SECONDS: must be a whole number"),
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
    envs.extend([("TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.10, fd00::/8"), ("API_DOCS", "off")]);
    let (ok, stderr) = run_api(&envs);
    assert!(!ok && stderr.contains("PostgreSQL"), "{stderr}");
}
