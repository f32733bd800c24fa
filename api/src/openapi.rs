//! The api's OpenAPI 3.1 description, generated from the code, served at
//! `GET /openapi.json` with an interactive page at `GET /docs`.
//!
//! Each handler carries `#[utoipa::path]`: its request body, parameters,
//! success answer and the codes of the errors of its own (`x-errors`, see
//! [`error_codes`]). [`spec`] gathers those from the route table
//! ([`access::endpoints`]), turns the codes into error answers, and adds to
//! every operation what the router gives it, so that the two cannot
//! disagree: the bearer security requirement and the roles allowed
//! (`x-roles` and a line of the description), the guard's 401 and 403, the
//! errors of a path or query parameter (400), of a JSON body (400, 413, 415,
//! 422), of an unreachable database (503) and of the time limit every route
//! has (503 `timeout`), each with the one error body. A test holds the
//! operations equal to the routes.

use std::sync::LazyLock;

use axum::http::Method;
use clinflow::wire::{ErrorBody, ErrorDetail};
use utoipa::OpenApi;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::{Response, ResponseBuilder};
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Content, Header, RefOr};

use crate::access::{self, Access};
use crate::error_codes;

/// The name of the security scheme every protected operation requires.
pub const BEARER: &str = "bearer";

#[derive(OpenApi)]
#[openapi(
    info(
        title = "clinflow API",
        description = "Clinical notes in, coded concepts (SNOMED CT, by MedCAT) out.\n\n\
            Every error is `{\"error\": {\"code\", \"message\"}}` (`ErrorBody`); a message never quotes the request. \
            Protected operations take `Authorization: Bearer <token>`: a session token from `POST /v1/auth/login`, \
            or a service account's API key (`cfk_…`) in the same header. Each operation names the roles allowed \
            (`x-roles`; `public` needs no credentials), as docs/access-control.md does.",
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    tags(
        (name = "auth", description = "Log in and out."),
        (name = "documents", description = "Upload notes; read their status and, for clinicians in scope, their coded concepts."),
        (name = "care", description = "Care-team scope and break-glass."),
        (name = "admin", description = "Users, service accounts, API keys, sessions, care teams, break-glass review. Every call audited."),
        (name = "ops", description = "Dead letters and reprocessing."),
        (name = "audit", description = "The audit trail, for auditors."),
        (name = "health", description = "Liveness and readiness."),
        (name = "docs", description = "This description."),
    ),
)]
struct ApiDoc;

static SPEC: LazyLock<utoipa::openapi::OpenApi> = LazyLock::new(build);

/// The description of every endpoint of [`access::endpoints`].
pub fn spec() -> &'static utoipa::openapi::OpenApi {
    &SPEC
}

fn build() -> utoipa::openapi::OpenApi {
    let mut spec = ApiDoc::openapi();
    let endpoints = access::endpoints();
    for endpoint in &endpoints {
        let (schemas, paths, _) = &endpoint.route;
        for (path, item) in &paths.paths {
            match spec.paths.paths.get_mut(path) {
                Some(known) => known.merge_operations(item.clone()),
                None => {
                    spec.paths.paths.insert(path.clone(), item.clone());
                }
            }
        }
        spec.components.get_or_insert_with(Default::default).schemas.extend(schemas.iter().cloned());
    }
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "A session token (JWT) from `POST /v1/auth/login`, or an API key of a service account \
             (`cfk_<key id>_<secret>`), sent the same way: `Authorization: Bearer <token or key>`.",
        ))
        .build();
    spec.components.get_or_insert_with(Default::default).add_security_scheme(BEARER, SecurityScheme::Http(scheme));
    wire_limits::state(&mut spec);
    no_nul::state(&mut spec);
    for endpoint in &endpoints {
        if let Some(operation) = operation_mut(&mut spec, &endpoint.method, endpoint.path) {
            add_named_errors(operation);
            describe_access(operation, &endpoint.access);
            // A path parameter is always required (one with its own
            // `schema_with` is not marked so).
            for parameter in operation.parameters.iter_mut().flatten() {
                if let RefOr::T(p) = parameter
                    && p.parameter_in == ParameterIn::Path
                {
                    p.required = utoipa::openapi::Required::True;
                }
            }
        }
    }
    spec
}

