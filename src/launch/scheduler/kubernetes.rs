//! Kubernetes: one pod per worker, created with `kubectl create -f -` from a generated
//! manifest — a `List` of one Secret (holding the cluster secret) and N pods, on stdin. The
//! pods are watched with `kubectl get pods -l clusterman/launch=<tag>` and deleted, with the
//! Secret, by `kubectl delete pods,secrets -l clusterman/launch=<tag>`: at shutdown, when the
//! launch fails, and — through the cancel guard — when the master dies. Inside a cluster they
//! are also owned by the master pod, so Kubernetes' garbage collector removes them with it.
//!
//! This is not a [`BatchManager`](super::BatchManager): every pod needs its own worker index
//! (there is no array task id), the image, owner and service account come from the cluster at
//! launch time, and a pod that has ended still exists and must be deleted (a batch job that
//! ended needs no cancel). The pieces are shared: `scheduler::run` for every `kubectl`
//! call (command prefix, throttle, errors naming the command) and the cancel guard.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::launch::{ClusterManager, Launch, LaunchContext, LaunchStatus};
use crate::protocol::env::{ENV_LAUNCH, ENV_MASTER, ENV_SECRET};
use crate::sys;

use crate::launch::guard::CancelGuard;
use super::{CommandResult, JobOptions, Layout, run};

/// The JSON library of the pod hook ([`KubernetesManager::configure`]), re-exported so a
/// program need not depend on it itself.
pub use serde_json;

/// The label every object of one launch carries; deleting by it deletes the launch.
const LAUNCH_LABEL: &str = "clusterman/launch";
/// The key of the cluster secret inside the launch's Secret.
const SECRET_KEY: &str = "secret";
/// `K8sClusterManagers`' default: pods that cannot be scheduled in 3 minutes are given up.
const DEFAULT_PENDING_TIMEOUT: Duration = Duration::from_secs(180);
/// Where a pod finds its namespace.
const SERVICE_ACCOUNT_NAMESPACE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";
/// One line per pod: name, phase, then what explains the phase (all tab-separated; missing
/// fields print as nothing).
const STATE_TEMPLATE: &str = r#"jsonpath={range .items[*]}{.metadata.name}{"\t"}{.status.phase}{"\t"}{.status.reason}{"\t"}{.status.containerStatuses[*].state.waiting.reason}{"\t"}{.status.containerStatuses[*].state.terminated.reason}{"\t"}{.status.conditions[*].message}{"\n"}{end}"#;
/// The master pod: uid (for owner references), service account, container images.
const MASTER_TEMPLATE: &str = r#"jsonpath={.metadata.uid}{"\t"}{.spec.serviceAccountName}{"\t"}{.spec.containers[*].image}"#;

type Hook = Arc<dyn Fn(&mut Value) + Send + Sync>;

/// Workers in Kubernetes pods, one per worker, started through `kubectl` (which must be able
/// to create, list and delete pods and secrets in the namespace). The workers dial the master
/// like every other worker: the master must be reachable from the pods (it is when it runs in
/// a pod of the same cluster).
///
/// ```no_run
/// use std::time::Duration;
/// use clusterman::prelude::*;
/// use clusterman::launch::scheduler::JobOptions;
/// use clusterman::launch::scheduler::kubernetes::{KubernetesManager, serde_json::json};
/// # fn main() -> clusterman::Result<()> {
/// let cluster = Cluster::new()?;
/// let pods = KubernetesManager::new(8)
///     .namespace("science")                    // default: the master pod's, else kubectl's
///     .image("registry.example.org/sim:1.4")   // default: the master pod's image
///     .cpu("2")
///     .memory("4Gi")
///     .pending_timeout(Duration::from_secs(300))
///     .job(JobOptions::new().min_workers(6))   // go on with 6 if 2 pods never start
///     .configure(|pod| pod["spec"]["nodeSelector"] = json!({ "gpu": "true" }));
/// println!("{}", pods.manifest()?);            // what would be created
/// let pids = cluster.add_procs(&pods)?;
/// cluster.shutdown()?;                         // every pod is deleted
/// # Ok(()) }
/// ```
///
/// Of [`JobOptions`], it uses `name` (pod names and the `clusterman/name` label), `workdir`
/// (the container's working directory), `walltime` (`activeDeadlineSeconds`),
/// `cpus_per_worker` and `memory` (when [`cpu`](Self::cpu) and [`memory`](Self::memory) are
/// not set), `env`, `command_prefix`, `launch_timeout`, `queue_timeout` (when
/// [`pending_timeout`](Self::pending_timeout) is not set), `min_workers`,
/// `submit_retry_delays` (when the API server cannot be reached) and `throttle`. Options with no meaning for pods (`queue`,
/// `account`, `prologue`, directives, `launcher`) are refused, and so is
/// [`Layout::Mpi`]: pods are independent workers and form no MPI world.
#[derive(Clone)]
pub struct KubernetesManager {
    np: usize,
    job: JobOptions,
    namespace: Option<String>,
    image: Option<String>,
    program: Option<String>,
    cpu: Option<String>,
    memory: Option<String>,
    service_account: Option<String>,
    master_pod: Option<String>,
    pending_timeout: Option<Duration>,
    configure: Option<Hook>,
}

