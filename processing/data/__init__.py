"""
Datasets as OISA's training and evaluation samples: readers of OmniAVS and Ref-AVS, of the image, video, image-text and
audio-text training sets, the streamed and resumable mixture, and the synthetic moving-shapes generators.
"""
