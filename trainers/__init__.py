"""Layer 4: attacks, adversarial-training objectives, the epoch loops and evaluation."""
