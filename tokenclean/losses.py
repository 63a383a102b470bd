"""Per-token losses l(x_j) = -log p(x_j | x_<j) on response tokens, for scoring and for masked training.

`TokenLoss` wraps a causal LM so that its forward returns the loss of each selected position only: the decoder
runs once, then the LM head and the cross-entropy run over the selected positions in chunks, so fp32 logits of
the whole batch ([batch, length, vocab]: 2 GB for 8 x 2048 x 128k) never exist. Wrapping the whole computation
in one module keeps DDP and DeepSpeed in charge of it (ZeRO-3 gathers the LM head inside this forward).
Training and scoring feed it packed batches (`collate(..., packed=True)`): several examples to a row, so that few
positions go to padding.

On CUDA, with liger-kernel installed (the `gpu` extra), the LM head and the cross-entropy run instead through Liger
Kernel's fused linear cross-entropy (reduction="none": per-token losses; the logits exist one small block at a time
and are recomputed in backward). `kernel` ("auto" | "fused" | "chunked", training.loss_kernel) chooses: auto takes
the fused path where it can run and the chunked one elsewhere (CPU, an LM head that is not a plain nn.Linear: LoRA
on the head, ZeRO-3 shards). Entropy (the entropy scorer, XTF) always takes the chunked path. liger-kernel >= 0.8.2
is required: before it, reduction="none" multiplied every token's gradient by the first token's upstream gradient
(linkedin/Liger-Kernel#968, fixed by #1298), which would silently break weighted and masked training.
"""
from __future__ import annotations

import bisect
import functools
import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from tokenclean.config import ConfigError, fused_loss_unavailable, triton_interprets
from tokenclean.dist import gather
from tokenclean.ragged import Ragged

log = logging.getLogger(__name__)
KERNELS = ("auto", "fused", "chunked")


