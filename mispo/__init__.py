"""mispo: RL post-training of large language models with MIS-PO (Step 3.5 Flash report)."""

from . import auto_registration

__version__ = "0.1.0"

auto_registration.install()  # Step3p5 joins transformers' Auto classes when they are imported (nothing heavy now)
