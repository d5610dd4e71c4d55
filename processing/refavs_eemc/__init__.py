"""
Processing for EEMC, the Ref-AVS baseline (`modeling_refavs`): the VGGish log-mel front end and the processor that
turns frames, an expression and a soundtrack into the model's inputs and its maps back into masks.
"""
