"""Attack algorithms: the threat model and its geometry (`threat`), PGD, FGSM and TRADES' inner maximisation
(`pgd`), the minimum-norm attack FMN (`fmn`) and its tuning (`fmn_tune`). They import neither the training loops
nor evaluation."""
