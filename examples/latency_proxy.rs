//! A TCP proxy that adds a round-trip time, for the network benchmark
//! (`scripts/bench --only net`): the kernel here has no netem.
//!
//!     latency_proxy LISTEN_PORT TARGET_HOST:PORT RTT_MS
//!
//! Every byte is delayed by half the round trip in each direction (throughput is
//! kept: bytes in flight are queued, not sent one round trip at a time), and a new
//! connection's first bytes wait one more round trip, as a TCP handshake would
//! make them. Prints `ready` on stdout once it listens.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc::sync_channel;
use std::thread;
use std::time::{Duration, Instant};

/// Chunks queued per direction (of up to 64 KiB): the link's buffer.
const QUEUE: usize = 256;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: latency_proxy LISTEN_PORT TARGET_HOST:PORT RTT_MS");
        std::process::exit(2);
    }
    let listen = format!("127.0.0.1:{}", args[1]);
    let target = args[2].clone();
    let rtt = Duration::from_millis(args[3].parse().expect("RTT_MS is a number"));
    let listener = TcpListener::bind(&listen).expect("bind");
    println!("ready");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(client) = conn else { continue };
        let target = target.clone();
        thread::spawn(move || {
            let accepted = Instant::now();
            let Ok(server) = TcpStream::connect(&target) else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let up = (client.try_clone().unwrap(), server.try_clone().unwrap());
            let handshake = accepted + rtt;
            let t = thread::spawn(move || pump(up.0, up.1, rtt / 2, Some(handshake)));
            pump(server, client, rtt / 2, None);
            let _ = t.join();
        });
    }
}

/// Copy `from` to `to`, each chunk written `delay` after it was read (and not
/// before `not_before`).
fn pump(mut from: TcpStream, mut to: TcpStream, delay: Duration, not_before: Option<Instant>) {
    let (tx, rx) = sync_channel::<(Instant, Vec<u8>)>(QUEUE);
    let writer = thread::spawn(move || {
        for (due, chunk) in rx {
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            if to.write_all(&chunk).is_err() {
                break;
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let read_at = Instant::now();
        let start = not_before.map_or(read_at, |t| t.max(read_at));
        if tx.send((start + delay, buf[..n].to_vec())).is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.join();
}