impl std::fmt::Debug for KubernetesManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesManager")
            .field("np", &self.np)
            .field("job", &self.job)
            .field("namespace", &self.namespace)
            .field("image", &self.image)
            .field("program", &self.program)
            .field("cpu", &self.cpu)
            .field("memory", &self.memory)
            .field("service_account", &self.service_account)
            .field("master_pod", &self.master_pod)
            .field("pending_timeout", &self.pending_timeout)
            .field("configure", &self.configure.as_ref().map(|_| "<hook>"))
            .finish()
    }
}

impl KubernetesManager {
    /// `np` worker pods.
    pub fn new(np: usize) -> Self {
        KubernetesManager {
            np,
            job: JobOptions::default(),
            namespace: None,
            image: None,
            program: None,
            cpu: None,
            memory: None,
            service_account: None,
            master_pod: None,
            pending_timeout: None,
            configure: None,
        }
    }

    /// The common options (see the type's documentation for the ones that apply).
    pub fn job(mut self, options: JobOptions) -> Self {
        self.job = options.with_defaults(&self.job);
        self
    }

    /// The namespace of the pods, given to every `kubectl` call with `-n`. Default: the
    /// master pod's namespace inside a cluster, else the namespace of kubectl's current
    /// context, else `default`.
    pub fn namespace(mut self, namespace: impl Into<String>) -> Self {
        self.namespace = Some(namespace.into());
        self
    }

    /// The container image; it must hold this very program at [`program`](Self::program)'s
    /// path. Default inside a cluster: the master pod's image. Outside one it is required.
    pub fn image(mut self, image: impl Into<String>) -> Self {
        self.image = Some(image.into());
        self
    }

    /// Where this program is inside the image (default: its path here).
    pub fn program(mut self, path: impl Into<String>) -> Self {
        self.program = Some(path.into());
        self
    }

    /// CPU of each pod, requested and limited (`"2"`, `"500m"`). Default:
    /// `JobOptions::cpus_per_worker`, else none (the namespace's defaults).
    pub fn cpu(mut self, cpu: impl Into<String>) -> Self {
        self.cpu = Some(cpu.into());
        self
    }

    /// Memory of each pod, requested and limited (`"4Gi"`). Default: `JobOptions::memory`,
    /// else none.
    pub fn memory(mut self, memory: impl Into<String>) -> Self {
        self.memory = Some(memory.into());
        self
    }

    /// The pods' service account. Default: the master pod's, when the pods run in its
    /// namespace.
    pub fn service_account(mut self, name: impl Into<String>) -> Self {
        self.service_account = Some(name.into());
        self
    }

    /// The pod this master runs in, in the pods' namespace: the default image and service
    /// account come from it, and it owns the worker pods (deleting it deletes them). Inside a
    /// cluster it is found by itself (the host name, in the service account's namespace).
    pub fn master_pod(mut self, name: impl Into<String>) -> Self {
        self.master_pod = Some(name.into());
        self
    }

    /// How long the launch may wait for its pods to leave `Pending` (unschedulable, image
    /// still pulling): until `min_workers` of them run (all by default). Then the launch
    /// fails and every pod is deleted. Default: `JobOptions::queue_timeout`, else 3 minutes.
    /// Pods still pending when the others have had the launch timeout to connect are deleted
    /// if the launch goes on without them (`JobOptions::min_workers`).
    pub fn pending_timeout(mut self, timeout: Duration) -> Self {
        self.pending_timeout = Some(timeout);
        self
    }

    /// Edits every pod before it is created (node selectors, GPUs, tolerations, volumes...).
    /// The hook may change anything but the pod's name and `clusterman/*` labels, which are
    /// set again after it (clean-up finds the pods by them).
    pub fn configure(mut self, hook: impl Fn(&mut Value) + Send + Sync + 'static) -> Self {
        self.configure = Some(Arc::new(hook));
        self
    }

    /// The manifest that would be created (dry run, pretty JSON), with stand-ins for what
    /// only a launch knows: `<launch>` in names and labels, `<master-address>`, `<secret>`,
    /// and the image and owner reference that come from the master pod.
    pub fn manifest(&self) -> Result<String> {
        let plan = Plan {
            tag: "<launch>".into(),
            env: (0..self.np).map(|i| vec![(ENV_MASTER.into(), "<master-address>".into()), (ENV_SECRET.into(), "<secret>".into()), (ENV_LAUNCH.into(), format!("<launch>:{i}"))]).collect(),
            secret: "<secret>".into(),
            program: self.program.clone().unwrap_or_else(|| std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_else(|_| "<program>".into())),
            image: self.image.clone().unwrap_or_else(|| "<image of the master pod>".into()),
            service_account: self.service_account.clone(),
            owner: None,
        };
        let manifest = self.render(&plan)?;
        Ok(serde_json::to_string_pretty(&manifest).expect("a JSON value always serializes"))
    }

