//! The programs the README tells a user to run, run as the user runs them (release builds,
//! real `mpirun`), their output checked: the MPI tour (`examples/mpi_cluster.rs`) and
//! `mpirun -np 5 target/release/cman_transport --tcp|--mpi`.

use std::path::PathBuf;
use std::process::Command;

fn launcher() -> String {
    std::env::var("CMAN_MPIEXEC").unwrap_or_else(|_| "mpirun".into())
}

/// Builds (if needed) and returns the release build of `what` (`--example x`, `--bin y`).
fn release_build(args: &[&str], path: &str) -> PathBuf {
    let status = Command::new(env!("CARGO")).args(["build", "--release", "--quiet"]).args(args).status().expect("run cargo");
    assert!(status.success(), "cargo build --release {args:?} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("release").join(path)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("start the program");
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

#[test]
fn the_mpi_tour_runs_every_step() {
    let tour = release_build(&["--example", "mpi_cluster"], "examples/mpi_cluster");
    let text = run(&mut Command::new(tour));
    for line in [
        "Added procs [1, 2, 3, 4, 5]",
        "From worker 5: Hello world, I am 3 of 4",
        "From worker 2:  Running on 4 processes",
        "From worker 4: [02] A: [1.5, 3.0, 4.5, 6.0, 7.5]",
        "From worker 3: [01] B: {\"foo\": \"bar\"}",
        "pmap successful",
        "parallel reduction: ",
        "sum of ranks: 6",
        "clusterman pids [2, 3, 4, 5]",
        "MPI ranks [0, 1, 2, 3]",
        "From worker 2: 0: Receiving 3 -> 0 = [3.0, 3.0, 3.0, 3.0]",
        "mpirun exited with Some(ExitStatus(unix_wait_status(0)))",
    ] {
        assert!(text.contains(line), "missing {line:?} in:\n{text}");
    }
}

#[test]
fn cman_transport_runs_on_five_ranks_over_both_transports() {
    let program = release_build(&["--bin", "cman_transport"], "cman_transport");
    for transport in ["--tcp", "--mpi"] {
        let text = run(Command::new(launcher()).args(["-np", "5"]).arg(&program).arg(transport));
        for size in [1_000, 1_000_000] {
            let line = text.lines().find(|l| l.ends_with(&format!("seconds for 100 loops of send-recv of array size {size}")));
            let seconds: Option<f64> = line.and_then(|l| l.split_whitespace().next()?.parse().ok());
            assert!(seconds.is_some_and(|s| s > 0.0), "{transport}: no timing for size {size} in:\n{text}");
        }
    }
}
