"""Load test of the web demo: many concurrent clients against a bounded queue, on 127.0.0.1 only.

    python scripts/app_load_test.py --model DIR [--text-encoder DIR] [--clients 20] [--requests 50]

Starts `python -m hart.app` as a separate process (so its memory is measured alone) with `--max-queue`,
then `--clients` gradio_client clients submit generation requests until `--requests` have completed;
a request refused with gradio's "Queue is full" is counted and retried after a short pause. It
checks that:

* every request either completes (with its images) or gets the queue-full message, nothing else;
* no exception reaches the server log unhandled (no traceback, no ERROR line);
* the server's resident memory after the last request is within `--rss-tolerance` (10%) of that
  after the 10th.

The last line printed is a one-line JSON summary; the exit status is 0 when every check passes.
Without `--model` it uses the tiny test fixture (`$HART_FIXTURES` or tests/fixtures/official-tiny).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # run from a checkout without installing

from hart import limits  # noqa: E402
UNHANDLED_MARKERS = ("Traceback (most recent call last)", " ERROR ", "Exception in ASGI", "Task exception was never")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fixture = Path(os.environ.get("HART_FIXTURES", REPO_ROOT / "tests" / "fixtures" / "official-tiny")) / "ckpt"
    p.add_argument("--model", default=str(fixture), help="model folder (default: the tiny test fixture)")
    p.add_argument("--text-encoder", help="text encoder folder (default: MODEL/text_encoder when it exists)")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients (default 20)")
    p.add_argument("--requests", type=int, default=50, help="completed requests to reach (default 50)")
    p.add_argument("--warmup", type=int, default=10,
                   help="completed requests before the first memory sample (default 10)")
    p.add_argument("--max-queue", type=int, default=8, help="the server's queue bound (default 8)")
    p.add_argument("--rss-tolerance", type=float, default=0.10, help="allowed memory growth (default 0.10)")
    p.add_argument("--timeout", type=float, default=900, help="seconds before giving up (default 900)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the work folder (server log, downloads)")
    return p.parse_args(argv)


def wait_until_up(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(url, timeout=5) as page:
                if page.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the server did not answer on {url} within {timeout:.0f} s")


def main(argv=None) -> int:
    args = parse_args(argv)
    import psutil
    from gradio_client import Client
    from gradio_client.utils import QueueError

    work = Path(tempfile.mkdtemp(prefix="hart-load-"))
    text_encoder = args.text_encoder or (str(Path(args.model) / "text_encoder")
                                        if (Path(args.model) / "text_encoder").is_dir() else None)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = work / "server.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "GRADIO_TEMP_DIR": str(work / "gradio"),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "hart.app", "--model", args.model, "--port", str(port), "--host", "127.0.0.1",
               "--device", "cpu", "--max-queue", str(args.max_queue), "--concurrency", "1", "--max-images", "2"]
    if text_encoder:
        command += ["--text-encoder", text_encoder]
    started = time.monotonic()
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    lock = threading.Lock()
    counts = {"completed": 0, "queue_full": 0, "other_errors": 0, "submitted": 0}
    other_errors, rss = [], {}
    done = threading.Event()
    try:
        wait_until_up(url, server, timeout=300)
        up_s = time.monotonic() - started
        rss["start"] = psutil.Process(server.pid).memory_info().rss

        def client(i: int) -> None:
            rng = random.Random(args.seed * 1000 + i)
            c = Client(url, verbose=False, download_files=str(work / f"client{i}"))
            while not done.is_set():
                with lock:
                    counts["submitted"] += 1
                try:
                    job = c.submit("a red fox in the snow", "", rng.randrange(limits.MAX_SEED + 1), False,
                                   limits.GUIDANCE_SCALE, 0, 1.0, True,
                                   rng.choice([1, 2]), api_name="/generate")
                    preview, gallery, seed, status = job.result(timeout=args.timeout)
                    assert gallery and str(status).startswith("Done"), (gallery, status)
                except QueueError as e:
                    if "Queue is full" not in str(e):
                        raise
                    with lock:
                        counts["queue_full"] += 1
                    time.sleep(rng.uniform(0.5, 1.5))
                    continue
                except Exception as e:  # anything else is a failure of the app
                    with lock:
                        counts["other_errors"] += 1
                        other_errors.append(f"{type(e).__name__}: {e}")
                    continue
                with lock:
                    counts["completed"] += 1
                    n = counts["completed"]
                    if n == args.warmup:
                        rss["after_warmup"] = psutil.Process(server.pid).memory_info().rss
                    if n == args.requests:
                        rss["after_all"] = psutil.Process(server.pid).memory_info().rss
                        done.set()

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        if not done.wait(args.timeout):
            other_errors.append(f"timed out after {args.timeout:.0f} s")
        done.set()
        for t in threads:
            t.join(timeout=args.timeout)
        rss["end"] = psutil.Process(server.pid).memory_info().rss
        with urllib.request.urlopen(url, timeout=30) as page:  # still serving
            still_up = page.status == 200
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    log_text = log_path.read_text(errors="replace")
    if args.keep:
        print(f"work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    unhandled = [line for line in log_text.splitlines() if any(m in line for m in UNHANDLED_MARKERS)]
    growth = None
    if {"after_all", "after_warmup"} <= rss.keys():
        growth = (rss["after_all"] - rss["after_warmup"]) / rss["after_warmup"]
    ok = (not other_errors and not unhandled and still_up and counts["completed"] >= args.requests
          and growth is not None and abs(growth) <= args.rss_tolerance)
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    print(f"server up in {up_s:.1f} s on {url} (max queue {args.max_queue}, concurrency 1)")
    print(f"{args.clients} clients: {counts['completed']} completed, {counts['queue_full']} refused with "
          f"'Queue is full' (retried), {counts['other_errors']} other errors")
    for e in other_errors[:5]:
        print(f"  other error: {e}")
    print(f"unhandled exceptions in the server log: {len(unhandled)}")
    for line in unhandled[:5]:
        print(f"  {line}")
    print(f"server RSS (MiB): {mib}; after {args.requests} vs after {args.warmup} completed: "
          + (f"{growth:+.1%}" if growth is not None else "n/a") + f" (limit +-{args.rss_tolerance:.0%})")
    print(f"total {time.monotonic() - started:.1f} s; {'PASS' if ok else 'FAIL'}")
    print(json.dumps(dict(ok=ok, clients=args.clients, max_queue=args.max_queue, **counts,
                          unhandled=len(unhandled), rss_mib=mib, rss_growth=growth, still_up=still_up)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