    /// Options of [`JobOptions`] that mean nothing for a pod are an error, not ignored.
    fn check_options(&self) -> Result<()> {
        let o = &self.job;
        if o.layout_asked() == Some(Layout::Mpi) {
            return Err(Error::Launch(
                "Kubernetes pods form no MPI world (each pod is an independent worker): drop Layout::Mpi; for MPI code on every rank, run the program in an MPI job (an MPI operator's MPIJob, or mpirun) with start_main_loop, or use MpiManager where mpirun can start the ranks".into(),
            ));
        }
        let unused = [
            (o.queue.is_some(), "queue"),
            (o.account.is_some(), "account"),
            (!o.prologue.is_empty(), "prologue"),
            (!o.extra_directives.is_empty(), "extra_directive"),
            (!o.skip_directives.is_empty(), "skip_directive"),
            (o.launcher.is_some(), "launcher"),
        ];
        match unused.iter().find(|(set, _)| *set) {
            Some((_, option)) => Err(Error::Launch(format!("JobOptions::{option} has no meaning for Kubernetes pods; change the pods with KubernetesManager::configure instead"))),
            None => Ok(()),
        }
    }

    /// The `List` to create: the Secret, then one pod per worker.
    fn render(&self, plan: &Plan) -> Result<Value> {
        self.check_options()?;
        let prefix = plan.prefix(&self.job.name);
        let mut items = vec![json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": plan.metadata(&self.job.name, &prefix, None),
            "type": "Opaque",
            "stringData": { SECRET_KEY: plan.secret },
        })];
        for (index, env) in plan.env.iter().enumerate() {
            items.push(self.pod(plan, &prefix, index, env)?);
        }
        Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }))
    }

    fn pod(&self, plan: &Plan, prefix: &str, index: usize, worker_env: &[(String, String)]) -> Result<Value> {
        let o = &self.job;
        // the secret is only referenced: pod specs are readable by more people than secrets
        let env: Vec<Value> = worker_env
            .iter()
            .chain(&o.env)
            .map(|(name, value)| match name.as_str() {
                ENV_SECRET => json!({ "name": name, "valueFrom": { "secretKeyRef": { "name": prefix, "key": SECRET_KEY } } }),
                _ => json!({ "name": name, "value": value }),
            })
            .collect();
        let mut container = json!({ "name": "worker", "image": plan.image, "command": [plan.program], "env": env });
        if let Some(dir) = &o.workdir {
            container["workingDir"] = json!(dir.display().to_string());
        }
        let cpu = self.cpu.clone().or_else(|| o.cpus_per_worker.map(|c| c.to_string()));
        // Kubernetes' binary suffixes (its `G` would be 10⁹ bytes)
        let memory = self.memory.clone().or_else(|| o.memory.map(|m| m.binary()).map(|(n, unit)| format!("{n}{unit}i")));
        let resources: serde_json::Map<String, Value> = [("cpu", cpu), ("memory", memory)].into_iter().filter_map(|(k, v)| Some((k.to_string(), json!(v?)))).collect();
        if !resources.is_empty() {
            // requests = limits: the pods get the Guaranteed class and are evicted last
            container["resources"] = json!({ "requests": resources, "limits": resources });
        }
        let mut spec = json!({ "restartPolicy": "Never", "containers": [container] });
        if let Some(account) = &plan.service_account {
            spec["serviceAccountName"] = json!(account);
        }
        if let Some(limit) = o.walltime {
            spec["activeDeadlineSeconds"] = json!(limit.as_secs().max(1));
        }
        let name = format!("{prefix}-{index}");
        let metadata = plan.metadata(&o.name, &name, Some(index));
        let ours = metadata["labels"].as_object().cloned().unwrap_or_default();
        let mut pod = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec });
        if let Some(hook) = &self.configure {
            hook(&mut pod);
            // what finds and deletes the pod is ours again, whatever the hook did
            let Some(meta) = pod.get_mut("metadata").and_then(Value::as_object_mut) else {
                return Err(Error::Launch("the KubernetesManager::configure hook must leave a pod with its metadata".into()));
            };
            meta.insert("name".into(), json!(name));
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            let Some(labels) = labels.as_object_mut() else {
                return Err(Error::Launch("the KubernetesManager::configure hook must leave the pod's labels a map".into()));
            };
            labels.extend(ours);
        }
        Ok(pod)
    }

    /// Namespace, image, service account and owner: from the options, else from the cluster.
    fn placement(&self) -> Result<Placement> {
        let inside = inside_cluster();
        let namespace = match self.namespace.clone().or_else(|| inside.as_ref().and_then(|i| i.namespace.clone())) {
            Some(ns) => ns,
            None => {
                // kubectl's own default: the current context's namespace
                let argv = ["kubectl", "config", "view", "--minify", "-o", "jsonpath={..namespace}"].map(String::from);
                let r = call(&self.job, &argv, None)?;
                Some(r.stdout.trim().to_string()).filter(|ns| r.success && !ns.is_empty()).unwrap_or_else(|| "default".into())
            }
        };
        let master = self.master(&namespace, inside)?;
        let here = master.as_ref().filter(|m| m.namespace == namespace);
        if master.is_some() && here.is_none() {
            // an owner in another namespace counts as absent: the pods would be collected at once
            tracing::warn!("the worker pods are not in the master pod's namespace, so it cannot own them; they are deleted by label");
        }
        let image = match (&self.image, &master) {
            (Some(image), _) => image.clone(),
            (None, Some(m)) if m.images.len() == 1 => m.images[0].clone(),
            (None, Some(m)) => {
                return Err(Error::Launch(format!("the master pod {} has {} containers, so its image is ambiguous; choose one with KubernetesManager::image", m.name, m.images.len())));
            }
            (None, None) => {
                return Err(Error::Launch(
                    "the worker pods need a container image holding this program: set KubernetesManager::image (outside a cluster there is no master pod to take it from)".into(),
                ));
            }
        };
        Ok(Placement {
            service_account: self.service_account.clone().or_else(|| here.map(|m| m.service_account.clone()).filter(|s| !s.is_empty())),
            owner: here.map(|m| Owner { name: m.name.clone(), uid: m.uid.clone() }),
            kubectl: Kubectl { options: self.job.clone(), namespace },
            image,
        })
    }

    /// The master's own pod, if it runs in one (or one was named).
    fn master(&self, namespace: &str, inside: Option<InCluster>) -> Result<Option<MasterPod>> {
        let (name, ns, named) = match (&self.master_pod, inside) {
            (Some(name), _) => (name.clone(), namespace.to_string(), true),
            (None, Some(here)) => (here.pod, here.namespace.unwrap_or_else(|| namespace.to_string()), false),
            (None, None) => return Ok(None),
        };
        let kubectl = Kubectl { options: self.job.clone(), namespace: ns.clone() };
        let r = kubectl.call(&["get", "pod", &name, "-o", MASTER_TEMPLATE], None)?;
        if !r.success {
            let why = format!("cannot read the master pod {name} in namespace {ns}: {}", r.stderr.trim());
            if named {
                return Err(Error::Launch(format!("{why} (named by KubernetesManager::master_pod)")));
            }
            if self.image.is_none() {
                return Err(Error::Launch(format!("{why}; it would give the image: set KubernetesManager::image, or name the pod with KubernetesManager::master_pod")));
            }
            tracing::warn!("{why}; the worker pods are deleted by label only");
            return Ok(None);
        }
        let mut cols = r.stdout.splitn(3, '\t');
        let (uid, account, images) = (cols.next().unwrap_or_default(), cols.next().unwrap_or_default(), cols.next().unwrap_or_default());
        Ok(Some(MasterPod { name, namespace: ns, uid: uid.trim().into(), service_account: account.trim().into(), images: images.split_whitespace().map(String::from).collect() }))
    }
}

