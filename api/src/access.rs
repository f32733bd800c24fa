//! The route table: every operation of the api, declared once. Each line
//! names the handler, whose `#[utoipa::path]` gives its method, path and
//! OpenAPI description (utoipa-axum's `routes!`), and beside it who may
//! call it. The router, the OpenAPI document (`openapi::spec`) and the
//! matrix in docs/access-control.md (held equal by a test) all come from
//! [`endpoints`]; a route cannot exist without its access rule, and every
//! protected one runs behind the guard (deny by default).

use axum::Router;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::{self, Next};
use clinflow::audit::Action;
use clinflow::wire::BATCH_PATH;
use tower_http::timeout::TimeoutLayer;
use utoipa::openapi::path::PathItem;
use utoipa_axum::router::UtoipaMethodRouter;
use utoipa_axum::routes;

use crate::error::ApiError;
pub use crate::guard::Access;
use crate::state::AppState;
use crate::users::Role;
use crate::{admin, audit_api, batch, care, consents, console, docs, documents, guard, health, login, ops, patients};

const ANY_USER: &[Role] = &[Role::Admin, Role::Clinician, Role::Ingest, Role::Ops, Role::Auditor, Role::PrivacyOfficer];
/// Admin manages accounts and sees no PHI; ops and auditors see none either.
const UPLOADERS: &[Role] = &[Role::Ingest, Role::Clinician];
const BATCH_UPLOADERS: &[Role] = &[Role::Ingest];
/// Status reads carry no PHI: not audited. Ingest and clinician accounts see
/// the documents they uploaded; ops and admin see all.
const STATUS_READERS: &[Role] = &[Role::Ingest, Role::Clinician, Role::Ops, Role::Admin];
/// Clinicians, within their care teams or under break-glass.
const CLINICIANS: &[Role] = &[Role::Clinician];
const ADMINS: &[Role] = &[Role::Admin];
const OPERATORS: &[Role] = &[Role::Ops];
const AUDITORS: &[Role] = &[Role::Auditor];
/// GDPR export (any patient, with a case) and erasure (two of them).
const PRIVACY_OFFICERS: &[Role] = &[Role::PrivacyOfficer];
/// A patient's export: a clinician within their scope, or a privacy officer.
const EXPORTERS: &[Role] = &[Role::Clinician, Role::PrivacyOfficer];
/// Who accessed a patient: auditors and privacy officers.
const DISCLOSURE_READERS: &[Role] = &[Role::Auditor, Role::PrivacyOfficer];

