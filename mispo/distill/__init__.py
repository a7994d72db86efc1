"""mispo merge: distil domain experts into one generalist (sampling, rejection filters, SFT, on-policy distillation)."""
