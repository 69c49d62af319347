"""Peak memory of the Stage-I loss's per-loop cross-entropy at Ouro's vocabulary: chunked vs unchunked.

Each variant runs in its own subprocess (so one's peak cannot hide the other's) on the same seeded inputs:
T loops of (tokens, hidden) states, a (vocab, hidden) lm_head, Stage-I loss, backward. Peak memory is the
process's peak RSS (`ru_maxrss`) above its RSS once the inputs exist; the loss and a gradient digest are
compared between the variants, and the seconds of each are reported (interleaved runs, same machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LossMemoryBenchConfig:
    vocab_size: int = 49152  # Ouro's
    loops: int = 4  # Ouro's T
    tokens: int = 4096  # label positions (batch 2 x 2,048)
    # Ouro's is 2048; the peak of the logits does not depend on it, the matmuls' time does (2 shared cores).
    hidden_size: int = 512
    chunk_tokens: int = 1024  # looplm.losses.DEFAULT_CHUNK_LOGITS at vocab 49,152
    repeats: int = 2  # interleaved subprocess runs per variant; the peak reported is the largest
    threads: int = 2


def run_loss_memory_bench(config: LossMemoryBenchConfig) -> dict[str, Any]:
    runs: dict[str, list[dict[str, float]]] = {"unchunked": [], "chunked": []}
    for _ in range(config.repeats):
        for name, chunk in (("unchunked", None), ("chunked", config.chunk_tokens)):
            runs[name].append(_subprocess(config, chunk))
    before, after = runs["unchunked"], runs["chunked"]
    results = {
        "config": asdict(config),
        "peak_mb": {name: max(r["peak_mb"] for r in rs) for name, rs in runs.items()},
        "seconds": {name: min(r["seconds"] for r in rs) for name, rs in runs.items()},
        "loss": {"unchunked": before[0]["loss"], "chunked": after[0]["loss"]},
        "loss_abs_diff": abs(before[0]["loss"] - after[0]["loss"]),
        "grad_max_abs_diff": max(abs(a - b) for a, b in zip(before[0]["grad_digest"], after[0]["grad_digest"], strict=True)),
    }
    results["peak_ratio"] = results["peak_mb"]["unchunked"] / results["peak_mb"]["chunked"]
    print_markdown(results)
    return results


def _subprocess(config: LossMemoryBenchConfig, chunk: int | None) -> dict[str, Any]:
    spec = json.dumps({**asdict(config), "chunk": chunk})
    done = subprocess.run([sys.executable, "-m", "bench.loss_memory", spec], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"loss-memory subprocess (chunk={chunk}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One variant, in this (fresh) process: -> peak RSS above the inputs' (MB), seconds, loss, grad digest."""
    import resource
    import time

    import torch

    from looplm.losses import per_loop_token_losses, stage1_loss

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    n, width, vocab, loops = spec["tokens"], spec["hidden_size"], spec["vocab_size"], spec["loops"]
    states = [(torch.randn(2, n // 2 + 1, width) / width**0.5).requires_grad_() for _ in range(loops)]
    head = torch.nn.Linear(width, vocab, bias=False)
    gates = torch.randn(2, n // 2 + 1, loops, requires_grad=True)
    labels = torch.randint(0, vocab, (2, n // 2 + 1))
    base_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    chunk_logits = None if spec["chunk"] is None else spec["chunk"] * vocab
    ce, mask = per_loop_token_losses(states, head, labels, chunk_logits=chunk_logits)
    loss = stage1_loss(ce, gates, mask, beta=0.05)[0]
    loss.backward()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # A few gradient values from each input: enough to show the two variants agree.
    digest = [float(s.grad[0, :4].sum()) for s in states] + [float(head.weight.grad[:8].sum()), float(gates.grad.sum())]
    return {"peak_mb": (peak_kb - base_kb) / 1024, "seconds": seconds, "loss": float(loss), "grad_digest": digest}


def print_markdown(results: dict[str, Any]) -> None:
    c = results["config"]
    print(f"\n### Stage-I loss at vocab {c['vocab_size']:,}, T = {c['loops']}, {c['tokens']:,} tokens, hidden "
          f"{c['hidden_size']} (peak RSS above the inputs, fresh process per run)\n")
    print("| variant | peak memory (MB) | seconds (loss + backward) |\n|---|---:|---:|")
    for name in ("unchunked", "chunked"):
        print(f"| {name} | {results['peak_mb'][name]:,.0f} | {results['seconds'][name]:.1f} |")
    print(f"\npeak ratio {results['peak_ratio']:.1f}x; |loss difference| {results['loss_abs_diff']:.1e}, "
          f"max |gradient difference| (digest) {results['grad_max_abs_diff']:.1e}")


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))


__all__ = ["LossMemoryBenchConfig", "run_loss_memory_bench"]
