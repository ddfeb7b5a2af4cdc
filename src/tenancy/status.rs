//! Budget status: HEALTHY, WARNING, CRITICAL, EXCEEDED.
//!
//! The status is computed in the database (a trigger on `pgcrew.tenants` keeps
//! `budget_status` current from `spent_usd`, the limit and the tenant's thresholds) and every
//! change is announced on `pgcrew_budget_status_changed` `{tenant_id, status}`.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::TenantId;

pub use crate::vocab::BudgetStatus;

impl BudgetStatus {
    /// The status for `spent` against `limit` with the given thresholds (fractions of the
    /// limit) — the same rule as the database's `pgcrew.budget_status_of`.
    pub fn compute(spent: f64, limit: Option<f64>, thresholds: BudgetThresholds) -> Self {
        match limit {
            None => BudgetStatus::Healthy,
            Some(l) if spent >= l => BudgetStatus::Exceeded,
            Some(l) if spent >= l * thresholds.critical => BudgetStatus::Critical,
            Some(l) if spent >= l * thresholds.warning => BudgetStatus::Warning,
            Some(_) => BudgetStatus::Healthy,
        }
    }
}

impl FromStr for BudgetStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        BudgetStatus::from_name(&s.trim().to_ascii_uppercase()).ok_or_else(|| {
            Error::invalid(
                "budget status",
                format!("`{s}` is not one of HEALTHY, WARNING, CRITICAL, EXCEEDED"),
            )
        })
    }
}

/// Per-tenant thresholds, as fractions of the budget limit.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct BudgetThresholds {
    /// WARNING at or above this fraction (default 0.8).
    pub warning: f64,
    /// CRITICAL at or above this fraction (default 0.9).
    pub critical: f64,
}

impl Default for BudgetThresholds {
    fn default() -> Self {
        Self {
            warning: 0.8,
            critical: 0.9,
        }
    }
}

impl BudgetThresholds {
    /// Validated thresholds: `0 < warning <= critical <= 1`.
    pub fn new(warning: f64, critical: f64) -> Result<Self> {
        let t = Self { warning, critical };
        t.validate()?;
        Ok(t)
    }

    /// Check `0 < warning <= critical <= 1` (both finite).
    pub fn validate(&self) -> Result<()> {
        if !self.warning.is_finite() || !self.critical.is_finite() {
            return Err(Error::invalid(
                "budget thresholds",
                "must be finite fractions of the limit (e.g. 0.8 and 0.9)",
            ));
        }
        if !(self.warning > 0.0 && self.warning <= self.critical && self.critical <= 1.0) {
            return Err(Error::invalid(
                "budget thresholds",
                format!(
                    "need 0 < warning <= critical <= 1 as fractions of the limit, got warning {} and critical {}",
                    self.warning, self.critical
                ),
            ));
        }
        Ok(())
    }
}

/// A tenant's budget figures, as shown by the `pgcrew.budget_status` view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BudgetSnapshot {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The limit (`None`: unlimited).
    pub budget_usd_limit: Option<f64>,
    /// Spent so far.
    pub spent_usd: f64,
    /// Reserved by in-flight calls.
    pub reserved_usd: f64,
    /// `limit - spent - reserved` (never negative; `None` without a limit).
    pub remaining_usd: Option<f64>,
    /// `100 * spent / limit`, rounded to 2 decimals (`None` without a positive limit).
    pub used_pct: Option<f64>,
    /// The status.
    pub status: BudgetStatus,
    /// The thresholds.
    pub thresholds: BudgetThresholds,
    /// Number of open reservations.
    pub active_reservations: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_boundaries() {
        let t = BudgetThresholds::default();
        let l = Some(100.0);
        assert_eq!(BudgetStatus::compute(0.0, l, t), BudgetStatus::Healthy);
        assert_eq!(BudgetStatus::compute(79.99, l, t), BudgetStatus::Healthy);
        assert_eq!(BudgetStatus::compute(80.0, l, t), BudgetStatus::Warning);
        assert_eq!(BudgetStatus::compute(90.0, l, t), BudgetStatus::Critical);
        assert_eq!(BudgetStatus::compute(100.0, l, t), BudgetStatus::Exceeded);
        assert_eq!(BudgetStatus::compute(1e9, None, t), BudgetStatus::Healthy);
        let custom = BudgetThresholds::new(0.5, 0.75).unwrap();
        assert_eq!(
            BudgetStatus::compute(50.0, l, custom),
            BudgetStatus::Warning
        );
        assert!(BudgetThresholds::new(0.9, 0.8).is_err());
        assert!(BudgetThresholds::new(0.0, 0.8).is_err());
        assert!(BudgetThresholds::new(0.5, 1.5).is_err());
        assert!(BudgetThresholds::new(f64::NAN, 0.8).is_err());
        assert_eq!(
            "warning".parse::<BudgetStatus>().unwrap(),
            BudgetStatus::Warning
        );
        assert!(BudgetStatus::Healthy < BudgetStatus::Exceeded);
    }
}