class TokenLoss(nn.Module):
    def __init__(self, lm: nn.Module, chunk_size: int = 2048, kernel: str = "auto"):
        super().__init__()
        if str(kernel) not in KERNELS:
            raise ValueError(f"kernel={kernel!r}: one of {', '.join(KERNELS)}")
        self.lm = lm
        self.chunk_size = chunk_size
        self.kernel = str(kernel)
        self.path = None                # the path the last loss forward took: "fused" | "chunked"

    @property
    def config(self):
        """The LM's config: accelerate reads config.hidden_size to fill DeepSpeed's "auto" bucket sizes."""
        return self.causal_lm().config

    def causal_lm(self) -> nn.Module:
        """The transformers CausalLM inside (under a peft wrapper, its LoRA layers are injected in place)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def resolve_kernel(self, device: torch.device | str) -> str:
        """The path the LM head and cross-entropy take for hidden states on `device`: "fused" or "chunked".
        kernel="fused" where the fused path cannot run raises ConfigError, saying why."""
        if self.kernel == "chunked":
            return "chunked"
        device = torch.device(device)
        why = _fused_problem(self.causal_lm().get_output_embeddings(), device, interpreter_ok=self.kernel == "fused")
        if why is None:
            return "fused"
        if self.kernel == "fused":
            raise ConfigError(f"training.loss_kernel='fused': {why}; set training.loss_kernel=auto to use the "
                              "chunked path there")
        if device.type == "cuda" and self.path is None:
            log.info("per-token losses through the chunked LM head: %s", why)
        return "chunked"

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, entropy: bool = False, reference=None):
        """Losses (fp32) of the positions where `mask` is True, in row-major order; with entropy=True, also the
        entropy of the predicted distribution at those positions (a second tensor, no gradient).

        reference (a function (lo, hi) -> the reference model's fp32 logits at selected positions lo..hi-1, as
        `reference_logits` builds it): also the distribution terms against it, with gradients, as a second value
        {"entropy": H(p), "kl": KL(p || q), "collision": sum_v p_v^2} (p the current prediction, q the
        reference's; EKSFT's regularisers). Both models' logits exist one chunk of loss_chunk_size positions at a
        time (recomputed in backward), never for the whole batch.

        Takes a padded batch (attention_mask) or a packed one (several examples to a row, position_ids restarting
        at 0 for each, no attention_mask): see `collate`.

        With no position selected it returns one zero that is still connected to the graph (0 * a real loss):
        every rank then runs the same backward, so DDP and ZeRO-3 never wait on a rank that skipped a step."""
        h, y, empty = self.selected_hidden(input_ids, mask, attention_mask, position_ids)
        lm = self.causal_lm()
        head = lm.get_output_embeddings()
        cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        if reference is not None:
            return self._with_reference(head, h, y, cap, empty, reference)
        if not entropy and self.resolve_kernel(h.device) == "fused":
            if self.path != "fused":
                log.info("per-token losses through liger-kernel's fused linear cross-entropy")
            self.path = "fused"
            losses = _fused_head_ce(head, h, y, cap)
            return losses * 0 if empty else losses
        self.path = "chunked"
        n_chunks = _same_on_every_rank(math.ceil(len(y) / self.chunk_size), head, h.device)
        chunks, padding, entropies = [], [], []
        for i in range(n_chunks):
            lo, hi = i * self.chunk_size, (i + 1) * self.chunk_size
            h_c, y_c = h[lo:hi], y[lo:hi]
            if len(y_c) == 0:           # ZeRO-3: this rank has fewer chunks than another; run the head anyway
                h_c, y_c = h[:1], y[:1]
            if entropy:
                out, h_ent = _head_ce(head, h_c, y_c, cap, entropy=True)
                entropies.append(h_ent)
            elif torch.is_grad_enabled() and n_chunks > 1:
                # recompute each chunk's logits in backward rather than keep them all
                out = checkpoint(_head_ce, head, h_c, y_c, cap, use_reentrant=False)
            else:
                out = _head_ce(head, h_c, y_c, cap)
            (chunks if i * self.chunk_size < len(y) else padding).append(out)
        losses = torch.cat(chunks)
        if padding:                     # in the graph (the same backward on every rank), adding exactly 0
            losses = losses + 0 * torch.cat(padding).sum()
        losses = losses * 0 if empty else losses
        if entropy:
            return losses, torch.cat(entropies)[:len(losses)].detach()
        return losses

    def _with_reference(self, head, h, y, cap, empty, reference):
        """forward(reference=...): the chunked loop over the losses and the terms against the reference."""
        self.path = "chunked"
        n_chunks = _same_on_every_rank(math.ceil(len(y) / self.chunk_size), head, h.device)
        chunks, padding = [], []
        for i in range(n_chunks):
            lo, hi = i * self.chunk_size, min((i + 1) * self.chunk_size, len(y))
            if lo >= len(y):            # ZeRO-3: this rank has fewer chunks than another; run the head anyway
                lo, hi = 0, 1
            h_c, y_c = h[lo:hi], y[lo:hi]

            def terms(h_c, y_c=y_c, lo=lo, hi=hi):
                return _head_terms(head, h_c, y_c, cap, reference(lo, hi))
            out = checkpoint(terms, h_c, use_reentrant=False) if torch.is_grad_enabled() and n_chunks > 1 \
                else terms(h_c)
            (chunks if i * self.chunk_size < len(y) else padding).append(out)
        out = torch.cat(chunks, dim=1)
        if padding:
            out = out + 0 * torch.cat(padding, dim=1).sum()
        out = out * 0 if empty else out
        return out[0], {"entropy": out[1], "kl": out[2], "collision": out[3]}

    def head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head's fp32 logits (soft-capped where the model caps them) of hidden states h."""
        lm = self.causal_lm()
        logits = lm.get_output_embeddings()(h).float()
        cap = getattr(lm.config.get_text_config(), "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    @torch.no_grad()
    def reference_logits(self, input_ids: torch.Tensor, mask: torch.Tensor, attention_mask=None, position_ids=None):
        """This model as another's reference on the same batch: its decoder runs once (no gradient), and the
        function returned gives its fp32 logits at the selected positions lo..hi-1, computed when asked (a chunk
        at a time), for forward(reference=...)."""
        h, _, _ = self.selected_hidden(input_ids, mask, attention_mask, position_ids)

        def logits(lo: int, hi: int) -> torch.Tensor:
            with torch.no_grad():
                return self.head_logits(h[lo:hi])
        return logits

    def selected_hidden(self, input_ids, mask, attention_mask=None, position_ids=None):
        """(the last hidden states that predict the selected positions, their target ids, whether none was
        selected: then one stand-in position, so that the forward still runs)."""
        lm = self.causal_lm()
        decoder = getattr(lm, lm.base_model_prefix)
        if position_ids is not None and "flash" in str(lm.config._attn_implementation):
            # flash-attention finds packed sequences in one row only (varlen, no attention wasted): flatten the rows
            input_ids, position_ids, mask = (t.reshape(1, -1) for t in (input_ids, position_ids, mask))
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False).last_hidden_state
        # an example's first token has no prefix to be predicted from: column 0, and in a packed row every
        # position 0 (the position before it belongs to another example)
        mask = mask & (position_ids != 0) if position_ids is not None else mask.clone()
        mask[:, 0] = False
        rows, cols = mask.nonzero(as_tuple=True)
        empty = len(rows) == 0
        if empty:
            rows, cols = torch.zeros(1, dtype=torch.long, device=mask.device), torch.ones(1, dtype=torch.long,
                                                                                         device=mask.device)
            cols = cols.clamp(max=input_ids.shape[1] - 1)
        return hidden[rows, cols - 1], input_ids[rows, cols], empty


