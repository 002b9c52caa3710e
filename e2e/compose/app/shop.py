"""The shop's services and load driver for the docker-compose demo (Python standard library only).

    python shop.py serve   one service of the shop, configured by environment variables:
        SERVICE       its name, returned in every answer (e.g. checkout)
        PORT          where it listens (default 8080; its sidecar's inbound listener forwards here)
        CALLS         the services it calls for every request, through its sidecar's outbound
                      listener, e.g. "payments,inventory"; "payments@0.05" calls payments for 5%
                      of the requests only
        SIDECAR       the sidecar's outbound listener (default http://127.0.0.1:15001); each call
                      names its destination in the Host header, the sidecar routes by it
        FAILURE_RATE  fraction of requests answered 503 at once (default 0)
        LATENCY_MS    uniform delay range before answering, "LO-HI" (default "1-5")
        SLOW          "FRACTION:LO-HI": that fraction of requests waits LO-HI ms instead (a tail)

    python shop.py load    the load driver: requests TARGET (e.g. http://frontend:15006/checkout)
        RATE times a second (default 10) from WORKERS threads (default 4), and prints the count of
        answers by status every 10 seconds.

A service answers 200 with JSON naming itself and the status of each call it made, or 502 when a
call failed after the sidecar's retries (so failures travel up the call chain, as they do in real
systems), or 503 when FAILURE_RATE strikes.
"""

import http.server
import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request


def parse_range(text):
    low, _, high = text.partition("-")
    return float(low), float(high or low)


def parse_calls(text):
    calls = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, share = item.partition("@")
        calls.append((name, float(share) if share else 1.0))
    return calls


def fetch(request):
    """The status of one request (a URL or a urllib Request); 599 when no answer came at all."""
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 599


def call(sidecar, service, path):
    """One call to `service` through the sidecar, which routes by the Host header."""
    return fetch(urllib.request.Request(sidecar + path, headers={"Host": service}))


def serve():
    service = os.environ["SERVICE"]
    port = int(os.environ.get("PORT", "8080"))
    calls = parse_calls(os.environ.get("CALLS", ""))
    sidecar = os.environ.get("SIDECAR", "http://127.0.0.1:15001").rstrip("/")
    failure_rate = float(os.environ.get("FAILURE_RATE", "0"))
    latency = parse_range(os.environ.get("LATENCY_MS", "1-5"))
    slow_share, slow = 0.0, (0.0, 0.0)
    if os.environ.get("SLOW"):
        share, _, span = os.environ["SLOW"].partition(":")
        slow_share, slow = float(share), parse_range(span)

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            low, high = slow if random.random() < slow_share else latency
            time.sleep(random.uniform(low, high) / 1000)
            if random.random() < failure_rate:
                return self.answer(503, {"service": service, "error": "injected failure"})
            results = {}
            for name, share in calls:
                if random.random() < share:
                    results[name] = call(sidecar, name, "/" + service)
            failed = any(status >= 500 for status in results.values())
            self.answer(502 if failed else 200, {"service": service, "calls": results})

        do_POST = do_GET

        def answer(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("0.0.0.0", port), Handler)
    print(f"{service} listening on :{port}, calls {calls or 'nothing'}", flush=True)
    server.serve_forever()


def load():
    target = os.environ["TARGET"]
    rate = float(os.environ.get("RATE", "10"))
    workers = int(os.environ.get("WORKERS", "4"))
    counts = {}
    lock = threading.Lock()

    def worker():
        interval = workers / rate
        while True:
            started = time.monotonic()
            status = fetch(target)
            with lock:
                counts[status] = counts.get(status, 0) + 1
            time.sleep(max(0.0, interval - (time.monotonic() - started)))

    for _ in range(workers):
        threading.Thread(target=worker, daemon=True).start()
    print(f"sending {rate:g} requests/s to {target}", flush=True)
    while True:
        time.sleep(10)
        with lock:
            summary = ", ".join(f"{status}: {n}" for status, n in sorted(counts.items()))
            counts.clear()
        print(f"last 10 s: {summary or 'no answers'}", flush=True)


if __name__ == "__main__":
    commands = {"serve": serve, "load": load}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} serve|load (settings in environment variables)")
    commands[sys.argv[1]]()
