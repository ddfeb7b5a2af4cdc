//! Small synchronisation helpers shared by the crate's modules.

use std::sync::Mutex;

/// `f` on what `m` guards, also after a panic poisoned it: the guarded state (maps, timestamps,
/// the leader state) stays usable, as a panic elsewhere leaves it consistent.
pub(crate) fn with_lock<T, R>(m: &Mutex<T>, f: impl FnOnce(&mut T) -> R) -> R {
    match m.lock() {
        Ok(mut g) => f(&mut g),
        Err(p) => f(&mut p.into_inner()),
    }
}
