//! Page data shared between browsers: every page's data is kept for a short time (1 s by
//! default) and loaded once however many browsers ask at the same moment (a notification makes
//! every open page re-read at once). Every notification starts a new generation before it is
//! passed on to the browsers (see `live`), so a page re-read because of it never gets data
//! loaded before it.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::UiError;

/// Entries kept at most (the map is emptied when it grows beyond).
const MAX_ENTRIES: usize = 1000;

type Value = Arc<dyn Any + Send + Sync>;
type Slot = Arc<tokio::sync::Mutex<Option<(u64, Instant, Value)>>>;

/// The cache.
pub(crate) struct PageCache {
    ttl: Duration,
    generation: AtomicU64,
    slots: Mutex<HashMap<String, Slot>>,
}

impl PageCache {
    /// A cache keeping data for `ttl` (zero: never reused).
    pub(crate) fn new(ttl: Duration) -> Self {
        PageCache {
            ttl,
            generation: AtomicU64::new(0),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// Something changed: data loaded before now is stale.
    pub(crate) fn invalidate(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    fn slot(&self, key: &str) -> Slot {
        let Ok(mut slots) = self.slots.lock() else {
            return Slot::default();
        };
        if slots.len() > MAX_ENTRIES && !slots.contains_key(key) {
            slots.clear();
        }
        slots.entry(key.to_string()).or_default().clone()
    }

    /// The data under `key`: reused while fresh, else loaded by one caller while the others
    /// wait for it. Errors are not kept.
    pub(crate) async fn get<T, F>(
        &self,
        key: &str,
        load: impl FnOnce() -> F,
    ) -> Result<Arc<T>, UiError>
    where
        T: Send + Sync + 'static,
        F: Future<Output = Result<T, UiError>>,
    {
        if self.ttl.is_zero() {
            return load().await.map(Arc::new);
        }
        let slot = self.slot(key);
        let mut entry = slot.lock().await;
        let generation = self.generation.load(Ordering::SeqCst);
        if let Some((g, at, v)) = entry.as_ref()
            && *g == generation
            && at.elapsed() < self.ttl
            && let Ok(v) = v.clone().downcast::<T>()
        {
            return Ok(v);
        }
        let v = Arc::new(load().await?);
        *entry = Some((generation, Instant::now(), v.clone() as Value));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reused_while_fresh_and_reloaded_after_a_change() {
        let c = PageCache::new(Duration::from_secs(60));
        let n = AtomicU64::new(0);
        let load = || async { Ok::<_, UiError>(n.fetch_add(1, Ordering::SeqCst)) };
        assert_eq!(*c.get("a", load).await.unwrap(), 0);
        assert_eq!(*c.get("a", load).await.unwrap(), 0);
        assert_eq!(*c.get("b", load).await.unwrap(), 1);
        c.invalidate();
        assert_eq!(*c.get("a", load).await.unwrap(), 2);
        let off = PageCache::new(Duration::ZERO);
        assert_eq!(*off.get("a", load).await.unwrap(), 3);
        assert_eq!(*off.get("a", load).await.unwrap(), 4);
    }
}
