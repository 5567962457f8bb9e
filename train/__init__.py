"""Stage 1 of FASTER: training a clip backbone by itself (`faster train-clip`, docs/train-clip.md).

The paper (Sec. "Implementation details") trains its two clip models separately before freezing
them for the aggregator: :mod:`faster.train.model` is a backbone with its classification head and
the weights file it leaves, :mod:`faster.train.data` the clips it learns from (random clip, scale
jitter, crop, flip) and the validation protocol of Table 2, :mod:`faster.train.clip` the command.
The training loop itself is :mod:`faster.engine`'s, shared with `faster fit`.
"""
