"""What a run kept and dropped, in a form people and other tools can use.

  cleaned.parquet  input_ids / attention_mask / labels (-100 on prompt and dropped tokens): the cleaned dataset, which
                   TRL's SFTTrainer (or any HF Trainer) uses as is; with selection.method=soft also `weights`, each
                   token's float32 loss weight (0 on the prompt; labels are -100 where the weight is 0); with
                   scorer=forgetting the signed weights training gave (1 kept, -lambda(step) c on the unlearned);
                   and, for other tools (tokenclean.export), `response_mask` (1 on response tokens, kept or not)
                   and `record_index` (the example's record in data.train, counting from 0)
  report.html      the first examples token by token: prompt grey, kept green, dropped red, the score (and XTF's
                   per-attribute decisions, when present) on hover
"""
from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from tokenclean.io import atomic_write, atomic_write_text
from tokenclean.ragged import Ragged


def write_cleaned(path: Path, input_ids: Ragged, target: Ragged, keep: Ragged, record_indices: np.ndarray) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = np.asarray(input_ids.values, dtype=np.int64)
    labels = np.where(np.asarray(keep.values, dtype=bool), ids, -100)
    offsets = pa.array(input_ids.offsets.astype(np.int32))
    columns = {"input_ids": ids, "attention_mask": np.ones(len(ids), dtype=np.int8), "labels": labels}
    if keep.values.dtype != bool:   # soft weights
        columns["weights"] = np.asarray(keep.values, np.float32)
    columns["response_mask"] = np.asarray(target.values, dtype=np.int8)
    table = pa.table({**{k: pa.ListArray.from_arrays(offsets, pa.array(v)) for k, v in columns.items()},
                      "record_index": pa.array(np.asarray(record_indices, np.int64))})
    atomic_write(path, lambda f: pq.write_table(table, f))


def write_html(path: Path, tokenizer, input_ids: Ragged, target: Ragged, keep: Ragged, scores: Ragged | None,
               attributes: dict[str, Ragged] | None = None, n_examples: int = 30, title: str = "tokenclean") -> None:
    """attributes: name -> bool Ragged marking tokens an attribute calls noise (XTF), shown on hover."""
    rows = []
    for i in range(min(n_examples, len(input_ids))):
        ids, tgt, w = input_ids[i], np.asarray(target[i], bool), keep[i]
        kp, soft = np.asarray(w, bool), w.dtype != bool
        sc = scores[i] if scores is not None else None
        spans = []
        for j, tok_id in enumerate(ids):
            text = html.escape(tokenizer.decode([int(tok_id)])).replace("\n", "&#8629;<br>")
            if not tgt[j]:
                spans.append(f'<span class="p">{text}</span>')
                continue
            tip = ["kept" if kp[j] else "dropped"]
            if soft:
                tip.append(f"weight {w[j]:.3f}")
            if sc is not None and not np.isnan(sc[j]):
                tip.append(f"score {sc[j]:+.3f}")
            for name, marks in (attributes or {}).items():
                if marks[i][j]:
                    tip.append(f"{name}: noise")
            spans.append(f'<span class="{"k" if kp[j] else "d"}" title="{"; ".join(tip)}">{text}</span>')
        n_t, n_k = int(tgt.sum()), int((kp & tgt).sum())
        rows.append(f"<div class=ex><div class=h>example {i}: kept {n_k} of {n_t} response tokens</div>"
                    f"{''.join(spans)}</div>")
    n_t, n_k = int(np.count_nonzero(target.values)), int(np.count_nonzero(keep.values))
    page = f"""<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>
<style>body{{font:14px/1.6 monospace;max-width:1100px;margin:2em auto}} .ex{{border-top:1px solid #ccc;padding:.6em 0}}
.h{{color:#555;font-weight:bold}} .p{{color:#999}} .k{{background:#c8f0c8}}
.d{{background:#f6c6c6;text-decoration:line-through}}</style>
<h2>{html.escape(title)}</h2><p>kept {n_k:,} of {n_t:,} response tokens ({n_k / max(n_t, 1):.1%}).
<span class=p>prompt</span> <span class=k>kept</span> <span class=d>dropped</span>; hover a token for its score.</p>
{''.join(rows)}"""
    atomic_write_text(path, page)
