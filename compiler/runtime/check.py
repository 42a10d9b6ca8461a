"""Numerical checks of a Session against the PyTorch reference (used by tests and on the GPU).

* `greedy_check`: prefill + n kernel steps against `compiler.reference.generate` in bf16 with
  the same weights: are the greedy tokens identical? At the first difference, how close to a
  tie was the reference's choice (a flipped near-tie is rounding, a clear winner lost is a bug)?
* `forced_check`: the kernel's greedy tokens step by step against the bf16 reference fed the
  kernel's own tokens (teacher-forced), so a long run is checked whole, not only up to the first
  tie: each choice is the reference's argmax, or one of its exactly tied maxima (bf16 logits tie
  often: at batch 4 over 33 steps of llama-2-7b every random prompt tried had a tie), or a token
  whose reference logit is within NEAR of the maximum (relative): the bf16 reference is itself
  only that accurate (its logits are 1e-2 from a float32 reference's, the kernel's 2e-4), so
  such a choice is a near-tie, not a kernel error; anything else is wrong.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from compiler.reference import Reference, generate
from compiler.runtime.session import Session


@dataclass(frozen=True)
class GreedyCheck:
    """Kernel vs bf16 reference over the prefill's token and n kernel steps."""

    kernel: list[list[int]]  # [B, n + 1]: the prefill's token, then the kernel's
    reference: list[list[int]]  # [B, n + 1]
    first_mismatch: tuple[int, int] | None  # (token index, batch row)
    ref_margin: float | None  # reference's (top1 - top2) / |top1| at the first mismatch
    logits_rel_err: float  # last step, kernel vs bf16 reference (if the tokens agree)

    @property
    def identical(self) -> bool:
        return self.first_mismatch is None


def margin(logits: Tensor) -> float:
    """The smallest (top1 - top2) / |top1| over the rows of `logits` [B, V]."""
    top = logits.float().topk(2, dim=-1).values
    return float(((top[:, 0] - top[:, 1]) / top[:, 0].abs().clamp(min=1e-6)).min())


NEAR = 1e-2  # forced_check: a near-tie of the bf16 reference (relative to its maximum)


@dataclass(frozen=True)
class ForcedCheck:
    """Kernel steps against the teacher-forced bf16 reference."""

    steps: int  # choices compared (B x n)
    agree: int  # the kernel chose the reference's unique argmax
    ties: int  # the bf16 logits tied exactly and the kernel chose one of the tied tokens
    near: int  # the kernel's token is within NEAR of the reference's maximum
    largest_gap: float  # the largest (max - logit[token]) / |max| over the near choices
    wrong: tuple[tuple[int, int], ...]  # (step, batch row) where it chose anything else

    @property
    def ok(self) -> bool:
        return not self.wrong


@torch.no_grad()
def forced_check(
    session: Session, prompt: Sequence[Sequence[int]] | Tensor, n: int, near: float = NEAR
) -> ForcedCheck:
    """n kernel steps (one launch per token) checked step by step against the bf16 reference
    run on the same tokens (see the module docstring; `near`: the near-tie tolerance)."""
    p = torch.as_tensor(prompt, dtype=torch.int64, device=session.device)
    first = session.prefill(p)
    toks = session.decode(n)  # [n, B]
    ref = session.model
    ks, vs = ref.empty_cache(p.shape[0], session.device)
    _, ks, vs = ref(p, torch.tensor(0, device=session.device), ks, vs)
    fed, pos = first, p.shape[1]
    agree = ties = near = 0
    largest = 0.0
    wrong = []
    for i in range(n):
        logits, ks, vs = ref(fed[:, None], torch.tensor(pos, device=session.device), ks, vs)
        last = logits[:, 0]
        top = last.max(dim=-1, keepdim=True).values
        best = last == top  # [B, V]: the tied maxima
        for b in range(p.shape[0]):
            tok = int(toks[i, b])
            gap = float(
                (top[b, 0] - last[b, tok]).float() / top[b, 0].float().abs().clamp(min=1e-6)
            )
            if bool(best[b, tok]):
                ties, agree = (ties + 1, agree) if int(best[b].sum()) > 1 else (ties, agree + 1)
            elif gap <= near:
                near, largest = near + 1, max(largest, gap)
            else:
                wrong.append((i, b))
        fed, pos = toks[i], pos + 1
    return ForcedCheck(n * p.shape[0], agree, ties, near, largest, tuple(wrong))


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def greedy_check(
    session: Session, prompt: Sequence[Sequence[int]] | Tensor, n: int, tokens_per_launch: int = 1
) -> GreedyCheck:
    """Greedy tokens of the kernel against `generate` on the session's bf16 Reference."""
    p = torch.as_tensor(prompt, dtype=torch.int64, device=session.device)
    first = session.prefill(p)
    toks = session.decode(n, tokens_per_launch)  # [n, B]
    kernel = torch.cat([first[None], toks]).T.cpu()  # [B, n + 1]
    ref_tokens, ref_logits = generate(session.model, p, n + 1)
    ref = ref_tokens.cpu()
    bad = (kernel != ref).nonzero()
    mismatch, ref_margin = None, None
    if len(bad):
        i = int(bad[:, 1].min())
        b = int(bad[bad[:, 1] == i][0, 0])
        mismatch, ref_margin = (i, b), margin(ref_logits[i][b : b + 1])
    return GreedyCheck(
        kernel=kernel.tolist(),
        reference=ref.tolist(),
        first_mismatch=mismatch,
        ref_margin=ref_margin,
        logits_rel_err=_rel(session.logits, ref_logits[n].float()),
    )


