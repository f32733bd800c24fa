//! Sealing an upload: the row as stored, encrypted under the patient's
//! data key.

use clinflow::crypto::DataKey;
use clinflow::documents::{self, NewDocument};
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;
use crate::validate::ValidUpload;

/// The row for an upload: note and patient reference sealed under the
/// patient's data key `key` (whose blind index is `patient_index`), source
/// ref as its keyed hash.
pub(crate) fn seal(
    state: &AppState,
    key: &DataKey,
    patient_index: Vec<u8>,
    uploader: Uuid,
    id: Uuid,
    upload: ValidUpload,
) -> Result<NewDocument, ApiError> {
    Ok(NewDocument {
        id,
        data_key_id: key.id(),
        patient_ref_ct: key
            .seal_str(documents::patient_ref_field(id), &upload.patient_ref)
            .map_err(anyhow::Error::new)?,
        patient_index,
        text_ct: key.seal_str(documents::text_field(id), &upload.text).map_err(anyhow::Error::new)?,
        source_ref_hmac: upload.source_ref.map(|s| state.index_key.hash(documents::SOURCE_REF_DOMAIN, s.as_bytes())),
        document_date: upload.document_date,
        uploaded_by: uploader,
        lawful_basis: upload.lawful_basis.as_str(),
        consent_index: upload.consent_ref.map(|c| clinflow::retention::consent_index(&state.index_key, &c)),
    })
}
