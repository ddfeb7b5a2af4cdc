//! Model prices (USD per 1M prompt/completion tokens): see [`crate::tenancy::prices`], where the
//! table lives; re-exported here as `pgcrew::model::prices`.

pub use crate::tenancy::prices::{ModelPrice, PriceTable};
