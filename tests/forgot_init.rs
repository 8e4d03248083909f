//! A program that forgets `clusterman::init()`: its workers run `main` again and reach
//! `Cluster::new()`. That must not start workers of their own (a fork bomb): they tell the
//! master what is wrong and exit, and the launch fails at once with a message naming the fix.
//!
//! This test binary has its own `main` (no test harness) and no `init_in_constructor!`, so
//! it is exactly such a program when `CMAN_FORGETFUL_LOG` is set.

use std::io::Write;
use std::process::Command;
use std::time::{Duration, Instant};

use clusterman::prelude::*;

fn main() {
    match std::env::var("CMAN_FORGETFUL_LOG") {
        Ok(log) => forgetful_program(&log),
        Err(_) => check(),
    }
}

/// The user's program, without `clusterman::init()`.
fn forgetful_program(log: &str) {
    let started = std::fs::read_to_string(log).unwrap_or_default().lines().count();
    if started >= 10 {
        std::process::exit(99); // the library failed to stop it: end the test's bomb here
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap();
    // one write per line: processes append at once, and `writeln!` may write in pieces
    f.write_all(format!("{}\n", std::process::id()).as_bytes()).unwrap();
    drop(f);
    let outcome = Cluster::new().and_then(|cluster| cluster.add_procs(LocalManager::new(2)));
    match outcome {
        Ok(pids) => println!("LAUNCHED {pids:?}"),
        Err(e) => println!("ERROR {e}"),
    }
}

fn check() {
    let log = std::env::temp_dir().join(format!("cman-forgetful-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap()).env("CMAN_FORGETFUL_LOG", &log).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(started.elapsed() < Duration::from_secs(30), "the launch failed at once, not at its timeout ({:?})", started.elapsed());
    assert!(stdout.contains("ERROR") && stdout.contains("does not call clusterman::init()") && stdout.contains("add `clusterman::init();`"), "the master's error names the fix:\n{stdout}\n{stderr}");
    assert!(stderr.contains("does not call clusterman::init()"), "the worker says so too:\n{stderr}");
    // every process that ever ran main: the master and at most the 2 workers it asked for
    let deadline = Instant::now() + Duration::from_secs(10);
    let pids = loop {
        let pids: Vec<u32> = std::fs::read_to_string(&log).unwrap_or_default().lines().map(|l| l.parse().unwrap()).collect();
        if pids.iter().all(|p| !alive(*p)) || Instant::now() >= deadline {
            break pids;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(pids.len() <= 3, "{} processes ran main: workers started workers", pids.len());
    assert!(pids.iter().all(|p| !alive(*p)), "processes left running: {pids:?}");
    let _ = std::fs::remove_file(&log);
    eprintln!("forgot_init: {} processes ran main, the launch failed after {:?}", pids.len(), started.elapsed());
    println!("test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out");
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !matches!(s.rsplit(')').next().and_then(|r| r.split_whitespace().next()), Some("Z" | "X")))
}