fn operation_mut<'a>(spec: &'a mut utoipa::openapi::OpenApi, method: &Method, path: &str) -> Option<&'a mut Operation> {
    let item = spec.paths.paths.get_mut(path)?;
    match *method {
        Method::GET => item.get.as_mut(),
        Method::POST => item.post.as_mut(),
        Method::PUT => item.put.as_mut(),
        Method::PATCH => item.patch.as_mut(),
        Method::DELETE => item.delete.as_mut(),
        Method::HEAD => item.head.as_mut(),
        Method::OPTIONS => item.options.as_mut(),
        Method::TRACE => item.trace.as_mut(),
        _ => None,
    }
}

/// What the router adds to an endpoint: who may call it, and the errors
/// every request of its kind can meet before or around its handler.
fn describe_access(operation: &mut Operation, access: &Access) {
    let roles: Vec<&str> = match access {
        Access::Public => vec!["public"],
        Access::Roles { roles, .. } => roles.iter().map(|r| r.as_str()).collect(),
    };
    let line = match access {
        Access::Public => "Public: no credentials needed.".to_owned(),
        Access::Roles { .. } => format!("Roles: {}.", roles.join(", ")),
    };
    operation.description = Some(match operation.description.take().filter(|d| !d.is_empty()) {
        Some(d) => format!("{d}\n\n{line}"),
        None => line,
    });
    operation.extensions.get_or_insert_with(Default::default).insert("x-roles".into(), roles.into());
    if let Access::Roles { .. } = access {
        operation.security = Some(vec![SecurityRequirement::new::<_, _, &str>(BEARER, [])]);
        for code in ["unauthenticated", "forbidden", "csrf_token", "internal", "unavailable"] {
            add_error(operation, code, None);
        }
        if !access.open_before_password_change() {
            add_error(operation, "password_change_required", None);
        }
    }
    let has = |operation: &Operation, place: ParameterIn| {
        operation.parameters.iter().flatten().any(|p| matches!(p, RefOr::T(p) if p.parameter_in == place))
    };
    if has(operation, ParameterIn::Path) {
        add_error(operation, "invalid_path", None);
    }
    if has(operation, ParameterIn::Query) {
        add_error(operation, "invalid_query", None);
    }
    let json_body = matches!(
        &operation.request_body,
        Some(RefOr::T(body)) if body.content.contains_key("application/json")
    );
    if json_body {
        for code in ["invalid_json", "payload_too_large", "unsupported_media_type", "invalid_body"] {
            add_error(operation, code, None);
        }
    }
    add_error(operation, "timeout", None);
    add_retry_after(operation);
}

/// The errors the handler named in its `x-errors` extension, made answers
/// (the extension itself is not part of the description).
fn add_named_errors(operation: &mut Operation) {
    let Some(named) = operation.extensions.as_mut().and_then(|e| e.remove("x-errors")) else { return };
    let serde_json::Value::Array(entries) = named else { panic!("x-errors is not a list: {named}") };
    for entry in &entries {
        let Some(entry) = entry.as_str() else { panic!("x-errors holds a code or `code: text`, not {entry}") };
        match entry.split_once(": ") {
            Some((code, text)) => add_error(operation, code, Some(text)),
            None => add_error(operation, entry, None),
        }
    }
}

/// Adds `- `code`: text` to the operation's answer of the code's status
/// (created as an error answer with [`ErrorBody`] if there is none yet; left
/// alone if the handler declared it with another body, as health does).
/// The text is the catalogue's unless the route words it.
fn add_error(operation: &mut Operation, code: &str, wording: Option<&str>) {
    let Some((status, text)) = error_codes::lookup(code) else {
        panic!("the error code `{code}` is not in the catalogue (api/src/error_codes.rs)")
    };
    let key = status.to_string();
    let item = format!("- `{code}`: {}", wording.unwrap_or(text));
    match operation.responses.responses.get_mut(&key) {
        Some(RefOr::T(response)) if is_error_body(response) => {
            if !response.description.contains(&format!("`{code}`")) {
                response.description = format!("{}\n{item}", response.description);
            }
        }
        Some(_) => {}
        None => {
            operation.responses.responses.insert(key, RefOr::T(error_response(item)));
        }
    }
}

