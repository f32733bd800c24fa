//! Unit tests of `keys`.

use super::*;

fn cache(capacity: usize, ttl: Duration) -> Cache {
    Cache::new(capacity, ttl)
}

#[test]
fn the_cache_is_bounded_and_forgets_the_oldest() {
    let c = cache(2, Duration::from_secs(60));
    let keys: Vec<Arc<DataKey>> = (0..3).map(|_| Arc::new(DataKey::generate())).collect();
    for k in &keys {
        c.insert(Arc::clone(k));
    }
    assert!(c.get(keys[0].id()).is_none(), "the oldest went");
    assert!(c.get(keys[1].id()).is_some() && c.get(keys[2].id()).is_some());
    assert_eq!(Arc::strong_count(&keys[0]), 1, "nothing holds the evicted key but its user");
    c.remove(keys[1].id());
    assert!(c.get(keys[1].id()).is_none());
}

#[test]
fn the_least_recently_used_goes_first() {
    let c = cache(2, Duration::from_secs(60));
    let keys: Vec<Arc<DataKey>> = (0..3).map(|_| Arc::new(DataKey::generate())).collect();
    c.insert(Arc::clone(&keys[0]));
    c.insert(Arc::clone(&keys[1]));
    assert!(c.get(keys[0].id()).is_some());
    c.insert(Arc::clone(&keys[2]));
    assert!(c.get(keys[1].id()).is_none(), "unused since it came");
    assert!(c.get(keys[0].id()).is_some() && c.get(keys[2].id()).is_some());
}

#[test]
fn cached_keys_expire() {
    let c = cache(10, Duration::ZERO);
    let key = Arc::new(DataKey::generate());
    c.insert(Arc::clone(&key));
    assert!(c.get(key.id()).is_none());
    assert_eq!(Arc::strong_count(&key), 1);
}
