//! Per-item CPU work of a batch (HPKE encapsulation, key-binding checks) spread over the cores,
//! results kept in item order.

/// `f` applied to every item, in order, split across the available cores once there are at least
/// `min_per_thread` items per thread. The calling thread takes the first chunk; a chunk whose
/// thread could not be started is done by the calling thread; the items of a thread that panicked
/// get `on_panic()`.
pub fn map_in_order<T: Sync, R: Send>(
    items: &[T],
    min_per_thread: usize,
    thread_name: &str,
    f: impl Fn(&T) -> R + Sync,
    on_panic: impl Fn() -> R,
) -> Vec<R> {
    let cores = cores();
    let threads = cores.min(items.len() / min_per_thread.max(1)).max(1);
    let run = |chunk: &[T]| chunk.iter().map(&f).collect::<Vec<R>>();
    if threads == 1 {
        return run(items);
    }
    let per_thread = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let mut chunks = items.chunks(per_thread);
        let mine = chunks.next().unwrap_or_default();
        let others: Vec<_> = chunks
            .map(|c| {
                let h = std::thread::Builder::new()
                    .name(thread_name.into())
                    .spawn_scoped(scope, move || run(c));
                (c, h.ok())
            })
            .collect();
        let mut out = run(mine);
        for (c, h) in others {
            match h.map(std::thread::ScopedJoinHandle::join) {
                Some(Ok(r)) => out.extend(r),
                Some(Err(_)) => out.extend(c.iter().map(|_| on_panic())),
                None => out.extend(run(c)),
            }
        }
        out
    })
}

/// The cores this process may use, read once: `available_parallelism` reads the cgroup's CPU
/// quota files on every call (about 0.5% of cn-backend's samples under full batches when it was
/// called twice per batch).
fn cores() -> usize {
    static CORES: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CORES
        .get_or_init(|| std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_whatever_the_split() {
        for n in [0usize, 1, 5, 16, 17, 100, 1001] {
            let items: Vec<usize> = (0..n).collect();
            let out = map_in_order(&items, 4, "t", |i| i * 2, || usize::MAX);
            assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        }
    }
}
