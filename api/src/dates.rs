//! Dates in JSON as `YYYY-MM-DD` (`#[serde(with = "crate::dates::ymd::option")]`).

time::serde::format_description!(pub(crate) ymd, Date, "[year]-[month]-[day]");
