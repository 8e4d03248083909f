//! Kubernetes, through the fake `kubectl` of `tests/fixtures/kubernetes` (no cluster can run
//! here): its pods are local processes and its state a directory per test, so each test can
//! check what was created — and that after it no pod, secret or process of ours is left.

mod common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use clusterman::launch::scheduler::{JobOptions, Memory};
use clusterman::launch::scheduler::kubernetes::KubernetesManager;
use clusterman::prelude::*;
use serde_json::{Value, json};

clusterman::init_in_constructor!();

#[remote]
fn square(x: u64) -> u64 {
    x * x
}

#[remote]
fn pod_identity() -> (Option<String>, Option<String>) {
    // HOSTNAME is the pod's name; CLUSTERMAN_* were removed from the environment at start-up
    (std::env::var("HOSTNAME").ok(), std::env::var("CLUSTERMAN_SECRET").ok())
}

/// One fake cluster: a state directory and the command prefix that reaches it.
struct Fake {
    state: PathBuf,
    prefix: Vec<String>,
}

impl Fake {
    fn new(tag: &str) -> Fake {
        let state = common::temp_dir(&format!("kube-{tag}"));
        let mut prefix = common::fixtures_prefix("kubernetes");
        prefix.push(format!("FAKE_KUBE_STATE={}", state.display()));
        Fake { state, prefix }
    }

    /// Adds a fault or setting of the fake (`FAKE_KUBE_PENDING=1`).
    fn with(mut self, setting: &str) -> Fake {
        self.prefix.push(setting.into());
        self
    }

    fn job(&self) -> JobOptions {
        JobOptions::new().name("cman-test").command_prefix(self.prefix.clone()).launch_timeout(Duration::from_secs(30))
    }

    /// A manager for `np` pods in `namespace`, with an image (there is no master pod here).
    fn manager(&self, np: usize, namespace: &str) -> KubernetesManager {
        KubernetesManager::new(np).namespace(namespace).image("registry.example.org/cman-test:1").job(self.job())
    }

    /// Runs the fake `kubectl` as the manager would.
    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut cmd = Command::new(&self.prefix[0]);
        cmd.args(&self.prefix[1..]).arg("kubectl").args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut pipe = child.stdin.take().unwrap();
        if let Some(text) = stdin {
            std::io::Write::write_all(&mut pipe, text.as_bytes()).unwrap();
        }
        drop(pipe);
        child.wait_with_output().unwrap()
    }

    /// The stored objects of one kind (`pods`, `secrets`) in one namespace.
    fn objects(&self, namespace: &str, kind: &str) -> Vec<Value> {
        let Ok(dir) = std::fs::read_dir(self.state.join(namespace).join(kind)) else { return Vec::new() };
        let mut files: Vec<PathBuf> = dir.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "json")).collect();
        files.sort();
        files.iter().filter_map(|p| serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()).collect()
    }

    fn names(&self, namespace: &str, kind: &str) -> Vec<String> {
        self.objects(namespace, kind).iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect()
    }

    /// Every object in every namespace (`<ns>/<kind>/<name>`).
    fn everything(&self) -> Vec<String> {
        let mut all = Vec::new();
        for ns in std::fs::read_dir(&self.state).unwrap().map(|e| e.unwrap()).filter(|e| e.path().is_dir()) {
            let ns = ns.file_name().into_string().unwrap();
            for kind in ["pods", "secrets"] {
                all.extend(self.names(&ns, kind).into_iter().map(|n| format!("{ns}/{kind}/{n}")));
            }
        }
        all
    }

    /// Every `kubectl` command line the fake saw.
    fn calls(&self) -> Vec<Vec<String>> {
        let log = std::fs::read_to_string(self.state.join("calls.log")).unwrap_or_default();
        log.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    /// The process groups the fake started (one per pod that ran).
    fn groups(&self) -> Vec<u32> {
        let log = std::fs::read_to_string(self.state.join("pids.log")).unwrap_or_default();
        log.lines().map(|l| l.rsplit(' ').next().unwrap().parse().unwrap()).collect()
    }

    /// Every object left in `namespace` is being deleted (terminating: it stays listed until
    /// its processes are gone, as in a real cluster).
    fn all_terminating(&self, namespace: &str) -> bool {
        self.objects(namespace, "pods").iter().chain(&self.objects(namespace, "secrets")).all(|o| o["metadata"]["deletionTimestamp"].is_string())
    }

    /// Nothing left: no pod or secret in any namespace, no live process in any pod's group.
    fn assert_clean(&self) {
        let gone = common::wait_until(Duration::from_secs(20), || self.everything().is_empty());
        assert!(gone, "objects left: {:?}", self.everything());
        let groups = self.groups();
        let dead = common::wait_until(Duration::from_secs(10), || live_members(&groups).is_empty());
        assert!(dead, "processes of the pods still alive: {:?}", live_members(&groups));
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.state); // kept when a test fails, with the pods' logs
        }
    }
}

