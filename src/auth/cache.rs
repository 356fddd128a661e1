//! Verified service-account tokens, remembered so that a caller who sends the same token again
//! is not verified again ([`TokenCache`], owned by the token validator).
//!
//! # What is kept
//!
//! - The key is a 128-bit keyed digest of the token ([`Digester`]: POLYVAL under a random key
//!   of this cache); the token itself is never stored here, and neither the token nor its
//!   digest is logged.
//! - The value is the identity the token names, the key set it was verified under (its
//!   generation) and a deadline: the earlier of the token's `exp` plus [`LEEWAY`] (read off the
//!   wall clock at verification time, as the verification does) and [`TOKEN_CACHE_TTL`] after
//!   the verification ([`deadline`]).
//! - Only successful verifications are inserted. A refused token is verified (and refused)
//!   again at its next use: a flood of bad tokens costs what it costs without a cache, plus one
//!   digest and one lookup each, and cannot grow the cache.
//! - At most [`TOKEN_CACHE_CAPACITY`] entries; inserting into a full cache drops the least
//!   recently used one.
//!
//! # When an entry stops answering
//!
//! - at its deadline (`now >= deadline`): the next use verifies the token again;
//! - as soon as the key set changes: a lookup hits only entries verified under the key set in
//!   use now (its generation), so a key that is rotated out or removed stops accepting what it
//!   signed at once. Storing a new key set also clears the cache, to free the memory early.
//!   A fetch that brings the same document as the keys in hand is not a change: the keys
//!   keep their generation and the cache its entries (else every routine refresh, and every
//!   fetch a token with an unknown `kid` triggers, would make each caller's next call a
//!   signature check);
//! - when a reload builds a new validator (new issuer, audience or key source, or a
//!   `jwks_file` read again): the new validator starts with an empty cache.
//!
//! The allow list is not cached: [`Authorizer::admit`](super::Authorizer::admit) applies the
//! one in use to the (cached or fresh) identity at every call.
//!
//! # From the Kubernetes API server and Envoy
//!
//! - The API server's token authenticator cache
//!   (`k8s.io/apiserver/pkg/authentication/token/cache`, `cached_token_authenticator.go`) keys
//!   entries by an HMAC-SHA256 of the token (with a random key), which keeps entries small and
//!   tokens out of its memory: taken, with a faster keyed function of the same use (see
//!   [`Digester`] for why POLYVAL and what it guarantees). It caches successes for a fixed TTL (`TokenSuccessCacheTTL`,
//!   10 s by default for the built-in authenticators; 2 min for webhooks) and failures not at
//!   all by default (`TokenFailureCacheTTL` 0): taken, with a TTL of 60 s (see
//!   [`TOKEN_CACHE_TTL`]) and no failure caching at all. Its first striped cache held 32
//!   stripes × 128 LRU entries: the [`TOKEN_CACHE_CAPACITY`] of 4096 is that figure. Not taken:
//!   its stripes (32 locks) and its single flight of concurrent misses for one token; one
//!   short lock is enough for a broker, and concurrent first uses of one token only verify it
//!   as often as they did without a cache.
//! - Envoy's `jwt_authn` JWT cache (`jwt_cache.cc`, opt-in with `jwt_cache_config`) is an LRU
//!   of parsed JWTs per worker thread (100 entries by default, `jwt_cache_size`), inserted only
//!   after a successful verification, its hits checked against `exp` again at each lookup and
//!   removed once expired, tokens over 4 KiB never cached: all taken (LRU, success only, the
//!   deadline checked at each lookup, [`MAX_CACHED_TOKEN_BYTES`]); so are its
//!   `jwt_cache_hit`/`jwt_cache_miss` counters (`bace_broker_auth_token_cache_total{result}`).
//!   Not taken: the token itself as the key.
//! - Neither of them drops entries when the signing keys change: Envoy's JWKS refresh
//!   (`jwks_cache.cc`, `setRemoteJwks`) replaces the keys and leaves the JWT cache alone, so a
//!   cached JWT outlives its key until `exp` or eviction; the API server's cache answers for
//!   up to its TTL. Here the key-set generation makes the change count at once, which is why
//!   the TTL can be longer than the API server's 10 s.
//!
//! # Locking
//!
//! One std `Mutex` around the map and the recency list, held for one lookup or one insert
//! (a hash-map probe and a few index writes), never across an `.await`; the digest is computed
//! before it is taken. A hit allocates nothing: it hands out the entry's shared identity.