/// Every endpoint of the api.
pub fn endpoints() -> Vec<Endpoint> {
    use Access as A;
    use Action as Do;
    let public = || A::Public;
    let admin_read = || A::roles(ADMINS, Do::AdminRead);
    let admin_user = || A::on(ADMINS, Do::AdminUser, "user");
    let admin_team = || A::on(ADMINS, Do::AdminTeam, "care_team");
    vec![
        Endpoint::new(public(), routes!(login::login)),
        Endpoint::new(public(), routes!(login::console_login)),
        Endpoint::new(A::roles(ANY_USER, Do::Session), routes!(login::session)),
        Endpoint::new(A::roles(ANY_USER, Do::Logout), routes!(login::logout)),
        Endpoint::new(A::roles(ANY_USER, Do::PasswordChange), routes!(login::change_password)),
        // Documents
        Endpoint::new(A::roles(UPLOADERS, Do::DocumentUpload), routes!(documents::upload)),
        Endpoint::new(A::roles(STATUS_READERS, Do::DocumentStatus), routes!(documents::statuses)),
        Endpoint::new(A::on(CLINICIANS, Do::DocumentRead, "document"), routes!(documents::read)),
        Endpoint::new(A::on(STATUS_READERS, Do::DocumentStatus, "document"), routes!(documents::status)),
        Endpoint::new(A::roles(BATCH_UPLOADERS, Do::DocumentUpload), routes!(batch::upload_batch)),
        // Clinicians
        Endpoint::new(A::roles(CLINICIANS, Do::BreakGlass), routes!(care::break_glass)),
        Endpoint::new(A::roles(CLINICIANS, Do::PatientRead), routes!(patients::reads::patient_documents)),
        Endpoint::new(A::roles(CLINICIANS, Do::PatientRead), routes!(patients::reads::patient_concepts)),
        Endpoint::new(A::roles(CLINICIANS, Do::ConceptRead), routes!(patients::concepts::concept_patients)),
        Endpoint::new(A::roles(CLINICIANS, Do::ConceptRead), routes!(patients::concepts::concept_documents)),
        // Privacy
        Endpoint::new(A::roles(EXPORTERS, Do::PatientExport), routes!(patients::fhir::export)),
        Endpoint::new(A::roles(PRIVACY_OFFICERS, Do::PatientEraseRequest), routes!(patients::erasure::request_erasure)),
        Endpoint::new(A::roles(PRIVACY_OFFICERS, Do::PrivacyRead), routes!(patients::erasure::pending_erasures)),
        Endpoint::new(
            A::on(PRIVACY_OFFICERS, Do::PatientErase, "erasure_request"),
            routes!(patients::erasure::approve_erasure),
        ),
        Endpoint::new(A::roles(PRIVACY_OFFICERS, Do::ConsentWithdraw), routes!(consents::withdraw)),
        // Administration
        Endpoint::new(admin_read(), routes!(admin::users::list_users)),
        Endpoint::new(A::roles(ADMINS, Do::AdminUser), routes!(admin::users::create_user)),
        Endpoint::new(admin_user(), routes!(admin::users::update_user)),
        Endpoint::new(admin_user(), routes!(admin::users::reset_password)),
        Endpoint::new(A::on(ADMINS, Do::AdminRead, "user"), routes!(admin::users::sessions)),
        Endpoint::new(A::on(ADMINS, Do::AdminSessionsRevoke, "user"), routes!(admin::users::revoke_sessions)),
        Endpoint::new(A::roles(ADMINS, Do::AdminUser), routes!(admin::service_accounts::create_service_account)),
        Endpoint::new(A::on(ADMINS, Do::AdminRead, "user"), routes!(admin::service_accounts::api_keys)),
        Endpoint::new(A::on(ADMINS, Do::AdminApiKey, "user"), routes!(admin::service_accounts::create_api_key)),
        Endpoint::new(A::on(ADMINS, Do::AdminApiKey, "api_key"), routes!(admin::service_accounts::revoke_api_key)),
        Endpoint::new(admin_read(), routes!(admin::teams::list_teams)),
        Endpoint::new(A::roles(ADMINS, Do::AdminTeam), routes!(admin::teams::create_team)),
        Endpoint::new(admin_team(), routes!(admin::teams::add_member)),
        Endpoint::new(admin_team(), routes!(admin::teams::remove_member)),
        Endpoint::new(admin_team(), routes!(admin::teams::add_patient)),
        Endpoint::new(admin_team(), routes!(admin::teams::remove_patient)),
        Endpoint::new(admin_read(), routes!(admin::break_glass::break_glass_grants)),
        // Operations and audit
        Endpoint::new(A::roles(OPERATORS, Do::OpsOverview), routes!(ops::overview)),
        Endpoint::new(A::roles(OPERATORS, Do::DeadLettersList), routes!(ops::list)),
        Endpoint::new(A::roles(OPERATORS, Do::DeadLettersReplay), routes!(ops::replay)),
        Endpoint::new(A::roles(OPERATORS, Do::Reprocess), routes!(ops::reprocess)),
        Endpoint::new(A::roles(AUDITORS, Do::AuditRead), routes!(audit_api::events)),
        Endpoint::new(A::roles(AUDITORS, Do::AuditVerify), routes!(audit_api::verify)),
        Endpoint::new(A::roles(DISCLOSURE_READERS, Do::AuditDisclosures), routes!(audit_api::disclosures)),
        // Public: health and this description
        Endpoint::new(public(), routes!(health::live)),
        Endpoint::new(public(), routes!(health::ready)),
        Endpoint::new(public(), routes!(docs::openapi_json)),
        Endpoint::new(public(), routes!(docs::docs)),
        Endpoint::new(public(), routes!(docs::scalar_script)),
        // Public: the web console's page and files (they hold no data)
        Endpoint::new(public(), routes!(console::page)),
        Endpoint::new(public(), routes!(console::script)),
        Endpoint::new(public(), routes!(console::style)),
    ]
}

/// One operation: its method and path (from its `#[utoipa::path]`), who may
/// call it, and its handler with its part of the OpenAPI document.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    pub(crate) route: UtoipaMethodRouter<AppState>,
}

