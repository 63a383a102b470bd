"""Train on tokenclean's decisions in another trainer: `trl` (TRL's SFTTrainer with float per-token weights)."""