/// What only a launch knows, for rendering.
struct Plan {
    /// Identifies the launch in names and labels.
    tag: String,
    /// Each worker's environment, from [`LaunchContext::env`].
    env: Vec<Vec<(String, String)>>,
    secret: String,
    program: String,
    image: String,
    service_account: Option<String>,
    owner: Option<Owner>,
}

impl Plan {
    /// `<name>-<tag>`: the Secret's name, and the pods' names before `-<index>`.
    fn prefix(&self, name: &str) -> String {
        format!("{}-{}", dns_label(name), self.tag)
    }

    fn metadata(&self, name: &str, object: &str, index: Option<usize>) -> Value {
        let mut labels = json!({ LAUNCH_LABEL: self.tag, "clusterman/name": dns_label(name), "app.kubernetes.io/managed-by": "clusterman" });
        if let Some(i) = index {
            labels["clusterman/index"] = json!(i.to_string());
        }
        let mut meta = json!({ "name": object, "labels": labels });
        if let Some(owner) = &self.owner {
            meta["ownerReferences"] = json!([{ "apiVersion": "v1", "kind": "Pod", "name": owner.name, "uid": owner.uid }]);
        }
        meta
    }
}

struct Owner {
    name: String,
    uid: String,
}

struct Placement {
    kubectl: Kubectl,
    image: String,
    service_account: Option<String>,
    owner: Option<Owner>,
}

struct MasterPod {
    name: String,
    namespace: String,
    uid: String,
    service_account: String,
    images: Vec<String>,
}

/// This process runs in a pod: its name (the host name) and namespace, if known.
struct InCluster {
    pod: String,
    namespace: Option<String>,
}

fn inside_cluster() -> Option<InCluster> {
    // what K8sClusterManagers (and client-go) take as "in a cluster"
    std::env::var_os("KUBERNETES_SERVICE_HOST")?;
    std::env::var_os("KUBERNETES_SERVICE_PORT")?;
    let namespace = std::fs::read_to_string(SERVICE_ACCOUNT_NAMESPACE).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    Some(InCluster { pod: sys::hostname(), namespace })
}

/// `name` made a valid DNS label part: lower case, `[a-z0-9-]`, at most 30 characters.
fn dns_label(name: &str) -> String {
    let mapped: String = name.to_ascii_lowercase().chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).take(30).collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() { "clusterman".into() } else { trimmed.into() }
}

/// Runs a `kubectl` command line; a `kubectl` the command prefix cannot find (exit status
/// 127, as `env` and `ssh` report it) is an error naming both.
fn call(options: &JobOptions, argv: &[String], stdin: Option<&str>) -> Result<CommandResult> {
    let out = run(options, argv, stdin)?;
    let result = CommandResult { success: out.status.success(), stdout: String::from_utf8_lossy(&out.stdout).into_owned(), stderr: String::from_utf8_lossy(&out.stderr).into_owned() };
    if out.status.code() == Some(127) {
        return Err(Error::Launch(format!(
            "`kubectl` was not found through JobOptions::command_prefix ({}): {}; install kubectl there, or change the prefix",
            options.command_prefix.join(" "),
            result.stderr.trim()
        )));
    }
    Ok(result)
}