use std::{
    collections::HashMap,
    fmt,
    hash::{BuildHasherDefault, Hash, Hasher},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use polyval::{Polyval, universal_hash::UniversalHash as _};
use rand::RngCore as _;
use tokio::time::Instant;

use super::LEEWAY;

/// How long a verified token is trusted without verifying it again, at most (its `exp` may end
/// it sooner).
///
/// What could change unseen meanwhile: the signing keys are covered by the generation check,
/// the allow list is applied per call, a new issuer or audience comes with a new validator,
/// and a token revoked at the API server is not seen by a verification against the JWKS
/// either. What is left is the clock: `exp` is read against the wall clock at verification
/// time, the deadline then runs on the monotonic clock, so a wall-clock step (an NTP
/// correction) shows only at the next verification; 60 s bounds that, and how long an idle
/// entry holds an identity. A caller that sends the same token for an hour costs one
/// verification a minute instead of one per call. The Kubernetes API server uses 10 s for its
/// built-in authenticators, without a check for key changes.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);

/// Entries at most. Each costs about 200 bytes (digest, identity, deadline, generation, links
/// and the map's slot), so a full cache is under 1 MiB. A pod has one projected token at a time
/// (two while the kubelet rotates it), so 4096 entries cover some 2000 calling pods at once,
/// far more than the callers of one broker; past that the least recently used callers are
/// verified as if there were no cache. The figure is the Kubernetes API server's first token
/// cache (32 stripes × 128 entries).
pub const TOKEN_CACHE_CAPACITY: usize = 4096;

/// Tokens longer than this are verified every time and never cached (Envoy's limit): a
/// projected service-account token is 1 to 2 KiB, and hashing up to 16 KiB of a bad token on
/// every call would make bad tokens dearer than without a cache.
pub const MAX_CACHED_TOKEN_BYTES: usize = 4 * 1024;

/// A cache key: the keyed digest of a token ([`Digester::digest`]).
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) struct Key([u8; 16]);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // Already the output of a keyed function: its first bytes are the map's hash.
        let mut first = [0; 8];
        first.copy_from_slice(&self.0[..8]);
        state.write_u64(u64::from_le_bytes(first));
    }
}

/// The map's hasher: passes [`Key`]'s own bits through (no second hash of a digest).
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }

    fn write(&mut self, bytes: &[u8]) {
        // Not used by `Key`; a fold keeps the hasher correct for any other input.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
}

/// Turns tokens into cache keys: POLYVAL (the universal hash of AES-GCM-SIV, RFC 8452) of the
/// token and its length, under a random 128-bit key drawn when the cache is made and never
/// shown.
///
/// Why not SHA-256 (as before) or HMAC-SHA256 (as the Kubernetes API server): a projected
/// token is 1 to 2 KiB and the digest is computed at every call, cache hit or not. SHA-256 of
/// 1 KiB costs about 0.5-1 µs even with the SHA extensions, the largest part of a cached
/// admission; POLYVAL with carry-less multiplication costs a few times less
/// (`cargo bench -p bench --bench auth`).
///
/// What the cache needs is that no one can make a token that another, verified token's entry
/// answers for. Nothing here ever reveals a digest (not in logs, metrics or answers), so an
/// attacker works blind: for two different tokens of at most `L` 16-byte blocks the chance
/// that their digests are equal under a random key is at most `L / 2^128` (a polynomial of
/// degree `L` has at most `L` roots), i.e. at most 2^-119 per try for tokens within
/// [`MAX_CACHED_TOKEN_BYTES`], and each try costs a call. The length block makes a token
/// and the same token followed by zero bytes differ (not that a header value can hold one).
/// The first 64 bits of a digest serve as the map's hash for the same reason: without the
/// key, no one can aim tokens at one bucket.
pub(super) struct Digester {
    polyval: Polyval,
}

impl Digester {
    /// A digester with a fresh random key.
    pub(super) fn random() -> Self {
        let mut key = polyval::Key::default();
        // The zero key would map every token to one digest; a random key is never zero in
        // practice, but the loop costs nothing.
        while key.iter().all(|b| *b == 0) {
            rand::rng().fill_bytes(&mut key);
        }
        Self {
            polyval: Polyval::new(&key),
        }
    }

