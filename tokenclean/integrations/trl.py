"""TRL's SFTTrainer on tokenclean's decisions, float weights included.

    from datasets import load_from_disk
    from trl import SFTConfig
    from tokenclean.integrations.trl import WeightedSFTTrainer

    data = load_from_disk("cleaned")   # python -m tokenclean.export RUN_DIR --format hf --out cleaned
    trainer = WeightedSFTTrainer(model=model, args=SFTConfig(output_dir="out"), train_dataset=data,
                                 processing_class=tokenizer)
    trainer.train()

The dataset is tokenclean's `cleaned.parquet` (or its export): `input_ids`, `labels` (-100 on the prompt and on
dropped tokens) and, for soft weights, `weights` (one float per token). The trainer minimises, over each optimiser
step,

    sum_j w_j * l_j / sum_j w_j

where the sums run over every micro-batch of the gradient accumulation and every rank: tokenclean's own
normalisation (tokenclean/train.py). Without a `weights` column, w is 1 on the labelled tokens and the loss is TRL's
own masked loss. How, in TRL's terms: `get_batch_samples` (the Trainer method that fetches a step's micro-batches
and counts their tokens for `num_items_in_batch`) counts the step's weight sum instead, gathered over the ranks as
the Trainer gathers token counts (`average_tokens_across_devices`, which it sets); `compute_loss` takes TRL's
per-token log-probabilities (its chunked LM head, `fused_lm_head=True`) and weighs them.

The examples are used as they are: dataset preparation is skipped (`dataset_kwargs={"skip_prepare_dataset": True}`,
so TRL neither truncates nor drops fully masked examples) and the `weights` column is kept
(`remove_unused_columns=False`). Tested against tokenclean's TokenLoss and final stage in tests/test_trl.py.
"""
from __future__ import annotations

import torch
from trl import SFTTrainer

WEIGHTS = "weights"


class WeightedCollator:
    """Pads `input_ids` (pad_token_id), `labels` (-100) and `weights` (0) to the longest example of the batch, on the
    right; `weights` default to 1 where the label is a token (a keep mask)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        out = {"input_ids": torch.full((len(examples), width), self.pad_token_id, dtype=torch.long),
               "attention_mask": torch.zeros((len(examples), width), dtype=torch.long),
               "labels": torch.full((len(examples), width), -100, dtype=torch.long),
               WEIGHTS: torch.zeros((len(examples), width), dtype=torch.float32)}
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            labels = torch.as_tensor(e["labels"], dtype=torch.long)
            weights = (torch.as_tensor(e[WEIGHTS], dtype=torch.float32) if e.get(WEIGHTS) is not None
                       else (labels != -100).float())
            if (weights < 0).any():
                raise ValueError("negative weights (scorer=forgetting's unlearning term) are normalised by the "
                                 "step's kept-token count in tokenclean, not by their sum: WeightedSFTTrainer "
                                 "takes weights >= 0")
            if len(labels) != n or len(weights) != n:
                raise ValueError(f"an example has {n} input_ids, {len(labels)} labels and {len(weights)} weights: "
                                 "the columns must be aligned token by token (as tokenclean writes them)")
            out["input_ids"][i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            out["attention_mask"][i, :n] = 1
            out["labels"][i, :n] = labels
            out[WEIGHTS][i, :n] = torch.where(labels != -100, weights, 0.0)
        return out


class WeightedSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss over each optimiser step is sum(w * l) / sum(w) (module docstring)."""

    loss_is_scaled_for_ga = True    # compute_loss divides by the whole step's weight sum

    def __init__(self, *args, data_collator=None, processing_class=None, **kwargs):
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is None:
            raise ValueError("WeightedSFTTrainer needs args=SFTConfig(...)")
        training_args.remove_unused_columns = False
        training_args.average_tokens_across_devices = True   # the weight sum of every rank divides the step's loss
        training_args.dataset_kwargs = {**(training_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        if data_collator is None:
            if processing_class is None:
                raise ValueError("WeightedSFTTrainer needs processing_class (the tokenizer, for its pad token) or a "
                                 "data_collator")
            pad = processing_class.pad_token_id
            data_collator = WeightedCollator(pad if pad is not None else processing_class.eos_token_id)
        super().__init__(*args, data_collator=data_collator, processing_class=processing_class, **kwargs)

    def get_batch_samples(self, epoch_iterator, num_batches: int, device: torch.device):
        """The step's micro-batches and their weight sum (of the weights on predicted tokens, all ranks)."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        total = torch.zeros((), dtype=torch.float32, device=device)
        for b in batches:
            total += b[WEIGHTS][:, 1:].sum().to(device)   # token 0 is predicted from nothing: never trained
        if self.args.world_size > 1:
            total = self.accelerator.gather(total).sum()
        return batches, total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        weights = inputs.pop(WEIGHTS)
        if not self.model.training:   # evaluation: TRL's own masked loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        outputs = model(**inputs, use_cache=False, fused_lm_head=True)
        weighted = -(outputs.log_probs * weights[:, 1:].to(outputs.log_probs.dtype)).sum()
        if num_items_in_batch is None:   # a step the Trainer did not count (no accumulation info): this batch
            num_items_in_batch = weights[:, 1:].sum()
        total = torch.as_tensor(num_items_in_batch, dtype=weighted.dtype, device=weighted.device)
        # a step with no weight trains on nothing (tokenclean's normaliser: 1), never 0 / 0
        loss = weighted / torch.where(total > 0, total, torch.ones_like(total))
        if self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes   # DDP averages the gradients over the ranks
        return (loss, outputs) if return_outputs else loss
