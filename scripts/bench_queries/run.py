"""The measurements of scripts/bench-queries (see there), also run by the `queries` scenario of
the bench crate (bench/src/queries.rs). Prints one line per measurement; with --json, a last line
holding every measurement as one JSON object, for the scenario to judge."""
import argparse
import datetime as dt
import json
import os
import socket
import statistics
import subprocess
import time

import pymongo
import requests
from bson.raw_bson import RawBSONDocument

BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
UTC = dt.timezone.utc


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def date(ms):
    return dt.datetime.fromtimestamp(ms / 1000, UTC)


def iso(ms):
    return date(ms).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def start(args, db):
    http = free_port()
    log = open(os.path.join(args.state, "sensorhub.log"), "w")
    env = dict(os.environ, MONGODB_URI=args.mongodb, REDIS_URL=args.redis, MONGODB_DATABASE=db,
               RUST_LOG="warn")
    proc = subprocess.Popen(
        [args.binary, "serve", "--http-listen", f"127.0.0.1:{http}",
         "--mqtt-listen", f"127.0.0.1:{free_port()}", "--mqtt5-listen", f"127.0.0.1:{free_port()}",
         "--journal-dir", os.path.join(args.state, "journal"), "--redis-prefix", db],
        env=env, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{http}"
    for _ in range(300):
        try:
            requests.get(url + "/health", timeout=1)
            return proc, url
        except requests.RequestException:
            time.sleep(0.1)
    raise SystemExit("sensorhub did not start; see " + log.name)


def insert(col, docs, chunk=20_000):
    for i in range(0, len(docs), chunk):
        col.insert_many(docs[i:i + chunk], ordered=False)


def rate(fn, seconds):
    """Runs fn until `seconds` passed (at least 3 times); returns runs per second."""
    fn()  # warm up
    runs, began = 0, time.perf_counter()
    while runs < 3 or time.perf_counter() - began < seconds:
        fn()
        runs += 1
    return runs / (time.perf_counter() - began)


def bench_aggregate(args, url, col):
    n = 8_640 if args.quick else 86_400
    day = BASE_MS
    insert(col, [{"_id": f"agg|temperature|{day + i * 1000}", "sensor_id": "agg",
                  "kind": "temperature", "value": float(i % 613) / 7,
                  "timestamp": date(day + i * 1000)} for i in range(n)])
    start_ms, end_ms = day, day + n * 1000 - 1
    pipeline = [
        {"$match": {"timestamp": {"$gte": date(start_ms), "$lte": date(end_ms)},
                    "sensor_id": "agg"}},
        {"$sort": {"timestamp": 1}},
        {"$group": {"_id": {"t": {"$dateTrunc": {"date": "$timestamp", "unit": "minute",
                                                 "binSize": 1, "timezone": "UTC"}},
                            "k": "$kind"},
                    "min": {"$min": "$value"}, "max": {"$max": "$value"},
                    "avg": {"$avg": "$value"}, "count": {"$sum": 1},
                    "first": {"$first": "$value"}, "last": {"$last": "$value"}}},
        {"$sort": {"_id.t": 1, "_id.k": 1}},
    ]
    path = (f"{url}/readings/aggregate?sensor_id=agg&interval=1m&start={iso(start_ms)}"
            f"&end={iso(end_ms)}&fn=min,max,avg,count,first,last")
    session = requests.Session()
    buckets = len(session.get(path).json()["buckets"])
    direct = rate(lambda: list(col.aggregate(pipeline, allowDiskUse=True)), args.seconds)
    http = rate(lambda: session.get(path).json(), args.seconds)
    print(f"aggregate  {n} readings -> {buckets} 1-minute buckets: /readings/aggregate "
          f"{http:.2f}/s, pipeline straight to MongoDB {direct:.2f}/s, ratio {http / direct:.2f} "
          f"(goal >= 0.8)", flush=True)
    return {"readings": n, "buckets": buckets, "http_per_s": http, "direct_per_s": direct}


def bench_export(args, url, col, pid):
    n = 100_000 if args.quick else 1_000_000
    insert(col, [{"_id": f"bulk-{i % 1000}|temperature|{BASE_MS + 86_400_000 + i}",
                  "sensor_id": f"bulk-{i % 1000}", "kind": "temperature", "value": float(i),
                  "timestamp": date(BASE_MS + 86_400_000 + i)} for i in range(n)])
    start_ms, end_ms = BASE_MS + 86_400_000, BASE_MS + 86_400_000 + n - 1
    raw = col.with_options(codec_options=col.codec_options.with_options(
        document_class=RawBSONDocument))
    began = time.perf_counter()
    rows = sum(1 for _ in raw.find(
        {"timestamp": {"$gte": date(start_ms), "$lte": date(end_ms)}}, {"_id": 0},
        sort=[("timestamp", 1), ("sensor_id", 1), ("kind", 1)], batch_size=2000))
    direct = rows / (time.perf_counter() - began)
    before = peak = rss_kib(pid)
    began = time.perf_counter()
    lines, sampled = 0, time.perf_counter()
    with requests.get(f"{url}/readings/export?format=csv&start={iso(start_ms)}&end={iso(end_ms)}",
                      stream=True) as r:
        for chunk in r.iter_content(1 << 16):
            lines += chunk.count(b"\n")
            if time.perf_counter() - sampled > 0.1:
                peak, sampled = max(peak, rss_kib(pid)), time.perf_counter()
    http = (lines - 1) / (time.perf_counter() - began)
    peak = max(peak, rss_kib(pid))
    print(f"export     {lines - 1} rows: /readings/export {http:,.0f} rows/s, raw cursor read "
          f"{direct:,.0f} rows/s, ratio {http / direct:.2f} (goal >= 0.8); RSS {before // 1024} -> "
          f"peak {peak // 1024} MiB, growth {(peak - before) / 1024:.1f} MiB (goal < 50)",
          flush=True)
    return {"rows": lines - 1, "expected_rows": rows, "http_rows_per_s": http,
            "direct_rows_per_s": direct, "rss_before_bytes": before * 1024,
            "rss_peak_bytes": peak * 1024}


def bench_sensors(args, url, db):
    n = 10_000 if args.quick else 100_000
    summaries = db["sensor_readings.sensors"]
    docs = []
    for i in range(n):
        t = date(BASE_MS + i)
        docs.append({"_id": f"sensor-{i:06d}", "first_seen": t, "last_seen": t, "count": 10,
                     "kinds": {"temperature": {"first": t, "count": 10,
                                               "last": {"t": t, "v": float(i)}}}})
    insert(summaries, docs)
    session = requests.Session()
    # Summaries written straight into MongoDB, as another instance would: sensorhub lists them
    # within its sensor_list_refresh_secs (10 s by default). Measured once all are listed.
    last = f"sensor-{n - 1:06d}"
    deadline = time.monotonic() + 120
    while [s["sensor_id"] for s in session.get(
            f"{url}/sensors?prefix={last}").json()["sensors"]] != [last]:
        if time.monotonic() > deadline:
            raise SystemExit(f"{last} not on /sensors after 120 s")
        time.sleep(0.2)
    full = session.get(url + "/sensors").json()
    if len(full["sensors"]) != 1000 or not full["has_more"]:
        raise SystemExit(f"/sensors answered {len(full['sensors'])} sensors, not a full page")
    measured = []
    for path in ["/sensors", "/latest", "/sensors?limit=100", "/sensors?kind=temperature",
                 "/latest?prefix=sensor-0421"]:
        session.get(url + path).raise_for_status()
        times = []
        for _ in range(50 if args.quick else 200):
            began = time.perf_counter()
            r = session.get(url + path)
            r.content
            times.append((time.perf_counter() - began) * 1000)
        times.sort()
        p99 = times[int(len(times) * 0.99) - 1]
        print(f"latency    {path} with {n} sensors: p50 {statistics.median(times):.1f} ms, "
              f"p99 {p99:.1f} ms (goal < 50), {len(r.content) // 1024} KiB per answer",
              flush=True)
        measured.append({"path": path, "sensors": n, "requests": len(times),
                         "p50_ms": statistics.median(times), "p99_ms": p99,
                         "bytes": len(r.content)})
    return measured


def bench_summary_cost(args, db):
    """One writer batch: insert_many of its readings, then the summary's update command."""
    readings = db["cost"]
    summaries = db["cost.sensors"]
    runs, sensors, per = (3, 1000, 3) if args.quick else (10, 1000, 3)
    insert_s = update_s = 0.0
    for run in range(runs):
        at = BASE_MS + run * 10_000
        docs = [{"_id": f"c{s}|temperature|{at + k}", "sensor_id": f"c{s}", "kind": "temperature",
                 "value": 1.0, "timestamp": date(at + k)} for s in range(sensors) for k in range(per)]
        began = time.perf_counter()
        readings.insert_many(docs, ordered=False)
        insert_s += time.perf_counter() - began
        updates = [{"q": {"_id": f"c{s}"}, "u": {
            "$min": {"kinds.temperature.first": date(at), "first_seen": date(at)},
            "$max": {"kinds.temperature.last": {"t": date(at + per - 1), "v": 1.0},
                     "last_seen": date(at + per - 1)},
            "$inc": {"kinds.temperature.count": per, "count": per}}, "upsert": True}
            for s in range(sensors)]
        began = time.perf_counter()
        db.command({"update": summaries.name, "updates": updates, "ordered": False})
        update_s += time.perf_counter() - began
    print(f"summary    batch of {sensors * per} readings over {sensors} sensors: insert_many "
          f"{insert_s / runs * 1000:.0f} ms, summary update {update_s / runs * 1000:.0f} ms "
          f"(+{update_s / insert_s * 100:.0f}% MongoDB time per batch)", flush=True)
    return {"readings": sensors * per, "sensors": sensors, "insert_ms": insert_s / runs * 1000,
            "update_ms": update_s / runs * 1000}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--binary", help="the sensorhub to start (unless --url)")
    parser.add_argument("--url", help="a running sensorhub, with --pid and --database")
    parser.add_argument("--pid", type=int, help="its process id, for its RSS")
    parser.add_argument("--database", help="its MongoDB database, empty")
    parser.add_argument("--mongodb", required=True)
    parser.add_argument("--redis", help="Redis, for the sensorhub started here")
    parser.add_argument("--state", help="scratch directory of the sensorhub started here")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--json", action="store_true", help="end with one JSON line")
    args = parser.parse_args()
    if args.quick:
        args.seconds = 3.0
    if not args.url and not (args.binary and args.redis and args.state):
        parser.error("give either --url, --pid and --database, or --binary, --redis and --state")
    name = args.database or f"bench_queries_{os.getpid()}"
    client = pymongo.MongoClient(args.mongodb)
    db = client[name]
    proc = None
    if args.url:
        url, pid = args.url, args.pid
    else:
        proc, url = start(args, name)
        pid = proc.pid
    try:
        col = db["sensor_readings"]
        measured = {
            "aggregate": bench_aggregate(args, url, col),
            "export": bench_export(args, url, col, pid),
            "latency": bench_sensors(args, url, db),
            "summary": bench_summary_cost(args, db),
        }
        if args.json:
            print(json.dumps(measured), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()
            client.drop_database(name)


if __name__ == "__main__":
    main()
