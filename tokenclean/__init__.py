"""tokenclean: supervised fine-tuning that learns only from the tokens worth learning."""
__version__ = "0.1.0"
