//! The api serving HTTPS itself (`API_TLS_CERT`, `API_TLS_KEY`), tried from
//! outside: the binary started with a certificate made at test time (rcgen,
//! `TestCa`), reached by clients that speak TLS by hand (tokio-rustls) so
//! that each sees the certificate and the version it got, and keeps its
//! connection open across a certificate rotation.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use clinflow::testing::tls::TestCa;
use clinflow::testing::{self, TestDb, wait_until};
use clinflow_api::users::{self, Passwords, Role};
use clinflow_ingest::client::{ApiClient, ClientConfig, RetryPolicy};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{AlertDescription, ClientConfig as TlsClientConfig, ProtocolVersion, RootCertStore};
use rustls::{SupportedProtocolVersion, version};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::common::PASSWORD;

/// The api's certificate and key files, from a CA of the test's own.
pub struct ApiCert {
    pub ca: TestCa,
    pub cert: PathBuf,
    pub key: PathBuf,
    _dir: tempfile::TempDir,
}

impl ApiCert {
    pub fn new() -> Self {
        clinflow::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let this = Self {
            ca: TestCa::new("the api's test CA"),
            cert: dir.path().join("api.pem"),
            key: dir.path().join("api.key"),
            _dir: dir,
        };
        this.issue();
        this
    }

    /// A new certificate for 127.0.0.1 in the files, each renamed into
    /// place as a renewal tool does (the key first); returns it.
    pub fn issue(&self) -> CertificateDer<'static> {
        let (cert, key) = self.ca.leaf_pem(&["127.0.0.1", "localhost"]);
        put(&self.key, &key);
        put(&self.cert, &cert);
        CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()
    }

    /// A new certificate in its file, without its key (which a renewal
    /// has not written yet); returns it.
    pub fn issue_without_key(&self) -> CertificateDer<'static> {
        let (cert, _key) = self.ca.leaf_pem(&["127.0.0.1"]);
        put(&self.cert, &cert);
        CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()
    }

    pub fn current(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(&self.cert).unwrap()
    }

    /// The api's environment for HTTPS with these files.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("API_TLS_CERT", self.cert.display().to_string()), ("API_TLS_KEY", self.key.display().to_string())]
    }
}

/// Writes `pem` to `path` with a rename, as a renewal tool does.
fn put(path: &std::path::Path, pem: &str) {
    let next = path.with_extension("next");
    std::fs::write(&next, pem).unwrap();
    std::fs::rename(&next, path).unwrap();
}

/// A `clinflow-api` process on its own ports and the test's database; its
/// log (stderr) is kept.
struct ApiProcess {
    child: tokio::process::Child,
    addr: String,
    metrics: String,
    log: Arc<Mutex<String>>,
}

