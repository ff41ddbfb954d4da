"""A Sparkplug B edge node and a late host application for sensorhub's tests (tests/api/sparkplug.rs).

The payloads are encoded and decoded by pysparkplug, an independent Python implementation of
Sparkplug B; the MQTT session is paho-mqtt's (pysparkplug's own transport), driven step by step
so that a test can lose a message on purpose. Every scenario prints one JSON line of what it
did and observed; the Rust test checks sensorhub's side.

    python3 edge.py --port P --group G --node N SCENARIO [options]

Scenarios:
  bulk N        NBIRTH + DBIRTH, then N DDATA of aliases only, all QoS 1, waits for the acks
  birth         NBIRTH + DBIRTH, then disconnects without an NDEATH (a restart follows)
  resume N      reconnects and goes on with the session of `birth`: N DDATA, seq 2 onwards
  gap           births, data, a lost DBIRTH that swaps two aliases, data with the new aliases;
                answers the rebirth request and counts the requests
  deaths        births with bdSeq 5, an NDEATH with bdSeq 4 (stale), then one with bdSeq 5
  host          a late host application: reads $sparkplug/certificates/# and prints the births
"""

import argparse
import json
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pysparkplug as sp

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z: the data's timestamps are T0 + i
DEVICE = "plc"


def node_metrics(bd_seq):
    return (
        sp.Metric(timestamp=T0, name="bdSeq", datatype=sp.DataType.INT64, value=bd_seq),
        sp.Metric(timestamp=T0, name="Node Control/Rebirth", datatype=sp.DataType.BOOLEAN, value=False, alias=1),
        sp.Metric(timestamp=T0, name="Uptime", datatype=sp.DataType.UINT32, value=7, alias=2),
    )


# Device metrics: (name, datatype, alias). Values of data message i come from value(name, i).
DEVICE_METRICS = (
    ("Line/Temp", sp.DataType.INT16, 10),
    ("Line/Pressure", sp.DataType.INT8, 11),
    ("Counter", sp.DataType.INT32, 12),
    ("Level", sp.DataType.DOUBLE, 13),
    ("Running", sp.DataType.BOOLEAN, 14),
)


def value(name, i):
    if name == "Line/Temp":
        return -1000 + (i % 2000)  # Int16, negative half the time
    if name == "Line/Pressure":
        return -128 + (i % 256)  # the whole Int8 range
    if name == "Counter":
        return -2_000_000_000 + i  # Int32, negative
    if name == "Level":
        return i / 4
    return i % 2 == 0


def device_birth(seq, aliases):
    metrics = tuple(
        sp.Metric(timestamp=T0, name=name, datatype=dt, value=value(name, 0), alias=aliases[name])
        for name, dt, _ in DEVICE_METRICS
    )
    return sp.DBirth(timestamp=T0, seq=seq, metrics=metrics)


def device_data(seq, i, aliases):
    metrics = tuple(
        sp.Metric(timestamp=T0 + i, name=None, datatype=dt, value=value(name, i), alias=aliases[name])
        for name, dt, _ in DEVICE_METRICS
    )
    return sp.DData(timestamp=T0 + i, seq=seq, metrics=metrics)


ALIASES = {name: alias for name, _, alias in DEVICE_METRICS}


class Edge:
    def __init__(self, args, bd_seq=0):
        self.args = args
        self.bd_seq = bd_seq
        self.group, self.node = args.group, args.node
        self.client = mqtt.Client(client_id=f"edge-{self.node}", clean_session=True)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.acked = set()
        self.sent = 0
        self.commands = []
        self.lock = threading.Condition()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.connected = threading.Event()
        self.client.on_connect = lambda c, u, f, rc: self.connected.set()

    def topic(self, kind, device=None):
        t = f"spBv1.0/{self.group}/{kind}/{self.node}"
        return f"{t}/{device}" if device else t

    def _on_publish(self, client, userdata, mid):
        with self.lock:
            self.acked.add(mid)
            self.lock.notify_all()

    def _on_message(self, client, userdata, message):
        payload = sp.NCmd.decode(message.payload)
        with self.lock:
            self.commands.append(
                {m.name: m.value for m in payload.metrics if m.name is not None}
            )
            self.lock.notify_all()

    def connect(self, will=True):
        if will:
            death = sp.NDeath(timestamp=T0, bd_seq_metric=sp.Metric(
                timestamp=T0, name="bdSeq", datatype=sp.DataType.INT64, value=self.bd_seq))
            self.client.will_set(self.topic("NDEATH"), death.encode(), qos=1)
        self.client.connect("127.0.0.1", self.args.port, keepalive=30)
        self.client.loop_start()
        if not self.connected.wait(10):
            sys.exit("edge: no CONNACK")
        self.client.subscribe(self.topic("NCMD"), qos=1)

    def publish(self, topic, payload, include_dtypes=False):
        info = self.client.publish(topic, payload.encode(include_dtypes=include_dtypes), qos=1)
        self.sent += 1
        return info.mid

    def births(self, seq=0, aliases=ALIASES):
        self.publish(self.topic("NBIRTH"), sp.NBirth(timestamp=T0, seq=seq, metrics=node_metrics(self.bd_seq)), True)
        self.publish(self.topic("DBIRTH", DEVICE), device_birth(seq + 1, aliases), True)

    def wait_acked(self):
        deadline = time.time() + 120
        with self.lock:
            while len(self.acked) < self.sent:
                if time.time() > deadline:
                    sys.exit(f"edge: only {len(self.acked)} of {self.sent} acked")
                self.lock.wait(1)

    def wait_commands(self, n, seconds):
        deadline = time.time() + seconds
        with self.lock:
            while len(self.commands) < n and time.time() < deadline:
                self.lock.wait(0.1)
            return list(self.commands)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def bulk(args):
    edge = Edge(args)
    edge.connect()
    edge.births()
    for i in range(1, args.count + 1):
        edge.publish(edge.topic("DDATA", DEVICE), device_data((i + 1) % 256, i, ALIASES))
    edge.wait_acked()
    return {"published": edge.sent}