def _same_on_every_rank(n: int, head: nn.Module, device: torch.device) -> int:
    """The number of LM-head chunks this forward runs: under ZeRO-3 the largest over the ranks.

    ZeRO-3 gathers a module's shards collectively on every call, and checks that every rank called the same modules
    in the same order; a rank with fewer response positions in its batch must still call the head as often."""
    if not hasattr(head.weight, "ds_id") or not torch.distributed.is_initialized():   # not a ZeRO-3 parameter
        return n
    t = torch.tensor([n], dtype=torch.long, device=device)   # the compute device (NCCL needs the GPU)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return int(t.item())


def _head_terms(head: nn.Module, h: torch.Tensor, y: torch.Tensor, cap, ref_logits: torch.Tensor) -> torch.Tensor:
    """[4, n]: cross-entropy, entropy H(p), KL(p || q) and sum_v p_v^2 of the current prediction p against the
    reference's q (its logits ref_logits, no gradient), at n positions."""
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(ref_logits.float(), dim=-1)
    p = logp.exp()
    ce = -logp.gather(-1, y[:, None])[:, 0]
    return torch.stack([ce, -(p * logp).sum(-1), (p * (logp - logq)).sum(-1), (p * p).sum(-1)])


def _head_ce(head: nn.Module, h: torch.Tensor, y: torch.Tensor, cap, entropy: bool = False):
    logits = head(h).float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    losses = F.cross_entropy(logits, y, reduction="none")
    if not entropy:
        return losses
    logp = torch.log_softmax(logits, dim=-1)
    return losses, -(logp.exp() * logp).sum(-1)


def _fused_problem(head: nn.Module, device: torch.device, interpreter_ok: bool) -> str | None:
    """Why the fused kernel cannot compute this head's losses on `device`, or None. It multiplies by head.weight
    itself, so the head must be a plain nn.Linear that holds its whole weight, with no hooks that change it."""
    if device.type != "cuda" and not (interpreter_ok and triton_interprets()):
        return f"the model is on {device.type}, not on a CUDA device"
    why = _liger_problem()
    if why is not None:
        return why
    if not isinstance(head, nn.Linear) or not head.weight.dtype.is_floating_point:
        return (f"the LM head is a {type(head).__name__} of {head.weight.dtype} weights, not a plain nn.Linear "
                "(LoRA or modules_to_save on the head, a quantised head)")
    if hasattr(head.weight, "ds_id"):
        return "the LM head is sharded by DeepSpeed ZeRO-3 (the fused kernel needs its whole weight)"
    if head._forward_hooks or head._forward_pre_hooks or hasattr(head, "_hf_hook"):
        return "the LM head has forward hooks (offloading, or hooks that change its output)"
    return None


