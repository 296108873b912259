"""The Grafana dashboard (dashboards/stepstone.json) queries only metrics the services export.

Every metric name in every panel's PromQL is checked against what a running analyzer (in this
process, real Redis, a handshake pushed through to its verdict), a running sharded analyzer with a
Zeek feed (its shard writes), a running prober (a subprocess with --metrics-port, one real probe of
127.0.0.1) and the responder's registry (with banners and shards, as `run` builds it) actually
expose at /metrics. A name counts only with a suffix its type has: `_total` for a counter, `_bucket`, `_sum`
and `_count` for a histogram, none for a gauge (the series Prometheus really stores).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from service_harness import ROOT, free_port, handshake, open_harness, result, until
from test_service_zeek import fake_zeek, handshake_event

from analyzer.broker import event_frame
from analyzer.metrics import VERDICT_KINDS, verdict_kind
from analyzer.service import Config, serve
from lab.redis import RedisServer
from prober import shards
from prober.queue import ProbeQueue, connect
from responder.banners import Banners
from responder.cli import Sink
from responder.metrics import registry_for

DASHBOARD = ROOT / "dashboards" / "stepstone.json"
PANELS = {"Handshakes/s", "Probes/s", "Queue lag", "Dead letters/s", "Verdicts by kind/s",
          "SYN-to-verdict latency", "Probe latency", "Errors by kind/s", "Handshakes measured vs counted/s",
          "Verdict lines/s by change", "Banner exchanges/s by outcome", "Shard writes/s"}

# -- PromQL: the metric names an expression selects ---------------------------------------------

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^}]*\}")  # label matchers (their strings are already blanked)
_RANGE = re.compile(r"\[[^\]]*\]")  # range and subquery durations, $__rate_interval
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by `(`),
    keywords, label names (in matchers or grouping clauses), numbers or durations."""
    if "__name__" in expr:
        raise ValueError(f"selecting by __name__ hides the metric from this check: {expr}")
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", _STRING.sub('""', expr))))
    names = set()
    for m in _IDENT.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        if before.isdigit() or before in ".$":  # 1e3, 0.95's tail, a $variable
            continue
        if text[m.end():].lstrip().startswith("(") or m.group().lower() in _KEYWORDS:
            continue
        names.add(m.group())
    return names


def dashboard_exprs(dashboard: dict[str, Any]) -> dict[str, list[str]]:
    """Every panel's PromQL expressions, by title (panels nested in rows included)."""
    out: dict[str, list[str]] = {}
    stack = list(dashboard["panels"])
    while stack:
        panel = stack.pop()
        stack.extend(panel.get("panels", []))
        for target in panel.get("targets", []):
            out.setdefault(panel["title"], []).append(target["expr"])
    return out


# -- /metrics: the series a service exports -------------------------------------------------------

_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
             "summary": ("", "_sum", "_count"), "gauge": ("",), "untyped": ("",), "info": ("_info",),
             "stateset": ("",), "gaugehistogram": ("_bucket", "_gsum", "_gcount")}


class Exported:
    """The series names a set of /metrics pages can have. A labelled metric with no child yet has
    HELP and TYPE but no sample: its names come from its type."""

    def __init__(self) -> None:
        self.series: set[str] = set()
        self.families: dict[str, str] = {}

    def add(self, exposition: str) -> None:
        for family in text_string_to_metric_families(exposition):
            self.families[family.name] = family.type
            self.series.update(sample.name for sample in family.samples)
            self.series.update(family.name + s for s in _SUFFIXES.get(family.type, ("",)))

    def missing(self, names: set[str]) -> set[str]:
        return {n for n in names if n not in self.series}


def dashboard_problems(dashboard: dict[str, Any], exported: Exported) -> list[str]:
    problems = []
    for title, exprs in sorted(dashboard_exprs(dashboard).items()):
        for expr in exprs:
            names = metric_names(expr)
            if not names:
                problems.append(f"{title}: no metric found in {expr!r}")
            problems += [f"{title}: {name} is exported by no service"
                         for name in sorted(exported.missing(names))]
    return problems


