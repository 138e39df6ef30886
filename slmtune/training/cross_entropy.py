"""The LM head and cross-entropy on target positions, fused: chunked, with gradients made in forward.

    loss = linear_cross_entropy_sum(hidden, head.weight, targets, torch.bfloat16)
    # == F.cross_entropy((hidden @ head.weight.T).float(), targets, reduction="sum"), to rounding

`train.cross_entropy: fused` (the default) computes a step's loss this way. The plain path builds a
targets x vocabulary logits tensor in fp32 (500 targets x 49k vocabulary = 100 MB), its
log-softmax, their bf16 copies and the same again in backward; on a CPU each of those large
buffers is also a fresh allocation the kernel has to page in. Here the head runs on `chunk_tokens`
targets at a time into reused buffers, and each chunk's gradient (softmax - one-hot) goes straight
through the head's weight in the forward pass: backward only scales the stored gradient of
`hidden` (and of the weight, when it trains), so no logits are kept for backward or recomputed.
"""

from __future__ import annotations

import torch

# Chunks hold about this many logits (64 MB in fp32): 256 targets for a 49k vocabulary (SmolLM2),
# 110 for Qwen2.5's 152k. Larger chunks read the head's weight fewer times.
CHUNK_LOGITS = 1 << 24
MAX_CHUNK_TOKENS = 256


def default_chunk_tokens(vocab_size: int) -> int:
    return max(16, min(MAX_CHUNK_TOKENS, CHUNK_LOGITS // vocab_size))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, compute_dtype, chunk_tokens, with_grads):
        # Autograd runs forward with gradients off, so the caller's grad mode comes in `with_grads`.
        need_hidden, need_weight = with_grads and ctx.needs_input_grad[0], with_grads and ctx.needs_input_grad[1]
        ctx.dtypes = hidden.dtype, weight.dtype
        # The dtypes are set by hand below; autocast would refuse the out= buffers.
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            n, vocab = len(targets), w.shape[0]
            width = max(1, min(chunk_tokens, n))
            log_probs = hidden.new_empty((width, vocab), dtype=torch.float32)
            logits = (log_probs if compute_dtype == torch.float32
                      else hidden.new_empty((width, vocab), dtype=compute_dtype))
            grad_hidden = hidden.new_empty((n, hidden.shape[1]), dtype=compute_dtype) if need_hidden else None
            grad_weight = torch.zeros_like(w, dtype=torch.float32) if need_weight else None
            weight_part = torch.empty_like(w) if need_weight else None
            total = hidden.new_zeros((), dtype=torch.float32)
            for at in range(0, n, width):
                h = hidden[at : at + width].to(compute_dtype)
                t = targets[at : at + width]
                m, rows = len(t), torch.arange(len(t), device=t.device)
                torch.mm(h, w.T, out=logits[:m])
                # In place in one buffer: log_softmax(dtype=float32) would allocate an fp32 copy per
                # chunk, and a fresh buffer this size is paged in by the kernel each time.
                if logits is not log_probs:
                    log_probs[:m].copy_(logits[:m])
                torch.log_softmax(log_probs[:m], -1, out=log_probs[:m])
                total -= log_probs[:m][rows, t].sum()
                if not (need_hidden or need_weight):
                    continue
                # d(-log p_t)/d(logits) = softmax - one_hot(t), made in place over the log-probs.
                grad_logits = log_probs[:m].exp_()
                grad_logits[rows, t] -= 1
                if logits is not log_probs:
                    logits[:m].copy_(grad_logits)
                if need_hidden:
                    torch.mm(logits[:m], w, out=grad_hidden[at : at + m])
                if need_weight:
                    torch.mm(logits[:m].T, h, out=weight_part)
                    grad_weight += weight_part
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        if grad_hidden is not None:
            grad_hidden = (grad_hidden * grad_total).to(hidden_dtype)
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_total).to(weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             compute_dtype: torch.dtype, chunk_tokens: int | None = None) -> torch.Tensor:
    """Summed cross-entropy of `hidden @ weight.T` (matmuls in `compute_dtype`, softmax in fp32)
    against `targets`; hidden is (targets, hidden size), weight (vocabulary, hidden size).

    With gradients enabled the gradients of `hidden` and `weight` (whichever need one) are computed
    in this call and kept until backward: (targets x hidden size) and, when the weight trains, an
    fp32 copy of its size. Under no_grad only the loss is computed."""
    chunk_tokens = chunk_tokens or default_chunk_tokens(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, targets, compute_dtype, chunk_tokens, torch.is_grad_enabled())
