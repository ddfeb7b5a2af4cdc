//! Degradation policy: what to do with a model step when a tenant's budget is running out.
//!
//! A policy is a list of rules, each active from a budget status upward (`at: WARNING` also
//! applies at CRITICAL and EXCEEDED). [`decide`] is pure: it takes the tenant's status and the
//! step's request and returns a [`Decision`] with a human-readable reason. The kernel applies it
//! to every model step before the reservation ([`crate::kernel::Kernel::step_model`]) and
//! records a decision that changes the step as a `budget_degraded` ledger event, which a resume
//! or replay of the step re-uses. Stored per tenant in `pgcrew.tenants.degradation_policy`.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::tenancy::status::BudgetStatus;

/// One degradation action.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum DegradationAction {
    /// Use a cheaper model. With `from` set, only requests for that model are switched.
    SwitchModel {
        /// Only switch this model (any model when `None`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        from: Option<String>,
        /// The model to use instead.
        to: String,
    },
    /// Lower the completion-token cap to at most `max_tokens`.
    CapMaxTokens {
        /// The new cap.
        max_tokens: u32,
    },
    /// Skip steps marked optional.
    SkipOptional,
}

/// A rule: `action` applies when the tenant's status is `at` or worse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradationRule {
    /// The status from which the rule applies.
    pub at: BudgetStatus,
    /// What to do.
    #[serde(flatten)]
    pub action: DegradationAction,
}

/// A tenant's degradation policy (empty by default: never degrade).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DegradationPolicy {
    /// The rules, applied in order.
    #[serde(default)]
    pub rules: Vec<DegradationRule>,
}

impl DegradationPolicy {
    /// Add a rule (builder style).
    pub fn rule(mut self, at: BudgetStatus, action: DegradationAction) -> Self {
        self.rules.push(DegradationRule { at, action });
        self
    }

    /// Check the rules: model names valid, token caps positive.
    pub fn validate(&self) -> Result<()> {
        for r in &self.rules {
            match &r.action {
                DegradationAction::SwitchModel { from, to } => {
                    crate::ids::validate_text_id("degradation target model", to)?;
                    if let Some(f) = from {
                        crate::ids::validate_text_id("degradation source model", f)?;
                    }
                }
                DegradationAction::CapMaxTokens { max_tokens } => {
                    if *max_tokens == 0 {
                        return Err(Error::invalid(
                            "degradation max_tokens",
                            "must be at least 1 (use skip_optional to skip steps)",
                        ));
                    }
                }
                DegradationAction::SkipOptional => {}
            }
        }
        Ok(())
    }
}

/// What a model step asks for before degradation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRequest {
    /// The requested model.
    pub model: String,
    /// The requested completion-token cap.
    pub max_tokens: u32,
    /// Whether the step may be skipped.
    pub optional: bool,
}

/// The outcome of [`decide`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// The tenant's budget status the decision was taken at.
    pub status: BudgetStatus,
    /// The model to use.
    pub model: String,
    /// The completion-token cap to use.
    pub max_tokens: u32,
    /// Skip the step entirely.
    pub skip: bool,
    /// The actions that changed the request (empty: proceed unchanged).
    pub applied: Vec<DegradationAction>,
    /// Why, in words (for the ledger and logs).
    pub reason: String,
}

impl Decision {
    /// True when the request was changed or skipped.
    pub fn degraded(&self) -> bool {
        !self.applied.is_empty()
    }
}

/// Decide how to run `request` for a tenant at `status` under `policy`. Pure.
pub fn decide(policy: &DegradationPolicy, status: BudgetStatus, request: &StepRequest) -> Decision {
    let mut model = request.model.clone();
    let mut max_tokens = request.max_tokens;
    let mut skip = false;
    let mut applied = Vec::new();
    let mut reasons = Vec::new();
    for rule in policy.rules.iter().filter(|r| status >= r.at) {
        match &rule.action {
            DegradationAction::SwitchModel { from, to } => {
                let matches = from.as_deref().is_none_or(|f| f == model);
                if matches && *to != model {
                    reasons.push(format!("switched model {model} -> {to}"));
                    model = to.clone();
                    applied.push(rule.action.clone());
                }
            }
            DegradationAction::CapMaxTokens { max_tokens: cap } => {
                if max_tokens > *cap {
                    reasons.push(format!("capped max_tokens {max_tokens} -> {cap}"));
                    max_tokens = *cap;
                    applied.push(rule.action.clone());
                }
            }
            DegradationAction::SkipOptional => {
                if request.optional && !skip {
                    reasons.push("skipped optional step".to_string());
                    skip = true;
                    applied.push(rule.action.clone());
                }
            }
        }
    }
    let reason = if reasons.is_empty() {
        format!("budget status {status}: no degradation")
    } else {
        format!("budget status {status}: {}", reasons.join("; "))
    };
    Decision {
        status,
        model,
        max_tokens,
        skip,
        applied,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> DegradationPolicy {
        DegradationPolicy::default()
            .rule(
                BudgetStatus::Warning,
                DegradationAction::SwitchModel {
                    from: Some("gpt-4o".into()),
                    to: "gpt-4o-mini".into(),
                },
            )
            .rule(
                BudgetStatus::Critical,
                DegradationAction::CapMaxTokens { max_tokens: 256 },
            )
            .rule(BudgetStatus::Critical, DegradationAction::SkipOptional)
    }

    fn req(optional: bool) -> StepRequest {
        StepRequest {
            model: "gpt-4o".into(),
            max_tokens: 1024,
            optional,
        }
    }

    #[test]
    fn decisions_by_status() {
        let p = policy();
        let d = decide(&p, BudgetStatus::Healthy, &req(true));
        assert!(!d.degraded());
        assert_eq!(
            (d.model.as_str(), d.max_tokens, d.skip),
            ("gpt-4o", 1024, false)
        );

        let d = decide(&p, BudgetStatus::Warning, &req(true));
        assert_eq!(
            (d.model.as_str(), d.max_tokens, d.skip),
            ("gpt-4o-mini", 1024, false)
        );
        assert!(d.reason.contains("gpt-4o -> gpt-4o-mini"), "{}", d.reason);

        let d = decide(&p, BudgetStatus::Exceeded, &req(false));
        assert_eq!(
            (d.model.as_str(), d.max_tokens, d.skip),
            ("gpt-4o-mini", 256, false)
        );
        assert_eq!(d.applied.len(), 2);

        let d = decide(&p, BudgetStatus::Critical, &req(true));
        assert!(d.skip);
        assert!(d.reason.contains("skipped optional"), "{}", d.reason);
    }

    #[test]
    fn policy_json_roundtrip_and_validation() {
        let p = policy();
        let j = serde_json::to_value(&p).unwrap();
        assert_eq!(j["rules"][0]["at"], "WARNING");
        assert_eq!(j["rules"][0]["action"], "switch_model");
        let back: DegradationPolicy = serde_json::from_value(j).unwrap();
        assert_eq!(back, p);
        let bad = DegradationPolicy::default().rule(
            BudgetStatus::Warning,
            DegradationAction::CapMaxTokens { max_tokens: 0 },
        );
        assert!(bad.validate().is_err());
        assert!(p.validate().is_ok());
    }
}
