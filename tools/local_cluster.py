"""Real Flink and Spark clusters on 127.0.0.1, for trying and testing the cluster path.

What `make flink-up` / `make spark-up` start, each as its own process, all on loopback:

  Flink 1.19:  JobManager (StandaloneSessionClusterEntrypoint, REST on :8081)
               TaskManager (TaskManagerRunner, 2 slots)
  Spark 3.2.2: Master (spark://127.0.0.1:7077, UI :8080), Worker (2 cores, 1 GiB)
  both:        Beam's job server for that engine (gRPC job API on :8099 / :8199), and a
               Python SDK worker pool (:50000 / :50001) that the engine asks for Python
               workers: Beam's worker pool service bound to 127.0.0.1
               (tools/worker_pool.py), started with this venv's bin/ first on PATH,
               because the pool launches `python` from PATH for every worker.

That is the shape of a real deployment (Flink or Spark on Kubernetes with a worker-pool
sidecar beside each TaskManager / executor), shrunk to one machine. A pipeline reaches it
with the flags `beam_args()` returns, e.g.

  --runner=FlinkRunner --job_endpoint=127.0.0.1:8099 --environment_type=EXTERNAL
  --environment_config=localhost:50000 --parallelism=2 --environment_cache_millis=60000

The jars come from Maven Central at set-up only (`make engines`: tools/engines/flink.pom.xml and
tools/engines/spark.pom.xml resolved into .engines/m2, classpaths in .engines/<engine>.classpath);
nothing is downloaded when a cluster starts. No Flink or Spark distribution is needed: Beam's
runners depend on the engines' own artifacts, whose classes include the daemons, so one
classpath starts the JobManager, the TaskManager and the job server (for Spark the Worker
also needs the jars under <spark home>/jars to launch executors: symlinks, built here).

Every process is started in its own session with its pid recorded in
.engines/run/<engine>/cluster.json; `down` ends exactly those process groups (the worker
pool's group includes the Python workers it started). Memory is capped for a shared
machine: daemons' heaps of 256-512 MiB, and the heaps that hold the data as it passes to
the Python workers (Flink's TaskManager, Spark's executor) 1.5 GiB, what the full data
set (35,887 faces) needs.

CLI: python -m tools.local_cluster {install|up|down|status|args} {flink|spark}
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from fer_pipeline.core.net import free_ports

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENGINES_HOME = PROJECT_ROOT / ".engines"      # ignored by git; made by `make engines`
ENGINES = ("flink", "spark")
VERSIONS = {"flink": "Flink 1.19.0 with Beam 2.62.0's Flink runner",
            "spark": "Spark 3.2.2 with Beam 2.62.0's Spark 3 runner"}
# The Python SDK harness needs ~5 s of CPU to start: without a cache every fused stage of
# a batch job would start (and stop) its own Python workers.
ENVIRONMENT_CACHE_MILLIS = 60_000
START_TIMEOUT_S = 300          # generous: the daemons start in ~20 s on an idle machine
STOP_TIMEOUT_S = 20

# Java 17 closes the JDK internals Flink's and Spark's serializers reach into; these are
# the module openings their own launch scripts add (Flink's env.java.opts.all defaults,
# Spark's JavaModuleOptions).
JAVA_OPENS = [f"--add-opens=java.base/{package}=ALL-UNNAMED" for package in (
    "java.lang", "java.lang.invoke", "java.lang.reflect", "java.io", "java.net", "java.nio",
    "java.text", "java.time", "java.util", "java.util.concurrent",
    "java.util.concurrent.atomic", "java.util.concurrent.locks", "sun.nio.ch", "sun.nio.cs",
    "sun.security.action", "sun.util.calendar")] + [
    "--add-exports=java.base/sun.net.util=ALL-UNNAMED",
    "--add-exports=java.rmi/sun.rmi.registry=ALL-UNNAMED",
    "--add-exports=java.security.jgss/sun.security.krb5=ALL-UNNAMED"]

# Our own Java, compiled by `make engines` into .engines/<engine>/fer-engines.jar, on every
# classpath of that engine: tools/engines/*.java and tools/engines/<engine>/*.java.
OUR_JAR = "fer-engines.jar"
# The job servers find nothing to ship with a job (see tools/engines/NothingToStage.java):
# the daemons already hold the same jars.
NOTHING_TO_STAGE = ("--pipeline_resources_detector_factory_class="
                    "ferpipeline.engines.NothingToStage")

# Beam's job server drivers, with the job and artifact ports bound to --job-host only
# (tools/engines/LoopbackJobServer.java, BoundServerFactory.java: Beam's own listen on
# all interfaces).
FLINK_JOB_SERVER_MAIN = "ferpipeline.engines.flink.LoopbackFlinkJobServer"
SPARK_JOB_SERVER_MAIN = "ferpipeline.engines.spark.LoopbackSparkJobServer"


class ClusterError(RuntimeError):
    """A cluster could not be set up, started or found; the message says what to do."""


@dataclass
class Ports:
    """Every port a local cluster listens on (defaults: what the README's commands use).

    `master` is what the job server is pointed at: Flink's REST endpoint, Spark's master.
    A port an engine does not have is 0.
    """
    master: int           # Flink: REST API and web UI; Spark: the master's RPC
    master_rpc: int       # Flink: the JobManager's RPC (TaskManagers register there)
    master_ui: int        # Spark: the master's web UI (its JSON tells which workers live)
    worker_ui: int        # Spark: the worker's web UI
    job: int              # Beam job service (gRPC)
    artifact: int         # Beam artifact staging service
    expansion: int        # Beam expansion service (cross-language transforms; unused)
    worker_pool: int      # the Python SDK worker pool

    @classmethod
    def default(cls, engine: str) -> "Ports":
        if engine == "flink":
            return cls(8081, 6123, 0, 0, 8099, 8098, 8097, 50000)
        return cls(7077, 0, 8080, 8082, 8199, 8198, 8197, 50001)

    @classmethod
    def free(cls, engine: str) -> "Ports":
        """Ports nobody listens on now (tests use these, beside any cluster a user runs)."""
        default = asdict(cls.default(engine))
        chosen = iter(free_ports(sum(1 for port in default.values() if port)))
        return cls(**{name: next(chosen) if port else 0 for name, port in default.items()})


@dataclass
class Cluster:
    """A running local cluster: how to reach it, and the processes to stop."""
    engine: str
    state_dir: str
    ports: Ports
    pids: dict[str, int] = field(default_factory=dict)   # role -> pid (process group id)
    # role -> (command, environment overrides): what restart_role starts again
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    @property
    def job_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.job}"

    @property
    def worker_pool(self) -> str:
        return f"localhost:{self.ports.worker_pool}"

    @property
    def master(self) -> str:
        if self.engine == "flink":
            return f"127.0.0.1:{self.ports.master}"
        return f"spark://127.0.0.1:{self.ports.master}"

    def beam_args(self, parallelism: int = 2) -> list[str]:
        """The Beam flags that run a pipeline on this cluster through its job server."""
        runner = "FlinkRunner" if self.engine == "flink" else "SparkRunner"
        args = [f"--runner={runner}", f"--job_endpoint={self.job_endpoint}",
                "--environment_type=EXTERNAL", f"--environment_config={self.worker_pool}",
                f"--environment_cache_millis={ENVIRONMENT_CACHE_MILLIS}", NOTHING_TO_STAGE]
        if self.engine == "flink":
            args.append(f"--parallelism={parallelism}")   # Spark: the worker's 2 cores
        return args

    def log_path(self, role: str) -> Path:
        return Path(self.state_dir) / "logs" / f"{role}.log"

    def save(self) -> None:
        path = Path(self.state_dir) / "cluster.json"
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, state_dir: Path) -> Optional["Cluster"]:
        path = Path(state_dir) / "cluster.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        data["ports"] = Ports(**data["ports"])
        data["commands"] = {role: (list(c), dict(e)) for role, (c, e) in data["commands"].items()}
        return cls(**data)


# ----------------------------------------------------------------------------- set-up

def classpath(engine: str, home: Path = ENGINES_HOME) -> list[str]:
    """The jars `make engines` resolved for `engine`, and ours, as absolute paths."""
    ours = home / engine / OUR_JAR
    if not ours.exists():
        raise ClusterError(f"{ours} is missing: run `make engines` (it compiles "
                           "tools/engines/*.java)")
    return [*maven_classpath(engine, home), str(ours)]


def maven_classpath(engine: str, home: Path = ENGINES_HOME) -> list[str]:
    """The jars Maven resolved for `engine` (tools/engines/<engine>.pom.xml)."""
    path = home / f"{engine}.classpath"
    if not path.exists():
        raise ClusterError(f"{path} is missing: run `make engines` first (it fetches the "
                           f"{engine} jars from Maven Central once)")
    jars = [jar for jar in path.read_text().strip().split(os.pathsep) if jar]
    missing = [jar for jar in jars if not os.path.exists(jar)]
    if missing:
        raise ClusterError(f"{len(missing)} jar(s) of {path} are gone (e.g. {missing[0]}): "
                           "run `make engines` again")
    return jars


def install(engine: str, home: Path = ENGINES_HOME) -> Path:
    """What `make engines` adds after Maven: the job-server launcher jar (and Spark's home).

    The launcher is a jar with only a manifest: its Class-Path names the resolved jars and
    its Main-Class is Beam's job server driver, so Beam's own FlinkRunner / SparkRunner can
    start a job server from it (`--flink_job_server_jar` / `--spark_job_server_jar`) the
    way they start the shadow jar Maven Central does not serve here. Returns its path.
    """
    compile_our_classes(engine, home)
    jars = classpath(engine, home)
    engine_home = home / engine
    engine_home.mkdir(parents=True, exist_ok=True)
    launcher = engine_home / f"beam-{engine}-job-server.jar"
    main = FLINK_JOB_SERVER_MAIN if engine == "flink" else SPARK_JOB_SERVER_MAIN
    write_launcher_jar(launcher, main, jars)
    if engine == "spark":
        _link_spark_jars(spark_home(home), jars)
    return launcher


def compile_our_classes(engine: str, home: Path = ENGINES_HOME) -> Path:
    """Compiles our Java for `engine` (tools/engines/*.java, shared, and
    tools/engines/<engine>/*.java) against its jars into .engines/<engine>/fer-engines.jar:
    NothingToStage and the job server driver bound to --job-host (see their sources)."""
    sources_dir = PROJECT_ROOT / "tools" / "engines"
    sources = sorted(str(p) for p in [*sources_dir.glob("*.java"),
                                      *(sources_dir / engine).glob("*.java")])
    beam_jars = maven_classpath(engine, home)
    classes = home / engine / "classes"
    if classes.exists():
        shutil.rmtree(classes)
    classes.mkdir(parents=True)
    built = subprocess.run(["javac", "--release", "11", "-nowarn", "-cp",
                            os.pathsep.join(beam_jars), "-d", str(classes), *sources],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise ClusterError(f"javac could not compile {', '.join(sources)}: "
                           f"{(built.stderr or built.stdout).strip()[-400:]}")
    jar_path = home / engine / OUR_JAR
    with zipfile.ZipFile(jar_path.with_suffix(".tmp"), "w") as jar:
        for path in sorted(classes.rglob("*.class")):
            jar.write(path, path.relative_to(classes).as_posix())
    jar_path.with_suffix(".tmp").replace(jar_path)
    shutil.rmtree(classes)
    return jar_path


def write_launcher_jar(path: Path, main_class: str, jars: Sequence[str]) -> None:
    """A manifest-only jar: `java -jar path` runs main_class with `jars` on the classpath.

    Class-Path entries are URLs relative to the jar's directory; Add-Opens/Add-Exports
    give the job server the JDK openings JAVA_OPENS gives the daemons.
    """
    relative = [os.path.relpath(jar, path.parent).replace(os.sep, "/") for jar in jars]
    opens = " ".join(o.split("=")[1] for o in JAVA_OPENS if o.startswith("--add-opens"))
    exports = " ".join(o.split("=")[1] for o in JAVA_OPENS if o.startswith("--add-exports"))
    attributes = [("Manifest-Version", "1.0"), ("Main-Class", main_class),
                  ("Class-Path", " ".join(relative)), ("Add-Opens", opens),
                  ("Add-Exports", exports)]
    manifest = "".join(_manifest_line(name, value) for name, value in attributes) + "\r\n"
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest)
    tmp.replace(path)


def _manifest_line(name: str, value: str) -> str:
    """One manifest attribute, wrapped as the JAR spec requires (72-byte lines, each
    continuation starting with a space)."""
    text = f"{name}: {value}".encode()
    lines = [text[:72]] + [b" " + text[i:i + 71] for i in range(72, len(text), 71)]
    return "".join(line.decode() + "\r\n" for line in lines)


def spark_home(home: Path = ENGINES_HOME) -> Path:
    return home / "spark" / "home"


def _link_spark_jars(spark_home_dir: Path, jars: Sequence[str]) -> None:
    # A Spark Worker builds each executor's classpath from <SPARK_HOME>/jars/*.
    jars_dir = spark_home_dir / "jars"
    if jars_dir.exists():
        shutil.rmtree(jars_dir)
    jars_dir.mkdir(parents=True)
    for jar in jars:
        (jars_dir / os.path.basename(jar)).symlink_to(jar)


# ----------------------------------------------------------------------------- start

def start(engine: str, state_dir: Optional[Path] = None, ports: Optional[Ports] = None,
          home: Path = ENGINES_HOME) -> Cluster:
    """Starts `engine`'s cluster, its job server and a worker pool; returns when all answer.

    Anything already started is stopped again if a later part fails to come up.
    """
    if engine not in ENGINES:
        raise ClusterError(f"unknown engine {engine!r}; choose from {list(ENGINES)}")
    state_dir = Path(state_dir or home / "run" / engine)
    existing = Cluster.load(state_dir)
    if existing is not None and any(_alive(pid) for pid in existing.pids.values()):
        raise ClusterError(f"a {engine} cluster started from {state_dir} is still running: "
                           f"stop it first (make {engine}-down)")
    ports = ports or Ports.default(engine)
    busy = [port for port in asdict(ports).values() if port and _listening(port)]
    if busy:
        raise ClusterError(f"port(s) {busy} on 127.0.0.1 are in use: a {engine} cluster "
                           f"may be running already (make {engine}-down), or something else "
                           "holds them")
    jars = classpath(engine, home)
    if state_dir.exists():
        shutil.rmtree(state_dir)
    (state_dir / "logs").mkdir(parents=True)
    cluster = Cluster(engine, str(state_dir), ports)
    try:
        if engine == "flink":
            _start_flink(cluster, jars)
        else:
            _start_spark(cluster, jars, home)
        _start_worker_pool(cluster)
        _wait_for_port(cluster, "worker_pool", ports.worker_pool)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def _start_flink(cluster: Cluster, jars: list[str]) -> None:
    state = Path(cluster.state_dir)
    conf_dir = state / "conf"
    conf_dir.mkdir()
    (conf_dir / "config.yaml").write_text(flink_config(cluster.ports, state))
    java_cp = ["-cp", os.pathsep.join(jars)]
    log = ["-Dorg.slf4j.simpleLogger.showDateTime=true",
           "-Dorg.slf4j.simpleLogger.dateTimeFormat=HH:mm:ss.SSS"]
    jm_jvm, jm_dynamic = _flink_resources(jars, conf_dir, "GET_JM_RESOURCE_PARAMS")
    _spawn(cluster, "jobmanager",
           ["java", *JAVA_OPENS, *log, *jm_jvm, *java_cp,
            "org.apache.flink.runtime.entrypoint.StandaloneSessionClusterEntrypoint",
            "--configDir", str(conf_dir), "--executionMode", "cluster", *jm_dynamic])
    tm_jvm, tm_dynamic = _flink_resources(jars, conf_dir, "GET_TM_RESOURCE_PARAMS")
    _spawn(cluster, "taskmanager",
           ["java", *JAVA_OPENS, *log, *tm_jvm, *java_cp,
            "org.apache.flink.runtime.taskexecutor.TaskManagerRunner",
            "--configDir", str(conf_dir), *tm_dynamic])
    _wait(cluster, "jobmanager and a TaskManager with 2 slots",
          lambda: (_http_json(f"http://127.0.0.1:{cluster.ports.master}/overview") or {})
          .get("slots-total", 0) >= 2)
    _spawn(cluster, "jobserver",
           ["java", *JAVA_OPENS, *log, "-Xmx512m", *java_cp, FLINK_JOB_SERVER_MAIN,
            f"--flink-master=127.0.0.1:{cluster.ports.master}", *_job_server_flags(cluster)])
    _wait_for_port(cluster, "jobserver", cluster.ports.job)


def flink_config(ports: Ports, state: Path) -> str:
    """config.yaml of the local Flink cluster: loopback only, small memory, no retries."""
    settings = {
        "jobmanager.rpc.address": "127.0.0.1", "jobmanager.bind-host": "127.0.0.1",
        "jobmanager.rpc.port": ports.master_rpc,
        "rest.address": "127.0.0.1", "rest.bind-address": "127.0.0.1",
        "rest.port": ports.master,
        "taskmanager.host": "127.0.0.1", "taskmanager.bind-host": "127.0.0.1",
        "jobmanager.memory.process.size": "768m",
        "taskmanager.memory.managed.size": "128m",
        "taskmanager.memory.network.min": "128m", "taskmanager.memory.network.max": "128m",
        # Beam's Fn API moves every element between the TaskManager and the Python workers
        # through gRPC: received into the heap, sent from direct memory. At the full data
        # set (35,887 faces) Flink's small defaults here (a 448 MiB heap, direct memory
        # capped at 256 MiB with half of it network buffers) ran out of both in ingest and
        # transform. These budgets are caps, not reservations.
        "taskmanager.memory.task.heap.size": "1536m",
        "taskmanager.memory.task.off-heap.size": "256m",
        # A daemon that runs out of memory, or whose gRPC thread dies of an uncaught
        # error, exits: the job then fails with a lost TaskManager within the heartbeat
        # timeout below. Flink's defaults only log it, and the job waits forever on a data
        # channel nobody serves (seen: a Beam step hung 10 minutes, idle).
        "taskmanager.jvm-exit-on-oom": "true",
        "cluster.uncaught-exception-handling": "FAIL",
        "taskmanager.numberOfTaskSlots": 2, "parallelism.default": 2,
        # Batch shuffles reserve 512 network buffers each by default, more than a small
        # TaskManager has for a Beam job's many exchanges.
        "taskmanager.network.sort-shuffle.min-buffers": 64,
        # Beam's classes are on the daemons' classpath: loading them parent-first lets
        # the runner keep Python workers across a job's stages (environment cache).
        "classloader.resolve-order": "parent-first",
        # On a busy 2-core machine a daemon can take longer than the default 10 s to
        # answer an RPC; that is slowness, not a failure.
        "pekko.ask.timeout": "30 s",
        # A TaskManager that dies is declared lost after 15 s without heartbeats (and at the
        # first heartbeat RPC that fails), so the job fails then instead of waiting for
        # the ask timeout of each RPC to the dead process.
        "heartbeat.interval": 3000, "heartbeat.timeout": 15000,
        "heartbeat.rpc-failure-threshold": 1,
        # A failed task fails the job at once: the pipeline reports it, nothing retries.
        "restart-strategy.type": "none",
        # A job whose only TaskManager is gone before it got its slots fails after 60 s
        # (Flink waits 5 min by default); a live cluster hands its slots out at once.
        "slot.request.timeout": 60000,
        "io.tmp.dirs": str(state / "tmp"), "process.working-dir": str(state / "work"),
        "blob.storage.directory": str(state / "blobs"), "web.tmpdir": str(state / "web"),
    }
    return "".join(f"{key}: {value}\n" for key, value in settings.items())


def _flink_resources(jars: list[str], conf_dir: Path, what: str) -> tuple[list[str], list[str]]:
    """JVM flags and dynamic properties for a Flink daemon, computed by Flink's own
    BashJavaUtils from config.yaml (what bin/jobmanager.sh and taskmanager.sh do)."""
    out = subprocess.run(
        ["java", "-cp", os.pathsep.join(jars), "org.apache.flink.runtime.util.bash.BashJavaUtils",
         what, "--configDir", str(conf_dir)], capture_output=True, text=True, timeout=120)
    results = [line.split(":", 1)[1] for line in out.stdout.splitlines()
               if line.startswith("BASH_JAVA_UTILS_EXEC_RESULT:")]
    if out.returncode != 0 or len(results) < 2:
        raise ClusterError(f"Flink could not size its memory from {conf_dir}: "
                           f"{(out.stderr or out.stdout).strip()[-300:]}")
    return results[0].split(), results[1].split()


def _start_spark(cluster: Cluster, jars: list[str], home: Path) -> None:
    state = Path(cluster.state_dir)
    home_dir = spark_home(home)
    if not (home_dir / "jars").is_dir():
        raise ClusterError(f"{home_dir}/jars is missing: run `make engines`")
    java_cp = ["-cp", str(home_dir / "jars" / "*")]
    env = {"SPARK_HOME": str(home_dir), "SPARK_SCALA_VERSION": "2.12",
           "SPARK_LOCAL_IP": "127.0.0.1", "SPARK_LOCAL_DIRS": str(state / "local")}
    master_url = cluster.master
    _spawn(cluster, "master",
           ["java", *JAVA_OPENS, "-Xmx256m", *java_cp, "org.apache.spark.deploy.master.Master",
            "--host", "127.0.0.1", "--port", str(cluster.ports.master),
            "--webui-port", str(cluster.ports.master_ui)], env)
    _spawn(cluster, "worker",
           ["java", *JAVA_OPENS, "-Xmx256m",
            # Finished applications' directories (each holds the jars the job server
            # shipped) are removed a minute after they end.
            "-Dspark.worker.cleanup.enabled=true", "-Dspark.worker.cleanup.interval=60",
            "-Dspark.worker.cleanup.appDataTtl=60", *java_cp,
            "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
            "--cores", "2", "--memory", "2g", "--work-dir", str(state / "work"),
            "--webui-port", str(cluster.ports.worker_ui), master_url], env)
    _wait(cluster, "master with an alive worker",
          lambda: (_http_json(f"http://127.0.0.1:{cluster.ports.master_ui}/json/") or {})
          .get("aliveworkers", 0) >= 1)
    executor_opts = " ".join(JAVA_OPENS)
    _spawn(cluster, "jobserver",
           ["java", *JAVA_OPENS, "-Xmx512m",
            # The job server is the Spark driver; SparkConf reads these system properties.
            f"-Dspark.executor.extraJavaOptions={executor_opts}",
            # Beam's gRPC data channel to the Python workers receives into the heap: at
            # the full data set (35,887 faces) a 512 MiB executor ran out of it in
            # transform. A cap, not a reservation.
            "-Dspark.executor.memory=1536m", "-Dspark.driver.host=127.0.0.1",
            # One Spark application for all the jobs this server runs, so its executor
            # (a JVM on the Worker) starts once, not once per job. Beam names the switch
            # for tests; it is what a long-running job server on one cluster wants.
            "-Dbeam.spark.test.reuseSparkContext=true",
            "-Dspark.driver.bindAddress=127.0.0.1", "-Dspark.ui.enabled=false",
            f"-Dspark.local.dir={state / 'local'}", *java_cp, SPARK_JOB_SERVER_MAIN,
            f"--spark-master-url={master_url}", *_job_server_flags(cluster)], env)
    _wait_for_port(cluster, "jobserver", cluster.ports.job)


def _job_server_flags(cluster: Cluster) -> list[str]:
    return ["--job-host=127.0.0.1", f"--job-port={cluster.ports.job}",
            f"--artifact-port={cluster.ports.artifact}",
            f"--expansion-port={cluster.ports.expansion}",
            f"--artifacts-dir={Path(cluster.state_dir) / 'artifacts'}"]


def _start_worker_pool(cluster: Cluster) -> None:
    # The pool starts each SDK worker as `python -c ...` found on PATH: this venv's python
    # (it has Beam, TFT, TFDV and our code) must come first.
    venv_bin = os.path.dirname(sys.executable)
    env = {"PATH": venv_bin + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(PROJECT_ROOT)}
    # tools/worker_pool.py: Beam's worker pool service, bound to 127.0.0.1 only.
    _spawn(cluster, "worker_pool",
           [sys.executable, "-m", "tools.worker_pool",
            f"--port={cluster.ports.worker_pool}"], env)


def _spawn(cluster: Cluster, role: str, command: list[str],
           env: Optional[dict[str, str]] = None) -> None:
    log = open(cluster.log_path(role), "wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, cwd=cluster.state_dir,
                               env={**os.environ, **(env or {})}, start_new_session=True)
    log.close()
    cluster.pids[role] = process.pid
    cluster.commands[role] = (command, env or {})
    cluster.save()


def _wait(cluster: Cluster, what: str, ready, timeout_s: float = START_TIMEOUT_S) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        dead = [role for role, pid in cluster.pids.items() if not _alive(pid)]
        if dead:
            raise ClusterError(f"{cluster.engine} {dead[0]} exited while starting; "
                               f"see {cluster.log_path(dead[0])}")
        if ready():
            return
        time.sleep(1)
    raise ClusterError(f"{cluster.engine}: no {what} after {timeout_s:.0f} s; "
                       f"see the logs in {Path(cluster.state_dir) / 'logs'}")


def _wait_for_port(cluster: Cluster, role: str, port: int) -> None:
    _wait(cluster, f"{role} listening on port {port}", lambda: _listening(port))


# ----------------------------------------------------------------------------- stop

def stop(cluster: Cluster) -> None:
    """Ends every process group this cluster started (TERM, then KILL after a grace)."""
    for role in reversed(list(cluster.pids)):     # job server and pool before the daemons
        _signal_group(cluster.pids[role], signal.SIGTERM)
    deadline = time.time() + STOP_TIMEOUT_S
    while time.time() < deadline and any(_alive(p) for p in cluster.pids.values()):
        time.sleep(0.5)
    for pid in cluster.pids.values():
        _signal_group(pid, signal.SIGKILL)
    for pid in cluster.pids.values():
        _reap(pid)


def kill_role(cluster: Cluster, role: str) -> None:
    """Kills one daemon at once, as a crash would (the fault tests kill a TaskManager)."""
    _signal_group(cluster.pids[role], signal.SIGKILL)
    _reap(cluster.pids[role])


def restart_role(cluster: Cluster, role: str) -> None:
    """Starts a killed daemon again with its original command; for the TaskManager, waits
    until the JobManager has its slots back."""
    command, env = cluster.commands[role]
    _spawn(cluster, role, list(command), env)
    if role == "taskmanager":
        _wait(cluster, "TaskManager re-registered", lambda: flink_slots(cluster) >= 2)


def flink_slots(cluster: Cluster) -> int:
    """Task slots the JobManager has from live TaskManagers."""
    overview = _http_json(f"http://127.0.0.1:{cluster.ports.master}/overview") or {}
    return int(overview.get("slots-total", 0))


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)     # each role was started as its own session: pgid == pid
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)   # our child: collect it so it is not left a zombie
    except ChildProcessError:
        pass


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished:
            return False
    except ChildProcessError:
        pass                     # not our child (started by another command): ask the OS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- helpers

def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0




def _http_json(url: str) -> Optional[dict]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- CLI

def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.local_cluster",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["install", "up", "down", "status", "args"])
    parser.add_argument("engine", choices=ENGINES)
    args = parser.parse_args(argv)
    state_dir = ENGINES_HOME / "run" / args.engine
    try:
        if args.command == "install":
            print(f"[engines] {args.engine}: job-server launcher {install(args.engine)}")
        elif args.command == "up":
            cluster = start(args.engine, state_dir)
            print(f"[engines] {VERSIONS[args.engine]} up on 127.0.0.1 "
                  f"(master {cluster.master}, logs in {state_dir / 'logs'}); run a step with:")
            print("  fer-pipeline ... " + " ".join(cluster.beam_args()))
        elif args.command == "args":
            print(" ".join(_running(args.engine, state_dir).beam_args()))
        elif args.command == "status":
            cluster = _running(args.engine, state_dir)
            for role, pid in cluster.pids.items():
                print(f"{role:<12} pid {pid:<8} {'running' if _alive(pid) else 'exited'}")
        else:
            cluster = Cluster.load(state_dir)
            if cluster is None:
                print(f"[engines] no {args.engine} cluster was started from {state_dir}")
            else:
                stop(cluster)
                print(f"[engines] {args.engine} cluster stopped")
    except ClusterError as error:
        print(f"[engines] error: {error}", file=sys.stderr)
        return 1
    return 0


def _running(engine: str, state_dir: Path) -> Cluster:
    cluster = Cluster.load(state_dir)
    if cluster is None or not all(_alive(pid) for pid in cluster.pids.values()):
        raise ClusterError(f"no {engine} cluster is running: start one with make {engine}-up")
    return cluster


if __name__ == "__main__":
    sys.exit(main())