def _reference32(session: Session) -> Reference:
    """A float32 Reference holding the session's (bf16-valued) weights."""
    # meta first (no init), then storage; weights copied one at a time (no second full copy)
    ref32 = Reference(session.spec, session.max_seq, dtype=torch.float32, device="meta")
    ref32 = ref32.to_empty(device=session.device)
    ref32.inv_freq = session.model.inv_freq.clone()
    src = dict(session.model.named_parameters())
    for name, p32 in ref32.named_parameters():
        p32.copy_(src[name])
    return ref32


@dataclass(frozen=True)
class Float32Choices:
    """The kernel's greedy choices against a teacher-forced float32 reference."""

    steps: int  # choices compared (B x n)
    same: int  # the kernel chose the float32 argmax
    differ: tuple[tuple[int, int, float], ...]  # (step, row, float32 gap / rms of the logits)


def _float32_steps(
    session: Session, prompt: Sequence[Sequence[int]] | Tensor, n: int
) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """n kernel steps (one launch each) beside a float32 Reference that holds the session's
    (bf16-valued) weights, starts from the caches the prefill left in the kernel and embeds the
    kernel's own token at every step. Yields, per step, the kernel's logits [B, V], the float32
    logits [B, V] and the kernel's tokens [B]."""
    p = torch.as_tensor(prompt, dtype=torch.int64, device=session.device)
    session.prefill(p)
    ref32 = _reference32(session)
    kc, vc = session.caches()
    ks, vs = [c.float() for c in kc], [c.float() for c in vc]
    for _ in range(n):
        token, pos = session.tensors["token"].clone(), session.pos
        assert pos is not None
        chosen = session.decode(1)[0]
        logits, ks, vs = ref32(token[:, None], torch.tensor(pos, device=session.device), ks, vs)
        yield session.logits, logits[:, 0], chosen


@torch.no_grad()
def float32_choices(
    session: Session, prompt: Sequence[Sequence[int]] | Tensor, n: int
) -> Float32Choices:
    """n kernel steps; at each, is the kernel's token the argmax of the teacher-forced float32
    reference (`_float32_steps`)? Where not, the float32 gap between its maximum and the kernel's
    token, over the RMS of its logits (the kernel's logits are about 2e-4 of that RMS from the
    float32 reference's)."""
    same, differ = 0, []
    for i, (_, ref, chosen) in enumerate(_float32_steps(session, prompt, n)):
        rms = ref.pow(2).mean(dim=-1).sqrt()
        for b, tok in enumerate(chosen.tolist()):
            if int(ref[b].argmax()) == tok:
                same += 1
            else:
                differ.append((i, b, float((ref[b].max() - ref[b, tok]) / rms[b])))
    return Float32Choices(n * session.batch, same, tuple(differ))


@torch.no_grad()
def float32_check(
    session: Session, prompt: Sequence[Sequence[int]] | Tensor, n: int
) -> list[float]:
    """Relative error of each of n kernel steps' logits against the teacher-forced float32
    reference (`_float32_steps`)."""
    return [_rel(kernel, ref) for kernel, ref, _ in _float32_steps(session, prompt, n)]
