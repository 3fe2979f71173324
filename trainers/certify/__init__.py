"""Certification: IBP and CROWN-IBP bounds (`bounds`) and randomized smoothing (`smoothing`). They import neither
the training loops nor evaluation."""