/// A failure worth trying again: the API server was unreachable or overloaded. A refusal
/// (quota, validation, permissions) does not change by itself.
fn transient(stderr: &str) -> bool {
    const SIGNS: &[&str] = &[
        "Unable to connect to the server",
        "was refused - did you specify the right host or port?",
        "connection refused",
        "i/o timeout",
        "TLS handshake timeout",
        "the server is currently unable to handle the request",
        "(ServiceUnavailable)",
        "(TooManyRequests)",
        "etcdserver: request timed out",
    ];
    SIGNS.iter().any(|sign| stderr.contains(sign))
}

/// `kubectl` in one namespace: every call gets `-n <namespace>`.
#[derive(Clone)]
struct Kubectl {
    options: JobOptions,
    namespace: String,
}

impl Kubectl {
    fn argv(&self, args: &[&str]) -> Vec<String> {
        // right after the verb, where kubectl always reads it
        let mut argv = vec!["kubectl".to_string(), args[0].to_string(), "-n".into(), self.namespace.clone()];
        argv.extend(args[1..].iter().map(|a| a.to_string()));
        argv
    }

    fn call(&self, args: &[&str], stdin: Option<&str>) -> Result<CommandResult> {
        call(&self.options, &self.argv(args), stdin)
    }

    /// Deletes every object of a launch (without waiting for the pods to terminate).
    fn delete_all_args(tag: &str) -> [String; 5] {
        ["delete".into(), "pods,secrets".into(), "-l".into(), format!("{LAUNCH_LABEL}={tag}"), "--wait=false".into()]
    }

    /// The clean-up command of a launch, prefix included, for its cancel guard.
    fn delete_all_command(&self, tag: &str) -> Vec<String> {
        let args = Self::delete_all_args(tag);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.options.command_prefix.iter().cloned().chain(self.argv(&args)).collect()
    }
}

impl ClusterManager for KubernetesManager {
    fn name(&self) -> &str {
        "kubernetes"
    }

    fn count(&self) -> usize {
        self.np
    }

    fn launch(&self, ctx: &LaunchContext) -> Result<Box<dyn Launch>> {
        self.check_options()?;
        let Placement { kubectl, image, service_account, owner } = self.placement()?;
        let master = ctx.master_address();
        let env: Vec<Vec<(String, String)>> = (0..self.np as u32).map(|i| ctx.env(i, &master)).collect();
        let secret = ctx.secret().to_hex();
        let program = self.program.clone().unwrap_or_else(|| ctx.program().display().to_string());
        let mut plan = Plan { tag: String::new(), env, secret, program, image, service_account, owner };
        let mut delays = self.job.retry_delays().iter();
        let mut attempt = 0;
        loop {
            // a retry gets fresh names: the pods of a refused attempt may still be terminating
            plan.tag = if attempt == 0 { format!("{:016x}", ctx.id()) } else { format!("{:016x}-r{attempt}", ctx.id()) };
            attempt += 1;
            let manifest = serde_json::to_string(&self.render(&plan)?).expect("a JSON value always serializes");
            // the guard first: a master killed during the create leaves nothing behind
            let guard = CancelGuard::start(&kubectl.delete_all_command(&plan.tag), None).map_err(|e| Error::io("starting the pods' clean-up guard", e))?;
            let refused = match kubectl.call(&["create", "-f", "-"], Some(&manifest)) {
                Ok(r) if r.success => {
                    let prefix = plan.prefix(&self.job.name);
                    tracing::info!("created {} pods {prefix}-* in namespace {}", self.np, kubectl.namespace);
                    return Ok(Box::new(PodLaunch { kubectl, tag: plan.tag, prefix, count: self.np, min: self.min_workers(), guard: Some(guard), last: None }));
                }
                Ok(r) => r.stderr.trim().to_string(),
                Err(e) => {
                    guard.cancel_now();
                    return Err(e);
                }
            };
            guard.cancel_now(); // part of the list may have been created
            let why = format!("kubectl create refused the pods: {refused}");
            match delays.next().filter(|_| transient(&refused)) {
                Some(delay) => {
                    tracing::warn!("{why}; trying again in {delay:?}");
                    std::thread::sleep(*delay);
                }
                None => return Err(Error::Launch(why)),
            }
        }
    }

    fn launch_timeout(&self) -> Duration {
        self.job.launch_timeout
    }

    fn queue_timeout(&self) -> Option<Duration> {
        Some(self.pending_timeout.or(self.job.queue_timeout).unwrap_or(DEFAULT_PENDING_TIMEOUT))
    }

    fn min_workers(&self) -> usize {
        self.job.min_workers.unwrap_or(self.np).min(self.np)
    }
}

/// The pods of one launch.
struct PodLaunch {
    kubectl: Kubectl,
    tag: String,
    /// Pod `i` is `<prefix>-<i>`.
    prefix: String,
    count: usize,
    min: usize,
    guard: Option<CancelGuard>,
    last: Option<(Instant, LaunchStatus)>,
}

/// One line of the state query.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodState {
    name: String,
    phase: String,
    /// Why it is in that phase (`Unschedulable: 0/3 nodes are available...`, `ImagePullBackOff`, `OOMKilled`).
    detail: String,
}