impl ApiProcess {
    async fn spawn(db: &TestDb, env: &[(&'static str, String)]) -> Self {
        let (addr, metrics) = (testing::free_addr(), testing::free_addr());
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_clinflow-api"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", db.url_as(testing::API_ROLE))
            .env("AMQP_URL", testing::unreachable_amqp_url())
            .envs(testing::audit_keys().env("api"))
            .env("CLINFLOW_MASTER_KEY", base64::engine::general_purpose::STANDARD.encode(testing::master_key()))
            .env("JWT_SECRET", "another test jwt secret, long enough!!")
            .env("CLINFLOW_INDEX_KEY", "test index key of the api process, long enough")
            .env("API_ADDR", &addr)
            .env("METRICS_ADDR", &metrics)
            .env("LOG_FORMAT", "text")
            .env("RUST_LOG", "info,clinflow::relay=error,clinflow::link=error")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let mut stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        let sink = Arc::clone(&log);
        tokio::spawn(async move {
            while let Ok(Some(line)) = stderr.next_line().await {
                let mut log = sink.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut this = Self { child, addr, metrics, log };
        // Listening once its port takes connections (it binds after the database is reached).
        wait_until("the api process listening", Duration::from_secs(20), async || {
            assert!(this.child.try_wait().unwrap().is_none(), "the api exited: {}", this.log());
            TcpStream::connect(&this.addr).await.is_ok()
        })
        .await;
        this
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// SIGTERM, and the exit status within `deadline`.
    async fn terminate(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().unwrap().to_string();
        assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
        tokio::time::timeout(deadline, self.child.wait()).await.expect("the api did not stop after SIGTERM").unwrap()
    }
}

/// A TLS client trusting `ca` alone, offering only `versions`.
fn connector(ca: &TestCa, versions: &[&'static SupportedProtocolVersion]) -> TlsConnector {
    clinflow::tls::install_crypto_provider();
    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca.pem_path()).unwrap()).unwrap();
    let config =
        TlsClientConfig::builder_with_protocol_versions(versions).with_root_certificates(roots).with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

const TLS13: &[&SupportedProtocolVersion] = &[&version::TLS13];
const TLS12: &[&SupportedProtocolVersion] = &[&version::TLS12];

/// One TLS connection to the api, speaking HTTP/1.1 by hand (kept alive).
struct Conn(BufReader<TlsStream<TcpStream>>);

impl Conn {
    async fn open(connector: &TlsConnector, addr: &str) -> std::io::Result<Self> {
        let tcp = TcpStream::connect(addr).await?;
        let tls = connector.connect(ServerName::try_from("127.0.0.1").unwrap(), tcp).await?;
        Ok(Self(BufReader::new(tls)))
    }

    fn certificate(&self) -> CertificateDer<'static> {
        self.0.get_ref().get_ref().1.peer_certificates().unwrap()[0].clone().into_owned()
    }

    fn version(&self) -> ProtocolVersion {
        self.0.get_ref().get_ref().1.protocol_version().unwrap()
    }

    /// `GET path` on this connection: the status and the headers (names in
    /// lower case); the body is read and dropped.
    async fn get(&mut self, path: &str) -> std::io::Result<(u16, Vec<(String, String)>)> {
        let stream = self.0.get_mut();
        stream.write_all(format!("GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
        stream.flush().await?;
        let mut line = String::new();
        if self.0.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("an HTTP status line");
        let (mut headers, mut length) = (Vec::new(), 0);
        loop {
            line.clear();
            self.0.read_line(&mut line).await?;
            let Some((name, value)) = line.trim_end().split_once(':') else { break };
            let (name, value) = (name.to_ascii_lowercase(), value.trim().to_owned());
            if name == "content-length" {
                length = value.parse().unwrap();
            }
            headers.push((name, value));
        }
        self.0.read_exact(&mut vec![0; length]).await?;
        Ok((status, headers))
    }
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
}

/// The TLS alert a refused handshake received, if that is how it failed.
fn alert(error: &std::io::Error) -> Option<AlertDescription> {
    match error.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(alert) => Some(*alert),
        _ => None,
    }
}

const HSTS: &str = "max-age=31536000";

#[tokio::test]
async fn https_a_client_trusting_the_api_ca_is_answered_with_hsts_and_plain_http_gets_nothing() {
    let db = TestDb::new().await;
    let cert = ApiCert::new();
    let api = ApiProcess::spawn(&db, &cert.env()).await;

    // A client trusting the test CA alone: answered, every answer with HSTS
    // (a public route, the fallback, a refusal).
    let pem = std::fs::read(cert.ca.pem_path()).unwrap();
    let https = reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(&pem).unwrap())
        .build()
        .unwrap();
    let base = format!("https://{}", api.addr);
    for (path, status) in [("/healthz", 200), ("/no/such/route", 404), ("/v1/documents/0", 401)] {
        let resp = https.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{path}");
        assert_eq!(resp.headers()["strict-transport-security"], HSTS, "{path}");
    }

    // From the wrong side: plain HTTP to the TLS port gets no HTTP answer,
    // and a client that does not trust the api's CA hangs up.
    assert!(reqwest::get(format!("http://{}/healthz", api.addr)).await.is_err(), "plain HTTP was answered");
    let stranger = connector(&TestCa::new("another CA"), TLS13);
    let refused = Conn::open(&stranger, &api.addr).await.err().expect("a certificate of another CA was trusted");
    assert!(refused.to_string().to_lowercase().contains("unknownissuer"), "{refused}");

    // The ops port stays plain HTTP, without HSTS.
    let metrics = reqwest::get(format!("http://{}/metrics", api.metrics)).await.unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(!metrics.headers().contains_key("strict-transport-security"));

    // clinflow-ingest logs in over HTTPS with the CA given it
    // (CLINFLOW_API_CA_FILE), and not without it.
    users::create(&db.api, &Passwords::new().await.unwrap(), "loader", PASSWORD, Role::Ingest).await.unwrap();
    let ingest = |ca_certs| {
        ApiClient::new(ClientConfig {
            base_url: base.parse().unwrap(),
            username: "loader".into(),
            password: PASSWORD.to_owned().into(),
            api_key: None,
            care_team: None,
            retry: RetryPolicy {
                max_tries: 1,
                min_delay: Duration::from_millis(10),
                max_delay: Duration::from_millis(10),
            },
            timeout: Duration::from_secs(10),
            ca_certs,
        })
        .unwrap()
    };
    let cancel = CancellationToken::new();
    ingest(reqwest::Certificate::from_pem_bundle(&pem).unwrap()).login(&cancel).await.unwrap();
    assert!(ingest(Vec::new()).login(&cancel).await.is_err(), "the test CA is not among the system's roots");

    // Over plain HTTP (no certificate configured) there is no HSTS.
    let plain = ApiProcess::spawn(&db, &[]).await;
    let resp = reqwest::get(format!("http://{}/healthz", plain.addr)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(!resp.headers().contains_key("strict-transport-security"));
}

#[tokio::test]
async fn https_tls_1_2_is_refused_unless_the_api_is_configured_for_it() {
    let db = TestDb::new().await;
    let cert = ApiCert::new();
    let (tls12, tls13) = (connector(&cert.ca, TLS12), connector(&cert.ca, TLS13));

    // By default: TLS 1.3 only.
    let api = ApiProcess::spawn(&db, &cert.env()).await;
    let refused = Conn::open(&tls12, &api.addr).await.err().expect("a TLS 1.2 client was accepted");
    assert_eq!(alert(&refused), Some(AlertDescription::ProtocolVersion), "{refused}");
    let mut conn = Conn::open(&tls13, &api.addr).await.unwrap();
    assert_eq!(conn.version(), ProtocolVersion::TLSv1_3);
    assert_eq!(conn.get("/healthz").await.unwrap().0, 200);

    // API_TLS_MIN_VERSION=1.2: a TLS 1.2 client is answered; 1.3 still preferred.
    let env = [cert.env(), vec![("API_TLS_MIN_VERSION", "1.2".to_owned())]].concat();
    let api = ApiProcess::spawn(&db, &env).await;
    let mut conn = Conn::open(&tls12, &api.addr).await.unwrap();
    assert_eq!(conn.version(), ProtocolVersion::TLSv1_2);
    let (status, headers) = conn.get("/healthz").await.unwrap();
    assert_eq!((status, header(&headers, "strict-transport-security")), (200, Some(HSTS)));
    let both = connector(&cert.ca, &[&version::TLS13, &version::TLS12]);
    assert_eq!(Conn::open(&both, &api.addr).await.unwrap().version(), ProtocolVersion::TLSv1_3);
}

#[tokio::test]
async fn https_a_certificate_swapped_on_disk_is_served_to_the_next_connection_while_open_ones_go_on() {
    let db = TestDb::new().await;
    let cert = ApiCert::new();
    let env = [cert.env(), vec![("API_TLS_RELOAD_SECONDS", "1".to_owned())]].concat();
    let mut api = ApiProcess::spawn(&db, &env).await;
    let client = connector(&cert.ca, TLS13);
    let first = cert.current();
    let mut open = Conn::open(&client, &api.addr).await.unwrap();
    assert!(open.certificate() == first);
    assert_eq!(open.get("/healthz").await.unwrap().0, 200);

    let second = cert.issue();
    wait_until("a new connection served the new certificate", Duration::from_secs(20), async || {
        Conn::open(&client, &api.addr).await.unwrap().certificate() == second
    })
    .await;
    // The connection opened before goes on, on the session it made.
    assert_eq!(open.get("/healthz").await.unwrap().0, 200);
    assert!(open.certificate() == first);

    // A certificate whose key is not written yet: logged, and the
    // certificate in service stays.
    let logged = api.log().len();
    let third = cert.issue_without_key();
    wait_until("the failed reload logged", Duration::from_secs(20), async || {
        api.log()[logged..].contains("could not reload the api's TLS certificate")
    })
    .await;
    let now = Conn::open(&client, &api.addr).await.unwrap().certificate();
    assert!(now == second && now != third, "a certificate without its key was served");
    let log = api.log();
    assert!(log.contains("reloaded the api's TLS certificate"), "{log}");
    assert!(log.contains("API_TLS_KEY: is not the key of the certificate in API_TLS_CERT"), "{log}");
    assert!(!log.contains("PRIVATE KEY") && !log.contains("BEGIN"), "key material in the log: {log}");

    // Graceful shutdown over TLS: the idle connection is closed and the
    // process exits cleanly.
    let status = api.terminate(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}: {}", api.log());
    assert!(open.get("/healthz").await.is_err(), "the connection outlived the api");
}