fn error_response(description: String) -> Response {
    let body = Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name("ErrorBody"))));
    ResponseBuilder::new().description(description).content("application/json", body).build()
}

fn is_error_body(response: &Response) -> bool {
    matches!(
        response.content.get("application/json"),
        Some(RefOr::T(Content { schema: Some(RefOr::Ref(r)), .. })) if r.ref_location == "#/components/schemas/ErrorBody"
    )
}

/// Every 429 and 503 error answer (an [`ErrorBody`]) carries `Retry-After`.
fn add_retry_after(operation: &mut Operation) {
    for (status, response) in &mut operation.responses.responses {
        let RefOr::T(response) = response else { continue };
        if (status == "429" || status == "503") && is_error_body(response) {
            let mut header = Header::new(ObjectBuilder::new().schema_type(Type::Integer).minimum(Some(1)));
            header.description = Some("Seconds to wait before retrying".into());
            response.headers.insert("Retry-After".into(), RefOr::T(header));
        }
    }
}

/// The limits of the bodies `clinflow::wire` shares with clinflow-ingest
/// (whose derived schemas know only their fields' types), stated from the
/// api's own checks (`validate::schema`, `MAX_STATUS_IDS`).
mod wire_limits {
    use clinflow::retention::{BASES, Basis};
    use clinflow::wire::MAX_STATUS_IDS;
    use utoipa::openapi::schema::{AllOfBuilder, AnyOfBuilder, Object, ObjectBuilder, Schema, Type};
    use utoipa::openapi::{OpenApi, RefOr};

    use crate::validate::schema as field;

    pub(super) fn state(spec: &mut OpenApi) {
        let Some(components) = spec.components.as_mut() else { return };
        if let Some(RefOr::T(Schema::Object(upload))) = components.schemas.get_mut("UploadRequest") {
            constrain(upload, "patient_ref", field::patient_ref().into());
            constrain(upload, "text", field::text().into());
            constrain(upload, "source_ref", field::source_ref().into());
            constrain(upload, "document_date", field::document_date());
            constrain(upload, "care_team", field::plain_name_or_empty().into());
            constrain(upload, "lawful_basis", field::lawful_basis(true, &BASES).into());
            constrain(upload, "consent_ref", field::consent_ref(true).into());
            let upload = Schema::Object(upload.clone());
            components.schemas.insert("UploadRequest".into(), RefOr::T(research_needs_its_consent(upload)));
        }
        if let Some(RefOr::T(Schema::Object(status))) = components.schemas.get_mut("StatusRequest")
            && let Some(RefOr::T(Schema::Array(ids))) = status.properties.get_mut("ids")
        {
            ids.max_items = Some(MAX_STATUS_IDS);
        }
    }

    /// `name`'s schema is `schema`, keeping its description.
    fn constrain(object: &mut Object, name: &str, mut schema: RefOr<Schema>) {
        let description = match object.properties.get(name) {
            Some(RefOr::T(Schema::Object(o))) => o.description.clone(),
            _ => None,
        };
        if let (RefOr::T(Schema::Object(new)), Some(d)) = (&mut schema, description)
            && new.description.is_none()
        {
            new.description = Some(d);
        }
        object.properties.insert(name.into(), schema);
    }

    /// `lawful_basis: research` comes with its `consent_ref`, and no other
    /// basis takes one (`validate::lawful_basis`).
    fn research_needs_its_consent(upload: Schema) -> Schema {
        let research = ObjectBuilder::new()
            .property(
                "lawful_basis",
                ObjectBuilder::new().schema_type(Type::String).enum_values(Some([Basis::Research.as_str()])),
            )
            .property("consent_ref", ObjectBuilder::new().schema_type(Type::String))
            .required("lawful_basis")
            .required("consent_ref");
        let others: Vec<Basis> = BASES.into_iter().filter(|b| *b != Basis::Research).collect();
        let other = ObjectBuilder::new()
            .property("lawful_basis", field::lawful_basis(true, &others))
            .property("consent_ref", ObjectBuilder::new().schema_type(Type::Null));
        Schema::AllOf(AllOfBuilder::new().item(upload).item(AnyOfBuilder::new().item(research).item(other)).build())
    }
}