/// Live (not zombie) processes in any of these process groups.
fn live_members(groups: &[u32]) -> Vec<u32> {
    let mut live = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()) {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        // after "(comm)": state ppid pgrp
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or_default().split_whitespace().collect();
        if fields.len() > 2 && !matches!(fields[0], "Z" | "X") && fields[2].parse().is_ok_and(|g: u32| groups.contains(&g)) {
            live.push(pid);
        }
    }
    live
}

fn label<'a>(object: &'a Value, key: &str) -> &'a str {
    object["metadata"]["labels"][key].as_str().unwrap_or_default()
}

#[test]
fn kubernetes_pods_run_workers_and_are_all_deleted_at_shutdown() {
    let fake = Fake::new("e2e");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(fake.manager(3, "cman-e2e")).unwrap();
    assert_eq!(pids.len(), 3);
    let pods = fake.objects("cman-e2e", "pods");
    assert_eq!(pods.len(), 3, "three pods in the namespace");
    let launch = label(&pods[0], "clusterman/launch").to_string();
    assert!(pods.iter().all(|p| label(p, "clusterman/launch") == launch && label(p, "clusterman/name") == "cman-test"));
    let mut hosts: Vec<String> = pids.iter().map(|p| cluster.remote_call_fetch(*p, pod_identity, ()).unwrap().0.unwrap()).collect();
    hosts.sort();
    assert_eq!(hosts, fake.names("cman-e2e", "pods"), "each worker runs in its own pod");
    assert_eq!(cluster.pmap(square, (0..60u64).map(|x| (x,))).unwrap(), (0..60u64).map(|x| x * x).collect::<Vec<_>>());
    let os_pids: Vec<u32> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid).collect();
    cluster.shutdown().unwrap();
    // deleted by the shutdown itself, not by a later clean-up
    assert!(fake.all_terminating("cman-e2e"), "not deleted by the shutdown: {:?}", fake.everything());
    fake.assert_clean();
    assert!(os_pids.iter().all(|p| !common::process_alive(*p)));
    for call in fake.calls() {
        assert!(call.windows(2).any(|w| w == ["-n", "cman-e2e"]), "a kubectl call without the namespace: {call:?}");
    }
    let delete = fake.calls().into_iter().find(|c| c[0] == "delete" && c.contains(&"pods,secrets".to_string())).expect("a delete by label");
    assert_eq!(delete, ["delete", "-n", "cman-e2e", "pods,secrets", "-l", &format!("clusterman/launch={launch}"), "--wait=false"]);
}

