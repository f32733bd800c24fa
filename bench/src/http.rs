//! The bench's HTTP client: MedCAT is reached over HTTPS, verified against
//! `MEDCAT_CA_FILE` (the development CA, set by bench/run).

pub fn builder() -> reqwest::ClientBuilder {
    clinflow::tls::install_crypto_provider();
    let mut builder = reqwest::Client::builder();
    if let Some(pem) = std::env::var_os("MEDCAT_CA_FILE").and_then(|path| std::fs::read(path).ok()) {
        for cert in reqwest::Certificate::from_pem_bundle(&pem).unwrap_or_default() {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
}

pub fn client() -> reqwest::Client {
    builder().build().unwrap_or_default()
}
