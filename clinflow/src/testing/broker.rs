//! The deployment's broker users, made for a test's own topology by the
//! script that makes them for `./dev/up` and docker-compose
//! (`scripts/broker-users`), and removed when dropped: what is tested is
//! what is deployed.

use secrecy::{ExposeSecret, SecretString};
use uuid::Uuid;

use crate::amqp::Topology;

/// One service's broker user (`PREFIX-<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerUser {
    Api,
    Worker,
    AuditSink,
    Ops,
}

impl BrokerUser {
    pub const ALL: [BrokerUser; 4] = [Self::Api, Self::Worker, Self::AuditSink, Self::Ops];

    pub fn name(self) -> &'static str {
        match self {
            Self::Api => "api",
            Self::Worker => "worker",
            Self::AuditSink => "audit-sink",
            Self::Ops => "ops",
        }
    }

    /// The variable the script reads its password from.
    fn password_variable(self) -> &'static str {
        match self {
            Self::Api => "CLINFLOW_API_AMQP_PASSWORD",
            Self::Worker => "CLINFLOW_WORKER_AMQP_PASSWORD",
            Self::AuditSink => "CLINFLOW_SINK_AMQP_PASSWORD",
            Self::Ops => "CLINFLOW_OPS_AMQP_PASSWORD",
        }
    }
}

/// The four users of a test topology's prefix, on the machine's broker.
pub struct BrokerUsers {
    prefix: String,
    password: String,
    /// The broker URL the users' URLs are made from.
    base: SecretString,
}

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker-users")
}

impl BrokerUsers {
    /// Runs `scripts/broker-users` for `topology`'s prefix (rabbitmqctl of
    /// this machine; a few seconds), whose broker `base` is a URL of.
    pub async fn create(topology: &Topology, base: SecretString) -> Self {
        // One random password for the four: what matters here is each user's
        // permissions, not its password.
        let password = Uuid::new_v4().simple().to_string();
        let users = Self { prefix: topology.prefix().to_owned(), password, base };
        let mut command = tokio::process::Command::new(script());
        command.arg(&users.prefix);
        for user in BrokerUser::ALL {
            command.env(user.password_variable(), &users.password);
        }
        let out = command.output().await.expect("run scripts/broker-users");
        assert!(out.status.success(), "scripts/broker-users: {}", String::from_utf8_lossy(&out.stderr));
        users
    }

    pub fn username(&self, user: BrokerUser) -> String {
        format!("{}-{}", self.prefix, user.name())
    }

    /// The base URL, logged in as `user`.
    pub fn url(&self, user: BrokerUser) -> SecretString {
        let url = self.base.expose_secret();
        let (scheme, rest) = url.split_once("://").expect("a URL");
        let host = rest.split_once('@').map_or(rest, |(_, host)| host);
        format!("{scheme}://{}:{}@{host}", self.username(user), self.password).into()
    }
}

impl Drop for BrokerUsers {
    fn drop(&mut self) {
        let _ = std::process::Command::new(script()).arg("--delete").arg(&self.prefix).output();
    }
}
