//! A small parallel map over a slice, for the engine's read-only fan-outs (stat and
//! hash checks). Owns no state; keeps the order of results.

use crate::error::Result;

/// How many threads to use for CPU- or syscall-bound fan-outs. Asked once per
/// process: `available_parallelism` reads `/proc/self/cgroup` and two cgroup files
/// each time, and a no-op pull fans out four times.
pub fn threads() -> usize {
    static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *THREADS.get_or_init(|| {
        std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .min(8)
    })
}

/// Run `work` once on each of `threads` scoped threads and collect what each
/// returned, in thread order; a panic in one is resumed on the caller.
pub fn on_threads<T: Send>(threads: usize, work: impl Fn(usize) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let work = &work;
        let handles: Vec<_> = (0..threads).map(|t| s.spawn(move || work(t))).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

/// The results in order, or the first error, except that a simulated crash wins
/// over any other error (it must reach the caller untouched).
fn first_error<R>(results: impl IntoIterator<Item = Result<R>>) -> Result<Vec<R>> {
    let results = results.into_iter();
    let mut out = Vec::with_capacity(results.size_hint().0);
    let mut first = None;
    for r in results {
        match r {
            Ok(v) => out.push(v),
            Err(e) if e.is_crash() => return Err(e),
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

/// Map `f` over `items` on up to `threads` threads (contiguous chunks), keeping the
/// order. The first error of the earliest chunk is returned, except that a
/// simulated crash wins over any other error (it must reach the caller untouched).
pub fn map<T, R, F>(items: &[T], threads: usize, f: F) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> Result<R> + Sync,
{
    // Below this, a thread costs more than it saves.
    const MIN_PER_THREAD: usize = 256;
    let threads = threads.clamp(1, items.len().div_ceil(MIN_PER_THREAD).max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let parts: Vec<&[T]> = items.chunks(chunk).collect();
    let results = on_threads(parts.len(), |t| {
        parts[t].iter().map(&f).collect::<Result<Vec<R>>>()
    });
    Ok(first_error(results)?.into_iter().flatten().collect())
}

/// Like [`map`], but the threads take the items one at a time from a shared
/// counter instead of in fixed chunks, so items of uneven cost (files of different
/// sizes) keep every thread busy until the end. Same order and error rule as
/// [`map`]; after an error, no new item is started.
pub fn map_balanced<T, R, F>(items: &[T], threads: usize, f: F) -> Result<Vec<R>>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> Result<R> + Sync,
{
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(&f).collect();
    }
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let work = || {
        let mut done: Vec<(usize, Result<R>)> = Vec::new();
        while !failed.load(Ordering::Relaxed) {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some(item) = items.get(i) else { break };
            let r = f(item);
            if r.is_err() {
                failed.store(true, Ordering::Relaxed);
            }
            done.push((i, r));
        }
        done
    };
    let parts = on_threads(threads, |_| work());
    // Items are taken in increasing order, so every item before the first failed
    // one was taken and finished: the earliest error is among the results.
    let mut slots: Vec<Option<Result<R>>> = (0..items.len()).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        slots[i] = Some(r);
    }
    first_error(slots.into_iter().flatten())
}
