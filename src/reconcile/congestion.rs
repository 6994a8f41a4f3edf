//! How many requests to one origin may be in flight at once.
//!
//! Owns: the request window of an HTTP origin, adapted the way TCP adapts its
//! congestion window (additive increase, multiplicative decrease). It starts small,
//! grows by one per success while nothing has gone wrong ("slow start": it doubles
//! every round trip, so a high-latency link fills quickly), and is halved when the
//! server signals overload (429, 503, a refused or reset connection, a timeout, a
//! connection that took a lost SYN's second to open);
//! after that it grows by one per window's worth of successes, and eight times
//! slower within one request of the window the last overload happened at (the
//! server's limit is probably there: probing it costs a refusal each time). A lost
//! SYN tells a second late: it halves the window its request started in, and the
//! growth back to there is held to one a second.
//!
//! Invariants kept: never more than `cap` requests in flight (the `--jobs` hard
//! cap), never fewer than one allowed; one burst of failures halves the window once,
//! not once per failed request (only a request started after the last decrease can
//! decrease it again).

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// After a lost handshake, until the window is back where it was then, it grows
/// by one per this long at most: the signal takes a second to come (the SYN's
/// retransmission), and growth faster than the signal would refill the server's
/// queue before it could say so.
const PACED_GROWTH: Duration = Duration::from_secs(1);

/// The window a pull starts with: enough to overlap a few round trips, small enough
/// that a server that refuses early sees only a few refusals.
pub const INITIAL_WINDOW: usize = 8;

/// The adaptive request window of one origin.
#[derive(Debug)]
pub struct Window {
    state: Mutex<State>,
    freed: Condvar,
    cap: usize,
}

#[derive(Debug)]
struct State {
    /// Requests allowed in flight (fractional: grows by 1/window per success).
    window: f64,
    in_flight: usize,
    /// Bumped on every decrease; a request remembers the epoch it started in.
    epoch: u64,
    /// Still growing by one per success (no overload seen yet).
    slow_start: bool,
    /// The window when the last overload was signalled.
    ceiling: f64,
    /// Since a lost handshake (when, and the window it left): growth is paced
    /// until the window is back at the ceiling.
    paced: Option<(Instant, f64)>,
}

/// A permit for one request; returned to the window when dropped.
#[derive(Debug)]
pub struct Permit<'a> {
    window: &'a Window,
    epoch: u64,
    /// The window when this request started.
    started_in: f64,
    /// Other requests of ours were in flight when this one started.
    pub contended: bool,
}

impl Window {
    /// A window of at most `cap` requests (at least 1), starting at
    /// [`INITIAL_WINDOW`] or `cap` if that is smaller.
    pub fn new(cap: usize) -> Window {
        let cap = cap.max(1);
        Window {
            state: Mutex::new(State {
                window: INITIAL_WINDOW.min(cap) as f64,
                in_flight: 0,
                epoch: 0,
                slow_start: true,
                ceiling: f64::INFINITY,
                paced: None,
            }),
            freed: Condvar::new(),
            cap,
        }
    }

    /// Wait until one more request fits in the window.
    pub fn acquire(&self) -> Permit<'_> {
        let mut st = self.lock();
        while st.in_flight >= (st.window as usize).max(1) {
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.in_flight += 1;
        Permit {
            window: self,
            epoch: st.epoch,
            started_in: st.window,
            contended: st.in_flight > 1,
        }
    }