impl Endpoint {
    /// `route` is `routes!(handler)` of one handler with one method.
    fn new(access: Access, route: UtoipaMethodRouter<AppState>) -> Self {
        let mut operations = route.1.paths.iter();
        let (Some((path, item)), None) = (operations.next(), operations.next()) else {
            panic!("an endpoint is one handler on one path")
        };
        let method = method_of(item).unwrap_or_else(|| panic!("{path}: an endpoint is one method"));
        // A route template, as static as the attribute it comes from. The
        // table is built a few times per process (router, OpenAPI
        // document), never per request: what this keeps is bounded.
        let path = String::leak(path.clone());
        Self { method, path, access, route }
    }
}

/// The method of a path item with exactly one operation.
fn method_of(item: &PathItem) -> Option<Method> {
    let methods = [
        (Method::GET, item.get.is_some()),
        (Method::POST, item.post.is_some()),
        (Method::PUT, item.put.is_some()),
        (Method::PATCH, item.patch.is_some()),
        (Method::DELETE, item.delete.is_some()),
        (Method::HEAD, item.head.is_some()),
        (Method::OPTIONS, item.options.is_some()),
        (Method::TRACE, item.trace.is_some()),
    ];
    let mut present = methods.into_iter().filter(|(_, present)| *present).map(|(m, _)| m);
    match (present.next(), present.next()) {
        (Some(method), None) => Some(method),
        _ => None,
    }
}

/// The router of [`endpoints`], each behind the guard and within its time
/// limit (guard and body included; `server` answers the timeout as JSON).
pub fn router(state: &AppState) -> Router<AppState> {
    endpoints().into_iter().fold(Router::new(), |router, e| {
        let access = e.access;
        let guard =
            middleware::from_fn_with_state(state.clone(), move |s: State<AppState>, req: Request, next: Next| {
                guard::guard(s, access, req, next)
            });
        // A batch streams a body of up to BATCH_MAX_BYTES: its own, longer limit.
        let limit = if e.path == BATCH_PATH { state.edge.batch_timeout } else { state.edge.request_timeout };
        let (_, _, handler) = e.route;
        // `route_layer`: the guard runs for this method only, so another
        // method on the path is the router's 405 (with `Allow`), not a 401.
        router.route(e.path, handler.route_layer(guard).layer(time_limit(limit)))
    })
}

/// tower-http's timeout: past `limit` the request is dropped (a transaction
/// in progress rolls back) and answered with an empty 503, which `server`
/// turns into the JSON `timeout` error.
pub(crate) fn time_limit(limit: std::time::Duration) -> TimeoutLayer {
    TimeoutLayer::with_status_code(ApiError::Timeout.status(), limit)
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::path::ParameterIn;

    use super::*;

    /// Patient references never travel in a URL (proxies' access logs keep
    /// URLs): no route template names a patient, and no operation takes one
    /// as a path or query parameter; the routes that need one take it in
    /// their JSON body.
    #[test]
    fn no_route_puts_a_patient_reference_in_its_url() {
        let endpoints = endpoints();
        for e in &endpoints {
            assert!(!e.path.to_ascii_lowercase().contains("patient_ref"), "{} {}", e.method, e.path);
            let params: Vec<&str> = e.path.split('{').skip(1).filter_map(|p| p.split('}').next()).collect();
            for param in params {
                assert!(["id", "user_id", "cui"].contains(&param), "{} {}: path parameter {param}", e.method, e.path);
            }
        }
        let spec = crate::openapi::spec();
        for (path, item) in &spec.paths.paths {
            for operation in [&item.get, &item.post, &item.put, &item.patch, &item.delete].into_iter().flatten() {
                for param in operation.parameters.iter().flatten() {
                    let utoipa::openapi::RefOr::T(param) = param else { continue };
                    let place = matches!(param.parameter_in, ParameterIn::Path | ParameterIn::Query);
                    assert!(!(place && param.name.contains("patient")), "{path}: parameter {}", param.name);
                }
            }
        }
        // The patient routes are there, taking the reference in the body.
        let posts: Vec<&str> = endpoints.iter().filter(|e| e.method == Method::POST).map(|e| e.path).collect();
        for path in ["/v1/patients/documents", "/v1/patients/concepts", "/v1/patients/export", "/v1/audit/disclosures"]
        {
            assert!(posts.contains(&path), "{path}");
        }
    }
}
