"""Scale, simulated: N lightweight nodes register with one controller through one Mosquitto and
take a staged rollout.

A simulated node is a paho MQTT client speaking the real fleet protocol (retained status with
labels, desired state, outbox-style telemetry batches with a deployment report, acks) that
downloads the bundle from the controller over HTTP and checks its sha256, but runs no model.
The nodes are spread over ``--procs`` processes, each driving its clients from one selector
loop (paho's external-loop API), so a thousand clients cost a few processes, not a thousand.
The controller is the real one, run as ``edgeslim fleet controller`` in its own process so its
memory can be read from /proc (VmHWM = peak resident set).

    .venv/bin/python bench/fleet_scale.py --nodes 1000 --procs 4 \
        --out bench/results/fleet_scale.json

Prints a JSON summary and a markdown row for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import queue
import selectors
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


# ---------------------------------------------------------------------- simulated nodes
def sim_worker(ids: list[str], broker_url: str, controller: str, ready: mp.Queue, stop: mp.Event):
    import paho.mqtt.client as mqtt

    from edgeslim.fleet.protocol import BrokerURL, Desired, Status, decode, encode, topic

    url = BrokerURL.parse(broker_url)
    sel = selectors.DefaultSelector()
    done: queue.SimpleQueue[tuple[str, Desired, str, str]] = queue.SimpleQueue()
    http = httpx.Client(timeout=60)
    pool = ThreadPoolExecutor(8)
    model: dict[str, dict | None] = dict.fromkeys(ids)
    seq: dict[str, int] = dict.fromkeys(ids, 0)
    clients: dict[str, mqtt.Client] = {}

    def status(node: str) -> bytes:
        m = model[node]
        labels = {"device_class": "sim", "cores": "1", "memory_mb": "256",
                  "rack": f"r{int(node.split('-')[1]) % 10}"}  # fmt: skip
        return encode(Status(id=node, state="serving" if m else "empty",
                             health="ok" if m else "down", labels=labels, model=None,
                             http="", ts=time.time()).to_dict() | {"model": m})  # fmt: skip

    def install(node: str, d: Desired) -> None:
        try:
            data = http.get(f"{controller}/bundles/{d.sha256}").content
            outcome = "installed" if hashlib.sha256(data).hexdigest() == d.sha256 else "refused"
            reason = "" if outcome == "installed" else "sha256 mismatch"
        except httpx.HTTPError as exc:
            outcome, reason = "failed", str(exc)
        done.put((node, d, outcome, reason))

    def on_message(client, userdata, msg):
        node = userdata
        if msg.topic.endswith("/desired") and msg.payload:
            d = Desired.from_dict(decode(msg.payload))
            if model[node] and model[node]["bundle"] == d.sha256:
                done.put((node, d, "already", ""))
            else:
                pool.submit(install, node, d)

    def on_connect(client, userdata, flags, rc, props):
        node = userdata
        client.subscribe([(topic("desired", node), 1), (topic("ack", node), 1)])
        client.publish(topic("status", node), status(node), qos=1, retain=True)

    for node in ids:
        c = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=node,
                        protocol=mqtt.MQTTv5, userdata=node)  # fmt: skip
        c.username_pw_set(url.username, url.password)
        c.will_set(topic("status", node), encode({"id": node, "state": "offline"}), 1, True)
        c.on_connect, c.on_message = on_connect, on_message
        c.on_socket_open = lambda cl, ud, sock: sel.register(sock, selectors.EVENT_READ, cl)
        c.on_socket_close = lambda cl, ud, sock: sel.unregister(sock)
        c.on_socket_register_write = lambda cl, ud, sock: sel.modify(
            sock, selectors.EVENT_READ | selectors.EVENT_WRITE, cl
        )
        c.on_socket_unregister_write = lambda cl, ud, sock: sel.modify(
            sock, selectors.EVENT_READ, cl
        )
        c.connect(url.host, url.port, keepalive=60)
        clients[node] = c
    ready.put(len(clients))
    last_misc = last_beat = time.monotonic()
    while not stop.is_set():
        for key, mask in sel.select(timeout=0.05):
            cl = key.data
            if mask & selectors.EVENT_READ:
                cl.loop_read()
            if mask & selectors.EVENT_WRITE:
                cl.loop_write()
        while True:  # finished installs: report (outbox-style batch) and update the status
            try:
                node, d, outcome, reason = done.get_nowait()
            except queue.Empty:
                break
            if outcome in ("installed", "already"):
                model[node] = {
                    "name": d.name,
                    "version": "",
                    "sha256": d.sha256,
                    "bundle": d.sha256,
                }
            seq[node] += 1
            rec = {"id": f"{node}-{seq[node]}", "seq": seq[node], "kind": "report",
                   "ts": time.time(), "body": {"deployment": d.deployment, "bundle": d.sha256,
                                               "rollback": d.rollback, "outcome": outcome,
                                               "reason": reason}}  # fmt: skip
            c = clients[node]
            c.publish(topic("telemetry", node), encode({"v": 1, "node": node, "records": [rec]}), 1)
            c.publish(topic("status", node), status(node), qos=1, retain=True)
        now = time.monotonic()
        if now - last_misc > 1.0:
            for c in clients.values():
                c.loop_misc()
            last_misc = now
        if now - last_beat > 10.0:  # heartbeat
            for node, c in clients.items():
                c.publish(topic("status", node), status(node), qos=1, retain=True)
            last_beat = now
    for c in clients.values():
        c.disconnect()
        c.loop_write()
    pool.shutdown(wait=False)


# ---------------------------------------------------------------------- measurement
def proc_mem_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmHWM", "VmRSS")):
            k, v = line.split(":")
            out[k] = int(v.split()[0])
    return out


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_bundle(path: Path, key: Path, version: str) -> Path:
    from edgeslim.bundle import write_bundle

    onnx = (Path(__file__).resolve().parents[1] / "src/edgeslim/fleet/reference.onnx").read_bytes()
    manifest = {"name": "reference", "version": version, "task": "generic",
                "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 64]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 10]}]}  # fmt: skip
    return write_bundle(path, model_onnx=onnx, manifest=manifest, sign_key=key)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--canary", type=float, default=0.05)
    ap.add_argument("--parallel", type=int, default=200)
    ap.add_argument("--soak", type=float, default=1.0)
    ap.add_argument("--install-timeout", type=float, default=120.0)
    ap.add_argument("--out", type=Path, default=None, help="Also write the JSON summary here.")
    args = ap.parse_args()

    from edgeslim.bundle import generate_keypair
    from edgeslim.fleet.broker import Broker, free_port

    work = Path(tempfile.mkdtemp(prefix="edgeslim-fleet-scale-"))
    key, pub = generate_keypair(work / "keys")
    bundles = [make_bundle(work / f"v{i}.eslim", Path(key), str(i)) for i in (1, 2)]
    broker = Broker({"controller": "c-" + os.urandom(4).hex(), "node": "n-" + os.urandom(4).hex()},
                    workdir=work / "broker").start()  # fmt: skip
    port = free_port()
    ctl = subprocess.Popen(
        [sys.executable, "-m", "edgeslim.cli", "fleet", "controller", "--broker",
         broker.url("controller"), "--http-port", str(port), "--data", str(work / "ctl"),
         "--public-key", str(pub), "--offline-after", "60", "--log-level", "warning"],
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    api = httpx.Client(base_url=url, timeout=60)
    for _ in range(300):
        try:
            if api.get("/healthz").json()["broker"] == "connected":
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    idle = proc_mem_kb(ctl.pid)

    ids = [f"sim-{i:05d}" for i in range(args.nodes)]
    ready: mp.Queue = mp.Queue()
    stop = mp.Event()
    t0 = time.monotonic()
    workers = [
        mp.Process(
            target=sim_worker, args=(ids[k :: args.procs], broker.url("node"), url, ready, stop)
        )
        for k in range(args.procs)
    ]
    for w in workers:
        w.start()
    for _ in workers:
        ready.get(timeout=300)
    while sum(n["online"] for n in api.get("/nodes").json()) < args.nodes:
        time.sleep(0.25)
    t_register = time.monotonic() - t0

    results = {}
    for i, b in enumerate(bundles, 1):
        sha = api.post("/bundles", content=b.read_bytes()).json()["sha256"]
        params = {"canary": args.canary, "soak_s": args.soak, "parallel": args.parallel,
                  "install_timeout_s": args.install_timeout}  # fmt: skip
        t1 = time.monotonic()
        dep = api.post("/deployments", json={"bundle": sha, "params": params}).json()["id"]
        while (row := api.get(f"/deployments/{dep}").json())["state"] not in (
            "succeeded", "rolled_back", "failed"):  # fmt: skip
            time.sleep(0.1)
        installed = sum(t["state"] == "installed" for t in row["targets"])
        seconds = round(time.monotonic() - t1, 2)
        results[f"v{i}"] = {"state": row["state"], "seconds": seconds, "installed": installed}
        if row["state"] != "succeeded":
            results[f"v{i}"]["reason"] = row["reason"]
    time.sleep(1.0)
    serving = sum(n["bundle_sha"] == sha for n in api.get("/nodes").json())
    mem = proc_mem_kb(ctl.pid)
    summary = {
        "nodes": args.nodes, "procs": args.procs, "canary": args.canary,
        "parallel": args.parallel, "soak_s": args.soak,
        "register_s": round(t_register, 2), "rollouts": results,
        "serving_new_sha": serving,
        "controller_peak_rss_mb": round(mem["VmHWM"] / 1024, 1),
        "controller_idle_rss_mb": round(idle["VmRSS"] / 1024, 1),
        "controller_cpu_s": round(proc_cpu_s(ctl.pid), 1),
        "broker_rss_mb": round(proc_mem_kb(broker.pid)["VmRSS"] / 1024, 1),
    }  # fmt: skip
    stop.set()
    for w in workers:
        w.join(30)
    ctl.terminate()
    ctl.wait(30)
    broker.close()
    summary["loadavg_1min"] = os.getloadavg()[0]
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2) + "\n")
    r2 = results["v2"]
    print(f"| {args.nodes} | {args.procs} | {summary['register_s']} s | {r2['seconds']} s "
          f"({r2['state']}, {serving}/{args.nodes} on new sha) | "
          f"{summary['controller_peak_rss_mb']} MB | {summary['controller_cpu_s']} s | "
          f"{summary['broker_rss_mb']} MB |")  # fmt: skip


if __name__ == "__main__":
    main()