#[test]
fn kubernetes_namespace_defaults_to_kubectls_context_then_default() {
    let fake = Fake::new("context").with("FAKE_KUBE_CONTEXT_NAMESPACE=team-a");
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(1).image("img").job(fake.job());
    cluster.add_procs(&manager).unwrap();
    assert_eq!(fake.names("team-a", "pods").len(), 1, "{:?}", fake.everything());
    cluster.shutdown().unwrap();
    fake.assert_clean();

    let fake = Fake::new("no-context"); // no kubeconfig context: `default`
    let cluster = Cluster::new().unwrap();
    cluster.add_procs(KubernetesManager::new(1).image("img").job(fake.job())).unwrap();
    assert_eq!(fake.names("default", "pods").len(), 1, "{:?}", fake.everything());
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn kubernetes_stuck_pods_are_deleted_when_min_workers_are_enough() {
    let fake = Fake::new("stuck-ok").with("FAKE_KUBE_PENDING=1");
    let cluster = Cluster::new().unwrap();
    let job = fake.job().min_workers(2).launch_timeout(Duration::from_secs(2));
    let pids = cluster.add_procs(KubernetesManager::new(3).namespace("ns").image("img").job(job)).unwrap();
    assert_eq!(pids.len(), 2);
    let left = fake.names("ns", "pods");
    assert_eq!(left.len(), 2, "the pending pod is deleted: {left:?}");
    assert!(left.iter().all(|n| !n.ends_with("-2")), "the last pod was the stuck one: {left:?}");
    assert_eq!(cluster.pmap(square, (0..10u64).map(|x| (x,))).unwrap()[9], 81);
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn kubernetes_stuck_pods_fail_the_launch_without_min_workers_and_nothing_is_left() {
    let fake = Fake::new("stuck-fail").with("FAKE_KUBE_PENDING=1");
    let cluster = Cluster::new().unwrap();
    let manager = fake.manager(2, "ns").pending_timeout(Duration::from_secs(3));
    let err = cluster.add_procs(&manager).unwrap_err().to_string();
    assert!(err.contains("still queued after 3s") && err.contains("1 of 2 pods pending (0/1 nodes are available: 1 Insufficient cpu.)"), "{err}");
    assert!(cluster.workers().is_empty());
    fake.assert_clean();
}

#[test]
fn kubernetes_secret_is_in_no_label_no_argv_and_no_pod_spec() {
    let fake = Fake::new("secret");
    let cluster = Cluster::new().unwrap();
    let pids = cluster.add_procs(fake.manager(2, "sec")).unwrap();
    let secrets = fake.objects("sec", "secrets");
    assert_eq!(secrets.len(), 1);
    let secret = secrets[0]["stringData"]["secret"].as_str().unwrap().to_string();
    assert_eq!(secret.len(), 32, "the cluster secret, in hex");
    for object in fake.objects("sec", "pods").iter().chain(&secrets) {
        let labels = object["metadata"]["labels"].to_string();
        assert!(!labels.contains(&secret), "secret in labels: {labels}");
    }
    for pod in fake.objects("sec", "pods") {
        assert!(!pod["spec"].to_string().contains(&secret), "secret in the pod spec");
        let env = pod["spec"]["containers"][0]["env"].as_array().unwrap().clone();
        let reference = env.iter().find(|e| e["name"] == "CLUSTERMAN_SECRET").unwrap();
        assert_eq!(reference["valueFrom"]["secretKeyRef"], json!({ "name": secrets[0]["metadata"]["name"], "key": "secret" }));
    }
    for call in fake.calls() {
        assert!(!call.iter().any(|a| a.contains(&secret)), "secret in an argv: {call:?}");
    }
    let mut argvs = Vec::new();
    for pid in live_members(&fake.groups()) {
        argvs.push(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default());
    }
    assert!(!argvs.is_empty() && argvs.iter().all(|a| !String::from_utf8_lossy(a).contains(&secret)), "secret in a pod process's argv");
    // and the workers do not keep it in their environment either
    assert!(pids.iter().all(|p| cluster.remote_call_fetch(*p, pod_identity, ()).unwrap().1.is_none()));
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn kubernetes_master_pod_gives_image_service_account_and_owns_the_workers() {
    let fake = Fake::new("owner");
    let master = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "master-0" },
        "spec": { "serviceAccountName": "runner", "containers": [{ "name": "main", "image": "registry.example.org/app:7", "command": ["sleep", "120"] }] },
    });
    let out = fake.kubectl(&["create", "-n", "apps", "-f", "-"], Some(&master.to_string()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod/master-0 created\n");
    let uid = fake.objects("apps", "pods")[0]["metadata"]["uid"].as_str().unwrap().to_string();

    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(2).namespace("apps").master_pod("master-0").job(fake.job());
    let pids = cluster.add_procs(&manager).unwrap();
    let workers: Vec<Value> = fake.objects("apps", "pods").into_iter().filter(|p| p["metadata"]["name"] != "master-0").collect();
    assert_eq!(workers.len(), 2);
    for pod in &workers {
        assert_eq!(pod["spec"]["containers"][0]["image"], "registry.example.org/app:7");
        assert_eq!(pod["spec"]["serviceAccountName"], "runner");
        assert_eq!(pod["metadata"]["ownerReferences"], json!([{ "apiVersion": "v1", "kind": "Pod", "name": "master-0", "uid": uid }]));
    }
    // the garbage collector: deleting the master pod deletes its workers and their secret
    let out = fake.kubectl(&["delete", "-n", "apps", "pods", "master-0", "--wait=false"], None);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "pod \"master-0\" deleted\n");
    assert!(fake.all_terminating("apps"), "{:?}", fake.everything());
    let gone = common::wait_until(Duration::from_secs(20), || cluster.workers().is_empty());
    assert!(gone, "the workers of deleted pods are gone: {:?}", cluster.workers());
    assert_eq!(cluster.terminated_workers().len(), pids.len());
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn kubernetes_without_an_image_outside_a_cluster_is_a_clear_error() {
    let fake = Fake::new("no-image");
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(KubernetesManager::new(1).namespace("ns").job(fake.job())).unwrap_err().to_string();
    assert!(err.contains("KubernetesManager::image"), "{err}");
    assert!(fake.everything().is_empty());
}

#[test]
fn kubernetes_a_pod_that_fails_fails_the_launch_with_its_reason() {
    let fake = Fake::new("crash");
    let cluster = Cluster::new().unwrap();
    // a program the "image" does not have: the container exits 127 at once
    let err = cluster.add_procs(fake.manager(2, "ns").program("/nonexistent/worker")).unwrap_err().to_string();
    assert!(err.contains("0 of 2 pods left, 2 needed") && err.contains("Failed (Error)"), "{err}");
    fake.assert_clean();
}

#[test]
fn kubernetes_missing_kubectl_names_it_and_the_prefix_option() {
    let cluster = Cluster::new().unwrap();
    let job = JobOptions::new().command_prefix(["env", "PATH=/nonexistent"]);
    let err = cluster.add_procs(KubernetesManager::new(1).namespace("ns").image("img").job(job)).unwrap_err().to_string();
    assert!(err.contains("`kubectl`") && err.contains("JobOptions::command_prefix (env PATH=/nonexistent)"), "{err}");
}

#[test]
fn kubernetes_refused_create_reports_kubectls_error_and_leaves_nothing() {
    let fake = Fake::new("refused").with("FAKE_KUBE_REFUSE=1");
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(fake.manager(2, "ns")).unwrap_err().to_string();
    assert!(err.contains("kubectl create refused the pods: Error from server (Forbidden)") && err.contains("exceeded quota"), "{err}");
    // the fake created the Secret before refusing the first pod: it is deleted again
    assert!(fake.calls().iter().any(|c| c[0] == "delete"), "{:?}", fake.calls());
    fake.assert_clean();
}

#[test]
fn kubernetes_an_unreachable_api_server_is_tried_again_with_fresh_names() {
    let fake = Fake::new("retry").with("FAKE_KUBE_UNREACHABLE=1");
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(2).namespace("ns").image("img").job(fake.job().submit_retry_delays([Duration::from_millis(200)]));
    assert_eq!(cluster.add_procs(&manager).unwrap().len(), 2);
    let creates = fake.calls().into_iter().filter(|c| c[0] == "create").count();
    assert_eq!(creates, 2, "one refused, one that worked");
    let names = fake.names("ns", "pods");
    assert!(names.len() == 2 && names.iter().all(|n| n.contains("-r1-")), "the retry has its own names: {names:?}");
    cluster.shutdown().unwrap();
    fake.assert_clean();

    // a refusal that will not change by itself is not tried again
    let fake = Fake::new("no-retry").with("FAKE_KUBE_REFUSE=1");
    let manager = fake.manager(1, "ns").job(fake.job().submit_retry_delays([Duration::from_millis(200)]));
    let err = Cluster::new().unwrap().add_procs(manager).unwrap_err().to_string();
    assert!(err.contains("exceeded quota"), "{err}");
    assert_eq!(fake.calls().iter().filter(|c| c[0] == "create").count(), 1);
    fake.assert_clean();
}

/// A master whose pods are created, for `kubernetes_master_death_deletes_the_pods`.
#[test]
#[ignore = "run by kubernetes_master_death_deletes_the_pods"]
fn kubernetes_master_to_be_killed() {
    let Ok(state) = std::env::var("CMAN_FAKE_KUBE_STATE") else { return };
    let mut prefix = common::fixtures_prefix("kubernetes");
    prefix.push(format!("FAKE_KUBE_STATE={state}"));
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(2).namespace("doomed").image("img").job(JobOptions::new().command_prefix(prefix));
    let pids = cluster.add_procs(&manager).unwrap();
    let os: Vec<String> = pids.iter().map(|p| cluster.worker_info(*p).unwrap().os_pid.to_string()).collect();
    println!("WORKERS {}", os.join(" "));
    std::thread::sleep(Duration::from_secs(120));
}

#[test]
fn kubernetes_master_death_deletes_the_pods() {
    let fake = Fake::new("killed");
    let mut master = Command::new(std::env::current_exe().unwrap())
        .args(["--ignored", "--exact", "kubernetes_master_to_be_killed", "--nocapture"])
        .env("CMAN_FAKE_KUBE_STATE", &fake.state)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let workers = common::read_workers_line(master.stdout.take().unwrap(), Duration::from_secs(60));
    assert_eq!(fake.names("doomed", "pods").len(), 2, "the pods run");
    master.kill().unwrap(); // SIGKILL: no destructor runs, only the cancel guard is left
    master.wait().unwrap();
    fake.assert_clean();
    assert!(workers.iter().all(|p| !common::process_alive(*p)), "workers still alive");
}

#[test]
fn kubernetes_a_walltime_stops_the_pods_at_their_deadline() {
    let fake = Fake::new("deadline");
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(1).namespace("ns").image("img").job(fake.job().walltime(Duration::from_secs(2)));
    cluster.add_procs(manager).unwrap();
    // activeDeadlineSeconds: the kubelet stops the pod; the master sees its worker go
    assert!(common::wait_until(Duration::from_secs(20), || cluster.workers().is_empty()), "the worker outlived its walltime");
    let pod = &fake.objects("ns", "pods")[0];
    let status = fake.kubectl(&["get", "pod", pod["metadata"]["name"].as_str().unwrap(), "-n", "ns", "-o", "jsonpath={.status.phase} {.status.reason}"], None);
    assert_eq!(String::from_utf8_lossy(&status.stdout), "Failed DeadlineExceeded");
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn kubernetes_a_pod_refused_amid_the_list_leaves_none_of_the_others() {
    // kubectl creates every other item of the List and then fails: those must go too
    let fake = Fake::new("refused-one").with("FAKE_KUBE_REFUSE_POD=1");
    let cluster = Cluster::new().unwrap();
    let err = cluster.add_procs(fake.manager(3, "ns")).unwrap_err().to_string();
    assert!(err.contains("exceeded quota") && err.contains("-0\" is forbidden"), "{err}");
    assert_eq!(fake.groups().len(), 2, "the two other pods were created and ran");
    fake.assert_clean();
}

#[test]
fn kubernetes_a_missing_working_directory_is_made_by_the_runtime() {
    let fake = Fake::new("workdir");
    let dir = common::temp_dir("kube-workdir").join("made-by-the-runtime");
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(1).namespace("ns").image("img").job(fake.job().workdir(&dir));
    cluster.add_procs(manager).unwrap();
    assert!(dir.is_dir());
    cluster.shutdown().unwrap();
    fake.assert_clean();
}

#[test]
fn the_fake_kubectl_terminates_deleted_pods_gracefully_and_prints_as_kubectl_does() {
    let fake = Fake::new("grace");
    let pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "stubborn"},
        "spec": {"terminationGracePeriodSeconds": 1, "containers": [{"name": "c", "image": "img", "command": ["sh", "-c", "trap '' TERM; sleep 30"]}]}
    });
    assert!(fake.kubectl(&["create", "-n", "ns", "-f", "-"], Some(&pod.to_string())).status.success());
    assert!(common::wait_until(Duration::from_secs(5), || !live_members(&fake.groups()).is_empty()));
    let deleted = fake.kubectl(&["delete", "-n", "ns", "pods", "stubborn", "--wait=false"], None);
    assert!(deleted.status.success());
    // SIGTERM ignored: the pod is listed as terminating until the grace period ends, then killed
    let listed = fake.kubectl(&["get", "pod", "stubborn", "-n", "ns", "-o", "jsonpath={.metadata.deletionTimestamp}"], None);
    assert!(!String::from_utf8_lossy(&listed.stdout).is_empty(), "terminating, still listed");
    fake.assert_clean();
    let none = fake.kubectl(&["delete", "-n", "ns", "pods", "-l", "app=nothing"], None);
    assert_eq!((String::from_utf8_lossy(&none.stdout).trim(), String::from_utf8_lossy(&none.stderr).trim()), ("No resources found", ""));
}

#[test]
fn kubernetes_memory_is_written_in_binary_units_and_batch_spellings_are_refused() {
    let fake = Fake::new("memory");
    let cluster = Cluster::new().unwrap();
    let manager = KubernetesManager::new(1).namespace("ns").image("img").job(fake.job().memory(Memory::gib(1)));
    cluster.add_procs(manager).unwrap();
    assert_eq!(fake.objects("ns", "pods")[0]["spec"]["containers"][0]["resources"]["limits"]["memory"], "1Gi", "1Gi, not 1G (10^9 bytes)");
    let err = cluster.add_procs(fake.manager(1, "ns").memory("2GB")).unwrap_err().to_string();
    assert!(err.contains("quantities must match the regular expression"), "{err}");
    cluster.shutdown().unwrap();
    fake.assert_clean();
}
