//! (runs: being built by its issue.)

use std::sync::Arc;

use crate::coord::maintenance::MaintenanceStep;

/// Maintenance steps this module contributes to the leader's maintenance pass.
pub fn maintenance_steps() -> Vec<Arc<dyn MaintenanceStep>> {
    Vec::new()
}
