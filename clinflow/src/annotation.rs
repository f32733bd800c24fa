//! An extracted concept as clinflow stores and serves it. Stored encrypted:
//! tied to a document, it tells what a patient has.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Annotation {
    /// SNOMED CT concept id (MedCAT's `cui`).
    pub cui: String,
    pub pretty_name: String,
    /// Start and end of the mention, in Unicode code points of the document
    /// text (MedCAT's Python string offsets), end exclusive.
    pub start: u32,
    pub end: u32,
    /// Linking confidence, 0..=1.
    pub acc: f64,
    #[serde(default)]
    pub type_ids: Vec<String>,
    /// MetaCAT results such as `{"Presence": {"value": "True", ...}}`.
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub meta_anns: serde_json::Map<String, serde_json::Value>,
}
