"""Evaluation: the attack contract and registry (`registry`), the one clean pass and project/score step (`scoring`),
the registered attacks (`gradient`, `apgd`, `autoattack`, `certified`, `minimum_norm`), test.py's suite with its
pre-flight checks (`suite`), the result schema and its reader (`report`), the AP benchmark's protocol
(`ap_protocol`), gradient-masking checks and per-epoch validation (`validation`)."""