/// No string the api takes may hold NUL (`extract`: PostgreSQL's `text`
/// cannot store one): every string schema of a parameter or a component
/// without a pattern of its own gets one that says so (the patterns of
/// `validate::schema` say it themselves). Answers hold none either.
mod no_nul {
    use utoipa::openapi::schema::{AdditionalProperties, ArrayItems, Schema, SchemaType, Type};
    use utoipa::openapi::{OpenApi, RefOr};

    const PATTERN: &str = r"^[^\x00]*$";

    pub(super) fn state(spec: &mut OpenApi) {
        for item in spec.paths.paths.values_mut() {
            let operations = [&mut item.get, &mut item.post, &mut item.put, &mut item.patch, &mut item.delete];
            for operation in operations.into_iter().flatten() {
                for parameter in operation.parameters.iter_mut().flatten() {
                    if let RefOr::T(parameter) = parameter {
                        parameter.schema.iter_mut().for_each(walk);
                    }
                }
                if let Some(RefOr::T(body)) = operation.request_body.as_mut() {
                    for content in body.content.values_mut() {
                        if let RefOr::T(content) = content {
                            content.schema.iter_mut().for_each(walk);
                        }
                    }
                }
            }
        }
        for schema in spec.components.iter_mut().flat_map(|c| c.schemas.values_mut()) {
            walk(schema);
        }
    }

    fn is_string(kind: &SchemaType) -> bool {
        match kind {
            SchemaType::Type(t) => *t == Type::String,
            SchemaType::Array(types) => types.contains(&Type::String),
            SchemaType::AnyValue => false,
        }
    }

    fn walk(schema: &mut RefOr<Schema>) {
        let RefOr::T(schema) = schema else { return };
        match schema {
            Schema::Object(o) => {
                if is_string(&o.schema_type) && o.pattern.is_none() && o.enum_values.is_none() {
                    o.pattern = Some(PATTERN.into());
                }
                o.properties.values_mut().for_each(walk);
                if let Some(AdditionalProperties::RefOr(extra)) = o.additional_properties.as_deref_mut() {
                    walk(extra);
                }
            }
            Schema::Array(a) => {
                if let ArrayItems::RefOrSchema(items) = &mut a.items {
                    walk(items);
                }
            }
            Schema::AllOf(s) => s.items.iter_mut().for_each(walk),
            Schema::AnyOf(s) => s.items.iter_mut().for_each(walk),
            Schema::OneOf(s) => s.items.iter_mut().for_each(walk),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use utoipa::openapi::path::OperationBuilder;

    use super::*;

    fn naming(codes: serde_json::Value) -> Operation {
        let extensions = utoipa::openapi::extensions::ExtensionsBuilder::new().add("x-errors", codes).build();
        OperationBuilder::new().extensions(Some(extensions)).build()
    }

    #[test]
    fn named_errors_are_answers_in_the_catalogues_words_or_the_routes() {
        let mut operation = naming(serde_json::json!(["busy", "not_found: no such team"]));
        add_named_errors(&mut operation);
        assert!(operation.extensions.is_some_and(|e| !e.contains_key("x-errors")));
        let description = |status: &str| match &operation.responses.responses[status] {
            RefOr::T(response) => response.description.clone(),
            RefOr::Ref(_) => panic!("a reference"),
        };
        assert_eq!(description("429"), "- `busy`: the pipeline is behind; retry after `Retry-After`");
        assert_eq!(description("404"), "- `not_found`: no such team");
    }

    #[test]
    #[should_panic(expected = "`no_such_code` is not in the catalogue")]
    fn a_code_not_catalogued_stops_the_description() {
        add_named_errors(&mut naming(serde_json::json!(["no_such_code"])));
    }
}