    /// The cache key of `token`.
    pub(super) fn digest(&self, token: &str) -> Key {
        let mut hash = self.polyval.clone();
        hash.update_padded(token.as_bytes());
        let mut length = polyval::Block::default();
        length[..8].copy_from_slice(&(token.len() as u64).to_le_bytes());
        hash.update(&[length]);
        Key(hash.finalize().into())
    }
}

impl fmt::Debug for Digester {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Digester").finish_non_exhaustive()
    }
}

/// When a token verified at `now` (wall clock: `wall_now`) with this `exp` (seconds since the
/// Unix epoch) stops being served from the cache: the earlier of `exp` + [`LEEWAY`] and
/// `now` + [`TOKEN_CACHE_TTL`]. `None` (do not cache) without an `exp` or when that moment has
/// passed.
///
/// The verification accepts the token while `exp` + [`LEEWAY`] is not before the current
/// whole second, so the cache stops no later than the verification would, and an entry never
/// accepts what a verification at the same moment would refuse.
pub(super) fn deadline(exp: Option<f64>, now: Instant, wall_now: SystemTime) -> Option<Instant> {
    let exp = exp.filter(|exp| exp.is_finite())?;
    let wall = wall_now.duration_since(UNIX_EPOCH).ok()?.as_secs_f64();
    let left = exp + LEEWAY.as_secs_f64() - wall;
    if left <= 0.0 {
        return None;
    }
    let left = Duration::try_from_secs_f64(left).unwrap_or(TOKEN_CACHE_TTL);
    Some(now + left.min(TOKEN_CACHE_TTL))
}

/// Cache lookups counted across validators (a reload may bring a new validator and cache).
#[derive(Debug, Default)]
pub(super) struct Lookups {
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Lookups {
    pub(super) fn hit(&self) {
        self.hits.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn miss(&self) {
        self.misses.fetch_add(1, Ordering::Relaxed);
    }

    /// `(hits, misses)` so far.
    pub(super) fn get(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }
}

/// Verified tokens by digest: a bounded LRU with deadlines and key-set generations.
pub(super) struct TokenCache {
    /// This cache's keyed digest of tokens.
    digester: Digester,
    /// The entries and their recency. Locking rule: held for one [`TokenCache::get`],
    /// [`TokenCache::insert`], `clear` or `len`, never across an `.await`, and nothing else is
    /// locked while it is held.
    lru: Mutex<Lru>,
}

impl TokenCache {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            digester: Digester::random(),
            lru: Mutex::new(Lru::new(capacity)),
        }
    }

    /// The key of `token` in this cache (computed without the lock).
    pub(super) fn key(&self, token: &str) -> Key {
        self.digester.digest(token)
    }

    fn lock(&self) -> MutexGuard<'_, Lru> {
        // No method panics between its index updates, so a poisoned lock holds a sound LRU.
        self.lru
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The identity of the token with digest `key`, if it was verified under key set
    /// `generation` and its deadline is still to come at `now`. An entry that fails either test
    /// is removed.
    pub(super) fn get(&self, key: &Key, generation: u64, now: Instant) -> Option<Arc<str>> {
        let mut lru = self.lock();
        let slot = *lru.index.get(key)?;
        let entry = &lru.slots[slot];
        if entry.generation != generation || now >= entry.deadline {
            lru.remove(slot);
            return None;
        }
        let identity = entry.identity.clone();
        lru.touch(slot);
        Some(identity)
    }

    /// Remembers a successful verification (replacing any entry for `key`), dropping the least
    /// recently used entry when full.
    pub(super) fn insert(&self, key: Key, identity: Arc<str>, deadline: Instant, generation: u64) {
        self.lock().insert(key, identity, deadline, generation);
    }

    /// Forgets every entry.
    pub(super) fn clear(&self) {
        self.lock().clear();
    }

    /// Entries held (some may be past their deadline or generation until looked up or evicted).
    pub(super) fn len(&self) -> usize {
        self.lock().index.len()
    }
}

/// No slot (the end of the recency list).
const NIL: usize = usize::MAX;

