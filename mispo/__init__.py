"""mispo: RL post-training of large language models with MIS-PO (Step 3.5 Flash report)."""

__version__ = "0.1.0"
