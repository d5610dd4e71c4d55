"""Evaluation of OISA on OmniAVS and Ref-AVS (`eval.py`): the sharded runner, its result files and the final report."""