def birth(args):
    edge = Edge(args)
    edge.connect(will=False)
    edge.births()
    edge.wait_acked()
    edge.close()
    return {"published": edge.sent}


def resume(args):
    edge = Edge(args)
    edge.connect(will=False)
    for i in range(1, args.count + 1):
        edge.publish(edge.topic("DDATA", DEVICE), device_data((i + 1) % 256, i, ALIASES))
    edge.wait_acked()
    edge.close()
    return {"published": edge.sent}


def gap(args):
    edge = Edge(args)
    edge.connect()
    edge.births()  # seq 0, 1
    for i in range(1, 11):  # seq 2..11
        edge.publish(edge.topic("DDATA", DEVICE), device_data(i + 1, i, ALIASES))
    # A DBIRTH (seq 12) that swaps the aliases of Temp and Pressure is lost on the way...
    swapped = dict(ALIASES, **{"Line/Temp": 11, "Line/Pressure": 10})
    # ...and the data after it uses the new aliases: stored, it would put temperatures under
    # Pressure.
    for i in range(11, 21):  # seq 13..22
        edge.publish(edge.topic("DDATA", DEVICE), device_data(i + 2, i, swapped))
    edge.wait_acked()
    commands = edge.wait_commands(1, 15)
    if commands:
        # The rebirth: a new session with the swapped aliases, then data with them.
        edge.births(0, swapped)
        for i in range(21, 31):  # seq 2..11
            edge.publish(edge.topic("DDATA", DEVICE), device_data(i - 19, i, swapped))
        edge.wait_acked()
    # Any further request would come within a few seconds of the data after the gap.
    time.sleep(3)
    return {"published": edge.sent, "commands": edge.commands}


def deaths(args):
    edge = Edge(args, bd_seq=5)
    edge.connect(will=False)
    edge.births()
    edge.wait_acked()
    stale = sp.NDeath(timestamp=T0, bd_seq_metric=sp.Metric(
        timestamp=T0, name="bdSeq", datatype=sp.DataType.INT64, value=4))
    edge.publish(edge.topic("NDEATH"), stale)
    edge.wait_acked()
    print(json.dumps({"step": "stale death sent"}), flush=True)
    sys.stdin.readline()  # the test checks the node is still online, then lets us go on
    current = sp.NDeath(timestamp=T0, bd_seq_metric=sp.Metric(
        timestamp=T0, name="bdSeq", datatype=sp.DataType.INT64, value=5))
    edge.publish(edge.topic("NDEATH"), current)
    edge.wait_acked()
    edge.close()
    return {"published": edge.sent}


def host(args):
    births = {}
    done = threading.Event()

    def on_message(client, userdata, message):
        kind = message.topic.split("/")[4]
        decoded = (sp.NBirth if kind == "NBIRTH" else sp.DBirth).decode(message.payload)
        births[message.topic] = {
            "retain": bool(message.retain),
            "metrics": {m.name: m.alias for m in decoded.metrics},
        }
        if len(births) >= 2:
            done.set()

    client = mqtt.Client(client_id="late-host", clean_session=True)
    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc: c.subscribe("$sparkplug/certificates/#", qos=1)
    client.connect("127.0.0.1", args.port, keepalive=30)
    client.loop_start()
    done.wait(10)
    client.loop_stop()
    client.disconnect()
    return {"births": births}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--group", default="plant")
    parser.add_argument("--node", default="edge1")
    parser.add_argument("scenario", choices=["bulk", "birth", "resume", "gap", "deaths", "host"])
    parser.add_argument("count", type=int, nargs="?", default=0)
    args = parser.parse_args()
    result = globals()[args.scenario](args)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