@functools.cache
def _liger_problem() -> str | None:
    why = fused_loss_unavailable()
    if why is not None:
        return f"{why} (pip install 'tokenclean[gpu]')"
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy  # noqa: F401
    except Exception as e:  # noqa: BLE001  a broken triton or CUDA install shows up as many kinds of error
        return f"liger-kernel does not import ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
    return None


def _fused_head_ce(head: nn.Linear, h: torch.Tensor, y: torch.Tensor, cap) -> torch.Tensor:
    """The chunked path's `_head_ce` losses (fp32) through liger-kernel. Under autocast the kernel's matmuls run in
    the autocast dtype and its softmax in fp32, as the chunked path's head(h).float() does. The head's weight
    gradient is summed over the kernel's blocks in fp32 (bf16 weights: it halves the error against fp64; the cost
    is an fp32 copy of that gradient while backward runs), then cast to the weight's dtype."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy(h, head.weight, y, bias=head.bias, reduction="none",
                                            softcap=cap if cap else None, accum_dtype=torch.float32)


def collate(input_ids: Ragged, weights, indices, pad_id: int = 0, packed: bool = False,
            width: int | None = None) -> dict:
    """The examples at `indices` as tensors: input_ids, and `mask`, the positions to compute losses at: where
    `weights` (a Ragged, or a dict example -> row) is True or nonzero, never an example's first token. For float
    weights also `weights`: those positions' weights in the order TokenLoss returns their losses (row-major, which
    is example order in both layouts).

    Padded (default): one example per row, right-padded to the longest, and attention_mask (XTF's attention hooks
    read it). packed=True: the examples in order, several to a row, in rows as wide as the longest example, with
    position_ids restarting at 0 for each and no attention_mask: transformers detects the packed sequences from
    position_ids and keeps attention within each example (sdpa, eager and flex mask it; flash-attention runs
    varlen on the rows flattened into one, see TokenLoss). Rows stay that narrow because sdpa and eager pay for
    a row's whole [width, width] attention block: one row of 16 similar examples costs 16x a padded batch's
    attention (one row per batch made scoring slower than padded; packed_batches fills rows only as wide as the
    longest example). `width`: the packed rows' width (default: the batch's longest example)."""
    rows = [np.asarray(input_ids[int(i)]) for i in indices]
    w_rows = [np.asarray(weights[int(i)]) for i in indices]
    width = width or max(len(r) for r in rows)
    place = [(k, 0) for k in range(len(rows))]          # (row, column) of each example's first token
    if packed:                                          # next-fit, so that row-major order stays example order
        place, row, col = [], 0, 0
        for r in rows:
            if col + len(r) > width:
                row, col = row + 1, 0
            place.append((row, col))
            col += len(r)
    shape = (place[-1][0] + 1, width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    pos = np.tile(np.arange(width), (shape[0], 1))     # a row's padding follows its examples: causal attention
    attn = np.zeros(shape, dtype=np.int64)              # never lets them see it
    sel = np.zeros(shape, dtype=bool)
    for (k, c), r, w in zip(place, rows, w_rows):
        span = slice(c, c + len(r))
        ids[k, span], pos[k, span], attn[k, span], sel[k, span] = r, np.arange(len(r)), 1, w != 0
        sel[k, c] = False                               # token 0 has no prefix to be predicted from
    batch = {"input_ids": ids, "mask": sel, **({"position_ids": pos} if packed else {"attention_mask": attn})}
    if w_rows and w_rows[0].dtype != bool:
        batch["weights"] = np.concatenate([r[1:][r[1:] != 0] for r in w_rows]).astype(np.float32)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def length_batches(lengths: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of examples of similar length (longest first, so running out of memory shows at once)."""
    order = np.argsort(-lengths, kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def packed_batches(lengths: np.ndarray, rows: int) -> list[np.ndarray]:
    """Scoring batches with little padding: rows as wide as the longest example, filled best-fit decreasing (each
    example, longest first, goes to the row it leaves least space in, else opens one), `rows` rows to a batch, each
    batch's examples listed row by row. collate(packed=True, width=that width)'s next-fit lays the list out in exactly
    these rows: a row's first example is the one that opened it, which fitted no earlier row when placed, nor later
    when that row was fuller. A forward holds at most rows x width tokens, as a length-grouped batch of the longest
    examples did; what changes is that short examples fill the long rows' tails instead of padded batches of their
    own (a small set, such as a self-evolving chunk, padded much of its positions that way; the reference passes'
    cost is measured in results/performance.md, `python -m benchmarks.self_evolving_cost`). Best-fit by buckets
    of free space, so a million examples take seconds, not a search over every row each."""
    order = np.argsort(-lengths, kind="stable")
    if len(order) == 0:
        return []
    width = int(lengths[order[0]])
    content: list[list[int]] = []        # each row's examples, in the order they were placed
    by_space: dict[int, list[int]] = {}  # space left -> the rows with exactly that much
    spaces: list[int] = []               # the keys of by_space, sorted
    for i in order:
        n = int(lengths[i])
        k = bisect.bisect_left(spaces, n)
        if k < len(spaces):              # the row with the least space that still fits
            space = spaces[k]
            row = by_space[space].pop()
            if not by_space[space]:
                del by_space[space], spaces[k]
        else:
            space, row = width, len(content)
            content.append([])
        content[row].append(int(i))
        if space - n > 0:
            if space - n not in by_space:
                by_space[space - n] = []
                bisect.insort(spaces, space - n)
            by_space[space - n].append(row)
    return [np.array([i for r in content[j:j + rows] for i in r]) for j in range(0, len(content), rows)]


def rank_batches(accelerator, batches: list[np.ndarray], desc: str):
    """This rank's share of `batches`, as (example indices, real). Batches are dealt round-robin,
    and every rank gets the same number: a rank with nothing left gets a one-example batch with real=False, to run
    and discard, since ZeRO-3 needs every rank to run the same forward passes."""
    world, rank = accelerator.num_processes, accelerator.process_index
    steps = math.ceil(len(batches) / world)
    for step in tqdm(range(steps), desc=desc, disable=not accelerator.is_local_main_process, unit="batch"):
        b = step * world + rank
        yield (batches[b], True) if b < len(batches) else (batches[0][:1], False)


@torch.no_grad()
def token_losses(accelerator, model: nn.Module, input_ids: Ragged, target: Ragged, batch_size: int,
                 pad_id: int, desc: str = "losses", entropy: bool = False):
    """Per-token losses of `model` (a prepared TokenLoss) on every target position; NaN elsewhere. With
    entropy=True, (losses, entropies of the predicted distributions). Each forward is `batch_size` packed rows
    (packed_batches). Every rank runs the same number of forward passes (rank_batches); results are gathered on all
    ranks."""
    was_training = model.training
    model.eval()
    mine = []
    width = int(input_ids.lengths.max(initial=0))
    for idx, real in rank_batches(accelerator, packed_batches(input_ids.lengths, batch_size), desc):
        batch = collate(input_ids, target, idx, pad_id, packed=True, width=width)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            out = model(**batch, entropy=entropy)
        if not real:
            continue
        out = [o.float().cpu().numpy() for o in (out if entropy else (out,))]
        counts = np.array([np.count_nonzero(np.asarray(target[int(i)])[1:]) for i in idx])
        splits = [np.split(o[:counts.sum()], np.cumsum(counts)[:-1]) for o in out]
        mine += [(int(i), [sp[k] for sp in splits]) for k, i in enumerate(idx)]
    model.train(was_training)
    arrays = [np.full(len(target.values), np.nan, dtype=np.float32) for _ in range(1 + entropy)]
    for i, parts in gather(accelerator, mine):
        pos = target.offsets[i] + np.flatnonzero(np.asarray(target[i], dtype=bool)[1:]) + 1
        for a, part in zip(arrays, parts):
            a[pos] = part
    out = [target.like(a) for a in arrays]
    return tuple(out) if entropy else out[0]