def fetch(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def samples(exposition: str) -> dict[str, float]:
    return {s.name + json.dumps(s.labels, sort_keys=True): s.value
            for f in text_string_to_metric_families(exposition) for s in f.samples}


# -- the services ---------------------------------------------------------------------------------


async def scrape_analyzer(server: RedisServer, log_dir: Path) -> str:
    """A real analyzer with its metrics endpoint; one relay handshake through to its verdict, so
    that the latency histogram and the verdict kinds have samples."""
    port = free_port()
    async with open_harness(server, log_dir) as h:
        config = Config(redis_url=h.url, handshakes=True, zeek_url=None, log_dir=log_dir,
                        consumer="d1", metrics_port=port)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop=stop))
        try:
            t = time.time()
            relay = handshake("198.18.7.1", "198.19.0.10", t=t, tp_us=80_000)
            await h.send(relay)
            ((job, _),) = await h.jobs(1)
            # Another OS answers the probe, and its ping is far shorter than T^p: a confident relay.
            await h.answer(result(job, relay.src, t, ping_max=10_000, fa="win:Windows:7 or 8"))
            await h.verdicts(1)

            async def counted() -> str | None:
                text = await asyncio.to_thread(fetch, port)
                return text if samples(text).get("stepstone_analyzer_verdicts_total{}") == 1 else None

            return str(await until(counted, what="the verdict in the analyzer's metrics"))
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 20) == 0


async def scrape_prober(server: RedisServer, tmp_path: Path) -> str:
    """`stepstone-prober run --metrics-port` in a subprocess, one probe of 127.0.0.1 (loopback only)
    done, so that the probe-duration histogram has a sample."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "prober.cli", "run", "--redis", server.url, "--name", "d1",
        "--metrics-port", str(port), "--allow", "127.0.0.1/32", "--target-interval", "0",
        "--count", "1", "--reply-wait", "0.2", "--audit-log", str(tmp_path / "audit.jsonl"),
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    conn = await connect(server.url)
    try:
        await ProbeQueue(conn).enqueue("127.0.0.1", time.time(), ports=(9,))

        async def probed() -> str | None:
            assert proc.returncode is None, "the prober exited"
            try:
                text = await asyncio.to_thread(fetch, port)
            except OSError:
                return None  # not serving yet
            s = samples(text)
            done = s.get("stepstone_prober_probes_total{}") == 1
            return text if done and s.get('stepstone_prober_queue_lag{"stream": "jobs"}') == 0 else None

        return str(await until(probed, within=30, what="the probe in the prober's metrics"))
    finally:
        await conn.aclose()
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()


async def scrape_sharded_feed(server: RedisServer, log_dir: Path) -> str:
    """A sharded analyzer (2 shards on one Redis) fed by a Zeek: one handshake written to its
    shard, so that the feed's shard writes have a sample."""
    port = free_port()
    stop = asyncio.Event()
    async with fake_zeek() as zeek:
        config = Config(redis_url=server.url, handshakes=True, zeek_url=zeek.url, log_dir=log_dir,
                        consumer="s1", metrics_port=port, shards=2)
        task = asyncio.create_task(serve(config, stop=stop))
        try:
            await zeek.to_send.put(event_frame("stepstone/handshake",
                                               handshake_event("C1", "198.18.7.9", "198.19.0.7", time.time(),
                                                               90_000)))

            async def written() -> str | None:
                try:
                    text = await asyncio.to_thread(fetch, port)
                except OSError:
                    return None  # not serving yet
                key = 'stepstone_analyzer_zeek_feed_shard_writes_total{"what": "written"}'
                return text if samples(text).get(key) == 1 else None

            return str(await until(written, what="the handshake in the sharded feed's writes"))
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 20) == 0


def responder_exposition() -> str:
    """The responder's registry as `stepstone-responder run` builds it with --banners and on
    shards (its endpoint needs root, nftables and a namespace: that one is scraped for real in
    tests/test_responder.py)."""
    registry = registry_for(Sink(None, "stepstone:handshakes"), Banners({22: b"SSH-2.0-OpenSSH_9.2\r\n"}))
    appender = shards.Appender({0: None, 1: None}, shards.layout("stepstone:", 2, "redis://127.0.0.1:1/0"))
    registry.register(shards.AppenderMetrics(appender, "stepstone_responder"))  # type: ignore[arg-type]
    return generate_latest(registry).decode()


# -- the tests ------------------------------------------------------------------------------------


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def test_dashboard_is_grafana_json_with_the_panels() -> None:
    dash = load()
    assert dash["schemaVersion"] >= 36 and dash["uid"] == "stepstone"
    (var,) = dash["templating"]["list"]
    assert (var["name"], var["type"], var["query"]) == ("DS_PROMETHEUS", "datasource", "prometheus")
    panels = dash["panels"]
    assert {p["title"] for p in panels} == PANELS
    assert len({p["id"] for p in panels}) == len(panels)
    cells = set()
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24  # Grafana's grid is 24 wide
        here = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & here, f"{p['title']} overlaps another panel"
        cells |= here
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs) and all(t["datasource"] == p["datasource"] for t in p["targets"])
    latency = " ".join(dashboard_exprs(dash)["SYN-to-verdict latency"])
    assert "histogram_quantile(0.5," in latency and "histogram_quantile(0.95," in latency


