"""The evaluation protocols as `evaluate` metrics: OmniAVS (J, DAVIS F, null scores, METEOR/BLEU) and Ref-AVS."""
