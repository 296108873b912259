"""A Zeek cluster on the lab's sensor, started by hand as zeekctl would: a manager (which also
writes the logs) and two workers that share the sensor's interface through AF_PACKET fanout.

Each node is one `zeek` process in the sensor's namespace with `CLUSTER_NODE=<name>` in its
environment. Zeek's cluster framework then loads `cluster-layout.zeek` from its working directory
(`.` is first on ZEEKPATH), which fills `Cluster::nodes` with the nodes' Broker ports on the
namespace's own loopback, so two labs never collide. All three run in one folder: the manager
writes every log there (workers send theirs to it), and their outputs go to the lab's proc/.

Fanout: both workers open an AF_PACKET socket on the interface in one fanout group, hashed by
flow (the kernel's symmetric flow hash), so a connection's SYN, SYN+ACK and reply all reach the
same worker and every packet reaches exactly one worker. Zeek's defaults already ask for it
(`AF_Packet::enable_fanout`, `fanout_mode = FANOUT_HASH`); the lab names its group and shrinks
the ring (128 MB per worker by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from lab.netns import Namespace
from lab.process import Child, Children, wait_for

MANAGER = "manager"
LOGGER = "logger"
WORKERS = ("worker-1", "worker-2")
NODES = (MANAGER, *WORKERS)
BROKER_BASE_PORT = 27760  # manager 27760, then one per worker, on the sensor namespace's loopback
LOGGER_PORT = BROKER_BASE_PORT + len(WORKERS) + 1
ZEROMQ_XSUB_PORT = 5556  # Cluster::Backend::ZeroMQ::listen_xsub_endpoint's default, on the manager
FANOUT_ID = 71
Backend = Literal["broker", "zeromq"]
BACKENDS: tuple[Backend, ...] = ("broker", "zeromq")

# Zeek 8's ZeroMQ backend instead of Broker: the manager runs the XPUB/XSUB proxy (127.0.0.1:5555
# and 5556 by default). A logger node takes the logs: a manager that is also the logger binds its
# log socket again for each WebSocket client (its own backend instance) and fails, and that client
# then gets no events (seen on 8.0.10). A manager on ZeroMQ reads no packets and holds no Broker
# listener, so nothing else keeps it running.
ZEROMQ_SCRIPT = """\
@load frameworks/cluster/backend/zeromq/connect
redef Cluster::backend = Cluster::CLUSTER_BACKEND_ZEROMQ;
redef exit_only_after_terminate = T;
"""

# Lab-only additions, loaded by every node: the fanout settings, no log rotation, and a `node`
# column in conn.log saying which worker saw the connection (the lab checks that both did).
# conn.log is written at priority -5 of connection_state_remove, after Conn::set_conn at 5.
LAB_CLUSTER_SCRIPT = f"""\
redef AF_Packet::fanout_id = {FANOUT_ID};
redef AF_Packet::fanout_mode = AF_Packet::FANOUT_HASH;
redef AF_Packet::enable_fanout = T;
redef AF_Packet::buffer_size = 8 * 1024 * 1024;

# A cluster's logger rotates hourly into archive-log, a zeekctl script: the lab keeps notice.log.
redef Log::default_rotation_interval = 0secs;

redef record Conn::Info += {{
\t## The cluster node that saw the connection (lab only).
\tnode: string &log &optional;
}};

event connection_state_remove(c: connection)
\t{{
\tif ( c?$conn )
\t\tc$conn$node = Cluster::node;
\t}}
"""


def nodes_of(backend: Backend) -> tuple[str, ...]:
    """The nodes of a cluster on `backend`, in start order."""
    return (LOGGER, *NODES) if backend == "zeromq" else NODES


def layout(backend: Backend = "broker") -> str:
    """cluster-layout.zeek: the nodes and their ports (workers connect to the manager)."""
    lines = ["redef Cluster::nodes = {",
             f'\t["{MANAGER}"] = [$node_type=Cluster::MANAGER, $ip=127.0.0.1, $p={BROKER_BASE_PORT}/tcp],']
    for i, name in enumerate(WORKERS, 1):
        lines.append(f'\t["{name}"] = [$node_type=Cluster::WORKER, $ip=127.0.0.1, '
                     f'$p={BROKER_BASE_PORT + i}/tcp, $manager="{MANAGER}"],')
    if LOGGER in nodes_of(backend):
        lines.append(f'\t["{LOGGER}"] = [$node_type=Cluster::LOGGER, $ip=127.0.0.1, $p={LOGGER_PORT}/tcp, '
                     f'$manager="{MANAGER}"],')
    lines.append("};")
    if LOGGER in nodes_of(backend):
        lines.append("redef Cluster::manager_is_logger = F;")
    return "\n".join(lines) + "\n"


def node_argv(name: str, interface: str, scripts: Sequence[str]) -> list[str]:
    """The command line of one node: workers read the interface through AF_PACKET (with fanout),
    the manager and the logger read nothing."""
    argv = ["env", f"CLUSTER_NODE={name}", "zeek", "-C"]
    if name in WORKERS:
        argv += ["-i", f"af_packet::{interface}"]
    return [*argv, *scripts]


def start(children: Children, ns: Namespace, interface: str, folder: Path, *, label: str,
          scripts: Sequence[str], backend: Backend = "broker") -> dict[str, Child]:
    """Write the layout into `folder` and start the manager, then the workers (they connect to it
    and retry until it listens), on the cluster `backend` (Broker, Zeek's default, or ZeroMQ).
    `label` names the run ("zeek", "zeek.1"): the manager's child is `label` (as a single Zeek's),
    the workers' `<label>-worker-1`, ... Returns node name -> child."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cluster-layout.zeek").write_text(layout(backend))
    lab_script = (ZEROMQ_SCRIPT if backend == "zeromq" else "") + LAB_CLUSTER_SCRIPT
    (folder / "lab-cluster.zeek").write_text(lab_script)
    everything = [*scripts, str(folder / "lab-cluster.zeek")]
    nodes = {}
    if LOGGER in nodes_of(backend):
        nodes[LOGGER] = children.start(f"{label}-{LOGGER}", node_argv(LOGGER, interface, everything), ns,
                                       cwd=folder)
    nodes[MANAGER] = children.start(label, node_argv(MANAGER, interface, everything), ns, cwd=folder)
    # Workers that find no manager retry, but log an error first: start them once it listens.
    listens = ZEROMQ_XSUB_PORT if backend == "zeromq" else BROKER_BASE_PORT
    wait_for(lambda: f":{listens} " in ns.run("ss", "-Hltn", check=False), 60,
             "the Zeek manager's cluster port", alive=nodes[MANAGER].exited)
    for name in WORKERS:
        argv = node_argv(name, interface, everything)
        nodes[name] = children.start(f"{label}-{name}", argv, ns, cwd=folder)
    return nodes


def stop(children: Children, nodes: dict[str, Child], *, grace: float = 30) -> None:
    """Stop the workers first (SIGTERM: each flushes its connections and sends the last log
    lines on), then the manager, then the logger if any, which writes them all."""
    for name in WORKERS:
        if name in nodes:
            children.stop(nodes[name], grace=grace)
    for name in (MANAGER, LOGGER):
        if name in nodes:
            children.stop(nodes[name], grace=grace)
