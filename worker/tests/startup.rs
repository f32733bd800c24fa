//! The worker at start, from the wrong side of each hop it opens first: a
//! server it cannot verify stops it with one line naming the variable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Stdio;

use base64::Engine as _;
use clinflow::testing::tls::{Preamble, TestCa, impostor};

async fn run_worker(args: &[&str], envs: &[(&str, String)]) -> (bool, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(clinflow::testing::audit_keys().env("worker"))
        .env("CLINFLOW_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(clinflow::testing::master_key()))
        .env("RUST_LOG", "error")
        .envs(envs.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output();
    let out =
        tokio::time::timeout(std::time::Duration::from_secs(30), out).await.expect("an exit within 30 s").unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn assert_one_line(stderr: &str, names: &str, why: &str) {
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected, got: {stderr}");
    assert!(lines[0].contains(names) && lines[0].to_lowercase().contains(why), "{stderr}");
}

#[tokio::test]
async fn a_medcat_or_broker_it_cannot_verify_stops_the_worker_with_one_line_naming_the_hop() {
    let trusted = TestCa::new("the deployment's CA");
    let other = TestCa::new("another CA");
    let ca = trusted.pem_path().display().to_string();
    for ((cert, key), why) in
        [(other.leaf(&["127.0.0.1"]), "unknownissuer"), (trusted.leaf(&["elsewhere.example"]), "not valid for name")]
    {
        // MedCAT: asked for its model first thing.
        let port = impostor(cert.clone(), key.clone_key(), Preamble::None).await;
        let envs = [
            ("DATABASE_URL", "postgres://clinflow_worker@127.0.0.1:5432/nowhere?sslmode=verify-full".to_owned()),
            ("AMQP_URL", format!("amqps://guest:guest@127.0.0.1:5671/%2f?cacertfile={ca}")),
            ("MEDCAT_URL", format!("https://127.0.0.1:{port}")),
            ("MEDCAT_CA_FILE", ca.clone()),
        ];
        let (ok, stderr) = run_worker(&[], &envs).await;
        assert!(!ok);
        assert_one_line(&stderr, "asking MedCAT for its model (MEDCAT_URL)", why);

        // RabbitMQ: the operator commands connect to it first.
        let port = impostor(cert, key, Preamble::None).await;
        let envs = [("AMQP_URL", format!("amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={ca}"))];
        let (ok, stderr) = run_worker(&["dead-letters", "list"], &envs).await;
        assert!(!ok);
        assert_one_line(&stderr, "connecting to RabbitMQ (AMQP_URL)", why);
    }
}