/// The LRU: entries in a slab, linked from most to least recently used, found by digest.
struct Lru {
    capacity: usize,
    index: HashMap<Key, usize, BuildHasherDefault<KeyHasher>>,
    slots: Vec<Entry>,
    /// Slots of removed entries, reused before the slab grows.
    free: Vec<usize>,
    /// Most recently used.
    head: usize,
    /// Least recently used: the next to go.
    tail: usize,
}

struct Entry {
    key: Key,
    identity: Arc<str>,
    deadline: Instant,
    generation: u64,
    /// Towards the head (more recently used).
    prev: usize,
    /// Towards the tail.
    next: usize,
}

impl Lru {
    fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            index: HashMap::default(),
            slots: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
        }
    }

    fn insert(&mut self, key: Key, identity: Arc<str>, deadline: Instant, generation: u64) {
        if let Some(&slot) = self.index.get(&key) {
            let entry = &mut self.slots[slot];
            entry.identity = identity;
            entry.deadline = deadline;
            entry.generation = generation;
            self.touch(slot);
            return;
        }
        if self.index.len() >= self.capacity {
            self.remove(self.tail);
        }
        let entry = Entry {
            key,
            identity,
            deadline,
            generation,
            prev: NIL,
            next: NIL,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                self.slots[slot] = entry;
                slot
            }
            None => {
                self.slots.push(entry);
                self.slots.len() - 1
            }
        };
        self.index.insert(key, slot);
        self.push_front(slot);
    }

    /// Makes `slot` the most recently used.
    fn touch(&mut self, slot: usize) {
        if self.head != slot {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    fn remove(&mut self, slot: usize) {
        self.unlink(slot);
        self.index.remove(&self.slots[slot].key);
        // The identity goes now, not when the slot is reused.
        self.slots[slot].identity = Arc::from("");
        self.free.push(slot);
    }

    fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        self.free.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    fn unlink(&mut self, slot: usize) {
        let (prev, next) = (self.slots[slot].prev, self.slots[slot].next);
        match prev {
            NIL => self.head = next,
            prev => self.slots[prev].next = next,
        }
        match next {
            NIL => self.tail = prev,
            next => self.slots[next].prev = prev,
        }
        self.slots[slot].prev = NIL;
        self.slots[slot].next = NIL;
    }

    fn push_front(&mut self, slot: usize) {
        self.slots[slot].prev = NIL;
        self.slots[slot].next = self.head;
        match self.head {
            NIL => self.tail = slot,
            head => self.slots[head].prev = slot,
        }
        self.head = slot;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::LazyLock;

    use super::*;

    static DIGESTER: LazyLock<Digester> = LazyLock::new(Digester::random);

    fn key(n: usize) -> Key {
        DIGESTER.digest(&format!("token-{n}"))
    }

    /// The recency list, walked both ways, agrees with the index.
    fn check_links(cache: &TokenCache) {
        let lru = cache.lock();
        let mut forward = Vec::new();
        let mut slot = lru.head;
        while slot != NIL {
            forward.push(slot);
            slot = lru.slots[slot].next;
        }
        let mut backward = Vec::new();
        let mut slot = lru.tail;
        while slot != NIL {
            backward.push(slot);
            slot = lru.slots[slot].prev;
        }
        backward.reverse();
        assert_eq!(forward, backward);
        assert_eq!(forward.len(), lru.index.len());
        for slot in forward {
            assert_eq!(lru.index[&lru.slots[slot].key], slot);
        }
    }

    #[test]
    fn digests_depend_on_every_byte_the_length_and_the_key() {
        let digester = Digester::random();
        let token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl";
        assert!(
            digester.digest(token) == digester.digest(token),
            "deterministic"
        );
        // Every single-byte change, anywhere, changes the digest.
        for at in 0..token.len() {
            let mut changed = token.as_bytes().to_vec();
            changed[at] ^= 1;
            let changed = String::from_utf8(changed).expect("still ASCII");
            assert!(
                digester.digest(token) != digester.digest(&changed),
                "byte {at}"
            );
        }
        // Trailing zero bytes are not padding: the length is part of the digest.
        assert!(digester.digest("abc") != digester.digest("abc\0"));
        assert!(digester.digest("") != digester.digest("\0"));
        // Another cache (another key), another digest.
        assert!(Digester::random().digest(token) != digester.digest(token));
        assert_eq!(
            format!("{digester:?}"),
            "Digester { .. }",
            "the key is never shown"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_distinct_tokens_keeps_the_bound_and_drops_the_least_recent() {
        let cache = TokenCache::new(64);
        let far = Instant::now() + TOKEN_CACHE_TTL;
        for n in 0..64 {
            cache.insert(key(n), "id".into(), far, 1);
        }
        // Token 0 is used again: token 1 is now the least recently used.
        assert!(cache.get(&key(0), 1, Instant::now()).is_some());
        for n in 64..10_000 {
            cache.insert(key(n), format!("id-{n}").into(), far, 1);
            assert!(cache.len() <= 64);
            if n == 64 {
                assert!(cache.get(&key(1), 1, Instant::now()).is_none(), "evicted");
                assert!(cache.get(&key(0), 1, Instant::now()).is_some(), "kept");
            }
        }
        assert_eq!(cache.len(), 64);
        assert!(cache.lock().slots.len() <= 64, "slots are reused");
        check_links(&cache);
        // The newest are the ones kept.
        for n in 10_000 - 64..10_000 {
            assert_eq!(
                cache.get(&key(n), 1, Instant::now()).as_deref(),
                Some(&*format!("id-{n}"))
            );
        }
        assert!(cache.get(&key(0), 1, Instant::now()).is_none());
        check_links(&cache);
    }

    #[tokio::test(start_paused = true)]
    async fn entries_expire_at_their_deadline() {
        let cache = TokenCache::new(8);
        let start = Instant::now();
        cache.insert(key(1), "a".into(), start + Duration::from_secs(10), 1);
        cache.insert(key(2), "b".into(), start + TOKEN_CACHE_TTL, 1);
        tokio::time::advance(Duration::from_secs(10) - Duration::from_millis(1)).await;
        assert_eq!(cache.get(&key(1), 1, Instant::now()).as_deref(), Some("a"));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(
            cache.get(&key(1), 1, Instant::now()),
            None,
            "at the deadline"
        );
        assert_eq!(cache.len(), 1, "the expired entry is gone");
        assert_eq!(cache.get(&key(2), 1, Instant::now()).as_deref(), Some("b"));
        tokio::time::advance(TOKEN_CACHE_TTL).await;
        assert_eq!(cache.get(&key(2), 1, Instant::now()), None);
        assert_eq!(cache.len(), 0);
        check_links(&cache);
    }

    #[tokio::test(start_paused = true)]
    async fn another_key_set_generation_misses() {
        let cache = TokenCache::new(8);
        let far = Instant::now() + TOKEN_CACHE_TTL;
        cache.insert(key(1), "a".into(), far, 7);
        cache.insert(key(2), "b".into(), far, 7);
        assert_eq!(cache.get(&key(1), 8, Instant::now()), None);
        assert_eq!(cache.len(), 1, "the stale entry is gone");
        assert_eq!(
            cache.get(&key(1), 7, Instant::now()),
            None,
            "and stays gone"
        );
        assert_eq!(cache.get(&key(2), 7, Instant::now()).as_deref(), Some("b"));
        // Verified again under the new keys: replaced in place.
        cache.insert(key(2), "b".into(), far, 8);
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(&key(2), 8, Instant::now()).as_deref(), Some("b"));
        cache.clear();
        assert_eq!(cache.len(), 0);
        check_links(&cache);
    }

    #[tokio::test(start_paused = true)]
    async fn deadlines_are_the_earlier_of_exp_and_the_ttl() {
        let now = Instant::now();
        let wall = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at = |exp: f64| deadline(Some(exp), now, wall).map(|d| d - now);
        assert_eq!(at(1_000_000.0 + 3600.0), Some(TOKEN_CACHE_TTL));
        assert_eq!(
            at(1_000_000.0 + 10.0),
            Some(Duration::from_secs(10) + LEEWAY)
        );
        assert_eq!(
            at(1_000_000.0 - 10.0),
            Some(LEEWAY - Duration::from_secs(10)),
            "expired within the leeway: accepted until the leeway ends"
        );
        assert_eq!(at(1_000_000.0 - LEEWAY.as_secs_f64()), None);
        assert_eq!(at(0.0), None);
        assert_eq!(at(f64::NAN), None);
        assert_eq!(at(f64::INFINITY), None);
        assert_eq!(at(1e300), Some(TOKEN_CACHE_TTL));
        assert_eq!(deadline(None, now, wall), None);
    }
}
