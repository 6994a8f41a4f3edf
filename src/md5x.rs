//! MD5 of several files at once, for `stack verify --contents` and for staging.
//!
//! Owns: a multi-buffer MD5 — the compression of eight independent streams runs in
//! lock step, one stream per vector lane (MD5 is one long dependency chain per
//! stream, so a single stream cannot use the vector units; eight can), plus the
//! driver that keeps eight files in flight per thread, each read through the
//! [`Fs`] seam. The result is plain MD5 (RFC 1321), checked against the `md-5`
//! crate by the tests below. Also the one home of an md5's text: lowercase hex
//! written ([`hex`], [`hex_into`]) and read ([`is_md5_hex`]).

use std::collections::VecDeque;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};

use crate::fs::Fs;

/// Streams per lock step: eight 32-bit lanes fill one AVX2 register.
const LANES: usize = 8;
/// Read size per stream (a multiple of the 64-byte block).
const CHUNK: usize = 64 * 1024;

const INIT: [u32; 4] = [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476];

const K: [u32; 64] = [
    0xd76a_a478,
    0xe8c7_b756,
    0x2420_70db,
    0xc1bd_ceee,
    0xf57c_0faf,
    0x4787_c62a,
    0xa830_4613,
    0xfd46_9501,
    0x6980_98d8,
    0x8b44_f7af,
    0xffff_5bb1,
    0x895c_d7be,
    0x6b90_1122,
    0xfd98_7193,
    0xa679_438e,
    0x49b4_0821,
    0xf61e_2562,
    0xc040_b340,
    0x265e_5a51,
    0xe9b6_c7aa,
    0xd62f_105d,
    0x0244_1453,
    0xd8a1_e681,
    0xe7d3_fbc8,
    0x21e1_cde6,
    0xc337_07d6,
    0xf4d5_0d87,
    0x455a_14ed,
    0xa9e3_e905,
    0xfcef_a3f8,
    0x676f_02d9,
    0x8d2a_4c8a,
    0xfffa_3942,
    0x8771_f681,
    0x6d9d_6122,
    0xfde5_380c,
    0xa4be_ea44,
    0x4bde_cfa9,
    0xf6bb_4b60,
    0xbebf_bc70,
    0x289b_7ec6,
    0xeaa1_27fa,
    0xd4ef_3085,
    0x0488_1d05,
    0xd9d4_d039,
    0xe6db_99e5,
    0x1fa2_7cf8,
    0xc4ac_5665,
    0xf429_2244,
    0x432a_ff97,
    0xab94_23a7,
    0xfc93_a039,
    0x655b_59c3,
    0x8f0c_cc92,
    0xffef_f47d,
    0x8584_5dd1,
    0x6fa8_7e4f,
    0xfe2c_e6e0,
    0xa301_4314,
    0x4e08_11a1,
    0xf753_7e82,
    0xbd3a_f235,
    0x2ad7_d2bb,
    0xeb86_d391,
];

const S: [u32; 16] = [7, 12, 17, 22, 5, 9, 14, 20, 4, 11, 16, 23, 6, 10, 15, 21];

/// Step `I` of 64 for every lane: `a = b + ((a + f(b, c, d) + K[I] + m[g]) <<< s)`.
/// `I` is a constant, so the round function, `g`, `K[I]` and the rotation fold
/// away; the loop runs across lanes and becomes vector instructions.
#[inline(always)]
fn step<const N: usize, const I: usize>(
    a: &mut [u32; N],
    b: &[u32; N],
    c: &[u32; N],
    d: &[u32; N],
    m: &[[u32; N]; 16],
) {
    let g = match I / 16 {
        0 => I,
        1 => (5 * I + 1) % 16,
        2 => (3 * I + 5) % 16,
        _ => (7 * I) % 16,
    };
    let s = S[(I / 16) * 4 + I % 4];
    let ready: [u32; N] = std::array::from_fn(|l| a[l].wrapping_add(K[I]).wrapping_add(m[g][l]));
    // Opaque to the optimizer, so that it cannot fold the constant back in
    // after `f`: the sum is made off the critical path (it needs only `a`, four
    // steps old), leaving `f`, one add, the rotate and one add on it. One lane
    // is scalar code the compiler schedules well, and the trip through memory
    // would cost it.
    let ready = if N > 1 {
        std::hint::black_box(ready)
    } else {
        ready
    };
    for l in 0..N {
        let (b, c, d) = (b[l], c[l], d[l]);
        let f = match I / 16 {
            0 => d ^ (b & (c ^ d)),
            1 => c ^ (d & (b ^ c)),
            2 => b ^ c ^ d,
            _ => c ^ (b | !d),
        };
        a[l] = b.wrapping_add(ready[l].wrapping_add(f).rotate_left(s));
    }
}

