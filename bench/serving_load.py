"""A reward server under concurrent load: ``python -m bench.serving_load [--clients 8]
[--requests 20] [--rows 4]``.

Serves a random Llama-shaped reward model (`rlhf serve reward`, torch, its own process) on
loopback, then ``--clients`` threads each send ``--requests`` score requests of ``--rows``
rows (prompt 64 + answer 64 tokens), in three batching modes: waiting ``--max-wait-ms`` for
other requests, taking only what queued during the last forward, and one request per forward.
Prints a markdown table: requests/s, rows/s, the server's mean batch rows, p50/p95 request
latency. docs/performance.md records a run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _model(out: Path, hidden: int, layers: int) -> str:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=hidden, intermediate_size=hidden * 4,
                                   num_hidden_layers=layers, num_attention_heads=8,
                                   num_key_value_heads=8, max_position_embeddings=256,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2, num_labels=1)
    transformers.set_seed(0)
    model = transformers.LlamaForSequenceClassification(cfg)
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(REPO / "configs/demo/tokenizer").save_pretrained(out)
    return str(out)


def _rollout(rows: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"prompt_ids": rng.integers(3, 17, (rows, 64)),
            "prompt_mask": np.ones((rows, 64), np.int64),
            "response": rng.integers(3, 17, (rows, 64)),
            "sample_mask": np.ones((rows, 64), np.int64)}


def measure(model: str, *, clients: int, requests: int, rows: int, max_wait_ms: float,
            max_batch_rows: int) -> dict[str, float]:
    """Starts `rlhf serve reward` (its own process, torch, one intra-op thread) and loads it
    from ``clients`` threads of this one."""
    import os
    import socket
    import subprocess
    import sys

    from shared.serving import RoleClient

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "-q", "serve", "reward", "--backend", "torch",
         "--model", model, "--port", str(port), "--max-wait-ms", str(max_wait_ms),
         "--max-batch-rows", str(max_batch_rows)],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    latencies: list[float] = []
    try:
        client = RoleClient("reward", f"http://127.0.0.1:{port}", timeout_s=600)
        client.wait_until_ready()
        client.call("score", **_rollout(rows, 0))  # warm-up (first forward)
        before = client.health()["stats"]

        def work(index: int) -> None:
            for r in range(requests):
                start = time.perf_counter()
                client.call("score", expect={"scores": (rows,)}, **_rollout(rows, index * 997 + r))
                latencies.append(time.perf_counter() - start)

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(work, range(clients)))
        wall = time.perf_counter() - start
        after = client.health()["stats"]
    finally:
        server.terminate()
        server.wait(30)
    batches = after["batches"] - before["batches"]
    total = clients * requests
    latencies.sort()
    return {"requests_per_s": total / wall, "rows_per_s": total * rows / wall,
            "mean_batch_rows": (after["rows"] - before["rows"]) / batches,
            "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--max-batch-rows", type=int, default=64)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = _model(Path(tmp) / "reward", args.hidden, args.layers)
        params = (args.hidden * 32 + args.layers * 12 * args.hidden ** 2 + args.hidden)
        rows = []
        modes = (("waits for others", args.max_wait_ms, args.max_batch_rows),
                 ("takes what queued", 0.0, args.max_batch_rows),
                 ("one request per forward", 0.0, args.rows))
        for label, wait, most in modes:
            r = measure(path, clients=args.clients, requests=args.requests, rows=args.rows,
                        max_wait_ms=wait, max_batch_rows=most)
            rows.append((label, wait, most, r))
    print(f"reward model: Llama {args.hidden} wide, {args.layers} layers (~{params / 1e6:.1f}M "
          f"parameters), `rlhf serve reward --backend torch` in its own process, 1 intra-op "
          f"thread; {args.clients} client threads x {args.requests} requests x {args.rows} "
          "rows, 128 tokens per row\n")
    print("| batching | --max-wait-ms | --max-batch-rows | requests/s | rows/s | mean batch rows "
          "| p50 ms | p95 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, wait, most, r in rows:
        print(f"| {label} | {wait:g} | {most} | {r['requests_per_s']:.1f} | "
              f"{r['rows_per_s']:.1f} | {r['mean_batch_rows']:.1f} | {r['p50_ms']:.0f} | "
              f"{r['p95_ms']:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
