//! Model prices: USD per one million prompt and completion tokens.
//!
//! [`PriceTable::builtin`] knows a few common models; [`PriceTable::set`] adds or overrides any
//! model. Looking up a model with no configured price is an explicit
//! [`Error::UnknownModelPrice`] — pgcrew never guesses a price. A dated model name
//! (`gpt-4o-mini-2024-07-18`) falls back to its undated base (`gpt-4o-mini`) when it has no
//! entry of its own.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The price of one model, in USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelPrice {
    /// USD per 1M prompt (input) tokens.
    pub prompt_per_million: f64,
    /// USD per 1M completion (output) tokens.
    pub completion_per_million: f64,
}

impl ModelPrice {
    /// A validated price (both figures finite and non-negative).
    pub fn new(prompt_per_million: f64, completion_per_million: f64) -> Result<Self> {
        for (field, v) in [
            ("prompt price", prompt_per_million),
            ("completion price", completion_per_million),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(Error::invalid(
                    field,
                    format!("{v} is not a finite, non-negative USD amount per 1M tokens"),
                ));
            }
        }
        Ok(Self {
            prompt_per_million,
            completion_per_million,
        })
    }

    /// The cost in USD of `prompt_tokens` prompt and `completion_tokens` completion tokens.
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        (prompt_tokens as f64 * self.prompt_per_million
            + completion_tokens as f64 * self.completion_per_million)
            / 1_000_000.0
    }
}

/// Built-in prices (USD per 1M tokens, prompt / completion), public list prices.
const BUILTIN: &[(&str, f64, f64)] = &[
    ("gpt-4o", 2.50, 10.00),
    ("gpt-4o-mini", 0.15, 0.60),
    ("gpt-4.1", 2.00, 8.00),
    ("gpt-4.1-mini", 0.40, 1.60),
    ("gpt-4.1-nano", 0.10, 0.40),
    ("gpt-4-turbo", 10.00, 30.00),
    ("gpt-3.5-turbo", 0.50, 1.50),
    ("o1", 15.00, 60.00),
    ("o3", 2.00, 8.00),
    ("o3-mini", 1.10, 4.40),
    ("o4-mini", 1.10, 4.40),
];

/// A table of model prices. Cheap to clone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PriceTable {
    prices: BTreeMap<String, ModelPrice>,
}

impl PriceTable {
    /// An empty table: every model must be [`set`](Self::set) before use.
    pub fn empty() -> Self {
        Self::default()
    }

    /// The built-in prices.
    pub fn builtin() -> Self {
        let prices = BUILTIN
            .iter()
            .map(|(m, p, c)| {
                (
                    (*m).to_string(),
                    ModelPrice {
                        prompt_per_million: *p,
                        completion_per_million: *c,
                    },
                )
            })
            .collect();
        Self { prices }
    }

    /// Add or override the price of `model` (validated: non-empty name, finite non-negative
    /// prices). Returns the table for chaining.
    pub fn set(
        &mut self,
        model: impl Into<String>,
        prompt_per_million: f64,
        completion_per_million: f64,
    ) -> Result<&mut Self> {
        let model = model.into();
        crate::ids::validate_text_id("model", &model)?;
        let price = ModelPrice::new(prompt_per_million, completion_per_million)?;
        self.prices.insert(model, price);
        Ok(self)
    }

    /// Builder-style [`set`](Self::set).
    pub fn with(
        mut self,
        model: impl Into<String>,
        prompt_per_million: f64,
        completion_per_million: f64,
    ) -> Result<Self> {
        self.set(model, prompt_per_million, completion_per_million)?;
        Ok(self)
    }

    /// Remove a model's price; returns whether it had one.
    pub fn remove(&mut self, model: &str) -> bool {
        self.prices.remove(model).is_some()
    }

    /// The price of `model`, or [`Error::UnknownModelPrice`].
    pub fn get(&self, model: &str) -> Result<ModelPrice> {
        if let Some(p) = self.prices.get(model) {
            return Ok(*p);
        }
        // `gpt-4o-2024-08-06` -> `gpt-4o`: strip a trailing date suffix.
        if let Some(base) = strip_date_suffix(model)
            && let Some(p) = self.prices.get(base)
        {
            return Ok(*p);
        }
        Err(Error::UnknownModelPrice(model.to_string()))
    }

    /// The actual cost of a call.
    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> Result<f64> {
        Ok(self.get(model)?.cost(prompt_tokens, completion_tokens))
    }

    /// The worst-case cost of a call before it is made: the prompt plus `max_tokens` completion
    /// tokens. This is what a model step reserves.
    pub fn worst_case_cost(&self, model: &str, prompt_tokens: u64, max_tokens: u64) -> Result<f64> {
        self.cost(model, prompt_tokens, max_tokens)
    }

    /// The models with a price, sorted.
    pub fn models(&self) -> impl Iterator<Item = (&str, &ModelPrice)> {
        self.prices.iter().map(|(m, p)| (m.as_str(), p))
    }
}