/// One 64-byte block of each of `N` streams: `state[word][lane]`, `m[word][lane]`.
#[inline(always)]
fn compress<const N: usize>(state: &mut [[u32; N]; 4], m: &[[u32; N]; 16]) {
    let [mut a, mut b, mut c, mut d] = *state;
    macro_rules! four {
        ($i:literal) => {
            step::<N, { $i }>(&mut a, &b, &c, &d, m);
            step::<N, { $i + 1 }>(&mut d, &a, &b, &c, m);
            step::<N, { $i + 2 }>(&mut c, &d, &a, &b, m);
            step::<N, { $i + 3 }>(&mut b, &c, &d, &a, m);
        };
    }
    four!(0);
    four!(4);
    four!(8);
    four!(12);
    four!(16);
    four!(20);
    four!(24);
    four!(28);
    four!(32);
    four!(36);
    four!(40);
    four!(44);
    four!(48);
    four!(52);
    four!(56);
    four!(60);
    for (s, v) in state.iter_mut().zip([a, b, c, d]) {
        for l in 0..N {
            s[l] = s[l].wrapping_add(v[l]);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn compress_lanes_avx2(state: &mut [[u32; LANES]; 4], m: &[[u32; LANES]; 16]) {
    compress(state, m)
}

/// AVX-512 only adds a one-instruction rotate (`vprold`) on the same registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avx512f,avx512vl")]
fn compress_lanes_avx512(state: &mut [[u32; LANES]; 4], m: &[[u32; LANES]; 16]) {
    compress(state, m)
}

fn compress_lanes(state: &mut [[u32; LANES]; 4], m: &[[u32; LANES]; 16]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl")
            && std::is_x86_feature_detected!("avx2")
        {
            // SAFETY: the CPU supports AVX-512F, AVX-512VL and AVX2, checked above.
            return unsafe { compress_lanes_avx512(state, m) };
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU supports AVX2, checked just above.
            return unsafe { compress_lanes_avx2(state, m) };
        }
    }
    compress(state, m)
}

fn word(block: &[u8], w: usize) -> u32 {
    u32::from_le_bytes([
        block[4 * w],
        block[4 * w + 1],
        block[4 * w + 2],
        block[4 * w + 3],
    ])
}

/// Finish one stream: `tail` is what is left after its full blocks (< 64 bytes),
/// `len` its total length in bytes.
fn finish(mut state: [u32; 4], tail: &[u8], len: u64) -> [u8; 16] {
    let mut pad = [0u8; 128];
    pad[..tail.len()].copy_from_slice(tail);
    pad[tail.len()] = 0x80;
    let end = if tail.len() < 56 { 64 } else { 128 };
    pad[end - 8..end].copy_from_slice(&len.wrapping_mul(8).to_le_bytes());
    for block in pad[..end].chunks_exact(64) {
        let mut st = [[0u32; 1]; 4];
        for (s, v) in st.iter_mut().zip(state) {
            s[0] = v;
        }
        let mut m = [[0u32; 1]; 16];
        for (w, slot) in m.iter_mut().enumerate() {
            slot[0] = word(block, w);
        }
        compress(&mut st, &m);
        for (v, s) in state.iter_mut().zip(st) {
            *v = s[0];
        }
    }
    let mut out = [0u8; 16];
    for (o, v) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&v.to_le_bytes());
    }
    out
}

/// One file in flight in a lane.
struct Stream {
    item: usize,
    reader: Box<dyn Read + Send>,
    buf: Vec<u8>,
    /// Bytes of `buf` not hashed yet: `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// Bytes hashed so far (whole blocks).
    done: u64,
    eof: bool,
}

impl Stream {
    fn blocks(&self) -> usize {
        (self.end - self.pos) / 64
    }

