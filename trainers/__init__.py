"""Layer 4: attack algorithms (`attacks/`), certification (`certify/`), evaluation (`evaluation/`), and the training
objectives and epoch loops."""