impl PodState {
    fn ended(&self) -> bool {
        self.phase == "Succeeded" || self.phase == "Failed"
    }

    fn describe(&self) -> String {
        if self.detail.is_empty() { format!("{} {}", self.name, self.phase) } else { format!("{} {} ({})", self.name, self.phase, self.detail) }
    }
}

fn parse_pods(stdout: &str) -> Vec<PodState> {
    stdout
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            // a line without the tabs continues a message that had a line break
            let [name, phase, rest @ ..] = fields.as_slice() else { return None };
            let detail: Vec<&str> = rest.iter().map(|s| s.trim()).filter(|s| !s.is_empty()).collect();
            (!name.is_empty()).then(|| PodState { name: name.to_string(), phase: phase.to_string(), detail: detail.join(": ") })
        })
        .collect()
}

/// The launch as its pods show it: failed once fewer than `min` pods can still run, running
/// once `min` of them run, queued before.
fn summarize(tag: &str, pods: &[PodState], count: usize, min: usize) -> LaunchStatus {
    let ended: Vec<String> = pods.iter().filter(|p| p.ended()).map(PodState::describe).collect();
    let alive = pods.len() - ended.len();
    if alive < min {
        let gone = count.saturating_sub(pods.len());
        let deleted = if gone > 0 { format!("{gone} deleted; ") } else { String::new() };
        return LaunchStatus::Failed(format!("kubernetes launch {tag}: {alive} of {count} pods left, {min} needed ({deleted}{})", ended.join("; ")));
    }
    if pods.iter().filter(|p| p.phase == "Running").count() >= min {
        return LaunchStatus::Running;
    }
    let waiting: Vec<&PodState> = pods.iter().filter(|p| !p.ended() && p.phase != "Running").collect();
    let why = waiting.iter().find(|p| !p.detail.is_empty()).map(|p| format!(" ({})", p.detail)).unwrap_or_default();
    LaunchStatus::Queued(format!("kubernetes launch {tag}: {} of {count} pods pending{why}", waiting.len()))
}

impl PodLaunch {
    fn pods(&self) -> std::result::Result<Vec<PodState>, String> {
        let selector = format!("{LAUNCH_LABEL}={}", self.tag);
        match self.kubectl.call(&["get", "pods", "-l", &selector, "-o", STATE_TEMPLATE], None) {
            Ok(r) if r.success => Ok(parse_pods(&r.stdout)),
            Ok(r) => Err(r.stderr.trim().to_string()),
            Err(e) => Err(e.to_string()),
        }
    }

    fn delete(&self, names: &[String], what: &str) {
        let mut args = vec!["delete", "pods"];
        args.extend(names.iter().map(String::as_str));
        args.extend(["--ignore-not-found", "--wait=false"]);
        match self.kubectl.call(&args, None) {
            Ok(r) if r.success => tracing::info!("deleted {what}: {}", names.join(" ")),
            Ok(r) => tracing::warn!("could not delete {what}: {}", r.stderr.trim()),
            Err(e) => tracing::warn!("could not delete {what}: {e}"),
        }
    }

    /// Deletes every object of the launch; the guard tries once more if that fails.
    fn delete_all(&mut self) {
        let Some(guard) = self.guard.take() else { return };
        let args = Kubectl::delete_all_args(&self.tag);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match self.kubectl.call(&args, None) {
            Ok(r) if r.success => {
                tracing::info!("deleted the pods {}-*", self.prefix);
                guard.dismiss();
            }
            Ok(r) => {
                tracing::warn!("deleting the pods {}-*: {}", self.prefix, r.stderr.trim());
                guard.cancel_now();
            }
            Err(e) => {
                tracing::warn!("deleting the pods {}-*: {e}", self.prefix);
                guard.cancel_now();
            }
        }
    }
}

impl Launch for PodLaunch {
    fn status(&mut self) -> LaunchStatus {
        if let Some((at, status)) = &self.last {
            if at.elapsed() < Duration::from_secs(1) {
                return status.clone();
            }
        }
        let status = match self.pods() {
            Ok(pods) => {
                // a worker that exited normally (rm_procs) leaves a completed pod: delete it now
                let done: Vec<String> = pods.iter().filter(|p| p.phase == "Succeeded").map(|p| p.name.clone()).collect();
                if !done.is_empty() {
                    self.delete(&done, "completed pods");
                }
                summarize(&self.tag, &pods, self.count, self.min)
            }
            // kubectl that does not answer for a moment is no reason to give up
            Err(why) => match &self.last {
                Some((_, previous)) => previous.clone(),
                None => LaunchStatus::Queued(format!("kubernetes launch {} (pod states unknown: {why})", self.tag)),
            },
        };
        self.last = Some((Instant::now(), status.clone()));
        status
    }

    fn stop(&mut self, _grace: Duration) {
        // the workers were asked to exit and had their grace already: the pods go now
        self.delete_all();
    }

    fn describe(&self) -> String {
        match self.pods() {
            Ok(pods) => {
                let running = pods.iter().filter(|p| p.phase == "Running").count();
                let others: Vec<String> = pods.iter().filter(|p| p.phase != "Running").map(PodState::describe).collect();
                let ns = &self.kubectl.namespace;
                format!("{running} of {} pods running; {}. Logs: kubectl logs -n {ns} <pod>", self.count, if others.is_empty() { "no other pods".into() } else { others.join("; ") })
            }
            Err(why) => format!("pod states unknown: {why}"),
        }
    }

