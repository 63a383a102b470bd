"""What a run ends with, one type for both pipelines: `Summary`, written as summary.json (`to_json`) and printed as
the CLI's closing lines (`lines`). The pipelines fill what they measured (fixed.summarize, self_evolving.summarize),
job.finish what every run has (time, directories, the pool, truncation, timers)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Summary:
    pipeline: str                        # "fixed" | "self_evolving"
    tokens_scored: int                   # response tokens a scorer scored (0 for the baselines; round 0 excluded)
    tokens_target: int                   # response tokens of the stages that trained (every round)
    tokens_kept: int | float             # of those, the kept ones (online: over every trained occurrence)
    kept_ratio: float                    # kept / target (soft weights: their sum / target)
    eval_loss_before: float | None       # held-out loss of the base (None without an eval set)
    eval_loss_after: float | None        # held-out loss of the final checkpoint
    checkpoint: str | None               # the final model, an HF checkpoint directory (None: score only)
    final_trained: bool = True           # False: score only (pipeline.train_final=false), no final model
    weight_sum: float | None = None      # soft weights: their sum (a round trained whole weighs 1 per token)
    eval_loss_reference: float | None = None   # fixed: the warm-up reference's held-out loss
    first_reference: str | None = None   # self-evolving: round0 | warmup (pipeline.first_reference)
    rounds: list[dict] | None = None     # self-evolving: round, tokens_target, tokens_kept, kept_ratio, eval_loss
    tasks: dict | None = None            # eval.tasks: {"base"|"reference"|"final": {task: scores}, "rounds": ...}
    command: list[str] | None = None     # the command line that ran it (tokenclean and its overrides)
    # set by job.finish
    seconds: float = 0.0                 # the whole run, setup to report
    run_dir: str = ""
    pool: dict = dataclasses.field(default_factory=dict)        # examples, warmup_source, warmup_examples
    truncation: dict = dataclasses.field(default_factory=dict)  # examples, target_tokens, dropped_examples
    malformed_records_skipped: int = 0
    timers: dict = dataclasses.field(default_factory=dict)      # Timers.summary(): wall and CPU seconds per part

    def to_json(self) -> dict:
        """The fields as summary.json holds them; the optional ones (default None) only where a run has them."""
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        return {k: v for k, v in dataclasses.asdict(self).items() if not (k in optional and v is None)}

    def lines(self) -> str:
        """The closing summary the CLI prints."""
        def f(x, fmt="{:.4f}"):
            return "n/a" if x is None else fmt.format(x)

        out = [f"tokenclean: {self.pipeline} pipeline finished in {self.seconds:.0f}s"]
        for r in self.rounds or ():
            out.append(f"  round {r['round']}: kept {r['tokens_kept']:,}/{r['tokens_target']:,} tokens, "
                       f"held-out loss {f(r.get('eval_loss'))}")
        out += [
            f"  response tokens scored   {self.tokens_scored:,}",
            f"  response tokens kept     {self.tokens_kept:,} of {self.tokens_target:,} ({self.kept_ratio:.1%})",
            f"  held-out loss            {f(self.eval_loss_before)} (base) -> {f(self.eval_loss_after)} (cleaned)"
            if self.final_trained else f"  held-out loss            {f(self.eval_loss_before)} (base)",
        ]
        if self.eval_loss_reference is not None:
            out.append(f"  held-out loss reference  {f(self.eval_loss_reference)}")
        tasks = self.tasks or {}
        for task, after in (tasks.get("final") or {}).items():
            before = tasks["base"][task]["acc"]
            out.append(f"  {'task ' + task:<24} {before:.4f} (base) -> {after['acc']:.4f} (cleaned) accuracy"
                       + (f", {after['n']} documents" if "n" in after else ""))
        if self.pool:
            n, where = self.pool["warmup_examples"], {"file": "from data.warmup",
                                                      "carved": "carved from data.train, held out of every arm's pool"}
            warm = f", warm-up set {n:,} examples {where[self.pool['warmup_source']]}" if n else ""
            out.append(f"  training pool            {self.pool['examples']:,} examples{warm}")
        if self.truncation.get("examples"):
            out.append(f"  truncated                {self.truncation['examples']} examples, "
                       f"{self.truncation['target_tokens']} response tokens lost")
        out += [f"  checkpoint               {self.checkpoint}" if self.final_trained else
                "  checkpoint               none: score only (pipeline.train_final=false); cleaned.parquet holds the "
                "decisions, `python -m tokenclean.export` writes them for TRL, ms-swift or datasets",
                f"  run directory            {self.run_dir}"]
        return "\n".join(out)