    /// Move the unhashed bytes to the front and read until the buffer is full or
    /// the file ends.
    fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
        while !self.eof && self.end < self.buf.len() {
            match self.reader.read(&mut self.buf[self.end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.end += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// MD5 of each of up to `LANES` byte slices, in lock step (staging hashes a
/// batch of small downloads at once). Slices of unequal length cost the longest
/// one's blocks in every lane; staging batches files of similar size.
pub fn digest_slices(data: &[&[u8]]) -> Vec<[u8; 16]> {
    let mut out = Vec::with_capacity(data.len());
    for group in data.chunks(LANES) {
        let mut states = INIT.map(|v| [v; LANES]);
        let whole: [&[u8]; LANES] =
            std::array::from_fn(|l| group.get(l).map_or(&[][..], |d| &d[..d.len() / 64 * 64]));
        compress_masked(&mut states, &whole);
        for (l, d) in group.iter().enumerate() {
            // A slice without a whole block left its lane undefined: it is INIT.
            let st = match whole[l].is_empty() {
                true => INIT,
                false => [states[0][l], states[1][l], states[2][l], states[3][l]],
            };
            out.push(finish(st, &d[whole[l].len()..], d.len() as u64));
        }
    }
    out
}

/// Bytes a stream hands to its lane at a time: its reader fills a window of
/// this size ([`Lane::read_from`] reads straight into it, so the bytes land
/// where they are hashed), then queues the window's whole blocks.
const WINDOW: usize = 256 * 1024;
/// A window with less room than this is queued before the next read: a read
/// into a sliver of room would cost a system call for a few bytes.
const MIN_READ: usize = 16 * 1024;
/// Windows a lane holds queued at most: a writer whose queue is full runs a
/// pass or waits for the one under way, so memory stays bounded however far
/// hashing falls behind: a lane holds its queue, the window a pass is hashing,
/// the one being filled and, while its digest is taken, one more (2.75 MiB).
const QUEUE_CAP: usize = 8;
/// Free windows kept for reuse at most (the rest are freed): enough for every
/// lane to swap windows without allocating.
const SPARE_CAP: usize = 2 * LANES;

/// Streams that arrive piecemeal and concurrently (downloads), hashed in lock
/// step: up to eight at a time, one per lane.
///
/// Each stream fills a window of its own and queues it in its lane once full.
/// When every stream still arriving has a window queued (or one stream's queue
/// is full) and no pass is running, that writer takes the front window of every
/// lane and hashes them in one pass of the 8-lane compress, outside the lock,
/// while the other streams keep reading. Downloads arrive in bursts, stream by
/// stream, hence the queues; a lane with fewer blocks than the others keeps its
/// state for the steps it has none (masked), so a stalled stream never holds up
/// the rest. The digests are plain MD5, checked against the `md-5` crate by the
/// tests.
#[derive(Default)]
pub struct LockStep {
    shared: Mutex<Shared>,
    /// Signalled when a pass ends.
    passed: Condvar,
}

#[derive(Default)]
struct Shared {
    states: [[u32; LANES]; 4],
    lanes: [LaneQueue; LANES],
    /// A pass is hashing the windows it took out of the lanes.
    hashing: bool,
    /// Windows free for reuse.
    spare: Vec<Vec<u8>>,
}

impl Shared {
    /// Is a pass worth starting now that `lane` queued a window? When every
    /// stream still arriving has one (the pass fills every busy lane), or when
    /// `lane`'s queue is full (its stream outruns the others).
    fn due(&self, lane: usize) -> bool {
        let even = self
            .lanes
            .iter()
            .filter(|l| l.in_use && !l.finished)
            .all(|l| !l.queued.is_empty());
        even || self.lanes[lane].queued.len() >= QUEUE_CAP
    }

    /// A window to fill, reused when one is free.
    fn window(&mut self) -> Vec<u8> {
        self.spare.pop().unwrap_or_else(|| vec![0; WINDOW])
    }

    /// Keep `window` for reuse, or free it when enough are kept.
    fn give_back(&mut self, window: Vec<u8>) {
        if self.spare.len() < SPARE_CAP && window.len() == WINDOW {
            self.spare.push(window);
        }
    }
}

#[derive(Default)]
struct LaneQueue {
    in_use: bool,
    /// Its stream asked for its digest and has not been written to since: it is
    /// probably complete, and no pass waits for it.
    finished: bool,
    /// Windows not hashed yet, oldest first, each with the bytes it holds (whole
    /// blocks).
    queued: VecDeque<(Vec<u8>, usize)>,
    /// Bytes hashed so far (whole blocks).
    hashed: u64,
}

/// One stream of a [`LockStep`]; its lane is freed when it is dropped.
pub struct Lane<'a> {
    group: &'a LockStep,
    index: usize,
    /// The window being filled: `window[..filled]` is not queued yet.
    window: Vec<u8>,
    filled: usize,
}

impl std::fmt::Debug for LockStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.lock();
        f.debug_struct("LockStep")
            .field("lanes_in_use", &s.lanes.iter().filter(|l| l.in_use).count())
            .field("hashing", &s.hashing)
            .finish()
    }
}

impl std::fmt::Debug for Lane<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lane")
            .field("index", &self.index)
            .field("filled", &self.filled)
            .finish()
    }
}

impl LockStep {
    /// A group with every lane free.
    pub fn new() -> LockStep {
        LockStep::default()
    }

    /// A free lane, starting an empty stream; `None` when all eight are taken
    /// (the caller hashes that stream on its own).
    pub fn lane(&self) -> Option<Lane<'_>> {
        let mut s = self.lock();
        let index = s.lanes.iter().position(|l| !l.in_use)?;
        // No pass touches a free lane's state, so it can be set while one runs.
        s.lanes[index].in_use = true;
        set_lane(&mut s.states, index, INIT.map(|v| [v]));
        let window = s.window();
        Some(Lane {
            group: self,
            index,
            window,
            filled: 0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait<'g>(&'g self, s: MutexGuard<'g, Shared>) -> MutexGuard<'g, Shared> {
        self.passed.wait(s).unwrap_or_else(|p| p.into_inner())
    }

    /// Wait until no pass is running.
    fn quiet<'g>(&'g self, mut s: MutexGuard<'g, Shared>) -> MutexGuard<'g, Shared> {
        while s.hashing {
            s = self.wait(s);
        }
        s
    }

    /// Take the front window of every lane that has one, hash them outside the
    /// lock, and put the new states back. Only the thread that set `hashing`
    /// touches the states of the lanes it took, and no lane it took is reset or
    /// freed meanwhile (both wait for [`LockStep::quiet`]).
    fn pass<'g>(&'g self, mut s: MutexGuard<'g, Shared>) -> MutexGuard<'g, Shared> {
        s.hashing = true;
        let unwinding = EndPass(self);
        let mut work: [(Vec<u8>, usize); LANES] = Default::default();
        for (lane, taken) in s.lanes.iter_mut().zip(&mut work) {
            if let Some(front) = lane.queued.pop_front() {
                *taken = front;
            }
        }
        let mut new_states = s.states;
        drop(s);
        let blocks: [&[u8]; LANES] = std::array::from_fn(|l| &work[l].0[..work[l].1]);
        compress_masked(&mut new_states, &blocks);
        std::mem::forget(unwinding);
        let mut s = self.lock();
        for (l, (window, len)) in work.into_iter().enumerate() {
            if len == 0 {
                continue;
            }
            set_lane(&mut s.states, l, lane_of(&new_states, l));
            s.lanes[l].hashed += len as u64;
            s.give_back(window);
        }
        s.hashing = false;
        self.passed.notify_all();
        s
    }
}

/// Ends a pass that unwinds (nothing in one panics today): without it, every
/// lane, the unwinding one's own `Drop` first, would wait for the pass forever.
struct EndPass<'a>(&'a LockStep);

impl Drop for EndPass<'_> {
    fn drop(&mut self) {
        self.0.lock().hashing = false;
        self.0.passed.notify_all();
    }
}