    fn trim(&mut self, missing: &[u32]) {
        let names: Vec<String> = missing.iter().map(|i| format!("{}-{i}", self.prefix)).collect();
        if !names.is_empty() {
            self.delete(&names, "the pods whose workers did not connect");
        }
    }
}

impl Drop for PodLaunch {
    fn drop(&mut self) {
        self.delete_all(); // a dropped launch never leaves pods behind
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::scheduler::Memory;

    fn plan(np: usize) -> Plan {
        Plan {
            tag: "00000000000000ff".into(),
            env: (0..np).map(|i| vec![(ENV_MASTER.into(), "10.0.0.1:4000".into()), (ENV_SECRET.into(), "5ec2e7".into()), (ENV_LAUNCH.into(), format!("255:{i}"))]).collect(),
            secret: "5ec2e7".into(),
            program: "/opt/app/bin/sim".into(),
            image: "registry.example.org/sim:1.4".into(),
            service_account: Some("runner".into()),
            owner: Some(Owner { name: "master-7f9c".into(), uid: "0d1e2f".into() }),
        }
    }

    #[test]
    fn golden_manifest() {
        let o = JobOptions::new().name("Sim_Run").workdir("/data").walltime(Duration::from_secs(3600)).env("RUST_LOG", "info");
        let k8s = KubernetesManager::new(1).job(o).cpu("2").memory("4Gi");
        let manifest = serde_json::to_string_pretty(&k8s.render(&plan(1)).unwrap()).unwrap();
        assert_eq!(
            manifest,
            r#"{
  "apiVersion": "v1",
  "items": [
    {
      "apiVersion": "v1",
      "kind": "Secret",
      "metadata": {
        "labels": {
          "app.kubernetes.io/managed-by": "clusterman",
          "clusterman/launch": "00000000000000ff",
          "clusterman/name": "sim-run"
        },
        "name": "sim-run-00000000000000ff",
        "ownerReferences": [
          {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "master-7f9c",
            "uid": "0d1e2f"
          }
        ]
      },
      "stringData": {
        "secret": "5ec2e7"
      },
      "type": "Opaque"
    },
    {
      "apiVersion": "v1",
      "kind": "Pod",
      "metadata": {
        "labels": {
          "app.kubernetes.io/managed-by": "clusterman",
          "clusterman/index": "0",
          "clusterman/launch": "00000000000000ff",
          "clusterman/name": "sim-run"
        },
        "name": "sim-run-00000000000000ff-0",
        "ownerReferences": [
          {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": "master-7f9c",
            "uid": "0d1e2f"
          }
        ]
      },
      "spec": {
        "activeDeadlineSeconds": 3600,
        "containers": [
          {
            "command": [
              "/opt/app/bin/sim"
            ],
            "env": [
              {
                "name": "CLUSTERMAN_MASTER",
                "value": "10.0.0.1:4000"
              },
              {
                "name": "CLUSTERMAN_SECRET",
                "valueFrom": {
                  "secretKeyRef": {
                    "key": "secret",
                    "name": "sim-run-00000000000000ff"
                  }
                }
              },
              {
                "name": "CLUSTERMAN_LAUNCH",
                "value": "255:0"
              },
              {
                "name": "RUST_LOG",
                "value": "info"
              }
            ],
            "image": "registry.example.org/sim:1.4",
            "name": "worker",
            "resources": {
              "limits": {
                "cpu": "2",
                "memory": "4Gi"
              },
              "requests": {
                "cpu": "2",
                "memory": "4Gi"
              }
            },
            "workingDir": "/data"
          }
        ],
        "restartPolicy": "Never",
        "serviceAccountName": "runner"
      }
    }
  ],
  "kind": "List"
}"#
        );
    }

    #[test]
    fn each_pod_has_its_own_index_and_the_secret_only_by_reference() {
        let list = KubernetesManager::new(3).job(JobOptions::new().cpus_per_worker(1).memory(Memory::gib(1))).render(&plan(3)).unwrap();
        let pods = &list["items"].as_array().unwrap()[1..];
        assert_eq!(pods.len(), 3);
        for (i, pod) in pods.iter().enumerate() {
            assert_eq!(pod["metadata"]["name"], format!("clusterman-00000000000000ff-{i}"));
            assert_eq!(pod["metadata"]["labels"]["clusterman/index"], i.to_string());
            let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
            assert!(env.contains(&json!({ "name": "CLUSTERMAN_LAUNCH", "value": format!("255:{i}") })));
            assert_eq!(pod["spec"]["containers"][0]["resources"]["limits"], json!({ "cpu": "1", "memory": "1Gi" }));
            assert!(!pod.to_string().contains("5ec2e7"), "the secret is in pod {i}: {pod}");
        }
        assert_eq!(list["items"][0]["stringData"]["secret"], "5ec2e7");
    }

