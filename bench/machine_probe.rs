//! A probe of the machine itself, with nothing else of the relay running: every 5 ms it does
//! the same small piece of memory work (four passes over 1 MiB) and prints the moments when
//! that work took more than 2.5 times its fastest, as "seconds since start: milliseconds".
//! On a shared virtual machine this shows the periods when every process runs slower, which
//! no change to the relay can remove. Usage: `machine_probe [SECONDS]` (default 15).

use std::hint::black_box;
use std::time::{Duration, Instant};

fn main() {
    let seconds: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(15.0);
    let start = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut fastest = Duration::MAX;
    let mut slow = 0usize;
    let mut rounds = 0usize;
    while start.elapsed().as_secs_f64() < seconds {
        let began = Instant::now();
        let mut h = 0u64;
        for _ in 0..4 {
            for i in (0..buf.len()).step_by(64) {
                buf[i] = buf[i].wrapping_add(1);
                h = h.wrapping_mul(31).wrapping_add(u64::from(buf[i]));
            }
        }
        black_box(h);
        let took = began.elapsed();
        fastest = fastest.min(took);
        rounds += 1;
        if took > fastest.mul_f64(2.5) {
            slow += 1;
            println!(
                "{:.3} s: {:.2} ms",
                began.duration_since(start).as_secs_f64(),
                took.as_secs_f64() * 1e3
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "{slow} of {rounds} rounds took more than 2.5x the fastest ({:.3} ms)",
        fastest.as_secs_f64() * 1e3
    );
}