impl Lane<'_> {
    /// Read the next bytes of this stream from `source` into its window and
    /// return them: they are hashed in place, later (no copy is made).
    pub fn read_from(&mut self, source: &mut dyn Read) -> io::Result<&[u8]> {
        if WINDOW - self.filled < MIN_READ {
            self.hand_over();
        }
        let start = self.filled;
        let n = source.read(&mut self.window[start..])?;
        self.filled += n;
        Ok(&self.window[start..self.filled])
    }

    /// Hash `data` after what this stream has seen so far.
    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.filled == WINDOW {
                self.hand_over();
            }
            let n = (WINDOW - self.filled).min(data.len());
            self.window[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
        }
    }

    /// Queue the window's whole blocks, waiting while the lane's queue is full,
    /// and run the passes that are due.
    fn hand_over(&mut self) {
        let group = self.group;
        let mut s = group.lock();
        while s.lanes[self.index].queued.len() >= QUEUE_CAP {
            s = if s.hashing {
                group.wait(s)
            } else {
                group.pass(s)
            };
        }
        if !self.queue_whole_blocks(&mut s) {
            return;
        }
        while !s.hashing && s.due(self.index) {
            s = group.pass(s);
        }
    }

    /// Queue the whole blocks of the window and go on in a fresh one that
    /// starts with the rest (under 64 bytes). False when there are none.
    fn queue_whole_blocks(&mut self, s: &mut Shared) -> bool {
        let whole = self.filled / 64 * 64;
        if whole == 0 {
            return false;
        }
        let mut fresh = s.window();
        let rest = self.filled - whole;
        fresh[..rest].copy_from_slice(&self.window[whole..self.filled]);
        let full = std::mem::replace(&mut self.window, fresh);
        self.filled = rest;
        let lane = &mut s.lanes[self.index];
        lane.queued.push_back((full, whole));
        lane.finished = false;
        true
    }

    /// The MD5 of everything this stream has seen (it can go on after). Its
    /// queued windows are hashed by passes, which take the other lanes' front
    /// windows along.
    pub fn digest(&mut self) -> [u8; 16] {
        let group = self.group;
        let mut s = group.lock();
        self.queue_whole_blocks(&mut s);
        loop {
            if s.hashing {
                s = group.wait(s);
            } else if !s.lanes[self.index].queued.is_empty() {
                s = group.pass(s);
            } else {
                break;
            }
        }
        let lane = &mut s.lanes[self.index];
        lane.finished = true;
        let len = lane.hashed + self.filled as u64;
        let state = lane_of(&s.states, self.index).map(|w| w[0]);
        finish(state, &self.window[..self.filled], len)
    }

    /// Start this stream over, as if it had seen nothing.
    pub fn reset(&mut self) {
        let mut s = self.group.quiet(self.group.lock());
        self.release_queue(&mut s);
        s.lanes[self.index].in_use = true;
        set_lane(&mut s.states, self.index, INIT.map(|v| [v]));
        self.filled = 0;
    }

    /// Empty the lane, its windows back among the spares.
    fn release_queue(&self, s: &mut Shared) {
        let queued = std::mem::take(&mut s.lanes[self.index]).queued;
        for (window, _) in queued {
            s.give_back(window);
        }
    }
}

impl Drop for Lane<'_> {
    fn drop(&mut self) {
        let mut s = self.group.quiet(self.group.lock());
        self.release_queue(&mut s);
        s.give_back(std::mem::take(&mut self.window));
    }
}

/// Lane `l` of `states`, as the state of one stream.
fn lane_of(states: &[[u32; LANES]; 4], l: usize) -> [[u32; 1]; 4] {
    states.map(|w| [w[l]])
}

/// Set lane `l` of `states` to the state of one stream.
fn set_lane(states: &mut [[u32; LANES]; 4], l: usize, one: [[u32; 1]; 4]) {
    for (w, v) in states.iter_mut().zip(one) {
        w[l] = v[0];
    }
}

/// One 64-byte block as sixteen one-lane words.
fn block_words(block: &[u8]) -> [[u32; 1]; 16] {
    std::array::from_fn(|w| [word(block, w)])
}

/// Hash the whole blocks of `work[l]` into lane `l` of `states`, in lock step;
/// a lane with fewer blocks than the longest keeps its state for the steps it
/// has none, and a lane without work comes out undefined. One busy lane is
/// hashed on its own (eight lanes cost more than one when seven idle).
fn compress_masked(states: &mut [[u32; LANES]; 4], work: &[&[u8]; LANES]) {
    let blocks: [usize; LANES] = std::array::from_fn(|l| work[l].len() / 64);
    let busy: Vec<usize> = (0..LANES).filter(|&l| blocks[l] > 0).collect();
    if let [l] = busy[..] {
        let mut one = lane_of(states, l);
        for block in work[l].chunks_exact(64) {
            compress(&mut one, &block_words(block));
        }
        set_lane(states, l, one);
        return;
    }
    // Lanes not busy come out of this with garbage: `LockStep::pass` writes back
    // only the busy ones.
    let most = busy.iter().map(|&l| blocks[l]).max().unwrap_or(0);
    let least = busy.iter().map(|&l| blocks[l]).min().unwrap_or(0);
    let mut m = [[0u32; LANES]; 16];
    for k in 0..most {
        for &l in &busy {
            if k < blocks[l] {
                let words = work[l][64 * k..64 * k + 64].chunks_exact(4);
                for (slot, w) in m.iter_mut().zip(words) {
                    slot[l] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                }
            }
        }
        if k < least {
            compress_lanes(states, &m);
            continue;
        }
        let before = *states;
        compress_lanes(states, &m);
        for &l in &busy {
            if k >= blocks[l] {
                for (now, was) in states.iter_mut().zip(&before) {
                    now[l] = was[l];
                }
            }
        }
    }
}