    #[test]
    fn the_hook_edits_the_pod_but_not_what_deletes_it() {
        let k8s = KubernetesManager::new(1).configure(|pod| {
            pod["spec"]["nodeSelector"] = json!({ "gpu": "true" });
            pod["metadata"]["name"] = json!("renamed");
            pod["metadata"]["labels"] = json!({ "team": "physics" });
        });
        let list = k8s.render(&Plan { owner: None, service_account: None, ..plan(1) }).unwrap();
        let pod = &list["items"][1];
        assert_eq!(pod["spec"]["nodeSelector"]["gpu"], "true");
        assert_eq!(pod["metadata"]["name"], "clusterman-00000000000000ff-0");
        assert_eq!(pod["metadata"]["labels"]["team"], "physics");
        assert_eq!(pod["metadata"]["labels"]["clusterman/launch"], "00000000000000ff");
        assert!(pod["metadata"].get("ownerReferences").is_none() && pod["spec"].get("serviceAccountName").is_none());
        let broken = KubernetesManager::new(1).configure(|pod| *pod = json!("nothing"));
        assert!(broken.render(&plan(1)).unwrap_err().to_string().contains("configure hook"));
    }

    #[test]
    fn options_without_meaning_for_pods_are_refused() {
        let err = KubernetesManager::new(1).job(JobOptions::new().queue("debug")).manifest().unwrap_err().to_string();
        assert!(err.contains("JobOptions::queue") && err.contains("KubernetesManager::configure"), "{err}");
        let err = KubernetesManager::new(2).job(JobOptions::new().layout(Layout::Mpi)).manifest().unwrap_err().to_string();
        assert!(err.contains("form no MPI world") && err.contains("start_main_loop"), "{err}");
        let dry = KubernetesManager::new(2).manifest().unwrap();
        assert!(dry.contains("<secret>") && dry.contains("<image of the master pod>") && dry.contains("clusterman-<launch>-1"), "{dry}");
    }

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_label("My Job_1"), "my-job-1");
        assert_eq!(dns_label("--"), "clusterman");
        assert_eq!(dns_label(&"x".repeat(80)).len(), 30);
    }

    #[test]
    fn pod_states_parse_and_summarize() {
        let out = "p-0\tRunning\t\t\t\t\np-1\tPending\t\t\t\t0/1 nodes are available: 1 Insufficient cpu.\np-2\tPending\t\tImagePullBackOff\t\t\nsecond line of a message\n";
        let pods = parse_pods(out);
        assert_eq!(pods.len(), 3);
        assert_eq!(pods[1], PodState { name: "p-1".into(), phase: "Pending".into(), detail: "0/1 nodes are available: 1 Insufficient cpu.".into() });
        assert_eq!(pods[2].detail, "ImagePullBackOff");
        // all needed: queued while two are pending, with the first reason
        assert_eq!(summarize("t", &pods, 3, 3), LaunchStatus::Queued("kubernetes launch t: 2 of 3 pods pending (0/1 nodes are available: 1 Insufficient cpu.)".into()));
        // one is enough: running
        assert_eq!(summarize("t", &pods, 3, 1), LaunchStatus::Running);
        let failed = parse_pods("p-0\tFailed\t\t\tOOMKilled\t\np-1\tRunning\t\t\t\t\n");
        assert_eq!(summarize("t", &failed, 3, 1), LaunchStatus::Running);
        let LaunchStatus::Failed(why) = summarize("t", &failed, 3, 2) else { panic!("two needed, one left") };
        assert!(why.contains("1 of 3 pods left, 2 needed") && why.contains("1 deleted") && why.contains("p-0 Failed (OOMKilled)"), "{why}");
        assert!(matches!(summarize("t", &[], 2, 2), LaunchStatus::Failed(_)));
    }

    #[test]
    fn a_kubectl_missing_behind_the_prefix_is_named_even_before_it_reads_the_manifest() {
        // exits at once without reading: writing 1 MiB to it fails with a broken pipe
        let options = JobOptions::new().command_prefix(["sh", "-c", "echo 'env: kubectl: No such file or directory' >&2; exit 127"]);
        let argv = ["kubectl", "create", "-f", "-"].map(String::from);
        let err = call(&options, &argv, Some(&"x".repeat(1 << 20))).unwrap_err().to_string();
        assert!(err.contains("`kubectl` was not found through JobOptions::command_prefix (sh -c") && err.contains("No such file"), "{err}");
    }

    #[test]
    fn only_an_unreachable_api_server_is_worth_a_retry() {
        assert!(transient("The connection to the server 10.0.0.1:6443 was refused - did you specify the right host or port?"));
        assert!(transient("Unable to connect to the server: dial tcp 10.0.0.1:6443: i/o timeout"));
        assert!(transient("Error from server (ServiceUnavailable): the server is currently unable to handle the request"));
        assert!(!transient(r#"Error from server (Forbidden): error when creating "STDIN": pods "p" is forbidden: exceeded quota"#));
        assert!(!transient(r#"The Pod "p" is invalid: spec.containers[0].image: Required value"#));
    }

    #[test]
    fn every_call_names_the_namespace() {
        let k = Kubectl { options: JobOptions::new().command_prefix(["ssh", "login"]), namespace: "science".into() };
        assert_eq!(k.argv(&["get", "pods", "-l", "a=b"]), ["kubectl", "get", "-n", "science", "pods", "-l", "a=b"]);
        assert_eq!(k.delete_all_command("ff"), ["ssh", "login", "kubectl", "delete", "-n", "science", "pods,secrets", "-l", "clusterman/launch=ff", "--wait=false"]);
    }
}
