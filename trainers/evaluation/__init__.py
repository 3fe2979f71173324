"""Evaluation: the attack registry (`registry`), the one clean pass and project/score step (`scoring`), the
registered attacks (`gradient`, `apgd`, `autoattack`), test.py's suite (`suite`) and per-epoch validation
(`validation`)."""