/// Lowercase hex of a digest.
pub fn hex(bytes: &[u8]) -> String {
    let mut buf = vec![0u8; bytes.len() * 2];
    hex_into(bytes, &mut buf).to_string()
}

/// Lowercase hex of `bytes`, written into `out` (twice as long), without
/// allocating: an md5 of the state is written on the stack.
pub fn hex_into<'o>(bytes: &[u8], out: &'o mut [u8]) -> &'o str {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
    std::str::from_utf8(out).expect("only ASCII hex digits were written")
}

/// Is `text` an md5 as the engine records it: 32 lowercase hex digits (a
/// manifest's are lowered first)? Every byte looked at, none branched on: four
/// times faster than `all(is_ascii_hexdigit)` over a journal's 100k md5s.
pub fn is_md5_hex(text: &str) -> bool {
    let mut hex = text.len() == 32;
    for c in text.bytes() {
        hex &= c.is_ascii_digit() | matches!(c, b'a'..=b'f');
    }
    hex
}

/// MD5 (lowercase hex) of each file of `paths`, in order, on up to `threads`
/// threads; each thread keeps `LANES` files in flight, taking the next file from
/// a shared counter whenever one finishes.
pub fn md5_files(fs: &dyn Fs, paths: &[PathBuf], threads: usize) -> Vec<io::Result<String>> {
    let next = AtomicUsize::new(0);
    let work = || worker(fs, paths, &next);
    let threads = threads.clamp(1, paths.len().div_ceil(LANES).max(1));
    let parts: Vec<Vec<(usize, io::Result<String>)>> = if threads == 1 {
        vec![work()]
    } else {
        crate::par::on_threads(threads, |_| work())
    };
    let mut out: Vec<Option<io::Result<String>>> = (0..paths.len()).map(|_| None).collect();
    for (i, r) in parts.into_iter().flatten() {
        out[i] = Some(r);
    }
    out.into_iter()
        .map(|r| r.unwrap_or_else(|| Err(io::Error::other("file was not hashed"))))
        .collect()
}