    /// The current window, rounded down (for tests and diagnostics).
    pub fn current(&self) -> usize {
        self.lock().window as usize
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Permit<'_> {
    /// The request succeeded: grow the window.
    pub fn succeeded(&self) {
        let mut st = self.window.lock();
        let grow = if st.slow_start {
            1.0
        } else if st.window + 1.0 < st.ceiling {
            1.0 / st.window
        } else {
            1.0 / (8.0 * st.window)
        };
        let mut grown = (st.window + grow).min(self.window.cap as f64);
        if let Some((since, left)) = st.paced {
            let allowed = left + since.elapsed().as_secs_f64() / PACED_GROWTH.as_secs_f64();
            grown = grown.min(allowed.floor().max(st.window));
            if grown >= st.ceiling {
                st.paced = None;
            }
        }
        st.window = grown;
        drop(st);
        self.window.freed.notify_all();
    }

    /// The server signalled overload: halve the window, once per burst.
    pub fn overloaded(&self) {
        let mut st = self.window.lock();
        if self.epoch == st.epoch {
            let now = st.window;
            st.decrease_from(now);
        }
    }

    /// This request's connection lost its handshake (a server whose accept
    /// queue is full drops SYNs): overload, once per burst, halving the window
    /// this request started in when that was smaller (the signal comes a second
    /// late, and is about the load of then, not the growth since); then growth
    /// is paced until the window is back there.
    pub fn lost_handshake(&self) {
        let mut st = self.window.lock();
        if self.epoch == st.epoch {
            let then = st.window.min(self.started_in);
            st.decrease_from(then);
            st.paced = Some((Instant::now(), st.window));
        } else if st.paced.is_none() {
            // Another signal of the burst halved the window already; the
            // growth back is paced all the same.
            st.paced = Some((Instant::now(), st.window));
        }
    }
}

impl State {
    /// Halve `from` (at least one), remembered as the ceiling to probe slowly.
    fn decrease_from(&mut self, from: f64) {
        self.ceiling = from;
        self.window = (from / 2.0).max(1.0);
        self.slow_start = false;
        self.epoch += 1;
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut st = self.window.lock();
        st.in_flight -= 1;
        drop(st);
        self.window.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_then_one_halving_per_burst() {
        let w = Window::new(100);
        assert_eq!(w.current(), INITIAL_WINDOW);
        for _ in 0..4 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), INITIAL_WINDOW + 4);
        // Three requests of one burst fail: one halving.
        let permits: Vec<_> = (0..3).map(|_| w.acquire()).collect();
        assert!(permits[1].contended && permits[2].contended);
        for p in &permits {
            p.overloaded();
        }
        drop(permits);
        assert_eq!(w.current(), (INITIAL_WINDOW + 4) / 2);
        // After the decrease growth is additive: about a window's worth of
        // successes adds one, far below the window of the last overload.
        let before = w.current();
        for _ in 0..before + 1 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), before + 1);
        // Within one of it, eight times slower.
        let w = Window::new(100);
        w.acquire().overloaded(); // 8 -> 4, ceiling 8
        for _ in 0..5 + 6 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), 6);
        w.acquire().overloaded(); // 6 -> 3, ceiling 6
        for _ in 0..4 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), 4); // 3 + 4 * 1/3
        for _ in 0..24 {
            w.acquire().succeeded();
        }
        // Normal growth up to 5 (one below the ceiling), then 1/40 per success.
        assert_eq!(w.current(), 5, "probing near the ceiling is slow");
    }

    #[test]
    fn a_late_lost_handshake_halves_the_window_its_request_started_in() {
        let w = Window::new(1000);
        let late = w.acquire();
        for _ in 0..200 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), INITIAL_WINDOW + 200);
        late.lost_handshake();
        assert_eq!(w.current(), INITIAL_WINDOW / 2);
    }

    #[test]
    fn a_late_failure_halves_the_window_as_it_is_now() {
        // A long download started small, cut minutes later: the window grown
        // meanwhile served the server well, and is halved, not collapsed.
        let w = Window::new(1000);
        let late = w.acquire();
        for _ in 0..200 {
            w.acquire().succeeded();
        }
        late.overloaded();
        assert_eq!(w.current(), (INITIAL_WINDOW + 200) / 2);
    }

    #[test]
    fn after_a_lost_handshake_growth_is_paced_until_back_at_the_ceiling() {
        let w = Window::new(100);
        for _ in 0..8 {
            w.acquire().succeeded();
        }
        w.acquire().lost_handshake(); // 16 -> 8, ceiling 16
        assert_eq!(w.current(), INITIAL_WINDOW);
        for _ in 0..100 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), INITIAL_WINDOW, "no growth within a second");
        // A second on, the usual growth (1/8 a success), not one a success.
        let since = Instant::now() - Duration::from_millis(1050);
        w.lock().paced = Some((since, INITIAL_WINDOW as f64));
        for _ in 0..3 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), INITIAL_WINDOW);
        assert!(
            w.lock().window > INITIAL_WINDOW as f64,
            "it grows all the same"
        );
        // Long after, the usual growth up to the ceiling, and the pacing ends.
        w.lock().paced = Some((Instant::now() - Duration::from_secs(100), 8.0));
        for _ in 0..200 {
            w.acquire().succeeded();
        }
        assert!(w.lock().paced.is_none());
        assert!(w.current() >= 2 * INITIAL_WINDOW, "{}", w.current());
    }

    #[test]
    fn a_lost_handshake_after_another_overload_paces_the_growth() {
        let w = Window::new(100);
        let late = w.acquire();
        w.acquire().overloaded(); // 8 -> 4
        late.lost_handshake(); // the same burst: no second halving
        assert_eq!(w.current(), INITIAL_WINDOW / 2);
        for _ in 0..100 {
            w.acquire().succeeded();
        }
        assert_eq!(
            w.current(),
            INITIAL_WINDOW / 2,
            "paced: no growth within a second"
        );
    }

    #[test]
    fn capped_and_never_below_one() {
        let w = Window::new(3);
        assert_eq!(w.current(), 3);
        for _ in 0..10 {
            w.acquire().succeeded();
        }
        assert_eq!(w.current(), 3);
        for _ in 0..10 {
            w.acquire().overloaded();
        }
        assert_eq!(w.current(), 1);
        let p = w.acquire();
        assert!(!p.contended);
    }
}
