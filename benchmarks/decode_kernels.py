"""What one decode step of a small model costs in PyTorch on this CPU: the matrix-vector products.

    python benchmarks/decode_kernels.py --threads 2

Generating one token multiplies a single activation row by every weight matrix, so a decode step
reads all weights once and is bound by how fast PyTorch's matrix-vector kernels stream them. This
prints, for the model's own weight shapes (default SmolLM2-135M-Instruct) in fp32 and bf16, the
GB/s that `F.linear` reaches with 1 row (one request) and 2 and 8 rows (batched decode), and the
decode step those rates imply (all layers plus the LM head, no attention or elementwise work): the
ceiling of a PyTorch serving loop, `model.generate` or ours, at that dtype. The weights are fresh
random matrices of every layer's shapes, as many layers as the model has, so they stream from memory
as in real decoding.
"""

from __future__ import annotations

import argparse
import time

import torch


def seconds_per_call(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from slmtune.models import resolve
    from slmtune.training.plan import architecture

    arch = architecture(resolve(args.model))
    h, kv, i = arch.hidden_size, arch.num_key_value_heads * arch.head_dim, arch.intermediate_size
    layer = {"q/o": ((h, h), 2), "k/v": ((kv, h), 2), "gate/up": ((i, h), 2), "down": ((h, i), 1)}
    head = (arch.vocab_size, h)
    print(f"{args.model}: decode matrix-vector products, {args.threads} threads "
          f"({arch.num_hidden_layers} layers, hidden {h}, vocabulary {arch.vocab_size})")
    print(f"{'dtype':9} {'rows':>4} {'body GB/s':>10} {'head GB/s':>9} {'step ms':>8} {'ceiling tok/s':>13}")
    for dtype in (torch.float32, torch.bfloat16):
        size = torch.empty((), dtype=dtype).element_size()
        mats = [torch.randn(shape, dtype=dtype) for shape, count in layer.values()
                for _ in range(arch.num_hidden_layers * count)]
        head_w = torch.randn(head, dtype=dtype)
        for rows in (1, 2, 8):
            x = {n: torch.randn(rows, n, dtype=dtype) for n in (h, i)}
            body = seconds_per_call(lambda: [torch.nn.functional.linear(x[w.shape[1]], w) for w in mats],
                                    args.repeats)
            body_bytes = sum(w.numel() for w in mats) * size
            lm = seconds_per_call(lambda: torch.nn.functional.linear(x[h], head_w), args.repeats)
            step = body + lm
            print(f"{str(dtype)[6:]:9} {rows:>4} {body_bytes / body / 1e9:>10.1f} "
                  f"{head_w.numel() * size / lm / 1e9:>9.1f} {1e3 * step:>8.1f} {rows / step:>13.1f}")


if __name__ == "__main__":
    main()