def test_metric_names_of_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate(a_bucket{kind="x",le!="+Inf"}'
                        '[$__rate_interval])))') == {"a_bucket"}
    assert metric_names("sum(rate(a_sum[5m])) / on(job) group_left(instance) sum(rate(a_count[5m] "
                        "offset 1h)) > bool 1e3") == {"a_sum", "a_count"}
    assert metric_names('max without (stream) (b) or label_replace(c, "d", "$1", "e", "(f)")') == {"b", "c"}
    assert metric_names("sum by (kind) (rate(x:y_total[1m]))") == {"x:y_total"}
    with pytest.raises(ValueError):
        metric_names('{__name__=~"stepstone_.*"}')


def test_a_name_counts_only_with_its_types_suffix() -> None:
    exported = Exported()
    exported.add(responder_exposition())
    exported.add("# HELP h_seconds x\n# TYPE h_seconds histogram\n"
                 "# HELP c x\n# TYPE c counter\n# HELP g x\n# TYPE g gauge\n")  # no samples yet
    ok = {"stepstone_responder_handshakes_total", "stepstone_responder_backlog", "h_seconds_bucket",
          "h_seconds_sum", "h_seconds_count", "c_total", "g"}
    assert exported.missing(ok) == set()
    bad = {"stepstone_responder_handshakes", "stepstone_responder_backlog_total", "h_seconds",
           "h_seconds_total", "c", "c_bucket", "g_total", "g_count", "nobody_exports_this"}
    assert exported.missing(bad) == bad


def test_verdict_kind() -> None:
    assert verdict_kind({"relay": True, "relay_confident": True, "kind": "forwarding"}) == "forwarding"
    assert verdict_kind({"relay": True, "relay_confident": False, "kind": "shared"}) == "shared"
    assert verdict_kind({"relay": True, "kind": "bogus"}) == "none"
    assert verdict_kind({"relay": False}) == "none"
    assert set(VERDICT_KINDS) == {"forwarding", "terminating", "shared", "none"}


async def test_every_dashboard_metric_is_exported(redis_server: RedisServer, tmp_path: Path) -> None:
    analyzer = await scrape_analyzer(redis_server, tmp_path / "logs")
    client = aioredis.from_url(redis_server.url)
    await client.flushall()  # the prober starts on an empty Redis
    prober = await scrape_prober(redis_server, tmp_path)
    await client.flushall()
    await client.aclose()
    feed = await scrape_sharded_feed(redis_server, tmp_path / "sharded")
    exported = Exported()
    for text in (analyzer, prober, feed, responder_exposition()):
        exported.add(text)
    dash = load()
    assert dashboard_problems(dash, exported) == []

    # The histograms the latency panels read have real samples, and the verdict has its kind.
    a, p = samples(analyzer), samples(prober)
    assert a['stepstone_analyzer_verdict_latency_seconds_count{}'] == 1
    assert a['stepstone_analyzer_verdicts_by_kind_total{"kind": "forwarding"}'] == 1
    assert a['stepstone_analyzer_verdicts_by_kind_total{"kind": "none"}'] == 0  # shown from the start
    assert p["stepstone_prober_probe_duration_seconds_count{}"] == 1
    assert 0 < p["stepstone_prober_probe_duration_seconds_sum{}"] < 5
    # One handshake, measured (not only counted), one verdict line: its source's first.
    assert a["stepstone_analyzer_handshakes_sampled_total{}"] == 1
    assert a["stepstone_analyzer_handshakes_counted_total{}"] == 0
    assert a['stepstone_analyzer_verdict_lines_total{"change": "first"}'] == 1
    assert a['stepstone_analyzer_verdict_lines_total{"change": "refresh"}'] == 0

    # And the check fails on a name nobody exports, wherever it sits.
    bad = load()
    bad["panels"][3]["targets"][0]["expr"] = "sum(rate(stepstone_prober_dead_letter_total[5m]))"
    bad["panels"].append({"title": "row", "panels": [{"title": "inner", "targets": [
        {"expr": "stepstone_analyzer_verdict_latency_seconds"}]}]})
    assert dashboard_problems(bad, exported) == [
        f"{bad['panels'][3]['title']}: stepstone_prober_dead_letter_total is exported by no service",
        "inner: stepstone_analyzer_verdict_latency_seconds is exported by no service",
    ]


def test_prober_metrics_port_in_use_is_one_line(redis_server: RedisServer, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "prober.cli", "run", "--redis", redis_server.url, "--metrics-port",
             str(port), "--audit-log", str(tmp_path / "audit.jsonl")],
            cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("stepstone-prober: --metrics-port: cannot serve on 127.0.0.1:")
    assert len(proc.stderr.splitlines()) == 1