/// `name-YYYY-MM-DD` -> `name`. Works on bytes: the suffix must be the 11 ASCII bytes
/// `-DDDD-DD-DD`, so the cut falls on a character boundary whatever script `name` is in (model
/// names come from agent definitions and may be any Unicode text).
fn strip_date_suffix(model: &str) -> Option<&str> {
    const SUFFIX_LEN: usize = 11;
    let bytes = model.as_bytes();
    if bytes.len() <= SUFFIX_LEN {
        return None;
    }
    let cut = bytes.len() - SUFFIX_LEN;
    let s = &bytes[cut..];
    let shape = s[0] == b'-'
        && s[5] == b'-'
        && s[8] == b'-'
        && s[1..5].iter().all(u8::is_ascii_digit)
        && s[6..8].iter().all(u8::is_ascii_digit)
        && s[9..11].iter().all(u8::is_ascii_digit);
    if !shape {
        return None;
    }
    // `s[0]` is the ASCII `-`, so `cut` is a character boundary; `get` keeps this panic-free
    // even if that reasoning were ever wrong.
    model.get(..cut)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_prices_and_costs() {
        let t = PriceTable::builtin();
        let p = t.get("gpt-4o-mini").unwrap();
        assert_eq!(p.prompt_per_million, 0.15);
        // 1M prompt + 1M completion tokens.
        let c = t.cost("gpt-4o-mini", 1_000_000, 1_000_000).unwrap();
        assert!((c - 0.75).abs() < 1e-12, "{c}");
        let w = t.worst_case_cost("gpt-4o", 1000, 500).unwrap();
        assert!((w - (1000.0 * 2.5 + 500.0 * 10.0) / 1e6).abs() < 1e-15);
        assert_eq!(
            t.get("gpt-4o-mini-2024-07-18").unwrap(),
            t.get("gpt-4o-mini").unwrap()
        );
    }

    #[test]
    fn unknown_model_is_an_explicit_error_until_configured() {
        let mut t = PriceTable::builtin();
        let err = t.get("my-local-llama").unwrap_err();
        assert!(matches!(err, Error::UnknownModelPrice(ref m) if m == "my-local-llama"));
        assert!(err.to_string().contains("PriceTable::set"));
        t.set("my-local-llama", 0.0, 0.0).unwrap();
        assert_eq!(t.cost("my-local-llama", 10, 10).unwrap(), 0.0);
        // Overrides replace built-ins.
        t.set("gpt-4o", 1.0, 2.0).unwrap();
        assert_eq!(t.get("gpt-4o").unwrap().completion_per_million, 2.0);
        assert!(PriceTable::empty().get("gpt-4o").is_err());
    }

    #[test]
    fn non_ascii_model_names_do_not_panic() {
        let mut t = PriceTable::builtin();
        t.set("modèle", 1.0, 2.0).unwrap();
        t.set("模型", 3.0, 4.0).unwrap();
        assert!(matches!(
            t.get("modèle-2024-08"),
            Err(Error::UnknownModelPrice(_))
        ));
        assert_eq!(t.get("modèle-2024-08-06").unwrap().prompt_per_million, 1.0);
        assert_eq!(t.get("模型-2024-08-06").unwrap().prompt_per_million, 3.0);
        // Full-width digits are not a date suffix.
        assert!(t.get("gpt-4o-mini-２０２４-０７-１８").is_err());
        for name in [
            "é-2024-08-0",
            "🤖-2024-08-0",
            "ü1234567890",
            "ééééééé",
            "-2024-08-06",
        ] {
            assert!(t.get(name).is_err(), "{name}");
        }
        assert_eq!(strip_date_suffix("é-2024-08-06"), Some("é"));
        assert_eq!(strip_date_suffix("-2024-08-06"), None);
    }

    #[test]
    fn random_unicode_model_names_never_panic() {
        let t = PriceTable::builtin();
        let mut rng = fastrand::Rng::with_seed(0x15);
        for _ in 0..50_000 {
            let len = rng.usize(0..20);
            let mut s: String = (0..len)
                .map(|_| match rng.u8(..5) {
                    0 => rng.char('0'..='9'),
                    1 => '-',
                    2 => rng.char('\u{80}'..='\u{7ff}'),
                    3 => rng.char('\u{10000}'..='\u{10ffff}'),
                    _ => rng.char(..),
                })
                .collect();
            if rng.bool() {
                s.push_str(["-2024-08-06", "-2024-08-0", "-2024-0８-06"][rng.usize(..3)]);
            }
            // Must return (Ok or Err), never panic.
            let _ = t.get(&s);
            if let Some(base) = strip_date_suffix(&s) {
                assert!(s.starts_with(base) && s.len() == base.len() + 11, "{s:?}");
            }
        }
    }

    #[test]
    fn invalid_prices_are_rejected() {
        let mut t = PriceTable::empty();
        assert!(t.set("m", f64::NAN, 1.0).is_err());
        assert!(t.set("m", 1.0, -1.0).is_err());
        assert!(t.set("m", f64::INFINITY, 1.0).is_err());
        assert!(t.set("", 1.0, 1.0).is_err());
        assert!(t.get("m").is_err());
    }
}
