//! schemathesis (generated requests from `/openapi.json`) against the api,
//! once per role over the operations it may call, and once anonymously
//! over the public ones: every check on (`--checks all`: no 5xx, every
//! answer documented, valid data accepted, invalid data refused, …), a
//! fixed seed and a bounded number of examples. Each run logs in as its
//! role's account and sends that bearer token (schemathesis' dynamic auth,
//! api/tests/schemathesis/schemathesis.toml: it logs in again when a
//! fuzzed logout ends the session). The NDJSON batch is sent line by line
//! and judged line by line (api/tests/schemathesis/hooks.py).
//! `./dev/schemathesis` runs it longer; docs/reliability.md has the figures.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clinflow_api::access::{self, Access};
use clinflow_api::auth::LockoutPolicy;
use clinflow_api::batch::BatchLimits;
use clinflow_api::openapi;
use clinflow_api::users::Role;
use serde_json::Value;

use crate::common::{AccessOptions, PASSWORD, Stack};

/// The admin's run comes last: it disables accounts and resets passwords
/// (of the ids it finds in `GET /v1/admin/users`), the other runs' too.
const ROLES: [Role; 6] = [Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer, Role::Admin];

/// Examples per operation and the seed, unless `CLINFLOW_SCHEMATHESIS_EXAMPLES`
/// or `CLINFLOW_SCHEMATHESIS_SEED` say otherwise (`./dev/schemathesis`).
const EXAMPLES: u32 = 15;
const SEED: u64 = 37;

fn setting<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The schemathesis `./dev/test` installs (dev/lib.sh: ensure_schemathesis).
fn schemathesis() -> PathBuf {
    let installed = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.dev/schemathesis/bin/schemathesis");
    let path = std::env::var_os("CLINFLOW_TEST_SCHEMATHESIS").map_or(installed, Into::into);
    assert!(
        path.exists(),
        "schemathesis is not at {} (./dev/test installs it; or `source dev/lib.sh; ensure_schemathesis`)",
        path.display()
    );
    path
}

/// The operationIds of the operations `caller` may call (`None`: the public ones).
fn operation_ids(caller: Option<Role>) -> Vec<String> {
    let spec = serde_json::to_value(openapi::spec()).unwrap();
    access::endpoints()
        .into_iter()
        .filter(|e| match (&e.access, caller) {
            (Access::Public, None) => true,
            (Access::Roles { roles, .. }, Some(role)) => roles.contains(&role),
            _ => false,
        })
        .map(|e| {
            let id = &spec["paths"][e.path][e.method.as_str().to_lowercase()]["operationId"];
            id.as_str().unwrap().to_owned()
        })
        .collect()
}

/// One schemathesis run: did it pass, what it printed, and how many
/// requests it sent.
struct Run {
    caller: &'static str,
    passed: bool,
    report: String,
    requests: usize,
    seconds: f64,
}

async fn run(base: &str, caller: Option<Role>, report_dir: &Path) -> Run {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis");
    let name = caller.map_or("anonymous", Role::as_str);
    let ids = operation_ids(caller);
    let pattern = format!("^({})$", ids.iter().map(|id| regex_escape(id)).collect::<Vec<_>>().join("|"));
    let events = report_dir.join(format!("{name}.ndjson"));
    let started = Instant::now();
    let out = tokio::process::Command::new(schemathesis())
        .arg("--config-file")
        .arg(here.join("schemathesis.toml"))
        .args(["run", &format!("{base}/openapi.json"), "--checks", "all", "--no-color"])
        // Not the stateful phase (calls chained through inferred links):
        // bounded runs spend their examples on each operation instead.
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", &setting("CLINFLOW_SCHEMATHESIS_EXAMPLES", EXAMPLES).to_string()])
        .args(["--seed", &setting("CLINFLOW_SCHEMATHESIS_SEED", SEED).to_string()])
        .args(["--include-operation-id-regex", &pattern])
        .args(["--generation-database", "none", "--report", "ndjson", "--report-ndjson-path"])
        .arg(&events)
        .env("SCHEMATHESIS_HOOKS", here.join("hooks.py"))
        // The run's role; the anonymous run's calls need no credentials.
        .env("CLINFLOW_ST_USERNAME", caller.unwrap_or(Role::Admin).as_str())
        .env("CLINFLOW_ST_PASSWORD", PASSWORD)
        .output()
        .await
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Run {
        caller: name,
        passed: out.status.success(),
        report,
        requests: requests_sent(&events),
        seconds: started.elapsed().as_secs_f64(),
    }
}

/// Requests a run sent, counted in its event log (one `ScenarioFinished`
/// per scenario, each with its recorded interactions).
fn requests_sent(events: &Path) -> usize {
    let Ok(text) = std::fs::read_to_string(events) else { return 0 };
    text.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter_map(|event| event.get("ScenarioFinished").cloned())
        .map(|finished| finished["recorder"]["interactions"].as_object().map_or(0, |i| i.len()))
        .sum()
}

fn regex_escape(s: &str) -> String {
    s.chars().flat_map(|c| if c.is_ascii_alphanumeric() || c == '_' { vec![c] } else { vec!['\\', c] }).collect()
}

#[tokio::test]
async fn schemathesis_finds_nothing_for_any_role() {
    // Fuzzed password checks (a password change, break-glass) would lock
    // the accounts the runs log in as: lockout has its own tests.
    let lockout = LockoutPolicy { threshold: u32::MAX, ..LockoutPolicy::default() };
    let stack = Stack::start_with_access(AccessOptions { lockout, ..AccessOptions::default() }).await;
    for role in ROLES {
        stack.user(role.as_str(), role).await;
        stack.login(role.as_str()).await;
    }
    // The batch limits as deployed (the stack's are small, for its own
    // tests): a line may hold the largest note the description allows.
    let base = stack.serve_another_api(|state| state.batch_limits = BatchLimits::default()).await;
    // Each run's event log (NDJSON): kept where `CLINFLOW_SCHEMATHESIS_REPORTS`
    // says (`./dev/schemathesis`), else dropped with the test.
    let scratch = tempfile::tempdir().unwrap();
    let reports = std::env::var_os("CLINFLOW_SCHEMATHESIS_REPORTS").map_or(scratch.path().to_owned(), PathBuf::from);
    std::fs::create_dir_all(&reports).unwrap();
    let mut runs = Vec::new();
    for caller in ROLES.map(Some).into_iter().chain([None]) {
        let run = run(&base, caller, &reports).await;
        println!("schemathesis as {}: {} requests in {:.0} s", run.caller, run.requests, run.seconds);
        runs.push(run);
    }
    let failed: Vec<&Run> = runs.iter().filter(|r| !r.passed).collect();
    for run in &failed {
        println!("==== schemathesis as {} ====\n{}", run.caller, run.report);
    }
    stack.stop().await;
    let names: Vec<&str> = failed.iter().map(|r| r.caller).collect();
    assert!(names.is_empty(), "schemathesis found failures as {names:?} (reports above)");
}
