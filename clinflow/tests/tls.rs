//! TLS on the database and broker hops, from the wrong side: a client that
//! asks for TLS refuses a server whose certificate comes from another CA or
//! names another host, and never falls back to plain TCP. The real servers
//! (`./dev/test` gives them the development CA's certificate) are refused by
//! a client that trusts another CA; the IMPOSTORS of `clinflow::testing::tls`
//! present a certificate of the trusted CA for another name, or refuse TLS,
//! as a man in the middle would. (MedCAT's hop: worker/tests/medcat.rs; the
//! one-line start-up errors naming each hop: the binaries' tests.)
#![cfg(feature = "testing")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use clinflow::testing::tls::{Preamble, TestCa, impostor};
use clinflow::testing::{self};
use secrecy::SecretString;
use sqlx::Connection;

/// A refusal names a certificate problem, on one line.
fn assert_refused(err: &str, why: &str) {
    assert!(!err.contains('\n'), "one line expected: {err}");
    let lower = err.to_lowercase();
    assert!(lower.contains("certificate") && lower.contains(why), "expected a certificate refusal ({why}): {err}");
}

async fn amqp_error(url: String) -> String {
    let url = SecretString::from(url);
    let connect = clinflow::amqp::connect(&url, "clinflow-tls-test");
    let result = tokio::time::timeout(Duration::from_secs(20), connect).await.expect("an answer within 20 s");
    result.expect_err("the connection must be refused").to_string()
}

async fn pg_error(url: String) -> String {
    let connect = sqlx::PgConnection::connect(&url);
    let result = tokio::time::timeout(Duration::from_secs(20), connect).await.expect("an answer within 20 s");
    result.expect_err("the connection must be refused").to_string()
}

#[tokio::test]
async fn rabbitmq_refuses_the_real_broker_when_its_ca_is_not_the_one_trusted() {
    let Some(_) = testing::tls_dir() else { return eprintln!("skipped: the tests run without TLS") };
    let other = TestCa::new("another CA");
    let port = testing::amqp_url_string().split(':').nth(3).and_then(|p| p.split('/').next()?.parse::<u16>().ok());
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}", port.unwrap(), other.pem_path().display());
    let err = amqp_error(url).await;
    assert!(err.starts_with("RabbitMQ"), "{err}");
    assert_refused(&err, "unknownissuer");
}

#[tokio::test]
async fn rabbitmq_refuses_a_certificate_of_its_ca_for_another_name() {
    let trusted = TestCa::new("the broker's CA");
    let (cert, key) = trusted.leaf(&["broker.example"]);
    let port = impostor(cert, key, Preamble::None).await;
    let err =
        amqp_error(format!("amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={}", trusted.pem_path().display()))
            .await;
    assert_refused(&err, "not valid for name");
}

#[tokio::test]
async fn amqps_to_a_plain_listener_fails_instead_of_falling_back() {
    let trusted = TestCa::new("the broker's CA");
    // A server that answers the TLS hello with AMQP's plain protocol header,
    // as RabbitMQ's plain port does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, b"AMQP\x00\x00\x09\x01").await;
        }
    });
    let url = format!("amqps://guest:guest@127.0.0.1:{port}/%2f?cacertfile={}", trusted.pem_path().display());
    let err = amqp_error(url).await;
    assert!(err.starts_with("RabbitMQ") && !err.contains('\n'), "{err}");
}

#[tokio::test]
async fn postgres_refuses_the_real_server_when_its_ca_is_not_the_one_trusted() {
    let Some(_) = testing::tls_dir() else { return eprintln!("skipped: the tests run without TLS") };
    let other = TestCa::new("another CA");
    let url = format!(
        "postgres://postgres@127.0.0.1:5432/postgres?sslmode=verify-full&sslrootcert={}",
        other.pem_path().display()
    );
    assert_refused(&pg_error(url).await, "unknownissuer");
}

#[tokio::test]
async fn postgres_refuses_a_certificate_of_its_ca_for_another_name() {
    let trusted = TestCa::new("the database's CA");
    let (cert, key) = trusted.leaf(&["db.example"]);
    let port = impostor(cert, key, Preamble::Postgres).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        trusted.pem_path().display()
    );
    assert_refused(&pg_error(url).await, "not valid for name");
}

#[tokio::test]
async fn verify_full_to_a_server_that_refuses_tls_fails_instead_of_falling_back() {
    let trusted = TestCa::new("the database's CA");
    let (cert, key) = trusted.leaf(&["127.0.0.1"]);
    let port = impostor(cert, key, Preamble::PostgresWithoutTls).await;
    let url = format!(
        "postgres://postgres@127.0.0.1:{port}/postgres?sslmode=verify-full&sslrootcert={}",
        trusted.pem_path().display()
    );
    let err = pg_error(url).await;
    assert!(err.to_lowercase().contains("tls") && !err.contains('\n'), "{err}");
}