fn worker(fs: &dyn Fs, paths: &[PathBuf], next: &AtomicUsize) -> Vec<(usize, io::Result<String>)> {
    let mut results = Vec::new();
    let mut lanes: Vec<Option<Stream>> = (0..LANES).map(|_| None).collect();
    let mut states = [[0u32; LANES]; 4];
    let mut spare: Vec<Vec<u8>> = Vec::new();
    let mut queue_empty = false;
    loop {
        // Give every lane a file with a block to hash; finish the files that ended.
        for (l, lane) in lanes.iter_mut().enumerate() {
            loop {
                if lane.is_none() {
                    if queue_empty {
                        break;
                    }
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(path) = paths.get(i) else {
                        queue_empty = true;
                        break;
                    };
                    match fs.open_read(path) {
                        Ok(reader) => {
                            *lane = Some(Stream {
                                item: i,
                                reader,
                                buf: spare.pop().unwrap_or_else(|| vec![0; CHUNK]),
                                pos: 0,
                                end: 0,
                                done: 0,
                                eof: false,
                            });
                            for (w, v) in INIT.iter().enumerate() {
                                states[w][l] = *v;
                            }
                        }
                        Err(e) => {
                            results.push((i, Err(e)));
                            continue;
                        }
                    }
                }
                let Some(s) = lane.as_mut() else { break };
                if s.blocks() > 0 {
                    break;
                }
                let filled = s.fill();
                if filled.is_ok() && s.blocks() > 0 {
                    break;
                }
                let Some(s) = lane.take() else { break };
                let r = filled.map(|()| {
                    let st = [states[0][l], states[1][l], states[2][l], states[3][l]];
                    let len = s.done + (s.end - s.pos) as u64;
                    hex(&finish(st, &s.buf[s.pos..s.end], len))
                });
                results.push((s.item, r));
                spare.push(s.buf);
            }
        }
        // Hash as many blocks as every busy lane has, in lock step.
        let Some(n) = lanes.iter().flatten().map(Stream::blocks).min() else {
            return results;
        };
        let mut m = [[0u32; LANES]; 16];
        for k in 0..n {
            for (l, lane) in lanes.iter().enumerate() {
                if let Some(s) = lane {
                    let at = s.pos + 64 * k;
                    let words = s.buf[at..at + 64].chunks_exact(4);
                    for (slot, w) in m.iter_mut().zip(words) {
                        slot[l] = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                    }
                }
            }
            compress_lanes(&mut states, &m);
        }
        for s in lanes.iter_mut().flatten() {
            s.pos += 64 * n;
            s.done += 64 * n as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::sim::SimFs;
    use md5::{Digest, Md5};
    use std::path::Path;

    fn reference(data: &[u8]) -> String {
        hex(&Md5::digest(data))
    }

    #[test]
    fn digest_slices_matches_md5_for_every_length_mix() {
        let data: Vec<Vec<u8>> = (0..21)
            .map(|i| (0..(i * 37 % 300)).map(|b| (b * 7 + i) as u8).collect())
            .collect();
        let slices: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
        let got = digest_slices(&slices);
        assert_eq!(got.len(), data.len());
        for (d, g) in data.iter().zip(&got) {
            assert_eq!(hex(g), reference(d), "length {}", d.len());
        }
        assert!(digest_slices(&[]).is_empty());
    }

    #[test]
    fn digest_slices_large_unequal_lanes_in_every_position() {
        let lens = [
            0usize,
            63,
            64,
            65,
            1 << 20,
            1000,
            128 * 1024 + 55,
            56,
            55,
            119,
            120,
            1 << 19,
            7,
            64 * 3,
        ];
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        };
        let data: Vec<Vec<u8>> = lens
            .iter()
            .map(|&n| (0..n).map(|_| next()).collect())
            .collect();
        for rot in 0..lens.len() {
            let mut d = data.clone();
            d.rotate_left(rot);
            let slices: Vec<&[u8]> = d.iter().map(Vec::as_slice).collect();
            for (s, g) in slices.iter().zip(digest_slices(&slices)) {
                assert_eq!(hex(&g), reference(s), "len {}", s.len());
            }
        }
    }

    /// Bytes from a xorshift generator seeded with `seed`.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn lock_step_streams_from_many_threads_match_md5() {
        let group = LockStep::new();
        // Lengths around the block edges, the trigger and the cap; each stream
        // written in chunks of its own uneven size, from its own thread, so that
        // passes see lanes with unequal blocks and lanes with none.
        let lens = [
            0usize,
            1,
            63,
            64,
            WINDOW - 1,
            WINDOW + 65,
            QUEUE_CAP * WINDOW + 7,
            3 * QUEUE_CAP * WINDOW + 1000,
        ];
        std::thread::scope(|sc| {
            for (i, &len) in lens.iter().enumerate() {
                let group = &group;
                sc.spawn(move || {
                    let data = noise(i as u64 + 1, len);
                    let mut lane = group.lane().expect("eight lanes for eight streams");
                    for chunk in data.chunks(1 + (i * 4099) % 70_000) {
                        lane.update(chunk);
                    }
                    assert_eq!(hex(&lane.digest()), reference(&data), "length {len}");
                });
            }
        });
    }

    /// A reader that hands out its bytes in reads of uneven sizes, as a socket
    /// does; when `flaky`, reads also fail now and then (interrupted, or cut).
    struct Uneven {
        data: Vec<u8>,
        pos: usize,
        step: usize,
        flaky: bool,
    }

    impl Uneven {
        fn new(data: Vec<u8>, step: usize, flaky: bool) -> Uneven {
            Uneven {
                data,
                pos: 0,
                step,
                flaky,
            }
        }
    }

    impl Read for Uneven {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.step = (self.step * 7919 + 13) % 90_001;
            if self.flaky {
                match self.step % 5 {
                    1 => return Err(io::ErrorKind::Interrupted.into()),
                    3 => return Err(io::Error::other("cut")),
                    _ => {}
                }
            }
            let n = (1 + self.step)
                .min(buf.len())
                .min(self.data.len() - self.pos);
            buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
            self.pos += n;
            Ok(n)
        }
    }

    #[test]
    fn lock_step_streams_read_in_place_match_md5_and_hand_back_every_byte() {
        let group = LockStep::new();
        let lens = [
            0usize,
            65,
            WINDOW - MIN_READ + 1,
            WINDOW + 1,
            5 * WINDOW + 3,
            9 * WINDOW,
        ];
        std::thread::scope(|sc| {
            for (i, &len) in lens.iter().enumerate() {
                let group = &group;
                sc.spawn(move || {
                    let data = noise(i as u64 + 20, len);
                    let mut source = Uneven::new(data.clone(), i, false);
                    let mut lane = group.lane().expect("a lane for each stream");
                    let mut seen = Vec::new();
                    loop {
                        let chunk = lane.read_from(&mut source).unwrap();
                        if chunk.is_empty() {
                            break;
                        }
                        seen.extend_from_slice(chunk);
                    }
                    assert!(
                        seen == data,
                        "length {len}: the bytes read are the source's"
                    );
                    assert_eq!(hex(&lane.digest()), reference(&data), "length {len}");
                });
            }
        });
    }

    #[test]
    fn lock_step_lanes_are_eight_reset_and_reused() {
        let group = LockStep::new();
        let lanes: Vec<Lane> = (0..LANES).map(|_| group.lane().unwrap()).collect();
        assert!(group.lane().is_none(), "a ninth stream gets no lane");
        drop(lanes);
        let data = noise(7, 3 * WINDOW + 5);
        let mut a = group.lane().unwrap();
        let mut b = group.lane().unwrap();
        a.update(&data[..1000]);
        b.update(&noise(8, WINDOW));
        // A digest along the way, and the stream goes on.
        assert_eq!(hex(&a.digest()), reference(&data[..1000]));
        a.update(&data[1000..]);
        assert_eq!(hex(&a.digest()), reference(&data));
        a.reset();
        a.update(&data[..77]);
        assert_eq!(hex(&a.digest()), reference(&data[..77]));
        drop(a);
        let mut fresh = group.lane().unwrap();
        assert_eq!(hex(&fresh.digest()), reference(b""));
        b.update(b"x");
        let mut want = noise(8, WINDOW);
        want.push(b'x');
        assert_eq!(hex(&b.digest()), reference(&want));
    }

    #[test]
    fn rfc_1321_vectors() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "d41d8cd98f00b204e9800998ecf8427e"),
            (b"abc", "900150983cd24fb0d6963f7d28e17f72"),
            (b"message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                b"12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (data, want) in cases {
            let mut st = [[0u32; 1]; 4];
            for (s, v) in st.iter_mut().zip(INIT) {
                s[0] = v;
            }
            let full = data.len() / 64 * 64;
            for block in data[..full].chunks_exact(64) {
                let mut m = [[0u32; 1]; 16];
                for (w, slot) in m.iter_mut().enumerate() {
                    slot[0] = word(block, w);
                }
                compress(&mut st, &m);
            }
            let state = [st[0][0], st[1][0], st[2][0], st[3][0]];
            assert_eq!(hex(&finish(state, &data[full..], data.len() as u64)), want);
        }
    }

    #[test]
    fn many_files_of_every_length_match_md5() {
        let fs = SimFs::new();
        // Lengths around the block and padding edges, the read chunk, and a few
        // large ones, so lanes finish at different times and get refilled.
        let mut lens: Vec<usize> = (0..=130).collect();
        lens.extend([
            CHUNK - 1,
            CHUNK,
            CHUNK + 1,
            CHUNK + 55,
            CHUNK + 56,
            3 * CHUNK + 7,
            16 * 1024,
            1,
            0,
        ]);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut paths = Vec::new();
        let mut want = Vec::new();
        fs.create_dir(Path::new("/d")).unwrap();
        for (i, len) in lens.iter().enumerate() {
            let data: Vec<u8> = (0..*len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let p = PathBuf::from(format!("/d/f{i}"));
            let mut w = fs.create(&p).unwrap();
            std::io::Write::write_all(&mut w, &data).unwrap();
            drop(w);
            want.push(reference(&data));
            paths.push(p);
        }
        paths.push(PathBuf::from("/d/missing"));
        for threads in [1, 2, 3] {
            let got = md5_files(&fs, &paths, threads);
            assert_eq!(got.len(), paths.len());
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.as_ref().unwrap(), w);
            }
            let last = got.last().unwrap().as_ref().unwrap_err();
            assert_eq!(last.kind(), io::ErrorKind::NotFound);
        }
    }

    fn queued(group: &LockStep, l: usize) -> usize {
        group.lock().lanes[l].queued.len()
    }

    /// Every window the group owns: spares, queued ones (the lanes' own
    /// current windows are counted by the caller).
    fn windows_held(group: &LockStep) -> usize {
        let s = group.lock();
        s.spare.len() + s.lanes.iter().map(|l| l.queued.len()).sum::<usize>()
    }

    #[test]
    fn queue_is_capped_while_another_stream_idles() {
        let group = LockStep::new();
        let mut idle = group.lane().unwrap();
        let mut fast = group.lane().unwrap();
        let data = noise(31, 3 * QUEUE_CAP * WINDOW + 100);
        for chunk in data.chunks(WINDOW / 3 + 7) {
            fast.update(chunk);
            assert!(queued(&group, fast.index) <= QUEUE_CAP);
            assert!(queued(&group, idle.index) == 0);
        }
        // No pass ran before the queue filled: the idle stream holds them back.
        assert_eq!(queued(&group, fast.index), QUEUE_CAP - 1);
        // Memory: the queued windows, the two current ones, the spares; bounded.
        assert!(
            windows_held(&group) + 2 <= QUEUE_CAP + 4,
            "{}",
            windows_held(&group)
        );
        assert_eq!(hex(&fast.digest()), reference(&data));
        assert_eq!(queued(&group, fast.index), 0);
        assert_eq!(hex(&idle.digest()), reference(b""));
    }

    #[test]
    fn reset_and_drop_with_queued_windows() {
        let group = LockStep::new();
        let mut idle = group.lane().unwrap();
        idle.update(&noise(40, 100));
        let mut a = group.lane().unwrap();
        let a_index = a.index;
        a.update(&noise(41, 3 * WINDOW + 5));
        assert_eq!(queued(&group, a_index), 3);
        a.reset();
        assert_eq!(queued(&group, a_index), 0);
        let x = noise(42, 2 * WINDOW + 99);
        a.update(&x);
        assert_eq!(hex(&a.digest()), reference(&x));
        a.update(&noise(43, 4 * WINDOW));
        assert!(queued(&group, a_index) >= 3);
        drop(a);
        let mut c = group.lane().unwrap();
        assert_eq!(c.index, a_index, "the freed lane is reused");
        let y = noise(44, WINDOW + 1);
        c.update(&y);
        assert_eq!(hex(&c.digest()), reference(&y));
        let mut want = noise(40, 100);
        assert_eq!(hex(&idle.digest()), reference(&want));
        want.extend(noise(45, 5 * WINDOW + 3));
        idle.update(&want[100..]);
        assert_eq!(hex(&idle.digest()), reference(&want));
    }

    /// Eight threads, each stream written in uneven pieces with digests,
    /// resets and drop/re-acquire along the way, checked against md-5 each
    /// time: passes run masked, with short windows (from mid-stream digests),
    /// while lanes are reset, dropped and taken again.
    #[test]
    fn concurrent_digests_resets_and_drops_match_md5() {
        let group = LockStep::new();
        std::thread::scope(|sc| {
            for t in 0..LANES {
                let group = &group;
                sc.spawn(move || {
                    let mut rng = 0x9e37_79b9u64 + t as u64;
                    let mut next = move |n: u64| {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        rng % n
                    };
                    for round in 0..12 {
                        let mut lane = group.lane().unwrap();
                        let mut md5 = Md5::new();
                        let mut seen = 0usize;
                        for op in 0..40 {
                            let len = match next(4) {
                                0 => next(64) as usize,
                                1 => next(5000) as usize,
                                _ => next(3 * WINDOW as u64) as usize,
                            };
                            let chunk = noise((t * 1000 + round * 100 + op) as u64, len);
                            lane.update(&chunk);
                            md5.update(&chunk);
                            seen += len;
                            match next(6) {
                                0 => assert_eq!(
                                    hex(&lane.digest()),
                                    hex(&md5.clone().finalize()),
                                    "thread {t} round {round} op {op} after {seen} bytes"
                                ),
                                1 if next(3) == 0 => {
                                    lane.reset();
                                    md5 = Md5::new();
                                    seen = 0;
                                }
                                _ => {}
                            }
                        }
                        if round % 2 == 1 {
                            // Dropped with windows queued, a pass maybe under way.
                            drop(lane);
                            continue;
                        }
                        assert_eq!(hex(&lane.digest()), hex(&md5.finalize()));
                    }
                });
            }
        });
    }

    #[test]
    fn read_errors_mid_window_add_no_bytes() {
        let group = LockStep::new();
        let _other = group.lane().unwrap();
        let data = noise(50, 3 * WINDOW + 4321);
        let mut src = Uneven::new(data.clone(), 0, true);
        let mut lane = group.lane().unwrap();
        let mut seen = Vec::new();
        loop {
            match lane.read_from(&mut src) {
                Ok([]) => break,
                Ok(chunk) => seen.extend_from_slice(chunk),
                Err(_) => continue,
            }
            // A digest mid-stream, at an odd length.
            if seen.len() % 3 == 0 {
                assert_eq!(hex(&lane.digest()), reference(&seen));
            }
        }
        assert!(seen == data);
        assert_eq!(hex(&lane.digest()), reference(&data));
    }

    #[test]
    fn every_compress_path_matches_md5() {
        let data: Vec<Vec<u8>> = (0..LANES).map(|l| noise(60 + l as u64, 64 * 37)).collect();
        let mut generic = INIT.map(|v| [v; LANES]);
        let mut avx2 = generic;
        let mut avx512 = generic;
        let mut one: Vec<[[u32; 1]; 4]> = vec![INIT.map(|v| [v]); LANES];
        for k in 0..37 {
            let m: [[u32; LANES]; 16] =
                std::array::from_fn(|w| std::array::from_fn(|l| word(&data[l][64 * k..], w)));
            compress(&mut generic, &m);
            #[cfg(target_arch = "x86_64")]
            {
                if std::is_x86_feature_detected!("avx2") {
                    unsafe { compress_lanes_avx2(&mut avx2, &m) };
                } else {
                    compress(&mut avx2, &m);
                }
                if std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl")
                {
                    unsafe { compress_lanes_avx512(&mut avx512, &m) };
                } else {
                    compress(&mut avx512, &m);
                }
            }
            for (l, st) in one.iter_mut().enumerate() {
                compress(st, &block_words(&data[l][64 * k..64 * k + 64]));
            }
        }
        for l in 0..LANES {
            let want = reference(&data[l]);
            let lane = |s: &[[u32; LANES]; 4]| [s[0][l], s[1][l], s[2][l], s[3][l]];
            let len = data[l].len() as u64;
            assert_eq!(hex(&finish(lane(&generic), &[], len)), want, "generic");
            assert_eq!(hex(&finish(lane(&avx2), &[], len)), want, "avx2");
            assert_eq!(hex(&finish(lane(&avx512), &[], len)), want, "avx512");
            let o = one[l].map(|w| w[0]);
            assert_eq!(hex(&finish(o, &[], len)), want, "one lane");
        }
    }

    /// Seven streams outrun an idle eighth: every pass is started by a full
    /// queue, and writers hand windows over while another's pass runs. No
    /// queue may grow past its cap.
    #[test]
    fn queues_stay_capped_under_concurrent_passes() {
        let group = LockStep::new();
        let mut idle = group.lane().unwrap();
        std::thread::scope(|sc| {
            for t in 0..LANES - 1 {
                let group = &group;
                sc.spawn(move || {
                    let data = noise(70 + t as u64, 4 * QUEUE_CAP * WINDOW + t);
                    let mut lane = group.lane().unwrap();
                    let mut most = 0;
                    for chunk in data.chunks(WINDOW) {
                        lane.update(chunk);
                        most = most.max(queued(group, lane.index));
                    }
                    assert!(most <= QUEUE_CAP, "a queue held {most} windows");
                    assert_eq!(hex(&lane.digest()), reference(&data));
                });
            }
        });
        assert_eq!(hex(&idle.digest()), reference(b""));
    }
}
