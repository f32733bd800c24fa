//! Deny by default, at the router: every endpoint is declared here with the
//! roles allowed to call it (or [`Access::Public`]), and the router is built
//! from these declarations only, so a route cannot exist without one. One
//! guard authenticates the caller and checks the role before any handler
//! runs; a refusal is audited with the endpoint's action. Handlers get the
//! caller as [`AuthUser`], which only the guard can provide.
//!
//! docs/access-control.md is the same matrix for people; a test holds the two
//! equal and walks every route with every role.

use axum::Router;
use axum::extract::{FromRequestParts, RawPathParams, Request, State};
use axum::handler::Handler;
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodFilter, MethodRouter, on};
use clinflow::audit::{Action, Outcome};
use uuid::Uuid;

use crate::AppState;
use crate::auth;
use crate::users::Role;

/// Who may call an endpoint.
#[derive(Debug, Clone, Copy)]
pub enum Access {
    /// Anyone, without credentials (login, health).
    Public,
    /// An authenticated user holding one of these roles. A refusal is
    /// audited as `action`, with the `{id}` path parameter as a resource of
    /// kind `resource` when there is one.
    Roles { roles: &'static [Role], action: Action, resource: Option<&'static str> },
}

impl Access {
    pub const fn roles(roles: &'static [Role], action: Action) -> Self {
        Self::Roles { roles, action, resource: None }
    }

    /// As [`roles`](Self::roles); the `{id}` in the path names a `resource`.
    pub const fn on(roles: &'static [Role], action: Action, resource: &'static str) -> Self {
        Self::Roles { roles, action, resource: Some(resource) }
    }

    pub fn allows(&self, role: Role) -> bool {
        match self {
            Self::Public => true,
            Self::Roles { roles, .. } => roles.contains(&role),
        }
    }
}

/// One route: method, path template, who may call it, and its handler.
pub struct Endpoint {
    pub method: Method,
    pub path: &'static str,
    pub access: Access,
    handler: MethodRouter<AppState>,
}

impl Endpoint {
    pub fn new<H, T>(method: Method, path: &'static str, access: Access, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).unwrap_or_else(|_| panic!("no method filter for {method}"));
        Self { method, path, access, handler: on(filter, handler) }
    }
}

/// Every endpoint of the api.
pub fn endpoints() -> Vec<Endpoint> {
    let mut all = Vec::new();
    all.extend(auth::endpoints());
    all.extend(crate::documents::endpoints());
    all.extend(crate::batch::endpoints());
    all.extend(crate::care::endpoints());
    all.extend(crate::patients::endpoints());
    all.extend(crate::admin::endpoints());
    all.extend(crate::ops::endpoints());
    all.extend(crate::audit_api::endpoints());
    all.extend(crate::health_endpoints());
    all.extend(crate::openapi::endpoints());
    all
}

/// The router of [`endpoints`], each behind its guard.
pub fn router(state: &AppState) -> Router<AppState> {
    endpoints().into_iter().fold(Router::new(), |router, e| {
        let access = e.access;
        let guard =
            middleware::from_fn_with_state(state.clone(), move |s: State<AppState>, req: Request, next: Next| {
                guard(s, access, req, next)
            });
        router.route(e.path, e.handler.layer(guard))
    })
}

async fn guard(State(state): State<AppState>, access: Access, req: Request, next: Next) -> Response {
    let Access::Roles { roles, action, resource } = access else { return next.run(req).await };
    let (mut parts, body) = req.into_parts();
    let user = match auth::authenticate(&mut parts, &state).await {
        Ok(user) => user,
        Err(e) => return e.into_response(),
    };
    if !roles.contains(&user.role) {
        let mut event = user.event(action, Outcome::Denied).reason("role_forbidden");
        if let Some(kind) = resource
            && let Ok(params) = RawPathParams::from_request_parts(&mut parts, &state).await
            && let Some((_, id)) = params.iter().find(|(name, _)| *name == "id")
            && let Ok(id) = id.parse::<Uuid>()
        {
            event = event.resource(kind, &id.to_string());
        }
        metrics::counter!("clinflow_api_forbidden_total", "reason" => "role_forbidden").increment(1);
        state.audit_denial(event).await;
        return crate::error::ApiError::Forbidden.into_response();
    }
    parts.extensions.insert(user);
    next.run(Request::from_parts(parts, body)).await
}
