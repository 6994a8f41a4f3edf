//! MD5 throughput on this machine, one core: the `md-5` crate on one stream
//! against `stack::md5x` hashing 1, 6 and 8 streams in lock step. For the
//! network benchmark's CPU budget (BENCHMARKS.md).
//!
//!     cargo run --release --example md5_speed

use md5::{Digest, Md5};
use std::time::Instant;

fn main() {
    let len = 64 << 20;
    let data: Vec<Vec<u8>> = (0..8u8)
        .map(|i| (0..len).map(|j| (j as u8).wrapping_mul(7) ^ i).collect())
        .collect();
    let t = Instant::now();
    let digest = Md5::digest(&data[0]);
    let secs = t.elapsed().as_secs_f64();
    println!(
        "md-5, one stream:      {:5.0} MB/s ({:02x?}..)",
        len as f64 / secs / 1e6,
        &digest[..2]
    );
    for lanes in [1usize, 6, 8] {
        let slices: Vec<&[u8]> = data[..lanes].iter().map(Vec::as_slice).collect();
        let t = Instant::now();
        let digests = stack::md5x::digest_slices(&slices);
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(digests[0][..], digest[..]);
        println!(
            "md5x, {lanes} in lock step: {:5.0} MB/s in all",
            (len * lanes) as f64 / secs / 1e6
        );
    }
}
