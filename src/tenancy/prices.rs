//! Model prices (USD per 1M prompt/completion tokens): see [`crate::model::prices`], where the
//! table lives; re-exported here as `pgcrew::tenancy::prices` for budget code.

pub use crate::model::prices::{ModelPrice, PriceTable};
